r"""Optimizers: Adam(W) with warm-up, cosine decay and clipping, composed from optax."""

from __future__ import annotations

from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import optax

from jaxgen._checks import check_number


def adam_with_schedule(
    learning_rate: float = 1e-3,
    *,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    final_fraction: float = 0.0,
    clip_norm: float | None = None,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """Adam(W) with optional linear warm-up, cosine decay to ``final_fraction * lr`` and global-norm clipping.

    Without ``total_steps`` the rate warms up (when ``warmup_steps > 0``) and then stays constant. A warm-up longer
    than ``total_steps`` rises for the whole run (a short smoke run of a long recipe) and never reaches its peak.
    ``clip_norm=None`` turns clipping off."""
    owner = "adam_with_schedule"
    check_number(learning_rate, lambda v: v > 0, name="learning_rate", owner=owner,
                 what="a finite number > 0 (e.g. 1e-3)")
    check_number(final_fraction, lambda v: 0 <= v <= 1, name="final_fraction", owner=owner, what="in [0, 1]")
    check_number(weight_decay, lambda v: v >= 0, name="weight_decay", owner=owner, what="a finite number >= 0")
    if clip_norm is not None:
        check_number(clip_norm, lambda v: v > 0, name="clip_norm", owner=owner,
                     what="a finite number > 0, or None for no clipping")
    for name, v, lo in (("total_steps", total_steps, 1), ("warmup_steps", warmup_steps, 0)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo):
            raise ValueError(f"adam_with_schedule: {name} must be an integer >= {lo}, got {v!r}.")
    if total_steps is None:
        lr: Any = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else learning_rate
    else:
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
            warmup_steps=max(warmup_steps, 0), decay_steps=max(total_steps, warmup_steps + 1),
            end_value=final_fraction * learning_rate)
    opt = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm is not None else opt


def clip_params(c: float) -> optax.GradientTransformation:
    r"""Weight clipping as an optimizer stage: the updates become ``clip(p + u, -c, c) - p``, so every parameter
    ``p`` stays in ``[-c, c]`` after ``optax.apply_updates`` (up to the float rounding of ``p + (a - p)``, about an
    ulp of ``max(|p|, c)``).

    WGAN's way of keeping the critic ``K``-Lipschitz (Arjovsky et al. 2017, Algorithm 1: ``w <- clip(w, -c, c)``
    after each RMSProp step, ``c = 0.01``). Put it last in a chain, e.g.
    ``optax.chain(optax.rmsprop(5e-5), clip_params(0.01))``; it needs the parameters (``update(..., params)``,
    which :class:`jaxgen.training.Trainer` passes). Parameters that start outside the box are clipped at the first
    update.
    """
    check_number(c, lambda v: v > 0, name="c", owner="clip_params", what="a finite number > 0 (e.g. 0.01)")
    c = float(c)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("clip_params needs the parameters: call update(updates, state, params) (optax's "
                             "apply-with-params form, as the jaxgen Trainer does).")
        new = jax.tree.map(lambda u, p: jnp.clip(p + u, -c, c) - p, updates, params)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["adam_with_schedule", "clip_params"]
