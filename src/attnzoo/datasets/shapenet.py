"""ShapeNet, the 3D-R2N2 subset (13 classes, 24 renderings and a 32^3 voxel grid per model), as
the 3D-R2N2 / Pix2Vox / UMIFormer / LRGT loaders read it.

On disk (the two archives ``ShapeNetRendering.tgz`` and ``ShapeNetVox32.tgz``)::

    ShapeNetRendering/<taxonomy_id>/<model_id>/rendering/00.png ... 23.png   137x137 RGBA
                                              /rendering/renderings.txt, rendering_metadata.txt
    ShapeNetVox32/<taxonomy_id>/<model_id>/model.binvox                         32^3 binvox

and a split file (``ShapeNet.json`` in the official repositories): a JSON list of one dict per
class with ``taxonomy_id``, ``taxonomy_name``, ``baseline`` (3D-R2N2's per-view IoUs),
``train``, ``val`` and ``test`` (lists of model ids).

As in the official loader, models whose ``model.binvox`` is missing are skipped; unlike it, they
are listed in :attr:`ShapeNetDataset.missing` and reported with a warning. Test and validation
use the *first* ``n_views`` renderings (00, 01, ...); training draws ``n_views`` distinct
renderings at random, here reproducibly from ``(seed, epoch, index)``. Voxels are read with
binvox ``fix_coords`` (axes x, y, z; y is up) and returned as float32, as the official code does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from attnzoo._io import read_json
from attnzoo.datasets.binvox import read_binvox
from attnzoo.datasets.image_folder import check_root
from attnzoo.datasets.images import opened_image
from attnzoo.errors import DatasetFormatError, InvalidInputError

__all__ = [
    "SPLITS",
    "N_RENDERINGS",
    "ShapeNetTaxonomy",
    "ShapeNetModel",
    "ShapeNetDataset",
    "read_shapenet_split",
    "read_rendering",
    "find_split_file",
]

SPLITS = ("train", "val", "test")
#: Renderings per model in ShapeNetRendering (``rendering/00.png`` ... ``23.png``).
N_RENDERINGS = 24
VIEW_SELECTIONS = ("first", "random")


@dataclass
class ShapeNetTaxonomy:
    """One class entry of the split file."""

    taxonomy_id: str
    taxonomy_name: str
    train: list[str]
    val: list[str]
    test: list[str]
    baseline: dict[str, Any] = field(default_factory=dict)

    def models(self, split: str) -> list[str]:
        return list(getattr(self, _check_split(split)))


@dataclass
class ShapeNetModel:
    """One model of a split: where its renderings and its voxel grid are."""

    taxonomy_id: str
    taxonomy_name: str
    model_id: str
    rendering_dir: Path
    voxel_path: Path

    def rendering_path(self, view: int) -> Path:
        return self.rendering_dir / f"{view:02d}.png"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise InvalidInputError(f"unknown ShapeNet split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def read_shapenet_split(split_file: str | os.PathLike) -> list[ShapeNetTaxonomy]:
    """The classes of a ``ShapeNet.json`` split file, in file order."""
    path = Path(split_file).expanduser()
    if not path.exists():
        raise DatasetFormatError(
            f"{path}: no such split file (the official one is datasets/ShapeNet.json in the LRGT/Pix2Vox repositories)"
        )
    entries = read_json(path, "ShapeNet split file (a JSON list of taxonomies)")
    if not isinstance(entries, list) or not entries:
        raise DatasetFormatError(
            f"{path}: expected a non-empty JSON list of taxonomy entries, found {type(entries).__name__}"
        )
    taxonomies: list[ShapeNetTaxonomy] = []
    seen: set[str] = set()
    for number, entry in enumerate(entries):
        where = f"{path}: entry {number}"
        if not isinstance(entry, dict):
            raise DatasetFormatError(
                f"{where} is a {type(entry).__name__}, expected an object with taxonomy_id, taxonomy_name, train, val, test"
            )
        missing = [k for k in ("taxonomy_id", "taxonomy_name", *SPLITS) if k not in entry]
        if missing:
            raise DatasetFormatError(f"{where} lacks {', '.join(missing)}")
        tid, name = entry["taxonomy_id"], entry["taxonomy_name"]
        if not isinstance(tid, str) or not tid or not isinstance(name, str):
            raise DatasetFormatError(f"{where}: taxonomy_id and taxonomy_name must be strings, got {tid!r}, {name!r}")
        if tid in seen:
            raise DatasetFormatError(f"{where}: taxonomy_id {tid!r} appears twice")
        seen.add(tid)
        lists = {}
        for split in SPLITS:
            models = entry[split]
            if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
                raise DatasetFormatError(f"{where} ({tid}): {split!r} must be a list of model id strings")
            lists[split] = list(models)
        baseline = entry.get("baseline", {})
        taxonomies.append(
            ShapeNetTaxonomy(tid, name, baseline=dict(baseline) if isinstance(baseline, dict) else {}, **lists)
        )
    return taxonomies


def find_split_file(root: Path) -> Path:
    """The split file of a ShapeNet folder: ShapeNet.json, or datasets/ShapeNet.json as in the official repositories."""
    for candidate in (root / "ShapeNet.json", root / "datasets" / "ShapeNet.json"):
        if candidate.is_file():
            return candidate
    raise DatasetFormatError(
        f"{root}: no ShapeNet.json split file (expected {root}/ShapeNet.json or {root}/datasets/ShapeNet.json)"
    )


def read_rendering(path: str | os.PathLike) -> np.ndarray:
    """A rendering as an ``H x W x 4`` uint8 RGBA array (images without alpha get an opaque one).

    The official loader reads the same pixels with ``cv2.imread(IMREAD_UNCHANGED)``, i.e. in
    BGRA order; channel order is the transform's business (LRGT's models expect BGR).
    """
    missing = f"missing rendering (every model needs rendering/00.png ... {N_RENDERINGS - 1:02d}.png)"
    with opened_image(path, error=DatasetFormatError, what="rendering", missing=missing) as image:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        return np.array(rgba, dtype=np.uint8)


class ShapeNetDataset(torch.utils.data.Dataset):
    """ShapeNet (3D-R2N2 subset) renderings and voxel grids for one split.

    ``rendering_root`` is the ``ShapeNetRendering`` folder, ``voxel_root`` the ``ShapeNetVox32``
    folder, ``split_file`` the ``ShapeNet.json``. Each item is a dict:

    * ``views``: ``n_views`` renderings, each ``137 x 137 x 4`` uint8 RGBA, in the order of
      ``view_indices`` (or ``transform(views)`` when a transform is given, e.g. LRGT's
      preprocessing);
    * ``voxels``: float32 ``[32, 32, 32]`` occupancy indexed ``[x, y, z]`` (binvox ``fix_coords``);
    * ``taxonomy_id``, ``taxonomy_name``, ``model_id``, ``view_indices`` (list of ints).

    ``view_selection`` is ``"first"`` (renderings ``0 .. n_views-1``, the official test protocol)
    or ``"random"`` (``n_views`` distinct renderings drawn from ``(seed, epoch, index)``, the
    official training protocol; order as drawn); by default ``"random"`` for ``split="train"``
    and ``"first"`` otherwise. Call :meth:`set_epoch` each epoch to draw new views.
    ``taxonomies`` keeps only some classes (ids or names). Models without ``model.binvox`` are
    skipped and listed in :attr:`missing`; a missing or corrupt rendering raises
    :class:`DatasetFormatError` naming the file when the item is read.
    """

    def __init__(
        self,
        rendering_root: str | os.PathLike,
        voxel_root: str | os.PathLike,
        split_file: str | os.PathLike,
        split: str = "test",
        n_views: int = 3,
        view_selection: str | None = None,
        taxonomies: str | Iterable[str] | None = None,
        transform: Callable[[list[np.ndarray]], Any] | None = None,
        seed: int = 0,
    ):
        self.split = _check_split(split)
        if view_selection is None:
            view_selection = "random" if split == "train" else "first"
        if view_selection not in VIEW_SELECTIONS:
            raise InvalidInputError(
                f"view_selection must be one of {', '.join(VIEW_SELECTIONS)}, got {view_selection!r}"
            )
        self.view_selection = view_selection
        self.n_views = _check_n_views(n_views)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.rendering_root = check_root(rendering_root)
        self.voxel_root = check_root(voxel_root)
        self.split_file = Path(split_file)
        self.taxonomies = _select_taxonomies(read_shapenet_split(split_file), taxonomies, self.split_file)
        self.samples: list[ShapeNetModel] = []
        self.missing: list[ShapeNetModel] = []
        for taxonomy in self.taxonomies:
            for model_id in taxonomy.models(self.split):
                model = ShapeNetModel(
                    taxonomy.taxonomy_id,
                    taxonomy.taxonomy_name,
                    model_id,
                    self.rendering_root / taxonomy.taxonomy_id / model_id / "rendering",
                    self.voxel_root / taxonomy.taxonomy_id / model_id / "model.binvox",
                )
                (self.samples if model.voxel_path.is_file() else self.missing).append(model)
        total = len(self.samples) + len(self.missing)
        if not self.samples:
            raise DatasetFormatError(
                f"none of the {total} {self.split} models of {self.split_file} has a voxel file under {self.voxel_root} "
                f"(expected {self.voxel_root}/<taxonomy_id>/<model_id>/model.binvox)"
            )
        if self.missing:
            warnings.warn(
                f"ShapeNet {self.split}: skipped {len(self.missing)} of {total} models whose voxel file is missing, "
                f"as the official loader does (first: {self.missing[0].voxel_path}); they are listed in .missing",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Draw different random views in each epoch (no effect with ``view_selection="first"``)."""
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise InvalidInputError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def set_n_views(self, n_views: int) -> None:
        """Change the number of views per item (e.g. to test one model with 1 ... 20 views)."""
        self.n_views = _check_n_views(n_views)

    def view_indices(self, index: int) -> list[int]:
        """The rendering numbers item ``index`` uses in the current epoch."""
        index = self._check_index(index)
        if self.view_selection == "first":
            return list(range(self.n_views))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        return [int(i) for i in rng.choice(N_RENDERINGS, size=self.n_views, replace=False)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        model = self.samples[index]
        chosen = self.view_indices(index)
        views = [read_rendering(model.rendering_path(i)) for i in chosen]
        grid = read_binvox(model.voxel_path).voxels
        return {
            "views": self.transform(views) if self.transform is not None else views,
            "voxels": grid.astype(np.float32),
            "taxonomy_id": model.taxonomy_id,
            "taxonomy_name": model.taxonomy_name,
            "model_id": model.model_id,
            "view_indices": chosen,
        }

    def _check_index(self, index: int) -> int:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} models")
        return index % n

    def __repr__(self) -> str:
        return (
            f"ShapeNetDataset(split={self.split!r}, models={len(self.samples)}, missing={len(self.missing)}, "
            f"classes={len(self.taxonomies)}, n_views={self.n_views}, view_selection={self.view_selection!r})"
        )


def _check_n_views(n_views: int) -> int:
    if isinstance(n_views, bool) or not isinstance(n_views, (int, np.integer)) or not 1 <= n_views <= N_RENDERINGS:
        raise InvalidInputError(
            f"n_views must be an integer from 1 to {N_RENDERINGS} (ShapeNet has {N_RENDERINGS} renderings per model), got {n_views!r}"
        )
    return int(n_views)


def _select_taxonomies(all_taxonomies: list[ShapeNetTaxonomy], wanted, split_file: Path) -> list[ShapeNetTaxonomy]:
    if wanted is None:
        return all_taxonomies
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    if not wanted:
        raise InvalidInputError("taxonomies is empty; pass None for all classes")
    known = {t.taxonomy_id: t for t in all_taxonomies} | {t.taxonomy_name: t for t in all_taxonomies}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        names = ", ".join(f"{t.taxonomy_id} ({t.taxonomy_name})" for t in all_taxonomies)
        raise InvalidInputError(f"{split_file} has no taxonomy {', '.join(map(repr, unknown))}; known: {names}")
    chosen = {known[w].taxonomy_id for w in wanted}
    return [t for t in all_taxonomies if t.taxonomy_id in chosen]  # file order, as the official loader
