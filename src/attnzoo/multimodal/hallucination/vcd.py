"""VCD, Visual Contrastive Decoding (Leng et al., CVPR 2024; official code DAMO-NLP-SG/VCD).

A contrast branch sees a diffusion-noised copy v' of the image (DDPM forward process at step 500 of
1000, sigmoid betas; :func:`~.functional.contrastive.add_diffusion_noise` on the processed pixel
tensor), and every step combines the two next-token logits:
z = (1 + alpha) l(v) - alpha l(v'), then drops the tokens the ORIGINAL branch finds implausible
(l(v) < log beta + max l(v)). The official scripts' values are alpha 1, beta 0.2, noise step 500
(the loop's own fallbacks alpha 0.5 / beta 0.1 only applied when a script forgot them).

Two ways to run the branch, the same scores up to float32 batching noise (``batched``):

- ``batched=True`` (default): the noised prompts are B more rows of the main ``generate``
  (:class:`~.base.PairedContrast`), so every token is one batched forward with one KV cache.
- ``batched=False``: the branch is a second forward per token with its own KV cache
  (:class:`~.base.ContrastBranchProcessor`).

Greedy decoding, sampling and ``num_beams=1`` all run the method (the official patch only covers
sampling). Code and paper agree: there is one behaviour.

Seeds: the official script seeds the global RNG once per run (``set_seed(args.seed)``, 55 in the
POPE scripts), and the noise of every question and every sampled token then come from that one
stream, so a question's noise and draws depend on every question before it. That cannot be repeated
per answer, so there are two seeds here: ``seed`` (55) seeds each image's noise (None: the global RNG,
as the official code), and the pipeline's sampling ``seed`` seeds each answer's
token draws. Each image's noise comes from its own generator, seeded by ``seed`` and the image's
pixels, so a greedy answer depends on the noise seed and its own image only, not on the batch.
LLaVA-NeXT pads every image's tiles to the batch's largest tile count: only an image's real tiles
(counted from ``image_sizes`` as the model counts them) are hashed and noised, the padding is left
as it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor

from attnzoo.errors import InvalidInputError, InvalidOptionError

from .base import ContrastBranchProcessor, PairedContrast, check_batched, check_cutoff
from .functional.contrastive import VCD_NUM_STEPS, add_diffusion_noise, contrastive_logits
from .layouts import family_of, llava_next_tile_count
from .method import MitigationMethod, PromptBatch

#: The official scripts' settings (seed: the scripts' global seed, used here for the noise draw).
DEFAULTS: dict[str, Any] = {"alpha": 1.0, "beta": 0.2, "noise_step": 500, "seed": 55}


class VCDLogitsProcessor(ContrastBranchProcessor):
    """VCD's rule against a branch of the same model on ``noised_inputs`` (the prompt batch with its
    pixels noised: :meth:`VCD.noised_inputs`)."""

    method = "vcd"

    def __init__(
        self,
        model: nn.Module,
        noised_inputs: Mapping[str, Any],
        alpha: float = DEFAULTS["alpha"],
        beta: float = DEFAULTS["beta"],
    ):
        self.alpha, self.beta = check_cutoff("VCD", alpha, beta)
        super().__init__(model, noised_inputs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "alpha": self.alpha, "beta": self.beta}

    def combine(self, input_ids, scores, branch_logits):
        return contrastive_logits(scores, branch_logits.to(scores.dtype), self.alpha, self.beta)


class VCD(MitigationMethod):
    """Visual Contrastive Decoding as a pipeline method: a :class:`VCDLogitsProcessor` per batch,
    its branch on the batch's inputs with ``pixel_values`` noised at ``noise_step``; ``batched`` runs
    the branch as rows of the main ``generate`` (:meth:`paired_contrast`) or as its own forward."""

    name = "vcd"

    def __init__(
        self,
        *,
        alpha: float = DEFAULTS["alpha"],
        beta: float = DEFAULTS["beta"],
        noise_step: int = DEFAULTS["noise_step"],
        seed: int | None = DEFAULTS["seed"],
        batched: bool = True,
    ):
        self.alpha, self.beta = check_cutoff("VCD", alpha, beta)
        if not 0 <= int(noise_step) < VCD_NUM_STEPS or int(noise_step) != noise_step:
            raise InvalidOptionError(f"VCD's noise_step must be an integer in [0, {VCD_NUM_STEPS}), got {noise_step}")
        self.noise_step = int(noise_step)
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -(2**63) <= seed < 2**63
        ):
            raise InvalidOptionError(f"VCD's seed must be a 64-bit integer (or None), got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self.batched = check_batched("VCD", batched)

    def noised_inputs(self, inputs: Mapping[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
        """``inputs`` with ``pixel_values`` replaced by their noised copy. With a ``seed``, each image's
        noise is drawn on the CPU from its own generator, seeded by ``seed`` and the image's pixels: an
        answer is then the same whatever else shares its batch (batch size, resumed or sharded runs)
        and on every device, for one pixel dtype (the seed hashes the pixels as the model gets them, and
        the noise is drawn in their dtype: a float16 run noises an image otherwise than a float32 run).
        ``seed=None`` draws the whole batch from the global RNG, as the official code does.
        LLaVA-NeXT's padded tiles ([B, tiles, 3, H, W] with ``image_sizes``) need ``model``: its config
        tells each image's real tiles from the batch's padding. Qwen2-VL's patch rows hold a still image
        as equal temporal frames: with ``model`` (its vision config) the image is noised once and every
        frame gets that noise (without, each element is noised on its own)."""
        pixels = inputs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor):
            raise InvalidInputError("VCD noises the image: the prompt batch has no pixel_values")
        frames = _still_frames(model, pixels)
        if self.seed is None:
            return {**inputs, "pixel_values": _noised(pixels.detach(), self.noise_step, None, frames)}
        cpu = pixels.detach().cpu()
        image_sizes = inputs.get("image_sizes")
        if cpu.ndim == 5 and image_sizes is not None:
            counts = _tile_counts(model, image_sizes, (cpu.shape[0], cpu.shape[1]))
            noised = cpu.clone()  # the padding tiles stay as they are
            for row, count in enumerate(counts):
                noised[row : row + 1, :count] = _seeded_noise(cpu[row : row + 1, :count], self.noise_step, self.seed)
        else:
            parts = _per_image(cpu, inputs.get("image_grid_thw"))
            noised = torch.cat([_seeded_noise(part, self.noise_step, self.seed, frames) for part in parts])
        return {**inputs, "pixel_values": noised.to(pixels.device)}

    def processor(self, model: nn.Module, batch: PromptBatch) -> VCDLogitsProcessor:
        family_of(model)  # an unknown model type raises here, naming it
        return VCDLogitsProcessor(model, self.noised_inputs(batch.inputs, model), self.alpha, self.beta)

    def logits_processors(self, model: nn.Module, processor: Any, batch: PromptBatch) -> list[LogitsProcessor]:
        return [self.processor(model, batch)]

    def paired_contrast(self, model: nn.Module, processor: Any, batch: PromptBatch) -> PairedContrast | None:
        return PairedContrast(self.processor(model, batch)) if self.batched else None

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "alpha": self.alpha,
            "beta": self.beta,
            "noise_step": self.noise_step,
            "seed": self.seed,
            "batched": self.batched,
        }


def _per_image(pixels: torch.Tensor, grid_thw: Any) -> list[torch.Tensor]:
    """The batch's pixel tensor cut into one piece per image: rows of ``[N, ...]`` (LLaVA, InstructBLIP;
    padded LLaVA-NeXT tiles go through :func:`_tile_counts` instead), or Qwen2-VL's flattened patches
    by each image's ``t * h * w``."""
    if isinstance(grid_thw, torch.Tensor) and pixels.ndim == 2:
        sizes = [int(n) for n in grid_thw.prod(-1)]
        if sum(sizes) != pixels.shape[0]:
            raise InvalidInputError(
                f"VCD: image_grid_thw accounts for {sum(sizes)} patches but pixel_values has {pixels.shape[0]}"
            )
        return list(pixels.split(sizes))
    return list(pixels.split(1))


def _tile_counts(model: nn.Module | None, image_sizes: Any, shape: tuple[int, int]) -> list[int]:
    """The real tiles of each row of LLaVA-NeXT's padded ``[B, max_tiles, ...]`` pixels, counted from
    ``image_sizes`` as the model counts them (its anyres grid pinpoints and vision tile side)."""
    config = getattr(model, "config", None)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    vision = getattr(config, "vision_config", None)
    if pinpoints is None or vision is None:
        raise InvalidInputError(
            "VCD: pixel_values of [images, tiles, 3, H, W] with image_sizes (LLaVA-NeXT) need the model whose "
            "image_grid_pinpoints count each image's tiles: noised_inputs(inputs, model)"
        )
    sizes = [tuple(int(v) for v in size) for size in image_sizes]
    if len(sizes) != shape[0]:
        raise InvalidInputError(f"VCD: image_sizes has {len(sizes)} images but pixel_values has {shape[0]}")
    counts = [llava_next_tile_count(config, size) for size in sizes]
    for size, count in zip(sizes, counts, strict=True):
        if count > shape[1]:
            raise InvalidInputError(
                f"VCD: an image of size {size} has {count} tiles but pixel_values holds {shape[1]} per image"
            )
    return counts


def _seeded_noise(
    image: torch.Tensor, noise_step: int, seed: int, frames: tuple[int, int] | None = None
) -> torch.Tensor:
    """One image's noised pixels, drawn from its own generator (``seed`` and its pixels)."""
    return _noised(image, noise_step, _image_generator(seed, image), frames)


def _still_frames(model: nn.Module | None, pixels: torch.Tensor) -> tuple[int, int] | None:
    """(channels, frames) of Qwen2-VL's flattened patch rows ([C, T, P, P] each): its processor writes a
    still image as ``temporal_patch_size`` equal frames. None for pixels that are images."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    frames, channels = getattr(vision, "temporal_patch_size", 1), getattr(vision, "in_channels", 3)
    if not isinstance(frames, int) or not isinstance(channels, int) or channels < 1:
        return None
    if pixels.ndim != 2 or frames < 2 or pixels.shape[1] % (channels * frames):
        return None
    return channels, frames


def _noised(
    pixels: torch.Tensor, noise_step: int, generator: torch.Generator | None, frames: tuple[int, int] | None
) -> torch.Tensor:
    """VCD's noise on the image: where the rows hold equal frames of one still image (Qwen2-VL), the image
    is noised once and the frames stay equal (noised apart, the patch embedding would average the noise
    down to a milder distortion than ``noise_step``)."""
    if frames is not None:
        grid = pixels.reshape(pixels.shape[0], frames[0], frames[1], -1)
        first = grid[:, :, :1]
        if torch.equal(grid, first.expand_as(grid)):
            return add_diffusion_noise(first.contiguous(), noise_step, generator).expand_as(grid).reshape(pixels.shape)
    return add_diffusion_noise(pixels, noise_step, generator)


def _image_generator(seed: int, pixels: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and the image's pixel values."""
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True))
    digest.update(pixels.contiguous().float().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1))


__all__ = ["DEFAULTS", "VCD", "VCDLogitsProcessor"]
