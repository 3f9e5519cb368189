"""``pipeline("multiview-3d-reconstruction")``: a few images of one object in, a 32^3 occupancy grid out.

>>> recon = attnzoo.pipeline("multiview-3d-reconstruction", model="lrgt", weights="lrgt_shapenet.pth")  # doctest: +SKIP
>>> shape = recon(["view0.png", "view1.png", "view2.png"])                                           # doctest: +SKIP
>>> shape.save("chair.obj"); shape.plot().save("chair.png")                                          # doctest: +SKIP

LRGT's input is the official ShapeNet test loader's (:func:`preprocess_views`); the training recipe
uses it as well, with its random backgrounds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnzoo._values import to_numpy
from attnzoo.datasets.images import describe, is_file_object, load_image, opened_image
from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.pipelines.base import Pipeline, list_collate, weights_note

__all__ = ["MultiViewReconstructionPipeline", "Occupancy", "input_side", "preprocess_views"]


@dataclass
class Occupancy:
    """A reconstructed object: occupancy probabilities on a voxel grid (axis 1 up, ShapeNet's order)."""

    probabilities: np.ndarray = field(repr=False)  # float32 [X, Y, Z] in [0, 1]
    threshold: float = 0.3
    views: list[Image.Image] = field(default_factory=list, repr=False)
    """The input views for :meth:`plot`: from the pipeline, thumbnails of at most :data:`THUMBNAIL_SIDE` px a side."""
    weights: str | None = None
    """What the model's weights were (``"random (seed 0)"``, ...), for the picture's title."""

    def __repr__(self) -> str:
        return f"Occupancy({self.summary()}, {len(self.views)} views)"

    @property
    def voxels(self) -> np.ndarray:
        return self.probabilities >= self.threshold

    def to_mesh(self) -> tuple[np.ndarray, np.ndarray]:
        """``(vertices [V, 3] in [0, 1], faces [F, 3])`` of the surface of :attr:`voxels` (marching cubes)."""
        from attnzoo.metrics.reconstruction import voxels_to_mesh

        return voxels_to_mesh(self.voxels)

    def file_names(self, stem: str) -> list[str]:
        """What ``attnzoo run`` writes beside the picture: the surface mesh and the voxels."""
        return [f"{stem}.obj", f"{stem}.binvox"]

    def write_files(self, folder: str | os.PathLike, stem: str) -> list[Path]:
        """``<stem>.obj`` (surface mesh) and ``<stem>.binvox`` (voxels), written atomically."""
        return [self.save(Path(folder) / name) for name in self.file_names(stem)]

    def save(self, path: str | os.PathLike) -> Path:
        """``.obj`` / ``.ply`` (surface mesh), ``.binvox`` (voxels) or ``.npy`` (probabilities), written atomically."""
        from attnzoo._io import atomic_write

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".binvox":
            from attnzoo.datasets.binvox import write_binvox

            write_binvox(path, self.voxels)
        elif suffix == ".npy":
            with atomic_write(path) as fh:
                np.save(fh, self.probabilities)
        elif suffix in (".obj", ".ply"):
            vertices, faces = self.to_mesh()
            text = _obj(vertices, faces) if suffix == ".obj" else _ply(vertices, faces)
            with atomic_write(path, "w") as fh:
                fh.write(text)
        else:
            raise InvalidInputError(
                f"cannot save a reconstruction as {suffix or 'a file without suffix'} (use .obj, .ply, .binvox or .npy)"
            )
        return path

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": list(self.probabilities.shape),
            "threshold": self.threshold,
            "occupied_voxels": int(self.voxels.sum()),
        }

    def summary(self) -> str:
        side = "x".join(map(str, self.probabilities.shape))
        return f"{int(self.voxels.sum())} occupied voxels of {side} (threshold {self.threshold})"

    def plot(self, title: str | None = None, note: str | None = None) -> Image.Image:
        """The input views beside an isometric render of the voxels, under ``title`` (default: the views and
        the voxels counted) and ``note`` in red (default: "random weights: the shape is meaningless" when
        they were; "" for none)."""
        from attnzoo.viz.voxels import plot_reconstruction

        if title is None:
            n = len(self.views)
            title = f"{n} view{'' if n == 1 else 's'} -> {self.summary()}"
        if note is None:
            note = f"{weights_note(self.weights)}: the shape is meaningless" if weights_note(self.weights) else ""
        return plot_reconstruction(self.views, self.voxels, title=title, note=note)


def _obj(vertices: np.ndarray, faces: np.ndarray) -> str:
    lines = ["# attnzoo reconstruction"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    return "\n".join(lines) + "\n"


def _ply(vertices: np.ndarray, faces: np.ndarray) -> str:
    header = [
        "ply",
        "format ascii 1.0",
        f"element vertex {len(vertices)}",
        "property float x",
        "property float y",
        "property float z",
        f"element face {len(faces)}",
        "property list uchar int vertex_indices",
        "end_header",
    ]
    body = [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices] + [f"3 {a} {b} {c}" for a, b, c in faces]
    return "\n".join(header + body) + "\n"


# -- preprocessing (the official utils/data_transforms.py) -----------------------------------


#: The official crop: 128 px of ShapeNet's 137 px renderings (of the shorter side of any other view).
OFFICIAL_CROP = 128 / 137
#: The most views one object may have: ShapeNet has 24 renderings of each object and its evaluation takes 1 to 24.
#: The views are decoded one at a time, but each one's model input (and, in the pipeline, its thumbnail) is held
#: while the object is read, so thousands of them would exhaust the memory; the count is checked before any is decoded.
MAX_VIEWS = 64
#: A view's centre crop larger than this many times the model's input side is resized from the source rows and
#: columns the bilinear resize reads (at most 2 per output pixel), gathered before they are made float, instead of
#: from the whole crop in float64; the result is the same up to float64 rounding (a matrix product of another shape
#: may sum in another order). Crops up to this size (ShapeNet's 137 px renderings, anything up to twice the input
#: side) take the exact path they always took.
_GATHER_ABOVE = 2


def _check_view_count(count: int, what: str) -> None:
    if count > MAX_VIEWS:
        raise InvalidInputError(
            f"{what}: {count} views of one object, more than the {MAX_VIEWS} one reconstruction takes (ShapeNet has "
            f"24 renderings of each object; LRGT was evaluated on 1 to 24); give at most {MAX_VIEWS}"
        )


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation: numpy's MemoryError, or torch's CPU allocator's RuntimeError."""
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _to_array(image: Any, index: int) -> np.ndarray:
    """One image as an ``[H, W, C]`` array, C = 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA), of uint8, uint16,
    bool or float32 in [0, 1]: made float (:func:`_as_float`) only after the crop, so that a large view is never
    held whole in float. A tensor is ``C x H x W`` (or ``H x W``), as :func:`attnzoo.datasets.images.load_image`
    (and so the pipeline) reads it, whatever its sizes: a 3-D tensor's first axis is always its channels."""
    if isinstance(image, (str, os.PathLike)):
        try:  # the project's loader: within the pixel limit, a FIFO refused, damage a typed error naming the file
            with opened_image(image) as im:
                im.load()
                image = im.copy()
        except InvalidInputError as err:
            raise InvalidInputError(f"view {index}: cannot read image: {err}") from None
    if isinstance(image, Image.Image):
        if image.mode not in ("RGBA", "RGB", "L", "LA", "I;16", "I;16B", "I;16L"):
            has_alpha = "A" in image.mode or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
    given: tuple[int, ...] | None = None  # a tensor's shape, as given (errors name it, not the moved one)
    if isinstance(image, torch.Tensor):
        given = tuple(image.shape)
        image = to_numpy(image, f"view {index}")  # bfloat16 widened (numpy has none), a meta tensor refused
        if image.ndim == 3:
            image = np.moveaxis(image, 0, -1)  # C x H x W, as load_image reads a tensor
    try:
        arr = np.asarray(image)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"view {index}: not an image ({type(image).__name__}): {err}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        if given is None:
            raise InvalidInputError(
                f"view {index}: expected an H x W (x 1/2/3/4 channels) image, got shape {arr.shape}"
            )
        hint = ""
        if len(given) == 3 and given[-1] in (1, 2, 3, 4):
            hint = "; an H x W x C tensor? tensors are C x H x W: pass tensor.permute(2, 0, 1), or a numpy array"
        raise InvalidInputError(
            f"view {index}: expected an H x W or C x H x W (1/2/3/4 channels) tensor, got shape {given}{hint}"
        )
    if (arr.dtype.kind == "u" and arr.dtype.itemsize in (1, 2)) or arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise InvalidInputError(
                f"view {index}: float images must hold values in [0, 1] (uint8 images are divided by 255)"
            )
        return arr
    raise InvalidInputError(f"view {index}: unsupported pixel type {arr.dtype} (use uint8, uint16 or float in [0, 1])")


def _as_float(arr: np.ndarray) -> np.ndarray:
    """Pixels (from :func:`_to_array`) as float32 in [0, 1]: uint8 / 255, as the official loader, or uint16 / 65535."""
    if arr.dtype.kind == "u":
        return arr.astype(np.float32) / np.float32(255 if arr.dtype.itemsize == 1 else 65535)
    return arr.astype(np.float32)


def preprocess_views(
    images: Any,
    colour_order: str = "bgr",
    background: int | Sequence[int] | None = 240,
    *,
    size: int = 224,
    crop_fraction: float = OFFICIAL_CROP,
) -> torch.Tensor:
    """Renderings -> model input ``[V, 3, size, size]``, as the official ShapeNet test loader.

    ``images``: a list of views (at most :data:`MAX_VIEWS`), each a PIL image, an ``H x W x C`` numpy array (uint8,
    uint16, or float in [0, 1]; RGBA, RGB, grey+alpha or grey, channels in RGB order), a ``C x H x W`` tensor
    (channels first, as :func:`attnzoo.datasets.images.load_image` and so the pipeline read tensors: a 3-D
    tensor's first axis is its channels whatever its sizes; an ``H x W`` tensor is grey) or an image path; one
    image, a ``[V, H, W, C]`` numpy array or a ``[V, C, H, W]`` tensor also works. All views must have the same
    size. Per view:

    1. centre-crop a square of ``crop_fraction`` of the shorter side (128 of the 137 px ShapeNet
       renderings, exactly the official crop; the official code would crop 128 px of any larger
       image, which only makes sense at 137), then bilinear resize (half-pixel centres, no
       antialiasing: ``cv2.resize``'s ``INTER_LINEAR``) to ``size``, alpha included;
    2. where the resized alpha is exactly 0, the pixel becomes ``background`` (an int, or an
       ``(r, g, b)`` triple, 0-255; the official test colour is 240; ``None`` keeps the pixels);
       other pixels keep their colour (no alpha blending, as the official loader). Views without
       alpha are not composited;
    3. grey becomes three equal channels; ``colour_order="bgr"`` (default: the official model was
       trained on ``cv2.imread`` BGR) or ``"rgb"``; then ``x * 2 - 1``.

    Views are read one at a time, and a crop more than twice ``size`` is resized from just the pixels the
    bilinear resize reads (:data:`_GATHER_ABOVE`), so a large view costs little beyond its decoded pixels.

    Feed ``model(preprocess_views(views)[None])``.
    """
    order = _colour_order(colour_order, InvalidInputError)
    bg = _background(background)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InvalidInputError(f"size must be a positive int, got {size!r}")
    if not 0 < crop_fraction <= 1:
        raise InvalidInputError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    if (isinstance(images, np.ndarray) and images.ndim == 4) or (
        isinstance(images, torch.Tensor) and images.dim() == 4
    ):
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise InvalidInputError("preprocess_views needs at least one view, got none")
    _check_view_count(len(images), "preprocess_views")
    out: list[torch.Tensor] = []
    first: tuple[int, ...] | None = None
    for i, image in enumerate(images):
        tensor, first = _preprocess_view(image, i, first, order, bg, size, crop_fraction)
        out.append(tensor)
    return torch.stack(out)


def _preprocess_view(
    image: Any,
    index: int,
    first: tuple[int, ...] | None,
    order: str,
    bg: tuple[float, float, float] | None,
    size: int,
    crop_fraction: float,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View ``index`` of :func:`preprocess_views` (``[3, size, size]``) and its ``(H, W)``, which must be
    ``first``'s (the first view's; None for the first)."""
    try:
        arr = _to_array(image, index)
        if first is not None and arr.shape[:2] != first:
            raise InvalidInputError(
                f"all views must have the same size, got {sorted({first, arr.shape[:2]})} (H, W) (view {index})"
            )
        return _process_one(arr, order, bg, size, crop_fraction), arr.shape[:2]
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        shape = "x".join(map(str, np.shape(image)[:2])) if hasattr(image, "shape") else describe(image)
        raise InvalidInputError(
            f"view {index} ({shape}): not enough memory to preprocess it; downscale the views (the model takes "
            f"{size}x{size})"
        ) from None


#: The longest side of the views a result keeps for :meth:`Occupancy.plot` (which draws them 80 px a side;
#: ``viz.voxels.plot_reconstruction(..., size=1024)`` draws them 256): each view is shrunk to this as soon as it is
#: read, so a result (and the pipeline while it reads an object) holds no view at full size.
THUMBNAIL_SIDE = 256


def _thumbnail(image: Image.Image) -> Image.Image:
    """A copy of ``image`` (RGB or RGBA) with its longer side at most :data:`THUMBNAIL_SIDE`, aspect kept (Lanczos;
    PIL resizes RGBA with its colour premultiplied by alpha, so transparent pixels do not bleed into the edges)."""
    scale = THUMBNAIL_SIDE / max(image.size)
    if scale >= 1:
        return image.copy()
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)  # a box reduction first: ~3x faster


def _background(
    background: int | Sequence[int] | None, error: type[InvalidInputError] = InvalidInputError
) -> tuple[float, float, float] | None:
    if background is None:
        return None
    values = (
        [background] * 3
        if isinstance(background, (int, np.integer)) and not isinstance(background, bool)
        else background
    )
    try:
        rgb = [int(v) for v in values]  # type: ignore[union-attr]
        ok = len(rgb) == 3 and all(0 <= v <= 255 and v == w for v, w in zip(rgb, values))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise error(f"background must be an int 0-255, an (r, g, b) triple of them, or None, got {background!r}")
    # float64 division then float32, as the official loader (np.array([[[r, g, b]]]) / 255.)
    return tuple(float(np.float32(v / 255.0)) for v in rgb)  # type: ignore[return-value]


def _colour_order(value: Any, error: type[InvalidInputError]) -> str:
    """``"bgr"`` or ``"rgb"``, in any case (a checkpoint's config writes ``"RGB"``)."""
    order = value.lower() if isinstance(value, str) else None
    if order not in ("bgr", "rgb"):
        raise error(f"colour_order must be 'bgr' or 'rgb' (any case), got {value!r}")
    return order


def _linear_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` weights of ``cv2.resize(..., INTER_LINEAR)``: half-pixel centres, edges
    clamped, no antialiasing (torch's own bilinear resize rounds its float32 source coordinates,
    which costs up to 1e-5)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(0, n_in - 1)
    i0 = src.floor().long()
    frac = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1 - frac, accumulate=True)
    m.index_put_((rows, (i0 + 1).clamp(max=n_in - 1)), frac, accumulate=True)
    return m


def _process_one(
    arr: np.ndarray, order: str, bg: tuple[float, float, float] | None, size: int, crop_fraction: float
) -> torch.Tensor:
    """One view (from :func:`_to_array`) cropped, resized and composited: ``[3, size, size]``."""
    H, W, C = arr.shape
    side = max(1, int(round(min(H, W) * crop_fraction)))
    top, left = (H - side) // 2, (W - side) // 2
    crop = arr[top : top + side, left : left + side]
    # separable, in float64: within 1.2e-7 of cv2.resize on float32 images
    m = _linear_resize_matrix(side, size) if side != size else None
    if m is not None and side > _GATHER_ABOVE * size:  # only the source rows and columns the resize reads
        used = torch.nonzero(m.sum(0)).flatten()
        crop, m = crop[used.numpy()][:, used.numpy()], m[:, used]
    x = torch.from_numpy(np.ascontiguousarray(_as_float(crop))).permute(2, 0, 1)  # [C, s, s], made float after
    if m is not None:
        x = (m @ x.double() @ m.T).float()
    has_alpha = C in (2, 4)
    colour = x[: C - 1] if has_alpha else x
    if colour.shape[0] == 1:
        colour = colour.expand(3, -1, -1)
    if has_alpha and bg is not None:
        fill = torch.tensor(bg, dtype=torch.float32).view(3, 1, 1).expand(3, size, size)
        colour = torch.where(x[C - 1 :] == 0, fill, colour)
    if order == "bgr":
        colour = colour.flip(0)
    return (colour * 2 - 1).contiguous()


#: ``background``'s "not given" (None is a value: keep the pixels, as for :func:`preprocess_views`).
_NOT_GIVEN: Any = object()


class MultiViewReconstructionPipeline(Pipeline):
    """One input is a list of images of one object (paths, PIL images or arrays; 1 to
    :data:`MAX_VIEWS` views); a list of such lists is a batch. Preprocessing is the official one (centre crop
    128/137, resized to the model's ``pretrained_cfg["input_size"]``: 224 as released, else the
    ``img_size`` LRGT was built with; background 240, BGR unless ``colour_order="rgb"``).
    Settings (constructor or call): ``threshold`` (0.3), ``colour_order`` ("bgr" or "rgb", any case)
    and ``background`` (240; an int or an (r, g, b) triple 0-255, or None: transparent pixels keep
    their colour), as :func:`preprocess_views` takes them. Views are read one at a time; the result keeps
    each as a thumbnail of at most :data:`THUMBNAIL_SIDE` px a side, for :meth:`Occupancy.plot`.

    LRGT breaks exact ties of its token clustering with 1e-6 noise (the same for every object of a
    batch), drawn from torch's global RNG unless the model has a ``noise_seed``: for results that
    are the same run to run (views that repeat, flat renderings), build it with one, e.g.
    ``pipeline(..., model="lrgt", model_kwargs={"noise_seed": 0})``."""

    task = "multiview-3d-reconstruction"

    def _sanitize_parameters(
        self,
        threshold: float | None = None,
        colour_order: str | None = None,
        background: int | Sequence[int] | None = _NOT_GIVEN,
    ) -> tuple[dict, dict, dict]:
        pre: dict[str, Any] = {}
        post: dict[str, Any] = {}
        if colour_order is not None:
            pre["colour_order"] = _colour_order(colour_order, InvalidOptionError)
        if background is not _NOT_GIVEN:
            _background(background, InvalidOptionError)  # refused here: at construction, or before any view is read
            pre["background"] = background
        if threshold is not None:
            number = isinstance(threshold, (int, float, np.integer, np.floating)) and not isinstance(
                threshold, (bool, np.bool_)
            )
            if not number or not 0.0 < threshold < 1.0:
                raise InvalidOptionError(f"threshold must be a number in (0, 1), got {threshold!r}")
            post["threshold"] = float(threshold)
        return pre, {}, post

    def is_single(self, inputs: Any) -> bool:
        return _is_one_object(inputs)

    def preprocess(
        self, views: Sequence[Any], colour_order: str = "bgr", background: int | Sequence[int] | None = 240
    ) -> dict[str, Any]:
        if isinstance(views, (np.ndarray, torch.Tensor)):
            views = list(views)
        if isinstance(views, (str, bytes, os.PathLike)) or not isinstance(views, Sequence) or len(views) == 0:
            raise InvalidInputError("a reconstruction needs a non-empty list of views of one object")
        what = f"the object whose first view is {describe(views[0])}"
        _check_view_count(len(views), what)  # before any view is decoded
        order, bg, size = (
            _colour_order(colour_order, InvalidInputError),
            _background(background),
            input_side(self.model),
        )
        tensors: list[torch.Tensor] = []
        thumbnails: list[Image.Image] = []
        first: tuple[int, ...] | None = None
        try:
            for i, view in enumerate(views):  # one view decoded at a time: kept as its tensor and a thumbnail
                image = load_image(view, keep_alpha=True)
                tensor, first = _preprocess_view(image, i, first, order, bg, size, OFFICIAL_CROP)
                tensors.append(tensor)
                thumbnails.append(_thumbnail(image))
                del image
        except (MemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            raise InvalidInputError(
                f"{what}: its {len(views)} views do not fit in memory; give fewer or smaller views"
            ) from None
        return {"views": torch.stack(tensors), "thumbnails": thumbnails}

    collate = staticmethod(list_collate)

    def _forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        # objects with as many views run together, so any mix of view counts batches (and an on_error="skip"
        # run never loses a whole batch to one object with another count)
        views = batch["views"]
        by_count: dict[int, list[int]] = {}
        for i, object_views in enumerate(views):
            by_count.setdefault(object_views.shape[0], []).append(i)
        probabilities: list[torch.Tensor] = [torch.empty(0)] * len(views)
        for members in by_count.values():
            grids = self.model(torch.stack([views[i] for i in members])).float()
            for i, grid in zip(members, grids):
                probabilities[i] = grid
        return {"probabilities": probabilities, "thumbnails": batch["thumbnails"]}

    def postprocess(self, outputs: dict[str, Any], threshold: float = 0.3) -> Occupancy:
        # the thumbnails are the result's own (:func:`_thumbnail` copies even a small view)
        return Occupancy(outputs["probabilities"].numpy(), threshold, list(outputs["thumbnails"]), self.weights_label)


def input_side(model: Any) -> int:
    """The side the model takes its views at: its ``pretrained_cfg["input_size"]`` (LRGT's is its
    ``img_size``); 224, the official size, for a model that says none."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if isinstance(size, Sequence) and len(size) == 3 and size[1] == size[2] and isinstance(size[2], int):
        return int(size[2])
    return 224


def _is_one_object(inputs: Any) -> bool:
    """A list of images is one object; a list of lists (or of ``[V, H, W, C]`` arrays) is a batch; a 4-D
    array is one object's views; any other iterable (a generator) is a batch of objects."""
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return inputs.ndim <= 4
    if isinstance(inputs, (str, bytes, os.PathLike, Image.Image, Mapping)) or is_file_object(inputs):
        return True  # (a lone file object is one object too, refused as such: not a batch of its lines)
    if isinstance(inputs, Sequence):
        if not inputs:
            return True
        first = inputs[0]
        if isinstance(first, (np.ndarray, torch.Tensor)):
            return first.ndim != 4
        return not (isinstance(first, Sequence) and not isinstance(first, (str, bytes)))
    return not isinstance(inputs, Iterable)
