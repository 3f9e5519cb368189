"""Readers for the public datasets, one file per dataset, plus image decoding shared by all."""

from attnzoo.datasets.images import load_image

__all__ = ["load_image"]
