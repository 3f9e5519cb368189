"""Metrics, one file per family; pure functions on numpy/torch inputs."""

from attnzoo.metrics.classification import topk_accuracy, topk_accuracy_from_ranked
from attnzoo.metrics.mil import mil_metrics
from attnzoo.metrics.reconstruction import fscore, summarize_iou, voxel_iou, voxels_to_mesh

__all__ = ["fscore", "mil_metrics", "summarize_iou", "topk_accuracy", "topk_accuracy_from_ranked", "voxel_iou", "voxels_to_mesh"]
