"""Helpers shared by the Triton kernel families: the online-softmax steps, the interpreter's
bf16 workaround and the accumulation dtypes."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# read when the kernels are defined, as triton.jit itself decides there whether to interpret them
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "") == "1")


@triton.jit
def interpreter_safe(x):
    """The interpreter computes bf16 on raw bits: there, cast each bf16 load to fp32 at once
    (compiled kernels keep bf16 operands for the tensor cores)."""
    if INTERPRETING:
        if x.dtype == tl.bfloat16:
            x = x.to(tl.float32)
    return x


@triton.jit
def softmax_step(m_i, l_i, s):
    """One online-softmax step over a block of log2-scaled scores ``s`` (rows may be all -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def softmax_finish(acc, m_i, l_i):
    """Normalised output and log2-sum-exp; rows that saw no key give 0 and -inf."""
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    return out, lse


def acc_dtype(t: torch.Tensor) -> tl.dtype:
    """fp32 accumulation, fp64 for fp64 inputs (so gradcheck sees the backward's real precision)."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def stat_dtype(t: torch.Tensor) -> torch.dtype:
    """The torch dtype of the saved statistics (log-sum-exp, states): the accumulation dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
