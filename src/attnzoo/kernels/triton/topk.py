"""Per-row sparse attention (Sparsifiner) in Triton: each query row reads only its own key set.

Every row has its own keys, so there are no tensor-core tiles to share: the kernel gathers a
``[BLOCK_M, BLOCK_K, D]`` block of K/V by index and reduces with FMAs (memory-bound; at ViT
sizes a head's K/V stays in cache). Backward: dQ in the forward's loop, dK/dV scattered with
fp32 atomics (the order of additions can differ run to run in the last bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnzoo.kernels.triton.grouped import LOG2E, _acc, _softmax_finish, _softmax_step, _stat_dtype, _upcast


@triton.jit
def _topk_fwd_kernel(
    Q, K, V, O, LSE, IDX,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on, s_ib, s_ih, s_in, s_lb, s_lh,
    H, N, TOPK, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for k0 in range(0, TOPK, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(IDX + b * s_ib + h * s_ih + rows[:, None] * s_in + kk[None, :], mask=r_ok[:, None] & (kk < TOPK)[None, :], other=-1)
        ok = idx >= 0
        m3 = ok[:, :, None] & d_ok[None, None, :]
        kt = tl.load(K + b * s_kb + h * s_kh + idx[:, :, None] * s_kn + dcol[None, None, :], mask=m3, other=0.0).to(ACC)
        vv = tl.load(V + b * s_vb + h * s_vh + idx[:, :, None] * s_vn + dcol[None, None, :], mask=m3, other=0.0).to(ACC)
        s = tl.sum(q[:, None, :] * kt, 2) * qk_scale
        s = tl.where(ok, s, float("-inf"))
        m_i, l_i, p, alpha = _softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv, 1)
    out, lse = _softmax_finish(acc, m_i, l_i)
    tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_on + dcol[None, :], out.to(O.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * s_lb + h * s_lh + rows, lse, mask=r_ok)


@triton.jit
def _topk_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, DQ, DK, DV,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ib, s_ih, s_in, s_lb, s_lh,
    H, N, TOPK, D, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    qd = r_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :], mask=qd, other=0.0).to(ACC)
    do = tl.load(DO + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :], mask=qd, other=0.0).to(ACC)
    lse = tl.load(LSE + b * s_lb + h * s_lh + rows, mask=r_ok, other=float("inf"))
    delta = tl.load(DELTA + b * s_lb + h * s_lh + rows, mask=r_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for k0 in range(0, TOPK, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(IDX + b * s_ib + h * s_ih + rows[:, None] * s_in + kk[None, :], mask=r_ok[:, None] & (kk < TOPK)[None, :], other=-1)
        ok = idx >= 0
        m3 = ok[:, :, None] & d_ok[None, None, :]
        k_ptr = b * s_kb + h * s_kh + idx[:, :, None] * s_kn + dcol[None, None, :]
        kt = tl.load(K + k_ptr, mask=m3, other=0.0).to(ACC)
        vv = tl.load(V + b * s_vb + h * s_vh + idx[:, :, None] * s_vn + dcol[None, None, :], mask=m3, other=0.0).to(ACC)
        s = tl.sum(q[:, None, :] * kt, 2) * qk_scale
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.sum(do[:, None, :] * vv, 2)
        ds = p * (dp - delta[:, None])
        dq += tl.sum(ds[:, :, None] * kt, 1)
        tl.atomic_add(DV + k_ptr, p[:, :, None] * do[:, None, :], mask=m3)
        tl.atomic_add(DK + k_ptr, ds[:, :, None] * q[:, None, :] * scale, mask=m3)
    tl.store(DQ + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd)


def _tiles(topk: int, d: int) -> tuple[int, int, int]:
    """Gathered K/V blocks are BLOCK_M x BLOCK_K x BLOCK_D: keep them near 4k elements (registers)."""
    block_d = max(16, triton.next_power_of_2(d))
    block_k = 16
    block_m = max(1, min(16, 4096 // (block_k * block_d)))
    return block_m, block_k, block_d


def topk_attention_fwd(q, k, v, index, scale: float):
    q, k, v, index = q.contiguous(), k.contiguous(), v.contiguous(), index.contiguous()
    B, H, N, D = q.shape
    topk = index.shape[-1]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=_stat_dtype(q), device=q.device)
    bm, bk, bd = _tiles(topk, D)
    _topk_fwd_kernel[(triton.cdiv(N, bm), B * H)](
        q, k, v, out, lse, index,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), index.stride(0), index.stride(1), index.stride(2), lse.stride(0), lse.stride(1),
        H, N, topk, D, scale * LOG2E,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, UPCAST=_upcast(q), ACC=_acc(q),
    )
    return out, lse


def topk_attention_bwd(do, q, k, v, out, lse, index, scale: float):
    q, k, v, index, do = q.contiguous(), k.contiguous(), v.contiguous(), index.contiguous(), do.contiguous()
    B, H, N, D = q.shape
    topk = index.shape[-1]
    stat = _stat_dtype(q)
    delta = (do.to(stat) * out.to(stat)).sum(-1).contiguous()
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=stat, device=k.device)
    dv = torch.zeros(v.shape, dtype=stat, device=v.device)
    bm, bk, bd = _tiles(topk, D)
    _topk_bwd_kernel[(triton.cdiv(N, bm), B * H)](
        q, k, v, do, lse, delta, index, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        index.stride(0), index.stride(1), index.stride(2), lse.stride(0), lse.stride(1),
        H, N, topk, D, scale * LOG2E, scale,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, UPCAST=_upcast(q), ACC=_acc(q),
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)
