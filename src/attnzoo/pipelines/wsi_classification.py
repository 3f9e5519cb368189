"""``pipeline("wsi-classification")``: a whole-slide image (or its patch features) in, class
probabilities, the attention on every patch and a heatmap over the slide out.

>>> wsi = attnzoo.pipeline("wsi-classification", model="acmil_ga", weights="acmil_camelyon16.safetensors")  # doctest: +SKIP
>>> result = wsi("tumor_001.tif")         # tiles at 20x, ResNet18 features, ACMIL   # doctest: +SKIP
>>> result.heatmap().save("tumor_001.png")                                          # doctest: +SKIP

Every setting below is accepted by the constructor (the default of every call) and by each call
(for that call), e.g. ``wsi("scan.tif", base_magnification=40, segment_kwargs={"a_t": 1})``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnzoo._distributed import ProcessLocalLock
from attnzoo._values import flag, refuse_meta, to_numpy
from attnzoo.errors import InvalidInputError
from attnzoo.pipelines.base import Pipeline, list_collate, weights_note

__all__ = ["SlidePrediction", "WSIClassificationPipeline"]

FEATURE_SUFFIXES = (".h5", ".hdf5", ".h5py", ".pt", ".pth")
#: A sample's key naming the slide whose features are still to be made (in the calling process).
_TO_EMBED = "slide_to_embed"
_SAMPLE_KEYS = ("features", "coords", "slide", "patch0", "encoder", "random_encoder")
#: Guards the table of feature-file locks.
_FILE_LOCKS_GUARD = threading.Lock()
#: One lock per feature file: two threads wanting the same slide's features make them once, in turn.
_FILE_LOCKS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


@dataclass
class SlidePrediction:
    """One slide: class probabilities, the attention on each patch (mean over branches of the
    softmax, summing to 1) and where the patches are. ``weights`` says what the MIL model's weights
    were (``"random (seed 0)"``, a checkpoint; None when not known) and ``encoder`` which patch
    encoder embedded the slide (None for features given as such)."""

    probabilities: np.ndarray  # [C]
    attention: np.ndarray  # [N]
    coords: np.ndarray | None = None  # [N, 2] level-0 top-left
    patch_size_level0: int | None = None
    slide_path: str | None = None
    labels: list[str] | None = field(default=None, repr=False)
    weights: str | None = None
    encoder: str | None = None
    random_encoder: bool = field(default=False, repr=False)

    @property
    def index(self) -> int:
        return int(self.probabilities.argmax())

    @property
    def label(self) -> str:
        return self.labels[self.index] if self.labels and self.index < len(self.labels) else str(self.index)

    @property
    def random_weights(self) -> bool:
        """Whether the prediction came from random weights (the MIL model's or the patch encoder's)."""
        return bool(weights_note(self.weights)) or self.random_encoder

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "index": self.index,
            "probabilities": [round(float(p), 6) for p in self.probabilities],
            "slide": self.slide_path,
            "patches": int(len(self.attention)),
            "weights": self.weights,
            "encoder": self.encoder,
        }

    def __repr__(self) -> str:
        return f"SlidePrediction({self.summary()}, slide={self.slide_path!r}, weights={self.weights!r})"

    def summary(self) -> str:
        note = ", random weights" if self.random_weights else ""
        return f"{self.label} ({self.probabilities.max():.1%}, {_patches(len(self.attention))}{note})"

    def plot(self, size: int = 1024, slide: Any = None) -> Image.Image:
        """The attention heatmap (:meth:`heatmap`); features without patch coordinates (a bare tensor or ``.pt``
        bag) get their patches drawn in file order, row by row on a square grid, as the title says, so that every
        result has a picture (``attnzoo run`` writes one per input)."""
        if self.coords is not None:
            return self.heatmap(size, slide)
        from attnzoo.viz.wsi import plot_attention_heatmap

        index = np.arange(len(self.attention))
        columns = max(1, int(np.ceil(np.sqrt(len(index)))))
        grid = np.stack([index % columns, index // columns], axis=1)
        title = f"{self._title()}; no patch coordinates: patches in file order, row by row"
        return plot_attention_heatmap(self.attention, grid, 1, size=size, title=title, note=self._note())

    def heatmap(self, size: int = 1024, slide: Any = None) -> Image.Image:
        """The attention over the slide thumbnail (over a blank canvas when the slide is not at hand),
        with a colour bar, the predicted class in the title and "random weights" when they were."""
        from attnzoo.viz.wsi import plot_attention_heatmap

        if self.coords is None:
            raise InvalidInputError(
                "these features carry no patch coordinates: no heatmap can be drawn (plot() shows the attention "
                "in file order)"
            )
        source = slide if slide is not None else self.slide_path
        thumbnail, dims = None, None
        if source is not None and not str(source).lower().endswith(FEATURE_SUFFIXES):
            from attnzoo.datasets.wsi import open_slide

            with open_slide(source) if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source) as s:
                thumbnail, dims = s.thumbnail((size, size)), s.dimensions
        return plot_attention_heatmap(
            self.attention,
            self.coords,
            self.patch_size_level0 or grid_step(self.coords) or 1,  # features given bare: the grid's step
            thumbnail=thumbnail,
            dimensions=dims,
            size=size,
            title=self._title(),
            note=self._note(),
        )

    def _title(self) -> str:
        name = f"{Path(self.slide_path).name}: " if self.slide_path else ""
        return f"{name}{self.label} ({self.probabilities.max():.1%}), {_patches(len(self.attention))}"

    def _note(self) -> str:
        """The red line under the title: what made the prediction meaningless, if anything."""
        if weights_note(self.weights):
            return "random weights: the class and the attention are meaningless"
        if self.random_encoder:
            return "random weights (patch encoder): the class and the attention are meaningless"
        return ""


def _patches(count: int) -> str:
    return f"{count} patch" if count == 1 else f"{count} patches"


class WSIClassificationPipeline(Pipeline):
    """Inputs: a slide file (tiled, then embedded by ``encoder``), a feature file or folder holding one
    slide (ACMIL/CLAM/TRIDENT/attnzoo ``.h5`` or ``.pt``), a :class:`~attnzoo.datasets.mil_features.FeatureBag`,
    or a ``[N, D]`` (or ``[1, N, D]``) tensor or array of real numbers. The MIL model sees one bag at a time.

    Settings, each accepted by the constructor (the default) and by a call (for that call):
    ``encoder`` (``"resnet18"``, another name, or a module); ``encoder_weights`` (None: the official
    ImageNet weights, or random ones when the pipeline's model has random weights; ``"pretrained"``:
    the official ones always; ``"none"``; a path); ``magnification`` (20) or ``mpp`` (µm per pixel,
    which wins when given); ``patch_size`` (256 px at that resolution); ``input_size`` (224, what the
    encoder sees); ``read_level`` (``"base"``: level 0, resized, as ACMIL; ``"auto"``: a coarser pyramid
    level when one is fine enough: faster, other pixels); ``min_tissue`` (0.5); ``segment_kwargs``
    (CLAM's tissue segmentation; images much smaller than a whole slide need a lower ``a_t``);
    ``base_magnification`` / ``base_mpp`` (for a file without that metadata); ``feature_dir`` (where
    features are kept and reused; a temporary folder by default); ``progress`` (a bar over each
    slide's patches; None: on a terminal only); ``labels`` (class names).

    With ``num_workers > 0`` the DataLoader workers read feature files, bags and tensors; slides are
    tiled and embedded in the calling process (where the encoder and its device are), their patches
    read by ``num_workers`` processes of the extraction's own (2 when ``num_workers`` is 0).
    """

    task = "wsi-classification"
    default_model = "acmil_ga"
    collate = staticmethod(list_collate)
    prepared_here_key = _TO_EMBED
    reads_file_objects = False  # refused by name (slides and feature files are read by path): not read first

    def __init__(self, model: torch.nn.Module, **kwargs: Any):
        self._encoders: dict[Any, tuple[torch.nn.Module, str, str, Any]] = {}
        # guards the encoder cache and the default feature folder: threads sharing the pipeline share them
        # (a new one in a copy, e.g. for spawned DataLoader workers: the pipeline stays picklable)
        self._lock = ProcessLocalLock()
        # Removed with the pipeline (or at exit): a default feature folder is a cache, not a result.
        self._temporary_dir: tempfile.TemporaryDirectory[str] | None = None
        super().__init__(model, **kwargs)

    @property
    def feature_dir(self) -> Path:
        """Where slides' features go unless a call names another folder (made on first use)."""
        given = self._defaults[0].get("feature_dir")
        if given is not None:
            return Path(given)
        with self._lock:  # one folder, whichever thread asks first
            if self._temporary_dir is None:
                self._temporary_dir = tempfile.TemporaryDirectory(prefix="attnzoo-wsi-", ignore_cleanup_errors=True)
        return Path(self._temporary_dir.name)

    def is_single(self, inputs: Any) -> bool:
        """A slide, feature file, bag, tensor or array is one input (a file object too, to be refused as one); a
        list or any other iterable (a generator) is a batch of them."""
        from attnzoo.datasets.images import is_file_object

        if isinstance(inputs, (str, bytes, os.PathLike, torch.Tensor, np.ndarray, Mapping)) or is_file_object(inputs):
            return True
        return not isinstance(inputs, Iterable)

    def _sanitize_parameters(
        self,
        encoder: str | torch.nn.Module | None = None,
        encoder_weights: str | os.PathLike | Mapping[str, Any] | None = None,
        magnification: float | None = None,
        mpp: float | None = None,
        patch_size: int | None = None,
        input_size: int | None = None,
        read_level: str | None = None,
        min_tissue: float | None = None,
        segment_kwargs: Mapping[str, Any] | None = None,
        base_magnification: float | None = None,
        base_mpp: float | None = None,
        feature_dir: str | os.PathLike | None = None,
        progress: bool | None = None,
        labels: Sequence[str] | None = None,
    ) -> tuple[dict, dict, dict]:
        from attnzoo.pipelines.wsi_features import (
            check_input_size,
            check_min_tissue,
            check_patch_side,
            check_scale,
            check_segment_kwargs,
        )

        pre: dict[str, Any] = {}
        if encoder is not None:
            if not isinstance(encoder, torch.nn.Module) and not (isinstance(encoder, str) and encoder.strip()):
                raise InvalidInputError(f"encoder must be a model name or a torch.nn.Module, got {encoder!r}")
            pre["encoder"] = encoder
        if encoder_weights is not None:
            if not isinstance(encoder_weights, (str, os.PathLike, Mapping)):
                raise InvalidInputError(
                    "encoder_weights must be 'pretrained', 'none', a path, URL or checkpoint name, or a state "
                    f"dict; got a {type(encoder_weights).__name__}"
                )
            pre["encoder_weights"] = encoder_weights
        for name, value in (
            ("magnification", magnification),
            ("mpp", mpp),
            ("base_magnification", base_magnification),
            ("base_mpp", base_mpp),
        ):
            if value is not None:
                pre[name] = check_scale(name, value)
        if patch_size is not None:
            pre["patch_size"] = check_patch_side("patch_size", patch_size)
        if input_size is not None:  # its bound, relative to the patch size, is checked when a slide is tiled
            pre["input_size"] = check_input_size(input_size, None)
        if read_level is not None:
            if read_level not in ("auto", "base"):
                raise InvalidInputError(f"read_level must be 'base' (level 0) or 'auto', got {read_level!r}")
            pre["read_level"] = read_level
        if min_tissue is not None:
            pre["min_tissue"] = check_min_tissue(min_tissue)
        if segment_kwargs is not None:
            pre["segment_kwargs"] = check_segment_kwargs(segment_kwargs)
        if feature_dir is not None:
            if not isinstance(feature_dir, (str, os.PathLike)) or not os.fspath(feature_dir):
                raise InvalidInputError(f"feature_dir must be a folder path, got {feature_dir!r}")
            if Path(feature_dir).exists() and not Path(feature_dir).is_dir():
                raise InvalidInputError(f"feature_dir={os.fspath(feature_dir)!r} is a file; give a folder")
            pre["feature_dir"] = Path(feature_dir)
        if progress is not None:
            pre["progress"] = flag(
                progress, "progress", allow_none=True, none_means="on a terminal", error=InvalidInputError
            )
        post = {} if labels is None else {"labels": self._checked_labels(labels)}
        return pre, {}, post

    def _checked_labels(self, labels: Any) -> list[str]:
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise InvalidInputError(f"labels must be a list of class names, got {labels!r}")
        n_classes = getattr(self.model, "n_classes", None)
        if isinstance(n_classes, int) and len(labels) != n_classes:
            raise InvalidInputError(f"got {len(labels)} labels for a model with {n_classes} classes")
        return [str(label) for label in labels]

    def preprocess(
        self,
        source: Any,
        *,
        encoder: str | torch.nn.Module = "resnet18",
        encoder_weights: str | os.PathLike | Mapping[str, Any] | None = None,
        magnification: float = 20,
        mpp: float | None = None,
        patch_size: int = 256,
        input_size: int = 224,
        read_level: str = "base",
        min_tissue: float = 0.5,
        segment_kwargs: dict[str, Any] | None = None,
        base_magnification: float | None = None,
        base_mpp: float | None = None,
        feature_dir: Path | None = None,
        progress: bool | None = None,
        reading_workers: int | None = None,
    ) -> dict[str, Any]:
        """One input as the model's bag (a slide is tiled and embedded here, ``reading_workers`` processes
        reading its patches; None: the extraction's default)."""
        from attnzoo.datasets.mil_features import FeatureBag, read_feature_bags

        path = feature_file = None
        encoder_note, random_encoder = None, False
        if isinstance(source, (torch.Tensor, np.ndarray)):
            name, raw, raw_coords = f"the {type(source).__name__}", source, None
        elif isinstance(source, FeatureBag):
            name, raw, raw_coords = source.slide_id, source.features, source.coords
        elif isinstance(source, (str, os.PathLike)):
            path = _local_path(source)
            if _slide_to_embed(path) is None:
                feature_file = path
            else:
                module, encoder_name, digest, encoder_note, random_encoder = self._encoder(encoder, encoder_weights)
                feature_file = self._extract(
                    path,
                    module,
                    encoder_name,
                    digest,
                    reading_workers,
                    feature_dir=feature_dir,
                    magnification=magnification,
                    mpp=mpp,
                    patch_size=patch_size,
                    input_size=input_size,
                    read_level=read_level,
                    min_tissue=min_tissue,
                    segment_kwargs=segment_kwargs,
                    base_magnification=base_magnification,
                    base_mpp=base_mpp,
                    progress=progress,
                )
            bags = read_feature_bags(feature_file)
            if len(bags) != 1:
                raise InvalidInputError(f"{path} holds {len(bags)} slides; pass one slide's features (or a FeatureBag)")
            bag = next(iter(bags.values()))
            name, raw, raw_coords = bag.slide_id, bag.features, bag.coords
        else:
            from attnzoo.datasets.images import describe, is_file_object

            if is_file_object(source):
                raise InvalidInputError(
                    f"{describe(source)}: a file object cannot be classified (slides and feature files are read by "
                    "path): pass the file's path"
                )
            raise InvalidInputError(
                f"cannot classify a {type(source).__name__}: pass a slide path, a feature file, a FeatureBag or a tensor"
            )
        features = _as_features(raw, name)  # every bag, whoever made it: real, finite, [N, D]
        coords = _as_coords(raw_coords, len(features), name)
        check = getattr(self.model, "check_input", None)
        if check is not None:  # here, not in _forward, so on_error="skip" can set a bad bag aside
            check(features)
        source_slide, patch0 = self._feature_file_info(feature_file)
        slide = source_slide if path is not None and path == feature_file else path
        return {
            "features": features,
            "coords": coords,
            "slide": str(slide) if slide else None,
            "patch0": patch0,
            "encoder": encoder_note,
            "random_encoder": random_encoder,
        }

    def preprocessor(self, **params: Any) -> Callable[[Any], dict[str, Any]]:
        """Per input, in DataLoader workers when ``num_workers > 0``: feature files, bags and tensors are read
        and checked there; a slide path is only checked, its features are made by :meth:`prepare_here` in this
        process (a worker can neither start the extraction's own reading processes nor use CUDA)."""
        return functools.partial(self._read, **params)

    def _read(self, source: Any, **settings: Any) -> dict[str, Any]:
        if isinstance(source, (str, os.PathLike)):
            slide = _slide_to_embed(_local_path(source))
            if slide is not None:  # the keys of every sample, so a batch of slides and bags collates
                return {**dict.fromkeys(_SAMPLE_KEYS), _TO_EMBED: slide}
        return {**self.preprocess(source, **settings), _TO_EMBED: None}

    def prepare_here(self, slide: Path, num_workers: int, **settings: Any) -> dict[str, Any]:
        """A slide marked by :meth:`_read`, tiled and embedded here; the call's DataLoader workers, idle meanwhile,
        are its reading processes."""
        return self.preprocess(slide, **settings, reading_workers=num_workers or None)

    def _encoder(self, encoder: str | torch.nn.Module, weights: Any) -> tuple[torch.nn.Module, str, str, str, bool]:
        """The patch encoder, its name, a digest of its weights, a description of them and whether they are
        random. A named encoder is built once per setting (a random one from a fixed seed), so a second
        call on a slide finds its features made with the very same encoder and reuses them."""
        from attnzoo.pipelines.wsi_features import RANDOM_ENCODER_SEED, create_patch_encoder, weights_digest

        if isinstance(encoder, torch.nn.Module):
            if weights is not None:
                raise InvalidInputError(
                    "encoder_weights applies to an encoder given by name; load the module's yourself"
                )
            if self.dtype is not None:  # the pipeline's dtype is the encoder's too, as for the MIL model
                encoder.to(dtype=self.dtype)
            cfg = getattr(encoder, "pretrained_cfg", None)
            name = (cfg.get("architecture") if isinstance(cfg, Mapping) else None) or type(encoder).__name__
            return encoder, name, weights_digest(encoder), f"{name} (a module given as is)", False
        if weights is None and weights_note(self.weights_label):
            weights = "none"  # a random model: no download of weights that cannot make its output meaningful
        if isinstance(weights, str) and weights.strip().lower() == "pretrained":
            weights = None
        random = isinstance(weights, str) and weights.strip().lower() == "none"
        key = (encoder, ("<state dict>", id(weights)) if isinstance(weights, Mapping) else weights)
        with self._lock:  # threads sharing the pipeline share one encoder per setting, built once
            if key not in self._encoders:
                # in the pipeline's dtype too (the patches go in as the encoder's own), as the run records it
                module = create_patch_encoder(encoder, weights).to(self.device, self.dtype)
                note = (
                    f"random (seed {RANDOM_ENCODER_SEED})"
                    if random
                    else "pretrained (official)"
                    if weights is None
                    else "a state dict"
                    if isinstance(weights, Mapping)
                    else os.fspath(weights)
                )
                # the weights themselves stay referenced, so the id in a state dict's key is never reused
                self._encoders[key] = (module, weights_digest(module), f"{encoder}, {note}", weights)
            module, digest, note, _ = self._encoders[key]
        return module, encoder, digest, note, random

    def _extract(
        self, slide: Path, encoder: torch.nn.Module, name: str, digest: str, workers: int | None, **settings: Any
    ) -> Path:
        from attnzoo.pipelines.wsi_features import extract_features

        # one file per slide, encoder and settings: another slide of the same name, or the same slide
        # tiled otherwise, gets its own file; a file left by an older run with other settings is replaced
        feature_dir = settings.pop("feature_dir") or self.feature_dir
        key = [os.fspath(slide.resolve()), name, digest, sorted(_plain(settings).items())]
        out = feature_dir / f"{slide.stem}-{hashlib.sha1(repr(key).encode()).hexdigest()[:10]}.h5"
        if workers is not None:
            settings["num_workers"] = workers
        with _file_lock(out):  # a second thread on the same slide waits, then finds the file made
            return extract_features(
                slide, encoder, out, device=self.device, overwrite="stale", _encoder_name=name, **settings
            )

    @staticmethod
    def _feature_file_info(path: Path | None) -> tuple[Path | None, int | None]:
        """From our own HDF5 feature files: the slide they came from (if still there, for the heatmap)
        and the patch side at level 0; ``(None, None)`` for other files."""
        if path is None or path.suffix.lower() not in (".h5", ".hdf5", ".h5py"):
            return None, None
        import h5py

        with h5py.File(path, "r") as f:
            slide, patch0 = f.attrs.get("slide_path"), _side(f.attrs.get("patch_size_level0"))
            if patch0 is None and "coords" in f:
                # TRIDENT puts patch_size_level0 on the coords; CLAM the size read at patch_level; else the grid step
                attrs = f["coords"].attrs
                patch0 = _side(attrs.get("patch_size_level0"))
                if patch0 is None and attrs.get("patch_level") is not None and int(attrs["patch_level"]) == 0:
                    patch0 = _side(attrs.get("patch_size"))
                if patch0 is None:
                    patch0 = grid_step(np.asarray(f["coords"][()]))
        if isinstance(slide, bytes):
            slide = slide.decode(errors="replace")
        try:
            found = Path(slide) if isinstance(slide, str) and slide and Path(slide).is_file() else None
        except (OSError, ValueError):  # not a path this system can have (e.g. a NUL inside)
            found = None
        return found, patch0

    def _forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        probabilities, attention = [], []
        for features in batch["features"]:  # one bag at a time: bags differ in length
            out = self.model(features if self.dtype is not None else features.float())
            probabilities.append(torch.softmax(out.slide_logits.float(), -1)[0])
            attention.append(out.instance_attention().float())
        kept = ("coords", "slide", "patch0", "encoder", "random_encoder")
        return {"probabilities": probabilities, "attention": attention, **{k: batch[k] for k in kept}}

    def postprocess(self, outputs: dict[str, Any], labels: list[str] | None = None) -> SlidePrediction:
        coords = outputs["coords"]
        return SlidePrediction(
            outputs["probabilities"].numpy(),
            outputs["attention"].numpy().reshape(-1),
            None if coords is None else np.asarray(coords),
            outputs["patch0"],
            outputs["slide"],
            labels,
            self.weights_label,
            outputs["encoder"],
            outputs["random_encoder"],
        )


#: A URL's scheme (``https://``, ``s3://``, ``file://``): what no local path begins with.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _local_path(source: str | os.PathLike) -> Path:
    """``source`` as a local path; a URL is a typed error (``Path`` would fold its ``//`` into a path that does
    not exist): a slide is gigabytes, so it is not downloaded as an image would be."""
    text = os.fsdecode(source)
    if _URL.match(text):
        raise InvalidInputError(
            f"{text}: a URL; slides and feature files are read from local paths only (a whole slide is gigabytes, "
            "not fetched on the fly): download it first and pass its path"
        )
    return Path(text)


def _slide_to_embed(path: Path) -> Path | None:
    """``path`` when it is a slide to tile and embed; None for a feature file or folder (or a typed error)."""
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file")
    return None if path.is_dir() or path.suffix.lower() in FEATURE_SUFFIXES else path


def _file_lock(path: Path) -> Any:
    """The lock of one feature file (kept while some thread holds or waits on it)."""
    key = os.path.abspath(path)
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(key)
        if lock is None:
            lock = _FILE_LOCKS[key] = threading.Lock()
    return lock


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as plain values for a file name's hash (segment_kwargs as a sorted list)."""
    return {k: sorted(v.items()) if isinstance(v, Mapping) else v for k, v in settings.items() if k != "progress"}


def _as_features(features: Any, what: str) -> torch.Tensor:
    """A bag's features as a float32 [N, D] tensor of finite real numbers (a [1, N, D] batch of one is
    unwrapped), or a typed error: complex values would lose their imaginary part, NaN and inf would
    make every probability NaN, booleans and strings are not features."""
    if isinstance(features, np.ndarray):
        if features.dtype.kind not in "iuf":
            raise InvalidInputError(f"{what}: features must be real numbers, got an array of dtype {features.dtype}")
        features = torch.from_numpy(np.ascontiguousarray(features))
    if not isinstance(features, torch.Tensor):
        raise InvalidInputError(f"{what}: features must be a tensor or array, got a {type(features).__name__}")
    refuse_meta(features, what)
    if features.is_complex() or features.dtype == torch.bool:
        raise InvalidInputError(
            f"{what}: features must be real numbers, got {features.dtype}"
            + (" (the imaginary part would be lost)" if features.is_complex() else "")
        )
    if features.layout != torch.strided:
        features = features.to_dense()
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise InvalidInputError(f"{what}: a bag is [N, D] patch features (or [1, N, D]), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise InvalidInputError(f"{what}: an empty bag (no patches) cannot be classified")
    if features.shape[1] == 0:
        raise InvalidInputError(f"{what}: patch features with 0 dimensions, shape {tuple(features.shape)}")
    features = features.detach().to("cpu", torch.float32)
    bad = ~torch.isfinite(features).all(dim=1)
    if bool(bad.any()):
        raise InvalidInputError(
            f"{what}: {int(bad.sum())} of {len(features)} patches have NaN or infinite features "
            "(or values beyond float32's range)"
        )
    return features


def _side(value: Any) -> int | None:
    """A patch side read from a file's attributes: a positive whole number of pixels, else None."""
    try:
        side = float(np.asarray(value).reshape(-1)[0]) if value is not None else None
    except (TypeError, ValueError, IndexError):
        return None
    return round(side) if side is not None and np.isfinite(side) and side >= 1 else None


def grid_step(coords: np.ndarray) -> int | None:
    """The patch grid's step in level-0 pixels: the smallest gap between the distinct x, or y, positions
    (a single column of patches has only y ones); None for a lone patch."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1:] != (2,) or coords.dtype.kind not in "iuf":
        return None
    gaps = np.concatenate([np.diff(np.unique(coords[:, axis].astype(np.float64))) for axis in (0, 1)])
    return _side(gaps[np.isfinite(gaps)].min()) if np.isfinite(gaps).any() else None


def _as_coords(coords: Any, n: int, what: str) -> np.ndarray | None:
    """Patch coordinates as an int64 [N, 2] array (one per patch, finite), or a typed error."""
    if coords is None:
        return None
    array = to_numpy(coords, f"{what}: coords")
    if array.dtype.kind not in "iuf" or array.shape != (n, 2) or not np.isfinite(array).all():
        raise InvalidInputError(
            f"{what}: coords must be [N, 2] finite level-0 (x, y), one per patch ({n}); got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64)
