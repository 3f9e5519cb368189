"""Record types shared by the scanpath datasets (CapMIT1003, MIT1003, the Amazon/STI and OAT
shelf visual-search sets), the scanpath metrics' callers and the scanpath evaluation.

Conventions, the same in every reader:

* coordinates are ``(x, y)`` in the pixels of the original stimulus image as stored (x to the right,
  y down, origin at the top-left pixel's corner as the published files give them): EXIF orientation
  is not applied, since the recordings were made on the stored pixels; a record's ``image_path`` is
  a :class:`~attnzoo.datasets.images.DatasetImagePath`, so a pipeline decodes it in that same frame;
* times and durations are in seconds;
* object indices are 0-based, in the display's reading order (the published OAT files are
  1-based: readers convert);
* one record per (stimulus, observer): nothing is shared between observers' records;
* every point a reader returns is finite and lies on the image or near it (:func:`checked_points`):
  eye trackers record some gaze just off the stimulus, but a NaN, an infinity or a point more than
  half the image's size beyond an edge is a damaged file, refused with the file and record named.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnzoo.datasets.images import dataset_image_path, opened_image
from attnzoo.errors import DatasetFormatError, InvalidInputError

#: How far beyond each edge (as a fraction of the image's width / height) a gaze point may lie.
OFF_IMAGE_MARGIN = 0.5


def _leaves(values: Any) -> Iterator[Any]:
    if isinstance(values, (list, tuple)):
        for value in values:
            yield from _leaves(value)
    else:
        yield values


def _numeric_array(values: Any, where: str, what: str) -> np.ndarray:
    """``values`` as float64, refusing what only looks numeric: text, booleans (``true`` in JSON would
    be 1), complex numbers; None (a NULL cell) becomes NaN, which the callers refuse."""
    if not isinstance(values, np.ndarray):
        bad = next(
            (
                v
                for v in _leaves(values)
                if isinstance(v, bool) or not isinstance(v, (int, float, np.number, type(None)))
            ),
            None,
        )
        if bad is not None:
            raise DatasetFormatError(f"{where}: {what} must be numbers, found {bad!r}")
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):  # ragged lists, a list where a number belongs
            raise DatasetFormatError(f"{where}: {what} must be numbers in a regular table") from None
    if values.size and values.dtype.kind not in "iuf":
        raise DatasetFormatError(f"{where}: {what} must be real numbers, found {values.dtype} values")
    return values.astype(np.float64)


def checked_points(values: Any, where: str, image_size: tuple[float, float] | None = None) -> np.ndarray:
    """``[T, 2]`` float64 (x, y) points read from a dataset file: finite and, when the image size is
    known, no farther outside the image than :data:`OFF_IMAGE_MARGIN` of its size; else a
    :class:`DatasetFormatError` naming ``where`` and the first bad point."""
    xy = _numeric_array(values, where, "points")
    if xy.size == 0:
        return np.zeros((0, 2))
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise DatasetFormatError(f"{where}: points must be (x, y) pairs, got an array of shape {xy.shape}")
    finite = np.isfinite(xy).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise DatasetFormatError(f"{where}: point {i} is ({xy[i, 0]}, {xy[i, 1]}), not a finite (x, y)")
    if image_size is not None:
        width, height = (float(v) for v in image_size)
        mx, my = OFF_IMAGE_MARGIN * width, OFF_IMAGE_MARGIN * height
        x, y = xy[:, 0], xy[:, 1]
        outside = (x < -mx) | (x > width + mx) | (y < -my) | (y > height + my)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise DatasetFormatError(
                f"{where}: point {i} ({xy[i, 0]:g}, {xy[i, 1]:g}) lies far outside the {width:g}x{height:g} image "
                f"(more than {OFF_IMAGE_MARGIN:g} of its size beyond an edge)"
            )
    return xy


def checked_times(values: Any, where: str, n: int, what: str = "times", *, non_negative: bool = False) -> np.ndarray:
    """``[n]`` float64 finite times (or durations, ``non_negative``) read with ``n`` points."""
    times = _numeric_array(values, where, what).reshape(-1)
    if times.shape[0] != n:
        raise DatasetFormatError(f"{where}: {times.shape[0]} {what} for {n} points")
    bad = ~np.isfinite(times) | ((times < 0) if non_negative else False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        kind = "a finite number" + (" >= 0" if non_negative else "")
        raise DatasetFormatError(f"{where}: {what}[{i}] is {times[i]}, not {kind}")
    return times


def checked_size(width: Any, height: Any, where: str) -> tuple[int, int]:
    """A stated image size: two positive integers (``True`` or ``"640"`` are not sizes)."""
    values = []
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise DatasetFormatError(f"{where}: image {name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value >= 1 and float(value).is_integer()):
            raise DatasetFormatError(f"{where}: image {name} must be a positive whole number of pixels, got {value!r}")
        values.append(int(value))
    return values[0], values[1]


def image_size(path: str | os.PathLike, what: str = "stimulus image") -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (nothing decoded): the stored pixels' frame,
    EXIF orientation not applied (module docstring); a damaged or oversized file is a
    :class:`DatasetFormatError` naming it."""
    with opened_image(path, error=DatasetFormatError, what=what) as image:
        return image.size


def _stored_frame(path: Any) -> Any:
    """A record's image path marked to be decoded as stored, the frame of its points (None stays None)."""
    return dataset_image_path(path) if isinstance(path, (str, os.PathLike)) else path


@dataclass
class ScanpathRecord:
    """One observer's fixations (or clicks) on one stimulus."""

    stimulus: str
    """Stimulus id: the image file name as the dataset names it (e.g. ``"i05june05_static_street_boston_p1010764.jpeg"``)."""
    image_path: Path
    subject: str
    xy: np.ndarray
    """``[T, 2]`` float64, (x, y) in original image pixels, in viewing order."""
    times: np.ndarray | None = None
    """``[T]`` onset of each fixation (click), seconds from stimulus onset; ``None`` when unknown."""
    durations: np.ndarray | None = None
    """``[T]`` seconds; ``None`` when the data has none (clicks, STI search fixations)."""
    caption: str | None = None
    """The observer's caption (CapMIT1003), else ``None``."""
    image_size: tuple[int, int] | None = None
    """``(width, height)`` of the stimulus, when the dataset states it (else read the image)."""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_path = _stored_frame(self.image_path)

    def __len__(self) -> int:
        return int(self.xy.shape[0])


@dataclass
class SearchTrial(ScanpathRecord):
    """One observer searching one display of objects on a grid for a target (visual search)."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    """``[N, 4]`` float64 ``(x0, y0, x1, y1)`` object boxes in image pixels, in reading order."""
    grid: tuple[int, int] = (0, 0)
    """``(rows, cols)`` of the shelf layout; object ``i`` sits at ``(i // cols, i % cols)``."""
    target: int = -1
    """0-based index of the target object among ``boxes``."""
    objects: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    """``[T]`` int64, the 0-based object each fixation falls on (the published mapping)."""
    target_image_path: Path | None = None
    layout: str = ""
    """Layout id: the same id means the same display (split by it to avoid leakage)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_image_path = _stored_frame(self.target_image_path)


class ScanpathCollection(Sequence):
    """A list of scanpath records with the lookups every scanpath reader shares."""

    def __init__(self, records: Iterable[ScanpathRecord]):
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._subset(self._records[index])
        return self._records[index]

    def __iter__(self) -> Iterator[ScanpathRecord]:
        return iter(self._records)

    def _subset(self, records: list[ScanpathRecord]) -> ScanpathCollection:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._records = list(records)
        return new

    def stimuli(self) -> list[str]:
        """Unique stimulus ids, in first-seen order."""
        return list(dict.fromkeys(r.stimulus for r in self._records))

    def subjects(self) -> list[str]:
        return list(dict.fromkeys(r.subject for r in self._records))

    def by_stimulus(self) -> dict[str, list[ScanpathRecord]]:
        groups: dict[str, list[ScanpathRecord]] = {}
        for record in self._records:
            groups.setdefault(record.stimulus, []).append(record)
        return groups

    def filter(
        self,
        stimuli: Iterable[str] | None = None,
        subjects: Iterable[str] | None = None,
    ) -> ScanpathCollection:
        """Records whose stimulus (and subject) is in the given sets; unknown names are an error,
        since a typo would otherwise silently give an empty evaluation."""
        records = self._records
        for name, wanted, known in (
            ("stimuli", stimuli, self.stimuli()),
            ("subjects", subjects, self.subjects()),
        ):
            if wanted is None:
                continue
            wanted = {wanted} if isinstance(wanted, str) else set(wanted)
            unknown = sorted(wanted - set(known))
            if unknown:
                raise InvalidInputError(
                    f"unknown {name} {unknown[:5]} (this dataset has {len(known)} {name}, e.g. {known[:3]})"
                )
            attr = "stimulus" if name == "stimuli" else "subject"
            records = [r for r in records if getattr(r, attr) in wanted]
        return self._subset(records)


def detect_scanpath_dataset(root: str | os.PathLike) -> str:
    """The dataset a folder holds, from the files the public releases ship."""
    root = Path(root)
    if not root.exists():
        raise DatasetFormatError(f"dataset folder {root} does not exist")
    if (root / "capmit1003.db").is_file() or root.suffix == ".db":
        return "capmit1003"
    for name in ("Amazon.json", "amazon_data.json", "AmazonCovers/Amazon.json", "amazon_data/amazon_data.json"):
        if (root / name).is_file():
            return "amazon"
    for stem, task in (("time_Q3_mousedel_new", "yogurt"), ("time_Q1_mousedel_new", "wine")):
        if any((d / f"{stem}{ext}").is_file() for d in (root, root / "gaze") for ext in (".xlsx", ".csv")):
            return task
    caches = ("", "MIT1003", "MIT1003_initial_fix", "MIT1003_initial_fix_consistent")  # where MIT1003 looks
    if (root / "DATA").is_dir() or any((root / c / "fixations.hdf5").is_file() for c in caches):
        return "mit1003"
    raise DatasetFormatError(
        f"{root}: cannot tell which scanpath dataset this is (looked for capmit1003.db, Amazon.json / amazon_data.json, "
        "OAT's time_Q3/Q1_mousedel_new.xlsx, MIT1003's DATA/ or a pysaliency cache); pass --dataset"
    )
