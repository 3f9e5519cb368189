"""attnzoo: vision and multimodal attention models behind one API.

``import attnzoo`` is cheap: torch, timm and the model files load on first use of
:func:`create_model`, :func:`list_models`, :func:`list_tasks` or :func:`pipeline`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "list_tasks", "pipeline", "errors"]

_LAZY = {
    "create_model": ("attnzoo.factory", "create_model"),
    "list_models": ("attnzoo.factory", "list_models"),
    "list_tasks": ("attnzoo.tasks", "list_tasks"),
    "pipeline": ("attnzoo.tasks", "pipeline"),
}

if TYPE_CHECKING:  # pragma: no cover
    from attnzoo.factory import create_model, list_models
    from attnzoo.tasks import list_tasks, pipeline


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


def _register_with_timm() -> None:
    """``timm.create_model("biformer_tiny")`` must work after ``import attnzoo`` without making
    ``import attnzoo`` import torch: register our models now if timm is already loaded, else
    right after timm's own import finishes."""
    import importlib
    import importlib.abc
    import importlib.util
    import sys

    if "timm" in sys.modules:
        importlib.import_module("attnzoo.vision")
        return

    class _AfterTimm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # noqa: ANN001
            if name != "timm":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec("timm")
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_timm = spec.loader.exec_module

            def exec_module(module):  # noqa: ANN001
                exec_timm(module)
                importlib.import_module("attnzoo.vision")

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    if not any(type(f).__name__ == "_AfterTimm" for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimm())


_register_with_timm()
