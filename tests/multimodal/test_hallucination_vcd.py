"""VCD as the pipeline runs it (method.prepare, interventions attached, generate with
method.logits_processors) on tiny random LLaVA, Qwen2-VL and InstructBLIP, greedy and sampled: the
combined scores against the rule computed by hand on the two branches' logits (the noised branch
run independently on the whole sequence), the seeded noise, composition with PAI, bad settings, and
the model left as the stock model. The batched mode (the noised prompts as rows of the main
generate) against the separate branch: same tokens, same scores within float32 batching noise,
with and without VAR / PAI attached, and an end-of-sequence token stopping both halves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from attnzoo.errors import InvalidInputError, InvalidOptionError, UnknownNameError
from attnzoo.multimodal.hallucination import PAI, VAR, VCD, InterventionError, VCDLogitsProcessor
from attnzoo.multimodal.hallucination.functional import add_diffusion_noise
from attnzoo.multimodal.hallucination.functional.contrastive import _vcd_schedule
from attnzoo.multimodal.hallucination.method import PromptBatch
from tests.lvlm_helpers import EOS_TOKEN_ID, PAD_TOKEN_ID, greedy, sampled, sharpen_attention
from tests.multimodal.lvlm_prompts import (
    FAMILIES,
    _llava_next_encoder,
    assert_same_run,
    drive,
    extended,
    last_logits,
    photos,
    prompt_batch,
    run_as_pipeline,
    run_contrast,
    stock_state,
    table_processor,
    tiny_model,
)
from tests.vision._reference import load_fixture

QUESTIONS = ["is there a dog", "what color is the car"]


pytestmark = pytest.mark.usefixtures("one_thread")


def vcd_rule(original, noised, alpha, beta):
    """(1 + alpha) l_o - alpha l_cd, -inf where l_o < log(beta) + max l_o (written out by hand)."""
    combined = (1 + alpha) * original - alpha * noised
    floor = torch.log(torch.tensor(beta)) + original.max(-1, keepdim=True).values
    return torch.where(original < floor, torch.full_like(combined, -float("inf")), combined)


def test_vcd_settings_and_errors():
    described = {"method": "vcd", "alpha": 1.0, "beta": 0.2, "noise_step": 500, "seed": 55, "batched": True}
    assert VCD().describe() == described and VCD(batched=False).describe() == {**described, "batched": False}
    assert repr(VCD(alpha=0.5)) == "VCD(alpha=0.5, beta=0.2, noise_step=500, seed=55, batched=True)"
    from attnzoo.multimodal.hallucination.methods import build_methods

    assert repr(build_methods("pai")[0]).startswith("InterventionMethod(method='pai', ")  # the wrapper says which
    bad_settings = ({"alpha": -1}, {"beta": 1.5}, {"beta": -0.1}, {"noise_step": 1000}, {"noise_step": 2.5})
    for bad in (*bad_settings, {"batched": "yes"}):
        with pytest.raises(InvalidOptionError):
            VCD(**bad)
    model, encode = tiny_model("llava")
    batch = prompt_batch(encode, photos(1), QUESTIONS[:1])
    with pytest.raises(InvalidInputError, match="pixel_values"):
        VCD().logits_processors(model, None, PromptBatch([], [], {"input_ids": batch.inputs["input_ids"]}, encode))
    with pytest.raises(InvalidOptionError, match="beta"):
        VCDLogitsProcessor(model, batch.inputs, beta=2.0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(UnknownNameError, match="llama"):
        VCD().logits_processors(LlamaForCausalLM(config), None, batch)


def test_vcd_noise_is_seeded_and_leaves_the_other_inputs():
    pixels = torch.rand(2, 3, 8, 8)
    inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long), "pixel_values": pixels}
    noised = VCD(seed=3).noised_inputs(inputs)
    assert noised["input_ids"] is inputs["input_ids"] and inputs["pixel_values"] is pixels
    assert torch.equal(VCD(seed=3).noised_inputs(inputs)["pixel_values"], noised["pixel_values"])
    assert not torch.equal(VCD(seed=4).noised_inputs(inputs)["pixel_values"], noised["pixel_values"])
    # the forward process at step 500: noised = sqrt(abar) x + sqrt(1 - abar) eps, eps standard normal
    signal, spread = (s[500] for s in _vcd_schedule())
    eps = (noised["pixel_values"] - signal * pixels) / spread
    assert abs(float(eps.mean())) < 0.15 and abs(float(eps.std()) - 1) < 0.15
    torch.manual_seed(7)
    global_draw = VCD(seed=None, noise_step=10).noised_inputs(inputs)["pixel_values"]
    torch.manual_seed(7)
    assert torch.equal(global_draw, add_diffusion_noise(pixels, 10))


def test_vcd_noise_of_an_image_does_not_depend_on_its_batch():
    """Resumed, sharded or re-batched evaluations must draw the same noise for the same image."""
    a, b = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    vcd = VCD(seed=55)
    pair = vcd.noised_inputs({"pixel_values": torch.cat([a, b])})["pixel_values"]
    swapped = vcd.noised_inputs({"pixel_values": torch.cat([b, a])})["pixel_values"]
    alone = vcd.noised_inputs({"pixel_values": b})["pixel_values"]
    assert torch.equal(pair[1:], alone) and torch.equal(swapped[:1], alone) and torch.equal(swapped[1:], pair[:1])
    same = vcd.noised_inputs({"pixel_values": torch.cat([a, a])})["pixel_values"]
    assert torch.equal(same[0], same[1])  # the same image, the same draw
    assert not torch.allclose(pair[0] - a[0], pair[1] - b[0])  # other images, other noise
    # Qwen2-VL: flattened patches, cut by each image's t * h * w
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])
    patches = torch.rand(12, 6)
    both = vcd.noised_inputs({"pixel_values": patches, "image_grid_thw": grid})["pixel_values"]
    second = vcd.noised_inputs({"pixel_values": patches[4:], "image_grid_thw": grid[1:]})["pixel_values"]
    assert torch.equal(both[4:], second)
    with pytest.raises(InvalidInputError, match="image_grid_thw"):
        vcd.noised_inputs({"pixel_values": patches[:5], "image_grid_thw": grid})


def test_vcd_noises_a_qwen2_vl_still_image_once_in_all_its_frames():
    """Qwen2-VL's processor writes a still image as two equal frames per patch row ([C, T, P, P]): the
    image is noised once, both frames get that noise (noised apart, the 3-D patch embedding would
    average the noise down to a milder distortion than the step says)."""
    model, encode = tiny_model("qwen2_vl")
    inputs = encode(photos()[:2], QUESTIONS)
    pixels = inputs["pixel_values"]
    frames = pixels.reshape(pixels.shape[0], 3, 2, -1)
    assert torch.equal(frames[:, :, 0], frames[:, :, 1])  # the processor's two frames
    torch.manual_seed(5)
    noised = VCD(seed=None).noised_inputs(inputs, model)["pixel_values"]
    torch.manual_seed(5)
    once = add_diffusion_noise(frames[:, :, :1].contiguous(), 500)
    assert torch.equal(noised, once.expand_as(frames).reshape(pixels.shape))
    seeded = VCD(seed=55).noised_inputs(inputs, model)["pixel_values"].reshape(frames.shape)
    assert torch.equal(seeded[:, :, 0], seeded[:, :, 1]) and not torch.equal(seeded, frames)
    moving = frames.clone()  # frames that differ (a video) are noised element by element
    moving[:, :, 1] += 0.5
    noised_apart = VCD(seed=55).noised_inputs({**inputs, "pixel_values": moving.reshape(pixels.shape)}, model)
    apart = noised_apart["pixel_values"].reshape(frames.shape)
    assert not torch.allclose(apart[:, :, 0] - moving[:, :, 0], apart[:, :, 1] - moving[:, :, 1])


def _next_model_with_a_five_tile_pinpoint():
    """The tiny LLaVA-NeXT with a 56 x 56 pinpoint too: a wide image gets 5 tiles, a tall one 3."""
    model, _ = tiny_model("llava_next")
    model.config.image_grid_pinpoints = [[28, 56], [56, 28], [56, 56]]
    sharpen_attention(model)
    rng = np.random.default_rng(0)
    tall, wide = (Image.fromarray(rng.integers(10, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 20), (200, 300)))
    return model, _llava_next_encoder(model), tall, wide


def test_vcd_noise_of_a_llava_next_image_does_not_depend_on_the_tiles_of_its_batch():
    """LLaVA-NeXT pads every image's tiles to the batch's largest count: a 3-tile image alone and beside a
    5-tile one gets the same noised tiles, the padding stays zero, and the model is needed to count them."""
    model, encode, tall, wide = _next_model_with_a_five_tile_pinpoint()
    alone, pair = encode([tall], QUESTIONS[:1]), encode([tall, wide], QUESTIONS)
    assert alone["pixel_values"].shape[1] == 3 and pair["pixel_values"].shape[1] == 5
    assert torch.equal(pair["pixel_values"][0, 3:], torch.zeros_like(pair["pixel_values"][0, 3:]))
    vcd = VCD()
    noised_alone = vcd.noised_inputs(alone, model)["pixel_values"]
    noised_pair = vcd.noised_inputs(pair, model)["pixel_values"]
    assert torch.equal(noised_pair[0, :3], noised_alone[0]) and torch.equal(
        noised_pair[0, 3:], pair["pixel_values"][0, 3:]
    )
    assert torch.equal(noised_pair[1], vcd.noised_inputs(encode([wide], QUESTIONS[1:]), model)["pixel_values"][0])
    assert not torch.equal(noised_pair[0, :3], alone["pixel_values"][0])
    with pytest.raises(InvalidInputError, match="image_grid_pinpoints"):
        vcd.noised_inputs(pair)
    with pytest.raises(InvalidInputError, match="image_sizes"):
        vcd.noised_inputs({**pair, "image_sizes": pair["image_sizes"][:1]}, model)
    with pytest.raises(InvalidInputError, match="5 tiles"):
        vcd.noised_inputs({**pair, "pixel_values": pair["pixel_values"][:, :3]}, model)


def test_vcd_answer_of_a_llava_next_image_does_not_depend_on_its_batch():
    """End to end (the branch as rows of the main generate): the 3-tile image's greedy VCD tokens are
    the same alone and batched with a 5-tile image."""
    model, encode, tall, wide = _next_model_with_a_five_tile_pinpoint()
    vcd = VCD(alpha=1.5, beta=0.05)
    alone = run_contrast(model, prompt_batch(encode, [tall], QUESTIONS[:1]), vcd, 4, paired=True)[0]
    batched = run_contrast(model, prompt_batch(encode, [tall, wide], QUESTIONS), vcd, 4, paired=True)[0]
    assert torch.equal(batched[:1], alone)


@pytest.mark.parity
def test_vcd_processor_parity(reference_dir):
    """Driven step by step on the fixture's logits, the processor gives the official loop's scores
    (VCD keeps its own cache: the branch's logits of every step)."""
    f = load_fixture(reference_dir, "vcd_logits")
    settings_ = f.cfg["method_settings"]
    prompt_ids = f.inputs["prompt_ids"]
    processor = table_processor(
        VCDLogitsProcessor,
        f.inputs["logits_cd"],
        prompt_ids.shape[1],
        alpha=settings_["cd_alpha"],
        beta=settings_["cd_beta"],
    )
    scores = drive(processor, prompt_ids, f.inputs["logits_orig"])
    torch.testing.assert_close(scores, f.outputs["scores"], **f.tolerance)
    assert processor.branch_calls == len(scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_vcd_through_generate(family):
    model, encode = tiny_model(family)
    sharpen_attention(model)
    batch = prompt_batch(encode, photos(2), QUESTIONS)
    stock, state = last_logits(model, batch.inputs), stock_state(model)
    plain = greedy(model, batch.inputs, 3)
    vcd = VCD(alpha=1.5, beta=0.05)
    tokens, before, after, (processor,) = run_as_pipeline(model, batch, vcd, greedy)
    assert processor.branch_calls == 3 and processor.describe() == {"method": "vcd", "alpha": 1.5, "beta": 0.05}
    noised = vcd.noised_inputs(batch.inputs, model)
    for step in range(3):
        l_cd = last_logits(model, extended(noised, tokens[:, :step]))
        expected = vcd_rule(before[step], l_cd, 1.5, 0.05)
        torch.testing.assert_close(after[step], expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[:, step], after[step].argmax(-1))
    kept = torch.isfinite(after[0]) & torch.isfinite(before[0])
    # the branch changed the scores (the tiny InstructBLIP's Q-Former passes little of the image: ~1e-4)
    assert float((after[0] - before[0])[kept].abs().max()) > 1e-4
    assert torch.equal(plain, greedy(model, batch.inputs, 3))
    drawn, _, after_sampled, (sampler,) = run_as_pipeline(model, batch, vcd, sampled, steps=4)
    assert drawn.shape == (2, 4) and sampler.branch_calls == 4
    for step, scores in enumerate(after_sampled):  # every drawn token survived the cutoff
        assert torch.isfinite(scores.gather(1, drawn[:, step : step + 1])).all()
    assert stock_state(model) == state and torch.equal(last_logits(model, batch.inputs), stock)


def test_vcd_composes_with_pai():
    """PAI attached, VCD's processor in generate: both branches run the edited model (the branch in
    its own stream), and detaching leaves the stock model."""
    model, encode = tiny_model("llava")
    sharpen_attention(model)
    batch = prompt_batch(encode, photos(2), QUESTIONS)
    stock, state = last_logits(model, batch.inputs), stock_state(model)
    vcd = VCD()
    alone = run_as_pipeline(model, batch, vcd, greedy)[2]
    pai = PAI(alpha=2.0)
    tokens, before, after, _ = run_as_pipeline(model, batch, vcd, greedy, interventions=[pai])
    with pai.attach(model):
        edited_noised = last_logits(model, vcd.noised_inputs(batch.inputs))
    torch.testing.assert_close(after[0], vcd_rule(before[0], edited_noised, 1.0, 0.2), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after[0], alone[0], atol=1e-3)
    assert stock_state(model) == state and torch.equal(last_logits(model, batch.inputs), stock)


@pytest.mark.parametrize("family", FAMILIES)
def test_vcd_batched_equals_the_separate_branch(family):
    """Two prompts of different lengths (left padding), greedy and sampled (the pipeline's seeded draws),
    alone and with PAI or VAR attached (their per-row state covers the branch rows as the branch's own
    stream does): the same tokens and the same combined scores within float32 batching noise."""
    model, encode = tiny_model(family)
    sharpen_attention(model)
    batch = prompt_batch(encode, photos(2), QUESTIONS)
    assert not batch.inputs["attention_mask"].all()  # the shorter prompt is left-padded
    stock, state = last_logits(model, batch.inputs), stock_state(model)
    vcd = VCD(alpha=1.5, beta=0.05)
    runs = [({}, ()), ({"seeds": [3, 4]}, ()), ({}, (PAI(alpha=2.0),))]
    runs.append(({"seeds": [5, 6]}, (VAR(sink_dims=(0, 1), tau=1.5, summ=0.0, behaviour="paper"),)))
    for decoding, interventions in runs:
        paired = run_contrast(model, batch, vcd, 4, paired=True, interventions=interventions, **decoding)
        separate = run_contrast(model, batch, vcd, 4, paired=False, interventions=interventions, **decoding)
        assert_same_run(paired, separate)
    assert stock_state(model) == state and torch.equal(last_logits(model, batch.inputs), stock)


class ForceEos:
    """Only the end-of-sequence token for ``rows`` at generated step ``step``."""

    def __init__(self, prompt_length: int, step: int, rows):
        self.at, self.rows = prompt_length + step, list(rows)

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores[self.rows] = -float("inf")
            scores[self.rows, EOS_TOKEN_ID] = 0.0
        return scores


def test_vcd_batched_stops_both_halves_at_the_end_of_sequence():
    """The first prompt ends at step 1, the second at step 2: both halves pad the ended rows alike, and
    generate stops after step 2 as the separate branch's run does."""
    model, encode = tiny_model("llava")
    batch = prompt_batch(encode, photos(2), QUESTIONS)
    width = batch.inputs["input_ids"].shape[1]
    then = (ForceEos(width, 1, [0]), ForceEos(width, 2, [0, 1]))
    kwargs = {"then": then, "eos_token_id": EOS_TOKEN_ID}
    paired = run_contrast(model, batch, VCD(), 6, paired=True, **kwargs)
    separate = run_contrast(model, batch, VCD(), 6, paired=False, **kwargs)
    assert_same_run(paired, separate)
    tokens = paired[0]
    assert tokens.shape == (2, 3) and tokens[0, 1] == EOS_TOKEN_ID and tokens[0, 2] == PAD_TOKEN_ID
    assert tokens[1, 2] == EOS_TOKEN_ID


def test_vcd_batched_refuses_what_would_split_the_halves():
    model, encode = tiny_model("llava")
    batch = prompt_batch(encode, photos(2), QUESTIONS)
    with pytest.raises(InterventionError, match="num_beams"):
        run_contrast(model, batch, VCD(), 2, paired=True, num_beams=2)
    with pytest.raises(InterventionError, match="followed_by"):  # generate's own sampling draws each row alone
        torch.manual_seed(0)
        run_contrast(model, batch, VCD(), 3, paired=True, do_sample=True, top_k=0)
