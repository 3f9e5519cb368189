"""The whole-slide classification recipe (ACMIL / ABMIL on pre-extracted patch features), as the
official ``Step3_WSI_classification_ACMIL.py``: one bag per step, the ACMIL loss (branch CE + slide
CE + branch diversity), model selection by validation micro-F1 + AUC, test metrics at that epoch,
several seeds reported as mean ± sd.

    attnzoo train wsi-classification --model acmil_ga --data feats.h5 --out runs/acmil --config acmil \\
        'split=splits/camelyon/split_{seed}.json' labels=dataset_csv/camelyon16.csv

As the official script, each seed reads its own split file (``{seed}`` in ``split``); one fixed file
for several seeds is allowed, with a warning (the spread then covers initialisation only). Slides a
split names but the features lack are an error listing them (``allow_missing=true`` leaves them out
with a warning).
"""

from __future__ import annotations

import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attnzoo._io import write_json
from attnzoo._placement import resolve_device
from attnzoo.errors import DatasetFormatError, InvalidOptionError
from attnzoo.training.config import TrainConfig, recipe_config
from attnzoo.training.engine import Trainer, check_run_folder, latest_checkpoint, run_inputs

__all__ = ["train_wsi_classification"]

RECIPE_DEFAULTS = {
    "split": None,
    "labels": None,
    "dataset": "camelyon16",
    "n_classes": None,
    "seeds": None,
    "val_fraction": 0.1,
    "allow_missing": False,
}


class _Bags(Dataset):
    def __init__(self, bags: Any, ids: list[str]):
        self.bags, self.ids = bags, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        bag = self.bags[self.ids[i]]
        if bag.label is None:
            raise DatasetFormatError(f"slide {bag.slide_id} has no label (pass labels=CSV)")
        return bag.features, torch.tensor(bag.label)


def _one(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return items[0]


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    from attnzoo.vision.acmil import acmil_loss

    features, label = batch
    return acmil_loss(model(features), label.view(1)).total


def evaluate_bags(model: torch.nn.Module, bags: Any, ids: list[str], device: torch.device) -> dict[str, float]:
    """The official metrics of a set of slides: accuracy (%), macro AUC, micro and macro F1, and the
    selection score (micro-F1 + AUC)."""
    from attnzoo.metrics.mil import mil_metrics

    probs, labels = [], []
    for slide in ids:
        bag = bags[slide]
        probs.append(torch.softmax(model(bag.features.to(device)).slide_logits.float(), -1).cpu()[0])
        labels.append(bag.label)
    metrics = mil_metrics(torch.stack(probs).numpy(), np.array(labels))
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _split_path(extra: dict[str, Any], seed: int) -> Path:
    return Path(str(extra["split"]).replace("{seed}", str(seed)))


def _split(bags: Any, extra: dict[str, Any], seed: int) -> dict[str, list[str]]:
    """The official split file (``{seed}`` in its name: this seed's), else ACMIL's rule for other
    seeds: names with 'test' are the test set, the rest split 90/10 at random."""
    from attnzoo.datasets.mil_features import read_split_file

    if extra["split"]:
        split = read_split_file(
            _split_path(extra, seed), n_classes=int(extra["n_classes"] or 3), labels_csv=extra["labels"]
        )
        parts = bags.split(split, strict=not extra["allow_missing"])
        return {name: list(parts[name]) for name in ("train", "val", "test")}
    ids = sorted(bags)
    test = [s for s in ids if "test" in s]
    rest = [s for s in ids if "test" not in s]
    random.Random(seed).shuffle(rest)
    n_val = max(1, int(round(len(rest) * float(extra["val_fraction"]))))
    return {"train": rest[n_val:], "val": rest[:n_val], "test": test}


def _labels(extra: dict[str, Any], seed: int, data: str | os.PathLike) -> dict[str, int] | None:
    """The slide labels: ``labels=`` a CSV, else BRACS's split CSV, else ``labels.csv`` beside the features
    (what ``attnzoo extract wsi-features`` writes, and what ``attnzoo eval`` reads), else the feature file's own."""
    from attnzoo.datasets.mil_features import read_bracs_csv, read_slide_labels

    if extra["labels"]:
        return read_slide_labels(extra["labels"])
    if extra["split"] and str(extra["split"]).endswith(".csv"):
        return read_bracs_csv(_split_path(extra, seed), int(extra["n_classes"] or 3)).labels
    root = Path(data)
    beside = (root if root.is_dir() else root.parent) / "labels.csv"
    return read_slide_labels(beside) if beside.is_file() else None


def train_wsi_classification(
    model: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | TrainConfig | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    weights: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    device: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train on feature bags (any layout :func:`attnzoo.datasets.mil_features.read_feature_bags`
    reads); with ``seeds`` one run per seed under ``out/seed-<s>`` and ``summary.json`` (mean ± sd).
    ``overwrite`` discards an earlier run in ``out`` (else refused, unless ``resume``); resuming several
    seeds starts afresh a seed killed before its first checkpoint."""
    import attnzoo
    from attnzoo.datasets.mil_features import read_feature_bags

    base = recipe_config(config or "acmil", overrides, RECIPE_DEFAULTS, "wsi-classification")
    seeds = base.extra["seeds"] or [base.seed]
    modes = _seed_modes(out, [int(s) for s in seeds], resume, overwrite)
    folder: dict[str, Any] = {"data": data, "inputs": run_inputs(config, weights, base)}
    # several seeds: the summary beside the seeds' folders; their files are checked (and discarded) by folder
    earlier = (
        check_run_folder(out, resume=resume, overwrite=overwrite, outputs=("summary.json",), **folder)
        if len(seeds) > 1
        else []
    )
    for run_out, (seed_resume, seed_overwrite) in modes.items():
        check_run_folder(run_out, resume=seed_resume, overwrite=seed_overwrite, outputs=_OUTPUTS, **folder)
    for path in earlier if overwrite else ():
        path.unlink(missing_ok=True)
    bags = read_feature_bags(data, labels=_labels(base.extra, int(seeds[0]), data))
    if base.extra["split"] and len(seeds) > 1 and "{seed}" not in str(base.extra["split"]):
        warnings.warn(
            f"all {len(seeds)} seeds use the one split file {base.extra['split']}, so their spread covers the "
            "initialisation only; ACMIL's protocol gives each seed its own (split=.../split_{seed}.json)",
            stacklevel=2,
        )
    runs = {}
    for seed in seeds:
        cfg = TrainConfig(**{**base.to_dict(), "seed": int(seed), "extra": dict(base.extra)})
        split = _split(bags, cfg.extra, int(seed))
        if not split["train"]:
            raise DatasetFormatError(f"{data}: no training slides in the split")
        label_of = {s: bags[s].label for part in split.values() for s in part}  # reads each bag once
        unlabelled = [s for s, label in label_of.items() if label is None]
        if unlabelled:
            raise DatasetFormatError(
                f"{data}: {len(unlabelled)} slide(s) have no label, e.g. {', '.join(unlabelled[:5])}: "
                "pass labels=CSV (slide_id,label), or a split file that carries them"
            )
        labels = sorted({label_of[s] for s in split["train"]})
        n_classes = int(cfg.extra["n_classes"] or (max(labels) + 1))
        dim = bags[split["train"][0]].dim
        torch.manual_seed(int(seed))
        kwargs = {"in_dim": dim, "n_classes": n_classes, **(model_kwargs or {})}
        net = (
            attnzoo.create_model(model, weights=weights, **kwargs) if weights else attnzoo.create_model(model, **kwargs)
        )
        run_out = _seed_folder(out, int(seed), len(seeds))
        seed_resume, seed_overwrite = modes[run_out]
        trainer = Trainer(
            net.train(),
            _Bags(bags, split["train"]),
            cfg,
            run_out,
            loss_fn=_loss,
            collate_fn=_one,
            device=resolve_device(device) if device else None,
            run_info={"task": "wsi-classification", "model": model, "data": str(Path(data).resolve()), "split": split},
            outputs=_OUTPUTS,
            **folder,
        )
        if split["val"]:
            trainer.eval_fn = _Validation(bags, split["val"], trainer.device)
        result = trainer.fit(resume=seed_resume, overwrite=seed_overwrite)
        best = run_out / "best.pt"
        if (
            split["val"] and best.exists()
        ):  # the official protocol: test metrics of the epoch with the best validation score
            net.load_state_dict(torch.load(best, weights_only=True)["model"])
        net.eval()
        with torch.no_grad():
            test = evaluate_bags(net, bags, split["test"], trainer.device) if split["test"] else {}
        trainer.save_weights(net)
        if trainer.ctx.is_main:
            write_json(run_out / "test_metrics.json", test)
        runs[int(seed)] = {"best_val": result.get("best"), "test": test}
    summary = {"seeds": runs, "mean": {}, "sd": {}}
    keys = sorted({k for r in runs.values() for k in r["test"]})
    for k in keys:
        values = [r["test"][k] for r in runs.values() if k in r["test"] and not math.isnan(r["test"][k])]
        if values:
            summary["mean"][k] = float(np.mean(values))
            summary["sd"][k] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    write_json(Path(out) / "summary.json", summary)
    return {"step": sum(1 for _ in runs), "best": None, **summary}


_OUTPUTS = ("test_metrics.json", "summary.json")  # summary.json: in the one folder of a single seed


def _seed_folder(out: str | os.PathLike, seed: int, n_seeds: int) -> Path:
    return Path(out) / f"seed-{seed}" if n_seeds > 1 else Path(out)


def _seed_modes(
    out: str | os.PathLike, seeds: list[int], resume: bool | str | os.PathLike, overwrite: bool
) -> dict[Path, tuple[bool | str | os.PathLike, bool]]:
    """Each seed's folder and its ``(resume, overwrite)``: resuming several seeds, one killed before its
    first checkpoint has nothing to resume from and starts afresh (discarding its first log rows). One
    that finished (its results are there) but whose checkpoints are gone is refused: starting it afresh
    would discard those results."""
    modes = {}
    for seed in seeds:
        folder = _seed_folder(out, seed, len(seeds))
        fresh = resume is True and len(seeds) > 1 and latest_checkpoint(folder) is None
        finished = [name for name in ("test_metrics.json", "best.pt", "model.safetensors") if (folder / name).exists()]
        if fresh and finished:
            raise InvalidOptionError(
                f"--resume: {folder} holds the results of a finished seed ({', '.join(finished)}) but no "
                "checkpoint to resume from; move that folder away to train the seed again, or pass --overwrite"
            )
        modes[folder] = (False, True) if fresh else (resume, overwrite)
    return modes


class _Validation:
    def __init__(self, bags: Any, ids: list[str], device: torch.device):
        self.bags, self.ids, self.device = bags, ids, device

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        metrics = evaluate_bags(model, self.bags, self.ids, self.device)
        return {**metrics, "selection": _selection(metrics)}


def _selection(metrics: dict[str, float]) -> float:
    auc = metrics.get("auc", float("nan"))
    return metrics["f1_micro"] + (0.0 if math.isnan(auc) else auc)
