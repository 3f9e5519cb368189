"""The grouped-attention op: validation, backends, dispatch."""

from __future__ import annotations

import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import dispatch, torch_impl
from attnzoo.kernels._checks import check_index_tensor, check_qkv, describe, real_scalar, repeated_entries

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
        kv_groups: int ``[Gk, Tk]``; defaults to ``q_groups`` (self-attention, same grouping). Key
            groups may overlap (halo-style windows): a query whose route names two groups holding
            one token sees that token twice, once per group. A group lists a token at most once.
        route: int ``[B, G, topk]`` (shared by all heads, as BiFormer) or ``[B, H, G, topk]``:
            the key groups each query group attends to, ``topk`` distinct ones (a repeated group
            would weigh its keys twice, which no routing means). ``None``: group ``g`` sees key
            group ``g``.
        scale: softmax scale; default ``D ** -0.5`` (BiFormer's official models use ``C ** -0.5``).

    Returns ``[B, N, H, D]`` (contiguous). Bad inputs (also ``D = 0``, meta tensors, which hold no
    indices) raise :class:`~attnzoo.errors.InvalidInputError`.
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
    Nk = k.shape[1]
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise InvalidInputError(
            f"grouped_attention: k and v must be [B, Nk, H, D] = [{B}, Nk, {H}, {D}], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.is_meta:  # the groups and the route are read by value, which meta tensors do not hold
        raise InvalidInputError("grouped_attention: meta tensors hold no index values to group by; use a real device")
    for name, table in (("q_groups", q_groups), ("kv_groups", kv_groups)):
        check_index_tensor(OP, name, table, q.device)
        if table.dim() != 2:
            raise InvalidInputError(f"grouped_attention: {name} must be an integer [G, T] table, got {describe(table)}")
    G, Gk = q_groups.shape[0], kv_groups.shape[0]
    if route is None:
        if G != Gk:
            raise InvalidInputError(
                f"grouped_attention: without a route, q and kv need the same number of groups ({G} vs {Gk})"
            )
    else:
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
    _check_values(q_groups, kv_groups, route, N, Nk)


def _check_values(q_groups: torch.Tensor, kv_groups: torch.Tensor, route: torch.Tensor | None, N: int, Nk: int) -> None:
    """Index ranges and repeats, read back from the device in one sync (this runs on every call). Query groups
    hold a token once in all; a key group may overlap others but holds a token once; a route row names distinct
    key groups. ``kv_groups is q_groups`` (self-attention) is read once."""
    same_table = kv_groups is q_groups
    pending: dict[str, torch.Tensor] = {}
    if q_groups.numel():
        pending["q_min"], pending["q_max"] = q_groups.aminmax()
        # the most slots any token fills (indices clamped: out-of-range ones are reported first)
        pending["q_fill"] = torch.bincount(q_groups.flatten().clamp(-1, N) + 1, minlength=N + 2)[1:].max()
    if kv_groups.numel() and not same_table:
        pending["kv_min"], pending["kv_max"] = kv_groups.aminmax()
        pending["kv_repeat"] = repeated_entries(kv_groups)
    if route is not None and route.numel():
        pending["route_min"], pending["route_max"] = route.aminmax()
        if route.shape[-1] > 1:  # the smallest gap between a row's sorted entries: 0 for a repeat
            pending["route_gap"] = route.sort(-1).values.diff(dim=-1).amin()
    got = dict(zip(pending, torch.stack(list(pending.values())).tolist(), strict=True)) if pending else {}
    low, high = got.get("q_min", 0), got.get("q_max", -1)
    if low < -1 or high >= N:
        raise InvalidInputError(f"grouped_attention: q_groups holds indices outside [-1, {N})")
    if not same_table:
        low, high = got.get("kv_min", 0), got.get("kv_max", -1)
    if low < -1 or high >= Nk:
        raise InvalidInputError(f"grouped_attention: kv_groups holds indices outside [-1, {Nk})")
    if got.get("q_fill", 0) > 1:
        raise InvalidInputError("grouped_attention: a token appears in more than one query group slot")
    if got.get("kv_repeat"):
        raise InvalidInputError(
            "grouped_attention: a key group lists a token twice (key groups may overlap, but hold a token once each)"
        )
    if got.get("route_min", 0) < 0 or got.get("route_max", -1) >= kv_groups.shape[0]:
        raise InvalidInputError(f"grouped_attention: route holds key-group indices outside [0, {kv_groups.shape[0]})")
    if got.get("route_gap") == 0:
        raise InvalidInputError(
            "grouped_attention: route names a key group twice for one query group (its topk entries must be "
            "distinct, as region_routing's are)"
        )


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

    if 0 in (q.numel(), k.shape[1], q_groups.numel(), kv_groups.numel()):  # nothing to attend: flex's block mask
        return torch_impl.grouped_attention(q, k, v, q_groups, kv_groups, route, scale)  # cannot be empty
    return flex.grouped_attention(q, k, v, q_groups, kv_groups, route, scale)


def _check_triton(q: torch.Tensor, *_: object) -> str | None:
    return dispatch.triton_can_run(q, MAX_TRITON_HEAD_DIM)


dispatch.register_backend(OP, "triton", _triton, [_check_triton])
dispatch.register_backend(OP, "flex", _flex, [dispatch.flex_can_run])
dispatch.register_backend(OP, "torch", torch_impl.grouped_attention)
