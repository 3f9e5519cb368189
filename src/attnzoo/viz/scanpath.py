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
from attnzoo.viz.drawing import NOTE_COLOUR, load_font, text_width, wrap_text

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
    try:
        points = np.asarray(xy, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"a scanpath is a [T, 2] array of (x, y) pixels ({err})") from None
    if points.size == 0:
        return points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise InvalidInputError(f"a scanpath is a [T, 2] array of (x, y) pixels, got shape {points.shape}")
    if not np.isfinite(points).all():
        row = int(np.flatnonzero(~np.isfinite(points).all(axis=1))[0])
        raise InvalidInputError(f"fixation {row + 1} {points[row].tolist()} is not a finite (x, y) pixel")
    return points


def _as_durations(durations: Any, count: int, k: int) -> np.ndarray:
    try:
        seconds = np.asarray(durations, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"scanpath {k}: durations must be numbers ({err})") from None
    if len(seconds) != count:
        raise InvalidInputError(f"scanpath {k}: {len(seconds)} durations for {count} fixations")
    if not (np.isfinite(seconds).all() and (seconds >= 0).all()):
        raise InvalidInputError(f"scanpath {k}: durations must be finite and not negative, got {seconds.tolist()}")
    return seconds


def _scale_to(image_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(x, y) factors from the fixations' ``image_size`` to a picture of ``size``; another shape (beyond
    the rounding of a thumbnail's sides) is not a copy of the image the fixations were made on."""
    width, height = (float(v) for v in image_size)
    if not (width > 0 and height > 0):
        raise InvalidInputError(f"image_size must be a positive (width, height), got {tuple(image_size)}")
    sx, sy = size[0] / width, size[1] / height
    if abs(sx - sy) > 1 / width + 1 / height:
        raise InvalidInputError(
            f"the fixations are on a {width:.0f}x{height:.0f} image: plot them over that image or a copy of "
            f"its shape, not a {size[0]}x{size[1]} one"
        )
    return np.array([sx, sy])


def _as_picture(image: Any) -> Image.Image:
    """A PIL image as given (in RGB); arrays (HxW, HxWxC or CxHxW, uint8 or floats in [0, 1]), tensors
    and paths as :func:`attnzoo.datasets.images.load_image` reads them."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    from attnzoo.datasets.images import array_to_image, load_image

    if (
        isinstance(image, np.ndarray)
        and image.ndim == 3
        and image.shape[-1] not in (1, 3, 4)
        and image.shape[0] in (1, 3, 4)
    ):
        return array_to_image(image, name="the image", channels_first=True)
    return load_image(image)


def _number_runs(numbers: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``: the fixation numbers one place holds, short."""
    parts: list[str] = []
    ordered = sorted(numbers)
    start = prev = ordered[0]
    for n in [*ordered[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}" if prev > start + 1 else f"{start}, {prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def _coinciding(centres: np.ndarray, radii: np.ndarray) -> list[list[int]]:
    """Groups of marks whose numbers would overprint each other (centres closer than 1.3 radii,
    chained), each group in drawing order; a lone mark is a group of one."""
    parent = list(range(len(centres)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if len(centres) > 1:
        gap = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        reach = 1.3 * np.maximum(radii[:, None], radii[None])
        for a, b in zip(*np.nonzero(np.triu(gap < reach, k=1))):
            parent[root(int(a))] = root(int(b))
    groups: dict[int, list[int]] = {}
    for i in range(len(centres)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _text_colour(colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Black on light marks (the yellow), white on the others."""
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return (0, 0, 0, 255) if luminance > 165 else (255, 255, 255, 255)


Box = tuple[float, float, float, float]


def _overlap(a: Box, b: Box) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _place_label(size: tuple[float, float], group: Box, picture: Box, labels: list[Box], marks: list[Box]) -> Box:
    """Where a label of ``size`` goes: touching the ``group`` of marks it names (right, left, above,
    below, then the corners), inside the ``picture``, covering as little of the labels already placed
    (worst) and of other marks as it can."""
    w, h = size
    x0, y0, x1, y1 = group
    cx, cy = (x0 + x1 - w) / 2, (y0 + y1 - h) / 2
    corners = [
        (x1 + 1, cy),
        (x0 - 1 - w, cy),
        (cx, y0 - 1 - h),
        (cx, y1 + 1),
        (x1 + 1, y0 - h / 2),
        (x0 - 1 - w, y0 - h / 2),
        (x1 + 1, y1 - h / 2),
        (x0 - 1 - w, y1 - h / 2),
    ]
    best: tuple[float, int, Box] | None = None
    for order, (x, y) in enumerate(corners):
        # pulled inside the picture (it then may cover its own group: counted like any other mark)
        x = min(max(picture[0], x), picture[2] - w)
        y = min(max(picture[1], y), picture[3] - h)
        box = (x, y, x + w, y + h)
        cost = 10 * sum(_overlap(box, t) for t in labels) + sum(_overlap(box, m) for m in marks)
        if best is None or (cost, order) < best[:2]:
            best = (cost, order, box)
    assert best is not None
    return best[2]


def plot_scanpaths(
    image: Any,
    scanpaths: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    durations: Sequence[Any | None] | None = None,
    boxes: np.ndarray | None = None,
    target: int | None = None,
    title: str | None = None,
    note: str | None = None,
    image_size: tuple[int, int] | None = None,
    max_side: int = 800,
    radius: float = 11.0,
) -> Image.Image:
    """Each scanpath (``[T, 2]`` (x, y) in the image's pixels) as numbered circles joined by
    lines, one colour per scanpath; circle area grows with the fixation duration when given.
    ``image``: a PIL image, an array (HxW, HxWxC or CxHxW) or a tensor; ``image_size``: the ``(width,
    height)`` the fixations and boxes are pixels of, when ``image`` is a copy at another size (a
    thumbnail: they are scaled to it; another shape is refused). Above the picture, wrapped
    to its width: the ``title``, the legend (``labels``) and ``note`` (e.g. "random weights") in red.

    Fixations that (nearly) coincide, a revisited object or the same spot in two scanpaths, would
    print their numbers over each other: they share one label beside them instead, a line per
    scanpath in its colour listing its fixation numbers (``2, 5-7``)."""
    base = _as_picture(image)
    shrink = min(1.0, max_side / max(base.size))
    scale = shrink * (np.ones(2) if image_size is None else _scale_to(image_size, base.size))  # per axis (x, y)
    if shrink < 1.0:
        base = base.resize(
            (max(1, round(base.width * shrink)), max(1, round(base.height * shrink))), Image.Resampling.BICUBIC
        )
    # Dim the photo a little so the marks read on any image.
    canvas = Image.blend(base, Image.new("RGB", base.size, (255, 255, 255)), 0.25).convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = load_font(max(10, round(radius * 1.1)))
    if boxes is not None:
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64) * np.tile(scale, 2)):
            is_target = target is not None and i == target
            draw.rectangle(
                [x0, y0, x1, y1],
                outline=(30, 170, 60, 255) if is_target else (255, 255, 255, 150),
                width=4 if is_target else 1,
            )
    marks: list[tuple[int, int, float, float, float]] = []  # (scanpath, fixation, x, y, radius) in drawing order
    for k, path in enumerate(scanpaths):
        points = _as_points(path) * scale
        dur = None if durations is None or durations[k] is None else _as_durations(durations[k], len(points), k)
        radii = np.full(len(points), radius)
        if dur is not None and len(dur) and dur.max() > 0:
            radii = radius * (0.6 + 0.9 * np.sqrt(dur / dur.max()))
        marks.extend((k, i, float(x), float(y), float(r)) for i, ((x, y), r) in enumerate(zip(points, radii)))
    groups = _coinciding(np.array([m[2:4] for m in marks]).reshape(-1, 2), np.array([m[4] for m in marks]))
    shared = {i for g in groups if len(g) > 1 for i in g}
    start = 0
    for k, path in enumerate(scanpaths):
        colour = SCANPATH_COLOURS[k % len(SCANPATH_COLOURS)]
        count = len(_as_points(path))
        own = marks[start : start + count]
        if count > 1:
            draw.line([(m[2], m[3]) for m in own], fill=(*colour, 200), width=3)
        for j, (_, i, x, y, r) in enumerate(own):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(*colour, 215), outline=(255, 255, 255, 255), width=2)
            if start + j not in shared:
                draw.text((x, y), str(i + 1), fill=_text_colour(colour), font=font, anchor="mm")
        start += count
    picture = (0.0, 0.0, float(canvas.width), float(canvas.height))
    discs = [(x - r, y - r, x + r, y + r) for _, _, x, y, r in marks]
    placed: list[Box] = []
    for group in (g for g in groups if len(g) > 1):
        numbers: dict[int, list[int]] = {}
        for index in group:
            numbers.setdefault(marks[index][0], []).append(marks[index][1] + 1)
        lines = [(k, _number_runs(n)) for k, n in sorted(numbers.items())]
        heights = [draw.textbbox((0, 0), text, font=font)[3] + 4 for _, text in lines]
        width = max(draw.textlength(text, font=font) for _, text in lines) + 8
        bounds = (
            min(discs[i][0] for i in group),
            min(discs[i][1] for i in group),
            max(discs[i][2] for i in group),
            max(discs[i][3] for i in group),
        )
        x, y, *_ = label = _place_label((width, sum(heights)), bounds, picture, placed, discs)
        placed.append(label)
        for (k, text), h in zip(lines, heights):
            colour = SCANPATH_COLOURS[k % len(SCANPATH_COLOURS)]
            draw.rectangle([x, y, x + width, y + h], fill=(*colour, 235), outline=(255, 255, 255, 255))
            draw.text((x + 4, y + h / 2), text, fill=_text_colour(colour), font=font, anchor="lm")
            y += h
    out = Image.alpha_composite(canvas, overlay).convert("RGB")
    return _with_header(out, title, list(labels) if labels else [], note)


_HEADER_LINE = 18  # px per line of the band above the picture


def _with_header(picture: Image.Image, title: str | None, names: list[str], note: str | None) -> Image.Image:
    """The picture under a band holding the title, the legend (one dot and name per scanpath, in a line
    after the title while there is room) and the note in red, all wrapped to the picture's width."""
    if not (title or names or note):
        return picture
    pad, room = 6, picture.width - 12
    title_font, name_font = load_font(14), load_font(13)
    texts: list[tuple[float, int, str, Any, tuple[int, int, int]]] = []  # (x, line, text, font, colour)
    dots: list[tuple[float, int, tuple[int, int, int]]] = []  # (x, line, colour)
    line, x = -1, float(pad)
    for text in wrap_text(title, title_font, room):
        line += 1
        texts.append((pad, line, text, title_font, (0, 0, 0)))
        x = pad + text_width(text, title_font) + 16
    for k, name in enumerate(names):
        colour = SCANPATH_COLOURS[k % len(SCANPATH_COLOURS)]
        parts = wrap_text(name, name_font, room - 14) or [""]
        if line < 0 or x + 14 + text_width(parts[0], name_font) > pad + room:
            line, x = line + 1, float(pad)
        dots.append((x, line, colour))
        for j, part in enumerate(parts):
            line, x = (line + 1, float(pad)) if j else (line, x)
            texts.append((x + 14, line, part, name_font, (0, 0, 0)))
        x += 14 + text_width(parts[-1], name_font) + 14
    for text in wrap_text(note, name_font, room):
        line += 1
        texts.append((pad, line, text, name_font, NOTE_COLOUR))
    header = 4 + _HEADER_LINE * (line + 1)
    framed = Image.new("RGB", (picture.width, picture.height + header), (255, 255, 255))
    framed.paste(picture, (0, header))
    draw = ImageDraw.Draw(framed)
    for x, at, text, font, colour in texts:
        draw.text((x, 4 + _HEADER_LINE * at), text, fill=colour, font=font)
    for x, at, colour in dots:
        draw.ellipse([x, 6 + _HEADER_LINE * at, x + 10, 16 + _HEADER_LINE * at], fill=colour)
    return framed


def plot_scanpath(
    image: Image.Image | np.ndarray, xy: Any, *, durations: Any | None = None, **kwargs: Any
) -> Image.Image:
    """One scanpath over its image (see :func:`plot_scanpaths`)."""
    return plot_scanpaths(image, [xy], durations=None if durations is None else [durations], **kwargs)
