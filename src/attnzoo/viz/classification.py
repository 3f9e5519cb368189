"""A picture of a classification: the image beside its top-k classes as bars."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

from attnzoo.viz.drawing import NOTE_COLOUR, load_font, resize_picture, text_width, wrap_text

__all__ = ["load_font", "plot_classification"]

_TITLE_LINE, _NOTE_LINE, _MORE_LINE = 20, 17, 20  # px: a title line's, a note line's and the "+N more" line's height
_BAR_TOP, _BAR_BOTTOM = 17, 27  # px: a row's bar, from the row's top
_PANEL_WIDTH, _PAD = 420, 12
_BAR = (52, 101, 164)
_TRACK, _GREY = (230, 230, 230), (80, 80, 80)


def plot_classification(
    image: Image.Image,
    predictions: Sequence[Any],
    *,
    title: str | None = None,
    note: str | None = None,
    height: int = 320,
    max_rows: int = 20,
) -> Image.Image:
    """``predictions`` are dicts (or objects read as dicts) with ``label`` and ``score`` (best first).

    The image is drawn with its shorter side ``height`` px, within a box ``2 * height`` wide and ``1.5 * height``
    tall (its aspect kept), beside a panel with the title (wrapped to the panel), ``note`` (e.g. "random weights:
    ...") in red under it, and one bar per prediction, at most ``max_rows`` of them and a "+N more" line for
    the rest. Scores in [0, 1] are shown as percentages; others as numbers with their bars clamped to the
    track, and a NaN score as "n/a" with no bar. A label is drawn on one line and cut (with "...") where it
    would reach its score."""
    image = image.convert("RGB")
    scale = min(height / min(image.size), 2 * height / image.width, 1.5 * height / image.height)
    thumb = resize_picture(image, (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    bar_w = _PANEL_WIDTH - 2 * _PAD
    font, small = load_font(16), load_font(13)
    lines = [(line, font, (0, 0, 0), _TITLE_LINE) for line in wrap_text(title, font, bar_w)]
    lines += [(line, small, NOTE_COLOUR, _NOTE_LINE) for line in wrap_text(note, small, bar_w)]
    top = _PAD + (sum(step for *_, step in lines) + 8 if lines else 0)
    shown = list(predictions)[: max(1, int(max_rows))]
    hidden = len(predictions) - len(shown)
    more = _MORE_LINE if hidden else 0
    row = min(48, max(34, (max(thumb.height, height) - top - _PAD - more) // max(1, len(shown))))
    needed = top + (len(shown) - 1) * row + _BAR_BOTTOM + more + _PAD if shown else top
    canvas = Image.new("RGB", (thumb.width + _PANEL_WIDTH, max(thumb.height, needed)), "white")
    canvas.paste(thumb, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = thumb.width + _PAD
    y = _PAD
    for text, face, colour, step in lines:
        draw.text((x0, y), text, fill=colour, font=face)
        y += step
    y = top
    for p in shown:
        score = _number(p["score"])
        value = _score_text(score)
        value_w = text_width(value, small)
        label = _fit(" ".join(str(p["label"]).split()), small, bar_w - value_w - 10)
        draw.text((x0, y), label, fill="black", font=small)
        draw.text((x0 + bar_w - value_w, y), value, fill=_GREY, font=small)
        draw.rectangle((x0, y + _BAR_TOP, x0 + bar_w, y + _BAR_BOTTOM), fill=_TRACK)
        if not math.isnan(score):
            length = max(1, round(bar_w * min(max(score, 0.0), 1.0)))
            draw.rectangle((x0, y + _BAR_TOP, x0 + length, y + _BAR_BOTTOM), fill=_BAR)
        y += row
    if hidden:
        draw.text((x0, y - row + _BAR_BOTTOM + 4), f"+{hidden} more", fill=_GREY, font=small)
    return canvas


def _number(score: Any) -> float:
    try:
        return float(score)
    except (TypeError, ValueError):
        return math.nan


def _score_text(score: float) -> str:
    """A probability as a percentage; any other number as itself (300% would claim a probability); NaN as n/a."""
    if math.isnan(score):
        return "n/a"
    return f"{100 * score:.1f}%" if 0.0 <= score <= 1.0 else f"{score:.3g}"


def _fit(text: str, font: Any, width: float) -> str:
    """``text`` if it is no wider than ``width`` when drawn, else its longest start that is, with "..."."""
    if text_width(text, font) <= width:
        return text
    lo, hi = 0, len(text)  # the longest start that fits with the ellipsis lies in [lo, hi)
    while lo < hi - 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if text_width(text[:mid].rstrip() + "...", font) <= width else (lo, mid)
    return text[:lo].rstrip() + "..." if lo or text_width("...", font) <= width else ""
