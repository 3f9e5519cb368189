"""``pipeline("image-classification")``: any timm classifier, preprocessed as its checkpoint expects.

The weights of an ``attnzoo train image-classification`` run bring the run's class names and the preprocessing
its validation used (``attnzoo.create_model`` reads the run's ``config.yaml``): predictions are labelled with
the run's classes, and ``weights_label`` says where they came from."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnzoo._values import whole_number
from attnzoo.datasets.images import is_url, load_image
from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.pipelines.base import Pipeline, weights_note


@dataclass(frozen=True)
class ClassPrediction:
    """One of the top-k classes for an image. Also readable as a dict: ``p["label"]``."""

    label: str
    score: float
    index: int

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return ("label", "score", "index")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Classification(list):
    """The top-k :class:`ClassPrediction` of one image, best first (a list), with the image for :meth:`plot`."""

    def __init__(
        self, predictions: list[ClassPrediction], image: Any = None, title: str = "", weights: str | None = None
    ):
        super().__init__(predictions)
        self.image, self.title, self.weights = image, title, weights

    def to_dict(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self]

    def summary(self) -> str:
        return ", ".join(f"{p.label} ({p.score:.1%})" for p in self)

    def plot(self, image: Any = None, title: str | None = None, note: str | None = None) -> Image.Image:
        """The image beside a bar chart of its classes, under ``title`` (default: the model's name) and ``note``
        in red (default: "random weights: the classes are meaningless" when they were; "" for none)."""
        from attnzoo.viz import plot_classification

        source = image if image is not None else self.image
        if source is None:
            raise InvalidInputError("this result holds no image: pass plot(image)")
        if note is None:
            note = f"{weights_note(self.weights)}: the classes are meaningless" if weights_note(self.weights) else ""
        return plot_classification(load_image(source), self, title=self.title if title is None else title, note=note)


class ImagePreprocessor:
    """Decode + the model's eval transform; small and picklable, so DataLoader workers get no model."""

    def __init__(self, transform: Any, *, colour_order: str = "RGB", max_pixels: int | None = None):
        self.transform, self.colour_order, self.max_pixels = transform, colour_order, max_pixels

    def __call__(self, image: Any) -> dict[str, Any]:
        decoded = load_image(image, max_pixels=self.max_pixels)
        pixels = self.transform(decoded)
        if self.colour_order == "BGR":
            pixels = pixels.flip(0)
        # a file is read again for plot(); an in-memory input (or a download) is kept as decoded, a copy of its own
        on_disk = isinstance(image, (str, os.PathLike)) and not is_url(image)
        return {"pixel_values": pixels, "image": image if on_disk else decoded}


def imagenet_labels(model: torch.nn.Module) -> list[str] | None:
    """Human-readable ImageNet class names when the model's head is an ImageNet head."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(info.num_classes())]


def model_labels(model: torch.nn.Module) -> list[str]:
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names and len(names) == num_classes:
        return list(names)
    names = imagenet_labels(model)
    if names and len(names) == num_classes:
        return names
    return [f"LABEL_{i}" for i in range(num_classes)]


def model_data_config(model: torch.nn.Module) -> dict[str, Any]:
    """The data config of ``model`` as it was built: timm's ``resolve_input_data_config``, which reads the
    size the model was built at. A fixed-size model (Sparsifiner, InLine, timm's ViTs) built with
    ``img_size=S`` takes S x S inputs, while its ``pretrained_cfg`` keeps describing the checkpoint
    (224 for most), as timm leaves it. With a timm that lacks it: the legacy ``resolve_data_config``,
    with the size of a fixed-size model's patch embedding."""
    try:
        from timm.data import resolve_input_data_config
    except ImportError:  # timm before its model input traits
        from timm.data import resolve_data_config

        config = resolve_data_config(model=model)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if cfg.get("fixed_input_size") and isinstance(size, (tuple, list)) and len(size) == 2:
            config["input_size"] = (config["input_size"][0], *(int(s) for s in size))
        return config
    return resolve_input_data_config(model)


class ImageClassificationPipeline(Pipeline):
    """Top-k classes for images given as paths, PIL images, numpy arrays or tensors.

    >>> classify = attnzoo.pipeline("image-classification", model="resnet50")  # doctest: +SKIP
    >>> classify("cat.jpg", top_k=3)  # doctest: +SKIP
    [ClassPrediction(label='tabby, tabby cat', score=0.61, index=281), ...]
    """

    task = "image-classification"
    _weights_label: str | None = None

    def __init__(
        self, model: torch.nn.Module, *, labels: list[str] | None = None, max_pixels: int | None = None, **kwargs: Any
    ):
        from timm.data import create_transform

        if max_pixels is not None:  # refused here, not as every file's "truncated or corrupt image"
            max_pixels = whole_number(
                max_pixels,
                "max_pixels",
                integral_floats=True,
                why="the most pixels of an image to decode; None: the default limit",
            )
        super().__init__(model, **kwargs)
        self.data_config = model_data_config(self.model)
        self.transform = create_transform(**self.data_config, is_training=False)
        self.colour_order = (getattr(self.model, "pretrained_cfg", None) or {}).get("colour_order", "RGB")
        self.max_pixels = max_pixels
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.title = str(cfg.get("checkpoint") or cfg.get("architecture") or type(self.model).__name__)
        if isinstance(labels, Mapping):  # iterating it would give its keys: {0: "cat"} labelled the class "0"
            raise InvalidOptionError(
                f"labels must be a list of class names in class order (labels[i] names class i), got a "
                f"{type(labels).__name__}: pass the names as a list, e.g. [labels[i] for i in sorted(labels)]"
            )
        if labels is not None and (isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable)):
            raise InvalidOptionError(f"labels must be a list of class names, got {labels!r}")
        self.labels = [str(label) for label in labels] if labels is not None else model_labels(self.model)
        num_classes = int(getattr(self.model, "num_classes", len(self.labels)) or len(self.labels))
        if len(self.labels) != num_classes:
            raise InvalidInputError(f"labels has {len(self.labels)} names but the model predicts {num_classes} classes")
        #: What the weights brought besides their tensors (a training run's classes and input size, read from
        #: its config.yaml; or a class count read from the checkpoint's classifier), or None.
        self.weights_note: str | None = cfg.get("weights_note")
        #: The config.yaml of the training run the weights come from, or None.
        self.training_run: str | None = cfg.get("training_run")

    @property
    def weights_label(self) -> str | None:
        """What the weights are (set by :func:`attnzoo.pipeline`), with what they brought: ``"runs/x/model.safetensors
        (4 classes and input size 32 from runs/x/config.yaml)"``."""
        label = self._weights_label
        note = getattr(self, "weights_note", None)
        return f"{label} ({note})" if label and note else label

    @weights_label.setter
    def weights_label(self, value: str | None) -> None:
        self._weights_label = value

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "image": [s["image"] for s in samples],
        }

    def _sanitize_parameters(self, top_k: int | None = None) -> tuple[dict, dict, dict]:
        post = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
                raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}")
            post["top_k"] = int(top_k)
        return {}, {}, post

    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor(self.transform, colour_order=self.colour_order, max_pixels=self.max_pixels)

    def preprocess(self, image: Any) -> dict[str, Any]:
        return self.preprocessor()(image)

    def _forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"logits": self.model(batch["pixel_values"]), "image": batch["image"]}

    def postprocess(self, outputs: dict[str, Any], top_k: int = 5) -> Classification:
        probs = outputs["logits"].float().softmax(-1)
        scores, indices = probs.topk(min(top_k, probs.numel()))
        predictions = [
            ClassPrediction(self.labels[i], float(s), int(i)) for s, i in zip(scores.tolist(), indices.tolist())
        ]
        return Classification(predictions, outputs["image"], self.title, self.weights_label)
