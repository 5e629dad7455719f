"""MeanFlow from scratch on N(0, I) -> moons, sampled in one jump (:mod:`experiments.recipes.flow_map`)."""

from experiments.generative import GenerativeConfig


def get_config() -> GenerativeConfig:
    return GenerativeConfig(name="moons_meanflow", family="meanflow", data="moons", steps=10000, batch_size=256,
                            width=128)
