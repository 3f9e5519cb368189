"""A tiny ShapeNet-layout dataset of primitive shapes, rendered by the tests themselves."""

import json

import numpy as np
from PIL import Image

from attnzoo.datasets.binvox import write_binvox
from attnzoo.viz.voxels import render_voxels


def primitive(kind: str, size: int = 32) -> np.ndarray:
    """A boolean [x, y, z] grid (y up): a box, a ball, a column or a table."""
    x, y, z = np.mgrid[:size, :size, :size]
    c = size / 2
    if kind == "box":
        return (abs(x - c) < 9) & (abs(y - c) < 6) & (abs(z - c) < 9)
    if kind == "ball":
        return (x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 < 10**2
    if kind == "column":
        return ((x - c) ** 2 + (z - c) ** 2 < 5**2) & (abs(y - c) < 14)
    if kind == "table":
        top = (abs(x - c) < 12) & (abs(z - c) < 12) & (abs(y - 22) < 2)
        legs = ((abs(abs(x - c) - 9) < 2) & (abs(abs(z - c) - 9) < 2)) & (y < 21) & (y > 4)
        return top | legs
    raise ValueError(kind)


def renderings(grid: np.ndarray, n: int = 24, size: int = 137) -> list[Image.Image]:
    """RGBA views (transparent background, as ShapeNetRendering) from n azimuths (quarter turns)."""
    turns = []
    for k in range(min(n, 4)):
        rgb = np.asarray(render_voxels(np.rot90(grid, k=k, axes=(0, 2)), size=size), dtype=np.uint8)
        alpha = np.where((rgb == 255).all(-1), 0, 255).astype(np.uint8)
        turns.append(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    return [turns[i % 4].copy() for i in range(n)]


def write_shapenet(root, kinds=("box", "ball", "column", "table"), per_kind=(2, 1, 1), n_views=24):
    """``root/ShapeNetRendering``, ``root/ShapeNetVox32`` and ``root/ShapeNet.json``: one taxonomy per
    kind, ``per_kind`` = (train, val, test) models each (the same shape, so a model can learn it)."""
    entries = []
    for t, kind in enumerate(kinds):
        tid = f"0{t + 1}000000"
        grid = primitive(kind)
        views = renderings(grid, n_views)
        splits = {}
        for split, count in zip(("train", "val", "test"), per_kind, strict=True):
            splits[split] = [f"{kind}_{split}_{i}" for i in range(count)]
            for model_id in splits[split]:
                folder = root / "ShapeNetRendering" / tid / model_id / "rendering"
                folder.mkdir(parents=True)
                for v, view in enumerate(views):
                    view.save(folder / f"{v:02d}.png")
                write_binvox(root / "ShapeNetVox32" / tid / model_id / "model.binvox", grid)
        entries.append({"taxonomy_id": tid, "taxonomy_name": kind, "baseline": {}, **splits})
    (root / "ShapeNet.json").write_text(json.dumps(entries))
    return root
