"""Flax NNX networks with jaxgen's field signature ``model(x, t, **cond)``."""

from jaxgen.models.classifier import DigitsClassifier
from jaxgen.models.consistency import ConsistencyFunction, consistency_fn
from jaxgen.models.embeddings import sinusoidal_embedding
from jaxgen.models.mlp import MLPField
from jaxgen.models.pair import VelocityAndScore
from jaxgen.models.sharding import shard_parameters
from jaxgen.models.unet import UNetField

__all__ = ["MLPField", "UNetField", "ConsistencyFunction", "consistency_fn", "DigitsClassifier", "sinusoidal_embedding",
           "shard_parameters", "VelocityAndScore"]
