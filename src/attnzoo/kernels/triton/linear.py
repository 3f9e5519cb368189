"""Non-causal linear attention in Triton, two phases: a per-head state reduction in fp32, then a
per-token apply. Two forms share the kernels (``MODE``):

- ``L2VIT`` (0): ``o = relu(q) (relu(k)^T v) tau / max(relu(q) . sum relu(k), c)``;
- ``INLINE`` (1): ``o = (s/n) q (k^T v) + (1 - (s/n) q . sum k) mean(v)``.

The reductions are split over the token axis into partial buffers summed in a fixed order,
so results are deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnzoo.kernels.triton.common import acc_dtype, stat_dtype

L2VIT, INLINE = 0, 1


@triton.jit
def _state_kernel(
    K,
    V,
    S,
    Z,
    VS,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    H,
    N,
    D,
    chunk,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    b = bh // H
    h = bh % H
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    state = tl.zeros([BLOCK_D, BLOCK_D], ACC)
    z = tl.zeros([BLOCK_D], ACC)
    vs = tl.zeros([BLOCK_D], ACC)
    lo = split * chunk
    for n0 in range(lo, tl.minimum(lo + chunk, N), BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        m = (rows < tl.minimum(lo + chunk, N))[:, None] & d_ok[None, :]
        k = tl.load(K + b * s_kb + h * s_kh + rows[:, None] * s_kn + dcol[None, :], mask=m, other=0.0).to(ACC)
        v = tl.load(V + b * s_vb + h * s_vh + rows[:, None] * s_vn + dcol[None, :], mask=m, other=0.0).to(ACC)
        if MODE == 0:
            k = tl.maximum(k, 0.0)
        state += tl.dot(tl.trans(k), v, input_precision="ieee")
        z += tl.sum(k, 0)
        vs += tl.sum(v, 0)
    base = split * n_bh + bh
    tl.store(S + base * BLOCK_D * BLOCK_D + dcol[:, None] * BLOCK_D + dcol[None, :], state)
    tl.store(Z + base * BLOCK_D + dcol, z)
    tl.store(VS + base * BLOCK_D + dcol, vs)


@triton.jit
def _apply_kernel(
    Q,
    O,
    S,
    Z,
    VS,
    TAU,
    s_qb,
    s_qh,
    s_qn,
    s_ob,
    s_oh,
    s_on,
    H,
    N,
    D,
    c,
    denom_min,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    m = (rows < N)[:, None] & (dcol < D)[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :], mask=m, other=0.0).to(ACC)
    state = tl.load(S + bh * BLOCK_D * BLOCK_D + dcol[:, None] * BLOCK_D + dcol[None, :])
    z = tl.load(Z + bh * BLOCK_D + dcol)
    if MODE == 0:
        a = tl.maximum(q, 0.0)
        tau = tl.load(TAU + h).to(ACC)
        den = tl.maximum(tl.sum(a * z[None, :], 1), denom_min)
        out = tl.dot(a, state, input_precision="ieee") * tau / den[:, None]
    else:
        vbar = tl.load(VS + bh * BLOCK_D + dcol) / N
        out = (
            tl.dot(q, state, input_precision="ieee") * c
            + (1.0 - c * tl.sum(q * z[None, :], 1))[:, None] * vbar[None, :]
        )
    tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_on + dcol[None, :], out.to(O.dtype.element_ty), mask=m)


@triton.jit
def _bwd_query_kernel(
    Q,
    DO,
    DQ,
    S,
    Z,
    VS,
    TAU,
    DS,
    DZ,
    DX,
    DTAU,
    s_qb,
    s_qh,
    s_qn,
    H,
    N,
    D,
    c,
    denom_min,
    chunk,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """dQ per token, plus partial sums of the state gradients over this split's tokens."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    b = bh // H
    h = bh % H
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    state = tl.load(S + bh * BLOCK_D * BLOCK_D + dcol[:, None] * BLOCK_D + dcol[None, :])
    z = tl.load(Z + bh * BLOCK_D + dcol)
    vbar = tl.load(VS + bh * BLOCK_D + dcol) / N
    tau = tl.load(TAU + h).to(ACC)
    d_state = tl.zeros([BLOCK_D, BLOCK_D], ACC)
    d_z = tl.zeros([BLOCK_D], ACC)
    d_x = tl.zeros([BLOCK_D], ACC)  # L2ViT: unused; InLine: gradient of mean(v)
    d_tau = tl.zeros([BLOCK_D], ACC)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_M):
        rows = n0 + tl.arange(0, BLOCK_M)
        r_ok = rows < hi
        m = r_ok[:, None] & d_ok[None, :]
        offs = b * s_qb + h * s_qh + rows[:, None] * s_qn + dcol[None, :]
        q = tl.load(Q + offs, mask=m, other=0.0).to(ACC)
        do = tl.load(DO + offs, mask=m, other=0.0).to(ACC)
        if MODE == 0:
            a = tl.maximum(q, 0.0)
            raw = tl.sum(a * z[None, :], 1)
            den = tl.maximum(raw, denom_min)
            num = tl.dot(a, state, input_precision="ieee") * tau
            d_num = do / den[:, None]
            d_den = tl.where((raw >= denom_min) & r_ok, -tl.sum(do * num, 1) / (den * den), 0.0)
            d_a = tl.dot(d_num, tl.trans(state), input_precision="ieee") * tau + d_den[:, None] * z[None, :]
            dq = tl.where(q > 0, d_a, 0.0)
            d_state += tl.dot(tl.trans(a), d_num, input_precision="ieee") * tau
            d_z += tl.sum(d_den[:, None] * a, 0)
            d_tau += tl.sum(d_num * tl.dot(a, state, input_precision="ieee"), 0)
        else:
            w = tl.sum(do * vbar[None, :], 1)
            dq = (tl.dot(do, tl.trans(state), input_precision="ieee") - w[:, None] * z[None, :]) * c
            d_state += tl.dot(tl.trans(q), do, input_precision="ieee") * c
            d_z += -c * tl.sum(w[:, None] * q, 0)
            d_x += tl.sum(tl.where(r_ok[:, None], (1.0 - c * tl.sum(q * z[None, :], 1))[:, None] * do, 0.0), 0)
        tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=m)
    base = split * n_bh + bh
    tl.store(DS + base * BLOCK_D * BLOCK_D + dcol[:, None] * BLOCK_D + dcol[None, :], d_state)
    tl.store(DZ + base * BLOCK_D + dcol, d_z)
    tl.store(DX + base * BLOCK_D + dcol, d_x)
    tl.store(DTAU + base * BLOCK_D + dcol, d_tau)


@triton.jit
def _bwd_key_kernel(
    K,
    V,
    DK,
    DV,
    DS,
    DZ,
    DX,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    H,
    N,
    D,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    m = (rows < N)[:, None] & (dcol < D)[None, :]
    k_offs = b * s_kb + h * s_kh + rows[:, None] * s_kn + dcol[None, :]
    v_offs = b * s_vb + h * s_vh + rows[:, None] * s_vn + dcol[None, :]
    k = tl.load(K + k_offs, mask=m, other=0.0).to(ACC)
    v = tl.load(V + v_offs, mask=m, other=0.0).to(ACC)
    d_state = tl.load(DS + bh * BLOCK_D * BLOCK_D + dcol[:, None] * BLOCK_D + dcol[None, :])
    d_z = tl.load(DZ + bh * BLOCK_D + dcol)
    dk = tl.dot(v, tl.trans(d_state), input_precision="ieee") + d_z[None, :]
    if MODE == 0:
        dk = tl.where(k > 0, dk, 0.0)
        dv = tl.dot(tl.maximum(k, 0.0), d_state, input_precision="ieee")
    else:
        dv = tl.dot(k, d_state, input_precision="ieee") + (tl.load(DX + bh * BLOCK_D + dcol) / N)[None, :]
    tl.store(DK + k_offs, dk.to(DK.dtype.element_ty), mask=m)
    tl.store(DV + v_offs, dv.to(DV.dtype.element_ty), mask=m)


def _config(q: torch.Tensor) -> tuple[int, int, int, int]:
    B, H, N, D = q.shape
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 32 if block_d > 64 else 64
    # split the token axis so that small B*H still fills the GPU; partials are summed in order
    splits = (
        max(1, min(triton.cdiv(N, block_n), triton.cdiv(264, B * H)))
        if q.is_cuda
        else max(1, min(2, triton.cdiv(N, block_n)))
    )
    chunk = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    return block_n, block_d, triton.cdiv(N, chunk), chunk


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.contiguous(), k.contiguous(), v.contiguous()


def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau: torch.Tensor, mode: int, c: float, denom_min: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``out`` and the reduced state ``(S, z, vsum)`` saved for backward."""
    q, k, v = _prepare(q, k, v)
    B, H, N, D = q.shape
    block_n, block_d, splits, chunk = _config(q)
    stat, acc = stat_dtype(q), acc_dtype(q)
    S = torch.empty(splits, B * H, block_d, block_d, dtype=stat, device=q.device)
    Z = torch.empty(splits, B * H, block_d, dtype=stat, device=q.device)
    VS = torch.empty_like(Z)
    _state_kernel[(splits, B * H)](
        k,
        v,
        S,
        Z,
        VS,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        H,
        N,
        D,
        chunk,
        MODE=mode,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        ACC=acc,
    )
    S, Z, VS = S.sum(0), Z.sum(0), VS.sum(0)
    out = torch.empty_like(q)
    _apply_kernel[(triton.cdiv(N, block_n), B * H)](
        q,
        out,
        S,
        Z,
        VS,
        tau,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        H,
        N,
        D,
        c,
        denom_min,
        MODE=mode,
        BLOCK_M=block_n,
        BLOCK_D=block_d,
        ACC=acc,
    )
    return out, S, Z, VS


def linear_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: torch.Tensor,
    S: torch.Tensor,
    Z: torch.Tensor,
    VS: torch.Tensor,
    mode: int,
    c: float,
    denom_min: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _prepare(q, k, v)
    do = do.contiguous()
    B, H, N, D = q.shape
    block_n, block_d, splits, chunk = _config(q)
    stat, acc = stat_dtype(q), acc_dtype(q)
    dq = torch.empty_like(q)
    DS = torch.empty(splits, B * H, block_d, block_d, dtype=stat, device=q.device)
    DZ = torch.empty(splits, B * H, block_d, dtype=stat, device=q.device)
    DX, DT = torch.empty_like(DZ), torch.empty_like(DZ)
    _bwd_query_kernel[(splits, B * H)](
        q,
        do,
        dq,
        S,
        Z,
        VS,
        tau,
        DS,
        DZ,
        DX,
        DT,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        H,
        N,
        D,
        c,
        denom_min,
        chunk,
        MODE=mode,
        BLOCK_M=block_n,
        BLOCK_D=block_d,
        ACC=acc,
    )
    DS, DZ, DX = DS.sum(0), DZ.sum(0), DX.sum(0)
    d_tau = DT.sum(0).sum(-1).view(B, H).sum(0)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _bwd_key_kernel[(triton.cdiv(N, block_n), B * H)](
        k,
        v,
        dk,
        dv,
        DS,
        DZ,
        DX,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        H,
        N,
        D,
        MODE=mode,
        BLOCK_M=block_n,
        BLOCK_D=block_d,
        ACC=acc,
    )
    return dq, dk, dv, d_tau
