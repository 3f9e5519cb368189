"""Whole-slide classification on pre-extracted feature bags: accuracy (%), macro AUC, micro and
macro F1 (the official ACMIL code's "F1" is micro-F1, which equals accuracy; both are reported).

``--data`` is any feature layout :func:`attnzoo.datasets.mil_features.read_feature_bags` reads,
with labels inside (ACMIL's HDF5) or in ``labels.csv`` (``slide_id,label``) beside it.
``--split test`` takes the slides whose name contains ``test`` (Camelyon16's naming; with other
names it is an error rather than a silent evaluation on every slide); ``--split all`` takes every
slide; ``--split FILE`` the test set of an official split file (ACMIL's ``split_{seed}.json`` or
BRACS's ``bracs.csv``, whose labels it also uses).

The model is built for the data: the features' width, and the number of classes of the labels (BRACS's
split file: its 3 classes; otherwise the highest label + 1, at least 2). A local checkpoint given as
``--weights`` (a training run's ``model.safetensors`` or ``best.pt``) sets the class count and the widths
it was trained with; a model whose classes do not fit the labels is refused before any slide runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from attnzoo.errors import AttnzooError, DatasetFormatError
from attnzoo.evaluation.runner import EvalPlan, EvalSample, TaskEvaluator, check_limit, format_metric

#: The classes of BRACS's split file as :func:`attnzoo.datasets.mil_features.read_split_file` maps them.
BRACS_CLASSES = 3


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
        (512 for ResNet18's, 1024 for CLAM's truncated ResNet50, ...) and the labels' classes; a local
        checkpoint's own class count and widths (read from its tensors' shapes) take precedence."""
        plan = super().plan(
            data, split, default_split=default_split, limit=limit, model=model, weights=weights, log=log, **options
        )
        evaluator = cast(WSIClassificationEvaluator, plan.runs[0][1])
        if evaluator.ids:
            built = {"in_dim": evaluator.bags[evaluator.ids[0]].dim, "n_classes": evaluator.classes()[0]}
            plan.model_kwargs = {**built, **checkpoint_dims(model, weights, built)}
        return plan

    def __init__(self, data: str | os.PathLike, split: str = "test", *, limit: int | None = None):
        from attnzoo.datasets.mil_features import read_feature_bags, read_slide_labels, read_split_file

        check_limit(limit)
        root = Path(data)
        if not root.exists():
            raise DatasetFormatError(f"dataset folder {root} does not exist")
        labels_csv = (root if root.is_dir() else root.parent) / "labels.csv"
        self.root = root
        self.labels_csv = labels_csv if labels_csv.is_file() else None
        self.bags = read_feature_bags(root, labels=read_slide_labels(labels_csv) if self.labels_csv else None)
        self.exact_classes: int | None = None  # the classes the labels' source defines, when it does
        self._samples: list[EvalSample] | None = None
        ids = sorted(self.bags)
        if split.endswith(".csv"):  # BRACS's split file maps its 7 subtypes to 3 classes
            self.exact_classes = BRACS_CLASSES
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
        """The slides to evaluate, each read once (the plan reads their labels before the model is built)."""
        if self._samples is None:
            out = []
            for slide in self.ids:
                bag = self.bags[slide]
                if bag.label is None:
                    raise DatasetFormatError(
                        f"slide {slide} has no label: put labels.csv (slide_id,label) beside the features"
                    )
                out.append(EvalSample(slide, bag, bag.label))
            self._samples = out
        return self._samples

    def classes(self) -> tuple[int, bool]:
        """(number of classes, exact): BRACS's split file defines its 3 classes (exact); otherwise the highest
        label of ``labels.csv`` / the split file and of the evaluated slides + 1, at least 2 (a lower bound: a
        class may have no slide here)."""
        if self.exact_classes is not None:
            return self.exact_classes, True
        labels = [*self.bags.labels.values(), *(int(s.target) for s in self.samples())]
        return max(2, max(labels, default=0) + 1), False

    def check_model(self, model: Any) -> None:
        """A model with fewer classes than the labels reach (or, for BRACS, other classes) is refused: its
        probabilities could not be scored against them."""
        n_classes = getattr(model, "n_classes", None)
        if not isinstance(n_classes, int) or isinstance(n_classes, bool):
            return
        needed, exact = self.classes()
        if n_classes < needed or (exact and n_classes != needed):
            labels = "BRACS's split file has" if exact else f"the labels reach class {needed - 1}:"
            raise DatasetFormatError(
                f"{self.root}: {labels} {needed} classes, but the model predicts {n_classes}; evaluate a model "
                f"trained on these classes (--weights: the checkpoint of such a run; its class count is read from it)"
            )

    def run_settings(self, pipe: Any, *, batch_size: int) -> dict[str, Any]:
        """Recorded so that a run whose probabilities were stored rounded (before they were kept whole) is not
        resumed into a mix of both; and the content of ``labels.csv`` beside the features, so that a resume
        after it was edited is refused rather than scored against the old labels of the slides done."""
        from attnzoo.weights import sha256_file

        settings: dict[str, Any] = {"probabilities": "full precision"}
        labels_csv = getattr(self, "labels_csv", None)
        if labels_csv is not None:
            settings["labels_sha256"] = sha256_file(labels_csv)
        return settings

    def record(self, sample: EvalSample, result: Any) -> dict[str, Any]:
        # full precision: a confident model's probabilities round to exactly 0 or 1, and AUC would score
        # the tied slides as half-ordered where the official code (raw softmax) orders them
        return {"target": int(sample.target), "probabilities": [float(p) for p in result.probabilities]}

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from attnzoo.metrics.mil import mil_metrics

        probabilities = np.array([r["probabilities"] for r in records], dtype=float)  # a null (NaN) stays NaN
        m = mil_metrics(probabilities, np.array([r["target"] for r in records]))
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
            f"| {name} | {format_metric(metrics[key])} |\n" for name, key in rows if key in metrics
        )


def checkpoint_dims(model: str, weights: Any, built: dict[str, Any]) -> dict[str, int]:
    """The settings a local checkpoint was trained with (``n_classes``, ``inner_dim``, ``n_token``,
    ``attn_dim``), read from its tensors' shapes, where they differ from what ``model`` builds with the keywords
    ``built`` (so a model that fixes one, as ABMIL its single branch, is not given it). Empty for weights that are
    not a local file, or that cannot be read (the pipeline then says why)."""
    import attnzoo
    from attnzoo.weights import load_checkpoint_file, unwrap_state_dict

    if not isinstance(weights, (str, os.PathLike)) or not os.path.isfile(weights):
        return {}
    try:
        state = unwrap_state_dict(load_checkpoint_file(weights))
    except AttnzooError:
        return {}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    dims: dict[str, int] = {}
    reduction = shapes.get("dimreduction.fc1.weight")
    if reduction is not None and len(reduction) == 2:
        dims["inner_dim"] = reduction[0]
    head = shapes.get("Slide_classifier.fc.weight") or shapes.get("classifier.fc.weight")  # ours / official ABMIL
    if head is not None and len(head) == 2:
        dims["n_classes"] = head[0]
    gate = shapes.get("attention.attention_weights.weight")  # the gated attention: [n_token, attn_dim]
    if gate is not None and len(gate) == 2:
        dims["n_token"], dims["attn_dim"] = gate
    elif len(shapes.get("q", ())) == 3:  # the multi-head variant's queries: [1, n_token, inner_dim]
        dims["n_token"] = shapes["q"][1]
    if not dims:
        return {}
    try:
        default = attnzoo.create_model(model, weights="none", **built)
    except (AttnzooError, TypeError):
        return {}
    return {k: int(v) for k, v in dims.items() if hasattr(default, k) and getattr(default, k) != v}
