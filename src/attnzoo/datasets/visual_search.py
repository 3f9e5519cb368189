"""Object-level visual-search scanpaths: Amazon book covers (STI / OAT) and OAT's yogurt and wine shelves.

**Amazon book covers** (Sattar et al. 2015, annotated by DFKI's STI-Dataset, CC BY-NC-SA 4.0).
:class:`AmazonCovers` reads either layout:

* STI: ``AmazonCovers/Amazon.json`` + ``AmazonCovers/images/<n>.jpg``;
* OAT's Drive copy: ``amazon_data/amazon_data.json`` + ``images/``, ``binarymask/14x6-<n>.jpg``, ``target/``.

The json maps ``"<n>.jpg"`` to ``fixations`` (``{"1".."6": [[x, y], ...]}``), ``ground_truth``
(``[{xmin, xmax, ymin, ymax}]``), ``size`` (``{height, width}``) and ``target`` (``"target_k.jpg"``).
The 84 cover boxes (6 x 14) come from the binary mask as in OAT's ``img_feature_amazon.py``: grey =
OpenCV's BGR->grey, threshold ``> 127``, the bounding rectangles of the outer contours
(:func:`boxes_from_mask`, done with connected components), sorted by ``(y0 // 10 * 10, x0)``.
Without masks (the STI layout has none) :func:`grid_boxes` cuts the image into equal 6 x 14 cells,
which is only an approximation of the cover boxes (covers have gaps and slightly different sizes).
Each fixation goes to the first box containing it (edges included), else to the box with the nearest
centre; the target is the box with the best IoU against ``ground_truth[0]``. Scanpaths whose length
is outside mean +- 3 std (population std over *all* 600 scanpaths before filtering, bounds
inclusive) are dropped when ``drop_outliers=True``, as OAT does. One :class:`SearchTrial` per
(image, subject): OAT's script shares one dict between the six subjects of an image (so its pickle
holds the last subject six times); we do not.

**OAT shelves** (:class:`OATShelf`): the authors' Excel files ``time_Q3_mousedel_new.xlsx`` (yogurt,
3 x 9) and ``time_Q1_mousedel_new.xlsx`` (wine, 2 x 11), one row per fixation with columns ``ID``
(scanpath), ``Sub_ID``, ``Question`` (layout, e.g. ``Q3_21``; image ``img/Question/<Question>.png``),
``Target`` (e.g. ``T3_1``), ``T_Package`` (1-based target), ``Choice`` (1-based object) and ``X``, ``Y``
(screen pixels of the 1680 x 1050 display). Boxes are the grid ``img_feature.py`` crops: cells of
186 x 305 (yogurt) / 152 x 449 (wine) px, bottom-aligned on the 1050 px screen (headers of 135 / 152
px). A CSV export with the same columns is read as well.

**Splits**: :func:`official_split` reproduces OAT's ``split.py`` + ``randsplit`` (a permutation of the
scanpaths, then per task the first 80 % train, 80-90 % val, last 10 % test); it leaks layouts and
targets between splits. :func:`leakage_free_split` groups by layout, target or (layout, target).
"""

from __future__ import annotations

import math
import os
import random
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from attnzoo._io import parse_errors, read_csv_rows, read_json, read_text
from attnzoo._values import generator_seed
from attnzoo.datasets.images import opened_image
from attnzoo.datasets.scanpaths import ScanpathCollection, SearchTrial, checked_points, checked_size
from attnzoo.errors import DatasetFormatError, InvalidInputError

__all__ = [
    "AMAZON_GRID",
    "SHELF_LAYOUTS",
    "AmazonCovers",
    "OATShelf",
    "boxes_from_mask",
    "drop_length_outliers",
    "grid_boxes",
    "leakage_free_split",
    "load_search_trials",
    "split_search_trials",
    "map_fixations_to_objects",
    "official_split",
    "read_amazon_json",
    "read_xlsx",
    "shelf_boxes",
    "reading_order",
    "sort_boxes_reading_order",
    "target_from_ground_truth",
]

AMAZON_GRID = (6, 14)
"""(rows, cols) of the Amazon collages: 84 covers."""

SHELF_LAYOUTS = {
    # task: (question prefix, rows, cols, cell width, cell height, screen (w, h), excel file stem)
    "yogurt": ("Q3", 3, 9, 186, 305, (1680, 1050), "time_Q3_mousedel_new"),
    "wine": ("Q1", 2, 11, 152, 449, (1680, 1050), "time_Q1_mousedel_new"),
}


# ---- boxes -------------------------------------------------------------------------------------
def reading_order(boxes: np.ndarray, y_threshold: int = 10) -> np.ndarray:
    """Indices putting boxes in OAT's order: rows by ``y0`` snapped down to a multiple of
    ``y_threshold``, then by ``x0`` (stable for ties)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    keys = [((y0 // y_threshold) * y_threshold, x0) for x0, y0, _, _ in boxes.tolist()]
    return np.array(sorted(range(len(boxes)), key=lambda i: keys[i]), dtype=np.int64)


def sort_boxes_reading_order(boxes: np.ndarray, y_threshold: int = 10) -> np.ndarray:
    """The boxes in OAT's order (:func:`reading_order`)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes[reading_order(boxes, y_threshold)]


def _grey_like_opencv(image: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(BGR2GRAY) on 8-bit data: fixed-point 0.299 R + 0.587 G + 0.114 B, rounded."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image
    rgb = image[..., :3].astype(np.int64)
    return ((rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + (1 << 13)) >> 14).astype(np.uint8)


def boxes_from_mask(mask: np.ndarray, expected: int | None = None, source: str = "mask") -> np.ndarray:
    """Object boxes ``[N, 4]`` ``(x0, y0, x1, y1)`` (``x1``/``y1`` exclusive, as ``x + w``) of a mask, in reading order.

    Same boxes as OAT's ``cv.boundingRect`` of ``cv.findContours(RETR_EXTERNAL)``: foreground = grey
    ``> 127`` (an RGB mask is converted as OpenCV does), 8-connected objects, holes filled so that
    anything nested inside an object belongs to it.
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask.ndim == 3:
        if mask.dtype != np.uint8:
            raise InvalidInputError(f"{source}: colour masks must be uint8, got {mask.dtype}")
        mask = _grey_like_opencv(mask)
    if mask.ndim != 2:
        raise InvalidInputError(f"{source}: mask must be [H, W] or [H, W, 3], got shape {mask.shape}")
    fg = mask > 127 if mask.dtype != bool else mask
    filled = ndimage.binary_fill_holes(fg)
    labels, _ = ndimage.label(filled, structure=np.ones((3, 3), dtype=bool))
    slices = ndimage.find_objects(labels)
    boxes = np.array(
        [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices if s is not None],
        dtype=np.float64,
    ).reshape(-1, 4)
    if expected is not None and len(boxes) != expected:
        raise DatasetFormatError(f"{source}: found {len(boxes)} objects in the binary mask, expected {expected}")
    return sort_boxes_reading_order(boxes)


def grid_boxes(size: tuple[int, int], rows: int = 6, cols: int = 14, top: float = 0.0) -> np.ndarray:
    """Equal cells over ``size = (width, height)`` below a header of ``top`` px, in reading order.

    For the Amazon collages this approximates the mask boxes (no gaps between covers).
    """
    width, height = size
    if rows <= 0 or cols <= 0 or width <= 0 or height <= top:
        raise InvalidInputError(
            f"grid needs rows, cols > 0 and a positive area, got size={size}, rows={rows}, cols={cols}, top={top}"
        )
    cw, ch = width / cols, (height - top) / rows
    return np.array(
        [[c * cw, top + r * ch, (c + 1) * cw, top + (r + 1) * ch] for r in range(rows) for c in range(cols)],
        dtype=np.float64,
    )


def shelf_boxes(task: str) -> np.ndarray:
    """The cells OAT's ``img_feature.py`` crops for a shelf task, bottom-aligned on the screen."""
    if task not in SHELF_LAYOUTS:
        raise InvalidInputError(f"unknown shelf task {task!r}; known: {sorted(SHELF_LAYOUTS)}")
    _, rows, cols, cw, ch, (_, screen_h), _ = SHELF_LAYOUTS[task]
    top = screen_h - ch * rows
    return np.array(
        [[c * cw, top + r * ch, (c + 1) * cw, top + (r + 1) * ch] for r in range(rows) for c in range(cols)],
        dtype=np.float64,
    )


def map_fixations_to_objects(xy: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """0-based object per fixation: the first box containing it (edges included), else the nearest centre."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        raise InvalidInputError("no boxes to map fixations to")
    x, y = xy[:, :1], xy[:, 1:]
    inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    dist = ((x - cx) ** 2 + (y - cy) ** 2) ** 0.5
    return np.where(inside.any(axis=1), inside.argmax(axis=1), dist.argmin(axis=1)).astype(np.int64)


def target_from_ground_truth(ground_truth: dict, boxes: np.ndarray) -> int:
    """0-based box with the best IoU against the annotated target box (-1 if none overlaps), as OAT."""
    gx0, gx1, gy0, gy1 = (float(ground_truth[k]) for k in ("xmin", "xmax", "ymin", "ymax"))
    best, best_index = 0.0, -1
    for index, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64).tolist()):
        left, top, right, bottom = (
            max(gx0, x0),
            max(gy0, y0),
            min(gx1, x1),
            min(gy1, y1),
        )
        if right < left or bottom < top:
            continue
        inter = (right - left) * (bottom - top)
        union = (gx1 - gx0) * (gy1 - gy0) + (x1 - x0) * (y1 - y0) - inter
        iou = inter / union if union > 0 else 0.0
        if iou > best:
            best, best_index = iou, index
    return best_index


def drop_length_outliers(trials: Sequence[SearchTrial], k: float = 3.0) -> list[SearchTrial]:
    """Keep scanpaths with ``mean - k std <= length <= mean + k std`` over the given population (std ddof=0)."""
    lengths = np.array([len(t) for t in trials], dtype=np.float64)
    if len(lengths) == 0:
        return []
    mean, std = lengths.mean(), lengths.std()
    return [t for t, n in zip(trials, lengths) if mean - k * std <= n <= mean + k * std]


# ---- Amazon -------------------------------------------------------------------------------------
def read_amazon_json(path: str | Path) -> dict:
    """Load and validate ``Amazon.json`` / ``amazon_data.json``; errors name the file and the image.

    Sizes must be positive whole numbers, boxes and fixations finite numbers (fixations no farther
    off the collage than :func:`~attnzoo.datasets.scanpaths.checked_points` allows)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"missing {path} (the Amazon book-cover annotations of STI-Dataset / OAT)")
    data = read_json(path, "Amazon annotation file (JSON)")
    if not isinstance(data, dict) or not data:
        raise DatasetFormatError(f"{path}: expected an object mapping image names to annotations")
    for name, entry in data.items():
        where = f"{path}: image {name!r}"
        if not isinstance(entry, dict):
            raise DatasetFormatError(f"{where}: annotation must be an object")
        lacking = [k for k in ("fixations", "ground_truth", "size", "target") if k not in entry]
        if lacking:
            raise DatasetFormatError(f"{where}: missing key(s) {lacking}")
        size = entry["size"]
        if not isinstance(size, dict) or not {"width", "height"} <= set(size):
            raise DatasetFormatError(f"{where}: 'size' must be {{height, width}}")
        width, height = checked_size(size["width"], size["height"], where)
        fix = entry["fixations"]
        if not isinstance(fix, dict) or not all(
            isinstance(p, list) and all(isinstance(q, list) and len(q) == 2 for q in p) for p in fix.values()
        ):
            raise DatasetFormatError(f"{where}: 'fixations' must map subject ids to lists of [x, y]")
        for subject, points in fix.items():
            checked_points(points, f"{where}, subject {subject!r}", (width, height))
        gt = entry["ground_truth"]
        if (
            not isinstance(gt, list)
            or not gt
            or not all(isinstance(g, dict) and {"xmin", "xmax", "ymin", "ymax"} <= set(g) for g in gt)
        ):
            raise DatasetFormatError(f"{where}: 'ground_truth' must be a non-empty list of {{xmin, xmax, ymin, ymax}}")
        for g in gt:
            (x0, y0), (x1, y1) = checked_points(
                [[g["xmin"], g["ymin"]], [g["xmax"], g["ymax"]]], f"{where}, ground_truth"
            )
            if x1 < x0 or y1 < y0:
                raise DatasetFormatError(f"{where}: ground_truth box {g} has xmax < xmin or ymax < ymin")
        if not isinstance(entry["target"], str):
            raise DatasetFormatError(f"{where}: 'target' must be the target image name")
    return data


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class AmazonCovers(ScanpathCollection):
    """Amazon book-cover search trials (:class:`SearchTrial`), one per (collage, subject).

        ``root`` is the folder holding ``Amazon.json`` or ``amazon_data.json`` (or one above it:
        ``AmazonCovers/`` and ``amazon_data/`` are looked into). ``boxes="auto"`` uses the binary masks
        when a ``binarymask/`` folder exists (every mask must then be present and hold 84 objects),
        else the 6 x 14 grid; ``"mask"`` requires masks, ``"grid"`` never reads them. ``meta`` of each trial
        holds ``target_name``, ``tgt_id`` (the 8th character of ``target``, as OAT), ``pair``,
        ``ground_truth``, ``boxes_from`` and ``task="amazon"``. Records follow the JSON file's order (collages
    as listed, subjects as listed), as OAT's preprocessing loops over it, so an index in its
    ``splitlist_all_amazon.txt`` names the same record here.
    """

    def __init__(
        self,
        root: str | Path,
        boxes: str = "auto",
        drop_outliers: bool = True,
        require_images: bool = False,
    ):
        if boxes not in ("auto", "mask", "grid"):
            raise InvalidInputError(f"boxes must be 'auto', 'mask' or 'grid', got {boxes!r}")
        self.root = Path(root)
        json_path = self._find_json()
        self.json_path = json_path
        base = json_path.parent
        self.images_dir = base / "images"
        self.mask_dir = base / "binarymask"
        self.target_dir = base / "target"
        data = read_amazon_json(json_path)
        use_masks = boxes == "mask" or (boxes == "auto" and self.mask_dir.is_dir())
        if boxes == "mask" and not self.mask_dir.is_dir():
            raise DatasetFormatError(
                f"missing {self.mask_dir} (OAT's binarymask/14x6-<image> files); use boxes='grid' for the approximate grid"
            )
        names = list(data)  # the file's order, which OAT's pickle (and so its permutation file) follows
        if use_masks:
            missing = [str(self.mask_dir / f"14x6-{n}") for n in names if not (self.mask_dir / f"14x6-{n}").is_file()]
            if missing:
                raise DatasetFormatError(f"{len(missing)} binary mask(s) missing, e.g. {', '.join(missing[:5])}")
        if require_images:
            missing = [str(self.images_dir / n) for n in names if not (self.images_dir / n).is_file()]
            if missing:
                raise DatasetFormatError(f"{len(missing)} collage image(s) missing, e.g. {', '.join(missing[:5])}")
        self.boxes_from = "mask" if use_masks else "grid"
        trials: list[SearchTrial] = []
        for name in names:
            entry = data[name]
            width, height = checked_size(entry["size"]["width"], entry["size"]["height"], str(json_path))
            if use_masks:
                box = self._mask_boxes(self.mask_dir / f"14x6-{name}")
            else:
                box = grid_boxes((width, height), *AMAZON_GRID)
            target = target_from_ground_truth(entry["ground_truth"][0], box)
            target_name = entry["target"]
            tgt_id = target_name[7] if len(target_name) > 7 else target_name
            layout = name.split(".")[0]
            target_path = next(
                (
                    p
                    for p in (
                        self.target_dir / target_name,
                        self.images_dir / target_name,
                    )
                    if p.is_file()
                ),
                None,
            )
            for subject, points in entry["fixations"].items():
                xy = checked_points(points, f"{json_path}: image {name!r}, subject {subject!r}", (width, height))
                trials.append(
                    SearchTrial(
                        stimulus=name,
                        image_path=self.images_dir / name,
                        subject=str(subject),
                        xy=xy,
                        image_size=(width, height),
                        boxes=box.copy(),
                        grid=AMAZON_GRID,
                        target=target,
                        objects=map_fixations_to_objects(xy, box),
                        target_image_path=target_path,
                        layout=layout,
                        meta={
                            "task": "amazon",
                            "target_name": target_name,
                            "tgt_id": tgt_id,
                            "pair": f"{layout}_{tgt_id}",
                            "ground_truth": [dict(g) for g in entry["ground_truth"]],
                            "boxes_from": self.boxes_from,
                        },
                    )
                )
        self.n_before_filter = len(trials)
        super().__init__(drop_length_outliers(trials) if drop_outliers else trials)

    def _find_json(self) -> Path:
        if self.root.is_file():
            return self.root
        for folder in (
            self.root,
            self.root / "AmazonCovers",
            self.root / "amazon_data",
        ):
            for name in ("Amazon.json", "amazon_data.json"):
                if (folder / name).is_file():
                    return folder / name
        raise DatasetFormatError(
            f"{self.root}: no Amazon.json (STI: AmazonCovers/Amazon.json) or amazon_data.json (OAT: amazon_data/amazon_data.json)"
        )

    def _mask_boxes(self, path: Path) -> np.ndarray:
        with opened_image(path, error=DatasetFormatError, what="mask image") as im:
            mask = np.asarray(im.convert("RGB") if im.mode not in ("L", "1") else im.convert("L"))
        return boxes_from_mask(mask, expected=AMAZON_GRID[0] * AMAZON_GRID[1], source=str(path))


# ---- OAT shelves ----------------------------------------------------------------------------------
_XLSX_NS = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}


#: Largest part of a workbook read (bytes, uncompressed): the shelf files are a few MB; a zip bomb is not.
MAX_XLSX_PART_BYTES = 256 << 20


def _column_index(ref: str) -> int:
    """0-based column of a cell reference such as ``"AB12"``."""
    match = re.match(r"[A-Z]{1,3}(?=\d+$)", ref)
    if match is None:
        raise ValueError(f"bad cell reference {ref!r}")
    index = 0
    for ch in match.group(0):
        index = index * 26 + ord(ch) - 64
    return index - 1


def _xlsx_part(z: zipfile.ZipFile, name: str) -> ElementTree.Element:
    if z.getinfo(name).file_size > MAX_XLSX_PART_BYTES:
        raise ValueError(f"{name} claims {z.getinfo(name).file_size:,} bytes uncompressed")
    return ElementTree.fromstring(z.read(name))


def read_xlsx(path: str | Path) -> list[dict[str, object]]:
    """First worksheet of an .xlsx as a list of row dicts keyed by the header row (stdlib only)."""
    path = Path(path)
    t_tag, v_tag = f"{{{_XLSX_NS['m']}}}t", f"{{{_XLSX_NS['m']}}}v"
    # zipfile raises NotImplementedError for unknown compression, RuntimeError for encrypted parts
    with parse_errors(path, ".xlsx workbook", also=(KeyError, IndexError, NotImplementedError, RuntimeError)):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            shared: list[str] = []
            if "xl/sharedStrings.xml" in names:
                shared = [
                    "".join(t.text or "" for t in si.iter(t_tag))
                    for si in _xlsx_part(z, "xl/sharedStrings.xml").findall("m:si", _XLSX_NS)
                ]
            sheets = sorted((n for n in names if re.fullmatch(r"xl/worksheets/sheet\d+\.xml", n)), key=_natural)
            if not sheets:
                raise DatasetFormatError(f"{path}: no worksheet in the workbook")
            sheet = _xlsx_part(z, sheets[0])
        table: list[dict[int, object]] = []
        for row in sheet.iter(f"{{{_XLSX_NS['m']}}}row"):
            cells: dict[int, object] = {}
            for pos, c in enumerate(row.findall("m:c", _XLSX_NS)):
                col = _column_index(c.get("r", "")) if c.get("r") else pos
                kind, v = c.get("t", "n"), c.find(v_tag)
                if kind == "inlineStr":
                    value: object = "".join(t.text or "" for t in c.iter(t_tag))
                elif v is None or v.text is None:
                    continue
                elif kind == "s":
                    value = shared[int(v.text)]
                elif kind in ("str", "e"):
                    value = v.text
                elif kind == "b":
                    value = v.text == "1"
                else:
                    number = float(v.text)
                    value = int(number) if number.is_integer() else number
                cells[col] = value
            table.append(cells)
    if not table:
        return []
    header = {col: str(name) for col, name in table[0].items()}
    return [{header[c]: v for c, v in row.items() if c in header} for row in table[1:] if row]


def _read_rows(path: Path) -> list[dict[str, object]]:
    if path.suffix.lower() == ".csv":
        _, rows = read_csv_rows(path, "OAT gaze table (CSV)")
        return [{k: v for k, v in row.items() if v != ""} for row in rows]  # a blank cell, as in the workbook
    return read_xlsx(path)


def _number(value: object) -> float:
    """A numeric cell (a number, or its text in a CSV); a boolean is not a number."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    return float(value)  # type: ignore[arg-type]


def _whole_number(value: object) -> int:
    """An integer cell (``3``, ``3.0``, ``"3"``); 2.5, NaN, inf or text are not object numbers."""
    number = _number(value)
    if not math.isfinite(number) or not number.is_integer() or abs(number) > 2**31:
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


class OATShelf(ScanpathCollection):
    """OAT's yogurt (Q3, 3 x 9) or wine (Q1, 2 x 11) shelf search trials as :class:`SearchTrial` s.

    ``root`` holds ``time_Q3_mousedel_new.xlsx`` / ``time_Q1_mousedel_new.xlsx`` (or ``.csv``), directly or
    under ``gaze/``, and the shelf images under ``img/Question/`` (targets under ``img/Target/`` when
    present). Scanpaths keep the file's row order; OAT's ``img_feature.py`` keeps every scanpath (no
    length filter), so none is dropped here either.
    """

    COLUMNS = ("ID", "Sub_ID", "Question", "Target", "T_Package", "Choice", "X", "Y")

    def __init__(
        self,
        root: str | Path,
        task: str = "yogurt",
        data_file: str | Path | None = None,
    ):
        if task not in SHELF_LAYOUTS:
            raise InvalidInputError(f"unknown shelf task {task!r}; known: {sorted(SHELF_LAYOUTS)}")
        self.root, self.task = Path(root), task
        prefix, rows, cols, _, _, screen, stem = SHELF_LAYOUTS[task]
        if data_file is None:
            candidates = [d / f"{stem}{ext}" for d in (self.root, self.root / "gaze") for ext in (".xlsx", ".csv")]
            data_file = next((c for c in candidates if c.is_file()), None)
            if data_file is None:
                raise DatasetFormatError(
                    f"{self.root}: missing {stem}.xlsx (OAT's {task} gaze file; also looked for .csv and under gaze/)"
                )
        self.data_file = Path(data_file)
        if not self.data_file.is_file():
            raise DatasetFormatError(f"missing {self.data_file}")
        table = _read_rows(self.data_file)
        if not table:
            raise DatasetFormatError(f"{self.data_file}: no data rows")
        lacking = [c for c in self.COLUMNS if c not in table[0]]
        if lacking:
            raise DatasetFormatError(f"{self.data_file}: missing column(s) {lacking} (has {sorted(table[0])})")
        groups: dict[str, list[dict]] = {}
        for number, row in enumerate(table, start=2):
            if "ID" not in row:
                raise DatasetFormatError(f"{self.data_file}: row {number} has an empty 'ID' cell")
            groups.setdefault(str(row["ID"]), []).append(row)
        boxes = shelf_boxes(task)
        n_objects = rows * cols
        question_dir, target_dir = (
            self.root / "img" / "Question",
            self.root / "img" / "Target",
        )
        targets = sorted(p for p in target_dir.iterdir() if p.is_file()) if target_dir.is_dir() else []
        trials = []
        for scan_id, scan in groups.items():
            where = f"{self.data_file}: scanpath ID {scan_id}"
            blank = next((c for r in scan for c in self.COLUMNS if c not in r), None)
            if blank is not None:
                raise DatasetFormatError(f"{where} has a row with an empty {blank!r} cell")
            first = scan[0]
            question = str(first["Question"])
            if not question.startswith(prefix):
                continue  # another task's rows in a combined file
            try:
                objects = np.array([_whole_number(r["Choice"]) for r in scan], dtype=np.int64) - 1
                target = _whole_number(first["T_Package"]) - 1
            except (TypeError, ValueError) as err:
                raise DatasetFormatError(f"{where}: Choice and T_Package must be object numbers ({err})") from None
            try:
                xy = checked_points([(_number(r["X"]), _number(r["Y"])) for r in scan], where, screen)
            except (TypeError, ValueError) as err:
                raise DatasetFormatError(f"{where}: X and Y must be numbers ({err})") from None
            if objects.min(initial=0) < 0 or objects.max(initial=0) >= n_objects or not 0 <= target < n_objects:
                raise DatasetFormatError(f"{self.data_file}: scanpath ID {scan_id} has objects outside 1..{n_objects}")
            target_name = str(first["Target"])
            target_path = next((p for p in targets if p.name.startswith(f"{target_name}.")), None)
            trials.append(
                SearchTrial(
                    stimulus=f"{question}.png",
                    image_path=question_dir / f"{question}.png",
                    subject=str(first["Sub_ID"]),
                    xy=xy,
                    image_size=screen,
                    boxes=boxes.copy(),
                    grid=(rows, cols),
                    target=target,
                    objects=objects,
                    target_image_path=target_path,
                    layout=question,
                    meta={
                        "task": prefix,
                        "target_name": target_name,
                        "tgt_id": target_name,
                        "pair": target_name + question,
                        "scanpath_id": scan_id,
                    },
                )
            )
        if not trials:
            raise DatasetFormatError(f"{self.data_file}: no scanpath of task {task} ({prefix}_*)")
        super().__init__(trials)


# ---- splits -------------------------------------------------------------------------------------
def _split_seed(seed: object) -> int:
    """A split's seed: an integer in [0, 2**64), as every seed here (:func:`attnzoo._values.generator_seed`).
    ``random.Random`` takes -n as n, so a split recorded as seed -1 would silently be seed 1's."""
    return generator_seed(seed, "a split's seed")


def _permutation(n: int, seed_or_file: int | str | Path) -> list[int]:
    if not isinstance(seed_or_file, (str, os.PathLike)):  # a seed (anything else is refused as one)
        order = list(range(n))
        random.Random(_split_seed(seed_or_file)).shuffle(order)
        return order
    path = Path(seed_or_file)
    if not path.is_file():
        raise DatasetFormatError(
            f"missing permutation file {path} (OAT's splitlist_all_amazon.txt: one index per line)"
        )
    try:
        order = [int(line) for line in read_text(path, "permutation file (one index per line)").split()]
    except ValueError as err:
        raise DatasetFormatError(f"{path}: expected one integer per line ({err})") from None
    if sorted(order) != list(range(n)):
        raise DatasetFormatError(
            f"{path}: not a permutation of 0..{n - 1} ({len(order)} entries) for these {n} scanpaths"
        )
    return order


def official_split(
    trials: Sequence[SearchTrial], seed_or_permutation_file: int | str | Path = 0
) -> dict[str, list[SearchTrial]]:
    """OAT's split: permute the scanpaths (``split.py``'s ``random.shuffle``, here seeded, or the
    indices read from its ``splitlist_all_amazon.txt``), then within each task in permuted order
    train = first ``int(0.8 n)``, val = up to ``int(0.9 n)``, test = the rest. Layouts and targets
    leak between the splits, as in the paper."""
    order = _permutation(len(trials), seed_or_permutation_file)
    permuted = [trials[i] for i in order]
    splits: dict[str, list[SearchTrial]] = {"train": [], "val": [], "test": []}
    tasks = list(dict.fromkeys(t.meta.get("task", "") for t in permuted))
    for task in tasks:
        items = [t for t in permuted if t.meta.get("task", "") == task]
        a, b = int(len(items) * 0.8), int(len(items) * 0.9)
        splits["train"] += items[:a]
        splits["val"] += items[a:b]
        splits["test"] += items[b:]
    return splits


def _group_key(trial: SearchTrial, by: str):
    if by == "layout":
        return trial.layout
    if by == "target":
        return trial.meta.get("target_name", trial.target)
    return (trial.layout, trial.meta.get("target_name", trial.target))


def leakage_free_split(
    trials: Sequence[SearchTrial],
    by: str = "layout",
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[SearchTrial]]:
    """Train/val/test where no layout (``by="layout"``), target (``"target"``) or (layout, target)
    pair (``"layout_target"``, OAT's leave-one-combination-out unit) falls in two splits.

    Groups are shuffled with ``seed`` and filled into train, then val, then test until each reaches
    its fraction of the scanpaths; every split gets at least one group.
    """
    if by not in ("layout", "target", "layout_target"):
        raise InvalidInputError(f"by must be 'layout', 'target' or 'layout_target', got {by!r}")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InvalidInputError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    groups: dict[object, list[SearchTrial]] = {}
    for trial in trials:
        groups.setdefault(_group_key(trial, by), []).append(trial)
    if len(groups) < 3:
        raise InvalidInputError(f"only {len(groups)} distinct {by} group(s): cannot make three disjoint splits")
    keys = sorted(groups, key=str)
    random.Random(_split_seed(seed)).shuffle(keys)
    sizes = np.cumsum([len(groups[k]) for k in keys])
    total = sizes[-1]
    cut1 = int(np.searchsorted(sizes, fractions[0] * total - 1e-9)) + 1
    cut1 = min(max(cut1, 1), len(keys) - 2)
    cut2 = int(np.searchsorted(sizes, (fractions[0] + fractions[1]) * total - 1e-9)) + 1
    cut2 = min(max(cut2, cut1 + 1), len(keys) - 1)
    parts = (keys[:cut1], keys[cut1:cut2], keys[cut2:])
    return {name: [t for k in part for t in groups[k]] for name, part in zip(("train", "val", "test"), parts)}


def load_search_trials(root: str | Path, dataset: str, drop_outliers: bool = True) -> list[SearchTrial]:
    """The trials of an ``amazon`` / ``yogurt`` / ``wine`` folder (images required for Amazon)."""
    if dataset == "amazon":
        return list(AmazonCovers(root, drop_outliers=drop_outliers, require_images=True))
    if dataset in SHELF_LAYOUTS:
        return list(OATShelf(root, task=dataset))
    raise DatasetFormatError(f"{root}: not a visual-search dataset (amazon, yogurt, wine): {dataset}")


def split_search_trials(
    trials: Sequence[SearchTrial], root: str | Path, dataset: str, scheme: str = "official", seed: int = 0
) -> dict[str, list[SearchTrial]]:
    """The split training and evaluation share: ``official`` (OAT's; for Amazon the published
    ``splitlist_all_amazon.txt`` in ``root`` or its parent when there, else a permutation seeded with
    ``seed``) or leakage-free by ``layout`` / ``target`` / ``layout_target``."""
    if scheme == "official":
        root = Path(root)
        candidates = (root / "splitlist_all_amazon.txt", root.parent / "splitlist_all_amazon.txt")
        permutation = next((p for p in candidates if p.is_file()), None) if dataset == "amazon" else None
        return official_split(trials, permutation if permutation else seed)
    if scheme in ("layout", "target", "layout_target"):
        return leakage_free_split(trials, by=scheme, seed=seed)
    raise InvalidInputError(f"split must be official, layout, target or layout_target, got {scheme!r}")
