"""MIT1003 free-viewing scanpaths (Judd et al., ICCV 2009), read from either published layout.

Layouts read by :class:`MIT1003` (``source="auto"`` picks the first one present):

* **pysaliency cache** (``source="pysaliency"``): the ``stimuli.hdf5`` + ``fixations.hdf5`` pair that
  ``pysaliency.get_mit1003(location)`` writes to ``<location>/MIT1003/`` (and
  ``get_mit1003_with_initial_fixation`` to ``<location>/MIT1003_initial_fix/``). ``fixations.hdf5`` is a
  ``ScanpathFixations`` v1.0 file (group ``scanpaths``: ``xs``/``ys`` NaN-padded ``[S, L]``, ``n``,
  ``length``, ``scanpath_attributes/subject``, ``fixation_attributes/{ts,durations}``), or the older
  ``FixationTrains`` v1.0-1.3 file (``train_xs``/``train_ys``/``train_ts``/``train_ns``/``train_subjects``
  [/``train_lengths``], ``scanpath_fixation_attributes/durations``). ``stimuli.hdf5`` is ``FileStimuli``
  (``filenames`` relative to the file from v2.0 on, ``shapes``). Subjects are stored as indices into
  the sorted ``DATA/`` folder names; they are mapped back to the MIT1003 initials.
* **raw release** (``source="raw"``): ``ALLSTIMULI/*.jpeg`` and ``DATA/<subject>/<image stem>.mat``.
  Each ``.mat`` holds one struct named after the image stem, cut to MATLAB's 63 characters, whose
  ``DATA(1).eyeData`` is the raw ``[N, 2]`` gaze at 240 Hz. Fixations come from
  :func:`check_fixations`, our port of ``checkFixations.m`` from MIT's ``DatabaseCode.zip``.

Both give what pysaliency gives (its ``_get_mit1003``), so records from the two sources agree:

* images in natural-sort order of their file names, subjects in sorted order, one record per
  (image, subject), empty scanpaths kept;
* ``xy`` = ``Fix.medianXY`` as checkFixations returns it (MATLAB's 1-based pixel frame: pysaliency
  does not subtract 1, and neither do we);
* fixations with ``not (0 < x < width and 0 < y < height)`` dropped (blinks, off-image);
* ``times`` = ``Fix.start / 240`` (``start`` is the 1-based sample index, so the first sample is at
  1/240 s, again as pysaliency), ``durations`` = ``Fix.duration / 1000`` (ms -> s);
* the first fixation (the forced central one) dropped unless ``initial_fixation=True``. When the
  first *raw* fixation was itself invalid, pysaliency puts a central fixation in its place before
  dropping the first one, so nothing valid is lost: we do the same.

pysaliency's three caches differ in that first fixation, and a cache of the other kind is never read
in place of the asked one (a model scored against it would meet, or miss, the forced central fixation):

* ``MIT1003/`` (``get_mit1003``) is ``initial_fixation=False``; the dropped fixation cannot be put back;
* ``MIT1003_initial_fix/`` (``get_mit1003_with_initial_fixation()``) is ``initial_fixation=True``.
  Dropping its first fixation is *not* ``get_mit1003``: where the recorded first fixation was off
  the image, ``get_mit1003`` keeps the next one, and this cache does not say where that happened;
* ``MIT1003_initial_fix_consistent/`` (``...(replace_initial_invalid_fixations=True)``) puts a central
  fixation at ``ts = 0`` where the recorded first one was off the image, so both settings are exact:
  ``initial_fixation=False`` drops each scanpath's first fixation (that is ``get_mit1003``), and
  ``initial_fixation=True`` drops only those stand-ins (a recorded fixation starts at ``ts >= 1/240``).

With only a cache of the other kind, :class:`MIT1003` raises a :class:`DatasetFormatError` naming it
and the setting that reads it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from attnzoo._io import STRUCTURE_ERRORS, parse_errors
from attnzoo.datasets.matfile import load_mat
from attnzoo.datasets.scanpaths import ScanpathCollection, ScanpathRecord, checked_points, checked_times, image_size
from attnzoo.errors import DatasetFormatError, InvalidInputError

__all__ = [
    "MIT1003",
    "MIT1003_SUBJECTS",
    "ScanpathCollection",
    "check_fixations",
    "fixations_from_gaze",
    "matlab_variable_name",
    "natural_sort_key",
]

SAMPLING_RATE = 240
"""Hz, the ETL 400 ISCAN eye tracker of the MIT1003 recordings."""

MIT1003_SUBJECTS = (
    "CNG",
    "ajs",
    "emb",
    "ems",
    "ff",
    "hp",
    "jcw",
    "jw",
    "kae",
    "krl",
    "po",
    "tmj",
    "tu",
    "ya",
    "zb",
)
"""The 15 ``DATA/`` folders, in the sorted order pysaliency numbers them (0..14)."""


def natural_sort_key(name: str) -> list:
    """natsort's default order (digit runs compare as numbers), which pysaliency uses for stimuli."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def matlab_variable_name(stem: str) -> str:
    """The variable ``extract_fixations.m`` evaluates: the file stem cut to MATLAB's 63 characters."""
    return stem[:63]


# ---------------------------------------------------------------------------------------------
# checkFixations.m (Barbara Hidalgo-Sotelo, 2006), acceleration algorithm 'A', ported line by line.
# Indices below are MATLAB's 1-based sample indices unless a name ends in `_0`.

_DEG_PER_SEC = 6
_PX_PER_DEG = 34
_ACCEL_CRIT = _PX_PER_DEG * _DEG_PER_SEC  # 204 px/s change between two overlapping windows
_WIN = 4
_STEP = 1
_FIX_DUR_CUT_PTS = round(50 * SAMPLING_RATE / 1000)  # 12 samples: shortest fixation kept between saccades


def _accel(data: np.ndarray) -> np.ndarray:
    """Window-velocity difference of checkFixations: windows of 5 samples (``k:k+winSize``), one apart."""
    n = data.shape[0]
    pos = np.zeros(n)
    pos[1:] = np.sqrt(np.diff(data[:, 0]) ** 2 + np.diff(data[:, 1]) ** 2)
    # filter(ones(1,4)/4, 1, .): an FIR moving average, zero before the first sample (so a NaN
    # spoils 4 outputs, not the rest of the trial); summed in the order Octave's filter does.
    padded = np.concatenate([np.zeros(_WIN - 1), pos])
    smooth = (((padded[:-3] + padded[1:-2]) + padded[2:-1]) + padded[3:]) * 0.25
    accel = np.zeros(n)
    last = n - _WIN - _STEP  # MATLAB k = 2 : length - winSize - stepSize (1-based)
    if last < 2:
        return accel

    def window_sum(
        offset: int,
    ) -> np.ndarray:  # sum(posChangeSM(k+offset : k+offset+winSize)), left to right
        k0 = np.arange(1, last) + offset  # 0-based first sample of each window
        total = smooth[k0]
        for j in range(1, _WIN + 1):
            total = total + smooth[k0 + j]
        return total

    scale = _WIN / SAMPLING_RATE
    accel[1:last] = window_sum(_STEP) / scale - window_sum(0) / scale
    return accel


def _fail(why: str) -> DatasetFormatError:
    return DatasetFormatError(
        f"checkFixations cannot segment this gaze trace ({why}); MATLAB would stop with an index error here"
    )


def _saccade_markers(check: np.ndarray) -> np.ndarray | None:
    """Mark samples above threshold 3 (saccade start), 1 (inside), 2 (end) and keep contiguous runs."""
    L = len(check)
    d = np.diff(check)
    each1 = list(np.flatnonzero(d == 1) + 1)
    each2 = list(np.flatnonzero(d > 1) + 1)
    e2 = np.asarray(each2)
    each3 = list(e2[np.flatnonzero(np.diff(e2) == 1) + 1]) if len(e2) > 1 else []
    last_contiguous = check[-1] - check[-2] == 1
    if last_contiguous:
        each1.append(L)
    else:
        each3.append(L)
    n = np.zeros((L, 2), dtype=np.int64)
    n[:, 0] = check
    for idx, mark in ((each1, 1), (each2, 2), (each3, 3)):
        if idx:
            n[np.asarray(idx) - 1, 1] = mark
    if last_contiguous:
        n[-1, 1] = 2
    else:
        n = n[:-1]
        each2 = each2[:-1]
    if each2:
        n[np.asarray(each2), 1] = 3  # eachsac2 + 1, 1-based -> index eachsac2 0-based
    if n[0, 1] == 1:
        n[0, 1] = 3

    kept: list[np.ndarray] = []
    if n[0, 1] == 3 and n[1, 1] == 1:
        kept.append(n[0])
    rows = len(n)
    for i in range(1, rows - 1):  # MATLAB i = 2 : length(n)-1
        mark = n[i, 1]
        starts_run = mark == 3 and n[i + 1, 1] == 1
        ends_run = mark == 2 and n[i - 1, 1] == 1 and n[i + 1, 1] == 3
        if starts_run or mark == 1 or ends_run:
            kept.append(n[i])
        if i == rows - 2:
            last_kept = kept[-1][0] if kept else 0  # nn starts as [0 0]
            if n[-1, 0] - last_kept == 1:
                kept.append(n[-1])
    if len(kept) < 3:  # length(nn) < 3 (nn is at least 1x2, so length >= 2)
        return None
    return np.stack(kept)


def check_fixations(eye_data: np.ndarray) -> dict[str, np.ndarray]:
    """Port of MIT's ``checkFixations.m``: raw 240 Hz gaze ``[N, >=2]`` -> fixations.

    Returns ``medianXY`` ``[F, 2]`` (NaN-ignoring medians, the data's own pixel frame), ``start``
    ``[F]`` (1-based sample index, as the .m file), ``end`` ``[F]`` and ``duration`` ``[F]`` in ms.

    Saccades are runs where the speed difference between two 5-sample windows one sample apart
    exceeds 204 px/s (6 deg/s at 34 px/deg), ended where that difference next drops below -204
    (searched over at most 25 samples); fixations of 12 samples (50 ms) or fewer between two
    saccades are merged into them, and a final fixation that short is dropped. Every quirk of the
    MATLAB code (5-sample windows, which markers survive, the merge rule) is kept on purpose.
    """
    data = np.asarray(eye_data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] < 2 or data.shape[0] < 1:
        raise InvalidInputError(f"eye data must be [N, 2] gaze samples, got shape {data.shape}")
    data = data[:, :2]
    N = data.shape[0]

    def no_saccade() -> dict[str, np.ndarray]:
        with warnings.catch_warnings():  # an all-NaN trace gives NaN, as nanmedian in MATLAB
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(data, axis=0)
        return {
            "medianXY": med.reshape(1, 2),
            "start": np.array([1]),
            "end": np.array([N]),
            "duration": np.array([1000.0 * N / SAMPLING_RATE]),
        }

    with np.errstate(over="ignore", invalid="ignore"):  # inf in a trace gives inf/NaN, as in MATLAB, silently
        accel = _accel(data)
    with np.errstate(invalid="ignore"):
        check = np.flatnonzero(accel > _ACCEL_CRIT) + 1
    if len(check) < 3:
        return no_saccade()
    marked = _saccade_markers(check)
    if marked is None:
        return no_saccade()

    each2 = np.flatnonzero(marked[:, 1] == 2)
    each3 = np.flatnonzero(marked[:, 1] == 3)
    with np.errstate(invalid="ignore"):
        nonzero = np.flatnonzero(accel != 0)
    last_nonzero = nonzero[-1] + 1 if len(nonzero) else -1
    good: list[int] = []
    ends: list[int] = []
    for sac in range(len(each2)):
        chk = np.array([marked[each2[sac], 0] + 1, marked[each2[sac], 0] + 2])
        with np.errstate(invalid="ignore"):
            cross = accel[chk - 1] < -_ACCEL_CRIT
        stop_after, time_ok = 25, True
        while not (cross[0] and not cross[1]) and time_ok:
            chk = chk + 1
            with np.errstate(invalid="ignore"):
                cross = accel[chk - 1] < -_ACCEL_CRIT
            stop_after -= 1
            time_ok = chk.max() < N and stop_after > 0
        # `if checkSac(eachsac2) == find(accel~=0,1,'last')` (no deceleration found): true only if
        # every end marker sits on the last nonzero acceleration, i.e. the trial ends in this saccade
        if not time_ok and np.all(marked[each2, 0] == last_nonzero):
            good.append(sac)
            ends.append(N)
        elif time_ok:
            good.append(sac)
            ends.append(int(chk[0]))

    if good:
        if len(each3) < max(good) + 1:
            raise _fail("unpaired saccade start/end markers")
        g2, g3 = each2[good], each3[good]
        decel = np.stack([marked[g2, 0], np.asarray(ends)], axis=1)
        if len(good) > 1:
            too_short = np.flatnonzero(marked[g3[1:], 0] - decel[:-1, 1] <= _FIX_DUR_CUT_PTS)  # 0-based = MATLAB-1
            keep_start = np.setdiff1d(np.arange(len(good)), too_short + 1)
            keep_end = np.setdiff1d(np.arange(len(good)), too_short)
            start_sac = marked[g3[keep_start], 0]
            end_sac = decel[keep_end].copy()
        else:
            start_sac = marked[g3, 0]
            end_sac = decel[-1:].copy()
        if N - decel[-1, 1] <= _FIX_DUR_CUT_PTS:
            end_sac[-1, 1] = N
    else:
        start_sac = np.zeros(0, dtype=np.int64)
        end_sac = np.zeros((0, 2), dtype=np.int64)

    labels = np.zeros(N, dtype=np.int64)
    inside = [np.arange(s + 1, e) for s, e in zip(start_sac, end_sac[:, 1])]
    labels[start_sac - 1] = 3
    labels[end_sac[:, 1] - 1] = 2
    if inside:
        labels[np.concatenate(inside).astype(np.int64) - 1] = 1

    each3 = np.flatnonzero(labels == 3) + 1
    each2 = np.flatnonzero(labels == 2) + 1
    fix_samples = np.flatnonzero(labels == 0) + 1
    if N - len(fix_samples) < 3:
        return no_saccade()
    if len(fix_samples) == 0 or len(each2) == 0 or len(each3) == 0:
        raise _fail("no fixation sample or no saccade end left")
    if len(each3) == 1:
        fix_start = [fix_samples[0], *(each2 + 1)] if each2[-1] != N else [fix_samples[0]]
    else:
        fix_start = [fix_samples[0], *(each2[:-1] + 1)]
        if each2[-1] != N:
            fix_start.append(each2[-1] + 1)
    starts_in_saccade = each3[0] == 1
    ends_in_saccade = each2[-1] == N
    fix_end = list(each3[1:] - 1 if starts_in_saccade else each3 - 1)
    if not ends_in_saccade:
        fix_end.append(N)
    if len(fix_end) < len(fix_start):
        raise _fail("more fixation starts than ends")

    medians, durations = [], []
    for s, e in zip(fix_start, fix_end[: len(fix_start)]):
        seg = data[s - 1 : e]
        durations.append(1000.0 * (e - s + 1) / SAMPLING_RATE)
        med = []
        for col in range(2):
            values = seg[:, col][~np.isnan(seg[:, col])]
            med.append(float(np.median(values)) if len(values) else np.nan)
        medians.append(med)
    return {
        "medianXY": np.asarray(medians, dtype=np.float64).reshape(-1, 2),
        "start": np.asarray(fix_start, dtype=np.int64),
        "end": np.asarray(fix_end[: len(fix_start)], dtype=np.int64),
        "duration": np.asarray(durations, dtype=np.float64),
    }


def fixations_from_gaze(
    eye_data: np.ndarray, width: int, height: int, initial_fixation: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """checkFixations + pysaliency's filtering: returns ``xy [T, 2]``, ``times [T]`` s, ``durations [T]`` s."""
    fix = check_fixations(eye_data)
    xs, ys = fix["medianXY"][:, 0], fix["medianXY"][:, 1]
    ts = fix["start"].astype(np.float64) / SAMPLING_RATE
    durs = fix["duration"] / 1000.0
    with np.errstate(invalid="ignore"):
        valid = (xs > 0) & (xs < width) & (ys > 0) & (ys < height)
    xs, ys, ts_v, durs_v = xs[valid], ys[valid], ts[valid], durs[valid]
    if len(valid) and not valid[0] and not initial_fixation:
        # pysaliency: an invalid first fixation is replaced by a central one, which is then dropped
        xs, ys = np.r_[0.5 * width, xs], np.r_[0.5 * height, ys]
        ts_v, durs_v = np.r_[0.0, ts_v], np.r_[durs[0], durs_v]
    first = 0 if initial_fixation else 1
    xy = np.stack([xs[first:], ys[first:]], axis=1).reshape(-1, 2)
    return xy, ts_v[first:], durs_v[first:]


# ---------------------------------------------------------------------------------------------


def _decode(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item() if value.shape == () else value.tolist()
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


_EYE_DATA_ERRORS: tuple[type[BaseException], ...] = (*STRUCTURE_ERRORS, ValueError)


def _load_mat_eye_data(path: Path, stem: str) -> np.ndarray:
    with parse_errors(path, "MATLAB v5 .mat file"):
        data = path.read_bytes()
    mat = load_mat(data, str(path), simplify_cells=True)
    name = matlab_variable_name(stem)
    variables = [k for k in mat if not k.startswith("__")]
    if name in mat:
        struct = mat[name]
    elif len(variables) == 1:  # a stem that is no valid MATLAB identifier was saved under another name
        struct = mat[variables[0]]
    else:
        raise DatasetFormatError(
            f"{path}: expected a struct variable {name!r} (the image stem cut to 63 characters), found {variables}"
        )
    try:
        data = struct["DATA"]
        first = data[0] if isinstance(data, (list, np.ndarray)) and not isinstance(data, dict) else data
        eye = np.asarray(first["eyeData"])
        if eye.dtype.kind not in "iuf":
            raise TypeError(f"eyeData holds {eye.dtype} values, not real numbers")
        eye = eye.astype(np.float64)
    except _EYE_DATA_ERRORS as err:
        raise DatasetFormatError(
            f"{path}: variable {name!r} has no DATA(1).eyeData of real numbers ({type(err).__name__}: {err})"
        ) from None
    if eye.ndim != 2 or eye.shape[1] < 2 or eye.shape[0] < 1:
        raise DatasetFormatError(f"{path}: DATA(1).eyeData must be [N, 2] gaze samples, got shape {eye.shape}")
    return eye


def _read_file_stimuli(path: Path, folder: Path) -> tuple[list[Path], list[tuple[int, ...]]]:
    """pysaliency's ``FileStimuli`` file: the image paths and their ``(height, width[, channels])``."""
    import h5py

    with parse_errors(path, "pysaliency FileStimuli file (stimuli.hdf5)", also=STRUCTURE_ERRORS):
        with h5py.File(path, "r") as f:
            kind, version = _decode(f.attrs.get("type", b"")), _decode(f.attrs.get("version", b""))
            if kind != "FileStimuli":
                raise DatasetFormatError(
                    f"{path}: expected a pysaliency FileStimuli file (attrs type='FileStimuli'), got type={kind!r}"
                )
            names = [_decode(x) for x in f["filenames"][...]]
            shapes = [tuple(int(v) for v in np.asarray(s).reshape(-1)) for s in f["shapes"][...]]
    if len(shapes) != len(names):
        raise DatasetFormatError(f"{path}: {len(names)} filenames but {len(shapes)} shapes")
    bad = next((i for i, shape in enumerate(shapes) if len(shape) < 2 or min(shape[:2]) < 1), None)
    if bad is not None:
        raise DatasetFormatError(f"{path}: image {bad} has shape {shapes[bad]}, not (height, width[, channels])")
    return [Path(n) if version < "2.0" else folder / n for n in names], shapes


def _read_scanpath_fixations(path: Path) -> dict[str, Any]:
    """The arrays of pysaliency's ``ScanpathFixations`` (v1.0) or older ``FixationTrains`` file,
    checked for shape: ``xs``/``ys`` [S, L] (and ``ts``/``durations`` when present), ``lengths``,
    ``ns`` (image index) and ``subjects`` [S] as integers."""
    import h5py

    with parse_errors(path, "pysaliency fixations file (fixations.hdf5)", also=STRUCTURE_ERRORS):
        with h5py.File(path, "r") as f:
            kind = _decode(f.attrs.get("type", b""))
            if kind == "ScanpathFixations":
                g = f["scanpaths"]
                fa = g["fixation_attributes"]
                arrays = {
                    "xs": g["xs"][...],
                    "ys": g["ys"][...],
                    "ns": g["n"][...],
                    "lengths": g["length"][...],
                    "subjects": g["scanpath_attributes"]["subject"][...],
                    "ts": fa["ts"][...] if "ts" in fa else None,
                    "durations": fa["durations"][...] if "durations" in fa else None,
                }
            elif kind == "FixationTrains":
                sfa = f.get("scanpath_fixation_attributes")
                arrays = {
                    "xs": f["train_xs"][...],
                    "ys": f["train_ys"][...],
                    "ns": f["train_ns"][...],
                    "ts": f["train_ts"][...],
                    "subjects": f["train_subjects"][...],
                    "lengths": f["train_lengths"][...] if "train_lengths" in f else None,
                    "durations": sfa["durations"][...] if sfa is not None and "durations" in sfa else None,
                }
            else:
                raise DatasetFormatError(
                    f"{path}: expected pysaliency ScanpathFixations or FixationTrains (attrs type), got type={kind!r}"
                )
    for key in ("xs", "ys", "ts", "durations"):
        if arrays[key] is not None:
            arrays[key] = np.atleast_2d(_real(arrays[key], path, key))
    xs = arrays["xs"]
    if arrays["lengths"] is None:  # FixationTrains < v1.3: each length is up to the trailing NaN padding
        arrays["lengths"] = np.array(
            [int(np.flatnonzero(~np.isnan(r))[-1]) + 1 if np.any(~np.isnan(r)) else 0 for r in xs]
        )
    for key in ("ns", "lengths", "subjects"):
        values = _real(arrays[key], path, key).reshape(-1)
        if values.shape != (xs.shape[0],) or not (np.isfinite(values).all() and (values == np.round(values)).all()):
            raise DatasetFormatError(f"{path}: '{key}' must hold one whole number per scanpath ({xs.shape[0]})")
        if (values < 0).any():
            raise DatasetFormatError(f"{path}: '{key}' holds a negative value ({int(values.min())})")
        arrays[key] = values.astype(np.int64)
    for key in ("ys", "ts", "durations"):
        if arrays[key] is not None and arrays[key].shape != xs.shape:
            raise DatasetFormatError(f"{path}: '{key}' has shape {arrays[key].shape}, 'xs' has {xs.shape}")
    return arrays


def _real(values: Any, path: Path, key: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "iuf":
        raise DatasetFormatError(f"{path}: '{key}' holds {array.dtype} values, not real numbers")
    return array.astype(np.float64)


#: pysaliency's cache folders and the ``initial_fixation`` setting each was made with.
_CACHE_SETTINGS = {"MIT1003": False, "MIT1003_initial_fix": True, "MIT1003_initial_fix_consistent": True}
#: The pysaliency call that writes each cache folder.
_CACHE_MAKERS = {
    "MIT1003": "get_mit1003",
    "MIT1003_initial_fix": "get_mit1003_with_initial_fixation",
    "MIT1003_initial_fix_consistent": "get_mit1003_with_initial_fixation(replace_initial_invalid_fixations=True)",
}
_CONSISTENT = "MIT1003_initial_fix_consistent"


def _has_cache(folder: Path) -> bool:
    return (folder / "stimuli.hdf5").is_file() and (folder / "fixations.hdf5").is_file()


class MIT1003(ScanpathCollection):
    """MIT1003 free-viewing scanpaths as :class:`ScanpathRecord` s, one per (image, subject).

    ``root`` holds ``ALLSTIMULI/`` + ``DATA/`` (raw), or the pysaliency cache files (directly, or its
    ``MIT1003/`` / ``MIT1003_initial_fix/`` / ``MIT1003_initial_fix_consistent/`` subfolders). A cache was
    filtered when it was made: only one made with ``initial_fixation``'s setting, or the consistent one
    (converted exactly, module docstring), is read; a cache of the other kind alone is an error naming the
    setting it needs. A cache in ``root`` itself is known by ``root``'s name when that is one of those
    three. ``meta["initial_fixation"]`` says which the record has and ``meta["cache"]`` the cache read
    (both ``None`` for a cache in a folder named otherwise, whose kind nothing tells).
    """

    def __init__(self, root: str | Path, source: str = "auto", initial_fixation: bool = False):
        self.root = Path(root)
        self.initial_fixation = initial_fixation
        if source not in ("auto", "raw", "pysaliency"):
            raise InvalidInputError(f"source must be 'auto', 'raw' or 'pysaliency', got {source!r}")
        if not self.root.is_dir():
            raise DatasetFormatError(f"MIT1003 root {self.root} is not a directory")
        cache = self._find_cache()
        raw_ok = (self.root / "ALLSTIMULI").is_dir() and (self.root / "DATA").is_dir()
        if source == "auto":
            source = "pysaliency" if cache is not None else "raw" if raw_ok else ""
            if not source:
                self._refuse_other_cache()
                raise DatasetFormatError(
                    f"{self.root}: no MIT1003 layout found; expected ALLSTIMULI/ + DATA/ (the raw release) or "
                    "stimuli.hdf5 + fixations.hdf5 (pysaliency's cache, also under "
                    f"{', '.join(name + '/' for name in _CACHE_SETTINGS)})"
                )
        self.source = source
        if source == "raw":
            records = self._read_raw()
        else:
            if cache is None:
                self._refuse_other_cache()
                raise DatasetFormatError(
                    f"{self.root}: no stimuli.hdf5 + fixations.hdf5 (pysaliency cache) here or under "
                    f"{', '.join(name + '/' for name in _CACHE_SETTINGS)}"
                )
            records = self._read_pysaliency(*cache)
        super().__init__(records)

    # ---- pysaliency ---------------------------------------------------------------------------
    def _caches(self) -> list[tuple[Path, str | None]]:
        """The pysaliency caches here: in ``root`` itself (known by the folder's name when it is one of
        pysaliency's, else of unknown kind) and in its subfolders."""
        own = self.root.name if self.root.name in _CACHE_SETTINGS else None
        caches = [(self.root, own)] if _has_cache(self.root) else []
        return caches + [(self.root / name, name) for name in _CACHE_SETTINGS if _has_cache(self.root / name)]

    def _find_cache(self) -> tuple[Path, str | None] | None:
        """The cache to read: the one in ``root`` if it may be read, else the folder made with
        ``initial_fixation``'s setting, else the consistent one (converted on reading)."""
        usable = [
            (folder, name)
            for folder, name in self._caches()
            if name is None or name == _CONSISTENT or _CACHE_SETTINGS[name] == self.initial_fixation
        ]
        usable.sort(key=lambda cache: (cache[0] != self.root, cache[1] == _CONSISTENT))
        return usable[0] if usable else None

    def _refuse_other_cache(self) -> None:
        """Only caches of the other setting are here: name one, and the setting that reads it."""
        folder, found = next(((f, n) for f, n in self._caches() if n is not None), (None, None))
        if found is None:
            return
        wanted = next(name for name, initial in _CACHE_SETTINGS.items() if initial == self.initial_fixation)
        why = (
            "the first fixation it dropped cannot be put back"
            if self.initial_fixation
            else "where the recorded first fixation was off the image, get_mit1003 keeps the next one, and "
            f"{found}/ does not say where that happened"
        )
        raise DatasetFormatError(
            f"{folder}: this pysaliency cache is {found}/ ({_CACHE_MAKERS[found]}, first fixations "
            f"{'kept' if _CACHE_SETTINGS[found] else 'dropped'}), but initial_fixation={self.initial_fixation} "
            f"needs {wanted}/ ({_CACHE_MAKERS[wanted]}) or {_CONSISTENT}/, and {found}/ cannot be converted exactly "
            f"({why}). Pass initial_fixation={_CACHE_SETTINGS[found]} (`attnzoo eval scanpath`: "
            f"--{'' if _CACHE_SETTINGS[found] else 'no-'}initial-fixation) to read {found}/, or add the raw release "
            f"(ALLSTIMULI/ + DATA/) or {wanted}/."
        )

    def _leading_to_drop(self, name: str | None, arrays: dict[str, Any], path: Path) -> np.ndarray:
        """How many leading fixations of each scanpath to drop to turn cache ``name`` into the asked setting:
        none, except from the consistent cache (module docstring)."""
        lengths = arrays["lengths"]
        if name != _CONSISTENT:
            return np.zeros(len(lengths), dtype=np.int64)
        if not self.initial_fixation:
            empty = np.flatnonzero(lengths == 0)
            if len(empty):
                raise DatasetFormatError(
                    f"{path}: scanpath {int(empty[0])} is empty, but every scanpath of {_CONSISTENT}/ starts with "
                    "its initial (or stand-in central) fixation: this is not that cache"
                )
            return np.ones(len(lengths), dtype=np.int64)
        if arrays["ts"] is None:
            raise DatasetFormatError(
                f"{path}: {_CONSISTENT}/ stores no fixation times, so its stand-in central fixations (ts = 0) "
                "cannot be told from recorded ones; pass initial_fixation=False, or add MIT1003_initial_fix/ or the "
                "raw release (ALLSTIMULI/ + DATA/)"
            )
        return ((lengths > 0) & (arrays["ts"][:, 0] == 0)).astype(np.int64)

    def _read_pysaliency(self, folder: Path, name: str | None) -> list[ScanpathRecord]:
        stim_path, fix_path = folder / "stimuli.hdf5", folder / "fixations.hdf5"
        filenames, shapes = _read_file_stimuli(stim_path, folder)
        arrays = _read_scanpath_fixations(fix_path)
        xs, lengths, ns, subjects = arrays["xs"], arrays["lengths"], arrays["ns"], arrays["subjects"]
        names_sorted = self._subject_names(subjects)
        drops = self._leading_to_drop(name, arrays, fix_path)
        initial = None if name is None else self.initial_fixation
        records = []
        for i in range(len(lengths)):
            n, L = int(ns[i]), int(lengths[i])
            where = f"{fix_path}: scanpath {i}"
            if not 0 <= n < len(filenames):
                raise DatasetFormatError(f"{where} refers to image {n}, but stimuli.hdf5 has {len(filenames)}")
            if not 0 <= L <= xs.shape[1]:
                raise DatasetFormatError(f"{where} claims {L} fixations, but {xs.shape[1]} are stored per scanpath")
            h, w = shapes[n][:2]
            kept = slice(int(drops[i]), L)
            xy = checked_points(np.stack([xs[i, :L], arrays["ys"][i, :L]], axis=1), where, (w, h))
            ts, durs = arrays["ts"], arrays["durations"]
            records.append(
                ScanpathRecord(
                    stimulus=filenames[n].name,
                    image_path=filenames[n],
                    subject=names_sorted[int(subjects[i])],
                    xy=xy[kept],
                    times=None if ts is None else checked_times(ts[i, :L], where, L)[kept],
                    durations=None
                    if durs is None
                    else checked_times(durs[i, :L], where, L, "durations", non_negative=True)[kept],
                    image_size=(int(w), int(h)),
                    meta={
                        "source": "pysaliency",
                        "initial_fixation": initial,
                        "cache": name,
                        "image_index": n,
                    },
                )
            )
        return records

    def _subject_names(self, subjects: np.ndarray) -> list[str]:
        ids = np.asarray(subjects).astype(np.int64)
        data = self.root / "DATA"
        if data.is_dir():
            names = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.suffix)
            if len(names) > ids.max(initial=-1):
                return names
        if ids.max(initial=-1) < len(MIT1003_SUBJECTS):
            return list(MIT1003_SUBJECTS)
        return [str(i) for i in range(int(ids.max()) + 1)]

    # ---- raw ----------------------------------------------------------------------------------
    def _read_raw(self) -> list[ScanpathRecord]:
        stim_dir, data_dir = self.root / "ALLSTIMULI", self.root / "DATA"
        for folder in (stim_dir, data_dir):
            if not folder.is_dir():
                raise DatasetFormatError(f"missing {folder} (the raw MIT1003 release has ALLSTIMULI/ and DATA/)")
        images = sorted((p.name for p in stim_dir.glob("*.jpeg")), key=natural_sort_key)
        subjects = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.suffix)
        if not images:
            raise DatasetFormatError(f"{stim_dir}: no *.jpeg stimuli")
        if not subjects:
            raise DatasetFormatError(f"{data_dir}: no subject folders")
        missing = [data_dir / s / (Path(img).stem + ".mat") for img in images for s in subjects]
        missing = [p for p in missing if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            raise DatasetFormatError(
                f"{len(missing)} eye-tracking file(s) missing, e.g. {shown}; every subject folder needs one <image stem>.mat per image"
            )
        records = []
        for img in images:
            width, height = image_size(stim_dir / img)
            stem = Path(img).stem
            for subj in subjects:
                path = data_dir / subj / f"{stem}.mat"
                eye = _load_mat_eye_data(path, stem)
                try:
                    xy, times, durs = fixations_from_gaze(eye, width, height, self.initial_fixation)
                except (InvalidInputError, DatasetFormatError) as err:
                    raise DatasetFormatError(f"{path}: {err}") from None
                records.append(
                    ScanpathRecord(
                        stimulus=img,
                        image_path=stim_dir / img,
                        subject=subj,
                        xy=xy,
                        times=times,
                        durations=durs,
                        image_size=(width, height),
                        meta={
                            "source": "raw",
                            "initial_fixation": self.initial_fixation,
                        },
                    )
                )
        return records

    def __repr__(self) -> str:
        return f"MIT1003(root={str(self.root)!r}, source={self.source!r}, records={len(self)}, stimuli={len(self.stimuli())})"
