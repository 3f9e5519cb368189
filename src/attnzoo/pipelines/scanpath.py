"""``pipeline("scanpath")``: where people will look, as an ordered list of fixations.

Two kinds of model:

* **NevaClip** (default, zero-shot): an image and what the viewer is after (a caption, or any
  CLIP text/image embedding) in, fixations in the image's pixels out.

  >>> scanpaths = attnzoo.pipeline("scanpath")                    # OpenAI CLIP RN50, the paper's settings  # doctest: +SKIP
  >>> sp = scanpaths("street.jpg", caption="a man crossing the street")                                   # doctest: +SKIP
  >>> sp.xy, sp.plot().save("street-scanpath.png")                                                         # doctest: +SKIP

* **OAT** (visual search): a shelf display, its object boxes and the target object in, the
  sequence of objects looked at out, ending on the target when the search succeeds.

  >>> search = attnzoo.pipeline("scanpath", model="oat_amazon", weights="runs/oat/model.safetensors")      # doctest: +SKIP
  >>> sp = search("shelf.jpg", boxes=boxes, target=17)                                                     # doctest: +SKIP

Batches run as one tensor program; with NevaClip each image's scanpath is the one it gets alone
(every image's restarts come from its own generator seeded with ``seed``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnzoo._io import PARSE_ERRORS, read_json
from attnzoo._values import flag, refuse_per_input_defaults, to_numpy
from attnzoo.errors import InvalidInputError, WeightsError
from attnzoo.pipelines.base import Pipeline, generator_seed, is_single_input, list_collate, weights_note

__all__ = ["NevaClipScanpathPipeline", "OATScanpathPipeline", "Scanpath", "run_decoding"]


@dataclass
class Scanpath:
    """One predicted scanpath: fixations ``xy`` ``[T, 2]`` as (x, y) pixels of the original image,
    in viewing order (the first row is the first fixation)."""

    xy: np.ndarray
    image_size: tuple[int, int]
    """``(width, height)`` of the image the fixations refer to."""
    durations: np.ndarray | None = None
    """Seconds per fixation, when the model predicts them (NevaClip and OAT do not)."""
    caption: str | None = None
    objects: np.ndarray | None = None
    """Visual search: the 0-based index (into the boxes given) of the object of each fixation."""
    target: int | None = None
    boxes: np.ndarray | None = field(default=None, repr=False)
    found_target: bool | None = None
    """Visual search: the search ended by pointing at the target (else it ran to ``max_len``)."""
    relative: np.ndarray | None = field(default=None, repr=False)
    """NevaClip: (row, col) in [-1, 1] of the model's input crop, as the official code returns them."""
    losses: np.ndarray | None = field(default=None, repr=False)
    """NevaClip: ``1 - cos`` between the foveated image and the target at each fixation."""
    image: Any = field(default=None, repr=False)
    """The input image for :meth:`plot`: as given (a path, a PIL image), a file object as the
    :class:`~attnzoo.datasets.images.FileContents` read from it."""
    weights: str | None = None
    """What the model's weights were (``"random (seed 0)"``, a checkpoint; None when not known)."""

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    def summary(self) -> str:
        found = (
            "" if self.found_target is None else (" (found the target)" if self.found_target else " (target not found)")
        )
        return " ".join(f"({x:.0f},{y:.0f})" for x, y in self.xy) + found

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"xy": np.round(self.xy, 2).tolist(), "image_size": list(self.image_size)}
        if self.caption is not None:
            out["caption"] = self.caption
        if self.objects is not None:
            out.update(objects=self.objects.tolist(), target=self.target, found_target=self.found_target)
        if self.durations is not None:
            out["durations"] = self.durations.tolist()
        if self.weights is not None:
            out["weights"] = self.weights
        return out

    def target_label(self) -> str | None:
        """Visual search: the picture's legend entry for the target's green box, with the search's
        outcome (``"target (green box): found at fixation 7"``); None for other scanpaths."""
        if self.target is None or self.boxes is None:
            return None
        if self.found_target is None:
            return "target (green box)"
        if not self.found_target:
            return f"target (green box): not found in {len(self)} fixations"
        # a found search ends on the target: its last fixation
        return f"target (green box): found at fixation {len(self)}" if len(self) else "target (green box): found"

    def plot(
        self, image: Any = None, *, others: list[Any] | None = None, labels: list[str] | None = None, **kwargs: Any
    ) -> Image.Image:
        """Numbered fixations over the image; ``others`` (e.g. the observers' scanpaths, ``[T, 2]``
        arrays or records with ``.xy``) are drawn in other colours. An ``image`` of another size than
        :attr:`image_size` (a thumbnail) gets the fixations and boxes scaled to it; a red note says when
        the weights were random; a visual search's legend names the target's green box and says whether
        (and at which fixation) it was found."""
        from attnzoo.datasets.images import load_image
        from attnzoo.viz.scanpath import plot_scanpaths

        source = image if image is not None else self.image
        picture = (
            load_image(source)
            if source is not None
            else Image.new("RGB", (int(self.image_size[0]), int(self.image_size[1])), (235, 235, 235))
        )
        paths = [self.xy] + [getattr(o, "xy", o) for o in others or []]
        names = labels or (["model"] + [f"observer {i + 1}" for i in range(len(others))] if others else None)
        title = kwargs.pop("title", None) or (f"\u201c{self.caption}\u201d" if self.caption else None)
        note = kwargs.pop("note", None)
        kwargs.setdefault("target_label", self.target_label())
        if note is None and weights_note(self.weights):
            note = "random weights: these fixations are meaningless"
        return plot_scanpaths(
            picture,
            paths,
            labels=names,
            durations=[self.durations] + [None] * len(others or []),
            boxes=self.boxes,
            target=self.target,
            title=title,
            note=note,
            image_size=self.image_size,
            **kwargs,
        )


def run_decoding(weights: Any) -> dict[str, Any] | None:
    """What an ``attnzoo train scanpath`` run wrote beside its weights (``decoding.json``: ``max_len``,
    and its split's scheme, seed and outlier filter), or None for other weights."""
    if not isinstance(weights, (str, os.PathLike)):
        return None
    path = Path(weights).parent / "decoding.json"
    if not path.is_file():
        return None
    what = "training run's decoding.json (max_len, split, split_seed)"
    run = read_json(path, what, error=WeightsError)
    if not isinstance(run, dict):
        raise WeightsError(f"{path}: expected a JSON object, the {what}; got {type(run).__name__}")
    return run


#: Most boxes a boxes file may hold (a shelf holds tens of objects): a .npy header claiming more is
#: refused before its data is read, and so is a .json file longer than :data:`MAX_JSON_BOX_BYTES`.
MAX_BOXES = 100_000

#: Most bytes one box may take in a ``.json`` boxes file: a float's shortest repr is at most 24
#: characters, so even a box written one number per indented line takes well under this.
JSON_BYTES_PER_BOX = 256

#: Longest ``.json`` boxes file read (about 24 MiB): :data:`MAX_BOXES` boxes of
#: :data:`JSON_BYTES_PER_BOX` bytes each; a longer file is refused before it is parsed.
MAX_JSON_BOX_BYTES = MAX_BOXES * JSON_BYTES_PER_BOX


def _read_json_boxes(path: Path) -> Any:
    """A ``.json`` boxes file, refused unread when it is longer than :data:`MAX_JSON_BOX_BYTES` (at most
    that many bytes are ever read), and refused parsed when it lists more than :data:`MAX_BOXES` boxes."""
    import json

    size = path.stat().st_size
    if size > MAX_JSON_BOX_BYTES:
        raise InvalidInputError(
            f"boxes file {path}: {size:,} bytes, more than the {MAX_JSON_BOX_BYTES:,} that {MAX_BOXES:,} boxes "
            "(the most a display may hold) take as JSON"
        )
    with open(path, "rb") as fh:
        data = fh.read(MAX_JSON_BOX_BYTES + 1)  # the file may have grown since it was measured
    if len(data) > MAX_JSON_BOX_BYTES:
        raise InvalidInputError(
            f"boxes file {path}: more than the {MAX_JSON_BOX_BYTES:,} bytes that {MAX_BOXES:,} boxes "
            "(the most a display may hold) take as JSON"
        )
    boxes = json.loads(data.decode("utf-8-sig"))
    if isinstance(boxes, list) and len(boxes) > MAX_BOXES:
        raise InvalidInputError(
            f"boxes file {path}: lists {len(boxes):,} boxes, more than the {MAX_BOXES:,} a display may hold"
        )
    return boxes


def _check_npy_header(path: Path) -> None:
    """A ``.npy`` file's header, read before its data: numbers of shape ``[N, 4]`` with ``N`` at most
    :data:`MAX_BOXES`, all of whose bytes are in the file (a 200-byte file may claim gigabytes)."""
    fmt = np.lib.format
    with open(path, "rb") as fh:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fh)
        else:  # 3.0 is only written for field names beyond latin-1: never an array of numbers
            raise InvalidInputError(f"boxes file {path}: .npy format version {version} is not one of numbers")
        offset = fh.tell()
    if dtype.kind not in "iuf":
        raise InvalidInputError(f"boxes file {path}: holds {dtype}, not real numbers [N, 4] (x0, y0, x1, y1)")
    if len(shape) != 2 or shape[1] != 4 or shape[0] < 0:
        raise InvalidInputError(f"boxes file {path}: holds an array of shape {shape}, not [N, 4] (x0, y0, x1, y1)")
    if shape[0] > MAX_BOXES:
        raise InvalidInputError(
            f"boxes file {path}: its header claims {shape[0]:,} boxes, more than the {MAX_BOXES:,} a display may hold"
        )
    size = path.stat().st_size
    if offset + shape[0] * 4 * dtype.itemsize > size:
        raise InvalidInputError(
            f"boxes file {path}: its header claims {shape[0]:,} boxes of {dtype}, more than its {size:,} bytes hold "
            "(a truncated or damaged file)"
        )


def _read_boxes(path: Path) -> Any:
    """Boxes from a ``.json`` (a list of ``[x0, y0, x1, y1]``) or ``.npy`` file (``attnzoo run --boxes``);
    a damaged file (or one claiming more than memory holds, or more than :data:`MAX_BOXES` boxes) is an
    :class:`InvalidInputError` naming it."""
    if path.suffix.lower() not in (".json", ".npy"):
        raise InvalidInputError(f"boxes file {path}: give a .json or .npy file of [N, 4] (x0, y0, x1, y1) boxes")
    if not path.is_file():
        raise InvalidInputError(f"boxes file {path}: no such file")
    try:
        if path.suffix.lower() == ".json":
            return _read_json_boxes(path)
        _check_npy_header(path)
        return np.load(path, allow_pickle=False)
    except InvalidInputError:
        raise
    except PARSE_ERRORS as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = (
            "it claims more memory than there is" if isinstance(err, MemoryError) else f"{type(err).__name__}: {err}"
        )
        raise InvalidInputError(f"boxes file {path} could not be read ({reason})") from None


def _boxes(value: Any) -> np.ndarray:
    """Object boxes as a float array (any shape: the caller checks it); a path names a file of them."""
    if isinstance(value, (str, os.PathLike)):
        value = _read_boxes(Path(value))
    if isinstance(value, bytes):
        raise InvalidInputError(f"boxes must be numbers [N, 4] (x0, y0, x1, y1), got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        value = to_numpy(value, "boxes")  # bfloat16 widened (numpy has none), a meta tensor refused
    try:
        boxes = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"boxes must be numbers [N, 4] (x0, y0, x1, y1) ({err})") from None
    if boxes.dtype.kind not in "iuf":
        raise InvalidInputError(f"boxes must be real numbers [N, 4] (x0, y0, x1, y1), got an array of {boxes.dtype}")
    boxes = boxes.astype(np.float64)
    if boxes.ndim != 2:
        raise InvalidInputError(f"boxes must be [N, 4] (x0, y0, x1, y1), got shape {boxes.shape}")
    return boxes


def _record_image(item: Any) -> Any:
    """A dataset record (``.image_path``) stands for its image."""
    return getattr(item, "image_path", item)


#: NevaClip's search settings (checked before a named model loads, as they need no model).
_SEARCH_SETTINGS = ("fixations", "iterations", "lr", "random_restarts", "forgetting")


class NevaClipScanpathPipeline(Pipeline):
    """NevaClip: ``p(image, caption=...)`` (or ``target=`` an embedding), a list of images with one
    caption each (or one for all), dicts with ``image`` and ``caption``/``target``, or dataset records
    (``.image_path``, ``.caption``).

    Search settings (``fixations``, ``iterations``, ``lr``, ``forgetting``, ``random_restarts``,
    ``seed``) default to the paper's; ``truncate`` cuts captions longer than CLIP's context;
    ``progress`` shows a bar over the search on a terminal. Batches run as one tensor program; each
    image's scanpath is the one it gets alone (every image's restarts come from its own generator
    seeded with ``seed``).
    """

    task = "scanpath"
    input_fields = ("caption", "target")
    field_depths = {"target": 1}  # one embedding [D] (a list of D numbers too) is the target of every image
    needs_grad = True  # the fixation search follows the gradient of CLIP's similarity
    collate = staticmethod(list_collate)

    @classmethod
    def accepts(cls, model: Any) -> bool:
        from attnzoo.multimodal.nevaclip import NevaClip

        return isinstance(model, NevaClip)

    def __init__(self, model: Any, *, batch_size: int = 8, **kwargs: Any):
        refuse_per_input_defaults(kwargs, self.input_fields, "p(image, caption='...') or p(image, target=embedding)")
        model.visual  # load a named CLIP now: a missing download fails here, not at the first image  # noqa: B018
        super().__init__(model, batch_size=batch_size, **kwargs)

    def is_single(self, inputs: Any) -> bool:
        return is_single_input(inputs) or hasattr(inputs, "image_path")

    def iterate(self, inputs: Any, **kwargs: Any) -> Iterator[tuple[int, Any]]:
        """The base's; a ``target=`` array ``[N, D]`` gives its rows to the N inputs, as a tensor's do."""
        target = kwargs.get("target")
        if isinstance(target, np.ndarray) and target.ndim == 2 and target.dtype.kind in "fiu":
            kwargs["target"] = torch.from_numpy(np.ascontiguousarray(target))
        return super().iterate(inputs, **kwargs)

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        from attnzoo.multimodal.nevaclip import check_search_settings

        check_search_settings({k: settings[k] for k in _SEARCH_SETTINGS if settings.get(k) is not None})

    def _sanitize_parameters(
        self,
        fixations: int | None = None,
        iterations: int | None = None,
        lr: float | None = None,
        random_restarts: bool | None = None,
        forgetting: float | None = None,
        seed: int | None = None,
        truncate: bool | None = None,
        progress: bool | None = None,
    ) -> tuple[dict, dict, dict]:
        from attnzoo.multimodal.nevaclip import check_search_settings

        search = dict(
            fixations=fixations, iterations=iterations, lr=lr, random_restarts=random_restarts, forgetting=forgetting
        )
        given = check_search_settings(
            {k: v for k, v in search.items() if v is not None}
        )  # refused here: at construction, or before any image is read
        for name, value in (("truncate", truncate), ("progress", progress)):
            if value is not None:  # None: not given (the search's own default)
                flag(value, name, error=InvalidInputError)
        if seed is not None:
            given["seed"] = generator_seed(seed)
        if progress is not None:
            given["progress"] = bool(progress)
        truncated = {"truncate": bool(truncate)} if truncate is not None else {}
        return truncated, {**given, **truncated}, {}

    def preprocess(self, item: Any, *, truncate: bool = False) -> dict[str, Any]:
        record = item.get("image") if isinstance(item, dict) else item
        item = dict(item) if isinstance(item, dict) else {"image": item}
        if "image" not in item:
            raise InvalidInputError(f"a NevaClip input dict needs an 'image' key, got keys {sorted(item)}")
        item.setdefault("caption", getattr(record, "caption", None))
        item["image"] = _record_image(item["image"])
        caption, target = item.get("caption"), item.get("target")
        if caption is None and target is None:
            raise InvalidInputError(
                "NevaClip needs what the viewer looks for: caption='...' (--caption on the command line) "
                "or target=<embedding>"
            )
        if caption is not None and target is not None:
            raise InvalidInputError("give caption= or target= (an embedding), not both")
        if caption is not None:
            self.model.tokenize([caption], truncate=truncate)  # empty or too long: this input's error, before any work
        else:
            from attnzoo.multimodal.nevaclip import target_embeddings

            target = target_embeddings(target, "target", self.model.embed_dim, self.model.search_dtype)
            if target.shape[0] != 1:
                raise InvalidInputError(
                    f"target= is one embedding [D] per image, got shape {tuple(target.shape)}; "
                    "for several images give a list with one embedding each"
                )
            target = target[0]
        x, sizes = self.model.preprocess([item["image"]])
        return {"x": x[0], "size": sizes[0], "caption": caption, "target": target, "image": item["image"]}

    def _forward(self, batch: dict[str, Any], *, truncate: bool = False, **search: Any) -> dict[str, Any]:
        neva = self.model
        captions = [c for c in batch["caption"] if c is not None]
        encoded = iter(neva.encode_captions(captions, truncate=truncate)) if captions else iter(())
        targets = [
            next(encoded) if caption is not None else target.to(neva.device, neva.search_dtype)
            for caption, target in zip(batch["caption"], batch["target"])
        ]
        dims = {t.shape[-1] for t in targets}
        if len(dims) != 1:
            raise InvalidInputError(f"target embeddings of different sizes in one batch: {sorted(dims)}")
        result = neva.predict(torch.stack(batch["x"]), torch.stack(targets), **search)
        return {
            "positions": result.positions,
            "losses": result.losses,
            "size": batch["size"],
            "caption": batch["caption"],
            "image": batch["image"],
        }

    def postprocess(self, outputs: dict[str, Any]) -> Scanpath:
        from attnzoo.multimodal.nevaclip import fixations_to_pixels

        positions = outputs["positions"]
        xy = fixations_to_pixels(
            positions, outputs["size"], self.model.input_size, self.model.preprocess_cfg["resize_mode"]
        )
        return Scanpath(
            xy,
            tuple(outputs["size"]),
            caption=outputs["caption"],
            relative=positions.numpy(),
            losses=outputs["losses"].numpy(),
            image=outputs["image"],
            weights=self.weights_label,
        )


class OATScanpathPipeline(Pipeline):
    """OAT (visual search): ``p(image, boxes=..., target=...)``, a list of dicts with those keys, or
    :class:`~attnzoo.datasets.scanpaths.SearchTrial` records. ``strategy`` is ``"greedy"`` (the
    official ``test_max``) or ``"sample"`` (``num_samples`` scanpaths per display, as ``test_expect``)."""

    task = "scanpath"
    input_fields = ("boxes", "target")
    field_depths = {"boxes": 2}  # one display's boxes: [N, 4]
    collate = staticmethod(list_collate)

    @classmethod
    def accepts(cls, model: Any) -> bool:
        from attnzoo.vision.oat import OAT

        return isinstance(model, OAT)

    @classmethod
    def configure_model(cls, model: Any, weights: Any) -> Any:
        run = run_decoding(weights)
        if run is not None:  # a training run's weights: decode up to its max_len (the longest training scanpath)
            from attnzoo.vision.oat_decoding import check_max_len

            try:
                model.max_len = check_max_len(run.get("max_len"), model)
            except InvalidInputError as err:
                raise WeightsError(f"{Path(weights).parent / 'decoding.json'}: {err}") from None
        return model

    def __init__(self, model: Any, *, batch_size: int = 8, **kwargs: Any):
        refuse_per_input_defaults(kwargs, self.input_fields, "p(shelf, boxes=..., target=...)")
        super().__init__(model, batch_size=batch_size, **kwargs)

    def is_single(self, inputs: Any) -> bool:
        return is_single_input(inputs) or hasattr(inputs, "boxes")

    def _sanitize_parameters(
        self,
        strategy: str | None = None,
        num_samples: int | None = None,
        max_len: int | None = None,
        seed: int | None = None,
    ) -> tuple[dict, dict, dict]:
        if strategy is not None and strategy not in ("greedy", "sample"):
            raise InvalidInputError(f"strategy must be 'greedy' or 'sample', got {strategy!r}")
        if num_samples is not None:
            from attnzoo.vision.oat_decoding import check_num_samples

            num_samples = check_num_samples(num_samples)
        if max_len is not None:
            from attnzoo.vision.oat_decoding import check_max_len

            check_max_len(max_len, self.model)
        if seed is not None:
            seed = generator_seed(seed)
        given = {
            k: v
            for k, v in dict(strategy=strategy, num_samples=num_samples, max_len=max_len, seed=seed).items()
            if v is not None
        }
        return {}, given, ({"strategy": strategy} if strategy is not None else {})

    def preprocess(self, item: Any) -> dict[str, Any]:
        """Crops of the display's objects in OAT's reading order (rows by y snapped to 10 px, then x);
        the caller's box order is kept for the answer."""
        from attnzoo.datasets.images import load_image
        from attnzoo.datasets.visual_search import reading_order
        from attnzoo.vision.oat_inputs import display_crops

        if hasattr(item, "boxes") and hasattr(item, "target") and not isinstance(item, dict):  # a SearchTrial
            item = {"image": item.image_path, "boxes": item.boxes, "target": item.target}
        elif not isinstance(item, dict):
            item = {"image": item}
        missing = [k for k in ("image", "boxes", "target") if item.get(k) is None]
        if missing:
            raise InvalidInputError(
                f"OAT needs the image, the display's object boxes= ([N, 4] x0, y0, x1, y1) and the target= "
                f"object index; missing: {', '.join(missing)}"
            )
        picture = load_image(item["image"])
        boxes = _boxes(item["boxes"])
        n = self.model.num_objects
        if boxes.shape != (n, 4):
            raise InvalidInputError(
                f"{type(self.model).__name__} sees a {self.model.grid[0]}x{self.model.grid[1]} shelf: boxes must be "
                f"[{n}, 4] (x0, y0, x1, y1), got shape {boxes.shape}"
            )
        bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1))
        if len(bad):
            raise InvalidInputError(f"box {int(bad[0])} {boxes[bad[0]].tolist()} holds NaN or infinite coordinates")
        w, h = picture.size
        outside = np.flatnonzero(
            (boxes[:, 0] < 0)
            | (boxes[:, 1] < 0)
            | (boxes[:, 2] > w)
            | (boxes[:, 3] > h)
            | (boxes[:, 2] <= boxes[:, 0])
            | (boxes[:, 3] <= boxes[:, 1])
        )
        if len(outside):
            raise InvalidInputError(
                f"box {int(outside[0])} {boxes[outside[0]].tolist()} is empty or outside the {w}x{h} image"
            )
        target = item["target"]
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= int(target) < n:
            raise InvalidInputError(f"target must be the index of one of the {n} boxes (0-based), got {target!r}")
        order = reading_order(boxes)  # model index -> caller's index
        style = getattr(self.model, "pretrained_cfg", {}).get("crop_style", "bgr")  # as the variant was trained
        crops = display_crops(np.asarray(picture), boxes[order], style, grid=self.model.grid)
        return {
            "crops": crops,
            "target": int(np.flatnonzero(order == int(target))[0]),
            "order": order,
            "boxes": boxes,
            "size": picture.size,
            "image": item["image"],
        }

    def _forward(
        self,
        batch: dict[str, Any],
        *,
        strategy: str = "greedy",
        num_samples: int | None = None,
        max_len: int | None = None,
        seed: int | None = 0,
    ) -> dict[str, Any]:
        from attnzoo.vision.oat_decoding import generate, trial_seeds

        if max_len is None:
            max_len = getattr(self.model, "max_len", None) or self.model.num_objects
        seeds = None
        if strategy == "sample" and seed is not None:
            # every display draws from the same trial seeds: its samples do not depend on which batch,
            # or which place in it, the display lands in (as NevaClip's per-image generators)
            per_display = 100 if num_samples is None else num_samples
            seeds = trial_seeds(torch.Generator().manual_seed(int(seed)), per_display) * len(batch["crops"])
        decoded = generate(
            self.model,
            batch["crops"],
            batch["target"],
            max_len,
            strategy=strategy,
            num_samples=num_samples if strategy == "sample" else None,
            seeds=seeds,
        )
        return {**batch, "decoded": decoded}

    def postprocess(self, outputs: dict[str, Any], strategy: str = "greedy") -> Scanpath | list[Scanpath]:
        order, boxes = outputs["order"], outputs["boxes"]
        centres = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
        paths = []
        for trial in outputs["decoded"]:
            objects = order[np.asarray(trial.objects, dtype=np.int64)] if trial.objects else np.zeros(0, np.int64)
            paths.append(
                Scanpath(
                    centres[objects].reshape(-1, 2),
                    tuple(outputs["size"]),
                    objects=objects,
                    target=int(order[outputs["target"]]),
                    boxes=boxes,
                    found_target=bool(trial.terminated),
                    image=outputs["image"],
                    weights=self.weights_label,
                )
            )
        return paths[0] if len(paths) == 1 and strategy == "greedy" else paths
