"""topk_attention, linear_attention, inline_attention: every backend equals the reference."""

import pytest
import torch

import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.kernels import reference as R

interpret = pytest.mark.interpret


def qkv(B=2, H=2, N=20, D=16, dtype=torch.float32, seed=0, Nk=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k, v = (torch.randn(B, H, Nk or N, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def rows_index(B, H, N, Nk, topk, seed=0, holes=True):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(Nk, generator=g)[:topk] for _ in range(B * H * N)]).view(B, H, N, topk).int()
    if holes:
        index[0, 0, 1] = -1  # a row with no keys
        index[-1, -1, 2, topk // 2:] = -1  # a row with fewer keys
    return index


def check_backend(backend, fn, inputs, dtype, extra=()):
    """Forward and backward of ``backend`` against the fp64 reference."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    with K.use_backend(backend):
        out = fn(*leaves, *extra)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    with K.use_backend("reference"):
        ref = fn(*ref_leaves, *extra)
    ref_grads = torch.autograd.grad(ref, ref_leaves, d_out.double())
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(out.double(), ref, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **tol)


TOPK_CASES = {"topk_5": dict(topk=5), "topk_1": dict(topk=1), "topk_all": dict(topk=20), "batch1_d24": dict(B=1, D=24, topk=7),
              "cross_nk_33": dict(Nk=33, topk=9)}


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_topk_triton_matches_reference(case, dtype):
    cfg = dict(B=2, D=16, Nk=None) | TOPK_CASES[case]
    q, k, v = qkv(B=cfg["B"], D=cfg["D"], Nk=cfg["Nk"], dtype=dtype)
    index = rows_index(cfg["B"], 2, 20, k.shape[2], cfg["topk"], holes=cfg["topk"] > 1)
    check_backend("triton", lambda a, b, c: K.topk_attention(a, b, c, index, scale=0.3), (q, k, v), dtype)


@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_topk_flex_forward(case):
    cfg = dict(B=2, D=16, Nk=None) | TOPK_CASES[case]
    q, k, v = qkv(B=cfg["B"], D=cfg["D"], Nk=cfg["Nk"])
    index = rows_index(cfg["B"], 2, 20, k.shape[2], cfg["topk"], holes=cfg["topk"] > 1)
    with K.use_backend("flex"):
        out = K.topk_attention(q, k, v, index)
    torch.testing.assert_close(out, R.topk_attention(q, k, v, index, 16**-0.5 if cfg["D"] == 16 else cfg["D"] ** -0.5), atol=2e-5, rtol=1e-4)


def test_topk_equals_masked_dense_softmax():
    """The op is Sparsifiner's masked_fill(-inf) -> softmax -> nan_to_num -> @ v, written independently."""
    q, k, v = qkv()
    mask = torch.rand(2, 2, 20, 20, generator=torch.Generator().manual_seed(1)) < 0.3
    mask[0, 0, 3] = False
    dense = ((q @ k.transpose(-1, -2)) * 0.25).masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0) @ v
    torch.testing.assert_close(K.topk_attention(q, k, v, K.mask_to_index(mask), scale=0.25), dense, atol=1e-6, rtol=1e-5)


@interpret
def test_topk_gradcheck_fp64():
    q, k, v = qkv(B=1, H=1, N=6, dtype=torch.float64)
    index = rows_index(1, 1, 6, 6, 3)
    with K.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda a, b, c: K.topk_attention(a, b, c, index), [t.requires_grad_() for t in (q, k, v)], fast_mode=True)


def l2vit_denom_min(q, k):
    """A clamp level that the denominators fall on both sides of, so both branches are tested."""
    raw = (torch.relu(q) @ torch.relu(k).sum(-2, keepdim=True).transpose(-1, -2)).flatten().sort().values
    middle = raw.numel() // 2
    return float(raw[middle - 1] + raw[middle]) / 2  # halfway between two rows: no row sits on the kink


LINEAR_CASES = {"base": dict(), "batch1_d24": dict(B=1, D=24), "long_n_multi_split": dict(N=150, H=1), "d64": dict(D=64, H=1, N=40)}


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_triton_matches_reference(case, dtype):
    q, k, v = qkv(dtype=dtype, **LINEAR_CASES[case])
    tau = (torch.rand(q.shape[1], generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype)
    c = l2vit_denom_min(q.double(), k.double())
    check_backend("triton", lambda a, b, c_, t: K.linear_attention(a, b, c_, temperature=t, denom_min=c), (q, k, v, tau), dtype)
    check_backend("triton", lambda a, b, c_: K.inline_attention(a, b, c_), (q, k, v), dtype)


def test_linear_reference_equals_quadratic_forms():
    q, k, v = qkv(N=12)
    tau, c = torch.tensor([0.7, 1.3]), 2.0
    a = torch.relu(q) @ torch.relu(k).transpose(-1, -2)
    quad = (a / a.sum(-1, keepdim=True).clamp(min=c)) @ v * tau.view(1, -1, 1, 1)
    torch.testing.assert_close(K.linear_attention(q, k, v, temperature=tau.view(2, 1, 1), denom_min=c), quad, atol=1e-5, rtol=1e-5)
    s, n = 0.3, k.shape[2]
    w = (s / n) * (q @ k.transpose(-1, -2)) - (s / n) * (q @ k.mean(-2, keepdim=True).transpose(-1, -2)) + 1 / n
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    torch.testing.assert_close(K.inline_attention(q, k, v, scale=s), w @ v, atol=1e-5, rtol=1e-5)


@interpret
def test_linear_gradcheck_fp64():
    q, k, v = qkv(B=1, H=2, N=10, dtype=torch.float64)
    tau = torch.tensor([0.6, 1.4], dtype=torch.float64, requires_grad=True)
    c = l2vit_denom_min(q, k)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with K.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda a, b, c_, t: K.linear_attention(a, b, c_, temperature=t, denom_min=c), [*leaves, tau], fast_mode=True)
        assert torch.autograd.gradcheck(lambda a, b, c_: K.inline_attention(a, b, c_), leaves, fast_mode=True)


@interpret
def test_custom_ops_pass_opcheck():
    from attnzoo.kernels import ops

    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=1, N=8))
    with K.use_backend("triton"):
        torch.library.opcheck(ops.topk_attention_fwd, (q, k, v, rows_index(1, 1, 8, 8, 3, holes=False), 0.25))
        torch.library.opcheck(ops.linear_attention_fwd, (q, k, v, torch.ones(1, requires_grad=True), 0, 0.0, 1.0))


@interpret
def test_non_contiguous_inputs():
    base = torch.randn(2, 20, 3, 2, 16)
    q, k, v = (t.transpose(1, 2) for t in base.unbind(2))  # [B, H, N, D] views of a [B, N, 3, H, D] projection
    assert not q.is_contiguous()
    index = rows_index(2, 2, 20, 20, 4, holes=False)
    for op in (lambda: K.topk_attention(q, k, v, index), lambda: K.linear_attention(q, k, v, temperature=0.5, denom_min=1.0),
               lambda: K.inline_attention(q, k, v)):
        with K.use_backend("triton"):
            got = op()
        with K.use_backend("reference"):
            want = op()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v, i: K.topk_attention(q[0], k, v, i), "must be a \\[B, H, N, D\\]"),
    (lambda q, k, v, i: K.topk_attention(q, k.half(), v, i), "dtypes differ"),
    (lambda q, k, v, i: K.topk_attention(q, k, v, i.float()), "integer"),
    (lambda q, k, v, i: K.topk_attention(q, k, v, i[:, :, :3]), "index must be"),
    (lambda q, k, v, i: K.topk_attention(q, k, v, i + 100), "outside"),
    (lambda q, k, v, i: K.topk_attention(q, k, v, torch.zeros_like(i)), "same key twice"),
    (lambda q, k, v, i: K.linear_attention(q, k, v[:, :1], temperature=1.0), "k and v must be"),
    (lambda q, k, v, i: K.linear_attention(q, k, v, temperature=torch.ones(3)), "temperature"),
    (lambda q, k, v, i: K.inline_attention(q.int(), k, v), "floating point"),
])
def test_bad_input_is_a_typed_error(call, match):
    q, k, v = qkv()
    with pytest.raises(InvalidInputError, match=match):
        call(q, k, v, rows_index(2, 2, 20, 20, 4, holes=False))


MASK_CASES = {"vit_like_n70_nk90": dict(N=70, Nk=90, D=16, density=0.2), "batch1_d24_dense": dict(B=1, N=33, Nk=33, D=24, density=0.9),
              "sparse_tiles_skipped": dict(N=80, Nk=130, D=16, density=0.05)}


def make_mask(B, N, Nk, density, seed=0):
    mask = torch.rand(B, 2, N, Nk, generator=torch.Generator().manual_seed(seed)) < density
    mask[0, 0, 5] = False  # a row with no key
    mask[-1, 1, :, Nk // 2:] = False  # whole tiles with no key
    return mask


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_masked_triton_matches_reference(case, dtype):
    cfg = dict(B=2) | MASK_CASES[case]
    q, k, v = qkv(B=cfg["B"], N=cfg["N"], Nk=cfg["Nk"], D=cfg["D"], dtype=dtype)
    mask = make_mask(cfg["B"], cfg["N"], cfg["Nk"], cfg["density"])
    check_backend("triton", lambda a, b, c: K.masked_attention(a, b, c, mask, scale=0.3), (q, k, v), dtype)
    check_backend("triton", lambda a, b, c: K.masked_attention(a, b, c, K.pack_mask(mask), scale=0.3), (q, k, v), dtype)


def test_masked_flex_and_packing():
    q, k, v = qkv(N=40, Nk=45)
    mask = make_mask(2, 40, 45, 0.3)
    packed = K.pack_mask(mask)
    assert packed.shape == (2, 2, 40, 2) and packed.dtype == torch.int32
    assert torch.equal(K.unpack_mask(packed, 45), mask)
    ref = R.masked_attention(q, k, v, mask, 0.2)
    with K.use_backend("flex"):
        torch.testing.assert_close(K.masked_attention(q, k, v, packed, scale=0.2), ref, atol=2e-5, rtol=1e-4)
    index = K.mask_to_index(mask)
    torch.testing.assert_close(K.topk_attention(q, k, v, index, scale=0.2), ref, atol=1e-6, rtol=1e-5)


@interpret
def test_masked_gradcheck_fp64():
    q, k, v = qkv(B=1, H=2, N=9, Nk=11, dtype=torch.float64)
    mask = make_mask(1, 9, 11, 0.5)
    with K.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda a, b, c: K.masked_attention(a, b, c, mask), [t.requires_grad_() for t in (q, k, v)], fast_mode=True)
        torch.library.opcheck(__import__("attnzoo.kernels.ops", fromlist=["ops"]).masked_attention_fwd, (q, k, v, K.pack_mask(mask), 0.25))


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 2, 20, 19, dtype=torch.bool), "mask must be"),
    (torch.ones(2, 2, 20, 2, dtype=torch.int32), "packed mask"),
    (torch.ones(2, 2, 20, 20), "bool, or int32"),
])
def test_masked_bad_masks(mask, match):
    q, k, v = qkv()
    with pytest.raises(InvalidInputError, match=match):
        K.masked_attention(q, k, v, mask)
