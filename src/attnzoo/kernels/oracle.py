"""The semantics of every op, written as plainly as possible: the oracle the tests hold every
backend (``torch``, ``flex``, ``triton``) against.

Deliberately slow (Python loops over groups and rows, quadratic forms of the linear ops) and
independent of the backends' formulations; nothing but the tests imports it.
"""

from __future__ import annotations

import itertools

import torch

from attnzoo.kernels.grouping import expand_route


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    kv_groups: torch.Tensor,
    route: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The queries of group ``g`` attend to the valid tokens of the key groups ``route[b, (h,) g]``.

    ``q`` ``[B, N, H, D]``, ``k``/``v`` ``[B, Nk, H, D]``, tables ``[G, T]`` with ``-1`` padding.
    A query with no valid key, or in no group, outputs 0.
    """
    B, N, H, _ = q.shape
    routes = expand_route(route, B, H, q_groups.shape[0], q.device)
    heads = []
    for b, h in itertools.product(range(B), range(H)):
        out = q.new_zeros(N, v.shape[-1])
        for g, tokens in enumerate(q_groups):
            queries = tokens[tokens >= 0].long()
            keys = torch.cat([kv_groups[j] for j in routes[b, h, g].tolist()])
            keys = keys[keys >= 0].long()
            if len(queries) and len(keys):
                weights = torch.softmax((q[b, queries, h] * scale) @ k[b, keys, h].T, dim=-1)
                out = out.index_put((queries,), weights @ v[b, keys, h])
        heads.append(out)
    return torch.stack(heads).view(B, H, N, -1).transpose(1, 2)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Row ``i`` attends to the keys ``j`` with ``mask[b, h, i, j]`` set; a row with no key outputs 0
    (Sparsifiner's ``masked_fill(-inf) -> softmax -> nan_to_num``). ``q`` ``[B, H, N, D]``."""
    B, H, N, _ = q.shape
    rows = []
    for b, h, i in itertools.product(range(B), range(H), range(N)):
        keys = mask[b, h, i].nonzero().flatten()
        if len(keys):
            rows.append(torch.softmax((q[b, h, i] @ k[b, h, keys].T) * scale, dim=-1) @ v[b, h, keys])
        else:
            rows.append(v.new_zeros(v.shape[-1]))
    return torch.stack(rows).view(B, H, N, -1)


def l2vit_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor | float, denom_min: float
) -> torch.Tensor:
    """L²ViT's enhanced linear attention in its quadratic form: ``o_i = tau sum_j a_ij v_j / max(sum_j a_ij, c)``
    with ``a_ij = relu(q_i) . relu(k_j)``; ``temperature`` per head (``H`` elements) or a scalar."""
    a = torch.relu(q) @ torch.relu(k).transpose(-1, -2)  # [B, H, N, Nk]
    tau = torch.as_tensor(temperature, dtype=q.dtype, device=q.device).reshape(-1, 1, 1)
    return (a @ v) * tau / a.sum(-1, keepdim=True).clamp(min=denom_min)


def inline_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """InLine attention in its quadratic form: weights ``(s/n) q_i.k_j - (s/n) q_i.kbar + 1/n``
    (each row sums to one; entries may be negative)."""
    n = k.shape[-2]
    weights = (scale / n) * (q @ k.transpose(-1, -2) - q @ k.mean(-2, keepdim=True).transpose(-1, -2)) + 1 / n
    return weights @ v


def boosted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boosts: list[tuple[torch.Tensor, torch.Tensor, float]],
    mass: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Explicit probabilities ``A`` per (batch, head); entries in ``rows x keys`` of each boost (bool masks)
    are multiplied by ``1 + amount`` (amounts of overlapping boosts add), not renormalised; ``O = A' V``.
    The mass is ``sum A[rows][:, keys]`` of the unboosted ``A``. ``q`` ``[B, N, H, D]``."""
    B, N, H, _ = q.shape
    outs, masses = [], []
    for b, h in itertools.product(range(B), range(H)):
        probs = torch.softmax((q[b, :, h] @ k[b, :, h].T) * scale, dim=-1)
        gain = torch.ones_like(probs)
        for rows, keys, amount in boosts:
            gain[rows.nonzero().flatten()[:, None], keys.nonzero().flatten()[None, :]] += amount
        outs.append((probs * gain) @ v[b, :, h])
        if mass is not None:
            masses.append(probs[mass[0]][:, mass[1]].sum())
    out = torch.stack(outs).view(B, H, N, -1).transpose(1, 2)
    return out, (torch.stack(masses).view(B, H) if mass is not None else None)
