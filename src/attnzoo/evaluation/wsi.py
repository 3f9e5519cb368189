"""Whole-slide classification on pre-extracted feature bags: accuracy (%), macro AUC, micro and
macro F1 (the official ACMIL code's "F1" is micro-F1, which equals accuracy; both are reported).

``--data`` is any feature layout :func:`attnzoo.datasets.mil_features.read_feature_bags` reads,
with labels inside (ACMIL's HDF5) or in ``labels.csv`` (``slide_id,label``) beside it.
``--split test`` takes the slides whose name contains ``test`` (Camelyon16's naming; with other
names it is an error rather than a silent evaluation on every slide); ``--split all`` takes every
slide; ``--split FILE`` the test set of an official split file (ACMIL's ``split_{seed}.json`` or
BRACS's ``bracs.csv``, whose labels it also uses).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from attnzoo.errors import DatasetFormatError
from attnzoo.evaluation.runner import EvalPlan, EvalSample, TaskEvaluator


class WSIClassificationEvaluator(TaskEvaluator):
    task = "wsi-classification"
    headline = ("accuracy", "auc", "f1_macro")

    @classmethod
    def plan(
        cls,
        data: str | os.PathLike,
        split: str | None,
        *,
        default_split: str,
        limit: int | None,
        model: str,
        weights: Any,
        log: Callable[[str], None] = print,
        **options: Any,
    ) -> EvalPlan:
        """A model named for the evaluation is built for the width of the features found in ``--data``
        (512 for ResNet18's, 1024 for CLAM's truncated ResNet50, ...)."""
        plan = super().plan(
            data, split, default_split=default_split, limit=limit, model=model, weights=weights, log=log, **options
        )
        evaluator = plan.runs[0][1]
        plan.model_kwargs = {"in_dim": evaluator.bags[evaluator.ids[0]].dim} if evaluator.ids else {}
        return plan

    def __init__(self, data: str | os.PathLike, split: str = "test", *, limit: int | None = None):
        from attnzoo.datasets.mil_features import read_feature_bags, read_slide_labels, read_split_file

        root = Path(data)
        if not root.exists():
            raise DatasetFormatError(f"dataset folder {root} does not exist")
        labels_csv = (root if root.is_dir() else root.parent) / "labels.csv"
        self.bags = read_feature_bags(root, labels=read_slide_labels(labels_csv) if labels_csv.is_file() else None)
        ids = sorted(self.bags)
        if split.endswith((".json", ".csv")):
            self.bags = self.bags.split(read_split_file(split))["test"]
            ids = list(self.bags)
        elif split == "test":
            ids = [s for s in ids if "test" in s]
            if not ids:
                raise DatasetFormatError(
                    f"{root}: no slide id contains 'test' (Camelyon16's naming of its test set); "
                    "pass the official split file (--split split_4.json / bracs.csv) or --split all"
                )
        elif split != "all":
            raise DatasetFormatError(
                f"--split for wsi-classification is 'test', 'all' or a split file (.json/.csv), got {split!r}"
            )
        self.ids = ids[:limit] if limit else ids

    def samples(self) -> list[EvalSample]:
        out = []
        for slide in self.ids:
            bag = self.bags[slide]
            if bag.label is None:
                raise DatasetFormatError(
                    f"slide {slide} has no label: put labels.csv (slide_id,label) beside the features"
                )
            out.append(EvalSample(slide, bag, bag.label))
        return out

    def run_settings(self, pipe: Any, *, batch_size: int) -> dict[str, Any]:
        """Recorded so that a run whose probabilities were stored rounded (before they were kept whole) is not
        resumed into a mix of both."""
        return {"probabilities": "full precision"}

    def record(self, sample: EvalSample, result: Any) -> dict[str, Any]:
        # full precision: a confident model's probabilities round to exactly 0 or 1, and AUC would score
        # the tied slides as half-ordered where the official code (raw softmax) orders them
        return {"target": int(sample.target), "probabilities": [float(p) for p in result.probabilities]}

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from attnzoo.metrics.mil import mil_metrics

        m = mil_metrics(np.array([r["probabilities"] for r in records]), np.array([r["target"] for r in records]))
        return {
            k: (round(float(v), 4) if isinstance(v, float) else v)
            for k, v in m.items()
            if not isinstance(v, (list, np.ndarray))
        }

    def report(self, metrics: dict[str, Any]) -> str:
        rows = [
            ("accuracy (%)", "accuracy"),
            ("AUC (macro one-vs-rest)", "auc"),
            ("F1 micro (the official code's F1)", "f1_micro"),
            ("F1 macro", "f1_macro"),
        ]
        return "| metric | value |\n|---|---|\n" + "".join(
            f"| {name} | {metrics[key]:.4f} |\n" for name, key in rows if key in metrics
        )
