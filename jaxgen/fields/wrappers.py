r"""Field wrappers that change how a field is evaluated, not what it computes."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time

Array = jax.Array


def chunked_field(field: Callable, chunk_size: int) -> Callable:
    """The same field, evaluated on consecutive batch chunks of ``chunk_size`` in sequence (``lax.map``).

    ``chunked_field(f, c)(x, t, **cond)`` equals ``f(x, t, **cond)`` for any per-sample field; only the
    evaluation order changes. Use it to bound the memory of a large sampling batch, or on CPU to keep
    a network's activations in cache (the digits U-Net samples about 1.3x faster in chunks of 64 than
    in one batch of 512). The batch is padded to a multiple of ``chunk_size`` by repeating its first
    sample, and the padding is dropped from the output. ``t`` and every ``cond`` array whose leading
    dimension is the batch size are split with ``x``; other ``cond`` values are passed whole to every
    chunk. It composes with :func:`guided_field` (chunk the inner field) and counts as one NFE per call.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")

    def chunked(x, t, **cond):
        n = x.shape[0]
        if n <= chunk_size:
            return field(x, t, **cond)
        t = batch_time(t, x)
        split = {k: v for k, v in cond.items() if jnp.ndim(v) >= 1 and jnp.shape(v)[0] == n}
        whole = {k: v for k, v in cond.items() if k not in split}
        num = -(-n // chunk_size)
        pad = num * chunk_size - n

        def reshape(a):
            a = jnp.asarray(a)
            if pad:
                a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad,) + a.shape[1:])], axis=0)
            return a.reshape((num, chunk_size) + a.shape[1:])

        out = jax.lax.map(lambda args: field(args[0], args[1], **args[2], **whole),
                          (reshape(x), reshape(t), {k: reshape(v) for k, v in split.items()}))
        return out.reshape((num * chunk_size,) + out.shape[2:])[:n]

    return chunked


__all__ = ["chunked_field"]
