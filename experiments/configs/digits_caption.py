"""Text-to-image on the digits: a U-Net with cross-attention, conditioned on captions of each training digit's own
measured attributes ("seven, thick, slanted right": its label, stroke thickness from the ink mass and slant from
image moments; :mod:`jaxgen.data.captions`) through a token encoder trained from scratch, with classifier-free
guidance over the caption. ``jaxgen sample --checkpoint runs/digits_caption --caption "three, thin, slanted left"``;
the report measures whether samples have the requested label (the digits classifier), thickness and slant (the same
measurements), against samples of the label's word alone and unconditional ones."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="digits_caption", conditioning="caption", steps=2000, guidance_scales=(0.0, 1.0, 2.0, 4.0),
                       sample_every=0)
