"""Time embeddings for vector-field networks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

GUIDANCE_EMBEDDING_SCALE = 100.0  # a guidance scale w in [0, 10] -> [0, 1000], the range t in [0, 1] gets by default


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


class ScalarEmbedding(nnx.Module):
    """A scalar per sample (a time, an interval ``t - r``, a guidance scale), shape ``(B,)``, embedded as
    ``Linear(SiLU(Linear(sinusoidal_embedding(s, freq_dim, scale=scale))))`` of shape ``(B, dim)``: the time embedder
    of DDPM/ADM and DiT (Peebles & Xie 2023, sec. 3.2), shared by the U-Net and the DiT for every scalar input."""

    def __init__(self, freq_dim: int, dim: int, *, scale: float = 1000.0,
                 kernel_init=nnx.initializers.lecun_normal(), rngs: nnx.Rngs):
        self.freq_dim, self.scale = int(freq_dim), float(scale)
        self.inp = nnx.Linear(freq_dim, dim, kernel_init=kernel_init, rngs=rngs)
        self.out = nnx.Linear(dim, dim, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, s: Array, dtype=jnp.float32) -> Array:
        return self.out(nnx.silu(self.inp(sinusoidal_embedding(s, self.freq_dim, scale=self.scale).astype(dtype))))
