"""Evaluation runner: pipeline x dataset x metrics -> JSON + Markdown report (resumable)."""

from attnzoo.evaluation.runner import EvalSample, TaskEvaluator, evaluate

EVALUATORS = {
    "image-classification": "attnzoo.evaluation.classification:ClassificationEvaluator",
    "multiview-3d-reconstruction": "attnzoo.evaluation.reconstruction:MultiViewReconstructionEvaluator",
    "wsi-classification": "attnzoo.evaluation.wsi:WSIClassificationEvaluator",
    "scanpath": "attnzoo.evaluation.scanpath:ScanpathEvaluator",
}


def get_evaluator(task: str):
    """The evaluator class of a task (aliases resolved through the pipeline registry)."""
    import importlib

    from attnzoo.errors import UnknownNameError
    from attnzoo.pipelines import get_task

    name = get_task(task).name
    if name not in EVALUATORS:
        raise UnknownNameError("evaluation task", task, EVALUATORS)
    module, _, attr = EVALUATORS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["EVALUATORS", "EvalSample", "TaskEvaluator", "evaluate", "get_evaluator"]
