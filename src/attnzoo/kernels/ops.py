"""Triton kernels as ``torch.library`` custom ops, with fake (meta) and autograd registrations,
so they are opaque to ``torch.compile`` and pass ``torch.library.opcheck``.

Imported only when a Triton backend runs (the kernel modules import Triton on first use).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnzoo.kernels.triton.common import stat_dtype


def _fake_out_and_lse(q: Tensor, lse_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=stat_dtype(q))


def _fake_grads(*inputs: Tensor) -> tuple[Tensor, ...]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs)


def _save_inputs_out_lse(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    """Autograd setup of the softmax ops: the tensor inputs, the output and its log-sum-exp are
    saved; the scale (the last input) is kept as a float."""
    *tensors, scale = inputs
    out, lse = output
    ctx.save_for_backward(*tensors, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


# -- grouped attention ---------------------------------------------------------------------


@torch.library.custom_op("attnzoo::grouped_attention_fwd", mutates_args=())
def grouped_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, kv_groups: Tensor, route: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    from attnzoo.kernels.triton.grouped import grouped_attention_fwd as kernel

    return kernel(q, k, v, q_groups, kv_groups, route, scale)


@grouped_attention_fwd.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, kv_groups: Tensor, route: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    B, N, H, _ = q.shape
    return _fake_out_and_lse(q, (B, H, N))


@torch.library.custom_op("attnzoo::grouped_attention_bwd", mutates_args=())
def grouped_attention_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_groups: Tensor,
    kv_groups: Tensor,
    route: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from attnzoo.kernels.triton.grouped import grouped_attention_bwd as kernel

    return kernel(do, q, k, v, out, lse, q_groups, kv_groups, route, scale)


@grouped_attention_bwd.register_fake
def _(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_groups: Tensor,
    kv_groups: Tensor,
    route: Tensor | None,
    scale: float,
) -> tuple[Tensor, ...]:
    return _fake_grads(q, k, v)


def _grouped_backward(ctx: Any, d_out: Tensor, d_lse: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, q_groups, kv_groups, route, out, lse = ctx.saved_tensors
    dq, dk, dv = grouped_attention_bwd(d_out, q, k, v, out, lse, q_groups, kv_groups, route, ctx.scale)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("attnzoo::grouped_attention_fwd", _grouped_backward, setup_context=_save_inputs_out_lse)


def grouped_attention(
    q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, kv_groups: Tensor, route: Tensor | None, scale: float
) -> Tensor:
    return grouped_attention_fwd(q, k, v, q_groups, kv_groups, route, scale)[0]


# -- masked attention ----------------------------------------------------------------------


@torch.library.custom_op("attnzoo::masked_attention_fwd", mutates_args=())
def masked_attention_fwd(q: Tensor, k: Tensor, v: Tensor, bits: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from attnzoo.kernels.triton.masked import masked_attention_fwd as kernel

    return kernel(q, k, v, bits, scale)


@masked_attention_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bits: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _fake_out_and_lse(q, tuple(q.shape[:3]))


@torch.library.custom_op("attnzoo::masked_attention_bwd", mutates_args=())
def masked_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bits: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    from attnzoo.kernels.triton.masked import masked_attention_bwd as kernel

    return kernel(do, q, k, v, out, lse, bits, scale)


@masked_attention_bwd.register_fake
def _(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bits: Tensor, scale: float
) -> tuple[Tensor, ...]:
    return _fake_grads(q, k, v)


def _masked_backward(ctx: Any, d_out: Tensor, d_lse: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, bits, out, lse = ctx.saved_tensors
    dq, dk, dv = masked_attention_bwd(d_out, q, k, v, out, lse, bits, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("attnzoo::masked_attention_fwd", _masked_backward, setup_context=_save_inputs_out_lse)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, bits: Tensor, scale: float) -> Tensor:
    return masked_attention_fwd(q, k, v, bits, scale)[0]


# -- linear attention (L2ViT and InLine, one kernel pair) ------------------------------------


@torch.library.custom_op("attnzoo::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, tau: Tensor, mode: int, c: float, denom_min: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from attnzoo.kernels.triton.linear import linear_attention_fwd as kernel

    return kernel(q, k, v, tau, mode, c, denom_min)


@linear_attention_fwd.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, tau: Tensor, mode: int, c: float, denom_min: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    import triton

    B, H, _, D = q.shape
    block_d = max(16, triton.next_power_of_2(D))
    stat = stat_dtype(q)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty((B * H, block_d, block_d), dtype=stat),
        q.new_empty((B * H, block_d), dtype=stat),
        q.new_empty((B * H, block_d), dtype=stat),
    )


@torch.library.custom_op("attnzoo::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau: Tensor,
    S: Tensor,
    Z: Tensor,
    VS: Tensor,
    mode: int,
    c: float,
    denom_min: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from attnzoo.kernels.triton.linear import linear_attention_bwd as kernel

    return kernel(do, q, k, v, tau, S, Z, VS, mode, c, denom_min)


@linear_attention_bwd.register_fake
def _(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau: Tensor,
    S: Tensor,
    Z: Tensor,
    VS: Tensor,
    mode: int,
    c: float,
    denom_min: float,
) -> tuple[Tensor, ...]:
    return (*_fake_grads(q, k, v), torch.empty_like(tau))


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    q, k, v, tau, mode, c, denom_min = inputs
    _, S, Z, VS = output
    ctx.save_for_backward(q, k, v, tau, S, Z, VS)
    ctx.args = (mode, c, denom_min)
    ctx.mark_non_differentiable(S, Z, VS)


def _linear_backward(ctx: Any, d_out: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, tau, S, Z, VS = ctx.saved_tensors
    dq, dk, dv, dtau = linear_attention_bwd(d_out, q, k, v, tau, S, Z, VS, *ctx.args)
    return dq, dk, dv, dtau, None, None, None


torch.library.register_autograd("attnzoo::linear_attention_fwd", _linear_backward, setup_context=_linear_setup)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, tau: Tensor, mode: int, c: float, denom_min: float) -> Tensor:
    return linear_attention_fwd(q, k, v, tau, mode, c, denom_min)[0]
