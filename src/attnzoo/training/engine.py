"""The training engine every recipe uses: loop, AMP, accumulation, clipping, EMA, schedules,
atomic checkpoints, exact resume and ``torchrun`` DDP.

Exact resume rests on three choices: the data order is a pure function of (seed, epoch); each
sample's augmentation RNG is seeded from (seed, epoch, index), so skipping the batches already
done changes nothing; and the global RNG is reseeded from (seed, step, rank) before every
optimizer step (dropout, mixup). A run killed at any point and resumed from its last checkpoint
ends with the same weights as an uninterrupted run (bitwise on the CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from attnzoo._distributed import DistributedContext, distributed_context
from attnzoo._io import atomic_write, check_out_outside, remove_stale_temporaries_in, write_text
from attnzoo._placement import resolve_device
from attnzoo._values import check_worker_count
from attnzoo.errors import AttnzooError, DatasetFormatError, InvalidInputError, InvalidOptionError, WeightsError
from attnzoo.training.config import TrainConfig, check_best_metric, resolve_best_mode

__all__ = [
    "RUN_FILES",
    "DistributedContext",
    "Trainer",
    "check_run_folder",
    "distributed_context",
    "failed_checks",
    "latest_checkpoint",
    "run_inputs",
    "seed_everything",
    "typed_batches",
]

_logger = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"checkpoint-(\d{8})\.pt$")
#: What the trainer writes in its folder besides ``checkpoint-*.pt`` and ``tensorboard/``.
RUN_FILES = ("config.yaml", "metrics.csv", "eval.csv", "best.pt", "model.safetensors")
TENSORBOARD = "tensorboard"


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (stable across processes and Python runs)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- data ----------------------------------------------------------------------------------------


class SeededSamples(Dataset):
    """Items are ``(epoch, index, copy)``; each sample's random augmentation is seeded from them,
    so it does not depend on which process or step loads it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int, int]) -> Any:
        epoch, index, copy = item
        state = torch.get_rng_state(), random.getstate(), np.random.get_state()
        seed_everything(_mix(self.seed, epoch, index, copy))
        try:
            return self.dataset[index]
        finally:  # the main process's RNG is not disturbed when num_workers=0
            torch.set_rng_state(state[0])
            random.setstate(state[1])
            np.random.set_state(state[2])


class StepBatches:
    """Per-process micro-batches of (epoch, index, copy), from a permutation seeded by (seed, epoch).

    Optimizer step ``s`` uses the global batch ``order[s*G:(s+1)*G]``, split into ``accum``
    micro-batches, each split across ranks (``[rank::world]``); the last partial batch is dropped
    so every step sees ``G`` samples, unless ``drop_last`` is false (one process, no accumulation:
    the trainer checks). With ``repeats`` r > 1 (DeiT's repeated augmentation) the
    order lists each image r times in a row, so its copies land on different processes, and is cut
    to the dataset length. ``start_step`` skips steps already done (resume)."""

    def __init__(
        self,
        n: int,
        global_batch: int,
        accum: int,
        ctx: DistributedContext,
        seed: int,
        epoch: int,
        start_step: int = 0,
        repeats: int = 1,
        drop_last: bool = True,
    ):
        self.n, self.G, self.accum, self.ctx, self.seed, self.epoch, self.start = (
            n,
            global_batch,
            accum,
            ctx,
            seed,
            epoch,
            start_step,
        )
        self.repeats, self.drop_last = repeats, drop_last

    @property
    def steps(self) -> int:
        return self.n // self.G if self.drop_last else -(-self.n // self.G)

    def global_size(self, step: int) -> int:
        """The samples (dataset items: images, slides, trials) optimizer step ``step`` trains on, all processes together."""
        return min(self.G, self.n - step * self.G)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch))).tolist()
        r = self.repeats  # each image r times in a row, cut to n: built in O(n), whatever r is
        order = [(perm[k // r], k % r) for k in range(self.n)]
        micro = self.G // self.accum
        for step in range(self.start, self.steps):
            batch = order[step * self.G : (step + 1) * self.G]
            for m in range(self.accum):
                part = batch[m * micro : (m + 1) * micro][self.ctx.rank :: self.ctx.world_size]
                yield [(self.epoch, i, c) for i, c in part]


class _WorkerFailure:
    """An attnzoo error a DataLoader worker met, sent to the main process in place of its batch. DataLoader
    itself would re-raise it as ``type(error)(worker traceback text)`` (or a RuntimeError where the class takes
    other arguments): the user would read a traceback where a one-line message was meant."""

    def __init__(self, error: AttnzooError):
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        error = self.error
        return _rebuilt_failure, (type(error), error.args, vars(error))


def _rebuilt_failure(kind: type[AttnzooError], args: tuple[Any, ...], state: dict[str, Any]) -> _WorkerFailure:
    """The error as raised, without calling ``__init__`` (UnknownNameError's takes other arguments than ``args``)."""
    error = kind.__new__(kind, *args)
    error.args = args
    error.__dict__.update(state)
    return _WorkerFailure(error)


def _carried(fn: Callable[[Any], Any], arg: Any) -> Any:
    """``fn(arg)``; in a worker process an attnzoo error becomes a :class:`_WorkerFailure` (in the main process
    it propagates as usual, with its traceback)."""
    if get_worker_info() is None:
        return fn(arg)
    try:
        return fn(arg)
    except AttnzooError as error:
        return _WorkerFailure(error)


class _CarryErrors(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> Any:
        return _carried(self.dataset.__getitem__, item)


class _CarryErrorsCollate:
    def __init__(self, collate_fn: Callable | None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items: list[Any]) -> Any:
        failure = next((item for item in items if isinstance(item, _WorkerFailure)), None)
        return failure if failure is not None else _carried(self.collate_fn, items)


def typed_batches(dataset: Dataset, *, collate_fn: Callable | None = None, **loader_kwargs: Any) -> Iterator[Any]:
    """The batches of ``DataLoader(dataset, collate_fn=collate_fn, **loader_kwargs)``; an attnzoo error met in a
    worker process (a damaged image, a bad setting) reaches the caller as itself, one line, as with
    ``num_workers=0``."""
    loader = DataLoader(_CarryErrors(dataset), collate_fn=_CarryErrorsCollate(collate_fn), **loader_kwargs)
    for batch in loader:
        if isinstance(batch, _WorkerFailure):
            raise batch.error
        yield batch


class _Checks(Dataset):
    """Item ``k``: the ``(index, message)`` of each attnzoo error ``check`` raises on chunk ``k`` of ``items``."""

    def __init__(self, items: Sequence[Any], check: Callable[[Any], Any], chunk: int):
        self.items, self.check, self.chunk = items, check, chunk

    def __len__(self) -> int:
        return -(-len(self.items) // self.chunk)

    def __getitem__(self, k: int) -> list[tuple[int, str]]:
        failures = []
        for i in range(k * self.chunk, min((k + 1) * self.chunk, len(self.items))):
            try:
                self.check(self.items[i])
            except AttnzooError as error:
                failures.append((i, str(error)))
        return failures


def _as_is(item: Any) -> Any:
    return item


def failed_checks(
    items: Sequence[Any], check: Callable[[Any], Any], *, num_workers: int = 0, chunk: int = 256
) -> list[str]:
    """The messages of the attnzoo errors ``check(item)`` raises, in the order of ``items``: every item is checked
    (a run is refused once, naming every damaged file, not once per file). The chunks of ``chunk`` items are
    checked in ``num_workers`` DataLoader worker processes; under ``torchrun`` each process checks its share and
    every process gets every message."""
    ctx = distributed_context()
    share = list(range(ctx.rank, len(items), ctx.world_size))
    checks = _Checks([items[i] for i in share], check, chunk)
    check_worker_count(num_workers)
    workers = min(num_workers, len(checks)) if len(checks) > 1 else 0  # one chunk: no worker process to start
    loader = DataLoader(checks, batch_size=None, num_workers=workers, collate_fn=_as_is)
    found = [(share[i], message) for failures in loader for i, message in failures]
    found = [item for part in ctx.gather_objects(found) for item in part]
    return [message for _, message in sorted(found)]


def refuse_failures(failures: Sequence[str], count: int, what: str) -> None:
    """Raise what :func:`failed_checks` found, if anything: one failure as its own message, several counted
    ("3 of the 500 val images cannot be read (...)"), the first five named."""
    if len(failures) == 1:
        raise DatasetFormatError(failures[0])
    if failures:
        shown = "; ".join(failures[:5]) + ("; ..." if len(failures) > 5 else "")
        raise DatasetFormatError(f"{len(failures)} of the {count} {what} cannot be read ({shown}); mend or remove them")


# -- checkpoints ---------------------------------------------------------------------------------


def _checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``folder``, by step."""
    return sorted(
        (int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*.pt") if (m := CHECKPOINT_RE.fullmatch(p.name))
    )


def read_run_checkpoint(path: str | Path, what: str) -> Any:
    """A checkpoint this engine wrote (``checkpoint-*.pt``, ``best.pt``), read as :func:`attnzoo.weights.load_checkpoint`
    reads any: a zip that would inflate far beyond the file refused first, then ``torch.load(weights_only=True)``,
    its failures (a torn write, another file under that name) as a typed error saying ``what`` could not be done."""
    from attnzoo._io import refuse_torch_zip_bomb

    refuse_torch_zip_bomb(path, error=WeightsError, allow_compressed=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or not loadable safely
        raise WeightsError(f"{what} {path}: not a readable attnzoo checkpoint ({type(e).__name__}: {e})") from e


def load_best_state(net: nn.Module, path: str | Path) -> None:
    """Load the model state of the run's ``best.pt`` into ``net`` (the recipes test the best validated epoch)."""
    state = read_run_checkpoint(path, "cannot test the best epoch from")
    if not isinstance(state, dict) or "model" not in state:
        raise WeightsError(f"cannot test the best epoch from {path}: it is not a training checkpoint (no model state)")
    net.load_state_dict(state["model"])


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = _checkpoints(folder)
    return found[-1][1] if found else None


# -- the run folder --------------------------------------------------------------------------------


def _is_run_file(name: str, outputs: Sequence[str]) -> bool:
    return name in RUN_FILES or name in outputs or CHECKPOINT_RE.fullmatch(name) is not None


def _earlier_run_files(out: Path, outputs: Sequence[str]) -> list[Path]:
    """The files under the names a run writes (TensorBoard's event files included) that ``out`` already holds."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if _is_run_file(p.name, outputs) and p.is_file()]
    return sorted(found) + sorted((out / TENSORBOARD).glob("events.out.tfevents.*"))


def run_inputs(config: Any, weights: str | os.PathLike | None, settings: TrainConfig) -> list[str | os.PathLike]:
    """What a recipe reads besides its data and must never write over: the initial weights, the config
    file and the path-like recipe settings (teacher weights, label and split files)."""
    items = [weights, config, *settings.extra.values()]
    return [item for item in items if isinstance(item, (str, os.PathLike))]


def check_run_folder(
    out: str | os.PathLike,
    *,
    resume: bool | str | os.PathLike = False,
    overwrite: bool = False,
    data: str | os.PathLike | None = None,
    inputs: Sequence[str | os.PathLike] = (),
    outputs: Sequence[str] = (),
) -> list[Path]:
    """Refuse, before any work, a run that would destroy what it reads or mix with another run: ``out``
    equal to or inside ``data`` (a later run would read the run's files as data), an input that is a
    file the run writes (it would be replaced), or, unless it resumes or overwrites, a folder holding an
    earlier run (two runs' checkpoints and logs would mix). ``outputs``: the file names the recipe
    writes besides the trainer's. Returns the earlier run's files (``overwrite`` deletes them)."""
    out = Path(out)
    if resume and overwrite:
        raise InvalidOptionError(
            f"--resume and --overwrite exclude each other: one continues the run in {out}, the other discards it"
        )
    read = [] if data is None else [data]
    check_out_outside(out, read, what="training data", why="a later run would read the run's files as data")
    where = out.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path.parent == where and _is_run_file(path.name, outputs):
            raise InvalidOptionError(
                f"{item} is read by this run, which writes {path.name} in {out}: it would be replaced; "
                "copy it elsewhere or choose another --out"
            )
    earlier = _earlier_run_files(out, outputs)
    if earlier and not resume and not overwrite:
        shown = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise InvalidOptionError(
            f"{out} holds an earlier run ({shown}): pass --resume to continue it, --overwrite to discard it, "
            "or choose another --out"
        )
    return earlier


def _run_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the run a checkpoint was made for and this one, among what both record
    (the initial weights do not count: the checkpoint replaces them)."""
    changes = []
    for key in sorted(saved.keys() & current.keys() - {"weights"}):
        before, now = saved[key], current[key]
        if before == now or (key == "data" and Path(str(before)).resolve() == Path(str(now)).resolve()):
            continue
        changes.append(f"{key} {_shorten(before)} -> {_shorten(now)}")
    return changes


def _shorten(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _no_weight_decay(model: nn.Module) -> Callable[[str], bool]:
    """Whether a parameter name is exempt from weight decay by the model's own word: ``no_weight_decay()``
    (names) and ``no_weight_decay_keywords()`` (substrings, e.g. Swin's relative_position_bias_table), the two
    lists the official Swin/InLine optimizer reads."""
    names = set(getattr(model, "no_weight_decay", lambda: ())())
    keywords = tuple(getattr(model, "no_weight_decay_keywords", lambda: ())())
    return lambda name: name in names or any(k in name for k in keywords)


def _synced_batchnorm(model: nn.Module, enabled: bool, world_size: int, device: torch.device) -> nn.Module:
    """``model`` with SyncBatchNorm in place of its BatchNorm layers when ``enabled`` under torchrun (the
    statistics of every process's samples, as the official LRGT trains); as it is otherwise."""
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not enabled or world_size == 1 or not has_batchnorm:
        return model
    if device.type not in ("cuda", "xpu", "hpu"):
        raise InvalidOptionError(
            f"sync_bn=true needs GPUs under torchrun (torch's SyncBatchNorm does not run on {device.type}); "
            "set sync_bn=false to train with each process's own BatchNorm statistics"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class _Schedule:
    """A timm scheduler driven by the optimizer step: step ``s`` is the unit the scheduler counts (``s``, or the
    epoch ``s // steps_per_epoch``), one unit behind with ``lag`` (the official loops that update the scheduler
    after each step or epoch with its index: each runs at the previous one's rate, the first at the first's)."""

    def __init__(self, scheduler: Any, steps_per_epoch: int | None, lag: int):
        self.scheduler, self.steps_per_epoch, self.lag = scheduler, steps_per_epoch, lag

    def step_update(self, step: int) -> None:
        unit = step if self.steps_per_epoch is None else step // self.steps_per_epoch
        self.scheduler.step_update(max(unit - self.lag, 0))


#: The settings that shape the steps still to come (the optimizer and its rate, the schedule, weight decay and
#: clipping, the precision, the EMA, which weights are evaluated) or what ``best.pt`` is chosen by (the best value
#: saved in the checkpoint is one of ``best_metric``): a resume must keep them. ``epochs`` may grow (a run continued
#: for longer); the settings of logging, checkpointing, evaluation frequency, early-stopping patience, data loading
#: (``num_workers``) and ``accum_steps`` (like the number of processes: how the global batch is computed) may change.
#: The recipe's own settings (``extra``) are compared too, except those its recipe declares free (:class:`Trainer`).
TRAJECTORY_KEYS = (
    "optimizer",
    "weight_decay",
    "decay_norms_and_biases",
    "momentum",
    "clip_grad",
    "lr",
    "lr_base_batch",
    "scale_warmup_min_lr",
    "min_lr",
    "warmup_epochs",
    "warmup_lr",
    "warmup_prefix",
    "cooldown_epochs",
    "schedule",
    "sched_on",
    "sched_update",
    "decay_epochs",
    "decay_milestones",
    "decay_rate",
    "amp",
    "drop_last",
    "repeated_aug",
    "ema_decay",
    "eval_model",
    "sync_bn",
    "best_metric",
)


def _trajectory_changes(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """``key old -> new`` for each :data:`TRAJECTORY_KEYS` setting that differs from the checkpoint's; a key
    the checkpoint lacks (made before the setting existed) counts as its default, which kept the behaviour
    of that time."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    defaults["decay_milestones"] = []
    return [
        f"{key} {saved.get(key, defaults[key])!r} -> {getattr(config, key)!r}"
        for key in TRAJECTORY_KEYS
        if saved.get(key, defaults[key]) != getattr(config, key)
    ]


_UNSET = object()


def _recipe_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any] | None, free: Sequence[str]
) -> list[str]:
    """``key old -> new`` for each recipe setting (``extra``) that differs from the checkpoint's, except the ``free``
    ones. A key the checkpoint lacks counts as its recipe default (``defaults``; without them it is not compared).
    Two spellings of one path are the same setting."""
    changes = []
    for key in sorted(set(current) - set(free)):
        before = saved.get(key, _UNSET if defaults is None else defaults.get(key, _UNSET))
        now = current[key]
        if before is _UNSET or _plain(before) == _plain(now) or _same_path(before, now):
            continue
        changes.append(f"{key} {_shorten(before)} -> {_shorten(now)}")
    return changes


def _plain(value: Any) -> Any:
    """A tuple as a list: a setting read back from YAML or a checkpoint may come as either."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _same_path(a: Any, b: Any) -> bool:
    if not (isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike))):
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False


# -- the trainer -----------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Any], torch.Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]


class Trainer:
    """Train ``model`` on ``train_set`` with ``config``; write everything under ``out_dir``.

    ``loss_fn(model, batch)`` returns the mean loss of a micro-batch (the recipe decides the
    forward: labels, mixup, distillation). ``eval_fn(model)`` returns metrics (run on the weights
    ``eval_model`` names: the EMA's when EMA is on, by default). ``parameters``: the ones to train
    (default: all that require grad; no weight decay on norms, biases, 1-D parameters and those the
    model's ``no_weight_decay``/``no_weight_decay_keywords`` name). ``data``, ``inputs`` (initial
    weights, config file) and ``outputs`` (the recipe's own file names): what :func:`check_run_folder`
    guards before :meth:`fit` writes anything. ``recipe_defaults``: the recipe's settings (``config.extra``) with
    their defaults; a resume refuses a checkpoint made with other recipe settings (a key the checkpoint lacks counts
    as its default), except the ``resumable`` ones (evaluation-only or initialisation settings).
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        loss_fn: LossFn,
        eval_fn: EvalFn | None = None,
        collate_fn: Callable | None = None,
        parameters: Sequence[nn.Parameter] | None = None,
        device: str | torch.device | None = None,
        run_info: dict[str, Any] | None = None,
        data: str | os.PathLike | None = None,
        inputs: Sequence[str | os.PathLike] = (),
        outputs: Sequence[str] = (),
        recipe_defaults: Mapping[str, Any] | None = None,
        resumable: Sequence[str] = (),
    ):
        config.validate()
        resolve_best_mode(config)
        self.recipe_defaults, self.resumable = recipe_defaults, tuple(resumable)
        self.config, self.out_dir, self.loss_fn, self.eval_fn = config, Path(out_dir), loss_fn, eval_fn
        self.data, self.inputs, self.outputs = data, tuple(inputs), tuple(outputs)  # see check_run_folder
        self.ctx = distributed_context()
        if device is None:
            device = f"cuda:{self.ctx.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = resolve_device(device)
        n = len(train_set)  # type: ignore[arg-type]
        if n == 0:
            raise DatasetFormatError("the training set has no samples")
        per_micro = config.batch_size // (config.accum_steps * self.ctx.world_size)
        if per_micro * config.accum_steps * self.ctx.world_size != config.batch_size:
            raise InvalidInputError(
                f"batch_size {config.batch_size} must divide by accum_steps x processes "
                f"({config.accum_steps} x {self.ctx.world_size})"
            )
        if not config.drop_last and config.accum_steps * self.ctx.world_size > 1:
            raise InvalidOptionError(
                "drop_last=false (a last, partial batch each epoch) needs one process and accum_steps=1: "
                "a partial batch cannot be split evenly across processes and accumulation steps"
            )
        if n < config.batch_size and config.drop_last:
            raise InvalidInputError(
                f"the training set has {n} samples, fewer than one batch ({config.batch_size}); lower batch_size"
            )
        self.train_set, self.collate_fn, self.run_info = (
            SeededSamples(train_set, config.seed),
            collate_fn,
            run_info or {},
        )
        check_worker_count(config.num_workers)
        self.steps_per_epoch = n // config.batch_size if config.drop_last else -(-n // config.batch_size)
        self.total_steps = self._step_count("epochs", config.epochs)
        seed_everything(config.seed)
        self.model = model = _synced_batchnorm(model.to(self.device), config.sync_bn, self.ctx.world_size, self.device)
        if config.amp == "fp16" and self.device.type == "cpu" and self.ctx.is_main:
            _logger.warning(
                "amp=fp16 on the CPU: torch runs fp16 autocast with a GradScaler there too, usually slower than fp32 "
                "(amp=none); the official recipes that use fp16 train on GPUs"
            )
        trainable = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
        self.optimizer = self._build_optimizer(trainable)
        self.scheduler = self._build_scheduler()
        self.ema = None
        if config.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=config.ema_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.ddp_model: nn.Module = model
        if self.ctx.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.step, self.best = 0, None
        self.evals_since_best = 0  # for early stopping
        self.eval_pending: int | None = None  # the epoch whose validation the loaded checkpoint still owes
        self.history: list[dict[str, Any]] = []

    # -- construction helpers ----------------------------------------------------------------------
    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        decay = [p for p in params if p.ndim > 1 or c.decay_norms_and_biases]
        no_decay = [p for p in params if p.ndim <= 1 and not c.decay_norms_and_biases]
        named = {id(p): n for n, p in self.model.named_parameters()}
        exempt = _no_weight_decay(self.model)
        decay, no_decay = (
            [p for p in decay if not exempt(named.get(id(p), ""))],
            no_decay + [p for p in decay if exempt(named.get(id(p), ""))],
        )
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise InvalidInputError("the model has no trainable parameters")
        name, lr = c.optimizer.lower(), c.scaled_lrs()["lr"]
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=lr)
        if name == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=c.momentum, nesterov=c.momentum > 0)
        if name == "adam":
            return torch.optim.Adam(groups, lr=lr)
        raise InvalidInputError(f"unknown optimizer {c.optimizer!r} (adamw, adam or sgd)")

    def _build_scheduler(self) -> _Schedule:
        """timm's schedulers in the unit ``sched_on`` names (steps, or epochs), driven by the optimizer step
        (a pure function of the step: nothing to resume)."""
        from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler

        c, rates = self.config, self.config.scaled_lrs()
        warmup, cooldown, total = (
            self._units("warmup_epochs", c.warmup_epochs),
            self._units("cooldown_epochs", c.cooldown_epochs),
            self._units("epochs", c.epochs),
        )
        warmup_args = {
            "warmup_t": warmup,
            "warmup_lr_init": rates["warmup_lr"],
            "warmup_prefix": c.warmup_prefix,
            "t_in_epochs": False,
        }
        if c.schedule == "cosine":  # past t_initial (the cool-down) timm holds lr_min
            scheduler: Any = CosineLRScheduler(
                self.optimizer,
                t_initial=max(total - cooldown - (warmup if c.warmup_prefix else 0), 1),
                lr_min=rates["min_lr"],
                **warmup_args,
            )
        elif c.schedule == "multistep":
            # timm applies milestone m at m - 1; torch's MultiStepLR (the official recipes) at m: shift by one
            scheduler = MultiStepLRScheduler(
                self.optimizer,
                decay_t=[self._units("decay_milestones", m) + 1 for m in c.decay_milestones],
                decay_rate=c.decay_rate,
                **warmup_args,
            )
        else:
            decay = self._units("decay_epochs", c.decay_epochs) if c.schedule == "step" else 10**12
            scheduler = StepLRScheduler(self.optimizer, decay_t=max(decay, 1), decay_rate=c.decay_rate, **warmup_args)
        per_epoch = self.steps_per_epoch if c.sched_on == "epoch" else None
        return _Schedule(scheduler, per_epoch, lag=int(c.sched_update == "after"))

    def _units(self, key: str, epochs: float) -> float:
        """``epochs`` in the schedule's unit: optimizer steps, or epochs themselves with ``sched_on=epoch``."""
        return epochs if self.config.sched_on == "epoch" else self._step_count(key, epochs)

    def _step_count(self, key: str, epochs: float) -> int:
        """``epochs`` of this run as optimizer steps. timm's schedules compute with floats: a count beyond the
        float range (about 1.8e308) would end in an OverflowError at the first step, so it is refused here.
        Nothing before the first step takes time or memory in proportion to the count."""
        steps = epochs * self.steps_per_epoch
        try:
            if math.isfinite(float(steps)):
                return int(round(steps))
        except OverflowError:
            pass
        raise InvalidOptionError(
            f"{key}={_shorten(epochs, 24)} is {_shorten(steps, 24)} optimizer steps ({self.steps_per_epoch} per epoch), "
            "more than the learning-rate schedule can count (its arithmetic is in floats, up to about 1.8e308)"
        )

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, epoch: int, step_in_epoch: int, eval_pending: int | None = None) -> dict[str, Any]:
        """Everything a resume restores. ``eval_pending``: the epoch whose validation had not run when this was
        written (the checkpoint an epoch's end writes before validating); a resume runs it first."""
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "best": self.best,
            "evals_since_best": self.evals_since_best,
            "eval_pending": eval_pending,
            "config": self.config.to_dict(),
            "run": self.run_info,
        }

    def save_checkpoint(self, epoch: int, step_in_epoch: int, eval_pending: int | None = None) -> Path | None:
        if not self.ctx.is_main:
            return None
        path = self.out_dir / f"checkpoint-{self.step:08d}.pt"
        with atomic_write(path) as fh:
            torch.save(self.state_dict(epoch, step_in_epoch, eval_pending), fh)
        ours = [p for step, p in _checkpoints(self.out_dir) if step <= self.step]  # never a later run's
        for stale in ours[: max(len(ours) - self.config.keep_last, 0)]:
            stale.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: str | Path) -> tuple[int, int]:
        """Restore everything; returns ``(epoch, step_in_epoch)`` to continue from."""
        from attnzoo.weights.loading import describe_mismatch

        path = Path(path)
        state = read_run_checkpoint(path, "cannot resume from")
        if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
            raise WeightsError(f"cannot resume from {path}: it is not a training checkpoint (no model/optimizer state)")
        model = _unwrap(self.model)
        mismatch = describe_mismatch(model, state["model"])
        if mismatch:
            raise WeightsError(f"cannot resume from {path}: the model does not match it ({mismatch})")
        self._refuse_other_run(state["config"], state.get("run") or {}, path)
        model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise WeightsError(f"cannot resume from {path}: the optimizer state does not match ({e})") from e
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        try:
            self.scaler.load_state_dict(state["scaler"])
        except RuntimeError as e:  # a checkpoint written under another amp setting
            raise WeightsError(f"cannot resume from {path}: its gradient-scaler state does not match ({e})") from e
        self.step, self.best = int(state["step"]), state.get("best")
        self.evals_since_best = int(state.get("evals_since_best", 0))
        pending = state.get("eval_pending")
        self.eval_pending = None if pending is None else int(pending)
        return int(state["epoch"]), int(state["step_in_epoch"])

    def _refuse_other_run(
        self, saved: Mapping[str, Any], run: Mapping[str, Any], source: str | Path, *, restart: bool = False
    ) -> None:
        """Refuse to go on with a run recorded (in a checkpoint, or the config.yaml of a run that saved none) with
        another batch, seed, schedule, recipe settings, model or data than this one. ``restart``: the record is
        the config.yaml of a run that saved no checkpoint, which keeps no steps: the refusal says what the run was
        started with, not that resumed steps would train otherwise."""
        if restart:
            where, made = f"cannot resume from {source} (the run saved no checkpoint)", "it was started with"
            again = "; resume with the same settings, or start afresh with --overwrite or another --out"
        else:
            where, made, again = f"cannot resume from {source}", "it was made with", ""
        if saved.get("batch_size") != self.config.batch_size or saved.get("seed") != self.config.seed:
            raise WeightsError(
                f"{where}: {made} batch_size={saved.get('batch_size')}, seed={saved.get('seed')}; this run has "
                f"{self.config.batch_size}, {self.config.seed}{again}"
            )
        changed = _trajectory_changes(saved, self.config)
        if changed:
            why = "" if restart else ", and the resumed steps would follow another schedule"
            raise WeightsError(
                f"{where}: {made} other training settings ({'; '.join(changed)}){why}; resume with the same settings, "
                "or start afresh with --overwrite or another --out"
            )
        changed = _recipe_changes(saved.get("extra") or {}, self.config.extra, self.recipe_defaults, self.resumable)
        if changed:
            why = "" if restart else ", and the resumed steps would train otherwise"
            raise WeightsError(
                f"{where}: {made} other recipe settings ({'; '.join(changed)}){why}; resume with the same settings, "
                "or start afresh with --overwrite or another --out"
            )
        changes = _run_changes(dict(run), self.run_info)
        if changes:
            made_for = "it was started for" if restart else "it was made for"
            raise WeightsError(
                f"{where}: {made_for} another run ({'; '.join(changes)}); resume with the same model and data, or "
                "start afresh with --overwrite or another --out"
            )

    def _restart_unsaved_run(self) -> None:
        """``--resume`` of a run that saved no checkpoint (it failed or was stopped before its first one, e.g. an
        error in the model's first forward, or Ctrl-C): the run starts again from step 0, as a fresh one, once its
        record (config.yaml, written before step 0) is found to be an attnzoo run's (its ``effective`` settings and
        a ``run`` naming this run's task, model and data) and its settings the same as a checkpoint's would have to
        be. Its earlier logs go (they would be written again). Anything else is refused, the folder untouched: a
        folder without such a record (another tool's config.yaml beside its own logs) as one holding no checkpoint,
        one holding results (``best.pt``, the weights, the recipe's outputs) but no checkpoint as such (starting
        again would discard them)."""
        no_checkpoint = f"--resume: no checkpoint-*.pt in {self.out_dir} (--overwrite starts afresh)"
        record_path = self.out_dir / "config.yaml"
        if not record_path.is_file():
            raise WeightsError(no_checkpoint)
        import yaml

        try:
            record = yaml.safe_load(record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise WeightsError(
                f"--resume: {record_path} cannot be read ({type(err).__name__}), and {self.out_dir} holds no "
                "checkpoint; pass --overwrite to start afresh"
            ) from None
        run = record.get("run") if isinstance(record, dict) else None
        named = {"task", "model", "data"} & self.run_info.keys()  # what names the run (the weights do not)
        if not (isinstance(run, dict) and isinstance(record.get("effective"), dict) and named <= run.keys()):
            raise WeightsError(no_checkpoint)  # not a run attnzoo recorded: its files are not ours to delete
        earlier = _earlier_run_files(self.out_dir, self.outputs)
        results = [p.name for p in earlier if p.name in ("eval.csv", "best.pt", "model.safetensors", *self.outputs)]
        if results:
            raise WeightsError(
                f"--resume: {self.out_dir} holds the results of a run ({', '.join(results)}) but no checkpoint to "
                "resume from; move them away to train it again, or pass --overwrite"
            )
        settings = {k: v for k, v in record.items() if k not in ("effective", "run")}
        self._refuse_other_run(settings, run, record_path, restart=True)
        if self.ctx.is_main:
            for stale in earlier:
                if stale.name != "config.yaml":  # written again below, with this run's settings
                    stale.unlink(missing_ok=True)
            _logger.warning("no checkpoint in %s yet: starting from step 0", self.out_dir)

    # -- logging -----------------------------------------------------------------------------------
    def _log(self, row: dict[str, Any], writer: Any) -> None:
        """Training rows go to metrics.csv, evaluation rows (``eval_*``) to eval.csv; both to TensorBoard."""
        self.history.append(row)
        if not self.ctx.is_main:
            return
        path = self.out_dir / ("metrics.csv" if "loss" in row else "eval.csv")
        new = not path.exists()
        with path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, row["step"])

    def _truncate_log(self) -> None:
        """On resume, drop log rows written after the checkpoint (they will be written again), and the evaluation
        row of its step when the checkpoint owes that evaluation (it runs again)."""
        for name in ("metrics.csv", "eval.csv"):
            path = self.out_dir / name
            if not self.ctx.is_main or not path.exists():
                continue
            with path.open(newline="") as fh:
                rows = list(csv.reader(fh))
            last = self.step - 1 if name == "eval.csv" and self.eval_pending is not None else self.step
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last] if rows else []
            with atomic_write(path, "w") as fh:
                csv.writer(fh).writerows(keep)

    # -- the loop ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.config.amp == "none":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.config.amp == "bf16" else torch.float16)

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch

    def _evaluate(self, epoch: int) -> dict[str, float]:
        if self.eval_fn is None or not self.ctx.is_main:
            return {}
        model = self._evaluated_model()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = {f"eval_{k}": float(v) for k, v in self.eval_fn(model).items()}
        model.train(was_training)
        return metrics

    def _evaluated_model(self) -> nn.Module:
        """The weights ``eval_model`` names: the EMA's (when EMA is on) or the trained model's."""
        if self.ema is not None and self.config.eval_model == "ema":
            return self.ema.module
        return _unwrap(self.model)

    def _improved(self, metrics: dict[str, float]) -> bool:
        key = self.config.best_metric
        if key is None or f"eval_{key}" not in metrics:
            return False
        value = metrics[f"eval_{key}"]
        if not math.isfinite(value):  # NaN or an infinite loss-like metric is never a new best
            return False
        best_is_finite = self.best is not None and math.isfinite(self.best)
        better = not best_is_finite or (value < self.best if self.config.best_mode == "min" else value > self.best)
        if better:
            self.best = value
        return better

    def fit(self, resume: bool | str | Path = False, overwrite: bool = False) -> dict[str, Any]:
        """Train to the end (or continue from the latest checkpoint with ``resume=True`` / a path; a run that saved
        no checkpoint starts again from step 0). A fresh run refuses a folder holding an earlier run; ``overwrite``
        deletes that run's files first. Returns ``step``, ``best``, ``stopped_early`` (early stopping ended the run
        before its last epoch), the last validation's ``eval_*`` metrics and, where a resume ran the validation its
        checkpoint owed, ``owed_validation`` (that epoch, from 0)."""
        c = self.config
        earlier = check_run_folder(
            self.out_dir, resume=resume, overwrite=overwrite, data=self.data, inputs=self.inputs, outputs=self.outputs
        )
        if self.ctx.world_size > 1:
            dist.barrier()  # every process has checked the folder before process 0 changes it
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main:
            for stale in earlier if overwrite else ():
                stale.unlink(missing_ok=True)
            names = "|".join(re.escape(n) for n in (*RUN_FILES, *self.outputs))
            remove_stale_temporaries_in(self.out_dir, rf"checkpoint-\d{{8}}\.pt|{names}")  # from a killed write
        start_epoch, start_step = 0, 0
        if resume:
            path = latest_checkpoint(self.out_dir) if resume is True else Path(resume)
            if path is None:
                self._restart_unsaved_run()
            else:
                start_epoch, start_step = self.load_checkpoint(path)
                self._truncate_log()
                if self.ctx.is_main:
                    _logger.info("resumed from %s at step %d", path, self.step)
        if self.ctx.is_main:
            import yaml

            effective = {**c.scaled_lrs(), "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
            _logger.info("training with %s", ", ".join(f"{k}={v:g}" for k, v in effective.items()))
            record = {**c.to_dict(), "effective": effective, "run": self.run_info}
            write_text(self.out_dir / "config.yaml", yaml.safe_dump(record, sort_keys=False))
        writer = self._tensorboard()
        bar = self._progress()
        if bar is not None:
            bar.update(self.step)
        metrics: dict[str, float] = {}
        owed, stopped_early = self.eval_pending, False
        try:
            if self.eval_pending is not None:  # the checkpoint was written before its epoch's validation ran
                if self.ctx.is_main:
                    _logger.info("running the validation of epoch %d, which the checkpoint owes", self.eval_pending)
                metrics = self._validate(self.eval_pending, writer)
                self.eval_pending = None
                self.save_checkpoint(start_epoch, start_step)
            for epoch in range(start_epoch, c.epochs):
                if self._should_stop():
                    stopped_early = True
                    if self.ctx.is_main:
                        _logger.info(
                            "early stop: %d evaluations without a better %s", self.evals_since_best, c.best_metric
                        )
                    break
                metrics = self._train_epoch(epoch, start_step if epoch == start_epoch else 0, writer, bar)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if self.ctx.world_size > 1:
            dist.barrier()
        result = {"step": self.step, "best": self.best, "stopped_early": stopped_early, **metrics}
        if owed is not None:  # a resume that ran the validation its checkpoint owed (epoch ``owed``, from 0)
            result["owed_validation"] = owed
        return result

    def _should_stop(self) -> bool:
        """Early stopping, decided on process 0 (the only one that evaluates) and shared with the others."""
        patience = self.config.early_stop_patience
        stop = bool(patience) and self.evals_since_best >= patience
        if patience and self.ctx.world_size > 1:
            flag = torch.tensor([float(stop)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    def _train_epoch(self, epoch: int, start_step: int, writer: Any, bar: Any) -> dict[str, float]:
        c = self.config
        if hasattr(self.train_set.dataset, "set_epoch"):  # e.g. new random views each epoch
            self.train_set.dataset.set_epoch(epoch)
        batches = StepBatches(
            len(self.train_set),
            c.batch_size,
            c.accum_steps,
            self.ctx,
            c.seed,
            epoch,
            start_step,
            c.repeated_aug,
            c.drop_last,
        )
        loader = typed_batches(
            self.train_set,
            batch_sampler=batches,
            num_workers=c.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        model = self.ddp_model
        model.train()
        step_in_epoch, micro, running, seen, t0 = start_step, 0, 0.0, 0, time.perf_counter()
        logged_steps = 0  # optimizer steps summed in ``running`` since the last log row
        batches_left = iter(loader)
        while True:
            try:
                batch = next(batches_left)
            except StopIteration:
                break
            except AttnzooError:  # a sample that cannot be loaded (a damaged file): keep the steps done first
                self._save_before_failing(epoch, step_in_epoch)
                raise
            if micro == 0:
                seed_everything(_mix(c.seed, self.step, self.ctx.rank))  # dropout, mixup: a function of the step
                self.scheduler.step_update(self.step)
            batch = self._to_device(batch)
            sync = micro == c.accum_steps - 1 or self.ctx.world_size == 1
            with nullcontext() if sync else model.no_sync(), self._autocast():
                loss = self.loss_fn(model, batch)
            value = loss.item()  # one device sync per micro-step, for the check and the log
            if not math.isfinite(value):
                raise InvalidInputError(
                    f"the loss is {value} at step {self.step} (epoch {epoch}); lower lr or check the data"
                )
            with nullcontext() if sync else model.no_sync():
                self.scaler.scale(loss / c.accum_steps).backward()
            running += value / c.accum_steps
            micro += 1
            if micro < c.accum_steps:
                continue
            micro = 0
            if c.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(_unwrap(model).parameters(), c.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(_unwrap(model))  # constant decay from the initial weights, as DeiT-style recipes
            seen += batches.global_size(step_in_epoch)  # dataset items (images, slides, trials), whatever a batch holds
            self.step += 1
            step_in_epoch += 1
            logged_steps += 1
            if bar is not None:
                bar.update(1)
            if self.step % c.log_every == 0 or step_in_epoch == self.steps_per_epoch:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                mean_loss = self._mean_over_processes(running / logged_steps)
                row = {
                    "step": self.step,
                    "epoch": epoch,
                    "loss": mean_loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "samples_per_s": rate,
                }
                self._log(row, writer)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{rate:.1f}")
                seen, t0, running, logged_steps = 0, time.perf_counter(), 0.0, 0
            if c.checkpoint_every and self.step % c.checkpoint_every == 0 and step_in_epoch < self.steps_per_epoch:
                self.save_checkpoint(epoch, step_in_epoch)
        metrics: dict[str, float] = {}
        if self.eval_fn is not None and ((epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs):
            # The epoch's training is saved before its validation runs: a failure there (a damaged image, a
            # metric error) loses none of it. The checkpoint says the validation is owed; a resume runs it first.
            self.save_checkpoint(epoch + 1, 0, eval_pending=epoch)
            metrics = self._validate(epoch, writer)
        self.save_checkpoint(epoch + 1, 0)  # with the validation's outcome (best, evals_since_best)
        return metrics

    def _save_before_failing(self, epoch: int, step_in_epoch: int) -> None:
        """A checkpoint of the last optimizer step, unless there is one: a sample failed to load, between two
        steps, so the weights and optimizer are those after step ``self.step`` (a step interrupted part-way through
        its accumulation is redone whole on resume)."""
        if not self.ctx.is_main or (self.out_dir / f"checkpoint-{self.step:08d}.pt").exists():
            return
        try:
            path = self.save_checkpoint(epoch, step_in_epoch)
        except Exception as err:  # noqa: BLE001 - the data error is what the caller raises and the user must see
            _logger.warning("a sample could not be loaded, and saving the steps done failed too: %s", err)
            return
        _logger.warning("a sample could not be loaded: saved %s (step %d); mend the data and --resume", path, self.step)

    def _validate(self, epoch: int, writer: Any) -> dict[str, float]:
        """Evaluate the weights at the end of ``epoch``; log the metrics, count evaluations without a better
        ``best_metric`` and write ``best.pt`` when it improved."""
        c = self.config
        metrics = self._evaluate(epoch)
        if metrics:
            check_best_metric(c.best_metric, [k.removeprefix("eval_") for k in metrics], "this run's evaluation")
            self._log({"step": self.step, "epoch": epoch, **metrics}, writer)
            improved = self._improved(metrics)
            self.evals_since_best = 0 if improved else self.evals_since_best + 1
            if improved and self.ctx.is_main:
                model_to_save = self._evaluated_model()
                best = {"model": model_to_save.state_dict(), "step": self.step, "epoch": epoch, **metrics}
                if self.ema is not None and model_to_save is not self.ema.module:
                    best["ema"] = self.ema.module.state_dict()  # as the official best.pth: both sets of weights
                with atomic_write(self.out_dir / "best.pt") as fh:
                    torch.save(best, fh)
        return metrics

    def _mean_over_processes(self, value: float) -> float:
        """``value`` averaged over the processes (every process reaches a log row at the same step); itself on one."""
        if self.ctx.world_size <= 1:
            return value
        flag = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag)
        return float(flag.item()) / self.ctx.world_size

    def save_weights(self, model: nn.Module | None = None, name: str = "model.safetensors") -> Path | None:
        """The final weights (the evaluated ones, ``eval_model``: the EMA's when EMA is on unless it says ``model``) as
        safetensors, on process 0."""
        if not self.ctx.is_main:
            return None
        from safetensors.torch import save

        model = model or self._evaluated_model()
        path = self.out_dir / name
        with atomic_write(path) as fh:
            fh.write(save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
        return path

    def _progress(self):
        if not self.ctx.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, desc="train", unit="step", dynamic_ncols=True, disable=None)

    def _tensorboard(self):
        if not self.ctx.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the `train` extra is not installed: CSV only
            return None
        return SummaryWriter(str(self.out_dir / TENSORBOARD), purge_step=self.step or None)
