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
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attnzoo._io import read_json, write_json
from attnzoo._placement import resolve_device
from attnzoo._values import comma_items, whole_number
from attnzoo.errors import AttnzooError, DatasetFormatError, InvalidOptionError
from attnzoo.training.config import SEED_RANGE, TrainConfig, recipe_config
from attnzoo.training.engine import (
    TENSORBOARD,
    Trainer,
    check_run_folder,
    latest_checkpoint,
    load_best_state,
    run_inputs,
)

__all__ = ["seed_folders", "seed_list", "train_wsi_classification"]

RECIPE_DEFAULTS = {
    "split": None,
    "labels": None,
    "dataset": "camelyon16",
    "n_classes": None,
    "seeds": None,
    "val_fraction": 0.1,
    "allow_missing": False,
}
RECIPE_RANGES = {"n_classes": (2, None), "val_fraction": (0.0, 1.0)}
#: What the validation (:class:`_Validation`) reports: the names ``best_metric`` may take.
METRICS = ("accuracy", "auc", "f1_micro", "f1_macro", "selection_score", "num_samples", "selection")
#: Which way each metric improves (``best_mode`` follows ``best_metric``'s); the sample count has none.
METRIC_MODES = {**dict.fromkeys(METRICS, "max"), "num_samples": None}
#: The recipe settings a resumed seed's run may change: ``seeds`` (checked on its own: a resume keeps the run's).
RESUMABLE = ("seeds",)


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


def _checked_split(bags: Any, extra: dict[str, Any], seed: int, data: Any) -> tuple[dict[str, list[str]], int]:
    """This seed's split and number of classes; a split without training slides or with unlabelled ones is refused."""
    split = _split(bags, extra, seed)
    if not split["train"]:
        raise DatasetFormatError(f"{data}: no training slides in the split")
    label_of = {s: bags[s].label for part in split.values() for s in part}  # reads each bag once
    unlabelled = [s for s, label in label_of.items() if label is None]
    if unlabelled:
        raise DatasetFormatError(
            f"{data}: {len(unlabelled)} slide(s) have no label, e.g. {', '.join(unlabelled[:5])}: "
            "pass labels=CSV (slide_id,label), or a split file that carries them"
        )
    return split, int(extra["n_classes"] or (max(label_of[s] for s in split["train"]) + 1))


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
    reads); with several ``seeds`` one run per seed under ``out/seed-<s>`` and ``summary.json`` (mean ± sd).
    ``overwrite`` discards an earlier run in ``out`` (its seed folders included; else refused, unless ``resume``);
    ``resume`` continues the run with the seeds it was started with (others are refused), and starts afresh a
    seed killed before its first checkpoint. Returns ``step``: the optimizer steps of all seeds together (each
    seed's under ``seeds[s]["step"]``), the summary and, where a resume ran the validation a seed's checkpoint
    owed, ``owed_validation`` (that epoch, from 0, by seed)."""
    import attnzoo
    from attnzoo.datasets.mil_features import read_feature_bags

    base = recipe_config(
        config or "acmil",
        overrides,
        RECIPE_DEFAULTS,
        "wsi-classification",
        metrics=METRICS,
        ranges=RECIPE_RANGES,
        metric_modes=METRIC_MODES,
    )
    seeds = base.extra["seeds"] = seed_list(base.extra["seeds"], base.seed)
    folder: dict[str, Any] = {"data": data, "inputs": run_inputs(config, weights, base)}
    earlier = _earlier_run(out, seeds, resume, overwrite, folder)
    modes = _seed_modes(out, seeds, resume, overwrite)
    for run_out, (seed_resume, seed_overwrite) in modes.items():
        check_run_folder(run_out, resume=seed_resume, overwrite=seed_overwrite, outputs=_OUTPUTS, **folder)
    bags = read_feature_bags(data, labels=_labels(base.extra, seeds[0], data))
    if base.extra["split"] and len(seeds) > 1 and "{seed}" not in str(base.extra["split"]):
        warnings.warn(
            f"all {len(seeds)} seeds use the one split file {base.extra['split']}, so their spread covers the "
            "initialisation only; ACMIL's protocol gives each seed its own (split=.../split_{seed}.json)",
            stacklevel=2,
        )
    splits = {seed: _checked_split(bags, base.extra, seed, data) for seed in seeds}  # every seed's, before any file
    if overwrite:
        _discard(out, earlier)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / SEEDS_FILE, {"seeds": seeds})  # what --resume holds a later call to
    runs, owed = {}, {}
    for seed, (split, n_classes) in splits.items():
        cfg = TrainConfig(**{**base.to_dict(), "seed": seed, "extra": dict(base.extra)})
        dim = bags[split["train"][0]].dim
        torch.manual_seed(seed)
        kwargs = {"in_dim": dim, "n_classes": n_classes, **(model_kwargs or {})}
        net = (
            attnzoo.create_model(model, weights=weights, **kwargs) if weights else attnzoo.create_model(model, **kwargs)
        )
        run_out = _seed_folder(out, seed, len(seeds))
        seed_resume, seed_overwrite = modes[run_out]
        trainer = Trainer(
            net.train(),
            _Bags(bags, split["train"]),
            cfg,
            run_out,
            loss_fn=_loss,
            collate_fn=_one,
            device=resolve_device(device) if device is not None else None,
            run_info={"task": "wsi-classification", "model": model, "data": str(Path(data).resolve()), "split": split},
            outputs=_RUN_OUTPUTS,
            recipe_defaults=RECIPE_DEFAULTS,
            resumable=RESUMABLE,
            **folder,
        )
        if split["val"]:
            trainer.eval_fn = _Validation(bags, split["val"], trainer.device)
        result = trainer.fit(resume=seed_resume, overwrite=seed_overwrite)
        if "owed_validation" in result:  # this seed's resume ran the validation its checkpoint owed
            owed[seed] = result["owed_validation"]
        best = run_out / "best.pt"
        if (
            split["val"] and best.exists()
        ):  # the official protocol: test metrics of the epoch with the best validation score
            load_best_state(net, best)
        net.eval()
        with torch.no_grad():
            test = evaluate_bags(net, bags, split["test"], trainer.device) if split["test"] else {}
        trainer.save_weights(net)
        if trainer.ctx.is_main:
            write_json(run_out / "test_metrics.json", test)
        runs[seed] = {"best_val": result.get("best"), "step": result["step"], "test": test}
    summary = {"seeds": runs, "mean": {}, "sd": {}}
    keys = sorted({k for r in runs.values() for k in r["test"]})
    for k in keys:
        values = [r["test"][k] for r in runs.values() if k in r["test"] and not math.isnan(r["test"][k])]
        if values:
            summary["mean"][k] = float(np.mean(values))
            summary["sd"][k] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    write_json(Path(out) / "summary.json", summary)
    steps = sum(run["step"] for run in runs.values())
    return {"step": steps, "best": None, **summary, **({"owed_validation": owed} if owed else {})}


#: Where a run records its seeds, in ``out``: ``--resume`` continues only that run.
SEEDS_FILE = "seeds.json"
#: What a seed's Trainer finds besides its own files: the seed's results and (one seed, in ``out``) the summary.
_RUN_OUTPUTS = ("test_metrics.json", "summary.json")
_OUTPUTS = (*_RUN_OUTPUTS, SEEDS_FILE)  # seeds.json: written in ``out`` before the seeds' Trainers run
_SEED_FOLDER = re.compile(r"seed-(-?\d+)")


def seed_list(value: Any, default: int) -> list[int]:
    """The ``seeds`` setting as a list: null (the config's ``seed``), one integer, a list of integers, or
    ``"1,2,3"``. Each seed must be an integer torch's generators take, given once (it names one run and its
    folder): a repeated seed would train the same folder twice, ``[]`` would fall back to another seed unsaid."""
    if value is None:
        return [default]
    if isinstance(value, str):
        items: list[Any] = []
        for item in comma_items(value, "seeds"):
            try:
                items.append(int(item))
            except ValueError:
                raise InvalidOptionError(
                    f"seeds must be integers, e.g. seeds=[1,2,3] or seeds=1,2,3; got {value!r}"
                ) from None
    else:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise InvalidOptionError("seeds is empty: give at least one seed (seeds=[1,2,3]), or leave it out for seed")
    low, high = SEED_RANGE
    seeds = [whole_number(s, f"seeds[{i}]", low=low, high=high, why="torch's seeds") for i, s in enumerate(items)]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise InvalidOptionError(
            f"seeds lists {', '.join(map(str, repeated))} more than once: each seed is one run (folder seed-<s>); "
            "give each once"
        )
    return seeds


def _seed_folder(out: str | os.PathLike, seed: int, n_seeds: int) -> Path:
    return Path(out) / f"seed-{seed}" if n_seeds > 1 else Path(out)


def seed_folders(out: str | os.PathLike) -> dict[int, Path]:
    """The ``seed-<s>`` folders in ``out`` (a run of several seeds made them), by seed."""
    root = Path(out)
    if not root.is_dir():
        return {}
    found = ((_SEED_FOLDER.fullmatch(p.name), p) for p in root.iterdir() if p.is_dir())
    return {int(m.group(1)): p for m, p in found if m is not None}


def _earlier_run(
    out: str | os.PathLike, seeds: list[int], resume: bool | str | os.PathLike, overwrite: bool, folder: dict[str, Any]
) -> list[Path]:
    """The files an earlier run left in ``out`` and its seed folders (what ``overwrite`` discards), refused as
    :func:`check_run_folder` refuses them, before any work; a resumed run must have the seeds it started with."""
    earlier = check_run_folder(out, resume=resume, overwrite=overwrite, outputs=_OUTPUTS, **folder)
    per_seed = {
        seed: check_run_folder(seed_folder, resume=resume, overwrite=overwrite, outputs=_OUTPUTS, **folder)
        for seed, seed_folder in seed_folders(out).items()
    }
    for files in per_seed.values():
        earlier += files
    if resume:
        recorded, started = _recorded_seeds(out), {seed for seed, files in per_seed.items() if files}
        if (recorded is not None and sorted(recorded) != sorted(seeds)) or not started <= set(seeds):
            known = recorded if recorded is not None else sorted(started)
            raise InvalidOptionError(
                f"--resume: {out} is a run of seeds {known}, not {seeds}: resume it with seeds={known}, or pass "
                f"--overwrite to discard it and train seeds {seeds} afresh"
            )
    return earlier


def _recorded_seeds(out: str | os.PathLike) -> list[int] | None:
    """The seeds ``out``'s run was started with (None for a run made before they were recorded)."""
    path = Path(out) / SEEDS_FILE
    if not path.is_file():
        return None
    try:
        return seed_list(read_json(path, "the seeds of a run")["seeds"], 0)
    except (AttnzooError, KeyError, TypeError) as err:
        raise InvalidOptionError(
            f"--resume: {path} does not say which seeds the run has ({err}); pass --overwrite to start afresh"
        ) from None


def _discard(out: str | os.PathLike, earlier: list[Path]) -> None:
    """Delete an earlier run's files, then the seed folders (and their ``tensorboard/``) of that run left empty:
    a folder that holds anything else (a user's file) stays."""
    for path in earlier:
        path.unlink(missing_ok=True)
    for seed_folder in seed_folders(out).values():
        if any(seed_folder in path.parents for path in earlier):
            for folder in (seed_folder / TENSORBOARD, seed_folder):
                try:
                    folder.rmdir()
                except OSError:  # not empty (something not the run's is there), or never made
                    pass


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
