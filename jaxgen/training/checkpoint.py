r"""Crash-safe, resumable checkpoints of a :class:`~jaxgen.training.TrainState` (orbax-checkpoint).

:class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager`` (the V0 API with ``ocp.args``) and
saves the *whole* training state: step, parameters, the model's other state, the optimizer state,
the EMA weights (or their absence) and the run's PRNG key, plus a small JSON record (step, config,
metrics, jaxgen version and the shape of every array).

Layout and crash safety. Step ``k`` lives in ``<directory>/<k>/`` with two items, ``state/`` (the
arrays, tensorstore/OCDBT) and ``meta/`` (JSON). Orbax writes a step into
``<directory>/<k>.orbax-checkpoint-tmp`` and, once every byte and ``commit_success.txt`` is written,
renames it to ``<directory>/<k>`` -- an atomic ``rename`` on a POSIX file system. A process killed at
any moment (``SIGKILL`` included, before or during the commit) therefore leaves either the complete
new step or no new step: the previous checkpoints are untouched and :meth:`Checkpointer.latest_step`
never reports the unfinished one (temporary directories are not steps). Leftover temporary
directories of a killed writer are removed when this process first saves. (Power loss is another
matter: orbax does not ``fsync``; a kill of the process is covered, a crash of the machine may not
be.) On object stores such as GCS orbax commits with the ``commit_success.txt`` marker instead.

Resuming. ``checkpointer.restore(template, missing_ok=True)`` restores the latest checkpoint (if any) into
the state you pass as a template; :meth:`jaxgen.training.Trainer.fit` with ``until_step`` and a
:class:`~jaxgen.training.Checkpointing` callback then trains to the end, saving every ``every`` steps and at the
end. Step ``k`` of :class:`~jaxgen.training.Trainer` draws its randomness from ``fold_in(state.key, k)``, and
``fit`` cuts its chunks at *absolute* step numbers (multiples of ``chunk`` and of ``every``), so a run killed at any
time and restarted replays exactly the same compiled programs on exactly the same inputs as an uninterrupted run:
it ends with bitwise the same parameters (on the same hardware and software).

Example::

    from jaxgen.training import Checkpointer, Checkpointing, Trainer

    trainer = Trainer(model, loss, optax.adam(1e-3), data=lambda key: moons(key, 256), ema_decay=0.999)
    with Checkpointer("runs/moons/checkpoints", max_to_keep=3) as ckpt:
        state = ckpt.restore(trainer.init(0), missing_ok=True)      # resume, or start
        state, losses = trainer.fit(state, until_step=10_000, callbacks=[Checkpointing(ckpt, every=1000)])

    # later, elsewhere: restore into a state of the same model configuration
    with Checkpointer("runs/moons/checkpoints") as ckpt:
        state = ckpt.restore(trainer.init(0))          # latest step; ckpt.restore(..., step=3000)
        info = ckpt.restore_metadata()                  # {"step", "config", "metrics", "jaxgen_version", ...}
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import warnings
import zlib
from typing import Any, Mapping

import numpy as np
import jax
import orbax.checkpoint as ocp

from jaxgen.training.finite import nonfinite_leaves

__all__ = ["Checkpointer", "CorruptCheckpointError", "CheckpointWriteError"]

_FORMAT = "jaxgen.checkpoint/1"
_TMP_DIR = re.compile(r"^\d+\.orbax-checkpoint-tmp")
_MAX_LISTED = 12


class CorruptCheckpointError(ValueError):
    """A checkpoint step that cannot be read back as it was written: unreadable metadata or arrays, or an array
    whose CRC-32 differs from the one recorded when it was saved. ``step`` and ``directory`` name it."""

    def __init__(self, message: str, *, step: int, directory: str):
        super().__init__(message)
        self.step, self.directory = step, directory


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a quota, a file-size limit, a lost mount): ``step`` and
    ``directory`` name it. Its partial files are removed; the steps committed before it are intact."""

    def __init__(self, message: str, *, step: int | None, directory: str):
        super().__init__(message)
        self.step, self.directory = step, directory


_OS_ERROR = re.compile(r"os_error_code='(\d+)'")


def _reason(err: BaseException) -> str:
    """A short cause of a failed write: the operating system's words for tensorstore's error code, or the first
    line of the message."""
    text = str(err)
    code = getattr(err, "errno", None)
    match = _OS_ERROR.search(text)
    if match:
        code = int(match.group(1))
    if code:
        return f"{os.strerror(code)} (errno {code})"
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:200]}"


def _meta_crc32(meta: dict) -> str:
    """CRC-32 (hex) of a metadata record's canonical JSON (sorted keys), the record's own checksum left out."""
    body = {k: v for k, v in meta.items() if k != "meta_crc32"}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()) & 0xFFFFFFFF:08x}"


def _crc32(x: Any) -> str | None:
    """CRC-32 of an array's bytes in C order (hex): of this process's copy for an array replicated over several
    processes, None for one split over them (each process holds only a part)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            return None
        x = x.addressable_data(0)
    a = np.ascontiguousarray(np.asarray(x)).reshape(-1)
    return f"{zlib.crc32(a.view(np.uint8)):08x}"


# -- pytree <-> nested dict of plain arrays ---------------------------------------------------------

def _is_prng_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(leaf: Any) -> str:
    return str(leaf.dtype)  # e.g. "key<fry>", for arrays and ShapeDtypeStructs alike


def _key_impl(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return jax.random.key_impl(leaf)
    return getattr(leaf.dtype, "_impl", None)  # a ShapeDtypeStruct template


def _path_name(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        name = str(entry.key)
    elif isinstance(entry, jax.tree_util.SequenceKey):
        name = str(entry.idx)
    elif isinstance(entry, jax.tree_util.GetAttrKey):
        name = entry.name
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
        name = str(entry.key)
    else:
        name = str(entry)
    # orbax joins the names of a leaf's path with '.' to name its arrays
    return name.replace(".", "_").replace("/", "_") or "_"


def _flatten(tree: Any) -> tuple[list[tuple[str, tuple[str, ...], Any]], Any]:
    """``[(readable path, storage path, leaf)]`` and the treedef."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in with_path:
        out.append((jax.tree_util.keystr(path), tuple(_path_name(e) for e in path), leaf))
    return out, treedef


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict:
    root: dict = {}
    for names, value in items:
        node = root
        for n in names[:-1]:
            node = node.setdefault(n, {})
            if not isinstance(node, dict):
                raise ValueError(f"cannot store the state: the path {'/'.join(names)} collides with another leaf.")
        if names[-1] in node:
            raise ValueError(f"cannot store the state: two leaves map to the path {'/'.join(names)}.")
        node[names[-1]] = value
    return root


def _lookup(tree: dict, names: tuple[str, ...]) -> Any:
    for n in names:
        tree = tree[n]
    return tree


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy (numpy/jax scalars and arrays become numbers/lists, the rest ``str``)."""

    def default(o):
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, (np.ndarray, np.generic, jax.Array)):
            return np.asarray(o).tolist()
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=str)
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def _listing(lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED]
    more = len(lines) - len(shown)
    return "\n".join("  " + s for s in shown) + (f"\n  ... and {more} more" if more > 0 else "")


# -- the checkpointer ---------------------------------------------------------------------------------

_ORBAX_THREAD_ECHOES = ("_SignalingThread.run() raised an exception", "in background save thread",
                        "Save Finalize thread")


class _OrbaxFailureEcho:
    """A ``logging`` filter for asyncio's "Future exception was never retrieved" records of orbax's failed tensorstore
    reads and writes: the error they carry is the one jaxgen has already raised in one line."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        if record.name == "absl" and any(echo in message for echo in _ORBAX_THREAD_ECHOES):
            return False
        if "exception was never retrieved" not in message:
            return True
        if record.exc_info and record.exc_info[1] is not None:  # the failing frames name orbax (e.g. async_path._write)
            import traceback

            message += "".join(traceback.format_exception(*record.exc_info))
        return not ("tensorstore" in message or "OCDBT" in message or "orbax" in message)


def _quiet_orbax_echoes() -> None:
    """Silence the echoes of a failed orbax read or write (its worker threads' logged tracebacks, closed-loop
    callbacks, unretrieved futures): the failure itself reaches the caller as one :class:`CorruptCheckpointError` or
    :class:`CheckpointWriteError`. Installed when a :class:`Checkpointer` is made, since orbax's threads log before
    the caller sees the error."""
    import logging

    for name in ("asyncio", "absl"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxFailureEcho) for f in log.filters):
            log.addFilter(_OrbaxFailureEcho())
    _silence_closed_loop_callbacks()


def _silence_closed_loop_callbacks() -> None:
    """Drop the ``RuntimeError('Event loop is closed')`` reports of a failed orbax read.

    When tensorstore fails one read of a restore, orbax's event loop closes while the other reads are still in
    flight; each of them then reports the closed loop from its callback thread through ``sys.unraisablehook``
    (about a hundred tracebacks that bury the real error, which jaxgen reports in one line). Installed at the first
    failed read, this hook drops exactly those reports (a ``RuntimeError`` with that message raised by asyncio's
    ``_check_closed``) and passes everything else to the hook it replaces."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_jaxgen_closed_loop_filter", False):
        return

    def hook(unraisable):
        exc, tb = unraisable.exc_value, unraisable.exc_traceback
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is None or tb.tb_frame.f_code.co_name == "_check_closed":
                return
        previous(unraisable)

    hook._jaxgen_closed_loop_filter = True
    sys.unraisablehook = hook


class Checkpointer:
    """Save and restore :class:`~jaxgen.training.TrainState` s in a directory (orbax ``CheckpointManager``).

    Args:
      directory: the checkpoint folder (made absolute; created if missing). One sub-folder per step.
      max_to_keep: how many checkpoints to keep (``None``: keep all). Without ``best_metric`` these
        are the ``max_to_keep`` most recent steps.
      save_interval_steps: :meth:`save` without ``force`` writes only when ``step`` is a multiple of
        this (and larger than the latest saved step); the first save always writes.
      async_save: write in a background thread. :meth:`save` returns once the arrays are copied
        off the device; the files appear when the write commits. :meth:`wait`, :meth:`close`, the
        context manager, :meth:`latest_step`, :meth:`all_steps` and :meth:`restore` wait for it.
      best_metric: if set (e.g. ``"loss"``), keep the ``max_to_keep`` checkpoints with the best value
        of ``metrics[best_metric]`` (every :meth:`save` must then pass ``metrics`` holding it) *and*
        always the most recent checkpoint, so a run can still resume: at most ``max_to_keep + 1``
        steps are on disk. :meth:`best_step` names the best one.
      best_mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"``.

    The checkpointer is a context manager; leaving it (or :meth:`close`) waits for pending writes.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        best_metric: str | None = None,
        best_mode: str = "min",
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
        if max_to_keep is not None and int(max_to_keep) < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        if int(save_interval_steps) < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(f"the checkpoint directory {self.directory} is a file; pass a folder (created if "
                                     "missing).")
        self.best_metric = best_metric
        self.best_mode = best_mode
        cm = ocp.checkpoint_managers
        if best_metric is None:
            keep = cm.LatestN(n=max_to_keep)
            best_fn = None
        else:
            metric = best_metric
            best_fn = lambda metrics: float(metrics[metric])  # noqa: E731
            keep = cm.AnyPreservationPolicy([
                cm.BestN(get_metric_fn=best_fn, reverse=(best_mode == "min"), n=max_to_keep,
                         keep_checkpoints_without_metrics=False),
                cm.LatestN(n=1),
            ])
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=int(save_interval_steps),
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=keep,
            enable_async_checkpointing=bool(async_save),
            create=True,
            # Not orbax's cleanup at construction: a reader opened beside a running writer would delete
            # the writer's in-flight step. Stale temporary folders are removed on this process's first save.
            cleanup_tmp_directories=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._cleaned = False
        self._pending: int | None = None  # the step of an asynchronous save in flight
        _quiet_orbax_echoes()

    # -- context manager -----------------------------------------------------------------------
    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, steps={self._manager.all_steps()})"

    # -- queries -------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until this process's pending (async) saves are committed to disk.

        Raises:
          CheckpointWriteError: a pending save failed (its partial files are removed)."""
        with self._writing(self._pending):
            self._manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources (raises :class:`CheckpointWriteError` as
        :meth:`wait`)."""
        with self._writing(self._pending):
            self._manager.close()
        self._pending = None

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Turn a failed write into one :class:`CheckpointWriteError` naming the step, the directory and the cause,
        after removing the failed step's partial files (a disk that is full stays usable for the intact ones)."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as err:  # noqa: BLE001 - tensorstore/orbax report OS errors as ValueError and others
            _quiet_orbax_echoes()
            self._pending = None
            # let orbax's writer threads stop before removing what they wrote; it re-raises the failure reported below
            with contextlib.suppress(Exception):
                self._manager.wait_until_finished()
            if jax.process_index() == 0 and os.path.isdir(self.directory):
                for name in os.listdir(self.directory):
                    if _TMP_DIR.match(name) and (step is None or name.startswith(f"{step}.")):
                        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            try:
                intact = sorted(int(s) for s in self._manager.all_steps())
            except Exception:  # noqa: BLE001 - the listing itself may fail on a broken mount
                intact = []
            which = f"step {step}" if step is not None else "a pending step"
            kept = (f"the checkpoints committed before it are intact (latest: step {intact[-1]})" if intact
                    else "no earlier checkpoint exists")
            raise CheckpointWriteError(
                f"could not write checkpoint {which} to {self.directory}: {_reason(err)}; its partial files were "
                f"removed and {kept}. Free disk space (or fix the cause) and resume.",
                step=step, directory=str(self.directory)) from err

    def reload(self) -> None:
        """Re-read the directory (to see steps that *another* process committed since this one opened it)."""
        self._manager.wait_until_finished()
        self._manager.reload()

    def all_steps(self) -> list[int]:
        """The committed steps, ascending (waits for this process's pending saves; never unfinished ones)."""
        self.wait()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The most recent committed step, or ``None`` (an interrupted, uncommitted save is not a step)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest step if no ``best_metric`` was set)."""
        self.wait()
        return self._manager.best_step()

    # -- save ----------------------------------------------------------------------------------
    def _remove_stale_tmp_dirs(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if _TMP_DIR.match(name):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def save(self, state: Any, *, metrics: Mapping[str, Any] | None = None, config: Any = None,
             force: bool = False) -> bool:
        """Save ``state`` (a :class:`~jaxgen.training.TrainState`) as step ``int(state.step)``.

        Args:
          state: the training state; every leaf is stored, typed PRNG keys as their key data.
          metrics: optional ``{name: number}`` stored with the step (required, with ``best_metric``,
            when the checkpointer keeps the best checkpoints).
          config: optional JSON-able description of the run (a dict or a dataclass), stored in the
            metadata (values that JSON cannot hold are stored as strings).
          force: save even if ``save_interval_steps`` says otherwise.

        Returns:
          whether a checkpoint was written (started, if asynchronous). Nothing is written, and
          ``False`` returned, when the step is not due (without ``force``) or when a checkpoint of this
          step, or a later one (without ``force``), already exists: existing steps are never overwritten.

        Raises:
          FloatingPointError: a floating-point leaf of ``state`` holds NaN or inf (nothing is written).
        """
        step = int(state.step)
        if self.best_metric is not None and (metrics is None or self.best_metric not in metrics):
            raise ValueError(f"this Checkpointer keeps the best checkpoints by {self.best_metric!r}: pass "
                             f"save(state, metrics={{{self.best_metric!r}: value, ...}}).")
        self._remove_stale_tmp_dirs()
        with self._writing(self._pending):  # an earlier asynchronous save that failed is reported here
            self._manager.wait_until_finished()
        self._pending = None
        if step in self._manager.all_steps():
            return False
        if not force and not self._manager.should_save(step):
            return False

        bad = nonfinite_leaves(state)
        if bad:
            raise FloatingPointError(
                f"refusing to save step {step} to {self.directory}: {bad[0]} holds NaN/inf ({len(bad)} leaves in all); "
                "a non-finite state is never checkpointed. Resume from the last checkpoint with a lower learning "
                "rate or gradient clipping.")
        flat, _ = _flatten(state)
        arrays, leaves = [], {}
        for readable, names, leaf in flat:
            record: dict[str, Any] = {}
            if _is_prng_key(leaf):
                record["prng_impl"] = _key_impl_name(leaf)
                leaf = jax.random.key_data(leaf)
            elif not isinstance(leaf, (jax.Array, np.ndarray)):
                leaf = np.asarray(leaf)
            record.update(path="/".join(names), shape=list(leaf.shape), dtype=str(leaf.dtype), crc32=_crc32(leaf))
            leaves[readable] = record
            arrays.append((names, leaf))

        metrics = None if metrics is None else _jsonable(dict(metrics))
        meta = {
            "format": _FORMAT,
            "step": step,
            "jaxgen_version": _jaxgen_version(),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": _jsonable(config),
            "metrics": metrics,
            "leaves": leaves,
        }
        meta = json.loads(json.dumps(meta))  # the record exactly as it reads back
        meta["meta_crc32"] = _meta_crc32(meta)
        with self._writing(step):
            started = bool(self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(_nest(arrays)), meta=ocp.args.JsonSave(meta)),
                metrics=metrics,
                force=True,  # the interval was checked above
            ))
        self._pending = step if started else None
        return started

    # -- restore -------------------------------------------------------------------------------
    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; available steps: {steps}.")
        return int(step)

    def _unreadable(self, step: int, what: str, item: str, err: Exception) -> CorruptCheckpointError:
        _quiet_orbax_echoes()
        first_line = str(err).splitlines()[0][:200] if str(err) else ""
        return CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} is corrupt: its {what} ({os.path.join(str(step), item)}) "
            f"cannot be read ({type(err).__name__}: {first_line}).", step=step, directory=str(self.directory))

    def restore_metadata(self, step: int | None = None) -> dict:
        """The JSON record of a step (default: the latest): ``step``, ``config``, ``metrics``,
        ``jaxgen_version``, ``saved_at`` and ``leaves`` (every stored array's path, shape and dtype)."""
        step = self._resolve(step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # noqa: BLE001 - torn JSON, missing files, ...: one error that names the step
            raise self._unreadable(step, "metadata", "meta", err) from err
        if meta is None:
            raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: it has no metadata.",
                                         step=step, directory=str(self.directory))
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"step {step} in {self.directory} was not written by jaxgen.checkpoint.Checkpointer.")
        recorded = meta.pop("meta_crc32", None)  # absent in checkpoints of earlier jaxgen versions
        if recorded is not None and recorded != _meta_crc32(meta):
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt: its metadata ({os.path.join(str(step), 'meta')}) "
                "does not match the checksum recorded when it was saved.", step=step, directory=str(self.directory))
        return meta

    def restore(self, template_state: Any, step: int | None = None, *, missing_ok: bool = False) -> Any:
        """Restore a step (default: the latest) into the structure, shapes and dtypes of ``template_state``.

        With ``missing_ok`` and no checkpoint at all, ``template_state`` is returned (a run that starts).

        ``template_state`` is a state of the same model configuration, e.g. ``trainer.init(seed)``
        (or, allocating nothing, ``jax.eval_shape(trainer.init, jax.random.key(seed))``); only its
        structure, shapes, dtypes and shardings are used: the arrays are placed on the template's
        shardings (one device if it has none) and cast to its dtypes, and its keys' PRNG
        implementation re-wraps the stored key data. If the template keeps no EMA
        (``ema_params=None``), stored EMA weights are ignored. Any pytree with a ``step`` works, not
        only a :class:`~jaxgen.training.TrainState`.

        Every array is checked against the CRC-32 recorded when it was saved. With ``step=None`` a corrupt latest
        checkpoint (unreadable metadata or arrays, a checksum mismatch) is skipped with a warning naming it, and the
        newest intact one is restored instead; an explicit ``step`` that is corrupt raises.

        Raises:
          FileNotFoundError: no such checkpoint.
          CorruptCheckpointError: the step (or, with ``step=None``, every step) is corrupt; names the step and
            the file.
          ValueError: the checkpoint does not fit the template (different shapes or a different tree:
            it was written by another model configuration); the message lists the leaves.
        """
        if missing_ok and step is None and not self.all_steps():
            return template_state
        if step is not None:
            return self._restore_step(template_state, self._resolve(step))
        first_error = None
        for candidate in reversed(self.all_steps()):
            try:
                state = self._restore_step(template_state, candidate)
            except CorruptCheckpointError as err:
                warnings.warn(f"{err} Trying the previous checkpoint.", stacklevel=2)
                first_error = first_error or err
                continue
            if first_error is not None:
                warnings.warn(f"resumed from step {candidate}, the newest intact checkpoint in {self.directory} "
                              f"(step {first_error.step} is corrupt).", stacklevel=2)
            return state
        if first_error is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        raise first_error

    def _restore_step(self, template_state: Any, step: int) -> Any:
        meta = self.restore_metadata(step)
        saved: dict[str, dict] = meta["leaves"]
        saved_by_path = {rec["path"]: readable for readable, rec in saved.items()}

        flat, treedef = _flatten(template_state)
        template_ema_none = getattr(template_state, "ema_params", 0) is None
        mismatched, missing = [], []
        targets = []  # (names, ShapeDtypeStruct)
        wanted = set()
        for readable, names, leaf in flat:
            path = "/".join(names)
            wanted.add(path)
            if _is_prng_key(leaf):
                data = jax.eval_shape(jax.random.key_data, leaf)
                shape, dtype = tuple(data.shape), data.dtype
            elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                shape, dtype = tuple(leaf.shape), leaf.dtype
            else:
                shape, dtype = np.shape(leaf), np.asarray(leaf).dtype
            if path not in saved_by_path:
                missing.append(f"{readable}: template {shape}, not in the checkpoint")
                continue
            rec = saved[saved_by_path[path]]
            if tuple(rec["shape"]) != shape:
                mismatched.append(f"{readable}: checkpoint {tuple(rec['shape'])} vs template {shape}")
                continue
            if _is_prng_key(leaf) and rec.get("prng_impl") not in (None, _key_impl_name(leaf)):
                mismatched.append(f"{readable}: PRNG key implementation {rec.get('prng_impl')} in the checkpoint vs "
                                  f"{_key_impl_name(leaf)} in the template")
                continue
            sharding = getattr(leaf, "sharding", None) or _default_sharding()
            targets.append((names, jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)))
        unexpected, ignored = [], []
        for readable, rec in saved.items():
            if rec["path"] in wanted:
                continue
            if template_ema_none and readable.startswith(".ema_params"):
                ignored.append((tuple(rec["path"].split("/")), jax.ShapeDtypeStruct(
                    tuple(rec["shape"]), np.dtype(rec["dtype"]), sharding=_default_sharding())))
            else:
                unexpected.append(f"{readable}: checkpoint {tuple(rec['shape'])}, not in the template")

        if mismatched or missing or unexpected:
            hint = ""
            if template_ema_none is False and any(m.startswith(".ema_params") for m in missing) and not any(
                    r.startswith(".ema_params") for r in saved):
                hint = ("\nThe checkpoint holds no EMA weights (it was trained with ema_decay=None); build the "
                        "template with a Trainer without EMA.")
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} does not fit the template state: it was "
                f"written by a different model configuration (another width, depth or architecture, optimizer "
                f"or EMA setting). Build the template with the configuration the run was trained with "
                f"(saved config: {json.dumps(meta.get('config'))[:300]}).\n"
                + _listing(mismatched + missing + unexpected) + hint)

        # orbax restores the whole stored tree (leaves the template drops, i.e. unwanted EMA weights, too)
        targets += ignored
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_nest(targets))))["state"] \
                if targets else {}
        except Exception as err:  # noqa: BLE001 - truncated or missing array files: one error naming the step
            raise self._unreadable(step, "arrays", "state", err) from err
        leaves = []
        for readable, names, leaf in flat:
            value = _lookup(restored, names)
            rec = saved[saved_by_path["/".join(names)]]
            if rec.get("crc32") and str(value.dtype) == rec["dtype"] and _crc32(value) not in (None, rec["crc32"]):
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory} is corrupt: the array {readable} "
                    f"({os.path.join(str(step), 'state')}) does not match the checksum recorded when it was saved.",
                    step=step, directory=str(self.directory))
            if _is_prng_key(leaf):
                impl = _key_impl(leaf)
                value = jax.random.wrap_key_data(value) if impl is None else jax.random.wrap_key_data(value, impl=impl)
            leaves.append(value)
        return jax.tree_util.tree_unflatten(treedef, leaves)


def _jaxgen_version() -> str:
    try:
        from jaxgen import __version__
        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"
