"""Checkpointer: exact round trips (EMA or none, typed keys), retention, metadata, a clear error for a model
of the wrong size, and a real SIGKILL-and-resume run in a subprocess that ends bitwise where an
uninterrupted run ends.

This file is also the subprocess: ``python tests/test_checkpoint.py child ...`` trains the tiny model.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgen.data.toy2d import moons
from jaxgen.losses import flow_matching_loss
from jaxgen.models import MLPField
from jaxgen.training import Checkpointer, Checkpointing, Trainer, TrainState

SEED = 3
NUM_STEPS, EVERY = 60, 10
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _tiny_trainer(width=16, ema=0.9):
    model = MLPField(2, width=width, hidden_layers=1, time_dim=8, rngs=nnx.Rngs(0))
    return Trainer(model, flow_matching_loss("linear"), optax.adam(1e-2), data=lambda key: moons(key, 64),
                   ema_decay=ema)


def _plain(tree):
    """Leaves as numpy arrays (typed keys as their key data), for comparisons."""
    def f(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return jax.tree.map(f, tree)


def _scramble(state: TrainState, seed: int) -> TrainState:
    """The same structure with random values everywhere (host-made: no compilation)."""
    rng = np.random.default_rng(seed)

    def f(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.asarray(rng.integers(1, 1000, size=x.shape).astype(x.dtype))
        return jnp.asarray(rng.normal(size=x.shape).astype(x.dtype))

    return jax.tree.map(f, state)._replace(key=jax.random.key(seed))


def _assert_same(a, b, exact=True):
    a, b = _plain(a), _plain(b)
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)  # also the structure
    if exact:
        chex.assert_trees_all_equal(a, b)
    else:
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def trainer():
    return _tiny_trainer()


@pytest.fixture(scope="module")
def trainer_no_ema():
    return _tiny_trainer(ema=None)


# -- round trips -------------------------------------------------------------------------------------

def test_round_trip_with_ema_restores_every_leaf_and_the_typed_key(trainer, tmp_path):
    state = _scramble(trainer.init(0), 1)._replace(step=jnp.asarray(7, jnp.int32))
    with Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.save(state)
        assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
        restored = ckpt.restore(trainer.init(5))  # a template with other values: everything comes from disk
    assert isinstance(restored, TrainState)
    assert jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    assert restored.key.dtype == state.key.dtype
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(jax.random.key(1)))
    assert isinstance(restored.params, nnx.State) and restored.ema_params is not None
    _assert_same(restored, state)
    # the restored state trains and models like the original
    model = trainer.model(restored, ema=True)
    np.testing.assert_array_equal(model.out.kernel[...], state.ema_params["out"]["kernel"][...])
    # an abstract template (no arrays allocated) works too
    with Checkpointer(tmp_path / "ck") as ckpt:
        again = ckpt.restore(jax.eval_shape(trainer.init, jax.random.key(0)))
    _assert_same(again, state)


def test_a_non_finite_state_is_never_saved(trainer, tmp_path):
    state = trainer.init(0)
    nu = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf) if x.ndim else x, state.ema_params)
    with Checkpointer(tmp_path / "ck") as ckpt:
        with pytest.raises(FloatingPointError, match=r"refusing to save step 0 .*ema_params.* holds NaN/inf"):
            ckpt.save(state._replace(ema_params=nu))
        assert ckpt.all_steps() == []
        assert ckpt.save(state)  # the finite state saves
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name != "0"]


def test_round_trip_without_ema_and_ema_mismatches(trainer, trainer_no_ema, tmp_path):
    state = _scramble(trainer_no_ema.init(0), 2)._replace(step=jnp.asarray(4, jnp.int32))
    assert state.ema_params is None
    with Checkpointer(tmp_path / "noema") as ckpt:
        ckpt.save(state)
        restored = ckpt.restore(trainer_no_ema.init(9))
        assert restored.ema_params is None
        _assert_same(restored, state)
        # a template that expects EMA weights: a clear error
        with pytest.raises(ValueError, match="no EMA weights"):
            ckpt.restore(trainer.init(0))
    # a checkpoint with EMA restored into a template without: the EMA weights are dropped
    with_ema = _scramble(trainer.init(0), 3)
    with Checkpointer(tmp_path / "ema") as ckpt:
        ckpt.save(with_ema)
        restored = ckpt.restore(trainer_no_ema.init(0))
    assert restored.ema_params is None
    _assert_same(restored.params, with_ema.params)


# -- retention, intervals, metadata ----------------------------------------------------------------------

def test_keep_latest_n_interval_and_no_overwrite(trainer, tmp_path):
    state = trainer.init(0)
    with Checkpointer(tmp_path / "ck", max_to_keep=2, save_interval_steps=5) as ckpt:
        written = [ckpt.save(state._replace(step=jnp.asarray(s, jnp.int32))) for s in (0, 3, 5, 10, 15)]
        assert written == [True, False, True, True, True]  # step 3 is not due (interval 5)
        assert ckpt.save(state._replace(step=jnp.asarray(17, jnp.int32)), force=True)
        assert ckpt.all_steps() == [15, 17]
        assert not ckpt.save(state._replace(step=jnp.asarray(17, jnp.int32)), force=True)  # never overwritten
    assert sorted(os.listdir(tmp_path / "ck")) == ["15", "17"]
    with Checkpointer(tmp_path / "ck") as ckpt:  # a new process sees the same steps
        assert ckpt.all_steps() == [15, 17] and ckpt.latest_step() == 17
        assert int(ckpt.restore(state, step=15).step) == 15
        with pytest.raises(FileNotFoundError, match="step 5"):
            ckpt.restore(state, step=5)
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(state)


def test_best_metric_keeps_the_best_and_the_latest(trainer, tmp_path):
    state = trainer.init(0)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0, 5: 4.0}
    with Checkpointer(tmp_path / "ck", max_to_keep=2, best_metric="loss", best_mode="min") as ckpt:
        for s, loss in losses.items():
            ckpt.save(state._replace(step=jnp.asarray(s, jnp.int32)), metrics={"loss": loss})
        assert ckpt.all_steps() == [2, 3, 5]  # the two best (1.0, 2.0) and the latest (to resume from)
        assert ckpt.best_step() == 2
        with pytest.raises(ValueError, match="metrics"):
            ckpt.save(state._replace(step=jnp.asarray(6, jnp.int32)))


@dataclasses.dataclass
class _Config:
    width: int = 16
    lr: float = 1e-2
    sizes: tuple = (1, 2)


def test_metadata_and_absolute_directory(trainer, tmp_path, monkeypatch):
    import jaxgen

    monkeypatch.chdir(tmp_path)
    state = trainer.init(0)._replace(step=jnp.asarray(12, jnp.int32))
    with Checkpointer("relative/ck") as ckpt:
        assert ckpt.directory == str(tmp_path / "relative" / "ck")
        ckpt.save(state, metrics={"loss": np.float32(0.25), "fid": jnp.asarray(3.5)}, config=_Config())
        ckpt.save(state._replace(step=jnp.asarray(13, jnp.int32)), config={"name": "moons", "path": tmp_path})
        meta = ckpt.restore_metadata(12)
        latest = ckpt.restore_metadata()
    assert meta["step"] == 12 and latest["step"] == 13
    assert meta["config"] == {"width": 16, "lr": 1e-2, "sizes": [1, 2]}
    assert meta["metrics"] == {"loss": 0.25, "fid": 3.5}
    assert meta["jaxgen_version"] == jaxgen.__version__
    assert latest["config"] == {"name": "moons", "path": str(tmp_path)} and latest["metrics"] is None
    assert meta["leaves"][".params['out']['kernel'].value"]["shape"] == [16, 2]
    assert meta["leaves"][".key"]["prng_impl"] == str(state.key.dtype)


def test_restoring_into_a_model_of_another_size_names_the_leaves(trainer, tmp_path):
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(trainer.init(0), config={"width": 16})
        wider = _tiny_trainer(width=24)
        with pytest.raises(ValueError) as info:
            ckpt.restore(wider.init(0))
    msg = str(info.value)
    assert "different model configuration" in msg
    assert ".params['out']['kernel'].value: checkpoint (16, 2) vs template (24, 2)" in msg
    assert "checkpoint (16,) vs template (24,)" in msg
    assert '"width": 16' in msg


# -- SIGKILL and resume ---------------------------------------------------------------------------------

def _child(argv):
    """Subprocess: train the tiny model to NUM_STEPS with checkpoints every EVERY steps, resuming if possible.

    argv: directory, seconds to sleep after each chunk, and the step at whose commit to SIGKILL itself (0: none).
    Prints ``FIRST <step>`` (where this process's training started) and ``DONE <step>``.
    """
    directory, pause, kill_at_commit = argv[0], float(argv[1]), int(argv[2])
    if kill_at_commit:
        # die at the worst moment: the step is fully written to its temporary folder, the rename is next
        from orbax.checkpoint._src.path import async_path

        rename = async_path.rename

        async def killing_rename(src, dst):
            if os.path.basename(str(dst)) == str(kill_at_commit):
                print(f"KILLING {kill_at_commit}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return await rename(src, dst)

        async_path.rename = killing_rename

    trainer = _tiny_trainer()
    first = []

    def on_chunk(state, losses):
        if not first:
            first.append(int(state.step) - len(losses))
            print(f"FIRST {first[0]}", flush=True)
        print(f"STEP {int(state.step)}", flush=True)
        time.sleep(pause)

    with Checkpointer(directory, max_to_keep=3) as ckpt:
        state = ckpt.restore(trainer.init(SEED), missing_ok=True)
        state, _ = trainer.fit(state, until_step=NUM_STEPS, progress=False,
                               callbacks=[Checkpointing(ckpt, every=EVERY), on_chunk])
    print(f"DONE {int(state.step)}", flush=True)


def _committed(directory):
    try:
        return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    except FileNotFoundError:
        return []


class _Run:
    """The child in a subprocess: no stdin, output to files, always reaped."""

    def __init__(self, tmp_path, name, directory, pause=0.0, kill_at_commit=0):
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
                   # the runs share compiled programs (identical executables) to start in seconds
                   JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "child", str(directory), str(pause), str(kill_at_commit)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=repo)

    def lines(self, tag):
        return [int(l.split()[1]) for l in self.out.read_text().splitlines() if l.startswith(tag + " ")]

    def report(self):
        return f"stdout:\n{self.out.read_text()}\nstderr (tail):\n{self.err.read_text()[-3000:]}"

    def wait(self, timeout=150):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the training subprocess did not finish in {timeout} s\n{self.report()}")

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_mid_save_and_mid_training_then_resume_matches_an_uninterrupted_run(trainer, tmp_path):
    ckdir = tmp_path / "run"
    # 1. killed by SIGKILL inside the commit of step 20 (written to the temporary folder, not yet renamed)
    run = _Run(tmp_path, "a", ckdir, kill_at_commit=2 * EVERY)
    try:
        # meanwhile, in this process: the uninterrupted reference run (same seed, chunks, checkpoint interval)
        with Checkpointer(tmp_path / "reference") as ref_ckpt:
            reference, ref_losses = trainer.fit(ref_ckpt.restore(trainer.init(SEED), missing_ok=True),
                                                until_step=NUM_STEPS, progress=False,
                                                callbacks=[Checkpointing(ref_ckpt, every=EVERY)])
            assert ref_ckpt.all_steps() == [40, 50, 60]
        assert int(reference.step) == NUM_STEPS and ref_losses.shape == (NUM_STEPS,)
        rc = run.wait()
    finally:
        run.kill()
    assert rc == -signal.SIGKILL, run.report()
    assert run.lines("STEP")[-1] == 2 * EVERY and run.lines("FIRST") == [0]
    assert f"{2 * EVERY}{TMP_SUFFIX}" in os.listdir(ckdir)  # the unfinished save is there, uncommitted
    with Checkpointer(ckdir) as ckpt:
        assert ckpt.all_steps() == [EVERY] and ckpt.latest_step() == EVERY  # the previous one is intact
        assert int(ckpt.restore(trainer.init(SEED)).step) == EVERY

    # 2. restarted (removes the stale folder, resumes at step 10), killed by SIGKILL from outside
    #    as soon as it has committed a new checkpoint
    run = _Run(tmp_path, "b", ckdir, pause=3.0)
    try:
        deadline = time.monotonic() + 150
        while max(_committed(ckdir), default=0) <= EVERY:
            assert run.proc.poll() is None, run.report()
            if time.monotonic() > deadline:
                pytest.fail(f"no new checkpoint after 150 s\n{run.report()}")
            time.sleep(0.02)
        seen = max(_committed(ckdir))
        os.kill(run.proc.pid, signal.SIGKILL)
        rc = run.wait(timeout=30)
    finally:
        run.kill()
    assert rc == -signal.SIGKILL, run.report()
    assert run.lines("FIRST") == [EVERY], run.report()  # resumed exactly at the latest checkpoint
    with Checkpointer(ckdir) as ckpt:
        latest = ckpt.latest_step()
    assert seen <= latest < NUM_STEPS and latest % EVERY == 0  # every committed checkpoint survived the kill

    # 3. restarted again: runs to the end from the latest checkpoint, losing nothing that was saved
    run = _Run(tmp_path, "c", ckdir)
    try:
        rc = run.wait()
    finally:
        run.kill()
    assert rc == 0, run.report()
    assert run.lines("FIRST") == [latest] and run.lines("DONE") == [NUM_STEPS], run.report()
    assert not any(n.endswith(TMP_SUFFIX) for n in os.listdir(ckdir))
    with Checkpointer(ckdir) as ckpt:
        assert ckpt.latest_step() == NUM_STEPS
        final = ckpt.restore(trainer.init(SEED))
        # a further call finds the run complete and trains nothing
        done, losses = trainer.fit(ckpt.restore(trainer.init(SEED), missing_ok=True), until_step=NUM_STEPS,
                                   progress=False, callbacks=[Checkpointing(ckpt, every=EVERY)])
    assert losses.shape == (0,) and int(done.step) == NUM_STEPS
    _assert_same(final, reference, exact=False)  # 1e-6 (bitwise in practice)
    initial = trainer.init(SEED)
    assert not np.allclose(final.params["out"]["kernel"][...], initial.params["out"]["kernel"][...])  # it trained


def _disk_full_child(argv):
    """A disk that fills up (``RLIMIT_FSIZE``: real ``EFBIG`` write errors) just before the save of step 20: prints
    ``ERROR <step> <message>``, then with the limit lifted resumes to step 30 (``DONE``, final leaves in
    ``final.npz``), then truncates step 30's arrays and restores again (``FALLBACK <step>``)."""
    import resource

    from jaxgen.training import Callback, CheckpointWriteError

    directory, async_save = argv[0], argv[1] == "async"
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    trainer = _tiny_trainer()
    ckpt = Checkpointer(directory, max_to_keep=5, async_save=async_save)

    class DiskFills(Callback):
        def on_chunk(self, trainer, state, losses):
            if int(state.step) == 20:
                ckpt.wait()  # step 10 is on disk; the disk is full from now on
                resource.setrlimit(resource.RLIMIT_FSIZE, (256, hard))

    try:
        trainer.fit(trainer.init(SEED), until_step=30, chunk=10, progress=False,
                    callbacks=[DiskFills(), Checkpointing(ckpt, every=10)])
        ckpt.close()
    except CheckpointWriteError as err:
        print(f"ERROR {err.step} {err}", flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with Checkpointer(directory, max_to_keep=5, async_save=async_save) as ckpt:
        state = ckpt.restore(trainer.init(SEED), missing_ok=True)
        print(f"RESUMED {int(state.step)}", flush=True)
        state, _ = trainer.fit(state, until_step=30, chunk=10, progress=False, callbacks=[Checkpointing(ckpt, every=10)])
    print(f"DONE {int(state.step)}", flush=True)
    np.savez(os.path.join(directory, os.pardir, "final.npz"), *jax.tree.leaves(_plain(state)))
    for f in (p for p in __import__("pathlib").Path(directory, "30", "state").rglob("*") if p.is_file()):
        if f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    import warnings

    with Checkpointer(directory) as ckpt, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(f"FALLBACK {int(ckpt.restore(trainer.init(SEED), missing_ok=True).step)}", flush=True)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    _child(sys.argv[2:])
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "disk_full":
    _disk_full_child(sys.argv[2:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE write errors are tested on Linux")
@pytest.mark.slow  # a child process training to a full disk (7 s); the fast tier keeps the corrupt-checkpoint tests
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_stops_with_one_error_and_loses_nothing_beyond_the_last_checkpoint(trainer, tmp_path, mode):
    """A full disk during the save of step 20: one CheckpointWriteError naming the step and the cause, step 10
    intact, no orbax tracebacks on stderr; the resumed run ends where an uninterrupted one ends; a truncated latest
    checkpoint then falls back to the previous one, again without asyncio noise."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH")
                                              else ""), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "disk_full", str(tmp_path / "run"), mode],
                          capture_output=True, text=True, env=env, cwd=repo, timeout=300, stdin=subprocess.DEVNULL)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, out + err[-3000:]
    errors = [l for l in out.splitlines() if l.startswith("ERROR ")]
    assert len(errors) == 1 and errors[0].startswith("ERROR 20 could not write checkpoint step 20"), out
    assert "File too large" in errors[0] and "latest: step 10" in errors[0], errors
    assert "RESUMED 10" in out and "DONE 30" in out and "FALLBACK 20" in out, out
    noise = [l for l in err.splitlines() if "Traceback" in l or "Event loop is closed" in l or "ERROR:" in l]
    assert not noise, err[-3000:]
    reference, _ = trainer.fit(trainer.init(SEED), until_step=30, chunk=10, progress=False)
    final = np.load(tmp_path / "final.npz")
    for i, want in enumerate(jax.tree.leaves(_plain(reference))):
        np.testing.assert_allclose(final[f"arr_{i}"], want, rtol=1e-6, atol=1e-7)


# -- corruption ----------------------------------------------------------------------------------------

def _two_checkpoints(trainer, directory):
    """Steps 10 and 20 of a short run, and the uninterrupted run's final state at step 30."""
    state = trainer.init(0)
    with Checkpointer(directory, max_to_keep=5) as ckpt:
        state, _ = trainer.fit(state, until_step=20, chunk=10, callbacks=[Checkpointing(ckpt, every=10)],
                               progress=False)
    final, _ = trainer.fit(state, until_step=30, chunk=10, progress=False)
    return final


def _flip_bytes(step_dir):
    """Flip 16 bytes in the middle of every array data file (OCDBT ``d/`` files) of a step."""
    for target in (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
        target.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped_bytes", "truncated_arrays", "torn_metadata", "edited_metadata",
                                    "checksum_mismatch"])
def test_a_corrupt_latest_checkpoint_is_named_and_resuming_falls_back_to_the_previous(trainer, tmp_path, damage):
    from jaxgen.training import CorruptCheckpointError

    directory = tmp_path / "ck"
    final = _two_checkpoints(trainer, directory)
    step_dir = directory / "20"
    if damage == "flipped_bytes":
        _flip_bytes(step_dir)
    elif damage == "truncated_arrays":
        for f in (step_dir / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif damage == "torn_metadata":
        meta = step_dir / "meta" / "metadata"
        meta.write_text(meta.read_text()[:25])  # a torn JSON
    elif damage == "edited_metadata":  # valid JSON whose content changed: the record's own checksum catches it
        import json

        meta = step_dir / "meta" / "metadata"
        record = json.loads(meta.read_text())
        record["metrics"] = {"loss": 0.0}
        meta.write_text(json.dumps(record))
    else:  # an array that reads back without error but not as it was written (the record no longer fits it)
        import json

        from jaxgen.training.checkpoint import _meta_crc32

        meta = step_dir / "meta" / "metadata"
        record = json.loads(meta.read_text())
        leaf = next(r for r in record["leaves"].values() if r["path"].startswith("params"))
        leaf["crc32"] = f"{(int(leaf['crc32'], 16) + 1) % 2**32:08x}"
        record["meta_crc32"] = _meta_crc32(record)  # a consistent record: only the array check can tell
        meta.write_text(json.dumps(record))
    template = jax.eval_shape(trainer.init, jax.random.key(0))
    with Checkpointer(directory, max_to_keep=5) as ckpt:
        with pytest.raises(CorruptCheckpointError, match=r"checkpoint step 20 in .* is corrupt") as info:
            ckpt.restore(template, step=20)
        assert info.value.step == 20 and len(str(info.value).splitlines()) == 1
        expected = {"edited_metadata": "its metadata (20/meta) does not match the checksum",
                    "checksum_mismatch": "(20/state) does not match the checksum"}.get(damage, "")
        assert expected in str(info.value), str(info.value)
        with pytest.warns(UserWarning, match=r"resumed from step 10, the newest intact checkpoint"):
            resumed = ckpt.restore(template, missing_ok=True)
    assert int(resumed.step) == 10
    again, _ = trainer.fit(resumed, until_step=30, chunk=10, progress=False)
    _assert_same(again, final)  # no progress lost beyond the intact checkpoint: the same run from step 10


def test_the_echo_filter_drops_unretrieved_orbax_futures_and_keeps_everything_else():
    """asyncio's "Future exception was never retrieved" record carries orbax's frames only in its exc_info (the
    message names the OSError alone): the filter drops it there, and keeps the same record from any other code."""
    import logging

    from jaxgen.training.checkpoint import _OrbaxFailureEcho

    def record_from(filename):
        code = compile("def _write():\n    raise OSError(27, 'File too large')\n", filename, "exec")
        scope = {}
        exec(code, scope)
        try:
            scope["_write"]()
        except OSError as err:
            exc_info = (type(err), err, err.__traceback__)
        msg = "Future exception was never retrieved\nfuture: <Future finished exception=OSError(27, 'File too large')>"
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, exc_info)

    echo = _OrbaxFailureEcho()
    assert not echo.filter(record_from("/site-packages/orbax/checkpoint/_src/path/async_path.py"))
    assert echo.filter(record_from("/home/user/my_project/writer.py"))
    assert echo.filter(logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "something else", None, None))
