"""Image-token layouts of LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and InstructBLIP: where the image tokens
are, how many each image must have (checked against the models' own forward), the patch grids,
text-only prompts, and the typed errors for unknown families, wrong counts and grid-less models."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from attnzoo.errors import InvalidInputError, UnknownNameError
from attnzoo.multimodal.hallucination import PAI, VAR, FixedImageSpan, LayoutError
from attnzoo.multimodal.hallucination.layouts import (
    InstructBlipFamily,
    LlavaFamily,
    LlavaNextFamily,
    Qwen2VLFamily,
    family_of,
    language_model_limits,
    llava_next_image_token_count,
    token_runs,
)
from tests.lvlm_helpers import (
    IMAGE_TOKEN_ID,
    INSTRUCTBLIP_IMAGE_TOKEN_ID,
    QWEN_IDS,
    greedy,
    prompt_ids,
    tiny_instructblip,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
)


def test_token_runs():
    row = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert token_runs(row) == [(1, 2), (4, 1), (7, 3)]
    assert token_runs(torch.zeros(4, dtype=torch.bool)) == []


def test_family_detection_and_unknown():
    assert type(family_of(tiny_llava()[0])) is LlavaFamily
    assert type(family_of(tiny_llava_next()[0])) is LlavaNextFamily
    assert type(family_of(tiny_qwen2_vl()[0])) is Qwen2VLFamily
    assert type(family_of(tiny_instructblip()[0])) is InstructBlipFamily

    class Other(torch.nn.Module):
        config = type("C", (), {"model_type": "paligemma"})()

    with pytest.raises(UnknownNameError, match="paligemma") as info:
        family_of(Other())
    assert "llava, llava_next, qwen2_vl" in str(info.value)


def test_llava_runs_grid_and_image_end():
    model, inputs = tiny_llava(batch=2)
    tokens = family_of(model).image_tokens(inputs["input_ids"], {"num_images": 2})
    ids = inputs["input_ids"]
    assert torch.equal(tokens.mask, ids == IMAGE_TOKEN_ID)
    assert [(r.sample, r.length, r.grid, r.grid_offset) for r in tokens.runs] == [(0, 4, (2, 2), 0), (1, 4, (2, 2), 0)]
    for run in tokens.runs:
        assert torch.equal(ids[run.sample, run.grid_positions], torch.full((4,), IMAGE_TOKEN_ID))
    assert tokens.image_end().tolist() == [r.start + r.length for r in tokens.runs]
    tokens.require_grid("test")


def test_llava_two_images_in_one_prompt_and_count_errors():
    family = family_of(tiny_llava()[0])
    ids, _ = prompt_ids([2], [8], [3])  # two images back to back: one run of 8
    two = family.image_tokens(ids, {"num_images": 2})
    assert [(r.start, r.length) for r in two.runs] == [(3, 4), (7, 4)]
    with pytest.raises(LayoutError, match="2 image"):
        family.image_tokens(ids, {"num_images": 1})
    bad, _ = prompt_ids([2], [3], [3])
    with pytest.raises(LayoutError, match=r"row 0 .* 3 image tokens \(id 999\)") as info:
        family.image_tokens(bad)
    assert isinstance(info.value, InvalidInputError)


def test_beam_search_rows_repeat_their_prompts_runs():
    """generate encodes B prompts' images once, then repeats each row num_beams times: the copies get
    their prompt's runs and image indices; rows that are no such copies still fail the count."""
    family = family_of(tiny_llava()[0])
    ids, _ = prompt_ids([2, 3], [4, 8], [3, 1])  # prompt 0: one image, prompt 1: two
    prompts = family.image_tokens(ids, {"num_images": 3})
    beams = family.image_tokens(ids.repeat_interleave(2, dim=0), {"num_images": 3})
    expected = [(2 * r.sample + copy, r.start, r.length, r.image) for r in prompts.runs[:1] for copy in range(2)]
    expected += [(2 * r.sample + copy, r.start, r.length, r.image) for copy in range(2) for r in prompts.runs[1:]]
    assert [(r.sample, r.start, r.length, r.image) for r in beams.runs] == expected
    assert [r.image for r in prompts.runs] == [0, 1, 2] and (prompts.num_images, beams.num_images) == (3, 3)
    with pytest.raises(LayoutError, match="6 image"):
        family.image_tokens(torch.cat([ids, ids]), {"num_images": 3})  # the same rows, not beam copies


def test_wrong_count_is_a_typed_error_inside_generate():
    model, inputs = tiny_llava()
    inputs["input_ids"][0, inputs["input_ids"][0] == IMAGE_TOKEN_ID] = 5
    inputs["input_ids"][0, -3:] = IMAGE_TOKEN_ID  # 3 tokens where the layout needs 4
    with VAR(sink_dims=(0, 1)).attach(model):
        with pytest.raises(LayoutError, match="3 image tokens"):
            greedy(model, inputs)
        with pytest.raises(LayoutError, match="3 image tokens"), torch.no_grad():
            model(**inputs)  # a plain forward embeds the prompt before its own (untyped) check


def test_llava_next_generates_with_an_intervention():
    model, inputs = tiny_llava_next(batch=2)
    stock = greedy(model, inputs, max_new_tokens=3)
    with PAI(alpha=1.0).attach(model) as pai:
        assert greedy(model, inputs, max_new_tokens=3).shape == stock.shape
        guided = greedy(
            model, inputs, max_new_tokens=3, logits_processor=LogitsProcessorList([pai.cfg_processor(inputs)])
        )
        assert guided.shape == stock.shape
    assert torch.equal(greedy(model, inputs, max_new_tokens=3), stock)


def test_llava_full_strategy_keeps_cls():
    model, _ = tiny_llava()
    model.config.vision_feature_select_strategy = "full"
    ids, _ = prompt_ids([2], [5], [3])
    (run,) = family_of(model).image_tokens(ids).runs
    assert (run.length, run.grid, run.grid_offset) == (5, (2, 2), 1)


def test_llava_next_count_matches_the_model():
    model, inputs = tiny_llava_next()
    count = llava_next_image_token_count(model.config, tuple(inputs["image_sizes"][0].tolist()))
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == count
    with torch.no_grad():
        model(**inputs)  # the model's own check: placeholders == features
    family = family_of(model)
    info = family.read_image_info((), inputs)
    (run,) = family.image_tokens(inputs["input_ids"], info).runs
    assert (run.length, run.grid) == (count, (2, 2))
    # generate encodes the images first and keeps their sizes: each run is one image
    assert family.image_tokens(inputs["input_ids"], None).runs[0].length == count
    ids, _ = prompt_ids([2], [3], [3])
    with pytest.raises(LayoutError, match="base view"):
        family.image_tokens(ids, None)


def test_qwen2_vl_grid_markers_and_counts():
    model, inputs = tiny_qwen2_vl(batch=2, grid=(4, 6))
    family = family_of(model)
    info = {"num_images": 2, "grid_thw": [(1, 4, 6), (1, 4, 6)]}
    tokens = family.image_tokens(inputs["input_ids"], info)
    assert [(r.length, r.grid) for r in tokens.runs] == [(6, (2, 3)), (6, (2, 3))]
    ids = inputs["input_ids"]
    for run in tokens.runs:
        assert ids[run.sample, run.start - 1] == QWEN_IDS["vision_start"]
        assert ids[run.sample, run.start + run.length] == QWEN_IDS["vision_end"]
    with pytest.raises(LayoutError, match="image_grid_thw"):
        family.image_tokens(ids, None)
    with pytest.raises(LayoutError):
        family.image_tokens(ids, {"num_images": 2, "grid_thw": [(1, 4, 4), (1, 4, 4)]})


def test_instructblip_has_no_grid():
    model, inputs = tiny_instructblip(batch=2)
    tokens = family_of(model).image_tokens(inputs["input_ids"], {"num_images": 2})
    assert [r.length for r in tokens.runs] == [4, 4] and not tokens.spatial
    assert all(r.grid is None for r in tokens.runs)
    assert int(tokens.mask.sum()) == int((inputs["input_ids"] == INSTRUCTBLIP_IMAGE_TOKEN_ID).sum())
    with pytest.raises(LayoutError, match="InstructBLIP .* resampled query tokens"):
        tokens.require_grid("PAINT")


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2_vl, tiny_instructblip])
def test_text_only_prompts(build):
    model, inputs = build(batch=2)
    family = family_of(model)
    text = family.text_only(inputs)
    removed = family._image_or_marker(inputs["input_ids"])
    for row in range(2):
        kept = inputs["input_ids"][row][inputs["attention_mask"][row].bool() & ~removed[row]]
        valid = text["attention_mask"][row].bool()
        assert torch.equal(text["input_ids"][row][valid], kept)
        assert not valid[: len(valid) - len(kept)].any()  # left padding
    assert not family._image_or_marker(text["input_ids"])[text["attention_mask"].bool()].any()


def test_fixed_span():
    tokens = FixedImageSpan(3, 4, grid=(2, 2)).image_tokens(2, 10)
    assert tokens.mask.sum().item() == 8 and tokens.image_end().tolist() == [7, 7]
    assert tokens.runs[1].grid_positions.tolist() == [3, 4, 5, 6]
    with pytest.raises(LayoutError, match="does not fit"):
        FixedImageSpan(8, 4).image_tokens(1, 10)
    with pytest.raises(LayoutError, match="patch grid"):
        FixedImageSpan(0, 4).image_tokens(1, 10).require_grid("PAINT")


def test_image_refusal_follows_the_processors_own_rule():
    """Qwen2-VL's processor refuses an aspect ratio over 200; the family says so without processing pixels
    (and agrees with the processor), the other families take any non-empty size."""
    from PIL import Image
    from transformers import CLIPImageProcessor, Qwen2VLImageProcessor

    qwen, processor = family_of(tiny_qwen2_vl()[0]), Qwen2VLImageProcessor()
    for width, height in ((500, 1), (1, 500), (640, 480), (1, 1), (300, 2)):
        refusal = qwen.image_refusal(processor, width, height)
        try:
            processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
            refused = None
        except ValueError as err:
            refused = str(err)
        assert (refusal is None) == (refused is None), (width, height, refusal, refused)
        if refusal is not None:
            assert refusal in refused
    assert "200" in qwen.image_refusal(processor, 500, 1)
    assert family_of(tiny_llava()[0]).image_refusal(CLIPImageProcessor(), 500, 1) is None


@pytest.mark.parametrize("build", [tiny_llava, tiny_llava_next, tiny_qwen2_vl, tiny_instructblip])
def test_the_language_models_context_and_vocabulary(build):
    """Each family's context is its language model's max_position_embeddings (times linear RoPE scaling);
    none is invented where the config sets none (dynamic scaling, no such field)."""
    from attnzoo.errors import InvalidOptionError

    model, _ = build()
    text = model.config.text_config
    family = family_of(model)
    assert language_model_limits(model.config) == (text.max_position_embeddings, text.vocab_size)
    assert family.context_length() == text.max_position_embeddings
    family.check_room(text.max_position_embeddings - 5, 5, "max_new_tokens")
    with pytest.raises(InvalidOptionError, match="max_new_tokens=6 after a prompt of .* at most 5 fit"):
        family.check_room(text.max_position_embeddings - 5, 6, "max_new_tokens")
    kind = "rope_parameters" if getattr(text, "rope_parameters", None) is not None else "rope_scaling"
    base = dict(getattr(text, kind) or {})
    setattr(text, kind, {**base, "rope_type": "linear", "factor": 4.0})
    assert family.context_length() == 4 * text.max_position_embeddings
    setattr(text, kind, {**base, "rope_type": "dynamic", "factor": 2.0})
    assert family.context_length() is None
    family.check_room(10**9, 10**9, "max_new_tokens")  # no known limit: nothing refused
    assert language_model_limits(type("Config", (), {"model_type": "gpt2"})()) == (None, None)
