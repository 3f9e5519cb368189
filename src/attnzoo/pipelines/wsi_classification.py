"""``pipeline("wsi-classification")``: a whole-slide image (or its patch features) in, class
probabilities, the attention on every patch and a heatmap over the slide out.

>>> wsi = attnzoo.pipeline("wsi-classification", model="acmil_ga", weights="acmil_camelyon16.safetensors")  # doctest: +SKIP
>>> result = wsi("tumor_001.tif")         # tiles at 20x, ResNet18 features, ACMIL   # doctest: +SKIP
>>> result.heatmap().save("tumor_001.png")                                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnzoo.errors import InvalidInputError
from attnzoo.pipelines.base import Pipeline, list_collate

__all__ = ["SlidePrediction", "WSIClassificationPipeline"]

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth")


@dataclass
class SlidePrediction:
    """One slide: class probabilities, the attention on each patch (mean over branches of the
    softmax, summing to 1) and where the patches are."""

    probabilities: np.ndarray  # [C]
    attention: np.ndarray  # [N]
    coords: np.ndarray | None = None  # [N, 2] level-0 top-left
    patch_size_level0: int | None = None
    slide_path: str | None = None
    labels: list[str] | None = field(default=None, repr=False)

    @property
    def index(self) -> int:
        return int(self.probabilities.argmax())

    @property
    def label(self) -> str:
        return self.labels[self.index] if self.labels and self.index < len(self.labels) else str(self.index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "index": self.index,
            "probabilities": [round(float(p), 6) for p in self.probabilities],
            "slide": self.slide_path,
            "patches": int(len(self.attention)),
        }

    def summary(self) -> str:
        return f"{self.label} ({self.probabilities.max():.1%}, {len(self.attention)} patches)"

    def plot(self, size: int = 1024, slide: Any = None) -> Image.Image:
        """The attention heatmap (:meth:`heatmap`)."""
        return self.heatmap(size, slide)

    def heatmap(self, size: int = 1024, slide: Any = None) -> Image.Image:
        """The attention over the slide thumbnail (over a blank canvas when the slide is not at hand)."""
        from attnzoo.viz.wsi import plot_attention_heatmap

        if self.coords is None:
            raise InvalidInputError("these features carry no patch coordinates: no heatmap can be drawn")
        source = slide if slide is not None else self.slide_path
        thumbnail, dims = None, None
        if source is not None and not str(source).lower().endswith(FEATURE_SUFFIXES):
            from attnzoo.datasets.wsi import open_slide

            with open_slide(source) if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source) as s:
                thumbnail, dims = s.thumbnail((size, size)), s.dimensions
        return plot_attention_heatmap(
            self.attention,
            self.coords,
            self.patch_size_level0 or 1,
            thumbnail=thumbnail,
            dimensions=dims,
            size=size,
            title=f"{self.label} ({self.probabilities.max():.1%})",
        )


class WSIClassificationPipeline(Pipeline):
    """Inputs: a slide file (tiled at ``magnification``, features by ``encoder``), a feature file
    (ACMIL/CLAM/TRIDENT/attnzoo ``.h5`` or ``.pt``), a :class:`~attnzoo.datasets.mil_features.FeatureBag`,
    or a ``[N, D]`` tensor. The MIL model sees one bag at a time. ``segment_kwargs`` go to the tissue
    segmentation (CLAM's parameters; small images need a lower ``a_t``). Slides are tiled as ACMIL's
    Step1/Step2: 256 px at 20x read from level 0 (``read_level="base"``), resized to 224;
    ``read_level="auto"`` reads a coarser pyramid level when one is fine enough (faster, other pixels)."""

    task = "wsi-classification"
    default_model = "acmil_ga"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        encoder: str | torch.nn.Module = "resnet18",
        encoder_weights: str | None = None,
        magnification: float = 20,
        patch_size: int = 256,
        input_size: int = 224,
        feature_dir: str | os.PathLike | None = None,
        labels: list[str] | None = None,
        segment_kwargs: dict[str, Any] | None = None,
        read_level: str = "base",
        **kwargs: Any,
    ):
        super().__init__(model, **kwargs)
        self.encoder, self.encoder_weights = encoder, encoder_weights
        self.magnification, self.patch_size, self.input_size = magnification, patch_size, input_size
        self.feature_dir = Path(feature_dir) if feature_dir else Path(tempfile.mkdtemp(prefix="attnzoo-wsi-"))
        self.labels, self.segment_kwargs, self.read_level = labels, segment_kwargs, read_level

    collate = staticmethod(list_collate)

    def is_single(self, inputs: Any) -> bool:
        return not isinstance(inputs, (list, tuple))

    def preprocess(self, source: Any) -> dict[str, Any]:
        from attnzoo.datasets.mil_features import FeatureBag, read_feature_bags

        path = feature_file = None
        if isinstance(source, torch.Tensor):
            bag = FeatureBag("<tensor>", (source[0] if source.ndim == 3 and len(source) == 1 else source).float())
        elif isinstance(source, FeatureBag):
            bag = source
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise InvalidInputError(f"{path}: no such file")
            feature_file = path if path.suffix.lower() in FEATURE_SUFFIXES else self._extract(path)
            bags = read_feature_bags(feature_file)
            if len(bags) != 1:
                raise InvalidInputError(f"{path} holds {len(bags)} slides; pass one slide's features (or a FeatureBag)")
            bag = next(iter(bags.values()))
        else:
            raise InvalidInputError(
                f"cannot classify a {type(source).__name__}: pass a slide path, a feature file, a FeatureBag or a tensor"
            )
        if bag.features.ndim != 2:
            raise InvalidInputError(
                f"{bag.slide_id}: a bag is [N, D] patch features (or [1, N, D]), got {tuple(bag.features.shape)}"
            )
        if len(bag.features) == 0:
            raise InvalidInputError(f"{bag.slide_id}: an empty bag (no patches) cannot be classified")
        source_slide, patch0 = self._feature_file_info(feature_file)
        slide = source_slide if path is not None and path == feature_file else path
        return {
            "features": bag.features,
            "coords": bag.coords,
            "slide": str(slide) if slide else None,
            "patch0": patch0,
        }

    def _extract(self, slide: Path) -> Path:
        from attnzoo.pipelines.wsi_features import extract_features, weights_digest

        # one file per slide *and* settings: another slide of the same name, or the same slide tiled
        # otherwise, must not meet "already exists" (nor reuse the wrong features)
        settings = [
            os.fspath(slide.resolve()),
            self.encoder if isinstance(self.encoder, str) else weights_digest(self.encoder),
            self.encoder_weights,
            self.magnification,
            self.patch_size,
            self.input_size,
            self.read_level,
            sorted((self.segment_kwargs or {}).items()),
        ]
        out = self.feature_dir / f"{slide.stem}-{hashlib.sha1(repr(settings).encode()).hexdigest()[:10]}.h5"
        return extract_features(
            slide,
            self.encoder,
            out,
            magnification=self.magnification,
            patch_size=self.patch_size,
            input_size=self.input_size,
            read_level=self.read_level,
            weights=self.encoder_weights,
            device=self.device,
            progress=False,
            segment_kwargs=self.segment_kwargs,
        )

    @staticmethod
    def _feature_file_info(path: Path | None) -> tuple[Path | None, int | None]:
        """From our own HDF5 feature files: the slide they came from (if still there, for the heatmap)
        and the patch side at level 0; ``(None, None)`` for other files."""
        if path is None or path.suffix.lower() not in (".h5", ".hdf5"):
            return None, None
        import h5py

        with h5py.File(path, "r") as f:
            slide, patch0 = f.attrs.get("slide_path"), f.attrs.get("patch_size_level0")
            if patch0 is None and "coords" in f:  # CLAM/TRIDENT: the size read at patch_level, else the grid step
                attrs, coords = f["coords"].attrs, np.asarray(f["coords"][()])
                if int(attrs.get("patch_level", -1)) == 0 and attrs.get("patch_size") is not None:
                    patch0 = attrs["patch_size"]
                elif coords.ndim == 2 and len(coords) > 1:
                    steps = np.diff(np.unique(coords[:, 0]))
                    patch0 = int(steps.min()) if len(steps) else None
        return (Path(slide) if slide and Path(slide).exists() else None), (None if patch0 is None else int(patch0))

    def _forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        probabilities, attention = [], []
        for features in batch["features"]:  # one bag at a time: bags differ in length
            check = getattr(self.model, "check_input", None)
            if check is not None:
                check(features)
            out = self.model(features if self.dtype is not None else features.float())
            probabilities.append(torch.softmax(out.slide_logits.float(), -1)[0])
            attention.append(out.instance_attention().float())
        return {
            "probabilities": probabilities,
            "attention": attention,
            "coords": batch["coords"],
            "slide": batch["slide"],
            "patch0": batch["patch0"],
        }

    def postprocess(self, outputs: dict[str, Any]) -> SlidePrediction:
        coords = outputs["coords"]
        return SlidePrediction(
            outputs["probabilities"].numpy(),
            outputs["attention"].numpy().reshape(-1),
            None if coords is None else np.asarray(coords),
            outputs["patch0"],
            outputs["slide"],
            self.labels,
        )
