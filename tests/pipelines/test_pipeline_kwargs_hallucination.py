"""``pipeline("hallucination-mitigation")`` keywords as a transformers user gives them, on the tiny random LLaVA
(``weights="none"``): a misspelled keyword is refused at construction (it was taken, then every call failed),
and at a call naming it rather than "question= is required"; the question goes with each call; a method
setting without a method is refused where it is given; a timm classifier is said to be one."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import attnzoo
from attnzoo.errors import InvalidInputError, InvalidOptionError

TASK = "hallucination-mitigation"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ask():
    return attnzoo.pipeline(TASK, weights="none", device="cpu", max_new_tokens=2)


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))


def test_a_misspelled_constructor_keyword_is_refused_with_the_close_names(monkeypatch):
    from attnzoo.multimodal.hallucination.models import LVLMCheckpoint

    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the keyword was refused")

    monkeypatch.setattr(LVLMCheckpoint, "load", no_load)
    monkeypatch.setattr(LVLMCheckpoint, "config", no_load)
    unloaded = LVLMCheckpoint("llava-hf/llava-1.5-7b-hf")  # a 7B model: refused before it loads
    for model in ({"model": unloaded}, {"weights": "none"}):
        with pytest.raises(
            InvalidOptionError, match=r"unknown keyword\(s\) 'max_new_token' \(did you mean max_new_tokens"
        ):
            attnzoo.pipeline(TASK, device="cpu", max_new_token=4, **model)
        with pytest.raises(InvalidOptionError, match="question= goes with the inputs, at each call"):
            attnzoo.pipeline(TASK, device="cpu", question="Is there a cat?", **model)
    with pytest.raises(InvalidOptionError, match=r"'alpah' \(did you mean alpha"):  # without a method too
        attnzoo.pipeline(TASK, weights="none", device="cpu", alpah=1)
    with pytest.raises(InvalidOptionError, match=r"'alpah' \(did you mean alpha"):  # as with one
        attnzoo.pipeline(TASK, weights="none", device="cpu", method="vcd", alpah=1)
    with pytest.raises(InvalidOptionError, match=r"'tua' \(did you mean tau"):
        attnzoo.pipeline(TASK, weights="none", device="cpu", method_settings={"tua": 1.0})


def test_a_method_setting_without_a_method_is_refused_at_construction():
    """No call could use it: a call naming a method takes only its own settings, one without runs none."""
    with pytest.raises(InvalidOptionError, match="alpha are taken by no method of none"):
        attnzoo.pipeline(TASK, weights="none", device="cpu", alpha=1.0)
    ignored = attnzoo.pipeline(TASK, weights="none", device="cpu", alpha=1.0, unused_settings="ignore")
    assert ignored._defaults[1]["method_settings"] == {"alpha": 1.0}  # left out, as the docs say


def test_a_misspelled_call_keyword_is_named_before_any_image_is_read(ask, photo, tmp_path):
    unread = tmp_path / "missing.png"  # would be an error of its own if it were read
    with pytest.raises(InvalidOptionError, match=r"'questoin' \(did you mean question"):
        ask(photo, questoin="Is there a cat?")
    with pytest.raises(InvalidOptionError, match=r"'alpah' \(did you mean alpha"):
        ask(unread, question="Is there a cat?", method="vcd", alpah=1)
    with pytest.raises(InvalidOptionError, match=r"'max_new_token' \(did you mean max_new_tokens"):
        ask(unread, question="Is there a cat?", max_new_token=1)
    with pytest.raises(InvalidOptionError, match="alpha are taken by no method of none"):
        ask(unread, question="Is there a cat?", alpha=1.0)
    with pytest.raises(InvalidInputError, match="question= is required"):  # still said when it is only missing
        ask(photo)
    assert ask(photo, question="Is there a cat?").answer is not None


def test_call_settings_go_with_the_constructors_method(photo):
    vcd = attnzoo.pipeline(TASK, weights="none", device="cpu", max_new_tokens=2, method="vcd")
    assert vcd(photo, question="Cat?", alpha=0.5).settings["methods"][0]["alpha"] == 0.5
    with pytest.raises(InvalidOptionError, match="tau are taken by no method of vcd"):
        vcd(photo, question="Cat?", tau=2.0)


def test_a_timm_classifier_is_said_to_be_one():
    import timm

    with pytest.raises(InvalidOptionError, match="does not take a ResNet: it is a model for image-classification"):
        attnzoo.pipeline(TASK, model=timm.create_model("test_resnet"), device="cpu")


@pytest.mark.parametrize("name", ["biformer_tiny", "test_resnet", "resnet18"])
def test_a_classifier_name_is_refused_before_anything_is_built_or_fetched(monkeypatch, name):
    """attnzoo's and timm's classifiers by name: the task and the model are named, and nothing is built (building
    by name fetches the pretrained weights, megabytes to gigabytes, before the pipeline could refuse it)."""
    import huggingface_hub
    import timm

    import attnzoo.factory

    monkeypatch.setattr(attnzoo.factory, "create_model", lambda *a, **k: pytest.fail(f"{name} was built"))
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail(f"{name} was built by timm"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("weights fetched"))
    with pytest.raises(
        InvalidOptionError,
        match=rf"the {TASK} task does not take '{name}': it is a model for image-classification \(its default model",
    ):
        attnzoo.pipeline(TASK, model=name)
    with pytest.raises(InvalidOptionError, match=rf"does not take '{name}'"):
        attnzoo.pipeline(TASK, model=name, weights="none", device="cpu")


def test_a_module_that_is_no_lvlm_is_refused_naming_it():
    import torch

    from attnzoo.pipelines.hallucination_mitigation import HallucinationMitigationPipeline

    for build in (lambda m: attnzoo.pipeline(TASK, model=m, device="cpu"), HallucinationMitigationPipeline):
        with pytest.raises(InvalidInputError, match=f"the {TASK} task has no pipeline for a Linear"):
            build(torch.nn.Linear(2, 2))
