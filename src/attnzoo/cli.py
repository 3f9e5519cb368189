"""The ``attnzoo`` command: run, eval, train, weights, models, tasks, demo.

Errors that attnzoo raises on purpose print as one line and exit non-zero; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnzoo import __version__
from attnzoo.errors import AttnzooError, InvalidOptionError
from attnzoo.tasks import Option

app = typer.Typer(
    name="attnzoo",
    help="attnzoo: attention-based vision and multimodal models behind one API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
weights_app = typer.Typer(help="Official checkpoints: list, download, verify, convert.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model name (default: the task's default model).")]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        help="Checkpoint: a path, URL, hf-hub:org/repo/file, registered name, or 'none' for random weights. Default: the model's pretrained weights.",
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help="cpu, cuda, cuda:1 ..., or a CUDA ordinal: 0, 1 (-1: cpu). Default: cuda if available."
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="float32 (also fp32, float), float16 (fp16, half), bfloat16 (bf16), float64 (fp64), or auto "
        "(the model's own: the default).",
    ),
]


def _echo(message: str, *, err: bool = False) -> None:
    typer.echo(message, err=err)


def _version(value: bool) -> None:
    if value:
        _echo(f"attnzoo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """attnzoo: attention-based vision and multimodal models behind one API."""


# -- commands generated from the task specs ------------------------------------------------

run_app = typer.Typer(
    help="Run a task's pipeline on input files; print (and with --out save) the results.", no_args_is_help=True
)
eval_app = typer.Typer(
    help="Evaluate a model on a dataset; resumes an interrupted run in the same --out.", no_args_is_help=True
)
train_app = typer.Typer(
    help="Train a model (under torchrun: distributed); --resume continues exactly.", no_args_is_help=True
)
app.add_typer(run_app, name="run")
app.add_typer(eval_app, name="eval")
app.add_typer(train_app, name="train")


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _option_params(options: tuple[Option, ...]) -> list[inspect.Parameter]:
    params = []
    for o in options:
        if o.type is bool and o.default is None:  # tri-state: --x / --no-x / unset
            flags = f"{o.flag}/--no-{o.flag[2:]}"
            params.append(_param(o.name, Annotated[Optional[bool], typer.Option(flags, help=o.help)], None))  # noqa: UP045
        elif o.type is bool:
            params.append(_param(o.name, Annotated[bool, typer.Option(o.flag, help=o.help)], bool(o.default)))
        else:
            params.append(_param(o.name, Annotated[Optional[o.type], typer.Option(o.flag, help=o.help)], None))  # noqa: UP045
    return params


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line that says what the interrupted command kept and how to resume it."""


#: The line of the command Ctrl-C stopped, for :func:`main` to print: typer turns the KeyboardInterrupt
#: into a bare exit status 130.
_interrupted: list[str] = []


@contextlib.contextmanager
def _on_interrupt(line: Any) -> Iterator[None]:
    """Ctrl-C inside the block ends the command with ``line()`` (what was kept, how to resume), unless a
    step inside already said it (a KeyboardInterrupt with a message: a download's, ``attnzoo run``'s)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        message = _interrupt_message(exc) if exc.args else line()
        _interrupted.append(message)
        raise _Interrupted(message) from exc


def _interrupted_line(command: str, out: Path | None) -> str:
    """What an interrupted ``run``/``eval``/``train`` kept, for an interrupt no step inside explained."""
    if command == "eval":
        return f"interrupted: the predictions made so far are kept in {out}; run the same command again to resume"
    if command == "train":
        from attnzoo.training.engine import CHECKPOINT_RE
        from attnzoo.training.wsi import seed_folders

        # the run's own folders: --out and the slides recipe's seed-<s> folders (not any other run kept inside)
        folders = [out, *seed_folders(out).values()] if out is not None and out.is_dir() else []
        # _interrupted_line does not see --overwrite: a run it started resumes without it (the two exclude each other)
        resume = "rerun the same command with --resume (without --overwrite)"
        if any(CHECKPOINT_RE.fullmatch(f.name) for folder in folders for f in folder.iterdir()):
            return f"interrupted: the checkpoints saved in {out} are kept; {resume} to continue"
        if any((folder / "config.yaml").is_file() for folder in folders):  # the run had started: --resume restarts it
            return f"interrupted before the first checkpoint: {resume} to start the run in {out} again from step 0"
        return f"interrupted before the first checkpoint: nothing to resume; start again (with --overwrite: {out} holds the run's first files)"
    return "interrupted before any input was done: nothing was written"


def _command(fn: Any, params: list[inspect.Parameter], spec: Any, command: str) -> Any:
    def callback(**kwargs: Any) -> None:
        _check_out(kwargs.get("out"))
        with _on_interrupt(lambda: _interrupted_line(command, kwargs.get("out"))):
            fn(spec, **kwargs)

    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__doc__ = f"{spec.description}." + (f" See docs/{spec.docs}." if spec.docs else "")
    callback.__name__ = f"{command}_{spec.name.replace('-', '_')}"
    return callback


def _common_model_params(spec: Any) -> list[inspect.Parameter]:
    default = f" (default: {spec.default_model})" if spec.default_model else ""
    return [
        _param(
            "model",
            Annotated[str | None, typer.Option("--model", "-m", help=f"Model name{default}; see 'attnzoo tasks'.")],
            None,
        ),  # noqa: UP045
        _param("weights", WeightsOpt, None),
        _param("device", DeviceOpt, None),
        _param("dtype", DtypeOpt, None),
    ]


def _run_params(spec: Any) -> list[inspect.Parameter]:
    what = {
        "folders": "Folders, each holding the views of one object.",
        "files": "Input files, as given.",
    }
    inputs_help = spec.inputs_help or what.get(spec.inputs, "Input images (folders are expanded to their images).")
    return [
        inspect.Parameter(
            "inputs",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=None,
            annotation=Annotated[Optional[list[str]], typer.Argument(help=inputs_help)],  # noqa: UP045
        ),
        *_common_model_params(spec),
        _param(
            "out",
            Annotated[Path | None, typer.Option("--out", "-o", help="Folder for results.json and pictures.")],
            None,
        ),  # noqa: UP045
        _param("batch_size", Annotated[int, typer.Option("--batch-size", "-b", help="Inputs per batch.")], 8),
        *_option_params(spec.options_for("run")),
    ]


def _eval_params(spec: Any) -> list[inspect.Parameter]:
    return [
        _param("data", Annotated[Path, typer.Option("--data", "-d", help=spec.data_help)]),
        _param(
            "out", Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.json, report.md, predictions.")]
        ),
        *_common_model_params(spec),
        _param(
            "split",
            Annotated[str | None, typer.Option("--split", help=f"Split (default: {spec.eval_split}).")],
            None,
        ),  # noqa: UP045
        _param("batch_size", Annotated[int, typer.Option("--batch-size", "-b", help="Inputs per batch.")], 32),
        _param(
            "num_workers",
            Annotated[
                int | None, typer.Option("--num-workers", help="DataLoader workers (default: CPU count, at most 8).")
            ],
            None,
        ),  # noqa: UP045
        _param(
            "limit", Annotated[int | None, typer.Option("--limit", help="Evaluate only the first N samples.")], None
        ),  # noqa: UP045
        _param(
            "overwrite",
            Annotated[
                bool, typer.Option("--overwrite", help="Discard an earlier run in --out instead of resuming it.")
            ],
            False,
        ),
        _param(
            "retry_skipped",
            Annotated[
                bool,
                typer.Option(
                    "--retry-skipped", help="When resuming, try again the inputs an earlier run skipped (mended since)."
                ),
            ],
            False,
        ),
        *_option_params(spec.options_for("eval")),
    ]


def _train_params(spec: Any) -> list[inspect.Parameter]:
    default = spec.train_model or spec.default_model
    return [
        _param("data", Annotated[Path, typer.Option("--data", "-d", help=spec.data_help)]),
        _param(
            "out",
            Annotated[
                Path,
                typer.Option("--out", "-o", help="Run folder: checkpoints, config.yaml, metrics.csv, tensorboard/."),
            ],
        ),
        _param(
            "model",
            Annotated[str | None, typer.Option("--model", "-m", help=f"Model to train (default: {default}).")],
            None,
        ),  # noqa: UP045
        _param(
            "weights",
            Annotated[
                str | None,
                typer.Option(
                    "--weights",
                    "-w",
                    help="Start from these weights (fine-tuning); the head is replaced when the classes differ.",
                ),
            ],
            None,
        ),  # noqa: UP045
        _param(
            "config",
            Annotated[
                str | None,
                typer.Option("--config", "-c", help="A named recipe (see --list-configs) or a YAML file."),
            ],
            None,
        ),  # noqa: UP045
        _param(
            "list_configs",
            Annotated[bool, typer.Option("--list-configs", help="List the named recipes and exit.")],
            False,
        ),
        _param(
            "resume",
            Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out.")],
            False,
        ),
        _param(
            "overwrite",
            Annotated[
                bool,
                typer.Option(
                    "--overwrite",
                    help="Discard an earlier run in --out (its checkpoints, logs, weights) and start afresh.",
                ),
            ],
            False,
        ),
        _param("device", DeviceOpt, None),
        *_check_images_param(spec),
        _param(
            "overrides",
            Annotated[list[str] | None, typer.Argument(help="Settings as key=value, e.g. lr=5e-4 epochs=30.")],
            None,
        ),  # noqa: UP045
        *_option_params(spec.options_for("train")),
    ]


#: The training recipes that check their images before any work, what they check (the ``check_images`` setting).
_CHECKED_IMAGES = {
    "attnzoo.training.classification:train_classification": "every train/ and val/ image",
    "attnzoo.training.reconstruction:train_reconstruction": "the validation models' renderings and voxels",
}


def _check_images_param(spec: Any) -> list[inspect.Parameter]:
    """``--check-images/--no-check-images`` of the recipes that check their images up front (unset: the config's
    ``check_images``, true by default)."""
    checked = _CHECKED_IMAGES.get(spec.recipe) if isinstance(spec.recipe, str) else None
    if checked is None:
        return []
    help_text = (
        f"Open {checked} before any work, refusing damaged files (the default; the check_images setting). "
        "--no-check-images skips it: a damaged file then fails when it is read, the steps done saved."
    )
    flags = typer.Option("--check-images/--no-check-images", help=help_text)
    return [_param("check_images", Annotated[Optional[bool], flags], None)]  # noqa: UP045


def _given(options: dict[str, Any], spec: Any, command: str) -> dict[str, Any]:
    """The task options the user gave: a value left unset (None), or an off flag, is not passed on
    (0 and an explicit --no-x are)."""
    given = {}
    for o in spec.options_for(command):
        value = options.get(o.name)
        if value is None or (o.type is bool and value is False and o.default is False):
            continue
        given[o.name] = value
    return given


def _expand_inputs(inputs: list[str], kind: str) -> list[str]:
    """``images``: folders stand for the images inside them; ``folders``: each folder is one input."""
    from attnzoo.datasets.image_folder import list_images
    from attnzoo.errors import InvalidInputError

    expanded: list[str] = []
    for item in inputs:
        path = Path(item)
        if kind == "folders" and not path.is_dir():
            raise InvalidInputError(f"{item}: give a folder holding the views of one object")
        expanded.extend(str(p) for p in list_images(path)) if kind == "images" and path.is_dir() else expanded.append(
            item
        )
    return expanded


def _check_out_beside_inputs(out: Path | None, inputs: list[str]) -> None:
    """--out in (or equal to) an input folder: the next run over that folder would read the pictures
    written there as inputs (its images are listed recursively). Refused before any work."""
    from attnzoo._io import check_out_outside

    if out is not None:  # an input file cannot hold --out; one equal to it is refused as a file later
        folders = [item for item in inputs if Path(item).is_dir()]
        why = "a later run over that folder would read the pictures written there as inputs"
        check_out_outside(out, folders, what="input folder", why=why)


def _run_task(
    spec: Any,
    *,
    inputs: list[str] | None,
    model: str | None,
    weights: str | None,
    out: Path | None,
    batch_size: int,
    device: str | None,
    dtype: str | None,
    **options: Any,
) -> None:
    from attnzoo.datasets.image_folder import list_images
    from attnzoo.errors import InvalidInputError
    from attnzoo.tasks import pipeline

    # an option named like the pipeline's main input (subject insertion's --target) is one more input
    primary = {cls.primary_field for cls in spec.pipeline_classes()} & set(options)
    inputs = [*(inputs or []), *(options.pop(name) for name in sorted(primary) if options.get(name) is not None)]
    files = _expand_inputs(inputs, spec.inputs)
    if not files:
        raise InvalidInputError("no input files given (folders held no images)")
    _check_out_beside_inputs(out, inputs)
    given = _given(options, spec, "run")
    settings = _run_settings(spec, given, primary)
    with _out_held(out):  # a second attnzoo run into the same --out is refused while this one runs
        if out is not None:  # another task's, model's or settings' results in --out: said before the model loads
            _earlier_results(out, {"task": spec.name, "model": model or spec.default_model, "settings": settings})
        fields = {k: v for k, v in given.items() if k in _input_fields(spec)}
        pipe = pipeline(
            spec.name,
            model=model,
            weights=weights,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            **{k: v for k, v in given.items() if k not in fields},
        )
        items: list[Any] = (
            [[str(p) for p in list_images(Path(f))] for f in files] if spec.inputs == "folders" else list(files)
        )
        _run_files(pipe, files, items, out, model=model or spec.default_model, settings=settings, **fields)


def _run_settings(spec: Any, given: dict[str, Any], primary: set[str]) -> dict[str, Any]:
    """The task options of an ``attnzoo run`` as results.json records them: each one given, else its declared
    default (``--top-k``'s 5), by name; those left unset with no default are left out (an input given as an
    option, such as subject insertion's --target, is an input, not a setting)."""
    settings = {}
    per_input = set(_input_fields(spec))  # --question, --mask, --boxes: each input's own, not the run's
    for o in spec.options_for("run"):
        value = given.get(o.name, o.default)
        if o.name in primary or o.name in per_input or value is None:
            continue
        settings[o.name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return settings


@contextlib.contextmanager
def _out_held(out: Path | None) -> Iterator[None]:
    """An OS lock on ``out`` (the folder itself) while ``attnzoo run`` writes there, as ``attnzoo eval`` holds
    its --out: two runs into one folder at once lost one's results.json entries and gave inputs the other's
    pictures. A folder made for it and left empty (the run failed before writing) is removed again."""
    if out is None:
        yield
        return
    from attnzoo.evaluation.runner import only_process

    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # checked before (_check_out): a folder changed since
        raise InvalidOptionError(f"--out {out} cannot be created: {err.strerror or err}") from None
    with only_process(out, out, doing="writing attnzoo run's results"):
        try:
            yield
        finally:
            if made:  # while the lock is held: a run that takes it next finds its folder as it checked it
                with contextlib.suppress(OSError):  # only an empty folder
                    out.rmdir()


def _input_fields(spec: Any) -> set[str]:
    return {name for cls in spec.pipeline_classes() for name in cls.input_fields}


def _run_files(
    pipe: Any,
    files: list[str],
    items: list[Any],
    out: Path | None,
    *,
    model: str,
    settings: dict[str, Any] | None = None,
    **fields: Any,
) -> None:
    """``attnzoo run``'s loop for any task: a line per input (and a progress bar on a terminal),
    unreadable inputs skipped (unless there is only one), and in ``out`` a picture per input (and the task's
    own files) written as its result arrives, with ``results.json`` (the task, model, weights and task settings,
    each input's result and files) brought up to date batch by batch: an interrupted run keeps what it finished.
    A later run of the same task, model, weights and settings into ``out`` adds to its results; no file is
    written over but the same input's own from an earlier run."""
    from tqdm.auto import tqdm

    from attnzoo.errors import InvalidInputError

    header = {"task": pipe.task, "model": model, "weights": pipe.weights_label, "settings": settings or {}}
    saved = _RunOutput(out, header, items, fields) if out is not None else None  # refuses another run's first
    done, failed = 0, []
    batch = max(1, int(getattr(pipe, "batch_size", 1) or 1))
    try:
        with tqdm(total=len(items), desc=f"{pipe.task}", unit="input", disable=None, leave=False) as bar:
            for i, result in pipe.iterate(items, on_error="raise" if len(files) == 1 else "skip", **fields):
                bar.update(1)
                if isinstance(result, Exception):
                    failed.append(files[i])
                    said = str(result)  # named, unless the loader's message names it already
                    bar.write(f"skipped: {said if files[i] in said else f'{files[i]}: {said}'}", file=sys.stderr)
                else:
                    bar.write(f"{files[i]}: {result.summary()}")
                    if saved is not None:
                        saved.add(files[i], result)
                    done += 1
                if saved is not None and ((i + 1) % batch == 0 or i + 1 == len(items)):
                    saved.save(when_due=True)  # the end of a batch
        if saved is not None:
            saved.save()
            if saved.written:
                _echo(f"wrote {sum(map(len, saved.written.values())) + 1} files to {out}")
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt) and not exc.args
        message = _run_interrupted(saved, done, len(items), out) if interrupted else ""
        if saved is not None:  # what was written so far is named in results.json (an error here is not news,
            with contextlib.suppress(BaseException):  # nor a second Ctrl-C)
                saved.save()
        if interrupted:
            raise _Interrupted(message) from exc
        raise
    if failed:
        raise InvalidInputError(f"{len(failed)} of {len(files)} inputs could not be read")


def _run_interrupted(saved: _RunOutput | None, done: int, total: int, out: Path | None) -> str:
    """The line an interrupted ``attnzoo run`` ends with: what is kept, and how to finish."""
    if saved is None:
        return f"interrupted after {done} of {total} inputs (without --out nothing is kept)"
    if not saved.written:
        return f"interrupted before any input was done: nothing was written to {out}"
    return (
        f"interrupted after {done} of {total} inputs: their results and pictures are kept in {out} "
        "(results.json); run the same command again to finish (those done are redone in place)"
    )


class _RunOutput:
    """``attnzoo run``'s files in ``out``: each input's picture (and the task's own files) written when its
    result arrives, and ``results.json`` (atomically replaced) naming exactly the files written. It is
    rewritten at the end of a batch unless rewriting it would take more than a tenth of the run's time (a
    results.json of many thousands of inputs), and always at the end, an error or an interrupt."""

    def __init__(self, out: Path, header: dict[str, Any], items: list[Any], fields: dict[str, Any]) -> None:
        self.out, self.header = out, header
        earlier = _earlier_results(out, header)  # another run's results: refused before any work
        self.earlier_results, self.earlier_files = earlier["results"], earlier["files"]
        self.results: dict[str, Any] = dict(earlier["results"])  # the small records, not the results themselves
        self.files: dict[str, list[str]] = dict(earlier["files"])
        given = [p for item in items for p in (item if isinstance(item, list) else [item])]
        given += [v for v in fields.values() if isinstance(v, (str, Path)) and os.path.isfile(v)]  # --subject
        self.kept = {Path(p).resolve() for p in given}  # never written over
        self.written: dict[str, list[str]] = {}  # this run's files per input
        self.names: dict[str, str] = {}
        self.pending = False
        self.last_save, self.save_cost = 0.0, 0.0

    def add(self, file: str, result: Any) -> None:
        """Write ``file``'s picture and the task's files (all of them, or none: a failure removes what it made)."""
        from attnzoo._io import atomic_write

        out = self.out
        if file in self.names:  # the same input twice: into the same files
            name = self.names[file]
        else:
            stem = Path(file).stem or Path(file).name
            own = set(self.earlier_files.get(file, []))  # this input's files from an earlier run
            if file in self.earlier_results and file not in self.earlier_files:  # a results.json listing no files
                own = {path.name for path in _written_paths(out, stem, result)}
            name, n = stem, 1
            # a/001.jpg and b/001.jpg, cat.jpg and cat.png, an input or a user's file in out: one name each
            while not _free(_written_paths(out, name, result), self.kept, own):
                n += 1
                name = f"{stem}-{n}"
        paths = _written_paths(out, name, result)
        new = [path for path in paths if not path.exists()]
        try:
            with atomic_write(paths[0], "wb") as fh:
                result.plot().save(fh, format="PNG")
            if hasattr(result, "write_files"):  # a task's own outputs beside the picture (e.g. the inserted image)
                result.write_files(out, name)
        except BaseException:
            for path in new:  # not half an input's files: results.json will not name them
                path.unlink(missing_ok=True)
            raise
        self.kept.update(path.resolve() for path in paths)
        self.names[file] = name
        self.written[file] = self.files[file] = [path.name for path in paths]
        self.results[file] = result.to_dict()
        self.pending = True

    def save(self, *, when_due: bool = False) -> None:
        """Rewrite results.json with what was written (``when_due``: unless it was rewritten very lately)."""
        import time

        from attnzoo._io import write_json

        began = time.monotonic()
        if not self.pending or (when_due and began - self.last_save < 10 * self.save_cost):
            return
        write_json(self.out / "results.json", {**self.header, "results": self.results, "files": self.files})
        self.pending = False
        self.last_save = time.monotonic()
        self.save_cost = self.last_save - began


def _written_paths(out: Path, name: str, result: Any) -> list[Path]:
    """The files ``attnzoo run`` writes for one input named ``name``: its picture and the task's own files
    (``result.file_names(name)``, or ``<name>-<suffix>.png`` for each of ``result.file_suffixes``)."""
    own = getattr(result, "file_names", None)
    names = own(name) if callable(own) else [f"{name}-{suffix}.png" for suffix in getattr(result, "file_suffixes", ())]
    return [out / f"{name}.png", *(out / n for n in names)]


def _free(paths: list[Path], kept: set[Path], own: set[str]) -> bool:
    """Whether ``paths`` may be written: none is an input or already written by this run, and none exists
    unless the same input's earlier run wrote it."""
    return not any(path.resolve() in kept or (path.exists() and path.name not in own) for path in paths)


def _same_setting(key: str, earlier: Any, now: Any) -> bool:
    """Equal, or for the weights the same file however it is spelled (relative, absolute, a link)."""
    if earlier == now:
        return True
    if key != "weights" or not isinstance(earlier, str) or not isinstance(now, str):
        return False
    try:
        return os.path.samefile(earlier, now)
    except OSError:  # not files (labels such as "random (seed 0)"), or gone
        return False


def _earlier_results(out: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The results and the files per input (``{"results": ..., "files": ...}``) an earlier ``attnzoo run``
    of the same task, model, weights and task settings left in ``out`` (kept and added to); another run's, or
    a ``results.json`` attnzoo did not write, is refused. A results.json of an attnzoo that did not record the
    settings is taken as of the same settings (they cannot be known); this run's are recorded from then on."""
    import json

    from attnzoo.errors import InvalidOptionError

    path = out / "results.json"
    if not path.exists():
        return {"results": {}, "files": {}}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("results"), dict) or "task" not in earlier:
        raise InvalidOptionError(
            f"--out {out} holds a results.json that attnzoo run did not write: choose another --out"
        )
    other = {k: earlier.get(k) for k in header if k != "settings" and not _same_setting(k, earlier.get(k), header[k])}
    said = [f"{k} {v!r}, this run's {header[k]!r}" for k, v in other.items()]
    if isinstance(earlier.get("settings"), dict) and "settings" in header:  # absent: written before they were
        said += _changed_settings(earlier["settings"], header["settings"])
    if said:
        raise InvalidOptionError(
            f"--out {out} holds the results of another run ({', '.join(said)}): choose another --out, or move its "
            "results.json"
        )
    files = earlier.get("files")
    return {"results": earlier["results"], "files": files if isinstance(files, dict) else {}}


def _changed_settings(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The task settings that differ between an earlier run's results.json and this run, as options:
    ``--top-k 3, this run's 5`` (one given only once: ``not given``)."""
    changed = []
    for name in sorted(set(earlier) | set(now), key=lambda n: (n not in now, n)):
        before, after = earlier.get(name), now.get(name)
        if not _same_setting("weights", before, after):  # a file given as a setting: the same file however spelled
            flag = "--" + name.replace("_", "-")
            shown = [repr(v) if v is not None else "not given" for v in (before, after)]
            changed.append(f"{flag} {shown[0]}, this run's {shown[1]}")
    return changed


def _check_out(out: Path | None) -> None:
    """An output folder that is a file, cannot be made or cannot be written to is refused before any work."""
    if out is not None:
        from attnzoo._io import check_output_folder

        check_output_folder(out)


def _eval_task(
    spec: Any,
    *,
    data: Path,
    out: Path,
    model: str | None,
    weights: str | None,
    split: str | None,
    batch_size: int,
    num_workers: int | None,
    limit: int | None,
    overwrite: bool,
    retry_skipped: bool,
    device: str | None,
    dtype: str | None,
    **options: Any,
) -> None:
    from attnzoo.evaluation import evaluate, weights_identity
    from attnzoo.evaluation.runner import check_limit, execution_settings, format_metric
    from attnzoo.pipelines.base import check_batching
    from attnzoo.tasks import pipeline

    check_batching(batch_size, 0 if num_workers is None else num_workers)
    check_limit(limit)  # 0 or a negative count would drop samples from the end without a word
    evaluator_cls = spec.load_evaluator()
    # the dataset is read (and a bad one refused) before the model loads
    plan = evaluator_cls.plan(
        data,
        split,
        default_split=spec.eval_split,
        limit=limit,
        model=model or spec.default_model,
        weights=weights,
        log=lambda m: _echo(m, err=True),
        **_given(options, spec, "eval"),
    )
    _check_eval_layout(Path(out), [name for name, _, _ in plan.runs])  # before any model loads or file is written
    from attnzoo._placement import dtype_name

    several = len(plan.runs) > 1
    with _plan_held(Path(out), several):  # the same plan started again is refused before it deletes anything
        if overwrite and several:  # the earlier joint report goes now, not once every run is redone
            _remove_summary(evaluator_cls, Path(out))
        pipes: dict[str, Any] = {}  # one pipeline per distinct set of keywords (e.g. one per method compared)
        workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
        results = {}
        for name, evaluator, run_settings in plan.runs:
            kwargs = {**plan.pipeline_kwargs, **(evaluator.pipeline_kwargs or {})}
            key = repr(sorted(kwargs.items()))
            if key not in pipes:
                pipes[key] = pipeline(
                    spec.name,
                    model=plan.model,
                    weights=weights,
                    device=device,
                    dtype=dtype,
                    model_kwargs=plan.model_kwargs or None,
                    **kwargs,
                )
            pipe = pipes[key]  # evaluate() checks it against the evaluator before anything is written
            run_out = Path(out) if name is None else Path(out) / _folder_name(name)
            settings = {
                "model": plan.model,
                "weights": weights_identity(weights),
                **_weights_label(pipe, weights),
                "data": str(Path(data).resolve()),
                **_split_settings(plan.split),
                "limit": limit,
                # "auto" is the default's run; "bf16" is "bfloat16"'s (a resume compares them by the dtype named, so an
                # earlier run.json holding another spelling, as an earlier attnzoo recorded it typed, continues)
                "dtype": dtype_name(dtype),
                **execution_settings(pipe),
                **plan.settings,
                **run_settings,
                **evaluator.run_settings(pipe, batch_size=batch_size),
            }
            metrics = evaluate(
                pipe,
                evaluator,
                run_out,
                settings=settings,
                batch_size=batch_size,
                num_workers=workers,
                overwrite=overwrite,
                retry_skipped=retry_skipped,
                log=lambda m: _echo(m, err=True),
            )
            if not metrics:  # a torchrun process other than the first: process 0 reports
                continue
            results[name] = metrics
            shown = {k: metrics[k] for k in (*evaluator.headline, "n", "skipped") if k in metrics}
            # a metric no sample could give (null in metrics.json) reads n/a, as in the report
            said = " ".join(f"{k}={'n/a' if format_metric(v) == 'n/a' else v}" for k, v in shown.items())
            _echo((f"{name} " if name is not None else "") + said)
            _echo(f"wrote {run_out / 'metrics.json'} and {run_out / 'report.md'}")
        if len(results) > 1:
            _echo(evaluator_cls.summarize(results, Path(out)))


def _launch_rank() -> int:
    """This process's rank under a multi-process ``torchrun`` (0 otherwise), read from its environment, before the
    process group is set up (that starts with the first run)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


@contextlib.contextmanager
def _plan_held(out: Path, several: bool) -> Iterator[None]:
    """An OS lock on ``out`` for a plan of several runs (a sweep, a comparison), held from before its --overwrite
    removes anything until its joint report is written: each run's own lock (in its sub-folder) is taken only as
    that run starts, so the same plan started twice would otherwise delete and redo the runs the first had
    finished. Under torchrun, each process holds its own (rank 0 the plain name)."""
    if not several:
        yield
        return
    from attnzoo.evaluation.runner import only_process

    rank = _launch_rank()
    out.mkdir(parents=True, exist_ok=True)
    with only_process(out / f".attnzoo-plan{f'.rank{rank}' if rank else ''}.lock", out):
        yield


def _remove_summary(evaluator_cls: Any, out: Path) -> None:
    """``--overwrite`` of a plan of several runs (a ``--methods`` comparison): its joint report (comparison.md and
    comparison.json) is removed before the first run starts over, so a run stopped part way never leaves the
    earlier report beside new results. Only those generated files, on the first process; a folder of that name
    (not ours) is left."""
    if _launch_rank() != 0:  # torchrun's other processes
        return
    for path in evaluator_cls.summary_files(out):
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)


def _check_eval_layout(out: Path, names: list[str | None]) -> None:
    """A single run writes its files (run.json, metrics.json, report.md ...) at the top of --out; a plan of several
    runs (a view sweep, a comparison of methods) one sub-folder per run beside its joint report. The two never
    share an --out: one folder would hold two runs' contradicting files (a single run's report.md over a sweep's,
    or a sweep's report beside a single run's metrics.json). Refused before anything is written, with --overwrite
    too (it discards a run's own files, not the other layout's); a rerun of the same plan resumes as before."""
    from attnzoo.errors import InvalidOptionError

    if not out.is_dir():
        return
    if None in names:
        held = sorted(p.name for p in out.iterdir() if p.is_dir() and (p / "run.json").is_file())
        if held:
            raise InvalidOptionError(
                f"--out {out} holds the runs of a sweep or comparison (in {', '.join(f'{n}/' for n in held)}): "
                "a single run there would mix its files with theirs; choose another --out or remove the folder"
            )
    elif (out / "run.json").is_file():
        folders = ", ".join(f"{_folder_name(n)}/" for n in names if n is not None)
        raise InvalidOptionError(
            f"--out {out} holds a single run (its run.json): this plan's runs ({folders}) would mix their files "
            "with it; choose another --out or remove the folder"
        )


def _weights_label(pipe: Any, weights: str | None) -> dict[str, Any]:
    """``{"weights_label": ...}``: what the weights that ran are (``random (seed 0), tiny LLaVA-1.5 (...)``, a
    checkpoint's name), beside the ``weights`` setting (as given, which says neither). A local file given as
    weights is named by its absolute path, so that a resume from another folder is the same run. Empty where
    the pipeline says nothing. An older run.json without it resumes (the runner's ADDED_SETTINGS)."""
    label = getattr(pipe, "weights_label", None)
    if not isinstance(label, str):
        return {}
    given = os.fspath(weights) if weights else ""
    if given and label.startswith(given) and Path(given).is_file():
        label = str(Path(given).resolve()) + label[len(given) :]
    return {"weights_label": label}


def _folder_name(name: str) -> str:
    """A run's name (a method spec such as ``agla(blip_model=/models/blip)``) as one folder inside --out: path
    separators become ``_``, so no part of it can leave --out or nest folders."""
    folder = name.replace("/", "_").replace("\\", "_").replace(os.sep, "_")
    return "_" if folder in (".", "..", "") else folder


def _split_settings(split: str) -> dict[str, Any]:
    """How run.json records the split: a name as given; a split file (``--split split_1.json``) by its absolute
    path and the sha256 of its content, so that a resume from another folder, with another file of the same
    name or with the file edited, is refused instead of scoring another split's predictions with this one's."""
    path = Path(split)
    if path.suffix and path.is_file():
        from attnzoo.weights import sha256_file

        return {"split": str(path.resolve()), "split_sha256": sha256_file(path)}
    return {"split": split}


def _train_task(
    spec: Any,
    *,
    data: Path,
    out: Path,
    model: str | None,
    weights: str | None,
    config: str | None,
    list_configs: bool,
    resume: bool,
    overwrite: bool,
    device: str | None,
    overrides: list[str] | None,
    **options: Any,
) -> None:
    recipe = spec.load_recipe()
    check_images = options.pop("check_images", None)
    extra = [f"{k}={v}" for k, v in _given(options, spec, "train").items()]
    if check_images is not None:
        extra.append(f"check_images={str(check_images).lower()}")
    start = _saved_steps(Path(out)) if resume else 0
    result = recipe(
        model or spec.train_model or spec.default_model,
        data,
        out,
        config=config,
        overrides=[*(overrides or []), *extra],
        weights=weights,
        resume=resume,
        overwrite=overwrite,
        device=device,
    )
    _echo(_train_summary(result, Path(out), start))


def _saved_steps(out: Path) -> int:
    """The steps the checkpoints in ``out`` (and in its seed folders) had reached: where a ``--resume`` starts."""
    from attnzoo.training.engine import CHECKPOINT_RE
    from attnzoo.training.wsi import seed_folders

    folders = [out, *seed_folders(out).values()] if out.is_dir() else []  # not another run's subfolder
    total = 0
    for folder in folders:
        steps = [int(m.group(1)) for f in folder.iterdir() if (m := CHECKPOINT_RE.fullmatch(f.name))]
        total += max(steps, default=0)
    return total


def _best_setting(out: Path) -> tuple[str | None, str | None]:
    """The ``best_metric`` and ``best_mode`` a run in ``out`` trained with (its config.yaml), or Nones."""
    import yaml

    try:
        config = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None, None
    if not isinstance(config, dict):
        return None, None
    return config.get("best_metric"), config.get("best_mode")


def _train_summary(result: dict[str, Any], out: Path, start: int) -> str:
    """The line ``attnzoo train`` ends with: the steps trained by this command (none where a resumed run had
    finished), and the best value of the metric that chooses best.pt, named, with its direction."""
    from attnzoo.evaluation.runner import format_metric

    step = int(result["step"])
    best = ""
    if result.get("best") is not None:
        metric, mode = _best_setting(out)
        value = format_metric(result["best"], ".3f")
        direction = {"min": " (lower is better)", "max": " (higher is better)"}.get(mode or "", "")
        best = f"; best {metric}={value}{direction}" if metric else f"; best={value}"
    seeds = result.get("seeds")
    over = f" over {len(seeds)} seeds" if isinstance(seeds, dict) and len(seeds) > 1 else ""
    if start and step <= start:
        # an epoch's checkpoint was written before its validation, which failed or was stopped: it ran now. Epochs
        # count from 0, as in eval.csv and the log; the slides recipe gives them by seed
        owed = result.get("owed_validation")
        if isinstance(owed, dict):
            epochs = " and ".join(f"seed {s}'s epoch {e}" for s, e in owed.items())
            ran = f"ran the owed validation{'s' if len(owed) > 1 else ''} of {epochs}"
        else:
            ran = "" if owed is None else f"ran the owed validation of epoch {owed}"
        ran += " (epochs count from 0, as in eval.csv); " if ran else ""
        if ran and result.get("stopped_early"):  # that validation ended it: no better best_metric for long enough
            return f"{ran}the run in {out} stopped early after it, at step {step}{over}{best}"
        why = " (it had stopped early)" if result.get("stopped_early") else ""
        return f"{ran}nothing left to train: the run in {out} had finished at step {step}{over}{why}{best}"
    trained = f"trained {step - start} more steps ({step} in all)" if start else f"trained {step} steps"
    return f"{trained}{over}{best}; wrote {out}"


def _list_configs(task: str) -> Any:
    """``--list-configs`` of ``attnzoo train TASK``: the named recipes of that task only."""

    def callback(value: bool) -> None:
        if value:
            from attnzoo.training.config import named_configs

            names = named_configs(task)
            for name in names:
                _echo(name)
            if not names:
                _echo(f"no named {task} recipes: give a YAML file with --config", err=True)
            raise typer.Exit()

    return callback


def _train_params_with_list(spec: Any) -> list[inspect.Parameter]:
    params = _train_params(spec)
    return [
        p
        if p.name != "list_configs"
        else _param(
            "list_configs",
            Annotated[
                bool,
                typer.Option(
                    "--list-configs",
                    callback=_list_configs(spec.name),
                    is_eager=True,
                    help=f"List the named {spec.name} recipes and exit.",
                ),
            ],
            False,
        )
        for p in params
    ]


def _add_task_commands() -> None:
    """One ``run``/``eval``/``train`` subcommand per registered task (aliases hidden), from its spec."""
    from attnzoo.tasks import all_tasks

    for group in (run_app, eval_app, train_app):
        group.registered_commands.clear()
    for spec in all_tasks():
        for command, group, fn, params, wanted in (
            ("run", run_app, _run_task, _run_params, True),
            ("eval", eval_app, _eval_task, _eval_params, spec.evaluator is not None),
            ("train", train_app, _train_task, _train_params_with_list, spec.recipe is not None),
        ):
            if not wanted:
                continue
            callback = _command(fn, params(spec), spec, command)
            group.command(spec.name, help=callback.__doc__)(callback)
            for alias in spec.aliases:
                group.command(alias, hidden=True, help=callback.__doc__)(callback)


@app.command()
def models(
    pattern: Annotated[str | None, typer.Argument(help="Shell-style filter, e.g. 'biformer*'.")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="List name.tag entries with weights.")] = False,
) -> None:
    """List model names that create_model and --model accept; attnzoo's own are marked with their tasks."""
    from attnzoo.factory import attnzoo_models, list_models

    own = attnzoo_models()
    names = list_models(pattern, pretrained=pretrained)
    for name in names:
        tasks = own.get(name.partition(".")[0])
        _echo(f"{name}\t[attnzoo: {', '.join(tasks)}]" if tasks else name)
    if not names:  # said on stderr: the list on stdout stays a list of names
        which = "model name with weights" if pretrained else "model name"
        _echo(f"no {which} matches {pattern!r} (attnzoo models lists them all)" if pattern else "no models", err=True)


@app.command()
def tasks() -> None:
    """List the tasks pipeline() and the CLI accept, with attnzoo's models for each."""
    from attnzoo.tasks import all_tasks

    for spec in all_tasks():
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        commands = ", ".join(c for c, ok in (("run", True), ("eval", spec.evaluator), ("train", spec.recipe)) if ok)
        _echo(f"{spec.name}: {spec.description}{aliases}")
        _echo(f"  default model: {spec.default_model}; commands: {commands}")
        models = spec.models()
        if models:
            _echo(f"  models: {', '.join(models)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("attnzoo-demo"),
    device: DeviceOpt = None,
) -> None:
    """Run every pipeline on bundled sample photographs; write results and pictures to --out."""
    from attnzoo.demo import run_demo

    _check_out(out)  # under a file, or where no folder can be made: said before the demos run
    # the demo stages its folder and puts it in place only at the end: Ctrl-C before that leaves --out as it was
    kept = f"interrupted: nothing was written to {out} (the demo writes it only once every task is done); run the same command again"
    with _on_interrupt(lambda: kept):
        run_demo(out, device=device, log=_echo)


@weights_app.command("list")
def weights_list(pattern: Annotated[str | None, typer.Argument(help="Shell-style filter.")] = None) -> None:
    """List registered official checkpoints."""
    from attnzoo.factory import load_families
    from attnzoo.weights import list_checkpoints

    load_families()
    entries = list_checkpoints(pattern)
    if not entries:
        registered = len(list_checkpoints()) if pattern else 0
        _echo(
            f"no official checkpoint matches {pattern!r} ({registered} registered: attnzoo weights list)"
            if registered
            else "no official checkpoints registered yet" + (f" matching {pattern!r}" if pattern else "")
        )
        _echo("(timm's own pretrained weights load with --model NAME; see 'attnzoo models --pretrained')")
    for e in entries:
        _echo(f"{e.name}\t{e.source}\tsha256={e.sha256 or 'unknown'}")


@weights_app.command("download")
def weights_download(
    name: Annotated[str, typer.Argument(help="Registered checkpoint name, URL or hf-hub:org/repo/file.")],
) -> None:
    """Download (or find in the cache) a checkpoint, verify it, and print its path."""
    from attnzoo.factory import load_families
    from attnzoo.weights import resolve_checkpoint

    load_families()
    with _on_interrupt(lambda: "interrupted: run the same command again to resume the download"):
        _echo(str(resolve_checkpoint(name)))


@weights_app.command("verify")
def weights_verify(
    name: Annotated[str, typer.Argument(help="Registered checkpoint name or local file.")],
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Expected sha256 (default: the registered one).")
    ] = None,
) -> None:
    """Check a checkpoint file against its sha256 (with none known, print the file's hash)."""
    from attnzoo.factory import load_families
    from attnzoo.weights import verify_report

    load_families()
    ok, message = verify_report(name, sha256)
    _echo(message, err=not ok)
    if not ok:
        raise typer.Exit(1)


@weights_app.command("convert")
def weights_convert(
    src: Annotated[str, typer.Argument(help="Official checkpoint: path, URL or registered name.")],
    dst: Annotated[Path, typer.Argument(help="Output .safetensors file.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model the checkpoint belongs to.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it exists (else refused).")] = False,
) -> None:
    """Convert an official checkpoint into attnzoo's safetensors layout (checked against the model)."""
    from attnzoo.factory import create_model
    from attnzoo.weights import convert_checkpoint, get_checkpoint, is_checkpoint
    from attnzoo.weights.convert import check_destination

    check_destination(src, dst, overwrite=overwrite, flag="--overwrite")  # before the model is built
    net = create_model(model, weights="none")
    converter = get_checkpoint(src).resolve_converter() if is_checkpoint(src) else None
    if converter is None:
        from attnzoo.factory import module_filter_fn

        converter = module_filter_fn(net)
    path = convert_checkpoint(src, dst, net, converter=converter, metadata={"model": model}, overwrite=overwrite)
    _echo(f"wrote {path}")


extract_app = typer.Typer(
    help="Features of many inputs at once: whole-slide cohorts, shared between processes under torchrun, resumable.",
    no_args_is_help=True,
)
app.add_typer(extract_app, name="extract")


def _segment_setting(text: str) -> tuple[str, Any]:
    """``--segment a_t=1``: a number, true/false or none; the names are checked with the rest."""
    import json

    key, sep, raw = text.partition("=")
    value = raw.strip().lower()
    if not sep or not key.strip():
        raise InvalidOptionError(f"--segment takes NAME=VALUE (e.g. a_t=1), got {text!r}")
    if value in ("none", "null"):
        return key.strip(), None
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        raise InvalidOptionError(f"--segment {text}: the value must be a number, true/false or none") from None


@extract_app.command("wsi-features")
def extract_wsi_features(
    slides: Annotated[
        list[str],
        typer.Argument(
            help="Slides: files, folders (their whole-slide files), quoted globs, or CSVs with a slide_path column "
            "(and optional slide_id, label)."
        ),
    ],
    encoder: Annotated[
        str,
        typer.Option(
            "--encoder", "-e", help="Patch encoder: resnet18 (ACMIL), resnet50_trunc (CLAM) or any timm/attnzoo model."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (made if missing).")],
    weights: WeightsOpt = None,
    layout: Annotated[
        str, typer.Option("--layout", help="attnzoo: OUT/<slide_id>.h5; clam: OUT/h5_files/*.h5 + OUT/pt_files/*.pt.")
    ] = "attnzoo",
    magnification: Annotated[float, typer.Option("--magnification", help="Magnification patches are cut at.")] = 20.0,
    mpp: Annotated[Optional[float], typer.Option("--mpp", help="µm per pixel instead of --magnification.")] = None,  # noqa: UP045
    patch_size: Annotated[int, typer.Option("--patch-size", help="Patch side (px at that resolution).")] = 256,
    input_size: Annotated[int, typer.Option("--input-size", help="Side patches are resized to for the encoder.")] = 224,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Grid step (default: the patch size).")] = None,  # noqa: UP045
    read_level: Annotated[
        str,
        typer.Option(
            "--read-level", help="base: read level 0 and resize (CLAM, ACMIL); auto: coarsest level fine enough."
        ),
    ] = "base",
    min_tissue: Annotated[float, typer.Option("--min-tissue", help="Fraction of a patch that must be tissue.")] = 0.5,
    segment: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--segment", help="Tissue segmentation setting NAME=VALUE (CLAM's: sthresh, a_t, ...); repeatable."
        ),
    ] = None,
    base_magnification: Annotated[
        Optional[float], typer.Option("--base-magnification", help="The scan's objective, for files without it.")  # noqa: UP045
    ] = None,
    base_mpp: Annotated[
        Optional[float], typer.Option("--base-mpp", help="The scan's µm per pixel, for files without it.")  # noqa: UP045
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Patches per encoder batch.")] = 64,
    num_workers: Annotated[int, typer.Option("--num-workers", help="Processes reading patches, per process.")] = 2,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Stored features: float32 or float16.")] = "float32",
    amp: Annotated[bool, typer.Option("--amp", help="Run the encoder under autocast.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Remake files made with other settings (default: such a slide fails).")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first slide that fails.")] = False,
) -> None:
    """Patch features of every slide into OUT, one file per slide, plus OUT/manifest.csv (and labels.csv
    from a CSV's labels); rerun to resume. Under torchrun the processes share the slides."""
    from attnzoo.pipelines.wsi_cohort import extract_cohort

    _check_out(out)
    kept = f"interrupted: the slides finished are kept in {out}; run the same command again to resume"
    with _on_interrupt(lambda: kept):
        result = extract_cohort(
            slides,
            encoder,
            out,
            layout=layout,
            weights=weights,
            strict=strict,
            overwrite="stale" if overwrite else False,
            log=lambda m: _echo(m, err=True),
            magnification=magnification,
            mpp=mpp,
            patch_size=patch_size,
            input_size=input_size,
            stride=stride,
            read_level=read_level,
            min_tissue=min_tissue,
            segment_kwargs=dict(_segment_setting(s) for s in segment or ()),
            base_magnification=base_magnification,
            base_mpp=base_mpp,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            dtype=dtype,
            amp=amp,
        )
    if result.manifest is not None:  # rank 0
        _echo(result.summary())
        if result.failed and len(result.failed) == len(result.records):  # some failed: the run goes on, exit 0
            from attnzoo.errors import InvalidInputError

            raise InvalidInputError(f"no slide has features: all {len(result.failed)} failed (errors in the manifest)")


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(Exit, Abort, ClickException) from typer and click: newer typer versions vendor click."""
    exits, aborts, errors = [typer.Exit], [typer.Abort], []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = __import__(name, fromlist=["ClickException"])
        except ImportError:
            continue
        errors.append(module.ClickException)
        exits.extend(getattr(module, "Exit", ()) and [module.Exit])
        aborts.extend(getattr(module, "Abort", ()) and [module.Abort])
    return tuple(exits), tuple(aborts), tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """The ``attnzoo`` command: its exit status (0 done, 1 a typed error, 2 a bad option, 3 a bug, 130 Ctrl-C)."""
    status = _main_guarded(argv)
    if status:  # a torchrun rank that failed leaves its process group alone at exit (it could wait on its peers)
        from attnzoo._distributed import note_failure

        note_failure(status)
    return status


def _main_guarded(argv: list[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]  # accepted anywhere, not only before the command
    exit_types, abort_types, click_errors = _click_exception_types()
    try:
        _refuse_blank_arguments(args)
        with _quiet_third_party_logs(debug):
            return _main(args, exit_types, abort_types, click_errors)
    except AttnzooError as exc:
        if debug:
            raise
        _echo(f"error: {exc}", err=True)
        return 2 if isinstance(exc, InvalidOptionError) else 1
    except KeyboardInterrupt as exc:  # Ctrl-C outside a command (or a click that passes it on)
        _echo(_interrupt_message(exc), err=True)
        return 130
    except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        _echo(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and please report it)",
            err=True,
        )
        return 3


def _interrupt_message(exc: KeyboardInterrupt) -> str:
    """The line Ctrl-C ends with: what was kept and how to resume, where the command said it."""
    return str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else "interrupted"


#: Options whose "nothing" has a name of its own.
_EMPTY_HINTS = {"--prompt-suffix": "none for no suffix"}


def _refuse_blank_arguments(args: list[str]) -> None:
    """An empty argument (``--out ''``, ``--model=``, ``run ''``) is a typo or an unset shell variable: as a
    path it would read as the current folder, as a setting as "not given" (the default). Refused, named."""
    for i, arg in enumerate(args):
        flag, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if (sep or not flag) and not value.strip():
            before = args[i - 1] if i and args[i - 1].startswith("-") and "=" not in args[i - 1] else ""
            name = flag or before or f"argument {i + 1}"
            hint = _EMPTY_HINTS.get(name, "an unset shell variable?")
            raise InvalidOptionError(f"{name} is empty; give a value ({hint})")


@contextlib.contextmanager
def _quiet_third_party_logs(debug: bool) -> Iterator[None]:
    """Other libraries' log lines (open_clip's "Failed to download weights", timm's, the Hub's) stay
    quiet unless ``--debug``; attnzoo's own warnings still show."""
    root, own = logging.getLogger(), logging.getLogger("attnzoo")
    saved = root.level, own.level
    root.setLevel(logging.WARNING if debug else logging.CRITICAL)
    own.setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(saved[0])
        own.setLevel(saved[1])


def _main(args: list[str], exit_types: tuple, abort_types: tuple, click_errors: tuple) -> int:
    try:
        _add_task_commands()
        if len(args) > 1 and args[0] in ("run", "eval", "train") and not args[1].startswith("-"):
            from attnzoo.tasks import get_task

            get_task(args[1])  # an unknown task: a typed error with suggestions, not click's bare usage error
        _interrupted.clear()
        result = app(args=args, prog_name="attnzoo", standalone_mode=False)
        if result == 130:  # typer's answer to Ctrl-C
            _echo(_interrupted[-1] if _interrupted else "interrupted", err=True)
        return result if isinstance(result, int) else 0
    except exit_types as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C into Exit(130), silently
            _echo(_interrupt_message(exc.__cause__), err=True)
        return exc.exit_code
    except abort_types as exc:
        cause = exc.__cause__  # click turns Ctrl-C into Abort
        _echo(_interrupt_message(cause) if isinstance(cause, KeyboardInterrupt) else "aborted", err=True)
        return 130
    except click_errors as exc:
        exc.show()
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
