"""A picture of a classification: the image beside its top-k classes as bars."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def plot_classification(
    image: Image.Image, predictions: Sequence[Any], *, title: str | None = None, height: int = 320
) -> Image.Image:
    """``predictions`` are objects or dicts with ``label`` and ``score`` (best first)."""
    image = image.convert("RGB")
    scale = height / image.height
    thumb = image.resize((max(1, round(image.width * scale)), height), Image.Resampling.BICUBIC)
    panel_w, pad = 420, 12
    canvas = Image.new("RGB", (thumb.width + panel_w, height), "white")
    canvas.paste(thumb, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font, small = load_font(16), load_font(13)
    x0, y = thumb.width + pad, pad
    if title:
        draw.text((x0, y), title, fill="black", font=font)
        y += 28
    bar_w = panel_w - 2 * pad
    row = min(48, max(34, (height - y - pad) // max(1, len(predictions))))
    for p in predictions:
        label, score = (p["label"], p["score"])
        label = label if len(label) <= 48 else label[:45] + "..."
        draw.text((x0, y), f"{label}", fill="black", font=small)
        draw.rectangle((x0, y + 17, x0 + bar_w, y + 27), fill=(230, 230, 230))
        draw.rectangle((x0, y + 17, x0 + max(1, round(bar_w * float(score))), y + 27), fill=(52, 101, 164))
        draw.text((x0 + bar_w - 52, y), f"{100 * float(score):5.1f}%", fill=(80, 80, 80), font=small)
        y += row
    return canvas
