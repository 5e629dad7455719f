"""Flow matching from N(0, I) to a checkerboard (a wider MLP, longer)."""

from experiments.toy2d import Toy2DConfig


def get_config() -> Toy2DConfig:
    return Toy2DConfig(name="toy2d_gaussian_to_checkerboard", source="gaussian", target="checkerboard", steps=30_000,
                       width=128)
