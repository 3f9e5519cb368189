"""Shared pieces of the readers' fuzz tests: damaged copies of valid files, random JSON, and the
one rule every reader must keep -- return a well-formed result, or raise a typed error that names
the input. Any other exception (or a result breaking the reader's invariants) fails the test."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from attnzoo.datasets.scanpaths import OFF_IMAGE_MARGIN
from attnzoo.errors import DatasetFormatError, InvalidInputError

T = TypeVar("T")

#: Small (ATTNZOO_FUZZ_EXAMPLES=1000 for a deeper run by hand), never writing .hypothesis/ into the tree.
FUZZ = settings(
    max_examples=int(os.environ.get("ATTNZOO_FUZZ_EXAMPLES", "30")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
TYPED = (DatasetFormatError, InvalidInputError)


def read_or_refuse(read: Callable[[], T], *names: Any) -> T | None:
    """``read()``'s result, or None when it raised a typed error naming one of ``names``."""
    try:
        return read()
    except TYPED as err:
        assert any(str(n) in str(err) for n in names), f"the error does not name {names}: {err}"
        return None


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example (hypothesis runs many examples in one test)."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """A damaged copy of a valid file: truncated, emptied, overwritten, cut, padded or replaced."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete", "empty", "random", "append", "zero"]))
    n = len(data)
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=256))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, n - 1)))]
    start = draw(st.integers(0, max(0, n - 1)))
    if kind == "insert":
        return data[:start] + draw(st.binary(min_size=1, max_size=64)) + data[start:]
    if kind == "delete":
        return data[:start] + data[start + draw(st.integers(1, 64)) :]
    size = draw(st.integers(1, 16))
    patch = bytes(size) if kind == "zero" else draw(st.binary(min_size=size, max_size=size))
    return data[:start] + patch + data[start + size :]


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any JSON value Python's json module reads, NaN and infinities included."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
        max_leaves=max_leaves,
    )


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def mutated_json(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with one value somewhere replaced by a random JSON value, or one key or item removed."""
    doc = json.loads(json.dumps(doc))
    path = draw(st.sampled_from(_paths(doc)))
    if not path:
        return draw(json_values())
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        parent[path[-1]] = draw(json_values())
    else:
        del parent[path[-1]]
    return doc


def deeply_nested(depth: int = 100_000) -> str:
    """JSON nested past the parser's recursion limit."""
    return "[" * depth + "]" * depth


def check_points(xy: np.ndarray, image_size: tuple[float, float] | None) -> None:
    """What every scanpath reader promises about the points it returns."""
    assert xy.dtype == np.float64 and xy.ndim == 2 and xy.shape[1] == 2
    assert np.isfinite(xy).all(), xy
    if image_size is not None:
        width, height = image_size
        assert (xy[:, 0] >= -OFF_IMAGE_MARGIN * width).all() and (xy[:, 0] <= (1 + OFF_IMAGE_MARGIN) * width).all()
        assert (xy[:, 1] >= -OFF_IMAGE_MARGIN * height).all() and (xy[:, 1] <= (1 + OFF_IMAGE_MARGIN) * height).all()


def check_times(values: np.ndarray | None, n: int, *, non_negative: bool = False) -> None:
    if values is None:
        return
    assert values.shape == (n,) and np.isfinite(values).all()
    if non_negative:
        assert (values >= 0).all()


def odd_numbers() -> st.SearchStrategy[Any]:
    """Values a numeric field of a data file should never accept silently."""
    return st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 2**63, -(2**63) - 1, True, "12", "", None]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**20), 10**20),
        st.text(max_size=6),
    )
