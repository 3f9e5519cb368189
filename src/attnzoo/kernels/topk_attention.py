"""Per-row sparse attention (Sparsifiner's learned connectivity), two ways to give the key sets:

- ``topk_attention(q, k, v, index)``: per-row index lists; a gather kernel, for large N and small k;
- ``masked_attention(q, k, v, mask)``: a boolean (or packed bit) mask; a dense-tile kernel that
  skips empty tiles, for ViT sizes (N about 200).
"""

from __future__ import annotations

import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import dispatch, reference
from attnzoo.kernels._checks import check_index_tensor, check_qkv, describe
from attnzoo.kernels.grouped_attention import check_flex, check_triton

OP = "topk_attention"
MASKED_OP = "masked_attention"


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Attention where query row ``i`` sees only keys ``index[..., i, :]``.

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H, Nk, D]``.
        index: int ``[B, H, N, topk]`` distinct key indices per row (``-1`` = unused slot). A row with
            no valid key outputs zeros (Sparsifiner's masked softmax + ``nan_to_num``).
        scale: softmax scale, default ``D ** -0.5``.
    """
    _validate(q, k, v, index)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return dispatch.dispatch(OP, q, k, v, index, scale)


def mask_to_index(mask: torch.Tensor) -> torch.Tensor:
    """A boolean ``[..., N, Nk]`` connectivity mask as a ``[..., N, max keys per row]`` index (``-1`` padded)."""
    counts = mask.sum(-1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    keep = torch.arange(width, device=mask.device) < counts[..., None]
    return torch.where(keep, order, -1).to(torch.int32)


def _validate_qkv(op: str, q, k, v) -> None:
    check_qkv(op, q, k, v, "[B, H, N, D]")
    B, H, N, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise InvalidInputError(f"{op}: k and v must be [{B}, {H}, Nk, {D}], got {tuple(k.shape)} and {tuple(v.shape)}")


def _validate(q, k, v, index) -> None:
    _validate_qkv(OP, q, k, v)
    B, H, N, D = q.shape
    check_index_tensor(OP, "index", index, q.device)
    if index.dim() != 4 or tuple(index.shape[:3]) != (B, H, N) or index.shape[3] < 1:
        raise InvalidInputError(f"topk_attention: index must be [{B}, {H}, {N}, topk], got {tuple(index.shape)}")
    if int(index.min()) < -1 or int(index.max()) >= k.shape[2]:
        raise InvalidInputError(f"topk_attention: index holds key indices outside [-1, {k.shape[2]})")
    ordered = index.sort(-1).values
    if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
        raise InvalidInputError("topk_attention: a row lists the same key twice (indices in a row must be distinct)")


def _triton(q, k, v, index, scale):
    from attnzoo.kernels import ops

    return ops.topk_attention(q, k, v, index.to(torch.int32), scale)


def _flex(q, k, v, index, scale):
    from attnzoo.kernels import flex

    return flex.topk_attention(q, k, v, index, scale)


dispatch.register_backend(OP, "triton", _triton, [check_triton])
dispatch.register_backend(OP, "flex", _flex, [check_flex])
dispatch.register_backend(OP, "reference", reference.topk_attention)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Attention where query row ``i`` sees the keys ``j`` with ``mask[..., i, j]`` set.

    ``mask`` is a bool ``[B, H, N, Nk]`` tensor, or the same packed 32 keys per int32 word
    (``pack_mask``): ``[B, H, N, ceil(Nk / 32)]``. Rows with no key output zeros.
    """
    _validate_qkv(MASKED_OP, q, k, v)
    Nk = k.shape[2]
    expected = (*q.shape[:3], Nk)
    if not isinstance(mask, torch.Tensor) or mask.device != q.device:
        raise InvalidInputError(f"masked_attention: mask must be a tensor on {q.device}, got {describe(mask)}")
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != expected:
            raise InvalidInputError(f"masked_attention: mask must be [{', '.join(map(str, expected))}], got {tuple(mask.shape)}")
        bits = None
    elif mask.dtype == torch.int32:
        words = (*expected[:3], (Nk + 31) // 32)
        if tuple(mask.shape) != words:
            raise InvalidInputError(f"masked_attention: a packed mask must be int32 [{', '.join(map(str, words))}], got {tuple(mask.shape)}")
        bits, mask = mask, unpack_mask(mask, Nk)
    else:
        raise InvalidInputError(f"masked_attention: mask must be bool, or int32 packed bits, got {mask.dtype}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return dispatch.dispatch(MASKED_OP, q, k, v, mask, bits, scale)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., Nk]`` -> int32 ``[..., ceil(Nk / 32)]``; key ``j`` is bit ``j % 32`` of word ``j // 32``."""
    Nk = mask.shape[-1]
    words = (Nk + 31) // 32
    padded = torch.nn.functional.pad(mask.to(torch.int64), (0, words * 32 - Nk)).view(*mask.shape[:-1], words, 32)
    value = (padded << torch.arange(32, device=mask.device)).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def unpack_mask(bits: torch.Tensor, num_keys: int) -> torch.Tensor:
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    flat = ((bits[..., None] >> shifts) & 1).bool().flatten(-2)
    return flat[..., :num_keys]


def _masked_triton(q, k, v, mask, bits, scale):
    from attnzoo.kernels import ops

    return ops.masked_attention(q, k, v, pack_mask(mask) if bits is None else bits, scale)


def _masked_flex(q, k, v, mask, bits, scale):
    from attnzoo.kernels import flex

    return flex.masked_attention(q, k, v, mask, scale)


def _masked_reference(q, k, v, mask, bits, scale):
    """On the CPU, fused SDPA under the boolean mask (exact, about 2.5x the explicit softmax at
    DeiT sizes; the CPU kernel returns 0 for a row with no key). Elsewhere the explicit form, since
    GPU SDPA backends may return NaN for such rows."""
    if not q.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return reference.masked_attention(q, k, v, mask, scale)


dispatch.register_backend(MASKED_OP, "triton", _masked_triton, [check_triton])
dispatch.register_backend(MASKED_OP, "flex", _masked_flex, [check_flex])
dispatch.register_backend(MASKED_OP, "reference", _masked_reference)
