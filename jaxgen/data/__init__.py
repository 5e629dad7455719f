"""Data: synthetic 2-D distributions (``toy2d``) and image datasets (``images``: embedded digits, TFDS)."""

from jaxgen.data import images
from jaxgen.data.images import ImageDataset, ImageLoader, device_sampler, load_digits, load_tfds, prefetch_to_device
from jaxgen.data.toy2d import DISTRIBUTIONS, get_distribution

__all__ = ["DISTRIBUTIONS", "get_distribution", "images", "ImageDataset", "ImageLoader", "device_sampler",
           "load_digits", "load_tfds", "prefetch_to_device"]
