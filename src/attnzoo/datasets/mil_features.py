"""Pre-extracted patch features of whole-slide images, in the published layouts, as uniform bags.

Layouts read (each into a lazy mapping slide_id -> :class:`FeatureBag`):

* **ACMIL** (``read_acmil_h5``): one HDF5 per dataset and encoder
  (``patch_feats_pretrain_<pretrain>.h5``) with one group per slide id holding ``feat`` (float16
  [N, D]) and ``coords`` ([N, 2], level-0 top-left), and ``attrs['label']`` (for BRACS the raw
  7-class label: map it with :func:`read_bracs_csv`).
* **CLAM** (``read_clam_features``): ``h5_files/<slide>.h5`` with ``features`` [N, D] and ``coords``
  [N, 2], and/or ``pt_files/<slide>.pt`` holding the [N, D] tensor (loaded weights-only).
* **TRIDENT** (``read_trident_features``): ``<job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``
  with ``features`` and ``coords``.
* attnzoo's own :func:`attnzoo.pipelines.wsi_features.extract_features` files (same datasets as CLAM's h5).

:func:`read_feature_bags` recognises all of them. Bags are read from disk when accessed (nothing
is held in memory unless you call :meth:`FeatureBags.preload`); every bag is checked on reading:
an empty bag, NaN/inf features or mismatched coords raise :class:`~attnzoo.errors.DatasetFormatError`
naming the file and the slide, and so does a file declaring far more data than it stores (an HDF5 dataset
mostly unwritten, a ``.pt`` with compressed zip entries), before anything is read.

Split files: Camelyon16's ``splits/camelyon/split_{seed}.json`` (``train_names``/``val_names``/
``test_names``) and ``dataset_csv/camelyon16.csv`` (``case_id,slide_id,label``); BRACS's
``dataset_csv/bracs.csv`` (``,case_id,slide_id,split_info,full_path,label``) with ACMIL's 7 -> 3
and 7 -> 2 class mappings.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnzoo._io import (
    STRUCTURE_ERRORS,
    check_regular_file,
    parse_errors,
    read_csv_rows,
    read_json,
    refuse_torch_zip_bomb,
)
from attnzoo._values import to_numpy
from attnzoo.errors import DatasetFormatError, InvalidInputError

__all__ = [
    "BRACS_CLASS_NAMES",
    "BRACS_LABEL_MAPS",
    "BRACS_SUBTYPES",
    "CAMELYON16_CLASS_NAMES",
    "FeatureBag",
    "FeatureBags",
    "SlideSplit",
    "read_acmil_h5",
    "read_bracs_csv",
    "read_camelyon16_labels",
    "read_camelyon16_split",
    "read_clam_features",
    "read_feature_bags",
    "read_slide_labels",
    "read_split_file",
    "read_trident_features",
]

#: BRACS's 7 lesion subtypes, in the order of the raw labels 0..6 of ``bracs.csv``.
BRACS_SUBTYPES = ("N", "PB", "UDH", "FEA", "ADH", "DCIS", "IC")
#: ACMIL's raw-label mappings (``split_dataset_bracs``): 3 classes = benign / atypical / malignant groups.
BRACS_LABEL_MAPS: dict[int, dict[int, int]] = {
    7: {k: k for k in range(7)},
    3: {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2},
    2: {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1},
}
BRACS_CLASS_NAMES: dict[int, tuple[str, ...]] = {
    7: BRACS_SUBTYPES,
    3: ("benign (N, PB, UDH)", "atypical (FEA, ADH)", "malignant (DCIS, IC)"),
    2: ("benign (N, PB, UDH)", "atypical or malignant (FEA, ADH, DCIS, IC)"),
}
CAMELYON16_CLASS_NAMES = ("normal", "tumor")
_CAMELYON_LABEL_WORDS = {
    "normal": 0,
    "normal_tissue": 0,
    "negative": 0,
    "tumor": 1,
    "tumour": 1,
    "tumor_tissue": 1,
    "positive": 1,
}
SPLIT_NAMES = ("train", "val", "test")
#: Largest level-0 coordinate (px) a patch can have: the largest scans are a few 10^5 px wide.
_MAX_COORD = 2.0**31
#: An HDF5 dataset up to this size is read whatever it stores; above it, what it declares must be stored in the
#: file (a small file declaring gigabytes that HDF5 would fill in is refused before reading). A ``.pt`` bag is
#: checked by :func:`attnzoo._io.refuse_torch_zip_bomb` (no compressed entries at all).
_FREE_READ_BYTES = 64 << 20
#: How many times its stored bytes a dataset may declare: an uncompressed one stores every byte (no more than
#: half unwritten), a compressed one of real features (float noise) shrinks a few times at most, never a hundred.
_MAX_EXPANSION = {"plain": 2, "filtered": 100}


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as err:
        raise ImportError(
            f'h5py is needed to read HDF5 feature files; install it with: pip install "attnzoo[wsi]" ({err})'
        ) from err
    return h5py


# ------------------------------------------------------------------------------------------- bags


@dataclass
class FeatureBag:
    """One slide's bag: ``features`` float32 [N, D], ``coords`` int64 [N, 2] (level-0 x, y of each
    patch's top-left corner) or None, and its integer ``label`` or None."""

    slide_id: str
    features: torch.Tensor
    coords: torch.Tensor | None = None
    label: int | None = None
    source: Path | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def _make_bag(slide_id: str, features: Any, coords: Any, label: Any, where: str, source: Path) -> FeatureBag:
    """Validate raw arrays into a :class:`FeatureBag` (float32 features, int64 coords)."""
    feats = to_numpy(features, f"{where}: features", error=DatasetFormatError)  # bfloat16 widened to float32
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2:
        raise DatasetFormatError(f"{where}: features must be a 2-D [N, D] array, got shape {feats.shape}")
    if feats.dtype.kind not in "iuf":  # complex values would lose their imaginary part, text has no meaning
        raise DatasetFormatError(f"{where}: features have dtype {feats.dtype}, expected real numbers (floating point)")
    if feats.shape[0] == 0:
        raise DatasetFormatError(f"{where}: empty bag (0 patches); re-extract this slide or leave it out of the split")
    if feats.shape[1] == 0:
        raise DatasetFormatError(f"{where}: features have 0 dimensions (shape {feats.shape})")
    feats = feats.astype(np.float32, copy=False)
    bad = ~np.isfinite(feats)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise DatasetFormatError(f"{where}: features hold NaN or infinite values in {rows} of {len(feats)} patches")
    coord_tensor = None
    if coords is not None:
        xy = to_numpy(coords, f"{where}: coords", error=DatasetFormatError)
        if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] != feats.shape[0]:
            raise DatasetFormatError(
                f"{where}: coords have shape {xy.shape}, expected [{feats.shape[0]}, 2] to match the features"
            )
        if xy.dtype.kind not in "iuf":
            raise DatasetFormatError(f"{where}: coords have dtype {xy.dtype}, expected real numbers (pixels)")
        xy = xy[:, :2].astype(np.float64)
        if not np.isfinite(xy).all():
            raise DatasetFormatError(f"{where}: coords hold NaN or infinite values")
        if (np.abs(xy) > _MAX_COORD).any():
            raise DatasetFormatError(f"{where}: coords reach {np.abs(xy).max():.3g} px, beyond any slide")
        coord_tensor = torch.from_numpy(np.round(xy).astype(np.int64))
    if label is not None:
        label = _bag_label(label, where)
    return FeatureBag(
        slide_id=slide_id,
        features=torch.from_numpy(np.ascontiguousarray(feats)),
        coords=coord_tensor,
        label=label,
        source=source,
    )


def _bag_label(label: Any, where: str) -> int:
    """A stored label: one whole number (``1``, ``1.0``, ``[1]``); not text, a bool, a complex or 1.5."""
    value = to_numpy(label, f"{where}: label", error=DatasetFormatError)
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise DatasetFormatError(f"{where}: label {label!r} is not an integer")
    number = float(value.reshape(-1)[0])
    if not (math.isfinite(number) and number.is_integer()):
        raise DatasetFormatError(f"{where}: label {label!r} is not an integer")
    return int(number)


def _label_mapping(labels: Mapping[str, Any]) -> dict[str, int]:
    """slide_id -> integer label, as passed by a caller; anything else is an :class:`InvalidInputError`."""
    out = {}
    for slide, label in labels.items():
        try:
            out[str(slide)] = _bag_label(label, f"labels[{slide!r}]")
        except DatasetFormatError as err:
            raise InvalidInputError(str(err)) from None
    return out


def _reading_h5(path: Path) -> contextlib.AbstractContextManager[None]:
    """Around every HDF5 read: a damaged file, or a member of the wrong kind, names the file."""
    return parse_errors(path, "HDF5 feature file (corrupt, truncated or another format)", also=STRUCTURE_ERRORS)


def _read_dataset(dset: Any, where: str) -> Any:
    """The whole of an HDF5 dataset, refused before reading where it declares far more bytes than the file
    stores for it: HDF5 fills the unwritten part (fill value) in memory, so a 1 KB file can claim gigabytes."""
    declared = int(dset.size or 0) * int(dset.dtype.itemsize)
    if declared > _FREE_READ_BYTES:
        stored = int(dset.id.get_storage_size())
        filtered = dset.id.get_create_plist().get_nfilters() > 0
        ratio = _MAX_EXPANSION["filtered" if filtered else "plain"]
        if declared > ratio * stored:
            kind = "compressed " if filtered else ""
            raise DatasetFormatError(
                f"{where}: dataset {dset.name!r} declares shape {tuple(dset.shape)} {dset.dtype} ({declared:,} bytes) "
                f"but the file stores {stored:,} bytes of {kind}data for it (mostly unwritten or inflated); "
                "refused before reading (re-extract the features)"
            )
    return dset[()]


def _load_acmil_group(path: Path, group: str) -> tuple[Any, Any, Any]:
    h5py = _h5py()
    where = f"{path} [{group}]"
    with _reading_h5(path), h5py.File(path, "r") as f:
        if group not in f or not isinstance(f[group], h5py.Group):
            raise DatasetFormatError(f"{where}: no such slide group")
        g = f[group]
        if "feat" not in g:
            raise DatasetFormatError(f"{where}: the group has no 'feat' dataset (has: {sorted(g.keys())})")
        coords = _read_dataset(g["coords"], where) if "coords" in g else None
        return _read_dataset(g["feat"], where), coords, g.attrs.get("label")


def _load_h5_bag(path: Path, slide_id: str) -> tuple[Any, Any, Any]:
    h5py = _h5py()
    with _reading_h5(path), h5py.File(path, "r") as f:
        if "features" not in f:
            raise DatasetFormatError(f"{path}: has no 'features' dataset (has: {sorted(f.keys())})")
        where = os.fspath(path)
        coords = _read_dataset(f["coords"], where) if "coords" in f else None
        return _read_dataset(f["features"], where), coords, f.attrs.get("label")


def _load_pt_bag(path: Path, slide_id: str) -> tuple[Any, Any, Any]:
    check_regular_file(path, "PyTorch tensor file (torch.save)")  # a FIFO would block the archive check
    # torch.save stores its zip entries as they are: a compressed one is not its output, and a 400 KB file would
    # otherwise load a tensor of hundreds of megabytes
    refuse_torch_zip_bomb(
        path, error=DatasetFormatError, allow_compressed=False, advice="Re-save the features with torch.save"
    )
    try:
        with parse_errors(path, "PyTorch tensor file (torch.save)", also=STRUCTURE_ERRORS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a pickle that names code: a damaged or foreign file
            raise DatasetFormatError(
                f"{path}: not a readable PyTorch tensor file (torch.save): the weights-only loader cannot parse it"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetFormatError(
            f"{path}: the .pt file needs code execution to load ({first}); attnzoo loads feature "
            "files weights-only. Re-save the features as a plain tensor."
        ) from None
    coords = label = None
    if isinstance(obj, Mapping):
        key = next((k for k in ("features", "feats", "feat") if k in obj), None)
        if key is None:
            raise DatasetFormatError(
                f"{path}: holds a dict without 'features'/'feats' (keys: {sorted(map(str, obj))[:10]})"
            )
        coords, label = obj.get("coords"), obj.get("label")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise DatasetFormatError(f"{path}: holds a {type(obj).__name__}, expected an [N, D] tensor of features")
    return obj, coords, label


@dataclass(frozen=True)
class _Entry:
    loader: Callable[[Path, str], tuple[Any, Any, Any]]
    path: Path
    key: str  # group name (ACMIL) or slide id
    coords_from: Path | None = None  # a CLAM .pt without coords: take them from the h5 of the same slide


class FeatureBags(Mapping[str, FeatureBag]):
    """A read-only mapping slide_id -> :class:`FeatureBag`, read lazily from disk.

    ``labels`` (slide_id -> int) override labels stored in the files. ``layout`` names the layout
    found (``acmil``, ``clam``, ``trident``, ``attnzoo``, ``h5_dir``, ``pt_dir``); ``source`` the file or
    folder. Picklable, so a torch Dataset over it works with DataLoader workers.
    """

    def __init__(
        self,
        entries: Mapping[str, _Entry],
        *,
        layout: str,
        source: Path,
        labels: Mapping[str, int] | None = None,
        cache: Mapping[str, FeatureBag] | None = None,
    ):
        self._entries = dict(entries)
        self.layout = layout
        self.source = Path(source)
        self.labels = _label_mapping(labels or {})
        self._cache = dict(cache or {})

    def __getitem__(self, slide_id: str) -> FeatureBag:
        if slide_id in self._cache:
            return self._cache[slide_id]
        entry = self._entries.get(slide_id)
        if entry is None:
            raise KeyError(slide_id)
        where = f"{entry.path} [{entry.key}]" if entry.loader is _load_acmil_group else os.fspath(entry.path)
        try:
            feats, coords, label = entry.loader(entry.path, entry.key)
            if coords is None and entry.coords_from is not None:
                _, coords, _ = _load_h5_bag(entry.coords_from, slide_id)
            return _make_bag(slide_id, feats, coords, self.labels.get(slide_id, label), where, entry.path)
        except MemoryError:  # reading, converting or checking a bag too large for this machine: named, not raw
            raise DatasetFormatError(
                f"{where}: the bag of slide {slide_id} needs more memory than there is (it claims more than this "
                "machine holds)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"FeatureBags(layout={self.layout!r}, source={os.fspath(self.source)!r}, slides={len(self)})"

    def path_of(self, slide_id: str) -> Path:
        """The file a slide's bag is read from."""
        return self._entries[slide_id].path

    def _derive(self, entries: Mapping[str, _Entry], labels: Mapping[str, int]) -> FeatureBags:
        cache = {k: v for k, v in self._cache.items() if k in entries}
        if labels != self.labels:
            cache = {
                k: FeatureBag(v.slide_id, v.features, v.coords, labels.get(k, v.label), v.source)
                for k, v in cache.items()
            }
        return FeatureBags(entries, layout=self.layout, source=self.source, labels=labels, cache=cache)

    def with_labels(self, labels: Mapping[str, int]) -> FeatureBags:
        """The same bags with ``labels`` overriding the stored ones (e.g. BRACS's 3-class labels)."""
        merged = {**self.labels, **_label_mapping(labels)}
        return self._derive(self._entries, merged)

    def subset(self, slide_ids: Iterable[str], *, strict: bool = True, what: str = "requested slides") -> FeatureBags:
        """The bags of ``slide_ids`` (in that order). Ids without features raise a
        :class:`~attnzoo.errors.DatasetFormatError` listing them, or with ``strict=False`` are left
        out with a warning."""
        ids = [str(s) for s in slide_ids]
        missing = [s for s in ids if s not in self._entries]
        if missing:
            message = (
                f"{self.source}: {len(missing)} of the {len(ids)} {what} have no features here: "
                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
            )
            if strict:
                raise DatasetFormatError(message)
            warnings.warn(message + " (left out)", stacklevel=2)
        return self._derive({s: self._entries[s] for s in ids if s in self._entries}, self.labels)

    def split(self, split: SlideSplit, *, strict: bool = True) -> dict[str, FeatureBags]:
        """``{"train": ..., "val": ..., "test": ...}`` bags of a split, labelled with the split's labels."""
        bags = self.with_labels(split.labels) if split.labels else self
        source = f" of {split.source}" if split.source else ""
        return {name: bags.subset(split[name], strict=strict, what=f"{name} slides{source}") for name in SPLIT_NAMES}

    def preload(self) -> FeatureBags:
        """All bags read (and checked) now and kept in memory, as ACMIL's loader does."""
        return FeatureBags(
            self._entries,
            layout=self.layout,
            source=self.source,
            labels=self.labels,
            cache={k: self[k] for k in self._entries},
        )


# ---------------------------------------------------------------------------------------- readers


def _check_exists(path: Path, kind: str) -> None:
    if not path.exists():
        raise DatasetFormatError(f"{path}: no such {kind}")


def read_acmil_h5(path: str | os.PathLike, labels: Mapping[str, int] | None = None) -> FeatureBags:
    """ACMIL's single feature file: one group per slide with ``feat``, ``coords`` and ``attrs['label']``."""
    h5py = _h5py()
    path = Path(path)
    _check_exists(path, "ACMIL feature file")
    with _reading_h5(path), h5py.File(path, "r") as f:
        groups = [k for k in f if isinstance(f[k], h5py.Group)]
        if not groups:
            raise DatasetFormatError(
                f"{path}: no slide groups; an ACMIL feature file holds one group per slide id "
                f"with 'feat' and 'coords' (top-level keys: {sorted(f.keys())[:10]})"
            )
        no_feat = [k for k in groups if "feat" not in f[k]]
        if no_feat:
            raise DatasetFormatError(f"{path}: slide groups without a 'feat' dataset: {', '.join(no_feat[:10])}")
    entries = {g: _Entry(_load_acmil_group, path, g) for g in groups}
    return FeatureBags(entries, layout="acmil", source=path, labels=labels)


def _h5_entries(folder: Path) -> dict[str, _Entry]:
    return {p.stem: _Entry(_load_h5_bag, p, p.stem) for p in sorted(folder.glob("*.h5")) if p.is_file()}


def read_clam_features(root: str | os.PathLike, labels: Mapping[str, int] | None = None) -> FeatureBags:
    """CLAM's ``h5_files/*.h5`` (features + coords) and/or ``pt_files/*.pt`` (features only).

    ``root`` is the folder holding ``h5_files``/``pt_files``, or one of those folders itself. A slide
    present in both is read from its h5 (which has coords); one only in ``pt_files`` has no coords.
    """
    root = Path(root)
    _check_exists(root, "CLAM feature folder")
    h5_dir, pt_dir = root / "h5_files", root / "pt_files"
    if not h5_dir.is_dir() and not pt_dir.is_dir():
        if any(root.glob("*.h5")):
            h5_dir = root
        elif any(root.glob("*.pt")):
            pt_dir = root
    entries: dict[str, _Entry] = {}
    if pt_dir.is_dir():
        h5_names = {p.stem: p for p in h5_dir.glob("*.h5")} if h5_dir.is_dir() else {}
        for p in sorted(pt_dir.glob("*.pt")):
            entries[p.stem] = _Entry(_load_pt_bag, p, p.stem, coords_from=h5_names.get(p.stem))
    if h5_dir.is_dir():
        entries.update(_h5_entries(h5_dir))
    if not entries:
        raise DatasetFormatError(f"{root}: no CLAM features: expected h5_files/<slide>.h5 and/or pt_files/<slide>.pt")
    return FeatureBags(dict(sorted(entries.items())), layout="clam", source=root, labels=labels)


def _trident_dirs(root: Path) -> list[Path]:
    if root.name.startswith("features_") and root.is_dir():
        return [root]
    found = [p for p in root.glob("features_*") if p.is_dir()]
    found += [p for p in root.glob("*/features_*") if p.is_dir()]
    return sorted(found)


def read_trident_features(
    root: str | os.PathLike, encoder: str | None = None, labels: Mapping[str, int] | None = None
) -> FeatureBags:
    """TRIDENT's ``features_<encoder>/<slide>.h5``; ``root`` is the job folder, its
    ``<mag>x_<size>px_<overlap>px_overlap`` folder, or a ``features_<encoder>`` folder itself.
    ``encoder`` picks one when several were extracted."""
    root = Path(root)
    _check_exists(root, "TRIDENT feature folder")
    dirs = _trident_dirs(root)
    if encoder is not None:
        dirs = [d for d in dirs if d.name == f"features_{encoder}"]
    if not dirs:
        available = sorted({d.name.removeprefix("features_") for d in _trident_dirs(root)})
        wanted = f"features_{encoder}" if encoder else "features_<encoder>"
        raise DatasetFormatError(
            f"{root}: no TRIDENT {wanted}/ folder found"
            + (f" (encoders here: {', '.join(available)})" if available else "")
        )
    if len(dirs) > 1:
        listing = ", ".join(os.fspath(d.relative_to(root)) for d in dirs)
        hint = "pass encoder=" if encoder is None else "point root at one magnification folder"
        raise DatasetFormatError(f"{root}: several TRIDENT feature folders ({listing}); {hint}")
    entries = _h5_entries(dirs[0])
    if not entries:
        raise DatasetFormatError(f"{dirs[0]}: no <slide>.h5 feature files")
    return FeatureBags(entries, layout="trident", source=dirs[0], labels=labels)


def _h5_kind(path: Path) -> str:
    """'bag' (a per-slide file with ``features``), 'acmil' (slide groups with ``feat``) or 'unknown'."""
    h5py = _h5py()
    with _reading_h5(path), h5py.File(path, "r") as f:
        if isinstance(f.get("features"), h5py.Dataset):
            return "bag"
        groups = [k for k in f if isinstance(f[k], h5py.Group)]
        if groups and all("feat" in f[k] for k in groups[:5]):
            return "acmil"
        return "unknown:" + ", ".join(sorted(f.keys())[:10])


def _single_file(
    path: Path, loader: Callable[[Path, str], tuple[Any, Any, Any]], layout: str, labels: Mapping[str, int] | None
) -> FeatureBags:
    sid = path.stem
    if loader is _load_h5_bag:
        h5py = _h5py()
        with _reading_h5(path), h5py.File(path, "r") as f:
            stored = f.attrs.get("slide_id")
            sid = stored.decode() if isinstance(stored, bytes) else str(stored) if stored is not None else sid
            layout = "attnzoo" if f.attrs.get("format") else layout
    return FeatureBags({sid: _Entry(loader, path, sid)}, layout=layout, source=path, labels=labels)


def read_feature_bags(
    path_or_root: str | os.PathLike, *, encoder: str | None = None, labels: Mapping[str, int] | None = None
) -> FeatureBags:
    """Feature bags in any layout this module reads, recognised from what is on disk.

    A file: ACMIL's multi-slide HDF5, a single per-slide HDF5 (attnzoo/CLAM/TRIDENT) or a CLAM
    ``.pt``. A folder: CLAM's (``h5_files``/``pt_files``), TRIDENT's (``features_<encoder>``, pick
    one with ``encoder``), a folder of per-slide ``.h5`` (e.g. :func:`~attnzoo.pipelines.wsi_features.extract_slides`
    output) or ``.pt`` files, or a folder holding exactly one ACMIL file. Anything else raises
    :class:`~attnzoo.errors.DatasetFormatError`.
    """
    path = Path(path_or_root)
    _check_exists(path, "feature file or folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".h5", ".hdf5", ".h5py"):
            kind = _h5_kind(path)
            if kind == "acmil":
                return read_acmil_h5(path, labels)
            if kind == "bag":
                return _single_file(path, _load_h5_bag, "h5", labels)
            raise DatasetFormatError(
                f"{path}: unknown HDF5 feature layout (top-level keys: {kind.split(':', 1)[1] or 'none'}); "
                "expected 'features' + 'coords' (CLAM/TRIDENT/attnzoo) or slide groups with 'feat' (ACMIL)"
            )
        if suffix in (".pt", ".pth"):
            return _single_file(path, _load_pt_bag, "pt", labels)
        raise DatasetFormatError(f"{path}: unknown feature file type {suffix!r}; expected .h5 or .pt")
    if (path / "h5_files").is_dir() or (path / "pt_files").is_dir():
        return read_clam_features(path, labels)
    if _trident_dirs(path):
        return read_trident_features(path, encoder, labels)
    h5_files = sorted(p for p in path.glob("*.h5") if p.is_file())
    if h5_files:
        kinds = {p: _h5_kind(p) for p in h5_files[:3]}
        if all(k == "bag" for k in kinds.values()):
            layout = "attnzoo" if _single_file(h5_files[0], _load_h5_bag, "h5", None).layout == "attnzoo" else "h5_dir"
            entries = {}
            for p in h5_files:
                entries[p.stem] = _Entry(_load_h5_bag, p, p.stem)
            return FeatureBags(entries, layout=layout, source=path, labels=labels)
        acmil = [p for p, k in kinds.items() if k == "acmil"]
        if len(h5_files) == 1 and acmil:
            return read_acmil_h5(acmil[0], labels)
        if acmil:
            raise DatasetFormatError(
                f"{path}: several ACMIL feature files ({', '.join(p.name for p in h5_files)}); pass one of them"
            )
    pt_files = sorted(path.glob("*.pt"))
    if pt_files:
        return read_clam_features(path, labels)
    raise DatasetFormatError(
        f"{path}: unknown feature layout; expected an ACMIL .h5 (one group per slide), a CLAM folder (h5_files/, "
        "pt_files/), a TRIDENT folder (features_<encoder>/) or a folder of per-slide .h5/.pt files"
    )


# ----------------------------------------------------------------------------------------- splits


@dataclass
class SlideSplit:
    """Slide ids per split, and labels (slide_id -> int) when the split file carries them."""

    train: list[str]
    val: list[str]
    test: list[str]
    labels: dict[str, int] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)

    def __getitem__(self, name: str) -> list[str]:
        if name not in SPLIT_NAMES:
            raise InvalidInputError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    @property
    def all(self) -> list[str]:
        return self.train + self.val + self.test


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    _check_exists(path, "CSV file")
    header, rows = read_csv_rows(path, "CSV file")
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetFormatError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
    if not rows:
        raise DatasetFormatError(f"{path}: no rows")
    return rows


def _int_label(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer()):
        raise DatasetFormatError(f"{where}: label {text!r} is not an integer")
    return int(value)


def read_slide_labels(csv_path: str | os.PathLike, n_classes: int | None = None) -> dict[str, int]:
    """A ``slide_id,label`` CSV (other columns ignored) -> slide_id -> integer label.

    Labels are integers (in ``0..n_classes-1`` when given), or Camelyon16's words (``normal``/``tumor``,
    CLAM's ``normal_tissue``/``tumor_tissue``) for 0/1. A slide listed twice with different labels is
    an error.
    """
    path = Path(csv_path)
    labels: dict[str, int] = {}
    for i, row in enumerate(_read_csv(path, ("slide_id", "label")), start=2):
        where = f"{path} line {i}"
        text = row["label"].lower()
        label = _CAMELYON_LABEL_WORDS[text] if text in _CAMELYON_LABEL_WORDS else _int_label(row["label"], where)
        if label < 0 or (n_classes is not None and label >= n_classes):
            allowed = "0 (normal) or 1 (tumor)" if n_classes == 2 else f"in 0..{n_classes - 1}" if n_classes else ">= 0"
            raise DatasetFormatError(f"{where}: label must be {allowed}, got {row['label']!r}")
        slide = row["slide_id"]
        if not slide:
            raise DatasetFormatError(f"{where}: empty slide_id")
        if slide in labels and labels[slide] != label:
            raise DatasetFormatError(f"{where}: slide {slide} listed twice with different labels")
        labels[slide] = label
    return labels


def read_camelyon16_labels(csv_path: str | os.PathLike) -> dict[str, int]:
    """``dataset_csv/camelyon16.csv`` (``case_id,slide_id,label``) -> slide_id -> 0 (normal) / 1 (tumour).

    Labels may also be words (``normal``/``tumor``, CLAM's ``normal_tissue``/``tumor_tissue``).
    """
    return read_slide_labels(csv_path, n_classes=2)


def read_camelyon16_split(split_json: str | os.PathLike, labels_csv: str | os.PathLike | None = None) -> SlideSplit:
    """ACMIL's ``splits/camelyon/split_{seed}.json`` (``train_names``/``val_names``/``test_names``).

    With ``labels_csv`` (``dataset_csv/camelyon16.csv``) the split carries every slide's label; a
    split slide the CSV lacks raises :class:`~attnzoo.errors.DatasetFormatError`.
    """
    path = Path(split_json)
    _check_exists(path, "split file")
    data = read_json(path, "JSON split file (train_names, val_names, test_names)")
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object with train_names, val_names and test_names")
    names: dict[str, list[str]] = {}
    for split in SPLIT_NAMES:
        key = f"{split}_names"
        value = data.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise DatasetFormatError(f"{path}: '{key}' must be a list of slide ids (keys present: {sorted(data)})")
        names[split] = list(value)
    seen: dict[str, str] = {}
    for split, ids in names.items():
        for sid in ids:
            if sid in seen:
                raise DatasetFormatError(f"{path}: slide {sid} is in both {seen[sid]} and {split}")
            seen[sid] = split
    labels: dict[str, int] = {}
    if labels_csv is not None:
        all_labels = read_camelyon16_labels(labels_csv)
        missing = [s for s in seen if s not in all_labels]
        if missing:
            raise DatasetFormatError(
                f"{labels_csv}: no label for {len(missing)} slide(s) of {path.name}: {', '.join(missing[:10])}"
            )
        labels = {s: all_labels[s] for s in seen}
    return SlideSplit(names["train"], names["val"], names["test"], labels, path)


def read_bracs_csv(csv_path: str | os.PathLike, n_classes: int = 3) -> SlideSplit:
    """ACMIL's ``dataset_csv/bracs.csv`` (``,case_id,slide_id,split_info,full_path,label``): the
    official train/val/test split and labels mapped to ``n_classes`` (7 subtypes; 3 = benign
    {N, PB, UDH} / atypical {FEA, ADH} / malignant {DCIS, IC}, ACMIL's default; 2 = benign / rest)."""
    if n_classes not in BRACS_LABEL_MAPS:
        raise InvalidInputError(f"n_classes must be one of {sorted(BRACS_LABEL_MAPS)} for BRACS, got {n_classes!r}")
    mapping = BRACS_LABEL_MAPS[n_classes]
    path = Path(csv_path)
    names: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    labels: dict[str, int] = {}
    for i, row in enumerate(_read_csv(path, ("slide_id", "split_info", "label")), start=2):
        where = f"{path} line {i}"
        slide, split = row["slide_id"], row["split_info"].lower()
        if not slide:
            raise DatasetFormatError(f"{where}: empty slide_id")
        if split not in names:
            raise DatasetFormatError(f"{where}: split_info {row['split_info']!r} is not train, val or test")
        raw = _int_label(row["label"], where)
        if raw not in mapping:
            raise DatasetFormatError(f"{where}: BRACS label must be 0..6 ({', '.join(BRACS_SUBTYPES)}), got {raw}")
        if slide in labels:
            raise DatasetFormatError(f"{where}: slide {slide} is listed twice")
        names[split].append(slide)
        labels[slide] = mapping[raw]
    return SlideSplit(names["train"], names["val"], names["test"], labels, path)


def read_split_file(
    path: str | os.PathLike, *, n_classes: int = 3, labels_csv: str | os.PathLike | None = None
) -> SlideSplit:
    """An official split file by its kind: BRACS's ``bracs.csv`` (labels mapped to ``n_classes``) or
    ACMIL's Camelyon16 ``split_{seed}.json`` (labelled from ``labels_csv`` when given)."""
    path = Path(path)
    return read_bracs_csv(path, n_classes) if path.suffix == ".csv" else read_camelyon16_split(path, labels_csv)
