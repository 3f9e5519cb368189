"""The visual-search scanpath recipe: OAT trained on the Amazon book covers (or OAT's yogurt / wine
shelves) as the official ``src/run.py``: teacher-forced cross-entropy over object pointers, Adam
1e-4, batch 20, clipping 1.0, early stopping on the validation Δ of greedy scanpaths, then the
test metrics of the best epoch.

    attnzoo train scanpath --model oat_amazon --data STI-Dataset/AmazonCovers --out runs/oat --config oat
    attnzoo train scanpath --model oat_amazon --data ... --out ... split=layout     # leakage-free split

``split``: ``official`` (OAT's random 80/10/10 split by scanpath, the permutation seeded with
``split_seed`` or read from ``splitlist_all_amazon.txt`` beside the data; layouts and targets then
leak between splits, as in the paper), or ``layout`` / ``target`` / ``layout_target`` (no display,
target or pair in two splits).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from attnzoo._io import write_json
from attnzoo._placement import resolve_device
from attnzoo.errors import DatasetFormatError, InvalidInputError
from attnzoo.metrics.scanpath import SEARCH_STATISTICS
from attnzoo.training.config import TrainConfig, recipe_config
from attnzoo.training.engine import Trainer, check_run_folder, load_best_state, run_inputs, seed_everything

if TYPE_CHECKING:  # pragma: no cover
    from attnzoo.vision.oat import OAT
    from attnzoo.vision.oat_inputs import OATBatch

__all__ = ["evaluate_search", "oat_loss", "teacher_forced_loss", "train_scanpath"]

RECIPE_DEFAULTS = {"dataset": None, "split": "official", "split_seed": 0, "max_len": None, "drop_outliers": True}
#: split_seed >= 0: the split's random.Random would take -n silently as n (a run recorded as -1 with seed 1's split);
#: below 2**64, as every seed here (attnzoo._values.generator_seed), read with the config, before any data
RECIPE_RANGES = {"max_len": (1, None), "split_seed": (0, 2**64 - 1)}
#: What the validation reports (:func:`evaluate_search`, the model's statistics NaN when it has none): the names
#: ``best_metric`` may take.
METRICS = ("ss", "edit_distance", "delta", *(f"model_{k}" for k in SEARCH_STATISTICS))
#: Which way each metric improves (``best_mode`` follows ``best_metric``'s): the sequence score up, the edit distance
#: and OAT's behavioural distance down; the model's own statistics have no better direction (compared to humans').
METRIC_MODES = {"ss": "max", "edit_distance": "min", "delta": "min", **{f"model_{k}": None for k in SEARCH_STATISTICS}}


def oat_loss(logits: torch.Tensor, tgt_pos: torch.Tensor, pad_idx: int) -> torch.Tensor:
    """Cross-entropy of teacher-forced logits ``[L-1, B, N+2]`` against ``tgt_pos[1:]``, PAD ignored."""
    target = tgt_pos[1:]
    if logits.shape[:2] != target.shape:
        raise InvalidInputError(f"logits {tuple(logits.shape)} do not match tgt_pos[1:] {tuple(target.shape)}")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1).to(logits.device), ignore_index=pad_idx
    )


def teacher_forced_loss(model: OAT, batch: OATBatch) -> torch.Tensor:
    """The official training loss (``train_batch_teacher_forcing``) of a
    :func:`~attnzoo.vision.oat_inputs.collate_oat` batch."""
    if batch.pad_idx != model.pad_idx:
        raise InvalidInputError(
            f"the batch was collated for {batch.pad_idx - 1} objects, the model has {model.num_objects}"
        )
    return oat_loss(model.forward_batch(batch), batch.tgt_pos, model.pad_idx)


class SearchSamples(Dataset):
    """OAT samples (object crops, target, object sequence); crops made once per display image."""

    def __init__(self, trials: list[Any], crop_style: str = "bgr"):
        from attnzoo.vision.oat_inputs import OATSample, display_crops

        self.trials = trials
        crops: dict[tuple, torch.Tensor] = {}
        self.samples = []
        for t in trials:
            key = (str(t.image_path), np.asarray(t.boxes).tobytes())
            if key not in crops:
                from attnzoo.datasets.images import load_image

                crops[key] = display_crops(np.asarray(load_image(t.image_path)), t.boxes, crop_style, grid=t.grid)
            self.samples.append(OATSample(crops[key], int(t.target), [int(o) for o in t.objects]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        return self.samples[i]


def evaluate_search(model: torch.nn.Module, samples: SearchSamples, max_len: int, batch: int = 32) -> dict[str, float]:
    """Greedy scanpaths of every trial: mean sequence score, edit distance, the five behavioural
    statistics and Δ against the observers' (of the set's means, as OAT)."""
    from attnzoo.metrics.scanpath import (
        average_search_statistics,
        behavioural_delta,
        object_scanpath_scores,
        search_statistics,
    )
    from attnzoo.vision.oat_decoding import generate

    predictions: list[list[int]] = []
    for start in range(0, len(samples), batch):
        chunk = samples.samples[start : start + batch]
        decoded = generate(model, [s.crops for s in chunk], [s.target for s in chunk], max_len)
        predictions += [d[0].objects for d in decoded]
    scores = [object_scanpath_scores(p, s.sequence, s.target) for p, s in zip(predictions, samples.samples)]
    human = average_search_statistics(search_statistics(s.sequence, s.target) for s in samples.samples)
    stats = [sc["stats"] for sc in scores if sc["stats"] is not None]
    model_stats = average_search_statistics(stats) if stats else None
    return {
        "ss": float(np.mean([sc["ss"] for sc in scores])),
        "edit_distance": float(np.mean([sc["edit_distance"] for sc in scores])),
        "delta": behavioural_delta(model_stats, human) if model_stats else float("inf"),
        **({f"model_{k}": v for k, v in model_stats.items()} if model_stats else {}),
    }


def _validation(model: torch.nn.Module, samples: SearchSamples, max_len: int) -> dict[str, float]:
    """:func:`evaluate_search` with every name of :data:`METRICS` at every evaluation (the model's statistics NaN
    when none of its scanpaths has any), so that eval.csv keeps its columns and ``best_metric`` is always there."""
    return {**dict.fromkeys(METRICS, float("nan")), **evaluate_search(model, samples, max_len)}


def train_scanpath(
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
    """Train an OAT model; writes checkpoints, ``best.pt``, ``model.safetensors`` (the best epoch's
    weights) and ``test_metrics.json`` under ``out``; ``overwrite`` discards an earlier run there (else
    refused, unless ``resume``)."""
    import attnzoo

    if str(model).lower().startswith("neva"):
        raise InvalidInputError(
            "NevaClip is zero-shot (a frozen CLIP): there is nothing to train; evaluate it with 'attnzoo eval scanpath'"
        )
    from attnzoo.datasets.scanpaths import detect_scanpath_dataset
    from attnzoo.datasets.visual_search import load_search_trials, split_search_trials

    cfg = recipe_config(
        config or "oat",
        overrides,
        RECIPE_DEFAULTS,
        "scanpath",
        metrics=METRICS,
        ranges=RECIPE_RANGES,
        metric_modes=METRIC_MODES,
    )
    folder: dict[str, Any] = {
        "data": data,
        "inputs": run_inputs(config, weights, cfg),
        "outputs": ("test_metrics.json", "decoding.json"),
    }
    check_run_folder(out, resume=resume, overwrite=overwrite, **folder)
    name = cfg.extra["dataset"] or detect_scanpath_dataset(data)
    if name not in ("amazon", "yogurt", "wine"):
        raise DatasetFormatError(f"{data}: OAT trains on visual-search data (amazon, yogurt, wine), found {name}")
    model = f"oat_{name}" if str(model).lower() == "oat" else model  # the variant of this shelf layout
    trials = load_search_trials(data, name, bool(cfg.extra["drop_outliers"]))
    split = split_search_trials(trials, data, name, str(cfg.extra["split"]), int(cfg.extra["split_seed"]))
    if not split["train"]:
        raise DatasetFormatError(f"{data}: no training scanpaths in the split")
    max_len = int(
        cfg.extra["max_len"] or max(len(t.objects) for t in split["train"])
    )  # the official: the longest training sequence
    seed_everything(cfg.seed)  # the seed decides the initial weights, as the official scripts
    net = (
        attnzoo.create_model(model, weights=weights, **(model_kwargs or {}))
        if weights
        else attnzoo.create_model(model, **(model_kwargs or {}))
    )
    from attnzoo.vision.oat_decoding import check_max_len

    check_max_len(max_len, net)  # past the position table: refused now, not at the first validation
    grid = tuple(split["train"][0].grid)
    if tuple(net.grid) != grid:
        raise InvalidInputError(
            f"{model} is built for a {net.grid} grid but the {name} displays are {grid}: use oat_{name}"
        )
    style = getattr(net, "pretrained_cfg", {}).get("crop_style", "bgr")  # Amazon's BGR 0-255, the shelves' RGB min-max
    train_set, val_set = (
        SearchSamples(split["train"], style),
        SearchSamples(split["val"], style) if split["val"] else None,
    )

    def collate(samples: list[Any]) -> Any:
        from attnzoo.vision.oat_inputs import collate_oat

        return collate_oat(samples, grid)

    trainer = Trainer(
        net.train(),
        train_set,
        cfg,
        out,
        loss_fn=teacher_forced_loss,
        collate_fn=collate,
        device=resolve_device(device) if device is not None else None,
        run_info={
            "task": "scanpath",
            "model": model,
            "data": str(Path(data).resolve()),
            "dataset": name,
            "max_len": max_len,
            "split_sizes": {k: len(v) for k, v in split.items()},
        },
        recipe_defaults=RECIPE_DEFAULTS,
        **folder,
    )
    if val_set is not None:
        trainer.eval_fn = lambda m: _validation(m, val_set, max_len)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    best = Path(out) / "best.pt"
    if val_set is not None and best.exists():  # the official protocol: test the epoch with the best validation delta
        load_best_state(net, best)
    net.eval()
    with torch.no_grad():
        test = evaluate_search(net, SearchSamples(split["test"], style), max_len) if split["test"] else {}
    trainer.save_weights(net)
    if trainer.ctx.is_main:
        write_json(Path(out) / "test_metrics.json", {"max_len": max_len, **test})
        # read beside the weights: pipeline("scanpath") decodes up to max_len, `attnzoo eval` tests on this run's split
        write_json(
            Path(out) / "decoding.json",
            {
                "max_len": max_len,
                "dataset": name,
                "split": str(cfg.extra["split"]),
                "split_seed": int(cfg.extra["split_seed"]),
                "drop_outliers": bool(cfg.extra["drop_outliers"]),
            },
        )
    return {**result, "test": test, "max_len": max_len}
