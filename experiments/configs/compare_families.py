"""Every family of generative models on 8 Gaussians and on the digits, in one table and one figure
(:mod:`experiments.compare`)."""

from experiments.compare import CompareConfig


def get_config() -> CompareConfig:
    return CompareConfig()
