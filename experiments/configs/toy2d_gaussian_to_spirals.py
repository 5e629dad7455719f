"""Flow matching from N(0, I) to two spirals (a wider MLP, longer)."""

from experiments.toy2d import Toy2DConfig


def get_config() -> Toy2DConfig:
    return Toy2DConfig(name="toy2d_gaussian_to_spirals", source="gaussian", target="spirals", steps=30_000, width=128)
