"""Redistributed decode attention: one decoding step of attention whose weights VAR (Visual Attention
Redistribution) edits, for one query row per (batch, head).

With ``w = softmax(q k^T * scale + mask)`` over the keys, a row is *selected* when its visual-sink
share of the image attention is at most ``rho`` (``visual / (image + eps) <= rho``), its image
attention is at least ``summ``, the moved mass has somewhere to go (``gain = moved / rest`` is
finite), and its batch row has a sink inside the image. A selected row keeps ``keep`` of every sink
weight and gives ``moved = (1 - keep) * sum_sinks w`` to the non-sink image tokens in proportion to
their weights; its output is ``sum_k w_k f_k v_k``. The ``torch`` backend forms the weights (the
reference); the ``triton`` backend does the whole step in one pass over the keys, as one program per
row (the eager path of the LVLM interventions takes about 34 small ops per layer and step for it).
Inference only: no backward.
"""

from __future__ import annotations

import math

import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import dispatch

OP = "redistributed_decode_attention"
MAX_TRITON_HEAD_DIM = 256
#: key codes: bit 0 an image token, bit 1 a sink
IMAGE, SINK = 1, 2


def redistributed_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    codes: torch.Tensor,
    *,
    keep: float,
    rho: float,
    summ: float,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output ``[B, 1, H, D]`` in ``q``'s dtype, selected ``[B, H]`` bool).

    Args:
        q: ``[B, H, 1, D]``; k, v: ``[B, H_kv, Nk, D]`` with ``H`` a multiple of ``H_kv`` (grouped
            queries share their key head).
        mask: additive ``[B, 1, 1, Nk]`` (0 where a key is seen) or None.
        codes: int8 ``[B, P]``, ``P <= Nk``: per key, bit 0 an image token and bit 1 a sink; keys at
            ``P`` and after (the decoded ones) are neither.
        keep: the share of each sink weight a selected row keeps (VAR's code ``p``; the paper's is ``1 - keep``).
        rho: the largest visual-sink share of a selected row's image attention (the code's ``rho``).
        summ: the smallest image attention of a selected row.
        scale: the logits' scale, default ``D ** -0.5``.
    """
    if q.ndim != 4 or q.shape[2] != 1 or k.ndim != 4 or v.shape != k.shape:
        raise InvalidInputError(
            f"{OP}: q must be [B, H, 1, D] and k, v the same [B, H_kv, Nk, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise InvalidInputError(f"{OP}: k [B, H_kv, Nk, D] does not fit q {tuple(q.shape)}: {tuple(k.shape)}")
    Nk = k.shape[2]
    if codes.dtype != torch.int8 or codes.ndim != 2 or codes.shape[0] != B or codes.shape[1] > Nk:
        raise InvalidInputError(f"{OP}: codes must be int8 [B, P <= {Nk}], got {codes.dtype} {tuple(codes.shape)}")
    if mask is not None and (mask.ndim != 4 or mask.shape[0] != B or mask.shape[-1] < Nk):
        raise InvalidInputError(f"{OP}: mask must be additive [B, 1, 1, >= {Nk}], got {tuple(mask.shape)}")
    scale = D**-0.5 if scale is None else float(scale)
    return dispatch.dispatch(OP, q, k, v, mask, codes, keep, rho, summ, scale)


def _row_terms(codes: torch.Tensor, nk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """image, sink [B, Nk] bool; share eps [B] (1e-6 per image token); whether each batch row has a
    sink inside the image [B]."""
    padded = torch.zeros(codes.shape[0], nk, dtype=codes.dtype, device=codes.device)
    padded[:, : codes.shape[1]] = codes
    image, sink = (padded & IMAGE) != 0, (padded & SINK) != 0
    eps = 1e-6 * image.sum(-1).to(torch.float32)
    return image, sink, eps, (image & sink).any(-1)


def _torch(q, k, v, mask, codes, keep, rho, summ, scale):
    B, H, _, D = q.shape
    Nk = k.shape[2]
    groups = H // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1).float(), v.repeat_interleave(groups, dim=1).float()
    logits = torch.matmul(q.float(), k.transpose(2, 3)) * scale
    if mask is not None:
        logits = logits + mask[..., :Nk].float()
    w = torch.softmax(logits, dim=-1)[:, :, 0]  # [B, H, Nk]
    image, sink, eps, row_ok = _row_terms(codes, Nk)
    rest_keys = image & ~sink
    sums = [(w * m[:, None].float()).sum(-1) for m in (image, image & sink, sink, rest_keys)]
    image_share, visual, sinks, rest = sums
    gain = (1 - keep) * sinks / rest
    selected = (visual / (image_share + eps[:, None]) <= rho) & (image_share >= summ) & (gain < math.inf)
    selected = selected & row_ok[:, None]
    factor = torch.where(sink[:, None], keep, 1.0) + rest_keys[:, None].float() * torch.nan_to_num(gain)[..., None]
    edited = torch.where(selected[..., None], w * factor, w)
    out = torch.matmul(edited[:, :, None], v)  # [B, H, 1, D]
    return out.transpose(1, 2).to(q.dtype).contiguous(), selected


def _triton(q, k, v, mask, codes, keep, rho, summ, scale):
    import triton

    from attnzoo.kernels.triton.redistributed import _redistributed_decode_kernel

    B, H, _, D = q.shape
    Nk = k.shape[2]
    q, k, v, codes = q.contiguous(), k.contiguous(), v.contiguous(), codes.contiguous()
    _, _, eps, row_ok = _row_terms(codes, Nk)
    out = q.new_empty(B, 1, H, D)
    selected = torch.empty(B, H, dtype=torch.int8, device=q.device)
    flat_mask = mask[:, 0, 0, :Nk].contiguous().float() if mask is not None else q.new_zeros(1, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    block_n = max(16, min(128, 8192 // block_d))
    _redistributed_decode_kernel[(B * H,)](
        q,
        k,
        v,
        flat_mask,
        codes,
        row_ok.to(torch.int8),
        eps,
        out,
        selected,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        flat_mask.stride(0) if mask is not None else 0,
        codes.stride(0),
        out.stride(0),
        out.stride(2),
        H,
        H // k.shape[1],
        Nk,
        codes.shape[1],
        D,
        scale,
        float(keep),
        float(rho),
        float(summ),
        HAS_MASK=mask is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return out, selected.bool()


def _check_triton(q: torch.Tensor, *_: object) -> str | None:
    return dispatch.triton_can_run(q, MAX_TRITON_HEAD_DIM) or (
        "no backward" if torch.is_grad_enabled() and q.requires_grad else None
    )


dispatch.register_backend(OP, "triton", _triton, [_check_triton])
dispatch.register_backend(OP, "torch", _torch)
