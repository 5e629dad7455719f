"""RealNVP (affine couplings), trained by maximum likelihood on dequantised digits on the digits (:mod:`experiments.generative`).
Any 2-D target instead: ``--set data=moons``."""

from experiments.generative import GenerativeConfig


def get_config() -> GenerativeConfig:
    return GenerativeConfig(name="digits_realnvp", family="realnvp")
