"""Test-wide settings, applied before JAX starts its backend (and inherited by the commands tests start):

- the `jaxgen` command's persistent compilation cache (the user's, ``~/.cache/jaxgen/xla``) stays off, so that tests
  neither write to the user's cache nor depend on what an earlier run left there; a fresh cache for this session only
  is shared by the test processes instead (below);
- XLA compiles for the CPU without LLVM's optimisation passes (``--xla_backend_optimization_level=0``): the tests are
  dominated by compilation, which this makes about twice as fast (the fast tier 3m29s -> 2m35s, the full suite 17m29s
  -> 14m16s on 2 cores), while the compiled programs compute the same IEEE operations, only more slowly. A level
  already in ``XLA_FLAGS`` is kept (``XLA_FLAGS=--xla_backend_optimization_level=2 ./test.sh`` tests optimised code).
"""

import os

os.environ.setdefault("JAXGEN_COMPILATION_CACHE", "0")

TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAG).strip()

# XLA's CPU fusion emitters (MLIR) compile each fused kernel several times more slowly than the classic elemental
# emitter that this flag selects (the fast tier 4m18s -> 2m35s on 2 cores); the kernels compute the same operations,
# up to the last bit where the two fuse a multiply-add differently (tests must not depend on that bit: a DDPM schedule
# evaluated exactly at a knot once did, jaxgen/paths/ddpm.py). Newer XLA builds (jax 0.12) have dropped the flag and abort on an unknown flag, so a child process tries
# it once per session (the xdist workers and the commands tests start inherit the decision through XLA_FLAGS).
EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "") and "PYTEST_XDIST_WORKER" not in os.environ \
        and os.environ.get("JAXGEN_TEST_EMITTER_PROBED") != "1":
    import subprocess
    import sys

    _flags = (os.environ.get("XLA_FLAGS", "") + " " + EMITTER_FLAG).strip()
    _probe = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; jax.jit(jnp.sin)(1.0)"],
                            env={**os.environ, "XLA_FLAGS": _flags, "JAX_PLATFORMS": "cpu"}, capture_output=True)
    if _probe.returncode == 0:
        os.environ["XLA_FLAGS"] = _flags
    os.environ["JAXGEN_TEST_EMITTER_PROBED"] = "1"

# One persistent compilation cache per test session, shared by the xdist workers and the commands tests start, and
# deleted at the end: a program compiled by one test (a training step, a sampler, a CLI run that a later test resumes)
# is read back instead of compiled again by the others, without reading or writing the user's cache or depending on an
# earlier session. Programs that compile in under 0.2 s are not worth a file. JAXGEN_TEST_COMPILATION_CACHE=0: off.
if (os.environ.get("JAXGEN_TEST_COMPILATION_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ
        and "PYTEST_XDIST_WORKER" not in os.environ):
    import tempfile

    _SESSION_CACHE = tempfile.mkdtemp(prefix="jaxgen-test-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
else:
    _SESSION_CACHE = None


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE is not None and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
