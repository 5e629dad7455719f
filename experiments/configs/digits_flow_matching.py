"""Conditional flow matching (the library's core objective) as one family of the comparison on the digits (:mod:`experiments.generative`).
Any 2-D target instead: ``--set data=moons``."""

from experiments.generative import GenerativeConfig


def get_config() -> GenerativeConfig:
    return GenerativeConfig(name="digits_flow_matching", family="flow_matching")
