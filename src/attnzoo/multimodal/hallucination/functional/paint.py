"""PAINT's dual-stream token sets (hasanar1f/PAINT, the ``modPAI`` fork of PAI), from the vision
tower's CLS attention.

Local tokens are the patches the CLS query attends to most at the FIRST ViT layer (top 25%, heads
summed); summary tokens are the IQR outliers of the CLS attention at the PENULTIMATE layer (the one
whose output LLaVA feeds the LLM), an adaptive number. A patch in both sets counts as summary only.
The official code also merges a "spatial" top-k whose ratio is 0 (it adds nothing; not offered) and
hard-wires 576 patches (here: whatever the rows hold, or ``num_patches``).
"""

from __future__ import annotations

import numpy as np
import torch

from attnzoo.errors import InvalidInputError

#: Share of the patches taken as local tokens (a function default in the official code; the
#: ``--top_token_ratio`` flag it also parses is never used).
PAINT_LOCAL_RATIO = 0.25
#: Summary tokens lie above Q3 + 1.5 * IQR.
PAINT_IQR_FENCE = 1.5


def paint_token_sets(
    cls_attn_layer0: torch.Tensor,
    cls_attn_penultimate: torch.Tensor,
    local_ratio: float = PAINT_LOCAL_RATIO,
    *,
    num_patches: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local, summary) patch indices (int64, ascending, 0-based over the patches), disjoint.

    Each input is the CLS query's post-softmax attention row of one ViT layer: ``[heads, keys]``
    (summed over heads here) or ``[keys]`` (already summed). The LAST ``num_patches`` keys are the
    patches (the official slice ``[-576:]``, which drops the CLS key); by default every key is a patch.
    """
    early = _patch_scores(cls_attn_layer0, num_patches, "cls_attn_layer0")
    late = _patch_scores(cls_attn_penultimate, num_patches, "cls_attn_penultimate")
    if early.shape != late.shape:
        raise InvalidInputError(
            f"the two layers' CLS rows cover different patch counts: {early.numel()} and {late.numel()}"
        )
    if not 0.0 < local_ratio <= 1.0:
        raise InvalidInputError(f"local_ratio must be in (0, 1], got {local_ratio}")
    n = early.numel()
    local = torch.topk(early, int(n * local_ratio)).indices
    summary = _iqr_outliers(late)
    local = local[~torch.isin(local, summary)]
    return local.sort().values, summary.sort().values


def _iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Indices of the scores above Q3 + 1.5 IQR: numpy's linear percentiles of the float32 values, the
    fence summed in float64 and compared in float32, as numpy 1.x (the official environment) does.

    The official code turns the outlier count into a ratio and back, ``int(n * (count / n))``, and
    takes that many top scores; for its 576 patches that is always the outliers themselves (for some
    other counts the round trip would drop the smallest outlier, which is not reproduced).
    """
    values = scores.detach().float().cpu().numpy()
    q1, q3 = np.percentile(values, [25, 75]).astype(np.float32)
    fence = np.float32(np.float64(q3) + PAINT_IQR_FENCE * np.float64(q3 - q1))
    return torch.from_numpy(np.flatnonzero(values > fence)).long().to(scores.device)


def _patch_scores(rows: torch.Tensor, num_patches: int | None, name: str) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor) or rows.ndim not in (1, 2) or rows.shape[-1] == 0:
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise InvalidInputError(f"{name} must be a [heads, keys] or [keys] CLS attention row, got {shape}")
    if num_patches is not None:
        if not 0 < num_patches <= rows.shape[-1]:
            raise InvalidInputError(f"num_patches={num_patches} does not fit {name}'s {rows.shape[-1]} keys")
        rows = rows[..., -num_patches:]
    return rows.sum(dim=0) if rows.ndim == 2 else rows
