"""attnzoo.viz.plot_scanpath(s): numbered fixations over the image, one colour per scanpath."""

import numpy as np
import pytest
from PIL import Image

import attnzoo.viz as viz
from attnzoo.errors import InvalidInputError
from attnzoo.viz.scanpath import SCANPATH_COLOURS


def grey(w=200, h=100):
    return Image.new("RGB", (w, h), (128, 128, 128))


def test_fixations_are_drawn_where_they_are_in_their_colour():
    path = np.array([[30.0, 40.0], [150.0, 60.0]])
    out = np.asarray(viz.plot_scanpath(grey(), path))
    assert out.shape == (100, 200, 3)
    for x, y in path.astype(int):
        # inside the circle but off its number: the scanpath's colour (blended with the dimmed photo)
        pixel = out[y + 7, x].astype(int)
        assert np.abs(pixel - np.array(SCANPATH_COLOURS[0])).sum() < 120
    far = out[5, 100].astype(int)  # away from every mark: the photo, dimmed towards white
    assert (far > 128).all() and np.ptp(far) < 3


def test_several_scanpaths_get_a_legend_and_their_own_colours():
    a, b = np.array([[20.0, 20.0], [60.0, 20.0], [60.0, 80.0]]), np.array([[180.0, 80.0]])
    out = viz.plot_scanpaths(grey(), [a, b], labels=["model", "observer"], title="t")
    assert out.size == (200, 122)  # a 22 px band above the image holds the title and legend
    pixel = np.asarray(out)[22 + 80 + 7, 180].astype(int)
    assert np.abs(pixel - np.array(SCANPATH_COLOURS[1])).sum() < 120


def test_large_images_are_scaled_with_their_fixations_and_boxes_outline_the_target():
    big = grey(1600, 800)
    out = viz.plot_scanpaths(
        big,
        [np.array([[800.0, 400.0]])],
        boxes=np.array([[0, 0, 400, 400], [400, 0, 800, 400]]),
        target=1,
        max_side=800,
    )
    assert out.size == (800, 400)
    arr = np.asarray(out).astype(int)
    assert arr[100, 201][1] > arr[100, 201][0] + 40  # the target's box edge is green at half scale (x = 400 / 2)
    assert np.abs(arr[200 + 7, 400] - np.array(SCANPATH_COLOURS[0])).sum() < 120  # the fixation at half scale


def test_bad_shapes_are_refused():
    with pytest.raises(InvalidInputError, match=r"\[T, 2\]"):
        viz.plot_scanpath(grey(), np.zeros((3, 3)))
    with pytest.raises(InvalidInputError, match="durations"):
        viz.plot_scanpath(grey(), np.zeros((3, 2)), durations=[1.0, 2.0])
