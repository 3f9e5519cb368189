"""The grouped-attention op: validation, backends, dispatch."""

from __future__ import annotations

import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import dispatch, torch_impl
from attnzoo.kernels._checks import check_index_tensor, check_qkv, describe, real_scalar

OP = "grouped_attention"
MAX_TRITON_HEAD_DIM = 256


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor | None = None,
    route: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention inside token groups, where a query group's keys come from its routed key groups.

    Args:
        q: ``[B, N, H, D]``; k, v: ``[B, Nk, H, D]``. Any strides (e.g. views of a fused qkv
            projection); the kernels read tokens in place.
        q_groups: int ``[G, Tq]`` token indices (``-1`` = padding slot). Each token belongs to
            at most one group; tokens in no group get a zero output.
        kv_groups: int ``[Gk, Tk]``; defaults to ``q_groups`` (self-attention, same grouping).
        route: int ``[B, G, topk]`` (shared by all heads, as BiFormer) or ``[B, H, G, topk]``:
            the key groups each query group attends to. ``None``: group ``g`` sees key group ``g``.
        scale: softmax scale; default ``D ** -0.5`` (BiFormer's official models use ``C ** -0.5``).

    Returns ``[B, N, H, D]`` (contiguous).
    """
    kv_groups = q_groups if kv_groups is None else kv_groups
    _validate(q, k, v, q_groups, kv_groups, route)
    scale = q.shape[-1] ** -0.5 if scale is None else real_scalar(OP, "scale", scale)
    return dispatch.dispatch(OP, q, k, v, q_groups, kv_groups, route, scale)


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
) -> None:
    check_qkv(OP, q, k, v, "[B, N, H, D]")
    B, N, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise InvalidInputError(
            f"grouped_attention: k and v must be [B, Nk, H, D] = [{B}, Nk, {H}, {D}], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    for name, table, n in (("q_groups", q_groups, N), ("kv_groups", kv_groups, k.shape[1])):
        check_index_tensor(OP, name, table, q.device)
        if table.dim() != 2:
            raise InvalidInputError(f"grouped_attention: {name} must be an integer [G, T] table, got {describe(table)}")
        if table.numel() and (int(table.min()) < -1 or int(table.max()) >= n):
            raise InvalidInputError(f"grouped_attention: {name} holds indices outside [-1, {n})")
    G, Gk = q_groups.shape[0], kv_groups.shape[0]
    valid = q_groups[q_groups >= 0]
    if valid.numel() != torch.unique(valid).numel():
        raise InvalidInputError("grouped_attention: a token appears in more than one query group slot")
    if route is None:
        if G != Gk:
            raise InvalidInputError(
                f"grouped_attention: without a route, q and kv need the same number of groups ({G} vs {Gk})"
            )
        return
    check_index_tensor(OP, "route", route, q.device)
    if route.dim() not in (3, 4):
        raise InvalidInputError(
            f"grouped_attention: route must be an integer [B, G, topk] or [B, H, G, topk] tensor, got {describe(route)}"
        )
    expected = (B, G) if route.dim() == 3 else (B, H, G)
    if tuple(route.shape[:-1]) != expected or route.shape[-1] < 1:
        raise InvalidInputError(
            f"grouped_attention: route shape {tuple(route.shape)} does not match [{', '.join(map(str, expected))}, topk]"
        )
    if int(route.min()) < 0 or int(route.max()) >= Gk:
        raise InvalidInputError(f"grouped_attention: route holds key-group indices outside [0, {Gk})")


# -- backends ------------------------------------------------------------------------------


def _triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    from attnzoo.kernels import ops

    as_int32 = None if route is None else route.to(torch.int32)
    return ops.grouped_attention(q, k, v, q_groups.to(torch.int32), kv_groups.to(torch.int32), as_int32, scale)


def _flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    from attnzoo.kernels import flex

    return flex.grouped_attention(q, k, v, q_groups, kv_groups, route, scale)


def _check_triton(q: torch.Tensor, *_: object) -> str | None:
    return dispatch.triton_can_run(q, MAX_TRITON_HEAD_DIM)


dispatch.register_backend(OP, "triton", _triton, [_check_triton])
dispatch.register_backend(OP, "flex", _flex, [dispatch.flex_can_run])
dispatch.register_backend(OP, "torch", torch_impl.grouped_attention)
