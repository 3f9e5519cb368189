"""POPE (Li et al., EMNLP 2023; AoiDragon/POPE): yes / no questions "Is there a <object> in the
image?" about COCO val2014 (``coco``, ``aokvqa``) or GQA (``gqa``) images, in three splits by how the
absent objects were drawn: ``random``, ``popular`` (the most frequent objects) and ``adversarial``
(the objects most often seen with the image's own).

Question files are the published JSON lines, one question per line (a JSON array, as POPE's SEEM
outputs, is read too)::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}

Layout read from ``--data`` (the AGLA / VCD ``data/`` folder works as is)::

    root/
      POPE/<source>/<source>_pope_<split>.json     (or <source>/..., or the file beside root; OPERA's
                                                    pope_coco/coco_pope_<split>.json; POPE's
                                                    output/seem/<source>/<source>_pope_seem_<split>.json)
      val2014/ or coco/val2014/                     the COCO images (coco, aokvqa)
      gqa/images/ or images/                        the GQA images (gqa)

:func:`build_pope_questions` makes new question files from COCO annotations with POPE's sampling
rules (``main.py`` / ``utils.py``) and a seed; :func:`write_pope_questions` writes the published format.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attnzoo._io import atomic_write, read_json, read_text
from attnzoo.errors import DatasetFormatError, InvalidOptionError

__all__ = [
    "POPE_SOURCES",
    "POPE_SPLITS",
    "POPE_TEMPLATE",
    "PopeDataset",
    "PopeQuestion",
    "build_pope_questions",
    "coco_image_objects",
    "find_image_folder",
    "find_pope_file",
    "pope_file_labels",
    "read_json_records",
    "read_pope_questions",
    "write_pope_questions",
]

POPE_SOURCES = ("coco", "aokvqa", "gqa")
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_TEMPLATE = "Is there a {} in the image?"


@dataclass(frozen=True)
class PopeQuestion:
    question_id: int
    image: str
    """The image's file name, relative to the image folder."""
    text: str
    label: str
    """``"yes"`` or ``"no"``."""


def read_json_records(path: str | os.PathLike, what: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of a JSON-lines file (blank lines skipped), or of a JSON array file
    (numbered from 1); anything else is a :class:`DatasetFormatError` naming the file and line."""
    text = read_text(path, what).lstrip("\ufeff")
    if text.lstrip().startswith("["):
        records = read_json(path, what)
        numbered = list(enumerate(records, start=1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DatasetFormatError(
                    f"{os.fspath(path)}, line {number}: not valid JSON ({err.msg}); expected {what}"
                ) from None
    for number, record in numbered:
        if not isinstance(record, dict):
            raise DatasetFormatError(
                f"{os.fspath(path)}, line {number}: expected a JSON object, got {type(record).__name__}"
            )
    if not numbered:
        raise DatasetFormatError(f"{os.fspath(path)} holds no records; expected {what}")
    return numbered


def _field(path: Path, number: int, record: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetFormatError(f"{path}, line {number}: {key!r} missing or not a {getattr(kind, '__name__', kind)}")
    return value


def read_pope_questions(path: str | os.PathLike) -> list[PopeQuestion]:
    """The questions of one published POPE file, validated (ids unique, labels yes / no)."""
    path = Path(path)
    questions, seen = [], set()
    for number, record in read_json_records(path, "POPE questions (JSON lines: question_id, image, text, label)"):
        qid = _field(path, number, record, "question_id", int)
        label = _field(path, number, record, "label", str).strip().lower()
        if label not in ("yes", "no"):
            raise DatasetFormatError(f"{path}, line {number}: label must be yes or no, got {record['label']!r}")
        if qid in seen:
            raise DatasetFormatError(f"{path}, line {number}: question_id {qid} appears twice")
        seen.add(qid)
        image = _field(path, number, record, "image", str)
        text = _field(path, number, record, "text", str)
        if not text.strip():  # asked as the bare suffix, the answer would score against the label anyway
            raise DatasetFormatError(f"{path}, line {number}: 'text' (the question) is blank")
        questions.append(PopeQuestion(qid, image, text, label))
    return questions


_FILE_NAME = re.compile(
    rf"({'|'.join(POPE_SOURCES)})_pope_(?:seem_)?({'|'.join(POPE_SPLITS)})\.json", flags=re.IGNORECASE
)


def pope_file_labels(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(source, split)`` that a question file's name states in the published naming
    (``<source>_pope_<split>.json``, POPE's ``<source>_pope_seem_<split>.json``), else None."""
    match = _FILE_NAME.fullmatch(Path(path).name)
    return (match.group(1).lower(), match.group(2).lower()) if match else None


def _file_labels(path: Path, source: str | None, split: str | None) -> tuple[str, str]:
    """The source and split of a question file given by path: what its name states, which a given
    ``source`` / ``split`` must agree with; a name that states nothing needs both given."""
    named = pope_file_labels(path)
    if named is None:
        if source is None or split is None:
            missing = [f"--{w}" for w, v in (("source", source), ("split", split)) if v is None]
            raise InvalidOptionError(
                f"the name of POPE question file {path} does not say its source and split "
                f"(<source>_pope_<split>.json): give {' and '.join(missing)} to label the results"
            )
        _check_choice("source", source, POPE_SOURCES)
        _check_choice("split", split, POPE_SPLITS)
        return source, split
    for what, given, name in (("source", source, named[0]), ("split", split, named[1])):
        if given is not None and given != name:
            raise InvalidOptionError(
                f"--{what} {given} contradicts POPE question file {path.name}, whose name says {what} {name}"
            )
    return named


def write_pope_questions(path: str | os.PathLike, questions: Iterable[PopeQuestion]) -> Path:
    """The published format: one JSON object per line, keys in POPE's order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as fh:
        fh.writelines(json.dumps(asdict(q)) + "\n" for q in questions)
    return path


def find_pope_file(root: str | os.PathLike, source: str, split: str) -> Path:
    """The question file of ``source`` x ``split`` under ``root``, or ``root`` itself when it is a file
    (whose name, when it states a source and split, must agree with them)."""
    _check_choice("source", source, POPE_SOURCES)
    _check_choice("split", split, POPE_SPLITS)
    root = Path(root)
    if root.is_file():
        _file_labels(root, source, split)
        return root
    name = f"{source}_pope_{split}.json"
    candidates = [
        root / name,
        root / source / name,
        root / "POPE" / source / name,
        root / "data" / "POPE" / source / name,
        root / f"pope_{source}" / name,
        root / "output" / source / name,
        root / "output" / "seem" / source / f"{source}_pope_seem_{split}.json",
        root / "seem" / source / f"{source}_pope_seem_{split}.json",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetFormatError(
        f"no POPE question file {name} under {root} (looked in {', '.join(str(c.parent) for c in candidates[:5])})"
    )


def find_image_folder(root: str | os.PathLike, source: str, images: str | os.PathLike | None = None) -> Path:
    """Where the images of ``source`` are: COCO val2014 for coco and aokvqa, GQA's images for gqa."""
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise DatasetFormatError(f"image folder {folder} does not exist")
        return folder
    root = Path(root)
    base = root.parent if root.is_file() else root
    names = ["gqa/images", "images", "gqa"] if source == "gqa" else ["val2014", "coco/val2014", "images"]
    for name in names:  # by name first: a bare "gqa" folder near the file may be POPE's own question folder
        for parent in (base, base.parent, base.parent.parent):
            if (parent / name).is_dir():
                return parent / name
    raise DatasetFormatError(f"no {source} image folder ({' or '.join(names)}) in {base} or its parents")


@dataclass
class PopeDataset:
    """One POPE split, its questions and the folder of its images (every image checked to exist)."""

    source: str
    split: str
    question_file: Path
    image_folder: Path
    questions: list[PopeQuestion]

    @classmethod
    def from_root(
        cls,
        root: str | os.PathLike,
        source: str | None = None,
        split: str | None = None,
        *,
        questions: str | os.PathLike | None = None,
        images: str | os.PathLike | None = None,
    ) -> PopeDataset:
        """The split of ``source`` x ``split`` found under ``root`` (coco and adversarial when not given),
        or the question file ``questions`` (or ``root``, a file): its source and split are what its name
        states (``<source>_pope_<split>.json``); a given one that contradicts the name is refused, and a
        file whose name states neither needs both given."""
        file = Path(questions) if questions is not None else Path(root) if Path(root).is_file() else None
        if file is not None:
            if not file.is_file():
                raise DatasetFormatError(f"POPE question file {file} does not exist")
            source, split = _file_labels(file, source, split)
            question_file = file
        else:
            source, split = source or "coco", split or "adversarial"
            question_file = find_pope_file(root, source, split)
        folder = find_image_folder(root, source, images)
        items = read_pope_questions(question_file)
        missing = sorted({q.image for q in items if not (folder / q.image).is_file()})
        if missing:
            raise DatasetFormatError(
                f"{len(missing)} images of {question_file.name} are missing from {folder}, e.g. {', '.join(missing[:3])}"
            )
        return cls(source, split, question_file, folder, items)

    def image_path(self, question: PopeQuestion) -> Path:
        return self.image_folder / question.image


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidOptionError(f"POPE {what} must be one of {', '.join(choices)}, got {value!r}")


# -- building question files -----------------------------------------------------------------------
def coco_image_objects(instances: Mapping[str, Any], *, what: str = "COCO instances") -> list[tuple[str, list[str]]]:
    """``(file name, object names)`` per image of a COCO instances file, the names in the order their
    first box appears, each once (POPE's ground-truth object lists, built from annotations)."""
    try:
        names = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
        files = {int(im["id"]): str(im["file_name"]) for im in instances["images"]}
        objects: dict[int, list[str]] = {image_id: [] for image_id in files}
        for ann in instances["annotations"]:
            found = objects.setdefault(int(ann["image_id"]), [])
            name = names[int(ann["category_id"])]
            if name not in found:
                found.append(name)
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetFormatError(
            f"{what}: not a COCO instances file (images, annotations, categories): {err!r}"
        ) from None
    unknown = sorted(set(objects) - set(files))
    if unknown:
        raise DatasetFormatError(f"{what}: annotations of images {unknown[:3]} that are not in its image list")
    return [(files[image_id], found) for image_id, found in objects.items()]


def _question_text(template: str, name: str) -> str:
    """POPE's article rule: "an" before a vowel. (The released utils.py replaces every "a" of the
    template, making "imange"; its published files have "image", so only the article changes here.)"""
    if name[:1] in "aeiou" and "a {}" in template:
        return template.replace("a {}", "an {}").format(name)
    return template.format(name)


def build_pope_questions(
    image_objects: Sequence[tuple[str, Sequence[str]]],
    *,
    seed: int = 0,
    images: int = 500,
    per_image: int = 3,
    splits: Sequence[str] = POPE_SPLITS,
    template: str = POPE_TEMPLATE,
) -> dict[str, list[PopeQuestion]]:
    """POPE's sampling rules, reproducible by ``seed``.

    Images with at least ``per_image`` objects are eligible; ``images`` of them are drawn. Per image
    and per split the first ``per_image`` objects of its list are asked (label yes), each followed by
    one absent object (label no), never one of the image's objects or one asked before for the image:

    * random: drawn uniformly from the objects of the drawn images;
    * popular: the most frequent object (images containing it, among the drawn images) not excluded;
    * adversarial: the object seen most often with the asked (present) object, not excluded;

    popular and adversarial fall back to a random draw when every candidate is excluded. Ties keep
    the order in which objects were first met (as POPE's stable sorts of insertion-ordered dicts).
    The image draw uses ``random.Random(seed)``; each split draws from its own
    ``random.Random(f"{seed}-{split}")`` (POPE shares one unseeded stream), so a split does not
    depend on which other splits were built."""
    for split in splits:
        _check_choice("split", split, POPE_SPLITS)
    if images < 1 or per_image < 1:
        raise InvalidOptionError("POPE needs images >= 1 and per_image >= 1")
    eligible = [(name, list(objs)) for name, objs in image_objects if len(objs) >= per_image]
    if len(eligible) < images:
        raise DatasetFormatError(
            f"only {len(eligible)} images have at least {per_image} objects; POPE needs {images} (lower --images)"
        )
    drawn = random.Random(seed).sample(eligible, images)
    frequency: Counter[str] = Counter()
    co_occurrence: dict[str, Counter[str]] = {}
    for _, objs in drawn:
        frequency.update(objs)
        for obj in objs:
            together = co_occurrence.setdefault(obj, Counter())
            together.update(other for other in objs if other != obj)
    pool = list(frequency)
    by_frequency = [obj for obj, _ in frequency.most_common()]  # most_common sorts stably by count
    out = {}
    for split in splits:
        rng = random.Random(f"{seed}-{split}")
        questions: list[PopeQuestion] = []
        for name, objs in drawn:
            asked: list[str] = []
            for present in objs[:per_image]:
                asked.append(present)
                questions.append(PopeQuestion(len(questions) + 1, name, _question_text(template, present), "yes"))
                ranked = (
                    by_frequency
                    if split == "popular"
                    else [o for o, _ in co_occurrence[present].most_common()]
                    if split == "adversarial"
                    else []
                )
                absent = next((o for o in ranked if o not in asked and o not in objs), None)
                if absent is None:
                    absent = _random_absent(rng, pool, set(asked) | set(objs), name)
                asked.append(absent)
                questions.append(PopeQuestion(len(questions) + 1, name, _question_text(template, absent), "no"))
        out[split] = questions
    return out


def _random_absent(rng: random.Random, pool: list[str], excluded: set[str], image: str) -> str:
    if not set(pool) - excluded:
        raise DatasetFormatError(f"no object left to ask about as absent in {image}: too few distinct objects")
    while True:
        choice = rng.choice(pool)
        if choice not in excluded:
            return choice
