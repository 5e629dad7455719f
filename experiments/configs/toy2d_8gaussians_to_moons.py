"""TorchCFM's 2-D recipe (8 Gaussians -> moons, SELU MLP w=64, batch 256, Adam 1e-3), trained longer (20k steps
instead of 2k) with a cosine decay of the learning rate and an EMA of the weights (``./run.sh toy2d``)."""

from experiments.toy2d import Toy2DConfig


def get_config() -> Toy2DConfig:
    return Toy2DConfig(name="toy2d_8gaussians_to_moons")
