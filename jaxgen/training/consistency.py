r"""Training consistency losses with an EMA target network."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgen.training.trainer import Trainer, TrainState, ema_update

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Training with an EMA target.
# ---------------------------------------------------------------------------------------------


class ConsistencyTrainer(Trainer):
    r"""A :class:`jaxgen.train.Trainer` for consistency losses with an EMA target network ``theta^-``.

    ``TrainState.ema_params`` holds ``theta^-``; each step evaluates
    ``loss_fn(online_model, target_model, batch, key, step=state.step)``, takes the optimizer step on
    the online parameters, then sets ``theta^- <- mu theta^- + (1 - mu) theta`` with the *new* online
    parameters (paper Algorithms 2-3). ``fit``, ``steps`` (fused ``lax.scan``), the NaN guard and
    ``model(state)`` / ``model(state, ema=True)`` (online / target) are the base class's.

    Args:
      model: the :class:`ConsistencyFunction` (or any NNX field) to train.
      loss_fn: a consistency loss ``loss(model, target, batch, key, step=0)``.
      optimizer: an optax transformation.
      data: ``data(key) -> batch`` sampled inside the compiled step.
      target_decay: ``mu``, a float in ``[0, 1)`` or a function ``step -> mu`` (e.g. from :func:`ct_schedule`).
        ``mu = 0`` makes the target the current online weights.
      fuse_steps: as for :class:`~jaxgen.train.Trainer`.
      target_eval: run the target in evaluation mode (``target.eval()``: no dropout). By default a network
        in training mode applies dropout in the target too, with the same masks as the online call (both
        start from the step's RNG state, as Song et al.'s reference code, openai/consistency_models, does
        by restoring the RNG state before the target call).
    """

    def __init__(self, model: nnx.Module, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                 data: Callable[[Array], Any] | None = None,
                 target_decay: float | Callable[[Array], Array] = 0.95, fuse_steps: bool = True,
                 target_eval: bool = False):
        if not callable(target_decay) and not 0.0 <= float(target_decay) < 1.0:
            raise ValueError(f"target_decay must be in [0, 1) or a function step -> decay, got {target_decay}.")
        self.target_decay = target_decay
        self.target_eval = bool(target_eval)
        super().__init__(model, loss_fn, optimizer, data=data,
                         ema_decay=0.0 if callable(target_decay) else float(target_decay),
                         ema_warmup=False, fuse_steps=fuse_steps)

    def _step(self, state: TrainState, batch: Any = None) -> tuple[TrainState, Array]:
        batch, k_loss = self._batch_and_loss_key(state, batch)
        ema_params = jax.lax.stop_gradient(state.ema_params)

        def loss(params, rest):
            model = nnx.merge(self.graphdef, params, rest)
            # Built at this trace level (not outside the grad): a stateful network (dropout RNG counters)
            # may only be mutated where it was traced. Its own copy of `rest`: the online call's masks.
            target = nnx.merge(self.graphdef, ema_params, jax.tree.map(lambda v: v, rest))
            if self.target_eval:
                target.eval()
            value = self.loss_fn(model, target, batch, k_loss, step=state.step).astype(jnp.float32)
            return value, nnx.split(model, nnx.Param, ...)[2]

        (value, rest), (grads, _) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True, allow_int=True)(
            state.params, state.rest)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        mu = self.target_decay(state.step) if callable(self.target_decay) else self.target_decay
        ema = ema_update(state.ema_params, params, mu)
        return TrainState(state.step + 1, params, rest, opt_state, ema, state.key), value

    def target_model(self, state: TrainState) -> nnx.Module:
        """The target network ``theta^-`` (the same as ``model(state, ema=True)``)."""
        return self.model(state, ema=True)


__all__ = ["ConsistencyTrainer"]
