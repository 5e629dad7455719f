"""Time embeddings for vector-field networks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def sinusoidal_embedding(t: Array, dim: int, *, max_period: float = 10_000.0, scale: float = 1000.0) -> Array:
    r"""Transformer-style embedding of times ``t`` of shape ``(B,)`` into ``(B, dim)`` (Vaswani et al. 2017).

    ``emb = [cos(scale t w_k), sin(scale t w_k)]`` with ``w_k = max_period^{-k / (dim/2)}``; ``scale`` maps
    ``t in [0, 1]`` onto the range of DDPM's integer steps so all frequencies are used.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dimension must be even, got {dim}.")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * t.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
