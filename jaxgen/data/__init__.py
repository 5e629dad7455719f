"""Data: synthetic 2-D distributions (``toy2d``) and image datasets (``images``: embedded digits, TFDS)."""

from jaxgen.data import images
from jaxgen.data.images import ImageDataset, ImageLoader, device_sampler, load_digits, load_tfds, prefetch_to_device
from jaxgen.data.toy2d import DISTRIBUTIONS, get_distribution

__all__ = ["DISTRIBUTIONS", "get_distribution", "images", "ImageDataset", "ImageLoader", "device_sampler",
           "load_digits", "load_tfds", "prefetch_to_device"]
from jaxgen.data import controls
from jaxgen.data.controls import edge_agreement, edge_map, low_resolution, masked_image, random_box_mask

__all__ += ["controls", "edge_map", "low_resolution", "random_box_mask", "masked_image",
            "edge_agreement"]
from jaxgen.data import captions
from jaxgen.data.captions import AttributeBins, caption_tokens, drop_caption_parts, measure_attributes

__all__ += ["captions", "AttributeBins", "measure_attributes", "caption_tokens", "drop_caption_parts"]
