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
