"""Task pipelines, after transformers' contract (``preprocess -> _forward -> postprocess``).

One file per task; :mod:`attnzoo.pipelines.base` holds the contract. Build them with
:func:`attnzoo.pipeline` (which looks the task up in :mod:`attnzoo.tasks`), or directly from a
model object: ``ImageClassificationPipeline(model)``.
"""

from attnzoo.pipelines.base import Pipeline, list_collate, resolve_device, resolve_dtype

__all__ = ["Pipeline", "list_collate", "resolve_device", "resolve_dtype"]
