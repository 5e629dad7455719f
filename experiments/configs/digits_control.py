"""ControlNet on the digits: the main job's trained U-Net (``./run.sh`` -> ``runs/digits_cfm``, frozen) with a
trainable copy of its encoder, joined by zero-initialised convolutions, trained to follow the edge map of each
training digit (``--set conditioning=control:kind=lowres`` a 4x4 version of it, ``kind=mask`` a half-hidden digit).
At step 0 the controlled network is the base network exactly. ``jaxgen sample --checkpoint runs/digits_control
--control test:5`` follows the edges of held-out digit 5; the report measures the agreement of the samples' edges
with the requested ones against the base model's samples of the same labels."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="digits_control", conditioning="control:kind=edges", base_run="runs/digits_cfm",
                       steps=1000, sample_every=0)
