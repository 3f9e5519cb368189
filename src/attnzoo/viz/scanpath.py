"""Scanpaths drawn over their image: numbered fixations joined in viewing order (numpy + PIL).

Several scanpaths (a model's and the observers', say) share one picture in different colours;
search displays get their object boxes, the target's in green.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from attnzoo.errors import InvalidInputError
from attnzoo.viz.classification import load_font

__all__ = ["SCANPATH_COLOURS", "plot_scanpath", "plot_scanpaths"]

SCANPATH_COLOURS = [
    (230, 57, 70),
    (29, 120, 216),
    (255, 183, 3),
    (42, 157, 143),
    (131, 56, 236),
    (251, 86, 7),
    (58, 134, 255),
]


def _as_points(xy: Any) -> np.ndarray:
    points = np.asarray(xy, dtype=np.float64)
    if points.size == 0:
        return points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise InvalidInputError(f"a scanpath is a [T, 2] array of (x, y) pixels, got shape {points.shape}")
    return points


def plot_scanpaths(
    image: Image.Image | np.ndarray,
    scanpaths: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    durations: Sequence[Any | None] | None = None,
    boxes: np.ndarray | None = None,
    target: int | None = None,
    title: str | None = None,
    max_side: int = 800,
    radius: float = 11.0,
) -> Image.Image:
    """Each scanpath (``[T, 2]`` (x, y) in the image's pixels) as numbered circles joined by
    lines, one colour per scanpath; circle area grows with the fixation duration when given."""
    base = Image.fromarray(np.asarray(image)) if isinstance(image, np.ndarray) else image
    base = base.convert("RGB")
    scale = min(1.0, max_side / max(base.size))
    if scale < 1.0:
        base = base.resize(
            (max(1, round(base.width * scale)), max(1, round(base.height * scale))), Image.Resampling.BICUBIC
        )
    # Dim the photo a little so the marks read on any image.
    canvas = Image.blend(base, Image.new("RGB", base.size, (255, 255, 255)), 0.25).convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = load_font(max(10, round(radius * 1.1)))
    if boxes is not None:
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64) * scale):
            is_target = target is not None and i == target
            draw.rectangle(
                [x0, y0, x1, y1],
                outline=(30, 170, 60, 255) if is_target else (255, 255, 255, 150),
                width=4 if is_target else 1,
            )
    for k, path in enumerate(scanpaths):
        points = _as_points(path) * scale
        colour = SCANPATH_COLOURS[k % len(SCANPATH_COLOURS)]
        dur = (
            None
            if durations is None or durations[k] is None
            else np.asarray(durations[k], dtype=np.float64).reshape(-1)
        )
        if dur is not None and len(dur) != len(points):
            raise InvalidInputError(f"scanpath {k}: {len(dur)} durations for {len(points)} fixations")
        if len(points) > 1:
            draw.line([tuple(p) for p in points], fill=(*colour, 200), width=3)
        radii = np.full(len(points), radius)
        if dur is not None and len(dur) and dur.max() > 0:
            radii = radius * (0.6 + 0.9 * np.sqrt(dur / dur.max()))
        for i, ((x, y), r) in enumerate(zip(points, radii)):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(*colour, 215), outline=(255, 255, 255, 255), width=2)
            draw.text((x, y), str(i + 1), fill=(255, 255, 255, 255), font=font, anchor="mm")
    out = Image.alpha_composite(canvas, overlay).convert("RGB")
    names = list(labels) if labels else []
    if title or names:
        header = 22
        framed = Image.new("RGB", (out.width, out.height + header), (255, 255, 255))
        framed.paste(out, (0, header))
        d = ImageDraw.Draw(framed)
        x = 6
        if title:
            d.text((x, 4), title, fill=(0, 0, 0), font=load_font(14))
            x += int(d.textlength(title, font=load_font(14))) + 16
        for k, name in enumerate(names):
            colour = SCANPATH_COLOURS[k % len(SCANPATH_COLOURS)]
            d.ellipse([x, 6, x + 10, 16], fill=colour)
            d.text((x + 14, 4), name, fill=(0, 0, 0), font=load_font(13))
            x += 14 + int(d.textlength(name, font=load_font(13))) + 14
        out = framed
    return out


def plot_scanpath(
    image: Image.Image | np.ndarray, xy: Any, *, durations: Any | None = None, **kwargs: Any
) -> Image.Image:
    """One scanpath over its image (see :func:`plot_scanpaths`)."""
    return plot_scanpaths(image, [xy], durations=None if durations is None else [durations], **kwargs)
