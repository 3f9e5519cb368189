"""Run a pipeline over a dataset split, score it, and write a resumable report.

``out/`` receives ``run.json`` (the settings), ``predictions.jsonl`` (one line per sample,
appended and flushed batch by batch: the resume state), ``skipped.jsonl`` (inputs that
could not be read, with the reason), and at the end ``metrics.json`` and ``report.md``.
Running again with the same settings continues where an interrupted run stopped (with
``retry_skipped``, the skipped inputs are tried again too).

Under ``torchrun`` each process takes every N-th sample and appends to its own
``predictions.rank<r>.jsonl``; process 0 then merges them, scores and writes the report.

A second process started on the same ``out/`` (the same command twice) is refused while the first runs
(a lock file, ``.attnzoo-eval.lock``, where the file system has locks); an answer found twice in the
files all the same is counted once (the first), and said.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from attnzoo._io import write_json, write_text
from attnzoo.errors import InvalidInputError, InvalidOptionError

#: Settings an older attnzoo did not record: a run.json without them is resumed (with a warning), since
#: the earlier run's value cannot be known; the value recorded from then on holds later resumes to it.
ADDED_SETTINGS = ("device", "model_dtype", "weights_label", "annotations_sha256")
#: Settings renamed since: (old name, new name). ``precision`` (the model's dtype) hid POPE's metric of
#: that name in metrics.json, and the 3-D ``fscore`` flag stood where the F-score goes when not computed.
RENAMED_SETTINGS = (("precision", "model_dtype"), ("fscore", "with_fscore"))


@dataclass
class EvalSample:
    id: str
    input: Any
    target: Any


@dataclass
class EvalPlan:
    """What ``attnzoo eval <task>`` runs: the model (name) and pipeline keywords, and one evaluator per
    run with the settings it adds to ``run.json`` (a sub-folder name for each run when there are
    several, e.g. a sweep over view counts)."""

    model: str
    split: str
    runs: list[tuple[str | None, TaskEvaluator, dict[str, Any]]]
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keywords the model is built with when named (e.g. the feature width the data holds)."""


class TaskEvaluator:
    """What a task contributes to the runner: its samples, its per-sample record, its metrics.

    ``attnzoo eval <task>`` calls :meth:`plan` with the task's command-line options; the default
    builds one evaluator from them. A task whose options change the model or the pipeline (an OAT
    run's own split, a view-count sweep) overrides it.
    """

    task: ClassVar[str] = ""
    #: The metrics ``attnzoo eval`` prints on its one-line summary.
    headline: ClassVar[tuple[str, ...]] = ()
    #: Pipeline keywords this run needs beyond the plan's (e.g. the method of one row of a comparison).
    pipeline_kwargs: dict[str, Any] | None = None

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
        """``split`` is None when the user gave none (``default_split`` is the task's)."""
        split = split or default_split
        evaluator = cls(data, split, limit=limit, **options)  # type: ignore[call-arg]
        return EvalPlan(model, split, [(None, evaluator, {})], settings=dict(options))

    @classmethod
    def summarize(cls, results: dict[Any, dict[str, Any]], out: Path) -> str:
        """Several runs of one plan: write their joint report and say where (a plan of one run never calls this)."""
        raise NotImplementedError(f"{cls.__name__} plans one run only")

    @classmethod
    def summary_files(cls, out: Path) -> tuple[Path, ...]:
        """The files :meth:`summarize` writes into ``out``: ``attnzoo eval --overwrite`` removes them before the
        first run starts over, so an interrupted plan never leaves the earlier joint report beside new runs."""
        return ()

    def check_model(self, model: Any) -> None:
        """Refuse a model that cannot be scored on this data (e.g. other classes) before any work."""

    def run_settings(self, pipe: Any, *, batch_size: int) -> dict[str, Any]:
        """Settings known only once the pipeline is built (what actually ran, e.g. the attention
        implementation a model loaded with), recorded in run.json: a resume with other ones is refused."""
        return {}

    def samples(self) -> Sequence[EvalSample]:
        raise NotImplementedError

    def record(self, sample: EvalSample, result: Any) -> dict[str, Any]:
        raise NotImplementedError

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any]) -> str:
        raise NotImplementedError


def check_limit(limit: Any) -> int | None:
    """``--limit``: None (every sample) or a positive count of samples; 0, a negative count, a bool or a float
    is refused (:class:`~attnzoo.errors.InvalidOptionError`, exit code 2 on the command line), since slicing
    by it would silently drop samples from the end."""
    from attnzoo._values import whole_number

    if limit is None:
        return None
    return whole_number(
        limit, "--limit", why="the number of samples to evaluate; leave it out for all", error=InvalidOptionError
    )


def weights_identity(weights: str | os.PathLike | None) -> str:
    """What names the weights in a run's settings: a local file by its absolute path, size and
    modification time, so a resumed evaluation never reuses predictions of weights since retrained."""
    if not weights:
        return "pretrained"
    path = Path(weights)
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"
    return str(weights)


def execution_settings(pipe: Any) -> dict[str, Any]:
    """Where and in what precision the pipeline's model runs: the device type (``cpu``, ``cuda``, ``mps``)
    and the floating dtype of its parameters (the pipeline's ``dtype``, else its model's ``dtype`` attribute, e.g.
    a diffusers pipeline's wrapper without ``parameters()``, else the dtype of the model's parameters). Both
    change the answers (NevaClip searches under fp16 autocast on CUDA only), so a resume on another device type
    or dtype is refused as other settings."""
    import torch

    from attnzoo._placement import parameter_dtype

    device = getattr(pipe, "device", None)
    if device is not None and not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            device = None
    model = getattr(pipe, "model", None)
    dtype = getattr(pipe, "dtype", None) or getattr(model, "dtype", None) or parameter_dtype(model)
    return {
        "device": device.type if device is not None else None,
        "model_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
    }


def json_safe(value: Any) -> Any:
    """``value`` as JSON can hold it: NaN and infinities (a metric no sample could give) become None (null),
    numpy numbers plain numbers, tuples lists. What the runner writes goes through this (and ``allow_nan=False``)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, tensors
    if callable(tolist):
        return json_safe(tolist())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """One JSON text of ``value`` with NaN/infinity as null; anything still not finite is an error."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def format_metric(value: Any, spec: str = ".4f") -> str:
    """A metric in a report: ``n/a`` where no value could be computed (None, NaN, infinite)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _read_jsonl(path: Path, truncate: bool = True) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a killed run) is cut off the file (if ours to cut)."""
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                records.pop()
                break
            good_bytes += len(line)
    if truncate and good_bytes != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
    return records


def evaluate(
    pipe: Any,
    evaluator: TaskEvaluator,
    out_dir: str | os.PathLike,
    *,
    settings: dict[str, Any],
    batch_size: int = 32,
    num_workers: int = 0,
    overwrite: bool = False,
    retry_skipped: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate and return the metrics dict that is also written to ``out_dir/metrics.json``
    (under ``torchrun``: on process 0; the others return an empty dict). A resumed run keeps the
    samples an earlier run skipped as skipped, unless ``retry_skipped`` (an input mended since).
    The pipeline's model is checked against the evaluator (:meth:`TaskEvaluator.check_model`) before
    anything is written or answered; a pipeline without a ``model`` attribute is not checked.

    Answers an earlier run left in ``out_dir`` for samples that are not among this run's (the data
    changed since) stay in its files but are left out of the metrics, said through ``log`` (default:
    a line on stderr). NaN and infinite values are written as null (JSON has neither).

    A second process evaluating into ``out_dir`` while this one runs is refused (:class:`InvalidInputError`, before
    it reads, deletes or writes anything there); an answer found twice in its files is counted once (the first)."""
    from tqdm.auto import tqdm

    from attnzoo._distributed import distributed_context
    from attnzoo.pipelines.base import check_batching

    say = log or (lambda message: print(message, file=sys.stderr))

    check_batching(batch_size, num_workers)  # before anything is written
    shadowing = sorted(set(settings) & set(evaluator.headline))
    if shadowing:  # a report would show the setting where the metric goes (F-score: False)
        raise InvalidOptionError(f"{type(evaluator).__name__}: run setting(s) {shadowing} are named like its metrics")
    model = getattr(pipe, "model", None)
    if model is not None:
        evaluator.check_model(model)
    ctx = distributed_context()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} is a file: evaluation results go into a folder")
    out.mkdir(parents=True, exist_ok=True)
    suffix = f".rank{ctx.rank}" if ctx.world_size > 1 else ""
    # before anything is read, deleted or written; rank 0 (which deletes and merges) takes a single process's lock,
    # so that a plain run and a torchrun job on one --out exclude each other
    with only_process(out / f".attnzoo-eval{suffix if ctx.rank else ''}.lock", out):
        predictions_path, skipped_path, run_path = (
            out / f"predictions{suffix}.jsonl",
            out / f"skipped{suffix}.jsonl",
            out / "run.json",
        )
        settings = json_safe({"task": evaluator.task, **settings})  # as run.json holds them, to compare alike
        if overwrite and ctx.is_main:
            for path in (
                *_own_files(out, "predictions"),
                *_own_files(out, "skipped"),
                out / "metrics.json",
                out / "report.md",
            ):
                path.unlink(missing_ok=True)
        elif not overwrite and run_path.exists():
            _check_same_settings(
                json_safe(json.loads(run_path.read_text())), settings, out, say if ctx.is_main else None
            )
        if retry_skipped and not overwrite and ctx.is_main:  # read by nobody before the barrier below
            for path in _own_files(out, "skipped"):
                path.unlink()
        ctx.barrier()  # nobody writes before everyone has read the settings and the earlier predictions
        if ctx.is_main:
            write_json(run_path, settings, allow_nan=False)  # json_safe above

        samples = evaluator.samples()
        # an older run's NaN as None, as this run writes it; an id written twice (two processes appending to one
        # --out before the lock, or where the file system has none) counted once, by its first line, as merged
        records, twice = _first_of_each(json_safe(_read_jsonl(predictions_path)))
        skipped, skipped_twice = _first_of_each(_read_jsonl(skipped_path))
        done = {r["id"] for r in records} | {s["id"] for s in skipped}
        for path in (
            *_own_files(out, "predictions"),
            *_own_files(out, "skipped"),
        ):  # other processes' (and earlier runs') shards
            if path not in (predictions_path, skipped_path):
                done |= {r["id"] for r in _read_jsonl(path, truncate=False)}
        todo = [s for s in samples[ctx.rank :: ctx.world_size] if s.id not in done]
        ctx.barrier()
        started = time.perf_counter()
        with (
            open(predictions_path, "a") as pred_fh,
            open(skipped_path, "a") as skip_fh,
            tqdm(
                total=len(samples),
                initial=len(samples) - len(todo),
                desc=f"eval {evaluator.task}",
                unit="sample",
                disable=None if progress else True,  # on a terminal only
            ) as bar,
        ):
            batch_lines: list[str] = []
            results = pipe.iterate(
                [s.input for s in todo], batch_size=batch_size, num_workers=num_workers, on_error="skip"
            )
            try:
                for count, (i, result) in enumerate(results, start=1):
                    sample = todo[i]
                    if isinstance(result, Exception):
                        entry = {"id": sample.id, "input": _describe_input(sample), "reason": str(result)}
                        skipped.append(entry)
                        skip_fh.write(dumps(entry) + "\n")
                        skip_fh.flush()
                    else:
                        # as written, so that a fresh run scores what a resumed one reads back (NaN as None)
                        record = json_safe({"id": sample.id, **evaluator.record(sample, result)})
                        records.append(record)
                        batch_lines.append(dumps(record) + "\n")
                    if len(batch_lines) >= batch_size or count == len(todo):
                        pred_fh.writelines(batch_lines)
                        pred_fh.flush()
                        batch_lines.clear()
                    bar.update(1)
            finally:  # also when a later batch fails or the run is killed: the answers made so far are kept
                pred_fh.writelines(batch_lines)
        elapsed = time.perf_counter() - started
        ctx.barrier()
        if not ctx.is_main:
            return {}
        if ctx.world_size > 1 or any(path.name != "predictions.jsonl" for path in _own_files(out, "predictions")):
            records, skipped, (twice, skipped_twice) = _merge_shards(out, samples)
        if twice or skipped_twice:
            say(
                f"warning: {out} held {twice} answer(s) and {skipped_twice} skipped input(s) more than once (two "
                "processes writing into one --out, e.g. the same command started twice): each sample is counted "
                "once, by the first of its lines"
            )
        records, skipped = _current(records, skipped, samples, out, say)

        if not records:
            raise InvalidInputError(f"no sample could be evaluated ({len(skipped)} skipped); see {skipped_path}")
        metrics = {  # a setting of a metric's name (POPE's precision) never hides the metric
            **{k: v for k, v in settings.items() if k not in ("task",)},
            **evaluator.metrics(records),
            "n": len(records),
            "skipped": len(skipped),
            "skipped_inputs": [s["input"] for s in skipped],
            "seconds_this_run": round(elapsed, 3),
            "task": evaluator.task,
        }
        metrics = json_safe(metrics)  # NaN (e.g. AUC of one class) as None: null in metrics.json, "n/a" in the report
        write_json(out / "metrics.json", metrics, allow_nan=False)
        write_text(out / "report.md", _report(evaluator, metrics, skipped))
        return metrics


def _meaning(key: str, value: Any) -> Any:
    """A setting as a resume compares it: ``dtype`` (``attnzoo eval --dtype``) by the dtype it names, since its
    spellings (``bf16``, ``bfloat16``, ``BF16``; ``fp16``, ``half``; ``auto``, the model's own, as none) are one
    run, and an earlier attnzoo recorded it as it was typed; a value that names no dtype, and any other setting,
    as recorded."""
    if key != "dtype" or not isinstance(value, str):
        return value
    from attnzoo._placement import dtype_name

    try:
        return dtype_name(value)
    except InvalidInputError:
        return value


def _check_same_settings(
    previous: dict[str, Any], settings: dict[str, Any], out: Path, say: Callable[[str], None] | None
) -> None:
    """A resume must have the earlier run's settings. A setting attnzoo records only since (:data:`ADDED_SETTINGS`)
    is taken on trust when the earlier run.json lacks it (said); any other difference is refused."""
    previous = dict(previous)
    for old, new in RENAMED_SETTINGS:  # an earlier release's name of the same setting
        if old in previous and new not in previous and old not in settings:
            previous[new] = previous.pop(old)
    changed = sorted(
        k for k in set(previous) | set(settings) if _meaning(k, previous.get(k)) != _meaning(k, settings.get(k))
    )
    trusted = [k for k in changed if k in ADDED_SETTINGS and k not in previous]
    refused = [k for k in changed if k not in trusted]
    if refused:
        unrecorded = [k for k in refused if k not in previous]
        why = ""
        if unrecorded:
            pairs = ", ".join(f"{json.dumps(k)}: {dumps(settings[k])}" for k in unrecorded)
            rest = [k for k in refused if k in previous]
            why = (
                f" (the earlier run, made by an older attnzoo, did not record {', '.join(unrecorded)}: its answers "
                f"cannot be checked against this run's settings; this run records {pairs}. If the earlier run had "
                "the same value (for a sha256: its file is unchanged since that run), adding "
                f"{'that' if len(unrecorded) == 1 else 'those'} to {out / 'run.json'} continues the run"
                f"{' once the other settings match' if rest else ''} and keeps its predictions)"
            )
        hint = (
            " (a run continues on the device type and dtype it started on: pass the same --device/--dtype)"
            if {"device", "model_dtype"} & set(refused)
            else ""
        )
        raise InvalidInputError(
            f"{out} holds a run with other settings ({', '.join(refused)}){why}{hint}; "
            "pass --overwrite or choose another --out"
        )
    if trusted and say is not None:
        now = ", ".join(f"{k}={settings.get(k)}" for k in trusted)
        say(
            f"warning: {out}/run.json does not record the {' and '.join(trusted)} of the earlier run (an older "
            f"attnzoo); continuing it with {now}, recorded from now on"
        )


def _current(
    records: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    samples: Sequence[EvalSample],
    out: Path,
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The answers (and skips) of this run's samples: an earlier run's of samples no longer in the data or
    split are left out of the metrics (not out of its files), and said."""
    ids = {s.id for s in samples}
    kept = [r for r in records if r.get("id") in ids], [s for s in skipped if s.get("id") in ids]
    left = len(records) - len(kept[0]), len(skipped) - len(kept[1])
    if any(left):
        say(
            f"left out of the metrics {left[0]} prediction(s) and {left[1]} skipped input(s) in {out} whose ids are "
            f"not among this run's {len(samples)} samples (the data changed since the earlier run); "
            "they stay in its files"
        )
    return kept


def _describe_input(sample: EvalSample) -> str:
    """What names a skipped input in skipped.jsonl and the report: its path (or paths), else its id (an
    in-memory input such as a feature bag would print as its whole tensor)."""
    value = sample.input
    if isinstance(value, dict):
        value = next((v for k, v in value.items() if k in ("image", "path", "slide", "target")), None)
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return ", ".join(map(str, value))
    return sample.id


def _own_files(out: Path, kind: str) -> list[Path]:
    """The runner's ``<kind>.jsonl`` and its processes' ``<kind>.rank<r>.jsonl`` in ``out``, sorted; a user's
    ``predictions-baseline.jsonl`` beside them is neither read as done nor deleted."""
    own = re.compile(rf"{kind}(\.rank\d+)?\.jsonl")
    return sorted(path for path in out.glob(f"{kind}*.jsonl") if own.fullmatch(path.name))


def _merge_shards(
    out: Path, samples: Sequence[EvalSample]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], tuple[int, int]]:
    """All processes' records, in dataset order, rewritten into predictions.jsonl / skipped.jsonl, with how
    many lines of each repeated an id (the first line of an id is kept)."""
    order = {s.id: i for i, s in enumerate(samples)}
    merged, repeated = [], []
    for kind in ("predictions", "skipped"):
        rows, count = _first_of_each(row for path in _own_files(out, kind) for row in _read_jsonl(path))
        rows_sorted = sorted(rows, key=lambda r: order.get(r["id"], len(order)))
        write_text(out / f"{kind}.jsonl", "".join(dumps(r) + "\n" for r in rows_sorted))
        for path in _own_files(out, kind):
            if path.name != f"{kind}.jsonl":
                path.unlink()
        merged.append(json_safe(rows_sorted))
        repeated.append(count)
    return merged[0], merged[1], (repeated[0], repeated[1])


def _first_of_each(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The first row of each id, in order, and how many rows repeated an id before them."""
    kept: dict[Any, dict[str, Any]] = {}
    repeated = 0
    for row in rows:
        if row["id"] in kept:
            repeated += 1
        else:
            kept[row["id"]] = row
    return list(kept.values()), repeated


@contextlib.contextmanager
def only_process(lock_path: Path, out: Path, *, doing: str = "evaluating", option: str = "--out") -> Iterator[None]:
    """Held while this process evaluates into ``out``: a second process on the same --out (the same command
    started twice) is refused instead of answering every sample again into the same files. An OS lock on
    ``lock_path`` (a lock file, or where it is a folder, the folder itself: nothing is added to it), released
    when the process ends however it ends; where the file system has no locks (or none can be taken there), the
    run goes on without one (an answer found twice is still counted once). ``doing`` and ``option`` word the
    refusal ("another process is {doing} into {out} ...: ... or choose another {option}")."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    try:  # a folder is locked through a read-only descriptor of its own
        flags = os.O_RDONLY if lock_path.is_dir() else os.O_WRONLY | os.O_APPEND | os.O_CREAT
        fd: int | None = os.open(lock_path, flags, 0o666)
    except OSError:  # a folder this user cannot write to fails where the run writes, as before
        fd = None
    with contextlib.ExitStack() as stack:
        if fd is not None:
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = "" if lock_path == out else f" (it holds {lock_path})"
                raise InvalidInputError(
                    f"another process is {doing} into {out}{held}: wait for it to finish, or choose another {option}"
                ) from None
            except OSError:  # no locks on this file system (ENOLCK, ENOSYS, EOPNOTSUPP)
                pass
            else:
                stack.callback(fcntl.flock, fd, fcntl.LOCK_UN)
        yield


def _report(evaluator: TaskEvaluator, metrics: dict[str, Any], skipped: Iterable[dict[str, Any]]) -> str:
    lines = [f"# Evaluation: {evaluator.task}", ""]
    lines += [
        f"- **{k}**: {metrics[k]}" for k in ("model", "weights", "weights_label", "data", "split") if k in metrics
    ]
    lines += ["", evaluator.report(metrics).rstrip(), ""]
    lines += [f"Evaluated **{metrics['n']}** samples; skipped **{metrics['skipped']}**.", ""]
    skipped = list(skipped)
    if skipped:
        lines += ["## Skipped inputs", "", "| input | reason |", "|---|---|"]
        lines += [f"| `{s['input']}` | {s['reason'].replace('|', '/')} |" for s in skipped]
        lines.append("")
    return "\n".join(lines)
