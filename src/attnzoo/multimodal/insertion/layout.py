"""The diptych canvas of subject insertion and the token sets its attention edit needs.

In-Context Brush puts the subject (pasted on white) and the target side by side in one image and
lets FLUX.1-Fill inpaint the masked part of the target: a **vertical** diptych (subject on top, the
official layout) or a **horizontal** one (subject on the left, Diptych Prompting's). FLUX encodes
the canvas with its VAE (``vae_scale_factor`` pixels per latent) and packs 2x2 latents into one
token, row-major over the token grid, after the text tokens: the joint sequence is
``[text (T) | image tokens]``. The image tokens of the subject's panel are the *demo* tokens, those
of the target's panel the *query* tokens; in a vertical diptych they are the two contiguous halves,
in a horizontal one they alternate by token column.

Official behaviour vs corrected (see the docs page): the official layout code draws the user's
VIA regions on a canvas whose height and width are swapped, so the mask comes out transposed for a
non-square target (``behaviour="official"`` reproduces it; ``"corrected"`` draws it upright).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from attnzoo._values import to_numpy
from attnzoo.errors import InvalidInputError

__all__ = [
    "BEHAVIOURS",
    "ORIENTATIONS",
    "PanelLayout",
    "TokenSets",
    "build_canvas",
    "check_behaviour",
    "is_via",
    "official_token_sets",
    "pack_latents",
    "panel_of",
    "rasterize_via",
    "read_mask",
    "subject_on_white",
    "unpack_latents",
]

ORIENTATIONS = ("vertical", "horizontal")
BEHAVIOURS = ("corrected", "official")
#: The text length the official In-Context Brush processor assumes (FLUX's T5 ``max_sequence_length``).
OFFICIAL_TEXT_LEN = 512


def check_behaviour(behaviour: str) -> str:
    if behaviour not in BEHAVIOURS:
        raise InvalidInputError(f"behaviour must be one of {', '.join(map(repr, BEHAVIOURS))}, got {behaviour!r}")
    return behaviour


class TokenSets(NamedTuple):
    """Token sets over the joint sequence ``[text | image]``: a ``slice`` when consecutive, else sorted
    int64 indices (what :func:`attnzoo.kernels.boosted_attention` takes)."""

    text: slice
    demo: slice | torch.Tensor
    """The subject's panel."""
    query: slice | torch.Tensor
    """The target's panel (the one being inpainted)."""

    def masks(self, length: int) -> dict[str, torch.Tensor]:
        """Boolean ``[length]`` masks of the three sets."""
        out = {}
        for name, tokens in self._asdict().items():
            mask = torch.zeros(length, dtype=torch.bool)
            mask[tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens] = True
            out[name] = mask
        return out


@dataclass(frozen=True)
class PanelLayout:
    """Two panels of ``panel_height x panel_width`` pixels, subject first (top or left), then the target.

    ``vae_scale_factor`` is the VAE's downsampling (8 for FLUX; 1 for the tiny test VAE) and ``patch`` the
    latent packing (2x2 in FLUX), so a token covers ``vae_scale_factor * patch`` pixels per side and the
    panel sides must be multiples of it (:meth:`fit` rounds other sizes, with a warning).
    """

    panel_height: int = 768
    panel_width: int = 768
    orientation: str = "vertical"
    vae_scale_factor: int = 8
    patch: int = 2

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise InvalidInputError(f"orientation must be 'vertical' or 'horizontal', got {self.orientation!r}")
        for name in ("vae_scale_factor", "patch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("panel_height", "panel_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < self.token_pixels:
                raise InvalidInputError(f"{name} must be an integer >= {self.token_pixels} pixels, got {value!r}")
            if value % self.token_pixels:
                raise InvalidInputError(
                    f"{name}={value} is not a multiple of {self.token_pixels} (VAE factor {self.vae_scale_factor} x "
                    f"{self.patch}x{self.patch} packing); use PanelLayout.fit(...) to round it"
                )

    @classmethod
    def fit(
        cls,
        panel_height: int,
        panel_width: int | None = None,
        *,
        orientation: str = "vertical",
        vae_scale_factor: int = 8,
        patch: int = 2,
    ) -> PanelLayout:
        """The layout nearest to the asked panel size whose sides are whole tokens (a warning says when rounded)."""
        panel_width = panel_height if panel_width is None else panel_width
        step = int(vae_scale_factor) * int(patch)
        sides = []
        for name, value in (("panel height", panel_height), ("panel width", panel_width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer number of pixels, got {value!r}")
            rounded = max(step, int(round(value / step)) * step)
            if rounded != value:
                warnings.warn(
                    f"{name} {value} px is not a multiple of {step} (VAE factor x packing); using {rounded} px",
                    stacklevel=2,
                )
            sides.append(rounded)
        return cls(sides[0], sides[1], orientation, vae_scale_factor, patch)

    @property
    def token_pixels(self) -> int:
        """Pixels per token side."""
        return self.vae_scale_factor * self.patch

    @property
    def panel_tokens(self) -> tuple[int, int]:
        """Token rows and columns of one panel."""
        return self.panel_height // self.token_pixels, self.panel_width // self.token_pixels

    @property
    def canvas_size(self) -> tuple[int, int]:
        """``(height, width)`` of the canvas in pixels."""
        if self.orientation == "vertical":
            return 2 * self.panel_height, self.panel_width
        return self.panel_height, 2 * self.panel_width

    @property
    def canvas_tokens(self) -> tuple[int, int]:
        """Token rows and columns of the canvas (the packed latent grid)."""
        height, width = self.canvas_size
        return height // self.token_pixels, width // self.token_pixels

    @property
    def image_tokens(self) -> int:
        rows, cols = self.canvas_tokens
        return rows * cols

    def panel_of_tokens(self) -> torch.Tensor:
        """int64 ``[image_tokens]``: 0 for the subject's (demo) panel, 1 for the target's (query) panel."""
        rows, cols = self.canvas_tokens
        r = torch.arange(rows).view(rows, 1).expand(rows, cols)
        c = torch.arange(cols).view(1, cols).expand(rows, cols)
        panel_rows, panel_cols = self.panel_tokens
        second = r >= panel_rows if self.orientation == "vertical" else c >= panel_cols
        return second.reshape(-1).long()

    def token_sets(self, text_len: int, device: torch.device | str | None = None) -> TokenSets:
        """The text, demo and query tokens of the joint sequence ``[text (text_len) | image tokens]``."""
        if isinstance(text_len, bool) or not isinstance(text_len, (int, np.integer)) or text_len < 0:
            raise InvalidInputError(f"text_len must be a non-negative integer, got {text_len!r}")
        text_len = int(text_len)
        half = self.image_tokens // 2
        if self.orientation == "vertical":  # the two panels are the two contiguous halves
            return TokenSets(
                slice(0, text_len), slice(text_len, text_len + half), slice(text_len + half, text_len + 2 * half)
            )
        panel = self.panel_of_tokens()
        indices = torch.arange(self.image_tokens) + text_len
        return TokenSets(slice(0, text_len), indices[panel == 0].to(device), indices[panel == 1].to(device))

    def panel_box(self, which: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` pixels of panel 0 (subject) or 1 (target) on the canvas."""
        if self.orientation == "vertical":
            top = which * self.panel_height
            return 0, top, self.panel_width, top + self.panel_height
        left = which * self.panel_width
        return left, 0, left + self.panel_width, self.panel_height


def official_token_sets(length: int, device: torch.device | str | None = None) -> TokenSets:
    """The official In-Context Brush slicing of a joint sequence of ``length`` tokens: text = the first 512
    (a literal), then two equal halves of what is left (demo, query), whatever the real text length and panels."""
    half = (length - OFFICIAL_TEXT_LEN) // 2
    start = OFFICIAL_TEXT_LEN
    return TokenSets(slice(0, start), slice(start, start + half), slice(start + half, length))


def panel_of(canvas: np.ndarray, layout: PanelLayout, which: int) -> np.ndarray:
    """Panel ``which`` (0 subject, 1 target) of a canvas array in the layout's pixels."""
    left, top, right, bottom = layout.panel_box(which)
    return canvas[top:bottom, left:right]


# -- latents -----------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``[B, C, h, w]`` latents -> ``[B, (h/p)(w/p), C p^2]`` tokens, row-major (FLUX's packing)."""
    B, C, h, w = latents.shape
    x = latents.view(B, C, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // patch) * (w // patch), C * patch * patch)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent grid of ``height x width``."""
    B, _, channels = tokens.shape
    C = channels // (patch * patch)
    x = tokens.view(B, height // patch, width // patch, C, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, height, width)


# -- masks and canvases ------------------------------------------------------------------------


def rasterize_via(regions: Any, size: tuple[int, int], *, behaviour: str = "corrected") -> np.ndarray:
    """The regions of a VIA annotation (VGG Image Annotator JSON: ellipses and polygons) as a uint8 mask.

    ``regions``: the JSON (a path, a str, or the parsed dict ``{key: {"regions": [...]}}``), one file
    entry, or its list of regions. ``size`` is the target's ``(height, width)``. ``"corrected"``
    draws on a ``height x width`` canvas; ``"official"`` on the ``width x height`` one the official
    ``infer.py`` makes (its swap), so for a non-square target the mask is ``[width, height]``.
    """
    check_behaviour(behaviour)
    height, width = (int(s) for s in size)
    shapes = _via_regions(regions)
    canvas_size = (height, width) if behaviour == "official" else (width, height)  # PIL sizes are (w, h)
    canvas = Image.new("RGB", canvas_size, (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, shape in enumerate(shapes):
        kind = shape.get("name")
        try:
            if kind == "ellipse":
                cx, cy, rx, ry = (int(shape[k]) for k in ("cx", "cy", "rx", "ry"))
                draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=(255, 255, 255))
            elif kind == "polygon":
                xs, ys = shape["all_points_x"], shape["all_points_y"]
                if len(xs) != len(ys) or len(xs) < 3:
                    raise InvalidInputError(f"VIA region {i}: a polygon needs >= 3 points with as many x as y")
                draw.polygon(list(zip(xs, ys, strict=True)), fill="white")
            elif kind == "rect":
                x, y, w, h = (int(shape[k]) for k in ("x", "y", "width", "height"))
                draw.rectangle([x, y, x + w, y + h], fill=(255, 255, 255))
            else:
                raise InvalidInputError(f"VIA region {i}: shape {kind!r} is not supported (ellipse, polygon, rect)")
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, InvalidInputError):
                raise
            raise InvalidInputError(f"VIA region {i} ({kind}): malformed shape attributes ({err})") from None
    return np.asarray(canvas)[..., 0].copy()


def _via_regions(regions: Any) -> list[Mapping[str, Any]]:
    if isinstance(regions, (str, os.PathLike)) and not str(regions).lstrip().startswith(("{", "[")):
        path = Path(regions)
        if not path.is_file():
            raise InvalidInputError(f"VIA annotation {path} not found")
        regions = path.read_text()
    if isinstance(regions, (str, bytes)):
        try:
            regions = json.loads(regions)
        except ValueError as err:
            raise InvalidInputError(f"the VIA annotation is not valid JSON ({err})") from None
    if isinstance(regions, Mapping):
        if "regions" in regions:
            regions = regions["regions"]
        elif regions and all(isinstance(v, Mapping) and "regions" in v for v in regions.values()):
            regions = next(iter(regions.values()))["regions"]  # the official code reads the first file's regions
        else:
            raise InvalidInputError("a VIA annotation must hold 'regions' (a VIA project: {file: {regions: [...]}})")
    if isinstance(regions, Mapping):  # VIA 1.x stores regions as {"0": {...}}
        regions = list(regions.values())
    if not isinstance(regions, Sequence) or not regions:
        raise InvalidInputError("the VIA annotation has no regions")
    shapes = []
    for i, region in enumerate(regions):
        shape = region.get("shape_attributes") if isinstance(region, Mapping) else None
        if not isinstance(shape, Mapping):
            raise InvalidInputError(f"VIA region {i} has no shape_attributes")
        shapes.append(shape)
    return shapes


def read_mask(mask: Any, size: tuple[int, int], *, name: str = "mask", behaviour: str = "corrected") -> np.ndarray:
    """A fill mask for an image of ``size`` = ``(height, width)``, as uint8 0/255 ``[height, width]``.

    * a bool array or tensor: True = fill;
    * an integer one holding at most two values, 0 and one other value ``v`` (a 0/1, 0/255 or 0/7 mask, a
      label map of one label): ``v`` = fill, whatever ``v``;
    * an integer one holding more values (or two non-zero ones) is read as a mask image's pixels and thresholded
      at half its scale: the 8-bit scale (fill >= 128) when its largest value is at most 255, else the 16-bit
      one (fill >= 32768); so ``np.asarray(Image.open(path))`` of a mask image fills exactly where the image
      at ``path`` does (grey edges of a resized mask, JPEG noise in its black), and a 0/1/255 array fills only
      its 255s (1 is black in an image). Such an array with a negative value or one beyond 65535 is no
      image's pixels: refused (pass a bool array, e.g. ``labels == k``);
    * a float one: >= 0.5 = fill (a 0/1 mask or probabilities);
    * a mask image (path, PIL): white = fill, i.e. >= 128 of 255 in its luminance. An alpha channel is the
      mask only when it holds both transparent (< 128) and opaque pixels; a constant alpha (a black-and-white
      mask saved as RGBA, fully opaque) leaves the mask to the colour channels;
    * a VIA annotation (path to a .json, a JSON string or dict).

    The error about an empty mask names the rule that read it.

    A VIA annotation under ``behaviour="official"`` comes back as the official code draws it: on the
    transposed ``[width, height]`` canvas (:func:`rasterize_via`), which :func:`build_canvas` stretches
    onto the panel as the official code does."""
    return _read_mask_rule(mask, size, name=name, behaviour=behaviour)[0]


def _read_mask_rule(
    mask: Any, size: tuple[int, int], *, name: str = "mask", behaviour: str = "corrected"
) -> tuple[np.ndarray, str]:
    """:func:`read_mask`, and the rule that read the mask, in words (for a message about an empty mask)."""
    height, width = size
    if is_via(mask):
        return rasterize_via(mask, size, behaviour=behaviour), "a VIA annotation, filled inside its regions"
    if isinstance(mask, torch.Tensor):
        mask = to_numpy(mask, name)  # bfloat16 widened (numpy has none), a meta tensor refused
    if isinstance(mask, np.ndarray):
        array = mask
        while array.ndim > 2 and array.shape[0] == 1:  # [1, H, W], [1, 1, H, W]: drop leading unit axes only
            array = array[0]
        while array.ndim > 2 and array.shape[-1] == 1:  # [H, W, 1]
            array = array[..., 0]
        if array.ndim != 2:
            raise InvalidInputError(f"{name} must be a 2-D array [height, width], got shape {mask.shape}")
        if array.dtype.kind not in "biuf":
            raise InvalidInputError(f"{name} must hold booleans or numbers, got {array.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInputError(f"{name} holds NaN or infinite values")
        binary, rule = _binary(array, name)
    else:
        from attnzoo.datasets.images import load_image

        try:
            image = mask if isinstance(mask, Image.Image) else None
            if image is None:
                image = load_image(mask, keep_alpha=True)
        except InvalidInputError as err:
            raise InvalidInputError(f"{name}: {err}") from None
        alpha = np.asarray(image.getchannel("A")) >= 128 if image.mode in ("RGBA", "LA") else None
        if alpha is not None and alpha.any() and not alpha.all():  # a varying alpha: the transparent PNG's mask
            binary, rule = alpha, "a mask image with a transparent background, filled where opaque (alpha >= 128)"
        else:  # no alpha, or a constant one (an opaque RGBA export): the luminance carries the mask
            binary = np.asarray(image.convert("L")) >= 128
            rule = "a mask image, filled where white (luminance >= 128 of 255)"
    if binary.shape != (height, width):
        raise InvalidInputError(
            f"{name} is {binary.shape[1]}x{binary.shape[0]} (w x h) but its image is {width}x{height}; give a mask of "
            "the image's size"
        )
    return np.where(binary, 255, 0).astype(np.uint8), rule


def _binary(array: np.ndarray, name: str) -> tuple[np.ndarray, str]:
    """Where a numeric mask array fills, and the rule that said so (the rules of :func:`read_mask`)."""
    if array.dtype.kind == "b":
        return array, "a bool array, filled where True"
    if array.dtype.kind == "f":
        return array >= 0.5, f"a float array, filled where >= 0.5 (its values span {_span(array)})"
    if array.size == 0:
        return array != 0, "an empty integer array"
    low, high = int(array.min()), int(array.max())
    value = high if high != 0 else low  # the one non-zero value of a binary mask
    if ((array == 0) | (array == value)).all():  # 0 and one value v (0/1, 0/255, 0/-3): a binary mask, v = fill
        return array != 0, f"an integer array of the values {sorted({0, value})}, filled where non-zero"
    if low < 0:
        raise InvalidInputError(
            f"{name} holds values {_span(array)}: not 0 and one fill value, and negative values are no mask "
            "image's pixels; pass a bool array for a label map (e.g. labels == k)"
        )
    if high > 65535:
        raise InvalidInputError(
            f"{name} holds values {_span(array)}, not only 0 and one fill value: not an 8- or 16-bit mask "
            "image's pixels either; pass a bool array for a label map (e.g. labels == k)"
        )
    threshold, scale = (128, "an 8-bit") if high <= 255 else (32768, "a 16-bit")
    return array >= threshold, (
        f"an integer array of values {_span(array)}, not only 0 and one fill value, so read as {scale} mask "
        f"image's pixels: filled where >= {threshold}, half its range (for a label map pass a bool array, "
        "e.g. labels > 0)"
    )


def _span(array: np.ndarray) -> str:
    low, high = array.min(), array.max()
    return f"{low:g} to {high:g}" if array.dtype.kind == "f" else f"{int(low)} to {int(high)}"


def is_via(mask: Any) -> bool:
    """Whether ``mask`` is a VIA annotation (dict, list of regions, JSON text or a .json path)."""
    if isinstance(mask, (Mapping, list)):
        return True
    return isinstance(mask, (str, os.PathLike)) and (
        str(mask).lower().endswith(".json") or str(mask).lstrip().startswith(("{", "["))
    )


def subject_on_white(subject: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The subject's pixels where ``mask`` is set, white elsewhere (the official paste; uint8 ``[h, w, 3]``)."""
    keep = (mask > 0)[..., None]
    return np.where(keep, subject, np.uint8(255)).astype(np.uint8)


def build_canvas(
    subject: np.ndarray, target: np.ndarray, target_mask: np.ndarray, layout: PanelLayout
) -> tuple[np.ndarray, np.ndarray]:
    """The diptych the pipeline inpaints: ``(image uint8 [H, W, 3], mask uint8 [H, W])``.

    Each panel is resized to the panel size with PIL's default resampling (bicubic), as the official
    ``infer.py`` does, and the mask is 0 over the subject's panel; the mask keeps the soft edges of the
    resize (the pipeline binarises it).
    """
    size = (layout.panel_width, layout.panel_height)
    panels = [Image.fromarray(a).resize(size) for a in (subject, target)]
    zeros = Image.fromarray(np.zeros_like(subject)).resize(size)
    mask_rgb = Image.fromarray(np.repeat(target_mask[..., None], 3, axis=-1)).resize(size)
    axis = 0 if layout.orientation == "vertical" else 1
    image = np.concatenate([np.asarray(p) for p in panels], axis=axis)
    mask = np.concatenate([np.asarray(zeros), np.asarray(mask_rgb)], axis=axis)[..., 0]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)
