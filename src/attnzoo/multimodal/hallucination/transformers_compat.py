"""The KV cache's name across the transformers releases we support (``pyproject.toml``'s floor
on): before 5.24 it is ``past_key_values`` in model calls, ``generate`` and model outputs; from 5.24
on it is ``cache``, and the old name only warns. Everything here that hands a cache to a model, or
reads one back, goes through these two helpers (``.ci/lower_bounds`` runs the tests on the
floor)."""

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


__all__ = ["cache_keyword", "output_cache"]
