"""FlexAttention backends: the routing table becomes a BlockMask over group-major token order.

Always built with a ``mask_mod`` (eager flex without one silently computes dense attention).
Compiled on CUDA; eager on the CPU, where flex materialises the scores (fine for tests and
small inputs; the dispatcher runs it there only when forced, and never for backward).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from attnzoo.kernels.grouping import expand_route

# Graphs the compiled flex may hold: one per shape and block size (a model's stages at a few resolutions, the
# benchmarks' cases). Dynamo's default (8) would otherwise send every later shape, silently, to eager flex.
RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def recompile_room(limit: int = RECOMPILE_LIMIT) -> contextlib.AbstractContextManager[Any]:
    """Dynamo's per-function recompile limit raised to at least ``limit`` inside the block (its name changed
    from ``cache_size_limit`` to ``recompile_limit`` in torch 2.6; the limit is read when a call recompiles)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), limit)})


def _flex(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        with recompile_room():
            return _compiled_flex()(q, *args, **kwargs)
    with warnings.catch_warnings():  # eager flex warns that it is unfused: on the CPU that is the point
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, *args, **kwargs)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import BlockMask

    B, N, H, D = q.shape
    G, Tq = q_groups.shape
    Gk, Tk = kv_groups.shape
    r = expand_route(route, B, H, G, q.device).long()
    heads_r = r.shape[1] if r.stride(1) != 0 else 1
    r = r[:, :heads_r]
    allowed = torch.zeros(B, heads_r, G, Gk, dtype=torch.bool, device=q.device)
    allowed.scatter_(-1, r, True)
    key_ok = (kv_groups >= 0).flatten()
    qi, ki = q_groups.clamp(min=0).long().flatten(), kv_groups.clamp(min=0).long().flatten()
    Qg = q[:, qi].transpose(1, 2)  # [B, H, G*Tq, D]
    Kg = k[:, ki].transpose(1, 2)
    Vg = v[:, ki].transpose(1, 2)

    def mask_mod(b, h, q_idx, kv_idx):
        hr = h if heads_r > 1 else 0
        return allowed[b, hr, q_idx // Tq, kv_idx // Tk] & key_ok[kv_idx]

    kv_indices = torch.sort(torch.where(allowed, torch.arange(Gk, device=q.device), Gk), dim=-1).values.clamp(
        max=Gk - 1
    )
    mask = BlockMask.from_kv_blocks(
        allowed.sum(-1).to(torch.int32),
        kv_indices.to(torch.int32),
        BLOCK_SIZE=(Tq, Tk),
        mask_mod=mask_mod,
        seq_lengths=(G * Tq, Gk * Tk),
    )
    out_g = _flex(Qg, Kg, Vg, block_mask=mask, scale=scale).transpose(1, 2)  # [B, G*Tq, H, D]
    q_ok = (q_groups >= 0).flatten()
    out = q.new_zeros(B, N, H, D)
    out[:, qi[q_ok]] = out_g[:, q_ok]
    return out


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    B, H, N, _ = q.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b, h, q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, B, H, N, k.shape[2], device=q.device)
    return _flex(q, k, v, block_mask=block_mask, scale=scale)
