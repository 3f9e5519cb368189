"""``pipeline("multiview-3d-reconstruction")``: a few images of one object in, a 32^3 occupancy grid out.

>>> recon = attnzoo.pipeline("multiview-3d-reconstruction", model="lrgt", weights="lrgt_shapenet.pth")  # doctest: +SKIP
>>> shape = recon(["view0.png", "view1.png", "view2.png"])                                           # doctest: +SKIP
>>> shape.save("chair.obj"); shape.plot().save("chair.png")                                          # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnzoo.datasets.images import load_image
from attnzoo.errors import InvalidInputError
from attnzoo.pipelines.base import Pipeline

__all__ = ["MultiViewReconstructionPipeline", "Occupancy"]


@dataclass
class Occupancy:
    """A reconstructed object: occupancy probabilities on a voxel grid (axis 1 up, ShapeNet's order)."""

    probabilities: np.ndarray  # float32 [X, Y, Z] in [0, 1]
    threshold: float = 0.3
    views: list[Image.Image] = field(default_factory=list, repr=False)

    @property
    def voxels(self) -> np.ndarray:
        return self.probabilities >= self.threshold

    def to_mesh(self) -> tuple[np.ndarray, np.ndarray]:
        """``(vertices [V, 3] in [0, 1], faces [F, 3])`` of the surface of :attr:`voxels` (marching cubes)."""
        from attnzoo.metrics.reconstruction import voxels_to_mesh

        return voxels_to_mesh(self.voxels)

    def save(self, path: str | os.PathLike) -> Path:
        """``.obj`` / ``.ply`` (surface mesh), ``.binvox`` (voxels) or ``.npy`` (probabilities), written atomically."""
        from attnzoo._io import atomic_write

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".binvox":
            from attnzoo.datasets.binvox import write_binvox

            write_binvox(path, self.voxels)
        elif suffix == ".npy":
            with atomic_write(path) as fh:
                np.save(fh, self.probabilities)
        elif suffix in (".obj", ".ply"):
            vertices, faces = self.to_mesh()
            text = _obj(vertices, faces) if suffix == ".obj" else _ply(vertices, faces)
            with atomic_write(path, "w") as fh:
                fh.write(text)
        else:
            raise InvalidInputError(f"cannot save a reconstruction as {suffix or 'a file without suffix'} (use .obj, .ply, .binvox or .npy)")
        return path

    def plot(self, title: str = "") -> Image.Image:
        """The input views beside an isometric render of the voxels."""
        from attnzoo.viz.voxels import plot_reconstruction

        return plot_reconstruction(self.views, self.voxels, title=title)


def _obj(vertices: np.ndarray, faces: np.ndarray) -> str:
    lines = ["# attnzoo reconstruction"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    return "\n".join(lines) + "\n"


def _ply(vertices: np.ndarray, faces: np.ndarray) -> str:
    header = ["ply", "format ascii 1.0", f"element vertex {len(vertices)}", "property float x", "property float y", "property float z",
              f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    body = [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices] + [f"3 {a} {b} {c}" for a, b, c in faces]
    return "\n".join(header + body) + "\n"


class MultiViewReconstructionPipeline(Pipeline):
    """One input is a list of images of one object (paths, PIL images or arrays; any number of
    views); a list of such lists is a batch. Preprocessing is the official one (centre crop
    128/137, 224 px, background 240, BGR unless ``colour_order="rgb"``)."""

    task = "multiview-3d-reconstruction"
    default_model = "lrgt"

    def _sanitize_parameters(self, threshold: float | None = None, colour_order: str | None = None, background: int | None = None,
                             **kwargs: Any) -> tuple[dict, dict, dict]:
        if kwargs:
            raise InvalidInputError(f"{type(self).__name__} got unexpected arguments: {sorted(kwargs)}")
        pre, post = {}, {}
        if colour_order is not None:
            if colour_order not in ("bgr", "rgb"):
                raise InvalidInputError(f"colour_order must be 'bgr' or 'rgb', got {colour_order!r}")
            pre["colour_order"] = colour_order
        if background is not None:
            pre["background"] = background
        if threshold is not None:
            if not 0.0 < threshold < 1.0:
                raise InvalidInputError(f"threshold must be in (0, 1), got {threshold}")
            post["threshold"] = threshold
        return pre, {}, post

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        single = _is_one_object(inputs)
        results = [r for _, r in self.iterate([inputs] if single else list(inputs), **kwargs)]
        return results[0] if single else results

    def preprocess(self, views: Sequence[Any], colour_order: str = "bgr", background: int = 240) -> dict[str, Any]:
        from attnzoo.vision.lrgt import preprocess_views

        if isinstance(views, (str, bytes, os.PathLike)) or not isinstance(views, Sequence) or len(views) == 0:
            raise InvalidInputError("a reconstruction needs a non-empty list of views of one object")
        images = [load_image(v, keep_alpha=True) for v in views]
        return {"views": preprocess_views(images, colour_order=colour_order, background=background), "thumbnails": images}

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        counts = {s["views"].shape[0] for s in samples}
        if len(counts) > 1:
            raise InvalidInputError(f"objects in one batch must have the same number of views, got {sorted(counts)}; use batch_size=1")
        return {"views": torch.stack([s["views"] for s in samples]), "thumbnails": [s["thumbnails"] for s in samples]}

    def _forward(self, batch: dict[str, Any], **params: Any) -> dict[str, Any]:
        return {"probabilities": self.model(batch["views"]).float(), "thumbnails": batch["thumbnails"]}

    def postprocess(self, outputs: dict[str, Any], threshold: float = 0.3) -> Occupancy:
        return Occupancy(outputs["probabilities"].numpy(), threshold, [im.copy() for im in outputs["thumbnails"]])


def _is_one_object(inputs: Any) -> bool:
    """A list of images is one object; a list of lists is a batch; a 4-D array is one object's views."""
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return inputs.ndim <= 4
    if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        return not inputs or not (isinstance(inputs[0], Sequence) and not isinstance(inputs[0], (str, bytes)))
    return True
