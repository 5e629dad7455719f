"""Flow matching from N(0, I) to two moons."""

from experiments.toy2d import Toy2DConfig


def get_config() -> Toy2DConfig:
    return Toy2DConfig(name="toy2d_gaussian_to_moons", source="gaussian", target="moons")
