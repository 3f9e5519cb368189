"""Subject-insertion evaluation on DreamBench in insertion form (:mod:`attnzoo.datasets.dreambench`):
every subject/background pair at fixed seeds, scored by CLIP-I and DINO (inserted region vs subject) and
CLIP-T (result vs prompt) (:mod:`attnzoo.metrics.insertion`). Resumable and sharded by the runner; the
report names the model, steps, guidance, seeds and the method's settings (official or corrected)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from attnzoo._values import generator_seed
from attnzoo.datasets.dreambench import read_dreambench_insertion
from attnzoo.errors import InvalidOptionError
from attnzoo.evaluation.runner import EvalPlan, EvalSample, TaskEvaluator, check_limit, format_metric
from attnzoo.metrics.insertion import CLIP_DEFAULT, DINO_DEFAULT, ClipEmbedder, DinoEmbedder, insertion_scores

__all__ = ["DEFAULT_SEEDS", "SubjectInsertionEvaluator"]

#: DreamBench generates 4 images per subject and prompt.
DEFAULT_SEEDS = (0, 1, 2, 3)
_PIPELINE_SETTINGS = (
    "method",
    "behaviour",
    "steps",
    "guidance",
    "panel_size",
    "orientation",
    "blend",
    "shift_img",
    "shift_txt",
    "head_gain",
    "enforce",
    "blocks",
    "step_window",
)
METRICS = ("clip_i", "dino", "clip_t")


def _seeds(value: Any) -> tuple[int, ...]:
    if value is None:
        return DEFAULT_SEEDS
    parts = value.split(",") if isinstance(value, str) else value
    try:
        seeds = tuple(int(str(p).strip()) for p in parts if str(p).strip())
    except (TypeError, ValueError):
        raise InvalidOptionError(f"seeds must be integers, e.g. 0,1,2,3, got {value!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise InvalidOptionError(f"seeds must be distinct non-negative integers, got {value!r}")
    for seed in seeds:  # before the model loads: the pipeline takes the same range (it draws seed + 1 too)
        generator_seed(seed, "each of seeds", spare=1)
    return seeds


class SubjectInsertionEvaluator(TaskEvaluator):
    task = "subject-insertion"
    headline = METRICS

    def __init__(
        self,
        data: str | os.PathLike,
        split: str = "test",
        *,
        limit: int | None = None,
        manifest: str | os.PathLike | None = None,
        seeds: Any = None,
        clip_model: str | ClipEmbedder | None = None,
        dino_model: str | DinoEmbedder | None = None,
        device: Any = None,
    ):
        check_limit(limit)
        self.dataset = read_dreambench_insertion(data, manifest)
        self.seeds = _seeds(seeds)
        self.limit = limit
        self._clip_spec = clip_model or CLIP_DEFAULT
        self._dino_spec = dino_model or DINO_DEFAULT
        self._clip: ClipEmbedder | None = clip_model if isinstance(clip_model, ClipEmbedder) else None
        self._dino: DinoEmbedder | None = dino_model if isinstance(dino_model, DinoEmbedder) else None
        self.device = device or "cpu"
        #: The settings given and the plan's recorded ones, which :meth:`check_model` completes.
        self._given: dict[str, Any] = {}

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
        manifest: str | None = None,
        seeds: str | None = None,
        clip_model: str | None = None,
        dino_model: str | None = None,
        cpu_offload: bool | None = None,
        **settings: Any,
    ) -> EvalPlan:
        """The method settings go to the pipeline; the report records them with their defaults filled in
        (and the panels actually used, once :meth:`check_model` has seen the model)."""
        from attnzoo.pipelines.subject_insertion import check_settings, run_settings

        unknown = sorted(set(settings) - set(_PIPELINE_SETTINGS))
        if unknown:
            raise InvalidOptionError(f"unknown settings {unknown}")
        given = check_settings(**settings)
        evaluator = cls(
            data,
            split or default_split,
            limit=limit,
            manifest=manifest,
            seeds=seeds,
            clip_model=clip_model,
            dino_model=dino_model,
        )
        pipeline_kwargs = dict(settings) | ({"cpu_offload": True} if cpu_offload else {})
        recorded = {
            **run_settings(given),
            "seeds": list(evaluator.seeds),
            "manifest": str(evaluator.dataset.manifest.resolve()),
            "clip_model": str(evaluator._clip_spec),
            "dino_model": str(evaluator._dino_spec),
        }
        evaluator._given = given
        return EvalPlan(model, split or default_split, [(None, evaluator, {})], pipeline_kwargs, recorded)

    def run_settings(self, pipe: Any, *, batch_size: int) -> dict[str, Any]:
        """The panels the model uses (the asked size rounded to its whole tokens), recorded in run.json."""
        from attnzoo.pipelines.subject_insertion import panel_layout, run_settings

        layout = panel_layout(run_settings(self._given), pipe.model.vae_scale_factor)
        return run_settings(self._given, layout)

    def samples(self) -> list[EvalSample]:
        items = []
        for pair in self.dataset.pairs:
            for seed in self.seeds:
                item: dict[str, Any] = {
                    "target": str(pair.target),
                    "subject": str(pair.subject_image),
                    "mask": str(pair.mask),
                    "prompt": pair.prompt,
                    "seed": seed,
                }
                if pair.subject_mask is not None:
                    item["subject_mask"] = str(pair.subject_mask)
                else:
                    item["subject_word"] = pair.subject_word
                items.append(EvalSample(f"{pair.id}/seed{seed}", item, pair))
        return items[: self.limit] if self.limit else items

    def embedders(self) -> tuple[ClipEmbedder, DinoEmbedder]:
        if self._clip is None:
            self._clip = ClipEmbedder.from_name(str(self._clip_spec), self.device)
        if self._dino is None:
            self._dino = DinoEmbedder.from_name(str(self._dino_spec), self.device)
        return self._clip, self._dino

    def record(self, sample: EvalSample, result: Any) -> dict[str, Any]:
        clip, dino = self.embedders()
        scores = insertion_scores(
            clip, dino, result.image, result.mask, result.subject, result.subject_mask, result.prompt
        )
        pair = sample.target
        return {
            "subject": pair.subject,
            "background": pair.background,
            "seed": result.seed,
            "prompt": result.prompt,
            "mask_pixels": int(result.mask.sum()),
            **{k: round(v, 6) for k, v in scores.items()},
        }

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        per_subject: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            for k in METRICS:
                per_subject[r["subject"]][k].append(r[k])
        return {
            **{k: round(float(np.mean(np.array([r[k] for r in records], dtype=float))), 4) for k in METRICS},
            "per_subject": {
                s: {k: round(float(np.mean(np.array(v, dtype=float))), 4) for k, v in m.items()}
                for s, m in sorted(per_subject.items())
            },
            "pairs": len({(r["subject"], r["background"]) for r in records}),
        }

    def report(self, metrics: dict[str, Any]) -> str:
        lines = ["| metric | value |", "|---|---|"]
        lines += [
            f"| {name} | {format_metric(metrics[k])} |"
            for k, name in (("clip_i", "CLIP-I"), ("dino", "DINO"), ("clip_t", "CLIP-T"))
        ]
        attention = metrics.get("attention") or {}
        lines += [
            "",
            "## Settings",
            "",
            f"- method: {metrics.get('method')} ({metrics.get('behaviour')} behaviour)",
            f"- denoising steps: {metrics.get('steps')}, guidance: {metrics.get('guidance')}, "
            f"seeds: {metrics.get('seeds')}",
            f"- panels: {metrics.get('panel_size')} px, {metrics.get('orientation')}; latent blending: {metrics.get('blend')}",
            "- attention: "
            + ", ".join(_attention_setting(k, v) for k, v in attention.items() if k not in ("method", "behaviour")),
            f"- CLIP: {metrics.get('clip_model')}; DINO: {metrics.get('dino_model')}",
            f"- pairs: {metrics.get('pairs')}",
            "",
            "## Per subject",
            "",
            "| subject | CLIP-I | DINO | CLIP-T |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {s} | {format_metric(m['clip_i'])} | {format_metric(m['dino'])} | {format_metric(m['clip_t'])} |"
            for s, m in metrics.get("per_subject", {}).items()
        ]
        return "\n".join(lines) + "\n"


def _attention_setting(key: str, value: Any) -> str:
    """The edit's step window said as one, not as a step count ("steps=None" read as no steps)."""
    if key != "steps":
        return f"{key}={value}"
    if value is None:
        return "edited steps=all"
    if all(isinstance(v, int) for v in value):
        return f"edited steps=[{value[0]}, {value[1]})"
    return f"edited steps=[{value[0]}, {value[1]}) of the run's steps (fractions)"
