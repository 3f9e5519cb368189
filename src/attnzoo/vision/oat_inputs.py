"""OAT's inputs as the official preprocessing and collator make them: object crops, samples, batches.

Crops (official src/preprocess/img_feature_amazon.py, img_feature.py): every object of a display cut
out of the image and resized to ``150 x 93`` like ``cv2.resize`` (:func:`crop_objects`), in the
colours each variant was trained on (:func:`display_crops`). Batches (official
src/dataBuilders/data_builder.py ``Collator_pure`` and ``TransformerModel.processData3d``): the
pointer sequences ``BOS, fixations, EOS, PAD...``, all-ones blank images for BOS/EOS/PAD, the
``(row, col, is_target)`` position triples and the masks (:func:`collate_oat`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from attnzoo.errors import InvalidInputError

__all__ = [
    "CROP_SIZE",
    "CROP_STYLES",
    "N_BLANKS",
    "OATBatch",
    "OATSample",
    "as_crops",
    "as_object_index",
    "as_sample",
    "check_grid",
    "check_pixel_range",
    "collate_oat",
    "crop_objects",
    "display_crops",
    "position_triples",
    "square_subsequent_mask",
]

CROP_SIZE = (150, 93)  # (H, W) of every object crop: the official cv2.resize(crop, (93, 150))
CROP_STYLES = ("bgr", "rgb_minmax")
N_BLANKS = 4  # blank images after the N crops: EOS, PAD, BOS and one unused


def check_grid(grid: Any) -> tuple[int, int]:
    """``(rows, cols)`` of a shelf as positive ints: the model, the crops and the batches must agree on it."""
    try:
        rows, cols = (int(v) for v in grid)
        ok = all(int(v) == v for v in grid) and rows >= 1 and cols >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidInputError(f"grid must be (rows, cols) of positive ints, got {grid!r}")
    return rows, cols


# -- crops (official img_feature_amazon.py / img_feature.py) --------------------------------


def _cv2_linear_taps(n_in: int, n_out: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and float32 weights of ``cv2.resize(INTER_LINEAR)`` along one axis.

    cv2 computes ``f = float((d + 0.5) * n_in / n_out - 0.5)`` in float32 and clamps the weights
    at the borders along x only (along y it clamps the source rows, keeping the weights).
    """
    d = np.arange(n_out, dtype=np.float64)
    f = ((d + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp:
        f[s < 0] = 0
        s[s < 0] = 0
        f[s >= n_in - 1] = 0
        s[s >= n_in - 1] = n_in - 1
    idx = np.stack((np.clip(s, 0, n_in - 1), np.clip(s + 1, 0, n_in - 1)))
    return idx, np.float32(1) - f, f


def _resize_like_cv2(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(img, (width, height))`` with ``INTER_LINEAR`` on an ``[H, W, C]`` array.

    uint8: cv2's fixed-point arithmetic (11-bit weights, its rounding), bit-exact. Float: the same
    taps in float32 (within float rounding of cv2).
    """
    h_in, w_in = img.shape[:2]
    xi, xa0, xa1 = _cv2_linear_taps(w_in, width, clamp=True)
    yi, ya0, ya1 = _cv2_linear_taps(h_in, height, clamp=False)
    if img.dtype == np.uint8:
        x = img.astype(np.int64)
        ax0, ax1 = np.rint(xa0 * np.float32(2048)).astype(np.int64), np.rint(xa1 * np.float32(2048)).astype(np.int64)
        ay0, ay1 = np.rint(ya0 * np.float32(2048)).astype(np.int64), np.rint(ya1 * np.float32(2048)).astype(np.int64)
        rows = x[:, xi[0]] * ax0[None, :, None] + x[:, xi[1]] * ax1[None, :, None]
        out = ((ay0[:, None, None] * (rows[yi[0]] >> 4)) >> 16) + ((ay1[:, None, None] * (rows[yi[1]] >> 4)) >> 16)
        return ((out + 2) >> 2).clip(0, 255).astype(np.uint8)
    x = img.astype(np.float32)
    rows = x[:, xi[0]] * xa0[None, :, None] + x[:, xi[1]] * xa1[None, :, None]
    return rows[yi[0]] * ya0[:, None, None] + rows[yi[1]] * ya1[:, None, None]


def crop_objects(
    image: Any,
    boxes: Any,
    size: tuple[int, int] = CROP_SIZE,
    colour_order: str = "bgr",
    grid: Sequence[int] | None = None,
) -> torch.Tensor:
    """Object crops as the official preprocessing makes them: ``[N, H, W, 3]`` BGR, ``(H, W) = size``.

    ``image``: ``[H, W, 3]`` (numpy or torch) uint8 or float, in ``colour_order`` (``"bgr"`` as
    ``cv2.imread`` gives it, or ``"rgb"``, flipped to BGR); ``boxes``: ``[N, 4]`` pixel
    ``(x0, y0, x1, y1)`` with exclusive ends (the official ``image[y0:y1, x0:x1]``), rounded to
    ints, in reading order. Each crop is resized like ``cv2.resize(crop, (W, H))`` (``INTER_LINEAR``:
    bit-exact for uint8, cv2's fixed-point arithmetic emulated; for float images the same taps in
    float32, within 0.01 grey levels of cv2). uint8 in, uint8 out; float in, float32 out.
    ``grid``: when given, the boxes must be exactly ``rows * cols``.
    """
    order = colour_order.lower() if isinstance(colour_order, str) else colour_order
    if order not in ("bgr", "rgb"):
        raise InvalidInputError(f"colour_order must be 'bgr' or 'rgb', got {colour_order!r}")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise InvalidInputError(f"image must be [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8 and arr.dtype.kind != "f":
        raise InvalidInputError(f"image must be uint8 or float, got {arr.dtype}")
    if order == "rgb":
        arr = arr[:, :, ::-1]
    try:
        out_h, out_w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidInputError(f"size must be (H, W), got {size!r}") from None
    if out_h < 1 or out_w < 1:
        raise InvalidInputError(f"size must be positive, got {size!r}")
    b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] == 0 or not np.isfinite(b).all():
        raise InvalidInputError(f"boxes must be a finite [N, 4] array of (x0, y0, x1, y1), got shape {b.shape}")
    if grid is not None and b.shape[0] != math.prod(check_grid(grid)):
        raise InvalidInputError(
            f"got {b.shape[0]} boxes but the {tuple(grid)} grid has {math.prod(check_grid(grid))} objects"
        )
    b = np.rint(b).astype(np.int64)
    h, w = arr.shape[:2]
    crops = []
    for i, (x0, y0, x1, y1) in enumerate(b):
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise InvalidInputError(f"box {i} ({x0}, {y0}, {x1}, {y1}) is empty or outside the {w}x{h} image")
        crops.append(_resize_like_cv2(np.ascontiguousarray(arr[y0:y1, x0:x1]), out_h, out_w))
    return torch.from_numpy(np.stack(crops))


def display_crops(image: Any, boxes: Any, crop_style: str = "bgr", grid: Sequence[int] | None = None) -> torch.Tensor:
    """The object crops of an RGB display as an OAT variant was trained on them (its
    ``pretrained_cfg["crop_style"]``): ``"bgr"`` (Amazon) uint8 BGR 0-255; ``"rgb_minmax"`` (the
    yogurt and wine shelves) float32 RGB, each crop scaled to [0, 1] by its own minimum and maximum
    over all channels, as ``cv2.normalize(crop, None, 0, 1, NORM_MINMAX, CV_32F)`` (a flat crop: zeros).
    """
    if crop_style == "bgr":
        return crop_objects(image, boxes, colour_order="rgb", grid=grid)
    if crop_style != "rgb_minmax":
        raise InvalidInputError(f"crop_style must be one of {CROP_STYLES}, got {crop_style!r}")
    crops = (
        crop_objects(image, boxes, colour_order="bgr", grid=grid).numpy().astype(np.float64)
    )  # "bgr": kept as given, RGB
    low = crops.min(axis=(1, 2, 3), keepdims=True)
    span = crops.max(axis=(1, 2, 3), keepdims=True) - low
    scale = np.where(span > np.finfo(np.float64).eps, 1.0 / np.where(span > 0, span, 1.0), 0.0)
    return torch.from_numpy((crops * scale - low * scale).astype(np.float32))


# -- samples ---------------------------------------------------------------------------------


@dataclass
class OATSample:
    """One search trial as OAT sees it: the display's object crops, the target and the fixations.

    ``crops``: ``[N, 150, 93, 3]`` BGR (uint8 or 0-255 float), in reading order; ``target``: 0-based
    target object; ``sequence``: the 0-based object of each fixation (the published data ends with
    the fixation on the target; EOS is added by :func:`collate_oat`).
    """

    crops: Any
    target: int
    sequence: Sequence[int]

    @classmethod
    def from_search_trial(cls, trial: Any, image: Any = None, colour_order: str = "rgb") -> OATSample:
        """From a :class:`~attnzoo.datasets.scanpaths.SearchTrial` (boxes, grid, target, objects).

        ``image`` (in ``colour_order``) defaults to ``trial.image_path`` read with PIL as RGB, as stored
        (JPEG decoders may differ from the official ``cv.imread`` by a grey level); a missing, damaged
        or oversized image is a :class:`~attnzoo.errors.DatasetFormatError` naming the file."""
        if image is None:
            from attnzoo.datasets.images import opened_image
            from attnzoo.errors import DatasetFormatError

            if trial.image_path is None:
                raise InvalidInputError("the trial has no image_path: pass its display as image=")
            with opened_image(trial.image_path, error=DatasetFormatError, what="display image") as im:
                image = np.asarray(im.convert("RGB"))  # decoded inside the guard: damage is named, not raised raw
        grid = tuple(trial.grid) if tuple(trial.grid) != (0, 0) else None
        crops = crop_objects(image, trial.boxes, colour_order=colour_order, grid=grid)
        return cls(crops, int(trial.target), [int(o) for o in np.asarray(trial.objects).reshape(-1)])


def as_object_index(value: Any, n: int, what: str) -> int:
    """``value`` as a 0-based object index below ``n``; ``what`` names it in the error."""
    if isinstance(value, torch.Tensor | np.ndarray):
        count = value.size if isinstance(value, np.ndarray) else value.numel()
        if (
            count != 1
            or value.dtype in (torch.bool, np.bool_)
            or (value.dtype.is_floating_point if isinstance(value, torch.Tensor) else value.dtype.kind not in "iu")
        ):
            raise InvalidInputError(f"{what} must be one integer, got {value.dtype} of shape {tuple(value.shape)}")
        value = value.reshape(-1)[0].item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInputError(f"{what} must be an integer object index, got {value!r}")
    value = int(value)
    if not 0 <= value < n:
        raise InvalidInputError(f"{what} {value} is outside the display's {n} objects (0-based)")
    return value


def as_crops(crops: Any, n: int, what: str = "crops", pixel_range: Sequence[float] | None = None) -> torch.Tensor:
    """One display's ``n`` crops ``[n, 150, 93, 3]`` (uint8 or 0-255 float, tensor or array) as float32.

    With the model's ``pixel_range`` (its ``pretrained_cfg["pixel_range"]``), crops on the other
    scale are refused (:func:`check_pixel_range`)."""
    if isinstance(crops, np.ndarray):
        crops = torch.from_numpy(np.ascontiguousarray(crops))
    if not isinstance(crops, torch.Tensor):
        raise InvalidInputError(f"{what} must be a tensor or array [N, 150, 93, 3], got {type(crops).__name__}")
    if crops.dim() != 4 or tuple(crops.shape[1:]) != (*CROP_SIZE, 3):
        raise InvalidInputError(
            f"{what} must be [N, {CROP_SIZE[0]}, {CROP_SIZE[1]}, 3] BGR crops (make them with crop_objects), "
            f"got shape {tuple(crops.shape)}"
        )
    if crops.shape[0] != n:
        raise InvalidInputError(f"{what} hold {crops.shape[0]} objects but the grid has {n}")
    if crops.dtype != torch.uint8 and not crops.is_floating_point():
        raise InvalidInputError(f"{what} must be uint8 or float (0-255), got {crops.dtype}")
    if pixel_range is not None:
        check_pixel_range(crops, pixel_range, what)
    return crops.float()


def check_pixel_range(crops: torch.Tensor, pixel_range: Sequence[float], what: str = "crops") -> None:
    """Refuse crops on another scale than the model's: nothing fails downstream, but every pointer
    decision changes. A 0-255 model (Amazon, and an ``OAT`` built without a cfg) refuses float crops
    whose maximum is in (0, 1] (torchvision's ``ToTensor`` range; at most one grey level of 255
    otherwise); a [0, 1] model (the shelves' min-max crops) refuses any value above 1."""
    if crops.numel() == 0:
        return
    high = float(crops.max())
    if float(pixel_range[1]) > 1 and crops.is_floating_point() and 0 < high <= 1:
        raise InvalidInputError(
            f"{what} are floats in [0, 1] (torchvision's ToTensor range?), but this model reads 0-255 pixel "
            "values: multiply them by 255, or pass the uint8 crops of crop_objects / display_crops"
        )
    if float(pixel_range[1]) <= 1 and high > 1:
        raise InvalidInputError(
            f"{what} reach {high:g}, but this model reads each crop min-max scaled to [0, 1] "
            "(crop_style 'rgb_minmax'): make them with display_crops(image, boxes, 'rgb_minmax')"
        )


def as_sample(
    sample: Any, n: int, index: int, pixel_range: Sequence[float] | None = None
) -> tuple[torch.Tensor, int, list[int]]:
    """An :class:`OATSample` or ``(crops, target, sequence)`` checked against ``n`` objects (and the
    crops against ``pixel_range``, when given), as ``(float crops, target, fixated objects)``;
    ``index`` names the sample in the error."""
    if isinstance(sample, OATSample):
        crops, target, seq = sample.crops, sample.target, sample.sequence
    else:
        try:
            crops, target, seq = sample
        except (TypeError, ValueError):
            raise InvalidInputError(f"sample {index} must be an OATSample or (crops, target, sequence)") from None
    crops = as_crops(crops, n, f"sample {index}'s crops", pixel_range)
    target = as_object_index(target, n, f"sample {index}'s target")
    seq_arr = seq.detach().cpu().numpy() if isinstance(seq, torch.Tensor) else np.asarray(seq)
    if seq_arr.ndim != 1 or seq_arr.size == 0:
        raise InvalidInputError(f"sample {index}'s sequence must be a non-empty 1-D list of object indices")
    return (
        crops,
        target,
        [as_object_index(v, n, f"sample {index}'s fixation {j}") for j, v in enumerate(seq_arr.tolist())],
    )


# -- batching (official Collator_pure + processData3d) -------------------------------------


@dataclass
class OATBatch:
    """A collated batch: the official collator's four tensors and the model's forward arguments."""

    src_pos: torch.Tensor  # [N+1, B] int64: 0..N-1 then the target
    tgt_pos: torch.Tensor  # [L, B] int64: BOS, fixations, EOS, PAD...
    src_img: torch.Tensor  # [B, N+1, 150, 93, 3] float32 BGR 0-255
    tgt_img: torch.Tensor  # [B, L, 150, 93, 3] float32 (all-ones blanks for BOS/EOS/PAD)
    src: torch.Tensor  # [N+1, B, 3] (row, col, is_target)
    trg: torch.Tensor  # [L-1, B, 3]
    src_mask: torch.Tensor  # [N+1, N+1] bool, all False
    tgt_mask: torch.Tensor  # [L-1, L-1] float causal (0 / -inf)
    src_padding_mask: torch.Tensor  # [B, N+1] bool
    tgt_padding_mask: torch.Tensor  # [B, L-1] bool, True at PAD inputs
    memory_key_padding_mask: torch.Tensor  # [B, N+1] bool (= src_padding_mask)
    pad_idx: int

    @property
    def tgt_img_input(self) -> torch.Tensor:
        return self.tgt_img[:, :-1]

    @property
    def tgt_out(self) -> torch.Tensor:
        """``[L-1, B]``: what each step should point at."""
        return self.tgt_pos[1:]

    def to(self, device: torch.device | str) -> OATBatch:
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return OATBatch(**fields)


def position_triples(tokens: torch.Tensor, target: torch.Tensor, grid: Sequence[int], *, decoder: bool) -> torch.Tensor:
    """``(row, col, is_target)`` float ``[L, B, 3]`` of pointer ``tokens [L, B]`` (official ``generate3DInput``).

    Encoder (``decoder=False``): the last token is the target token (flag 1). Decoder: the first
    token (BOS) sits at ``(rows/2, cols/2)``; the flag is 1 wherever the token is the target object.
    """
    rows, cols = grid
    out = torch.zeros((*tokens.shape, 3), device=tokens.device)
    out[..., 0] = tokens // cols
    out[..., 1] = torch.remainder(tokens, cols)
    if decoder:
        out[0, :, 0] = float(rows) / 2
        out[0, :, 1] = float(cols) / 2
        out[..., 2] = (tokens == target.view(1, -1)).float()
    else:
        out[-1, :, 2] = 1
    return out


def square_subsequent_mask(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The causal float mask ``[size, size]`` (0 on and below the diagonal, -inf above)."""
    mask = (torch.triu(torch.ones((size, size), device=device)) == 1).transpose(0, 1)
    return mask.float().masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0.0)


def collate_oat(samples: Sequence[Any], grid: Sequence[int]) -> OATBatch:
    """Samples (:class:`OATSample` or ``(crops, target, sequence)``, 0-based) -> an :class:`OATBatch`,
    exactly as the official ``Collator_pure`` followed by ``processData3d``."""
    rows, cols = check_grid(grid)
    n = rows * cols
    if not isinstance(samples, Sequence) or len(samples) == 0:
        raise InvalidInputError("collate_oat needs a non-empty list of samples")
    eos, pad, bos = n, n + 1, n + 2
    items = [as_sample(s, n, i) for i, s in enumerate(samples)]
    seqs = [torch.tensor([bos, *seq, eos], dtype=torch.int64) for _, _, seq in items]
    tgt_pos = nn.utils.rnn.pad_sequence(seqs, padding_value=pad, batch_first=False)  # [L, B]
    src_pos = torch.stack([torch.cat((torch.arange(n), torch.tensor([t]))) for _, t, _ in items]).T  # [N+1, B]
    src_img, tgt_img = [], []
    for b, (crops, _, _) in enumerate(items):
        images = torch.cat((crops, torch.ones((N_BLANKS, *crops.shape[1:]))))  # crops, then EOS/PAD/BOS blanks
        src_img.append(images[src_pos[:, b]])
        tgt_img.append(images[tgt_pos[:, b]])
    tgt_input = tgt_pos[:-1]
    target = src_pos[-1]
    src_padding = (src_pos == pad).transpose(0, 1)
    return OATBatch(
        src_pos=src_pos,
        tgt_pos=tgt_pos,
        src_img=torch.stack(src_img),
        tgt_img=torch.stack(tgt_img),
        src=position_triples(src_pos, target, (rows, cols), decoder=False),
        trg=position_triples(tgt_input, target, (rows, cols), decoder=True),
        src_mask=torch.zeros((n + 1, n + 1), dtype=torch.bool),
        tgt_mask=square_subsequent_mask(tgt_input.shape[0]),
        src_padding_mask=src_padding,
        tgt_padding_mask=(tgt_input == pad).transpose(0, 1),
        memory_key_padding_mask=src_padding,
        pad_idx=pad,
    )
