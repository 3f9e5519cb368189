"""Multi-view 3D reconstruction on ShapeNet (3D-R2N2 subset): IoU at 0.3/0.4/0.5 and the max over
thresholds (the number papers report), per class and overall; optionally F-score@1%.

The data folder holds ``ShapeNetRendering/``, ``ShapeNetVox32/`` and the split file
``ShapeNet.json`` (or ``datasets/ShapeNet.json``, as in the official repositories). Test views are
the first ``n_views`` renderings, the official protocol.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from attnzoo._io import write_json, write_text
from attnzoo.errors import DatasetFormatError, InvalidOptionError
from attnzoo.evaluation.runner import EvalPlan, EvalSample, TaskEvaluator, check_limit, format_metric

THRESHOLDS = (0.3, 0.4, 0.5)


class MultiViewReconstructionEvaluator(TaskEvaluator):
    task = "multiview-3d-reconstruction"
    headline = ("iou", "fscore")

    @classmethod
    def plan(
        cls,
        data: str | os.PathLike,
        split: str | None,
        *,
        default_split: str = "test",
        limit: int | None,
        model: str,
        weights: Any,
        log: Callable[[str], None] = print,
        views: str | None = None,
        fscore: bool = False,
    ) -> EvalPlan:
        """One run per view count of ``views`` (the paper's sweep), each in its own ``views-N`` folder when there are several."""
        counts, split = view_counts(views), split or default_split
        runs = [
            (
                None if len(counts) == 1 else f"views-{n}",
                cls(data, split, limit=limit, n_views=n, with_fscore=fscore),
                {"views": n, "with_fscore": fscore},
            )
            for n in counts
        ]
        return EvalPlan(model, split, runs)  # type: ignore[arg-type]

    @classmethod
    def summary_files(cls, out: Path) -> tuple[Path, ...]:
        return (out / "sweep.json", out / "report.md")  # a sweep's own report.md: its runs write theirs in views-N/

    @classmethod
    def summarize(cls, results: dict[Any, dict[str, Any]], out: Path) -> str:
        by_views = {int(m["n_views"]): m for m in results.values()}
        write_json(out / "sweep.json", {str(n): m for n, m in sorted(by_views.items())})
        write_text(out / "report.md", sweep_report(by_views))
        return f"wrote {out / 'report.md'} (the view sweep)"

    def __init__(
        self,
        data: str | os.PathLike,
        split: str = "test",
        *,
        limit: int | None = None,
        n_views: int = 3,
        with_fscore: bool = False,
    ):
        from attnzoo.datasets.shapenet import ShapeNetDataset, find_split_file

        check_limit(limit)
        root = Path(data)
        if not root.is_dir():
            raise DatasetFormatError(f"dataset folder {root} does not exist")
        self.dataset = ShapeNetDataset(
            root / "ShapeNetRendering",
            root / "ShapeNetVox32",
            find_split_file(root),
            split=split,
            n_views=n_views,
            view_selection="first",
        )
        self.n_views, self.limit, self.with_fscore = n_views, limit, with_fscore

    def samples(self) -> list[EvalSample]:
        items = [
            EvalSample(f"{m.taxonomy_id}/{m.model_id}", [m.rendering_path(i) for i in range(self.n_views)], m)
            for m in self.dataset.samples
        ]
        return items[: self.limit] if self.limit else items

    def record(self, sample: EvalSample, result: Any) -> dict[str, Any]:
        from attnzoo.datasets.binvox import read_binvox
        from attnzoo.metrics.reconstruction import fscore, voxel_iou

        model = sample.target
        gt = read_binvox(model.voxel_path).voxels
        record = {
            "taxonomy_id": model.taxonomy_id,
            "taxonomy_name": model.taxonomy_name,
            "iou": [round(float(v), 6) for v in voxel_iou(result.probabilities, gt, THRESHOLDS)],
        }
        if self.with_fscore:
            record["fscore"] = round(float(fscore(result.probabilities, gt)), 6)
        return record

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from attnzoo.metrics.reconstruction import summarize_iou

        summary = summarize_iou(
            np.array([r["iou"] for r in records], dtype=float),
            [r["taxonomy_id"] for r in records],
            THRESHOLDS,
            taxonomy_names={r["taxonomy_id"]: r["taxonomy_name"] for r in records},
        )
        metrics = {
            "n_views": self.n_views,
            "iou": round(float(summary["max_iou"]), 4),
            "best_threshold": summary["best_threshold"],
            "iou_per_threshold": {
                str(t): round(float(v), 4) for t, v in zip(THRESHOLDS, summary["overall"], strict=True)
            },
            "per_class": _per_class(summary),
        }
        if self.with_fscore:
            metrics["fscore"] = round(float(np.mean(np.array([r["fscore"] for r in records], dtype=float))), 4)
        return metrics

    def report(self, metrics: dict[str, Any]) -> str:
        lines = [
            f"Views: **{metrics['n_views']}**. IoU (max over thresholds {', '.join(map(str, THRESHOLDS))}, as papers report): "
            f"**{format_metric(metrics['iou'])}** at {metrics['best_threshold']}"
            + (f"; F-score@1%: **{format_metric(metrics['fscore'])}**" if "fscore" in metrics else ""),
            "",
            "| class | n | " + " | ".join(f"IoU@{t}" for t in THRESHOLDS) + " |",
            "|---|---|" + "---|" * len(THRESHOLDS),
        ]
        for row in metrics["per_class"]:
            lines.append(f"| {row['name']} | {row['n']} | " + " | ".join(format_metric(v) for v in row["iou"]) + " |")
        return "\n".join(lines) + "\n"


def view_counts(text: str | None) -> list[int]:
    """``--views 1,3,5`` as sorted distinct counts (3, the official protocol, when not given)."""
    if text is None:
        return [3]
    try:
        counts = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InvalidOptionError(f"--views takes comma-separated view counts, e.g. 1,2,3; got {text!r}") from None
    if not counts or any(not 1 <= n <= 24 for n in counts):
        raise InvalidOptionError(f"--views: each count must be 1..24 (ShapeNet has 24 renderings), got {text!r}")
    return sorted(set(counts))


def _per_class(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "taxonomy_id": tid,
            "name": row["taxonomy_name"],
            "n": int(row["n_samples"]),
            "iou": [round(float(v), 4) for v in row["iou"]],
        }
        for tid, row in summary["per_class"].items()
    ]


def sweep_report(results: dict[int, dict[str, Any]]) -> str:
    """The paper's table: IoU (and F-score) per number of views."""
    counts = sorted(results)
    lines = [
        "# Multi-view 3D reconstruction: view sweep",
        "",
        "| views | " + " | ".join(map(str, counts)) + " |",
        "|---|" + "---|" * len(counts),
        "| IoU | " + " | ".join(format_metric(results[n]["iou"]) for n in counts) + " |",
    ]
    if all("fscore" in results[n] for n in counts):
        lines.append("| F-score@1% | " + " | ".join(format_metric(results[n]["fscore"]) for n in counts) + " |")
    return "\n".join(lines) + "\n"
