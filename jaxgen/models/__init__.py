"""Flax NNX networks: fields with jaxgen's signature ``model(x, t, **cond)`` (MLP, U-Net, consistency and energy
models) and the other families' networks (VAEs, VQ-VAE, normalizing flows, GANs)."""

from jaxgen.models.classifier import DigitsClassifier
from jaxgen.models.consistency import ConsistencyFunction, consistency_fn
from jaxgen.models.dit import DiTField, FlowMapDiT
from jaxgen.models.ebm import EnergyNet
from jaxgen.models.embeddings import sinusoidal_embedding
from jaxgen.models.flows import (ActNorm, AffineCoupling, Flow, InvertibleLinear, RealNVP, Split, Squeeze)
from jaxgen.models.gan import GAN, SpectralNorm, make_gan
from jaxgen.models.glow import Glow
from jaxgen.models.mlp import FlowMapMLP, MLPField
from jaxgen.models.pair import VelocityAndScore
from jaxgen.models.sharding import shard_parameters
from jaxgen.models.unet import FlowMapUNet, UNetField
from jaxgen.models.vae import GaussianVAE, HierarchicalVAE
from jaxgen.models.vqvae import VQVAE, VectorQuantizer

__all__ = ["MLPField", "FlowMapMLP", "UNetField", "FlowMapUNet", "ConsistencyFunction", "consistency_fn", "DigitsClassifier", "sinusoidal_embedding",
           "shard_parameters", "VelocityAndScore", "GaussianVAE", "HierarchicalVAE", "VQVAE", "VectorQuantizer", "Flow",
           "RealNVP", "Glow", "AffineCoupling", "ActNorm", "InvertibleLinear", "Squeeze", "Split", "GAN", "SpectralNorm",
           "make_gan", "EnergyNet", "DiTField", "FlowMapDiT"]
from jaxgen.models.controlnet import ControlNet, ControlledField, HintEncoder

__all__ += ["ControlNet", "ControlledField", "HintEncoder"]
from jaxgen.models.text import CrossAttention, TextConditionedField, TokenEncoder

__all__ += ["TokenEncoder", "TextConditionedField", "CrossAttention"]
