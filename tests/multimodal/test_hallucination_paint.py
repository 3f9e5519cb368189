"""PAINT: parity with the official code (paint_attention fixture: token sets, prefill and decode
outputs), the CLS rows read from the CLIP tower against its eager attention, generate on a tiny
LLaVA (greedy, sampled, per-image token sets), and the typed error on families without a CLS-patch
grid (Qwen2-VL, InstructBLIP)."""

from __future__ import annotations

import json

import pytest
import torch

from attnzoo.errors import InvalidOptionError
from attnzoo.multimodal.hallucination import PAINT, FixedImageSpan, LayoutError
from attnzoo.multimodal.hallucination.functional.paint import paint_token_sets
from attnzoo.multimodal.hallucination.layouts import family_of
from attnzoo.multimodal.hallucination.transformers_compat import cache_keyword, output_cache
from tests.helpers import reference_path
from tests.lvlm_helpers import BUILDERS, greedy, sampled, sharpen_attention

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parity
def test_paint_matches_the_official_code(reference_dir):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = reference_path(reference_dir, "paint_attention")
    config = json.loads((folder / "config.json").read_text())
    inputs, ref = load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors")
    model = LlamaForCausalLM(LlamaConfig(**config["constructor_kwargs"])).eval()
    model.load_state_dict(load_file(folder / "state_dict.safetensors"), strict=True)
    settings = config["method_settings"]
    tol = config["suggested_tolerance"]
    close = {"atol": tol["atol"], "rtol": tol["rtol"]}

    n = settings["num_vision_tokens"]
    cls = inputs["vit_cls_attn"]
    local, summary = paint_token_sets(cls[0], cls[-2], settings["local_token_ratio"], num_patches=n)
    assert torch.equal(local, ref["local_tokens_sorted"]) and torch.equal(summary, ref["summary_tokens_sorted"])

    start, length = inputs["image_span"].tolist()
    assert (start, length) == (settings["img_start_idx"], n)
    side = int(n**0.5)
    paint = PAINT(
        settings["alpha (local)"],
        settings["beta (summary)"],
        start_layer=settings["start_layer"],
        end_layer=settings["end_layer (exclusive)"],
        token_sets=(local, summary),
    )
    outs = {}
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0]))
        for i, layer in enumerate(model.model.layers)
    ]
    with paint.attach(model, layout=FixedImageSpan(start, length, grid=(side, side))), torch.no_grad():
        out = model(inputs_embeds=inputs["x"], use_cache=True, output_attentions=True)
        prefill_outs = dict(outs)
        cache, decode = output_cache(out), []
        for t in range(inputs["decode_input_ids"].shape[1]):
            step = model(
                input_ids=inputs["decode_input_ids"][:, t : t + 1],
                use_cache=True,
                output_attentions=True,
                **{cache_keyword(): cache},
            )
            cache = output_cache(step)
            decode.append(step.logits[:, -1])
            for layer in range(len(model.model.layers)):
                torch.testing.assert_close(
                    step.attentions[layer][:, :, -1], ref[f"decode.{t}.attn_weights.{layer}"], **close
                )
                torch.testing.assert_close(outs[layer], ref[f"decode.{t}.attn_out.{layer}"], **close)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(out.logits, ref["y"], **close)
    for layer in range(len(model.model.layers)):
        torch.testing.assert_close(out.attentions[layer][:, :, -1], ref[f"attn_weights_last_row.{layer}"], **close)
        torch.testing.assert_close(prefill_outs[layer], ref[f"attn_out.{layer}"], **close)
    decode_logits = torch.stack(decode)
    torch.testing.assert_close(decode_logits, ref["decode_logits"], **close)
    greedy_tokens = torch.cat([out.logits[:, -1].argmax(-1), decode_logits[:, 0].argmax(-1)])
    assert torch.equal(greedy_tokens, ref["greedy_next_token"].flatten())
    assert len(paint.last_token_sets) == 1 and torch.equal(paint.last_token_sets[0][1], summary)


def eager_cls_rows(model, pixels, layer):
    """Row 0 (CLS query) of the CLIP tower's eager attention at ``layer``, [images, heads, 1 + patches]."""
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return tower(pixels, output_attentions=True).attentions[layer][:, :, 0]
    finally:
        tower.config._attn_implementation = "sdpa"


def test_paint_reads_the_cls_rows_and_edits_every_image():
    model, inputs = BUILDERS["llava"](batch=2, image_size=56)  # 16 patches per image
    sharpen_attention(model)
    with torch.no_grad():
        stock = model(**inputs).logits[:, -1]
    first, penultimate = (eager_cls_rows(model, inputs["pixel_values"], layer) for layer in (0, -2))
    with PAINT(local_ratio=0.5).attach(model) as paint:
        with torch.no_grad():
            edited = model(**inputs).logits[:, -1]
        tokens = greedy(model, inputs, max_new_tokens=4), sampled(model, inputs, max_new_tokens=4)
    assert not torch.allclose(edited, stock)
    assert all(t.shape == (2, 4) for t in tokens)
    assert len(paint.last_token_sets) == 2
    for image, (local, summary) in enumerate(paint.last_token_sets):
        want = paint_token_sets(first[image], penultimate[image], 0.5, num_patches=16)
        assert torch.equal(local, want[0]) and torch.equal(summary, want[1])
        assert not set(local.tolist()) & set(summary.tolist())


def test_paint_under_beam_search_gives_each_beam_its_images_sets():
    """Beam search repeats each prompt's row after the tower saw its image once: every beam row gets
    the sets of its prompt's image and the edited model's next-token logits."""
    model, inputs = BUILDERS["llava"](batch=2, image_size=56)
    sharpen_attention(model)
    with PAINT(local_ratio=0.5).attach(model) as paint:
        with torch.no_grad():
            edited = model(**inputs).logits[:, -1].repeat_interleave(2, dim=0)
        prompts = list(paint.last_token_sets)
        beams = model.generate(
            **inputs, max_new_tokens=2, num_beams=2, pad_token_id=0, output_logits=True, return_dict_in_generate=True
        )
    torch.testing.assert_close(beams.logits[0], edited, atol=1e-5, rtol=1e-5)
    repeated = [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert len(paint.last_token_sets) == 4
    for (local, summary), (want_local, want_summary) in zip(paint.last_token_sets, repeated, strict=True):
        assert torch.equal(local, want_local) and torch.equal(summary, want_summary)


def test_paint_strengths_land_on_the_grid_positions():
    model, inputs = BUILDERS["llava"](batch=2)
    paint = PAINT(alpha=0.7, beta=0.3, token_sets=([0, 3], [1]))
    from attnzoo.multimodal.hallucination.base import StreamState

    tokens = family_of(model).image_tokens(inputs["input_ids"], {"num_images": 2})
    strengths = paint._token_strengths(StreamState(image_tokens=tokens))
    for run in tokens.runs:
        row = strengths[run.sample]
        assert row[run.start : run.start + 4].tolist() == pytest.approx([0.7, 0.3, 0.0, 0.7])
        assert row.count_nonzero() == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"alpha": -0.1},
        {"alpha": float("nan")},
        {"alpha": float("inf")},
        {"beta": -1.0},
        {"beta": float("nan")},
        {"beta": -float("inf")},
        {"local_ratio": 0.0},
        {"local_ratio": -0.5},
        {"local_ratio": 1.5},
        {"local_ratio": float("nan")},
        {"summary_layer": 1.5},
        {"summary_layer": True},
    ],
)
def test_paint_bad_settings_fail_when_it_is_built(bad):
    ((name, value),) = bad.items()
    with pytest.raises(InvalidOptionError, match=f"PAINT's {name} .*{value!r}"):
        PAINT(**bad)


def test_paint_edge_settings_still_construct():
    paint = PAINT(alpha=0.0, beta=0.0, local_ratio=1.0, summary_layer=-1)
    assert (paint.alpha, paint.beta, paint.local_ratio, paint.summary_layer) == (0.0, 0.0, 1.0, -1)
    assert PAINT(local_ratio=1e-3, summary_layer=3.0).summary_layer == 3


@pytest.mark.parametrize("layer", [2, -3, 99])
def test_paint_summary_layer_must_be_a_vision_tower_layer(layer):
    """Checked against the tower's depth when PAINT attaches (a typed error, no hook left behind)."""
    model, _ = BUILDERS["llava"]()
    depth = model.config.vision_config.num_hidden_layers
    tower = model.model.vision_tower
    assert depth == 2 == len(getattr(tower, "vision_model", tower).encoder.layers)
    with pytest.raises(InvalidOptionError, match=f"summary_layer {layer} .*2\\b"):
        PAINT(summary_layer=layer).attach(model)
    assert not any(m._forward_pre_hooks for m in model.modules())
    for edge in (-2, 1):
        PAINT(summary_layer=edge).attach(model).detach()


@pytest.mark.parametrize("family", ["qwen2_vl", "instructblip"])
def test_paint_needs_a_cls_patch_grid(family):
    model, _ = BUILDERS[family]()
    with pytest.raises(LayoutError, match="PAINT"):
        PAINT().attach(model)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_paint_token_sets_must_fit_the_image():
    model, inputs = BUILDERS["llava"]()
    with PAINT(token_sets=([0, 9], [1])).attach(model), pytest.raises(InvalidOptionError, match="4 patches"):
        greedy(model, inputs)
