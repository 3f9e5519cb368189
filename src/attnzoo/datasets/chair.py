"""CHAIR's data: COCO 2014 instance and caption annotations, the val2014 images, and which images
are captioned.

Layout read from ``--data`` (COCO's release)::

    root/
      annotations/instances_val2014.json   (required; instances_train2014.json merged when present)
      annotations/captions_val2014.json    (required; captions_train2014.json merged when present)
      val2014/COCO_val2014_000000000042.jpg ...
      train2014/COCO_train2014_000000000009.jpg ...   (only for lists naming train images)

The de-facto scorer merges the train and val files; train2014 and val2014 images are disjoint, so
for val2014 images only the val files matter (the train files are read when present, for lists
naming train images). PAI reads the 2017 files instead (``split="val2017"``: ``instances_val2017.json``,
``val2017/000000000042.jpg``): the same images under the same ids.

An image's file is the one its annotations name (``file_name``), in the folder of the split whose
annotations list it (``val2014/``, or ``train2014/`` for an image of the merged train files), so a list
written for val2014 (``COCO_val2014_….jpg``, or bare ids) reads the same images from the 2017 release.
The list's own file name is looked for too (in the same folders) when it differs. An image found in
none of these is refused, naming the file names looked for and where each came from.

Which images: either a list file or the seeded sample.

* The **100-image list** layout (AGLA's ``data/CHAIR/chair.jsonl``, from yuezih/less-is-more), one
  JSON object per line: ``{"question_id": 0, "image": "COCO_val2014_000000002239.jpg", "text":
  "Please describe this image in detail.", "category": "detail"}``; the ``text`` is the prompt. A
  caption log with ``{"image_id": 226988, "caption": ...}`` lines (OPERA's logged 500 samples) is a
  list too.
* The **500-image protocol** (OPERA, PAI, PAINT): :func:`sample_chair_images` shuffles the val2014
  images with ``random.Random(seed)`` and keeps the first 500. The official scripts shuffle
  ``os.listdir(val2014)``, whose order depends on the file system, so their sample cannot be
  redrawn elsewhere; we shuffle the file names in sorted order, and record the list with the run.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnzoo._io import read_json
from attnzoo.datasets.pope import read_json_records
from attnzoo.errors import DatasetFormatError, InvalidOptionError

__all__ = [
    "CHAIR_PROMPT",
    "ChairDataset",
    "ChairImage",
    "CocoAnnotations",
    "coco_image_id",
    "read_chair_list",
    "read_coco_annotations",
    "sample_chair_images",
]

#: OPERA's CHAIR prompt (PAI and PAINT ask "Please help me describe the image in detail.").
CHAIR_PROMPT = "Please describe this image in detail."


def coco_image_id(file_name: str) -> int:
    """COCO's id from a file name: ``COCO_val2014_000000002239.jpg`` -> 2239."""
    match = re.search(r"(\d+)\.\w+$", file_name)
    if match is None:
        raise DatasetFormatError(f"{file_name!r} is not a COCO image file name (…_<id>.jpg)")
    return int(match.group(1))


@dataclass
class CocoAnnotations:
    """Per image id: its file name, instance category names (one per box) and human captions;
    ``split_ids`` are the images of the split asked for (not of the merged train files)."""

    files: dict[int, str]
    instances: dict[int, list[str]]
    captions: dict[int, list[str]]
    sources: list[Path]
    split_ids: set[int]


def _coco_file(folder: Path, kind: str, split: str, required: bool) -> Path | None:
    for candidate in (folder / "annotations" / f"{kind}_{split}.json", folder / f"{kind}_{split}.json"):
        if candidate.is_file():
            return candidate
    if required:
        raise DatasetFormatError(
            f"COCO annotation file {kind}_{split}.json not found in {folder}/annotations or {folder}"
        )
    return None


def read_coco_annotations(root: str | os.PathLike, split: str = "val2014") -> CocoAnnotations:
    """COCO instances + captions of ``split`` (required) and of the matching train split (optional)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"COCO folder {root} does not exist")
    train = split.replace("val", "train")
    out = CocoAnnotations({}, {}, {}, [], set())
    for part, required in ((split, True), (train, False)):
        instances_path = _coco_file(root, "instances", part, required)
        captions_path = _coco_file(root, "captions", part, required)
        if instances_path is None or captions_path is None:
            continue
        instances = read_json(instances_path, "COCO instances (images, annotations, categories)")
        captions = read_json(captions_path, "COCO captions (images, annotations)")
        try:
            names = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
            for image in (*instances["images"], *captions["images"]):
                out.files[int(image["id"])] = str(image["file_name"])
                out.instances.setdefault(int(image["id"]), [])
                out.captions.setdefault(int(image["id"]), [])
                if part == split:
                    out.split_ids.add(int(image["id"]))
            for ann in instances["annotations"]:
                out.instances.setdefault(int(ann["image_id"]), []).append(names[int(ann["category_id"])])
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetFormatError(f"{instances_path}: malformed COCO instances ({err!r})") from None
        try:
            for ann in captions["annotations"]:
                out.captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetFormatError(f"{captions_path}: malformed COCO captions ({err!r})") from None
        out.sources += [instances_path, captions_path]
    return out


@dataclass(frozen=True)
class ChairImage:
    image_id: int
    file_name: str
    prompt: str | None = None
    """The list's own prompt (AGLA's ``text``); None: the run's."""
    name_built: bool = False
    """``file_name`` was built from an ``image_id`` line (val2014's naming), not given by the list."""


def read_chair_list(path: str | os.PathLike) -> list[ChairImage]:
    """An image list: AGLA's chair.jsonl (``image`` [+ ``text``]) or a caption log (``image_id``)."""
    path = Path(path)
    images, seen = [], set()
    for number, record in read_json_records(path, "CHAIR image list (JSON lines with image or image_id)"):
        if isinstance(record.get("image"), str):
            name, built = record["image"], False
            image_id = coco_image_id(name)
        elif isinstance(record.get("image_id"), int) and not isinstance(record["image_id"], bool):
            image_id, name, built = record["image_id"], f"COCO_val2014_{record['image_id']:012d}.jpg", True
        else:
            raise DatasetFormatError(f"{path}, line {number}: needs 'image' (a file name) or 'image_id' (an integer)")
        if image_id in seen:
            raise DatasetFormatError(f"{path}, line {number}: image {image_id} listed twice")
        seen.add(image_id)
        text = record.get("text")
        images.append(ChairImage(image_id, name, text if isinstance(text, str) else None, built))
    return images


def sample_chair_images(files: dict[int, str], count: int = 500, seed: int = 0) -> list[ChairImage]:
    """``count`` images drawn by ``random.Random(seed)`` from the file names in sorted order."""
    if count < 1:
        raise InvalidOptionError(f"CHAIR needs at least 1 image, got {count}")
    if count > len(files):
        raise DatasetFormatError(f"CHAIR asks for {count} images but the annotations have {len(files)}")
    ordered = sorted((name, image_id) for image_id, name in files.items())
    random.Random(seed).shuffle(ordered)
    return [ChairImage(image_id, name) for name, image_id in ordered[:count]]


def _image_folder(root: Path, split: str) -> Path | None:
    return next((p for p in (root / split, root / "images" / split, root / "coco" / split) if p.is_dir()), None)


@dataclass
class ChairDataset:
    """The captioned images (their files checked to exist) and the COCO annotations that score them."""

    annotations: CocoAnnotations
    image_folder: Path
    """The split's image folder (``root/val2014``)."""
    images: list[ChairImage]
    list_file: Path | None
    paths: dict[int, Path] = field(default_factory=dict)
    """Each chosen image's file, by id (see :meth:`image_path`)."""

    def image_path(self, image: ChairImage) -> Path:
        """The file of ``image``: the one found by :meth:`from_root` (the annotations' file name, in its
        split's folder), else the list's file name in the split's folder."""
        return self.paths.get(image.image_id, self.image_folder / image.file_name)

    @classmethod
    def from_root(
        cls,
        root: str | os.PathLike,
        *,
        list_file: str | os.PathLike | None = None,
        count: int = 500,
        seed: int = 0,
        split: str = "val2014",
    ) -> ChairDataset:
        root = Path(root)
        annotations = read_coco_annotations(root, split)
        folder = _image_folder(root, split)
        if folder is None:
            raise DatasetFormatError(f"no {split} image folder in {root} (expected {root / split})")
        chosen: Sequence[ChairImage]
        if list_file is not None:
            chosen = read_chair_list(list_file)
            unknown = [im.image_id for im in chosen if im.image_id not in annotations.files]
            if unknown:
                raise DatasetFormatError(f"{list_file}: images {unknown[:5]} are not in the COCO annotations")
        else:
            chosen = sample_chair_images({i: annotations.files[i] for i in annotations.split_ids}, count, seed)
        train = split.replace("val", "train")
        folders = {split: folder, train: _image_folder(root, train) if train != split else folder}
        paths, missing = {}, []
        for im in chosen:
            found = _find_image(im, annotations, root, split, train, folders)
            if isinstance(found, Path):
                paths[im.image_id] = found
            else:
                missing.append(found)
        if missing:
            more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DatasetFormatError(f"{len(missing)} CHAIR images are missing: {'; '.join(missing[:3])}{more}")
        return cls(annotations, folder, list(chosen), Path(list_file) if list_file is not None else None, paths)

    def ground_truth_inputs(self) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
        """Instance names and human captions of the chosen images (what :class:`ChairScorer.from_coco` takes)."""
        ids = [im.image_id for im in self.images]
        return (
            {i: self.annotations.instances.get(i, []) for i in ids},
            {i: self.annotations.captions.get(i, []) for i in ids},
        )

    def describe(self) -> dict[str, Any]:
        return {
            "annotations": [str(p) for p in self.annotations.sources],
            "list_file": str(self.list_file) if self.list_file else None,
            "images": len(self.images),
        }


def _find_image(
    image: ChairImage,
    annotations: CocoAnnotations,
    root: Path,
    split: str,
    train: str,
    folders: dict[str, Path | None],
) -> Path | str:
    """The file of ``image``, or what was looked for where (the text of the error)."""
    part = split if image.image_id in annotations.split_ids or train == split else train
    names = []
    known = annotations.files.get(image.image_id)
    if known is not None:
        names.append((known, f"its file name in the COCO {part} annotations"))
    if image.file_name != known:
        names.append((image.file_name, "built from the list's image_id" if image.name_built else "given by the list"))
    places = list(dict.fromkeys(f for f in (folders.get(part), folders[split]) if f is not None))
    for place in places:
        for name, _ in names:
            if (place / name).is_file():
                return place / name
    said = " or ".join(f"{name} ({why})" for name, why in names)
    where = " or ".join(str(p) for p in places)
    if folders.get(part) is None:
        where += f" (there is no {part} image folder in {root}: expected {root / part})"
    return f"image {image.image_id}: no {said} in {where}"
