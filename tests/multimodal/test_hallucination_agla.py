"""AGLA as the pipeline runs it (method.prepare, interventions attached, generate with
method.logits_processors) on tiny random LLaVA, Qwen2-VL and InstructBLIP with a tiny random BLIP
image-text matcher, greedy and sampled, both behaviours: the assembled scores against the rule
computed by hand on the two branches' logits (official: the augmented image only at the first
token; paper: at every token), the kept share of pixels as a property, composition with VAR, bad
settings, and the model left as the stock model. The batched mode of the paper behaviour (the
augmented prompts as rows of the main generate) against the separate branch: same tokens, same
scores within float32 batching noise, with and without VAR."""

from __future__ import annotations

import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from attnzoo.errors import InvalidInputError, InvalidOptionError, OfflineError, UnknownNameError, WeightsError
from attnzoo.multimodal.hallucination import AGLA, VAR, AGLALogitsProcessor
from attnzoo.multimodal.hallucination.functional import agla_keep_count, blip_caption_text
from tests.lvlm_helpers import greedy, sampled, sharpen_attention
from tests.multimodal.lvlm_prompts import (
    FAMILIES,
    assert_same_run,
    drive,
    extended,
    last_logits,
    photos,
    prompt_batch,
    run_as_pipeline,
    run_contrast,
    set_blip_match,
    stock_state,
    table_processor,
    tiny_blip_itm,
    tiny_model,
)
from tests.vision._reference import load_fixture

QUESTIONS = ["is there a dog in the image", "what color is the car on the left"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return tiny_blip_itm(tmp_path_factory.mktemp("blip"))


def agla_rule(original, augmented, alpha, beta):
    """l_o + alpha l_a, -inf where l_o < log(beta) + max l_o (written out by hand)."""
    combined = original + alpha * augmented
    floor = torch.log(torch.tensor(beta)) + original.max(-1, keepdim=True).values
    return torch.where(original < floor, torch.full_like(combined, -float("inf")), combined)


def test_agla_settings_and_errors(blip):
    model, processor = blip
    assert AGLA().describe() == {
        "method": "agla",
        "behaviour": "official",
        "alpha": 2.0,
        "beta": 0.5,
        "blip_model": "Salesforce/blip-itm-large-coco",
        "gradcam_layer": 6,
        "batched": False,
    }
    paper = AGLA(blip_model=model, blip_processor=processor, behaviour="paper")
    assert paper.describe()["behaviour"] == "paper" and paper.describe()["batched"] is True
    assert AGLA(behaviour="paper", batched=False).describe()["batched"] is False
    with pytest.raises(InvalidOptionError, match="first token"):
        AGLA(batched=True)  # the official behaviour runs its one branch forward on its own
    with pytest.raises(InvalidOptionError, match="batched"):
        AGLA(behaviour="paper", batched=1)
    for bad in ({"alpha": -1}, {"beta": 2}, {"behaviour": "both"}, {"blip_model": nn.Linear(2, 2)}, {"blip_model": ""}):
        with pytest.raises(InvalidOptionError):
            AGLA(**bad)
    with pytest.raises(InvalidOptionError, match="gradcam_layer"):
        AGLA(gradcam_layer=-1)
    with pytest.raises(InvalidOptionError, match="blip_processor"):
        AGLA(blip_model=model).blip()  # a model built from a config has no name to load a processor from
    lvlm, encode = tiny_model("llava")
    with pytest.raises(InvalidOptionError, match="behaviour"):
        AGLALogitsProcessor(lvlm, encode(photos(1), QUESTIONS[:1]), behaviour="code")
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    batch = prompt_batch(encode, photos(1), QUESTIONS[:1])
    with pytest.raises(UnknownNameError, match="llama"):
        AGLA(blip_model=model, blip_processor=processor).logits_processors(LlamaForCausalLM(config), None, batch)


@pytest.mark.parametrize("behaviour", ["official", "paper"])
@pytest.mark.parametrize("family", FAMILIES)
def test_agla_through_generate(blip, family, behaviour):
    model, encode = tiny_model(family)
    sharpen_attention(model)
    batch = prompt_batch(encode, photos(2), QUESTIONS)
    stock, state = last_logits(model, batch.inputs), stock_state(model)
    agla = AGLA(alpha=1.5, beta=0.05, blip_model=blip[0], blip_processor=blip[1], behaviour=behaviour)
    tokens, before, after, (processor,) = run_as_pipeline(model, batch, agla, greedy)
    assert processor.branch_calls == (1 if behaviour == "official" else 3)
    assert processor.describe() == {"method": "agla", "behaviour": behaviour, "alpha": 1.5, "beta": 0.05}
    assert [image.size for image in agla.last_augmented] == [(64, 64)] * 2  # BLIP's input size
    augmented = batch.with_images(agla.last_augmented).inputs
    for step in range(3):
        if step == 0 or behaviour == "paper":
            l_a = last_logits(model, extended(augmented, tokens[:, :step]))
        else:  # the official loop continues the original image's cache: l_a = l_o
            l_a = before[step]
        torch.testing.assert_close(after[step], agla_rule(before[step], l_a, 1.5, 0.05), atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[:, step], after[step].argmax(-1))
    plain_rule = agla_rule(before[0], before[0], 1.5, 0.05)
    assert not torch.allclose(after[0], plain_rule, atol=1e-5, rtol=0)  # the augmented branch changed the scores
    drawn, _, _, (sampler,) = run_as_pipeline(model, batch, agla, sampled, steps=4)
    assert drawn.shape == (2, 4) and sampler.branch_calls == (1 if behaviour == "official" else 4)
    assert stock_state(model) == state and torch.equal(last_logits(model, batch.inputs), stock)


def test_agla_composes_with_var(blip):
    """VAR attached (synthetic sinks: a low tau on two dims), AGLA's processor in generate: the
    edit runs in both branches, the rule holds on the edited model's logits, detaching restores it."""
    model, encode = tiny_model("llava")
    sharpen_attention(model)
    batch = prompt_batch(encode, photos(2), QUESTIONS)
    stock, state = last_logits(model, batch.inputs), stock_state(model)
    agla = AGLA(blip_model=blip[0], blip_processor=blip[1], behaviour="paper")
    alone = run_as_pipeline(model, batch, agla, greedy)[2]
    var = VAR(sink_dims=(0, 1), tau=1.5, summ=0.0, behaviour="paper", trace=True)
    tokens, before, after, _ = run_as_pipeline(model, batch, agla, greedy, interventions=[var])
    assert any(bool(record["edited"].any()) for record in var.records)
    with var.attach(model):
        l_a = last_logits(model, batch.with_images(agla.last_augmented).inputs)
    torch.testing.assert_close(after[0], agla_rule(before[0], l_a, 2.0, 0.5), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after[0], alone[0], atol=1e-4)
    assert stock_state(model) == state and torch.equal(last_logits(model, batch.inputs), stock)


@pytest.mark.parity
@pytest.mark.parametrize(("behaviour", "expected"), [("official", "scores"), ("paper", "rule_scores")])
def test_agla_processor_parity(reference_dir, behaviour, expected):
    """Driven step by step on the fixture's logits: the official behaviour gives the official loop's
    scores (augmented branch at the first token only), the paper's the two-cache rule's."""
    f = load_fixture(reference_dir, "agla_logits")
    settings_ = f.cfg["method_settings"]
    prompt_ids = f.inputs["prompt_ids"]
    processor = table_processor(
        AGLALogitsProcessor,
        f.inputs["logits_cd"],
        prompt_ids.shape[1],
        alpha=settings_["cd_alpha"],
        beta=settings_["cd_beta"],
        behaviour=behaviour,
    )
    scores = drive(processor, prompt_ids, f.inputs["logits_orig"])
    torch.testing.assert_close(scores, f.outputs[expected], **f.tolerance)
    assert processor.branch_calls == (1 if behaviour == "official" else len(scores))


def test_agla_loads_blip_lazily_inside_inference_mode(blip, tmp_path):
    """A hub id (here a saved folder) is loaded on first use, even under inference mode, and gives the
    same augmented views as the model itself; a prompt with several images is refused."""
    model, processor = blip
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    agla = AGLA(blip_model=str(tmp_path))
    lvlm, encode = tiny_model("llava")
    batch = prompt_batch(encode, photos(2), QUESTIONS)
    with torch.inference_mode():
        agla.logits_processors(lvlm, None, batch)
    expected = AGLA(blip_model=model, blip_processor=processor).augment(batch.images, batch.questions)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(agla.last_augmented, expected, strict=True))
    assert agla.describe()["blip_model"] == str(tmp_path)
    several = replace(batch, images=[[image, image] for image in batch.images])
    with pytest.raises(InvalidInputError, match="several images"):
        agla.logits_processors(lvlm, None, several)

    from transformers import BlipForConditionalGeneration

    captioner = BlipForConditionalGeneration(model.config)  # same model type, no image-text-matching head
    captioner.save_pretrained(tmp_path / "captioning")
    processor.save_pretrained(tmp_path / "captioning")
    with pytest.raises(WeightsError, match=r"no image-text-matching checkpoint: it has no itm_head\.bias"):
        AGLA(blip_model=str(tmp_path / "captioning")).blip()


@pytest.mark.parametrize("offline", [True, False])
def test_agla_loads_blip_from_the_cache_only_when_the_hub_cannot_be_used(blip, tmp_path, monkeypatch, offline):
    """Offline mode, or a Hub that does not answer: a BLIP id that is not cached fails at once (no
    retries), typed and named, and so does its processor; a local folder that does not exist is named."""
    from attnzoo.weights import hub

    if offline:
        monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    else:
        monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    lvlm, encode = tiny_model("llava")
    batch = prompt_batch(encode, photos(1), QUESTIONS[:1])
    monkeypatch.setattr(socket.socket, "connect", _no_network)  # cache only: not one connection
    with pytest.raises(OfflineError, match="BLIP-ITM model attnzoo-tests/no-such-blip") as info:
        AGLA(blip_model="attnzoo-tests/no-such-blip").logits_processors(lvlm, None, batch)
    assert "blip_model=" in str(info.value) and "--weights" not in str(info.value)  # --weights loads the LVLM
    model, _ = blip
    monkeypatch.setattr(model, "name_or_path", "attnzoo-tests/no-such-blip")
    with pytest.raises(OfflineError, match="BLIP processor attnzoo-tests/no-such-blip"):
        AGLA(blip_model=model).blip()
    for missing in (tmp_path / "no_such_blip", "./no_such_blip"):
        with pytest.raises(WeightsError, match=f"no such folder {missing}"):
            AGLA(blip_model=str(missing)).blip()
    (tmp_path / "empty").mkdir()  # a folder without a model: transformers' error, typed and named
    with pytest.raises(WeightsError, match=f"BLIP-ITM model {tmp_path / 'empty'}"):
        AGLA(blip_model=str(tmp_path / "empty")).blip()


def test_agla_resolves_its_blip_before_any_prompt_without_loading_its_weights(blip, tmp_path, monkeypatch):
    """check_model (what the pipeline and the evaluator call before anything answers) reads the BLIP's
    config, finds its weights file and loads its processor, but leaves the weights to the first batch; a
    source that cannot load is refused there, typed and naming --blip-model: a folder that is missing, holds
    no weights or another model, and a Hub id whose config or weights are not cached (the Hub cannot be
    reached in the tests) or cannot be fetched. No network is touched."""
    import shutil

    import huggingface_hub.constants
    from transformers import BlipForImageTextRetrieval

    model, processor = blip
    lvlm, _ = tiny_model("llava")
    saved = tmp_path / "blip"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(BlipForImageTextRetrieval, "from_pretrained", _no_weights_loaded)
    agla = AGLA(blip_model=str(saved))
    agla.check_model(lvlm)
    assert agla.blip_model == str(saved) and agla.blip_processor is not None  # the weights wait for the first batch

    cache = tmp_path / "hf_cache"  # a Hub id in Hugging Face's cache, laid out as huggingface_hub writes it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repo, commit = cache / "models--attnzoo-tests--tiny-blip", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    AGLA(blip_model="attnzoo-tests/tiny-blip").check_model(lvlm)
    (repo / "snapshots" / commit / "model.safetensors").unlink()  # its config cached, its weights not
    for name in ("attnzoo-tests/tiny-blip", "attnzoo-tests/no-such-blip"):
        with pytest.raises(OfflineError, match=rf"BLIP-ITM model {name} \(blip_model=, --blip-model\).*no cached copy"):
            AGLA(blip_model=name).check_model(lvlm)

    (tmp_path / "config_only").mkdir()
    shutil.copy(saved / "config.json", tmp_path / "config_only")
    LlamaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        tmp_path / "llama"
    )
    for folder, said in (
        (tmp_path / "missing", "no such folder"),
        (tmp_path / "config_only", "the folder holds no weights"),
        (tmp_path / "llama", "its config.json is of a llama model, not BLIP"),
    ):
        with pytest.raises(WeightsError, match=rf"BLIP-ITM model {folder} \(blip_model=, --blip-model\): {said}"):
            AGLA(blip_model=str(folder)).check_model(lvlm)


def _no_weights_loaded(*args, **kwargs):
    raise AssertionError("BLIP's weights were loaded")


@given(
    seed=st.integers(0, 2**16),
    question=st.sampled_from(QUESTIONS + ["red cat on the left"]),
    match=st.floats(0.02, 0.12),
)
@settings(max_examples=15, deadline=None)
def test_agla_keeps_the_stated_share_of_pixels(blip, seed, question, match):
    """The augmented view keeps k + 1 of the N pixels, k = int(N * min(1 - ITC / 2, 1 - 1e-5)), with
    ITC BLIP's image-text cosine: a better match keeps fewer."""
    model, processor = blip
    image = photos(1, seed=seed)[0]
    set_blip_match(model, match)
    try:
        (augmented,) = AGLA(blip_model=model, blip_processor=processor).augment([image], [question])
        encoded = processor(images=image, text=blip_caption_text(question), return_tensors="pt")
        with torch.no_grad():
            itc = model(**encoded, use_itm_head=False).itm_score[0, 0]
    finally:
        set_blip_match(model, 0.05)
    kept = int((np.asarray(augmented) > 0).any(-1).sum())
    pixels = augmented.width * augmented.height
    assert kept == agla_keep_count(itc, pixels) + 1
    assert kept / pixels == pytest.approx(1 - float(itc) / 2, abs=2 / pixels)


@pytest.mark.parametrize("family", FAMILIES)
def test_agla_batched_equals_the_separate_branch(blip, family):
    """The paper behaviour with the augmented prompts as rows of the main generate: two prompts of
    different lengths, greedy and sampled, alone and with VAR attached, give the separate branch's tokens
    and scores (within float32 batching noise). On Qwen2-VL the augmented square image (64 px) has
    fewer patches than the larger photograph, so the branch half of the paired batch is left-padded
    further."""
    model, encode = tiny_model(family)
    sharpen_attention(model)
    small, large = photos(2)
    batch = prompt_batch(encode, [small, large.resize((110, 100))], QUESTIONS)
    stock, state = last_logits(model, batch.inputs), stock_state(model)
    agla = AGLA(alpha=1.5, beta=0.05, blip_model=blip[0], blip_processor=blip[1], behaviour="paper")
    assert agla.paired_contrast(model, None, batch) is not None
    if family == "qwen2_vl":
        augmented = batch.with_images(agla.last_augmented).inputs
        assert augmented["input_ids"].shape[1] != batch.inputs["input_ids"].shape[1]
    var = VAR(sink_dims=(0, 1), tau=1.5, summ=0.0, behaviour="paper")
    for decoding, interventions in (({}, ()), ({"seeds": [7, 8]}, ()), ({}, (var,))):
        paired = run_contrast(model, batch, agla, 4, paired=True, interventions=interventions, **decoding)
        separate = run_contrast(model, batch, agla, 4, paired=False, interventions=interventions, **decoding)
        assert_same_run(paired, separate)
    official = AGLA(blip_model=blip[0], blip_processor=blip[1])
    assert official.paired_contrast(model, None, batch) is None
    assert stock_state(model) == state and torch.equal(last_logits(model, batch.inputs), stock)


def _no_network(*args, **kwargs):
    raise AssertionError("a network connection was attempted")
