"""Image classification evaluation: ImageNet (both layouts) or any ImageFolder, top-1/top-5."""

from __future__ import annotations

import os
from typing import Any

from attnzoo.datasets.imagenet import read_classification_folder
from attnzoo.errors import DatasetFormatError
from attnzoo.evaluation.runner import EvalSample, TaskEvaluator, check_limit, format_metric
from attnzoo.metrics.classification import topk_accuracy_from_ranked


class ClassificationEvaluator(TaskEvaluator):
    task = "image-classification"
    headline = ("top1", "top5")

    def __init__(
        self, data: str | os.PathLike, split: str = "val", *, limit: int | None = None, num_classes: int | None = None
    ):
        check_limit(limit)
        self.dataset = read_classification_folder(data, split)
        self.limit = limit
        if num_classes is not None:
            self.check_num_classes(num_classes)

    def check_model(self, model: Any) -> None:
        num_classes = getattr(model, "num_classes", None)
        if num_classes:
            self.check_num_classes(int(num_classes))

    def check_num_classes(self, num_classes: int) -> None:
        """The model's classes must be the dataset's: a 21k model scored on ImageNet-1k indices, or a
        1000-class model on two folders, would report a meaningless accuracy."""
        needed = len(self.dataset.classes)
        if needed != num_classes:
            what = (
                "ImageNet-1k's 1000 classes"
                if self.dataset.layout.startswith("imagenet")
                else f"{needed} classes (class index = position in sorted folder names, or the folder's number "
                "for folders 0 .. N-1)"
            )
            raise DatasetFormatError(
                f"{self.dataset.root} has {what} but the model predicts {num_classes}; "
                "evaluate a model trained on exactly these classes"
            )

    def samples(self) -> list[EvalSample]:
        root = self.dataset.root
        items = [EvalSample(str(path.relative_to(root)), path, target) for path, target in self.dataset.samples]
        return items[: self.limit] if self.limit else items

    def record(self, sample: EvalSample, result: list[Any]) -> dict[str, Any]:
        return {
            "target": sample.target,
            "pred": [p.index for p in result],
            "scores": [round(p.score, 6) for p in result],
        }

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        acc = topk_accuracy_from_ranked([r["pred"] for r in records], [r["target"] for r in records], ks=(1, 5))
        return {"top1": round(acc[1], 4), "top5": round(acc[5], 4), "layout": self.dataset.layout}

    def report(self, metrics: dict[str, Any]) -> str:
        return (
            "| metric | value |\n|---|---|\n"
            + f"| top-1 (%) | {format_metric(metrics['top1'], '.2f')} |\n| top-5 (%) | {format_metric(metrics['top5'], '.2f')} |\n"
        )
