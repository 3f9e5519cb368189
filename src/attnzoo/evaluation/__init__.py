"""Evaluation runner: pipeline x dataset x metrics -> JSON + Markdown report (resumable).

Each task's evaluator lives in this package (one file per task) and is named by its
:class:`~attnzoo.tasks.TaskSpec`; ``attnzoo.tasks.get_evaluator(task)`` finds it.
"""

from attnzoo.evaluation.runner import EvalPlan, EvalSample, TaskEvaluator, evaluate, weights_identity

__all__ = ["EvalPlan", "EvalSample", "TaskEvaluator", "evaluate", "weights_identity"]
