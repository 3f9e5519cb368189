"""hallucination-mitigation's device and dtype with a model spread over several devices (``hf_device_map``,
faked here on the CPU): the pipeline leaves such a model where it is, so a ``device=`` or another ``dtype=`` is
refused instead of being ignored while ``pipe.dtype`` (and a run's record) said otherwise; ``pipe.dtype`` is the
dtype the model runs in."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import InvalidOptionError
from attnzoo.multimodal.hallucination.models import LVLMCheckpoint, tiny_lvlm

TASK = "hallucination-mitigation"
pytestmark = pytest.mark.usefixtures("one_thread")


def _dispatched(dtype: torch.dtype = torch.float32):
    model = tiny_lvlm("llava").to(dtype)
    model.hf_device_map = {"model.vision_tower": "cpu", "model.language_model": "cpu:0"}  # two "devices"
    return model


@pytest.mark.parametrize("dtype", ["bf16", torch.float16, "float64"])
def test_another_dtype_for_a_dispatched_model_is_refused_and_the_model_left_as_it_is(dtype):
    model = _dispatched()
    with pytest.raises(InvalidOptionError, match=r"dtype=.*device map.*torch\.float32"):
        attnzoo.pipeline(TASK, model=model, dtype=dtype, max_new_tokens=2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_device_for_a_dispatched_model_is_refused():
    with pytest.raises(InvalidOptionError, match=r"device='cpu'.*device map"):
        attnzoo.pipeline(TASK, model=_dispatched(), device="cpu", max_new_tokens=2)


@pytest.mark.parametrize("dtype", [None, "auto", "bfloat16", torch.bfloat16])
def test_a_dispatched_model_keeps_its_dtype_and_the_pipeline_reports_it(dtype):
    model = _dispatched(torch.bfloat16)
    pipe = attnzoo.pipeline(TASK, model=model, dtype=dtype, max_new_tokens=2)
    assert pipe.dtype == torch.bfloat16 == model.dtype
    assert "dtype=torch.bfloat16" in repr(pipe)


def test_pipe_dtype_is_the_models_when_none_is_asked_for():
    model = tiny_lvlm("llava").to(torch.bfloat16)
    pipe = attnzoo.pipeline(TASK, model=model, device="cpu", max_new_tokens=2)
    assert pipe.dtype == torch.bfloat16


def test_device_and_device_map_together_are_refused_before_loading(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was read before device= with device_map= was refused")

    monkeypatch.setattr(LVLMCheckpoint, "load", no_load)
    monkeypatch.setattr(LVLMCheckpoint, "config", no_load)
    unloaded = LVLMCheckpoint("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(InvalidOptionError, match=r"device='cpu' and device_map="):
        attnzoo.pipeline(TASK, model=unloaded, device="cpu", device_map="auto")
    with pytest.raises(InvalidOptionError, match=r"device='cpu' and device_map="):
        attnzoo.pipeline(TASK, model=LVLMCheckpoint("llava-hf/llava-1.5-7b-hf", device_map="auto"), device="cpu")
