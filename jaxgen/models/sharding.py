"""Parameter-sharding annotations for Flax NNX models (the partitioning metadata a mesh-aware trainer reads)."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx


def shard_parameters(module: Any, axis: str = "data", *, min_size: int = 2**14) -> Any:
    """Annotate ``module``'s parameters for parameter sharding over the mesh axis ``axis`` (NNX partitioning
    metadata, ``out_sharding``): every ``nnx.Param`` of at least 2 dimensions and ``min_size`` elements is split along
    its last dimension (a kernel's output features or channels); smaller ones (biases, norms) stay replicated, as
    gathering them would cost more than it saves. Parameters that already carry an ``out_sharding`` keep it.
    Returns the module, changed in place; it stays usable on one device (the annotation only places arrays where a
    :class:`jaxgen.training.Trainer` has a mesh, through
    :func:`jaxgen.training.parallel.parameter_shardings`)."""
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"axis must be a mesh axis name such as 'data', got {axis!r}.")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int (elements), got {min_size!r}.")
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param) and var.get_metadata().get("out_sharding") is None:
            shape = np.shape(var[...])
            if len(shape) >= 2 and int(np.prod(shape)) >= min_size:
                var.set_metadata("out_sharding", (None,) * (len(shape) - 1) + (axis,))
    return module


__all__ = ["shard_parameters"]
