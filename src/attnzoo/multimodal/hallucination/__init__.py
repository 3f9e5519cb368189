"""LVLM hallucination mitigation on transformers models: attention-time interventions (VAR, PAI,
PAINT), logits processors with a contrast branch (PAI's CFG, and the base that VCD and AGLA use),
and the image-token layouts of the supported families (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL /
Qwen2.5-VL, InstructBLIP). Importing the package is cheap: each name loads its module (and
transformers with it) on first access.

    from attnzoo.multimodal.hallucination import VAR
    with VAR().attach(model):            # a loaded llava-hf/llava-1.5-7b-hf
        ids = model.generate(**inputs, max_new_tokens=64)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "base": (
        "AttentionEdit",
        "ContrastBranchProcessor",
        "PairedContrast",
        "Intervention",
        "InterventionConflictError",
        "InterventionError",
        "attached",
        "branch_stream",
        "processors_then_warpers",
    ),
    "layouts": ("FixedImageSpan", "ImageRun", "ImageTokens", "LayoutError", "family_of"),
    "var": ("VAR", "find_sink_dims", "redistribute", "sink_scores", "SINK_DIMS"),
    "pai": ("PAI", "PAICFGLogitsProcessor", "text_only_inputs"),
    "paint": ("PAINT",),
    "method": ("MitigationMethod", "PromptBatch"),
    "methods": ("METHODS", "build_methods", "method_settings"),
    "models": ("LVLMCheckpoint", "tiny_lvlm", "tiny_llava"),
    "vcd": ("VCD", "VCDLogitsProcessor"),
    "agla": ("AGLA", "AGLALogitsProcessor"),
    "carve": ("CARVE",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
