"""VAR's decoding step as one kernel: per (batch, head) row of one query, the attention logits, their
softmax, VAR's four row sums (image, visual sinks, moved, non-sink image), the head selection and
the edited output, in one pass over the keys. The eager path takes about 34 small torch ops per
edited layer and step for the same row; a GPU decode bound by kernel launches pays for each.

One online-softmax pass keeps three unnormalised accumulators over V (all keys, the sinks, the
non-sink image tokens) and four scalars, all rescaled together, so that at the end
``out = (acc - (1 - p) acc_sink + gain acc_rest) / l`` for a selected row and ``acc / l`` otherwise."""

from __future__ import annotations

import triton
import triton.language as tl

from attnzoo.kernels.triton.common import interpreter_safe


@triton.jit
def _redistributed_decode_kernel(
    Q,
    K,
    V,
    MASK,
    CODES,
    ROW_OK,
    EPS,
    O,
    SEL,
    s_qb,
    s_qh,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    s_mb,
    s_cb,
    s_ob,
    s_oh,
    H,
    GROUPS,
    Nk,
    P,
    D,
    scale,
    keep,
    rho,
    summ,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: a long cache of many heads passes 2**31 elements
    h = (bh % H).to(tl.int64)
    kv = h // GROUPS
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    q = interpreter_safe(tl.load(Q + b * s_qb + h * s_qh + dcol, mask=d_ok, other=0.0)).to(tl.float32)
    zero = tl.sum(tl.zeros([BLOCK_D], tl.float32), 0)
    m_i = zero - float("inf")
    l_i = zero
    s_img = zero
    s_vis = zero
    s_sink = zero
    s_rest = zero
    acc = tl.zeros([BLOCK_D], tl.float32)
    acc_sink = tl.zeros([BLOCK_D], tl.float32)
    acc_rest = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < Nk
        kk = interpreter_safe(
            tl.load(
                K + b * s_kb + kv * s_kh + cols[:, None] * s_kn + dcol[None, :],
                mask=c_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
        ).to(tl.float32)
        s = tl.sum(kk * q[None, :], 1) * scale
        if HAS_MASK:
            s += interpreter_safe(tl.load(MASK + b * s_mb + cols, mask=c_ok, other=0.0)).to(tl.float32)
        s = tl.where(c_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe)
        alpha = tl.exp(m_i - m_safe)
        code = tl.load(CODES + b * s_cb + cols, mask=cols < P, other=0)
        image = (code & 1) != 0
        sink = (code & 2) != 0
        p_img = tl.where(image, p, 0.0)
        p_sink = tl.where(sink, p, 0.0)
        p_rest = tl.where(image & ~sink, p, 0.0)
        vv = interpreter_safe(
            tl.load(
                V + b * s_vb + kv * s_vh + cols[:, None] * s_vn + dcol[None, :],
                mask=c_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
        ).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        s_img = s_img * alpha + tl.sum(p_img, 0)
        s_vis = s_vis * alpha + tl.sum(tl.where(sink, p_img, 0.0), 0)
        s_sink = s_sink * alpha + tl.sum(p_sink, 0)
        s_rest = s_rest * alpha + tl.sum(p_rest, 0)
        acc = acc * alpha + tl.sum(p[:, None] * vv, 0)
        acc_sink = acc_sink * alpha + tl.sum(p_sink[:, None] * vv, 0)
        acc_rest = acc_rest * alpha + tl.sum(p_rest[:, None] * vv, 0)
        m_i = m_new
    norm = tl.where(l_i > 0, l_i, 1.0)
    image_share = s_img / norm
    visual = s_vis / norm
    moved = (1.0 - keep) * s_sink / norm
    rest = s_rest / norm
    gain = tl.where(rest > 0, moved / tl.where(rest > 0, rest, 1.0), float("inf"))  # no mass to move it to: inf
    eps = tl.load(EPS + b)
    row_ok = tl.load(ROW_OK + b) != 0
    selected = (visual / (image_share + eps) <= rho) & (image_share >= summ) & (gain < float("inf")) & row_ok
    edited = acc - (1.0 - keep) * acc_sink + tl.where(selected, gain, 0.0) * acc_rest
    out = tl.where(selected, edited, acc) / norm
    tl.store(O + b * s_ob + h * s_oh + dcol, out.to(O.dtype.element_ty), mask=d_ok)
    tl.store(SEL + bh, selected.to(tl.int8))
