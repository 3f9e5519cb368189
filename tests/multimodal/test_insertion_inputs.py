"""Subject insertion's inputs read the same whatever their form: a mask saved as opaque RGBA, a mask image
given as a path or as its pixel array (soft edges, JPEG noise, 16 bits), and step windows (two indices or
two fractions in [0, 1]; anything that would edit no step, or every step unasked, is refused)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.multimodal.insertion.in_context_brush import InsertionAttention, InsertionState
from attnzoo.multimodal.insertion.layout import read_mask

SIZE = (24, 20)


def drawn() -> np.ndarray:
    mask = np.zeros(SIZE, np.uint8)
    mask[5:15, 4:12] = 255
    return mask


# -- masks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_an_opaque_rgba_mask_reads_by_its_colours(tmp_path, mode):
    """A white-on-black mask exported with a fully opaque alpha filled the whole target (the alpha alone decided)."""
    mask = drawn()
    channels = [mask] * (3 if mode == "RGBA" else 1)
    image = Image.fromarray(np.dstack([*channels, np.full_like(mask, 255)]), mode)
    image.save(tmp_path / "mask.png")
    for form in (image, tmp_path / "mask.png"):
        assert np.array_equal(read_mask(form, SIZE), mask)
    clear = Image.fromarray(np.dstack([*channels, np.zeros_like(mask)]), mode)  # constant alpha 0: colours too
    assert np.array_equal(read_mask(clear, SIZE), mask)


def test_a_varying_alpha_is_still_the_mask():
    mask = drawn()
    white = np.full_like(mask, 255)  # the colours say "fill everywhere"; the transparent PNG's alpha decides
    assert np.array_equal(read_mask(Image.fromarray(np.dstack([white, white, white, mask]), "RGBA"), SIZE), mask)


def test_a_mask_image_and_its_pixel_array_fill_alike(tmp_path):
    """Arrays filled wherever non-zero, images from 128: the grey edges of a resized mask, or JPEG noise in its
    black, filled as an array but not as the same image's path."""
    big = np.zeros((96, 80), np.uint8)
    big[20:70, 16:50] = 255
    soft = np.asarray(Image.fromarray(big).resize(SIZE[::-1]))  # bicubic: grey ramps at the edges
    assert ((soft > 0) & (soft < 128)).any()
    Image.fromarray(soft).save(tmp_path / "soft.png")
    Image.fromarray(big).save(tmp_path / "noisy.jpg", quality=60)
    noisy = np.asarray(Image.open(tmp_path / "noisy.jpg").convert("L"))
    assert ((noisy > 0) & (noisy < 128)).any()
    for path, size in ((tmp_path / "soft.png", SIZE), (tmp_path / "noisy.jpg", big.shape)):
        from_path = read_mask(path, size)
        assert 0 < from_path.sum() < from_path.size * 255
        assert np.array_equal(read_mask(np.asarray(Image.open(path).convert("L")), size), from_path)
    wide = soft.astype(np.uint16) * 257  # a 16-bit mask image: half its range, as its path is read
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert np.array_equal(read_mask(wide, SIZE), read_mask(tmp_path / "wide.png", SIZE))
    assert np.array_equal(read_mask(wide, SIZE), read_mask(soft, SIZE))


def test_documented_array_masks_keep_their_meaning():
    mask = drawn() > 0
    expected = np.where(mask, 255, 0).astype(np.uint8)
    for form in (mask, mask.astype(np.uint8), mask.astype(np.int64) * 255, mask.astype(np.uint16), mask * 1.0):
        assert np.array_equal(read_mask(form, SIZE), expected)


def test_an_integer_mask_of_zero_and_one_value_fills_that_value():
    """An int64 0/2 label map read empty (only values up to 1 were a binary mask; 2 was a dark pixel), and a
    uint16 0/255 mask too (thresholded at 32768): 0 and one value v is a binary mask, v = fill, whatever v."""
    mask = drawn() > 0
    expected = np.where(mask, 255, 0).astype(np.uint8)
    for dtype, value in ((np.int64, 2), (np.uint16, 255), (np.uint8, 7), (np.int32, 70000), (np.uint16, 65535)):
        assert np.array_equal(read_mask(mask.astype(dtype) * dtype(value), SIZE), expected), (dtype, value)
    assert np.array_equal(read_mask(np.full(SIZE, 3, np.int16), SIZE), np.full(SIZE, 255, np.uint8))


def test_a_16_bit_mask_image_as_pil_reads_it_fills_as_its_path(tmp_path):
    """PIL gives a 16-bit PNG as int32 (mode I) as well as uint16: the scale comes from the values (largest above
    255: 16-bit), not from the dtype, so both fill where the image's path does (int32 was thresholded at 128)."""
    big = np.zeros((96, 80), np.uint8)
    big[20:70, 16:50] = 255
    soft = np.asarray(Image.fromarray(big).resize(SIZE[::-1])).astype(np.uint16) * 257
    Image.fromarray(soft).save(tmp_path / "wide.png")
    from_path = read_mask(tmp_path / "wide.png", SIZE)
    assert 0 < from_path.sum() < from_path.size * 255
    assert np.array_equal(read_mask(np.asarray(Image.open(tmp_path / "wide.png").convert("I")), SIZE), from_path)
    assert np.array_equal(read_mask(soft.astype(np.int32), SIZE), from_path)
    assert np.array_equal(read_mask(soft, SIZE), from_path)


def test_a_0_1_255_array_fills_as_the_same_image_does(tmp_path):
    """More than 0 and one value: a mask image's pixels, so its 1s are black, as in the image (documented)."""
    mask = drawn()
    mask[0, :4] = 1
    Image.fromarray(mask).save(tmp_path / "three.png")
    assert np.array_equal(read_mask(mask, SIZE), read_mask(tmp_path / "three.png", SIZE))
    assert np.array_equal(read_mask(mask, SIZE), drawn())


def test_integer_masks_that_are_no_mask_are_refused():
    mask = drawn().astype(np.int64)
    with pytest.raises(InvalidInputError, match="negative values are no mask image's pixels"):
        read_mask(mask - 1, SIZE)  # -1/254: 254 was filled, -1 not (but -1 was filled in a -1/0/1 mask)
    mask[0, 0] = 70000
    with pytest.raises(InvalidInputError, match="not an 8- or 16-bit mask image's pixels"):
        read_mask(mask, SIZE)


@pytest.mark.parametrize(
    "labels, rule",
    [
        ((0, 1, 2), r"read as an integer array of values 0 to 2, not only 0 and one fill value, so read as an 8-bit"),
        ((0, 1000, 9000), r"values 0 to 9000, not only 0 and one fill value, so read as a 16-bit .* >= 32768"),
        ((0.0, 0.25, 0.4), r"read as a float array, filled where >= 0.5"),
    ],
)
def test_a_mask_that_reads_empty_names_the_rule_that_read_it(labels, rule):
    """ "the mask is empty: nothing to fill" for a mask with non-zero pixels left the user guessing why."""
    from attnzoo.multimodal.insertion.inputs import prepare_inputs
    from attnzoo.multimodal.insertion.layout import PanelLayout

    image = np.full((*SIZE, 3), 200, np.uint8)
    mask = np.zeros(SIZE, type(labels[0]))
    mask[2:8, 2:8], mask[10:16, 2:8] = labels[1], labels[2]
    layout = PanelLayout(16, 16, "vertical", 1, 2)
    with pytest.raises(InvalidInputError, match="the mask is empty: nothing to fill .*" + rule):
        prepare_inputs(image, image, mask, layout)
    with pytest.raises(InvalidInputError, match="subject_mask selects no pixel .*" + rule):
        prepare_inputs(image, image, drawn() > 0, layout, subject_mask=mask)


# -- step windows -------------------------------------------------------------------------------------


def edited(window, steps=50):
    state = InsertionState().reset(num_steps=steps)
    seen = []
    for step in range(steps):
        seen.append(state.in_steps(window))
        state.callback_on_step_end(None, step, None, {})
    from attnzoo.multimodal.insertion.in_context_brush import window_steps

    assert seen.count(True) == len(window_steps(window, steps))
    return [s for s, on in enumerate(seen) if on]


def test_a_step_window_is_read_by_one_rule(monkeypatch):
    """The refusal of a window of no step (window_steps) and the run's edit (in_steps) read windows through
    one helper, so they cannot drift apart: change it and both follow."""
    import attnzoo.multimodal.insertion.in_context_brush as icb

    monkeypatch.setattr(icb, "window_bounds", lambda window, num_steps: (2, 4))
    state = InsertionState().reset(num_steps=10)
    seen = []
    for step in range(10):
        seen.append(state.in_steps((0.0, 0.5)))
        state.callback_on_step_end(None, step, None, {})
    assert [s for s, on in enumerate(seen) if on] == icb.window_steps((0.0, 0.5), 10) == [2, 3]


@pytest.mark.parametrize(
    "window, error",
    [
        ((0.0, 25.0), "fraction outside"),  # edited all 50 steps as "fractions"
        ((2.0, 5.0), "fraction outside"),  # edited none
        ("10,20.0", "fraction outside"),  # edited none
        ((10, 0.5), "mixes a step index with a fraction"),
        ((3, 3), "empty"),
        ((0.5, 0.5), "empty"),
        ((-0.5, 0.5), "fraction outside"),
    ],
)
def test_step_windows_that_cannot_mean_what_they_say_are_refused(window, error):
    from attnzoo.pipelines.subject_insertion import check_settings

    with pytest.raises(InvalidOptionError, match=error) as found:
        check_settings(step_window=window, steps=50)
    assert "two step indices" in str(found.value) or error == "empty"
    if not isinstance(window, str):
        with pytest.raises(InvalidInputError, match=error):
            InsertionAttention(steps=window)


@pytest.mark.parametrize(
    "window, steps",
    [
        ((0, 25), list(range(25))),
        ("0:25", list(range(25))),
        ((0.0, 0.5), list(range(25))),
        ("0,0.5", list(range(25))),
        ((0, 0.5), list(range(25))),  # an end of 0 or 1 beside a fraction is that fraction
        ((0, 1.0), list(range(50))),
        ((np.int64(40), np.int64(60)), list(range(40, 50))),
    ],
)
def test_step_windows_that_worked_still_work(window, steps):
    from attnzoo.pipelines.subject_insertion import check_settings

    given = check_settings(step_window=window, steps=50)["step_window"]
    assert edited(given) == steps
