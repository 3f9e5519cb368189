"""On a CUDA device: the Triton backends in bf16 and fp16 against the fp64 oracle, and
deterministic backward where the kernels promise it. Skipped without CUDA (the `gpu` marker)."""

import pytest
import torch

import attnzoo.kernels as K
from attnzoo.kernels import oracle as O

pytestmark = pytest.mark.gpu
TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def run(fn, inputs, backend=None):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if backend is None:
        out = fn(*leaves)
    else:
        with K.use_backend(backend):
            out = fn(*leaves)
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    return out, grads


def compare(fn, oracle, inputs, dtype):
    out, grads = run(fn, [t.to(dtype) for t in inputs], "triton")
    ref, ref_grads = run(oracle, [t.double() for t in inputs])
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    for got, want in zip(grads, ref_grads, strict=True):
        scale = want.abs().max().clamp(min=1)
        torch.testing.assert_close(got.double() / scale, want / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_ops_on_gpu(dtype):
    torch.manual_seed(0)
    dev = "cuda"
    B, side, H, D = 2, 28, 4, 32
    q, k, v = (torch.randn(B, side * side, H, D, device=dev) for _ in range(3))
    groups = K.window_groups(side, side, 4, device=dev)
    route = K.region_routing(q.reshape(B, -1, H * D), k.reshape(B, -1, H * D), groups, 4, (H * D) ** -0.5)
    scale = D**-0.5
    compare(
        lambda a, b, c: K.grouped_attention(a, b, c, groups, route=route),
        lambda a, b, c: O.grouped_attention(a, b, c, groups, groups, route, scale),
        (q, k, v),
        dtype,
    )
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    mask = torch.rand(B, H, 197, 197, device=dev) < 0.25
    compare(
        lambda a, b, c: K.masked_attention(a, b, c, mask),
        lambda a, b, c: O.masked_attention(a, b, c, mask, scale),
        (qh[:, :, :197], kh[:, :, :197], vh[:, :, :197]),
        dtype,
    )
    compare(
        lambda a, b, c: K.l2vit_linear_attention(a, b, c, temperature=0.2, denom_min=100.0),
        lambda a, b, c: O.l2vit_linear_attention(a, b, c, 0.2, 100.0),
        (qh, kh, vh),
        dtype,
    )
    compare(
        lambda a, b, c: K.inline_attention(a, b, c),
        lambda a, b, c: O.inline_attention(a, b, c, scale),
        (qh, kh, vh),
        dtype,
    )


def test_grouped_backward_is_bitwise_deterministic_on_gpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 784, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    groups = K.window_groups(28, 28, 4, device="cuda")
    route = K.region_routing(q.reshape(2, 784, -1), k.reshape(2, 784, -1), groups, 4, 128**-0.5)
    runs = [
        run(lambda a, b, c: K.grouped_attention(a, b, c, groups, route=route), (q, k, v), "triton")[1] for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def halo_groups(side: int, window: int, device: str) -> torch.Tensor:
    """Key groups: each window plus the next window's first column (padding at the right edge): tokens on a
    window's left column sit in two key groups, which the Triton backward sums per table slot."""
    rows = []
    for top in range(0, side, window):
        for left in range(0, side, window):
            cols = [c if c < side else None for c in range(left, left + window + 1)]
            rows.append([-1 if c is None else r * side + c for r in range(top, top + window) for c in cols])
    return torch.tensor(rows, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_overlapping_key_groups_on_gpu(dtype):
    torch.manual_seed(0)
    B, side, H, D = 2, 28, 4, 32
    q, k, v = (torch.randn(B, side * side, H, D, device="cuda") for _ in range(3))
    groups, kv_groups = K.window_groups(side, side, 4, device="cuda"), halo_groups(side, 4, "cuda")
    route = K.region_routing(q.reshape(B, -1, H * D), k.reshape(B, -1, H * D), groups, 4, (H * D) ** -0.5)
    compare(
        lambda a, b, c: K.grouped_attention(a, b, c, groups, kv_groups, route=route),
        lambda a, b, c: O.grouped_attention(a, b, c, groups, kv_groups, route, D**-0.5),
        (q, k, v),
        dtype,
    )
    runs = [
        run(lambda a, b, c: K.grouped_attention(a, b, c, groups, kv_groups, route=route), (q, k, v), "triton")[1]
        for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_forced_torch_backend_with_no_keys_on_gpu():
    """An all-padding key group on the torch backend (SDPA on CUDA): zeros, as the oracle, not NaN."""
    q, k, v = (torch.randn(1, 16, 2, 8, device="cuda") for _ in range(3))
    groups = K.window_groups(4, 4, 2, device="cuda")
    kv_groups = groups.clone()
    kv_groups[1] = -1
    with K.use_backend("torch"):
        out = K.grouped_attention(q, k, v, groups, kv_groups, scale=0.3)
    want = O.grouped_attention(q.double(), k.double(), v.double(), groups, kv_groups, None, 0.3)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
