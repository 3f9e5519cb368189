"""ImageNet-1k (ILSVRC2012) in both published layouts.

1. Synset folders: ``<root>/[<split>/]n01440764/*.JPEG`` (the torchvision/timm layout).
   A folder holding only some synsets still gets the full 1k class indices.
2. Flat validation folder: ``<root>/ILSVRC2012_val_00000001.JPEG`` ... with labels from
   Kaggle's ``LOC_val_solution.csv``, or from the devkit (``ILSVRC2012_devkit_t12/`` or its
   ``.tar.gz``: ``data/ILSVRC2012_validation_ground_truth.txt`` plus ``data/meta.mat``).
   The devkit numbers classes by ``ILSVRC2012_ID``, which is *not* the sorted-synset order
   every model uses: we map through ``meta.mat``'s WNIDs.

ImageNetV2's folders ``0/`` .. ``999/`` (named by class index) are read as a generic ImageFolder whose
numbered classes keep their numbers (:mod:`attnzoo.datasets.image_folder`). Images are decoded as
stored, without EXIF rotation, as timm/torchvision evaluate.
"""

from __future__ import annotations

import os
import re
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from attnzoo._io import STRUCTURE_ERRORS, parse_errors, read_csv_rows
from attnzoo.datasets.image_folder import (
    ClassificationSamples,
    check_root,
    is_image_file,
    list_images,
    read_image_folder,
)
from attnzoo.datasets.matfile import load_mat
from attnzoo.errors import DatasetFormatError

_SYNSET = re.compile(r"^n\d{8}$")
_VAL_FILE = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
_SOLUTION = "LOC_val_solution.csv"
_DEVKIT = "ILSVRC2012_devkit_t12"
_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
_META = "data/meta.mat"
_MAX_DEVKIT_MEMBER_BYTES = 64 << 20


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The 1000 WNIDs in model order (sorted) and their descriptions."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    wnids = tuple(info.index_to_label_name(i) for i in range(info.num_classes()))
    return wnids, tuple(info.index_to_description(i) for i in range(info.num_classes()))


_SPLIT_NAMES = ("train", "val", "validation", "test")


def split_folder(root: Path, split: str) -> Path:
    """``root/split`` when it exists, else ``root`` itself (a folder of classes) -- unless ``root``
    holds other splits: then the asked one is missing, and reading ``train/``/``test/`` as two
    classes would give a silently wrong accuracy."""
    if (root / split).is_dir():
        return root / split
    others = sorted(name for name in _SPLIT_NAMES if (root / name).is_dir())
    if others:
        raise DatasetFormatError(
            f"{root} has no {split}/ split folder (it has {', '.join(o + '/' for o in others)}); "
            f"pass --split {others[0]}, or point --data at the folder of classes"
        )
    return root


def read_imagenet(
    root: str | os.PathLike, split: str = "val", *, labels: str | os.PathLike | None = None
) -> ClassificationSamples:
    """Read ImageNet-1k ``split`` under ``root``, detecting the layout."""
    root = check_root(root)
    folder = split_folder(root, split)
    if _synset_dirs(folder):
        return _read_synset_folders(folder)
    if any(_VAL_FILE.match(p.name) for p in folder.iterdir()):
        return _read_flat_val(folder, labels)
    raise DatasetFormatError(
        f"{folder} is not an ImageNet layout: expected synset folders (n01440764/ ...) "
        f"or flat ILSVRC2012_val_*.JPEG files with {_SOLUTION} or the {_DEVKIT} devkit"
    )


def _is_imagenet_folder(folder: Path) -> bool:
    return bool(_synset_dirs(folder)) or any(_VAL_FILE.match(p.name) for p in folder.iterdir())


def _synset_dirs(folder: Path) -> list[str]:
    dirs = [d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return dirs if dirs and all(_SYNSET.match(d) for d in dirs) else []


def _read_synset_folders(folder: Path) -> ClassificationSamples:
    wnids, names = imagenet_synsets()
    index = {w: i for i, w in enumerate(wnids)}
    unknown = sorted(set(_synset_dirs(folder)) - set(index))
    if unknown:
        raise DatasetFormatError(
            f"{folder}: {len(unknown)} folders are not ImageNet-1k synsets: {', '.join(unknown[:5])}"
        )
    generic = read_image_folder(folder)
    samples = [(path, index[generic.classes[target]]) for path, target in generic.samples]
    return ClassificationSamples(samples, list(names), "imagenet-synset-folders", folder, class_ids=list(wnids))


def _read_flat_val(folder: Path, labels: str | os.PathLike | None) -> ClassificationSamples:
    wnids, names = imagenet_synsets()
    index = {w: i for i, w in enumerate(wnids)}
    source = Path(labels) if labels is not None else _find_labels(folder)
    if source is None:
        raise DatasetFormatError(
            f"{folder} holds flat ILSVRC2012_val_*.JPEG files but no labels: place {_SOLUTION} (Kaggle) or the "
            f"{_DEVKIT} devkit (folder or .tar.gz) in {folder} or its parent folders, or pass labels=PATH"
        )
    truth = _read_solution_csv(source) if source.suffix == ".csv" else _read_devkit(source)
    samples = []
    for path in list_images(folder):
        match = _VAL_FILE.match(path.name)
        if not match or not is_image_file(path):
            continue
        wnid = truth.get(path.stem) or truth.get(int(match.group(1)))
        if wnid is None:
            raise DatasetFormatError(f"{source} has no label for {path.name}")
        if wnid not in index:
            raise DatasetFormatError(f"{source}: label {wnid!r} of {path.name} is not an ImageNet-1k synset")
        samples.append((path, index[wnid]))
    if not samples:
        raise DatasetFormatError(f"{folder} has no ILSVRC2012_val_*.JPEG images")
    return ClassificationSamples(samples, list(names), "imagenet-flat-val", folder, class_ids=list(wnids))


def _find_labels(folder: Path) -> Path | None:
    for parent in [folder, *list(folder.parents)[:4]]:
        for candidate in (parent / _SOLUTION, parent / _DEVKIT, parent / f"{_DEVKIT}.tar.gz"):
            if candidate.exists():
                return candidate
    return None


def _read_solution_csv(path: Path) -> dict:
    """Kaggle's ``ImageId,PredictionString`` with the synset as the first token of each box."""
    header, rows = read_csv_rows(path, f"Kaggle {_SOLUTION}")
    if {"ImageId", "PredictionString"} - set(header):
        raise DatasetFormatError(f"{path}: expected the columns ImageId,PredictionString, found {header}")
    truth: dict = {}
    for row in rows:
        tokens = row["PredictionString"].split()
        if not tokens:
            raise DatasetFormatError(f"{path}: empty PredictionString for {row['ImageId']}")
        truth[row["ImageId"]] = tokens[0]
    return truth


def _read_devkit(path: Path) -> dict:
    """``{val number: wnid}`` from the devkit folder or its tarball."""
    if path.is_dir():
        try:
            ground_truth = (path / _GROUND_TRUTH).read_bytes()
            meta = (path / _META).read_bytes()
        except OSError as err:
            raise DatasetFormatError(f"devkit {path} is incomplete: {err}") from None
    else:
        with parse_errors(path, f"{_DEVKIT} archive (.tar.gz)", also=(tarfile.TarError,)):
            with tarfile.open(path) as tar:
                ground_truth = _tar_member(tar, _GROUND_TRUTH, path)
                meta = _tar_member(tar, _META, path)
    id_to_wnid = _parse_meta_mat(meta, path)
    with parse_errors(f"{path} ({_GROUND_TRUTH})", "UTF-8 text file of ILSVRC2012_IDs"):
        lines = ground_truth.decode("utf-8").split()
    truth = {}
    for number, line in enumerate(lines, start=1):
        try:
            truth[number] = id_to_wnid[int(line)]
        except (ValueError, KeyError):
            raise DatasetFormatError(
                f"{path}: line {number} of the ground truth ({line!r}) is not a known ILSVRC2012_ID"
            ) from None
    return truth


def _tar_member(tar: tarfile.TarFile, name: str, path: Path) -> bytes:
    member = next((m for m in tar.getmembers() if m.name.endswith(name) and m.isfile()), None)
    if member is None:
        raise DatasetFormatError(f"devkit archive {path} has no {name}")
    if member.size > _MAX_DEVKIT_MEMBER_BYTES:
        raise DatasetFormatError(f"devkit archive {path}: {name} claims {member.size:,} bytes; the real one is < 1 MB")
    return tar.extractfile(member).read()  # type: ignore[union-attr]


def _parse_meta_mat(data: bytes, path: Path) -> dict[int, str]:
    """``{ILSVRC2012_ID: wnid}`` of the 1000 leaf synsets in the devkit's ``meta.mat``."""
    name = f"{path} ({_META})"
    mat = load_mat(data, name, "MATLAB .mat file with a 'synsets' table", squeeze_me=True)
    with parse_errors(name, "MATLAB .mat file with a 'synsets' table", also=STRUCTURE_ERRORS):
        synsets = mat["synsets"]
        rows = zip(
            np.atleast_1d(synsets["ILSVRC2012_ID"]),
            np.atleast_1d(synsets["WNID"]),
            np.atleast_1d(synsets["num_children"]),
        )
        return {int(i): str(w) for i, w, c in rows if int(c) == 0}


def read_classification_folder(
    root: str | os.PathLike, split: str = "val", *, labels: str | os.PathLike | None = None
) -> ClassificationSamples:
    """ImageNet when the folder has an ImageNet layout, else a generic ImageFolder: an ImageNetV2 folder
    (``0/`` .. ``999/``) gets class index = folder number, not the text order that puts ``10`` before ``2``."""
    root = check_root(root)
    folder = split_folder(root, split)
    if _is_imagenet_folder(folder):
        return read_imagenet(root, split, labels=labels)
    return read_image_folder(folder)
