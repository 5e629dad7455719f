r"""Optimizers: Adam(W) with warm-up, cosine decay and clipping, composed from optax."""

from __future__ import annotations

from typing import Any

import optax


def adam_with_schedule(
    learning_rate: float = 1e-3,
    *,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    final_fraction: float = 0.0,
    clip_norm: float | None = None,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """Adam(W) with optional linear warm-up, cosine decay to ``final_fraction * lr`` and global-norm clipping."""
    if total_steps is None:
        lr: Any = learning_rate
    else:
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
            warmup_steps=max(warmup_steps, 0), decay_steps=max(total_steps, warmup_steps + 1),
            end_value=final_fraction * learning_rate)
    opt = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm else opt


__all__ = ["adam_with_schedule"]
