"""sCM (continuous-time consistency training, TrigFlow) from scratch on N(0, I) -> moons, sampled in one jump
(:mod:`experiments.recipes.scm`)."""

from experiments.generative import GenerativeConfig


def get_config() -> GenerativeConfig:
    return GenerativeConfig(name="moons_scm", family="scm", data="moons", steps=10000, batch_size=256, width=128)
