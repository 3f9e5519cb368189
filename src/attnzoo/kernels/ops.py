"""Triton kernels as ``torch.library`` custom ops, with fake (meta) and autograd registrations,
so they are opaque to ``torch.compile`` and pass ``torch.library.opcheck``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _stat_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_out_and_lse(q: Tensor, lse_shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=_stat_dtype(q))


def _fake_grads(*inputs: Tensor) -> tuple[Tensor, ...]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs)


@torch.library.custom_op("attnzoo::grouped_attention_fwd", mutates_args=())
def grouped_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, kv_groups: Tensor, route: Optional[Tensor], scale: float
) -> tuple[Tensor, Tensor]:
    from attnzoo.kernels.triton.grouped import grouped_attention_fwd as kernel

    return kernel(q, k, v, q_groups, kv_groups, route, scale)


@grouped_attention_fwd.register_fake
def _(q, k, v, q_groups, kv_groups, route, scale):
    B, N, H, _ = q.shape
    return _fake_out_and_lse(q, (B, H, N))


@torch.library.custom_op("attnzoo::grouped_attention_bwd", mutates_args=())
def grouped_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    q_groups: Tensor, kv_groups: Tensor, route: Optional[Tensor], scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from attnzoo.kernels.triton.grouped import grouped_attention_bwd as kernel

    return kernel(do, q, k, v, out, lse, q_groups, kv_groups, route, scale)


@grouped_attention_bwd.register_fake
def _(do, q, k, v, out, lse, q_groups, kv_groups, route, scale):
    return _fake_grads(q, k, v)


def _grouped_setup(ctx, inputs, output):
    q, k, v, q_groups, kv_groups, route, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_groups, kv_groups, route)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _grouped_backward(ctx, d_out, d_lse):
    q, k, v, out, lse, q_groups, kv_groups, route = ctx.saved_tensors
    dq, dk, dv = grouped_attention_bwd(d_out, q, k, v, out, lse, q_groups, kv_groups, route, ctx.scale)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("attnzoo::grouped_attention_fwd", _grouped_backward, setup_context=_grouped_setup)


def grouped_attention(q, k, v, q_groups, kv_groups, route, scale: float) -> Tensor:
    return grouped_attention_fwd(q, k, v, q_groups, kv_groups, route, scale)[0]


@torch.library.custom_op("attnzoo::topk_attention_fwd", mutates_args=())
def topk_attention_fwd(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from attnzoo.kernels.triton.topk import topk_attention_fwd as kernel

    return kernel(q, k, v, index, scale)


@topk_attention_fwd.register_fake
def _(q, k, v, index, scale):
    return _fake_out_and_lse(q, tuple(q.shape[:3]))


@torch.library.custom_op("attnzoo::topk_attention_bwd", mutates_args=())
def topk_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, index: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    from attnzoo.kernels.triton.topk import topk_attention_bwd as kernel

    return kernel(do, q, k, v, out, lse, index, scale)


@topk_attention_bwd.register_fake
def _(do, q, k, v, out, lse, index, scale):
    return _fake_grads(q, k, v)


def _topk_setup(ctx, inputs, output):
    q, k, v, index, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, index)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _topk_backward(ctx, d_out, d_lse):
    q, k, v, out, lse, index = ctx.saved_tensors
    dq, dk, dv = topk_attention_bwd(d_out, q, k, v, out, lse, index, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("attnzoo::topk_attention_fwd", _topk_backward, setup_context=_topk_setup)


def topk_attention(q, k, v, index, scale: float) -> Tensor:
    return topk_attention_fwd(q, k, v, index, scale)[0]


@torch.library.custom_op("attnzoo::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, tau: Tensor, mode: int, c: float, denom_min: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from attnzoo.kernels.triton.linear import linear_attention_fwd as kernel

    return kernel(q, k, v, tau, mode, c, denom_min)


@linear_attention_fwd.register_fake
def _(q, k, v, tau, mode, c, denom_min):
    import triton

    B, H, _, D = q.shape
    block_d = max(16, triton.next_power_of_2(D))
    stat = _stat_dtype(q)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty((B * H, block_d, block_d), dtype=stat),
        q.new_empty((B * H, block_d), dtype=stat),
        q.new_empty((B * H, block_d), dtype=stat),
    )


@torch.library.custom_op("attnzoo::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, tau: Tensor, S: Tensor, Z: Tensor, VS: Tensor, mode: int, c: float, denom_min: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from attnzoo.kernels.triton.linear import linear_attention_bwd as kernel

    return kernel(do, q, k, v, tau, S, Z, VS, mode, c, denom_min)


@linear_attention_bwd.register_fake
def _(do, q, k, v, tau, S, Z, VS, mode, c, denom_min):
    return (*_fake_grads(q, k, v), torch.empty_like(tau))


def _linear_setup(ctx, inputs, output):
    q, k, v, tau, mode, c, denom_min = inputs
    _, S, Z, VS = output
    ctx.save_for_backward(q, k, v, tau, S, Z, VS)
    ctx.args = (mode, c, denom_min)
    ctx.mark_non_differentiable(S, Z, VS)


def _linear_backward(ctx, d_out, *_):
    q, k, v, tau, S, Z, VS = ctx.saved_tensors
    dq, dk, dv, dtau = linear_attention_bwd(d_out, q, k, v, tau, S, Z, VS, *ctx.args)
    return dq, dk, dv, dtau, None, None, None


torch.library.register_autograd("attnzoo::linear_attention_fwd", _linear_backward, setup_context=_linear_setup)


def linear_attention(q, k, v, tau, mode: int, c: float, denom_min: float) -> Tensor:
    return linear_attention_fwd(q, k, v, tau, mode, c, denom_min)[0]


@torch.library.custom_op("attnzoo::masked_attention_fwd", mutates_args=())
def masked_attention_fwd(q: Tensor, k: Tensor, v: Tensor, bits: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from attnzoo.kernels.triton.masked import masked_attention_fwd as kernel

    return kernel(q, k, v, bits, scale)


@masked_attention_fwd.register_fake
def _(q, k, v, bits, scale):
    return _fake_out_and_lse(q, tuple(q.shape[:3]))


@torch.library.custom_op("attnzoo::masked_attention_bwd", mutates_args=())
def masked_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bits: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    from attnzoo.kernels.triton.masked import masked_attention_bwd as kernel

    return kernel(do, q, k, v, out, lse, bits, scale)


@masked_attention_bwd.register_fake
def _(do, q, k, v, out, lse, bits, scale):
    return _fake_grads(q, k, v)


def _masked_backward(ctx, d_out, d_lse):
    q, k, v, out, lse, bits = ctx.saved_tensors
    dq, dk, dv = masked_attention_bwd(d_out, q, k, v, out, lse, bits, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("attnzoo::masked_attention_fwd", _masked_backward, setup_context=_topk_setup)


def masked_attention(q, k, v, bits, scale: float) -> Tensor:
    return masked_attention_fwd(q, k, v, bits, scale)[0]
