"""Attention heatmaps over whole-slide thumbnails (numpy + PIL)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["attention_colours", "plot_attention_heatmap"]


def attention_colours(values: np.ndarray) -> np.ndarray:
    """A blue -> cyan -> yellow -> red ramp for values in [0, 1], as uint8 RGB."""
    stops = np.array([[40, 60, 200], [40, 200, 220], [250, 230, 60], [220, 30, 30]], dtype=np.float64)
    x = np.clip(values, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    t = (x - i)[..., None]
    return (stops[i] * (1 - t) + stops[i + 1] * t).astype(np.uint8)


def plot_attention_heatmap(
    attention: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: int,
    *,
    thumbnail: Image.Image | None = None,
    dimensions: tuple[int, int] | None = None,
    size: int = 1024,
    alpha: float = 0.5,
    title: str = "",
) -> Image.Image:
    """Each patch's attention (rank-normalised, so the few top patches stand out as in the official
    heatmaps) as a coloured square over the thumbnail. Without a thumbnail the canvas spans the
    patches' bounding box."""
    attention, coords = (
        np.asarray(attention, dtype=np.float64).reshape(-1),
        np.asarray(coords, dtype=np.float64).reshape(-1, 2),
    )
    if len(attention) != len(coords):
        raise ValueError(f"{len(attention)} attention values for {len(coords)} patches")
    ranks = np.argsort(np.argsort(attention)) / max(len(attention) - 1, 1)
    side = max(int(patch_size_level0), 1)
    if dimensions is None:
        dimensions = (
            int(coords[:, 0].max() + side) if len(coords) else 1,
            int(coords[:, 1].max() + side) if len(coords) else 1,
        )
    scale = size / max(dimensions)
    canvas_size = (max(1, round(dimensions[0] * scale)), max(1, round(dimensions[1] * scale)))
    base = (
        thumbnail.convert("RGB").resize(canvas_size)
        if thumbnail is not None
        else Image.new("RGB", canvas_size, (245, 245, 245))
    )
    overlay = Image.new("RGBA", canvas_size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    colours = attention_colours(ranks)
    for (x, y), c in zip(coords * scale, colours, strict=True):
        x1, y1 = x + max(side * scale, 2) - 1, y + max(side * scale, 2) - 1
        draw.rectangle([x, y, x1, y1], fill=(*map(int, c), int(255 * alpha)))
    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    if title:
        framed = Image.new("RGB", (out.width, out.height + 18), (255, 255, 255))
        framed.paste(out, (0, 18))
        ImageDraw.Draw(framed).text((4, 3), title, fill=(0, 0, 0))
        out = framed
    return out
