"""The per-row sparse attention op (Sparsifiner's learned top-k): validation, backends, dispatch."""

from __future__ import annotations

import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import dispatch, reference
from attnzoo.kernels.grouped_attention import MAX_TRITON_HEAD_DIM, _check_flex, _shape

OP = "topk_attention"


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


def _validate(q, k, v, index) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InvalidInputError(f"topk_attention: {name} must be a [B, H, N, D] tensor, got {_shape(t)}")
        if not t.is_floating_point():
            raise InvalidInputError(f"topk_attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidInputError(f"topk_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device == getattr(index, "device", q.device)):
        raise InvalidInputError("topk_attention: q, k, v and index are on different devices")
    B, H, N, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise InvalidInputError(f"topk_attention: k and v must be [{B}, {H}, Nk, {D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.dtype == torch.bool:
        raise InvalidInputError(f"topk_attention: index must be an integer tensor, got {_shape(index)}")
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


def _check_triton(q, *_):
    return (
        dispatch.triton_importable()
        or dispatch.on_gpu_or_interpreter(q)
        or (f"head dim {q.shape[-1]} > {MAX_TRITON_HEAD_DIM}" if q.shape[-1] > MAX_TRITON_HEAD_DIM else None)
    )


dispatch.register_backend(OP, "triton", _triton, [_check_triton])
dispatch.register_backend(OP, "flex", _flex, [_check_flex])
dispatch.register_backend(OP, "reference", reference.topk_attention)
