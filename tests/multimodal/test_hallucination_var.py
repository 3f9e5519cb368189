"""VAR: parity with the official code (var_attention fixture: sinks, selected heads, edited rows and
every float output), the redistribution's invariants (hypothesis), generate on tiny LLaVA, Qwen2-VL
and InstructBLIP with injected sinks, the official-vs-paper behaviours, the rho/p mapping and the
sink-dimension calibration."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.multimodal.hallucination import VAR, FixedImageSpan, find_sink_dims, redistribute, sink_scores
from attnzoo.multimodal.hallucination.base import family_for, session_of
from attnzoo.multimodal.hallucination.layouts import family_of
from attnzoo.multimodal.hallucination.transformers_compat import cache_keyword, output_cache
from attnzoo.multimodal.hallucination.var import SINK_DIMS, sink_dims_for
from tests.helpers import reference_path
from tests.lvlm_helpers import BUILDERS, greedy, sampled, sharpen_attention

pytestmark = pytest.mark.usefixtures("one_thread")


# -- parity ------------------------------------------------------------------------------------


def load_var_fixture(reference_dir):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = reference_path(reference_dir, "var_attention")
    config = json.loads((folder / "config.json").read_text())
    model = LlamaForCausalLM(LlamaConfig(**config["constructor_kwargs"])).eval()
    model.load_state_dict(load_file(folder / "state_dict.safetensors"), strict=True)
    inputs = load_file(folder / "inputs.safetensors")
    return config, model, inputs, load_file(folder / "outputs.safetensors")


def var_from_fixture(config, inputs, **kwargs) -> tuple[VAR, FixedImageSpan]:
    settings_ = config["method_settings"]
    var = VAR.from_code_values(
        rho=settings_["rho"],
        p=settings_["p"],
        tau=settings_["tau"],
        summ=settings_["summ"],
        sink_dims=inputs["sink_dims"].tolist(),
        sink_layers=settings_["sink_select_layers"],
        trace=True,
        **kwargs,
    )
    start, length = inputs["image_span"].tolist()
    return var, FixedImageSpan(start, length)


def run_fixture(model, inputs, layers):
    """Prefill on inputs_embeds, then teacher-forced decode steps with the cache, recording each
    layer's input and attention output."""
    seen: dict[str, torch.Tensor] = {}

    def recorder(name, index, pre):
        def hook(module, args, kwargs, output=None):
            seen[f"{name}.{index}"] = (args[0] if args else kwargs["hidden_states"]) if pre else output[0]

        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(recorder("layer_input", index, True), with_kwargs=True))
        handles.append(
            layer.self_attn.register_forward_hook(
                lambda m, a, k, o, i=index: seen.__setitem__(f"attn_out.{i}", o[0]), with_kwargs=True
            )
        )
    try:
        with torch.no_grad():
            out = model(
                inputs_embeds=inputs["x"], position_ids=inputs["position_ids"], use_cache=True, output_attentions=True
            )
            prefill = dict(seen)
            cache, steps, total = output_cache(out), [], inputs["x"].shape[1]
            for t in range(inputs["decode_input_ids"].shape[1]):
                step = model(
                    input_ids=inputs["decode_input_ids"][:, t : t + 1],
                    position_ids=torch.tensor([[total + t]]),
                    use_cache=True,
                    output_attentions=True,
                    **{cache_keyword(): cache},
                )
                cache = output_cache(step)
                steps.append((step.logits[:, -1], step.attentions, {k: v for k, v in seen.items() if "attn_out" in k}))
    finally:
        for handle in handles:
            handle.remove()
    return out, prefill, steps


@pytest.mark.parity
def test_var_matches_the_official_code(reference_dir):
    config, model, inputs, ref = load_var_fixture(reference_dir)
    tol = config["suggested_tolerance"]
    close = {"atol": tol["atol"], "rtol": tol["rtol"]}
    var, span = var_from_fixture(config, inputs)
    assert (var.rho_code, var.p_code) == (config["method_settings"]["rho"], config["method_settings"]["p"])
    layers = model.model.layers
    with var.attach(model, layout=span):
        out, prefill, steps = run_fixture(model, inputs, layers)
    torch.testing.assert_close(out.logits, ref["y"], **close)
    for layer in range(len(layers)):
        torch.testing.assert_close(out.attentions[layer], ref[f"attn_weights.{layer}"], **close)
        torch.testing.assert_close(prefill[f"attn_out.{layer}"], ref[f"attn_out.{layer}"], **close)
        torch.testing.assert_close(
            prefill[f"layer_input.{layer}"], ref[f"layer_input.{layer}"], atol=1e-3, rtol=tol["rtol"]
        )
    dims = inputs["sink_dims"].tolist()
    for layer in config["method_settings"]["sink_select_layers"]:
        phi = sink_scores(prefill[f"layer_input.{layer}"], dims)[0]
        torch.testing.assert_close(phi, ref[f"phi.{layer}"], **close)
    records = {(r["step"], r["layer"]): r for r in var.records}
    for layer in config["method_settings"]["sink_select_layers"]:
        record = records["prefill", layer]
        assert torch.equal(record["sinks"][0], ref[f"sink_indices.{layer}"])
        assert torch.equal(record["candidates"], ref[f"forked_heads.prefill.{layer}"])
        assert torch.equal(record["edited"][0], ref[f"edited_rows.prefill.{layer}"])
        for t in range(len(steps)):
            assert torch.equal(records[t, layer]["candidates"], ref[f"forked_heads.decode.{t}.{layer}"])
            assert torch.equal(records[t, layer]["edited"][0], ref[f"edited_rows.decode.{t}.{layer}"])
    decode_logits = torch.stack([logits for logits, _, _ in steps])
    torch.testing.assert_close(decode_logits, ref["decode_logits"], **close)
    for t, (_, attentions, outs) in enumerate(steps):
        for layer in range(len(layers)):
            torch.testing.assert_close(attentions[layer], ref[f"decode.{t}.attn_weights.{layer}"], **close)
            torch.testing.assert_close(outs[f"attn_out.{layer}"], ref[f"decode.{t}.attn_out.{layer}"], **close)
    greedy_tokens = torch.cat([out.logits[:, -1].argmax(-1), decode_logits[:, 0].argmax(-1)])
    assert torch.equal(greedy_tokens, ref["greedy_next_token"].flatten())
    assert config["checks"]["last_layer_edited"] and (len(layers) - 1) in var.edited_layers
    with torch.no_grad():  # detached: the stock eager model again
        base = model(inputs_embeds=inputs["x"], position_ids=inputs["position_ids"]).logits
    torch.testing.assert_close(base, ref["logits_base"], **close)


@pytest.mark.parity
def test_var_paper_behaviour_leaves_the_last_layer_alone(reference_dir):
    config, model, inputs, ref = load_var_fixture(reference_dir)
    tol = config["suggested_tolerance"]
    var, span = var_from_fixture(config, inputs, behaviour="paper")
    last = len(model.model.layers) - 1
    with var.attach(model, layout=span):
        out, _, _ = run_fixture(model, inputs, model.model.layers)
    assert last not in var.edited_layers and var.describe()["behaviour"] == "paper"
    for layer in range(last):
        torch.testing.assert_close(
            out.attentions[layer], ref[f"attn_weights.{layer}"], atol=tol["atol"], rtol=tol["rtol"]
        )
    # the last layer sees the official inputs but is not edited: its weights are what HeadFork saw
    torch.testing.assert_close(
        out.attentions[last], ref[f"attn_weights_pre_edit.{last}"], atol=tol["atol"], rtol=tol["rtol"]
    )
    assert not torch.allclose(out.attentions[last], ref[f"attn_weights.{last}"], atol=tol["atol"])


# -- invariants --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    heads=st.integers(1, 3),
    keys=st.integers(6, 24),
    rho=st.floats(0.0, 1.0),
    p=st.floats(0.0, 1.0),
    summ=st.floats(0.0, 0.6),
    sharp=st.floats(0.5, 4.0),
)
def test_redistribution_invariants(seed, heads, keys, rho, p, summ, sharp):
    g = torch.Generator().manual_seed(seed)
    batch, rows = 2, 5
    weights = torch.softmax(sharp * torch.randn(batch, heads, rows, keys, generator=g, dtype=torch.float64), dim=-1)
    start = int(torch.randint(0, keys // 2, (1,), generator=g))
    image = torch.zeros(batch, keys, dtype=torch.bool)
    image[:, start : start + keys // 2] = True
    sinks = torch.rand(batch, keys, generator=g) < 0.3
    sinks[0, start] = True  # a visual sink in row 0 ...
    sinks[1] &= ~image[1]  # ... none in row 1 (text sinks only): never edited
    allowed = torch.rand(batch, rows, generator=g) < 0.7
    edited, selected = redistribute(weights, image, sinks, rho=rho, p=p, summ=summ, rows=allowed)

    visual = sinks & image
    image_sum = (weights * image[:, None, None]).sum(-1)
    share = (weights * visual[:, None, None]).sum(-1) / (image_sum + 1e-6 * image.sum(-1)[:, None, None])
    rest = (weights * (image & ~visual)[:, None, None]).sum(-1)
    expected = (share <= 1 - rho) & (image_sum >= summ) & visual.any(-1)[:, None, None] & (rest > 0) & allowed[:, None]
    assert torch.equal(selected, expected)
    assert not selected[1].any()

    torch.testing.assert_close(edited.sum(-1), torch.ones_like(edited.sum(-1)), atol=1e-12, rtol=0)
    assert torch.equal(edited[~selected], weights[~selected])  # only selected rows change
    sink_before = (weights * sinks[:, None, None]).sum(-1)[selected]
    sink_after = (edited * sinks[:, None, None]).sum(-1)[selected]
    torch.testing.assert_close(sink_before - sink_after, p * sink_before, atol=1e-12, rtol=1e-9)  # moves p (paper)
    gain_mask = (image & ~visual)[:, None, None]
    gain = ((edited - weights) * gain_mask).sum(-1)[selected]
    torch.testing.assert_close(gain, p * sink_before, atol=1e-12, rtol=1e-9)  # all of it to non-sink image tokens
    others = ~(sinks | image)[:, None, None].expand_as(weights)
    assert torch.equal(edited[others], weights[others])  # plain text tokens keep their weight
    ratio_before = weights * gain_mask / (weights * gain_mask).sum(-1, keepdim=True)
    ratio_after = edited * gain_mask / (edited * gain_mask).sum(-1, keepdim=True)
    torch.testing.assert_close(ratio_after[selected], ratio_before[selected], atol=1e-12, rtol=1e-9)  # proportional


# -- on tiny LVLMs -----------------------------------------------------------------------------

SINK_DIMS_TINY = (5, 17)


@contextmanager
def injected_sinks(model, positions: torch.Tensor, value: float = 60.0):
    """Massive activations in SINK_DIMS_TINY at ``positions`` [B, S] (bool) of every prompt forward,
    added to the input of the first language-model layer (the residual stream carries them on)."""
    layer = family_for(model).text_model().layers[0]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != positions.shape[1]:
            return None
        hidden = hidden.clone()
        for dim in SINK_DIMS_TINY:
            hidden[..., dim] += value * positions.to(hidden)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def sink_positions(model, inputs) -> torch.Tensor:
    """BOS, the first and third image token of every image, and the token after the last image."""
    ids = inputs["input_ids"]
    family = family_of(model)
    info = {"num_images": ids.shape[0]}
    if "image_grid_thw" in inputs:
        info["grid_thw"] = [tuple(g.tolist()) for g in inputs["image_grid_thw"]]
    tokens = family.image_tokens(ids, info)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    for run in tokens.runs:
        first = int(inputs["attention_mask"][run.sample].argmax())
        positions[run.sample, [first, run.start, run.start + 2, run.start + run.length]] = True
    return positions


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_var_generates_on_tiny_lvlms(family):
    model, inputs = BUILDERS[family](batch=2)
    sharpen_attention(model, 2.0)
    with injected_sinks(model, sink_positions(model, inputs)):
        stock_scores = model(**inputs).logits[:, -1].detach()
        stock = greedy(model, inputs, max_new_tokens=4)
        var = VAR(sink_dims=SINK_DIMS_TINY, tau=4.0, summ=0.05, trace=True)
        with var.attach(model):
            with torch.no_grad():
                scores = model(**inputs).logits[:, -1]
            tokens = greedy(model, inputs, max_new_tokens=4)
            drawn = sampled(model, inputs, max_new_tokens=4)
    assert tokens.shape == stock.shape == drawn.shape
    assert not torch.allclose(scores, stock_scores)  # the method acts
    prefill = [r for r in var.records if r["step"] == "prefill"]
    assert {r["layer"] for r in prefill} == set(range(2, len(family_for(model).text_model().layers)))
    assert any(r["edited"].any() for r in prefill)
    assert any(r["step"] != "prefill" and r["edited"].any() for r in var.records)  # decode rows too
    for record in prefill:  # BOS and two image tokens of every image are sinks
        assert all(len(s) >= 3 for s in record["sinks"])


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_var_layers_without_a_visual_sink_run_the_model_own_attention(family):
    """A layer whose sinks are all outside the image is not edited (nothing would move), so on an SDPA
    model it runs SDPA: with no sink anywhere the answer is the stock model's bit for bit, prefill and
    decoding. With ``trace`` every sink layer is recorded, edited or not."""
    model, inputs = BUILDERS[family](batch=2)
    stock_scores, stock = model(**inputs).logits.detach(), greedy(model, inputs, max_new_tokens=4)
    var = VAR(sink_dims=SINK_DIMS_TINY, tau=1e9)
    with var.attach(model):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, stock_scores)
        assert torch.equal(greedy(model, inputs, max_new_tokens=4), stock)
    traced = VAR(sink_dims=SINK_DIMS_TINY, tau=1e9, trace=True)
    with traced.attach(model), torch.no_grad():
        model(**inputs)
    layers = len(family_for(model).text_model().layers)
    assert {r["layer"] for r in traced.records} == set(range(2, layers))
    assert not any(r["edited"].any() for r in traced.records)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_var_decoding_steps_on_the_fused_kernel_match_the_eager_path(family, triton_device):
    """With the Triton backend (native on a GPU, forced under the interpreter here), VAR's decoding
    steps run the fused kernel instead of eager attention and the edit: the same tokens, scores within
    float rounding; the prefill stays on the eager path (it detects the sinks and edits many rows)."""
    from attnzoo.kernels import dispatch_counts, reset_dispatch_counts, use_backend
    from attnzoo.kernels.redistributed_attention import OP

    model, inputs = BUILDERS[family](batch=2)
    model.to(triton_device)
    inputs = {k: v.to(triton_device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    sharpen_attention(model, 2.0)

    def run():
        var = VAR(sink_dims=SINK_DIMS_TINY, tau=4.0, summ=0.05)
        with var.attach(model), torch.no_grad():
            return model.generate(
                **inputs,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )

    with injected_sinks(model, sink_positions(model, inputs)):
        with use_backend("torch"):  # the eager path, on a GPU too
            eager = run()
        reset_dispatch_counts()
        with use_backend("triton"):
            fused = run()
    edited_layers = len(family_for(model).text_model().layers) - 2
    assert dispatch_counts()[OP] == {"triton": 3 * edited_layers}  # 3 decoding steps after the prefill
    assert torch.equal(fused.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(fused.scores), torch.stack(eager.scores), atol=1e-4, rtol=1e-4)


def test_var_official_carries_sinks_over_and_paper_does_not():
    model, inputs = BUILDERS["llava"](batch=1)
    first = sink_positions(model, inputs)
    moved = torch.roll(first, 1, dims=1)
    runs = {}
    for behaviour in ("official", "paper"):
        var = VAR(sink_dims=SINK_DIMS_TINY, tau=4.0, summ=0.0, behaviour=behaviour, trace=True)
        with var.attach(model):
            for positions in (first, moved):
                with injected_sinks(model, positions), torch.no_grad():
                    model(**inputs)
        runs[behaviour] = [r for r in var.records if r["step"] == "prefill"]
    image_end = int(family_of(model).image_tokens(inputs["input_ids"]).image_end())
    for behaviour, records in runs.items():
        second = [r for r in records if r["prompt"] == 2]
        sinks_second = second[0]["sinks"][0].tolist()
        early_rows = any(r["edited"][0, :, :image_end].any() for r in second)
        if behaviour == "official":  # the first prompt's sinks, every row
            assert sinks_second == torch.nonzero(first[0]).flatten().tolist()
            assert early_rows
        else:
            assert sinks_second == torch.nonzero(moved[0]).flatten().tolist()
            assert not early_rows
        assert not any(r["edited"][0, :, :image_end].any() for r in records if r["prompt"] == 1)


def test_var_reset_and_last_layer():
    model, inputs = BUILDERS["llava"]()
    n = len(family_for(model).text_model().layers)
    official = VAR(sink_dims=SINK_DIMS_TINY).attach(model)
    assert official.edited_layers == tuple(range(2, n))
    official.reset()
    official.detach()
    with VAR(sink_dims=SINK_DIMS_TINY, behaviour="paper").attach(model) as paper:
        assert paper.edited_layers == tuple(range(2, n - 1))


def test_var_parameters():
    var = VAR()
    assert (var.rho, var.p, var.rho_code, var.p_code, var.tau, var.summ) == (0.5, 0.4, 0.5, 0.6, 20.0, 0.2)
    code = VAR.from_code_values(rho=0.3, p=0.6)
    assert code.rho == pytest.approx(0.7) and code.p_code == pytest.approx(0.6)
    described = VAR(sink_dims=(1, 2)).describe()
    assert described["method"] == "var" and described["behaviour"] == "official" and described["p_code"] == 0.6
    with pytest.raises(InvalidOptionError, match="rho"):
        VAR(rho=1.5)
    with pytest.raises(InvalidOptionError, match="behaviour"):
        VAR(behaviour="faithful")
    model, _ = BUILDERS["llava"]()
    with pytest.raises(InvalidOptionError, match="find_sink_dims"):
        VAR().attach(model)  # a random model has no known sink dims
    with pytest.raises(InvalidOptionError, match="hidden size"):
        VAR(sink_dims=(1, 4096)).attach(model)
    assert not any(len(m._forward_pre_hooks) for m in model.modules())

    class Named:
        name_or_path = "llava-hf/llava-1.5-13b-hf"

    assert sink_dims_for(Named()) == SINK_DIMS["llama-2-13b"] == (2100, 4743)


@pytest.mark.parametrize(
    "bad",
    [
        {"tau": float("nan")},
        {"tau": float("inf")},
        {"tau": -float("inf")},
        {"summ": -0.1},
        {"summ": 1.5},
        {"summ": float("nan")},
        {"rho": float("nan")},
        {"rho": -0.1},
        {"p": 1.1},
        {"p": float("inf")},
    ],
)
def test_var_bad_settings_fail_when_it_is_built(bad):
    ((name, value),) = bad.items()
    with pytest.raises(InvalidOptionError, match=f"VAR's {name} .*{value!r}"):
        VAR(**bad)
    if name in ("rho", "p"):  # the code's inverted values go through the same check
        with pytest.raises(InvalidOptionError, match=f"VAR's {name}"):
            VAR.from_code_values(**{name: 1 - value})


def test_var_edge_settings_still_construct():
    """summ, rho and p are shares (0 and 1 included); tau thresholds phi >= 0, so any finite tau is
    meaningful (a negative one makes every token a sink)."""
    for summ, rho, p in ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)):
        var = VAR(summ=summ, rho=rho, p=p)
        assert (var.summ, var.rho, var.p) == (summ, rho, p)
    assert VAR(tau=-3.0).tau == -3.0 and VAR(tau=0.0).tau == 0.0 and VAR(tau=1e9).tau == 1e9


def test_find_sink_dims_recovers_injected_dims():
    model, inputs = BUILDERS["llava"](batch=2)
    with injected_sinks(model, sink_positions(model, inputs)):
        dims, scores = find_sink_dims(model, [inputs, inputs], return_scores=True)
    assert dims == SINK_DIMS_TINY
    assert scores.shape == (model.config.text_config.hidden_size,)
    assert find_sink_dims(model, [inputs["input_ids"]], n_dims=3) != SINK_DIMS_TINY  # nothing injected


def test_find_sink_dims_refuses_bad_calls_and_leaves_no_hook():
    model, inputs = BUILDERS["llava"](batch=2)
    layers = family_for(model).text_model().layers
    for kwargs, pattern in (
        ({"layers": [2, 9]}, r"layers \[2, 9\]"),  # layer 2 exists: its hook must not stay behind
        ({"layers": []}, r"layers \[\]"),
        ({"n_dims": 100}, r"n_dims .*1\.\.64"),
        ({"n_dims": 0}, "n_dims"),
    ):
        with pytest.raises(InvalidOptionError, match=pattern):
            find_sink_dims(model, [inputs], **kwargs)
    for sample in ([1, 2, 3], {"pixel_values": inputs["pixel_values"]}, inputs["pixel_values"]):
        with pytest.raises(InvalidInputError, match="sample 0 must be input_ids"):
            find_sink_dims(model, [sample])
    padding = {**inputs, "attention_mask": torch.zeros_like(inputs["attention_mask"])}
    with pytest.raises(InvalidInputError, match="sample 1 has a row with no tokens"):
        find_sink_dims(model, [inputs, padding])
    with pytest.raises(InvalidInputError, match="at least one sample"):
        find_sink_dims(model, [])
    assert not any(len(layer._forward_pre_hooks) for layer in layers)
    ids = inputs["input_ids"][:1]
    assert find_sink_dims(model, [ids[0]], n_dims=3) == find_sink_dims(model, [ids], n_dims=3)  # [S] is one row


def test_var_without_sink_dims_looks_them_up_on_every_model(monkeypatch):
    """A VAR() reused on a second backbone takes that backbone's dims, not the first model's."""
    from attnzoo.multimodal.hallucination import var as var_module

    monkeypatch.setitem(var_module.SINK_DIMS, "tiny-a", (3, 7))
    monkeypatch.setitem(var_module.SINK_DIMS, "tiny-b", (10, 20))
    monkeypatch.setitem(var_module.CHECKPOINT_BACKBONES, "tiny-model-a", "tiny-a")
    monkeypatch.setitem(var_module.CHECKPOINT_BACKBONES, "tiny-model-b", "tiny-b")
    (model_a, _), (model_b, _) = BUILDERS["llava"](), BUILDERS["llava"](seed=1)
    model_a.config._name_or_path, model_b.config._name_or_path = "org/tiny-model-a", "org/tiny-model-b"
    var = VAR()
    with var.attach(model_a):
        assert var.describe()["sink_dims"] == (3, 7)
    with var.attach(model_b):
        assert var.describe()["sink_dims"] == (10, 20)
    assert var.sink_dims is None


def test_var_in_float16_moves_the_mass_where_the_gain_overflows_float16():
    """A selected row whose non-sink image attention is ~1e-6: moved / rest is ~1e5, beyond float16's
    65504. The row is the float32 row (it was NaN), rounded to float16; and in float32 a row whose
    gain overflows even float32 (rest subnormal) is left alone, as a row with rest == 0."""
    image = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    sinks = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    row = torch.tensor([0.9999, 2e-7, 1e-6, 1e-6, 0.0, 3e-5, 3e-5, 3e-5], dtype=torch.float64)
    weights = (row / row.sum())[None, None, None]
    exact, selected = redistribute(weights.float(), image, sinks, rho=0.5, p=0.4, summ=0.0)
    half, selected_half = redistribute(weights.half(), image, sinks, rho=0.5, p=0.4, summ=0.0)
    assert bool(selected.all()) and bool(selected_half.all()) and half.dtype == torch.float16
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), exact, rtol=2e-3, atol=1e-7)
    assert float(exact.sum()) == pytest.approx(1.0, abs=1e-5)  # the mass moved, none lost
    tiny = torch.tensor([[[[0.6, 0.4 - 2e-45, 1e-45, 1e-45, 0, 0, 0, 0]]]], dtype=torch.float32)
    out, chosen = redistribute(tiny, image, sinks, rho=0.0, p=0.4, summ=0.0)
    assert not bool(chosen.any()) and torch.equal(out, tiny)


def test_var_that_would_edit_no_layer_is_refused():
    """The answer would be the stock model's, recorded as VAR's: sink_layers=[] is refused when VAR is built, the
    paper behaviour on the last layer only when it is attached (leaving no hook), the official one runs there."""
    with pytest.raises(InvalidOptionError, match=r"at least one sink layer"):
        VAR(sink_layers=[])
    model, _ = BUILDERS["llava"]()
    last = len(family_for(model).text_model().layers) - 1
    with pytest.raises(InvalidOptionError, match=rf"paper behaviour leaves the last layer \({last}\) alone"):
        VAR(sink_dims=SINK_DIMS_TINY, sink_layers=[last], behaviour="paper").attach(model)
    assert not any(len(m._forward_pre_hooks) for m in model.modules()) and session_of(model) is None
    with VAR(sink_dims=SINK_DIMS_TINY, sink_layers=[last]).attach(model) as official:
        assert official.edited_layers == (last,)
