"""Redistributed decode attention (VAR's decoding step as one kernel): the Triton kernel equals the
torch backend, and both equal VAR's eager path (softmax, ``var.redistribute``, the product with V)
on the same row: outputs within float rounding, selected rows exactly. Grouped-query heads, padding
masks, batch rows without a visual sink, rows whose image attention is all on sinks, and settings
that select all, some or none of the rows."""

from __future__ import annotations

import pytest
import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import redistributed_decode_attention, use_backend
from attnzoo.kernels.redistributed_attention import IMAGE, SINK, redistribution_keys
from attnzoo.multimodal.hallucination.var import redistribute
from tests.helpers import triton_dtypes


def case(device, dtype=torch.float32, *, batch=3, heads=4, kv_heads=2, keys=70, prompt=60, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g)
    k = torch.randn(batch, kv_heads, keys, dim, generator=g) * 2
    v = torch.randn(batch, kv_heads, keys, dim, generator=g)
    image = torch.zeros(batch, prompt, dtype=torch.bool)
    image[:, 5:45] = True
    sinks = torch.zeros(batch, prompt, dtype=torch.bool)
    sinks[:, [0, 10, 20]] = True
    sinks[1, 10:21] = False  # row 1: its only sink is BOS, outside the image (never selected)
    if batch > 2:
        sinks[2, 5:45] = True  # row 2: every image token a sink (nowhere to move the mass)
    mask = torch.zeros(batch, 1, 1, keys)
    mask[0, 0, 0, 1:4] = torch.finfo(torch.float32).min  # padding
    codes = image.to(torch.int8) * IMAGE | sinks.to(torch.int8) * SINK
    to = dict(device=device)
    return (
        q.to(dtype=dtype, **to),
        k.to(dtype=dtype, **to),
        v.to(dtype=dtype, **to),
        mask.to(dtype=dtype, **to),
        codes.to(**to),
        image,
        sinks,
    )


def eager_var(q, k, v, mask, image, sinks, keep, rho, summ):
    """VAR's eager path in float64: softmax weights, ``redistribute`` (paper p = 1 - keep), the product with V."""
    groups = q.shape[1] // k.shape[1]
    q, k, v, mask = (t.double().cpu() for t in (q, k, v, mask))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    w = torch.softmax(q @ k.transpose(2, 3) * q.shape[-1] ** -0.5 + mask, -1)
    pad = k.shape[2] - image.shape[1]
    image, sinks = (torch.nn.functional.pad(m, (0, pad)) for m in (image, sinks))
    edited, selected = redistribute(w, image, sinks, rho=1 - rho, p=1 - keep, summ=summ)
    return (edited @ v).transpose(1, 2), selected[:, :, 0]


SETTINGS = [  # keep, rho (the code's), summ
    (0.6, 0.5, 0.05),  # the official defaults but summ
    (0.6, 0.5, 0.2),
    (0.3, 0.05, 0.0),  # a small rho: only rows with little sink attention
    (0.6, 0.5, 0.99),  # no row has that much image attention
]


@pytest.mark.parametrize("keep,rho,summ", SETTINGS)
def test_torch_backend_is_var_eager_path(keep, rho, summ):
    q, k, v, mask, codes, image, sinks = case("cpu")
    with use_backend("torch"):
        out, selected = redistributed_decode_attention(q, k, v, mask, codes, keep=keep, rho=rho, summ=summ)
    ref, ref_selected = eager_var(q, k, v, mask, image, sinks, keep, rho, summ)
    assert torch.equal(selected, ref_selected)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert not selected[1].any() and not selected[2].any()  # no visual sink; image attention all on sinks


def test_settings_select_all_some_and_none_of_the_rows():
    q, k, v, mask, codes, image, sinks = case("cpu")
    counts = []
    for keep, rho, summ in SETTINGS:
        with use_backend("torch"):
            counts.append(
                int(redistributed_decode_attention(q, k, v, mask, codes, keep=keep, rho=rho, summ=summ)[1].sum())
            )
    assert max(counts) == 4 and 0 < min(c for c in counts if c) < 4 and counts[-1] == 0


@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("keep,rho,summ", SETTINGS)
def test_triton_kernel_matches_the_torch_backend(triton_device, dtype, keep, rho, summ):
    q, k, v, mask, codes, *_ = case(triton_device, dtype)
    kwargs = dict(keep=keep, rho=rho, summ=summ)
    with use_backend("torch"):
        expected, expected_selected = redistributed_decode_attention(q, k, v, mask, codes, **kwargs)
    with use_backend("triton"):
        out, selected = redistributed_decode_attention(q, k, v, mask, codes, **kwargs)
    assert out.dtype == dtype and out.shape == (3, 1, 4, 24)
    assert torch.equal(selected, expected_selected)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def test_triton_kernel_without_a_mask_and_one_head_per_key_head(triton_device):
    q, k, v, _, codes, *_ = case(triton_device, batch=2, kv_heads=4, keys=150, dim=40, seed=3)
    with use_backend("torch"):
        expected, expected_selected = redistributed_decode_attention(q, k, v, None, codes, keep=0.6, rho=0.5, summ=0.05)
    with use_backend("triton"):
        out, selected = redistributed_decode_attention(q, k, v, None, codes, keep=0.6, rho=0.5, summ=0.05)
    assert torch.equal(selected, expected_selected) and selected.any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_typed_errors():
    q, k, v, mask, codes, *_ = case("cpu")
    kwargs = dict(keep=0.6, rho=0.5, summ=0.05)
    with pytest.raises(InvalidInputError, match=r"\[B, H, 1, D\]"):
        redistributed_decode_attention(q.expand(-1, -1, 2, -1), k, v, mask, codes, **kwargs)
    with pytest.raises(InvalidInputError, match="does not fit"):
        redistributed_decode_attention(q, k[:, :, :, :8], v[:, :, :, :8], mask, codes, **kwargs)
    with pytest.raises(InvalidInputError, match="codes must be int8"):
        redistributed_decode_attention(q, k, v, mask, codes.bool(), **kwargs)
    with pytest.raises(InvalidInputError, match="mask must be"):
        redistributed_decode_attention(q, k, v, mask[..., :10], codes, **kwargs)
    with pytest.raises(InvalidInputError, match="mask must be"):  # per-head masks: the kernel reads one row
        redistributed_decode_attention(q, k, v, mask.expand(-1, 4, -1, -1), codes, **kwargs)
    with pytest.raises(InvalidInputError, match=r"codes must be int8 \[3, P <= 70\]"):
        redistributed_decode_attention(q, k, v, mask, codes[:2], **kwargs)


def test_keys_built_once_give_the_same_step(triton_device):
    """redistribution_keys(codes), built once for a prompt's steps, is the same input as the codes."""
    q, k, v, mask, codes, *_ = case(triton_device)
    keys = redistribution_keys(codes)
    assert keys.eps.tolist() == pytest.approx([40e-6] * 3) and keys.has_visual_sink.tolist() == [1, 0, 1]
    for backend in ("torch", "triton"):
        with use_backend(backend):
            a = redistributed_decode_attention(q, k, v, mask, codes, keep=0.6, rho=0.5, summ=0.05)
            b = redistributed_decode_attention(q, k, v, mask, keys, keep=0.6, rho=0.5, summ=0.05)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_triton_kernel_reads_strided_views_as_they_are(triton_device):
    """K/V as slices of a longer cache buffer and a transposed query (transformers' layouts) give the
    contiguous inputs' result."""
    q, k, v, mask, codes, *_ = case(triton_device)
    long_k, long_v = torch.cat([k, k[:, :, :9]], 2), torch.cat([v, v[:, :, :9]], 2)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    with use_backend("triton"):
        expected = redistributed_decode_attention(q, k, v, mask, codes, keep=0.6, rho=0.5, summ=0.05)
        got = redistributed_decode_attention(
            q_t, long_k[:, :, :70], long_v[:, :, :70], mask, codes, keep=0.6, rho=0.5, summ=0.05
        )
    assert not long_k[:, :, :70].is_contiguous()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
