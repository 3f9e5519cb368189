"""The ``torch`` backend: plain PyTorch, the CPU default, in whichever exact formulation of each
op is fastest for the call. The semantics are defined by :mod:`attnzoo.kernels.oracle`."""

from __future__ import annotations

import torch

from attnzoo.kernels._checks import repeated_entries
from attnzoo.kernels.grouping import expand_route

DENSE_MIN_DENSITY = 0.25  # share of all keys each query sees, above which dense masked SDPA wins
DENSE_MAX_SCORES = 1 << 21  # N * Nk above which the token mask itself gets too large
DENSE_MIN_TOPK = 4  # with few routed groups (windows: 1) gathering is cheaper than 4x the dense work


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The cheaper exact formulation: on the CPU, dense fused SDPA under a token mask when the routed
    keys are a large share of few tokens (the CPU SDPA kernel returns 0 for fully masked rows; GPU
    SDPA backends may not) and no key token sits in two key groups (a mask cannot count a key twice),
    else gathering the routed groups (with flat index_selects when the query groups partition the
    tokens and nothing is padded). Empty inputs (no query, head or key) take the dense form, which
    handles every empty shape."""
    if q.numel() == 0 or k.shape[1] == 0:
        return grouped_attention_dense(q, k, v, q_groups, kv_groups, route, scale)
    topk = 1 if route is None else route.shape[-1]
    density = topk * kv_groups.shape[1] / max(k.shape[1], 1)
    many_small_groups = topk >= DENSE_MIN_TOPK  # gathering many routed groups is what costs on the CPU
    if (
        not q.is_cuda
        and many_small_groups
        and density >= DENSE_MIN_DENSITY
        and q.shape[1] * k.shape[1] <= DENSE_MAX_SCORES
        and (kv_groups is q_groups or not bool(repeated_entries(kv_groups.flatten())))  # query groups never overlap
    ):
        return grouped_attention_dense(q, k, v, q_groups, kv_groups, route, scale)
    if _partitions(q_groups, q.shape[1]) and not bool((kv_groups < 0).any()):
        return grouped_attention_partition(q, k, v, q_groups, kv_groups, route, scale)
    return grouped_attention_gather(q, k, v, q_groups, kv_groups, route, scale)


def _partitions(groups: torch.Tensor, num_tokens: int) -> bool:
    """Every token in exactly one group, no padding."""
    if groups.numel() != num_tokens or bool((groups < 0).any()):
        return False
    return bool((torch.bincount(groups.reshape(-1).long(), minlength=num_tokens) == 1).all())


def grouped_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Gather the routed K/V groups, like the official BiFormer code: the general formulation
    (padding slots, tokens in no group)."""
    B, N, H, D = q.shape
    G, Tq = q_groups.shape
    route = expand_route(route, B, H, G, q.device).long()
    qi, ki = q_groups.clamp(min=0).long(), kv_groups.clamp(min=0).long()
    Q = (q * scale)[:, qi].permute(0, 3, 1, 2, 4)  # [B, H, G, Tq, D], scaled first as the official code does
    K = k[:, ki].permute(0, 3, 1, 2, 4)  # [B, H, Gk, Tk, D]
    V = v[:, ki].permute(0, 3, 1, 2, 4)
    b = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    h = torch.arange(H, device=q.device).view(1, H, 1, 1)
    Kr = K[b, h, route].flatten(3, 4)  # [B, H, G, topk*Tk, D]
    Vr = V[b, h, route].flatten(3, 4)
    scores = Q @ Kr.transpose(-1, -2)
    if bool((kv_groups < 0).any()):  # padding slots: mask them; a query may then have no key at all
        key_ok = (kv_groups >= 0)[route].flatten(3, 4)  # [B, H, G, topk*Tk]
        scores = scores.masked_fill(~key_ok[:, :, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no valid key outputs 0
    else:
        probs = torch.softmax(scores, dim=-1)
    out_groups = (probs @ Vr).permute(0, 2, 3, 1, 4)  # [B, G, Tq, H, D]
    q_ok = q_groups >= 0
    out = q.new_zeros(B, N, H, D)
    out[:, q_groups[q_ok].long()] = out_groups[:, q_ok]
    return out


def grouped_attention_partition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The gather formulation for tables without padding whose query groups partition the
    tokens (BiFormer at sizes its regions divide), with the routed groups fetched by one flat
    ``index_select`` (shared by the heads when the route is) and a permutation back to token
    order instead of a scatter. On the CPU, for small groups, plain matmuls beat fused SDPA."""
    B, N, H, D = q.shape
    G, Tq = q_groups.shape
    Gk, Tk = kv_groups.shape
    qi = q_groups.reshape(-1).long()
    Q = (
        (q * scale)[:, qi].view(B, G, Tq, H, D).permute(0, 3, 1, 2, 4)
    )  # [B, H, G, Tq, D], scaled first as the official code
    route = expand_route(route, B, H, G, q.device).long()
    topk = route.shape[-1]
    if route.stride(1) == 0:  # shared by the heads: fetch whole [Tk, H, D] groups once
        flat = (route[:, 0] + torch.arange(B, device=q.device).view(B, 1, 1) * Gk).reshape(-1)
        Kr, Vr = (
            t[:, kv_groups.long()]
            .view(B * Gk, Tk, H, D)
            .index_select(0, flat)
            .view(B, G, topk * Tk, H, D)
            .permute(0, 3, 1, 2, 4)
            for t in (k, v)
        )  # [B, H, G, topk*Tk, D]
    else:
        flat = (route + torch.arange(B * H, device=q.device).view(B, H, 1, 1) * Gk).reshape(-1)
        Kr, Vr = (
            t[:, kv_groups.long()]
            .permute(0, 3, 1, 2, 4)
            .reshape(B * H * Gk, Tk, D)
            .index_select(0, flat)
            .view(B, H, G, topk * Tk, D)
            for t in (k, v)
        )
    out = torch.softmax(Q @ Kr.transpose(-1, -2), dim=-1) @ Vr  # [B, H, G, Tq, D]
    inverse = torch.empty_like(qi)
    inverse[qi] = torch.arange(N, device=q.device)
    return out.permute(0, 2, 3, 1, 4).reshape(B, N, H, D).index_select(1, inverse)


def grouped_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The same op as dense attention under a token-level mask (fused SDPA on the CPU).

    Exact when no key token sits in two key groups (each key then has one group), and much faster than gathering when the routed keys are a large share of all keys
    and the token count is small (BiFormer's third stage: 16 of 49 regions at N = 196).
    """
    B, N, H, D = q.shape
    G, Tq = q_groups.shape
    Gk, Tk = kv_groups.shape
    Nk = k.shape[1]
    route = expand_route(route, B, H, G, q.device).long()
    heads_r = 1 if route.stride(1) == 0 else H
    allowed = torch.zeros(B, heads_r, G + 1, Gk + 1, dtype=torch.bool, device=q.device)
    allowed[:, :, :G].scatter_(-1, route[:, :heads_r], True)
    group_of_q = torch.full((N,), G, dtype=torch.long, device=q.device)
    group_of_q[q_groups[q_groups >= 0].long()] = (
        torch.arange(G, device=q.device).view(G, 1).expand(G, Tq)[q_groups >= 0]
    )
    group_of_k = torch.full((Nk,), Gk, dtype=torch.long, device=q.device)
    group_of_k[kv_groups[kv_groups >= 0].long()] = (
        torch.arange(Gk, device=q.device).view(Gk, 1).expand(Gk, Tk)[kv_groups >= 0]
    )
    mask = allowed.index_select(2, group_of_q).index_select(3, group_of_k)  # [B, Hr, N, Nk]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    ).transpose(1, 2)
    if bool((kv_groups < 0).any()) or Tk == 0 or int((q_groups >= 0).sum()) != N:  # rows with no key: output 0
        has_key = mask.any(-1).transpose(1, 2)[..., None]  # [B, N, Hr, 1]
        out = torch.where(has_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.contiguous()


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """On the CPU, fused SDPA under the boolean mask (exact, about 2.5x the explicit softmax at
    DeiT sizes; the CPU kernel returns 0 for a row with no key). Elsewhere Sparsifiner's explicit
    ``masked_fill(-inf) -> softmax -> nan_to_num``, since GPU SDPA backends may return NaN for such rows."""
    if not q.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    logits = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0) @ v


def l2vit_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor | float, denom_min: float
) -> torch.Tensor:
    """L²ViT's enhanced linear attention in its linear form: ``relu(q) (relu(k)^T v) tau / max(relu(q) . sum relu(k), c)``."""
    fq, fk = torch.relu(q), torch.relu(k)
    tau = torch.as_tensor(temperature, dtype=q.dtype, device=q.device).reshape(-1, 1, 1)
    state = fk.transpose(-1, -2) @ v  # [B, H, D, D]
    denom = (fq @ fk.sum(-2, keepdim=True).transpose(-1, -2)).clamp(min=denom_min)  # [B, H, N, 1]
    return (fq @ (state * tau)) / denom


def inline_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """InLine attention in its linear form: ``o_i = q_i (K^T V) s/n + (1 - s q_i.kbar) vbar``."""
    n = k.shape[-2]
    state = k.transpose(-1, -2) @ v * (scale / n)  # [B, H, D, D]
    k_mean = k.mean(-2, keepdim=True)  # [B, H, 1, D]
    v_mean = v.mean(-2, keepdim=True)
    return q @ state + (1 - scale * (q * k_mean).sum(-1, keepdim=True)) * v_mean
