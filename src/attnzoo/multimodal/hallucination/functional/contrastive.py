"""Logits-time rules of the contrast-branch methods, as pure functions on next-token logits.

VCD (Leng et al., CVPR 2024; DAMO-NLP-SG/VCD) contrasts the logits of the original image with
those of a diffusion-noised copy; AGLA (Lackel/AGLA) adds the logits of a prompt-masked copy.
Both then drop every token the ORIGINAL branch finds implausible (the adaptive plausibility
cutoff, in logit space: keep l_o >= log beta + max l_o, i.e. p_o >= beta * max p_o). The cutoff
comes first, before temperature / top-k / top-p, as in the official sampling loops.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from attnzoo.errors import InvalidInputError

#: The DDPM-style forward process VCD draws its noised image from: 1000 steps, sigmoid betas.
VCD_NUM_STEPS = 1000
VCD_BETA_RANGE = (1e-5, 0.5e-2)


@lru_cache(maxsize=1)
def _vcd_schedule() -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) for every t, in float32 as the official code builds them
    (even for a float64 image, so the schedule is float32 there too)."""
    low, high = VCD_BETA_RANGE
    betas = torch.sigmoid(torch.linspace(-6, 6, VCD_NUM_STEPS)) * (high - low) + low
    alphas_bar = torch.cumprod(1 - betas, dim=0)
    return torch.sqrt(alphas_bar), torch.sqrt(1 - alphas_bar)


def add_diffusion_noise(
    image: torch.Tensor, noise_step: int = 500, generator: torch.Generator | None = None
) -> torch.Tensor:
    """VCD's distorted image: sqrt(abar_t) * image + sqrt(1 - abar_t) * eps at step ``noise_step``.

    ``image`` is the processed pixel tensor (any shape; the noise has its shape, dtype and device).
    With ``generator=None`` eps comes from the global RNG, as the official ``torch.randn_like``
    does, so a ``torch.manual_seed`` before the call reproduces the official draw; pass a
    generator to keep the draw off the global stream.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise InvalidInputError(f"add_diffusion_noise needs a floating-point pixel tensor, got {_describe(image)}")
    step = int(noise_step)
    if not 0 <= step < VCD_NUM_STEPS:
        raise InvalidInputError(f"noise_step must be in [0, {VCD_NUM_STEPS}), got {noise_step}")
    signal, spread = (s[step].to(image.device) for s in _vcd_schedule())
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    return signal * image + spread * noise


def plausibility_cutoff(original_logits: torch.Tensor, scores: torch.Tensor, beta: float) -> torch.Tensor:
    """``scores`` with -inf wherever the original logits fall below log(beta) + their row maximum.

    log(beta) is taken in float32 as the official loops do (``torch.log(torch.tensor(beta))``); the
    row's argmax always survives, since log(beta) <= 0.
    """
    if not 0.0 <= beta <= 1.0:
        raise InvalidInputError(f"the plausibility cutoff beta must be in [0, 1], got {beta}")
    log_beta = torch.log(torch.tensor(beta, dtype=torch.float32, device=original_logits.device))
    cutoff = log_beta + original_logits.max(dim=-1, keepdim=True).values
    return scores.masked_fill(original_logits < cutoff, -float("inf"))


def contrastive_logits(
    original_logits: torch.Tensor, contrast_logits: torch.Tensor, alpha: float = 1.0, beta: float = 0.2
) -> torch.Tensor:
    """VCD: (1 + alpha) * l_o - alpha * l_cd, then the plausibility cutoff on l_o.

    The defaults are the official scripts' (alpha 1, beta 0.2); the official loop's own fallbacks
    (alpha 0.5, beta 0.1) only applied when a script forgot to pass them.
    """
    _check_pair(original_logits, contrast_logits)
    combined = (1 + alpha) * original_logits - alpha * contrast_logits
    return plausibility_cutoff(original_logits, combined, beta)


def assembly_logits(
    original_logits: torch.Tensor, augmented_logits: torch.Tensor, alpha: float = 2.0, beta: float = 0.5
) -> torch.Tensor:
    """AGLA: l_o + alpha * l_a (additive, unlike VCD's contrast), then the plausibility cutoff on l_o.
    Defaults are the official POPE scripts' (alpha 2, beta 0.5)."""
    _check_pair(original_logits, augmented_logits)
    combined = original_logits + alpha * augmented_logits
    return plausibility_cutoff(original_logits, combined, beta)


def _check_pair(original: torch.Tensor, other: torch.Tensor) -> None:
    if original.shape != other.shape:
        raise InvalidInputError(
            f"the two branches' logits must have one shape, got {tuple(original.shape)} and {tuple(other.shape)}"
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
