"""Attention heatmaps over whole-slide thumbnails (numpy + PIL): each patch a square coloured by its
attention rank on a sequential colormap, a colour bar, and a title that says what was predicted."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from attnzoo.errors import InvalidInputError
from attnzoo.viz.drawing import NOTE_COLOUR, load_font, resize_picture, text_width, wrap_text

__all__ = ["attention_colours", "bar_labels", "plot_attention_heatmap"]

#: viridis sampled at 9 even steps: sequential (brightness rises with the value) and readable in grey
#: and by the colour-blind, so "more attention" always reads as "lighter".
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [71, 45, 123],
        [59, 82, 139],
        [44, 114, 142],
        [33, 145, 140],
        [40, 174, 128],
        [94, 201, 98],
        [173, 220, 48],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
_PANEL_WIDTH = 124  # the colour bar and its labels (wider when a label needs it)
_LABEL_X = 28  # where the labels start, from the panel's left: past the padding, the bar and its ticks


def attention_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint8 RGB on the sequential viridis ramp (dark purple -> yellow)."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(x.astype(int), len(_VIRIDIS) - 2)
    t = (x - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - t) + _VIRIDIS[i + 1] * t).astype(np.uint8)


def attention_ranks(attention: np.ndarray) -> np.ndarray:
    """Each value's rank in [0, 1] (ties share their mean rank, so equal attention gets one colour)."""
    from scipy.stats import rankdata

    if len(attention) < 2:
        return np.full(len(attention), 0.5)
    return (rankdata(attention, method="average") - 1) / (len(attention) - 1)


def bar_labels(attention: np.ndarray) -> tuple[str, str, str]:
    """The colour bar's labels, ``("max ...", "median ...", "min ...")`` of ``attention``: 3 significant
    digits, or as many more as it takes for values that differ to print differently (0.5005, 0.5 and
    0.4995 are not all "0.5")."""
    values = np.quantile(np.asarray(attention, dtype=np.float64).reshape(-1), [1.0, 0.5, 0.0])
    for digits in range(3, 18):  # 17 significant digits tell any two doubles apart
        texts = [f"{value:.{digits}g}" for value in values]
        if all(texts[i] != texts[j] for i, j in ((0, 1), (1, 2), (0, 2)) if values[i] != values[j]):
            break
    return f"max {texts[0]}", f"median {texts[1]}", f"min {texts[2]}"


def plot_attention_heatmap(
    attention: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: int,
    *,
    thumbnail: Image.Image | None = None,
    dimensions: tuple[int, int] | None = None,
    size: int = 1024,
    alpha: float | None = None,
    title: str = "",
    note: str = "",
) -> Image.Image:
    """Each patch's attention as a coloured square over the slide thumbnail (over a blank canvas spanning
    the patches without one), a colour bar beside it and ``title`` above, with ``note`` (e.g. "random
    weights") in red under it. A thumbnail needs ``dimensions``, the slide's level-0 ``(width, height)``
    it shows. The picture is at most ``size`` pixels wide (exactly, for a landscape slide).
    ``alpha``: the squares' opacity (default 0.6 over a thumbnail, opaque over a blank canvas). Colours are
    attention ranks, so the few top patches stand out as in the official heatmaps whatever the spread of
    the raw values; the bar's ends give the raw values."""
    attention = np.asarray(attention, dtype=np.float64).reshape(-1)
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1:] != (2,) or len(attention) != len(coords):
        raise InvalidInputError(
            f"a heatmap needs one (x, y) per patch: {len(attention)} attention values for coords of shape {coords.shape}"
        )
    if not (np.isfinite(attention).all() and np.isfinite(coords).all()):
        raise InvalidInputError("a heatmap needs finite attention values and coordinates")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _PANEL_WIDTH + 16:
        raise InvalidInputError(f"size must be an integer of at least {_PANEL_WIDTH + 16} pixels, got {size!r}")
    labels = bar_labels(attention) if len(attention) else ()
    widest = max((text_width(label, load_font(12)) for label in labels), default=0.0)
    panel = min(max(_PANEL_WIDTH, _LABEL_X + math.ceil(widest) + 4), int(size) - 16)  # the heatmap keeps 16 px
    if thumbnail is not None and dimensions is None:
        raise InvalidInputError(
            "a thumbnail needs the slide's level-0 size, dimensions=(width, height): without it the thumbnail "
            "would be stretched over the patches' extent, not the slide's"
        )
    side = max(int(patch_size_level0), 1)
    origin = np.zeros(2)
    if dimensions is None:  # from (0, 0), or from the top-left patch should one lie left of or above it
        origin = np.minimum(coords.min(0), 0) if len(coords) else origin
        far = coords.max(0) + side if len(coords) else np.ones(2)
        dimensions = (int(far[0] - origin[0]), int(far[1] - origin[1]))
    scale = (int(size) - panel) / max(max(dimensions), 1)
    canvas_size = (max(1, round(dimensions[0] * scale)), max(1, round(dimensions[1] * scale)))
    base = (
        resize_picture(thumbnail.convert("RGB"), canvas_size)
        if thumbnail is not None
        else Image.new("RGB", canvas_size, (245, 245, 245))
    )
    alpha = (0.6 if thumbnail is not None else 1.0) if alpha is None else float(alpha)
    overlay = Image.new("RGBA", canvas_size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    square = max(side * scale, 2)
    for (x, y), c in zip((coords - origin) * scale, attention_colours(attention_ranks(attention)), strict=True):
        draw.rectangle([x, y, x + square - 1, y + square - 1], fill=(*map(int, c), round(255 * alpha)))
    heatmap = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    return _framed(heatmap, labels, title, note, panel)


def _framed(heatmap: Image.Image, labels: tuple[str, ...], title: str, note: str, panel: int) -> Image.Image:
    """The heatmap with the title (and note) above, wrapped to the picture's width, and the colour bar
    (``panel`` px wide) on its right with ``labels``, the raw attention at its ends and middle."""
    font, small = load_font(16), load_font(12)
    pad, bar_w, width = 8, 14, heatmap.width + panel
    lines = [(line, font, (0, 0, 0), 20) for line in wrap_text(title, font, width - 2 * pad)]
    lines += [(line, small, NOTE_COLOUR, 16) for line in wrap_text(note, small, width - 2 * pad)]
    head = pad + sum(step for *_, step in lines) + (4 if lines else 0)
    body = max(heatmap.height, 150)
    out = Image.new("RGB", (width, head + body + pad), (255, 255, 255))
    out.paste(heatmap, (0, head))
    draw = ImageDraw.Draw(out)
    y = pad
    for text, face, colour, step in lines:
        draw.text((pad, y), text, fill=colour, font=face)
        y += step

    x0 = heatmap.width + pad
    top, bottom = head + 34, head + body - 8
    ramp = attention_colours(np.linspace(1, 0, bottom - top))
    out.paste(Image.fromarray(np.repeat(ramp[:, None], bar_w, axis=1)), (x0, top))
    draw.rectangle([x0, top, x0 + bar_w - 1, bottom - 1], outline=(90, 90, 90))
    draw.text((x0, head + 2), "attention", fill=(0, 0, 0), font=small)
    draw.text((x0, head + 16), "(colour: rank)", fill=(90, 90, 90), font=small)
    for y, text in zip((top, (top + bottom) // 2, bottom - 1), labels, strict=False):
        draw.line([x0 + bar_w, y, x0 + bar_w + 4, y], fill=(90, 90, 90))
        draw.text((x0 + bar_w + 6, y), text, fill=(40, 40, 40), font=small, anchor="lm")
    return out
