"""Training settings: one flat dataclass, loadable from YAML, overridable with ``key=value``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from attnzoo.errors import InvalidInputError, UnknownNameError


@dataclass
class TrainConfig:
    """Engine settings. ``batch_size`` is the *global* batch of one optimizer step (all processes,
    all accumulation steps together), so a run gives the same result on 1 or N processes."""

    epochs: int = 10
    batch_size: int = 64
    accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    cooldown_epochs: float = 0.0  # the last epochs run at min_lr (timm/DeiT: epochs = schedule + cooldown)
    schedule: str = "cosine"  # cosine | step | multistep | constant
    decay_epochs: float = 30.0  # step schedule: every this many epochs
    decay_milestones: list[float] = field(default_factory=list)  # multistep schedule: at these epochs
    decay_rate: float = 0.1
    weight_decay: float = 0.05
    decay_norms_and_biases: bool = False  # by default no weight decay on norms, biases and tokens
    momentum: float = 0.9
    clip_grad: float | None = None
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a GradScaler)
    ema_decay: float | None = None
    seed: int = 0
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end of each epoch
    keep_last: int = 3
    best_metric: str | None = None
    best_mode: str = "max"
    early_stop_patience: int = 0  # stop after this many evaluations without a new best ``best_metric`` (0: never)
    eval_every: int = 1  # epochs
    log_every: int = 10  # optimizer steps
    num_workers: int = 2
    repeated_aug: int = 1  # DeiT's repeated augmentation: each image r times per epoch (differently augmented)
    extra: dict[str, Any] = field(default_factory=dict)  # recipe settings

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1 or self.repeated_aug < 1:
            raise InvalidInputError("epochs, batch_size, accum_steps and repeated_aug must be at least 1")
        if self.schedule not in ("cosine", "step", "multistep", "constant"):
            raise InvalidInputError(f"schedule must be cosine, step, multistep or constant, got {self.schedule!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise InvalidInputError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.best_mode not in ("max", "min"):
            raise InvalidInputError(f"best_mode must be max or min, got {self.best_mode!r}")
        if self.early_stop_patience < 0 or (self.early_stop_patience and self.best_metric is None):
            raise InvalidInputError("early_stop_patience needs best_metric (the metric it watches) and must be >= 0")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise InvalidInputError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: str, current: Any) -> Any:
    """YAML scalars, plus the numbers YAML 1.1 leaves as strings (``1e-4``)."""
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            return parsed
    if isinstance(current, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
        return float(parsed)
    return parsed


def apply_overrides(config: TrainConfig, overrides: dict[str, Any] | list[str]) -> TrainConfig:
    """``["lr=5e-4", "extra.mixup=0.8"]`` or a dict; unknown keys are errors, not silently ignored."""
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in items:
        if key.startswith("extra."):
            sub = key.removeprefix("extra.")
            config.extra[sub] = _coerce(value, config.extra.get(sub)) if isinstance(value, str) else value
        elif key in names:
            current = getattr(config, key)
            setattr(config, key, _coerce(value, current) if isinstance(value, str) else value)
        elif key in config.extra:
            config.extra[key] = _coerce(value, config.extra[key]) if isinstance(value, str) else value
        else:
            raise UnknownNameError("training setting", key, [*names, *config.extra])
    config.validate()
    return config


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise InvalidInputError(f"overrides are key=value, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), value


def named_configs() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("attnzoo.training.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def load_config(source: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """A named recipe (``"biformer"``, see :func:`named_configs`), a YAML path, or the defaults."""
    data: dict[str, Any] = {}
    if source is not None:
        path = Path(source)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise InvalidInputError(f"config file {path} does not exist")
            text = path.read_text()
        else:
            names = named_configs()
            if str(source) not in names:
                raise UnknownNameError("training config", str(source), names)
            text = resources.files("attnzoo.training.configs").joinpath(f"{source}.yaml").read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise InvalidInputError(f"training config {source} must be a mapping")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    extra = dict(data.pop("extra", {}) or {})
    extra.update({k: data.pop(k) for k in list(data) if k not in names})  # recipe keys may sit at the top level
    config = TrainConfig(**data, extra=extra)
    return apply_overrides(config, overrides or [])


def recipe_config(
    config: str | Path | TrainConfig | None,
    overrides: list[str] | dict[str, Any] | None,
    defaults: dict[str, Any],
    task: str,
) -> TrainConfig:
    """A recipe's settings: its defaults under the named/YAML config, then the overrides; keys the
    recipe does not know are errors."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    cfg.extra = {**defaults, **cfg.extra}
    apply_overrides(cfg, overrides or [])
    unknown = set(cfg.extra) - set(defaults)
    if unknown:
        raise InvalidInputError(f"unknown {task} settings: {', '.join(sorted(unknown))}")
    return cfg
