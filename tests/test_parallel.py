"""Data parallelism on a mesh, topology changes across checkpoints and a real two-process run, on this CPU.

Fake devices need the backend to start with them, so the work runs in subprocesses: this file is also the worker
(``python tests/test_parallel.py devices 8 OUT``, ``... process ID NUM PORT OUT`` or ``... killable OUT``). The parent
compares what the workers write with single-device runs of its own.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, SEED = 20, 10, 7


def _trainer(mesh=None, shard=False):
    import jax
    import optax
    from flax import nnx

    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField, shard_parameters
    from jaxgen.training import Trainer

    def data(key):  # labelled 2-D data drawn inside the compiled step
        return {"x": jax.random.normal(key, (64, 2)) * 2.0, "y": jax.random.randint(key, (64,), 0, 3)}

    model = MLPField(2, width=32, hidden_layers=2, num_classes=3, rngs=nnx.Rngs(0))
    if shard:  # parameter sharding: every kernel split over the data axis along its outputs where 8 divides them
        shard_parameters(model, min_size=1)
    return Trainer(model, flow_matching_loss("linear", label_dropout=0.2, null_label=3), optax.adam(1e-2), data=data,
                   ema_decay=0.9, mesh=mesh)


def _leaves(state):
    import jax

    plain = jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
                         state)
    return [np.asarray(x) for x in jax.tree.leaves(plain)]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
               for x, y in zip(_leaves(a), _leaves(b)))


def _devices_worker(n, out):
    """With ``n`` fake devices: 1 vs n devices, and checkpoints moved between the two topologies."""
    import jax

    jax.config.update("jax_num_cpu_devices", int(n))
    from jaxgen.training import Checkpointer, Checkpointing, data_mesh

    report = {"devices": jax.device_count()}
    single, multi = _trainer(), _trainer(data_mesh())
    s1, l1 = single.fit(single.init(SEED), STEPS, chunk=EVERY, progress=False)
    sn, ln = multi.fit(multi.init(SEED), STEPS, chunk=EVERY, progress=False)
    report["loss_diff"] = float(np.max(np.abs(l1 - ln)))
    report["state_diff"] = _max_diff(s1, sn)
    kernel = sn.params["out"]["kernel"][...]
    report["replicated_on"] = len(kernel.sharding.device_set) if kernel.sharding.is_fully_replicated else 0
    # parameter sharding: parameters, optimizer moments and EMA split over the mesh, the same run
    sharded = _trainer(data_mesh(), shard=True)
    ss, ls = sharded.fit(sharded.init(SEED), STEPS, chunk=EVERY, progress=False)
    report["sharded_loss_diff"] = float(np.max(np.abs(l1 - ls)))
    report["sharded_state_diff"] = _max_diff(s1, ss)
    report["split"] = sorted({jax.tree_util.keystr(p).split("[")[0].strip(".")
                              for p, x in jax.tree_util.tree_flatten_with_path(ss)[0]
                              if isinstance(x, jax.Array) and not x.sharding.is_fully_replicated})
    kernel = ss.params["layers"][0]["kernel"][...]
    report["kernel_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
    report["out_kernel_split"] = not ss.params["out"]["kernel"][...].sharding.is_fully_replicated  # 2 outputs
    for name, (writer, reader, reference) in {"n_to_1": (multi, single, s1), "1_to_n": (single, multi, sn),
                                              "sharded_to_1": (sharded, single, s1),
                                              "1_to_sharded": (single, sharded, ss)}.items():
        directory = os.path.join(out, name)
        with Checkpointer(directory) as ckpt:
            writer.fit(writer.init(SEED), EVERY, chunk=EVERY, progress=False, callbacks=[Checkpointing(ckpt, EVERY)])
        with Checkpointer(directory) as ckpt:
            resumed = ckpt.restore(reader.abstract_state(SEED))
        on = resumed.params["out"]["kernel"][...].sharding
        report[f"{name}_devices"] = len(on.device_set)
        final, _ = reader.fit(resumed, until_step=STEPS, chunk=EVERY, progress=False)
        report[f"{name}_diff"] = _max_diff(final, reference)
    print("REPORT " + json.dumps(report), flush=True)


def _process_worker(pid, num, port, out):
    """One of ``num`` jax.distributed processes (2 fake devices each): train with checkpoints on the global mesh,
    resume from the first checkpoint as after a kill, and (process 0) save the final state; then train on host-sharded
    data (:func:`_loader_part`)."""
    os.environ.update(JAXGEN_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXGEN_NUM_PROCESSES=str(num),
                      JAXGEN_PROCESS_ID=str(pid))
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    from jaxgen.training import Checkpointer, Checkpointing, data_mesh, initialize, is_main_process

    assert initialize(), "jax.distributed did not start"
    trainer = _trainer(data_mesh())
    directory = os.path.join(out, "ckpt")
    with Checkpointer(directory) as ckpt:
        uninterrupted, losses = trainer.fit(trainer.init(SEED), STEPS, chunk=EVERY, progress=False,
                                            callbacks=[Checkpointing(ckpt, EVERY)])
    with Checkpointer(directory) as ckpt:  # a run killed after its first checkpoint comes back from it
        resumed = ckpt.restore(trainer.abstract_state(SEED), step=EVERY)
    final, _ = trainer.fit(resumed, until_step=STEPS, chunk=EVERY, progress=False)
    report = {"process_count": jax.process_count(), "devices": jax.device_count(),
              "resume_diff": _max_diff(final, uninterrupted)}
    if is_main_process():
        np.savez(os.path.join(out, "final.npz"), *_leaves(final))
        np.save(os.path.join(out, "losses.npy"), losses)
    report.update(_loader_part(num, out))
    print("REPORT " + json.dumps(report), flush=True)
    jax.distributed.shutdown()


def _killable_worker(out):
    """Train on 8 fake devices to ``2 * STEPS`` from the latest checkpoint in ``out`` (pausing after each chunk, so
    that the parent can kill it mid-run); at the end save the final state."""
    import time

    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    from jaxgen.training import Checkpointer, Checkpointing, data_mesh

    trainer = _trainer(data_mesh())
    with Checkpointer(os.path.join(out, "ckpt"), max_to_keep=2) as ckpt:
        fresh = ckpt.latest_step() is None
        state = trainer.init(SEED) if fresh else ckpt.restore(trainer.abstract_state(SEED))
        print(f"FIRST {int(state.step)}", flush=True)
        state, _ = trainer.fit(state, until_step=2 * STEPS, chunk=EVERY // 2, progress=False,
                               callbacks=[Checkpointing(ckpt, EVERY), lambda s, l: time.sleep(0.4)])
    np.savez(os.path.join(out, "final.npz"), *_leaves(state))
    print(f"DONE {int(state.step)}", flush=True)


LOADER_STEPS, PER_HOST = 4, 16


def _image_trainer(mesh=None):
    import optax
    from flax import nnx

    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import UNetField
    from jaxgen.training import Trainer

    model = UNetField(1, channels=8, channel_mult=(1,), attention_resolutions=(), num_groups=4, num_classes=10,
                      dropout=0.0, rngs=nnx.Rngs(0))
    return Trainer(model, flow_matching_loss("linear", label_dropout=0.1, null_label=10), optax.adam(1e-3), mesh=mesh)


def _loader_part(num, out):
    """In one of ``num`` started processes: host-sharded digits batches (each host reads its own slice of every
    epoch) through ``prefetch_to_device`` onto the global mesh, and training on them."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxgen.data import ImageLoader, load_digits, prefetch_to_device
    from jaxgen.training import data_mesh, is_main_process

    mesh = data_mesh()
    trainer = _image_trainer(mesh)
    state = trainer.init(SEED)
    batches = prefetch_to_device(ImageLoader(load_digits("train"), PER_HOST, seed=3), 2,
                                 NamedSharding(mesh, PartitionSpec("data")))
    losses = []
    for _ in range(LOADER_STEPS):
        batch = next(batches)
        assert batch["x"].shape == (num * PER_HOST, 8, 8, 1)  # the global batch
        state, loss = trainer.step(state, batch)
        losses.append(float(loss))
    if is_main_process():
        np.save(os.path.join(out, "loader_losses.npy"), np.asarray(losses))
        np.savez(os.path.join(out, "loader_final.npz"), *_leaves(state))
    return {"loader_devices": jax.device_count()}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # of the parent's XLA flags only the suite's optimisation level (tests/conftest.py): each child sets its devices
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if f.startswith("--xla_backend_optimization_level"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _report(stdout, stderr):
    lines = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, f"no report\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-4000:]}"
    return json.loads(lines[-1][len("REPORT "):])


def _single_device_reference():
    trainer = _trainer()
    return trainer.fit(trainer.init(SEED), STEPS, chunk=EVERY, progress=False)


@pytest.mark.slow
def test_eight_fake_devices_match_one_and_checkpoints_move_between_topologies(tmp_path):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "devices", "8", str(tmp_path)],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600, stdin=subprocess.DEVNULL)
    r = _report(proc.stdout, proc.stderr)
    assert proc.returncode == 0 and r["devices"] == 8, proc.stderr[-3000:]
    assert r["replicated_on"] == 8, r  # the state is replicated over the mesh
    # the same seed and global batch: the same losses and state on 1 and on 8 devices, up to reduction order
    assert r["loss_diff"] < 1e-5 and r["state_diff"] < 1e-5, r
    # written on 8 devices, restored on 1 and continued (and the reverse): the run it would have been
    assert r["n_to_1_devices"] == 1 and r["1_to_n_devices"] == 8, r
    assert r["n_to_1_diff"] < 1e-5 and r["1_to_n_diff"] < 1e-5, r
    # parameter sharding: the same run, with parameters, Adam's moments and the EMA split eight ways
    assert r["sharded_loss_diff"] < 1e-5 and r["sharded_state_diff"] < 1e-5, r
    assert r["split"] == ["ema_params", "opt_state", "params"], r
    assert r["kernel_shard_shape"] == [2 + 32 + 1, 32 // 8], r  # a (35, 32) kernel: 4 output columns per device
    assert r["out_kernel_split"] is False, r  # 2 outputs: not divisible by 8, kept whole
    assert r["sharded_to_1_devices"] == 1 and r["1_to_sharded_devices"] == 8, r
    assert r["sharded_to_1_diff"] < 1e-5 and r["1_to_sharded_diff"] < 1e-5, r


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Two jax.distributed processes of 2 fake devices each (:func:`_process_worker`), started once for the tests
    below: their reports and the directory process 0 wrote to."""
    out = tmp_path_factory.mktemp("two_processes")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "process", str(i), "2", str(port),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                              cwd=REPO, stdin=subprocess.DEVNULL) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [_report(*o) for o in outputs], out


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_match_one_process(two_processes):
    reports, tmp_path = two_processes
    for r in reports:
        assert r["process_count"] == 2 and r["devices"] == 4, r
        assert r["resume_diff"] < 1e-6, r  # resumed from the step-10 checkpoint: the uninterrupted run's end
    reference, ref_losses = _single_device_reference()
    np.testing.assert_allclose(np.load(tmp_path / "losses.npy"), ref_losses, rtol=1e-5, atol=1e-6)
    final = np.load(tmp_path / "final.npz")
    for i, want in enumerate(_leaves(reference)):
        np.testing.assert_allclose(final[f"arr_{i}"], want, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "ckpt" / "metrics.jsonl").exists()


if __name__ == "__main__" and len(sys.argv) > 1:
    if sys.argv[1] == "devices":
        _devices_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "killable":
        _killable_worker(sys.argv[2])
    elif sys.argv[1] == "process":
        _process_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])


def _cli(out, *, env_extra=None):
    env = _env()
    extra = dict(env_extra or {})
    env["XLA_FLAGS"] = " ".join(filter(None, [env["XLA_FLAGS"], extra.pop("XLA_FLAGS", "")]))
    env.update(extra)
    return subprocess.Popen([sys.executable, "-m", "experiments", "train", "digits_smoke", "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_the_cli_runs_unchanged_on_one_device_and_as_two_processes_of_two_devices(tmp_path):
    """`jaxgen train digits_smoke` on 1 device and as 2 processes of 2 fake devices each (the batch split over a
    4-device mesh that spans the processes): the same losses and samples; only process 0 writes and prints. (8 devices
    in one process: the trainer, checkpoints and a killed run in the tests above.)"""
    runs = {"one": [_cli(tmp_path / "one")]}
    port = _free_port()
    runs["two"] = [_cli(tmp_path / "two", env_extra={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAXGEN_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAXGEN_NUM_PROCESSES": "2", "JAXGEN_PROCESS_ID": str(i)}) for i in range(2)]
    outputs = {}
    try:
        for name, procs in runs.items():
            outputs[name] = [p.communicate(timeout=600) for p in procs]
    finally:
        for procs in runs.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for name, procs in runs.items():
        for p, (out, err) in zip(procs, outputs[name]):
            assert p.returncode == 0, (name, err[-3000:])
    printed = [("outputs in" in out) for out, _ in outputs["two"]]
    assert printed == [True, False], printed  # process 0 reports, process 1 stays quiet
    ref_losses, ref_samples = (np.load(tmp_path / "one" / f) for f in ("losses.npy", "samples.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "two" / "losses.npy"), ref_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "two" / "samples.npy"), ref_samples, atol=1e-4)
    assert (tmp_path / "two" / "report.md").exists()


@pytest.mark.slow
def test_a_killed_eight_device_run_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path):
    import signal
    import time

    def start():
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "killable", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
                                stdin=subprocess.DEVNULL)

    def committed():
        d = tmp_path / "ckpt"
        return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.exists() else []

    run = start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and (not committed() or max(committed()) < 2 * EVERY) and run.poll() is None:
            time.sleep(0.1)
        assert run.poll() is None, run.communicate()[1][-3000:]
        os.kill(run.pid, signal.SIGKILL)  # mid-run, past the checkpoint of step 20
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    latest = max(committed())
    assert 2 * EVERY <= latest < 2 * STEPS
    again = start()
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    first = [int(line.split()[1]) for line in out.splitlines() if line.startswith("FIRST ")]
    assert first == [latest] and f"DONE {2 * STEPS}" in out, out
    trainer = _trainer()
    reference, _ = trainer.fit(trainer.init(SEED), 2 * STEPS, chunk=EVERY // 2, progress=False)
    final = np.load(tmp_path / "final.npz")
    for i, want in enumerate(_leaves(reference)):
        np.testing.assert_allclose(final[f"arr_{i}"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_hosts_feed_their_own_slices_of_the_data_into_one_global_batch(two_processes):
    """Each process reads its own slice of every epoch (ImageLoader's host sharding) and prefetch_to_device assembles
    the global batch on the mesh: training equals one device trained on the two hosts' batches concatenated."""
    import jax.numpy as jnp

    from jaxgen.data import ImageLoader, load_digits

    reports, tmp_path = two_processes
    assert [r["loader_devices"] for r in reports] == [4, 4], reports
    data = load_digits("train")
    hosts = [ImageLoader(data, PER_HOST, seed=3, process_index=i, process_count=2) for i in range(2)]
    trainer = _image_trainer()
    state, losses = trainer.init(SEED), []
    for _ in range(LOADER_STEPS):
        parts = [next(h) for h in hosts]
        batch = {k: jnp.concatenate([b[k] for b in parts]) for k in ("x", "y")}
        state, loss = trainer.step(state, batch)
        losses.append(float(loss))
    np.testing.assert_allclose(np.load(tmp_path / "loader_losses.npy"), losses, rtol=1e-5, atol=1e-6)
    final = np.load(tmp_path / "loader_final.npz")
    for i, want in enumerate(_leaves(state)):
        np.testing.assert_allclose(final[f"arr_{i}"], want, rtol=1e-4, atol=1e-6)


def test_parameter_sharding_annotations_and_their_errors():
    """shard_parameters annotates the large kernels along their outputs (NNX partitioning metadata); on a one-device
    mesh nothing is split; an annotation naming an axis the mesh lacks is refused."""
    import jax
    from flax import nnx

    from jaxgen.models import MLPField, shard_parameters
    from jaxgen.training import data_mesh
    from jaxgen.training.parallel import parameter_shardings

    mlp = shard_parameters(MLPField(2, width=32, hidden_layers=2, rngs=nnx.Rngs(0)), min_size=65)
    specs = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        nnx.get_partition_spec(nnx.state(mlp, nnx.Param)), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    assert specs["['layers'][1]['kernel'].value"] == jax.sharding.PartitionSpec(None, "data")
    assert specs["['layers'][1]['bias'].value"] == jax.sharding.PartitionSpec()  # 1-D: replicated
    assert specs["['out']['kernel'].value"] == jax.sharding.PartitionSpec()  # (32, 2): 64 weights, below min_size
    assert parameter_shardings(nnx.state(mlp, nnx.Param), data_mesh()) is None  # one device: nothing to split
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="mesh axis 'data'.*axes \\('model',\\)"):
        parameter_shardings(nnx.state(mlp, nnx.Param), mesh)
    for bad, kw in (("", {}), ("data", {"min_size": 0})):
        with pytest.raises(ValueError, match="axis must be|min_size must be"):
            shard_parameters(MLPField(2, rngs=nnx.Rngs(0)), bad, **kw)


@pytest.mark.slow
def test_unet_shard_axis_annotates_its_large_kernels_and_keeps_its_weights():
    import jax
    from flax import nnx

    from jaxgen.models import UNetField

    plain = UNetField(1, channels=32, image_size=8, zero_init=False, rngs=nnx.Rngs(3))
    annotated = UNetField(1, channels=32, image_size=8, zero_init=False, shard_axis="data", rngs=nnx.Rngs(3))
    assert annotated.mid.res.conv1.kernel.get_metadata()["out_sharding"] == (None, None, None, "data")  # 36,864
    assert annotated.conv_in.kernel.get_metadata().get("out_sharding") is None  # (3, 3, 1, 32): 288 weights
    for a, b in zip(jax.tree.leaves(nnx.state(plain, nnx.Param)), jax.tree.leaves(nnx.state(annotated, nnx.Param))):
        np.testing.assert_array_equal(a, b)  # the same weights: annotations place arrays, they do not change them
