"""Scalar arguments of the ops (backend names, group sizes, scales, temperatures, boost amounts): a bad value is
an InvalidInputError naming it, never a bare AttributeError, TypeError or ZeroDivisionError; good numbers of any
kind (numpy, one-element tensors) give what the Python number gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError

#: ``10**400`` is past the float range (was an OverflowError); ``np.True_`` is a flag, as ``True``.
BAD_NUMBERS = (None, "0.5", True, float("nan"), float("inf"), 1 + 2j, [0.5, 0.5, 0.5], 10**400, np.True_)


def qkv(heads_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    shape = (1, 2, 8, 4) if heads_first else (1, 8, 2, 4)
    return torch.randn(shape), torch.randn(shape), torch.randn(shape)


@pytest.mark.parametrize("name", [None, 3, ["torch"], "cuda"])
def test_use_backend_refuses_what_is_not_a_backend_name(name):
    with pytest.raises(InvalidInputError, match="unknown attention backend"):
        with K.use_backend(name):
            pass
    with K.use_backend(" Torch "):
        assert K.forced_backend() == "torch"


@pytest.mark.parametrize("make", [K.dilated_groups, K.window_groups])
def test_group_sizes_must_be_positive_integers(make):
    for args in ((4, 4, 0), (4, 4, (2, 0)), (0, 4, 2), (4, 4, None), (4, 4, 2.0), (4, 4, True), (4, 4, (2, 2, 2))):
        with pytest.raises(InvalidInputError, match="positive integer sizes"):
            make(*args)
    assert torch.equal(make(np.int64(4), 4, np.int64(2)), make(4, 4, 2))
    assert torch.equal(make(4, 4, [2, 1]), make(4, 4, (2, 1)))


def test_l2vit_temperature_and_clamp_must_be_real_numbers():
    q, k, v = qkv(heads_first=True)
    for bad in BAD_NUMBERS[:6] + (["x", 1.0],):
        with pytest.raises(InvalidInputError, match="temperature"):
            K.l2vit_linear_attention(q, k, v, temperature=bad)
    with pytest.raises(InvalidInputError, match="temperature must be real"):
        K.l2vit_linear_attention(q, k, v, temperature=torch.ones(2, dtype=torch.complex64))
    with pytest.raises(InvalidInputError, match="denom_min"):
        K.l2vit_linear_attention(q, k, v, temperature=1.0, denom_min=None)
    for not_positive in (0, 0.0, -1.0):  # a query with no positive feature would divide 0 by 0
        with pytest.raises(InvalidInputError, match="denom_min must be > 0"):
            K.l2vit_linear_attention(-q.abs(), k, v, temperature=1.0, denom_min=not_positive)
    expected = K.l2vit_linear_attention(q, k, v, temperature=torch.tensor([0.5, 2.0]))
    for same in ([0.5, 2.0], np.array([0.5, 2.0], np.float32), ((0.5,), (2.0,))):
        torch.testing.assert_close(K.l2vit_linear_attention(q, k, v, temperature=same), expected)
    scalar = K.l2vit_linear_attention(q, k, v, temperature=0.5)
    torch.testing.assert_close(K.l2vit_linear_attention(q, k, v, temperature=np.float64(0.5)), scalar)


def test_scales_must_be_finite_real_numbers():
    q, k, v = qkv(heads_first=True)
    groups = K.window_groups(2, 4, 2)
    ops = {
        "inline_attention": lambda s: K.inline_attention(q, k, v, scale=s),
        "masked_attention": lambda s: K.masked_attention(q, k, v, torch.ones(1, 2, 8, 8, dtype=torch.bool), scale=s),
        "grouped_attention": lambda s: K.grouped_attention(*qkv(heads_first=False), groups, scale=s),
        "boosted_attention": lambda s: K.boosted_attention(*qkv(heads_first=False), scale=s),
    }
    for name, op in ops.items():
        for bad in BAD_NUMBERS[1:]:  # None means the default scale
            with pytest.raises(InvalidInputError, match=f"{name}: scale must be a finite real number"):
                op(bad)
        expected = _output(op(0.3))
        for same in (np.float32(0.3), torch.tensor(0.3)):  # the same scale up to float32 rounding
            torch.testing.assert_close(_output(op(same)), expected, atol=1e-6, rtol=1e-6)


def test_head_dim_zero_is_a_typed_error():
    """D = 0 has no default scale (D ** -0.5) and nothing to attend with."""
    q, k, v = (t[..., :0] for t in qkv(heads_first=True))
    tq, tk, tv = (t[..., :0] for t in qkv(heads_first=False))
    ops = {
        "inline_attention": lambda: K.inline_attention(q, k, v),
        "l2vit_linear_attention": lambda: K.l2vit_linear_attention(q, k, v, temperature=1.0),
        "masked_attention": lambda: K.masked_attention(q, k, v, torch.ones(1, 2, 8, 8, dtype=torch.bool)),
        "grouped_attention": lambda: K.grouped_attention(tq, tk, tv, K.window_groups(2, 4, 2)),
        "boosted_attention": lambda: K.boosted_attention(tq, tk, tv),
    }
    for name, op in ops.items():
        with pytest.raises(InvalidInputError, match=f"{name}: q's head dim D must be at least 1"):
            op()


def _output(out: torch.Tensor | K.BoostedAttentionOutput) -> torch.Tensor:
    return out.out if isinstance(out, K.BoostedAttentionOutput) else out


def test_boost_amounts_must_be_finite_real_numbers():
    q, k, v = qkv(heads_first=False)
    for bad in BAD_NUMBERS + ("x",):
        with pytest.raises(InvalidInputError, match=r"boosts\[0\] amount must be a finite real number"):
            K.boosted_attention(q, k, v, [(slice(0, 2), slice(0, 2), bad)])
    expected = K.boosted_attention(q, k, v, [(slice(0, 2), slice(0, 2), 0.5)]).out
    for same in (np.float64(0.5), torch.tensor(0.5), 1 / 2):
        torch.testing.assert_close(K.boosted_attention(q, k, v, [(slice(0, 2), slice(0, 2), same)]).out, expected)
