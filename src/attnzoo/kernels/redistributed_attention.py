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

import contextlib
import math
from typing import NamedTuple

import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import dispatch

OP = "redistributed_decode_attention"
MAX_TRITON_HEAD_DIM = 256
#: key codes: bit 0 an image token, bit 1 a sink
IMAGE, SINK = 1, 2


class RedistributionKeys(NamedTuple):
    """The per-key inputs of a prompt, fixed while it decodes (build them once with
    :func:`redistribution_keys`)."""

    codes: torch.Tensor
    """int8 ``[B, P]``: bit 0 an image token, bit 1 a sink."""
    eps: torch.Tensor
    """float32 ``[B]``: 1e-6 per image token (VAR's share epsilon)."""
    has_visual_sink: torch.Tensor
    """int8 ``[B]``: whether the batch row has a sink inside the image (others are never selected)."""


def redistribution_keys(codes: torch.Tensor) -> RedistributionKeys:
    """The keys' codes (int8 ``[B, P]``, bit 0 image, bit 1 sink) with the row terms derived from them."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.ndim != 2:
        got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise InvalidInputError(f"{OP}: codes must be int8 [B, P], got {got}")
    image = (codes & IMAGE) != 0
    visual = image & ((codes & SINK) != 0)
    eps = 1e-6 * image.sum(-1).to(torch.float32)
    return RedistributionKeys(codes.contiguous(), eps, visual.any(-1).to(torch.int8))


def redistributed_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    codes: torch.Tensor | RedistributionKeys,
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
            ``P`` and after (the decoded ones) are neither. Or :func:`redistribution_keys` of them,
            built once for a prompt's decoding steps.
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
    keys = codes if isinstance(codes, RedistributionKeys) else redistribution_keys(codes)
    if keys.codes.shape[0] != B or keys.codes.shape[1] > Nk:
        raise InvalidInputError(f"{OP}: codes must be int8 [{B}, P <= {Nk}], got {tuple(keys.codes.shape)}")
    if mask is not None and (mask.ndim != 4 or mask.shape[:3] != (B, 1, 1) or mask.shape[-1] < Nk):
        raise InvalidInputError(f"{OP}: mask must be additive [{B}, 1, 1, >= {Nk}], got {tuple(mask.shape)}")
    scale = D**-0.5 if scale is None else float(scale)
    return dispatch.dispatch(OP, q, k, v, mask, keys, keep, rho, summ, scale)


def _torch(q, k, v, mask, keys, keep, rho, summ, scale):
    B, H, _, D = q.shape
    Nk = k.shape[2]
    groups = H // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1).float(), v.repeat_interleave(groups, dim=1).float()
    logits = torch.matmul(q.float(), k.transpose(2, 3)) * scale
    if mask is not None:
        logits = logits + mask[..., :Nk].float()
    w = torch.softmax(logits, dim=-1)[:, :, 0]  # [B, H, Nk]
    codes = torch.nn.functional.pad(keys.codes, (0, Nk - keys.codes.shape[1]))
    image, sink = (codes & IMAGE) != 0, (codes & SINK) != 0
    eps, row_ok = keys.eps, keys.has_visual_sink.bool()
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


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton(q, k, v, mask, keys, keep, rho, summ, scale):
    import triton

    from attnzoo.kernels.triton.redistributed import _redistributed_decode_kernel

    B, H, _, D = q.shape
    Nk = k.shape[2]
    # the kernel reads every tensor through its strides (a KV cache's views as they are); only the last
    # dimension must be dense
    q, k, v = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)
    out = q.new_empty(B, 1, H, D)
    selected = torch.empty(B, H, dtype=torch.int8, device=q.device)
    flat_mask = _last_dim_dense(mask[:, 0, 0]) if mask is not None else keys.eps  # (not read without a mask)
    block_d = max(16, triton.next_power_of_2(D))
    block_n = max(16, min(128, 8192 // block_d))
    device = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with device:  # the query's GPU, in a model split over several
        _launch(
            _redistributed_decode_kernel,
            B,
            H,
            D,
            Nk,
            q,
            k,
            v,
            flat_mask,
            mask is not None,
            keys,
            out,
            selected,
            scale,
            keep,
            rho,
            summ,
            block_n,
            block_d,
        )
    return out, selected.view(torch.bool)


def _launch(
    kernel, B, H, D, Nk, q, k, v, flat_mask, has_mask, keys, out, selected, scale, keep, rho, summ, block_n, block_d
):
    kernel[(B * H,)](
        q,
        k,
        v,
        flat_mask,
        keys.codes,
        keys.has_visual_sink,
        keys.eps,
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
        flat_mask.stride(0) if has_mask else 0,
        keys.codes.stride(0),
        out.stride(0),
        out.stride(2),
        H,
        H // k.shape[1],
        Nk,
        keys.codes.shape[1],
        D,
        scale,
        float(keep),
        float(rho),
        float(summ),
        HAS_MASK=has_mask,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )


def _check_triton(q: torch.Tensor, *_: object) -> str | None:
    return dispatch.triton_can_run(q, MAX_TRITON_HEAD_DIM) or (
        "no backward" if torch.is_grad_enabled() and q.requires_grad else None
    )


dispatch.register_backend(OP, "triton", _triton, [_check_triton])
dispatch.register_backend(OP, "torch", _torch)
