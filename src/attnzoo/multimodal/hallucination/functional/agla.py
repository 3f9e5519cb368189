"""AGLA's augmented view (Lackel/AGLA): a GradCAM of BLIP's image-text matching picks the image
regions the prompt is about, and everything else is blacked out.

The official chain, reproduced here on transformers' ``BlipForImageTextRetrieval`` (the official
code runs LAVIS's BLIP-ITM-large):

1. GradCAM on the text encoder's layer-6 cross-attention: probabilities times their positive
   gradients w.r.t. the positive ITM logit, image CLS column dropped, padding zeroed, mean over
   heads, then mean over the real text tokens after [CLS] ([SEP] excluded).
2. Pixel map: min-max; scikit-image ``resize(order=3, mode='constant')`` to size x size, which
   is a cubic B-SPLINE zoom with zero padding (not bicubic convolution); Gaussian blur with
   sigma = 0.02 * size (reflect, truncate 4); min-max again.
3. Keep the pixels at or above the k-th largest value, k = int(size^2 * ratio) with
   ratio = min(1 - ITC / 2, 1 - 1e-5): k + 1 pixels survive, and a BETTER image-text match
   (higher ITC cosine) masks MORE of the image.
4. Black out the rest of the size x size RGB image (PIL's default resize of the original), then
   truncate to uint8 as ``ToPILImage`` does; the LVLM's own processor takes it from there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from attnzoo.errors import InvalidInputError

#: The text-encoder layer whose cross-attention the official GradCAM reads (``block_num=6``).
AGLA_GRADCAM_LAYER = 6
#: BLIP's [ENC] token: LAVIS adds [DEC] then [ENC] to bert-base-uncased's 30522 tokens and puts
#: [ENC] first for image-grounded (ITM) passes; transformers' ITM head keeps the tokenizer's [CLS].
BLIP_ENC_TOKEN_ID = 30523
#: LAVIS's BLIP-ITM text length (``max_txt_len``) and its caption processor's word limit.
BLIP_MAX_TEXT_TOKENS = 35
BLIP_MAX_WORDS = 50
_MAX_KEEP_RATIO = 1 - 1e-5
_BLUR_SIGMA_PER_SIDE = 0.02
_STRIPPED = re.compile(r'[.!"()*#:;~]')


class BlipGradCam(NamedTuple):
    """``relevance`` [B, gh, gw]: the map AGLA uses (mean over the real text tokens);
    ``token_maps`` [B, L, gh, gw]: every token's map (padding zeroed), position 0 the first token."""

    relevance: torch.Tensor
    token_maps: torch.Tensor


class AglaMask(NamedTuple):
    """``mask`` [size, size] bool (True = kept); ``att_map`` the blurred, normalised float32 map it
    thresholds; ``threshold`` the k-th largest value; ``keep_index_k`` k (k + 1 pixels are kept
    unless values tie at the threshold)."""

    mask: torch.Tensor
    att_map: torch.Tensor
    threshold: float
    keep_index_k: int


def blip_gradcam(
    cams: torch.Tensor, grads: torch.Tensor, text_attention_mask: torch.Tensor, grid: tuple[int, int] | None = None
) -> BlipGradCam:
    """GradCAM from one BLIP text layer's cross-attention probabilities ``cams`` and their gradients
    ``grads`` (both [B, heads, L, 1 + patches], key 0 the image CLS) and the text attention mask [B, L].
    ``grid`` is the patch grid (default: square)."""
    if cams.shape != grads.shape or cams.ndim != 4:
        raise InvalidInputError(
            f"cams and grads must both be [B, heads, L, 1 + patches], got {tuple(cams.shape)} and {tuple(grads.shape)}"
        )
    batch, heads, length, keys = cams.shape
    if tuple(text_attention_mask.shape) != (batch, length):
        raise InvalidInputError(
            f"text_attention_mask must be [B, L] = {(batch, length)}, got {tuple(text_attention_mask.shape)}"
        )
    grid = grid or _square_grid(keys - 1)
    n_real = text_attention_mask.sum(dim=-1) - 2  # tokens after [CLS], [SEP] left out
    if bool((n_real < 1).any()):
        raise InvalidInputError("a text has no tokens between [CLS] and [SEP]: nothing to explain the image with")
    mask = text_attention_mask.view(batch, 1, length, 1, 1)
    probs = cams[..., 1:].reshape(batch, heads, length, *grid) * mask
    positive = grads[..., 1:].clamp(0).reshape(batch, heads, length, *grid) * mask
    token_maps = torch.stack([(probs[b] * positive[b]).mean(0) for b in range(batch)])
    relevance = torch.stack([token_maps[b, 1 : int(n) + 1].sum(dim=0) / n for b, n in enumerate(n_real)])
    return BlipGradCam(relevance, token_maps)


def agla_keep_count(itc_score: float | torch.Tensor, num_pixels: int) -> int:
    """k = int(num_pixels * min(1 - ITC/2, 1 - 1e-5)) with the official float32 tensor arithmetic
    (the cap, when it wins, is a Python float); the mask keeps the k + 1 best pixels."""
    itc = torch.as_tensor(itc_score, dtype=torch.float32).detach().cpu()
    if itc.numel() != 1:
        raise InvalidInputError(f"itc_score must be one score, got shape {tuple(itc.shape)}")
    ratio = 1 - itc.reshape(()) / 2
    if _MAX_KEEP_RATIO < ratio:
        return int(num_pixels * _MAX_KEEP_RATIO)
    return int(num_pixels * ratio)


def agla_att_map(relevance: torch.Tensor | np.ndarray, size: int = 384) -> np.ndarray:
    """The official pixel map from a GradCAM grid: min-max, cubic B-spline zoom (scikit-image,
    zero padding), Gaussian blur (sigma 0.02 * size), min-max; float32 [size, size]."""
    from scipy.ndimage import gaussian_filter
    from skimage.transform import resize

    grid = _as_float32_grid(relevance)
    grid -= grid.min()
    if grid.max() > 0:
        grid /= grid.max()
    att = resize(grid, (size, size), order=3, mode="constant")
    att = gaussian_filter(att, _BLUR_SIGMA_PER_SIDE * size, mode="reflect", truncate=4.0)
    att -= att.min()
    if att.max() > 0:  # a flat map keeps every pixel (the official code divides by zero: NaN, also all kept)
        att /= att.max()
    return att


def agla_mask(relevance: torch.Tensor | np.ndarray, itc_score: float | torch.Tensor, size: int = 384) -> AglaMask:
    """The augmented view's pixel mask from the GradCAM ``relevance`` grid and the ITC cosine score."""
    return agla_mask_from_att_map(agla_att_map(relevance, size), itc_score)


def agla_mask_from_att_map(att_map: torch.Tensor | np.ndarray, itc_score: float | torch.Tensor) -> AglaMask:
    """Keep the pixels of ``att_map`` at or above its k-th largest value (k from the ITC score)."""
    att = att_map.detach().cpu().numpy() if isinstance(att_map, torch.Tensor) else np.asarray(att_map)
    flat = att.reshape(-1)
    k = agla_keep_count(itc_score, flat.size)
    threshold = np.partition(flat, flat.size - 1 - k)[flat.size - 1 - k]  # sorted descending, index k
    return AglaMask(torch.from_numpy(att >= threshold), torch.from_numpy(att), float(threshold), k)


def agla_masked_image(image: Image.Image | torch.Tensor, mask: torch.Tensor) -> Image.Image:
    """``image`` (PIL, resized to the mask's size with PIL's default filter, or a [3, S, S] tensor in
    [0, 1]) with the unkept pixels black, as uint8 truncated the way ``ToPILImage`` truncates."""
    side_h, side_w = mask.shape
    pixels = _unit_tensor(image, (side_w, side_h)) if isinstance(image, Image.Image) else image
    if pixels.shape != (3, side_h, side_w):
        raise InvalidInputError(f"the image tensor must be [3, {side_h}, {side_w}], got {tuple(pixels.shape)}")
    kept = pixels.permute(1, 2, 0) * mask.to(pixels.device).unsqueeze(-1)
    return Image.fromarray(kept.mul(255).byte().cpu().numpy())


def blip_caption_text(text: str, max_words: int = BLIP_MAX_WORDS) -> str:
    """BLIP's evaluation caption normalisation (LAVIS ``blip_caption``), which the official GradCAM
    text goes through: lower case, ``.!"()*#:;~`` to spaces, whitespace collapsed, at most
    ``max_words`` words."""
    return " ".join(_STRIPPED.sub(" ", text.lower()).split()[:max_words])


def agla_augment(
    image: Image.Image | Sequence[Image.Image],
    text: str | Sequence[str],
    blip_model,
    processor,
    *,
    size: int | None = None,
    layer: int = AGLA_GRADCAM_LAYER,
    itm_token_id: int | None | Literal["auto"] = "auto",
    normalize_text: bool = True,
    max_text_tokens: int = BLIP_MAX_TEXT_TOKENS,
) -> Image.Image | list[Image.Image]:
    """AGLA's augmented image(s): the GradCAM of ``blip_model`` (a transformers
    ``BlipForImageTextRetrieval``, e.g. Salesforce/blip-itm-large-coco, with its ``processor``) for
    the question ``text`` decides which pixels survive.

    Gradients are switched on here even under ``torch.no_grad`` / ``torch.inference_mode``; only the
    cross-attention probabilities' gradient is computed (no ``.grad`` lands on the model). ``size``
    is the side of the masked square image (default: the BLIP input size, 384 for the official model).
    ``itm_token_id`` is the first token of the ITM pass: "auto" puts BLIP's [ENC] there when the model
    has BLIP's released vocabulary, as LAVIS (the official run) does; None keeps the tokenizer's [CLS]
    (transformers' own ITM). One image and one text give one image; lists give a list.
    """
    single = isinstance(text, str)
    images: list[Image.Image] = [image] if isinstance(image, Image.Image) else list(image)
    texts: list[str] = [text] if isinstance(text, str) else list(text)
    if single != isinstance(image, Image.Image) or len(images) != len(texts) or not texts:
        raise InvalidInputError("agla_augment needs one image and one text, or two equally long non-empty lists")
    for img, t in zip(images, texts, strict=True):
        if not isinstance(img, Image.Image) or not isinstance(t, str):
            raise InvalidInputError(
                f"agla_augment takes PIL images and str questions, got {type(img).__name__} and {type(t).__name__}"
            )
    normalized = [blip_caption_text(t) if normalize_text else t for t in texts]
    for original, t in zip(texts, normalized, strict=True):
        if not t.strip():
            raise InvalidInputError(f"the AGLA question is empty after BLIP's text normalisation: {original!r}")
    size = size or int(blip_model.config.vision_config.image_size)
    rgb = [img.convert("RGB") for img in images]

    with torch.inference_mode(False), torch.enable_grad():
        encoded = processor(
            images=rgb,
            text=normalized,
            return_tensors="pt",
            padding="longest",
            truncation=True,
            max_length=max_text_tokens,
        )
        cams, grads, itc = _blip_itm_gradients(blip_model, encoded, layer, _first_itm_token(blip_model, itm_token_id))
    gradcam = blip_gradcam(cams, grads, encoded["attention_mask"].to(cams.device))
    augmented = [
        agla_masked_image(img, agla_mask(relevance, score, size).mask)
        for img, relevance, score in zip(rgb, gradcam.relevance.cpu(), itc.cpu(), strict=True)
    ]
    return augmented[0] if single else augmented


def _blip_itm_gradients(blip_model, encoded, layer: int, first_token: int | None):
    """Cross-attention probabilities of text layer ``layer`` on the ITM pass, their gradient w.r.t.
    the positive ITM logit, and the ITC cosine of each (image, text) pair."""
    layers = blip_model.text_encoder.encoder.layer
    if not 0 <= layer < len(layers) or layers[layer].crossattention is None:
        raise InvalidInputError(f"BLIP's text encoder has no cross-attention layer {layer} ({len(layers)} layers)")
    param = next(blip_model.parameters())
    pixel_values = encoded["pixel_values"].to(param.device, param.dtype).requires_grad_(True)
    input_ids = encoded["input_ids"].to(param.device)
    attention_mask = encoded["attention_mask"].to(param.device)
    itm_ids = input_ids.clone()
    if first_token is not None:
        itm_ids[:, 0] = first_token
    captured: list[torch.Tensor] = []
    # pixel_values requiring grad puts the probabilities in the graph even when the model is frozen
    handle = layers[layer].crossattention.self.register_forward_hook(lambda mod, args, out: captured.append(out[1]))
    try:
        itm = blip_model(input_ids=itm_ids, pixel_values=pixel_values, attention_mask=attention_mask).itm_score
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(itm[:, 1].sum(), captured[0])
    with torch.no_grad():
        itc = blip_model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_itm_head=False
        ).itm_score.diagonal()
    return captured[0].detach(), grads, itc


def _first_itm_token(blip_model, itm_token_id: int | None | Literal["auto"]) -> int | None:
    if itm_token_id != "auto":
        return itm_token_id
    return BLIP_ENC_TOKEN_ID if blip_model.config.text_config.vocab_size > BLIP_ENC_TOKEN_ID else None


def _unit_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] float in [0, 1] of ``image`` resized with PIL's default filter (``ToTensor`` of it)."""
    array = np.asarray(image.convert("RGB").resize(size))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def _as_float32_grid(relevance: torch.Tensor | np.ndarray) -> np.ndarray:
    grid = relevance.detach().float().cpu().numpy() if isinstance(relevance, torch.Tensor) else relevance
    grid = np.array(grid, dtype=np.float32)  # a copy: the normalisation below is in place
    if grid.ndim != 2 or min(grid.shape) < 1:
        raise InvalidInputError(f"the GradCAM relevance must be a 2-D grid, got shape {grid.shape}")
    return grid


def _square_grid(patches: int) -> tuple[int, int]:
    side = int(round(patches**0.5))
    if side * side != patches:
        raise InvalidInputError(f"{patches} image patches do not form a square grid; pass grid=(rows, cols)")
    return side, side
