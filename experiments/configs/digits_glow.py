"""Glow (actnorm, invertible 1x1 convolutions, multi-scale), trained by maximum likelihood on the digits (:mod:`experiments.generative`).
Any 2-D target instead: ``--set data=moons``."""

from experiments.generative import GenerativeConfig


def get_config() -> GenerativeConfig:
    return GenerativeConfig(name="digits_glow", family="glow")
