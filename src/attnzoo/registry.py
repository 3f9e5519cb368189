"""The registry of attnzoo's own (non-timm) model builders: a leaf module.

Model files import :func:`register_model` from here, and the factory reads the entries, so
models and the factory never import each other. An entry says which family a model belongs to
and which tasks it serves: the task layer picks a pipeline from that, never from the name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ModelEntry:
    """One registered builder; ``family`` defaults to the defining module's name (``lrgt``, ``oat``)."""

    name: str
    fn: Callable[..., Any]
    family: str
    tasks: tuple[str, ...] = ()
    own_weights: bool = False
    """The builder takes ``pretrained=`` and ``weights=`` itself (e.g. NevaClip's open_clip tags)
    instead of having a state dict loaded into the model it returns."""
    hub_ids: tuple[str, ...] = ()
    """Hugging Face Hub ids that also name this model (``black-forest-labs/FLUX.1-Fill-dev``): given as
    the model name, the builder loads that id as its weights."""


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    fn: _F | None = None,
    *,
    name: str | None = None,
    family: str | None = None,
    tasks: tuple[str, ...] | str = (),
    own_weights: bool = False,
    hub_ids: tuple[str, ...] = (),
) -> Any:
    """Register a builder of a non-timm model under ``name`` (default: the function's name)."""

    def wrap(f: _F) -> _F:
        served = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        key = name or f.__name__
        _MODELS[key] = ModelEntry(
            key, f, family or f.__module__.rsplit(".", 1)[-1], served, own_weights, tuple(hub_ids)
        )
        return f

    return wrap(fn) if fn is not None else wrap


def unregister_model(name: str) -> None:
    _MODELS.pop(name, None)


def get_model_entry(name: str) -> ModelEntry | None:
    """The entry of ``name`` (a ``.tag`` suffix is ignored, a Hub id finds the model it names), or None
    for timm's models."""
    if "/" in name:
        return next((e for e in _MODELS.values() if name in e.hub_ids), None)
    return _MODELS.get(name.partition(".")[0])


def registered_models(pattern: str | None = None) -> list[str]:
    return sorted(n for n in _MODELS if not pattern or fnmatch.fnmatch(n, pattern))


__all__ = ["ModelEntry", "get_model_entry", "register_model", "registered_models", "unregister_model"]
