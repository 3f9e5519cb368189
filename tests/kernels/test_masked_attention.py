"""masked_attention (Sparsifiner's per-row key sets): every backend equals the oracle (Triton natively
on CUDA where a GPU is present, else under the interpreter)."""

import pytest
import torch

import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.kernels import oracle as O
from tests.helpers import triton_dtypes
from tests.kernels.oracle_check import (
    FP32_TOL,
    assert_flex_matches_oracle,
    assert_matches_oracle,
    backend_device,
    heads_first_qkv,
    tolerance,
)

interpret = pytest.mark.interpret

MASK_CASES = {
    "vit_like_n70_nk90": dict(N=70, Nk=90, D=16, density=0.2),
    "batch1_d24_dense": dict(B=1, N=33, Nk=33, D=24, density=0.9),
    "sparse_tiles_skipped": dict(N=80, Nk=130, D=16, density=0.05),
}


def make_mask(B, N, Nk, density, seed=0):
    mask = torch.rand(B, 2, N, Nk, generator=torch.Generator().manual_seed(seed)) < density
    mask[0, 0, 5] = False  # a row with no key
    mask[-1, 1, :, Nk // 2 :] = False  # whole tiles with no key
    return mask


def make_case(case, dtype=torch.float32, device="cpu"):
    cfg = dict(B=2) | MASK_CASES[case]
    q, k, v = heads_first_qkv(B=cfg["B"], N=cfg["N"], Nk=cfg["Nk"], D=cfg["D"], dtype=dtype, device=device)
    return q, k, v, make_mask(cfg["B"], cfg["N"], cfg["Nk"], cfg["density"]).to(device)


def check_backend(backend, case, dtype, packed, device="cpu"):
    q, k, v, mask = make_case(case, dtype, device)
    given = K.pack_mask(mask) if packed else mask
    assert_matches_oracle(
        backend,
        lambda a, b, c: K.masked_attention(a, b, c, given, scale=0.3),
        lambda a, b, c: O.masked_attention(a, b, c, mask, 0.3),
        (q, k, v),
        tolerance(dtype, fp16=4e-3),
    )


@interpret
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_masked_triton_matches_oracle(case, dtype, triton_device):
    check_backend("triton", case, dtype, packed=False, device=triton_device)
    check_backend("triton", case, dtype, packed=True, device=triton_device)


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_masked_torch_backend_matches_oracle(case):
    check_backend("torch", case, torch.float32, packed=False)


def test_masked_equals_sparsifiner_dense_softmax():
    """The op is Sparsifiner's masked_fill(-inf) -> softmax -> nan_to_num -> @ v, written independently."""
    q, k, v = heads_first_qkv()
    mask = torch.rand(2, 2, 20, 20, generator=torch.Generator().manual_seed(1)) < 0.3
    mask[0, 0, 3] = False
    dense = ((q @ k.transpose(-1, -2)) * 0.25).masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0) @ v
    torch.testing.assert_close(O.masked_attention(q, k, v, mask, 0.25), dense, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(K.masked_attention(q, k, v, mask, scale=0.25), dense, atol=1e-6, rtol=1e-5)


def test_masked_flex_and_packing(kernel_device):
    """Flex compiled, forward and backward, on CUDA; eager and forward only on the CPU."""
    q, k, v = heads_first_qkv(N=40, Nk=45, device=kernel_device)
    mask = make_mask(2, 40, 45, 0.3).to(kernel_device)
    packed = K.pack_mask(mask)
    assert packed.shape == (2, 2, 40, 2) and packed.dtype == torch.int32
    assert torch.equal(K.unpack_mask(packed, 45), mask)
    assert_flex_matches_oracle(
        lambda a, b, c: K.masked_attention(a, b, c, packed, scale=0.2),
        lambda a, b, c: O.masked_attention(a, b, c, mask, 0.2),
        (q, k, v),
        FP32_TOL,
    )


@interpret
def test_masked_gradcheck_fp64(triton_device):
    q, k, v = heads_first_qkv(B=1, H=2, N=9, Nk=11, dtype=torch.float64, device=triton_device)
    mask = make_mask(1, 9, 11, 0.5).to(triton_device)
    with K.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: K.masked_attention(a, b, c, mask), [t.requires_grad_() for t in (q, k, v)], fast_mode=True
        )
        torch.library.opcheck(
            __import__("attnzoo.kernels.ops", fromlist=["ops"]).masked_attention_fwd, (q, k, v, K.pack_mask(mask), 0.25)
        )


@interpret
def test_masked_reads_non_contiguous_views(triton_device):
    base = torch.randn(2, 20, 3, 2, 16).to(triton_device)
    q, k, v = (t.transpose(1, 2) for t in base.unbind(2))  # [B, H, N, D] views of a [B, N, 3, H, D] projection
    assert not q.is_contiguous()
    mask = make_mask(2, 20, 20, 0.4).to(triton_device)
    with K.use_backend("triton"):
        got = K.masked_attention(q, k, v, mask)
    torch.testing.assert_close(got, O.masked_attention(q, k, v, mask, 16**-0.5), **FP32_TOL)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 2, 20, 19, dtype=torch.bool), "mask must be"),
        (torch.ones(2, 2, 20, 2, dtype=torch.int32), "packed mask"),
        (torch.ones(2, 2, 20, 20), "bool, or int32"),
    ],
)
def test_masked_bad_masks(mask, match):
    q, k, v = heads_first_qkv()
    with pytest.raises(InvalidInputError, match=match):
        K.masked_attention(q, k, v, mask)


def test_pack_mask_takes_only_bits():
    mask = make_mask(1, 8, 40, 0.5)
    for same in (mask.float(), mask.to(torch.uint8), mask.long()):  # 0/1 numbers are bits too
        assert torch.equal(K.pack_mask(same), K.pack_mask(mask))
    for bad in (mask.float() * 0.7, mask.long() * 2, mask.long() - 1):  # would be truncated or wrapped
        with pytest.raises(InvalidInputError, match="must hold only 0 and 1"):
            K.pack_mask(bad)
    for bad in (torch.tensor(True), None, torch.ones(2, 3, dtype=torch.complex64)):
        with pytest.raises(InvalidInputError, match="mask must be a real"):
            K.pack_mask(bad)


def test_unpack_mask_needs_one_word_per_32_keys():
    packed = K.pack_mask(make_mask(1, 8, 40, 0.5))  # 2 words
    for num_keys in (65, 70, 20, 0):  # too few words (40 keys would silently come back as 32), or too many
        with pytest.raises(InvalidInputError, match="int32 bits"):
            K.unpack_mask(packed, num_keys)
    for bad in (-1, 40.0, None):
        with pytest.raises(InvalidInputError, match="num_keys must be an integer >= 0"):
            K.unpack_mask(packed, bad)
    with pytest.raises(InvalidInputError, match="int32 bits"):
        K.unpack_mask(packed.long(), 40)
    assert K.unpack_mask(packed, 33).shape == (1, 2, 8, 33)


@interpret
@pytest.mark.parametrize("backend", ["torch", "flex", "triton"])
def test_masked_empty_inputs_give_the_empty_or_all_zero_output_on_every_backend(backend, request):
    device = backend_device(request, backend)
    for B, H, N, Nk in ((0, 2, 5, 5), (1, 0, 5, 5), (1, 2, 0, 0), (1, 2, 0, 5), (1, 2, 5, 0)):
        q, k, v = (torch.randn(B, H, n, 4, device=device) for n in (N, Nk, Nk))
        mask = torch.ones(B, H, N, Nk, dtype=torch.bool, device=device)
        with K.use_backend(backend):
            out = K.masked_attention(q, k, v, mask)
            packed = K.masked_attention(q, k, v, K.pack_mask(mask))
        assert out.shape == q.shape and not out.any() and torch.equal(packed, out), (B, H, N, Nk)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, k, v, m: K.masked_attention(q[0], k, v, m), "must be a \\[B, H, N, D\\]"),
        (lambda q, k, v, m: K.masked_attention(q, k.half(), v, m), "dtypes differ"),
        (lambda q, k, v, m: K.masked_attention(q, k, v[:, :1], m), "k and v must be"),
    ],
)
def test_masked_bad_qkv_is_a_typed_error(call, match):
    q, k, v = heads_first_qkv()
    with pytest.raises(InvalidInputError, match=match):
        call(q, k, v, torch.ones(2, 2, 20, 20, dtype=torch.bool))
