"""Training settings: one flat dataclass, loadable from YAML, overridable with ``key=value``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from attnzoo._values import is_whole, to_real, whole_number
from attnzoo.errors import InvalidOptionError, UnknownNameError

#: The seeds torch's generators take: the ``seed`` setting's range, and each of WSI training's ``seeds``.
SEED_RANGE = (-(2**63), 2**63 - 1)

_CHOICES = {
    "schedule": ("cosine", "step", "multistep", "constant"),
    "amp": ("none", "bf16", "fp16"),
    "best_mode": ("max", "min"),
    "optimizer": ("adamw", "adam", "sgd"),
    "sched_on": ("step", "epoch"),
    "sched_update": ("before", "after"),
    "eval_model": ("ema", "model"),
}
#: Lowest allowed value of each bounded setting (counts, and rates that may be zero).
_AT_LEAST = {
    "epochs": 1,
    "batch_size": 1,
    "accum_steps": 1,
    "repeated_aug": 1,
    "eval_every": 1,
    "log_every": 1,
    "keep_last": 1,
    "num_workers": 0,
    "checkpoint_every": 0,
    "early_stop_patience": 0,
    "min_lr": 0.0,
    "warmup_lr": 0.0,
    "warmup_epochs": 0.0,
    "cooldown_epochs": 0.0,
    "weight_decay": 0.0,
    "momentum": 0.0,
}
_POSITIVE = ("lr", "decay_epochs", "decay_rate", "clip_grad", "lr_base_batch")
_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


@dataclass
class TrainConfig:
    """Engine settings. ``batch_size`` is the *global* batch of one optimizer step (all processes,
    all accumulation steps together), so a run gives the same result on 1 or N processes (a model with
    BatchNorm layers: with ``sync_bn``)."""

    epochs: int = 10
    batch_size: int = 64
    accum_steps: int = 1
    drop_last: bool = True  # false: an epoch ends with the partial batch left over (OAT's loader; one process only)
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_base_batch: int | None = None  # lr is per this many images: x batch_size / lr_base_batch (DeiT, Swin: 512)
    scale_warmup_min_lr: bool = False  # lr_base_batch scales warmup_lr and min_lr too (the Swin codebase: InLine)
    min_lr: float = 1e-5
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    warmup_prefix: bool = True  # the decay starts after the warm-up (false: timm's default, counted from 0)
    cooldown_epochs: float = 0.0  # the last epochs run at min_lr (timm's train.py: epochs = schedule + cooldown)
    schedule: str = "cosine"  # cosine | step | multistep | constant
    sched_on: str = "step"  # step | epoch: the rate changes every optimizer step, or once per epoch
    sched_update: str = "before"  # before | after: "after" runs each step/epoch at the previous one's rate
    decay_epochs: float = 30.0  # step schedule: every this many epochs
    decay_milestones: list[float] = field(default_factory=list)  # multistep schedule: at these epochs
    decay_rate: float = 0.1
    weight_decay: float = 0.05
    decay_norms_and_biases: bool = False  # by default no weight decay on norms, biases and tokens
    momentum: float = 0.9
    clip_grad: float | None = None
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a GradScaler)
    ema_decay: float | None = None
    eval_model: str = "ema"  # ema | model: the weights evaluated, kept in best.pt and saved (EMA's when EMA is on)
    sync_bn: bool = False  # SyncBatchNorm under torchrun: BatchNorm statistics over all processes' samples
    seed: int = 0
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end of each epoch
    keep_last: int = 3
    best_metric: str | None = None
    # max | min: whether a higher or a lower ``best_metric`` is better. Unset (null), it follows the metric's known
    # direction (recipe_config; "max" for a metric of no known direction); set, it must agree with a known direction.
    best_mode: str | None = None
    early_stop_patience: int = 0  # stop after this many evaluations without a new best ``best_metric`` (0: never)
    eval_every: int = 1  # epochs
    log_every: int = 10  # optimizer steps
    num_workers: int = 2
    repeated_aug: int = 1  # DeiT's repeated augmentation: each image r times per epoch (differently augmented)
    extra: dict[str, Any] = field(default_factory=dict)  # recipe settings

    def validate(self) -> None:
        """Refuse, naming the setting, any value the engine could not use as meant (types included:
        ``lr=abc`` or ``lr=nan`` must not reach the optimizer); integral floats become ints."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _conform(f.name, getattr(self, f.name), str(f.type)))
        for key, choices in _CHOICES.items():
            if key == "best_mode" and self.best_mode is None:
                continue  # follows best_metric's direction
            if str(getattr(self, key)).lower() not in choices:
                raise InvalidOptionError(f"{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        for key, low in _AT_LEAST.items():
            if getattr(self, key) < low:
                raise InvalidOptionError(f"{key} must be at least {low}, got {getattr(self, key)!r}")
        for key in _POSITIVE:
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise InvalidOptionError(f"{key} must be positive, got {getattr(self, key)!r}")
        if self.momentum >= 1:
            raise InvalidOptionError(f"momentum must be below 1, got {self.momentum!r}")
        if any(m < 0 for m in self.decay_milestones):
            raise InvalidOptionError(f"decay_milestones must be epochs (>= 0), got {self.decay_milestones!r}")
        if self.early_stop_patience and self.best_metric is None:
            raise InvalidOptionError("early_stop_patience needs best_metric (the metric it watches)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise InvalidOptionError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        used = {"min_lr": self.schedule == "cosine", "warmup_lr": self.warmup_epochs > 0}
        rates = self.scaled_lrs()
        for key in ("min_lr", "warmup_lr"):  # above lr the schedule climbs where it should decay or warm up
            if used[key] and rates[key] > rates["lr"]:
                scaled = (
                    f" (x batch_size / lr_base_batch: {rates['lr']:g}; lower {key} or set lr_base_batch=null)"
                    if self.lr_base_batch
                    else ""
                )
                raise InvalidOptionError(f"{key} must be at most lr ({self.lr}{scaled}), got {getattr(self, key)!r}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidOptionError(f"seed must be a 64-bit integer, got {self.seed!r}")

    def scaled_lrs(self) -> dict[str, float]:
        """The rates a run uses: with ``lr_base_batch``, ``lr`` (and with ``scale_warmup_min_lr`` also
        ``warmup_lr``, ``min_lr``) times ``batch_size / lr_base_batch``, the linear rule of the official
        DeiT/BiFormer/Swin scripts (``batch_size`` is already the global batch of all processes and steps)."""
        factor = 1.0 if self.lr_base_batch is None else self.batch_size / self.lr_base_batch
        bounds = factor if self.scale_warmup_min_lr else 1.0
        return {"lr": self.lr * factor, "warmup_lr": self.warmup_lr * bounds, "min_lr": self.min_lr * bounds}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _conform(key: str, value: Any, annotation: str) -> Any:
    """``value`` as the type ``annotation`` names (``"float | None"``, ``"list[float]"``...), or a typed
    error naming ``key``."""
    optional = annotation.endswith(" | None")
    kind = annotation.removesuffix(" | None")
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and is_whole(value):
        return int(value)
    if kind == "float" and (number := to_real(value)) is not None:
        return number
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "list[float]" and isinstance(value, (list, tuple)):
        return [_conform(f"{key}[{i}]", v, "float") for i, v in enumerate(value)]
    if kind.startswith("dict") and isinstance(value, Mapping):
        return dict(value)
    if kind not in _KINDS and not kind.startswith(("list", "dict")):
        return value  # a type this check does not know: the engine's own checks apply
    wanted = _KINDS.get(kind, "a list of numbers" if kind.startswith("list") else "a mapping")
    raise InvalidOptionError(f"{key} must be {wanted}{' or null' if optional else ''}, got {value!r}")


def _coerce(key: str, value: str, current: Any) -> Any:
    """YAML scalars, plus the numbers YAML 1.1 leaves as strings (``1e-4``)."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise InvalidOptionError(f"{key}={value!r} is not a value ({_yaml_problem(err)})") from None
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            return parsed
    if isinstance(current, float) and (number := to_real(parsed)) is not None:
        return number
    return parsed  # anything else is judged by the setting's own check


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or err}{where}"


def apply_overrides(config: TrainConfig, overrides: dict[str, Any] | list[str]) -> TrainConfig:
    """``["lr=5e-4", "extra.mixup=0.8"]`` or a dict; unknown keys are errors, not silently ignored."""
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    names = {f.name for f in dataclasses.fields(config)}
    for key, value in items:
        if key.startswith("extra."):
            sub = key.removeprefix("extra.")
            config.extra[sub] = _coerce(key, value, config.extra.get(sub)) if isinstance(value, str) else value
        elif key in names:
            current = getattr(config, key)
            setattr(config, key, _coerce(key, value, current) if isinstance(value, str) else value)
        elif key in config.extra:
            config.extra[key] = _coerce(key, value, config.extra[key]) if isinstance(value, str) else value
        else:
            raise UnknownNameError("training setting", key, [*names, *config.extra])
    config.validate()
    return config


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise InvalidOptionError(f"overrides are key=value, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), value


#: The task whose recipe each named config is written for: its extra settings are that recipe's, which the other
#: tasks' recipes refuse (``attnzoo train TASK --list-configs`` lists a task's own).
CONFIG_TASKS: dict[str, str] = {
    "acmil": "wsi-classification",
    "biformer": "image-classification",
    "deit": "image-classification",
    "finetune": "image-classification",
    "inline_swin": "image-classification",
    "l2vit": "image-classification",
    "lrgt": "multiview-3d-reconstruction",
    "oat": "scanpath",
    "sparsifiner_distill": "image-classification",
    "sparsifiner_recon": "image-classification",
}


def named_configs(task: str | None = None) -> list[str]:
    """The named recipes (``--config NAME``); with ``task``, only that task's (:data:`CONFIG_TASKS`)."""
    names = sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("attnzoo.training.configs").iterdir()
        if p.name.endswith(".yaml")
    )
    return names if task is None else [n for n in names if CONFIG_TASKS.get(n) == task]


def _named_configs_hint(task: str | None = None) -> str:
    own = named_configs(task) if task is not None else []
    if own:
        return f"Named {task} configs: {', '.join(own)} (attnzoo train {task} --list-configs); or give a YAML file."
    return f"Named configs: {', '.join(named_configs())} (attnzoo train TASK --list-configs); or give a YAML file."


def _check_config_task(source: str | Path, task: str) -> None:
    """A named recipe of another task (``--config lrgt`` for image classification) is refused, naming its task,
    before its settings are read as this task's."""
    path = Path(source)
    if path.suffix not in (".yaml", ".yml") and not path.exists():  # a name, as _read_config tells them apart
        other = CONFIG_TASKS.get(str(source))
        if other is not None and other != task:
            raise InvalidOptionError(
                f"training config {source!r} is for {other} (attnzoo train {other} --config {source}), "
                f"not {task}. {_named_configs_hint(task)}"
            )


def _read_config(source: str | Path, task: str | None = None) -> dict[str, Any]:
    """The mapping a named recipe or a YAML file holds; every way a file can be wrong is a typed error."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise InvalidOptionError(f"config file {path} does not exist. {_named_configs_hint(task)}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidOptionError(f"config file {path} cannot be read as text ({err})") from None
    else:
        names = named_configs()
        if str(source) not in names:
            error = UnknownNameError("training config", str(source), named_configs(task) or names)
            error.args = (f"{error.args[0]} {_named_configs_hint(task)}",)
            raise error
        text = resources.files("attnzoo.training.configs").joinpath(f"{source}.yaml").read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidOptionError(f"training config {source} is not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise InvalidOptionError(f"training config {source} is nested too deeply to be a config") from None
    data = {} if data is None else data
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise InvalidOptionError(f"training config {source} must be a mapping of setting names to values")
    if not isinstance(data.get("extra") or {}, dict):
        raise InvalidOptionError(f"training config {source}: 'extra' must be a mapping")
    return data


def load_config(source: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """A named recipe (``"biformer"``, see :func:`named_configs`), a YAML path, or the defaults."""
    return _load_config(source, overrides)


def _load_config(
    source: str | Path | None, overrides: list[str] | dict[str, Any] | None, task: str | None = None
) -> TrainConfig:
    """:func:`load_config`; with ``task`` (a recipe's), its errors name that task's own configs."""
    data = _read_config(source, task) if source is not None else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    extra = dict(data.pop("extra", None) or {})
    extra.update({k: data.pop(k) for k in list(data) if k not in names})  # recipe keys may sit at the top level
    config = TrainConfig(**data, extra=extra)
    return apply_overrides(config, overrides or [])


#: A recipe setting's allowed range: ``(low, high)``, both included; ``high`` None for no upper bound.
Range = tuple[float, float | None]


def _check_recipe_settings(
    extra: dict[str, Any], defaults: dict[str, Any], task: str, ranges: Mapping[str, Range]
) -> None:
    """Recipe settings have the kind of their default (a number, a flag, a name); None defaults take anything,
    except where ``ranges`` bounds them (then an int if the lower bound is one, else a number, or null)."""
    unknown = set(extra) - set(defaults)
    if unknown:
        raise InvalidOptionError(
            f"unknown {task} settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(defaults))})"
        )
    for key, default in defaults.items():
        if key in ranges:
            low, high = ranges[key]
            kind = type(low if default is None else default).__name__
            extra[key] = _in_range(
                key, _conform(key, extra[key], f"{kind} | None" if default is None else kind), low, high
            )
        elif default is not None and not isinstance(default, (list, dict)):
            kind = "bool" if isinstance(default, bool) else type(default).__name__
            extra[key] = _conform(key, extra[key], kind)


def _in_range(key: str, value: Any, low: float, high: float | None) -> Any:
    """``value`` if it lies in ``[low, high]`` (None passes: a setting left unset), else an error naming ``key``."""
    if value is None:
        return None
    if isinstance(value, int):
        return whole_number(value, key, low=int(low), high=None if high is None else int(high))
    if value < low or (high is not None and value > high):
        wanted = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidOptionError(f"{key} must be a number {wanted}, got {value!r}")
    return value


def check_best_metric(best_metric: str | None, metrics: Sequence[str], evaluation: str) -> None:
    """Refuse a ``best_metric`` that ``evaluation`` does not report: no ``best.pt`` would ever be written, and
    the run would end without saying why."""
    if best_metric is not None and best_metric not in metrics:
        raise InvalidOptionError(
            f"best_metric {best_metric!r} is not a metric {evaluation} reports; choose one of: {', '.join(metrics)}"
        )


#: Whether a higher (``max``) or lower (``min``) value of a metric is better, for the metrics whose direction is
#: known whatever the recipe: accuracy-like scores, AUC, F1, IoU and OAT's sequence score go up; OAT's
#: behavioural distance (Δ), edit distance and losses go down. A recipe's own table adds to (or overrides) it.
METRIC_MODES: dict[str, str] = {
    "top1": "max",
    "top5": "max",
    "accuracy": "max",
    "auc": "max",
    "f1": "max",
    "f1_micro": "max",
    "f1_macro": "max",
    "iou": "max",
    "ss": "max",
    "delta": "min",
    "edit_distance": "min",
    "loss": "min",
}


def resolve_best_mode(config: TrainConfig, modes: Mapping[str, str | None] | None = None) -> TrainConfig:
    """Set ``config.best_mode`` from ``best_metric``'s direction (``modes``, then :data:`METRIC_MODES`) when it is
    unset; an explicit ``best_mode`` that contradicts a known direction is refused (``best.pt``, the saved
    weights and early stopping would follow the worst epoch). A metric of no known direction keeps an explicit
    mode, or ``max`` (the former default)."""
    known = {**METRIC_MODES, **(modes or {})}
    direction = known.get(config.best_metric) if config.best_metric is not None else None
    if config.best_mode is None:
        config.best_mode = direction or "max"
    elif direction is not None and config.best_mode.lower() != direction:
        better = "higher" if direction == "max" else "lower"
        raise InvalidOptionError(
            f"best_mode={config.best_mode} contradicts best_metric={config.best_metric}, where {better} is better "
            f"(best_mode={direction}); leave best_mode out (it follows best_metric) or set best_mode={direction}"
        )
    else:
        config.best_mode = config.best_mode.lower()
    return config


def recipe_config(
    config: str | Path | TrainConfig | None,
    overrides: list[str] | dict[str, Any] | None,
    defaults: dict[str, Any],
    task: str,
    *,
    metrics: Sequence[str] | None = None,
    ranges: Mapping[str, Range] | None = None,
    metric_modes: Mapping[str, str | None] | None = None,
) -> TrainConfig:
    """A recipe's settings: its defaults under the named/YAML config, then the overrides; keys the
    recipe does not know, values of the wrong kind or outside ``ranges``, and a ``best_metric`` not among
    ``metrics`` (the names the recipe's evaluation reports) are errors, before any data is read. ``best_mode``
    follows ``best_metric``'s direction (``metric_modes``: the recipe's own, then :data:`METRIC_MODES`) unless set,
    and a set one that contradicts it is an error (:func:`resolve_best_mode`)."""
    if config is not None and not isinstance(config, TrainConfig):
        _check_config_task(config, task)
    cfg = config if isinstance(config, TrainConfig) else _load_config(config, None, task)
    cfg.extra = {**defaults, **cfg.extra}
    apply_overrides(cfg, overrides or [])
    _check_recipe_settings(cfg.extra, defaults, task, ranges or {})
    if metrics is not None:
        check_best_metric(cfg.best_metric, metrics, f"the {task} evaluation")
    return resolve_best_mode(cfg, metric_modes)
