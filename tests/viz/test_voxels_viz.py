"""render_voxels / plot_reconstruction: the occupied cubes centred on the picture, whatever the grid's shape."""

import numpy as np
import pytest

from attnzoo.viz import plot_reconstruction, render_voxels


@pytest.mark.parametrize("shape", [(8, 8, 8), (1, 40, 1), (40, 1, 40), (30, 10, 4), (2, 2, 30)])
def test_the_render_is_centred(shape):
    picture = np.asarray(render_voxels(np.ones(shape, bool), size=200)).astype(int)
    ink = np.argwhere((picture < 250).any(-1))
    (top, left), (bottom, right) = ink.min(0), ink.max(0)
    assert abs((top + bottom) / 2 - 100) <= 2 and abs((left + right) / 2 - 100) <= 2
    assert top > 0 and left > 0 and bottom < 199 and right < 199  # and whole


def test_a_long_title_is_wrapped_to_the_picture():
    title = "3 views -> 23073 occupied voxels of 32x32x32 (threshold 0.3) (random weights: the shape is meaningless)"
    picture = plot_reconstruction([], np.ones((4, 4, 4), bool), title=title, size=200)
    ink = (np.asarray(picture).astype(int).sum(-1) < 200)[: picture.height - 200]
    assert picture.height > 200 + 18 and np.flatnonzero(ink.any(0)).max() < picture.width - 2


# -- views, the title's font and the note (the picture hunt's findings) ------------------------------------

RED = np.array([170, 20, 20])


def test_a_view_keeps_its_aspect_in_its_cell():
    from PIL import Image

    for w, h in ((200, 50), (50, 200), (137, 137)):
        picture = plot_reconstruction([Image.new("RGB", (w, h), (200, 30, 30))], np.ones((2, 2, 2), bool), size=200)
        red = np.argwhere(np.abs(np.asarray(picture).astype(int) - [200, 30, 30]).sum(-1) < 10)
        (top, left), (bottom, right) = red.min(0), red.max(0)
        shown_w, shown_h = right - left + 1, bottom - top + 1
        assert max(shown_w, shown_h) == 50  # a 200 px picture's cells are 50 px square
        assert abs(shown_w * h - shown_h * w) <= max(w, h)  # the aspect kept, to a pixel
        assert left < 50 and right < 50  # in the views' column, left of the render


def test_views_past_eight_are_counted_under_the_thumbnails():
    from PIL import Image

    from attnzoo.viz.drawing import load_font, text_width

    grid = np.ones((2, 2, 2), bool)
    view = Image.new("RGB", (40, 40), (200, 30, 30))
    eight = plot_reconstruction([view] * 8, grid, size=200)
    assert eight.height == 200  # no title, nothing more to say
    for n in (9, 20):
        picture = plot_reconstruction([view] * n, grid, size=200)
        assert picture.height > 200 and picture.width == eight.width
        cells = np.abs(np.asarray(picture).astype(int)[:200] - [200, 30, 30]).sum(-1) < 10
        assert cells.sum() == (np.abs(np.asarray(eight).astype(int) - [200, 30, 30]).sum(-1) < 10).sum()  # 8 shown
        below = (np.asarray(picture).astype(int)[200:] < 250).any(-1)
        columns = np.flatnonzero(below.any(0))
        assert abs(columns.max() - columns.min() + 1 - text_width(f"+{n - 8} more", load_font(13))) <= 3


def widest_gap(picture, rows: int) -> int:
    """The widest run of blank columns between the first and last ink of the title's band."""
    ink = (np.asarray(picture).astype(int).sum(-1) < 600)[:rows].any(0)
    columns = np.flatnonzero(ink)
    return int((np.diff(columns) - 1).max())


def test_the_space_in_a_title_shows():
    together = plot_reconstruction([], np.ones((2, 2, 2), bool), title="voxelsof", size=200)
    apart = plot_reconstruction([], np.ones((2, 2, 2), bool), title="voxels of", size=200)
    rows = apart.height - 200
    assert widest_gap(apart, rows) >= widest_gap(together, rows) + 2  # the space wider than any letter's gap


def test_random_weights_are_a_red_note_and_one_view_is_one_view():
    from PIL import Image

    from attnzoo.pipelines.multiview_reconstruction import Occupancy

    probabilities = np.zeros((4, 4, 4), np.float32)
    probabilities[1:3, 1:3, 1:3] = 0.9
    view = Image.new("RGB", (40, 40), (200, 30, 30))
    shape = Occupancy(probabilities, views=[view], weights="random (seed 0)")

    def red(picture):
        band = np.asarray(picture).astype(int)[: picture.height - 320]
        return int((np.abs(band - RED).sum(-1) < 90).sum())

    assert red(shape.plot()) > 20 and red(shape.plot(title="mine")) > 20  # a title keeps the note
    assert red(shape.plot(note="")) == 0 and red(Occupancy(probabilities, views=[view]).plot()) == 0
    title = "1 view -> 8 occupied voxels of 4x4x4 (threshold 0.3)"
    expected = plot_reconstruction([view], shape.voxels, title=title, note="random weights: the shape is meaningless")
    assert np.array_equal(np.asarray(shape.plot()), np.asarray(expected))
