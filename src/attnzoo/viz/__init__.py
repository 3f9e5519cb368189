"""Pictures: classifications (more per task: scanpaths, voxels, attention and WSI heatmaps)."""

from attnzoo.viz.classification import plot_classification

__all__ = ["plot_classification"]
