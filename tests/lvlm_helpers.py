"""Tiny random LVLMs built from configs (no network) and matching model inputs, for the
hallucination-mitigation tests and benchmarks: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and InstructBLIP
(multimodal notes §3.2). Each builder returns ``(model, inputs)`` where ``inputs`` is what a
processor would have produced for a batch of prompts: left-padded ``input_ids`` holding the image
placeholder ids, ``attention_mask`` and the pixel tensors. Models are float32, in eval mode, and
seeded, so two calls give bitwise the same model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

VOCAB = 1000
IMAGE_TOKEN_ID = 999
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2


def _llama_text(
    vocab: int = VOCAB,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 4,
    intermediate: int | None = None,
    **kw,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden if intermediate is None else intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        **kw,
    )


def _clip_vision(image_size: int = 28, patch_size: int = 14, hidden: int = 32, layers: int = 2):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def _seeded(build, seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build().eval()
    finally:
        torch.random.set_rng_state(state)


def prompt_ids(
    lengths_before: Sequence[int],
    n_image_tokens: Sequence[int],
    lengths_after: Sequence[int],
    image_token_id: int = IMAGE_TOKEN_ID,
    vocab: int = VOCAB,
    seed: int = 0,
    wrap: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``: BOS, random text, the image placeholders (optionally
    wrapped in start/end marker ids), random text; one row per entry of the sequences."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for before, n_img, after in zip(lengths_before, n_image_tokens, lengths_after, strict=True):
        text = torch.randint(3, min(vocab, IMAGE_TOKEN_ID) - 10, (before + after,), generator=g).tolist()
        image = [image_token_id] * n_img
        if wrap is not None:
            image = [wrap[0], *image, wrap[1]]
        rows.append([BOS_TOKEN_ID, *text[:before], *image, *text[before:]])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def tiny_llava(
    batch: int = 1,
    layers: int = 4,
    image_size: int = 28,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    text_hidden: int = 64,
    text_before: Sequence[int] | None = None,
    text_after: Sequence[int] | None = None,
    kv_heads: int = 4,
    text_heads: int = 4,
    text_intermediate: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """LLaVA-1.5 layout: CLIP tower (CLS dropped), ``(image_size/14)**2`` image tokens per image. The
    model is built on ``device`` in ``dtype`` where given (a large random model never passes through
    the CPU in float32); the inputs stay on the CPU."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = _llama_text(
        layers=layers, hidden=text_hidden, heads=text_heads, kv_heads=kv_heads, intermediate=text_intermediate
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=_clip_vision(image_size=image_size),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=(image_size // 14) ** 2,
    )
    config._attn_implementation = attn_implementation

    def build():
        if device is None and dtype is None:
            return LlavaForConditionalGeneration(config)
        with torch.device(device or "cpu"):
            return LlavaForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)

    model = _seeded(build, seed)
    n_img = (image_size // 14) ** 2
    before = list(text_before or [3 + i for i in range(batch)])
    after = list(text_after or [5 + 2 * i for i in range(batch)])
    ids, mask = prompt_ids(before, [n_img] * batch, after, seed=seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def tiny_llava_next(batch: int = 1, seed: int = 0, attn_implementation: str = "sdpa"):
    """LLaVA-NeXT (anyres) layout: a 28 px base view plus a 2x1 grid of 28 px crops, one newline row
    token per grid row; the image token count depends on ``image_sizes``."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        text_config=_llama_text(layers=4),
        vision_config=_clip_vision(image_size=28),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[28, 56], [56, 28]],
    )
    config._attn_implementation = attn_implementation
    model = _seeded(lambda: LlavaNextForConditionalGeneration(config), seed)
    image_sizes = torch.tensor([[20, 40]] * batch)  # (height, width): the 28x56 pinpoint
    n_img = llava_next_token_count(model, tuple(image_sizes[0].tolist()))
    ids, mask = prompt_ids([3] * batch, [n_img] * batch, [4] * batch, seed=seed)
    pixels = torch.randn(batch, 3, 3, 28, 28, generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": image_sizes}


def llava_next_token_count(model, image_size: tuple[int, int]) -> int:
    """How many placeholder ids a LLaVA-NeXT processor writes for one image of ``(height, width)``."""
    from attnzoo.multimodal.hallucination.layouts import llava_next_image_token_count

    return llava_next_image_token_count(model.config, image_size)


QWEN_IDS = {"image": 290, "video": 291, "vision_start": 292, "vision_end": 293}


def tiny_qwen2_vl(batch: int = 1, seed: int = 0, attn_implementation: str = "sdpa", grid: tuple[int, int] = (4, 4)):
    """Qwen2-VL layout: ``<|vision_start|>`` + t·h·w/4 image pads + ``<|vision_end|>`` per image."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 300,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            "pad_token_id": PAD_TOKEN_ID,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=QWEN_IDS["image"],
        video_token_id=QWEN_IDS["video"],
        vision_start_token_id=QWEN_IDS["vision_start"],
        vision_end_token_id=QWEN_IDS["vision_end"],
    )
    config._attn_implementation = attn_implementation
    model = _seeded(lambda: Qwen2VLForConditionalGeneration(config), seed)
    h, w = grid
    n_img = h * w // 4
    ids, mask = prompt_ids(
        [2 + i for i in range(batch)],
        [n_img] * batch,
        [4] * batch,
        image_token_id=QWEN_IDS["image"],
        vocab=290,
        seed=seed,
        wrap=(QWEN_IDS["vision_start"], QWEN_IDS["vision_end"]),
    )
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(batch * h * w, 3 * 2 * 14 * 14, generator=g)
    thw = torch.tensor([[1, h, w]] * batch)
    mm_types = (ids == QWEN_IDS["image"]).long()
    return model, {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_grid_thw": thw,
        "mm_token_type_ids": mm_types,
    }


INSTRUCTBLIP_IMAGE_TOKEN_ID = 199


def tiny_instructblip(batch: int = 1, seed: int = 0, attn_implementation: str = "sdpa"):
    """InstructBLIP layout: 4 Q-Former query tokens per image (a resampler: no spatial grid)."""
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
        ).to_dict(),
        text_config=_llama_text(vocab=200, hidden=32, layers=4).to_dict(),
        num_query_tokens=4,
        image_token_index=INSTRUCTBLIP_IMAGE_TOKEN_ID,
    )
    config._attn_implementation = attn_implementation
    model = _seeded(lambda: InstructBlipForConditionalGeneration(config), seed)
    ids, mask = prompt_ids(
        [2 + i for i in range(batch)],
        [4] * batch,
        [4] * batch,
        image_token_id=INSTRUCTBLIP_IMAGE_TOKEN_ID,
        vocab=190,
        seed=seed,
    )
    # The processor puts the query placeholders first; ours sit after BOS + text, which the model accepts too.
    g = torch.Generator().manual_seed(seed + 1)
    return model, {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch, 3, 28, 28, generator=g),
        "qformer_input_ids": torch.randint(3, 100, (batch, 5), generator=g),
        "qformer_attention_mask": torch.ones(batch, 5, dtype=torch.long),
    }


BUILDERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "instructblip": tiny_instructblip}


def greedy(model, inputs, max_new_tokens: int = 6, **kw) -> torch.Tensor:
    """``generate`` without sampling, no early stop, pad set: the new tokens only."""
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens, pad_token_id=0, **kw
    )
    return out[:, -max_new_tokens:]


def sampled(model, inputs, max_new_tokens: int = 6, seed: int = 0, **kw) -> torch.Tensor:
    """Seeded multinomial ``generate`` (temperature 1, no top-k/top-p): the new tokens only."""
    torch.manual_seed(seed)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        pad_token_id=0,
        **kw,
    )
    return out[:, -max_new_tokens:]


def sharpen_attention(model, factor: float = 4.0):
    """Scale every language-model q/k projection so random attention is peaked (a random model's
    attention is near uniform, and edits to it barely move the logits)."""
    from attnzoo.multimodal.hallucination.base import family_for

    with torch.no_grad():
        for layer in family_for(model).text_model().layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def module_hooks(model) -> set:
    """The forward (pre-)hooks the model's modules hold, as (module name, hook id) pairs."""
    return {
        (name, kind, key)
        for name, m in model.named_modules()
        for kind, hooks in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks))
        for key in hooks
    }


def attn_implementations(model) -> list:
    """Every config's attention implementation, in a fixed order."""
    from attnzoo.multimodal.hallucination.base import _all_configs

    return sorted((type(c).__name__, str(c._attn_implementation_internal)) for c in _all_configs(model))
