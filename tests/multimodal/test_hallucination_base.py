"""The intervention layer on tiny random LVLMs (LLaVA-1.5, Qwen2-VL, InstructBLIP): the custom
attention function is bitwise eager attention (causal mask kept: the AttentionMaskInterface entry),
and on an SDPA model the forwards no edit touches are bitwise the model's own SDPA,
detaching restores the stock model bit for bit (outputs, attention implementations, hooks), the
vision tower keeps its implementation, attention edits conflict with a typed error, and contrast
branches (LogitsProcessors with their own stream, cache and positions) match a hand-run branch; a
paired branch's inputs join the main prompts' (padding, image tiles) and it refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from attnzoo.errors import InvalidOptionError, UnknownNameError
from attnzoo.multimodal.hallucination import (
    PAI,
    VAR,
    AttentionEdit,
    ContrastBranchProcessor,
    FixedImageSpan,
    InterventionConflictError,
    InterventionError,
    attached,
    processors_then_warpers,
)
from attnzoo.multimodal.hallucination.base import PairedContrast
from attnzoo.multimodal.hallucination.layouts import family_of
from attnzoo.multimodal.hallucination.pai import PAICFGLogitsProcessor
from attnzoo.multimodal.hallucination.transformers_compat import cache_keyword, output_cache
from tests.lvlm_helpers import BUILDERS, attn_implementations, greedy, module_hooks, sampled, sharpen_attention

FAMILIES = sorted(BUILDERS)


pytestmark = pytest.mark.usefixtures("one_thread")


class NoEdit(AttentionEdit):
    """An attention edit that edits nothing, recording the masks its function receives."""

    method = "no-edit"

    def __init__(self):
        super().__init__()
        self.masks = []

    def _applies(self, layer, state):
        return True

    def _pre_softmax(self, layer, scores, state):
        self.masks.append(scores.shape)
        return scores


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_cache_keyword_continues_a_prompt_on_this_transformers():
    """The cache's name (past_key_values before transformers 5.24, cache after): a prompt continued
    from its cache under that name gives the logits of the whole sequence at once."""
    import inspect

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    ).eval()
    assert cache_keyword() in inspect.signature(model.model.forward).parameters
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids).logits[:, -3:]
        head = model(ids[:, :6], use_cache=True)
        cache = output_cache(head)
        assert cache is not None and cache.get_seq_length() == 6
        tail = model(ids[:, 6:], use_cache=True, **{cache_keyword(): cache})
    assert output_cache(tail).get_seq_length() == 9
    torch.testing.assert_close(tail.logits, whole, atol=1e-5, rtol=1e-5)
    assert output_cache(model(ids[:, :2], use_cache=False)) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_custom_attention_without_edit_is_bitwise_eager(family):
    model, inputs = BUILDERS[family](batch=2, attn_implementation="eager")
    stock_logits, stock_tokens = logits(model, inputs), greedy(model, inputs)
    with NoEdit().attach(model) as edit:
        assert torch.equal(logits(model, inputs), stock_logits)
        assert torch.equal(greedy(model, inputs), stock_tokens)
    assert edit.masks, "the custom attention function never ran"


class EditsLayer(NoEdit):
    """An edit that touches only ``layers`` (scaling their logits when ``factor`` is given), counting the
    forwards that reach the eager path."""

    def __init__(self, layers, factor=None):
        super().__init__()
        self.layers, self.factor, self.eager_forwards = set(layers), factor, 0

    def _applies(self, layer, state):
        return layer in self.layers

    def _pre_softmax(self, layer, scores, state):
        self.eager_forwards += 1
        return scores if self.factor is None else scores * self.factor


@pytest.mark.parametrize("family", FAMILIES)
def test_forwards_no_edit_touches_run_the_model_own_sdpa_bitwise(family):
    """On a model loaded with SDPA, layers an edit leaves alone run the model's own SDPA on its own mask:
    with no layer edited the outputs are the stock model's bit for bit, prefill, decoding and padding
    (batch of 2) alike; an edit of one layer changes the output and runs eager there only."""
    model, inputs = BUILDERS[family](batch=2)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    stock_logits, stock_tokens = logits(model, inputs), greedy(model, inputs)
    with EditsLayer([]).attach(model) as edit:
        assert torch.equal(logits(model, inputs), stock_logits)
        assert torch.equal(greedy(model, inputs), stock_tokens)
    assert edit.eager_forwards == 0
    with EditsLayer([1], factor=3.0).attach(model) as edit:
        edited = logits(model, inputs)
    depth = model.config.get_text_config().num_hidden_layers
    assert edit.eager_forwards == 1 and depth > 1 and not torch.allclose(edited, stock_logits, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_unedited_forwards_are_stock_sdpa_when_generate_builds_the_masks_first(family):
    """A static cache makes generate build each step's masks before the language model runs: those
    forwards still find their stock masks (bitwise stock scores), and no mask outlives its forward."""
    from attnzoo.multimodal.hallucination.base import session_of

    model, inputs = BUILDERS[family](batch=2)

    def scores():
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
                output_scores=True,
                return_dict_in_generate=True,
            )
        return torch.stack(out.scores)

    stock = scores()
    with EditsLayer([]).attach(model) as edit:
        assert torch.equal(scores(), stock)
        assert session_of(model)._stock_masks == []  # the last forward's masks were let go
    assert edit.eager_forwards == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_weights_asked_for_come_from_every_layer_with_an_edit_attached(family):
    """output_attentions, and eager_language_model (the pipeline's return_attention), get weights from
    every layer even where no edit applies (those forwards run eager then, not SDPA)."""
    from attnzoo.multimodal.hallucination.base import eager_language_model

    model, inputs = BUILDERS[family](batch=1)
    depth = model.config.get_text_config().num_hidden_layers
    layers = [m.self_attn for m in family_of(model).text_model().layers]
    seen = []
    handles = [m.register_forward_hook(lambda m, a, out: seen.append(out[1])) for m in layers]
    try:
        with EditsLayer([]).attach(model):
            with torch.no_grad():
                model(**inputs, output_attentions=True)
            assert len(seen) == depth and all(w is not None for w in seen)
            seen.clear()
            with eager_language_model(model, family_of(model)), torch.no_grad():
                model(**inputs)
            assert len(seen) == depth and all(w is not None for w in seen)
            seen.clear()
            with torch.no_grad():
                model(**inputs)
            assert len(seen) == depth and all(w is None for w in seen)  # SDPA again after the block
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_edits_run_under_beam_search(family):
    """Beam search repeats every prompt's row after the images were encoded once: an edit that changes
    nothing gives the stock beams bit for bit, and an edit that acts gives every beam row of a prompt
    the edited model's next-token logits."""
    model, inputs = BUILDERS[family](batch=2, attn_implementation="eager")
    sharpen_attention(model)
    stock = greedy(model, inputs, max_new_tokens=4, num_beams=2)
    with NoEdit().attach(model) as edit:
        assert torch.equal(greedy(model, inputs, max_new_tokens=4, num_beams=2), stock)
    assert edit.masks and edit.masks[0][0] == 4  # 2 prompts x 2 beams
    with PAI(alpha=1.0).attach(model):
        edited = logits(model, inputs)[:, -1].repeat_interleave(2, dim=0)
        beams = model.generate(
            **inputs, max_new_tokens=2, num_beams=2, pad_token_id=0, output_logits=True, return_dict_in_generate=True
        )
    torch.testing.assert_close(beams.logits[0], edited, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(model, inputs)[:, -1].repeat_interleave(2, dim=0), edited, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_the_stock_model(family):
    model, inputs = BUILDERS[family](batch=2)  # loaded with SDPA, as from_pretrained does
    sharpen_attention(model)
    stock = logits(model, inputs), greedy(model, inputs), sampled(model, inputs)
    hooks, implementations = module_hooks(model), attn_implementations(model)  # transformers adds its own at first use
    pai = PAI(alpha=1.0).attach(model)
    assert module_hooks(model) > hooks
    assert attn_implementations(model) != implementations
    edited = logits(model, inputs)
    assert not torch.allclose(edited[:, -1], stock[0][:, -1])  # the method acts
    earlier = inputs["attention_mask"][:, :-1].bool()  # padded rows are garbage under either implementation
    torch.testing.assert_close(edited[:, :-1][earlier], stock[0][:, :-1][earlier], atol=1e-5, rtol=1e-5)
    pai.detach()
    assert module_hooks(model) == hooks
    assert attn_implementations(model) == implementations
    assert not any(name.startswith("attnzoo") for name in AttentionInterface._global_mapping)
    after = logits(model, inputs), greedy(model, inputs), sampled(model, inputs)
    for a, b in zip(after, stock, strict=True):
        assert torch.equal(a, b)


def test_sdpa_model_keeps_its_causal_mask_and_vision_tower():
    """Gotcha 1: a custom name without an AttentionMaskInterface entry gets no mask at prefill (the
    rows attend to the future); ours registers eager_mask. Gotcha 2: only the language model switches,
    the CLIP tower keeps SDPA."""
    from attnzoo.multimodal.hallucination.base import eager_attention

    model, inputs = BUILDERS["llava"](batch=2)
    valid = inputs["attention_mask"].bool()
    stock = logits(model, inputs)[valid]
    with NoEdit().attach(model):
        torch.testing.assert_close(logits(model, inputs)[valid], stock, atol=1e-5, rtol=1e-5)
        assert model.config.vision_config._attn_implementation == "sdpa"
        assert model.config.text_config._attn_implementation.startswith("attnzoo")
    AttentionInterface.register("unmasked_test_only", lambda m, q, k, v, mask, **kw: eager_attention(m, q, k, v, mask))
    try:
        model.set_attn_implementation({"text_config": "unmasked_test_only"})
        assert not torch.allclose(logits(model, inputs)[valid], stock, atol=1e-2)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        AttentionInterface._global_mapping.pop("unmasked_test_only")


def test_two_attention_edits_conflict():
    model, inputs = BUILDERS["llava"]()
    stock = logits(model, inputs)
    pai = PAI(alpha=1.0).attach(model)
    with pytest.raises(InterventionConflictError, match="both edit"):
        VAR(sink_dims=(0, 1)).attach(model)
    with pytest.raises(InterventionConflictError, match="already attached"):
        pai.attach(model)
    assert pai.attached and not torch.equal(logits(model, inputs), stock)
    pai.detach()
    pai.detach()  # idempotent
    assert torch.equal(logits(model, inputs), stock)
    with pytest.raises(InterventionError, match="attach"):
        with PAI():
            pass


def test_unknown_family_and_fixed_span():
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    ).eval()
    with pytest.raises(UnknownNameError, match="model_type"):
        family_of(model)
    with pytest.raises(UnknownNameError):
        PAI().attach(model)
    ids = torch.randint(0, 50, (1, 12))
    stock = logits(model, {"input_ids": ids})
    with PAI(alpha=1.0).attach(model, layout=FixedImageSpan(2, 6)):
        assert not torch.equal(logits(model, {"input_ids": ids}), stock)
        with pytest.raises(InterventionConflictError, match="layout"):
            VAR(sink_dims=(0, 1)).attach(model, layout=FixedImageSpan(3, 6))
    assert torch.equal(logits(model, {"input_ids": ids}), stock)


# -- contrast branches -------------------------------------------------------------------------


class Recorder(ContrastBranchProcessor):
    """A contrast branch on a copy of the prompt with other pixels; returns the main scores
    unchanged and keeps the branch logits."""

    method = "recorder"

    def __init__(self, model, branch_inputs):
        super().__init__(model, branch_inputs)
        self.seen = []

    def combine(self, input_ids, scores, branch_logits):
        self.seen.append(branch_logits)
        return scores


def other_pixels(inputs):
    out = dict(inputs)
    out["pixel_values"] = inputs["pixel_values"].flip(0) + 0.5
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_branch_matches_a_hand_run_branch_and_leaves_the_main_stream_alone(family):
    model, inputs = BUILDERS[family](batch=2)
    stock = greedy(model, inputs)
    recorder = Recorder(model, other_pixels(inputs))
    tokens = greedy(model, inputs, logits_processor=LogitsProcessorList([recorder]))
    assert torch.equal(tokens, stock)  # Qwen2-VL's rope deltas and the main cache are untouched
    expected = hand_run_branch(model, other_pixels(inputs), tokens)
    assert len(recorder.seen) == tokens.shape[1]
    for got, want in zip(recorder.seen, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def hand_run_branch(model, inputs, tokens):
    """The branch's raw next-token logits, run by generate itself with the chosen tokens forced."""
    n = tokens.shape[1]
    prompt = inputs["input_ids"].shape[1]

    def force(input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[torch.arange(scores.shape[0]), tokens[:, input_ids.shape[1] - prompt]] = 0
        return forced

    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([force]),
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.logits


def test_branch_with_an_attention_edit_keeps_streams_apart():
    """PAI edits both streams; an identity contrast branch must not change the main generation."""
    model, inputs = BUILDERS["llava"](batch=2)
    sharpen_attention(model)
    with PAI(alpha=1.0).attach(model):
        alone = greedy(model, inputs, max_new_tokens=5)
        with_branch = greedy(
            model,
            inputs,
            max_new_tokens=5,
            logits_processor=LogitsProcessorList([Recorder(model, other_pixels(inputs))]),
        )
    assert torch.equal(alone, with_branch)


def test_branch_refuses_beam_search_and_other_batches():
    model, inputs = BUILDERS["llava"](batch=2)
    with pytest.raises(InterventionError, match="num_beams"):
        greedy(model, inputs, num_beams=2, logits_processor=LogitsProcessorList([Recorder(model, inputs)]))
    one = {k: v[:1] for k, v in inputs.items()}
    with pytest.raises(InterventionError, match="sequence"):
        greedy(model, inputs, logits_processor=LogitsProcessorList([Recorder(model, one)]))


def test_composition_attention_edit_plus_processors():
    model, inputs = BUILDERS["qwen2_vl"](batch=2)
    sharpen_attention(model)
    stock = greedy(model, inputs)
    pai = PAI(alpha=1.0, behaviour="paper")
    with attached(model, pai):
        processors = LogitsProcessorList([pai.cfg_processor(inputs, gamma=1.5), Recorder(model, other_pixels(inputs))])
        composed = sampled(model, inputs, logits_processor=processors)
        assert composed.shape == stock.shape
        assert processors[1].branch_calls == stock.shape[1]
    assert not pai.attached and torch.equal(greedy(model, inputs), stock)


def test_processors_then_warpers_order():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    model, inputs = BUILDERS["llava"]()
    chain = processors_then_warpers(Recorder(model, inputs), temperature=0.7, top_k=5, top_p=0.9)
    assert [type(p) for p in chain] == [Recorder, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]
    assert len(processors_then_warpers(Recorder(model, inputs))) == 1


def test_paired_inputs_join_prompts_of_other_lengths_and_tile_counts():
    """The shorter half is left-padded (pad id, mask 0) to the longer one; the main rows as they ran
    keep their own images; image tiles of different counts (LLaVA-NeXT) are zero-padded."""
    model, inputs = BUILDERS["llava"](batch=2)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    branch = {
        **inputs,
        "input_ids": torch.cat([ids[:, :1], ids], 1),
        "attention_mask": torch.cat([mask[:, :1], mask], 1),
    }
    pair = PairedContrast(Recorder(model, branch))
    paired = pair.inputs(inputs, pad_token_id=7)
    assert paired["input_ids"].shape == (4, ids.shape[1] + 1) and torch.equal(
        paired["input_ids"][2:], branch["input_ids"]
    )
    assert (paired["input_ids"][:2, 0] == 7).all() and (paired["attention_mask"][:2, 0] == 0).all()
    assert torch.equal(paired["pixel_values"], torch.cat([inputs["pixel_values"], branch["pixel_values"]]))
    main = pair.main_rows(paired, inputs)
    assert torch.equal(main["input_ids"], paired["input_ids"][:2]) and main["pixel_values"] is inputs["pixel_values"]
    tiles = PairedContrast(Recorder(model, {**inputs, "pixel_values": torch.ones(2, 5, 3, 4, 4)}))
    joined = tiles.inputs({**inputs, "pixel_values": torch.ones(2, 3, 3, 4, 4)})["pixel_values"]
    assert joined.shape == (4, 5, 3, 4, 4) and joined[:2, 3:].abs().sum() == 0 and joined[2:].min() == 1


def test_paired_refuses_what_it_cannot_run():
    model, inputs = BUILDERS["llava"](batch=2)
    with pytest.raises(InvalidOptionError, match="attention edits"):  # PAI's CFG branch runs unedited
        PairedContrast(PAICFGLogitsProcessor(model, inputs))
    pair = PairedContrast(Recorder(model, inputs))
    with pytest.raises(InvalidOptionError, match="different inputs"):
        pair.inputs({k: v for k, v in inputs.items() if k != "attention_mask"})
    with pytest.raises(InvalidOptionError, match="pixel_values"):
        pair.inputs({**inputs, "pixel_values": inputs["pixel_values"][..., :-1]})
    with pytest.raises(InterventionError, match="attached"):  # no raw logits read off the forward
        greedy(model, pair.inputs(inputs), logits_processor=LogitsProcessorList([pair]))
    from attnzoo.multimodal.hallucination.agla import AGLALogitsProcessor

    augmented = {**inputs, "pixel_values": -inputs["pixel_values"]}
    with pytest.raises(InvalidOptionError, match="AGLA's official behaviour .*first token only"):
        PairedContrast(AGLALogitsProcessor(model, augmented, behaviour="official"))
    assert PairedContrast(AGLALogitsProcessor(model, augmented, behaviour="paper")).describe()["behaviour"] == "paper"


@pytest.mark.parametrize("edit", [PAI, lambda: VAR(sink_dims=(3, 7), tau=2.0)])
def test_a_prompt_continued_from_a_cache_is_refused_with_edits_attached(edit):
    """The edits read the whole prompt in one forward (its image tokens, VAR's sinks): a prompt whose
    first tokens come from a KV cache would silently run unedited (or on an earlier prompt's state)."""
    model, inputs = BUILDERS["llava"](batch=1)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def prefix_cache():
        with torch.no_grad():
            return output_cache(model(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True))

    stock = greedy(model, {**inputs, cache_keyword(): prefix_cache()}, max_new_tokens=2)
    assert torch.equal(stock, greedy(model, inputs, max_new_tokens=2))  # the stock model continues it fine
    cache = prefix_cache()
    with edit().attach(model):
        with pytest.raises(InterventionError, match="continues a cache of 3.*without a KV cache"):
            greedy(model, {**inputs, cache_keyword(): cache}, max_new_tokens=2)
        assert greedy(model, inputs, max_new_tokens=2).shape == stock.shape  # the whole prompt runs
