"""Pictures, one file per kind: classifications, scanpaths, voxel renderings, WSI attention heatmaps
(numpy + PIL only)."""

from attnzoo.viz.classification import plot_classification
from attnzoo.viz.scanpath import plot_scanpath, plot_scanpaths
from attnzoo.viz.voxels import plot_reconstruction, render_voxels
from attnzoo.viz.wsi import plot_attention_heatmap

__all__ = [
    "plot_attention_heatmap",
    "plot_classification",
    "plot_reconstruction",
    "plot_scanpath",
    "plot_scanpaths",
    "render_voxels",
]
