"""Boosted attention: softmax attention whose probabilities on chosen blocks (query rows x keys) are
multiplied by ``1 + amount`` without renormalisation, and which can also return, per head, the
probability mass that one block of rows puts on its keys.

This is the attention edit of In-Context Brush (query-image rows boosted on the demo image and the
text; the mass of the query image on the text weighs the heads) and of Diptych Prompting's
reference-attention enhancement (right-panel rows boosted on the left panel). Because the boosted
probabilities are not renormalised, the output splits exactly into plain attention plus, per block,
``amount * m * softmax_C(q K_C^T) V_C`` with ``m = exp(LSE_C - LSE_all)`` the row's mass on the keys
``C``. The ``torch`` backend computes it that way from fused SDPA kernels that return the log-sum-exp
(no ``N x Nk`` probabilities at all), or, when gradients are needed or no such kernel exists, query
chunk by query chunk (a bounded slice of the probabilities at a time, recomputed in backward).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import dispatch
from attnzoo.kernels._checks import check_qkv, describe, real_scalar

OP = "boosted_attention"
#: Elements of the probability slice (batch x heads x rows x keys) the chunked formulation holds at once.
CHUNK_ELEMENTS = 1 << 22
#: Elements of one sub-block's query rows (batch x heads x rows x head dim) the split formulation holds at once.
BLOCK_ELEMENTS = 1 << 18

#: A token set: a boolean mask over the tokens, sorted int indices, or a ``slice`` of consecutive tokens.
Tokens = torch.Tensor | slice


class Boost(NamedTuple):
    """Probabilities of the query ``rows`` on the ``keys`` are multiplied by ``1 + amount``."""

    rows: Tokens
    keys: Tokens
    amount: float


class BoostedAttentionOutput(NamedTuple):
    out: torch.Tensor
    """``[B, N, H, D]``, the dtype of ``q``."""
    mass: torch.Tensor | None
    """``[B, H]`` (at least float32): the sum over the ``mass`` rows of their probability on its keys,
    before any boost; None when no ``mass`` block was asked for."""


def boosted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boosts: Sequence[Boost | tuple[Tokens, Tokens, float]] = (),
    *,
    mass: tuple[Tokens, Tokens] | None = None,
    scale: float | None = None,
) -> BoostedAttentionOutput:
    """``O = A V + sum_b amount_b (A * 1[rows_b x keys_b]) V`` with ``A = softmax(q k^T * scale)``.

    Args:
        q: ``[B, N, H, D]`` (diffusers' layout); k, v: ``[B, Nk, H, D]``.
        boosts: ``(rows, keys, amount)`` blocks; overlapping blocks add their amounts. Token sets
            are bool masks (``[N]`` for rows, ``[Nk]`` for keys), sorted int indices or slices.
        mass: ``(rows, keys)``: also return ``sum_{i in rows} sum_{j in keys} A[b, h, i, j]``.
        scale: softmax scale, default ``D ** -0.5``.

    With no boosts and no mass this is plain fused SDPA.
    """
    check_qkv(OP, q, k, v, "[B, N, H, D]")
    B, N, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise InvalidInputError(
            f"{OP}: k and v must be [B, Nk, H, D] = [{B}, Nk, {H}, {D}], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    Nk = k.shape[1]
    checked = []
    for i, boost in enumerate(boosts):
        if not isinstance(boost, (tuple, list)) or len(boost) != 3:
            raise InvalidInputError(f"{OP}: boosts[{i}] must be (rows, keys, amount), got {describe(boost)}")
        rows, keys, amount = boost
        amount = real_scalar(OP, f"boosts[{i}] amount", amount)
        rows, keys = (
            as_token_set(rows, N, f"boosts[{i}] rows", q.device),
            as_token_set(keys, Nk, f"boosts[{i}] keys", q.device),
        )
        if amount != 0.0 and not (is_empty(rows) or is_empty(keys)):
            checked.append(Boost(rows, keys, amount))
    block = None
    if mass is not None:
        if not isinstance(mass, (tuple, list)) or len(mass) != 2:
            raise InvalidInputError(f"{OP}: mass must be (rows, keys), got {describe(mass)}")
        block = (as_token_set(mass[0], N, "mass rows", q.device), as_token_set(mass[1], Nk, "mass keys", q.device))
    scale = D**-0.5 if scale is None else real_scalar(OP, "scale", scale)
    return dispatch.dispatch(OP, q, k, v, tuple(checked), block, scale)


# -- token sets ---------------------------------------------------------------------------------


def as_token_set(tokens: Tokens, n: int, name: str, device: torch.device) -> Tokens:
    """A bool mask, int indices or slice over ``n`` tokens -> a ``slice`` when the tokens are consecutive,
    else sorted int64 indices on ``device``."""
    if isinstance(tokens, slice):
        start, stop, step = tokens.indices(n)
        if step != 1:
            raise InvalidInputError(f"{OP}: {name} slice must have step 1, got {tokens}")
        return slice(start, max(start, stop))
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise InvalidInputError(f"{OP}: {name} must be a 1-D bool mask, int indices or a slice, got {describe(tokens)}")
    if tokens.dtype == torch.bool:
        if tokens.numel() != n:
            raise InvalidInputError(f"{OP}: {name} mask has {tokens.numel()} entries for {n} tokens")
        index = tokens.nonzero().flatten()
    elif not tokens.is_floating_point():
        index = tokens.long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise InvalidInputError(
                f"{OP}: {name} indices must lie in [0, {n}), got [{int(index.min())}, {int(index.max())}]"
            )
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise InvalidInputError(f"{OP}: {name} indices must be sorted and unique")
    else:
        raise InvalidInputError(f"{OP}: {name} must be bool or integer, got {tokens.dtype}")
    if index.numel() == 0:
        return slice(0, 0)
    first, last = int(index[0]), int(index[-1])
    if last - first + 1 == index.numel():
        return slice(first, last + 1)
    return index.to(device)


def is_empty(tokens: Tokens) -> bool:
    return tokens.stop <= tokens.start if isinstance(tokens, slice) else tokens.numel() == 0


def _take(x: torch.Tensor, tokens: Tokens, dim: int) -> torch.Tensor:
    """The tokens of ``x`` along ``dim``: a view for a slice, a gathered copy for indices."""
    if isinstance(tokens, slice):
        return x.narrow(dim, tokens.start, tokens.stop - tokens.start)
    return x.index_select(dim, tokens)


def _as_mask(tokens: Tokens, n: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[tokens] = True
    return mask


def _key(tokens: Tokens) -> tuple:
    return ("slice", tokens.start, tokens.stop) if isinstance(tokens, slice) else ("index", id(tokens))


# -- fused SDPA with the log-sum-exp ------------------------------------------------------------


def lse_sdpa_unavailable(q: torch.Tensor) -> str | None:
    """Why no fused SDPA kernel that also returns the log-sum-exp serves ``q`` ([B, H, N, D]), or None."""
    aten = torch.ops.aten
    if q.device.type == "cpu":
        if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
            return "this torch has no CPU flash-attention kernel"
        return None
    if q.device.type == "cuda":
        D = q.shape[-1]
        if q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256:
            return None
        if q.dtype == torch.float32 and D % 8 == 0 and D <= 256:
            return None
        return f"no fused CUDA kernel with the log-sum-exp for {q.dtype} and head dim {D}"
    return f"no fused kernel with the log-sum-exp on {q.device.type}"


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention ``[B, H, N, D]`` and the float32 log-sum-exp of each row's scores ``[B, H, N]``
    (no gradient: the kernels do not differentiate the log-sum-exp)."""
    aten = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse
    if q.dtype in (torch.float16, torch.bfloat16):
        found = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return found[0], found[1]
    found = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return found[0], found[1][..., : q.shape[2]]  # the efficient kernel pads the rows to a multiple of 32


# -- the torch backend --------------------------------------------------------------------------


def _torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boosts: tuple[Boost, ...],
    mass: tuple[Tokens, Tokens] | None,
    scale: float,
) -> BoostedAttentionOutput:
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D] views
    if not boosts and mass is None:
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        return BoostedAttentionOutput(out.transpose(1, 2), None)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and lse_sdpa_unavailable(qh) is None:
        out_h, mass_h = split_formulation(qh, kh, vh, boosts, mass, scale)
    else:
        out_h, mass_h = chunked_formulation(qh, kh, vh, boosts, mass, scale)
    return BoostedAttentionOutput(out_h.transpose(1, 2), mass_h)


class _Block(NamedTuple):
    rows: Tokens
    keys: Tokens
    amount: float
    wants_mass: bool


def _blocks(boosts: tuple[Boost, ...], mass: tuple[Tokens, Tokens] | None) -> list[_Block]:
    """The distinct (rows, keys) blocks: their summed boost and whether the mass is asked of them."""
    found: dict[tuple, _Block] = {}
    for rows, keys, amount in boosts:
        key = (_key(rows), _key(keys))
        previous = found.get(key)
        found[key] = _Block(rows, keys, amount + (previous.amount if previous else 0.0), False)
    if mass is not None and not (is_empty(mass[0]) or is_empty(mass[1])):
        key = (_key(mass[0]), _key(mass[1]))
        previous = found.get(key)
        found[key] = _Block(mass[0], mass[1], previous.amount if previous else 0.0, True)
    return list(found.values())


def split_formulation(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boosts: tuple[Boost, ...],
    mass: tuple[Tokens, Tokens] | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``O = SDPA(all) + sum_blocks amount * m * SDPA(q_R, K_C, V_C)``, ``m = exp(LSE_C - LSE_all)``, from
    fused kernels that return the log-sum-exp; sub-blocks run a few heads at a time. ``[B, H, N, D]``
    in and out; inference only (the kernels do not differentiate the log-sum-exp)."""
    B, H, N, D = q.shape
    out, lse = sdpa_with_lse(q, k, v, scale)
    head_mass = torch.zeros(B, H, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    for rows, keys, amount, wants_mass in _blocks(boosts, mass):
        num_rows = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
        num_keys = keys.stop - keys.start if isinstance(keys, slice) else keys.numel()
        heads = max(1, BLOCK_ELEMENTS // max(1, B * max(num_rows, num_keys) * D))
        for h0 in range(0, H, heads):
            hs = slice(h0, min(H, h0 + heads))
            qb = _take(q[:, hs], rows, 2)
            out_b, lse_b = sdpa_with_lse(qb, _take(k[:, hs], keys, 2), _take(v[:, hs], keys, 2), scale)
            share = torch.exp(lse_b - _take(lse[:, hs], rows, 2))  # [B, h, R]: each row's mass on the keys
            if wants_mass:
                head_mass[:, hs] = share.sum(-1).to(head_mass.dtype)
            if amount:
                target = out[:, hs]
                current = _take(target, rows, 2)  # a view for a slice of rows, else a copy
                added = out_b.to(share.dtype).mul_((amount * share).unsqueeze(-1))
                if current.dtype == added.dtype:
                    current.add_(added)
                else:  # half precision: add in float32, round once
                    current.copy_(current.to(added.dtype).add_(added))
                if not isinstance(rows, slice):
                    target.index_copy_(2, rows, current)
    return out, (head_mass if mass is not None else None)


def chunked_formulation(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boosts: tuple[Boost, ...],
    mass: tuple[Tokens, Tokens] | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The probabilities one query chunk at a time (at most :data:`CHUNK_ELEMENTS` of them), boosted and
    multiplied by V; differentiable, each chunk recomputed in backward so memory stays bounded."""
    B, H, N, D = q.shape
    Nk = k.shape[2]
    device = q.device
    row_masks = [(_as_mask(r, N, device), _as_mask(c, Nk, device), a) for r, c, a in boosts]
    mass_masks = None
    if mass is not None:
        mass_masks = (_as_mask(mass[0], N, device), _as_mask(mass[1], Nk, device))
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, B * H * Nk))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs: list[torch.Tensor] = []
    masses: list[torch.Tensor] = []
    for start in range(0, N, rows_per_chunk):
        stop = min(N, start + rows_per_chunk)
        chunk_boosts = tuple((r[start:stop], c, a) for r, c, a in row_masks)
        chunk_mass = None if mass_masks is None else (mass_masks[0][start:stop], mass_masks[1])
        fn = functools.partial(_chunk, boosts=chunk_boosts, mass=chunk_mass, scale=scale)
        if needs_grad:
            from torch.utils.checkpoint import checkpoint

            out, part = checkpoint(fn, q[:, :, start:stop], k, v, use_reentrant=False)
        else:
            out, part = fn(q[:, :, start:stop], k, v)
        outs.append(out)
        if part is not None:
            masses.append(part)
    out = torch.cat(outs, dim=2)
    head_mass = torch.stack(masses).sum(0) if masses else None
    return out, head_mass


def _chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    boosts: tuple[tuple[torch.Tensor, torch.Tensor, float], ...],
    mass: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    acc = torch.promote_types(q.dtype, torch.float32)
    probs = torch.softmax((q @ k.transpose(-1, -2)).to(acc) * scale, dim=-1)  # [B, H, c, Nk]
    part = None
    if mass is not None:
        rows, keys = mass
        part = (probs[:, :, rows] @ keys.to(acc)).sum(-1)  # [B, H]
    gain = torch.ones(probs.shape[-2:], dtype=acc, device=q.device)
    for rows, keys, amount in boosts:
        gain = gain + amount * (rows[:, None] & keys[None, :]).to(acc)
    return (probs * gain).to(v.dtype) @ v, part


def _check_torch(*_: object) -> str | None:
    return None


dispatch.register_backend(OP, "torch", _torch, [_check_torch])

__all__ = ["Boost", "BoostedAttentionOutput", "boosted_attention"]
