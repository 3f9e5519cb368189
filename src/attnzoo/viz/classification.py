"""A picture of a classification: the image beside its top-k classes as bars."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

from attnzoo.viz.drawing import load_font, resize_picture, wrap_text

__all__ = ["load_font", "plot_classification"]

_TITLE_LINE, _BAR_TOP, _BAR_BOTTOM = 20, 17, 27  # px: a title line's height; a row's bar, from the row's top


def plot_classification(
    image: Image.Image, predictions: Sequence[Any], *, title: str | None = None, height: int = 320
) -> Image.Image:
    """``predictions`` are objects or dicts with ``label`` and ``score`` (best first). The image is
    ``height`` px tall; the picture grows below it when the title (wrapped to the panel) and the bars
    need more room."""
    image = image.convert("RGB")
    scale = height / image.height
    thumb = resize_picture(image, (max(1, round(image.width * scale)), height))
    panel_w, pad = 420, 12
    bar_w = panel_w - 2 * pad
    font, small = load_font(16), load_font(13)
    title_lines = wrap_text(title, font, bar_w)
    top = pad + (_TITLE_LINE * len(title_lines) + 8 if title_lines else 0)
    row = min(48, max(34, (height - top - pad) // max(1, len(predictions))))
    needed = top + (len(predictions) - 1) * row + _BAR_BOTTOM + pad if predictions else top
    canvas = Image.new("RGB", (thumb.width + panel_w, max(height, needed)), "white")
    canvas.paste(thumb, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = thumb.width + pad
    for i, line in enumerate(title_lines):
        draw.text((x0, pad + _TITLE_LINE * i), line, fill="black", font=font)
    y = top
    for p in predictions:
        label, score = (p["label"], p["score"])
        label = label if len(label) <= 48 else label[:45] + "..."
        draw.text((x0, y), f"{label}", fill="black", font=small)
        draw.rectangle((x0, y + _BAR_TOP, x0 + bar_w, y + _BAR_BOTTOM), fill=(230, 230, 230))
        draw.rectangle(
            (x0, y + _BAR_TOP, x0 + max(1, round(bar_w * float(score))), y + _BAR_BOTTOM), fill=(52, 101, 164)
        )
        draw.text((x0 + bar_w - 52, y), f"{100 * float(score):5.1f}%", fill=(80, 80, 80), font=small)
        y += row
    return canvas
