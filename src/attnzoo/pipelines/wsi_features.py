"""Whole-slide images to bags of patch features: a resumable inference pipeline over a slide's tiles.

Slides, tissue masks, patch grids and the patch dataset are data (:mod:`attnzoo.datasets.wsi`); this
module builds the patch encoder and runs it over them::

    extract_features("tumor_001.tif", "resnet18", "feats/tumor_001.h5", magnification=20)
    extract_slides(sorted(Path("slides").glob("*.tif")), "resnet18", "feats/")   # one encoder, many slides

Cohorts (a CSV of slides, sharding across processes under ``torchrun``, a manifest) are
:mod:`attnzoo.pipelines.wsi_cohort`, behind ``attnzoo extract wsi-features``.

:func:`extract_features` writes one HDF5 file per slide, with ``features`` [N, D] and ``coords``
[N, 2] (level-0 x, y of each patch's top-left corner; CLAM's and TRIDENT's layout, so their tools
read it too) and the patching parameters as attributes. It is atomic (nothing appears at the
final path until the file is complete) and resumable: finished batches are kept as shards in
``<out>.partial/`` and a rerun after an interruption continues where it stopped. The same settings
give the same file, byte for byte, in any process.

ACMIL's Step2 (from CLAM) is ``magnification=20, patch_size=256, input_size=224, read_level="base"``
with the ``resnet18`` encoder (see :mod:`attnzoo.datasets.wsi` for how resolutions are read).
Needs the ``wsi`` extra (``pip install "attnzoo[wsi]"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from attnzoo import __version__
from attnzoo._io import atomic_path, atomic_write, remove_stale_temporaries_in
from attnzoo._placement import parameter_dtype, resolve_dtype
from attnzoo._values import flag, real_number, to_real, whole_number
from attnzoo.datasets.wsi import (
    MAX_COORDINATE,
    USUAL_PATCHING,
    PatchDataset,
    PatchGrid,
    PatchTransform,
    Slide,
    TissueMask,
    import_wsi_dependency,
    max_patch_side,
    open_slide,
    patch_grid,
    segment_tissue,
)
from attnzoo.datasets.wsi import slide_id as slide_id_of
from attnzoo.errors import InvalidInputError, InvalidOptionError, WeightsError
from attnzoo.factory import create_model
from attnzoo.pipelines.base import check_batching, resolve_device
from attnzoo.weights.loading import load_checkpoint, load_weights, unwrap_state_dict

__all__ = [
    "FEATURES_FORMAT",
    "ExtractionSettings",
    "check_batch",
    "check_settings",
    "create_patch_encoder",
    "extract_features",
    "extract_slides",
    "finished_features",
    "weights_digest",
]

FEATURES_FORMAT = "attnzoo.wsi_features/1"
#: The seed a randomly initialised patch encoder (``weights="none"``) is drawn from.
RANDOM_ENCODER_SEED = 0
#: Held while a random encoder is drawn from the (process-wide) default generator.
_SEEDED_BUILD = threading.Lock()
#: How many times larger than a patch its encoder input may be: beyond 16x each patch pixel becomes a block
#: of more than 16x16 input pixels, which adds no detail, only memory and time.
MAX_UPSCALE = 16
#: How many patches may overlap along each axis (patch_size / stride): a CLAM grid has 1, a dense
#: sliding window 2 to 4; beyond 16 every pixel is read and encoded in more than 256 patches.
MAX_OVERLAP = 16
#: The most elements one batch of encoder inputs may hold: 2**31 is 8 GiB of float32 before the encoder's
#: own activations, and beyond it many GPU kernels (int32 indexing) refuse the tensor.
MAX_BATCH_ELEMENTS = 2**31 - 1
#: Encoder names with a fixed recipe: (timm architecture, official weights used by default, output dim).
_NAMED_ENCODERS = {
    "resnet18": ("resnet18", "resnet18.tv_in1k", 512),  # ACMIL "natural_supervised": torchvision ImageNet ResNet18
    "resnet50_trunc": ("resnet50", "resnet50.tv_in1k", 1024),  # CLAM: torchvision ResNet50 up to layer3 + avg pool
}


def extract_features(
    slide_path: str | os.PathLike,
    encoder: str | torch.nn.Module,
    out_path: str | os.PathLike,
    *,
    magnification: float | None = 20,
    mpp: float | None = None,
    patch_size: int = 224,
    stride: int | None = None,
    input_size: int | None = None,
    min_tissue: float = 0.5,
    read_level: str = "auto",
    base_magnification: float | None = None,
    base_mpp: float | None = None,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    transform: Callable[[Image.Image], Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    amp: bool = False,
    segment_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool | str = False,
    progress: bool | None = None,
    slide_id: str | None = None,
    _encoder_name: str | None = None,
    _weights_digest: str | None = None,
) -> Path:
    """Embed every tissue patch of a slide and write ``features``/``coords`` to the HDF5 file ``out_path``.

    Tissue comes from :func:`~attnzoo.datasets.wsi.segment_tissue` (``segment_kwargs`` passed on),
    patches from :func:`~attnzoo.datasets.wsi.patch_grid` at ``magnification`` (or ``mpp``, which then
    takes precedence; ``read_level`` chooses the pyramid level read, see there) and are resized to
    ``input_size`` (default ``patch_size``) before ``transform`` (default: ImageNet normalisation, as
    ACMIL's Step2). ``encoder`` is a name (see :func:`create_patch_encoder`, which ``weights`` goes to)
    or a module mapping [B, 3, H, W] to [B, D]. ``num_workers`` DataLoader processes read and tile
    patches while the encoder runs under ``torch.inference_mode`` (with ``amp``, under autocast: float16
    on CUDA, bfloat16 on CPU, or the encoder's own half dtype; off by default, as the official extractions
    ran in float32; without it the patches go in as the encoder's parameters' dtype); features are stored as
    ``dtype`` (float32 or float16; ``"fp16"``, ``"half"`` or ``torch.float16`` too).

    The file appears at ``out_path`` only when complete. Finished batches live in
    ``<out_path>.partial/`` and an interrupted call, rerun with the same arguments, computes only the
    rest. If ``out_path`` already holds the result of the same settings it is returned as is; a file
    made with other settings raises unless ``overwrite`` (``True``: always recompute; ``"stale"``:
    recompute only a file made with other settings, what a cache of features wants). ``progress``:
    a bar over the slide's patches (``None``: only when stderr is a terminal). ``slide_id``: the id
    stored in the file (default: the file name without its extension). Returns ``out_path``.
    """
    import_wsi_dependency("h5py")
    out_path = Path(out_path)
    if overwrite not in (False, True, "stale"):
        raise InvalidInputError(f"overwrite must be False, True or 'stale', got {overwrite!r}")
    progress = flag(progress, "progress", allow_none=True, none_means="on a terminal", error=InvalidInputError)
    settings = check_settings(
        magnification=magnification,
        mpp=mpp,
        patch_size=patch_size,
        stride=stride,
        input_size=input_size,
        min_tissue=min_tissue,
        read_level=read_level,
        base_magnification=base_magnification,
        base_mpp=base_mpp,
        transform=transform,
        dtype=dtype,
        amp=amp,
        segment_kwargs=segment_kwargs,
    )
    batch_size, num_workers = check_batch(batch_size, num_workers, settings.input_size)
    dev = resolve_device(device)
    with contextlib.closing(
        open_slide(slide_path, mpp=settings.base_mpp, objective_power=settings.base_magnification)
    ) as slide:
        mask = segment_tissue(slide, **settings.segment_kwargs)
        if not mask.any():
            why = _why_no_tissue(slide, mask, settings.segment_kwargs)
            raise InvalidInputError(f"{slide.path}: no tissue found; {why}")
        grid = patch_grid(
            slide,
            mask,
            magnification=settings.magnification,
            mpp=settings.mpp,
            patch_size=settings.patch_size,
            stride=settings.stride,
            min_tissue=settings.min_tissue,
            read_level=settings.read_level,
        )
        if len(grid) == 0:
            raise InvalidInputError(
                f"{slide.path}: tissue covers {mask.fraction:.2%} of the slide but no patch has "
                f"min_tissue={settings.min_tissue:g} of its area in tissue; lower min_tissue (--min-tissue) or "
                "patch_size (--patch-size)"
            )
        model, encoder_name = _resolve_encoder(encoder, weights)
        encoder_name = _encoder_name or encoder_name
        digest = _weights_digest or weights_digest(model)
        fingerprint = {
            "slide": slide.name,
            "slide_bytes": slide.path.stat().st_size,
            "dimensions": list(slide.dimensions),
            "tissue": {**mask.params, "level": mask.level},
            "grid": grid.attrs(),
            "min_tissue": settings.min_tissue,
            "n": len(grid),
            "input_size": settings.input_size,
            "transform": settings.transform_id,
            "encoder": encoder_name,
            "weights": digest,
            "dtype": settings.dtype,
            "amp": settings.amp,
        }
        if out_path.exists() and overwrite is not True:
            if _existing_matches(out_path, fingerprint):  # a crash after the rename may have left the shards
                shutil.rmtree(out_path.with_name(out_path.name + ".partial"), ignore_errors=True)
                return out_path
            if overwrite != "stale":
                raise InvalidInputError(
                    f"{out_path} already exists and was made with other settings (or by another tool); "
                    "pass overwrite=True to replace it"
                )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_path)

        shards = _Shards(out_path, fingerprint, grid.coords)
        model = model.to(dev).eval()
        _run_encoder(model, encoder_name, slide, grid, shards, settings, dev, batch_size, num_workers, progress)
        _write_features_h5(
            out_path,
            shards,
            grid,
            slide,
            slide_id or slide.name,
            fingerprint,
            settings.digest(encoder_name, digest),
            encoder_name,
            settings,
            mask,
        )
    shards.remove()
    return out_path


def extract_slides(
    slide_paths: Iterable[str | os.PathLike],
    encoder: str | torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    skip_errors: bool = False,
    **kwargs: Any,
) -> dict[str, Path]:
    """:func:`extract_features` for many slides into ``out_dir/<slide_id>.h5``, building the encoder once.

    Finished slides are skipped and interrupted ones resumed, so rerunning the same call after a
    crash continues the job. With ``skip_errors`` an unreadable slide or one without tissue is
    reported with a warning and left out instead of stopping the run. Returns slide id -> file.
    ``progress`` (in ``kwargs``) shows a bar over the slides beside each slide's bar over its patches.
    This process does every slide and writes no manifest: for sharding across processes and a
    manifest use :func:`attnzoo.pipelines.wsi_cohort.extract_cohort`.
    """
    from attnzoo.pipelines.wsi_cohort import CohortSlide, extract_cohort

    slides = [CohortSlide.of(path) for path in slide_paths]
    result = extract_cohort(
        slides, encoder, out_dir, weights=weights, strict=not skip_errors, distributed=False, manifest=False, **kwargs
    )
    for record in result.failed:
        warnings.warn(f"skipped {record.slide}: {record.error}", stacklevel=2)
    return {record.slide_id: Path(out_dir) / f"{record.slide_id}.h5" for record in result.records if record.ok}


def create_patch_encoder(
    name: str, weights: str | os.PathLike | Mapping[str, Any] | None = None, *, seed: int = RANDOM_ENCODER_SEED
) -> torch.nn.Module:
    """A patch encoder returning [B, D] features, in eval mode.

    ``"resnet18"``: ImageNet ResNet18 without its fc (512-d; ACMIL's natural_supervised features).
    ``"resnet50_trunc"``: ResNet50 cut after layer3, global average pool (1024-d; CLAM's features).
    Any other name: ``attnzoo.create_model(name, num_classes=0)`` (e.g. ``vit_small_patch16_224``
    with the Lunit DINO checkpoint as ``weights=PATH`` gives ACMIL's medical_ssl 384-d features).
    ``weights``: None = the official ImageNet weights (torchvision's for the two ResNets, downloaded
    once), ``"none"`` = random initialisation, or a local path / URL / registered checkpoint / state dict.
    Random initialisation draws from ``seed`` (the global RNG is left as it was), so every call, process
    and rerun gets the same encoder and features already extracted with it are reused, not refused.
    Builds from several threads take turns; torch has one default generator per process, so code drawing
    random numbers in another thread while an encoder is built would still change it.
    """
    random_init = isinstance(weights, str) and weights.strip().lower() == "none"
    arch, default_tag, _ = _NAMED_ENCODERS.get(name, (name, None, None))

    def build(**kwargs: Any) -> torch.nn.Module:
        if random_init:
            # torch's default generator is one for the whole process: one seeded build at a time (two at
            # once would interleave their draws), and the state other code sees is restored after it
            with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return create_model(arch, weights="none", **kwargs)
        if weights is None:
            return create_model(default_tag or arch, pretrained=True, **kwargs)
        return create_model(arch, weights=weights, **kwargs)

    if name == "resnet50_trunc":
        try:
            model = build()
        except WeightsError as err:  # maybe a checkpoint of the truncated network itself (no layer4/fc)
            if weights is None or random_init:
                raise
            model = _truncate_resnet50(create_model(arch, weights="none"))
            try:
                load_weights(model, weights)
            except WeightsError:
                raise err from None
            return model.eval()
        return _truncate_resnet50(model).eval()
    try:
        return build(num_classes=0)
    except WeightsError as err:  # a classification checkpoint: drop its head and load the rest
        if weights is None or random_init:
            raise
        try:
            return create_model(arch, weights=_without_classifier(arch, weights), num_classes=0)
        except WeightsError:
            raise err from None


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of the encoder's parameters and buffers: a resumed run must use the same weights."""
    digest = hashlib.blake2b(digest_size=12)
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ExtractionSettings:
    """The checked settings of an extraction that decide its features (not where or how fast it runs):
    what a finished file is matched on (:meth:`digest`) before it is reused."""

    magnification: float | None
    mpp: float | None
    patch_size: int
    stride: int | None
    input_size: int
    min_tissue: float
    read_level: str
    base_magnification: float | None
    base_mpp: float | None
    dtype: str
    amp: bool
    segment_kwargs: dict[str, Any] = field(default_factory=dict)
    transform: Callable[[Image.Image], Any] = field(default_factory=PatchTransform, compare=False)

    @property
    def transform_id(self) -> str:
        return _transform_id(self.transform)

    def digest(self, encoder_name: str, weights: str) -> str:
        """A short hash of these settings, the encoder's name and its :func:`weights_digest`; stored in
        every file as ``settings_digest`` (segmentation defaults filled in, so leaving a setting out and
        giving its default match)."""
        defaults = {p.name: p.default for p in inspect.signature(segment_tissue).parameters.values()}
        segment = {k: v for k, v in defaults.items() if k != "slide"} | self.segment_kwargs
        payload = {
            "format": FEATURES_FORMAT,
            **{k: v for k, v in vars(self).items() if k not in ("transform", "segment_kwargs")},
            "segment": segment,
            "transform": self.transform_id,
            "encoder": encoder_name,
            "weights": weights,
        }
        return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=8).hexdigest()


def check_settings(
    *,
    magnification: float | None = 20,
    mpp: float | None = None,
    patch_size: int = 224,
    stride: int | None = None,
    input_size: int | None = None,
    min_tissue: float = 0.5,
    read_level: str = "auto",
    base_magnification: float | None = None,
    base_mpp: float | None = None,
    transform: Callable[[Image.Image], Any] | None = None,
    dtype: str | torch.dtype = "float32",
    amp: bool = False,
    segment_kwargs: Mapping[str, Any] | None = None,
) -> ExtractionSettings:
    """:func:`extract_features`' settings checked, slide-independently (a wrong one is an
    :class:`~attnzoo.errors.InvalidInputError` naming it before any slide is read); ``mpp`` wins
    over ``magnification``."""
    dtype = check_feature_dtype(dtype)
    min_tissue = check_min_tissue(min_tissue)
    amp = flag(amp, "amp", error=InvalidInputError)  # "no" would switch autocast on
    if transform is not None and not callable(transform):
        raise InvalidInputError(f"transform must map a PIL image to a tensor, got a {type(transform).__name__}")
    if read_level not in ("auto", "base"):
        raise InvalidInputError(
            f"read_level must be 'auto' (the coarsest level fine enough) or 'base' (level 0), got {read_level!r}"
        )
    if mpp is not None:
        magnification = None
    if magnification is None and mpp is None:
        raise InvalidInputError("give magnification= (e.g. 20) or mpp= (µm per pixel, e.g. 0.5)")
    scales = {
        "magnification": magnification,
        "mpp": mpp,
        "base_magnification": base_magnification,
        "base_mpp": base_mpp,
    }
    patch_size = check_patch_side("patch_size", patch_size)
    return ExtractionSettings(
        **{k: None if v is None else check_scale(k, v) for k, v in scales.items()},
        patch_size=patch_size,
        stride=None if stride is None else check_stride(stride, patch_size),
        input_size=check_input_size(input_size, patch_size) if input_size is not None else patch_size,
        min_tissue=min_tissue,
        read_level=read_level,
        dtype=dtype,
        amp=bool(amp),
        segment_kwargs=check_segment_kwargs(segment_kwargs),
        transform=transform if transform is not None else PatchTransform(),
    )


def check_feature_dtype(dtype: Any) -> str:
    """The stored features' dtype, ``"float32"`` or ``"float16"``, from any spelling the other ``dtype`` settings
    take (``"fp16"``, ``"half"``, ``torch.float16``, ...); anything else is an :class:`InvalidInputError`."""
    try:
        resolved = resolve_dtype(dtype)
    except InvalidInputError:
        resolved = None
    if resolved not in (torch.float32, torch.float16):
        why = " (HDF5 has no bfloat16: store float32)" if resolved == torch.bfloat16 else ""
        raise InvalidInputError(
            f"dtype (of the stored features) must be float32 or float16 (also 'fp32', 'fp16', 'half', torch.float16)"
            f"{why}, got {dtype!r}"
        )
    return str(resolved).removeprefix("torch.")


def finished_features(out_path: str | os.PathLike, slide_path: str | os.PathLike, settings_digest: str) -> int | None:
    """The number of patches in ``out_path`` when it holds ``slide_path``'s features made with the
    settings of ``settings_digest`` (:meth:`ExtractionSettings.digest`), else None. Reads only the
    file's attributes, never the slide: a rerun over thousands of finished slides costs seconds.
    (The slide is recognised by its name and size, as :func:`extract_features`' own check.)"""
    h5py = import_wsi_dependency("h5py")
    out_path, slide_path = Path(out_path), Path(slide_path)
    try:
        with h5py.File(out_path, "r") as f:
            stored, fingerprint = f.attrs.get("settings_digest"), json.loads(f.attrs.get("fingerprint", "{}"))
        same = (
            stored == settings_digest
            and fingerprint.get("slide") == slide_id_of(slide_path)
            and fingerprint.get("slide_bytes") == slide_path.stat().st_size
        )
    except (OSError, ValueError, TypeError):
        return None
    return int(fingerprint["n"]) if same and isinstance(fingerprint.get("n"), int) else None


def remove_stale_temporaries(path: Path) -> None:
    """What an earlier process killed while writing ``path`` left beside it: the temporary files of
    :func:`~attnzoo._io.atomic_path` and the shard folders being set up (``.<name>.XXXXXXXX[.partial].tmp``;
    the exact pattern, so another slide's never match)."""
    remove_stale_temporaries_in(path.parent, re.escape(path.name))


def check_scale(name: str, value: Any) -> float:
    """A resolution (magnification or µm/px, of the patches or the scan): a finite number > 0."""
    return real_number(value, name, above=0, error=InvalidInputError)


def check_min_tissue(value: Any) -> float:
    """The fraction of a patch's area that must be tissue."""
    return real_number(value, "min_tissue", low=0, high=1, why="a fraction of a patch's area", error=InvalidInputError)


def check_patch_side(name: str, value: Any) -> int:
    """A patch side in pixels, a whole number (``256.0`` from JSON or a command line is 256; ``2.5`` is refused), up
    to what one read returns (a patch is read in one piece of at most ``ATTNZOO_MAX_SLIDE_PIXELS``); else an
    :class:`~attnzoo.errors.InvalidOptionError`."""
    most = max_patch_side()
    why = f"pixels; a patch is read in one piece of at most {most}x{most}, ATTNZOO_MAX_SLIDE_PIXELS; {USUAL_PATCHING}"
    return whole_number(value, name, high=most, integral_floats=True, why=why)


def check_stride(stride: Any, patch_size: int) -> int:
    """The grid step: at least 1/:data:`MAX_OVERLAP` of the patch, at most what any slide spans."""
    low = max(1, math.ceil(patch_size / MAX_OVERLAP))
    why = (
        f"pixels, at least patch_size {patch_size} / {MAX_OVERLAP}: a finer step puts every pixel in more than "
        f"{MAX_OVERLAP**2} patches, to be read and encoded each time; {USUAL_PATCHING}"
    )
    return whole_number(stride, "stride", low=low, high=MAX_COORDINATE, integral_floats=True, why=why)


def check_input_size(input_size: Any, patch_size: int | None) -> int:
    """The side patches are resized to for the encoder: at most :data:`MAX_UPSCALE` times the patch (when
    the patch size is not known yet, a positive integer; the bound applies once it is)."""
    if patch_size is None:
        return whole_number(input_size, "input_size", high=MAX_COORDINATE, integral_floats=True, why="pixels")
    why = (
        f"pixels, at most {MAX_UPSCALE}x patch_size {patch_size}: a larger input blows each patch pixel up into a "
        f"block and adds no detail, only memory and time; {USUAL_PATCHING}"
    )
    return whole_number(input_size, "input_size", high=MAX_UPSCALE * patch_size, integral_floats=True, why=why)


def check_batch(batch_size: Any, num_workers: Any, input_size: int) -> tuple[int, int]:
    """``batch_size`` and ``num_workers`` checked, and one batch of ``input_size`` patches no larger than
    :data:`MAX_BATCH_ELEMENTS`: a larger batch cannot be held (or run by many GPU kernels) and only fails later."""
    batch_size, num_workers = check_batching(batch_size, num_workers)
    per_patch = 3 * input_size**2
    if batch_size * per_patch > MAX_BATCH_ELEMENTS:
        fits = MAX_BATCH_ELEMENTS // per_patch
        fix = (
            f"use batch_size {fits} or less (--batch-size)"
            if fits
            else f"lower input_size (--input-size) to {math.isqrt(MAX_BATCH_ELEMENTS // 3)} or less"
        )
        raise InvalidOptionError(
            f"batch_size {batch_size} of {input_size}x{input_size} inputs is a tensor of {batch_size * per_patch:,} "
            f"elements, over 2**31 (8 GiB of float32 before the encoder's own activations, more than many GPU "
            f"kernels index): {fix}; usual: batch_size 64 to 512 at input_size 224"
        )
    return batch_size, num_workers


#: Bounds of segment_tissue's parameters where the type alone is not enough: saturation is 0-255; filter
#: sizes are mask pixels (CLAM uses 7 and 4; scipy's closing needs memory growing with about the fourth
#: power of its size: 180 MB at 64, over 6 GB at 134); a segmentation finer than level 0 would upsample
#: the slide; the reference patch is level-0 pixels.
_SEGMENT_RANGES = {
    "sthresh": (0, 255),
    "mthresh": (1, 31),
    "close": (0, 32),
    "seg_downsample": (1, math.inf),
    "ref_patch_size": (1, 2**16),
}


def _is_integer(default: Any) -> bool:
    """Whether a segment_tissue parameter with this default takes integers (``level``'s default is None)."""
    return default is None or (isinstance(default, int) and not isinstance(default, bool))


def check_segment_kwargs(segment_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keywords for :func:`~attnzoo.datasets.wsi.segment_tissue`, each checked against the type of its
    default (flags are booleans, counts non-negative integers, sizes and areas non-negative numbers), so
    a wrong one is a typed error naming it instead of a failure deep inside the segmentation."""
    if segment_kwargs is None:
        return {}
    if not isinstance(segment_kwargs, Mapping):
        raise InvalidInputError(f"segment_kwargs must be a dict, got a {type(segment_kwargs).__name__}")
    defaults = {p.name: p.default for p in inspect.signature(segment_tissue).parameters.values() if p.name != "slide"}
    unknown = sorted(map(str, set(segment_kwargs) - set(defaults)))
    if unknown:
        raise InvalidInputError(f"segment_kwargs: unknown {unknown}; segment_tissue takes {', '.join(defaults)}")
    for key, value in segment_kwargs.items():
        default = defaults[key]
        low, high = _SEGMENT_RANGES.get(key, (0, math.inf))
        if isinstance(default, bool):
            ok, kind = isinstance(value, (bool, np.bool_)), "True or False"
        else:
            integer = _is_integer(default)
            kind = f"{'an integer' if integer else 'a number'} in [{low:g}, {high:g}]"
            number = to_real(value)
            ok = (value is None and default is None) or (
                number is not None and low <= number <= high and (not integer or number.is_integer())
            )
        if not ok:
            raise InvalidInputError(f"segment_kwargs[{key!r}] must be {kind}, got {value!r}")
    return {k: _segment_value(v, defaults[k]) for k, v in segment_kwargs.items()}


def _segment_value(value: Any, default: Any) -> Any:
    """A checked segment_tissue keyword as its default's type: a bool (numpy's too), None, an int or a float."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return int(value) if _is_integer(default) else float(value)


# ------------------------------------------------------------------------------------ internals


def _why_no_tissue(slide: Slide, mask: TissueMask, segment_kwargs: dict[str, Any]) -> str:
    """Whether the saturation threshold or the minimum region size (``a_t``) removed everything, and
    what to change: CLAM's minimum of 100 reference patches (512 px squared at level 0, about 1.6 mm²
    at 40x) drops every region of an image much smaller than a whole slide."""
    from scipy import ndimage

    params = mask.params
    below = segment_tissue(slide, **{**segment_kwargs, "a_t": 0})
    if not below.any():
        saturation = f"no region's saturation exceeds {params['threshold']:g} at downsample {mask.downsample[0]:.3g}; "
        if params["use_otsu"] and params["threshold"] > params["sthresh"]:
            return saturation + f"if the slide has tissue, drop Otsu's threshold: {_segment_setting('use_otsu', False)}"
        if params["sthresh"] == 0:
            return saturation + "the image has no colour, so no segmentation setting finds tissue in it"
        return saturation + (
            f"if the slide has tissue, lower sthresh (now {params['sthresh']}): "
            f"{_segment_setting('sthresh', params['sthresh'] // 2)}"
        )
    labels, count = ndimage.label(below.mask, structure=np.ones((3, 3), bool))
    ref_area = params["ref_patch_size"] ** 2 / (below.downsample[0] * below.downsample[1])
    largest = np.bincount(labels.ravel())[1:].max() / ref_area
    lower = float(f"{max(largest / 2, 0.01):.2g}")
    return (
        f"{count} region(s) pass the saturation threshold, the largest {largest:.3g} reference patches "
        f"({params['ref_patch_size']} px squared at level 0) in area, all below a_t={params['a_t']:g} (CLAM's "
        f"minimum tissue region, made for whole slides); for a smaller image lower a_t to {lower:g} or less: "
        f"{_segment_setting('a_t', lower)}"
    )


def _segment_setting(name: str, value: Any) -> str:
    """A segmentation setting as a Python caller and a command-line user each give it."""
    cli = str(value).lower() if isinstance(value, bool) else f"{value:g}"
    return (
        f"segment_kwargs={{{name!r}: {value!r}}} in Python, --segment {name}={cli} on the command line "
        "(attnzoo extract wsi-features)"
    )


def _resolve_encoder(encoder: Any, weights: Any) -> tuple[torch.nn.Module, str]:
    if isinstance(encoder, torch.nn.Module):
        if weights is not None:
            raise InvalidInputError("weights= applies to an encoder given by name; load the module's weights yourself")
        cfg = getattr(encoder, "pretrained_cfg", None)
        return encoder, (cfg.get("architecture") if isinstance(cfg, Mapping) else None) or type(encoder).__name__
    if isinstance(encoder, str):
        return create_patch_encoder(encoder, weights), encoder
    raise InvalidInputError(f"encoder must be a model name or a torch.nn.Module, got {type(encoder).__name__}")


def _without_classifier(arch: str, weights: Any) -> dict[str, Any]:
    """The state dict of ``weights`` minus the keys of ``arch``'s classifier (timm's ``pretrained_cfg['classifier']``)."""
    state = unwrap_state_dict(weights if isinstance(weights, Mapping) else load_checkpoint(weights))
    headless: Any = create_model(arch, weights="none", num_classes=0)
    heads = (headless.pretrained_cfg or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    own = headless.state_dict()
    return {k: v for k, v in state.items() if k in own or not any(k == h or k.startswith(h + ".") for h in heads)}


def _truncate_resnet50(model: Any) -> torch.nn.Module:
    model.layer4 = torch.nn.Identity()
    model.num_features = 1024
    model.reset_classifier(0, "avg")
    return model


def _transform_id(transform: Callable[[Image.Image], Any]) -> str:
    """What identifies a transform across processes: its repr without memory addresses (a function's
    repr holds one, which would make every rerun look like other settings and defeat resuming)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


class _Shards:
    """Finished batches of one extraction, kept in ``<out>.partial/`` until the final file is written."""

    def __init__(self, out_path: Path, fingerprint: dict[str, Any], coords: np.ndarray):
        self.dir = out_path.with_name(out_path.name + ".partial")
        self.n = len(coords)
        meta = self.dir / "meta.json"
        if self.dir.is_dir():
            try:
                same = json.loads(meta.read_text()).get("fingerprint") == fingerprint
                same = same and np.array_equal(np.load(self.dir / "coords.npy"), coords)
            except (OSError, ValueError):
                same = False
            if not same:
                warnings.warn(
                    f"{self.dir}: left by an extraction with other settings (or damaged); starting over", stacklevel=3
                )
                shutil.rmtree(self.dir)
        if not self.dir.is_dir():
            tmp = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".partial.tmp"))
            np.save(tmp / "coords.npy", coords)
            (tmp / "meta.json").write_text(json.dumps({"fingerprint": fingerprint, "n": self.n}, indent=1))
            os.replace(tmp, self.dir)
        self.shards = self._scan()
        self._dim = int(np.load(self.shards[0][2], mmap_mode="r").shape[1]) if self.shards else None

    def _scan(self) -> list[tuple[int, int, Path]]:
        """The contiguous run of shards from row 0 (anything after a gap is dropped)."""
        found = {}
        for path in self.dir.glob("rows_*.npy"):
            with contextlib.suppress(ValueError):
                start, end = (int(v) for v in path.stem.split("_")[1:3])
                found[start] = (start, end, path)
        run, row = [], 0
        while row in found and found[row][1] > row:
            run.append(found[row])
            row = found[row][1]
        return run

    @property
    def done(self) -> int:
        return self.shards[-1][1] if self.shards else 0

    @property
    def dim(self) -> int | None:
        return self._dim

    def add(self, start: int, features: np.ndarray) -> None:
        end = start + len(features)
        path = self.dir / f"rows_{start:010d}_{end:010d}.npy"
        with atomic_write(path, "wb") as fh:
            np.save(fh, features)
        self.shards.append((start, end, path))
        self._dim = self._dim or int(features.shape[1])

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _existing_matches(out_path: Path, fingerprint: dict[str, Any]) -> bool:
    h5py = import_wsi_dependency("h5py")
    try:
        with h5py.File(out_path, "r") as f:
            stored = f.attrs.get("fingerprint")
        return stored is not None and json.loads(stored) == fingerprint
    except (OSError, ValueError):
        return False


def _run_encoder(
    model: torch.nn.Module,
    encoder_name: str,
    slide: Slide,
    grid: PatchGrid,
    shards: _Shards,
    settings: ExtractionSettings,
    dev: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool | None,
) -> None:
    """Embed the patches after the finished shards, batch by batch, each batch saved as a shard."""
    start = shards.done
    amp, dtype = settings.amp, settings.dtype
    # the patches go in as the encoder's own dtype (a module in bfloat16 or float16 takes no float32 batch), and
    # autocast, with amp, runs in that dtype when it is already a half one (else float16 on CUDA, bfloat16 on CPU)
    input_dtype = parameter_dtype(model)
    half = (torch.float16, torch.bfloat16)
    autocast_dtype = input_dtype if input_dtype in half else torch.float16 if dev.type == "cuda" else torch.bfloat16
    if start < len(grid):
        dataset = PatchDataset(
            slide, grid, input_size=settings.input_size, transform=settings.transform, coords=grid.coords[start:]
        )
        loader: DataLoader = DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=dev.type == "cuda",
            prefetch_factor=4 if num_workers else None,
        )
        bar = tqdm(
            total=len(grid),
            initial=start,
            desc=slide.name,
            unit="patch",
            dynamic_ncols=True,
            disable=None if progress is None else not progress,
        )
        row = start
        try:
            autocast = torch.autocast(dev.type, dtype=autocast_dtype, enabled=amp)
            with torch.inference_mode(), autocast:
                for images, _ in loader:
                    batch = images.to(dev, dtype=input_dtype, non_blocking=True)
                    out = _encode(model, encoder_name, batch, batch_size, amp)
                    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
                        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                        raise InvalidInputError(
                            f"encoder {encoder_name} must map [B, 3, H, W] to [B, D] features, got {got}"
                        )
                    feats = out.float().cpu().numpy()
                    if shards.dim is not None and feats.shape[1] != shards.dim:
                        raise InvalidInputError(
                            f"encoder {encoder_name} gave {feats.shape[1]}-d features after {shards.dim}-d ones"
                        )
                    with np.errstate(over="ignore"):  # float16 overflow is reported below
                        stored = feats.astype(dtype)
                    bad = ~np.isfinite(stored).all(axis=1)
                    if bad.any():  # kept batches stay resumable; nothing non-finite reaches the file
                        x, y = grid.coords[row + int(np.argmax(bad))]
                        cause = (
                            " (beyond float16's range: use dtype='float32')"
                            if np.isfinite(feats).all()
                            else " (try amp=False)"
                            if amp
                            else ""
                        )
                        raise InvalidInputError(
                            f"encoder {encoder_name} gave non-finite features for {int(bad.sum())} patch(es) "
                            f"of {slide.name}, the first at level-0 ({x}, {y}){cause}"
                        )
                    shards.add(row, stored)
                    row += len(feats)
                    bar.update(len(feats))
        finally:
            bar.close()


#: What torch says when tensors of two dtypes meet in one op (``Input type (float) and bias type (c10::BFloat16)
#: should be the same``, ``mat1 and mat2 must have the same dtype``, ``expected scalar type Float but found Half``).
_DTYPE_MISMATCH = re.compile(r"dtype|scalar ?type|c10::(BFloat16|Half)", re.IGNORECASE)


def _encode(model: torch.nn.Module, encoder_name: str, images: torch.Tensor, batch_size: int, amp: bool) -> Any:
    """``model(images)``; an encoder that cannot take these inputs (a ViT made for another size, too small an
    input for its strides, parameters of several dtypes, no memory for the batch) is a typed error naming what
    to change."""
    try:
        return model(images)
    except torch.OutOfMemoryError as err:
        raise InvalidOptionError(
            f"encoder {encoder_name} ran out of memory on a batch of {tuple(images.shape)}: lower batch_size "
            f"(--batch-size, now {batch_size}) or input_size (--input-size): {err}"
        ) from err
    except (RuntimeError, AssertionError, ValueError, TypeError) as err:
        batch = f"a batch of {tuple(images.shape)}"
        if _DTYPE_MISMATCH.search(str(err)):
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
            held = f"its parameters are {' and '.join(dtypes)}" if dtypes else "it holds no floating parameters"
            raise InvalidOptionError(
                f"encoder {encoder_name} cannot take {batch} in {str(images.dtype).removeprefix('torch.')}"
                f"{' under autocast' if amp else ''}: tensors of two dtypes meet in it ({type(err).__name__}: {err}); "
                f"{held}: put the whole encoder in one dtype (e.g. encoder.float())"
            ) from err
        raise InvalidOptionError(
            f"encoder {encoder_name} cannot take {batch} ({type(err).__name__}: {err}); "
            f"set input_size (--input-size) to what the encoder is made for (usually 224)"
        ) from err


def _write_features_h5(
    out_path: Path,
    shards: _Shards,
    grid: PatchGrid,
    slide: Slide,
    slide_id: str,
    fingerprint: dict[str, Any],
    settings_digest: str,
    encoder_name: str,
    settings: ExtractionSettings,
    mask: TissueMask,
) -> None:
    """Stream the shards into one HDF5 file beside ``out_path`` and rename it into place."""
    h5py = import_wsi_dependency("h5py")
    if shards.done != len(grid):
        raise RuntimeError(f"{shards.dir}: holds {shards.done} of {len(grid)} rows")  # pragma: no cover
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            features = f.create_dataset("features", shape=(len(grid), shards.dim), dtype=settings.dtype)
            for start, end, path in shards.shards:
                features[start:end] = np.load(path)
            coords = f.create_dataset("coords", data=grid.coords.astype(np.int64))
            # CLAM's convention: coords carry the size read at patch_level
            coords.attrs["patch_size"] = grid.read_size
            coords.attrs["patch_level"] = grid.level
            attrs = {
                "format": FEATURES_FORMAT,
                "attnzoo_version": __version__,
                "slide_id": slide_id,
                "slide_path": os.fspath(slide.path),
                "slide_dimensions": list(slide.dimensions),
                "encoder": encoder_name,
                "input_size": settings.input_size,
                "level": grid.level,
                "tissue_fraction": mask.fraction,
                "fingerprint": json.dumps(fingerprint, sort_keys=True),
                "settings_digest": settings_digest,
                **grid.attrs(),
            }
            for key, value in attrs.items():
                f.attrs[key] = value
