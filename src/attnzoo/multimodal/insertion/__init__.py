"""Subject insertion on FLUX.1-Fill: In-Context Brush and Diptych Prompting's attention edits as diffusers
attention processors, the diptych panel layout, model loading and one inpainting run.

Importing this package is cheap (each module loads on first use; diffusers when a model is built). The
``flux_fill`` model is registered by :mod:`attnzoo.multimodal.insertion.models`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PanelLayout": "layout",
    "TokenSets": "layout",
    "build_canvas": "layout",
    "rasterize_via": "layout",
    "read_mask": "layout",
    "subject_on_white": "layout",
    "InContextAttnProcessor": "in_context_brush",
    "InsertionAttention": "in_context_brush",
    "InsertionState": "in_context_brush",
    "install_processors": "in_context_brush",
    "insertion_processors": "in_context_brush",
    "FluxFillModel": "flux",
    "load_flux_fill": "flux",
    "run_fill": "flux",
    "tiny_flux_fill": "flux",
    "InsertionInputs": "inputs",
    "prepare_inputs": "inputs",
    "SubjectSegmenter": "segment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
