r"""Callbacks of :meth:`jaxgen.training.Trainer.fit`: checkpoints, metric logs, anything at fixed step intervals.

A callback has ``every`` (``None``: after every chunk; ``n``: at the steps that are multiples of ``n``, and at the end
of the run) and the methods ``on_start(trainer, state)``, ``on_losses(trainer, state, chunk_losses)`` (after every
chunk), ``on_chunk(trainer, state, chunk_losses)`` (at its steps), ``on_end(trainer, state)`` and ``close()`` (always
called, also when training stops with an error). ``fit`` cuts its
fused chunks at the multiples of every callback's ``every``, so a callback sees exactly those steps. A plain function
``f(state, chunk_losses)`` is a callback called after every chunk.

Example::

    with Checkpointer("runs/moons/checkpoints") as ckpt, MetricWriter("runs/moons") as writer:
        state = ckpt.restore(trainer.init(0), missing_ok=True)        # resume if there is a checkpoint
        state, losses = trainer.fit(state, until_step=10_000,
                                    callbacks=[Checkpointing(ckpt, every=1000), MetricLogger(writer)])
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import numpy as np


class Callback:
    """Base class: override what you need (see the module docstring)."""

    every: int | None = None

    def on_start(self, trainer, state) -> None:
        pass

    def on_losses(self, trainer, state, losses: np.ndarray) -> None:
        pass

    def on_chunk(self, trainer, state, losses: np.ndarray) -> None:
        pass

    def on_end(self, trainer, state) -> None:
        pass

    def close(self) -> None:
        pass


class _Function(Callback):
    def __init__(self, fn: Callable, every: int | None = None):
        self.fn, self.every = fn, every

    def on_chunk(self, trainer, state, losses):
        self.fn(state, losses)


def as_callback(c: Any) -> Callback:
    """A :class:`Callback`, or a plain function ``f(state, chunk_losses)`` called after every chunk."""
    if isinstance(c, Callback):
        return c
    if callable(c):
        return _Function(c)
    raise TypeError(f"a callback must be a jaxgen.training.Callback or a function f(state, chunk_losses), got "
                    f"{type(c).__name__}.")


def _check_every(every) -> int:
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be a positive int (steps), got {every!r}.")
    return int(every)


class Every(Callback):
    """``fn(state)`` at the steps that are multiples of ``every`` (and at the end), e.g. to save sample grids."""

    def __init__(self, every: int, fn: Callable):
        self.every, self.fn = _check_every(every), fn

    def on_chunk(self, trainer, state, losses):
        self.fn(state)


class Checkpointing(Callback):
    """Save the state with a :class:`~jaxgen.training.Checkpointer` at the multiples of ``every`` and at the end.

    Each save stores ``metrics={"loss": mean loss since the previous save, **metrics_fn(state)}`` and ``config``.
    Saves are forced (``every`` decides, not the checkpointer's ``save_interval_steps``) and never overwrite an
    existing step. Pending (asynchronous) saves are awaited when training ends, also with an error: the checkpoints
    already written are kept. Resume a run with ``state = checkpointer.restore(template, missing_ok=True)`` before
    ``fit``.
    """

    def __init__(self, checkpointer, every: int, *, config: Any = None,
                 metrics_fn: Callable[[Any], Mapping[str, Any]] | None = None):
        self.checkpointer, self.every = checkpointer, _check_every(every)
        self.config, self.metrics_fn = config, metrics_fn
        self._since: list[np.ndarray] = []

    def on_start(self, trainer, state):
        self._since = []

    def on_losses(self, trainer, state, losses):
        self._since.append(np.asarray(losses, np.float64).reshape(len(losses), -1)[:, 0])

    def on_chunk(self, trainer, state, losses):
        metrics = {"loss": float(np.mean(np.concatenate(self._since)))}
        if self.metrics_fn is not None:
            metrics.update(self.metrics_fn(state))
        self.checkpointer.save(state, metrics=metrics, config=self.config, force=True)
        self._since = []

    def close(self):
        self.checkpointer.wait()


class MetricLogger(Callback):
    """Write the mean loss of every chunk (and the wall time since the start) with a
    :class:`~jaxgen.training.MetricWriter` (``metrics.jsonl``, TensorBoard). At the start it drops the logged records
    of steps after the state's step (a resumed run re-runs them), so the log holds one record per step."""

    def __init__(self, writer, *, every: int | None = None):
        self.writer, self.every = writer, every
        self._start = time.perf_counter()
        self._since: list[np.ndarray] = []

    def on_start(self, trainer, state):
        self._start = time.perf_counter()
        truncate = getattr(self.writer, "truncate_after", None)
        if truncate is not None:
            truncate(int(state.step))  # a resumed run re-runs the steps after its checkpoint: one record per step

    def on_chunk(self, trainer, state, losses):
        losses = np.asarray(losses, np.float64).reshape(len(losses), -1)
        values = {"loss": float(losses[:, 0].mean())}
        if losses.shape[1] > 1:
            values.update({f"loss_{i}": float(losses[:, i].mean()) for i in range(losses.shape[1])})
        self.writer.write(int(state.step), **values, seconds=round(time.perf_counter() - self._start, 2))


__all__ = ["Callback", "Every", "Checkpointing", "MetricLogger", "as_callback"]
