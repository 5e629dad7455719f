"""Data: synthetic 2-D distributions (``toy2d``)."""

from jaxgen.data.toy2d import DISTRIBUTIONS, get_distribution

__all__ = ["DISTRIBUTIONS", "get_distribution"]
