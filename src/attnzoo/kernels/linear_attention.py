"""Linear attention ops, non-causal and linear in ``N``: L²ViT's enhanced linear attention and
InLine attention. One Triton kernel pair computes both (``MODE``)."""

from __future__ import annotations

import numpy as np
import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import dispatch, torch_impl
from attnzoo.kernels._checks import check_heads_first_qkv, real_scalar

MAX_TRITON_HEAD_DIM = 128
L2VIT_OP, INLINE_OP = "l2vit_linear_attention", "inline_attention"


def l2vit_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, temperature: torch.Tensor | float, denom_min: float = 100.0
) -> torch.Tensor:
    """L²ViT's global attention over all ``N`` tokens.

    ``out = relu(q) (relu(k)^T v) tau_h / max(relu(q) . sum_j relu(k_j), denom_min)``.
    q, k, v: ``[B, H, N, D]``; ``temperature``: per head (any shape with ``H`` elements, e.g.
    L²ViT's ``(H, 1, 1)`` parameter) or a scalar. ``denom_min`` is L²ViT's clamp (100).
    """
    _validate(L2VIT_OP, q, k, v)
    H = q.shape[1]
    if isinstance(temperature, torch.Tensor):  # a learnt parameter: used as is, gradient included
        if temperature.is_complex() or temperature.dtype == torch.bool:
            raise InvalidInputError(f"{L2VIT_OP}: temperature must be real, got {temperature.dtype}")
    elif isinstance(temperature, (list, tuple, np.ndarray)):
        try:
            temperature = np.asarray(temperature, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{L2VIT_OP}: temperature must hold real numbers, got {temperature!r}") from None
    else:
        temperature = real_scalar(L2VIT_OP, "temperature", temperature)
    tau = torch.as_tensor(temperature, dtype=q.dtype, device=q.device)
    if tau.numel() not in (1, H):
        raise InvalidInputError(f"{L2VIT_OP}: temperature must have 1 or {H} elements, got shape {tuple(tau.shape)}")
    tau = tau.reshape(-1).expand(H)
    clamp = real_scalar(L2VIT_OP, "denom_min", denom_min)
    if clamp <= 0:  # a query whose ReLU features are all 0 has denominator 0: only a positive clamp keeps it finite
        raise InvalidInputError(f"{L2VIT_OP}: denom_min must be > 0 (L²ViT uses 100), got {denom_min!r}")
    return dispatch.dispatch(L2VIT_OP, q, k, v, tau, clamp)


def inline_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """InLine attention (identity kernel with the mean-key correction).

    Equivalent to attention weights ``(s/n) q_i . k_j - (s/n) q_i . kbar + 1/n`` (rows sum to
    one, entries may be negative). q, k, v: ``[B, H, N, D]``; ``scale`` default ``D ** -0.5``.
    """
    _validate(INLINE_OP, q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else real_scalar(INLINE_OP, "scale", scale)
    return dispatch.dispatch(INLINE_OP, q, k, v, scale)


def _validate(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_heads_first_qkv(op, q, k, v)
    if k.shape[2] == 0:
        raise InvalidInputError(f"{op}: no keys (Nk = 0)")


# -- backends ------------------------------------------------------------------------------


def _check_triton(q: torch.Tensor, k: torch.Tensor, *_: object) -> str | None:
    if q.shape[2] != k.shape[2]:
        return "the Triton kernels need as many queries as keys"
    return dispatch.triton_can_run(q, MAX_TRITON_HEAD_DIM)


def _l2vit_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau: torch.Tensor, denom_min: float
) -> torch.Tensor:
    from attnzoo.kernels import ops
    from attnzoo.kernels.triton.linear import L2VIT

    return ops.linear_attention(q, k, v, tau.contiguous(), L2VIT, 0.0, denom_min)


def _inline_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from attnzoo.kernels import ops
    from attnzoo.kernels.triton.linear import INLINE

    tau = torch.ones(q.shape[1], dtype=q.dtype, device=q.device)
    return ops.linear_attention(q, k, v, tau, INLINE, scale / k.shape[2], 0.0)


dispatch.register_backend(L2VIT_OP, "triton", _l2vit_triton, [_check_triton])
dispatch.register_backend(L2VIT_OP, "torch", torch_impl.l2vit_linear_attention)
dispatch.register_backend(INLINE_OP, "triton", _inline_triton, [_check_triton])
dispatch.register_backend(INLINE_OP, "torch", torch_impl.inline_attention)
