"""CARVE (YuyaoGe/CARVE): contrast the image attention of a task-question probe with that of a
general-description probe, fuse it over layers and steps into a pixel map, keep the strongest
regions, crop to them and magnify.

Stages, each a function: :func:`carve_probe_attention` (a greedy probe recording the last row's
attention to the image tokens, head-averaged, per step and layer), :func:`carve_contrast`
(A^Q / (A^G + lambda)), :func:`carve_fuse` (S = sum_t w_t sum_l upsample(grid(contrast))),
:func:`carve_mask` (percentile threshold, 4-connected components, top-K), :func:`carve_crop`
(crop to the mask's box, LANCZOS magnification); :func:`carve_refine` runs the last three as
one released variant (v1..v4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from attnzoo.errors import InvalidInputError
from attnzoo.multimodal.hallucination.transformers_compat import cache_keyword, output_cache

#: The layers the official code fuses (20..25 inclusive).
CARVE_LAYERS = tuple(range(20, 26))
#: lambda of the contrast in the official code; the paper's appendix gives 0.05 without saying it is
#: lambda. With per-token attention around 1e-3, 0.05 would swamp A^G.
CARVE_LAMBDA_CODE = 1e-8
CARVE_LAMBDA_PAPER = 0.05

StepMode = Literal["all", "first"]
Strategy = Literal["attention_sum", "size", "remove_small"]

#: The released variants: (steps fused, component strategy). v1-v3 use the first step only.
CARVE_VARIANTS: dict[str, tuple[StepMode, Strategy]] = {
    "v1": ("first", "remove_small"),
    "v2": ("first", "size"),
    "v3": ("first", "attention_sum"),
    "v4": ("all", "attention_sum"),
}
#: The general probe's instruction and the final pass's answer format (official prompts).
CARVE_GENERAL_INSTRUCTION = "Write a general description of the image."
CARVE_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
#: Token counts whose grid the official code fixes, whatever shape the caller asked for.
_KNOWN_GRIDS = {576: (24, 24), 1024: (32, 32), 1600: (40, 40), 1681: (41, 41), 256: (16, 16)}


class CarveProbe(NamedTuple):
    """``maps`` [T, len(layers), N_v] float32: at generated step t and layer ``layers[i]``, the last
    row's post-softmax attention to the image tokens averaged over heads; ``tokens`` [T] the greedy
    tokens (the last may be EOS); ``image_span`` (start, end) of the image tokens in the prompt."""

    maps: torch.Tensor
    tokens: torch.Tensor
    image_span: tuple[int, int]
    layers: tuple[int, ...]


class CarveMask(NamedTuple):
    """``mask`` [H, W] uint8 (1 = kept); ``threshold`` the percentile of S; ``labeled`` the
    4-connected components of S >= threshold (0 = background); ``component_scores`` one per
    component (summed S, or pixel count for the size-based strategies); ``kept_component_ids``
    (1-based, ascending)."""

    mask: np.ndarray
    threshold: float
    labeled: np.ndarray
    component_scores: np.ndarray
    kept_component_ids: np.ndarray


class CarveCrop(NamedTuple):
    """``masked_image`` the image with unkept pixels black; ``bbox`` (x0, y0, x1, y1), ends
    exclusive (the whole image for an empty mask); ``refined_image`` the masked crop, magnified by
    max(W / cw, H / ch) so that it covers the original size."""

    masked_image: Image.Image
    bbox: tuple[int, int, int, int]
    refined_image: Image.Image


class CarveResult(NamedTuple):
    sum_att_map: np.ndarray
    mask: CarveMask
    crop: CarveCrop


def carve_probe_attention(
    model,
    inputs: Mapping[str, torch.Tensor],
    max_new_tokens: int = 32,
    layers: Sequence[int] = CARVE_LAYERS,
    *,
    image_span: tuple[int, int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> CarveProbe:
    """CARVE's attention probe: greedy decoding of ``inputs`` (one prompt, as the model's processor
    returns it) for up to ``max_new_tokens`` tokens, recording at each step the last row's attention
    to the image tokens in each of ``layers``, averaged over heads (in the model's dtype, then cast
    to float32, as the official loop does). Stops after the step that produced EOS.

    The model must return attention weights: load it with ``attn_implementation="eager"`` (for
    LLaVA, ``{"text_config": "eager", "vision_config": ...}``). Unlike the official loop, which re-runs
    the whole sequence at every step without a cache, this one decodes with a KV cache; the maps
    and tokens are the same up to floating-point rounding, at a fraction of the cost.
    ``image_span`` defaults to the run of the model's image token id in ``input_ids``; ``eos_token_id``
    to the model's generation config.
    """
    input_ids = inputs["input_ids"]
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise InvalidInputError(f"the CARVE probe runs one prompt at a time, got input_ids {tuple(input_ids.shape)}")
    depth = model.config.get_text_config().num_hidden_layers
    layers = tuple(int(layer) for layer in layers)
    if not layers or any(not 0 <= layer < depth for layer in layers):
        raise InvalidInputError(f"probe layers must lie in [0, {depth}) for this model, got {list(layers)}")
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise InvalidInputError("the CARVE probe takes one unpadded prompt: its attention_mask has zeros")
    start, end = image_span if image_span is not None else _image_token_span(input_ids[0], _image_token_id(model))
    stop_ids = _eos_ids(model, eos_token_id)

    step_inputs = dict(inputs)
    maps: list[torch.Tensor] = []
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(**step_inputs, use_cache=True, output_attentions=True)
            attentions = out.attentions
            if not attentions or any(attentions[layer] is None for layer in layers):
                raise InvalidInputError(
                    "the model returned no attention weights: load it with attn_implementation='eager' "
                    "(LLaVA-style models: {'text_config': 'eager', 'vision_config': ...})"
                )
            maps.append(
                torch.stack([attentions[layer][0, :, -1, start:end].mean(dim=0).float() for layer in layers]).cpu()
            )
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token in stop_ids:
                break
            # B = 1 and no padding: the model derives positions (Qwen2-VL's M-RoPE too) from the cache
            step_inputs = {"input_ids": input_ids.new_tensor([[token]]), cache_keyword(): output_cache(out)}
    return CarveProbe(torch.stack(maps), torch.tensor(tokens), (start, end), layers)


def carve_contrast(
    query_maps: torch.Tensor | np.ndarray, general_maps: torch.Tensor | np.ndarray, lam: float = CARVE_LAMBDA_CODE
) -> np.ndarray:
    """A^Q / (A^G + lam), elementwise in float32: the closed-form minimiser of
    sum (A~ A^G - A^Q)^2 + lam sum A~^2 A^G."""
    query, general = _float32(query_maps), _float32(general_maps)
    if query.shape != general.shape:
        raise InvalidInputError(f"query and general maps differ in shape: {query.shape} and {general.shape}")
    return query / (general + np.float32(lam))


def carve_fuse(
    query_maps: torch.Tensor | np.ndarray,
    general_maps: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    *,
    layers: Sequence[int] | None = None,
    lam: float = CARVE_LAMBDA_CODE,
    step_mode: StepMode = "all",
    grid_shape: tuple[int, int] | None = None,
    known_grids: bool = True,
) -> np.ndarray:
    """S [H, W] float64 = sum_t w_t sum_l resize(grid(A^Q_tl / (A^G_tl + lam))) at the image size.

    Maps are [T, L, N_v] (steps, layers, image tokens); the two probes pair by step and only
    min(T_q, T_g) steps count. ``layers`` picks along axis 1 (default: all). ``step_mode`` "all"
    weighs step t by t + 1, "first" uses step 0 alone. ``image_size`` is PIL's (W, H). The grid of
    N_v tokens: 576 -> 24x24, 1024 -> 32x32, 1600 -> 40x40, 1681 -> 41x41, 256 -> 16x16 whatever
    ``grid_shape`` says (the official rule, ``known_grids=True``: a Qwen2-VL image of 18x32 merged
    patches, 576 tokens, is read as 24x24); otherwise ``grid_shape`` (Qwen2-VL: image_grid_thw[1:] / 2;
    extra tokens dropped), otherwise a square. ``known_grids=False`` takes ``grid_shape`` first when it
    covers the tokens exactly (the paper's grid). The resize is PIL bilinear on a float32 image, as in
    the official code, which resizes every (step, layer) map and sums the resized maps; bilinear
    resizing is linear, so here the weighted sum is taken on the token grid (float64) and resized once:
    the same S up to float32 rounding (a few 1e-7 relative: every term is >= 0, nothing cancels), for one resize instead of steps x layers.
    """
    query, general = _float32(query_maps), _float32(general_maps)
    if query.ndim != 3 or general.ndim != 3 or query.shape[1:] != general.shape[1:]:
        raise InvalidInputError(
            f"probe maps must be [T, L, N_v] with equal L and N_v, got {query.shape} and {general.shape}"
        )
    if step_mode not in ("all", "first"):
        raise InvalidInputError(f"step_mode must be 'all' or 'first', got {step_mode!r}")
    width, height = (int(v) for v in image_size)
    picked = range(query.shape[1]) if layers is None else list(layers)
    if any(not 0 <= layer < query.shape[1] for layer in picked):
        raise InvalidInputError(f"layers {list(picked)} not all within the maps' {query.shape[1]} layers")
    grid = _token_grid(query.shape[2], grid_shape, known_grids)
    count = 1 if step_mode == "first" else min(len(query), len(general))
    if min(len(query), len(general)) == 0:
        raise InvalidInputError(f"probe maps hold no steps: {query.shape} and {general.shape}")
    weights = np.arange(1, count + 1, dtype=np.float64) if step_mode == "all" else np.ones(count)
    layer_index = np.asarray(list(picked), dtype=np.intp)
    contrast = carve_contrast(query[:count, layer_index], general[:count, layer_index], lam)  # [T, L, N_v]
    on_grid = np.einsum("t,tln->n", weights, contrast[..., : grid[0] * grid[1]].astype(np.float64))
    return _resize_bilinear(on_grid.reshape(grid), (width, height)).astype(np.float64)


def carve_mask(
    sum_att_map: np.ndarray,
    top_percent: float = 0.2,
    min_keep_regions: int = 3,
    *,
    strategy: Strategy = "attention_sum",
    outlier_percent: float = 0.1,
) -> CarveMask:
    """Keep S >= its (1 - top_percent) percentile, split it into 4-connected components and keep
    the max(min_keep_regions, int(n * top_percent)) components with the largest summed S
    ("attention_sum") or the most pixels ("size"); "remove_small" instead drops the components
    smaller than int(kept pixels * outlier_percent / 100). As in the official code, ``top_percent``
    sets both the percentile and the share of components kept; ties keep the lower component id.
    """
    from scipy import ndimage

    if not 0.0 < top_percent <= 1.0:
        raise InvalidInputError(f"top_percent must be in (0, 1], got {top_percent}")
    if strategy not in ("attention_sum", "size", "remove_small"):
        raise InvalidInputError(f"unknown CARVE component strategy {strategy!r}")
    sum_att_map = np.asarray(sum_att_map)
    threshold = float(np.percentile(sum_att_map, (1.0 - top_percent) * 100))
    above = (sum_att_map >= threshold).astype(np.uint8)
    labeled, count = ndimage.label(above)
    ids = np.arange(1, count + 1)
    sizes = np.asarray(ndimage.sum(above, labeled, ids), dtype=np.float64)
    if strategy == "remove_small":
        total = int(above.sum())
        min_size = int(total * outlier_percent / 100) if total > 0 else 1
        scores, kept = sizes, ids[sizes >= min_size]
    else:
        scores = sizes if strategy == "size" else np.asarray(ndimage.sum(sum_att_map, labeled, ids), dtype=np.float64)
        keep = max(min_keep_regions, int(count * top_percent))
        kept = np.sort(ids[np.argsort(-scores, kind="stable")[:keep]])
    mask = np.isin(labeled, kept).astype(np.uint8) if count else np.zeros_like(above)
    return CarveMask(mask, threshold, labeled, scores, kept.astype(np.int64))


def carve_crop(image: Image.Image, mask: np.ndarray) -> CarveCrop:
    """Black out the unkept pixels, crop to the mask's bounding box and magnify the crop with LANCZOS
    by max(W / cw, H / ch) (sizes truncated to int) so that it covers the original size."""
    array = np.asarray(image.convert("RGB"))
    mask = np.asarray(mask, dtype=np.uint8)
    if mask.shape != array.shape[:2]:
        raise InvalidInputError(f"the mask {mask.shape} does not match the image's (H, W) {array.shape[:2]}")
    masked = Image.fromarray(array * mask[..., None])
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        bbox = (0, 0, mask.shape[1], mask.shape[0])
    else:
        bbox = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    crop = masked.crop(bbox)
    scale = max(image.width / crop.width, image.height / crop.height)
    refined = crop.resize((int(crop.width * scale), int(crop.height * scale)), Image.Resampling.LANCZOS)
    return CarveCrop(masked, bbox, refined)


def carve_refine(
    query_maps: torch.Tensor | np.ndarray,
    general_maps: torch.Tensor | np.ndarray,
    image: Image.Image,
    *,
    variant: str = "v4",
    layers: Sequence[int] | None = None,
    lam: float = CARVE_LAMBDA_CODE,
    top_percent: float = 0.2,
    min_keep_regions: int = 3,
    outlier_percent: float = 0.1,
    grid_shape: tuple[int, int] | None = None,
    known_grids: bool = True,
) -> CarveResult:
    """Fusion, mask and crop of one released variant (``CARVE_VARIANTS``; v4 is the default)."""
    if variant not in CARVE_VARIANTS:
        raise InvalidInputError(f"unknown CARVE variant {variant!r}; expected one of {sorted(CARVE_VARIANTS)}")
    step_mode, strategy = CARVE_VARIANTS[variant]
    fused = carve_fuse(
        query_maps,
        general_maps,
        image.size,
        layers=layers,
        lam=lam,
        step_mode=step_mode,
        grid_shape=grid_shape,
        known_grids=known_grids,
    )
    mask = carve_mask(
        fused,
        top_percent,
        min_keep_regions,
        strategy=strategy,
        outlier_percent=outlier_percent,
    )
    return CarveResult(fused, mask, carve_crop(image, mask.mask))


def _token_grid(count: int, grid_shape: tuple[int, int] | None, known_grids: bool = True) -> tuple[int, int]:
    if not known_grids and grid_shape is not None and grid_shape[0] * grid_shape[1] == count:
        return int(grid_shape[0]), int(grid_shape[1])
    if count in _KNOWN_GRIDS:
        return _KNOWN_GRIDS[count]
    if grid_shape is not None and 0 < grid_shape[0] * grid_shape[1] <= count:
        return int(grid_shape[0]), int(grid_shape[1])
    side = int(count**0.5)
    if side > 1 and side * side == count:
        return side, side
    raise InvalidInputError(f"{count} image tokens do not form a known or square grid; pass grid_shape=(rows, cols)")


def _resize_bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(grid.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


def _float32(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        return maps.detach().to(torch.float32).cpu().numpy()
    return np.asarray(maps, dtype=np.float32)


def _image_token_id(model) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(model.config, name, None)
        if value is not None:
            return int(value)
    raise InvalidInputError(f"{type(model).__name__}'s config names no image token id: pass image_span=(start, end)")


def _image_token_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, end) of the one contiguous run of ``image_token_id`` in a prompt."""
    positions = (input_ids == image_token_id).nonzero().flatten()
    if positions.numel() == 0:
        raise InvalidInputError(f"the prompt holds no image token (id {image_token_id})")
    start, end = int(positions[0]), int(positions[-1]) + 1
    if positions.numel() != end - start:
        raise InvalidInputError(
            f"the image tokens (id {image_token_id}) are not one contiguous run: pass image_span=(start, end)"
        )
    return start, end


def _eos_ids(model, eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}
