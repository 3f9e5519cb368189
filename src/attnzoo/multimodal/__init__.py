"""Multimodal methods: NevaClip (CLIP-guided zero-shot scanpaths, :mod:`attnzoo.multimodal.nevaclip`),
subject insertion (In-Context Brush and Diptych Prompting on FLUX.1-Fill,
:mod:`attnzoo.multimodal.insertion`) and training-free LVLM hallucination mitigation (VAR, PAI,
PAINT, VCD, AGLA, CARVE, :mod:`attnzoo.multimodal.hallucination`). Importing this package is cheap:
each method's module (and torch / open_clip / diffusers / transformers with it) is imported on first
attribute access."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NevaClip": "attnzoo.multimodal.nevaclip",
    "NevaClipResult": "attnzoo.multimodal.nevaclip",
    "fixations_to_pixels": "attnzoo.multimodal.nevaclip",
    "foveation_mask": "attnzoo.multimodal.nevaclip",
    "gaussian_blur_difference": "attnzoo.multimodal.nevaclip",
}

__all__ = ["NevaClip", "NevaClipResult", "fixations_to_pixels", "foveation_mask", "gaussian_blur_difference"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
