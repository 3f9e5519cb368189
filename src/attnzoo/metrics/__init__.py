"""Metrics, one file per family; pure functions on numpy/torch inputs."""

from attnzoo.metrics.classification import topk_accuracy, topk_accuracy_from_ranked
from attnzoo.metrics.mil import mil_metrics
from attnzoo.metrics.reconstruction import fscore, summarize_iou, voxel_iou, voxels_to_mesh
from attnzoo.metrics.scanpath import (
    behavioural_delta,
    edit_distance,
    multimatch,
    nss,
    sbtde_similarity,
    scanmatch,
    scanpath_plausibility,
    search_statistics,
    sequence_score,
)

__all__ = [
    "behavioural_delta",
    "edit_distance",
    "fscore",
    "mil_metrics",
    "multimatch",
    "nss",
    "sbtde_similarity",
    "scanmatch",
    "scanpath_plausibility",
    "search_statistics",
    "sequence_score",
    "summarize_iou",
    "topk_accuracy",
    "topk_accuracy_from_ranked",
    "voxel_iou",
    "voxels_to_mesh",
]
