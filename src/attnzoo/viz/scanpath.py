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
from attnzoo.viz.drawing import NOTE_COLOUR, load_font, resize_picture, text_width, wrap_text

__all__ = ["SCANPATH_COLOURS", "SCANPATH_STYLES", "plot_scanpath", "plot_scanpaths", "scanpath_style"]

#: One colour per scanpath (16: a model and MIT1003's 15 observers), saturated so they read on a photo,
#: each far from the next in the list (red, blue, amber, teal, purple, green, orange, navy, ...).
SCANPATH_COLOURS = [
    (230, 57, 70),
    (29, 120, 216),
    (255, 183, 3),
    (42, 157, 143),
    (131, 56, 236),
    (60, 180, 75),
    (245, 130, 48),
    (0, 0, 117),
    (240, 50, 230),
    (191, 239, 69),
    (154, 99, 36),
    (66, 212, 244),
    (128, 0, 0),
    (227, 119, 194),
    (128, 128, 0),
    (20, 20, 20),
]

#: Scanpaths past the colours' count (the 17th on) repeat them in another style: (mark shape, line
#: dashes as (on, off) px or None for a solid line), one style per round of the colours.
SCANPATH_STYLES: list[tuple[str, tuple[int, int] | None]] = [("circle", None), ("square", (10, 5)), ("diamond", (4, 4))]

#: The target's box (visual search) and the dotted lines to fixations outside the image.
TARGET_COLOUR = (30, 170, 60)
_OFF_IMAGE_DASHES = (2, 5)
_KEY_COLOUR = (70, 70, 70)  # the line saying how many fixations lie outside the image


def scanpath_style(k: int) -> tuple[tuple[int, int, int], str, tuple[int, int] | None]:
    """The ``k``-th scanpath's (0-based) colour, mark shape and line dashes: no two of the first
    ``len(SCANPATH_COLOURS) * len(SCANPATH_STYLES)`` scanpaths look alike."""
    n = len(SCANPATH_COLOURS)
    shape, dashes = SCANPATH_STYLES[(k // n) % len(SCANPATH_STYLES)]
    return SCANPATH_COLOURS[k % n], shape, dashes


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


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], fill: Any, width: int, dashes: Any) -> None:
    """A polyline through ``points``: solid (as one ``draw.line``) when ``dashes`` is None, else in
    ``(on, off)`` px dashes, restarted at every point."""
    if dashes is None:
        draw.line(points, fill=fill, width=width)
        return
    on, off = dashes
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = float(np.hypot(x1 - x0, y1 - y0))
        if length == 0:
            continue
        dx, dy = (x1 - x0) / length, (y1 - y0) / length
        at = 0.0
        while at < length:
            end = min(at + on, length)
            draw.line([(x0 + dx * at, y0 + dy * at), (x0 + dx * end, y0 + dy * end)], fill=fill, width=width)
            at = end + off


def _mark(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: Any, outline: Any, width: int
) -> None:
    """A fixation's mark of ``shape`` (circle, square, diamond) and radius ``r`` centred on (x, y)."""
    if shape == "square":
        s = 0.9 * r
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill, outline=outline, width=width)
    elif shape == "diamond":
        s = 1.2 * r
        draw.polygon([(x, y - s), (x + s, y), (x, y + s), (x - s, y)], fill=fill, outline=outline, width=width)
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline, width=width)


def outside_note(outside: int, total: int) -> str | None:
    """The picture's line for the fixations that lie outside the image (None when none do)."""
    if not outside:
        return None
    verb = "lies" if outside == 1 else "lie"
    return f"{outside} of {total} fixations {verb} outside the image: hollow marks at its edge"


def plot_scanpaths(
    image: Any,
    scanpaths: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    durations: Sequence[Any | None] | None = None,
    boxes: np.ndarray | None = None,
    target: int | None = None,
    target_label: str | None = None,
    title: str | None = None,
    note: str | None = None,
    image_size: tuple[int, int] | None = None,
    max_side: int = 800,
    min_side: int = 160,
    radius: float = 11.0,
) -> Image.Image:
    """Each scanpath (``[T, 2]`` (x, y) in the image's pixels) as numbered marks joined by lines, one
    colour per scanpath (past the 16 colours, the 17th scanpath on repeats them with square marks and
    dashed lines, the 33rd with diamonds and dotted ones); the mark's area grows with the fixation
    duration when given. ``image``: a PIL image, an array (HxW, HxWxC or CxHxW) or a tensor;
    ``image_size``: the ``(width, height)`` the fixations and boxes are pixels of, when ``image`` is a copy
    at another size (a thumbnail: they are scaled to it; another shape is refused). An image whose long
    side exceeds ``max_side`` is shrunk to it; one under half ``min_side`` is enlarged by the largest
    whole factor that keeps it within ``min_side`` (its pixels shown as blocks). Above the picture,
    wrapped at spaces to its width (at least 150 px: a narrow picture gets white margins): the
    ``title``, the legend (``labels``; the target's green box, as ``target_label``, when ``boxes`` and
    ``target`` are given) and ``note`` (e.g. "random weights") in red.

    Fixations outside the image are drawn hollow at its edge, joined by dotted lines, and a line above
    the picture says how many there are. Fixations that (nearly) coincide, a revisited object or the
    same spot in two scanpaths, would print their numbers over each other: they share one label
    beside them instead, a line per scanpath in its colour listing its fixation numbers (``2, 5-7``)."""
    base = _as_picture(image)
    long_side = max(base.size)
    if long_side > max_side:
        factor = max_side / long_side
    else:
        factor = float(max(1, int(min(min_side, max_side)) // long_side))
    scale = factor * (np.ones(2) if image_size is None else _scale_to(image_size, base.size))  # per axis (x, y)
    bounds = np.asarray(base.size if image_size is None else image_size, dtype=np.float64)  # the fixations' image
    if factor < 1.0:
        base = base.resize(
            (max(1, round(base.width * factor)), max(1, round(base.height * factor))), Image.Resampling.BICUBIC
        )
    elif factor > 1.0:
        base = resize_picture(base, (round(base.width * factor), round(base.height * factor)))
    # Dim the photo a little so the marks read on any image.
    canvas = Image.blend(base, Image.new("RGB", base.size, (255, 255, 255)), 0.25).convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = load_font(max(10, round(radius * 1.1)))
    # the legend names the green box only when one is drawn (a target index among the boxes)
    has_target = boxes is not None and target is not None and 0 <= int(target) < len(boxes)
    if boxes is not None:
        scaled = np.asarray(boxes, dtype=np.float64) * np.tile(scale, 2)
        for i, (x0, y0, x1, y1) in enumerate(scaled):
            if not (has_target and i == target):  # a dark edge under a light one: seen on bright and dark shelves
                draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0, 150), width=3)
                draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 255, 220), width=1)
        if has_target:
            draw.rectangle(scaled[int(target)].tolist(), outline=(*TARGET_COLOUR, 255), width=4)
    # (scanpath, fixation, x, y, radius, outside) in drawing order; marks outside the image sit at its edge
    marks: list[tuple[int, int, float, float, float, bool]] = []
    for k, path in enumerate(scanpaths):
        raw = _as_points(path)
        dur = None if durations is None or durations[k] is None else _as_durations(durations[k], len(raw), k)
        radii = np.full(len(raw), radius)
        if dur is not None and len(dur) and dur.max() > 0:
            radii = radius * (0.6 + 0.9 * np.sqrt(dur / dur.max()))
        outside = np.asarray(((raw < 0) | (raw > bounds)).any(axis=1), dtype=bool).reshape(-1)
        for i, ((x, y), r, off) in enumerate(zip(raw * scale, radii, outside)):
            if off:
                x = min(max(x, r), canvas.width - r) if canvas.width > 2 * r else canvas.width / 2
                y = min(max(y, r), canvas.height - r) if canvas.height > 2 * r else canvas.height / 2
            marks.append((k, i, float(x), float(y), float(r), bool(off)))
    groups = _coinciding(np.array([m[2:4] for m in marks]).reshape(-1, 2), np.array([m[4] for m in marks]))
    shared = {i for g in groups if len(g) > 1 for i in g}
    start = 0
    for k, path in enumerate(scanpaths):
        colour, shape, dashes = scanpath_style(k)
        count = len(_as_points(path))
        own = marks[start : start + count]
        run: list[tuple[float, float]] = []  # consecutive fixations inside the image: one line
        for j, m in enumerate(own):
            if not m[5]:
                run.append((m[2], m[3]))
            if m[5] or j == count - 1:
                if len(run) > 1:
                    _dashed(draw, run, (*colour, 200), 3, dashes)
                run = [] if m[5] else run
        for a, b in zip(own, own[1:]):
            if a[5] or b[5]:
                _dashed(draw, [(a[2], a[3]), (b[2], b[3])], (*colour, 200), 2, _OFF_IMAGE_DASHES)
        for j, (_, i, x, y, r, off) in enumerate(own):
            if off:
                _mark(draw, shape, x, y, r, (255, 255, 255, 190), (*colour, 255), 3)
            else:
                _mark(draw, shape, x, y, r, (*colour, 215), (255, 255, 255, 255), 2)
            if start + j not in shared:
                ink = (0, 0, 0, 255) if off else _text_colour(colour)
                draw.text((x, y), str(i + 1), fill=ink, font=font, anchor="mm")
        start += count
    picture = (0.0, 0.0, float(canvas.width), float(canvas.height))
    discs = [(x - r, y - r, x + r, y + r) for _, _, x, y, r, _ in marks]
    placed: list[Box] = []
    for group in (g for g in groups if len(g) > 1):
        numbers: dict[int, list[int]] = {}
        for index in group:
            numbers.setdefault(marks[index][0], []).append(marks[index][1] + 1)
        lines = [(k, _number_runs(n)) for k, n in sorted(numbers.items())]
        heights = [draw.textbbox((0, 0), text, font=font)[3] + 4 for _, text in lines]
        width = max(draw.textlength(text, font=font) for _, text in lines) + 8
        around = (
            min(discs[i][0] for i in group),
            min(discs[i][1] for i in group),
            max(discs[i][2] for i in group),
            max(discs[i][3] for i in group),
        )
        x, y, *_ = label = _place_label((width, sum(heights)), around, picture, placed, discs)
        placed.append(label)
        for (k, text), h in zip(lines, heights):
            colour = scanpath_style(k)[0]
            draw.rectangle([x, y, x + width, y + h], fill=(*colour, 235), outline=(255, 255, 255, 255))
            draw.text((x + 4, y + h / 2), text, fill=_text_colour(colour), font=font, anchor="lm")
            y += h
    out = Image.alpha_composite(canvas, overlay).convert("RGB")
    entries = [(name, *scanpath_style(k)[:2]) for k, name in enumerate(labels or [])]
    if has_target:
        entries.append((target_label or "target (green box)", TARGET_COLOUR, "box"))
    notes = [(outside_note(sum(m[5] for m in marks), len(marks)), _KEY_COLOUR), (note, NOTE_COLOUR)]
    return _with_header(out, title, entries, [(text, colour) for text, colour in notes if text])


_HEADER_LINE = 18  # px per line of the band above the picture
#: The band above a narrower picture is this wide (about 20 characters a line), the picture centred under it.
HEADER_MIN_WIDTH = 150

Entry = tuple[str, tuple[int, int, int], str]  # a legend entry: (name, colour, swatch: a mark's shape or "box")


def header_layout(
    width: int, title: str | None, entries: Sequence[Entry], notes: Sequence[tuple[str, tuple[int, int, int]]]
) -> tuple[int, list[tuple[float, int, str, str, tuple[int, int, int]]], list[tuple[float, int, Entry]]]:
    """Where the band above a picture ``width`` px wide puts its texts: its width (the picture's, or up to
    :data:`HEADER_MIN_WIDTH` when the texts need it), the texts as (x, line, text, "title"/"name"/"note",
    colour) and the legend's swatches as (x, line, entry). The title wraps first, the legend's entries
    follow it on its last line while there is room, each note starts a line of its own."""
    title_font, name_font = load_font(14), load_font(13)
    pad = 6
    natural = max(
        [text_width(t, title_font) for t in (title or "").splitlines()]
        + [sum(28 + text_width(name, name_font) for name, *_ in entries) - 14]
        + [text_width(t, name_font) for text, _ in notes for t in text.splitlines()]
    )
    band = max(width, min(HEADER_MIN_WIDTH, round(natural) + 2 * pad))
    room = band - 2 * pad
    texts: list[tuple[float, int, str, str, tuple[int, int, int]]] = []
    swatches: list[tuple[float, int, Entry]] = []
    line, x = -1, float(pad)
    for text in wrap_text(title, title_font, room):
        line += 1
        texts.append((pad, line, text, "title", (0, 0, 0)))
        x = pad + text_width(text, title_font) + 16
    for entry in entries:
        parts = wrap_text(entry[0], name_font, room - 14) or [""]
        if line < 0 or x + 14 + text_width(parts[0], name_font) > pad + room:
            line, x = line + 1, float(pad)
        swatches.append((x, line, entry))
        for j, part in enumerate(parts):
            line, x = (line + 1, float(pad)) if j else (line, x)
            texts.append((x + 14, line, part, "name", (0, 0, 0)))
        x += 14 + text_width(parts[-1], name_font) + 14
    for note, colour in notes:
        for text in wrap_text(note, name_font, room):
            line += 1
            texts.append((pad, line, text, "note", colour))
    return band, texts, swatches


def _with_header(
    picture: Image.Image,
    title: str | None,
    entries: Sequence[Entry],
    notes: Sequence[tuple[str, tuple[int, int, int]]],
) -> Image.Image:
    """The picture under a band holding the title, the legend (a swatch and name per entry) and the
    notes (one colour each), laid out by :func:`header_layout`."""
    if not (title or entries or notes):
        return picture
    band, texts, swatches = header_layout(picture.width, title, entries, notes)
    lines = 1 + max([at for _, at, *_ in texts] + [at for _, at, _ in swatches])
    header = 4 + _HEADER_LINE * lines
    framed = Image.new("RGB", (band, picture.height + header), (255, 255, 255))
    framed.paste(picture, ((band - picture.width) // 2, header))
    draw = ImageDraw.Draw(framed)
    fonts = {"title": load_font(14), "name": load_font(13), "note": load_font(13)}
    for x, at, text, kind, colour in texts:
        draw.text((x, 4 + _HEADER_LINE * at), text, fill=colour, font=fonts[kind])
    for x, at, (_, colour, shape) in swatches:
        top = 6 + _HEADER_LINE * at
        if shape == "box":
            draw.rectangle([x, top, x + 10, top + 10], outline=colour, width=2)
        else:
            _mark(draw, shape, x + 5, top + 5, 5, colour, None, 1)
    return framed


def plot_scanpath(
    image: Image.Image | np.ndarray, xy: Any, *, durations: Any | None = None, **kwargs: Any
) -> Image.Image:
    """One scanpath over its image (see :func:`plot_scanpaths`)."""
    return plot_scanpaths(image, [xy], durations=None if durations is None else [durations], **kwargs)
