"""Grouped attention in Triton: one kernel family for region routing (BiFormer), fixed windows
(L²ViT) and strided groups (LRGT).

Token addresses come from the group tables and the routing index, so routed K/V are read
where the projection wrote them and never gathered into copies. Forward: online softmax
in fp32 (exp2, scale folded with log2 e), storing the log-sum-exp. fp32 inputs multiply in
IEEE fp32 (not TF32), so results match the oracle to rounding; fp16/bf16 use tensor cores. Backward: a dQ kernel
that repeats the forward loop, and a dK/dV kernel that owns a key tile and visits the query
groups routed to it through an inverse routing index (CSR): deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnzoo.kernels._checks import repeated_entries
from attnzoo.kernels.grouping import expand_route, inverse_routing
from attnzoo.kernels.triton.common import LOG2E, acc_dtype, interpreter_safe, softmax_finish, softmax_step, stat_dtype


@triton.jit
def _grouped_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    QG,
    KG,
    R,
    s_qb,
    s_qn,
    s_qh,
    s_kb,
    s_kn,
    s_kh,
    s_vb,
    s_vn,
    s_vh,
    s_ob,
    s_on,
    s_oh,
    s_rb,
    s_rh,
    s_rg,
    s_lb,
    s_lh,
    H,
    Tq,
    Tk,
    TOPK,
    D,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m_tiles = tl.cdiv(Tq, BLOCK_M)
    g = pid_m // m_tiles
    rows = (pid_m % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    q_tok = tl.load(QG + g * Tq + rows, mask=rows < Tq, other=-1)
    q_ok = q_tok >= 0
    q = interpreter_safe(
        tl.load(
            Q + b * s_qb + q_tok[:, None] * s_qn + h * s_qh + dcol[None, :],
            mask=q_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
    )
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    n_keys = TOPK * Tk
    for start in range(0, n_keys, BLOCK_N):
        r = start + tl.arange(0, BLOCK_N)
        r_ok = r < n_keys
        kg = tl.load(R + b * s_rb + h * s_rh + g * s_rg + r // Tk, mask=r_ok, other=0)
        k_tok = tl.load(KG + kg * Tk + r % Tk, mask=r_ok, other=-1)
        k_ok = k_tok >= 0
        kt = interpreter_safe(
            tl.load(
                K + b * s_kb + k_tok[None, :] * s_kn + h * s_kh + dcol[:, None],
                mask=k_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
        )
        vv = interpreter_safe(
            tl.load(
                V + b * s_vb + k_tok[:, None] * s_vn + h * s_vh + dcol[None, :],
                mask=k_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
        )
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_i, l_i, p, alpha = softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
    out, lse = softmax_finish(acc, m_i, l_i)
    tl.store(
        O + b * s_ob + q_tok[:, None] * s_on + h * s_oh + dcol[None, :],
        out.to(O.dtype.element_ty),
        mask=q_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b * s_lb + h * s_lh + q_tok, lse, mask=q_ok)


@triton.jit
def _grouped_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    QG,
    KG,
    R,
    s_qb,
    s_qn,
    s_qh,
    s_kb,
    s_kn,
    s_kh,
    s_vb,
    s_vn,
    s_vh,
    s_db,
    s_dn,
    s_dh,
    s_rb,
    s_rh,
    s_rg,
    s_lb,
    s_lh,
    H,
    Tq,
    Tk,
    TOPK,
    D,
    qk_scale,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m_tiles = tl.cdiv(Tq, BLOCK_M)
    g = pid_m // m_tiles
    rows = (pid_m % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    q_tok = tl.load(QG + g * Tq + rows, mask=rows < Tq, other=-1)
    q_ok = q_tok >= 0
    qd_mask = q_ok[:, None] & d_ok[None, :]
    q = interpreter_safe(
        tl.load(Q + b * s_qb + q_tok[:, None] * s_qn + h * s_qh + dcol[None, :], mask=qd_mask, other=0.0)
    )
    do = interpreter_safe(
        tl.load(DO + b * s_db + q_tok[:, None] * s_dn + h * s_dh + dcol[None, :], mask=qd_mask, other=0.0)
    )
    lse = tl.load(LSE + b * s_lb + h * s_lh + q_tok, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + b * s_lb + h * s_lh + q_tok, mask=q_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    n_keys = TOPK * Tk
    for start in range(0, n_keys, BLOCK_N):
        r = start + tl.arange(0, BLOCK_N)
        r_ok = r < n_keys
        kg = tl.load(R + b * s_rb + h * s_rh + g * s_rg + r // Tk, mask=r_ok, other=0)
        k_tok = tl.load(KG + kg * Tk + r % Tk, mask=r_ok, other=-1)
        k_ok = k_tok >= 0
        kt = interpreter_safe(
            tl.load(
                K + b * s_kb + k_tok[None, :] * s_kn + h * s_kh + dcol[:, None],
                mask=k_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
        )
        vt = interpreter_safe(
            tl.load(
                V + b * s_vb + k_tok[None, :] * s_vn + h * s_vh + dcol[:, None],
                mask=k_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
        )
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        p = tl.where(k_ok[None, :] & q_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")
    dq = dq * scale
    tl.store(DQ + b * s_qb + q_tok[:, None] * s_qn + h * s_qh + dcol[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _grouped_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    QG,
    KG,
    PTR,
    IDX,
    s_qb,
    s_qn,
    s_qh,
    s_kb,
    s_kn,
    s_kh,
    s_vb,
    s_vn,
    s_vh,
    s_db,
    s_dn,
    s_dh,
    s_pb,
    s_ph,
    s_ib,
    s_ih,
    s_lb,
    s_lh,
    s_gb,
    s_gn,
    s_gh,
    H,
    Tq,
    Tk,
    D,
    qk_scale,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PER_SLOT: tl.constexpr,
):
    """dK, dV of one key tile of one key group, into buffers of strides ``s_gb, s_gn, s_gh``. ``PER_SLOT``: written
    per table slot (``[B, Gk * Tk, H, D]``), for key groups that overlap, whose slots of one token the caller sums;
    else per token."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_tiles = tl.cdiv(Tk, BLOCK_N)
    gk = pid_n // n_tiles
    cols = (pid_n % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    k_tok = tl.load(KG + gk * Tk + cols, mask=cols < Tk, other=-1)
    k_ok = k_tok >= 0
    kd_mask = k_ok[:, None] & d_ok[None, :]
    k = interpreter_safe(
        tl.load(K + b * s_kb + k_tok[:, None] * s_kn + h * s_kh + dcol[None, :], mask=kd_mask, other=0.0)
    )
    v = interpreter_safe(
        tl.load(V + b * s_vb + k_tok[:, None] * s_vn + h * s_vh + dcol[None, :], mask=kd_mask, other=0.0)
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    lo = tl.load(PTR + b * s_pb + h * s_ph + gk)
    hi = tl.load(PTR + b * s_pb + h * s_ph + gk + 1)
    for e in range(lo, hi):
        g = tl.load(IDX + b * s_ib + h * s_ih + e)
        for m0 in range(0, Tq, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            q_tok = tl.load(QG + g * Tq + rows, mask=rows < Tq, other=-1)
            q_ok = q_tok >= 0
            qd_mask = q_ok[:, None] & d_ok[None, :]
            qt = interpreter_safe(
                tl.load(
                    Q + b * s_qb + q_tok[None, :] * s_qn + h * s_qh + dcol[:, None],
                    mask=q_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
            )
            do = interpreter_safe(
                tl.load(DO + b * s_db + q_tok[:, None] * s_dn + h * s_dh + dcol[None, :], mask=qd_mask, other=0.0)
            )
            lse = tl.load(LSE + b * s_lb + h * s_lh + q_tok, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + b * s_lb + h * s_lh + q_tok, mask=q_ok, other=0.0)
            st = tl.dot(k, qt, input_precision="ieee") * qk_scale  # [BLOCK_N, BLOCK_M]
            pt = tl.where(k_ok[:, None] & q_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision="ieee")
    dk = dk * scale
    if PER_SLOT:
        row = gk * Tk + cols
    else:
        row = k_tok
    # the gradient buffers' own strides (dK and dV share one layout): k's may differ on a dimension of size 1
    tl.store(DK + b * s_gb + row[:, None] * s_gn + h * s_gh + dcol[None, :], dk.to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + b * s_gb + row[:, None] * s_gn + h * s_gh + dcol[None, :], dv.to(DV.dtype.element_ty), mask=kd_mask)


def _sum_slots(per_slot: torch.Tensor, kv_groups: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[B, Gk * Tk, H, D]`` gradients per table slot -> ``[B, Nk, H, D]`` per token, each token's slots added in
    slot order, one rank at a time (every token at most once per step): deterministic, no atomics."""
    flat = kv_groups.flatten().long()
    slots = torch.nonzero(flat >= 0).flatten()
    tokens, order = torch.sort(flat[slots], stable=True)
    slots = slots[order]
    rank = torch.arange(len(tokens), device=tokens.device) - torch.searchsorted(tokens, tokens)
    out = per_slot.new_zeros(per_slot.shape[0], num_keys, *per_slot.shape[2:])
    for r in range(int(rank.max()) + 1 if len(rank) else 0):
        at = rank == r
        out[:, tokens[at]] += per_slot[:, slots[at]]
    return out


def _tiles(tq: int, tk: int, d: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(d))
    block_m = min(64, max(16, triton.next_power_of_2(tq)))
    block_n = min(64, max(16, triton.next_power_of_2(max(tk, 1))))
    return block_m, block_n, block_d


def _route_and_strides(
    route: torch.Tensor | None, B: int, H: int, G: int, device: torch.device
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    r = expand_route(route, B, H, G, device).to(torch.int32)
    if r.stride(-1) != 1:
        r = r.contiguous()
    return r, (r.stride(0), r.stride(1), r.stride(2))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def grouped_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, N, H, D = q.shape
    G, Tq = q_groups.shape
    Tk = kv_groups.shape[1]
    r, (s_rb, s_rh, s_rg) = _route_and_strides(route, B, H, G, q.device)
    topk = r.shape[-1]
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((B, H, N), float("-inf"), dtype=stat_dtype(q), device=q.device)
    block_m, block_n, block_d = _tiles(Tq, Tk, D)
    grid = (G * triton.cdiv(Tq, block_m), B * H)
    _grouped_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        q_groups.contiguous(),
        kv_groups.contiguous(),
        r,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        s_rb,
        s_rh,
        s_rg,
        lse.stride(0),
        lse.stride(1),
        H,
        Tq,
        Tk,
        topk,
        D,
        scale * LOG2E,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ACC=acc_dtype(q),
    )
    return out, lse


def grouped_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # contiguous inputs: the gradients are written with the same strides
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    B, N, H, D = q.shape
    G, Tq = q_groups.shape
    Gk, Tk = kv_groups.shape
    r, (s_rb, s_rh, s_rg) = _route_and_strides(route, B, H, G, q.device)
    topk = r.shape[-1]
    delta = (do.to(stat_dtype(q)) * out.to(stat_dtype(q))).sum(-1).permute(0, 2, 1).contiguous()  # [B, H, N]
    qg, kg = q_groups.contiguous(), kv_groups.contiguous()
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    # overlapping key groups (a token's gradient then has several parts) are never the query groups themselves
    same_table = (qg.data_ptr(), qg.shape, qg.stride()) == (kg.data_ptr(), kg.shape, kg.stride())
    per_slot = not same_table and bool(repeated_entries(kg.flatten()))
    if per_slot:  # kept in the accumulation dtype until the parts are added
        dk, dv = (k.new_zeros(B, Gk * Tk, H, D, dtype=stat_dtype(k)) for _ in range(2))
    else:
        dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
        dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    assert dk.stride() == dv.stride(), "dK and dV buffers share one layout"
    block_m, block_n, block_d = _tiles(Tq, Tk, D)
    _grouped_bwd_dq_kernel[(G * triton.cdiv(Tq, block_m), B * H)](
        q,
        k,
        v,
        do,
        dq,
        lse,
        delta,
        qg,
        kg,
        r,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        s_rb,
        s_rh,
        s_rg,
        lse.stride(0),
        lse.stride(1),
        H,
        Tq,
        Tk,
        topk,
        D,
        scale * LOG2E,
        scale,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ACC=acc_dtype(q),
    )
    shared = route is None or route.dim() == 3
    routing = (
        route
        if route is not None
        else torch.arange(G, device=q.device, dtype=torch.int32).view(1, G, 1).expand(B, G, 1)
    )
    routing = routing[:, None] if shared else routing
    ptr, idx = inverse_routing(routing, Gk)
    s_ph = 0 if shared else ptr.stride(1)
    s_ih = 0 if shared else idx.stride(1)
    _grouped_bwd_dkdv_kernel[(Gk * triton.cdiv(Tk, block_n), B * H)](
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        delta,
        qg,
        kg,
        ptr,
        idx,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        ptr.stride(0),
        s_ph,
        idx.stride(0),
        s_ih,
        lse.stride(0),
        lse.stride(1),
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        H,
        Tq,
        Tk,
        D,
        scale * LOG2E,
        scale,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ACC=acc_dtype(q),
        PER_SLOT=per_slot,
    )
    if per_slot:
        dk, dv = (_sum_slots(t, kg, k.shape[1]).to(k.dtype) for t in (dk, dv))
    return dq, dk, dv
