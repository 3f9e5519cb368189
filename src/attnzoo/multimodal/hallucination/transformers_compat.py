"""The KV cache's name across the transformers releases we support (``pyproject.toml``'s floor
on): before 5.24 it is ``past_key_values`` in model calls, ``generate`` and model outputs; from 5.24
on it is ``cache``, and the old name only warns. Everything here that hands a cache to a model, or
reads one back, goes through these two helpers (``.ci/lower_bounds`` runs the tests on the
floor). Beam search over prompts of several images: see :func:`beams_keep_prompt_images`."""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def cache_keyword() -> str:
    """``"cache"`` or ``"past_key_values"``: what this transformers calls the KV cache."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a model call returned (None without ``use_cache``)."""
    return getattr(output, cache_keyword(), None)


def beams_keep_prompt_images(model: Any) -> bool:
    """Whether ``generate`` gives every beam row of a prompt that prompt's images in order. From 5.18 it
    encodes the images first and repeats each prompt's group ([A, B] -> [A, B, A, B]); before, the
    generic expansion repeats ``pixel_values`` row by row ([A, A, B, B]), so a prompt of several images
    (CARVE's official [original, refined]) gets the wrong ones in its beam rows, silently. Models with
    their own expansion (Qwen2-VL) group by prompt on every release."""
    from transformers.generation.utils import GenerationMixin

    generic = GenerationMixin._expand_inputs_for_generation
    own = getattr(type(model), "_expand_inputs_for_generation", generic)
    return hasattr(GenerationMixin, "_expand_multimodal_outputs") or own is not generic


__all__ = ["beams_keep_prompt_images", "cache_keyword", "output_cache"]
