"""Slide-level MIL metrics as the ACMIL code reports them (Step3_WSI_classification_ACMIL.py).

Per epoch, on the softmax of every bag's slide logits and the bag labels:

* **accuracy**: ``timm.utils.accuracy`` top-1, in **percent**.
* **AUC**: ``torchmetrics.AUROC(task='multiclass', num_classes=C)``, i.e. one-vs-rest per class,
  macro average (exact, no binning). For two classes with probabilities that sum to one this is
  the ordinary AUC; here the binary AUC is always taken on the positive class's column.
* **F1**: ``torchmetrics.F1Score(task='multiclass', num_classes=C)``. The wrapper's default is
  ``average='micro'``, which for single-label predictions equals accuracy (as a fraction). The
  official "F1" is therefore micro-F1; :func:`mil_metrics` reports it and the macro-F1 too.
* Model selection: the epoch with the highest validation ``F1 + AUC`` (``selection_score``).

Pure numpy; torch tensors are accepted.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from attnzoo._values import to_numpy
from attnzoo.errors import InvalidInputError

__all__ = ["F1_NOTE", "binary_auc", "mil_metrics"]

F1_NOTE = (
    "the official ACMIL code's 'F1' is torchmetrics F1Score(task='multiclass') with its default "
    "average='micro', which equals accuracy/100 for single-label predictions: compare it with f1_micro; "
    "f1_macro is the per-class F1 averaged over the classes present in labels or predictions"
)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties getting the mean of their positions."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(values)] - 1
    mean_rank = (first + last) / 2.0 + 1.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def binary_auc(scores: Any, positive: Any) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (ties count half).

    NaN when there is no positive or no negative sample.
    """
    s = to_numpy(scores, "scores").astype(np.float64).ravel()
    pos = to_numpy(positive, "positive").astype(bool).ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mil_metrics(probabilities: Any, labels: Any, *, num_classes: int | None = None) -> dict[str, Any]:
    """Accuracy (percent), macro one-vs-rest AUC, micro- and macro-F1 of slide predictions.

    ``probabilities``: ``[N, C]`` softmax probabilities (values in [0, 1]; pass
    ``logits.softmax(-1)``, as the official code does); ``labels``: ``[N]`` class indices.

    Returns ``accuracy`` (percent), ``auc``, ``auc_per_class``, ``f1_micro`` (the official "F1"),
    ``f1_macro``, ``selection_score`` (``f1_micro + auc``, the official validation criterion),
    ``num_samples`` and ``note``. A class without positive or without negative samples has no
    AUC: as torchmetrics does, it scores 0 and still counts in the macro average (a warning is
    issued and ``auc_per_class`` holds NaN for it). With two classes the AUC is then NaN (the ordinary
    AUC is undefined; torchmetrics would report 0).
    """
    probs = to_numpy(probabilities, "probabilities")
    y = to_numpy(labels, "labels")
    if probs.ndim != 2:
        raise InvalidInputError(f"probabilities must be [N, C], got shape {probs.shape}")
    n, c = probs.shape
    if num_classes is not None and num_classes != c:
        raise InvalidInputError(f"num_classes={num_classes} but probabilities have {c} columns")
    if c < 2:
        raise InvalidInputError(f"MIL metrics need at least 2 classes, got {c} probability columns")
    if y.ndim != 1 or len(y) != n:
        raise InvalidInputError(f"labels must be [N] with N={n} (one per row of probabilities), got shape {y.shape}")
    if n == 0:
        raise InvalidInputError("metrics of zero bags are undefined")
    if not np.issubdtype(probs.dtype, np.number) or np.issubdtype(probs.dtype, np.complexfloating):
        raise InvalidInputError(f"probabilities must be real numbers, got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    if not np.isfinite(probs).all():
        raise InvalidInputError("probabilities contain NaN or infinite values")
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise InvalidInputError(
            "probabilities must lie in [0, 1]: pass softmax probabilities (logits.softmax(-1)), "
            "as the official evaluation does"
        )
    if y.dtype == bool or not (
        np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))
    ):
        raise InvalidInputError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= c:
        raise InvalidInputError(f"labels must lie in [0, {c - 1}], got values from {y.min()} to {y.max()}")

    pred = probs.argmax(axis=1)
    correct = pred == y
    accuracy = 100.0 * float(correct.mean())

    per_class = [binary_auc(probs[:, k], y == k) for k in range(c)]
    if c == 2:
        auc = per_class[1]
    else:
        auc = float(np.mean([0.0 if np.isnan(a) else a for a in per_class]))
    undefined = [k for k, a in enumerate(per_class) if np.isnan(a)]
    if undefined:
        warnings.warn(
            f"AUC is undefined for class(es) {undefined} (no positive or no negative sample); "
            + ("the binary AUC is NaN" if c == 2 else "they count as 0 in the macro average, as torchmetrics does"),
            UserWarning,
            stacklevel=2,
        )

    classes = np.arange(c)
    tp = np.array([np.sum(correct & (y == k)) for k in classes], dtype=np.float64)
    fp = np.array([np.sum((pred == k) & (y != k)) for k in classes], dtype=np.float64)
    fn = np.array([np.sum((pred != k) & (y == k)) for k in classes], dtype=np.float64)
    f1_micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
    seen = (tp + fp + fn) > 0
    denom = 2 * tp + fp + fn
    f1_per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    f1_macro = float(f1_per_class[seen].mean())

    return {
        "accuracy": accuracy,
        "auc": auc,
        "auc_per_class": per_class,
        "f1_micro": f1_micro,
        "f1_macro": f1_macro,
        "selection_score": f1_micro + auc,
        "num_samples": int(n),
        "note": F1_NOTE,
    }
