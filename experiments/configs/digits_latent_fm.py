"""Latent flow matching: a flow-matching prior trained in a VAE's latent space, decoded on the digits (:mod:`experiments.generative`).
Any 2-D target instead: ``--set data=moons``."""

from experiments.generative import GenerativeConfig


def get_config() -> GenerativeConfig:
    return GenerativeConfig(name="digits_latent_fm", family="latent_fm")
