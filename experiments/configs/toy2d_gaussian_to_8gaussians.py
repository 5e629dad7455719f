"""Flow matching from N(0, I) to 8 Gaussians."""

from experiments.toy2d import Toy2DConfig


def get_config() -> Toy2DConfig:
    return Toy2DConfig(name="toy2d_gaussian_to_8gaussians", source="gaussian", target="8gaussians")
