"""The shared checks of setting values (attnzoo._values)."""

import numpy as np
import pytest

from attnzoo._values import comma_items, nonblank_text, whole_number
from attnzoo.errors import InvalidInputError, InvalidOptionError


@pytest.mark.parametrize("value", [1, 7, np.int64(3)])
def test_whole_number_takes_integers_in_range(value):
    assert whole_number(value, "n", high=7) == int(value)
    assert type(whole_number(value, "n")) is int


@pytest.mark.parametrize("value", [0, -1, 8, 2.0, True, "3", None, np.float32(2)])
def test_whole_number_refuses_others_naming_the_setting(value):
    with pytest.raises(InvalidOptionError, match=r"--steps must be an integer in \[1, 7\] \(the limit\)"):
        whole_number(value, "--steps", high=7, why="the limit")


def test_whole_number_wording_and_error_type():
    with pytest.raises(InvalidOptionError, match="n must be a positive integer, got 0"):
        whole_number(0, "n")
    with pytest.raises(InvalidOptionError, match="n must be an integer >= 0, got -1"):
        whole_number(-1, "n", low=0)
    with pytest.raises(InvalidInputError) as caught:
        whole_number(0, "n", error=InvalidInputError)
    assert type(caught.value) is InvalidInputError
    assert whole_number(0, "n", low=0) == 0


def test_comma_items_strips_and_keeps_order():
    assert comma_items(" a, b ,c", "--x") == ["a", "b", "c"]
    assert comma_items("7", "--x") == ["7"]


@pytest.mark.parametrize("value", ["", " ", "a,,b", "a,", ",a", ","])
def test_comma_items_refuses_blank_items(value):
    with pytest.raises(InvalidOptionError, match="--layers .* blank item"):
        comma_items(value, "--layers")


def test_nonblank_text():
    assert nonblank_text("x", "--out") == "x"
    for value in ("", "  ", None, 3):
        with pytest.raises(InvalidOptionError, match="--out must be a non-empty string"):
            nonblank_text(value, "--out")
