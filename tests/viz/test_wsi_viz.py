"""The WSI attention heatmap: a sequential colormap, a colour bar, ranks with ties, a title and a red note."""

import numpy as np
import pytest
from PIL import Image

from attnzoo.errors import InvalidInputError
from attnzoo.viz.wsi import attention_colours, attention_ranks, plot_attention_heatmap


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(float) @ np.array([0.2126, 0.7152, 0.0722])


def test_the_colormap_is_sequential():
    """Lightness rises monotonically with the value (viridis), unlike the rainbow it replaced."""
    ramp = attention_colours(np.linspace(0, 1, 256))
    assert np.all(np.diff(_luminance(ramp)) > -0.5)  # rounding to uint8 only
    assert _luminance(ramp[-1]) - _luminance(ramp[0]) > 150
    assert tuple(ramp[0]) == (68, 1, 84) and tuple(ramp[-1]) == (253, 231, 37)
    assert tuple(attention_colours(np.array([np.nan, -1.0, 2.0]))[1]) == (68, 1, 84)


def test_ranks_share_ties():
    np.testing.assert_allclose(attention_ranks(np.array([0.1, 0.3, 0.3, 0.2])), [0, 5 / 6, 5 / 6, 1 / 3])
    np.testing.assert_allclose(attention_ranks(np.full(5, 0.2)), 0.5)  # uniform attention: one colour
    assert attention_ranks(np.array([1.0])).tolist() == [0.5]


def test_picture_has_heatmap_colour_bar_title_and_note():
    coords = np.array([[x, y] for y in range(0, 1024, 256) for x in range(0, 2048, 256)])
    attention = np.linspace(0.001, 0.06, len(coords))
    thumbnail = Image.new("RGB", (200, 100), (230, 180, 210))
    picture = plot_attention_heatmap(
        attention,
        coords,
        256,
        thumbnail=thumbnail,
        dimensions=(2048, 1024),
        size=600,
        title="tumour (91.0%)",
        note="random weights",
    )
    pixels = np.asarray(picture).astype(int)
    assert picture.width == 600
    # the colour bar: a column right of the heatmap running from the ramp's top colour down to its bottom one
    column = pixels[:, 600 - 124 + 8 + 7]
    yellow = np.where(np.abs(column - (253, 231, 37)).sum(-1) < 30)[0]
    purple = np.where(np.abs(column - (68, 1, 84)).sum(-1) < 30)[0]
    assert len(yellow) and len(purple) and yellow.max() < purple.min() and purple.max() - yellow.min() > 100
    # the note in red, in the band above the heatmap; the title in black there too
    band = pixels[:40]
    assert (np.abs(band - (170, 20, 20)).sum(-1) < 60).sum() > 20
    assert (band.sum(-1) < 100).sum() > 20
    # the highest-attention patch is the lightest square, the lowest the darkest
    head = picture.height - 8 - 238  # the heatmap's top: it is 476 x 238 px, above an 8 px margin
    top_left = pixels[head + 5, 5]
    bottom_right = pixels[head + 238 - 5, 476 - 5]
    assert _luminance(bottom_right) > _luminance(top_left) + 50


def test_without_thumbnail_the_canvas_spans_the_patches():
    picture = plot_attention_heatmap(np.array([0.5, 0.5]), np.array([[0, 0], [512, 0]]), 512, size=300)
    assert picture.width == 300 and picture.height > 150


@pytest.mark.parametrize(
    ("attention", "coords", "size"),
    [
        (np.ones(3), np.zeros((2, 2)), 300),
        (np.ones(2), np.zeros((2, 3)), 300),
        (np.array([np.nan, 1.0]), np.zeros((2, 2)), 300),
        (np.ones(2), np.array([[0, 0], [np.inf, 0]]), 300),
        (np.ones(2), np.zeros((2, 2)), 20),
        (np.ones(2), np.zeros((2, 2)), 300.5),
    ],
)
def test_bad_input_is_a_typed_error(attention, coords, size):
    with pytest.raises(InvalidInputError):
        plot_attention_heatmap(attention, coords, 256, size=size)


def test_a_thumbnail_without_the_slides_size_is_refused():
    """Without dimensions= the thumbnail of the whole slide would be stretched over the patches' extent."""
    thumbnail = Image.new("RGB", (100, 50), (230, 180, 210))
    with pytest.raises(InvalidInputError, match=r"dimensions="):
        plot_attention_heatmap(np.ones(2), np.array([[3000, 1000], [3500, 1000]]), 500, thumbnail=thumbnail)
    picture = plot_attention_heatmap(
        np.ones(2), np.array([[3000, 1000], [3500, 1000]]), 500, thumbnail=thumbnail, dimensions=(10000, 5000)
    )
    assert picture.width == 1024


def test_a_long_title_and_note_are_wrapped_whole():
    picture = plot_attention_heatmap(
        np.ones(2),
        np.array([[0, 0], [512, 0]]),
        512,
        size=300,
        title="a_very_long_slide_name_without_any_space_in_it_at_all.svs: tumour (91.0%), 2 patches",
        note="random weights: the class and the attention are meaningless",
    )
    ink = np.asarray(picture).astype(int).sum(-1) < 500
    assert not ink[:, -3:].any()  # nothing runs off the right edge
