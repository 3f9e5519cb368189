"""Top-k accuracy, from logits or from ranked predictions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnzoo.errors import InvalidInputError


def topk_accuracy_from_ranked(
    ranked: Sequence[Sequence[int]] | np.ndarray, targets: Sequence[int] | np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Percent of samples whose target is among their first ``k`` ranked predictions.

    ``ranked[i]`` lists class indices best first; it may be shorter than ``k`` (a model
    with fewer classes), in which case all of it counts.
    """
    targets = np.asarray(targets)
    if len(ranked) != len(targets):
        raise InvalidInputError(f"{len(ranked)} predictions but {len(targets)} targets")
    if len(targets) == 0:
        raise InvalidInputError("top-k accuracy of zero samples is undefined")
    result = {}
    for k in ks:
        if k < 1:
            raise InvalidInputError(f"k must be >= 1, got {k}")
        hits = sum(int(t) in list(r[:k]) for r, t in zip(ranked, targets.tolist()))
        result[k] = 100.0 * hits / len(targets)
    return result


def topk_accuracy(
    logits: np.ndarray, targets: Sequence[int] | np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Percent top-k accuracy from an ``N x C`` score matrix (torch tensors are accepted)."""
    scores = np.asarray(logits.detach().cpu() if hasattr(logits, "detach") else logits, dtype=np.float64)
    if scores.ndim != 2:
        raise InvalidInputError(f"logits must be N x C, got shape {scores.shape}")
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, : max(ks)]
    return topk_accuracy_from_ranked(ranked, targets, ks)
