"""A score model trained by sliced score matching, sampled by Langevin dynamics on the digits (:mod:`experiments.generative`).
Any 2-D target instead: ``--set data=moons``."""

from experiments.generative import GenerativeConfig


def get_config() -> GenerativeConfig:
    return GenerativeConfig(name="digits_ssm", family="ssm")
