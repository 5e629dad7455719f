"""Which leaves of a pytree hold NaN or inf: the NaN guard of the training loop and of checkpoint saves."""

from __future__ import annotations

from typing import Any

import numpy as np
import jax
import jax.numpy as jnp


@jax.jit
def _finite_flags(leaves: list) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def _is_float_array(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and hasattr(x, "shape") and jnp.issubdtype(dtype, jnp.inexact)


def nonfinite_leaves(tree: Any) -> list[str]:
    """The paths (``jax.tree_util.keystr``) of the floating-point leaves of ``tree`` that hold a NaN or an inf, in
    tree order; ``[]`` when every value is finite. One compiled reduction per tree structure, run where the arrays
    live (one host transfer of a boolean per leaf)."""
    flat = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_float_array(x)]
    if not flat:
        return []
    flags = np.asarray(_finite_flags([x for _, x in flat]))
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, flags) if not ok]


__all__ = ["nonfinite_leaves"]
