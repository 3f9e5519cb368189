"""Dense-tile attention under a packed connectivity bitmask (Sparsifiner at ViT sizes).

At N of about 200 a row's keys span only 2-4 tiles of 64, so a FlashAttention-style tile loop
with tensor-core dots, which reads the mask as bits and skips tiles with no allowed key, beats
any gather. Backward: a dQ kernel and a dK/dV kernel that owns a key tile and loops over
query tiles: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnzoo.kernels.triton.common import LOG2E, acc_dtype, interpreter_safe, softmax_finish, softmax_step, stat_dtype


@triton.jit
def _bits(M, b, h, s_mb, s_mh, s_mn, rows, cols, r_ok, c_ok):
    words = tl.load(
        M + b * s_mb + h * s_mh + rows[:, None] * s_mn + (cols // 32)[None, :],
        mask=r_ok[:, None] & c_ok[None, :],
        other=0,
    )
    return ((words >> (cols % 32)[None, :]) & 1) != 0


@triton.jit
def _masked_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    M,
    s_qb,
    s_qh,
    s_qn,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    s_ob,
    s_oh,
    s_on,
    s_mb,
    s_mh,
    s_mn,
    s_lb,
    s_lh,
    H,
    N,
    Nk,
    D,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    q = interpreter_safe(
        tl.load(
            Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :],
            mask=r_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
    )
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(0, Nk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < Nk
        allowed = _bits(M, b, h, s_mb, s_mh, s_mn, rows, cols, r_ok, c_ok)
        if tl.max(allowed.to(tl.int32)) > 0:  # tiles with no allowed key cost one mask read
            kt = interpreter_safe(
                tl.load(
                    K + b * s_kb + h * s_kh + cols[None, :] * s_kn + dcol[:, None],
                    mask=c_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
            )
            vv = interpreter_safe(
                tl.load(
                    V + b * s_vb + h * s_vh + cols[:, None] * s_vn + dcol[None, :],
                    mask=c_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
            )
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            s = tl.where(allowed, s, float("-inf"))
            m_i, l_i, p, alpha = softmax_step(m_i, l_i, s)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
    out, lse = softmax_finish(acc, m_i, l_i)
    tl.store(
        O + b * s_ob + h * s_oh + rows[:, None] * s_on + dcol[None, :],
        out.to(O.dtype.element_ty),
        mask=r_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b * s_lb + h * s_lh + rows, lse, mask=r_ok)


@triton.jit
def _masked_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    M,
    s_qb,
    s_qh,
    s_qn,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    s_mb,
    s_mh,
    s_mn,
    s_lb,
    s_lh,
    H,
    N,
    Nk,
    D,
    qk_scale,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    qd = r_ok[:, None] & d_ok[None, :]
    q = interpreter_safe(tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :], mask=qd, other=0.0))
    do = interpreter_safe(tl.load(DO + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :], mask=qd, other=0.0))
    lse = tl.load(LSE + b * s_lb + h * s_lh + rows, mask=r_ok, other=float("inf"))
    delta = tl.load(DELTA + b * s_lb + h * s_lh + rows, mask=r_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(0, Nk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < Nk
        allowed = _bits(M, b, h, s_mb, s_mh, s_mn, rows, cols, r_ok, c_ok)
        if tl.max(allowed.to(tl.int32)) > 0:
            kt = interpreter_safe(
                tl.load(
                    K + b * s_kb + h * s_kh + cols[None, :] * s_kn + dcol[:, None],
                    mask=c_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
            )
            vt = interpreter_safe(
                tl.load(
                    V + b * s_vb + h * s_vh + cols[None, :] * s_vn + dcol[:, None],
                    mask=c_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
            )
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")
    tl.store(
        DQ + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qd
    )


@triton.jit
def _masked_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    M,
    s_qb,
    s_qh,
    s_qn,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    s_mb,
    s_mh,
    s_mn,
    s_lb,
    s_lh,
    H,
    N,
    Nk,
    D,
    qk_scale,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < Nk
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    kd = c_ok[:, None] & d_ok[None, :]
    k = interpreter_safe(tl.load(K + b * s_kb + h * s_kh + cols[:, None] * s_kn + dcol[None, :], mask=kd, other=0.0))
    v = interpreter_safe(tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vn + dcol[None, :], mask=kd, other=0.0))
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        r_ok = rows < N
        allowed = _bits(M, b, h, s_mb, s_mh, s_mn, rows, cols, r_ok, c_ok)  # [BLOCK_M, BLOCK_N]
        if tl.max(allowed.to(tl.int32)) > 0:
            qt = interpreter_safe(
                tl.load(
                    Q + b * s_qb + h * s_qh + rows[None, :] * s_qn + dcol[:, None],
                    mask=r_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
            )
            do = interpreter_safe(
                tl.load(
                    DO + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :],
                    mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
            )
            lse = tl.load(LSE + b * s_lb + h * s_lh + rows, mask=r_ok, other=float("inf"))
            delta = tl.load(DELTA + b * s_lb + h * s_lh + rows, mask=r_ok, other=0.0)
            st = tl.dot(k, qt, input_precision="ieee") * qk_scale
            pt = tl.where(tl.trans(allowed), tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision="ieee")
    tl.store(
        DK + b * s_kb + h * s_kh + cols[:, None] * s_kn + dcol[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kd
    )
    tl.store(DV + b * s_vb + h * s_vh + cols[:, None] * s_vn + dcol[None, :], dv.to(DV.dtype.element_ty), mask=kd)


def _tiles(d: int, element_bytes: int = 2) -> tuple[int, int, int]:
    """64x64 tiles for 16-bit inputs; 32x32 for fp32/fp64, whose IEEE dots need more registers."""
    block_d = max(16, triton.next_power_of_2(d))
    if element_bytes > 2:
        return 32, 32, block_d
    return 64, (64 if block_d <= 64 else 32), block_d


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in (t.stride(0), t.stride(1), t.stride(2))]


def masked_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, bits = q.contiguous(), k.contiguous(), v.contiguous(), bits.contiguous()
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=stat_dtype(q), device=q.device)
    bm, bn, bd = _tiles(D, q.element_size())
    _masked_fwd_kernel[(triton.cdiv(N, bm), B * H)](
        q,
        k,
        v,
        out,
        lse,
        bits,
        *_strides(q, k, v, out, bits),
        lse.stride(0),
        lse.stride(1),
        H,
        N,
        k.shape[2],
        D,
        scale * LOG2E,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        ACC=acc_dtype(q),
    )
    return out, lse


def masked_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bits: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, bits, do = q.contiguous(), k.contiguous(), v.contiguous(), bits.contiguous(), do.contiguous()
    B, H, N, D = q.shape
    Nk = k.shape[2]
    stat = stat_dtype(q)
    delta = (do.to(stat) * out.to(stat)).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bm, bn, bd = _tiles(D, q.element_size())
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ACC=acc_dtype(q))
    _masked_bwd_dq_kernel[(triton.cdiv(N, bm), B * H)](
        q,
        k,
        v,
        do,
        dq,
        lse,
        delta,
        bits,
        *_strides(q, k, v, bits),
        lse.stride(0),
        lse.stride(1),
        H,
        N,
        Nk,
        D,
        scale * LOG2E,
        scale,
        **constexprs,
    )
    _masked_bwd_dkdv_kernel[(triton.cdiv(Nk, bn), B * H)](
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        delta,
        bits,
        *_strides(q, k, v, bits),
        lse.stride(0),
        lse.stride(1),
        H,
        N,
        Nk,
        D,
        scale * LOG2E,
        scale,
        **constexprs,
    )
    return dq, dk, dv
