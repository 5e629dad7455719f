"""A VQ-VAE with an EMA codebook (samples from independent codes: a VQ-VAE has no prior of its own) on the digits (:mod:`experiments.generative`).
Any 2-D target instead: ``--set data=moons``."""

from experiments.generative import GenerativeConfig


def get_config() -> GenerativeConfig:
    return GenerativeConfig(name="digits_vqvae", family="vqvae")
