"""``pipeline("hallucination-mitigation")`` settings between the constructor and a call, on the tiny random LLaVA
(``weights="none"``): the constructor's method settings as defaults of a call naming the same method (and a
warning where a call's other method drops them), the built methods kept per settings (objects told apart by
identity, a bounded cache, one BLIP per pipeline for AGLA), numpy / torch numbers as decoding settings and
bools refused, a greedy call on a sampling pipeline, method objects and keyword settings, custom chat
templates checked up front, and the smaller checks (``return_attention``, ``plot(size=)``, a one-element
question list, ranges in method settings given as text)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import InvalidOptionError
from attnzoo.multimodal.hallucination import VAR
from attnzoo.multimodal.hallucination.methods import build_methods

TASK = "hallucination-mitigation"
QUESTION = "is there a dog ?"
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**settings):
    settings.setdefault("max_new_tokens", 3)
    return attnzoo.pipeline(TASK, weights="none", device="cpu", **settings)


@pytest.fixture(scope="module")
def ask():
    return tiny()


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in range(2)]


def methods_of(result):
    return {m["method"]: m for m in result.settings["methods"]}


def test_the_constructors_method_settings_are_defaults_of_a_call_naming_the_same_method(photos):
    vcd = tiny(method="vcd", alpha=5.0, noise_step=900)
    reference = vcd(photos[0], question=QUESTION)
    assert methods_of(reference)["vcd"]["alpha"] == 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same method: nothing is dropped, nothing said
        for spec in ("vcd", "VCD", " Vcd ", ["vcd"], {"vcd": {}}):
            result = vcd(photos[0], question=QUESTION, method=spec)
            assert methods_of(result)["vcd"]["alpha"] == 5.0 and methods_of(result)["vcd"]["noise_step"] == 900
            assert result.token_ids == reference.token_ids
        overridden = methods_of(vcd(photos[0], question=QUESTION, method="vcd", alpha=2.0))["vcd"]
        assert (overridden["alpha"], overridden["noise_step"]) == (2.0, 900)  # key by key
        own = methods_of(vcd(photos[0], question=QUESTION, method="vcd(alpha=3)"))["vcd"]
        assert (own["alpha"], own["noise_step"]) == (3.0, 900)  # its own value in parentheses wins
        within = tiny(method="vcd(alpha=5)")
        assert methods_of(within(photos[0], question=QUESTION, method="vcd"))["vcd"]["alpha"] == 5.0
        assert methods_of(within(photos[0], question=QUESTION, alpha=2.0))["vcd"]["alpha"] == 2.0
        both = tiny(method="pai+vcd", beta=0.1)  # a combination in another order is the same methods
        assert methods_of(both(photos[0], question=QUESTION, method="vcd+pai"))["vcd"]["beta"] == 0.1
    default_pai = build_methods("pai")[0].describe()["alpha"]
    with pytest.warns(UserWarning, match=r"method pai is not the pipeline's \(vcd\).*alpha, noise_step"):
        other = vcd(photos[0], question=QUESTION, method="pai")
    assert methods_of(other)["pai"]["alpha"] == default_pai  # VCD's alpha is not PAI's


def test_method_none_in_a_call_runs_the_stock_model_and_none_the_pipelines_method(ask, photos):
    vcd = tiny(method="vcd", alpha=5.0)
    stock = ask(photos[0], question=QUESTION)
    with pytest.warns(UserWarning, match="alpha"):
        plain = vcd(photos[0], question=QUESTION, method="none")
    assert plain.settings["method"] == "none" and plain.settings["methods"] == []
    assert plain.token_ids == stock.token_ids
    default = vcd(photos[0], question=QUESTION, method=None)  # None: the keyword is dropped
    assert default.settings["method"] == "vcd" and methods_of(default)["vcd"]["alpha"] == 5.0


def test_two_blip_models_of_one_architecture_are_told_apart(tmp_path, photos):
    from tests.multimodal.lvlm_prompts import tiny_blip_itm

    first, processor = tiny_blip_itm(tmp_path, match=0.05)
    second, _ = tiny_blip_itm(tmp_path, match=0.5)
    assert repr(first) == repr(second)  # what the cache key was made of
    agla = {"method": "agla", "blip_processor": processor, "behaviour": "paper", "max_new_tokens": 4}
    ask = tiny()
    ask(photos[0], question=QUESTION, blip_model=first, **agla)
    after_first = ask(photos[0], question=QUESTION, blip_model=second, **agla)
    alone = tiny()(photos[0], question=QUESTION, blip_model=second, **agla)
    assert after_first.token_ids == alone.token_ids
    used = [m.blip_model for _, methods in ask._methods_cache.values() for m in methods]
    assert any(m is second for m in used) and any(m is first for m in used)


def test_agla_settings_share_one_blip_and_the_built_methods_are_bounded(tmp_path, photos, monkeypatch):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from tests.multimodal.lvlm_prompts import tiny_blip_itm

    blip, processor = tiny_blip_itm(tmp_path)
    folder = tmp_path / "blip"
    blip.save_pretrained(folder)
    processor.save_pretrained(folder)
    loads = {"model": 0, "processor": 0}

    def counted(kind, original):
        def load(cls, *args, **kwargs):
            loads[kind] += 1
            return original.__func__(cls, *args, **kwargs)

        return classmethod(load)

    monkeypatch.setattr(
        BlipForImageTextRetrieval, "from_pretrained", counted("model", BlipForImageTextRetrieval.from_pretrained)
    )
    monkeypatch.setattr(BlipProcessor, "from_pretrained", counted("processor", BlipProcessor.from_pretrained))
    ask = tiny(max_new_tokens=1)
    for alpha in (0.5, 1.0, 2.0):
        ask(photos[0], question=QUESTION, method="agla", alpha=alpha, blip_model=str(folder))
    assert loads == {"model": 1, "processor": 1}
    agla = [m for _, methods in ask._methods_cache.values() for m in methods if m.name == "agla"]
    assert len(agla) == 3 and all(m.blip_model is agla[0].blip_model for m in agla)

    from attnzoo.pipelines.hallucination_mitigation import _METHODS_KEPT

    before = len(ask._methods_cache)
    for spec in ("vcd", "VCD", ["vcd"], " vcd"):  # one method, one entry
        ask(photos[0], question=QUESTION, method=spec)
    assert len(ask._methods_cache) == before + 1
    for step in range(_METHODS_KEPT + 4):  # a sweep keeps the last few
        ask._build_methods({"method": "vcd", "method_settings": {"alpha": 0.1 * (step + 1)}})
    assert len(ask._methods_cache) == _METHODS_KEPT


def test_numpy_and_torch_numbers_decode_and_flags_are_no_numbers(ask, photos):
    sampled = {"do_sample": True, "seed": 3}
    plain = ask(photos[0], question=QUESTION, top_k=5, temperature=0.5, top_p=0.9, **sampled)
    for numbers in (
        {"top_k": np.int64(5), "temperature": np.float64(0.5), "top_p": np.float64(0.9)},
        {"top_k": torch.tensor(5), "temperature": torch.tensor(0.5, dtype=torch.float64), "top_p": np.array(0.9)},
    ):
        result = ask(photos[0], question=QUESTION, **numbers, **sampled)
        assert result.token_ids == plain.token_ids
        decoding = result.settings["decoding"]
        assert (decoding["top_k"], decoding["temperature"], decoding["top_p"]) == (5, 0.5, 0.9)
        assert type(decoding["top_k"]) is int and type(decoding["temperature"]) is float
        json.dumps(result.to_dict())
    close = ask(photos[0], question=QUESTION, temperature=np.float32(0.7), **sampled).settings["decoding"]
    assert close["temperature"] == float(np.float32(0.7))


def test_a_flag_is_no_number(ask, photos):
    sampled = {"do_sample": True, "seed": 3}
    for setting, flag in [
        ("top_p", True),
        ("temperature", True),
        ("top_k", True),
        ("top_k", np.bool_(True)),
        ("top_p", torch.tensor(True)),
    ]:
        with pytest.raises(InvalidOptionError, match=setting):
            ask(photos[0], question=QUESTION, **{setting: flag}, **sampled)
    for method, flagged in [("vcd", {"alpha": True}), ("vcd", {"beta": np.bool_(False)}), ("var", {"tau": True})]:
        name = next(iter(flagged))
        with pytest.raises(InvalidOptionError, match=f"{method.upper()}'s .*{name} must be a number, not a flag"):
            build_methods(method, sink_dims=(3, 7), **flagged) if method == "var" else build_methods(method, **flagged)
    with pytest.raises(InvalidOptionError, match="alpha must be a number, not a flag"):
        ask(photos[0], question=QUESTION, method="vcd", alpha=torch.tensor(True))


def test_a_greedy_call_on_a_sampling_pipeline(ask, photos):
    sampling = tiny(do_sample=True, temperature=0.7, top_k=5)
    greedy = sampling(photos[0], question=QUESTION, do_sample=False)
    assert greedy.settings["decoding"]["mode"] == "greedy" and greedy.settings["decoding"]["temperature"] is None
    assert greedy.token_ids == ask(photos[0], question=QUESTION).token_ids
    drawn = sampling(photos[0], question=QUESTION).settings["decoding"]
    assert (drawn["mode"], drawn["temperature"], drawn["top_k"]) == ("sampled", 0.7, 5)  # still the default
    with pytest.raises(InvalidOptionError, match="apply to sampled decoding: pass do_sample=True"):
        sampling(photos[0], question=QUESTION, do_sample=False, top_p=0.5)  # given with it: the call's mistake


def test_keyword_settings_cannot_reach_a_built_method_object(ask, photos):
    with pytest.raises(
        InvalidOptionError,
        match=r"tau cannot be applied to an already-built method object \(var\): give them to its constructor, "
        r"e\.g\. VAR\(tau=\.\.\.\)",
    ):
        ask(photos[0], question=QUESTION, method=VAR(sink_dims=(3, 7)), tau=2.0)
    with pytest.raises(InvalidOptionError, match=r"already-built method object \(var\).*vcd takes alpha"):
        build_methods([VAR(sink_dims=(3, 7)), "vcd"], tau=2.0, gamma=1.0)
    with pytest.raises(InvalidOptionError, match=r"gamma are taken by no method of var$"):
        build_methods([VAR(sink_dims=(3, 7))], gamma=1.0)  # no method takes it: not said to be the object's


def test_a_custom_chat_template_is_checked_before_any_image_is_read(ask, photos, tmp_path):
    unread = tmp_path / "missing.png"  # would be an input error of its own if it were read
    for template, said in [
        ("USER: <image>\n{question} ASSISTANT:", r"writes the model's image text '<image>' itself: write \{image\}"),
        ("<image> {image} {question}", r"'<image>' itself: write \{image\}"),
        ("Q: {question} A:", r"has no \{image\}"),
        ("{image} {image} Q: {question} A:", r"has \{image\} 2 times"),
        ("{image} Q: A:", r"has no \{question\}"),
    ]:
        with pytest.raises(InvalidOptionError, match=rf"chat_template .*{said}"):
            ask(unread, question=QUESTION, chat_template=template)
    with pytest.raises(InvalidOptionError, match="chat_template"):
        tiny(chat_template="<image>\n{question}")
    written = ask(photos[0], question=QUESTION, chat_template="USER: {image}\n{question} ASSISTANT:")
    assert written.token_ids == ask(photos[0], question=QUESTION).token_ids  # the model's template, by hand


def test_return_attention_is_a_flag(ask, photos):
    for value in ("no", 0, 1):
        with pytest.raises(InvalidOptionError, match="return_attention must be True or False"):
            ask(photos[0], question=QUESTION, return_attention=value)
    result = ask(photos[0], question=QUESTION, return_attention=np.bool_(True))
    assert result.attention is not None and result.attention.shape == (6, 6)


def test_the_plot_size_is_a_positive_whole_number(ask, photos):
    result = ask(photos[0], question=QUESTION, return_attention=True)
    for size in (0, -5, 2.5, True):
        with pytest.raises(InvalidOptionError, match="plot size must be a positive integer"):
            result.plot(size=size)
    assert result.plot(size=32).height < result.plot(size=128).height


def test_a_list_of_one_question_goes_with_every_input(ask, photos):
    each = ask(photos, question=[QUESTION], batch_size=2)  # as one value does
    assert [r.question for r in each] == [QUESTION, QUESTION]
    assert [r.token_ids for r in each] == [r.token_ids for r in ask(photos, question=QUESTION, batch_size=2)]


def test_layer_ranges_in_settings_given_as_text(ask, photos):
    negative = ask(photos[0], question=QUESTION, return_attention=True, attention_layers="-2--1")
    last_two = ask(photos[0], question=QUESTION, return_attention=True, attention_layers=[2, 3])
    assert np.array_equal(negative.attention, last_two.attention)
    with pytest.raises(InvalidOptionError, match="attention_layers: the range '3-1' runs backwards"):
        ask(photos[0], question=QUESTION, return_attention=True, attention_layers="3-1")


def test_carve_layer_ranges_as_attention_layers_takes_them(ask, photos):
    assert build_methods("carve(layers=1-3)")[0].layers == (1, 2, 3)
    assert build_methods("carve", layers="0,2-3")[0].layers == (0, 2, 3)  # the command line's --layers 0,2-3
    carve = ask(photos[0], question=QUESTION, method="carve", layers="1-3", probe_tokens=2)
    assert tuple(methods_of(carve)["carve"]["layers"]) == (1, 2, 3)
    for text, said in [("3-1", "runs backwards"), ("0-99999", "spans 100,000 numbers"), ("a-b", "ranges such as 1-3")]:
        with pytest.raises(InvalidOptionError, match=f"carve's layers.*{said}"):
            build_methods(f"carve(layers={text})")


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"temperature": 0.7}, "apply to sampled decoding: pass do_sample=True"),
        ({"method": "vcd", "num_beams": 2}, "num_beams=2 does not apply"),
        ({"return_attention": True, "num_beams": 2}, "return_attention follows one sequence"),
        ({"do_sample": True, "num_beams": 2}, "beam sampling"),
    ],
)
def test_constructor_settings_that_cannot_decode_together_are_refused_when_it_is_built(settings, said):
    """Defaults that every call using them would refuse are refused once, when the pipeline is built."""
    with pytest.raises(InvalidOptionError, match=said):
        tiny(**settings)


def test_a_template_without_image_is_taken_where_the_processor_places_the_image():
    """InstructBLIP's processor places the image's queries itself ({image} stands for nothing there): its usual
    literal template has no {image}, and is taken; two {image} are refused on every model."""
    from attnzoo.pipelines.hallucination_mitigation import _chat_template

    usual = "Question: {question} Short answer:"
    assert _chat_template(usual, needs_image=False) == usual
    with pytest.raises(InvalidOptionError, match="has no {image}"):
        _chat_template(usual)
    with pytest.raises(InvalidOptionError, match="has {image} 2 times"):
        _chat_template("{image}{image} {question}", needs_image=False)


@pytest.mark.parametrize("text", ["-1-20", "20--1", "-3-2"])
def test_a_range_counting_from_both_ends_is_refused(text):
    """'-1-20' read as -1..20 named the last layer and layers 0 to 20; '20--1' was refused suggesting it."""
    from attnzoo.multimodal.hallucination.methods import index_span

    with pytest.raises(InvalidOptionError, match="mixes a count from the end with one from the start"):
        index_span(text, "layers")
    assert index_span("-3--1", "layers") == (-3, -1) and index_span("20-31", "layers") == (20, 31)


def test_a_method_setting_given_as_none_in_a_call_is_dropped(photos):
    """A keyword given as None is dropped (the constructor's value applies), method settings too: alpha=None
    reached VCD and was refused as a setting of the wrong type."""
    vcd = tiny(method="vcd", alpha=5.0)
    assert methods_of(vcd(photos[0], question=QUESTION, alpha=None))["vcd"]["alpha"] == 5.0
    assert methods_of(vcd(photos[0], question=QUESTION, method_settings={"alpha": None}))["vcd"]["alpha"] == 5.0
