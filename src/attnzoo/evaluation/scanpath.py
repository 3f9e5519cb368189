"""Scanpath evaluation: the NevaClip paper's metrics on CapMIT1003 / MIT1003 and OAT's on the
Amazon / yogurt / wine search sets, each with the human inter-subject agreement as reference row.

NevaClip (``--model nevaclip``):

* **capmit1003** (``--data`` holds ``capmit1003.db`` and MIT1003's ``ALLSTIMULI/``): one scanpath
  per caption, scored against the click path of the person who wrote it. By default every caption
  is run twice: with its own caption, and with a *misleading* one (a caption of another image,
  seeded), the paper's control. ``--captions own`` runs the first only.
* **mit1003** (free viewing, raw release or pysaliency cache): one scanpath per image, scored
  against every observer. Free viewing has no caption: the image's first CapMIT1003 caption is
  used when ``capmit1003.db`` lies in ``--data`` (then pass ``--dataset mit1003``: a folder with the
  database is taken for CapMIT1003 otherwise) or in its parent, else the neutral prompt
  :data:`NEUTRAL_CAPTION`.

Metrics per sample, averaged: **SPP**, the string-based time-delay embedding similarity
(scanpath plausibility; FixaTons' settings, mean over observers: see
:func:`attnzoo.metrics.scanpath.scanpath_plausibility`), ScanMatch, MultiMatch (mean of vector,
direction, length, position) and the string edit distance on the 4x4 grid. The human row scores
each observer's scanpath against the other observers of the same image in the same way (computed
with each sample, so it resumes and shards with the run).

OAT (``--model oat_amazon`` etc., ``--data`` an Amazon / yogurt / wine folder): the trials of the
official split (``--split test``; the permutation seeded with 0 or read from
``splitlist_all_amazon.txt`` beside the data) or ``--split test-by-layout`` (the leakage-free split
by layout); greedy decoding. Sequence score (NW), edit distance, MultiMatch on grid-cell centres,
the five behavioural statistics and Δ (of their test-set means, as OAT computes it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from attnzoo.datasets.scanpaths import detect_scanpath_dataset
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError, WeightsError
from attnzoo.evaluation.runner import EvalPlan, EvalSample, TaskEvaluator, check_limit, format_metric

__all__ = ["NEUTRAL_CAPTION", "ScanpathEvaluator"]

NEUTRAL_CAPTION = "a photo"
NEVACLIP_DATASETS = ("capmit1003", "mit1003")
SEARCH_DATASETS = ("amazon", "yogurt", "wine")


def check_seed(seed: Any) -> int | None:
    """``--seed`` (None: not given) as every use of it takes it, or an :class:`InvalidOptionError`: an
    integer in [0, 2**64). It seeds the pipelines' torch generators (which refuse a negative seed), numpy's
    generators of the misleading captions (which do too) and the split's ``random.Random`` (which would
    take -n silently as n: a run recorded as seed -1 would be seed 1's split), so it is checked once,
    before any data is read, whatever the model and whether or not ``--samples`` is given."""
    from attnzoo.pipelines.base import generator_seed

    return None if seed is None else generator_seed(seed, "--seed")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def free_viewing_scores(model_xy: np.ndarray, humans: list[np.ndarray], size: tuple[int, int]) -> dict[str, float]:
    """The NevaClip-style scores of one scanpath against some observers' (mean over observers)."""
    from attnzoo.metrics.scanpath import edit_distance, multimatch, scanmatch, scanpath_plausibility, scanpath_to_string

    humans = [h for h in humans if len(h)]
    if not humans or not len(model_xy):
        return {
            "spp": float("nan"),
            "scanmatch": float("nan"),
            "multimatch": float("nan"),
            "edit_distance": float("nan"),
        }
    string = scanpath_to_string(model_xy, size)
    return {
        "spp": scanpath_plausibility(model_xy, humans, size),
        "scanmatch": _mean([scanmatch(model_xy, h, size) for h in humans]),
        "multimatch": _mean([multimatch(model_xy, h, size)["mean_without_duration"] for h in humans]),
        "edit_distance": _mean([float(edit_distance(string, scanpath_to_string(h, size))) for h in humans]),
    }


def model_family(model: str) -> str:
    """``nevaclip`` or ``oat``, from the model's registry entry; ``"oat"`` alone is the shorthand for
    the OAT variant of the shelf found in the data."""
    from attnzoo.factory import load_families
    from attnzoo.registry import get_model_entry

    if model.lower() == "oat":
        return "oat"
    load_families()
    entry = get_model_entry(model)
    if entry is None or "scanpath" not in entry.tasks:
        raise InvalidInputError(f"{model} is not a scanpath model (nevaclip or oat_amazon / oat_yogurt / oat_wine)")
    return entry.family


class ScanpathEvaluator(TaskEvaluator):
    task = "scanpath"
    headline = ("spp", "ss", "delta")

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
        dataset: str | None = None,
        captions: str | None = None,
        initial_fixation: bool | None = None,
        seed: int | None = None,
        samples: int | None = None,
        fixations: int | None = None,
        iterations: int | None = None,
        lr: float | None = None,
        random_restarts: bool | None = None,
        forgetting: float | None = None,
    ) -> EvalPlan:
        """An OAT training run's weights are evaluated on that run's own split unless asked otherwise.
        NevaClip's search settings (default: the paper's) are recorded with the run."""
        seed = check_seed(seed)
        family = model_family(model)
        search = {
            k: v
            for k, v in dict(
                fixations=fixations,
                iterations=iterations,
                lr=lr,
                random_restarts=random_restarts,
                forgetting=forgetting,
            ).items()
            if v is not None
        }
        if search and family != "nevaclip":
            raise InvalidInputError(
                f"{', '.join('--' + k.replace('_', '-') for k in search)}: NevaClip's search settings; OAT decodes "
                "(--samples for sampled scanpaths)"
            )
        split, seed, drop_outliers = evaluation_split(family, weights, split, default_split, seed, log)
        evaluator = cls(
            data,
            split,
            limit=limit,
            dataset=dataset,
            captions=captions,
            initial_fixation=initial_fixation,
            seed=seed,
            model_kind=family,
            samples_per_trial=samples,
            drop_outliers=drop_outliers,
        )
        if model.lower() == "oat":  # the OAT variant of the shelf layout found in --data
            model = f"oat_{evaluator.dataset}"
        if family == "nevaclip":
            pipeline_kwargs: dict[str, Any] = {"seed": seed, **search}
        else:
            pipeline_kwargs = {"strategy": "sample", "num_samples": samples, "seed": seed} if samples else {}
        settings = {
            "dataset": dataset,
            "captions": captions,
            # recorded only when kept: --no-initial-fixation and no flag both drop it (and an older run of
            # mit1003, which recorded nothing, dropped it too), so all three resume one another
            "initial_fixation": initial_fixation or None,
            "seed": seed,
            "samples_per_trial": samples,
            "drop_outliers": drop_outliers,
            **search,
        }
        return EvalPlan(
            model, split, [(None, evaluator, {})], pipeline_kwargs, {k: v for k, v in settings.items() if v is not None}
        )

    def __init__(
        self,
        data: str | os.PathLike,
        split: str = "test",
        *,
        limit: int | None = None,
        dataset: str | None = None,
        captions: str | None = None,
        initial_fixation: bool | None = None,
        seed: int = 0,
        model_kind: str = "nevaclip",
        samples_per_trial: int | None = None,
        drop_outliers: bool = True,
    ):
        check_limit(limit)
        seed = check_seed(seed) or 0
        root = Path(data)
        if not root.exists():
            raise DatasetFormatError(f"dataset folder {root} does not exist")
        self.root, self.dataset, self.seed, self.limit = root, dataset or detect_scanpath_dataset(root), seed, limit
        self.drop_outliers = drop_outliers
        if self.dataset not in NEVACLIP_DATASETS + SEARCH_DATASETS:
            raise InvalidInputError(
                f"--dataset must be one of {NEVACLIP_DATASETS + SEARCH_DATASETS}, got {self.dataset!r}"
            )
        self.is_search = self.dataset in SEARCH_DATASETS
        if initial_fixation is not None and self.dataset != "mit1003":
            raise InvalidInputError(
                f"--initial-fixation / --no-initial-fixation chooses MIT1003's first fixation; {self.dataset} has no such choice"
            )
        self.initial_fixation = bool(initial_fixation)
        if samples_per_trial is not None:
            if not self.is_search:
                raise InvalidOptionError(
                    "--samples (sampled scanpaths per trial) applies to OAT on amazon, yogurt or wine"
                )
            from attnzoo.vision.oat_decoding import check_num_samples

            samples_per_trial = check_num_samples(samples_per_trial, "--samples")
        self.samples_per_trial = samples_per_trial
        if model_kind == "oat" and not self.is_search:
            raise InvalidInputError(f"OAT predicts visual search on shelves (amazon, yogurt, wine), not {self.dataset}")
        if model_kind == "nevaclip" and self.is_search:
            raise InvalidInputError(
                f"NevaClip is evaluated on capmit1003 / mit1003; {self.dataset} is OAT's (use --model oat_{self.dataset})"
            )
        if self.is_search:
            self._load_search(split)
        else:
            self._load_free_viewing(split, captions)

    # -- data ------------------------------------------------------------------------------
    def _load_free_viewing(self, split: str, captions: str | None) -> None:
        if split not in ("test", "all"):
            raise InvalidInputError(
                f"NevaClip has no training: --split is 'test' or 'all' (the whole dataset), got {split!r}"
            )
        if self.dataset == "capmit1003":
            from attnzoo.datasets.capmit1003 import CapMIT1003

            self.records = CapMIT1003(self.root)
            self._groups = self.records.by_stimulus()
            self.conditions = [c.strip() for c in (captions or "own,misleading").split(",") if c.strip()]
            bad = sorted(set(self.conditions) - {"own", "misleading", "other-subject"})
            if bad or not self.conditions:
                raise InvalidInputError(
                    f"--captions takes own, misleading, other-subject (comma-separated), got {captions!r}"
                )
            self.caption_sets = {"own": [r.caption for r in self.records]}
            if "misleading" in self.conditions:
                self.caption_sets["misleading"] = self.records.misleading_captions(self.seed)
            if "other-subject" in self.conditions:
                self.caption_sets["other-subject"] = self.records.other_subject_captions(self.seed)
        else:
            from attnzoo.datasets.mit1003 import MIT1003

            if captions not in (None, "own"):
                raise InvalidInputError("MIT1003 is free viewing: --captions applies to capmit1003 only")
            self.records = MIT1003(self.root, initial_fixation=self.initial_fixation)
            self._groups = self.records.by_stimulus()
            self.conditions = ["own"]
            self.stimulus_captions = self._mit1003_captions()

    def _mit1003_captions(self) -> dict[str, str]:
        for folder in (self.root, self.root.parent):
            if (folder / "capmit1003.db").is_file():
                from attnzoo.datasets.capmit1003 import CapMIT1003

                try:
                    caps = CapMIT1003(folder, stimuli_dir=self.records[0].image_path.parent, skip_missing=True)
                except (DatasetFormatError, IndexError):
                    break
                out: dict[str, str] = {}
                for record in sorted(caps, key=lambda r: str(r.meta.get("obs_uid", ""))):
                    out.setdefault(record.stimulus, record.caption)
                return out
        return {}

    def _load_search(self, split: str) -> None:
        from attnzoo.datasets.visual_search import load_search_trials, split_search_trials

        self.all_trials = load_search_trials(self.root, self.dataset, self.drop_outliers)
        name, _, scheme = split.partition("-by-")
        if name not in ("train", "val", "test", "all"):
            raise InvalidInputError(
                f"--split is train, val, test or all (optionally -by-layout / -by-target), got {split!r}"
            )
        if name == "all":
            self.trials = self.all_trials
        else:
            self.trials = split_search_trials(
                self.all_trials, self.root, self.dataset, scheme or "official", self.seed
            )[name]

    # -- the runner's protocol ------------------------------------------------------------------
    def samples(self) -> list[EvalSample]:
        """``--limit N`` takes the first N trials / images / captions (each caption in every condition)."""
        limit = self.limit or None
        out = []
        if self.is_search:
            for i, t in enumerate(self.trials[:limit]):
                key = t.meta.get("scanpath_id") or f"{t.stimulus}|{t.subject}|{t.target}|{i}"
                out.append(EvalSample(str(key), {"image": t.image_path, "boxes": t.boxes, "target": t.target}, i))
        elif self.dataset == "capmit1003":
            for condition in self.conditions:
                for i, r in enumerate(self.records[:limit]):
                    caption = self.caption_sets[condition][i]
                    if caption is None:  # "other-subject": nobody else described this image
                        continue
                    key = r.meta.get("obs_uid", f"{r.stimulus}|{r.subject}|{i}")
                    out.append(
                        EvalSample(f"{condition}|{key}", {"image": r.image_path, "caption": caption}, (condition, i))
                    )
        else:
            for stimulus, records in list(self._groups.items())[:limit]:
                caption = self.stimulus_captions.get(stimulus, NEUTRAL_CAPTION)
                out.append(
                    EvalSample(stimulus, {"image": records[0].image_path, "caption": caption}, ("own", stimulus))
                )
        return out

    def record(self, sample: EvalSample, result: Any) -> dict[str, Any]:
        if self.is_search:
            trial = self.trials[sample.target]
            if isinstance(result, list):  # sampled decoding: OAT's "multi" rows average over the samples of a trial
                return self._sampled_scores([np.asarray(r.objects) for r in result], trial)
            return {
                "objects": np.asarray(result.objects).tolist(),
                "found_target": bool(result.found_target),
                **self._search_scores(np.asarray(result.objects), trial),
                "nss": self._object_nss([np.asarray(result.objects)], trial),
            }
        condition, key = sample.target
        humans = [self.records[key]] if self.dataset == "capmit1003" else self._groups[key]
        size = tuple(result.image_size)
        scores = free_viewing_scores(result.xy, [h.xy for h in humans], size)
        return {
            "condition": condition,
            "caption": sample.input["caption"],
            "xy": np.round(result.xy, 2).tolist(),
            **scores,
            "human": self._human_scores(condition, key, size),
        }

    def _search_scores(self, objects: np.ndarray, trial: Any) -> dict[str, Any]:
        from attnzoo.metrics.scanpath import object_scanpath_scores

        return {
            **object_scanpath_scores(objects, trial.objects, trial.target),
            "multimatch": self._object_multimatch(objects, trial),
        }

    def _sampled_scores(self, samples: list[np.ndarray], trial: Any) -> dict[str, Any]:
        """Each score averaged over the trial's sampled scanpaths; the statistics too (OAT's "multi")."""
        from attnzoo.metrics.scanpath import average_search_statistics

        per = [self._search_scores(objects, trial) for objects in samples]
        stats = [p["stats"] for p in per if p["stats"] is not None]
        return {
            "samples": [o.tolist() for o in samples],
            "ss": _mean([p["ss"] for p in per]),
            "edit_distance": _mean([p["edit_distance"] for p in per]),
            "multimatch": _mean([p["multimatch"] for p in per]),
            "stats": average_search_statistics(stats) if stats else None,
            "nss": self._object_nss(samples, trial),
        }

    def _object_nss(self, samples: list[np.ndarray], trial: Any) -> float:
        """OAT's NSS: every predicted object (all samples pooled) as its grid-cell centre in a binary
        map, z-scored, read at the observer's fixations (``calculate_mm.py``)."""
        from attnzoo.metrics.scanpath import OAT_LAYOUTS, fixation_nss, objects_to_points

        layout = OAT_LAYOUTS[self.dataset]
        objects = (
            np.concatenate([s for s in samples if len(s)]) if any(len(s) for s in samples) else np.zeros(0, np.int64)
        )
        if not len(objects) or not len(trial.xy) or self._layout_misfit(trial):
            return float("nan")
        points = objects_to_points(objects, trial.grid, layout["cell_size"], layout["offset"])
        return fixation_nss(points, trial.xy, layout["screen_size"] or trial.image_size)

    def _layout_misfit(self, trial: Any) -> str | None:
        """Why OAT's shelf layout (grid-cell centres in px of the original collages) does not fit this
        display, or None: on a resized copy of the data the cell centres fall outside the image, and
        MultiMatch and NSS of objects come out meaningless (MultiMatch below 0)."""
        from attnzoo.metrics.scanpath import OAT_LAYOUTS

        layout = OAT_LAYOUTS[self.dataset]
        width, height = layout["screen_size"] or trial.image_size
        rows, cols = trial.grid
        (cell_w, cell_h), (x0, y0) = layout["cell_size"], layout["offset"]
        need = (x0 + cols * cell_w, y0 + rows * cell_h)
        if need[0] <= 1.02 * width and need[1] <= 1.02 * height:
            return None
        return (
            f"OAT's {self.dataset} layout places {rows}x{cols} cells of {cell_w}x{cell_h} px (the original collages, "
            f"about {need[0]}x{need[1]} px); this display is {width}x{height} px"
        )

    def _object_multimatch(self, objects: np.ndarray, trial: Any) -> float:
        """OAT's MM: predicted objects as grid-cell centres against the observer's raw fixations,
        both padded to 3 fixations (``calculate_mm.py``), unit durations, on the screen size."""
        from attnzoo.metrics.scanpath import OAT_LAYOUTS, multimatch, objects_to_points, pad_scanpath

        layout = OAT_LAYOUTS[self.dataset]
        screen = layout["screen_size"] or trial.image_size
        if not len(objects) or not len(trial.xy) or self._layout_misfit(trial):
            return float("nan")
        points = objects_to_points(objects, trial.grid, layout["cell_size"], layout["offset"])
        return multimatch(pad_scanpath(trial.xy), pad_scanpath(points), screen)["mean_without_duration"]

    # -- aggregation -----------------------------------------------------------------------------
    def metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows of means; a metric no sample could give (e.g. MultiMatch needs 3 fixations) is ``None``."""
        out = self._search_metrics(records) if self.is_search else self._free_viewing_metrics(records)
        return _nan_to_none(out)

    def _free_viewing_metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        keys = ("spp", "scanmatch", "multimatch", "edit_distance")
        out: dict[str, Any] = {"dataset": self.dataset, "rows": {}}
        for condition in self.conditions:
            rows = [r for r in records if r["condition"] == condition]
            if rows:
                out["rows"][f"model ({condition} caption)" if self.dataset == "capmit1003" else "model"] = {
                    k: round(_mean([r[k] for r in rows]), 4) for k in keys
                } | {"n": len(rows)}
        # a sample whose image no other observer viewed has no inter-subject score: not counted in n
        humans = [h for h in (r.get("human") for r in records) if h and any(v is not None for v in h.values())]
        out["rows"]["humans (inter-subject)"] = {k: round(_mean([h[k] for h in humans]), 4) for k in keys} | {
            "n": len(humans)
        }
        first = next(iter(out["rows"].values()))
        out.update({k: first[k] for k in keys})
        return out

    def _human_scores(self, condition: str, key: Any, size: tuple[int, int]) -> dict[str, float] | None:
        """The observers' agreement belonging to this sample, computed with it (so it is saved, resumed
        and sharded like the model's scores): CapMIT1003, once per caption (own condition), that
        observer's clicks against the other observers of the image; MIT1003, per image, each observer
        against the others, averaged. ``None`` when nobody else saw the image."""
        if condition != self.conditions[0]:
            return None
        if self.dataset == "capmit1003":
            record = self.records[key]
            others = [o.xy for o in self._groups[record.stimulus] if o is not record]
            return free_viewing_scores(record.xy, others, size) if others else None
        group = self._groups[key]
        if len(group) < 2:
            return None
        scores = [free_viewing_scores(r.xy, [o.xy for o in group if o is not r], size) for r in group]
        return {k: _mean([sc[k] for sc in scores]) for k in scores[0]}

    def _search_metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from attnzoo.metrics.scanpath import (
            SEARCH_STATISTICS,
            average_search_statistics,
            behavioural_delta,
            search_statistics,
        )

        index = {s.id: s.target for s in self.samples()}
        trials = [self.trials[index[r["id"]]] for r in records]
        misfit = next((why for why in map(self._layout_misfit, trials) if why), None)
        if misfit:  # answers saved by an earlier release hold the meaningless values: left out here too
            records = [{**r, "multimatch": float("nan"), "nss": float("nan")} for r in records]
        human_stats = average_search_statistics(search_statistics(t.objects, t.target) for t in trials)
        model_stats = average_search_statistics(r["stats"] for r in records if r["stats"] is not None)
        model_row = {
            "ss": _mean([r["ss"] for r in records]),
            "edit_distance": _mean([r["edit_distance"] for r in records]),
            "multimatch": _mean([r["multimatch"] for r in records]),
            "nss": _mean([r.get("nss", float("nan")) for r in records]),
            "delta": behavioural_delta(model_stats, human_stats),
            **model_stats,
            "n": len(records),
        }
        human_row = {**self._search_agreement(trials), "delta": 0.0, **human_stats, "n": len(trials)}
        name = f"model ({self.samples_per_trial} samples per trial)" if self.samples_per_trial else "model (greedy)"
        rows = {
            name: {k: round(v, 4) if isinstance(v, float) else v for k, v in model_row.items()},
            "humans (inter-subject)": {k: round(v, 4) if isinstance(v, float) else v for k, v in human_row.items()},
        }
        return {
            "dataset": self.dataset,
            "rows": rows,
            **{k: rows[name][k] for k in ("ss", "edit_distance", "multimatch", "nss", "delta")},
            "statistics": list(SEARCH_STATISTICS),
            **({"layout_note": f"MM and the model's NSS are n/a: {misfit}"} if misfit else {}),
        }

    def _search_agreement(self, trials: list[Any]) -> dict[str, float]:
        """Each observer's object sequence against the other observers of the same display and target
        (and the others' raw fixations pooled for NSS)."""
        from attnzoo.metrics.scanpath import OAT_LAYOUTS, fixation_nss

        groups: dict[tuple, list[Any]] = {}
        for t in self.all_trials:
            groups.setdefault((t.layout, t.target), []).append(t)
        ss, ed, mm, nss = [], [], [], []
        screen = OAT_LAYOUTS[self.dataset]["screen_size"]
        for t in trials:
            others = [o for o in groups[(t.layout, t.target)] if o is not t]
            for o in others:
                s = self._search_scores(o.objects, t)
                ss.append(s["ss"])
                ed.append(s["edit_distance"])
                mm.append(s["multimatch"])
            pooled = [o.xy for o in others if len(o.xy)]
            if pooled and len(t.xy):
                nss.append(fixation_nss(np.concatenate(pooled), t.xy, screen or t.image_size))
        return {"ss": _mean(ss), "edit_distance": _mean(ed), "multimatch": _mean(mm), "nss": _mean(nss)}

    def report(self, metrics: dict[str, Any]) -> str:
        if self.is_search:
            cols = [
                ("SS", "ss"),
                ("ED", "edit_distance"),
                ("MM", "multimatch"),
                ("NSS", "nss"),
                ("Δ", "delta"),
                ("correct target", "correct_target"),
                ("length", "length"),
                ("search", "search_ratio"),
                ("refixation", "refixation_ratio"),
                ("revisit", "revisit_ratio"),
            ]
            note = (
                "SS: Needleman-Wunsch on objects / max length (OAT); ED: edit distance on objects; MM: MultiMatch (mean of vector, "
                "direction, length, position) of grid-cell centres vs raw fixations; NSS of the predicted cells at the observer's "
                "fixations; Δ of the test-set means of the five statistics (sampled: each trial's statistics first averaged over "
                'its samples, OAT\'s "multi").'
            )
        else:
            cols = [
                ("SPP (SBTDE)", "spp"),
                ("ScanMatch", "scanmatch"),
                ("MultiMatch", "multimatch"),
                ("edit distance", "edit_distance"),
            ]
            note = (
                "SPP: string-based time-delay embedding similarity (4x4 grid, k=3, mean over observers); "
                "humans: each observer against the others on the same image."
            )
        head = "| | " + " | ".join(c for c, _ in cols) + " | n |\n|---|" + "---|" * (len(cols) + 1) + "\n"
        body = "".join(
            f"| {name} | " + " | ".join(_fmt(row.get(k)) for _, k in cols) + f" | {row.get('n', '')} |\n"
            for name, row in metrics["rows"].items()
        )
        if metrics.get("layout_note"):
            note += f"\n\n**{metrics['layout_note']}.**"
        return f"Dataset: **{metrics['dataset']}**\n\n{head}{body}\n{note}\n"


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN or infinity: NaN (no sample gave the metric) becomes None, an infinite Δ
    (the model shows a behaviour the observers never do) the string "inf"."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _fmt(value: Any) -> str:
    """A table cell: a float as :func:`~attnzoo.evaluation.runner.format_metric` writes it (``n/a`` where no
    sample gave the metric), the string "inf" of an infinite Δ as it is."""
    return format_metric(value) if value is None or isinstance(value, float) else str(value)


def evaluation_split(
    family: str, weights: Any, split: str | None, default_split: str, seed: int | None, log: Callable[[str], None]
) -> tuple[str, int, bool]:
    """(split, seed, drop_outliers): an OAT training run's own split unless asked otherwise, with a
    warning when the asked one differs (its test set may hold training scanpaths)."""
    run = training_split(weights) if family == "oat" else None
    if run is None:
        return split or default_split, 0 if seed is None else seed, True
    own = "test" if run["split"] == "official" else f"test-by-{run['split']}"
    chosen_split = split or own
    chosen_seed = run["split_seed"] if seed is None else seed
    if chosen_split.partition("-by-")[2] != own.partition("-by-")[2] or chosen_seed != run["split_seed"]:
        log(
            f"warning: these weights were trained on the {run['split']} split with seed {run['split_seed']}; evaluating on "
            f"{chosen_split!r} with seed {chosen_seed}: its scanpaths may have been in the training set"
        )
    return chosen_split, chosen_seed, bool(run.get("drop_outliers", True))


def training_split(weights: str | os.PathLike | None) -> dict[str, Any] | None:
    """The split an ``attnzoo train scanpath`` run trained on (scheme, seed, outlier filter, from
    beside its weights), so its evaluation tests on that split's test set; None otherwise."""
    from attnzoo.pipelines.scanpath import run_decoding

    info = run_decoding(weights)
    if info is None or "split" not in info:
        return None
    if not isinstance(info["split"], str) or not isinstance(info.get("split_seed"), int) or info["split_seed"] < 0:
        raise WeightsError(
            f"{Path(weights or '').parent / 'decoding.json'}: the training run's split must be a name with a seed "
            f"(split_seed >= 0), got split={info['split']!r}, split_seed={info.get('split_seed')!r}"
        )
    return info
