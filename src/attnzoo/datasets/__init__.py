"""Readers for the public datasets, one file per dataset, plus image decoding shared by all."""

from attnzoo.datasets.binvox import Binvox, read_binvox, write_binvox
from attnzoo.datasets.images import load_image

__all__ = ["Binvox", "load_image", "read_binvox", "write_binvox"]
