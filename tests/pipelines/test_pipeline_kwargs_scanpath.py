"""``pipeline("scanpath")`` keywords as a transformers user gives them: what goes with each input is refused by
the constructor (as the docs say), a NevaClip target's forms (one embedding as a list of numbers, one per
image as the rows of a numpy array), and one seed rule (the one every seeded pipeline checks) for both models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import InvalidOptionError
from attnzoo.pipelines.base import generator_seed
from tests.scanpath_helpers import tiny_nevaclip, tiny_oat

FAST = {"fixations": 2, "iterations": 1, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def neva():
    return tiny_nevaclip(image_size=64)


@pytest.fixture(scope="module")
def pipe(neva):
    return attnzoo.pipeline("scanpath", model=neva, **FAST)


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def test_what_goes_with_each_input_is_refused_by_the_constructor_as_the_docs_say(neva):
    """docs/scanpath.md said every call keyword could be a constructor default, caption and boxes included;
    the constructor refused caption= as an "unexpected argument". The docs now say which keywords go with the
    inputs, and the constructor refuses those saying so."""
    for given in ({"caption": "a cat"}, {"target": torch.ones(64)}):
        with pytest.raises(InvalidOptionError, match=rf"{next(iter(given))}= goes with the inputs, at each call"):
            attnzoo.pipeline("scanpath", model=neva, **FAST, **given)
    for given in ({"boxes": [[0, 0, 1, 1]] * 6}, {"target": 2}):
        with pytest.raises(InvalidOptionError, match=rf"{next(iter(given))}= goes with the inputs, at each call"):
            attnzoo.pipeline("scanpath", model=tiny_oat(), **given)
    docs = (Path(__file__).parents[2] / "docs" / "scanpath.md").read_text()
    assert "Every call keyword below can also be given here" not in docs
    assert "not what goes with each input (`caption`, `target`, `boxes`)" in docs


def test_one_target_embedding_as_a_list_of_numbers_is_the_target_of_every_image(neva, pipe):
    """``target=emb.tolist()`` was read as D targets, one per input ("got 64 values of target= for 1 inputs")."""
    embedding = neva.encode_captions(["a cat"])[0].detach()
    want = pipe(picture(0), target=embedding)
    got = pipe(picture(0), target=embedding.tolist())
    np.testing.assert_array_equal(got.relative, want.relative)
    both = pipe([picture(0), picture(1)], target=embedding.tolist())
    np.testing.assert_array_equal(both[0].relative, want.relative)
    np.testing.assert_array_equal(both[1].relative, pipe(picture(1), target=embedding).relative)


def test_the_rows_of_a_numpy_array_are_one_target_per_image_as_a_tensors_are(neva, pipe):
    """A 2-D tensor gave one row per image; the same numpy array was refused."""
    rows = neva.encode_captions(["a cat", "a striped pattern"]).detach()
    images = [picture(0), picture(1)]
    by_tensor = pipe(images, target=rows)
    by_array = pipe(images, target=rows.numpy())
    for a, b, row, image in zip(by_array, by_tensor, rows, images):
        np.testing.assert_array_equal(a.relative, b.relative)
        np.testing.assert_array_equal(a.relative, pipe(image, target=row).relative)


def test_a_seed_follows_the_one_rule_of_every_seeded_pipeline(neva, pipe):
    """NevaClip and OAT took [-2**63, 2**64) and raised InvalidInputError, where the other pipelines take
    [0, 2**64) (one seed per generator state) and raise InvalidOptionError."""
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(InvalidOptionError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            generator_seed(bad)
        with pytest.raises(InvalidOptionError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            attnzoo.pipeline("scanpath", model=neva, seed=bad, **FAST)
        with pytest.raises(InvalidOptionError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            pipe(picture(0), caption="a cat", seed=bad)
        with pytest.raises(InvalidOptionError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            attnzoo.pipeline("scanpath", model=tiny_oat(), strategy="sample", seed=bad)
    top = attnzoo.pipeline("scanpath", model=neva, seed=2**64 - 1, **FAST)(picture(0), caption="a cat")
    assert top.xy.shape == (2, 2)


def test_truncate_and_progress_are_flags_as_every_pipeline_checks_them(neva, pipe):
    """One rule (attnzoo._values.flag) for scanpath's flags and the WSI pipelines' progress: numpy's booleans are
    flags, a word or a number is refused naming the keyword."""
    from attnzoo.errors import InvalidInputError

    for name in ("truncate", "progress"):
        for bad in ("yes", 1):
            with pytest.raises(InvalidInputError, match=rf"^{name} must be True or False, got {bad!r}$"):
                attnzoo.pipeline("scanpath", model=neva, **{**FAST, name: bad})
    pipe._merged_parameters({"truncate": np.False_, "progress": np.False_})  # taken at the call too
