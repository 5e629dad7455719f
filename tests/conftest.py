"""Test-wide settings, applied before JAX starts its backend (and inherited by the commands tests start):

- the `jaxgen` command's persistent compilation cache (the user's, ``~/.cache/jaxgen/xla``) stays off, so that tests
  neither write to the user's cache nor depend on what an earlier run left there; a fresh cache for this session only
  is shared by the test processes instead (below);
- XLA compiles for the CPU without LLVM's optimisation passes (``--xla_backend_optimization_level=0``): the tests are
  dominated by compilation, which this makes about twice as fast (the fast tier 3m29s -> 2m35s, the full suite 17m29s
  -> 14m16s on 2 cores), while the compiled programs compute the same IEEE operations, only more slowly. A level
  already in ``XLA_FLAGS`` is kept (``XLA_FLAGS=--xla_backend_optimization_level=2 ./test.sh`` tests optimised code);
- the few tests whose time goes into *running* compiled code rather than compiling it (training for hundreds of
  steps) carry ``@pytest.mark.optimised``: each runs in a child pytest process compiled with the passes
  (``--xla_backend_optimization_level=2``), 2-3x faster than unoptimised, a few seconds of start-up included (the
  8-Gaussians-to-moons recipe 77 s -> 30 s, the VQ-VAE's 43 s -> 13 s, measured one at a time on one core).
"""

import os

os.environ.setdefault("JAXGEN_COMPILATION_CACHE", "0")

TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
UNOPTIMISED = "JAXGEN_TEST_UNOPTIMISED"  # "1": this session chose the level (not the user); inherited by the workers
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAG).strip()
    os.environ[UNOPTIMISED] = "1"

# XLA's CPU fusion emitters (MLIR) compile each fused kernel several times more slowly than the classic elemental
# emitter that this flag selects (the fast tier 4m18s -> 2m35s on 2 cores); the kernels compute the same operations,
# up to the last bit where the two fuse a multiply-add differently (tests must not depend on that bit: a DDPM schedule
# evaluated exactly at a knot once did, jaxgen/paths/ddpm.py). Newer XLA builds (jax 0.12) have dropped the flag and abort on an unknown flag, so a child process tries
# it once per session (the xdist workers and the commands tests start inherit the decision through XLA_FLAGS).
EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "") and "PYTEST_XDIST_WORKER" not in os.environ \
        and os.environ.get("JAXGEN_TEST_EMITTER_PROBED") != "1":
    import importlib.metadata
    import subprocess
    import sys

    _flags = (os.environ.get("XLA_FLAGS", "") + " " + EMITTER_FLAG).strip()
    try:  # jaxlib 0.10 has the flag (no probe: it costs 1.3 s before the workers start); others are probed
        _known = importlib.metadata.version("jaxlib").startswith("0.10.")
    except importlib.metadata.PackageNotFoundError:
        _known = False
    if _known or subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; jax.jit(jnp.sin)(1.0)"],
                                env={**os.environ, "XLA_FLAGS": _flags, "JAX_PLATFORMS": "cpu"},
                                capture_output=True).returncode == 0:
        os.environ["XLA_FLAGS"] = _flags
    os.environ["JAXGEN_TEST_EMITTER_PROBED"] = "1"

# One persistent compilation cache per test session, shared by the xdist workers and the commands tests start, and
# deleted at the end: a program compiled by one test (a training step, a sampler, a CLI run that a later test resumes)
# is read back instead of compiled again by the others, without reading or writing the user's cache or depending on an
# earlier session. Programs that compile in under 0.02 s are not worth a file (a threshold of 0.2 s instead: the
# experiment, conditioning and ControlNet tests 224 s -> 237-271 s on one core; the many small programs of model
# initialisation and evaluation recur across tests and processes). JAXGEN_TEST_COMPILATION_CACHE=0: off.
if (os.environ.get("JAXGEN_TEST_COMPILATION_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ
        and "PYTEST_XDIST_WORKER" not in os.environ):
    import tempfile

    _SESSION_CACHE = tempfile.mkdtemp(prefix="jaxgen-test-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.02")
else:
    _SESSION_CACHE = None


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE is not None and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


OPTIMISED_FLAG = "--xla_backend_optimization_level=2"
OPTIMISED_CHILD = "JAXGEN_TEST_OPTIMISED_CHILD"


def pytest_configure(config):
    config.addinivalue_line("markers", "optimised: run in a child pytest process whose XLA keeps its optimisation "
                                       "passes (tests that spend their time executing, not compiling)")


def pytest_pyfunc_call(pyfuncitem):
    """An ``optimised`` test, in a session that compiles without the optimisation passes by this file's choice (not
    by a level set in ``XLA_FLAGS``), runs as a child pytest process with them (the same test id, environment and
    session compilation cache); its failure report is the child's output."""
    if (pyfuncitem.get_closest_marker("optimised") is None or os.environ.get(OPTIMISED_CHILD) == "1"
            or os.environ.get(UNOPTIMISED) != "1"):
        return None  # a level the user chose in XLA_FLAGS holds for every test
    import subprocess
    import sys

    import pytest

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace(TEST_XLA_FLAG, OPTIMISED_FLAG)
    env[OPTIMISED_CHILD] = "1"
    env.pop(UNOPTIMISED, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    proc = subprocess.run(cmd, cwd=str(pyfuncitem.config.rootpath), env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"{pyfuncitem.nodeid} failed in its optimised child process ({' '.join(cmd[1:])}, exit "
                    f"{proc.returncode}):\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    return True


# The files that take longest (a clean clone's `.ci/run --durations=0` on 2 cores: the multi-process runs, the
# experiments' end-to-end runs, the notebooks, the longest trainings) are collected first, the rest in their usual
# order. test.sh hands the workers whole files in collection order (`--dist loadfile --no-loadscope-reorder`; xdist's
# default order, most tests first, started these files last, and the suite ended with one worker running them alone).
LONGEST_FIRST = ("test_parallel.py", "test_experiment_toy2d.py", "test_experiment_images.py",
                 "test_experiment_conditioning.py", "test_notebooks.py", "test_unet.py", "test_vae.py", "test_ebm.py",
                 "test_flows.py", "test_oracle.py", "test_scm.py", "test_controlnet.py", "test_gan.py",
                 "test_flow_map.py", "test_samplers.py", "test_experiment_differentiable.py")


# The same for the fast tier (`-m "not slow"`: `./test.sh -m "not slow" --durations=0` on 2 cores), whose longest
# files are others: without its own order the longest of them (test_inverse.py, 30 s) started mid-run.
LONGEST_FIRST_FAST = ("test_inverse.py", "test_ebm.py", "test_controlnet.py", "test_cross_attention.py",
                      "test_unet.py", "test_flow_map.py", "test_vae.py", "test_ddpm.py", "test_train.py",
                      "test_samplers.py", "test_flows.py", "test_gan.py", "test_score_sde.py", "test_checkpoint.py",
                      "test_metrics.py", "test_scm.py")


def pytest_collection_modifyitems(session, config, items):
    fast = "not slow" in " ".join((config.getoption("markexpr", "") or "").split())
    rank = {name: i for i, name in enumerate(LONGEST_FIRST_FAST if fast else LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
