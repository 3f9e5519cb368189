"""Checks of setting values shared by every layer, so that one rule gives one wording everywhere:
whole numbers in a range, comma lists without blank items, text that is not blank."""

from __future__ import annotations

from typing import Any

import numpy as np

from attnzoo.errors import InvalidInputError, InvalidOptionError


def whole_number(
    value: Any,
    name: str,
    *,
    low: int = 1,
    high: int | None = None,
    why: str = "",
    error: type[InvalidInputError] = InvalidOptionError,
) -> int:
    """``value`` as an int in ``[low, high]`` (bools and floats refused), or ``error`` naming ``name``;
    ``why`` says what the upper bound stands for (e.g. "the model's context")."""
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not whole or value < low or (high is not None and value > high):
        if high is None:
            wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
        else:
            wanted = f"an integer in [{low}, {high}]"
        raise error(f"{name} must be {wanted}{f' ({why})' if why else ''}, got {value!r}")
    return int(value)


def comma_items(value: str, name: str) -> list[str]:
    """The stripped items of ``"a, b,c"``; a blank item (``"a,,b"``, a trailing comma) or no item at all is
    refused: a dropped item would run something other than what was typed."""
    items = [item.strip() for item in value.split(",")]
    if not value.strip() or any(not item for item in items):
        raise InvalidOptionError(f"{name} {value!r} has a blank item; give comma-separated values such as 'a,b'")
    return items


def nonblank_text(value: Any, name: str) -> str:
    """A string with something in it: an empty ``--out ''`` or ``model=""`` would otherwise read as "not given"
    and fall back to the default, or as the current folder."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidOptionError(f"{name} must be a non-empty string, got {value!r}")
    return value
