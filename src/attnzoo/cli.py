"""The ``attnzoo`` command: run, eval, train, weights, models, tasks, demo.

Errors that attnzoo raises on purpose print as one line and exit non-zero; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import inspect
import os
import sys
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
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32, float16 or bfloat16.")]


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
        if o.type is bool:
            params.append(_param(o.name, Annotated[bool, typer.Option(o.flag, help=o.help)], bool(o.default)))
        else:
            params.append(_param(o.name, Annotated[Optional[o.type], typer.Option(o.flag, help=o.help)], None))  # noqa: UP045
    return params


def _command(fn: Any, params: list[inspect.Parameter], spec: Any, command: str) -> Any:
    def callback(**kwargs: Any) -> None:
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
        "files": "Input files (slides or feature files).",
    }
    inputs_help = what.get(spec.inputs, "Input images (folders are expanded to their images).")
    return [
        inspect.Parameter(
            "inputs",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[list[str], typer.Argument(help=inputs_help)],
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
        _param("device", DeviceOpt, None),
        _param(
            "overrides",
            Annotated[list[str] | None, typer.Argument(help="Settings as key=value, e.g. lr=5e-4 epochs=30.")],
            None,
        ),  # noqa: UP045
        *_option_params(spec.options_for("train")),
    ]


def _given(options: dict[str, Any], spec: Any, command: str) -> dict[str, Any]:
    """The task options the user gave (a flag left off is not passed on)."""
    return {o.name: options[o.name] for o in spec.options_for(command) if options.get(o.name) not in (None, False)}


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


def _run_task(
    spec: Any,
    *,
    inputs: list[str],
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

    files = _expand_inputs(inputs, spec.inputs)
    if not files:
        raise InvalidInputError("no input files given (folders held no images)")
    given = _given(options, spec, "run")
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
    _run_files(pipe, files, items, out, **fields)


def _input_fields(spec: Any) -> set[str]:
    return {name for cls in spec.pipeline_classes() for name in cls.input_fields}


def _run_files(pipe: Any, files: list[str], items: list[Any], out: Path | None, **fields: Any) -> None:
    """``attnzoo run``'s loop for any task: a line per input, unreadable inputs skipped (unless there
    is only one), then ``results.json`` and a picture per input in ``out``."""
    from attnzoo._io import atomic_write, write_json
    from attnzoo.errors import InvalidInputError

    results, failed = {}, []
    for i, result in pipe.iterate(items, on_error="raise" if len(files) == 1 else "skip", **fields):
        if isinstance(result, Exception):
            failed.append(files[i])
            _echo(f"skipped: {result}", err=True)
            continue
        results[files[i]] = result
        _echo(f"{files[i]}: {result.summary()}")
    if out is not None and results:
        write_json(out / "results.json", {f: r.to_dict() for f, r in results.items()})
        taken: set[str] = set()
        for file, result in results.items():
            stem = Path(file).stem or Path(file).name
            name, n = stem, 1
            while name in taken:  # a/001.jpg and b/001.jpg, or cat.jpg and cat.png: one picture each
                n += 1
                name = f"{stem}-{n}"
            taken.add(name)
            with atomic_write(out / f"{name}.png", "wb") as fh:
                result.plot().save(fh, format="PNG")
        _echo(f"wrote {len(results) + 1} files to {out}")
    if failed:
        raise InvalidInputError(f"{len(failed)} of {len(files)} inputs could not be read")


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
    device: str | None,
    dtype: str | None,
    **options: Any,
) -> None:
    from attnzoo.evaluation import evaluate, weights_identity
    from attnzoo.tasks import pipeline

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
    pipe = pipeline(spec.name, model=plan.model, weights=weights, device=device, dtype=dtype, **plan.pipeline_kwargs)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    results = {}
    for name, evaluator, run_settings in plan.runs:
        evaluator.check_model(pipe.model)
        settings = {
            "model": plan.model,
            "weights": weights_identity(weights),
            "data": str(Path(data).resolve()),
            "split": plan.split,
            "limit": limit,
            "dtype": dtype,
            **plan.settings,
            **run_settings,
        }
        run_out = Path(out) if name is None else Path(out) / name
        metrics = evaluate(
            pipe, evaluator, run_out, settings=settings, batch_size=batch_size, num_workers=workers, overwrite=overwrite
        )
        if not metrics:  # a torchrun process other than the first: process 0 reports
            continue
        results[name] = metrics
        shown = {k: metrics[k] for k in (*evaluator.headline, "n", "skipped") if k in metrics}
        _echo((f"{name} " if name is not None else "") + " ".join(f"{k}={v}" for k, v in shown.items()))
        _echo(f"wrote {run_out / 'metrics.json'} and {run_out / 'report.md'}")
    if len(results) > 1:
        _echo(evaluator_cls.summarize(results, Path(out)))


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
    device: str | None,
    overrides: list[str] | None,
    **options: Any,
) -> None:
    recipe = spec.load_recipe()
    extra = [f"{k}={v}" for k, v in _given(options, spec, "train").items()]
    result = recipe(
        model or spec.train_model or spec.default_model,
        data,
        out,
        config=config,
        overrides=[*(overrides or []), *extra],
        weights=weights,
        resume=resume,
        device=device,
    )
    best = f" best={result['best']:.3f}" if result.get("best") is not None else ""
    _echo(f"trained {result['step']} steps{best}; wrote {Path(out)}")


def _list_configs(value: bool) -> None:
    if value:
        from attnzoo.training.config import named_configs

        for name in named_configs():
            _echo(name)
        raise typer.Exit()


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
                    "--list-configs", callback=_list_configs, is_eager=True, help="List the named recipes and exit."
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
    """List model names that create_model and --model accept."""
    from attnzoo.factory import list_models

    for name in list_models(pattern, pretrained=pretrained):
        _echo(name)


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

    run_demo(out, device=device, log=_echo)


@weights_app.command("list")
def weights_list(pattern: Annotated[str | None, typer.Argument(help="Shell-style filter.")] = None) -> None:
    """List registered official checkpoints."""
    from attnzoo.factory import load_families
    from attnzoo.weights import list_checkpoints

    load_families()
    entries = list_checkpoints(pattern)
    if not entries:
        _echo("no official checkpoints registered yet" + (f" matching {pattern!r}" if pattern else ""))
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
    _echo(str(resolve_checkpoint(name)))


@weights_app.command("verify")
def weights_verify(
    name: Annotated[str, typer.Argument(help="Registered checkpoint name or local file.")],
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Expected sha256 (default: the registered one).")
    ] = None,
) -> None:
    """Check a checkpoint file against its sha256."""
    from attnzoo.errors import WeightsError
    from attnzoo.factory import load_families
    from attnzoo.weights import get_checkpoint, is_checkpoint, resolve_checkpoint, sha256_file, verify_file

    load_families()
    expected = sha256 or (get_checkpoint(name).sha256 if is_checkpoint(name) else None)
    path = resolve_checkpoint(name)
    if expected is None:
        raise WeightsError(f"no sha256 known for {name}; pass --sha256 (the file's is {sha256_file(path)})")
    verify_file(path, expected)
    _echo(f"OK {path} sha256={expected.lower()}")


@weights_app.command("convert")
def weights_convert(
    src: Annotated[str, typer.Argument(help="Official checkpoint: path, URL or registered name.")],
    dst: Annotated[Path, typer.Argument(help="Output .safetensors file.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model the checkpoint belongs to.")],
) -> None:
    """Convert an official checkpoint into attnzoo's safetensors layout (checked against the model)."""
    from attnzoo.factory import create_model
    from attnzoo.weights import convert_checkpoint, get_checkpoint, is_checkpoint

    net = create_model(model, weights="none")
    converter = get_checkpoint(src).resolve_converter() if is_checkpoint(src) else None
    if converter is None:
        from attnzoo.factory import module_filter_fn

        converter = module_filter_fn(net)
    path = convert_checkpoint(src, dst, net, converter=converter, metadata={"model": model})
    _echo(f"wrote {path}")


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
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]  # accepted anywhere, not only before the command
    exit_types, abort_types, click_errors = _click_exception_types()
    try:
        _add_task_commands()
        if len(args) > 1 and args[0] in ("run", "eval", "train") and not args[1].startswith("-"):
            from attnzoo.tasks import get_task

            get_task(args[1])  # an unknown task: a typed error with suggestions, not click's bare usage error
        result = app(args=args, prog_name="attnzoo", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except exit_types as exc:
        return exc.exit_code
    except abort_types:
        _echo("aborted", err=True)
        return 130
    except click_errors as exc:
        exc.show()
        return exc.exit_code
    except AttnzooError as exc:
        if debug:
            raise
        _echo(f"error: {exc}", err=True)
        return 2 if isinstance(exc, InvalidOptionError) else 1
    except KeyboardInterrupt:
        _echo("interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        _echo(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and please report it)",
            err=True,
        )
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
