"""Image classification evaluation: ImageNet (both layouts) or any ImageFolder, top-1/top-5.

The weights of an ``attnzoo train image-classification`` run are scored by the run's class names: the data's
classes must be among the run's (matched as the run's own validation matched its val split: by class folder name
or id, or by number for ImageNetV2's folders ``0/`` .. ``999/``), and a target is the index of its class among the
run's."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from attnzoo._values import listed
from attnzoo.datasets.image_folder import ClassificationSamples, align_classes, class_keys
from attnzoo.datasets.imagenet import imagenet_synsets, read_classification_folder
from attnzoo.errors import DatasetFormatError
from attnzoo.evaluation.runner import EvalPlan, EvalSample, TaskEvaluator, check_limit, format_metric
from attnzoo.metrics.classification import topk_accuracy_from_ranked

_logger = logging.getLogger(__name__)


class ClassificationEvaluator(TaskEvaluator):
    task = "image-classification"
    headline = ("top1", "top5")

    def __init__(
        self,
        data: str | os.PathLike,
        split: str = "val",
        *,
        limit: int | None = None,
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        """``classes``: the model's class names, in the order of its outputs (a training run's): the data's
        classes are matched to them by name (:meth:`use_classes`)."""
        check_limit(limit)
        self.dataset = read_classification_folder(data, split)
        self.split = split
        self.limit = limit
        self.log = log or _logger.warning
        self.model_classes: list[str] | None = None
        if classes is not None:
            self.use_classes(classes)
        if num_classes is not None:
            self.check_num_classes(num_classes)

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
        """As :meth:`TaskEvaluator.plan`; the weights of a training run have their classes checked against the
        data's here, before the model loads."""
        from attnzoo.factory import trained_run

        run = trained_run(weights)  # a broken run record is refused before the data is read
        plan = super().plan(
            data, split, default_split=default_split, limit=limit, model=model, weights=weights, log=log, **options
        )
        evaluator = cast(ClassificationEvaluator, plan.runs[0][1])
        evaluator.log = log
        if run is not None:
            evaluator.use_classes(run.classes, source=str(run.config), class_ids=run.class_ids)
        return plan

    def check_model(self, model: Any) -> None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        names = cfg.get("label_names")
        if cfg.get("training_run") and names:
            self.use_classes(names, source=str(cfg["training_run"]), class_ids=cfg.get("label_ids"))
        num_classes = getattr(model, "num_classes", None)
        if num_classes:
            self.check_num_classes(int(num_classes))

    def use_classes(
        self, classes: Sequence[str], *, source: str = "the model", class_ids: Sequence[str] | None = None
    ) -> None:
        """Score the data by ``classes`` (the model's outputs, e.g. a training run's classes from its config.yaml),
        matched as the run's training matched its val split (:func:`~attnzoo.datasets.image_folder.align_classes`:
        by class id -- ``class_ids``, e.g. ImageNet's WordNet ids, else the names -- or, for folders ``0 .. K-1``,
        by number); each sample's target becomes its class's index among ``classes``. A data class ``classes``
        lacks is refused (:class:`DatasetFormatError`); ``classes`` the data has no sample of are said through
        ``log`` (a test split may lack some)."""
        classes = list(classes)
        ids = _class_ids(classes, class_ids)
        if self.model_classes is not None:
            if self.model_classes != classes:
                raise DatasetFormatError(f"the model's classes ({source}) differ from those already given")
            return
        data = self.dataset
        if list(data.classes) == classes and class_keys(data) == ids:
            self.model_classes = classes
            return
        reference = ClassificationSamples([], classes, "training-run", Path(source), class_ids=ids)
        self.dataset, missing = align_classes(data, reference, split=self.split)
        if missing:
            self.log(
                f"{data.root} has no images of {len(missing)} of the model's {len(classes)} classes "
                f"({listed(missing, 8)}); the others are scored (targets by the classes of {source})"
            )
        self.model_classes = classes

    def run_settings(self, pipe: Any, *, batch_size: int) -> dict[str, Any]:
        """A training run's weights (or a class count read from a checkpoint's classifier): what they brought,
        and the preprocessing used."""
        cfg = getattr(getattr(pipe, "model", None), "pretrained_cfg", None) or {}
        note = cfg.get("weights_note")
        if not note:
            return {}
        data_config = getattr(pipe, "data_config", None) or {}
        names = list(cfg["label_names"]) if cfg.get("training_run") and cfg.get("label_names") else None
        if names is not None and len(names) > 64:  # ImageNet's 1000 names: their count and digest
            digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
            names = [f"{len(names)} classes, sha256 {digest}"]
        return {
            "weights_note": note,
            "classes": names,
            "input_size": list(data_config.get("input_size", ())) or None,
            "crop_pct": data_config.get("crop_pct"),
        }

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


def _class_ids(classes: list[str], class_ids: Sequence[str] | None) -> list[str]:
    """The ids that identify a model's ``classes`` (as the training split's ``class_ids``): those given, ImageNet-1k's
    WordNet ids for its 1000 names (a run that did not record its ids: the names repeat, e.g. two "crane"), else
    the names themselves (the class folder names of an ImageFolder run)."""
    if class_ids is not None and len(class_ids) == len(classes):
        return list(class_ids)
    wnids, names = imagenet_synsets()
    return list(wnids) if len(classes) == len(names) and tuple(classes) == names else classes
