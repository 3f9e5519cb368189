"""Voxel grids as pictures: an isometric, shaded render of the occupied cubes (numpy + PIL only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from attnzoo.viz.drawing import NOTE_COLOUR, load_font, resize_picture, wrap_text

__all__ = ["plot_reconstruction", "render_voxels"]

_TITLE_LINE = 17  # px per line of the title (and the note)
_MAX_VIEWS = 8  # views drawn as thumbnails; the rest are counted
_COS, _SIN = math.cos(math.pi / 6), math.sin(math.pi / 6)
# the three faces seen from (+x, +y, +z): (neighbour offset, corner offsets, shade)
_FACES = (
    ((0, 1, 0), ((0, 1, 0), (1, 1, 0), (1, 1, 1), (0, 1, 1)), 1.0),  # top (+y, the up axis)
    ((1, 0, 0), ((1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1)), 0.78),  # +x
    ((0, 0, 1), ((0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)), 0.6),  # +z
)


def render_voxels(
    grid: np.ndarray,
    size: int = 320,
    colour: Sequence[int] = (70, 130, 200),
    background: Sequence[int] = (255, 255, 255),
) -> Image.Image:
    """Isometric render of a boolean ``[X, Y, Z]`` grid (axis 1 up, as ShapeNet's voxels after
    binvox's ``fix_coords``). Only faces between an occupied and an empty cell are drawn,
    far to near, so a 32^3 grid renders in a few tens of milliseconds."""
    occ = np.asarray(grid).astype(bool)
    if occ.ndim != 3:
        raise ValueError(f"render_voxels needs a 3-D grid, got shape {occ.shape}")
    image = Image.new("RGB", (size, size), tuple(background))
    if not occ.any():
        ImageDraw.Draw(image).text((size // 2 - 30, size // 2 - 6), "(empty)", fill=(120, 120, 120))
        return image
    X, Y, Z = occ.shape
    padded = np.pad(occ, 1)
    extent = max(X, Y, Z)
    scale = size / (extent * 2.1)
    ox = oy = size / 2  # project() takes the grid's centre to the origin: its image is centred on the picture

    def project(p: np.ndarray) -> np.ndarray:
        x, y, z = p[..., 0] - X / 2, p[..., 1] - Y / 2, p[..., 2] - Z / 2
        return np.stack([ox + (x - z) * _COS * scale, oy + ((x + z) * _SIN - y) * scale], axis=-1)

    draw = ImageDraw.Draw(image)
    cells = np.argwhere(occ)
    cells = cells[np.argsort(cells.sum(1), kind="stable")]  # painter's order: far (small x+y+z) first
    faces = []
    for normal, corners, shade in _FACES:
        visible = ~padded[cells[:, 0] + 1 + normal[0], cells[:, 1] + 1 + normal[1], cells[:, 2] + 1 + normal[2]]
        which = cells[visible]
        polys = project(which[:, None, :] + np.array(corners)[None])
        fill = tuple(int(c * shade) for c in colour)
        faces += [(int(c.sum()), fill, poly) for c, poly in zip(which, polys, strict=True)]
    edge = tuple(int(c * 0.45) for c in colour)
    for _, fill, poly in sorted(faces, key=lambda f: f[0]):  # stable: a cell's faces keep their order
        draw.polygon([tuple(pt) for pt in poly], fill=fill, outline=edge)
    return image


def plot_reconstruction(
    views: Sequence[Image.Image] | None, grid: np.ndarray, title: str = "", size: int = 320, note: str = ""
) -> Image.Image:
    """The input views (thumbnails, left: the first 8, with "+N more" under them) next to the reconstructed
    voxels (right), under the title and ``note`` (e.g. "random weights: ...", in red), both wrapped to the
    picture's width. Each view keeps its aspect ratio in its square cell."""
    render = render_voxels(grid, size=size)
    views = list(views or [])
    shown = views[:_MAX_VIEWS]
    hidden = len(views) - len(shown)
    thumb = size // 4 if shown else 0
    cols = 2 if len(shown) > 4 else 1
    width = size + thumb * cols
    font = load_font(13)
    lines = [(line, (0, 0, 0)) for line in wrap_text(title, font, width - 8)]
    lines += [(line, NOTE_COLOUR) for line in wrap_text(note, font, width - 8)]
    top = 4 + _TITLE_LINE * len(lines) if lines else 0
    foot = _TITLE_LINE + 2 if hidden else 0
    canvas = Image.new("RGB", (width, top + size + foot), (255, 255, 255))
    for i, view in enumerate(shown):
        im = view.convert("RGBA")
        flat = Image.new("RGB", im.size, (240, 240, 240))
        flat.paste(im, mask=im.getchannel("A"))
        scale = thumb / max(flat.size)
        w, h = max(1, round(flat.width * scale)), max(1, round(flat.height * scale))
        x, y = (i // 4) * thumb + (thumb - w) // 2, top + (i % 4) * thumb + (thumb - h) // 2
        canvas.paste(resize_picture(flat, (w, h)), (x, y))
    canvas.paste(render, (thumb * cols, top))
    draw = ImageDraw.Draw(canvas)
    for i, (line, colour) in enumerate(lines):
        draw.text((4, 3 + _TITLE_LINE * i), line, fill=colour, font=font)
    if hidden:
        draw.text((4, top + size + 1), f"+{hidden} more", fill=(80, 80, 80), font=font)
    return canvas
