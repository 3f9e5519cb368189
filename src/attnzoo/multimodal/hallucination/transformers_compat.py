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
    """Whether ``generate`` gives every beam row of a prompt that prompt's images in order. From 5.19 it
    repeats each prompt's group of encoded images ([A, B] -> [A, B, A, B]); before, the rows get them
    interleaved ([A, A, B, B]: 5.18's grouped expansion still interleaves within a group, and older
    releases repeat ``pixel_values`` row by row), so a prompt of several images (CARVE's official
    [original, refined]) gets the wrong ones in its beam rows, silently. A model with its own expansion
    (Qwen2-VL before 5.18) repeats each prompt's images as a group."""
    import transformers
    from packaging.version import Version
    from transformers.generation.utils import GenerationMixin

    generic = GenerationMixin._expand_inputs_for_generation
    own = getattr(type(model), "_expand_inputs_for_generation", generic)
    return own is not generic or Version(transformers.__version__).release >= (5, 19)


__all__ = ["beams_keep_prompt_images", "cache_keyword", "output_cache"]
