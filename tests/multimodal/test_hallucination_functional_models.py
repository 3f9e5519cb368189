"""The model-driven functions of attnzoo.multimodal.hallucination.functional on tiny random
models built from configs (no network): AGLA's BLIP-ITM GradCAM augmenter end to end on a
transformers ``BlipForImageTextRetrieval``, and CARVE's cached attention probe against the
official cache-free loop on LLaVA and Qwen2-VL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.errors import InvalidInputError
from attnzoo.multimodal.hallucination import functional as F
from attnzoo.multimodal.hallucination.functional.agla import _first_itm_token
from tests.lvlm_helpers import QWEN_IDS, tiny_llava, tiny_qwen2_vl
from tests.multimodal.lvlm_prompts import tiny_blip_itm

# one_thread (tests/conftest.py): tiny models run as fast on one thread, and two stall each other on a shared 2-core
# machine.
pytestmark = pytest.mark.usefixtures("one_thread")


# -- AGLA: tiny BLIP-ITM ------------------------------------------------------------------------

BLIP_SIZE = 64  # tiny_blip_itm's images: 16 px patches, a 4 x 4 grid


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """The tiny random BLIP-ITM of the AGLA tests, without their shared image-text component."""
    return tiny_blip_itm(tmp_path_factory.mktemp("blip"), match=0.0)


@pytest.fixture(scope="module")
def photo_pair():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(10, 256, (48 + 8 * i, 70, 3), dtype=np.uint8)) for i in range(2)]


def official_augment(model, processor, image, question, first_token=None):
    """The official recipe, step by step: BLIP text normalisation, a hook saving the layer-6
    cross-attention probabilities with retain_grad, backward of the positive ITM logit, the ITC
    cosine, then GradCAM -> mask -> masked image."""
    text = F.blip_caption_text(question)
    enc = processor(images=image.convert("RGB"), text=text, return_tensors="pt", padding="longest", truncation=True)
    ids = enc["input_ids"].clone()
    if first_token is not None:
        ids[:, 0] = first_token
    saved = {}

    def keep(module, args, output):
        output[1].retain_grad()
        saved["probs"] = output[1]

    handle = model.text_encoder.encoder.layer[F.AGLA_GRADCAM_LAYER].crossattention.self.register_forward_hook(keep)
    try:
        itm = model(input_ids=ids, pixel_values=enc["pixel_values"], attention_mask=enc["attention_mask"]).itm_score
    finally:
        handle.remove()
    model.zero_grad()
    itm[:, 1].sum().backward()
    grads = saved["probs"].grad
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        itc = model(**enc, use_itm_head=False).itm_score
    cam = F.blip_gradcam(saved["probs"].detach(), grads, enc["attention_mask"])
    mask = F.agla_mask(cam.relevance[0], itc, size=BLIP_SIZE)
    return np.asarray(F.agla_masked_image(image, mask.mask)), mask


def test_agla_augment_matches_the_official_recipe(blip, photo_pair):
    model, processor = blip
    question = "Is there a red car on the left?"
    expected, mask = official_augment(model, processor, photo_pair[0], question)
    augmented = F.agla_augment(photo_pair[0], question, model, processor)
    assert augmented.size == (BLIP_SIZE, BLIP_SIZE)
    assert np.array_equal(np.asarray(augmented), expected)
    black = (np.asarray(augmented) == 0).all(-1)
    assert int((~black).sum()) == int(mask.mask.sum()) == mask.keep_index_k + 1  # the stated share is kept
    assert 0 < black.sum() < BLIP_SIZE * BLIP_SIZE / 2


def test_agla_augment_turns_gradients_on_and_leaves_the_model_alone(blip, photo_pair):
    """Same image under no_grad, inference_mode and with a frozen model; no .grad on any parameter."""
    model, processor = blip
    question = "is there a dog"
    reference = np.asarray(F.agla_augment(photo_pair[1], question, model, processor))
    with torch.no_grad():
        assert np.array_equal(np.asarray(F.agla_augment(photo_pair[1], question, model, processor)), reference)
    with torch.inference_mode():
        assert np.array_equal(np.asarray(F.agla_augment(photo_pair[1], question, model, processor)), reference)
    model.requires_grad_(False)
    try:
        assert np.array_equal(np.asarray(F.agla_augment(photo_pair[1], question, model, processor)), reference)
    finally:
        model.requires_grad_(True)
    assert all(p.grad is None for p in model.parameters())


def test_agla_augment_batches_and_places_the_itm_token(blip, photo_pair):
    model, processor = blip
    questions = ["is there a dog in the image", "is there a cat on the left"]  # one token length: no padding
    batched = F.agla_augment(photo_pair, questions, model, processor)
    singles = [np.asarray(F.agla_augment(i, q, model, processor)) for i, q in zip(photo_pair, questions, strict=True)]
    for one, alone in zip(batched, singles, strict=True):
        assert (np.asarray(one) != alone).any(-1).sum() <= 2  # batched matmuls may flip a border pixel
    with_token = np.asarray(F.agla_augment(photo_pair[0], questions[0], model, processor, itm_token_id=15))
    assert np.array_equal(with_token, official_augment(model, processor, photo_pair[0], questions[0], 15)[0])


def test_agla_itm_token_defaults_to_blips_enc_token_for_the_released_vocabulary():
    class Config:
        def __init__(self, vocab):
            self.text_config = type("TextConfig", (), {"vocab_size": vocab})()

    released = type("Blip", (), {"config": Config(30524)})()
    tiny = type("Blip", (), {"config": Config(32)})()
    assert _first_itm_token(released, "auto") == F.BLIP_ENC_TOKEN_ID == 30523
    assert _first_itm_token(tiny, "auto") is None
    assert _first_itm_token(released, None) is None


def test_agla_augment_rejects_bad_input(blip, photo_pair):
    model, processor = blip
    with pytest.raises(InvalidInputError, match="empty"):
        F.agla_augment(photo_pair[0], "...", model, processor)
    with pytest.raises(InvalidInputError, match="equally long"):
        F.agla_augment(photo_pair, ["is there a dog"], model, processor)
    with pytest.raises(InvalidInputError, match="cross-attention layer 9"):
        F.agla_augment(photo_pair[0], "is there a dog", model, processor, layer=9)
    with pytest.raises(InvalidInputError, match="PIL"):
        F.agla_augment([np.zeros((4, 4, 3))], ["is there a dog"], model, processor)


# -- CARVE probe ----------------------------------------------------------------------------------


def official_probe(model, inputs, steps, layers, span, eos=None):
    """The official loop: every step re-runs the whole sequence without a cache and reads the last
    row's image attention, head-averaged; greedy; stops after recording an EOS step."""
    start, end = span
    ids, extra = inputs["input_ids"], {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    maps, tokens = [], []
    with torch.no_grad():
        for _ in range(steps):
            if "mm_token_type_ids" in extra:
                extra["mm_token_type_ids"] = (ids == QWEN_IDS["image"]).long()
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, **extra)
            maps.append(torch.stack([out.attentions[layer][0, :, -1, start:end].mean(0).float() for layer in layers]))
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token == eos:
                break
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return torch.stack(maps), tokens


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(attn_implementation="eager", layers=4, seed=3)


def test_carve_probe_matches_the_cache_free_official_loop_on_llava(llava):
    model, inputs = llava
    layers = (1, 3)
    probe = F.carve_probe_attention(model, inputs, max_new_tokens=6, layers=layers)
    span = tuple(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[[0, -1], 0].tolist())
    assert probe.image_span == (span[0], span[1] + 1) and probe.layers == layers
    maps, tokens = official_probe(model, inputs, 6, layers, probe.image_span)
    assert probe.tokens.tolist() == tokens
    torch.testing.assert_close(probe.maps, maps, atol=1e-6, rtol=1e-5)
    assert probe.maps.dtype == torch.float32 and probe.maps.shape == (6, 2, span[1] + 1 - span[0])
    assert bool((probe.maps >= 0).all()) and bool((probe.maps.sum(-1) <= 1 + 1e-6).all())  # shares of a softmax row


def test_carve_probe_stops_after_eos(llava):
    model, inputs = llava
    free = F.carve_probe_attention(model, inputs, max_new_tokens=6, layers=(0,))
    eos = free.tokens[1].item()
    stop = free.tokens.tolist().index(eos)
    probe = F.carve_probe_attention(model, inputs, max_new_tokens=6, layers=(0,), eos_token_id=eos)
    assert probe.tokens.tolist() == free.tokens.tolist()[: stop + 1] and len(probe.maps) == stop + 1


def test_carve_probe_matches_the_official_loop_on_qwen2_vl():
    """M-RoPE positions continue correctly from the cache (the model keeps its rope deltas)."""
    model, inputs = tiny_qwen2_vl(attn_implementation="eager", seed=0)
    with torch.no_grad():  # keep the random model off the vision ids, so the cache-free loop can re-run
        model.lm_head.weight[QWEN_IDS["image"] :] = 0
        model.lm_head.weight[: QWEN_IDS["image"]] *= 20
    probe = F.carve_probe_attention(model, inputs, max_new_tokens=4, layers=(0, 3))
    ids = inputs["input_ids"][0].tolist()
    assert probe.image_span == (ids.index(QWEN_IDS["vision_start"]) + 1, ids.index(QWEN_IDS["vision_end"]))
    maps, tokens = official_probe(model, inputs, 4, (0, 3), probe.image_span)
    assert probe.tokens.tolist() == tokens
    torch.testing.assert_close(probe.maps, maps, atol=1e-6, rtol=1e-5)


def test_carve_probe_rejects_bad_input(llava):
    model, inputs = llava
    with pytest.raises(InvalidInputError, match="layers"):
        F.carve_probe_attention(model, inputs, layers=(4,))
    with pytest.raises(InvalidInputError, match="one prompt"):
        F.carve_probe_attention(model, {**inputs, "input_ids": inputs["input_ids"].repeat(2, 1)}, layers=(0,))
    no_image = {**inputs, "input_ids": inputs["input_ids"].clamp(max=900)}
    with pytest.raises(InvalidInputError, match="no image token"):
        F.carve_probe_attention(model, no_image, layers=(0,))
    padded = {
        **inputs,
        "attention_mask": torch.cat([torch.zeros(1, 1, dtype=torch.long), inputs["attention_mask"][:, 1:]], 1),
    }
    with pytest.raises(InvalidInputError, match="unpadded"):
        F.carve_probe_attention(model, padded, layers=(0,))
    sdpa, sdpa_inputs = tiny_llava(attn_implementation="sdpa", layers=2)
    with pytest.raises(InvalidInputError, match="eager"):
        F.carve_probe_attention(sdpa, sdpa_inputs, max_new_tokens=2, layers=(0,))
