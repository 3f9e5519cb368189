"""What the pictures share: text wrapped to a width without clipping, small images magnified pixel by pixel."""

import numpy as np
from PIL import Image

from attnzoo.viz.drawing import load_font, resize_picture, text_width, wrap_text


def test_text_is_wrapped_to_the_width_and_nothing_is_lost():
    font = load_font(16)
    text = "vit_large_patch14_clip_336.openai_ft_in12k_in1k (random weights) on a long title line"
    for width in (60, 150, 396):
        lines = wrap_text(text, font, width)
        assert all(text_width(line, font) <= width for line in lines)  # a long name is split, not clipped
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert wrap_text("a b", font, 1000) == ["a b"] and wrap_text(None, font, 100) == wrap_text("", font, 100) == []
    assert wrap_text("first\nsecond", font, 1000) == ["first", "second"]


def checkerboard(side: int) -> Image.Image:
    cells = (np.indices((side, side)).sum(0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(cells).convert("RGB")


def test_small_pictures_are_magnified_pixel_by_pixel_and_large_ones_smoothly():
    big = resize_picture(checkerboard(8), (64, 64))  # x8: each pixel an 8x8 block, no blur between them
    assert set(np.unique(np.asarray(big))) == {0, 255}
    np.testing.assert_array_equal(np.asarray(big)[::8, ::8], np.asarray(checkerboard(8)))
    slight = resize_picture(checkerboard(8), (12, 12))  # x1.5: smoothed as before
    assert len(np.unique(np.asarray(slight))) > 2
    small = np.asarray(resize_picture(checkerboard(64), (16, 16)))  # shrunk: filtered (grey), not sampled
    assert (np.abs(small.astype(int) - 128) <= 1).all()
