"""Generic ImageFolder (``root/<class>/<image>``), classes in sorted order as torchvision does --
except folders named by class index.

When every class folder's name is a whole number and together they are exactly ``0 .. N-1`` (the
ImageNetV2 layout: ``0/`` .. ``999/``, folder ``k`` holding ImageNet class ``k``), the folder's number
is its class index. Sorting those names as text would put ``10`` before ``2`` and score nearly every
prediction wrong without an error. Any other set of names keeps the sorted-name order.

Sample paths are :class:`~attnzoo.datasets.images.DatasetImagePath` s: a pipeline decodes them as
stored, without EXIF rotation, as timm/torchvision evaluate (published accuracies are on stored pixels).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from attnzoo._io import special_file_kind
from attnzoo._values import listed
from attnzoo.datasets.images import IMAGE_EXTENSIONS, dataset_image_path
from attnzoo.errors import DatasetFormatError


@dataclass
class ClassificationSamples:
    """Image paths with integer targets and the class names the targets index."""

    samples: list[tuple[Path, int]]
    classes: list[str]
    layout: str
    root: Path
    class_ids: list[str] = field(default_factory=list)  # e.g. WordNet ids, parallel to ``classes``

    def __post_init__(self) -> None:
        self.samples = [(dataset_image_path(path), target) for path, target in self.samples]  # decoded as stored

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Path, int]:
        return self.samples[i]

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, following links), in a stable order: each folder's files by
    name, then its subfolders by name (hidden ones skipped), as ``os.walk`` goes; a folder reached twice through
    links (a link to a parent makes a loop) is listed once. A FIFO, socket or device with an image's name is not
    an image file: it is skipped, as files of other kinds are (opening a FIFO would wait forever); a broken
    link is listed (reading it says the file is missing)."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    pending = [os.fspath(folder)]
    while pending:
        dirpath = pending.pop()
        try:
            stat = os.stat(dirpath)
            with os.scandir(dirpath) as listing:
                entries = list(listing)
        except OSError:  # vanished or unreadable since it was listed
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        files, folders = [], []
        for entry in entries:
            if _is_folder(entry):
                if not entry.name.startswith("."):
                    folders.append(entry.name)
            elif is_image_file(Path(entry.name)) and not _is_special(entry):
                files.append(entry.name)
        found.extend(Path(dirpath) / name for name in sorted(files))
        pending.extend(os.path.join(dirpath, name) for name in sorted(folders, reverse=True))
    return found


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # through links; from the listing itself where it tells (no stat)
    except OSError:
        return False


def _is_special(entry: os.DirEntry) -> bool:
    """A FIFO, socket or device (through links): there, but not a regular file."""
    try:
        if entry.is_file():  # from the listing itself where it tells: no stat for the usual file
            return False
    except OSError:
        return False
    return special_file_kind(entry.path) is not None


def check_root(root: str | os.PathLike) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetFormatError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetFormatError(f"dataset path {root} is not a folder")
    return root


def class_order(names: list[str]) -> list[str]:
    """Class folder names in class-index order: by number when they are exactly ``0 .. N-1``
    (ImageNetV2's layout), else sorted as text (module docstring)."""
    if names and all(name.isascii() and name.isdigit() for name in names):
        numbered = sorted(names, key=int)
        if [int(name) for name in numbered] == list(range(len(names))):
            return numbered
    return sorted(names)


def read_image_folder(root: str | os.PathLike) -> ClassificationSamples:
    """``root/<class_name>/**/<image>``; the class index is the position in sorted class names, or the
    folder's number for folders ``0 .. N-1`` (module docstring)."""
    root = check_root(root)
    classes = class_order([d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")])
    if not classes:
        raise DatasetFormatError(f"{root} has no class subfolders; expected {root}/<class_name>/<image files>")
    samples = [(path, target) for target, name in enumerate(classes) for path in list_images(root / name)]
    if not samples:
        raise DatasetFormatError(f"{root} has class folders ({', '.join(classes[:5])}, ...) but no image files in them")
    return ClassificationSamples(samples, classes, "image-folder", root, class_ids=list(classes))


def class_keys(samples: ClassificationSamples) -> list[str]:
    """The names that identify ``samples``' classes across splits: their ids (folder names, WordNet ids) or names."""
    return list(samples.class_ids) if len(samples.class_ids) == len(samples.classes) else list(samples.classes)


def _numbered(keys: list[str]) -> bool:
    """Whether class folder names are exactly ``0 .. N-1`` (ImageNetV2's layout, named by class index)."""
    return (
        bool(keys)
        and all(k.isascii() and k.isdigit() for k in keys)
        and sorted(map(int, keys)) == list(range(len(keys)))
    )


def empty_class_folders(samples: ClassificationSamples) -> list[str]:
    """The class folders under ``samples.root`` that hold no image: each would be a class the model is trained
    to output without one example (torchvision's ImageFolder refuses them too). The classes of a fixed class
    list (ImageNet's 1000) that have no folder at all are not counted."""
    counts = [0] * len(samples.classes)
    for _, target in samples.samples:
        counts[target] += 1
    return [key for key, n in zip(class_keys(samples), counts, strict=True) if not n and (samples.root / key).is_dir()]


def align_classes(
    samples: ClassificationSamples, reference: ClassificationSamples, *, split: str = "val"
) -> tuple[ClassificationSamples, list[str]]:
    """``samples`` (a validation or test split read on its own) with targets indexing ``reference``'s classes (the
    training split's: what the model outputs), matched by class folder name / id. A split's own numbering is
    its sorted folders: with a class missing there, every later class would be scored against its neighbour's
    output. Folders ``0 .. K-1`` (ImageNetV2's) against named classes are matched by number (folder ``k``: class
    ``k``). A class ``reference`` lacks is refused (the model cannot predict it); returns also the reference's
    classes the split has no sample of (the caller says so: a split may lack some). Evaluation matches the data
    to a training run's classes through this same function."""
    keys, ref_keys = class_keys(samples), class_keys(reference)
    index = {key: i for i, key in enumerate(ref_keys)}
    # folders 0/ .. N-1/ are class indices only against classes that are not numbers themselves: against
    # numbered classes (category ids, with gaps or not) a folder is the class of its own name
    by_number = (
        _numbered(keys) and not any(key.isascii() and key.isdigit() for key in ref_keys) and len(keys) <= len(ref_keys)
    )
    if by_number:
        index = {key: int(key) for key in keys}  # ImageNetV2's folders 0/ .. 999/: folder k holds class k
    used = sorted({keys[t] for _, t in samples.samples})
    if not by_number and len(index) != len(ref_keys):
        counts = Counter(ref_keys)
        ambiguous = [key for key in used if counts[key] > 1]
        if ambiguous:
            raise DatasetFormatError(
                f"{samples.root}: the {split} split's classes {', '.join(ambiguous[:5])} name more than one of the "
                f"training classes ({reference.root}); they cannot be matched by name"
            )
    unknown = [key for key in used if key not in index]
    if unknown:
        raise DatasetFormatError(
            f"{samples.root}: the {split} split has classes the training split lacks ({listed(unknown)}); the model "
            f"has no output for them. The training classes are {', '.join(ref_keys[:5])}"
            f"{', ...' if len(ref_keys) > 5 else ''} ({reference.root})"
        )
    present = {index[key] for key in used}
    missing = [key for i, key in enumerate(ref_keys) if i not in present]
    aligned = ClassificationSamples(
        [(path, index[keys[t]]) for path, t in samples.samples],
        list(reference.classes),
        samples.layout,
        samples.root,
        class_ids=list(reference.class_ids),
    )
    return aligned, missing
