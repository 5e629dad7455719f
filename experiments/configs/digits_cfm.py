"""The main job (``./run.sh``): class-conditional flow matching with classifier-free guidance on scikit-learn's
digits (8x8), a U-Net of TorchCFM's size. 1,000 steps: about 145-216 s of training on 2 CPU cores, guided label
accuracy 1.0 at w = 2 (measured)."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="digits_cfm")
