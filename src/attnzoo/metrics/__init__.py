"""Metrics, one file per family; pure functions on numpy/torch inputs."""

from attnzoo.metrics.classification import topk_accuracy, topk_accuracy_from_ranked

__all__ = ["topk_accuracy", "topk_accuracy_from_ranked"]
