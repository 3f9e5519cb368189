"""``pipeline("hallucination-mitigation")`` on the tiny random LLaVA (``weights="none"``: a 4-layer
LLaMA, an 84 px CLIP tower with a 6x6 token grid, a character-level tokenizer; no network): input
forms, batching with left padding, the stock model when no method runs, every method and the
combinations, attention pictures, sampling seeds, loading from a folder, and the typed errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import InvalidInputError, InvalidOptionError, OfflineError, UnknownNameError, WeightsError
from attnzoo.multimodal.hallucination import VAR, InterventionConflictError, LayoutError
from attnzoo.multimodal.hallucination.methods import METHODS, build_methods, canonical_spec
from attnzoo.multimodal.hallucination.models import LVLMCheckpoint, processor_for, tiny_llava, tiny_lvlm
from tests.lvlm_helpers import attn_implementations, module_hooks

TASK = "hallucination-mitigation"
VAR_ON_TINY = {"sink_dims": (3, 7), "tau": 2.0}  # tau 20 never fires on a width-64 model
QUESTIONS = ["Is there a dog in the image?", "What colour is the car on the left of the picture?", "Cat?"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ask():
    return attnzoo.pipeline(TASK, weights="none", device="cpu", max_new_tokens=4)


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48 + 9 * i, 70, 3), dtype=np.uint8)) for i in range(3)]


def stock_tokens(ask, image, question, max_new_tokens=4):
    """Plain transformers: the processor's prompt and ``generate`` without any attnzoo code."""
    prompt = ask.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = ask.processor(images=[image], text=[prompt], return_tensors="pt")
    out = ask.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def test_input_forms_and_batching(ask, photos):
    one = ask(photos[0], question=QUESTIONS[0])
    assert one.question == QUESTIONS[0] and one.prompt == f"USER: <image>\n{QUESTIONS[0]} ASSISTANT:"
    assert one.settings["method"] == "none" and one.settings["decoding"]["mode"] == "greedy" and one.seed is None
    assert ask.weights_label.startswith("random") and "tiny LLaVA" in ask.weights_label
    assert repr(ask).startswith("HallucinationMitigationPipeline(task='hallucination-mitigation', model=")
    assert repr(ask).endswith("device='cpu', dtype=torch.float32)")
    batched = ask(photos, question=QUESTIONS, batch_size=3)  # prompts of three lengths: left padding
    assert [r.answer for r in batched] == [ask(p, question=q).answer for p, q in zip(photos, QUESTIONS)]
    many = ask(photos[0], question=QUESTIONS[:2])  # one image, several questions
    dicts = ask([{"image": photos[0], "question": q} for q in QUESTIONS[:2]], batch_size=2)
    assert (
        [r.answer for r in many]
        == [r.answer for r in dicts]
        == [batched[0].answer, ask(photos[0], question=QUESTIONS[1]).answer]
    )
    record = one.to_dict()
    assert record["answer"] == one.answer and record["model"] == "attnzoo/tiny-random-llava"
    assert one.summary().startswith(repr(QUESTIONS[0]))


def test_no_method_is_the_stock_model_before_and_after_methods(ask, photos):
    hooks, implementations = module_hooks(ask.model), attn_implementations(ask.model)
    plain = ask(photos[1], question=QUESTIONS[1])
    expected = stock_tokens(ask, photos[1], QUESTIONS[1])
    assert plain.token_ids == expected[: len(plain.token_ids)] and plain.token_ids
    ask(photos[1], question=QUESTIONS[1], method="var+vcd", **VAR_ON_TINY)
    ask(photos[1], question=QUESTIONS[1], method="pai", return_attention=True)
    assert module_hooks(ask.model) == hooks and attn_implementations(ask.model) == implementations
    assert ask(photos[1], question=QUESTIONS[1]).token_ids == plain.token_ids


@pytest.mark.parametrize(
    "method, settings",
    [
        ("var", VAR_ON_TINY),
        ("pai", {}),
        ("pai", {"gamma": 1.0}),
        ("paint", {"alpha": 0.5}),
        ("vcd", {"alpha": 0.5}),
        ("carve", {"layers": (2, 3), "probe_tokens": 2}),
        ("var+vcd", VAR_ON_TINY),
        ("pai+vcd", {"beta": 0.3, "gamma": 1.0}),
        ("carve+vcd", {"layers": (2, 3), "probe_tokens": 2}),
    ],
)
def test_every_method_and_combination_answers(ask, photos, method, settings):
    results = ask(photos[:2], question=QUESTIONS[:2], method=method, batch_size=2, **settings)
    ran = results[0].settings
    assert ran["method"] == method and [m["method"] for m in ran["methods"]] == method.split("+")
    assert all(isinstance(r.answer, str) and r.token_ids for r in results)
    for given, value in settings.items():  # a shared setting reaches every method that takes it
        recorded = [_plain(m[given]) for m in ran["methods"] if given in m]
        assert recorded and all(v == _plain(value) for v in recorded)
    if method == "pai":
        assert ran["methods"][0]["cfg"] == ("off (gamma 1)" if settings else "on")
    if method.startswith("carve"):  # the official final pass sees [original, refined]
        assert results[0].prompt.count("<image>") == 2


def test_agla_and_var_with_a_blip_model(ask, photos, tmp_path):
    from tests.multimodal.lvlm_prompts import tiny_blip_itm

    blip, blip_processor = tiny_blip_itm(tmp_path)
    spec = {"var": VAR_ON_TINY, "agla": {"blip_model": blip, "blip_processor": blip_processor}}
    results = ask(photos[:2], question=QUESTIONS[:2], method=spec, batch_size=2, do_sample=True, seed=1)
    assert results[0].settings["method"] == "var+agla" and results[0].seed == 1
    assert results[0].settings["methods"][1]["alpha"] == 2.0  # AGLA's official POPE setting


@pytest.mark.parametrize("method", ["vcd", "var+vcd", "pai+vcd", "agla"])
def test_batched_contrast_answers_as_the_separate_branch(ask, photos, tmp_path, method):
    """The contrast branch as rows of the main generate (default) or as its own forward: the same
    answers for a batch of prompts of different lengths, greedy and sampled, the mode recorded; the
    attention picture of the main rows is the same within float32 batching noise."""
    from tests.multimodal.lvlm_prompts import tiny_blip_itm

    settings = dict(VAR_ON_TINY) if "var" in method else {}
    if method == "agla":
        blip, blip_processor = tiny_blip_itm(tmp_path)
        settings = {"blip_model": blip, "blip_processor": blip_processor, "behaviour": "paper"}
    for decoding in ({}, {"do_sample": True, "seed": 2}):
        runs = [
            ask(
                photos[:2], question=QUESTIONS[:2], method=method, batch_size=2, batched=batched, **decoding, **settings
            )
            for batched in (True, False)
        ]
        assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]
        assert [r.settings["methods"][-1]["batched"] for r in (runs[0][0], runs[1][0])] == [True, False]
    if method == "vcd":
        pictures = [
            ask(photos[1], question=QUESTIONS[1], method="vcd", batched=b, return_attention=True) for b in (True, False)
        ]
        np.testing.assert_allclose(pictures[0].attention, pictures[1].attention, atol=1e-6, rtol=1e-5)
        np.testing.assert_array_equal(pictures[0].baseline_attention, pictures[1].baseline_attention)


def test_carve_final_pass_from_the_probes_prefix_answers_alike(ask, photos, monkeypatch):
    """CARVE's probes share one general probe and one image prefix per distinct image, and its
    official final pass continues from that prefix's KV cache: the same answers as probing every
    prompt on its own and recomputing the whole prompts, greedy and sampled, for prompts of different
    lengths; return_attention and a paired contrast branch run on the whole prompts."""
    from attnzoo.multimodal.hallucination import carve
    from attnzoo.multimodal.hallucination.layouts import LlavaFamily
    from attnzoo.multimodal.hallucination.method import CachedPrefix

    continued = []
    original = CachedPrefix.generate_inputs
    monkeypatch.setattr(CachedPrefix, "generate_inputs", lambda self: continued.append(1) or original(self))
    settings = {"method": "carve", "layers": (2, 3), "probe_tokens": 3, "batch_size": 3, "max_new_tokens": 6}
    asked = [photos[0], photos[1], photos[0]]
    for decoding in ({}, {"do_sample": True, "seed": 2}):
        with monkeypatch.context() as alone:
            alone.setattr(LlavaFamily, "continues_cached_prompts", False)
            alone.setattr(carve, "_image_groups", lambda images: list(range(len(images))))
            alone.setattr(carve, "_shared_prefix_layout", lambda family, inputs, groups: (dict(inputs), None))
            separate = ask(asked, question=QUESTIONS, **settings, **decoding)
        shared = ask(asked, question=QUESTIONS, **settings, **decoding)
        assert [r.token_ids for r in shared] == [r.token_ids for r in separate]
        assert [r.answer for r in shared] == [r.answer for r in separate]
    assert len(continued) == 2  # once per batch with the cache
    ask(photos[0], question=QUESTIONS[0], **settings, return_attention=True)
    ask(photos[:2], question=QUESTIONS[:2], **{**settings, "method": "carve+vcd"})  # paired: whole prompts
    assert len(continued) == 2
    separate_branch = {**settings, "method": "carve+vcd", "batched": False}  # VCD's own forward beside the cache
    with monkeypatch.context() as alone:
        alone.setattr(LlavaFamily, "continues_cached_prompts", False)
        whole = ask(asked, question=QUESTIONS, **separate_branch)
    assert [r.token_ids for r in ask(asked, question=QUESTIONS, **separate_branch)] == [r.token_ids for r in whole]
    assert len(continued) == 3


@pytest.mark.parametrize("behaviour", ["official", "paper"])
def test_carve_with_beam_search_answers_on_the_whole_refined_prompts(ask, photos, monkeypatch, behaviour):
    """Beam search repeats the rows of the prompts, so CARVE's final pass runs the whole prompts (not the
    probes' cached prefix): the answers are beam search's own on the refined prompts."""
    calls = []
    original = type(ask.model).generate
    monkeypatch.setattr(type(ask.model), "generate", lambda self, **kw: calls.append(kw) or original(self, **kw))
    from attnzoo.multimodal.hallucination.transformers_compat import beams_keep_prompt_images

    settings = {"layers": (2, 3), "probe_tokens": 2, "max_new_tokens": 3, "behaviour": behaviour}
    if behaviour == "official" and not beams_keep_prompt_images(ask.model):  # transformers < 5.19
        with pytest.raises(InvalidOptionError, match="5.19"):
            ask(photos[:2], question=QUESTIONS[:2], method="carve", num_beams=2, batch_size=2, **settings)
        return
    results = ask(photos[:2], question=QUESTIONS[:2], method="carve", num_beams=2, batch_size=2, **settings)
    (call,) = calls
    assert call["num_beams"] == 2 and not any(k in call for k in ("cache", "past_key_values"))
    with torch.no_grad():
        direct = original(ask.model, **call)[:, call["input_ids"].shape[1] :]
    for result, row in zip(results, direct, strict=True):
        assert result.token_ids == row[: len(result.token_ids)].tolist()
    assert call["pixel_values"].shape[0] == (4 if behaviour == "official" else 2)  # [original, refined] or refined
    # every beam row of a prompt sees that prompt's images, in order: its first logits are the prompt's
    prompts = {k: v for k, v in call.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        alone = ask.model(**prompts).logits[:, -1]
    beams = _first_forward_rows(ask.model, prompts, num_beams=2)
    torch.testing.assert_close(beams, alone.repeat_interleave(2, dim=0), atol=1e-5, rtol=1e-5)


def test_carve_official_with_beam_search_is_refused_where_transformers_mixes_the_images(ask, photos, monkeypatch):
    """Before transformers 5.19, generate repeats pixel_values row by row for beam search, so a prompt of
    two images gets [A, A] and [B, B] in its beam rows: CARVE's official final pass is refused there."""
    from attnzoo.multimodal.hallucination import CARVE, transformers_compat

    monkeypatch.setattr(transformers_compat, "beams_keep_prompt_images", lambda model: False)
    settings = {"layers": (2, 3), "probe_tokens": 2, "max_new_tokens": 2}
    probes = []
    with monkeypatch.context() as probing:
        probing.setattr(CARVE, "_probe", lambda *args, **kwargs: probes.append(1))
        with pytest.raises(InvalidOptionError, match=r"transformers >= 5.19 .*behaviour='paper'"):
            ask(photos[0], question=QUESTIONS[0], method="carve", num_beams=2, **settings)
    assert not probes  # refused before CARVE's probes ran
    assert ask(photos[0], question=QUESTIONS[0], method="carve", num_beams=2, behaviour="paper", **settings).answer


def test_compositions_and_settings_are_checked(ask, photos):
    for spec, message in [
        ("var+pai", "both edit the language model's attention"),
        ("vcd+agla", "each contrast the model's logits"),
        ("carve+var", "probes read the stock model's attention"),
        ("var+var", "listed twice"),
        ("carve+agla", r"\[original, refined\].*behaviour='paper'"),
    ]:
        with pytest.raises(InterventionConflictError, match=message):
            build_methods(spec, **({"sink_dims": (3, 7)} if "var" in spec else {}))
    with pytest.raises(InvalidOptionError, match="unknown method 'dola'.*var, pai, paint, vcd, agla, carve"):
        ask(photos[0], question="x", method="dola")
    with pytest.raises(InvalidOptionError, match="alpha are taken by no method of var"):
        attnzoo.pipeline(TASK, weights="none", device="cpu", method="var", alpha=0.5)
    assert [m.name for m in build_methods("var,vcd", strict=False, alpha=0.5, sink_dims="3,7")] == ["var", "vcd"]
    assert build_methods("var", sink_dims="3,7")[0].intervention.sink_dims == (3, 7)  # the command line's text
    assert build_methods(None) == build_methods("none") == []
    assert [m.name for m in build_methods("carve+agla", behaviour="paper")] == ["carve", "agla"]
    var = attnzoo.pipeline(TASK, weights="none", device="cpu", max_new_tokens=2, method="var", sink_dims=(3, 7))
    assert var(photos[0], question="x", tau=2.5).settings["methods"][0]["sink_dims"] == (3, 7)  # settings merge
    with pytest.warns(UserWarning, match="sink_dims, given for its method, do not apply"):  # its own settings
        assert var(photos[0], question="x", method="vcd").settings["methods"][0]["method"] == "vcd"
    own = VAR(sink_dims=(3, 7), tau=2.0)
    assert build_methods([own, "vcd"])[0].intervention is own
    assert set(METHODS) == {"var", "pai", "paint", "vcd", "agla", "carve"}


def test_each_method_of_a_composition_takes_its_own_settings(ask, photos):
    """A setting two methods of a composition read differently (alpha: PAI's attention boost, VCD's
    contrast), given once, is refused, naming each default and how to give each its own; in parentheses
    (the command line's --method) or a dict, each method runs with its own value."""
    defaults = {name: build_methods(name)[0].describe()["alpha"] for name in ("pai", "vcd")}
    assert defaults["pai"] != defaults["vcd"]  # the premise: two meanings of alpha
    with pytest.raises(InvalidOptionError) as err:
        build_methods("pai+vcd", alpha=1.0)
    message = str(err.value)
    assert all(f"{name} (default {value})" in message for name, value in defaults.items())
    assert "--method 'pai(alpha=1.0)+vcd(alpha=1.0)'" in message
    with pytest.raises(InvalidOptionError, match="read it differently"):
        ask(photos[0], question=QUESTIONS[0], method="pai+vcd", alpha=1.0)
    text = build_methods("pai(alpha=0.5, gamma=1)+vcd(alpha=2,beta=0.1, batched=false)")
    mapping = build_methods({"pai": {"alpha": 0.5, "gamma": 1.0}, "vcd": {"alpha": 2.0, "beta": 0.1, "batched": False}})
    assert [m.describe() for m in text] == [m.describe() for m in mapping]
    assert text[0].describe()["cfg"] == "off (gamma 1)"
    shared = build_methods("pai(alpha=0.3)+vcd", alpha=2.0)  # the shared value goes where no own one is
    assert [m.describe()["alpha"] for m in shared] == [0.3, 2.0]
    assert build_methods("carve(layers=1,2,3, probe_tokens=4)")[0].describe()["layers"] == (1, 2, 3)
    assert build_methods("pai(end_layer=none)")[0].describe()["end_layer"] is None
    carve = build_methods("carve(general_instruction=Describe it, in detail.  , layers=1, 2,3)")[0].describe()
    assert carve["general_instruction"] == "Describe it, in detail." and carve["layers"] == (1, 2, 3)  # as typed
    assert build_methods("var(sink_dims=none)")[0].describe()["sink_dims"] is None
    assert build_methods("pai(gamma=none)")[0].describe()["gamma"] == build_methods("pai")[0].describe()["gamma"]
    with pytest.raises(InvalidOptionError, match="alpha given once for all and again in the parentheses"):
        build_methods("pai(alpha=0.5)", alpha=1.0)  # the shared value would go nowhere, yet be recorded
    assert build_methods("pai(alpha=0.5)", strict=False, alpha=1.0)[0].describe()["alpha"] == 0.5
    assert canonical_spec(" PAI( alpha = 0.5 ) + vcd") == canonical_spec("pai(alpha=0.5)+vcd") == "pai(alpha=0.5)+vcd"
    assert canonical_spec("baseline") == "none"
    result = ask(photos[0], question=QUESTIONS[0], method="pai(alpha=0.5)+vcd(alpha=2)")
    assert [m["alpha"] for m in result.settings["methods"]] == [0.5, 2.0] and result.token_ids
    for spec, refusal in [
        ("pai(alpha=abc)", "pai's alpha must be a number"),
        ("pai(start_layer=2.5)", "pai's start_layer must be a whole number"),
        ("vcd(batched=maybe)", "vcd's batched must be true or false"),
        ("pai(foo=1)", "pai takes alpha.*not foo"),
        ("pai(alpha=1", "leaves a parenthesis open"),
        ("pai)+vcd", "closes a parenthesis"),
        ("pai(0.5)", "start without a name"),
        ("pai(alpha=1,alpha=2)", "alpha twice"),
        ("none(alpha=1)", "takes no settings"),
        ("(alpha=1)", "not a name"),
    ]:
        with pytest.raises(InvalidOptionError, match=refusal):
            build_methods(spec)


def test_return_attention_and_the_picture(ask, photos, tmp_path):
    traced = VAR(trace=True, **VAR_ON_TINY)
    out = ask(photos[0], question=QUESTIONS[0], method=traced, return_attention=True)
    assert out.attention.shape == out.baseline_attention.shape == (6, 6) and out.baseline_answer is not None
    assert any(bool(r["edited"].any()) for r in traced.records)  # VAR edited rows, so the maps differ
    assert not np.allclose(out.attention, out.baseline_attention)
    assert np.isfinite(out.attention).all() and (out.attention >= 0).all() and out.attention.sum() <= 1.0 + 1e-5
    assert out.view.size == (84, 84)  # the CLIP crop the grid lies on
    picture = out.plot()
    picture.save(tmp_path / "var.png")
    assert Image.open(tmp_path / "var.png").size == picture.size and picture.width > 3 * 256
    from attnzoo.viz.drawing import NOTE_COLOUR

    text = np.asarray(picture)[22 + 256 :]  # below the panels: the random-weights line in the pictures' note colour
    assert (np.abs(text.astype(int) - NOTE_COLOUR).sum(-1) < 60).any()
    plain = ask(photos[0], question=QUESTIONS[0], return_attention=True, attention_layers="2-3")
    assert plain.baseline_attention is None and plain.attention.shape == (6, 6)
    assert 2 * 256 < plain.plot().width < 3 * 256
    assert "attention" in plain.to_dict() and np.asarray(plain.to_dict()["attention"]).shape == (6, 6)
    tall = dataclasses.replace(out, view=Image.new("RGB", (10, 600)))  # e.g. a Qwen2-VL view of a 1:60 image
    sheet = tall.plot(size=64)
    assert sheet.height < 22 + 64 + 16 * 14 and sheet.width >= 3 * 64  # each picture fits the box, titles whole
    wide = dataclasses.replace(tall, answer="WWW MMM " * 30).plot(size=64)  # wide letters: wrapped by drawn width
    assert (np.asarray(wide)[22 + 64 + 8 :, -8:] == 255).all()  # the right margin stays white


def _attention_by_one_forward(ask, images, question, token_ids):
    """The answer's attention over each image's grid recomputed without the pipeline: one eager forward
    of prompt + answer, rows of the steps that chose the answer's tokens, mean over heads and layers."""
    from attnzoo.multimodal.hallucination.base import eager_language_model

    inputs = ask._encode([images], [question], template="model")
    prompt = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([token_ids])], dim=1)
    mask = torch.ones_like(ids)
    with torch.no_grad(), eager_language_model(ask.model, ask.family):
        out = ask.model(**{**inputs, "input_ids": ids, "attention_mask": mask}, output_attentions=True)
    rows = torch.stack([a[0].mean(0) for a in out.attentions]).mean(0)  # [S, S], mean over heads, layers
    steps = rows[prompt - 1 : prompt - 1 + max(len(token_ids), 1)].mean(0)
    image = torch.nonzero(ids[0] == ask.model.config.image_token_id).flatten().split(36)
    return [steps[positions].reshape(6, 6).numpy() for positions in image]


@pytest.mark.parametrize("behaviour", ["official", "paper"])
def test_carve_attention_is_drawn_on_the_images_the_answer_saw(ask, photos, behaviour):
    """CARVE answers on [original, refined] (official) or the refined image (paper): each grid is the
    answer's attention over its own image, drawn over that image; the stock answer's over the original."""
    from attnzoo.multimodal.hallucination import CARVE

    carve = CARVE(layers=(2, 3), probe_tokens=2, behaviour=behaviour)
    out = ask(photos[1], question=QUESTIONS[1], method=carve, return_attention=True)
    refined = carve.last_results[0].crop.refined_image
    seen = [photos[1], refined] if behaviour == "official" else [refined]
    expected = _attention_by_one_forward(ask, seen, QUESTIONS[1], out.token_ids)
    stock = _attention_by_one_forward(ask, [photos[1]], QUESTIONS[1], ask(photos[1], question=QUESTIONS[1]).token_ids)
    np.testing.assert_allclose(out.baseline_attention, stock[0], atol=1e-6)
    np.testing.assert_allclose(out.attention, expected[0], atol=1e-6)
    record = out.to_dict()
    if behaviour == "official":
        assert out.answered_on == ("original", "refined") and record["answered_on"] == ["original", "refined"]
        np.testing.assert_allclose(out.refined_attention, expected[1], atol=1e-6)
        np.testing.assert_allclose(record["refined_attention"], expected[1], atol=1e-6)
        assert not np.allclose(out.view, out.refined_view)
    else:
        assert out.answered_on == ("refined",) and out.refined_attention is None and out.refined_view is None
    processor = ask.processor.image_processor

    def clip_view(image):  # the image as CLIP's processor resizes and crops it, in 0..255
        pixels = processor(image, return_tensors="pt")["pixel_values"][0].permute(1, 2, 0).numpy()
        return (pixels * np.array(processor.image_std) + np.array(processor.image_mean)) * 255

    refined_view = out.refined_view if behaviour == "official" else out.view
    for view, image in ((refined_view, refined), (out.baseline_view, photos[1])):
        assert np.abs(np.asarray(view, float) - clip_view(image)).max() <= 1.0
    if behaviour == "official":
        assert np.abs(np.asarray(out.view, float) - clip_view(photos[1])).max() <= 1.0
    panels = 4 if behaviour == "official" else 3
    assert panels * 256 < out.plot().width < (panels + 1) * 256


def test_sdpa_model_switches_to_eager_for_attention_and_back(photos):
    model = tiny_llava()
    assert model.config.text_config._attn_implementation == "sdpa"
    ask = attnzoo.pipeline(TASK, model=model, processor=processor_for(model), device="cpu", max_new_tokens=2)
    assert ask(photos[0], question="dog?", return_attention=True).attention.shape == (6, 6)
    assert model.config.text_config._attn_implementation == "sdpa"
    eager = attnzoo.pipeline(TASK, model=model, device="cpu", attn_implementation="eager", max_new_tokens=2)
    assert eager.model.config.text_config._attn_implementation == "eager"


def test_sampling_seeds(ask, photos):
    kwargs = dict(question=QUESTIONS[0], do_sample=True, temperature=1.5, max_new_tokens=6)
    first, again = ask(photos[0], seed=4, **kwargs), ask(photos[0], seed=4, **kwargs)
    assert first.answer == again.answer and first.seed == 4
    draws = {ask(photos[0], seed=s, **kwargs).answer for s in range(6)}
    assert len(draws) > 1
    per_input = ask([{"image": photos[0], "seed": s} for s in (4, 5)], **kwargs, batch_size=2)
    assert per_input[0].answer == first.answer and per_input[1].seed == 5
    assert first.settings["decoding"] == {
        "mode": "sampled",
        "do_sample": True,
        "temperature": 1.5,
        "top_p": 1.0,
        "top_k": None,
        "num_beams": 1,
        "max_new_tokens": 6,
        "seed": 4,  # the call's seed: the one this answer drew with (was the pipeline default, 0)
    }
    assert [r.settings["decoding"]["seed"] for r in per_input] == [4, 5]
    assert [r.to_dict()["decoding"]["seed"] for r in per_input] == [4, 5]
    assert ask(photos[0], **kwargs).settings["decoding"]["seed"] == 0  # no seed given: the default drew


def test_loading_by_name_from_a_folder_and_offline(tmp_path, photos, monkeypatch):
    model = tiny_llava()
    model.save_pretrained(tmp_path / "tiny")
    processor_for(model).save_pretrained(tmp_path / "tiny")
    handle = attnzoo.create_model("llava-hf/llava-1.5-7b-hf", pretrained=True)
    assert isinstance(handle, LVLMCheckpoint) and handle.name_or_path == "llava-hf/llava-1.5-7b-hf"
    one = attnzoo.pipeline(TASK, model="llava_1_5_7b", weights=str(tmp_path / "tiny"), device="cpu", dtype="float64")
    two = attnzoo.pipeline(
        TASK, model="llava_1_5_7b", weights=str(tmp_path / "tiny"), device="cpu", dtype="float64", method="vcd"
    )
    assert one.model is two.model and one.model.dtype == torch.float64  # loaded once, in the dtype asked for
    assert one(photos[0], question="dog?", max_new_tokens=2).answer is not None
    from transformers import AutoModelForImageTextToText

    loads = []
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: loads.append(a))
    for name, expected in (("qwen2_vl_7b_instruct", "qwen2_vl"), ("llava_v1_6_vicuna_7b", "llava_next")):
        with pytest.raises(WeightsError, match=f"holds a 'llava' checkpoint, but {name} is a '{expected}' model"):
            attnzoo.pipeline(TASK, model=name, weights=str(tmp_path / "tiny"), device="cpu", dtype="float32")
    assert not loads  # refused from the config, before any weights are read
    with pytest.raises(
        WeightsError,
        match=r"give it as weights with a name of its architecture as the model \(llava_1_5_7b, llava_1_5_13b\)",
    ):
        attnzoo.pipeline(TASK, model="qwen2_vl_7b_instruct", weights=str(tmp_path / "tiny"), device="cpu")
    monkeypatch.undo()
    qwen = attnzoo.pipeline(TASK, model="Qwen/Qwen2-VL-7B-Instruct", weights="none", device="cpu")
    assert (
        qwen.family.name == "Qwen2-VL"
        and qwen.weights_label == "random (seed 0), tiny Qwen2-VL (attnzoo/tiny-random-qwen2-vl)"
    )
    with pytest.raises(InvalidOptionError, match="attn_implementation='bogus'"):  # not a load failure
        attnzoo.pipeline(TASK, model="llava_1_5_7b", weights=str(tmp_path / "tiny"), attn_implementation="bogus")
    if importlib.util.find_spec("flash_attn") is None:  # transformers refuses it while loading
        with pytest.raises(InvalidOptionError, match="attn_implementation='flash_attention_2'"):
            attnzoo.pipeline(
                TASK, model="llava_1_5_7b", weights=str(tmp_path / "tiny"), attn_implementation="flash_attention_2"
            )
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    with pytest.raises(OfflineError, match="llava-hf/llava-1.5-7b-hf"):
        attnzoo.pipeline(TASK, device="cpu")


@pytest.mark.parametrize("offline", [True, False])
def test_a_model_without_processor_loads_its_processor_from_the_cache_only(offline, monkeypatch):
    """Offline (or with the Hub unreachable) the processor of a model given without one is read from the
    cache only: a missing copy fails at once, typed and named, instead of after the Hub client's retries."""
    from attnzoo.weights import hub

    model = type(tiny_llava())(tiny_llava().config)  # no processor attached
    model.name_or_path = model.config._name_or_path = "attnzoo-tests/no-such-lvlm"
    if offline:
        monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    else:
        monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(socket.socket, "connect", _no_network)  # cache only: not one connection
    with pytest.raises(OfflineError, match="processor of attnzoo-tests/no-such-lvlm.*processor=") as info:
        attnzoo.pipeline(TASK, model=model, device="cpu")
    assert "--weights" not in str(info.value)
    model.name_or_path = model.config._name_or_path = "/no/such/folder/lvlm"
    with pytest.raises(WeightsError, match="no such folder /no/such/folder/lvlm"):
        attnzoo.pipeline(TASK, model=model, device="cpu")


def test_a_bad_attn_implementation_is_a_named_option_error(photos):
    model = tiny_llava()
    bad = ["bogus"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") is None else [])
    for name in bad:
        with pytest.raises(InvalidOptionError, match=f"attn_implementation='{name}'"):
            attnzoo.pipeline(TASK, model=model, device="cpu", attn_implementation=name)
        assert attn_implementations(model) == attn_implementations(tiny_llava())  # left as it was
    ask = attnzoo.pipeline(TASK, model=model, device="cpu", attn_implementation="eager", max_new_tokens=2)
    assert ask(photos[0], question="dog?").settings["attn_implementation"] == "eager"


@pytest.mark.parametrize("settings", [[1, 2], (("alpha", 1.0),), {1: 2.0}, "alpha=1"])
def test_method_settings_must_be_a_mapping(ask, photos, settings):
    with pytest.raises(InvalidOptionError, match="method_settings must map setting names to values"):
        ask(photos[0], question="dog?", method="vcd", method_settings=settings)
    with pytest.raises(InvalidOptionError, match="method_settings must map"):
        ask(photos[0], question="dog?", method="vcd", method_settings=settings, alpha=0.5)
    with pytest.raises(InvalidOptionError, match="method_settings must map"):
        attnzoo.pipeline(TASK, weights="none", device="cpu", method="vcd", method_settings=settings)
    ran = ask(photos[0], question="dog?", method="vcd", method_settings={"alpha": 0.5}, max_new_tokens=1)
    assert ran.settings["methods"][0]["alpha"] == 0.5


@pytest.fixture(scope="module")
def qwen():
    return attnzoo.pipeline(TASK, model=tiny_lvlm("qwen2_vl"), device="cpu", max_new_tokens=2)


def test_an_image_the_processor_refuses_is_named_and_skippable(qwen, ask, photos):
    """Qwen2-VL's processor refuses an aspect ratio over 200: that input fails in preprocessing, named,
    so on_error="skip" answers the others (in one batch, as each alone); an empty image is refused
    before any processor sees it."""
    thin = Image.new("RGB", (500, 1), (120, 30, 200))
    with pytest.raises(InvalidInputError, match="500x1 image: absolute aspect ratio must be smaller than 200"):
        qwen(thin, question="dog?")
    items = [{"image": photos[0], "question": QUESTIONS[0]}, {"image": thin, "question": "dog?"}]
    items.append({"image": photos[1], "question": QUESTIONS[1]})
    results = dict(qwen.iterate(items, batch_size=3, on_error="skip"))
    assert isinstance(results[1], InvalidInputError) and "<Image (500, 1)>" in str(results[1])
    assert [results[0].token_ids, results[2].token_ids] == [
        qwen(photos[i], question=QUESTIONS[i]).token_ids for i in (0, 1)
    ]
    assert ask(thin, question="dog?").token_ids  # LLaVA's CLIP processor takes it
    for empty in (Image.new("RGB", (0, 7)), Image.new("L", (7, 0))):
        with pytest.raises(InvalidInputError, match="empty image of size"):
            ask(empty, question="dog?")


def test_the_command_line_skips_an_image_the_processor_refuses(photos, tmp_path, capsys):
    from attnzoo.cli import main

    photos[0].save(tmp_path / "a.png")
    Image.new("RGB", (500, 1)).save(tmp_path / "thin.png")
    photos[1].save(tmp_path / "b.png")
    files = [str(tmp_path / n) for n in ("a.png", "thin.png", "b.png")]
    args = ["run", TASK, *files, "--question", "dog?", "--model", "qwen2_vl_7b_instruct", "--weights", "none"]
    code = main([*args, "--device", "cpu", "--max-new-tokens", "2", "--out", str(tmp_path / "out")])
    assert code == 1 and "thin.png: the model's image processor refuses this 500x1 image" in capsys.readouterr().err
    written = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert sorted(written) == [files[0], files[2]] and all(r["answer"] is not None for r in written.values())
    long = ["run", TASK, files[0], "--question", "Is there " + "a very " * 50 + "big dog?", "--weights", "none"]
    assert main([*long, "--max-new-tokens", "1", "--out", str(tmp_path / "long")]) == 0  # no file name of 300+ bytes
    agla = ["run", TASK, files[0], "--question", "dog?", "--weights", "none", "--method", "agla"]
    assert main([*agla, "--blip-model", str(tmp_path / "no-blip")]) == 1  # the option reaches AGLA's loader
    said = capsys.readouterr().err
    assert f"AGLA's BLIP-ITM model {tmp_path / 'no-blip'} (blip_model=, --blip-model): no such folder" in said


def test_bad_inputs_are_named(ask, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")
    with pytest.raises(InvalidInputError, match="broken.jpg"):
        ask(broken, question="dog?")
    with pytest.raises(InvalidInputError, match="the question is empty"):
        ask(photos[0], question="  ")
    with pytest.raises(InvalidInputError, match="the question must be text, got int 3"):
        ask(photos[0], question=3)
    with pytest.raises(InvalidOptionError, match="var's tau must be a number, got 'high'"):
        ask(photos[0], question="dog?", method="var", tau="high")
    with pytest.raises(InvalidOptionError, match="var: a setting of the wrong type"):
        ask(photos[0], question="dog?", method="var", tau=[1])
    with pytest.raises(InvalidInputError, match="question= is required"):
        ask(photos[0])
    skipped = list(
        ask.iterate([{"image": broken, "question": "a"}, {"image": photos[0], "question": "b"}], on_error="skip")
    )
    assert isinstance(skipped[0][1], InvalidInputError) and skipped[1][1].answer is not None
    with pytest.raises(InvalidOptionError, match="do_sample=True"):
        ask(photos[0], question="dog?", temperature=0.5)
    for temperature in (1e-320, float("inf"), float("nan"), 0):  # 1e-320 overflowed the logits: NaN sampling
        with pytest.raises(InvalidOptionError, match="temperature must be a finite number >= 1e-4"):
            ask(photos[0], question="dog?", do_sample=True, temperature=temperature)
    with pytest.raises(InvalidOptionError, match="beam"):
        ask(photos[0], question="dog?", do_sample=True, num_beams=2)
    with pytest.raises(InvalidOptionError, match="chat_template"):
        ask(photos[0], question="dog?", chat_template="vicuna")
    assert ask(photos[0], question="dog?", chat_template="llava_v1").prompt.startswith("A chat between")
    with pytest.raises(InvalidOptionError, match="sink dimensions"):  # a backbone VAR has no sink dims for
        ask(photos[0], question="dog?", method="var")


def test_a_model_the_task_cannot_serve(photos):
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(UnknownNameError, match="LVLM family.*llava"):
        attnzoo.pipeline(TASK, model=plain, device="cpu")
    model = tiny_llava()  # a processor that writes 35 image tokens for a model that makes 36
    wrong = processor_for(tiny_llava())
    wrong.num_additional_image_tokens = 0
    ask = attnzoo.pipeline(TASK, model=model, processor=wrong, device="cpu", max_new_tokens=2)
    with pytest.raises(LayoutError, match="image\\(s\\) <Image"):
        ask(photos[0], question="dog?")


@pytest.fixture(scope="module", params=["qwen2_vl", "instructblip"])
def other_family(request):
    model = tiny_lvlm(request.param)
    return request.param, attnzoo.pipeline(TASK, model=model, device="cpu", max_new_tokens=3)


def test_other_families(other_family, photos):
    family, ask = other_family
    assert ask.weights_label.startswith("random, tiny") and ask.family.name in ask.weights_label
    batched = ask(photos[:2], question=QUESTIONS[:2], batch_size=2)
    assert [r.answer for r in batched] == [ask(p, question=q).answer for p, q in zip(photos[:2], QUESTIONS[:2])]
    inputs = ask._encode([photos[0]], [QUESTIONS[0]], template="model")
    stock = ask.model.generate(**inputs, do_sample=False, max_new_tokens=3, pad_token_id=0)
    assert batched[0].token_ids == stock[0, inputs["input_ids"].shape[1] :].tolist()[: len(batched[0].token_ids)]
    assert ask(photos[0], question=QUESTIONS[0], method="var+vcd", **VAR_ON_TINY).settings["method"] == "var+vcd"
    if family == "qwen2_vl":  # a grid of (h/28, w/28) merged patches
        assert batched[0].prompt.count("<|image_pad|>") == 1 and "<|im_start|>assistant" in batched[0].prompt
        out = ask(
            photos[1], question=QUESTIONS[1], method="carve", layers=(2, 3), probe_tokens=2, return_attention=True
        )
        assert out.attention.ndim == 2 and out.attention.shape == out.baseline_attention.shape
    else:  # a Q-Former: no grid to picture or to crop from, said before any answer is generated
        calls = []
        ask.model.generate = lambda *args, **kwargs: calls.append(1)
        try:
            with pytest.raises(LayoutError, match="patch grid"):
                ask(photos[0], question="dog?", return_attention=True)
        finally:
            del ask.model.generate
        assert not calls
        with pytest.raises(LayoutError, match="patch grid"):
            ask(photos[0], question="dog?", method="carve")


def test_other_families_prompt_text_and_markers(other_family, photos):
    """A hand-written template gets the family's own image text (Qwen2-VL: the image token between its
    vision markers; InstructBLIP: none, its processor places the queries), and a question holding an
    image marker is that input's error, skipped with on_error="skip"."""
    family, ask = other_family
    model_prompt = ask._prompt(QUESTIONS[0], "model")
    if family == "qwen2_vl":
        head, tail = model_prompt.split("<|vision_start|><|image_pad|><|vision_end|>")
        literal = head + "{image}" + "{question}" + tail[len(QUESTIONS[0]) :]
    else:
        literal = "{image}{question}"
    assert ask._prompt(QUESTIONS[0], literal) == model_prompt  # the model's own template, written by hand
    assert ask(photos[0], question=QUESTIONS[0], chat_template=literal).token_ids == (
        ask(photos[0], question=QUESTIONS[0]).token_ids
    )
    markers = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>") if family == "qwen2_vl" else ("<image>",)
    for marker in markers:
        with pytest.raises(InvalidInputError, match=f"holds '{re.escape(marker)}'"):
            ask(photos[0], question=f"What is {marker} here?")
    inputs = [{"image": photos[0], "question": f"a {markers[0]} b"}, {"image": photos[1], "question": QUESTIONS[1]}]
    results = list(ask.iterate(inputs, on_error="skip", batch_size=2))
    assert isinstance(results[0][1], InvalidInputError) and results[1][1].answer is not None


def test_seeds_beyond_what_a_generator_takes_are_typed_errors(ask, photos):
    from attnzoo.multimodal.hallucination import VCD

    for call in ({"seed": 2**64}, {"seed": -1}):
        with pytest.raises(InvalidInputError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            ask(photos[0], question="dog?", do_sample=True, **call)
    with pytest.raises(InvalidInputError, match="seed"):
        ask({"image": photos[0], "question": "dog?", "seed": 2**64}, do_sample=True)
    assert ask(photos[0], question="dog?", do_sample=True, seed=2**64 - 1).answer is not None
    with pytest.raises(InvalidOptionError, match="VCD's seed must be a 64-bit integer"):
        VCD(seed=2**63)
    with pytest.raises(InvalidOptionError, match="vcd's seed must be a whole number, got 'fifty'"):
        ask(photos[0], question="dog?", method="vcd", method_settings={"seed": "fifty"})
    with pytest.raises(InvalidOptionError, match="VCD's seed must be a 64-bit integer"):  # text as the CLI gives it
        ask(photos[0], question="dog?", method="vcd", method_settings={"seed": str(2**63)})
    assert VCD(seed=-(2**63)).seed == -(2**63)


def _no_network(*args, **kwargs):
    raise AssertionError("a network connection was attempted")


def _first_forward_rows(model, inputs, **generate_kw):
    """The last-position logits of ``generate``'s first forward (the prompts), every row."""
    rows = []
    handle = model.register_forward_hook(lambda module, args, out: rows.append(out.logits[:, -1]) if not rows else None)
    try:
        with torch.no_grad():
            model.generate(**inputs, **generate_kw, max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    return rows[0]


def test_llava_next_beam_search_on_a_batch_of_mixed_tile_counts():
    """LLaVA-NeXT beam search on a batch whose images differ in tile count: every prompt's beams equal
    that prompt's own run (no refusal); one prompt of two images of different tile counts (CARVE's
    [original, refined]) passes on transformers >= 5.19, whose beam rows then see that prompt's images,
    and is refused, typed, before."""
    import numpy as np
    from PIL import Image

    from attnzoo.multimodal.hallucination.layouts import family_of, llava_next_tile_count
    from attnzoo.multimodal.hallucination.transformers_compat import beams_keep_prompt_images
    from attnzoo.pipelines.hallucination_mitigation import _check_beam_images
    from tests.multimodal.lvlm_prompts import _llava_next_encoder, tiny_model

    model, _ = tiny_model("llava_next")
    model.config.image_grid_pinpoints = [[28, 56], [56, 28], [56, 56]]
    encode = _llava_next_encoder(model)
    rng = np.random.default_rng(0)
    tall, wide = (Image.fromarray(rng.integers(10, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 20), (200, 300)))
    assert [llava_next_tile_count(model.config, image.size[::-1]) for image in (tall, wide)] == [3, 5]
    family = family_of(model)
    _check_beam_images(model, family, [1, 1])

    def beams(images, questions):
        with torch.no_grad():
            out = model.generate(
                **encode(images, questions), num_beams=2, max_new_tokens=4, do_sample=False, pad_token_id=0
            )
        return out[:, -4:].tolist()

    assert beams([tall, wide], ["dog?", "cat?"]) == beams([tall], ["dog?"]) + beams([wide], ["cat?"])
    both = encode([[tall, wide]], ["dog?"])
    if not beams_keep_prompt_images(model):  # transformers < 5.19: the beams would see other images
        with pytest.raises(InvalidOptionError, match="5.19"):
            _check_beam_images(model, family, [2])
        return
    _check_beam_images(model, family, [2])
    with torch.no_grad():
        direct = model(**both).logits[:, -1]
    beam_rows = _first_forward_rows(model, both, num_beams=2)
    torch.testing.assert_close(beam_rows, direct.expand(2, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["pai", "vcd"])
def test_threads_sharing_a_model_take_turns(ask, photos, method):
    """The methods attach to the model and swap its generation config while generate runs: calls from
    several threads on one model answer as one at a time, and the config is the model's own afterwards."""
    import threading

    config = ask.model.generation_config
    serial = [ask(photo, question=question, method=method).token_ids for photo, question in zip(photos, QUESTIONS)]
    answers: dict[int, list] = {}
    errors: list[BaseException] = []

    def answer(index):
        try:
            for _ in range(2):
                answers.setdefault(index, []).append(
                    ask(photos[index], question=QUESTIONS[index], method=method).token_ids
                )
        except BaseException as err:  # noqa: BLE001  reported below
            errors.append(err)

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(photos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert answers == {i: [serial[i], serial[i]] for i in range(len(photos))}
    assert ask.model.generation_config is config


def _no_generate(model, monkeypatch):
    """``model.generate`` recorded instead of run: a refusal must come before the model generates."""
    calls = []
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: calls.append(kwargs))
    return calls


def test_max_new_tokens_must_fit_the_language_models_context(ask, photos, monkeypatch, tmp_path):
    """The tiny LLaVA's LLaMA has 2048 positions: a count that cannot fit after any prompt is refused when the
    pipeline is made, one that cannot fit after this prompt (image tokens included) before generating."""
    assert ask.family.context_length() == ask.model.config.text_config.max_position_embeddings == 2048
    for value in (10**14, 2048):
        with pytest.raises(InvalidOptionError, match=r"max_new_tokens must be an integer in \[1, 2047\].*context"):
            attnzoo.pipeline(TASK, weights="none", device="cpu", max_new_tokens=value)
    for value in (0, True, 2.5, "8"):  # whole numbers only (attnzoo._values.whole_number)
        with pytest.raises(InvalidOptionError, match="max_new_tokens must be"):
            ask(photos[0], question="dog?", max_new_tokens=value)
    calls = _no_generate(ask.model, monkeypatch)
    prompt = len(ask.processor(images=[photos[0]], text=[ask._prompt("dog?", "model")])["input_ids"][0])
    with pytest.raises(
        InvalidOptionError, match=f"prompt of {prompt} tokens.*context of 2048.*at most {2048 - prompt}"
    ):
        ask(photos[0], question="dog?", max_new_tokens=2048 - prompt + 1)
    with pytest.raises(InvalidOptionError, match="max_new_tokens=2000 after a prompt"):  # CARVE's probes never ran
        ask(photos[0], question="dog?", max_new_tokens=2000, method="carve", layers=(2, 3), probe_tokens=2)
    with pytest.raises(InvalidOptionError, match="CARVE's probe_tokens=2000 after a prompt"):
        ask(photos[0], question="dog?", method="carve", layers=(2, 3), probe_tokens=2000)
    assert not calls
    monkeypatch.undo()
    # loading by name: refused from the checkpoint's config.json, before its weights are read
    tiny_llava().save_pretrained(tmp_path / "tiny")
    processor_for(tiny_llava()).save_pretrained(tmp_path / "tiny")
    from transformers import AutoModelForImageTextToText

    loads = []
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: loads.append(a))
    for setting, match in (({"max_new_tokens": 2048}, "context is 2048"), ({"num_beams": 500}, "vocabulary")):
        with pytest.raises(InvalidOptionError, match=match):
            attnzoo.pipeline(TASK, model="llava_1_5_7b", weights=str(tmp_path / "tiny"), device="cpu", **setting)
    assert not loads


class _Generated(Exception):
    """``generate`` was reached (raised in its place: a long answer on the CPU is not the point)."""


def _stop_at_generate(model, monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def generate(*args, **kwargs):
        calls.append(kwargs)
        raise _Generated

    monkeypatch.setattr(model, "generate", generate)
    return calls


def test_carve_final_prompt_is_checked_before_its_probes_where_its_length_is_known(ask, photos, monkeypatch):
    """LLaVA-1.5 gives every image the same tokens, so CARVE's official final prompt [original, refined] is as
    long as the prompt with the original twice: an answer that fits the question's prompt but not that one is
    refused before the probes run (they used to run first), and one that just fits runs, on a final prompt of
    exactly that length. The paper's final prompt (the refined image alone) is the question's length."""
    from attnzoo.multimodal.hallucination import CARVE

    settings = {"method": "carve", "layers": (2, 3), "probe_tokens": 2}
    limit = ask.family.context_length()
    one, two = (
        len(ask.processor(images=[photos[0]] * n, text=[ask._prompt("dog?", "model", n)])["input_ids"][0])
        for n in (1, 2)
    )
    probes = []
    probe = CARVE._probe
    monkeypatch.setattr(CARVE, "_probe", lambda self, *a, **k: probes.append(1) or probe(self, *a, **k))
    calls = _stop_at_generate(ask.model, monkeypatch)
    with pytest.raises(InvalidOptionError, match=f"max_new_tokens={limit - one} after a prompt of {two} tokens"):
        ask(photos[0], question="dog?", max_new_tokens=limit - one, **settings)
    assert not probes and not calls
    with pytest.raises(_Generated):
        ask(photos[0], question="dog?", max_new_tokens=limit - two, **settings)
    assert len(probes) == 1 and calls[0]["input_ids"].shape[1] == two
    with pytest.raises(_Generated):
        ask(photos[0], question="dog?", max_new_tokens=limit - one, behaviour="paper", **settings)
    assert len(probes) == 2 and calls[1]["input_ids"].shape[1] == one


def test_prompts_a_pre_pass_lengthened_are_checked_before_any_contrast_branch(ask, photos, monkeypatch):
    """Where the final prompts' length is known only once the pre-pass ran (CARVE on LLaVA-NeXT or Qwen2-VL:
    the refined image's tokens follow the crop's size, and a bound would refuse runs that fit), an answer that
    does not fit is refused as soon as it returns, before a contrast branch (VCD's noised images, AGLA's BLIP
    GradCAM) is built on them."""
    from attnzoo.multimodal.hallucination import VCD
    from attnzoo.multimodal.hallucination.method import MitigationMethod

    class Lengthens(MitigationMethod):
        name = "lengthens"

        def prepare(self, model, processor, batch):
            longer = dataclasses.replace(batch, questions=[q + " and" * 40 for q in batch.questions])
            return longer.with_images(batch.images)

    monkeypatch.setattr(VCD, "processor", _branch_built)
    calls = _stop_at_generate(ask.model, monkeypatch)
    asked, longer = (
        len(ask.processor(images=[photos[0]], text=[ask._prompt(question, "model")])["input_ids"][0])
        for question in ("dog?", "dog?" + " and" * 40)
    )
    room = ask.family.context_length() - asked  # fits the question's prompt, not the lengthened one
    with pytest.raises(InvalidOptionError, match=f"max_new_tokens={room} after a prompt of {longer} tokens"):
        ask(photos[0], question="dog?", method=[Lengthens(), "vcd"], max_new_tokens=room)
    assert not calls


def _branch_built(*args, **kwargs):
    raise AssertionError("VCD's contrast branch was built on prompts that do not fit")


def test_beams_are_bounded_by_the_vocabulary_and_contrast_branches_take_none(ask, photos, monkeypatch):
    vocab = ask.model.config.text_config.vocab_size
    with pytest.raises(InvalidOptionError, match=rf"num_beams must be an integer in \[1, {vocab}\].*vocabulary"):
        attnzoo.pipeline(TASK, weights="none", device="cpu", num_beams=100000)
    calls = _no_generate(ask.model, monkeypatch)
    with pytest.raises(InvalidOptionError, match="vocabulary"):
        ask(photos[0], question="dog?", num_beams=vocab + 1)
    for method in ("vcd", "pai"):  # VCD's branch, PAI's guidance: one cache per sequence
        with pytest.raises(InvalidOptionError, match=f"{method} run.*num_beams=2 does not apply"):
            ask(photos[0], question="dog?", method=method, num_beams=2)
    assert not calls


def test_a_file_given_where_a_checkpoint_folder_goes_is_named(tmp_path, photos, capsys):
    """A weights file as AGLA's BLIP or as the LVLM's weights was looked up on the Hub ("cannot reach
    huggingface.co"); it is refused, saying what the option takes."""
    from attnzoo.cli import main
    from attnzoo.multimodal.hallucination import AGLA

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    with pytest.raises(InvalidOptionError, match="is a file; it takes a Hub id or a folder.*BlipForImageTextRetrieval"):
        AGLA(blip_model=str(weights))
    with pytest.raises(InvalidOptionError, match=r"weights .* is a file.*saved llava model \(its config.json"):
        attnzoo.pipeline(TASK, model="llava_1_5_7b", weights=str(weights), device="cpu")
    photos[0].save(tmp_path / "a.png")
    run = ["run", TASK, str(tmp_path / "a.png"), "--question", "dog?", "--device", "cpu"]
    assert main([*run, "--weights", "none", "--method", "agla", "--blip-model", str(weights)]) == 2
    assert "--blip-model) " + str(weights) + " is a file" in capsys.readouterr().err
    assert main([*run, "--weights", str(weights)]) == 2
    assert "huggingface.co" not in capsys.readouterr().err


def test_blank_items_and_empty_strings_are_refused(ask, photos):
    """A dropped blank item or an empty string read as "not given" would run something other than what was
    typed (``method=""`` ran the stock model)."""
    for method in ("", " ", "var,,agla", "var++agla", "var+"):
        with pytest.raises(InvalidOptionError, match="method"):
            ask(photos[0], question="dog?", method=method)
    for spec, settings, name in (
        ("var", {"sink_dims": "3,,7"}, "sink_dims"),
        ("carve", {"layers": "1,,2"}, "layers"),
        ("carve", {"layers": "1,2,"}, "layers"),
    ):
        with pytest.raises(InvalidOptionError, match=f"{name} '.*' has a blank item"):
            build_methods(spec, **settings)
    with pytest.raises(InvalidOptionError, match="attention_layers '1,,2' has a blank item"):
        ask(photos[0], question="dog?", return_attention=True, attention_layers="1,,2")
    for keyword in ("attn_implementation", "revision"):
        with pytest.raises(InvalidOptionError, match=f"{keyword} must be a non-empty string"):
            attnzoo.pipeline(TASK, weights="none", device="cpu", **{keyword: ""})
    with pytest.raises(InvalidOptionError, match="weights must be a non-empty string"):
        attnzoo.pipeline(TASK, weights=" ", device="cpu")
    with pytest.raises(InvalidOptionError, match="blip_model.*must be a non-empty string"):
        ask(photos[0], question="dog?", method="agla", blip_model="")


def test_a_small_image_is_magnified_block_by_block_in_the_picture():
    from attnzoo.pipelines.hallucination_mitigation import MitigationResult

    cells = (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)
    result = MitigationResult(question="q?", answer="a", prompt="p", image=Image.fromarray(cells).convert("RGB"))
    panel = np.asarray(result.plot(size=128))[22 : 22 + 128, 8 : 8 + 128]
    assert set(np.unique(panel)) == {0, 255}  # 16 px -> 128 px: each pixel an 8 px block, no grey blur


def test_the_first_panel_says_when_it_shows_the_models_view():
    """A 2000x200 image answered on by a CLIP-style model: the panel showed the 84x84 centre crop (the
    middle tenth of the image) titled "image"."""
    from PIL import ImageDraw

    from attnzoo.pipelines.hallucination_mitigation import MitigationResult
    from attnzoo.viz.drawing import load_font

    x = np.linspace(0, 255, 2000)
    wide = Image.fromarray(
        np.stack([np.tile(x, (200, 1)), np.tile(255 - x, (200, 1)), np.full((200, 2000), 90)], -1).astype(np.uint8)
    )
    square = wide.resize((200, 200))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 84, 3), dtype=np.uint8))
    cases = [
        (wide, wide.crop((900, 0, 1100, 200)).resize((84, 84)), "model's view (centre crop)"),
        (wide, wide.resize((84, 84)), "model's view (stretched)"),
        (square, square.resize((84, 84)), "model's view"),
        (wide, noise, "model's view (reshaped)"),
        (wide, None, "image"),
    ]
    font = load_font(14)
    for image, view, title in cases:
        result = MitigationResult(question="q?", answer="a", prompt="p", image=image, view=view)
        sheet = np.asarray(result.plot(size=128))
        strip = Image.new("RGB", (sheet.shape[1], 22), "white")
        ImageDraw.Draw(strip).text((8, 4), title, fill=(0, 0, 0), font=font)
        expected = np.asarray(strip)
        ink = np.flatnonzero((expected < 255).any((0, 2)))
        assert np.array_equal(sheet[:22, : ink.max() + 2], expected[:, : ink.max() + 2]), title  # the title, whole


def test_the_first_panel_names_the_tiny_models_centre_crop(ask):
    """The tiny LLaVA's CLIP processor crops a 2000x200 image to its middle 200x200: the picture says so."""
    from attnzoo.pipelines.hallucination_mitigation import _image_title

    x = np.linspace(0, 255, 2000)
    wide = Image.fromarray(
        np.stack([np.tile(x, (200, 1)), np.full((200, 2000), 90), np.full((200, 2000), 30)], -1).astype(np.uint8)
    )
    out = ask(wide, question="dog?", return_attention=True, max_new_tokens=1)
    middle = np.asarray(out.view, float)[:, :, 0]
    assert 100 < middle.min() and middle.max() < 155  # the view is the middle tenth: red from 115 to 140
    assert _image_title(out.image, out.view) == "model's view (centre crop)"
    assert _image_title(out.image, out.image) == "image"


def test_attention_layers_past_the_depth_are_refused_before_being_spelled_out(ask, photos):
    """``attention_layers="0-30000000"`` was spelled out (30 million indices, 2.5 GB) before the depth was
    compared, and the error listed them all; a range is checked against the language model's layers first."""
    from attnzoo.pipelines.hallucination_mitigation import _layers

    with pytest.raises(
        InvalidOptionError,
        match=r"^attention_layers '0-30000000' reaches past the language model's 4 layers \(0-30000000\); "
        r"indices run 0\.\.3, or -4\.\.-1 from the last$",
    ):
        _layers("0-30000000", 4)
    with pytest.raises(InvalidOptionError, match=r"reaches past any language model's depth \(0-30000000\)"):
        _layers("0-30000000")  # the depth unknown: a bound no model reaches
    assert _layers("-1,1-2", 4) == (-1, 1, 2) and _layers([0, 3], 4) == (0, 3)
    for layers, outside in (("0-3000,1", "0-3000"), ([0, 7], "7"), ("1,-5", "-5")):
        with pytest.raises(InvalidOptionError) as caught:
            ask(photos[0], question="dog?", return_attention=True, attention_layers=layers)
        assert f"the language model's 4 layers ({outside})" in str(caught.value) and len(str(caught.value)) < 200


def _prompt_parts(pipe, image, question):
    """(tokens, image tokens) of the prompt plain transformers encodes for one image and question."""
    prompt = pipe.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = pipe.processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0]
    return len(ids), int((ids == pipe.model.config.image_token_id).sum())


def test_a_question_that_fills_the_context_alone_is_the_inputs_fault(ask, photos):
    """A question whose prompt alone fills the context was blamed on ``max_new_tokens`` (an InvalidOptionError
    "max_new_tokens=4 after a prompt of ... tokens"); it is the input's error, naming the question and splitting
    the prompt's tokens into the image's and the text's."""
    long_question = "Is there a dog? " * 150  # 2,400 characters: more tokens than the tiny model's 2048
    with pytest.raises(InvalidInputError) as caught:
        ask(photos[0], question=long_question)
    total, image = _prompt_parts(ask, photos[0], long_question)
    assert image == 36 and total >= 2048  # the 6x6 grid; the text overflows
    assert type(caught.value) is InvalidInputError and "max_new_tokens" not in str(caught.value)
    assert re.match(
        rf"^<Image \(70, 48\)>: the prompt of the question 'Is there a dog\? Is there .*' \(2,400 characters\) takes "
        rf"{total:,} tokens \(36 image tokens and {total - 36:,} of text: the template and the question\), which "
        rf"fills the language model's context of 2,048 tokens .*shorten the question \(beside the image tokens, the "
        rf"text has room for 2,011 tokens\)$",
        str(caught.value),
    )
    with pytest.raises(InvalidOptionError, match=r"^max_new_tokens=1000 after a prompt of \d+ tokens"):
        ask(photos[0], question="Is there a dog? " * 100, max_new_tokens=1000)  # fits alone: the setting's fault


def test_the_prompt_too_long_names_the_longest_in_tokens_not_in_characters(photos):
    """Qwen2-VL gives a larger image more tokens: in a batch, the input that overflows is the one whose prompt
    is longest in tokens (a short question on a large image), not the longest question (on a small image, which
    fits alone); the message said the longest question's characters, and to shorten it."""
    qwen = attnzoo.pipeline(TASK, model=tiny_lvlm("qwen2_vl"), device="cpu", max_new_tokens=1)
    small, large = Image.new("RGB", (300, 50), (200, 40, 40)), Image.new("RGB", (1000, 10), (40, 200, 40))
    base, small_image = _prompt_parts(qwen, small, "")
    _, large_image = _prompt_parts(qwen, large, "")
    assert large_image >= small_image + 8  # the larger image takes more tokens
    on_large = "d" * (2048 - (base - small_image + large_image))  # fills the context, exactly
    on_small = "c" * (len(on_large) + 4)  # longer in characters, shorter in tokens: fits alone
    total, image = _prompt_parts(qwen, large, on_large)
    assert image == large_image and total == 2048 and _prompt_parts(qwen, small, on_small)[0] < 2048
    assert qwen(small, question=on_small).answer is not None
    items = [{"image": small, "question": on_small}, {"image": large, "question": on_large}]
    with pytest.raises(InvalidInputError) as caught:
        qwen(items, batch_size=2)
    message = str(caught.value)
    assert (
        message.startswith("<Image (1000, 10)>: the prompt of the question 'ddd") and f"({len(on_large):,} " in message
    )
    assert f"takes 2,048 tokens ({image} image tokens and {2048 - image:,} of text" in message
    assert message.endswith("or pass a smaller image (fewer pixels, fewer image tokens)")


@pytest.mark.parametrize(
    "family, context, question, remedy",
    [
        ("llava", 30, "dog?", "the image tokens alone fill it; LLaVA-1.5 gives every image this many, so no prompt"),
        (
            "llava",
            40,
            "dog?",
            r"the image tokens and the prompt template alone take {fixed} tokens, leaving no room for any "
            r"question: use a shorter chat_template$",
        ),
        (
            "qwen2_vl",
            12,
            "dog?",
            r"the image tokens alone fill it: pass a smaller image \(fewer pixels, fewer image "
            r"tokens\)$",
        ),
        (
            "qwen2_vl",
            90,
            "Is there a dog in the picture?",
            r"shorten the question \(beside the image tokens, the text "
            r"has room for {room} tokens\) or pass a smaller image \(fewer pixels, fewer image tokens\)$",
        ),
    ],
)
def test_the_prompt_too_long_says_what_overflows(photos, family, context, question, remedy):
    """A context the image tokens fill (alone, or with the template: no question fits) is said so, not "shorten
    the question"; where the question is what overflows, the room left for the text is given."""
    model = tiny_lvlm(family)
    model.config.text_config.max_position_embeddings = context  # read before any forward: the refusal comes first
    pipe = attnzoo.pipeline(TASK, model=model, device="cpu", max_new_tokens=1)
    total, image = _prompt_parts(pipe, photos[0], question)
    asked = len(pipe.processor.tokenizer(question, add_special_tokens=False)["input_ids"])
    assert asked == len(question) and total >= context  # a character-level tokenizer; the prompt overflows
    assert (total - asked < context) == remedy.startswith("shorten")  # without the question, it would fit
    with pytest.raises(InvalidInputError) as caught:
        pipe(photos[0], question=question)
    assert re.match(
        rf"^<Image \(70, 48\)>: the prompt of the question {re.escape(repr(question))} \({len(question)} characters\) "
        rf"takes {total} tokens \({image} image tokens and {total - image} of text: the template and the question\), "
        rf"which fills the language model's context of {context} tokens \(max_position_embeddings\) before any answer "
        rf"token: {remedy.format(room=context - 1 - image, fixed=total - asked)}",
        str(caught.value),
    )


def test_a_method_prompt_whose_images_fill_the_context_says_so(photos):
    """CARVE's official final prompt holds two images: where one fits and two fill the context, the message
    said LLaVA-1.5 fits no prompt with an image at all."""
    model = tiny_lvlm("llava")
    pipe = attnzoo.pipeline(TASK, model=model, device="cpu", max_new_tokens=1)
    total, image = _prompt_parts(pipe, photos[0], "dog?")
    context = 2 * image  # the two images alone fill it
    assert total + 1 < context  # the prompt as given, and its answer token, fit
    model.config.text_config.max_position_embeddings = context
    pipe = attnzoo.pipeline(
        TASK, model=model, device="cpu", max_new_tokens=1, method="carve(layers=1,2,3, probe_tokens=2)"
    )
    with pytest.raises(InvalidInputError) as caught:
        pipe(photos[0], question="dog?")
    message = str(caught.value)
    assert re.match(rf"^the prompt as the method lays it out takes \d+ tokens \({2 * image} image tokens and ", message)
    assert message.endswith(
        "the method's prompt holds more images than the one given (CARVE's official "
        "[original, refined]; behaviour='paper' answers on the refined image alone)"
    )


def test_images_too_large_for_memory_are_typed_errors_naming_the_input(ask, photos, monkeypatch):
    """An image given in memory never met the pixel limit files meet, and one under it could still run the
    processor out of memory: both were a raw MemoryError. The image reaches the processor unresized."""
    import attnzoo.datasets.images as images

    monkeypatch.setattr(images, "max_image_pixels", lambda: 70 * 48 - 1)
    array = np.array(photos[0])
    for given in (photos[0], array, torch.from_numpy(array).permute(2, 0, 1).contiguous()):
        with pytest.raises(InvalidInputError, match=r": this 70x48 image has more than the 3,359 pixels an image may"):
            ask(given, question="dog?")
    monkeypatch.undo()

    class OutOfMemory:
        """The model's processor, running out of memory when called (as on a 12000x12000 image)."""

        def __init__(self, processor):
            self.wrapped = processor

        def __getattr__(self, name):
            return getattr(self.wrapped, name)

        def __call__(self, *args, **kwargs):
            raise MemoryError

    monkeypatch.setattr(ask, "processor", OutOfMemory(ask.processor))
    with pytest.raises(
        InvalidInputError,
        match=r"^<Image \(70, 48\)>: the model's processor ran out of memory encoding the image\(s\) \(70x48 pixels\); "
        "pass a smaller image",
    ):
        ask(photos[0], question="dog?")
    monkeypatch.undo()

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(images, "load_image", no_memory)  # reading (an RGB copy of) it
    with pytest.raises(InvalidInputError, match=r"^<Image \(70, 48\)>: reading this image \(70x48\) needs more memory"):
        ask(photos[0], question="dog?")
