"""``pipeline("subject-insertion")`` keywords as a transformers user gives them: what goes with each input is
refused by the constructor saying so, a seed follows the rule every seeded pipeline checks, and a dtype no
longer brings diffusers' empty "modules ... should be kept in float32: []" warnings (others still show)."""

from __future__ import annotations

import logging

import pytest
import torch

import attnzoo
from attnzoo.errors import InvalidOptionError

pytestmark = pytest.mark.usefixtures("one_thread")
_DIFFUSERS_MODELS = "diffusers.models.modeling_utils"


@pytest.fixture(scope="module")
def tiny():
    from attnzoo.multimodal.insertion.flux import tiny_flux_fill

    return tiny_flux_fill(0)


class _Seen(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    """What diffusers' model module warns, as its handlers would get it (after the logger's filters)."""
    logger = logging.getLogger(_DIFFUSERS_MODELS)
    seen = _Seen()
    logger.addHandler(seen)
    try:
        yield seen.messages
    finally:
        logger.removeHandler(seen)


def test_what_goes_with_each_input_is_refused_by_the_constructor(tiny):
    for name, value in (("prompt", "a cup"), ("subject", "cup.png"), ("mask", "mask.png")):
        with pytest.raises(InvalidOptionError, match=rf"{name}= goes with the inputs, at each call"):
            attnzoo.pipeline("subject-insertion", model=tiny, panel_size=16, steps=1, **{name: value})
    # the seed is also a setting: a default of the pipeline
    assert attnzoo.pipeline("subject-insertion", model=tiny, panel_size=16, steps=1, seed=3)._defaults[1]["seed"] == 3


def test_a_seed_at_construction_is_an_option_error_with_the_one_rule(tiny):
    for bad in (-1, 1.5, True, 2**64 - 1):  # the fill draws from seed + 1 too: 2**64 - 1 leaves it no room
        with pytest.raises(InvalidOptionError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\)"):
            attnzoo.pipeline("subject-insertion", model=tiny, panel_size=16, steps=1, seed=bad)


def test_a_dtype_brings_no_empty_keep_in_float32_warnings(diffusers_warnings):
    from attnzoo.multimodal.insertion.flux import tiny_flux_fill

    # without the pipeline, diffusers gives them (0.42; its oldest release we take, 0.36, does not): the test sees
    # what it would show
    tiny_flux_fill(0).to(dtype=torch.bfloat16)
    if not [m for m in diffusers_warnings if "should be kept in float32: []" in m]:
        pytest.skip("this diffusers gives no empty keep-in-float32 warning")
    diffusers_warnings.clear()
    for dtype in ("float32", "bfloat16"):
        attnzoo.pipeline("subject-insertion", model=tiny_flux_fill(0), panel_size=16, steps=1, dtype=dtype)
    assert not [m for m in diffusers_warnings if "should be kept in float32: []" in m]


def test_only_the_empty_keep_in_float32_warning_is_dropped(diffusers_warnings):
    from attnzoo.pipelines.subject_insertion import without_empty_float32_warning

    logger = logging.getLogger(_DIFFUSERS_MODELS)
    named = "There are modules in FluxTransformer2DModel that should be kept in float32: ['norm_out']. Casting"
    with without_empty_float32_warning():
        logger.warning("There are modules in AutoencoderKL that should be kept in float32: []. Casting directly")
        logger.warning(named)
        logger.warning("something else")
    assert diffusers_warnings == [named, "something else"]
