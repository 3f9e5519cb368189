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


def test_the_colour_bar_labels_tell_different_values_apart():
    """Attention 0.50049 and 0.49951 were coloured bright yellow and dark purple (by rank) while the bar
    read "max 0.5 / median 0.5 / min 0.5"."""
    from attnzoo.viz.wsi import bar_labels

    for attention in ([0.50049, 0.49951], [1.0, 1.0 + 1e-12, 1.0 + 3e-12], [0.001, 0.06], [-2e-7, 3e-7], [0.25]):
        values = np.quantile(attention, [1.0, 0.5, 0.0])
        labels = bar_labels(np.array(attention))
        assert [label.split()[0] for label in labels] == ["max", "median", "min"]
        shown = [float(label.split()[1]) for label in labels]
        for i in range(3):
            assert shown[i] == pytest.approx(values[i], rel=5e-3)  # each its value, rounded
            for j in range(3):  # values that differ print differently; equal ones the same
                assert (labels[i].split()[1] == labels[j].split()[1]) == (values[i] == values[j])
    assert bar_labels(np.array([0.001, 0.06])) == ("max 0.06", "median 0.0305", "min 0.001")  # 3 digits do


def test_the_colour_bar_shows_close_values_and_keeps_long_labels_inside():
    coords = np.array([[0, 0], [512, 0]])
    close = np.asarray(plot_attention_heatmap(np.array([0.50049, 0.49951]), coords, 512, size=300)).astype(int)
    tied = np.asarray(plot_attention_heatmap(np.array([0.5, 0.5]), coords, 512, size=300)).astype(int)
    assert close.shape == tied.shape
    labels = slice(300 - 124 + 8 + 14 + 6, 300)  # right of the bar and its ticks
    assert not np.array_equal(close[:, labels], tied[:, labels])  # "max 0.5005" is not "max 0.5"
    long = plot_attention_heatmap(np.array([1.0, 1.0 + 1e-12, 1.0 + 3e-12]), np.zeros((3, 2)), 512, size=300)
    ink = np.asarray(long).astype(int).sum(-1) < 500
    assert long.width == 300 and not ink[:, -3:].any()  # a wider bar panel: the labels are whole
