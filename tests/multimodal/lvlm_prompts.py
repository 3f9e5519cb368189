"""Prompt batches for the hallucination-method tests, built the way the pipeline builds them: PIL
images and questions, an encoder made of the family's real image processor (configured for the tiny
models of ``tests.lvlm_helpers``) and a word-level stand-in tokenizer, left-padded. Also a tiny
random BLIP image-text-matching model (AGLA's augmenter) and random photographs. No network."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessorList

from attnzoo.multimodal.hallucination.method import PromptBatch
from tests.lvlm_helpers import (
    BOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    INSTRUCTBLIP_IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    QWEN_IDS,
    tiny_instructblip,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
)

FAMILIES = ("llava", "qwen2_vl", "instructblip")
#: Side of the tiny LLaVA's CLIP input: 4 x 4 patches, so CARVE has a grid to work on.
LLAVA_SIDE = 56
_TEXT_VOCAB = {"llava": 990, "qwen2_vl": 290, "instructblip": 190}


def words(text: str, vocab: int, first: int = 20) -> list[int]:
    """A stand-in tokenizer: one id per word, from its characters."""
    return [first + sum(map(ord, word)) % (vocab - first) for word in text.split()]


def photos(count: int = 2, seed: int = 0) -> list[Image.Image]:
    """Random RGB photographs of different sizes, no black pixel (so masked pixels are countable)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(10, 256, (48 + 8 * i, 64 + 6 * i, 3), dtype=np.uint8)) for i in range(count)]


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _image_lists(images) -> list[list[Image.Image]]:
    """Each prompt's images: one PIL image, or a list of them (CARVE's [original, refined])."""
    return [[image] if isinstance(image, Image.Image) else list(image) for image in images]


def llava_encoder(side: int = LLAVA_SIDE):
    """The encoder of a tiny LLaVA whose CLIP tower takes ``side`` px images."""
    from transformers import CLIPImageProcessor

    pixels = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    per_image = (side // 14) ** 2

    def encode(images, questions):
        groups = _image_lists(images)
        rows = [
            [BOS_TOKEN_ID, 10, 11, *([IMAGE_TOKEN_ID] * per_image * len(group)), *words(q, 990), 12, 13]
            for group, q in zip(groups, questions, strict=True)
        ]
        ids, mask = _left_pad(rows)
        flat = [image.convert("RGB") for group in groups for image in group]
        return {"input_ids": ids, "attention_mask": mask, **pixels(images=flat, return_tensors="pt")}

    return encode


def _llava_next_encoder(model):
    """The encoder of the tiny LLaVA-NeXT (28 px base view, 28x56 / 56x28 anyres pinpoints)."""
    from transformers import LlavaNextImageProcessor

    from attnzoo.multimodal.hallucination.layouts import llava_next_image_token_count

    config = model.config
    pixels = LlavaNextImageProcessor(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )

    def encode(images, questions):
        groups = _image_lists(images)
        flat = [image.convert("RGB") for group in groups for image in group]
        vision = pixels(images=flat, return_tensors="pt")
        counts = iter(
            llava_next_image_token_count(config, tuple(int(v) for v in size)) for size in vision["image_sizes"]
        )
        rows = [
            [BOS_TOKEN_ID, 10, 11, *[IMAGE_TOKEN_ID for _ in group for _ in range(next(counts))], *words(q, 990), 12]
            for group, q in zip(groups, questions, strict=True)
        ]
        ids, mask = _left_pad(rows)
        return {"input_ids": ids, "attention_mask": mask, **vision}

    return encode


def _qwen_encoder():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    pixels = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )

    def encode(images, questions):
        groups = _image_lists(images)
        flat = [image.convert("RGB") for group in groups for image in group]
        vision = pixels(images=flat, return_tensors="pt")
        counts = iter(int(t * h * w) // 4 for t, h, w in vision["image_grid_thw"])
        rows = []
        for group, q in zip(groups, questions, strict=True):
            row = [BOS_TOKEN_ID, 10]
            for _ in group:
                row += [QWEN_IDS["vision_start"], *([QWEN_IDS["image"]] * next(counts)), QWEN_IDS["vision_end"]]
            rows.append([*row, *words(q, 290), 12])
        ids, mask = _left_pad(rows)
        types = (ids == QWEN_IDS["image"]).long()
        return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, **vision}

    return encode


def _instructblip_encoder():
    from transformers import BlipImageProcessor

    pixels = BlipImageProcessor(size={"height": 28, "width": 28})

    def encode(images, questions):
        groups = _image_lists(images)
        if any(len(group) != 1 for group in groups):
            raise ValueError("InstructBLIP takes one image per prompt")
        rows = [[BOS_TOKEN_ID, *([INSTRUCTBLIP_IMAGE_TOKEN_ID] * 4), *words(q, 190), 12] for q in questions]
        ids, mask = _left_pad(rows)
        qformer, qmask = _left_pad([[2, *words(q, 100, first=5)] for q in questions])
        flat = [group[0].convert("RGB") for group in groups]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "qformer_input_ids": qformer,
            "qformer_attention_mask": qmask,
            **pixels(images=flat, return_tensors="pt"),
        }

    return encode


def tiny_model(family: str, attn_implementation: str = "sdpa", **kw):
    """The tiny random model of ``family`` (LLaVA with a 4 x 4 patch grid) and its encoder."""
    if family == "llava":
        model, _ = tiny_llava(image_size=LLAVA_SIDE, attn_implementation=attn_implementation, **kw)
        return model, llava_encoder()
    if family == "llava_next":
        model, _ = tiny_llava_next(attn_implementation=attn_implementation, **kw)
        return model, _llava_next_encoder(model)
    if family == "qwen2_vl":
        model, _ = tiny_qwen2_vl(attn_implementation=attn_implementation, **kw)
        return model, _qwen_encoder()
    if family == "instructblip":
        model, _ = tiny_instructblip(attn_implementation=attn_implementation, **kw)
        _visible_images(model.vision_model)
        return model, _instructblip_encoder()
    raise KeyError(family)


def _visible_images(vision_model, std: float = 0.02) -> None:
    """Re-draw the vision tower's matrices: InstructBLIP's config initialises them with std 1e-10, so
    a random tiny model answers the same whatever the image."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in vision_model.parameters():
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def prompt_batch(encode, images: Sequence[Image.Image], questions: Sequence[str]) -> PromptBatch:
    return PromptBatch(list(images), list(questions), encode(images, questions), encode)


def tiny_blip_itm(vocab_dir, match: float = 0.05):
    """A tiny random ``BlipForImageTextRetrieval`` (8 text layers: AGLA's GradCAM layer 6 exists,
    64 px images in 16 px patches) and a ``BlipProcessor`` with a word-level vocabulary. Random
    image and text embeddings are near orthogonal (ITC ~0.01, so AGLA would keep ~99.5% of the
    pixels): :func:`set_blip_match` gives them a shared component (``match`` 0.05: ITC ~0.4)."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    words_ = "[PAD] [UNK] [CLS] [SEP] [MASK] is there a dog cat in the image ? red car on left what color".split()
    vocab = vocab_dir / "vocab.txt"
    vocab.write_text("\n".join(words_))
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=BertTokenizerFast(str(vocab))
    )
    text = BlipTextConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        encoder_hidden_size=32,
        max_position_embeddings=64,
        bos_token_id=30,
        sep_token_id=3,
        pad_token_id=0,
    )
    vision = BlipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
        model = BlipForImageTextRetrieval(config).eval()
    finally:
        torch.random.set_rng_state(state)
    set_blip_match(model, match)
    return model, processor


def set_blip_match(model, match: float) -> None:
    """Give the ITC projections of a random BLIP the same bias, ``match`` times a fixed direction:
    the larger, the higher the image-text cosine (0.02 -> ~0.17, 0.12 -> ~0.75)."""
    direction = torch.randn(model.vision_proj.out_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for projection in (model.vision_proj, model.text_proj):
            projection.bias.copy_(direction * match)


def stock_state(model) -> dict:
    """What must be as it was after a method ran: hooks, attention implementations, no session."""
    from tests.lvlm_helpers import attn_implementations, module_hooks

    return {
        "hooks": module_hooks(model),
        "attn": attn_implementations(model),
        "session": "_attnzoo_interventions" in model.__dict__,
    }


def last_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


class Spy:
    """A processor that records the scores it sees at every step."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


def extended(inputs, tokens):
    """The prompt batch followed by ``tokens`` [B, t] (for a full-sequence forward)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            fill = torch.ones_like(tokens) if key == "attention_mask" else torch.zeros_like(tokens)
            out[key] = torch.cat([inputs[key], fill], dim=1)
    return out


def run_as_pipeline(model, batch, method, decode, steps=3, interventions=()):
    """prepare -> attach interventions -> generate with the method's processors between two spies,
    under inference mode as a pipeline runs."""
    before, after = Spy(), Spy()
    with torch.inference_mode():
        batch = method.prepare(model, None, batch)
        for intervention in interventions:
            intervention.attach(model)
        try:
            processors = method.logits_processors(model, None, batch)
            chain = LogitsProcessorList([before, *processors, after])
            tokens = decode(model, batch.inputs, steps, logits_processor=chain)
        finally:
            for intervention in reversed(interventions):
                intervention.detach()
    return tokens, before.scores, after.scores, processors


class SeededSampler:
    """The pipeline's way of sampling: each row's token drawn from its own seeded generator, only that
    token left for greedy selection (the same draws whatever the branch runs as)."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float(), dim=-1)
        tokens = torch.stack(
            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators, strict=True)]
        )
        return torch.full_like(scores, -math.inf).scatter_(1, tokens, 0.0)


#: Paired (batched) vs separate contrast branch: the branch rows run in a batch of 2B rows instead of B,
#: so float32 matmuls may sum in another order (seen: <= 1e-6 on the tiny models' logits).
PAIRED_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def assert_same_run(paired, separate) -> None:
    """Both ways of running a contrast branch chose the same tokens (the paired branch rows too) from the
    same combined scores, within float32 batching noise (-inf at the same places)."""
    tokens, scores, branch = paired
    assert torch.equal(tokens, separate[0]) and torch.equal(branch, tokens)
    assert len(scores) == len(separate[1])
    for mine, theirs in zip(scores, separate[1], strict=True):
        torch.testing.assert_close(mine, theirs, **PAIRED_TOLERANCE)


def run_contrast(model, batch, method, steps=3, *, paired, seeds=None, then=(), interventions=(), **generate_kwargs):
    """generate with the method's contrast branch as rows of the same generate (``paired``) or as its
    own forward, greedy selection after ``then`` and a seeded sampler (``seeds``). Returns the main
    rows' new tokens, the combined scores of every step (before ``then``) and the paired batch's
    branch rows' new tokens (None when separate)."""
    after = Spy()
    tail = [after, *then, *([SeededSampler(seeds)] if seeds is not None else [])]
    with torch.inference_mode():
        for intervention in interventions:
            intervention.attach(model)
        try:
            inputs, context = batch.inputs, nullcontext()
            if paired:
                pair = method.paired_contrast(model, None, batch)
                inputs, context = pair.inputs(batch.inputs), pair.attached()
                chain = LogitsProcessorList([pair.followed_by(*tail)])
            else:
                chain = LogitsProcessorList([*method.logits_processors(model, None, batch), *tail])
            with context:
                settings = {"do_sample": False, "pad_token_id": PAD_TOKEN_ID, **generate_kwargs}
                out = model.generate(**inputs, max_new_tokens=steps, logits_processor=chain, **settings)
        finally:
            for intervention in reversed(interventions):
                intervention.detach()
    rows, width = len(batch.questions), inputs["input_ids"].shape[1]
    new = out[:, width:]
    return new[:rows], after.scores, (new[rows:] if paired else None)


def table_processor(cls, table: torch.Tensor, prompt_length: int, **settings):
    """A contrast processor of class ``cls`` whose branch returns the step's row of ``table``
    [S, B, V] instead of running a forward (parity with the official loops on fixture logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class TableBranch(cls):
        def branch_logits(self, input_ids):
            self._last_ids = input_ids
            self.branch_calls += 1
            return table[input_ids.shape[1] - prompt_length]

    config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    return TableBranch(LlamaForCausalLM(config), {}, **settings)


def drive(processor, prompt_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Call ``processor`` as greedy ``generate`` would, on the main logits [S, B, V]: the scores of each step."""
    ids, steps = prompt_ids, []
    for step_logits in logits:
        scores = processor(ids, step_logits.clone())
        steps.append(scores)
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    return torch.stack(steps)
