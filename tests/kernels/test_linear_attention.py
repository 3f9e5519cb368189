"""l2vit_linear_attention and inline_attention: every backend equals the oracle (their quadratic forms);
Triton natively on CUDA where a GPU is present, else under the interpreter."""

import pytest
import torch

import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.kernels import oracle as O
from tests.helpers import triton_dtypes
from tests.kernels.oracle_check import FP32_TOL, assert_matches_oracle, heads_first_qkv, tolerance

interpret = pytest.mark.interpret


def l2vit_denom_min(q, k):
    """A clamp level that the denominators fall on both sides of, so both branches are tested."""
    raw = (torch.relu(q) @ torch.relu(k).sum(-2, keepdim=True).transpose(-1, -2)).flatten().sort().values
    middle = raw.numel() // 2
    return float(raw[middle - 1] + raw[middle]) / 2  # halfway between two rows: no row sits on the kink


LINEAR_CASES = {
    "base": dict(),
    "batch1_d24": dict(B=1, D=24),
    "long_n_multi_split": dict(N=150, H=1),
    "d64": dict(D=64, H=1, N=40),
}


def check_both_ops(backend, case, dtype, device="cpu"):
    q, k, v = heads_first_qkv(dtype=dtype, device=device, **LINEAR_CASES[case])
    tau = (torch.rand(q.shape[1], generator=torch.Generator().manual_seed(3)) + 0.5).to(device, dtype)
    c = l2vit_denom_min(q.double(), k.double())
    tol = tolerance(dtype, fp16=4e-3)
    assert_matches_oracle(
        backend,
        lambda a, b, c_, t: K.l2vit_linear_attention(a, b, c_, temperature=t, denom_min=c),
        lambda a, b, c_, t: O.l2vit_linear_attention(a, b, c_, t, c),
        (q, k, v, tau),
        tol,
    )
    scale = q.shape[-1] ** -0.5
    assert_matches_oracle(
        backend,
        lambda a, b, c_: K.inline_attention(a, b, c_),
        lambda a, b, c_: O.inline_attention(a, b, c_, scale),
        (q, k, v),
        tol,
    )


@interpret
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_triton_matches_oracle(case, dtype, triton_device):
    check_both_ops("triton", case, dtype, triton_device)


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_torch_backend_matches_oracle(case):
    check_both_ops("torch", case, torch.float32)


def test_torch_backend_equals_the_quadratic_forms():
    """The default (linear) forms equal the oracle's quadratic ones; L²ViT's temperature may be its
    (H, 1, 1) parameter; InLine's weights sum to one per row."""
    q, k, v = heads_first_qkv(N=12)
    tau, c, s = torch.tensor([0.7, 1.3]), 2.0, 0.3
    torch.testing.assert_close(
        K.l2vit_linear_attention(q, k, v, temperature=tau.view(2, 1, 1), denom_min=c),
        O.l2vit_linear_attention(q, k, v, tau, c),
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(
        K.inline_attention(q, k, v, scale=s), O.inline_attention(q, k, v, s), atol=1e-5, rtol=1e-5
    )
    row_sums = O.inline_attention(q, k, torch.ones_like(v), s)
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums))


@interpret
def test_linear_gradcheck_fp64(triton_device):
    q, k, v = heads_first_qkv(B=1, H=2, N=10, dtype=torch.float64, device=triton_device)
    tau = torch.tensor([0.6, 1.4], dtype=torch.float64, device=triton_device, requires_grad=True)
    c = l2vit_denom_min(q, k)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with K.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda a, b, c_, t: K.l2vit_linear_attention(a, b, c_, temperature=t, denom_min=c),
            [*leaves, tau],
            fast_mode=True,
        )
        assert torch.autograd.gradcheck(lambda a, b, c_: K.inline_attention(a, b, c_), leaves, fast_mode=True)


@interpret
def test_custom_op_passes_opcheck(triton_device):
    from attnzoo.kernels import ops

    q, k, v = (t.requires_grad_() for t in heads_first_qkv(B=1, H=1, N=8, device=triton_device))
    tau = torch.ones(1, device=triton_device, requires_grad=True)
    with K.use_backend("triton"):
        torch.library.opcheck(ops.linear_attention_fwd, (q, k, v, tau, 0, 0.0, 1.0))


@interpret
def test_non_contiguous_inputs(triton_device):
    base = torch.randn(2, 20, 3, 2, 16).to(triton_device)
    q, k, v = (t.transpose(1, 2) for t in base.unbind(2))  # [B, H, N, D] views of a [B, N, 3, H, D] projection
    assert not q.is_contiguous()
    for op in (
        lambda: K.l2vit_linear_attention(q, k, v, temperature=0.5, denom_min=1.0),
        lambda: K.inline_attention(q, k, v),
    ):
        with K.use_backend("triton"):
            got = op()
        with K.use_backend("torch"):
            want = op()
        torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, k, v: K.l2vit_linear_attention(q, k, v[:, :1], temperature=1.0), "k and v must be"),
        (lambda q, k, v: K.l2vit_linear_attention(q, k, v, temperature=torch.ones(3)), "temperature"),
        (lambda q, k, v: K.l2vit_linear_attention(q[0], k, v, temperature=1.0), "must be a \\[B, H, N, D\\]"),
        (lambda q, k, v: K.inline_attention(q.int(), k, v), "floating point"),
        (lambda q, k, v: K.inline_attention(q, k[:, :, :0], v[:, :, :0]), "no keys"),
    ],
)
def test_bad_input_is_a_typed_error(call, match):
    q, k, v = heads_first_qkv()
    with pytest.raises(InvalidInputError, match=match):
        call(q, k, v)
