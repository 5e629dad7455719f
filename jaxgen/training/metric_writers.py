"""Training metrics to disk: JSON lines always, TensorBoard event files when ``tensorboardX`` is installed.

    with MetricWriter("runs/digits") as w:
        w.write(step, loss=0.41, seconds=12.5)

``metrics.jsonl`` gets one ``{"step": ..., name: value, ...}`` object per call (appended, so a resumed
run continues the same file; a torn last line, left by a kill in the middle of a write, is cut off when the file
is opened again, and :meth:`MetricWriter.truncate_after` drops the records of steps a resumed run will re-run); with ``tensorboard=True`` or ``"auto"`` and ``tensorboardX`` importable
(``pip install jaxgen[tensorboard]``), the same scalars go to ``tensorboard/`` as event files for
``tensorboard --logdir``. Values must be real numbers (Python, NumPy or 0-d JAX arrays).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def tensorboard_available() -> bool:
    """Whether ``tensorboardX`` (the TensorFlow-free TensorBoard event writer) can be imported."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


def _main_process() -> bool:
    import jax

    return jax.process_index() == 0


class MetricWriter:
    """Append scalar metrics to ``log_dir/metrics.jsonl`` and, optionally, TensorBoard event files.

    Args:
      log_dir: the run directory (created if needed).
      tensorboard: ``"auto"`` (use TensorBoard when ``tensorboardX`` is installed), True (require it:
        raises ImportError naming the package otherwise) or False.
      filename: the JSON-lines file name inside ``log_dir``.

    In a run of several processes (``jax.distributed``) only process 0 writes; on the others every method is a
    no-op.
    """

    def __init__(self, log_dir: str, *, tensorboard: bool | str = "auto", filename: str = "metrics.jsonl"):
        if tensorboard not in (True, False, "auto"):
            raise ValueError(f"tensorboard must be True, False or 'auto', got {tensorboard!r}.")
        self.path = os.path.join(log_dir, filename)
        self._tb = None
        self.active = _main_process()
        if not self.active:
            return
        os.makedirs(log_dir, exist_ok=True)
        self._cut_torn_tail()
        if tensorboard is True and not tensorboard_available():
            raise ImportError("tensorboard=True needs the tensorboardX package: pip install tensorboardX "
                              "(or jaxgen[tensorboard]), or pass tensorboard='auto'/False.")
        if tensorboard and tensorboard_available():
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard event files are being written."""
        return self._tb is not None

    def write(self, step: int, **scalars: Any) -> None:
        """Record ``scalars`` (name -> real number) at ``step``."""
        if not self.active:
            return
        values = {}
        for name, value in scalars.items():
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {name!r} must be a real number, got {type(value).__name__}") from None
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                                       for k, v in values.items()}}) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, int(step))

    def _cut_torn_tail(self) -> None:
        """Drop an incomplete last line (a kill in the middle of an append): every record ends with a newline."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)

    def truncate_after(self, step: int) -> int:
        """Drop the records of the steps after ``step`` (a run resumed from the checkpoint of ``step`` runs them
        again, and would log them twice); the file is replaced atomically. Returns how many records were dropped."""
        if not self.active or not os.path.exists(self.path):
            return 0
        with open(self.path) as fh:
            lines = fh.readlines()
        keep = []
        for line in lines:
            try:
                later = int(json.loads(line)["step"]) > int(step)
            except (ValueError, KeyError, TypeError):
                later = False  # not ours to judge: kept as it is
            if not later:
                keep.append(line)
        if len(keep) == len(lines):
            return 0
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(keep)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return len(lines) - len(keep)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, one per step in the order the steps first appear (records of the
    same step are merged, the later values winning); non-finite values come back as the strings 'nan'/'inf'. A
    torn last line (a kill in the middle of a write) is ignored; a malformed line elsewhere raises ValueError naming
    the file and the line."""
    with open(path) as fh:
        lines = fh.read().split("\n")
    by_step: dict[Any, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # no newline after it: an append that did not finish
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({err}); delete or repair that line.") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {i + 1}: not a JSON object; delete or repair that line.")
        by_step.setdefault(record.get("step"), {}).update(record)
    return list(by_step.values())
