"""PAI: the last-row amplification against a hand computation from the layer's own projections,
generate on tiny LLaVA, Qwen2-VL and InstructBLIP (greedy and sampled, with and without its CFG
processor), the CFG rule against a hand-run text-only branch, and the official coupling (first token
unedited with CFG) against the paper's."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from attnzoo.errors import InvalidOptionError
from attnzoo.multimodal.hallucination import PAI, FixedImageSpan, PAICFGLogitsProcessor, text_only_inputs
from tests.lvlm_helpers import BUILDERS, EOS_TOKEN_ID, greedy, sampled, sharpen_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(layers=4):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    return sharpen_attention_lm(LlamaForCausalLM(config).eval())


def sharpen_attention_lm(model, factor=6.0):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def pre_softmax_logits(model, ids, layer):
    """The layer's causal attention logits [B, H, S, S], from its own projections and RoPE."""
    seen = {}
    attn = model.model.layers[layer].self_attn

    def hook(module, args, kwargs):
        seen["hidden"], seen["rope"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    hidden, (cos, sin) = seen["hidden"], seen["rope"]
    b, s, _ = hidden.shape
    q = attn.q_proj(hidden).view(b, s, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, s, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(2, 3) * attn.scaling
    return scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), torch.finfo(scores.dtype).min)


def test_pai_edits_the_last_row_of_the_image_columns():
    model = tiny_lm()
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    span, alpha, start = FixedImageSpan(3, 6), 0.5, 2
    with torch.no_grad():
        stock = model(ids, output_attentions=True).attentions
    expected_scores = pre_softmax_logits(model, ids, start)
    last = expected_scores[:, :, -1]
    image = slice(span.start, span.start + span.length)
    last[..., image] = last[..., image] + alpha * last[..., image].abs()
    with PAI(alpha, start_layer=start, end_layer=3).attach(model, layout=span), torch.no_grad():
        edited = model(ids, output_attentions=True).attentions
    for layer in range(start):
        assert torch.equal(edited[layer], stock[layer])
    torch.testing.assert_close(edited[start][:, :, -1], torch.softmax(last, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(edited[start][:, :, :-1], stock[start][:, :, :-1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(edited[start][:, :, -1], stock[start][:, :, -1])
    assert edited[start][:, :, -1, image].sum() > stock[start][:, :, -1, image].sum()  # more attention on the image


def test_pai_settings_and_errors():
    model = tiny_lm()
    assert PAI().describe() == {
        "method": "pai",
        "behaviour": "official",
        "alpha": 0.2,
        "start_layer": 2,
        "end_layer": None,
    }
    with PAI(end_layer=4).attach(model, layout=FixedImageSpan(0, 2)) as pai:
        assert pai.describe()["end_layer"] == 4
    with pytest.raises(InvalidOptionError, match=r"\[2, 9\)"):
        PAI(end_layer=9).attach(model, layout=FixedImageSpan(0, 2))
    with pytest.raises(InvalidOptionError, match="cutoff"):
        PAICFGLogitsProcessor(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, cutoff=0.0)


@pytest.mark.parametrize("alpha", [-0.1, -5.0, float("nan"), float("inf"), -float("inf")])
def test_pai_alpha_must_be_finite_and_not_negative(alpha):
    with pytest.raises(InvalidOptionError, match=r"PAI's alpha .*got"):
        PAI(alpha=alpha)


@pytest.mark.parametrize("gamma", [float("nan"), float("inf"), -float("inf")])
def test_pai_cfg_gamma_must_be_finite(gamma):
    """gamma nan or inf would make every guided score nan (every answer padding)."""
    model = tiny_lm()
    with pytest.raises(InvalidOptionError, match=r"gamma must be finite, got (nan|inf|-inf)"):
        PAICFGLogitsProcessor(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, gamma=gamma)


def test_pai_edge_values_still_construct():
    """alpha 0 (no edit) and any finite gamma: 1 is no guidance, 0 the text-only branch, below 0 guidance
    away from the image; the formula is defined for all of them and the official processor takes any."""
    assert PAI(alpha=0.0).alpha == 0.0 and PAI(alpha=1e6).alpha == 1e6
    model = tiny_lm()
    for gamma in (0.0, 0.5, 1.0, -2.0, 100.0):
        cfg = PAICFGLogitsProcessor(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, gamma=gamma)
        assert cfg.gamma == gamma


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_pai_generates_on_tiny_lvlms(family):
    model, inputs = BUILDERS[family](batch=2)
    sharpen_attention(model)
    with torch.no_grad():
        stock = model(**inputs).logits[:, -1]
    with PAI(alpha=1.0).attach(model) as pai:
        with torch.no_grad():
            assert not torch.allclose(model(**inputs).logits[:, -1], stock)
        plain = greedy(model, inputs, max_new_tokens=4), sampled(model, inputs, max_new_tokens=4)
        cfg = pai.cfg_processor(inputs, gamma=1.5)
        guided = greedy(model, inputs, max_new_tokens=4, logits_processor=LogitsProcessorList([cfg]))
        drawn = sampled(
            model, inputs, max_new_tokens=4, logits_processor=LogitsProcessorList([pai.cfg_processor(inputs)])
        )
    for tokens in (*plain, guided, drawn):
        assert tokens.shape == (2, 4)
    assert cfg.branch_calls == 4


class Spy:
    """A processor placed before the CFG processor: records the scores of each step."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


@pytest.mark.parametrize("behaviour", ["official", "paper"])
def test_cfg_rule_and_the_official_first_token(behaviour):
    model, inputs = BUILDERS["llava"](batch=2)
    sharpen_attention(model)
    with torch.no_grad():
        stock = model(**inputs).logits[:, -1]
        unconditional = model(**text_only_inputs(model, inputs)).logits[:, -1]
    stock[:, EOS_TOKEN_ID] = -float("inf")  # generate's min_new_tokens runs before the processors
    gamma = 1.7
    pai = PAI(alpha=1.0, behaviour=behaviour).attach(model)
    spy, cfg = Spy(), pai.cfg_processor(inputs, gamma=gamma)
    steps = []

    def after(input_ids, scores):
        steps.append(scores.clone())
        return scores

    greedy(model, inputs, max_new_tokens=3, logits_processor=LogitsProcessorList([spy, cfg, after]))
    pai.detach()
    first = spy.scores[0]
    if behaviour == "official":  # the first pass ran unedited (use_cfg starts True)
        torch.testing.assert_close(first, stock, atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(first, stock, atol=1e-3)
    conditional = torch.log_softmax(first, -1)
    u = torch.log_softmax(unconditional, -1)
    expected = gamma * (conditional - u) + u
    expected[conditional < torch.log(torch.tensor(0.1)) + conditional.max(-1, keepdim=True).values] = -float("inf")
    torch.testing.assert_close(steps[0], expected, atol=1e-5, rtol=1e-5)
    assert cfg.describe() == {"method": "pai-cfg", "gamma": gamma, "cutoff": 0.1}


def test_cfg_gamma_one_skips_the_branch():
    model, inputs = BUILDERS["llava"]()
    with PAI().attach(model) as pai:
        cfg = pai.cfg_processor(inputs, gamma=1.0)
        scores = torch.randn(1, 1000)
        torch.testing.assert_close(cfg(inputs["input_ids"], scores), torch.log_softmax(scores, -1))
        assert cfg.branch_calls == 0


def test_a_cfg_processor_never_leaves_the_edit_switched_off():
    """The official coupling holds the edit until the CFG processor's first call: gamma 1 (no branch)
    must not hold it, and a processor that never ran must not hold a later attachment."""
    model, inputs = BUILDERS["llava"]()
    sharpen_attention(model)
    with torch.no_grad():
        stock = model(**inputs).logits[:, -1]
        with PAI(alpha=1.0).attach(model):
            edited = model(**inputs).logits[:, -1]
    assert not torch.allclose(edited, stock, atol=1e-4)  # the edit shows on the prompt's last row
    pai = PAI(alpha=1.0)
    with torch.no_grad():
        with pai.attach(model):
            pai.cfg_processor(inputs, gamma=1.0)
            torch.testing.assert_close(model(**inputs).logits[:, -1], edited)
        with pai.attach(model):
            pai.cfg_processor(inputs, gamma=1.7)  # built, never called
        with pai.attach(model):  # a new attachment edits again
            torch.testing.assert_close(model(**inputs).logits[:, -1], edited)


@pytest.mark.parametrize("settings", [{"gamma": float("nan")}, {"gamma": float("inf")}, {"cutoff": 2.0}])
@pytest.mark.parametrize("method", ["pai", "paint"])
def test_bad_cfg_settings_fail_when_the_method_is_built(method, settings):
    """gamma and cutoff given by name are checked with the method, before any image is read."""
    from attnzoo.multimodal.hallucination.methods import build_methods

    with pytest.raises(InvalidOptionError, match=f"^{method.upper()}'s CFG (strength gamma|cutoff)"):
        build_methods(method, **settings)
    assert build_methods(method, gamma=-3.0, cutoff=1.0)[0].gamma == -3.0  # any finite strength
