"""Training metrics to disk: JSON lines always, TensorBoard event files when ``tensorboardX`` is installed.

    with MetricWriter("runs/digits") as w:
        w.write(step, loss=0.41, seconds=12.5)

``metrics.jsonl`` gets one ``{"step": ..., name: value, ...}`` object per call (appended, so a resumed
run continues the same file); with ``tensorboard=True`` or ``"auto"`` and ``tensorboardX`` importable
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


class MetricWriter:
    """Append scalar metrics to ``log_dir/metrics.jsonl`` and, optionally, TensorBoard event files.

    Args:
      log_dir: the run directory (created if needed).
      tensorboard: ``"auto"`` (use TensorBoard when ``tensorboardX`` is installed), True (require it:
        raises ImportError naming the package otherwise) or False.
      filename: the JSON-lines file name inside ``log_dir``.
    """

    def __init__(self, log_dir: str, *, tensorboard: bool | str = "auto", filename: str = "metrics.jsonl"):
        if tensorboard not in (True, False, "auto"):
            raise ValueError(f"tensorboard must be True, False or 'auto', got {tensorboard!r}.")
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, filename)
        self._tb = None
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
    """The records of a ``metrics.jsonl`` file (non-finite values come back as the strings 'nan'/'inf')."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
