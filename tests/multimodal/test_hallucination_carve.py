"""CARVE as the pipeline runs it (method.prepare, then generate on the batch it returns) on tiny
random LLaVA, LLaVA-NeXT and Qwen2-VL, greedy and sampled, both behaviours: the batched probes
against the single-prompt functional probe (EOS stop included), the pairs' shared image prefix, the
official final pass continuing from that prefix's cache, the final pass's images, the component
selection as a property, probes unaffected by an attached attention edit, the attention switch
undone, InstructBLIP refused, and bad settings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from attnzoo.errors import InvalidInputError, InvalidOptionError, UnknownNameError
from attnzoo.multimodal.hallucination import CARVE, PAI, LayoutError
from attnzoo.multimodal.hallucination import carve as carve_module
from attnzoo.multimodal.hallucination.carve import _shared_prefix_layout
from attnzoo.multimodal.hallucination.functional import (
    CARVE_GENERAL_INSTRUCTION,
    CARVE_VARIANTS,
    carve_probe_attention,
)
from attnzoo.multimodal.hallucination.kv_cache import ReservedLayer
from attnzoo.multimodal.hallucination.layouts import family_of
from attnzoo.multimodal.hallucination.transformers_compat import cache_keyword
from tests.lvlm_helpers import attn_implementations, greedy, sampled, sharpen_attention
from tests.multimodal.lvlm_prompts import last_logits, photos, prompt_batch, stock_state, tiny_model

QUESTIONS = ["is there a dog", "what color is the car on the left"]
LAYERS = (1, 2, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


def images(seed=0):
    """Two photographs large enough for a Qwen2-VL grid of several tokens."""
    return [photo.resize((112, 84)) for photo in photos(2, seed=seed)]


def test_carve_settings_and_errors():
    assert CARVE().describe() == {
        "method": "carve",
        "behaviour": "official",
        "final_images": "original+refined",
        "grid": "official table (256/576/1024/1600/1681 tokens square)",
        "variant": "v4",
        "layers": (20, 21, 22, 23, 24, 25),
        "lam": 1e-8,
        "top_percent": 0.2,
        "min_keep_regions": 3,
        "outlier_percent": 0.1,
        "probe_tokens": 32,
        "general_instruction": CARVE_GENERAL_INSTRUCTION,
        "answer_suffix": None,
    }
    paper = CARVE(behaviour="paper").describe()
    assert paper["final_images"] == "refined" and paper["grid"] == "image's"
    bad_settings = (
        {"variant": "v5"},
        {"lam": 0},
        {"top_percent": 0},
        {"top_percent": 1.5},
        {"layers": ()},
        {"min_keep_regions": 0},
        {"probe_tokens": 0},
        {"outlier_percent": -1},
        {"general_instruction": " "},
        {"behaviour": "code"},
    )
    for bad in bad_settings:
        with pytest.raises(InvalidOptionError):
            CARVE(**bad)
    model, encode = tiny_model("llava")
    batch = prompt_batch(encode, images()[:1], QUESTIONS[:1])
    with pytest.raises(InvalidOptionError, match="4-layer"):
        CARVE().prepare(model, None, batch)  # layers 20..25 do not exist
    with pytest.raises(InvalidInputError, match="one image per question"):
        CARVE(layers=LAYERS).prepare(
            model, None, replace(prompt_batch(encode, images(), QUESTIONS), questions=QUESTIONS[:1])
        )
    blip_model, blip_encode = tiny_model("instructblip")
    with pytest.raises(LayoutError, match="InstructBLIP"):
        CARVE(layers=LAYERS).prepare(blip_model, None, prompt_batch(blip_encode, images()[:1], QUESTIONS[:1]))
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(UnknownNameError, match="llama"):
        CARVE(layers=(0,)).prepare(LlamaForCausalLM(config), None, batch)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_carve_batched_probes_match_the_functional_probe(family):
    """The probes of all prompts decode as one padded batch (one general probe per distinct image);
    each row's maps are those of carve_probe_attention on its own prompt, and a pair stops at the
    first EOS of either probe."""
    model, encode = tiny_model(family, attn_implementation="eager")
    sharpen_attention(model)
    photos_, carve = images(), CARVE(layers=LAYERS, probe_tokens=5)
    photos_, questions = [*photos_, photos_[0]], [*QUESTIONS, "where is the dog"]
    first_general = carve_probe_attention(model, encode(photos_[:1], [CARVE_GENERAL_INSTRUCTION]), 5, LAYERS)
    model.generation_config.eos_token_id = int(first_general.tokens[2])  # that probe now stops at step 3
    alone = [
        [carve_probe_attention(model, encode([image], [q]), 5, LAYERS) for q in (question, CARVE_GENERAL_INSTRUCTION)]
        for image, question in zip(photos_, questions, strict=True)
    ]
    batched = carve.probe(model, family_of(model), prompt_batch(encode, photos_, questions))
    for (query, general, grid), probes in zip(batched, alone, strict=True):
        steps = min(len(probe.maps) for probe in probes)
        assert min(len(query), len(general)) == steps
        for ours, probe in zip((query, general), probes, strict=True):
            assert ours.shape[1:] == probe.maps.shape[1:] == (3, grid[0] * grid[1])
            torch.testing.assert_close(ours[:steps], probe.maps[:steps], atol=1e-6, rtol=1e-5)
    assert len(alone[0][1].maps) == 3
    assert carve.last_layers == LAYERS


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_carve_probes_share_their_image_prefix(family, monkeypatch):
    """The questions about one image and that image's one general probe hold the text before the
    image and the image in the same first columns (one prefill of them for all); every laid-out row
    is its prompt, token for token. Rows that differ before the image keep the padded layout, and
    the maps are the same either way."""
    model, encode = tiny_model(family)
    sharpen_attention(model)
    photos_ = images()
    asked = [photos_[0], photos_[1], photos_[0].copy()]  # equal pictures, two objects
    questions = [*QUESTIONS, "where is the dog"]
    groups = carve_module._image_groups(asked)
    assert groups == [0, 1, 0]
    red, blue = (Image.new("P", (4, 4)) for _ in range(2))
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)  # the same palette indices, another picture
    assert carve_module._image_groups([red, blue, red.convert("RGBA"), photos_[0].convert("RGBA")]) == [0, 1, 0, 2]
    inputs = encode([*asked, *photos_], [*questions, *([CARVE_GENERAL_INSTRUCTION] * 2)])
    laid, prefix = _shared_prefix_layout(family_of(model), inputs, [*groups, 0, 1])
    assert prefix is not None and laid.keys() == inputs.keys()
    assert prefix.groups == (0, 1, 0, 0, 1) and prefix.owners == (0, 1)
    for key, value in inputs.items():
        if value.shape != inputs["input_ids"].shape:
            assert laid[key] is value  # the images are untouched
            continue
        for row in range(5):
            kept = laid[key][row][laid["attention_mask"][row].bool()]
            assert torch.equal(kept, value[row][inputs["attention_mask"][row].bool()])
    width = prefix.width
    for key in ("input_ids", "attention_mask"):
        for row, group in enumerate(prefix.groups):
            assert torch.equal(laid[key][row, :width], laid[key][prefix.owners[group], :width])
    image_token = family_of(model).image_token_id()
    assert not bool((laid["input_ids"][:, width:] == image_token).any())
    assert bool(laid["attention_mask"][:, width - 1].all()) and bool(laid["attention_mask"][:, -1].all())

    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    first = int(torch.nonzero(inputs["attention_mask"][3]).min())
    other["input_ids"][3, first] += 1  # a general probe's prompt now differs before its image
    assert _shared_prefix_layout(family_of(model), other, [*groups, 0, 1]) == (other, None)

    encoded = []
    counting = prompt_batch(
        lambda images, questions: encoded.append(len(images)) or encode(images, questions), asked, questions
    )
    carve = CARVE(layers=LAYERS, probe_tokens=4)
    shared = carve.probe(model, family_of(model), counting)
    assert encoded[-1] == 5  # three questions, one general probe per distinct image
    monkeypatch.setattr(carve_module, "_shared_prefix_layout", lambda family, inputs, groups: (dict(inputs), None))
    padded = carve.probe(model, family_of(model), prompt_batch(encode, asked, questions))
    for ours, theirs in zip(shared, padded, strict=True):
        assert ours[2] == theirs[2]
        for a, b in zip(ours[:2], theirs[:2], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_carve_final_pass_continues_from_the_probes_prefix(family):
    """The official final pass on LLaVA starts with each question probe's prefix (its text and the
    original image): generate continues from a copy of that prefix's KV cache with only the refined
    images, and answers as on the whole prompts (two questions about one image start from one cache
    row). The paper's final pass and Qwen2-VL do not."""
    model, encode = tiny_model(family)
    sharpen_attention(model)
    asked = [*images(), images()[0]]
    batch = prompt_batch(encode, asked, [*QUESTIONS, "where is the dog"])
    final = CARVE(layers=LAYERS, probe_tokens=4).prepare(model, None, batch)
    assert final.cached is not None and tuple(final.cached.rows) == (0, 1, 0)
    assert final.cached.cache.layers[0].keys.shape[0] == 2  # one row per distinct image
    assert all(isinstance(layer, ReservedLayer) for layer in final.cached.cache.layers)  # decodes in place
    for key in ("pixel_values", "image_sizes"):  # only the refined images are encoded again
        if key in final.inputs:
            assert torch.equal(final.cached.inputs[key], final.inputs[key][1::2])
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    whole = model.generate(**final.inputs, **settings)
    for _ in range(2):  # each call continues from a fresh copy
        inputs = final.generate_inputs()
        assert inputs[cache_keyword()] is not final.cached.cache
        assert inputs[cache_keyword()].get_seq_length() < inputs["input_ids"].shape[1]
        continued = model.generate(**inputs, **settings)
        assert torch.equal(
            continued.sequences[:, inputs["input_ids"].shape[1] :],
            whole.sequences[:, final.inputs["input_ids"].shape[1] :],
        )
        for ours, theirs in zip(continued.scores, whole.scores, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    paper = CARVE(layers=LAYERS, probe_tokens=2, behaviour="paper")
    assert paper.prepare(model, None, prompt_batch(encode, images(), QUESTIONS)).cached is None
    qwen, qwen_encode = tiny_model("qwen2_vl")
    assert (
        CARVE(layers=LAYERS, probe_tokens=2).prepare(qwen, None, prompt_batch(qwen_encode, images(), QUESTIONS)).cached
        is None
    )


@pytest.mark.parametrize("behaviour", ["official", "paper"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_carve_through_generate(family, behaviour):
    """prepare() returns the batch of the final pass ([original, refined] or refined), re-encoded;
    generate runs on it greedy and sampled; the probes' attention function is switched in for them
    only, and the model left as the stock model."""
    model, encode = tiny_model(family)
    sharpen_attention(model)
    photos_ = images()
    batch = prompt_batch(encode, photos_, QUESTIONS)
    stock, state = last_logits(model, batch.inputs), stock_state(model)
    carve = CARVE(layers=LAYERS, probe_tokens=4, behaviour=behaviour, answer_suffix="Answer briefly.")
    final = carve.prepare(model, None, batch)
    refined = [result.crop.refined_image for result in carve.last_results]
    expected_images = [[p, r] for p, r in zip(photos_, refined, strict=True)] if behaviour == "official" else refined
    assert final.images == expected_images and final.questions == [f"{q} Answer briefly." for q in QUESTIONS]
    expected = encode(expected_images, final.questions)
    assert final.inputs.keys() == expected.keys()
    assert all(torch.equal(final.inputs[key], expected[key]) for key in expected)
    for image, result in zip(photos_, carve.last_results, strict=True):
        assert result.sum_att_map.shape == (image.height, image.width)
        assert result.crop.refined_image.size[0] >= image.width or result.crop.refined_image.size[1] >= image.height
    assert stock_state(model) == state  # back on SDPA, no hooks left
    answer, drawn = greedy(model, final.inputs, 3), sampled(model, final.inputs, 3)
    assert answer.shape == drawn.shape == (2, 3)
    assert not torch.allclose(last_logits(model, final.inputs), stock, atol=1e-3)
    assert torch.equal(last_logits(model, batch.inputs), stock)


def test_carve_probes_ignore_an_attached_attention_edit():
    """With PAI attached, the probes run unedited (their own attention function, their own stream):
    the same refined images; the final pass then runs edited, PAI's function back in place."""
    model, encode = tiny_model("llava")
    sharpen_attention(model)
    batch = prompt_batch(encode, images(), QUESTIONS)
    stock, state = last_logits(model, batch.inputs), stock_state(model)
    carve = CARVE(layers=LAYERS, probe_tokens=3)
    plain = carve.prepare(model, None, batch)
    with PAI(alpha=2.0).attach(model):
        attached = attn_implementations(model)
        edited = carve.prepare(model, None, batch)
        assert attn_implementations(model) == attached
        assert not [name for name in AttentionInterface._global_mapping if name.startswith("attnzoo_probe")]
        assert greedy(model, edited.inputs, 2).shape == (2, 2)
    assert all(torch.equal(edited.inputs[k], plain.inputs[k]) for k in plain.inputs)
    assert stock_state(model) == state and torch.equal(last_logits(model, batch.inputs), stock)


@pytest.fixture(scope="module")
def llava():
    model, encode = tiny_model("llava", attn_implementation="eager")
    return sharpen_attention(model), encode


def selected_components(fused, top_percent, min_keep, strategy, outlier_percent):
    """The component rule written out: 4-connected components of S >= its (1 - top_percent)
    percentile, the K = max(min_keep, int(n * top_percent)) best by summed S or by size (ties: the
    earlier component), or those of at least int(total * outlier_percent / 100) pixels."""
    above = fused >= np.percentile(fused, (1 - top_percent) * 100)
    labeled, count = ndimage.label(above, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    ids = list(range(1, count + 1))
    sizes = {i: int((labeled == i).sum()) for i in ids}
    if strategy == "remove_small":
        minimum = int(above.sum() * outlier_percent / 100)
        kept = [i for i in ids if sizes[i] >= minimum]
    else:
        score = {i: (float(fused[labeled == i].sum()) if strategy == "attention_sum" else sizes[i]) for i in ids}
        kept = sorted(ids, key=lambda i: (-score[i], i))[: max(min_keep, int(count * top_percent))]
    return np.isin(labeled, kept) & (labeled > 0), len(kept)


@given(
    seed=st.integers(0, 2**16),
    variant=st.sampled_from(sorted(CARVE_VARIANTS)),
    top_percent=st.floats(0.05, 0.6),
    min_keep=st.integers(1, 4),
)
@settings(max_examples=15, deadline=None)
def test_carve_component_selection(llava, seed, variant, top_percent, min_keep):
    """The method's mask is the union of the components the rule selects on its fused map, and the
    refined image is the masked crop of the mask's bounding box."""
    model, encode = llava
    image = photos(1, seed=seed)[0]
    carve = CARVE(variant=variant, layers=LAYERS, probe_tokens=3, top_percent=top_percent, min_keep_regions=min_keep)
    carve.prepare(model, None, prompt_batch(encode, [image], QUESTIONS[:1]))
    (result,) = carve.last_results
    strategy = CARVE_VARIANTS[variant][1]
    expected, kept = selected_components(result.sum_att_map, top_percent, min_keep, strategy, 0.1)
    assert np.array_equal(result.mask.mask.astype(bool), expected) and len(result.mask.kept_component_ids) == kept
    rows, cols = np.nonzero(expected)
    assert result.crop.bbox == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    masked = np.asarray(image) * expected[..., None]
    assert np.array_equal(np.asarray(result.crop.masked_image), masked)


def test_carve_refined_image_the_processor_refuses_is_a_typed_error(monkeypatch):
    """A mask that keeps one thin strip of a wide image is magnified into a crop of aspect ratio > 200,
    which Qwen2-VL's processor refuses (a raw ValueError deep in the batch encoding): CARVE says so,
    typed, naming the prompt."""
    import attnzoo
    from attnzoo.multimodal.hallucination.functional.carve import carve_crop
    from attnzoo.multimodal.hallucination.models import tiny_lvlm

    real = carve_module.carve_refine

    def thin_strip(query, general, image, **kw):
        mask = np.zeros((image.height, image.width), dtype=np.uint8)
        mask[image.height // 2] = 1  # one row of pixels across the whole image
        return real(query, general, image, **kw)._replace(crop=carve_crop(image, mask))

    monkeypatch.setattr(carve_module, "carve_refine", thin_strip)
    ask = attnzoo.pipeline("hallucination-mitigation", model=tiny_lvlm("qwen2_vl"), device="cpu", max_new_tokens=2)
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 420, 3), dtype=np.uint8))
    strip = np.zeros((56, 420), dtype=np.uint8)
    strip[28] = 1
    refined = carve_crop(wide, strip).refined_image  # 420x1 magnified x56 to cover the image's height
    assert refined.size == (23520, 56) and refined.width / refined.height > 200  # what the processor refuses
    with pytest.raises(InvalidInputError, match=r"CARVE's refined image of prompt 0 .* 23520x56 crop.*aspect"):
        ask(wide, question="dog?", method="carve", layers=(2, 3), probe_tokens=2)


@pytest.mark.parametrize("error", [MemoryError, torch.OutOfMemoryError])
def test_carve_running_out_of_memory_encoding_its_prompts_is_a_typed_error_naming_the_stage(error):
    """CARVE encodes prompts twice: its probes, then the final pass ([original, refined] per prompt; the refined
    image alone with the paper's behaviour). An encoder running out of memory in either (MemoryError on the CPU,
    torch's OutOfMemoryError moving the inputs to an accelerator) is an InvalidInputError naming the stage, the
    sizes of the images it encoded, and what to do, not the raw error."""
    model, encode = tiny_model("llava")
    photos_ = images()
    batch = prompt_batch(encode, photos_, QUESTIONS)

    def failing(at):
        """``batch`` whose encoder runs out of memory at CARVE's call ``at`` (1: the probes; 2: the final pass)."""
        calls = []

        def run(images_, questions):
            calls.append(list(images_))
            if len(calls) == at:
                raise error("out of memory")
            return encode(images_, questions)

        return replace(batch, encode=run), calls

    for behaviour in ("official", "paper"):
        carve = CARVE(layers=LAYERS, probe_tokens=2, behaviour=behaviour)
        final, calls = failing(2)
        with pytest.raises(InvalidInputError) as caught:
            carve.prepare(model, None, final)
        refined = [result.crop.refined_image for result in carve.last_results]
        if behaviour == "official":
            assert calls[-1] == [[p, r] for p, r in zip(photos_, refined, strict=True)]  # the final pass failed
            sizes = [f"{p.width}x{p.height} + {r.width}x{r.height}" for p, r in zip(photos_, refined, strict=True)]
            stage = "CARVE's final pass ran out of memory encoding the [original, refined] images of its 2 prompt(s)"
            advice = "behaviour='paper' (the refined image alone)"
        else:
            assert calls[-1] == refined
            sizes = [f"{r.width}x{r.height}" for r in refined]
            stage = "CARVE's final pass ran out of memory encoding the refined images of its 2 prompt(s)"
            advice = "fewer prompts per batch (batch_size)"
        message = str(caught.value)
        assert message.startswith(f"{stage} ({', '.join(sizes)} pixels); pass smaller images"), message
        assert advice in message and caught.value.__cause__ is None

    probes, calls = failing(1)  # the probes: each prompt's image, then one general probe per distinct picture
    with pytest.raises(InvalidInputError) as caught:
        CARVE(layers=LAYERS, probe_tokens=2).prepare(model, None, probes)
    assert calls == [[*photos_, *photos_]]
    sizes = ", ".join(f"{p.width}x{p.height}" for p in [*photos_, *photos_])
    assert str(caught.value).startswith(f"CARVE's probes ran out of memory encoding their 4 image(s) ({sizes} pixels")


def test_carve_final_pass_out_of_memory_in_the_pipeline_names_the_final_pass():
    """In the pipeline, the model's processor running out of memory on CARVE's final pass ([original, refined])
    is said as CARVE's final pass with both images' sizes, where the pipeline's encoder alone named no input
    ("image(s)") and asked for a smaller image than the one given; the prompts given are still said as theirs."""
    import attnzoo

    ask = attnzoo.pipeline("hallucination-mitigation", weights="none", device="cpu", max_new_tokens=2)
    photo = images()[0]
    processor = ask.processor

    class FinalPassOutOfMemory:
        """The processor, out of memory on the final pass's prompts: an original image and another (refined)."""

        def __init__(self):
            self.final = []

        def __getattr__(self, name):
            return getattr(processor, name)

        def __call__(self, *args, **kwargs):
            given = kwargs.get("images") or []
            if given and all(isinstance(entry, list) and entry[0] is not entry[1] for entry in given):
                self.final.append(given)
                raise MemoryError
            return processor(*args, **kwargs)

    failing = FinalPassOutOfMemory()
    ask.processor = failing
    try:
        with pytest.raises(InvalidInputError) as caught:
            ask(photo, question="dog?", method="carve", layers=LAYERS, probe_tokens=2)
    finally:
        ask.processor = processor
    ((pair,),) = failing.final
    assert pair[0].size == photo.size
    sizes = f"{photo.width}x{photo.height} + {pair[1].width}x{pair[1].height}"
    assert str(caught.value).startswith(
        f"CARVE's final pass ran out of memory encoding the [original, refined] images of its 1 prompt(s) ({sizes} "
        "pixels); pass smaller images"
    ), str(caught.value)
