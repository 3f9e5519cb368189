"""Whole-slide images: open a slide, find its tissue, tile it at a magnification, read the tiles.

The path from a slide file to its patches, in steps that can also be used alone::

    slide = open_slide("tumor_001.tif")                # OpenSlide (svs/tif/ndpi/mrxs/...) or a plain image
    mask = segment_tissue(slide)                       # CLAM's saturation threshold at a ~64x downsample
    grid = patch_grid(slide, mask, magnification=20)   # level-0 top-left coords + what to read where
    patches = PatchDataset(slide, grid)                # read, resized, ImageNet-normalised tensors

Embedding the patches with an encoder (a resumable inference pipeline writing one HDF5 file per slide)
is :func:`attnzoo.pipelines.wsi_features.extract_features`; this module holds no model code.

Resolution is always asked for as a magnification (``magnification=20``) or in micrometres per
pixel (``mpp=0.5``), never as a pyramid level: the level and the region size to read are derived
from the slide's metadata (``openslide.objective-power``, ``openslide.mpp-x`` or the TIFF resolution
tags), read from the finest level that is at least as fine as the target, and resized. When the
metadata is missing, pass ``base_magnification=`` / ``base_mpp=``. A base magnification derived from
mpp alone is snapped to the nearest standard objective (0.243 µm/px -> 40x), as scanners label them.

ACMIL's Step1/Step2 (from CLAM): 512 px at level 0 of a 40x slide (= 256 px at 20x), resized to
224 and ImageNet-normalised. That is ``magnification=20, patch_size=256, input_size=224,
read_level="base"`` here (without ``read_level="base"``, a slide with a 2x level such as Camelyon16's
is read from that level instead: faster, other pixels); the default ``patch_size=224`` reads exactly
224 px at 20x.

Needs the ``wsi`` extra (``pip install "attnzoo[wsi]"``: openslide-python, openslide-bin, tifffile,
h5py). Plain images (PNG/JPEG, or TIFFs OpenSlide cannot open) are read into memory as a single level
without OpenSlide.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from attnzoo._io import check_regular_file, parse_errors
from attnzoo._values import env_whole_number, real_number, whole_number
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError, MissingDependencyError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WSI_EXTRA_HINT",
    "PatchDataset",
    "PatchGrid",
    "PatchTransform",
    "Slide",
    "TissueMask",
    "import_wsi_dependency",
    "magnification_from_mpp",
    "open_slide",
    "patch_grid",
    "segment_tissue",
    "slide_id",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WSI_EXTRA_HINT = 'pip install "attnzoo[wsi]"'
#: Largest image (pixels) the in-memory reader decodes, and the largest region one read returns, unless
#: ``ATTNZOO_MAX_SLIDE_PIXELS`` says otherwise (read at each use: :func:`fallback_max_pixels`); bigger slides
#: need OpenSlide (a pyramidal file).
FALLBACK_MAX_PIXELS = 1 << 28
#: Bytes per pixel of that limit a TIFF page the in-memory reader decodes may take as stored (samples per pixel x
#: bytes per sample): an 8-bit RGBA page at the pixel limit, a 16-bit RGBA page (8 bytes a pixel) of half as many.
FALLBACK_BYTES_PER_PIXEL = 4
#: Standard objectives and the usual µm/px they scan at; a slide's mpp snaps to the nearest (in log scale).
_OBJECTIVES = ((80.0, 0.125), (60.0, 1 / 6), (40.0, 0.25), (20.0, 0.5), (10.0, 1.0), (5.0, 2.0), (2.5, 4.0))
_INHERITED_HANDLES: list[Any] = []  # OpenSlide handles a forked child got from its parent (kept, never closed)
_LEVEL_TOLERANCE = 1.01  # a level whose downsample exceeds the target by <1% still counts as fine enough
_UPSAMPLE_TOLERANCE = 0.95  # targets up to 5% finer than the scan are read at level 0 and resized up
_MAX_FILTER = 255  # largest median filter / closing size (px of the segmentation image)


def import_wsi_dependency(module: str) -> Any:
    """Import an optional dependency of the ``wsi`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as err:  # openslide raises OSError when its C library is missing
        raise MissingDependencyError(
            f"{module} is needed to read whole-slide images ({err}); install it with: {WSI_EXTRA_HINT}"
        ) from err


def _positive(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise InvalidInputError(f"{name} must be a positive number, got {value!r}")
    return number


def _non_negative(value: Any, name: str) -> float:
    return real_number(value, name, low=0, error=InvalidInputError)


#: The finest mask a slide can have, in level-0 pixels per mask pixel (below it, coordinates divided
#: by the downsample overflow; real masks are 1 or coarser).
MIN_MASK_DOWNSAMPLE = 1e-6
#: The largest level-0 coordinate any slide can have (OpenSlide's dimensions are int64, real scans < 2^20).
MAX_COORDINATE = 2**31


def _count(value: Any, name: str, *, minimum: int = 1, maximum: int = MAX_COORDINATE) -> int:
    """A whole-number setting of this module (patch size, filter size): ``7`` or ``7.0`` (a float from JSON or a
    command line), at most :data:`MAX_COORDINATE` (no slide is larger); :func:`attnzoo._values.whole_number`."""
    return whole_number(value, name, low=minimum, high=maximum, integral_floats=True, error=InvalidInputError)


#: The most patch positions one grid may lay over a slide: each is placed and weighed against the tissue
#: mask in memory (about 100 bytes apiece, 1.6 GB at this bound) and each kept one is an encoder input.
#: CLAM's and ACMIL's 256 px at 20x give at most ~10^5 on the largest slides; this is 100x more.
MAX_GRID_POSITIONS = 2**24
#: What users of the usual recipes are told when a setting is far off.
USUAL_PATCHING = "usual: 256 px patches at 20x, stride = patch size, resized to 224, as in CLAM and ACMIL"


def fallback_max_pixels() -> int:
    """The in-memory reader's pixel limit (and that of one read): ``ATTNZOO_MAX_SLIDE_PIXELS`` where set (a
    positive whole number, else :class:`~attnzoo.errors.InvalidOptionError` naming it), else
    :data:`FALLBACK_MAX_PIXELS`."""
    return env_whole_number("ATTNZOO_MAX_SLIDE_PIXELS", FALLBACK_MAX_PIXELS)


def max_patch_side() -> int:
    """The largest patch side a grid can have: a patch is read in one piece, at most
    :func:`fallback_max_pixels` pixels (``ATTNZOO_MAX_SLIDE_PIXELS``)."""
    return math.isqrt(fallback_max_pixels())


def _pixel_pairs(values: Any, name: str) -> np.ndarray:
    """``[N, 2]`` int64 level-0 (x, y) positions: real, finite, whole numbers of pixels."""
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros((0, 2), np.int64)
    if array.dtype.kind not in "iuf" or array.ndim != 2 or array.shape[1] != 2:
        raise InvalidInputError(f"{name} must be an [N, 2] array of (x, y) pixels, got {array.dtype} {array.shape}")
    floats = array.astype(np.float64)
    if not (np.isfinite(floats).all() and (floats == np.round(floats)).all()):
        raise InvalidInputError(f"{name} must hold finite whole numbers of pixels")
    if np.abs(floats).max() > MAX_COORDINATE:
        raise InvalidInputError(f"{name} must lie within ±{MAX_COORDINATE:,} pixels (no slide is larger)")
    return floats.astype(np.int64)


def magnification_from_mpp(mpp: float | None) -> float | None:
    """The standard objective (80/60/40/20/10/5/2.5x) a scan at ``mpp`` µm/px corresponds to, or None."""
    if mpp is None or not math.isfinite(mpp) or mpp <= 0:
        return None
    mag, ref = min(_OBJECTIVES, key=lambda o: abs(math.log(mpp / o[1])))
    return mag if abs(math.log(mpp / ref)) < math.log(2) / 2 + 1e-9 else None


# --------------------------------------------------------------------------------------------- slides


class Slide:
    """A whole-slide image behind OpenSlide, or a plain image held in memory as a single level.

    Use :func:`open_slide`. Coordinates are OpenSlide's: ``read_region`` takes the level-0 (x, y) of
    the region's top-left corner and a (width, height) at ``level``. ``mpp`` / ``objective_power``
    given here override the file's metadata. A slide may be pickled (to DataLoader workers): the
    copy reopens the file, and a forked process reopens its own OpenSlide handle on first use.
    """

    def __init__(self, path: str | os.PathLike, *, mpp: float | None = None, objective_power: float | None = None):
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"a slide is opened from a file path, got {type(path).__name__}")
        self.path = Path(path)
        self._mpp_override = _positive(mpp, "mpp")
        self._power_override = _positive(objective_power, "objective_power")
        self._osr: Any = None
        self._image: np.ndarray | None = None
        self._pid = os.getpid()
        self._open()

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        name = os.fspath(self.path)
        if not self.path.exists():
            raise DatasetFormatError(f"{name}: no such slide file")
        if self.path.is_dir():
            raise DatasetFormatError(f"{name}: is a directory, not a slide file")
        check_regular_file(self.path, "a slide file")  # a FIFO would block OpenSlide's and PIL's open forever
        openslide = None
        try:
            openslide = import_wsi_dependency("openslide")
        except ImportError:
            if self.path.suffix.lower() in (
                ".svs",
                ".ndpi",
                ".mrxs",
                ".vms",
                ".vmu",
                ".scn",
                ".bif",
                ".svslide",
                ".dcm",
            ):
                raise
        self.properties: dict[str, str] = {}
        fmt = None
        if openslide is not None:
            try:
                fmt = openslide.OpenSlide.detect_format(name)
            except (OSError, openslide.OpenSlideError):
                fmt = None
        if fmt is not None:
            try:
                self._osr = openslide.OpenSlide(name)
            except (OSError, openslide.OpenSlideError) as err:
                raise DatasetFormatError(
                    f"{name}: OpenSlide detected {fmt} but cannot open it (corrupt or truncated?): {err}"
                ) from None
            self.backend = "openslide"
            self.vendor = fmt
            self.properties = _readable_properties(self._osr.properties)
            self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
            if not self.level_dimensions or min(min(d) for d in self.level_dimensions) < 1:
                raise DatasetFormatError(f"{name}: OpenSlide reports empty levels {self.level_dimensions}")
            if not all(math.isfinite(d) and d >= 1 for d in self.level_downsamples):
                raise DatasetFormatError(f"{name}: OpenSlide reports level downsamples {self.level_downsamples}")
            self._background = _parse_colour(self.properties.get("openslide.background-color"))
            file_mpp, file_power = _openslide_resolution(self.properties)
        else:
            self._image, file_mpp = _read_plain_image(self.path)
            self.backend = "image"
            self.vendor = None
            height, width = self._image.shape[:2]
            self.level_dimensions = ((width, height),)
            self.level_downsamples = (1.0,)
            self._background = (255, 255, 255)
            file_power = None
        self._pid = os.getpid()
        self.mpp = self._mpp_override or file_mpp
        self.objective_power = self._power_override or file_power

    def _handle(self) -> Any:
        if self.backend == "openslide" and (self._osr is None or self._pid != os.getpid()):
            openslide = import_wsi_dependency("openslide")  # forked or unpickled: never share a handle across processes
            if self._osr is not None:
                _INHERITED_HANDLES.append(self._osr)  # the parent's handle: never closed from a child
            try:
                self._osr = openslide.OpenSlide(os.fspath(self.path))
            except (OSError, openslide.OpenSlideError) as err:
                raise DatasetFormatError(f"{self.path}: OpenSlide cannot reopen the slide: {err}") from None
            self._pid = os.getpid()
        return self._osr

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mpp": self._mpp_override, "objective_power": self._power_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], mpp=state["mpp"], objective_power=state["objective_power"])  # type: ignore[misc]

    def close(self) -> None:
        """Release the file handle (and decoded pixels); the slide reopens itself if used again."""
        if self._osr is not None and self._pid == os.getpid():
            self._osr.close()
        self._osr = None
        self._image = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g}" if self.mpp else None
        return (
            f"Slide({os.fspath(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={mpp}, objective_power={self.objective_power})"
        )

    # ------------------------------------------------------------------ geometry
    @property
    def name(self) -> str:
        """The slide id: the file name without its extension (``.ome.tif`` counts as one)."""
        return slide_id(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (level 0 if none)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * _LEVEL_TOLERANCE and ds >= self.level_downsamples[best]:
                best = level
        return best

    def _check_level(self, level: int) -> int:
        if not isinstance(level, (int, np.integer)) or not 0 <= int(level) < self.level_count:
            raise InvalidInputError(
                f"{self.path}: level {level!r} does not exist (the slide has levels 0..{self.level_count - 1})"
            )
        return int(level)

    # ------------------------------------------------------------------ pixels
    def read_region(self, location: Sequence[int], level: int, size: Sequence[int]) -> Image.Image:
        """RGB pixels of ``size`` (w, h) at ``level``, top-left at level-0 ``location`` (x, y).

        Outside the slide (and in transparent areas) the slide's background colour (white unless
        OpenSlide reports one) shows.
        """
        level = self._check_level(level)
        try:
            x, y = (round(float(v)) for v in location)
            w, h = (_count(v, "region size") for v in size)
        except (TypeError, ValueError, OverflowError):  # NaN/inf or text in location, a wrong length
            raise InvalidInputError(
                f"{self.path}: read_region needs a finite (x, y) location and a (width, height) of positive "
                f"integers, got {location!r}, {size!r}"
            ) from None
        if max(abs(x), abs(y)) > MAX_COORDINATE:
            raise InvalidInputError(f"{self.path}: read_region location {(x, y)} is beyond any slide")
        limit = fallback_max_pixels()
        if w * h > limit:
            raise InvalidInputError(
                f"{self.path}: a {w}x{h} region is over the {limit:,}-pixel limit of one read "
                "(ATTNZOO_MAX_SLIDE_PIXELS); read it in tiles, or from a coarser level"
            )
        if self.backend == "openslide":
            openslide = import_wsi_dependency("openslide")
            try:
                rgba = self._handle().read_region((x, y), level, (w, h))
            except (OSError, openslide.OpenSlideError) as err:
                raise DatasetFormatError(
                    f"{self.path}: cannot read the region at {(x, y)} level {level} size {(w, h)} "
                    f"(corrupt or truncated slide?): {err}"
                ) from None
            return _composite(rgba, self._background)
        image = self._array()
        out = np.empty((h, w, 3), np.uint8)
        out[...] = self._background
        height, width = image.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
        return Image.fromarray(out)

    def _array(self) -> np.ndarray:
        if self._image is None:
            self._image, _ = _read_plain_image(self.path)
        return self._image

    def thumbnail(self, max_size: int | Sequence[int] = 1024) -> Image.Image:
        """The whole slide as RGB, aspect ratio kept, fitting in ``max_size`` (an int or (w, h))."""
        sizes = [max_size, max_size] if isinstance(max_size, (int, np.integer)) else list(max_size)
        if len(sizes) != 2:
            raise InvalidInputError(f"max_size must be a positive int or (width, height), got {max_size!r}")
        box = tuple(_count(v, "max_size") for v in sizes)
        width, height = self.dimensions
        scale = min(box[0] / width, box[1] / height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        level = self.get_best_level_for_downsample(max(1.0, 1.0 / scale))
        image = self.read_region((0, 0), level, self.level_dimensions[level])
        if image.size == target:
            return image
        return image.resize(target, Image.Resampling.LANCZOS if image.size[0] > target[0] else Image.Resampling.BICUBIC)


def slide_id(path: str | os.PathLike) -> str:
    """The id of a slide file: its name without the extension (``.ome.tif``/``.ome.tiff`` count as one)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _readable_properties(properties: Mapping[str, str]) -> dict[str, str]:
    """OpenSlide's properties, without those it lists but cannot look up: a damaged file's property name
    that is not UTF-8 comes back decoded with replacements, and looking that name up is a KeyError."""
    readable = {}
    for key in list(properties):
        try:
            readable[key] = properties[key]
        except KeyError:
            continue
    return readable


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, objective_power: float | None = None) -> Slide:
    """Open a slide (anything OpenSlide reads, else a plain image/TIFF as one level); ``mpp`` and
    ``objective_power`` override missing or wrong metadata. Unreadable files raise
    :class:`~attnzoo.errors.DatasetFormatError` naming the file."""
    return Slide(path, mpp=mpp, objective_power=objective_power)


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if rgba.mode != "RGBA":
        return rgba.convert("RGB")
    alpha = rgba.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return rgba.convert("RGB")
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba.convert("RGB"), mask=alpha)
    return out


def _parse_colour(text: str | None) -> tuple[int, int, int]:
    if text and len(text) == 6:
        with contextlib.suppress(ValueError):
            return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
    return (255, 255, 255)


def _float_or_none(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _mpp_from_resolution(resolution: float | None, unit: str | None) -> float | None:
    """µm/px from a TIFF X resolution (pixels per unit); None for no unit or a screen-DPI default."""
    if resolution is None or unit is None:
        return None
    unit = unit.lower()
    if unit in ("centimeter", "3"):
        mpp = 1e4 / resolution
    elif unit in ("inch", "2"):
        mpp = 25400.0 / resolution
    else:
        return None
    return mpp if mpp < 20.0 else None  # 72/96/300 dpi defaults are not a scan resolution


def _openslide_resolution(props: Mapping[str, str]) -> tuple[float | None, float | None]:
    mpp_x, mpp_y = _float_or_none(props.get("openslide.mpp-x")), _float_or_none(props.get("openslide.mpp-y"))
    mpp = (mpp_x + mpp_y) / 2 if mpp_x and mpp_y else mpp_x or mpp_y
    if mpp is None:
        mpp = _mpp_from_resolution(_float_or_none(props.get("tiff.XResolution")), props.get("tiff.ResolutionUnit"))
    power = _float_or_none(props.get("openslide.objective-power"))
    return mpp, power


def _read_plain_image(path: Path) -> tuple[np.ndarray, float | None]:
    """A plain image (or a TIFF OpenSlide refused) fully decoded to HxWx3 uint8, and its mpp if tagged."""
    from attnzoo.datasets.images import array_to_image, opened_image, to_rgb

    name = os.fspath(path)
    mpp = None
    errors: list[str] = []
    limit = fallback_max_pixels()  # a bad ATTNZOO_MAX_SLIDE_PIXELS is said as such, not taken for a damaged file
    check_regular_file(path, "a slide file")
    with parse_errors(path, "slide file"), open(path, "rb") as fh:
        head = fh.read(4)
    is_tiff = head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if is_tiff:
        try:
            tifffile = import_wsi_dependency("tifffile")
            with tifffile.TiffFile(name) as tif:
                page = tif.pages[0]
                width, height = int(page.imagewidth), int(page.imagelength)
                _check_fallback_size(name, width, height, limit)
                _check_fallback_bytes(name, width, height, page, limit)
                tags = page.tags
                if "XResolution" in tags and "ResolutionUnit" in tags:
                    num, den = tags["XResolution"].value
                    unit = tags["ResolutionUnit"].value
                    unit_name = {2: "inch", 3: "centimeter"}.get(int(unit))
                    mpp = _mpp_from_resolution(num / den if den else None, unit_name)
                array = page.asarray()
            if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
                array = np.moveaxis(array, 0, -1)
            return np.asarray(array_to_image(np.ascontiguousarray(array), name=name)), mpp
        except DatasetFormatError:
            raise
        except Exception as err:  # noqa: BLE001  (tifffile missing, or any of the errors it raises on damaged files: try PIL)
            errors.append(f"tifffile: {err}")
    try:
        # the fallback's own pixel limit (with its advice about OpenSlide) applies, not the image loader's
        with opened_image(path, max_pixels=sys.maxsize, error=InvalidInputError, what="image") as image:
            _check_fallback_size(name, *image.size, limit)
            image.load()
            return np.asarray(to_rgb(image, name=name)), mpp
    except DatasetFormatError:
        raise
    except InvalidInputError as err:
        errors.append(f"PIL: {str(err).removeprefix(name + ': ')}")
    raise DatasetFormatError(
        f"{name}: cannot read this slide ({'; '.join(errors)}); supported: what OpenSlide opens "
        "(svs, tif, ndpi, mrxs, scn, bif, vms, dicom) or a plain PNG/JPEG/TIFF image"
    )


def _check_fallback_bytes(name: str, width: int, height: int, page: Any, limit: int) -> None:
    """Refuse a TIFF page whose decoded array (as stored: every sample, at its bit depth) would take more than
    :data:`FALLBACK_BYTES_PER_PIXEL` bytes per pixel of the pixel limit, before it is decoded."""
    samples = max(1, int(getattr(page, "samplesperpixel", 1) or 1))
    dtype = getattr(page, "dtype", None)
    itemsize = (
        np.dtype(dtype).itemsize if dtype is not None else max(1, -(-int(getattr(page, "bitspersample", 8)) // 8))
    )
    needed, most = width * height * samples * itemsize, limit * FALLBACK_BYTES_PER_PIXEL
    if needed > most:
        raise DatasetFormatError(
            f"{name}: {width}x{height} image of {samples} samples of {itemsize * 8} bits per pixel would take "
            f"{needed:,} bytes decoded, over the in-memory reader's {most:,} ({FALLBACK_BYTES_PER_PIXEL} bytes per "
            "pixel of its pixel limit, ATTNZOO_MAX_SLIDE_PIXELS); convert it to a pyramidal tiled TIFF (e.g. vips "
            "tiffsave --tile --pyramid) that OpenSlide reads piece by piece, or raise ATTNZOO_MAX_SLIDE_PIXELS"
        )


def _check_fallback_size(name: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        if importlib.util.find_spec("openslide") is None:
            raise DatasetFormatError(
                f"{name}: {width}x{height} image is too large to hold in memory, and OpenSlide, which reads "
                f"pyramidal slides piece by piece, is not installed: {WSI_EXTRA_HINT}"
            )
        raise DatasetFormatError(
            f"{name}: {width}x{height} image is too large to hold in memory and OpenSlide cannot open it; "
            "convert it to a pyramidal tiled TIFF (e.g. vips tiffsave --tile --pyramid) or raise ATTNZOO_MAX_SLIDE_PIXELS"
        )


# --------------------------------------------------------------------------------------- tissue


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask of a slide at low resolution.

    ``downsample`` is (x, y) level-0 pixels per mask pixel; ``level`` the slide level it was computed
    at (None when it came from a resized thumbnail).
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    level: int | None = None
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if (
            mask.ndim != 2
            or mask.dtype.kind not in "biu"
            or (mask.dtype.kind != "b" and not np.isin(mask, (0, 1)).all())
        ):
            raise InvalidInputError(
                f"a tissue mask is a 2-D boolean (or 0/1) array, got {mask.dtype} of shape {mask.shape}"
            )
        try:
            downsample = tuple(float(v) for v in self.downsample)
        except (TypeError, ValueError):
            downsample = ()
        if len(downsample) != 2 or not all(math.isfinite(v) and v >= MIN_MASK_DOWNSAMPLE for v in downsample):
            raise InvalidInputError(
                f"a tissue mask's downsample is (x, y) level-0 pixels per mask pixel, each finite and at least "
                f"{MIN_MASK_DOWNSAMPLE:g}, got {self.downsample!r}"
            )
        object.__setattr__(self, "mask", mask.astype(bool, copy=False))
        object.__setattr__(self, "downsample", downsample)

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def fraction(self) -> float:
        """Fraction of the slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def any(self) -> bool:
        return bool(self.mask.any())

    def coverage(self, coords: np.ndarray, size_level0: float) -> np.ndarray:
        """For each level-0 top-left (x, y) in ``coords``, the fraction of the ``size_level0`` square
        covered by tissue (exact area weighting of the mask pixels; outside the mask counts as none)."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        h, w = self.mask.shape
        if len(coords) == 0 or h == 0 or w == 0:
            return np.zeros(len(coords))
        table = np.zeros((h + 1, w + 1), np.float64)
        table[1:, 1:] = self.mask.astype(np.float64).cumsum(0).cumsum(1)

        def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            # the integral of a piecewise-constant image is bilinear inside each pixel: interpolate the table
            x, y = np.clip(x, 0, w), np.clip(y, 0, h)
            i, j = np.minimum(np.floor(x).astype(np.int64), w - 1), np.minimum(np.floor(y).astype(np.int64), h - 1)
            u, v = x - i, y - j
            return (
                table[j, i] * (1 - u) * (1 - v)
                + table[j, i + 1] * u * (1 - v)
                + table[j + 1, i] * (1 - u) * v
                + table[j + 1, i + 1] * u * v
            )

        dsx, dsy = self.downsample
        x0, y0 = coords[:, 0] / dsx, coords[:, 1] / dsy
        x1, y1 = (coords[:, 0] + size_level0) / dsx, (coords[:, 1] + size_level0) / dsy
        inside = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
        return np.clip(inside / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0..255, as OpenCV computes it for uint8 images."""
    top = rgb.max(axis=2).astype(np.float32)
    spread = top - rgb.min(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        sat = np.where(top > 0, spread * 255.0 / top, 0.0)
    return np.clip(np.round(sat), 0, 255).astype(np.uint8)


def segment_tissue(
    slide: Slide | str | os.PathLike,
    level: int | None = None,
    *,
    seg_downsample: float = 64.0,
    sthresh: int = 8,
    mthresh: int = 7,
    close: int = 4,
    use_otsu: bool = False,
    a_t: float = 100.0,
    a_h: float = 16.0,
    max_n_holes: int = 8,
    ref_patch_size: int = 512,
) -> TissueMask:
    """Tissue mask of a slide, CLAM's ``segmentTissue`` recipe (ACMIL Step1 defaults).

    The image at ``level`` (default: the level nearest a ``seg_downsample`` of 64, or a thumbnail
    at that scale when the slide has no such level) goes to HSV; its saturation is median-blurred
    (``mthresh`` px), thresholded at ``sthresh`` (or Otsu's threshold, never below ``sthresh``, with
    ``use_otsu``) and closed with a ``close`` x ``close`` square. Tissue regions smaller than ``a_t``
    reference patches (``ref_patch_size`` squared, at level 0) are dropped; inside each region the
    ``max_n_holes`` largest holes bigger than ``a_h`` reference patches stay background, smaller
    holes count as tissue. A slide without tissue gives an empty mask (check ``mask.any()``).
    """
    from scipy import ndimage

    if not isinstance(slide, Slide):
        slide = open_slide(slide)
    # filter and closing sizes are pixels of the ~64x-downsampled image (CLAM: 7 and 4); saturation is 0..255
    mthresh = _count(mthresh, "mthresh (median filter size)", maximum=_MAX_FILTER)
    if mthresh % 2 == 0:
        raise InvalidInputError(f"mthresh (median filter size) must be a positive odd integer, got {mthresh}")
    if seg_downsample is None:
        raise InvalidInputError("seg_downsample must be a positive number, got None")
    seg_downsample = _positive(seg_downsample, "seg_downsample")  # type: ignore[assignment]
    sthresh = _count(sthresh, "sthresh", minimum=0, maximum=255)
    close = _count(close, "close", minimum=0, maximum=_MAX_FILTER)
    max_n_holes = _count(max_n_holes, "max_n_holes", minimum=0)
    ref_patch_size = _count(ref_patch_size, "ref_patch_size")
    a_t, a_h = _non_negative(a_t, "a_t"), _non_negative(a_h, "a_h")
    if level is None:
        level = slide.get_best_level_for_downsample(seg_downsample)
        if slide.level_downsamples[level] * 4 < seg_downsample and max(slide.dimensions) / seg_downsample >= 1:
            level = None  # no level near the wanted scale: use a resized thumbnail instead of the full level
    if level is None:
        width, height = slide.dimensions
        image = slide.thumbnail((max(1, round(width / seg_downsample)), max(1, round(height / seg_downsample))))
    else:
        level = slide._check_level(level)
        image = slide.read_region((0, 0), level, slide.level_dimensions[level])
    rgb = np.asarray(image)
    h, w = rgb.shape[:2]
    width, height = slide.dimensions
    downsample = (width / w, height / h)

    sat = ndimage.median_filter(_saturation(rgb), size=mthresh, mode="nearest") if mthresh > 1 else _saturation(rgb)
    threshold = float(sthresh)
    if use_otsu and sat.min() != sat.max():
        from skimage.filters import threshold_otsu

        threshold = max(threshold, float(threshold_otsu(sat)))
    binary = sat > threshold
    if close > 0:
        padded = np.pad(binary, close)
        binary = ndimage.binary_closing(padded, structure=np.ones((close, close), bool))[close:-close, close:-close]

    ref_area = ref_patch_size**2 / (downsample[0] * downsample[1])  # a reference patch, in mask pixels
    labels, count = ndimage.label(binary, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas > a_t * ref_area
    keep[0] = False
    tissue = keep[labels]

    filled = ndimage.binary_fill_holes(tissue)
    holes = filled & ~tissue
    mask = filled.copy()
    if holes.any():
        hole_labels, n_holes = ndimage.label(holes)
        hole_areas = np.bincount(hole_labels.ravel(), minlength=n_holes + 1)
        parents, _ = ndimage.label(filled, structure=np.ones((3, 3), bool))
        # the tissue region each hole lies in: any pixel of the hole will do (they share one parent)
        first_pixel = ndimage.minimum_position(hole_labels, hole_labels, index=np.arange(1, n_holes + 1))
        by_parent: dict[int, list[int]] = {}
        for hole, pos in enumerate(first_pixel, start=1):
            by_parent.setdefault(int(parents[pos]), []).append(hole)
        excluded = np.zeros(n_holes + 1, bool)
        for members in by_parent.values():
            members.sort(key=lambda k: -hole_areas[k])
            for hole in members[:max_n_holes]:
                excluded[hole] = hole_areas[hole] > a_h * ref_area
        mask &= ~excluded[hole_labels]
    params = {
        "seg_downsample": seg_downsample,
        "sthresh": sthresh,
        "mthresh": mthresh,
        "close": close,
        "use_otsu": use_otsu,
        "a_t": a_t,
        "a_h": a_h,
        "max_n_holes": max_n_holes,
        "ref_patch_size": ref_patch_size,
        "threshold": threshold,
    }
    return TissueMask(mask=mask, downsample=downsample, level=level, params=params)


# ---------------------------------------------------------------------------------------- tiling


@dataclass
class PatchGrid:
    """Where to read each patch and how: ``read_region(coords[i], level, (read_size, read_size))``
    then resize to ``patch_size`` (px at the target resolution)."""

    coords: np.ndarray  # int64 [N, 2], level-0 (x, y) of each patch's top-left corner
    level: int
    read_size: int
    patch_size: int
    stride: int
    size_level0: int
    stride_level0: int
    downsample: float  # level-0 px per target px
    magnification: float | None
    mpp: float | None
    base_magnification: float | None
    base_mpp: float | None
    tissue: np.ndarray | None = None  # float [N]: tissue fraction of each patch (None without a mask)

    def __len__(self) -> int:
        return len(self.coords)

    def attrs(self) -> dict[str, Any]:
        """The grid's parameters, JSON/HDF5-attribute friendly (None values left out)."""
        out = {
            "patch_size": self.patch_size,
            "stride": self.stride,
            "patch_level": self.level,
            "read_size": self.read_size,
            "patch_size_level0": self.size_level0,
            "stride_level0": self.stride_level0,
            "downsample": self.downsample,
            "magnification": self.magnification,
            "mpp": self.mpp,
            "base_magnification": self.base_magnification,
            "base_mpp": self.base_mpp,
        }
        return {k: v for k, v in out.items() if v is not None}


def _resolve_resolution(
    slide: Slide,
    magnification: float | None,
    mpp: float | None,
    base_magnification: float | None,
    base_mpp: float | None,
) -> tuple[float, float | None, float | None, float | None, float | None]:
    """(downsample from level 0, target magnification, target mpp, base magnification, base mpp)."""
    magnification, mpp = _positive(magnification, "magnification"), _positive(mpp, "mpp")
    if (magnification is None) == (mpp is None):
        raise InvalidInputError(
            "give exactly one of magnification= (e.g. 20) or mpp= (µm per pixel, e.g. 0.5); "
            "levels are chosen from the slide's metadata"
        )
    base_mpp = _positive(base_mpp, "base_mpp") or slide.mpp
    base_mag = (
        _positive(base_magnification, "base_magnification") or slide.objective_power or magnification_from_mpp(base_mpp)
    )
    if magnification is not None:
        if base_mag is None:
            raise InvalidInputError(
                f"{slide.path}: the scan magnification is unknown (no objective power or µm/px in the file's metadata); "
                "pass base_magnification= (e.g. 40) or base_mpp= (e.g. 0.25), or ask for mpp= instead"
            )
        downsample = base_mag / magnification
        target_mpp = base_mpp * downsample if base_mpp else None
        what = f"{magnification:g}x from a {base_mag:g}x scan"
    else:
        if base_mpp is None:
            raise InvalidInputError(
                f"{slide.path}: the slide's µm/px is unknown (no openslide.mpp-x or TIFF resolution in its metadata); "
                "pass base_mpp= (e.g. 0.25), or ask for magnification= with base_magnification="
            )
        downsample = mpp / base_mpp
        magnification = base_mag / downsample if base_mag else None
        target_mpp = mpp
        what = f"{mpp:g} µm/px from a {base_mpp:g} µm/px scan"
    if not downsample <= MAX_COORDINATE:  # inf from a subnormal magnification or mpp ratio, too
        raise InvalidInputError(
            f"{slide.path}: cannot give {what}: one patch pixel would span {downsample:g} level-0 pixels, more "
            "than any slide has"
        )
    if downsample < _UPSAMPLE_TOLERANCE:  # 0.0 from a subnormal base magnification
        raise InvalidInputError(
            f"{slide.path}: cannot give {what}: patches would be upsampled {1 / downsample if downsample else math.inf:.3g}x; "
            "ask for a lower magnification (or a larger mpp)"
        )
    return downsample, magnification, target_mpp, base_mag, base_mpp


def patch_grid(
    slide: Slide | str | os.PathLike,
    mask: TissueMask | None = None,
    *,
    magnification: float | None = None,
    mpp: float | None = None,
    patch_size: int = 224,
    stride: int | None = None,
    min_tissue: float = 0.5,
    base_magnification: float | None = None,
    base_mpp: float | None = None,
    pad: bool = True,
    read_level: str = "auto",
) -> PatchGrid:
    """A regular grid of square patches over the slide, kept where tissue covers ``min_tissue`` of the patch.

    ``patch_size`` and ``stride`` (default: ``patch_size``, no overlap) are pixels at the target
    resolution: ``magnification`` (relative to the scan's objective) or ``mpp`` (µm/px). The grid
    starts at (0, 0); with ``pad`` (CLAM's default) patches may run past the right/bottom edge and are
    filled with background. Without ``mask`` every grid position is kept; ``min_tissue=0`` keeps every
    patch that touches tissue. Coordinates are row-major (sorted by y, then x).

    ``read_level``: ``"auto"`` reads from the coarsest pyramid level still at least as fine as the
    target (on a Camelyon16 TIFF, 20x comes from level 1: a quarter of the pixels, no resize);
    ``"base"`` always reads level 0 and resizes, as CLAM's and ACMIL's feature extraction do (the
    scanner's own downsampled levels hold other pixels, so use it to reproduce their features).
    """
    if not isinstance(slide, Slide):
        slide = open_slide(slide)
    patch_size = _count(patch_size, "patch_size")
    stride = patch_size if stride is None else _count(stride, "stride")
    if not _non_negative(min_tissue, "min_tissue") <= 1.0:
        raise InvalidInputError(f"min_tissue must lie in [0, 1], got {min_tissue!r}")
    if mask is not None and not isinstance(mask, TissueMask):
        raise InvalidInputError(f"mask must be a TissueMask (from segment_tissue), got {type(mask).__name__}")
    if read_level not in ("auto", "base"):
        raise InvalidInputError(
            f"read_level must be 'auto' (the coarsest level fine enough) or 'base' (level 0), got {read_level!r}"
        )
    downsample, target_mag, target_mpp, base_mag, base_mpp = _resolve_resolution(
        slide, magnification, mpp, base_magnification, base_mpp
    )

    level = slide.get_best_level_for_downsample(downsample) if read_level == "auto" else 0
    level_ds = slide.level_downsamples[level]
    read_size = max(1, round(patch_size * downsample / level_ds))
    size0 = max(1, round(patch_size * downsample))
    step0 = max(1, round(stride * downsample))
    at = f"{target_mag:g}x" if target_mag is not None else f"{target_mpp:g} µm/px"
    if read_size > max_patch_side():
        raise InvalidOptionError(
            f"{slide.path}: a {patch_size} px patch at {at} is read as {read_size}x{read_size} px at level {level}, "
            f"over the {fallback_max_pixels():,}-pixel limit of one read (ATTNZOO_MAX_SLIDE_PIXELS); lower patch_size "
            f"(--patch-size); {USUAL_PATCHING}"
        )

    width, height = slide.dimensions
    starts_x = range(0, width, step0) if pad else range(0, width - size0 + 1, step0)
    starts_y = range(0, height, step0) if pad else range(0, height - size0 + 1, step0)
    if len(starts_x) * len(starts_y) > MAX_GRID_POSITIONS:
        raise InvalidOptionError(
            f"{slide.path}: patch_size={patch_size}, stride={stride} (px at {at}: a step of {step0} level-0 px) "
            f"would lay {len(starts_x) * len(starts_y):,} patch positions over this {width}x{height} slide, more "
            f"than the {MAX_GRID_POSITIONS:,} one grid may hold (each is weighed against the tissue mask in memory "
            f"and each kept one is an encoder input); raise patch_size (--patch-size) or stride (--stride); "
            f"{USUAL_PATCHING}"
        )
    xs, ys = (np.arange(r.start, r.stop, r.step, dtype=np.int64) for r in (starts_x, starts_y))
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.int64)
    tissue = None
    if mask is not None:
        mh, mw = mask.shape
        if (
            abs(mw * mask.downsample[0] - width) > 2 * mask.downsample[0]
            or abs(mh * mask.downsample[1] - height) > 2 * mask.downsample[1]
        ):
            raise InvalidInputError(
                f"{slide.path}: the tissue mask ({mw}x{mh} at downsample {mask.downsample}) "
                f"does not cover this {width}x{height} slide; was it made from another slide?"
            )
        tissue = mask.coverage(coords, size0)
        keep = (tissue >= min_tissue) & (tissue > 0)
        coords, tissue = coords[keep], tissue[keep]
    return PatchGrid(
        coords=coords,
        level=level,
        read_size=read_size,
        patch_size=patch_size,
        stride=stride,
        size_level0=size0,
        stride_level0=step0,
        downsample=float(downsample),
        magnification=target_mag,
        mpp=target_mpp,
        base_magnification=base_mag,
        base_mpp=base_mpp,
        tissue=tissue,
    )


# ------------------------------------------------------------------------------ patches -> tensors


class PatchTransform:
    """PIL RGB patch -> float tensor [3, H, W], scaled to [0, 1] and normalised (ImageNet by default)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        import torch

        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"PatchTransform(mean={self.mean}, std={self.std})"


class PatchDataset:
    """A map-style dataset of a slide's patches: item ``i`` is ``(transform(patch), i)``.

    Each patch is read at ``grid.level`` (``grid.read_size`` px), resized to ``input_size`` (default:
    ``grid.patch_size``) with bicubic interpolation, as CLAM/ACMIL do, then transformed. Safe in
    DataLoader workers: each process opens its own slide handle.
    """

    def __init__(
        self,
        slide: Slide | str | os.PathLike,
        grid: PatchGrid,
        *,
        input_size: int | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        coords: np.ndarray | None = None,
    ):
        self.slide = slide if isinstance(slide, Slide) else open_slide(slide)
        self.coords = _pixel_pairs(grid.coords if coords is None else coords, "patch coords")
        self.level, self.read_size = self.slide._check_level(grid.level), _count(grid.read_size, "grid.read_size")
        self.input_size = _count(grid.patch_size if input_size is None else input_size, "input_size")
        self.transform = transform if transform is not None else PatchTransform()

    def __len__(self) -> int:
        return len(self.coords)

    def read(self, index: int) -> Image.Image:
        x, y = self.coords[index]
        image = self.slide.read_region((int(x), int(y)), self.level, (self.read_size, self.read_size))
        if image.size != (self.input_size, self.input_size):
            image = image.resize((self.input_size, self.input_size), Image.Resampling.BICUBIC)
        return image

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.read(index)), index
