"""Readers for the public datasets, one file per dataset, plus image decoding shared by all.

The scanpath readers load on first use (``attnzoo.datasets.CapMIT1003`` etc.)."""

from attnzoo.datasets.binvox import Binvox, read_binvox, write_binvox
from attnzoo.datasets.images import load_image

_LAZY = {
    "CapMIT1003": "attnzoo.datasets.capmit1003",
    "MIT1003": "attnzoo.datasets.mit1003",
    "AmazonCovers": "attnzoo.datasets.visual_search",
    "OATShelf": "attnzoo.datasets.visual_search",
    "ScanpathRecord": "attnzoo.datasets.scanpaths",
    "SearchTrial": "attnzoo.datasets.scanpaths",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnzoo.datasets' has no attribute {name!r}")


__all__ = [
    "AmazonCovers",
    "Binvox",
    "CapMIT1003",
    "MIT1003",
    "OATShelf",
    "ScanpathRecord",
    "SearchTrial",
    "load_image",
    "read_binvox",
    "write_binvox",
]
