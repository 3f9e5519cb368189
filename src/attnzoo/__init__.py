"""attnzoo: vision and multimodal attention models behind one API.

``import attnzoo`` is cheap: torch, timm and the model files load on first use of
:func:`create_model`, :func:`list_models` or :func:`pipeline`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "pipeline", "errors"]

_LAZY = {
    "create_model": ("attnzoo.factory", "create_model"),
    "list_models": ("attnzoo.factory", "list_models"),
    "pipeline": ("attnzoo.pipelines", "pipeline"),
}

if TYPE_CHECKING:  # pragma: no cover
    from attnzoo.factory import create_model, list_models
    from attnzoo.pipelines import pipeline


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    if name == "errors":
        import importlib

        return importlib.import_module("attnzoo.errors")
    raise AttributeError(f"module 'attnzoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
