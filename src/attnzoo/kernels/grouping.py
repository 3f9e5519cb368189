"""Token groupings as index tables, and BiFormer's region routing.

A grouping is an int32 table ``[G, T]`` of token indices into the flattened token axis
(row-major over the feature map); ``-1`` marks a padding slot, which attention masks. The
kernels read tokens through these tables, so no grouping ever costs a permuted copy.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from attnzoo._values import whole_number
from attnzoo.errors import InvalidInputError
from attnzoo.kernels._checks import describe, real_scalar


def window_groups(
    height: int, width: int, window: int | tuple[int, int], *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Non-overlapping windows in row-major window order, tokens row-major inside a window.

    Sizes that are not multiples of the window give partial windows whose missing slots
    are ``-1`` (masked). For BiFormer's and L²ViT's *unmasked* zero padding, pad the map
    with zeros first, as the official code does, and build the groups on the padded map.
    """
    height, width, (wh, ww) = _sizes("window_groups", height, width, "window", window)
    ny, nx = math.ceil(height / wh), math.ceil(width / ww)
    ry, rx, i, j = torch.meshgrid(torch.arange(ny), torch.arange(nx), torch.arange(wh), torch.arange(ww), indexing="ij")
    y, x = ry * wh + i, rx * ww + j
    table = torch.where((y < height) & (x < width), y * width + x, torch.full_like(y, -1))
    return table.reshape(ny * nx, wh * ww).to(device=device, dtype=torch.int32)


def dilated_groups(
    height: int, width: int, groups: int | tuple[int, int], *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Strided groups: group ``(gy, gx)`` holds tokens ``(i*Gy + gy, j*Gx + gx)`` (long-range grouping)."""
    height, width, (gy_n, gx_n) = _sizes("dilated_groups", height, width, "groups", groups)
    if height % gy_n or width % gx_n:
        raise InvalidInputError(f"a {height}x{width} map does not split into {gy_n}x{gx_n} dilated groups")
    gy, gx, i, j = torch.meshgrid(
        torch.arange(gy_n), torch.arange(gx_n), torch.arange(height // gy_n), torch.arange(width // gx_n), indexing="ij"
    )
    table = (i * gy_n + gy) * width + (j * gx_n + gx)
    return table.reshape(gy_n * gx_n, -1).to(device=device, dtype=torch.int32)


def _sizes(op: str, height: int, width: int, name: str, per_axis: int | tuple[int, int]) -> tuple[int, int, tuple]:
    """The map's sizes and ``name`` (one int, or a ``(y, x)`` pair), checked to be positive integers (anything
    ``operator.index`` takes but a bool), or a typed error."""
    pair = tuple(per_axis) if isinstance(per_axis, (tuple, list)) else (per_axis, per_axis)
    values = (height, width, *pair)
    try:
        ok = len(pair) == 2 and not any(isinstance(v, (bool, np.bool_)) for v in values)
        ok = ok and min(operator.index(v) for v in values) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise InvalidInputError(
            f"{op} needs positive integer sizes, got map {height!r}x{width!r} and {name}={per_axis!r}"
        )
    return height, width, pair


def across_views(table: torch.Tensor, views: int, tokens_per_view: int) -> torch.Tensor:
    """Extend a per-view grouping to ``views`` stacked views (LRGT's long-range grouping).

    Group ``g`` then holds its tokens from every view, ordered (token, view): view ``v``'s copy
    of token ``t`` is ``v * tokens_per_view + t``. Tokens are numbered view-major, so the table's
    indices must lie in ``[-1, tokens_per_view)``.
    """
    views = whole_number(views, "across_views: views", low=0, error=InvalidInputError)
    tokens_per_view = whole_number(tokens_per_view, "across_views: tokens_per_view", error=InvalidInputError)
    _check_table("across_views", table, tokens_per_view)
    offsets = torch.arange(views, device=table.device, dtype=table.dtype) * tokens_per_view
    expanded = table[:, :, None] + offsets  # [G, T, V]
    return torch.where(table[:, :, None] >= 0, expanded, -1).flatten(1).to(torch.int32)


#: Smallest and largest entry of each groups table seen, with the table's version: models build their tables
#: once and pass the same tensor on every call, so reading its range back (a host sync on a GPU) happens once.
_TABLE_RANGES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _table_range(table: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty integer table, read back once per table and version (an in-place edit
    bumps the version); inference tensors keep no version, so theirs is read on every call."""
    if table.is_inference():
        return _read_range(table)
    cached = _TABLE_RANGES.get(table)
    if cached is None or cached[0] != table._version:
        cached = (table._version, _read_range(table))
        _TABLE_RANGES[table] = cached
    return cached[1]


def _read_range(table: torch.Tensor) -> tuple[int, int]:
    low, high = torch.stack([table.min(), table.max()]).tolist()
    return int(low), int(high)


def _check_table(op: str, table: torch.Tensor, num_tokens: int) -> None:
    """``table`` is an integer ``[G, T]`` grouping of ``num_tokens`` tokens (``-1`` = padding)."""
    if not _is_integer_tensor(table) or table.dim() != 2:
        raise InvalidInputError(f"{op}: groups must be an integer [G, T] table, got {describe(table)}")
    if table.numel() == 0 or table.is_meta:
        return
    low, high = _table_range(table)
    if low < -1 or high >= num_tokens:
        raise InvalidInputError(f"{op}: groups hold token indices outside [-1, {num_tokens})")


def _is_integer_tensor(t: object) -> bool:
    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def region_routing(q: torch.Tensor, k: torch.Tensor, groups: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """BiFormer's routing: the ``topk`` key regions per query region, shared by all heads.

    ``q``, ``k``: ``[B, N, C]`` (all heads together, as the official code averages the full
    channel width). Region means are taken over each group's valid tokens and detached: no
    gradient reaches the router. Returns int32 ``[B, G, topk]`` in descending logit order
    (``topk`` distinct regions, as :func:`~attnzoo.kernels.grouped_attention` requires).
    ``groups`` is range-checked once per table and version: edit a table with torch ops, since an edit
    torch does not see (through a numpy view or ``.data``) is not checked again here.
    """
    floating = all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (q, k))
    if not floating or q.dim() != 3 or k.shape != q.shape:
        raise InvalidInputError(
            f"region_routing expects floating q and k of the same shape [B, N, C], got {describe(q)} and {describe(k)}"
        )
    _check_table("region_routing", groups, q.shape[1])
    num_groups = groups.shape[0]
    if isinstance(topk, torch.Tensor) and _is_integer_tensor(topk) and topk.numel() == 1:
        topk = int(topk)  # a one-element integer tensor counts as its number
    topk = whole_number(
        topk, "region_routing: topk", high=num_groups, why=f"{num_groups} regions", error=InvalidInputError
    )
    scale = real_scalar("region_routing", "scale", scale)
    with torch.no_grad():
        q_r, k_r = region_means(q, groups), region_means(k, groups)
        logits = (q_r * scale) @ k_r.transpose(-1, -2)
        return torch.topk(logits, k=topk, dim=-1).indices.to(torch.int32)


def expand_route(
    route: torch.Tensor | None, batch: int, heads: int, num_groups: int, device: torch.device
) -> torch.Tensor:
    """``[B, H, G, topk]`` routing; ``None`` means each query group sees its own key group.

    A route shared by the heads (``[B, G, topk]``) stays shared: its head stride is 0, which the
    backends read as "fetch once for all heads".
    """
    if route is None:
        return (
            torch.arange(num_groups, device=device, dtype=torch.int32)
            .view(1, 1, num_groups, 1)
            .expand(batch, heads, num_groups, 1)
        )
    if route.dim() == 3:
        return route[:, None].expand(batch, heads, *route.shape[1:])
    return route


def region_means(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``[B, N, C]`` over each group's valid tokens: ``[B, G, C]``."""
    valid = (groups >= 0).to(x.dtype)
    gathered = x[:, groups.clamp(min=0).long()]  # [B, G, T, C]
    return (gathered * valid[None, :, :, None]).sum(2) / valid.sum(1).clamp(min=1)[None, :, None]


def inverse_routing(route: torch.Tensor, num_kv_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of ``route`` ``[B, R, G, topk]``: for key group ``j``, the query groups that route to it.

    Returns ``ptr`` ``[B, R, Gk + 1]`` and ``idx`` ``[B, R, G * topk]`` (int32); query groups
    of key group ``j`` are ``idx[b, r, ptr[b, r, j]:ptr[b, r, j + 1]]``, in ascending order.
    Built with a stable sort, so the backward pass that uses it is deterministic. Indices of
    ``route`` must lie in ``[0, num_kv_groups)`` (:func:`~attnzoo.kernels.grouped_attention` checks
    them; this runs inside its backward, so it reads no value).
    """
    num_kv_groups = whole_number(num_kv_groups, "inverse_routing: num_kv_groups", low=0, error=InvalidInputError)
    if not _is_integer_tensor(route) or route.dim() != 4:
        raise InvalidInputError(
            f"inverse_routing: route must be an integer [B, R, G, topk] tensor, got {describe(route)}"
        )
    B, R, G, topk = route.shape
    flat = route.reshape(B, R, G * topk).long()
    order = torch.sort(flat, dim=-1, stable=True).indices
    idx = (order // topk).to(torch.int32)
    counts = torch.zeros(B, R, num_kv_groups + 1, dtype=torch.long, device=route.device)
    counts.scatter_add_(-1, flat + 1, torch.ones_like(flat))
    return counts.cumsum(-1).to(torch.int32), idx
