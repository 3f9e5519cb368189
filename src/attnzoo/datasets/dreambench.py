"""DreamBench (the DreamBooth dataset, google/dreambooth) in insertion form: its subjects put into
backgrounds with masks listed in a manifest.

Layout (the published ``dataset/`` folder, plus the manifest)::

    root/
      dataset/<subject>/00.jpg ...     one folder per subject (30 in DreamBench)
      dataset/prompts_and_classes.txt  DreamBooth's file, "subject,class" lines (the class word); optional
      insertion.json                   the manifest (another file with --manifest)

The manifest (paths relative to ``root``)::

    {"backgrounds": [{"id": "snow", "image": "backgrounds/snow.jpg", "mask": "backgrounds/snow.json",
                      "prompt": "a {} in the snow"}],
     "subjects": {"dog": {"image": "dataset/dog/02.jpg", "mask": "masks/dog.png", "class": "dog"}},
     "pairs": [{"subject": "dog", "background": "snow", "prompt": "a dog in the snow"}]}

``backgrounds`` is required; a mask is a mask image (white = fill) or a VIA annotation (.json).
``subjects`` is optional (default: every folder of ``dataset/``, its first image, segmented by its class
word); ``pairs`` too (default: every subject in every background). A pair's prompt defaults to its
background's ``prompt`` with ``{}`` replaced by the class word, else ``"a <class>"``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnzoo.errors import DatasetFormatError

__all__ = ["InsertionPair", "DreamBenchInsertion", "read_dreambench_insertion", "read_dreambooth_classes"]

MANIFEST = "insertion.json"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class InsertionPair:
    id: str
    """``<subject>/<background>``."""
    subject: str
    background: str
    subject_image: Path
    subject_mask: Path | None
    """None: segment the subject by ``subject_word``."""
    subject_word: str
    target: Path
    mask: Path
    prompt: str


@dataclass(frozen=True)
class DreamBenchInsertion:
    root: Path
    manifest: Path
    pairs: list[InsertionPair]


def read_dreambooth_classes(path: Path) -> dict[str, str]:
    """``subject -> class word`` from DreamBooth's ``prompts_and_classes.txt`` ("subject_name,class" lines
    under its "Classes" heading)."""
    classes: dict[str, str] = {}
    in_classes = False
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.lower().startswith("classes"):
            in_classes = True
            continue
        if text.lower().startswith("prompts"):
            break
        if in_classes and re.fullmatch(r"[\w\-]+,[^,]+", text) and text.lower() != "subject_name,class":
            name, word = text.split(",", 1)
            classes[name.strip()] = word.strip()
    return classes


#: Where DreamBooth's class file is looked for: where google/dreambooth publishes it, then beside ``dataset/``.
CLASSES_FILES = ("dataset/prompts_and_classes.txt", "prompts_and_classes.txt")


def _dreambooth_classes(root: Path) -> dict[str, str]:
    """The class words of DreamBooth's file; without it, subjects are named after their folders, which for half of
    DreamBench is not the class word (``bear_plushie`` is a "stuffed animal", ``rc_car`` a "toy")."""
    for name in CLASSES_FILES:
        if (root / name).is_file():
            return read_dreambooth_classes(root / name)
    return {}


def _class_from_folder(name: str) -> str:
    """``dog6`` -> ``dog``, ``bear_plushie`` -> ``bear plushie`` (when no class word is given)."""
    return re.sub(r"\d+$", "", name).replace("_", " ").strip() or name


def _file(root: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DatasetFormatError(f"{what}: expected a file path relative to {root}, got {value!r}")
    path = root / value
    if not path.is_file():
        raise DatasetFormatError(f"{what}: {path} not found")
    return path


def read_dreambench_insertion(
    root: str | os.PathLike, manifest: str | os.PathLike | None = None
) -> DreamBenchInsertion:
    """Read and check the whole layout before anything runs: a missing file or malformed entry is named."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"{root} is not a folder (expected a DreamBench root with dataset/ and {MANIFEST})")
    manifest_path = Path(manifest) if manifest is not None else root / MANIFEST
    if not manifest_path.is_file():
        raise DatasetFormatError(
            f"the insertion manifest {manifest_path} is missing: list the backgrounds and masks (see docs/subject-insertion.md)"
        )
    try:
        spec = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{manifest_path} is not valid JSON ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("backgrounds"), list) or not spec["backgrounds"]:
        raise DatasetFormatError(f"{manifest_path}: 'backgrounds' must be a non-empty list")
    backgrounds: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(spec["backgrounds"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise DatasetFormatError(f"{manifest_path}: backgrounds[{i}] needs an 'id'")
        what = f"{manifest_path.name}: background {entry['id']!r}"
        backgrounds[entry["id"]] = {
            "image": _file(root, entry.get("image"), f"{what} image"),
            "mask": _file(root, entry.get("mask"), f"{what} mask"),
            "prompt": entry.get("prompt"),
        }
    subjects = _subjects(root, spec.get("subjects") or {}, manifest_path)
    pairs_spec = spec.get("pairs")
    if pairs_spec is None:
        pairs_spec = [{"subject": s, "background": b} for s in subjects for b in backgrounds]
    if not isinstance(pairs_spec, list) or not pairs_spec:
        raise DatasetFormatError(f"{manifest_path}: 'pairs' must be a non-empty list")
    pairs = []
    for i, pair in enumerate(pairs_spec):
        if not isinstance(pair, dict):
            raise DatasetFormatError(f"{manifest_path}: pairs[{i}] must be an object")
        subject, background = pair.get("subject"), pair.get("background")
        if subject not in subjects:
            raise DatasetFormatError(
                f"{manifest_path}: pairs[{i}] names subject {subject!r}, not in dataset/ or 'subjects'"
            )
        if background not in backgrounds:
            raise DatasetFormatError(
                f"{manifest_path}: pairs[{i}] names background {background!r}, not in 'backgrounds'"
            )
        sub, bg = subjects[subject], backgrounds[background]
        prompt = pair.get("prompt") or (
            bg["prompt"].replace("{}", sub["class"]) if bg["prompt"] else f"a {sub['class']}"
        )
        pairs.append(
            InsertionPair(
                f"{subject}/{background}",
                subject,
                background,
                sub["image"],
                sub["mask"],
                sub["class"],
                bg["image"],
                bg["mask"],
                prompt,
            )
        )
    if len({p.id for p in pairs}) != len(pairs):
        raise DatasetFormatError(f"{manifest_path}: a subject/background pair is listed twice")
    return DreamBenchInsertion(root, manifest_path, pairs)


def _subjects(root: Path, overrides: Any, manifest_path: Path) -> dict[str, dict[str, Any]]:
    if not isinstance(overrides, dict):
        raise DatasetFormatError(f"{manifest_path}: 'subjects' must map subject names to {{image, mask, class}}")
    folder = root / "dataset"
    classes = _dreambooth_classes(root)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    names += [n for n in overrides if n not in names]
    if not names:
        raise DatasetFormatError(f"{folder} holds no subject folders (the DreamBooth dataset/ layout)")
    subjects = {}
    for name in names:
        given = overrides.get(name) or {}
        if not isinstance(given, dict):
            raise DatasetFormatError(f"{manifest_path}: subjects[{name!r}] must be an object")
        if "image" in given:
            image = _file(root, given["image"], f"{manifest_path.name}: subject {name!r} image")
        else:
            found = sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not found:
                raise DatasetFormatError(f"{folder / name} holds no images")
            image = found[0]
        mask = _file(root, given["mask"], f"{manifest_path.name}: subject {name!r} mask") if given.get("mask") else None
        word = given.get("class") or classes.get(name) or _class_from_folder(name)
        subjects[name] = {"image": image, "mask": mask, "class": word}
    return subjects
