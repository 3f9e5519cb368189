"""Per-row sparse attention (Sparsifiner's learned connectivity): the key set of each query row
is a boolean mask, or the same mask packed 32 keys per int32 word (``pack_mask``), which the
Triton kernel reads as bits, skipping tiles with no allowed key (ViT sizes, N about 200)."""

from __future__ import annotations

import torch

from attnzoo._values import whole_number
from attnzoo.errors import InvalidInputError
from attnzoo.kernels import dispatch, torch_impl
from attnzoo.kernels._checks import check_heads_first_qkv, describe, real_scalar

OP = "masked_attention"
MAX_TRITON_HEAD_DIM = 256


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Attention where query row ``i`` sees the keys ``j`` with ``mask[..., i, j]`` set.

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, H, Nk, D]``. ``mask`` is a bool ``[B, H, N, Nk]``
    tensor, or the same packed 32 keys per int32 word (``pack_mask``): ``[B, H, N, ceil(Nk / 32)]``.
    Rows with no key output zeros (Sparsifiner's masked softmax + ``nan_to_num``). ``scale``
    defaults to ``D ** -0.5`` (``D = 0`` is refused).
    """
    check_heads_first_qkv(OP, q, k, v)
    Nk = k.shape[2]
    expected = (*q.shape[:3], Nk)
    if not isinstance(mask, torch.Tensor) or mask.device != q.device:
        raise InvalidInputError(f"masked_attention: mask must be a tensor on {q.device}, got {describe(mask)}")
    bits: torch.Tensor | None
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != expected:
            raise InvalidInputError(
                f"masked_attention: mask must be [{', '.join(map(str, expected))}], got {tuple(mask.shape)}"
            )
        bits = None
    elif mask.dtype == torch.int32:
        words = (*expected[:3], (Nk + 31) // 32)
        if tuple(mask.shape) != words:
            raise InvalidInputError(
                f"masked_attention: a packed mask must be int32 [{', '.join(map(str, words))}], got {tuple(mask.shape)}"
            )
        bits, mask = mask, unpack_mask(mask, Nk)
    else:
        raise InvalidInputError(f"masked_attention: mask must be bool, or int32 packed bits, got {mask.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else real_scalar(OP, "scale", scale)
    return dispatch.dispatch(OP, q, k, v, mask, bits, scale)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., Nk]`` -> int32 ``[..., ceil(Nk / 32)]``; key ``j`` is bit ``j % 32`` of word ``j // 32``.

    A numeric mask must hold only 0 and 1: any other value (0.7, 2, -1) has no bit to stand for."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 1 or mask.is_complex():
        raise InvalidInputError(f"pack_mask: mask must be a real [..., Nk] tensor, got {describe(mask)}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise InvalidInputError(f"pack_mask: a {mask.dtype} mask must hold only 0 and 1 (or be bool)")
        mask = mask != 0
    Nk = mask.shape[-1]
    words = (Nk + 31) // 32
    padded = torch.nn.functional.pad(mask.to(torch.int64), (0, words * 32 - Nk)).view(*mask.shape[:-1], words, 32)
    value = (padded << torch.arange(32, device=mask.device)).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def unpack_mask(bits: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The inverse of :func:`pack_mask`: int32 ``[..., ceil(num_keys / 32)]`` -> bool ``[..., num_keys]``."""
    num_keys = whole_number(num_keys, "unpack_mask: num_keys", low=0, error=InvalidInputError)
    words = (num_keys + 31) // 32
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.int32 or bits.dim() < 1 or bits.shape[-1] != words:
        got = f"{bits.dtype} {tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else describe(bits)
        raise InvalidInputError(
            f"unpack_mask: {num_keys} keys need int32 bits [..., {words}] (32 keys a word), got {got}"
        )
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    flat = ((bits[..., None] >> shifts) & 1).bool().flatten(-2)
    return flat[..., :num_keys]


# -- backends: (q, k, v, bool mask, packed bits or None, scale) ---------------------------------


def _triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor | None, scale: float
) -> torch.Tensor:
    from attnzoo.kernels import ops

    return ops.masked_attention(q, k, v, pack_mask(mask) if bits is None else bits, scale)


def _flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor | None, scale: float
) -> torch.Tensor:
    from attnzoo.kernels import flex

    if q.numel() == 0 or k.shape[2] == 0:  # nothing to attend: flex's block mask cannot be empty
        return torch_impl.masked_attention(q, k, v, mask, scale)
    return flex.masked_attention(q, k, v, mask, scale)


def _torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, bits: torch.Tensor | None, scale: float
) -> torch.Tensor:
    return torch_impl.masked_attention(q, k, v, mask, scale)


def _check_triton(q: torch.Tensor, *_: object) -> str | None:
    return dispatch.triton_can_run(q, MAX_TRITON_HEAD_DIM)


dispatch.register_backend(OP, "triton", _triton, [_check_triton])
dispatch.register_backend(OP, "flex", _flex, [dispatch.flex_can_run])
dispatch.register_backend(OP, "torch", _torch)
