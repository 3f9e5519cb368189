"""Scanpath metrics: string edit distance, time-delay embeddings (TDE, scaled TDE, string-based
TDE and NevaClip's scanpath plausibility), ScanMatch, MultiMatch, and OAT's object-sequence
metrics (sequence score, behavioural statistics and Δ, grid-centre mapping, NSS).

Conventions (the same as :mod:`attnzoo.datasets.scanpaths`):

* a scanpath is a ``[T, 2]`` array of ``(x, y)`` pixels, or ``[T, 3]`` with a duration in
  **seconds** as third column (MultiMatch / ScanMatch only);
* ``size`` / ``screen_size`` is ``(width, height)`` in pixels;
* ``grid`` is ``(rows, cols)``; cell ``(r, c)`` has index ``r * cols + c`` (row-major);
* an object scanpath (OAT) is a 1-D sequence of 0-based object indices.

Where a metric comes from a reference implementation, the function says which one and which of
its quirks it keeps; every deviation is listed in the docstring. Sources read: FixaTons
(``dario-zanca/FixaTons``; SED, TDE, scaled TDE, SBTDE), GazeParser's ScanMatch as shipped in
FixaTons and ``chenxy99/Scanpaths``, ``multimatch-gaze`` 0.1.3 (``docomparison``), and OAT
(``HKUST-NISL/oat_eccv24``: ``evaluation_full.py``, ``MM/calculate_mm.py``, ``saliency_metric.py``).

Pure numpy (plus scipy's Dijkstra for MultiMatch); torch tensors are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from itertools import groupby
from typing import Any

import numpy as np

from attnzoo._values import to_numpy
from attnzoo.errors import InvalidInputError

__all__ = [
    "OAT_LAYOUTS",
    "SEARCH_STATISTICS",
    "average_search_statistics",
    "behavioural_delta",
    "edit_distance",
    "fixation_nss",
    "multimatch",
    "needleman_wunsch_score",
    "nss",
    "object_scanpath_scores",
    "objects_to_points",
    "pad_scanpath",
    "sbtde_distance",
    "sbtde_similarity",
    "scaled_tde_similarity",
    "scanmatch",
    "scanpath_plausibility",
    "scanpath_to_string",
    "search_statistics",
    "search_statistics_over_samples",
    "sequence_score",
    "time_delay_embedding_distance",
]

SEARCH_STATISTICS = ("correct_target", "length", "search_ratio", "refixation_ratio", "revisit_ratio")
"""The five behavioural statistics of OAT's Δ, in the paper's order."""

OAT_LAYOUTS: dict[str, dict[str, tuple]] = {
    # From OAT's MM/calculate_mm.py (`pac_num` = (rows, cols), `pac_size` = (cell height, cell width),
    # `title` = header above the shelf). Amazon collages vary in size (about 2541-2560 x 1584-1600):
    # take the screen size from the dataset's json per image, as OAT does.
    "amazon": {"grid": (6, 14), "cell_size": (183, 267), "offset": (0, 0), "screen_size": None},
    "yogurt": {"grid": (3, 9), "cell_size": (186, 305), "offset": (0, 135), "screen_size": (1680, 1050)},
    "wine": {"grid": (2, 11), "cell_size": (152, 449), "offset": (0, 152), "screen_size": (1680, 1050)},
}
"""OAT's shelf layouts for :func:`objects_to_points`: ``grid`` (rows, cols), ``cell_size`` (width,
height) px, ``offset`` (x, y) px of the shelf's top-left corner, ``screen_size`` (width, height) px
used to normalise MultiMatch and to size the NSS map (``None``: per image). Yogurt is the data's
``Q3``, wine ``Q1``."""


# ----------------------------------------------------------------------------------------------
# input checking


def _points(xy: Any, name: str, *, columns: tuple[int, ...] = (2,), min_length: int = 1) -> np.ndarray:
    """A finite float64 ``[T, C]`` scanpath, ``C`` in ``columns``."""
    try:
        arr = to_numpy(xy, name)
        if arr.dtype == object:
            arr = arr.astype(np.float64)
    except InvalidInputError:  # a meta tensor, named as it is
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be a numeric [T, 2] array of (x, y) pixels: {exc}") from None
    if arr.ndim == 2 and arr.shape[0] == 0:
        arr = arr.reshape(0, arr.shape[1] if arr.shape[1] in columns else columns[0])
    if arr.size == 0 and arr.ndim == 1:
        arr = arr.reshape(0, columns[0])
    wanted = " or ".join(f"[T, {c}]" for c in columns)
    if arr.ndim != 2 or arr.shape[1] not in columns:
        raise InvalidInputError(
            f"{name} must be {wanted} (x, y{', duration s' if 3 in columns else ''}), got shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InvalidInputError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values: drop those fixations first")
    if arr.shape[0] < min_length:
        raise InvalidInputError(f"{name} has {arr.shape[0]} fixation(s); this metric needs at least {min_length}")
    return arr


def _size(size: Any, name: str = "size") -> tuple[float, float]:
    try:
        w, h = (float(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be (width, height) in pixels, got {size!r}") from None
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise InvalidInputError(f"{name} must be two positive finite numbers (width, height), got {size!r}")
    return w, h


def _grid(grid: Any, name: str = "grid") -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in grid)
        ok = all(int(v) == v for v in grid)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be (rows, cols), got {grid!r}") from None
    if not ok or rows < 1 or cols < 1:
        raise InvalidInputError(f"{name} must be two positive integers (rows, cols), got {grid!r}")
    return rows, cols


def _sequence(seq: Any, name: str) -> list:
    """A list of hashable symbols (a str stays a str's characters)."""
    if isinstance(seq, str):
        return list(seq)
    arr = to_numpy(seq, name) if hasattr(seq, "detach") or isinstance(seq, np.ndarray) else None
    if arr is not None:
        if arr.ndim != 1:
            raise InvalidInputError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise InvalidInputError(f"{name} contains NaN or infinite values: strip the padding first")
        return arr.tolist()
    try:
        items = list(seq)
    except TypeError:
        raise InvalidInputError(f"{name} must be a sequence (str, list, 1-D array), got {type(seq).__name__}") from None
    for v in items:
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidInputError(f"{name} contains NaN or infinite values: strip the padding first")
        if not isinstance(v, Hashable):
            raise InvalidInputError(f"{name} must hold hashable symbols, got {type(v).__name__}")
    return items


def _objects(seq: Any, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """A 1-D int64 array of object indices."""
    arr = to_numpy(seq, name)
    if arr.size == 0:
        arr = arr.reshape(0)
    if arr.ndim != 1:
        raise InvalidInputError(f"{name} must be a 1-D sequence of object indices, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InvalidInputError(f"{name} must hold integer object indices, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidInputError(f"{name} contains NaN: strip the padding (OAT's csv rows are NaN-padded) first")
        if not np.all(arr == np.round(arr)):
            raise InvalidInputError(f"{name} must hold whole object indices, got non-integer values")
    if not allow_empty and arr.size == 0:
        raise InvalidInputError(f"{name} is empty: a scanpath needs at least one fixation")
    return arr.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# string edit distance


def edit_distance(a: Any, b: Any, *, transpositions: bool = False, substitution_cost: int = 1) -> int:
    """Levenshtein distance between two sequences of hashable symbols (str, int lists, ...).

    With ``transpositions=True`` this is the *unrestricted* Damerau-Levenshtein distance, the same
    number as ``nltk.edit_distance(a, b, transpositions=True)`` (FixaTons' SBTDE uses it). An empty
    sequence is ``len`` of the other away. OAT's "ED" is the plain one on object indices.
    """
    s1, s2 = _sequence(a, "a"), _sequence(b, "b")
    n, m = len(s1), len(s2)
    prev_rows: list[list[int]] = [list(range(m + 1))]
    last_row_of: dict[Hashable, int] = {}  # last i (1-based) where s1[i-1] == symbol
    for i in range(1, n + 1):
        row = [i] + [0] * m
        above = prev_rows[-1]
        last_col_match = 0  # last j (1-based) in this row where s1[i-1] == s2[j-1]
        for j in range(1, m + 1):
            same = s1[i - 1] == s2[j - 1]
            best = min(above[j] + 1, row[j - 1] + 1, above[j - 1] + (0 if same else substitution_cost))
            if transpositions:
                k = last_row_of.get(s2[j - 1], 0)
                if k > 0 and last_col_match > 0:
                    best = min(best, prev_rows[k - 1][last_col_match - 1] + (i - k - 1) + 1 + (j - last_col_match - 1))
            if same:
                last_col_match = j
            row[j] = best
        last_row_of[s1[i - 1]] = i
        prev_rows.append(row)
        if not transpositions:
            prev_rows = prev_rows[-1:]
    return int(prev_rows[-1][m])


def scanpath_to_string(xy: Any, size: Any, grid: Any = (4, 4), *, clip: bool = True) -> str:
    """FixaTons' stringification: one letter per fixation, ``chr(ord('a') + cell)``.

    Cells are ``width // cols`` x ``height // rows`` pixels (integer division, as FixaTons), and a
    coordinate is truncated to an integer before it is binned. When ``width`` is not a multiple of
    ``cols`` the last few pixel columns (and points on or past the border) fall beyond the last
    cell: FixaTons then emits the letter of the next row (or a letter past the grid); with
    ``clip=True`` (default) such points go to the last column/row instead, which is the only
    difference from FixaTons. ``clip=False`` reproduces FixaTons exactly. Grids of more than 26
    cells continue past 'z' (still one distinct character per cell).
    """
    pts = _points(xy, "xy", min_length=0)
    width, height = _size(size)
    rows, cols = _grid(grid)
    step_x, step_y = int(width) // cols, int(height) // rows
    if step_x < 1 or step_y < 1:
        raise InvalidInputError(f"a {rows}x{cols} grid does not fit an image of {int(width)}x{int(height)} px")
    ints = np.trunc(pts).astype(np.int64)
    col = np.floor_divide(ints[:, 0], step_x)
    row = np.floor_divide(ints[:, 1], step_y)
    if clip:
        col, row = np.clip(col, 0, cols - 1), np.clip(row, 0, rows - 1)
    cells = col + row * cols
    if cells.size and cells.min() < -ord("a"):
        raise InvalidInputError("points far left/above the image give no FixaTons letter: use clip=True")
    return "".join(chr(ord("a") + int(c)) for c in cells)


# ----------------------------------------------------------------------------------------------
# time-delay embeddings (Wang et al. 2011; FixaTons; Fahimi & Bruce 2021)


def _reduce(distances: np.ndarray, reduce: str) -> float:
    if reduce == "mean":
        return float(distances.mean())
    if reduce == "hausdorff":
        return float(distances.max())
    raise InvalidInputError(f"reduce must be 'mean' or 'hausdorff', got {reduce!r}")


def _check_k(k: Any, *lengths: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k (the embedding window) must be a positive integer, got {k!r}")
    if min(lengths) < k:
        raise InvalidInputError(
            f"k={k} is longer than a scanpath ({min(lengths)} fixations): choose k <= the shorter length"
        )
    return int(k)


def _tde(human: np.ndarray, model: np.ndarray, k: int, reduce: str) -> float:
    hw = np.lib.stride_tricks.sliding_window_view(human, (k, 2)).reshape(-1, k, 2)
    mw = np.lib.stride_tricks.sliding_window_view(model, (k, 2)).reshape(-1, k, 2)
    diff = mw[:, None, :, :] - hw[None, :, :, :]
    nearest = np.sqrt(np.einsum("abkc,abkc->ab", diff, diff)).min(axis=1) / k
    return _reduce(nearest, reduce)


def time_delay_embedding_distance(human: Any, model: Any, k: int = 3, *, reduce: str = "mean") -> float:
    """Time-delay embedding distance (Wang et al. 2011), as FixaTons computes it.

    Every ``k`` consecutive model fixations are matched to the nearest ``k`` consecutive human
    fixations (Frobenius norm of the ``k x 2`` difference), divided by ``k``; ``reduce='mean'``
    averages over model windows, ``'hausdorff'`` takes the worst one. Asymmetric: ``human`` is
    the reference. Both scanpaths need at least ``k`` fixations (FixaTons returns False there;
    this raises :class:`InvalidInputError`).
    """
    h, m = _points(human, "human"), _points(model, "model")
    return _tde(h, m, _check_k(k, len(h), len(m)), reduce)


def scaled_tde_similarity(human: Any, model: Any, size: Any) -> float:
    """Scaled TDE similarity (FixaTons' ``scaled_time_delay_embedding_distance``; chenxy99's "STDE").

    Coordinates are divided by the larger image side, then ``exp(-TDE_k)`` (mean mode) is
    averaged over ``k = 1 .. min(len(human), len(model))``. 1 means identical.
    (FixaTons divides by ``max(image.shape)``, which is the larger side for any real image.)
    """
    h, m = _points(human, "human"), _points(model, "model")
    scale = max(_size(size))
    h, m = h / scale, m / scale
    sims = [math.exp(-_tde(h, m, k, "mean")) for k in range(1, min(len(h), len(m)) + 1)]
    return float(sum(sims) / len(sims))


def _string_tde(human: str, model: str, k: int, reduce: str) -> float:
    hw = {human[i : i + k] for i in range(len(human) - k + 1)}
    nearest = np.array(
        [
            min(edit_distance(mw, w, transpositions=True) for w in hw) / k
            for mw in (model[i : i + k] for i in range(len(model) - k + 1))
        ]
    )
    return _reduce(nearest, reduce)


def sbtde_distance(
    human: Any, model: Any, size: Any, *, k: int = 3, grid: Any = (4, 4), reduce: str = "mean", clip: bool = True
) -> float:
    """String-based time-delay embedding distance (Fahimi & Bruce 2021), as FixaTons computes it.

    Both scanpaths become strings (:func:`scanpath_to_string`, default 4x4 grid); every window of
    ``k`` model letters is matched to its nearest window of ``k`` human letters by edit distance
    with transpositions (nltk's, as FixaTons), divided by ``k``; then ``'mean'`` or
    ``'hausdorff'`` (max) over model windows. In ``[0, 1]``, 0 for identical strings. Defaults
    are FixaTons' (k=3, 'Mean', grid 4). Both scanpaths need at least ``k`` fixations.
    """
    h = scanpath_to_string(human, size, grid, clip=clip)
    m = scanpath_to_string(model, size, grid, clip=clip)
    return _string_tde(h, m, _check_k(k, len(h), len(m)), reduce)


def sbtde_similarity(
    human: Any, model: Any, size: Any, *, k: int | str = 3, grid: Any = (4, 4), reduce: str = "mean", clip: bool = True
) -> float:
    """``1 - sbtde_distance``: 1 for identical strings, 0 for no matching window.

    ``k='all'`` averages ``1 - SBTDE_k`` over ``k = 1 .. min(len)``, the string analogue of the
    scaled TDE. The NevaClip paper reports SBTDE similarity as "scanpath plausibility"; how it
    turns the distance into a similarity could not be checked (its §4 was not reachable), so
    ``1 - d`` (the distance is already normalised to [0, 1]) and FixaTons' defaults are used.
    """
    h = scanpath_to_string(human, size, grid, clip=clip)
    m = scanpath_to_string(model, size, grid, clip=clip)
    if isinstance(k, str):
        if k != "all":
            raise InvalidInputError(f"k must be a positive integer or 'all', got {k!r}")
        if not h or not m:
            raise InvalidInputError("k='all' needs non-empty scanpaths")
        sims = [1.0 - _string_tde(h, m, kk, reduce) for kk in range(1, min(len(h), len(m)) + 1)]
        return float(sum(sims) / len(sims))
    return 1.0 - _string_tde(h, m, _check_k(k, len(h), len(m)), reduce)


def scanpath_plausibility(
    model: Any,
    humans: Iterable[Any],
    size: Any,
    *,
    aggregate: str = "mean",
    truncate_to_human: bool = False,
    k: int | str = 3,
    grid: Any = (4, 4),
    reduce: str = "mean",
    clip: bool = True,
) -> float:
    """NevaClip's scanpath plausibility (SPP): SBTDE similarity of one model scanpath to the human
    scanpaths of the same stimulus, aggregated over humans.

    ``aggregate='mean'`` (default) or ``'max'`` over humans; ``truncate_to_human=True`` cuts the
    model scanpath to each human's length first. The paper's choice between these could not be
    verified (its §4 was not reachable): defaults are mean, no truncation, FixaTons' SBTDE
    defaults. Humans (or truncated model paths) shorter than ``k`` are skipped, as FixaTons
    yields no distance there; NaN when no human is usable.
    """
    if aggregate not in ("mean", "max"):
        raise InvalidInputError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
    m = _points(model, "model", min_length=1)
    scores = []
    for idx, human in enumerate(humans):
        h = _points(human, f"humans[{idx}]", min_length=0)
        mm = m[: len(h)] if truncate_to_human else m
        kmin = 1 if k == "all" else k
        if isinstance(kmin, (int, np.integer)) and not isinstance(kmin, bool) and min(len(h), len(mm)) < kmin:
            continue
        scores.append(sbtde_similarity(h, mm, size, k=k, grid=grid, reduce=reduce, clip=clip))
    if not scores:
        return float("nan")
    return float(max(scores) if aggregate == "max" else sum(scores) / len(scores))


# ----------------------------------------------------------------------------------------------
# ScanMatch (Cristino et al. 2010), as GazeParser's port (FixaTons, chenxy99/Scanpaths)


def _scanmatch_sequence(
    pts: np.ndarray, width: int, height: int, rows: int, cols: int, offset: tuple[float, float], temporal_bin_ms: float
) -> np.ndarray:
    d = pts.copy()
    d[:, 0] -= offset[0]
    d[:, 1] -= offset[1]
    if d.shape[1] == 3:
        d[:, 2] *= 1000.0  # GazeParser works in ms (chenxy99 multiplies seconds by 1000)
    d[d < 0] = 0
    d[:, 0] = np.where(d[:, 0] >= width, width - 1, d[:, 0])
    d[:, 1] = np.where(d[:, 1] >= height, height - 1, d[:, 1])
    d = np.trunc(d).astype(np.int64)  # GazeParser int()s every column, the duration too
    # GazeParser's mask: pixel p falls in bin int32(p * (bins / res)), the arange values
    col = (d[:, 0] * (cols / width)).astype(np.int64)
    row = (d[:, 1] * (rows / height)).astype(np.int64)
    seq = row * cols + col
    if temporal_bin_ms:
        repeats = np.round(d[:, 2] / float(temporal_bin_ms)).astype(np.int64)
        seq = np.repeat(seq, repeats)
    return seq


def scanmatch(
    a: Any,
    b: Any,
    size: Any,
    *,
    grid: Any = (6, 8),
    threshold: float = 3.5,
    gap: float = 0.0,
    offset: Any = (0, 0),
    temporal_bin_ms: float = 0.0,
) -> float:
    """ScanMatch similarity (Cristino et al. 2010) as GazeParser's Python port computes it.

    Fixations are binned on a ``grid`` (rows, cols) over ``size`` (offset subtracted, negatives
    set to 0, points past the border clamped to the last pixel, then truncated to int). With
    ``temporal_bin_ms > 0`` each fixation's bin is repeated ``round(duration_ms / bin)`` times
    (needs ``[T, 3]`` inputs, durations in seconds; they are truncated to whole ms as GazeParser
    does). Substitution score = ``threshold - distance between bins`` (in bins); Needleman-Wunsch
    with a linear ``gap``; score = ``max(F) / (threshold * max(len_a, len_b))`` (GazeParser takes
    the max over the whole DP matrix, not its corner, and initialises ``F[i, 0] = gap * (i + 1)``:
    both kept). 1 for identical sequences.

    Defaults are GazeParser's constructor defaults (8 x 6 bins, threshold 3.5, gap 0, no temporal
    binning). chenxy99's OSIE/COCO-Search18 evaluation uses 16 x 12 bins at 320 x 240, threshold
    3.5, with and without 50 ms temporal bins; FixaTons' wrapper uses 14 x 8 bins and 50 ms.
    """
    pa = _points(a, "a", columns=(2, 3))
    pb = _points(b, "b", columns=(2, 3))
    width, height = (int(v) for v in _size(size))
    rows, cols = _grid(grid)
    try:
        off = tuple(float(v) for v in offset)
        assert len(off) == 2
    except (TypeError, ValueError, AssertionError):
        raise InvalidInputError(f"offset must be (x, y) pixels, got {offset!r}") from None
    if not threshold > 0:
        raise InvalidInputError(f"threshold must be positive (it is the best substitution score), got {threshold}")
    if temporal_bin_ms < 0:
        raise InvalidInputError(f"temporal_bin_ms must be >= 0, got {temporal_bin_ms}")
    if temporal_bin_ms and (pa.shape[1] != 3 or pb.shape[1] != 3):
        raise InvalidInputError("temporal binning needs durations: pass [T, 3] arrays (x, y, duration in seconds)")
    sa = _scanmatch_sequence(pa, width, height, rows, cols, off, temporal_bin_ms)
    sb = _scanmatch_sequence(pb, width, height, rows, cols, off, temporal_bin_ms)
    n, m = len(sa), len(sb)
    if max(n, m) == 0:
        raise InvalidInputError("ScanMatch of two empty sequences is undefined (all durations rounded to 0 bins?)")
    br, bc = np.divmod(np.arange(rows * cols), cols)
    dist = np.sqrt((bc[:, None] - bc[None, :]) ** 2 + (br[:, None] - br[None, :]) ** 2)
    sub = threshold - dist
    f = np.zeros((n + 1, m + 1))
    f[:, 0] = gap * (np.arange(n + 1) + 1)
    f[0, :] = gap * (np.arange(m + 1) + 1)
    for i in range(1, n + 1):
        srow = sub[sa[i - 1]]
        for j in range(1, m + 1):
            f[i, j] = max(f[i - 1, j - 1] + srow[sb[j - 1]], f[i, j - 1] + gap, f[i - 1, j] + gap)
    return float(f.max() / (threshold * max(n, m)))


# ----------------------------------------------------------------------------------------------
# MultiMatch (Jarodzka et al. 2010; Dewhurst et al. 2012), agreeing with multimatch-gaze


def pad_scanpath(xy: Any, min_length: int = 3) -> np.ndarray:
    """OAT's MultiMatch padding: ``[max(T, min_length), 3]`` (x, y, duration) with duration 1.

    OAT (``MM/calculate_mm.py``) fills an all-ones array, so the padded rows are the point
    ``(1, 1)`` with duration 1, not repeats of the last fixation; this keeps that. ``[T, 3]``
    input keeps its durations.
    """
    pts = _points(xy, "xy", columns=(2, 3), min_length=0)
    out = np.ones((max(len(pts), int(min_length)), 3))
    out[: len(pts), : pts.shape[1]] = pts
    return out


def _calcangle(x1: float, y1: float, x2: float, y2: float) -> float:
    """Angle between two saccades in degrees (NaN if one has zero length)."""
    norms = math.sqrt(x1 * x1 + y1 * y1) * math.sqrt(x2 * x2 + y2 * y2)
    if norms == 0:
        return float("nan")
    return math.degrees(math.acos(min(1.0, max(-1.0, (x1 * x2 + y1 * y2) / norms))))


def _saccade(lenx: float, leny: float, x: float, y: float) -> dict[str, float]:
    return {
        "x": x,
        "y": y,
        "lenx": lenx,
        "leny": leny,
        "rho": float(np.sqrt(lenx**2 + leny**2)),
        "theta": float(np.arctan2(leny, lenx)),
    }


def _simplify_direction(sacs: list[dict], durs: list[float], tdir: float, tdur: float) -> tuple[list, list]:
    if not sacs:
        return sacs, durs
    out, out_d, i, n = [], [], 0, len(sacs)
    while i < n:
        if i < n - 1:
            s, t = sacs[i], sacs[i + 1]
            angle = _calcangle(s["lenx"], s["leny"], t["lenx"], t["leny"])
            if angle < tdir and durs[i + 1] < tdur:
                out.append(_saccade(s["lenx"] + t["lenx"], s["leny"] + t["leny"], s["x"], s["y"]))
                out_d.append(durs[i])
                i += 2
                continue
        out.append(dict(sacs[i]))
        out_d.append(durs[i])
        i += 1
    out_d.append(durs[-1])
    return out, out_d


def _simplify_length(sacs: list[dict], durs: list[float], tamp: float, tdur: float) -> tuple[list, list]:
    if not sacs:
        return sacs, durs
    out, out_d, i, n = [], [], 0, len(sacs)
    while i < n:
        s = sacs[i]
        if i == n - 1:
            # multimatch-gaze folds a short last saccade into the previous *output* saccade, but
            # with the sum of the last two *input* vectors and without moving its start point
            # (it raises IndexError when there is no previous saccade: kept unchanged here).
            if s["rho"] < tamp and (durs[-1] < tdur or durs[-2] < tdur) and out and n >= 2:
                vx, vy = sacs[-2]["lenx"] + sacs[-1]["lenx"], sacs[-2]["leny"] + sacs[-1]["leny"]
                out[-1] = _saccade(vx, vy, out[-1]["x"], out[-1]["y"])
                out_d.append(durs[i - 1])
                i += 1
                continue
        elif s["rho"] < tamp and (durs[i + 1] < tdur or durs[i] < tdur):
            t = sacs[i + 1]
            out.append(_saccade(s["lenx"] + t["lenx"], s["leny"] + t["leny"], s["x"], s["y"]))
            out_d.append(durs[i])
            i += 2
            continue
        out.append(dict(s))
        out_d.append(durs[i])
        i += 1
    out_d.append(durs[-1])
    return out, out_d


def _vector_scanpath(pts: np.ndarray, grouping: bool, tdir: float, tdur: float, tamp: float) -> dict[str, np.ndarray]:
    x, y, dur = pts[:, 0], pts[:, 1], pts[:, 2]
    lenx, leny = np.diff(x), np.diff(y)
    if grouping:
        sacs = [
            {
                "x": float(x[i]),
                "y": float(y[i]),
                "lenx": float(lenx[i]),
                "leny": float(leny[i]),
                "rho": float(np.sqrt(lenx[i] ** 2 + leny[i] ** 2)),
                "theta": float(np.arctan2(leny[i], lenx[i])),
            }
            for i in range(len(lenx))
        ]
        durs = [float(d) for d in dur]
        prev = len(durs)
        while True:
            sacs, durs = _simplify_direction(sacs, durs, tdir, tdur)
            sacs, durs = _simplify_length(sacs, durs, tamp, tdur)
            if len(durs) == prev:
                break
            prev = len(durs)
        return {
            key: np.array([s[key] for s in sacs], dtype=np.float64)
            for key in ("x", "y", "lenx", "leny", "rho", "theta")
        } | {"dur": np.array(durs, dtype=np.float64)}
    return {
        "x": x[:-1],
        "y": y[:-1],
        "lenx": lenx,
        "leny": leny,
        "rho": np.sqrt(lenx**2 + leny**2),
        "theta": np.arctan2(leny, lenx),
        "dur": dur,
    }


def _alignment_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """multimatch-gaze's alignment: Dijkstra on the right/down/diagonal grid graph whose edge into
    node (i, j) weighs ``cost[i, j]``, built in the same edge order so ties resolve the same way."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    n1, n2 = cost.shape
    node = np.arange(n1 * n2).reshape(n1, n2)
    ii, jj = np.divmod(node, n2)
    # candidate edges per node in the package's order: right, down, diagonal
    dst = np.stack([node + 1, node + n2, node + n2 + 1], axis=-1)
    ok = np.stack([jj < n2 - 1, ii < n1 - 1, (ii < n1 - 1) & (jj < n2 - 1)], axis=-1)
    padded = np.pad(cost, ((0, 1), (0, 1)))
    wt = np.stack([padded[ii, jj + 1], padded[ii + 1, jj], padded[ii + 1, jj + 1]], axis=-1)
    rows = np.repeat(node.ravel(), 3).reshape(-1, 3)[ok.reshape(-1, 3)]
    cols, weights = dst.reshape(-1, 3)[ok.reshape(-1, 3)], wt.reshape(-1, 3)[ok.reshape(-1, 3)]
    end = n1 * n2 - 1
    rows, cols, weights = np.append(rows, end), np.append(cols, end), np.append(weights, 0.0)  # the package's self-loop
    graph = coo_matrix((weights, (rows, cols)), shape=(n1 * n2, n1 * n2)).tocsr()
    _, pred = dijkstra(csgraph=graph, directed=True, indices=0, return_predecessors=True)
    path = [end]
    while path[-1] != 0:
        path.append(int(pred[path[-1]]))
    p = np.array(path[::-1])
    return p // n2, p % n2


def multimatch(
    a: Any,
    b: Any,
    screen_size: Any,
    *,
    grouping: bool = False,
    direction_threshold: float = 0.0,
    duration_threshold: float = 0.0,
    amplitude_threshold: float = 0.0,
) -> dict[str, float]:
    """MultiMatch similarities: ``vector``, ``direction``, ``length``, ``position``, ``duration``
    (1 = identical), plus ``mean_without_duration`` (OAT's "Avg MM", the mean of the first four).

    Our implementation of ``multimatch_gaze.docomparison`` with the same defaults (no
    simplification; ``grouping=True`` with direction (deg) / duration (s) / amplitude (px)
    thresholds reproduces its simplification, quirks included) and the same alignment (scipy's
    Dijkstra on the same graph, so ties resolve alike). ``a``/``b`` are ``[T, 2]`` (durations 1
    s, as OAT) or ``[T, 3]`` with durations in seconds. Fewer than 3 fixations gives NaN for all
    five, as the package does; pad with :func:`pad_scanpath` to score them the OAT way.
    Differences from the package, where it would raise instead: a saccade cosine rounding past
    +/-1 is clipped; a short lone last saccade is kept.
    """
    pa = _points(a, "a", columns=(2, 3))
    pb = _points(b, "b", columns=(2, 3))
    width, height = _size(screen_size, "screen_size")
    for name, value in (
        ("direction_threshold", direction_threshold),
        ("duration_threshold", duration_threshold),
        ("amplitude_threshold", amplitude_threshold),
    ):
        if not (isinstance(value, (int, float, np.number)) and math.isfinite(value)):
            raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    keys = ("vector", "direction", "length", "position", "duration")
    if len(pa) < 3 or len(pb) < 3:
        return {key: float("nan") for key in keys} | {"mean_without_duration": float("nan")}
    if pa.shape[1] == 2:
        pa = np.column_stack([pa, np.ones(len(pa))])
    if pb.shape[1] == 2:
        pb = np.column_stack([pb, np.ones(len(pb))])
    s1 = _vector_scanpath(pa, grouping, direction_threshold, duration_threshold, amplitude_threshold)
    s2 = _vector_scanpath(pb, grouping, direction_threshold, duration_threshold, amplitude_threshold)
    if len(s1["lenx"]) == 0 or len(s2["lenx"]) == 0:
        raise InvalidInputError("simplification left no saccade to compare: lower the thresholds")
    dx = np.abs(s1["lenx"][:, None] - s2["lenx"][None, :])
    dy = np.abs(s1["leny"][:, None] - s2["leny"][None, :])
    i, j = _alignment_path(np.sqrt(dx**2 + dy**2))

    vector = np.sqrt((s1["lenx"][i] - s2["lenx"][j]) ** 2 + (s1["leny"][i] - s2["leny"][j]) ** 2)
    t1, t2 = s1["theta"][i], s2["theta"][j]
    t1 = np.where(t1 < 0, math.pi + (math.pi + t1), t1)
    t2 = np.where(t2 < 0, math.pi + (math.pi + t2), t2)
    angle = np.abs(t1 - t2)
    angle = np.where(angle > math.pi, 2 * math.pi - angle, angle)
    length = np.abs(s1["rho"][i] - s2["rho"][j])
    position = np.sqrt((s1["x"][i] - s2["x"][j]) ** 2 + (s1["y"][i] - s2["y"][j]) ** 2)
    d1, d2 = s1["dur"][i], s2["dur"][j]
    with np.errstate(invalid="ignore", divide="ignore"):
        duration = np.abs(d1 - d2) / np.abs(np.maximum(d1, d2))

    diagonal = math.sqrt(width**2 + height**2)
    out = {
        "vector": 1 - float(np.median(vector)) / (2 * diagonal),
        "direction": 1 - float(np.median(angle)) / math.pi,
        "length": 1 - float(np.median(length)) / diagonal,
        "position": 1 - float(np.median(position)) / diagonal,
        "duration": 1 - float(np.median(duration)),
    }
    out["mean_without_duration"] = (out["vector"] + out["direction"] + out["length"] + out["position"]) / 4
    return out


# ----------------------------------------------------------------------------------------------
# OAT: object sequences


def needleman_wunsch_score(a: Any, b: Any, *, match: float = 1.0, mismatch: float = 0.0, gap: float = 0.0) -> float:
    """Global alignment score (Needleman-Wunsch, linear gap) of two symbol sequences.

    ``F[i, 0] = gap * i``; each cell takes the best of diagonal + (match or mismatch) and a gap
    either way; the score is ``F[len(a), len(b)]``.
    """
    s1, s2 = _sequence(a, "a"), _sequence(b, "b")
    prev = [gap * j for j in range(len(s2) + 1)]
    for i in range(1, len(s1) + 1):
        row = [gap * i] + [0.0] * len(s2)
        for j in range(1, len(s2) + 1):
            diag = prev[j - 1] + (match if s1[i - 1] == s2[j - 1] else mismatch)
            row[j] = max(diag, prev[j] + gap, row[j - 1] + gap)
        prev = row
    return float(prev[-1])


def sequence_score(pred: Any, gt: Any) -> float:
    """OAT's SS (``saliency_metric.nw_matching``): NW score with match 1, mismatch 0, gap 0 on
    object indices, divided by ``max(len(pred), len(gt))``. In [0, 1]; not the clustered SS of
    Gazeformer/HAT. 0 when one sequence is empty.
    """
    p, g = _sequence(pred, "pred"), _sequence(gt, "gt")
    if not p and not g:
        raise InvalidInputError("sequence score of two empty scanpaths is undefined")
    return needleman_wunsch_score(p, g) / max(len(p), len(g))


def search_statistics(objects: Any, target: int) -> dict[str, float]:
    """OAT's five behavioural statistics of one object scanpath (``evaluation_full.behavior``).

    ``correct_target``: 1.0 if the last fixation is on ``target``; ``length``: number of
    fixations, the final one on the target included (OAT strips only BOS/EOS); the fixations
    are grouped into runs of the same object: ``refixation_ratio`` = sum(run - 1) / length,
    ``revisit_ratio`` = runs on an object seen in an earlier run / length, ``search_ratio`` =
    the other runs / length. The three ratios sum to 1.
    """
    seq = _objects(objects, "objects")
    n = len(seq)
    search = refix = revisit = 0
    seen: set[int] = set()
    for obj, run in groupby(seq.tolist()):
        run_length = sum(1 for _ in run)
        if obj in seen:
            revisit += 1
        else:
            search += 1
        refix += run_length - 1
        seen.add(obj)
    return {
        "correct_target": float(int(seq[-1]) == int(target)),
        "length": float(n),
        "search_ratio": search / n,
        "refixation_ratio": refix / n,
        "revisit_ratio": revisit / n,
    }


def object_scanpath_scores(pred: Any, human: Any, target: int) -> dict[str, Any]:
    """OAT's per-trial scores of a predicted object scanpath against an observer's: ``ss``
    (:func:`sequence_score`, 0 for an empty prediction), ``edit_distance`` and ``stats``
    (:func:`search_statistics`, ``None`` for an empty prediction: it has no last fixation)."""
    p, h = _objects(pred, "pred", allow_empty=True), _objects(human, "human", allow_empty=True)
    return {
        "ss": sequence_score(p, h) if len(p) else 0.0,
        "edit_distance": float(edit_distance(p.tolist(), h.tolist())),
        "stats": search_statistics(p, target) if len(p) else None,
    }


def average_search_statistics(stats: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each statistic over a list of :func:`search_statistics` dicts."""
    stats = list(stats)
    if not stats:
        raise InvalidInputError("no statistics to average")
    try:
        return {key: float(np.mean([s[key] for s in stats])) for key in SEARCH_STATISTICS}
    except KeyError as exc:
        raise InvalidInputError(f"a statistics dict lacks {exc}: pass search_statistics() outputs") from None


def search_statistics_over_samples(samples: Iterable[Any], target: int) -> dict[str, float]:
    """OAT's "multi" row: each statistic averaged over the stochastic scanpaths of one trial
    (OAT draws 100 per trial). Then average trials with :func:`average_search_statistics`."""
    return average_search_statistics(search_statistics(s, target) for s in samples)


def behavioural_delta(model_stats: Mapping[str, float], human_stats: Mapping[str, float]) -> float:
    """OAT's Δ = (1/5) * sum_k |b_k(model) - b_k(human)| / b_k(human) over :data:`SEARCH_STATISTICS`.

    As ``evaluation_full.py`` does it, pass statistics already **averaged over the test set**
    (:func:`average_search_statistics` of per-trial stats; for sampled models, of
    :func:`search_statistics_over_samples`): Δ is taken of dataset means, not averaged per
    scanpath. Division follows its ``torch.nansum(a / b) / 5``: a statistic that is 0 for both
    adds 0 (0/0 = NaN, skipped but still counted in the 5); model != 0 with human 0 gives inf.
    """
    terms = []
    for key in SEARCH_STATISTICS:
        try:
            m, h = float(model_stats[key]), float(human_stats[key])
        except KeyError:
            raise InvalidInputError(
                f"statistics lack {key!r}: pass dicts from search_statistics / average_search_statistics"
            ) from None
        if not (math.isfinite(m) and math.isfinite(h)):
            raise InvalidInputError(f"statistic {key!r} is not finite (model {m}, human {h})")
        if h == 0:
            terms.append(0.0 if m == 0 else math.inf)
        else:
            terms.append(abs(m - h) / h)
    return float(sum(terms) / len(SEARCH_STATISTICS))


def objects_to_points(objects: Any, grid: Any, cell_size: Any, offset: Any = (0, 0)) -> np.ndarray:
    """Object indices to the centres of their shelf cells, ``[T, 2]`` (x, y) pixels, as OAT maps
    predictions for MultiMatch and NSS (``MM/calculate_mm.py``): object ``i`` sits at row
    ``i // cols``, column ``i % cols``; ``x = off_x + (col + 0.5) * w``, ``y = off_y + (row + 0.5) * h``.
    The layouts OAT uses are in :data:`OAT_LAYOUTS`.
    """
    seq = _objects(objects, "objects", allow_empty=True)
    rows, cols = _grid(grid)
    try:
        w, h = (float(v) for v in cell_size)
        ox, oy = (float(v) for v in offset)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"cell_size and offset must be pairs of numbers, got {cell_size!r}, {offset!r}"
        ) from None
    if seq.size and (seq.min() < 0 or seq.max() >= rows * cols):
        raise InvalidInputError(
            f"object indices must lie in [0, {rows * cols - 1}] for a {rows}x{cols} grid, "
            f"got {seq.min()}..{seq.max()} (EOS/PAD/BOS tokens must be stripped)"
        )
    r, c = np.divmod(seq, cols)
    return np.column_stack([ox + c * w + w / 2, oy + r * h + h / 2]).astype(np.float64)


def _pixels(pts: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Round half to even (Python's round, as OAT) and clamp into the image."""
    x = np.clip(np.rint(pts[:, 0]).astype(np.int64), 0, width - 1)
    y = np.clip(np.rint(pts[:, 1]).astype(np.int64), 0, height - 1)
    return x, y


def nss(saliency_map: Any, gt_points: Any) -> float:
    """Normalised scanpath saliency: the z-scored map (population std) averaged over the fixated
    pixels. Fixations are rounded half to even and clamped into the map; several fixations on one
    pixel count once (a binary fixation map, as OAT and the MIT code use). NaN for a flat map.
    """
    smap = to_numpy(saliency_map, "saliency_map")
    if smap.ndim != 2 or smap.size == 0:
        raise InvalidInputError(f"saliency_map must be a non-empty [H, W] array, got shape {smap.shape}")
    smap = smap.astype(np.float64)
    if not np.isfinite(smap).all():
        raise InvalidInputError("saliency_map contains NaN or infinite values")
    gt = _points(gt_points, "gt_points")
    height, width = smap.shape
    x, y = _pixels(gt, width, height)
    fixated = np.zeros(smap.shape, dtype=bool)
    fixated[y, x] = True
    std = smap.std()
    if std == 0:
        return float("nan")
    return float(((smap - smap.mean()) / std)[fixated].mean())


def fixation_nss(pred_points: Any, gt_points: Any, size: Any) -> float:
    """OAT's NSS of predicted fixations (``MM/calculate_mm.compute_nss``): a binary map with a 1 at
    every predicted point (pool all sampled scanpaths of a trial), unblurred, z-scored, averaged
    at the human fixations. Pixels are ``round()``-ed half to even; OAT clamps predictions only at
    the right/bottom edge (and would crash on a GT point outside the image): both are clamped to
    the image here.
    """
    width, height = (int(v) for v in _size(size))
    pred = _points(pred_points, "pred_points")
    x, y = _pixels(pred, width, height)
    pmap = np.zeros((height, width))
    pmap[y, x] = 1.0
    return nss(pmap, gt_points)
