"""Whole-slide images to bags of patch features: a resumable inference pipeline over a slide's tiles.

Slides, tissue masks, patch grids and the patch dataset are data (:mod:`attnzoo.datasets.wsi`); this
module builds the patch encoder and runs it over them::

    extract_features("tumor_001.tif", "resnet18", "feats/tumor_001.h5", magnification=20)
    extract_slides(sorted(Path("slides").glob("*.tif")), "resnet18", "feats/")   # one encoder, many slides

:func:`extract_features` writes one HDF5 file per slide, with ``features`` [N, D] and ``coords``
[N, 2] (level-0 x, y of each patch's top-left corner; CLAM's and TRIDENT's layout, so their tools
read it too) and the patching parameters as attributes. It is atomic (nothing appears at the
final path until the file is complete) and resumable: finished batches are kept as shards in
``<out>.partial/`` and a rerun after an interruption continues where it stopped.

ACMIL's Step2 (from CLAM) is ``magnification=20, patch_size=256, input_size=224, read_level="base"``
with the ``resnet18`` encoder (see :mod:`attnzoo.datasets.wsi` for how resolutions are read).
Needs the ``wsi`` extra (``pip install "attnzoo[wsi]"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from attnzoo import __version__
from attnzoo._io import atomic_path, atomic_write
from attnzoo.datasets.wsi import (
    PatchDataset,
    PatchGrid,
    PatchTransform,
    Slide,
    TissueMask,
    import_wsi_dependency,
    open_slide,
    patch_grid,
    segment_tissue,
    slide_id,
)
from attnzoo.errors import DatasetFormatError, InvalidInputError, WeightsError
from attnzoo.factory import create_model
from attnzoo.weights.loading import load_checkpoint_file, load_weights, resolve_checkpoint, unwrap_state_dict

__all__ = ["FEATURES_FORMAT", "create_patch_encoder", "extract_features", "extract_slides", "weights_digest"]

FEATURES_FORMAT = "attnzoo.wsi_features/1"
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
    dtype: str = "float32",
    amp: bool = False,
    segment_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    _encoder_name: str | None = None,
) -> Path:
    """Embed every tissue patch of a slide and write ``features``/``coords`` to the HDF5 file ``out_path``.

    Tissue comes from :func:`~attnzoo.datasets.wsi.segment_tissue` (``segment_kwargs`` passed on),
    patches from :func:`~attnzoo.datasets.wsi.patch_grid` at ``magnification`` (or ``mpp``, which then
    takes precedence; ``read_level`` chooses the pyramid level read, see there) and are resized to
    ``input_size`` (default ``patch_size``) before ``transform`` (default: ImageNet normalisation, as
    ACMIL's Step2). ``encoder`` is a name (see :func:`create_patch_encoder`, which ``weights`` goes to)
    or a module mapping [B, 3, H, W] to [B, D]. ``num_workers`` DataLoader processes read and tile
    patches while the encoder runs under ``torch.inference_mode`` (with ``amp``, under autocast: float16
    on CUDA, bfloat16 on CPU; off by default, as the official extractions ran in float32); features
    are stored as ``dtype`` (float32 or float16).

    The file appears at ``out_path`` only when complete. Finished batches live in
    ``<out_path>.partial/`` and an interrupted call, rerun with the same arguments, computes only the
    rest. If ``out_path`` already holds the result of the same settings it is returned as is; a file
    made with other settings raises unless ``overwrite``. Returns ``out_path``.
    """
    import_wsi_dependency("h5py")
    out_path = Path(out_path)
    if dtype not in ("float32", "float16"):
        raise InvalidInputError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if int(batch_size) < 1 or int(num_workers) < 0:
        raise InvalidInputError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    if mpp is not None:
        magnification = None
    slide = open_slide(slide_path, mpp=base_mpp, objective_power=base_magnification)
    mask = segment_tissue(slide, **dict(segment_kwargs or {}))
    if not mask.any():
        raise InvalidInputError(
            f"{slide.path}: no tissue found (saturation threshold {mask.params['threshold']:g} at downsample "
            f"{mask.downsample[0]:.3g}, regions must exceed a_t={mask.params['a_t']:g} reference patches); "
            "if the slide has tissue, lower sthresh or a_t through segment_kwargs="
        )
    grid = patch_grid(
        slide,
        mask,
        magnification=magnification,
        mpp=mpp,
        patch_size=patch_size,
        stride=stride,
        min_tissue=min_tissue,
        read_level=read_level,
    )
    if len(grid) == 0:
        raise InvalidInputError(
            f"{slide.path}: tissue covers {mask.fraction:.2%} of the slide but no patch has "
            f"min_tissue={min_tissue:g} of its area in tissue; lower min_tissue or patch_size"
        )
    input_size = int(input_size or patch_size)
    transform = transform if transform is not None else PatchTransform()
    model, encoder_name = _resolve_encoder(encoder, weights)
    encoder_name = _encoder_name or encoder_name
    fingerprint = {
        "slide": slide.name,
        "slide_bytes": slide.path.stat().st_size,
        "dimensions": list(slide.dimensions),
        "grid": grid.attrs(),
        "n": len(grid),
        "input_size": input_size,
        "transform": _transform_id(transform),
        "encoder": encoder_name,
        "weights": weights_digest(model),
        "dtype": dtype,
        "amp": bool(amp),
    }
    if out_path.exists() and not overwrite:
        if _existing_matches(out_path, fingerprint):  # a crash after the rename may have left the shards
            shutil.rmtree(out_path.with_name(out_path.name + ".partial"), ignore_errors=True)
            return out_path
        raise InvalidInputError(
            f"{out_path} already exists and was made with other settings (or by another tool); "
            "pass overwrite=True to replace it"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)

    shards = _Shards(out_path, fingerprint, grid.coords)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev).eval()
    try:
        _run_encoder(
            model,
            encoder_name,
            slide,
            grid,
            shards,
            input_size,
            transform,
            dev,
            dtype,
            int(batch_size),
            int(num_workers),
            progress,
            bool(amp),
        )
        _write_features_h5(out_path, shards, grid, slide, fingerprint, encoder_name, input_size, dtype, mask)
    finally:
        slide.close()
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
    """
    model, name = _resolve_encoder(encoder, weights)
    out_dir = Path(out_dir)
    done: dict[str, Path] = {}
    for slide_path in slide_paths:
        sid = slide_id(slide_path)
        try:
            done[sid] = extract_features(slide_path, model, out_dir / f"{sid}.h5", _encoder_name=name, **kwargs)
        except (DatasetFormatError, InvalidInputError) as err:
            if not skip_errors:
                raise
            warnings.warn(f"skipped {slide_path}: {err}", stacklevel=2)
    return done


def create_patch_encoder(name: str, weights: str | os.PathLike | Mapping[str, Any] | None = None) -> torch.nn.Module:
    """A patch encoder returning [B, D] features, in eval mode.

    ``"resnet18"``: ImageNet ResNet18 without its fc (512-d; ACMIL's natural_supervised features).
    ``"resnet50_trunc"``: ResNet50 cut after layer3, global average pool (1024-d; CLAM's features).
    Any other name: ``attnzoo.create_model(name, num_classes=0)`` (e.g. ``vit_small_patch16_224``
    with the Lunit DINO checkpoint as ``weights=PATH`` gives ACMIL's medical_ssl 384-d features).
    ``weights``: None = the official ImageNet weights (torchvision's for the two ResNets, downloaded
    once), ``"none"`` = random initialisation, or a local path / URL / registered checkpoint / state dict.
    """
    random_init = isinstance(weights, str) and weights.strip().lower() == "none"
    arch, default_tag, _ = _NAMED_ENCODERS.get(name, (name, None, None))

    def build(**kwargs: Any) -> torch.nn.Module:
        if random_init:
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


# ------------------------------------------------------------------------------------ internals


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
    state = unwrap_state_dict(
        weights if isinstance(weights, Mapping) else load_checkpoint_file(resolve_checkpoint(weights))
    )
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
    input_size: int,
    transform: Callable[[Image.Image], Any],
    dev: torch.device,
    dtype: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
    amp: bool,
) -> None:
    """Embed the patches after the finished shards, batch by batch, each batch saved as a shard."""
    start = shards.done
    if start < len(grid):
        dataset = PatchDataset(slide, grid, input_size=input_size, transform=transform, coords=grid.coords[start:])
        loader: DataLoader = DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=dev.type == "cuda",
            prefetch_factor=4 if num_workers else None,
        )
        bar = tqdm(
            total=len(grid), initial=start, desc=slide.name, unit="patch", dynamic_ncols=True, disable=not progress
        )
        row = start
        try:
            autocast = torch.autocast(
                dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16, enabled=amp
            )
            with torch.inference_mode(), autocast:
                for images, _ in loader:
                    out = model(images.to(dev, non_blocking=True))
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


def _write_features_h5(
    out_path: Path,
    shards: _Shards,
    grid: PatchGrid,
    slide: Slide,
    fingerprint: dict[str, Any],
    encoder_name: str,
    input_size: int,
    dtype: str,
    mask: TissueMask,
) -> None:
    """Stream the shards into one HDF5 file beside ``out_path`` and rename it into place."""
    h5py = import_wsi_dependency("h5py")
    if shards.done != len(grid):
        raise RuntimeError(f"{shards.dir}: holds {shards.done} of {len(grid)} rows")  # pragma: no cover
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            features = f.create_dataset("features", shape=(len(grid), shards.dim), dtype=dtype)
            for start, end, path in shards.shards:
                features[start:end] = np.load(path)
            coords = f.create_dataset("coords", data=grid.coords.astype(np.int64))
            # CLAM's convention: coords carry the size read at patch_level
            coords.attrs["patch_size"] = grid.read_size
            coords.attrs["patch_level"] = grid.level
            attrs = {
                "format": FEATURES_FORMAT,
                "attnzoo_version": __version__,
                "slide_id": slide.name,
                "slide_path": os.fspath(slide.path),
                "slide_dimensions": list(slide.dimensions),
                "encoder": encoder_name,
                "input_size": input_size,
                "level": grid.level,
                "tissue_fraction": mask.fraction,
                "fingerprint": json.dumps(fingerprint, sort_keys=True),
                **grid.attrs(),
            }
            for key, value in attrs.items():
                f.attrs[key] = value
