"""Task pipelines and the one task registry behind :func:`attnzoo.pipeline`."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

from attnzoo.errors import UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from attnzoo.pipelines.base import Pipeline
    from attnzoo.pipelines.image_classification import ImageClassificationPipeline


@dataclass
class TaskSpec:
    """A task: its pipeline class (``"module:Class"`` or the class) and its default model."""

    name: str
    impl: Any
    default_model: str | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""
    model_builder: Any = None
    """``"module:function"`` building the model from a name when the task's models are not all
    :func:`attnzoo.create_model` names; called as ``f(name, weights=, pretrained=, **model_kwargs)``."""
    _cls: Any = field(default=None, repr=False)

    def load(self) -> type["Pipeline"]:
        if self._cls is None:
            if isinstance(self.impl, str):
                module, _, attr = self.impl.partition(":")
                self._cls = getattr(importlib.import_module(module), attr)
            else:
                self._cls = self.impl
        return self._cls


SUPPORTED_TASKS: dict[str, TaskSpec] = {}
TASK_ALIASES: dict[str, str] = {}


def register_pipeline(
    task: str, impl: Any, *, default_model: str | None = None, aliases: tuple[str, ...] = (), description: str = "",
    model_builder: Any = None,
) -> TaskSpec:
    """Add a task (third parties may too); ``impl`` is a Pipeline subclass or ``"module:Class"``."""
    spec = TaskSpec(task, impl, default_model, tuple(aliases), description, model_builder)
    SUPPORTED_TASKS[task] = spec
    for alias in aliases:
        TASK_ALIASES[alias] = task
    return spec


def get_task(task: str) -> TaskSpec:
    name = TASK_ALIASES.get(task, task)
    if name not in SUPPORTED_TASKS:
        raise UnknownNameError("task", task, list(SUPPORTED_TASKS) + list(TASK_ALIASES))
    return SUPPORTED_TASKS[name]


def list_tasks() -> list[str]:
    return sorted(SUPPORTED_TASKS)


register_pipeline(
    "image-classification",
    "attnzoo.pipelines.image_classification:ImageClassificationPipeline",
    default_model="resnet50.a1_in1k",
    aliases=("classification", "image-classifier"),
    description="top-k ImageNet (or your own) classes for images, with any timm or attnzoo classifier",
)

register_pipeline(
    "multiview-3d-reconstruction",
    "attnzoo.pipelines.multiview_reconstruction:MultiViewReconstructionPipeline",
    default_model="lrgt",
    aliases=("3d-reconstruction", "multiview-reconstruction"),
    description="a 32^3 occupancy grid (mesh, .obj/.ply/.binvox) from any number of images of one object, with LRGT",
)

register_pipeline(
    "scanpath",
    "attnzoo.pipelines.scanpath:ScanpathPipeline",
    default_model="nevaclip",
    aliases=("scanpath-prediction", "gaze"),
    description="fixations (x, y) where people will look: NevaClip (zero-shot, an image + a caption) or OAT (visual search on a shelf)",
    model_builder="attnzoo.pipelines.scanpath:build_scanpath_model",
)

register_pipeline(
    "wsi-classification",
    "attnzoo.pipelines.wsi_classification:WSIClassificationPipeline",
    default_model="acmil_ga",
    aliases=("slide-classification", "mil"),
    description="class probabilities, per-patch attention and a heatmap for a whole-slide image or its patch features (ACMIL, ABMIL)",
)


@overload
def pipeline(
    task: Literal["image-classification", "classification"], model: Any = ..., **kwargs: Any
) -> "ImageClassificationPipeline": ...
@overload
def pipeline(task: str, model: Any = ..., **kwargs: Any) -> "Pipeline": ...


def pipeline(
    task: str,
    model: "str | torch.nn.Module | None" = None,
    *,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    pretrained: bool | None = None,
    device: "str | int | torch.device | None" = None,
    dtype: "str | torch.dtype | None" = None,
    model_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> "Pipeline":
    """Build the pipeline for ``task``.

    ``model`` is a registered name (pretrained weights by default, as in transformers), or
    a model object used as is. ``weights`` overrides the checkpoint (a path, URL, registered
    name, or ``"none"`` for random initialisation). Remaining keywords go to the pipeline.
    """
    from attnzoo.factory import create_model

    spec = get_task(task)
    cls = spec.load()
    if model is None:
        model = spec.default_model
    if isinstance(model, str) and spec.model_builder is not None:
        module, _, attr = spec.model_builder.partition(":")
        builder = getattr(importlib.import_module(module), attr)
        model = builder(model, weights=weights, pretrained=pretrained, **dict(model_kwargs or {}))
    elif isinstance(model, str):
        model = create_model(model, pretrained=weights is None if pretrained is None else pretrained, weights=weights, **dict(model_kwargs or {}))
    elif weights is not None:
        from attnzoo.weights import load_weights

        load_weights(model, weights)
    return cls(model, device=device, dtype=dtype, **kwargs)


__all__ = ["SUPPORTED_TASKS", "TASK_ALIASES", "TaskSpec", "get_task", "list_tasks", "pipeline", "register_pipeline"]
