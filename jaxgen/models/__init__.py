"""Flax NNX networks with jaxgen's field signature ``model(x, t, **cond)``."""

from jaxgen.models.embeddings import sinusoidal_embedding
from jaxgen.models.mlp import MLPField
from jaxgen.models.unet import UNetField

__all__ = ["MLPField", "UNetField", "sinusoidal_embedding"]
