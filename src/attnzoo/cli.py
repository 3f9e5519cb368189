"""The ``attnzoo`` command: run, eval, train, weights, models, tasks, demo.

Errors that attnzoo raises on purpose print as one line and exit non-zero; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from attnzoo import __version__
from attnzoo.errors import AttnzooError

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

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model name (default: the task's default model).")]
WeightsOpt = Annotated[
    Optional[str],
    typer.Option("--weights", "-w", help="Checkpoint: a path, URL, hf-hub:org/repo/file, registered name, or 'none' for random weights. Default: the model's pretrained weights."),
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32, float16 or bfloat16.")]


def _echo(message: str, *, err: bool = False) -> None:
    typer.echo(message, err=err)


def _version(value: bool) -> None:
    if value:
        _echo(f"attnzoo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """attnzoo: attention-based vision and multimodal models behind one API."""


def _expand_inputs(inputs: list[str]) -> list[str]:
    """Folders stand for the images inside them."""
    from attnzoo.datasets.image_folder import list_images

    expanded: list[str] = []
    for item in inputs:
        path = Path(item)
        expanded.extend(str(p) for p in list_images(path)) if path.is_dir() else expanded.append(item)
    return expanded


@app.command()
def run(
    task: Annotated[str, typer.Argument(help="Task name, e.g. image-classification.")],
    inputs: Annotated[list[str], typer.Argument(help="Input files (folders are expanded to their images).")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for results.json and pictures.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to report per image.")] = 5,
    caption: Annotated[Optional[str], typer.Option("--caption", help="Scanpaths (NevaClip): what the viewer looks for, e.g. 'a man crossing the street'.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 8,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Run a task's pipeline on input files and print (and optionally save) the results."""
    from attnzoo.errors import InvalidInputError
    from attnzoo.pipelines import get_task, pipeline

    spec = get_task(task)
    if spec.name not in ("image-classification", "scanpath"):
        raise InvalidInputError(f"'attnzoo run' does not support {spec.name} yet (use its Python pipeline or 'attnzoo eval')")
    files = _expand_inputs(inputs)
    if not files:
        raise InvalidInputError("no input files given (folders held no images)")
    if spec.name == "scanpath":
        if model is not None and not model.lower().startswith("neva"):
            raise InvalidInputError("'attnzoo run scanpath' runs NevaClip (image + caption); OAT needs object boxes and a target: "
                                    "use pipeline('scanpath', model=...) from Python")
        if not caption:
            raise InvalidInputError("NevaClip needs to know what the viewer looks for: pass --caption 'a man crossing the street'")
        pipe = pipeline("scanpath", model=model, weights=weights, device=device, dtype=dtype, batch_size=batch_size)
        _run_files(pipe, files, [{"image": f, "caption": caption} for f in files], out,
                   summary=lambda r: " ".join(f"({x:.0f},{y:.0f})" for x, y in r.xy), to_json=lambda r: r.to_dict(),
                   picture=lambda file, r: r.plot(file), suffix="_scanpath")
        return
    if caption is not None:
        raise InvalidInputError("--caption is an option of the scanpath task")
    from attnzoo.datasets.images import load_image
    from attnzoo.viz import plot_classification

    pipe = pipeline(spec.name, model=model, weights=weights, device=device, dtype=dtype, batch_size=batch_size)
    title = str(model or spec.default_model)
    _run_files(pipe, files, files, out, summary=lambda r: ", ".join(f"{p.label} ({p.score:.1%})" for p in r[:3]),
               to_json=lambda r: [p.to_dict() for p in r], picture=lambda file, r: plot_classification(load_image(file), r, title=title),
               top_k=top_k)


def _run_files(pipe: Any, files: list[str], items: list[Any], out: Path | None, *, summary: Any, to_json: Any, picture: Any,
               suffix: str = "", **kwargs: Any) -> None:
    """``attnzoo run``'s loop for any task: a line per file, unreadable files skipped (unless there
    is only one), then ``results.json`` and a picture per file in ``out``."""
    from attnzoo._io import atomic_write, write_json
    from attnzoo.errors import InvalidInputError

    results, failed = {}, []
    for i, result in pipe.iterate(items, on_error="raise" if len(files) == 1 else "skip", **kwargs):
        if isinstance(result, Exception):
            failed.append(files[i])
            _echo(f"skipped: {result}", err=True)
            continue
        results[files[i]] = result
        _echo(f"{files[i]}: {summary(result)}")
    if out is not None and results:
        write_json(out / "results.json", {f: to_json(r) for f, r in results.items()})
        taken: set[str] = set()
        for file, result in results.items():
            name, n = f"{Path(file).stem}{suffix}", 1
            while name in taken:  # a/001.jpg and b/001.jpg, or cat.jpg and cat.png: one picture each
                n += 1
                name = f"{Path(file).stem}{suffix}-{n}"
            taken.add(name)
            with atomic_write(out / f"{name}.png", "wb") as fh:
                picture(file, result).save(fh, format="PNG")
        _echo(f"wrote {len(results) + 1} files to {out}")
    if failed:
        raise InvalidInputError(f"{len(failed)} of {len(files)} inputs could not be read")


@app.command("eval")
def eval_(
    task: Annotated[str, typer.Argument(help="Task name, e.g. image-classification.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset root folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for metrics.json, report.md, predictions.")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split (default: val for image classification, test for 3D reconstruction and slides).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="DataLoader workers (default: CPU count, at most 8).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate only the first N samples.")] = None,
    views: Annotated[Optional[str], typer.Option("--views", help="3D reconstruction: view counts to sweep, e.g. 1,2,3,4,5,8,12,16,20 (default 3).")] = None,
    fscore: Annotated[bool, typer.Option("--fscore", help="3D reconstruction: also F-score@1% (slower).")] = False,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Scanpaths: capmit1003, mit1003, amazon, yogurt or wine (default: detected from --data).")] = None,
    captions: Annotated[Optional[str], typer.Option("--captions", help="Scanpaths on capmit1003: own, misleading, other-subject, comma-separated (default own,misleading).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Scanpaths: seed of NevaClip's restarts, misleading captions and OAT's split (default 0; for an OAT training run's weights, its split seed).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Scanpaths (OAT): sampled scanpaths per trial (the paper's 'multi' rows use 100) instead of greedy decoding.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an earlier run in --out instead of resuming it.")] = False,
) -> None:
    """Evaluate a model on a dataset; resumes an interrupted run in the same --out."""
    from attnzoo._io import write_json, write_text
    from attnzoo.evaluation import evaluate, get_evaluator
    from attnzoo.pipelines import get_task, pipeline

    spec = get_task(task)
    model_name = model or spec.default_model
    is_3d = spec.name == "multiview-3d-reconstruction"
    if (views is not None or fscore) and not is_3d:
        raise typer.BadParameter("--views and --fscore are options of multiview-3d-reconstruction")
    is_scanpath = spec.name == "scanpath"
    if (dataset is not None or captions is not None or samples is not None) and not is_scanpath:
        raise typer.BadParameter("--dataset, --captions and --samples are options of scanpath")
    extra: dict = {}
    pipe_kwargs: dict = {}
    if is_scanpath:
        kind = "nevaclip" if str(model_name).lower().startswith("neva") else "oat"
        split, seed, drop_outliers = _scanpath_split(kind, weights, split, seed)
        extra = {"dataset": dataset, "captions": captions, "seed": seed, "model_kind": kind, "samples_per_trial": samples,
                 "drop_outliers": drop_outliers}
        pipe_kwargs = {"seed": seed} if kind == "nevaclip" else {"strategy": "sample", "num_samples": samples, "seed": seed} if samples else {}
    counts = _view_counts(views) if is_3d else [None]
    split = split or {"multiview-3d-reconstruction": "test", "wsi-classification": "test", "scanpath": "test"}.get(spec.name, "val")
    evaluator_cls = get_evaluator(spec.name)

    def make_evaluator(n: int | None):
        return evaluator_cls(data, split, limit=limit, **extra) if n is None else evaluator_cls(data, split, limit=limit, n_views=n, with_fscore=fscore)

    evaluators = {n: make_evaluator(n) for n in counts}  # a bad dataset fails before the model loads
    if is_scanpath and str(model_name).lower() == "oat":  # the OAT variant of the shelf layout found in --data
        model_name = f"oat_{evaluators[None].dataset}"
    pipe = pipeline(spec.name, model=model_name, weights=weights, device=device, dtype=dtype, **pipe_kwargs)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    results = {}
    for n, evaluator in evaluators.items():
        if getattr(pipe.model, "num_classes", None) and hasattr(evaluator, "check_num_classes"):
            evaluator.check_num_classes(pipe.model.num_classes)
        settings = {"model": model_name, "weights": _weights_identity(weights), "data": str(Path(data).resolve()), "split": split,
                    "limit": limit, "dtype": dtype, **({"views": n, "fscore": fscore} if n is not None else {}),
                    **({k: v for k, v in extra.items() if k != "model_kind" and v is not None} if is_scanpath else {})}
        run_out = Path(out) if len(counts) == 1 else Path(out) / f"views-{n}"
        metrics = evaluate(pipe, evaluator, run_out, settings=settings, batch_size=batch_size, num_workers=workers, overwrite=overwrite)
        if not metrics:  # a torchrun process other than the first: process 0 reports
            continue
        results[n] = metrics
        shown = {k: metrics[k] for k in ("top1", "top5", "iou", "fscore", "spp", "ss", "delta", "n", "skipped") if k in metrics}
        _echo((f"views={n} " if n is not None else "") + " ".join(f"{k}={v}" for k, v in shown.items()))
        _echo(f"wrote {run_out / 'metrics.json'} and {run_out / 'report.md'}")
    if len(results) > 1:
        from attnzoo.evaluation.reconstruction import sweep_report

        write_json(Path(out) / "sweep.json", {str(n): m for n, m in results.items()})
        write_text(Path(out) / "report.md", sweep_report(results))
        _echo(f"wrote {Path(out) / 'report.md'} (the view sweep)")


def _weights_identity(weights: str | None) -> str:
    """What names the weights in a run's settings: a local file by its absolute path, size and
    modification time, so a resumed evaluation never reuses predictions of weights since retrained."""
    if not weights:
        return "pretrained"
    path = Path(weights)
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"
    return str(weights)


def _scanpath_split(kind: str, weights: Any, split: str | None, seed: int | None) -> tuple[str | None, int, bool]:
    """(split, seed, drop_outliers) of a scanpath evaluation: an OAT training run's own split unless
    asked otherwise, with a warning when the asked one differs (its test set may hold training scanpaths)."""
    from attnzoo.evaluation.scanpath import training_split

    run = training_split(weights) if kind == "oat" else None
    if run is None:
        return split, 0 if seed is None else seed, True
    own = "test" if run["split"] == "official" else f"test-by-{run['split']}"
    chosen_split, chosen_seed = split or own, run["split_seed"] if seed is None else seed
    if chosen_split.partition("-by-")[2] != own.partition("-by-")[2] or chosen_seed != run["split_seed"]:
        _echo(f"warning: these weights were trained on the {run['split']} split with seed {run['split_seed']}; evaluating on "
              f"{chosen_split!r} with seed {chosen_seed}: its scanpaths may have been in the training set", err=True)
    return chosen_split, chosen_seed, bool(run.get("drop_outliers", True))


def _view_counts(text: str | None) -> list[int]:
    if text is None:
        return [3]
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"--views takes comma-separated view counts, e.g. 1,2,3; got {text!r}") from None
    if not counts or any(not 1 <= n <= 24 for n in counts):
        raise typer.BadParameter(f"--views: each count must be 1..24 (ShapeNet has 24 renderings), got {text!r}")
    return sorted(set(counts))


TRAIN_RECIPES = {
    "image-classification": "attnzoo.training.classification:train_classification",
    "multiview-3d-reconstruction": "attnzoo.training.reconstruction:train_reconstruction",
    "wsi-classification": "attnzoo.training.wsi:train_wsi_classification",
    "scanpath": "attnzoo.training.scanpath:train_scanpath",
}
#: The model a task trains by default when it differs from its pipeline's (NevaClip has nothing to train).
TRAIN_DEFAULT_MODELS = {"scanpath": "oat"}  # oat_<dataset>, for the shelf layout found in --data


@app.command(context_settings={"allow_extra_args": False})
def train(
    task: Annotated[str, typer.Argument(help="Task name, e.g. image-classification.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset root (train/ and val/ splits, or class folders).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints, config.yaml, metrics.csv, tensorboard/.")],
    model: ModelOpt = None,
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="Start from these weights (fine-tuning); the head is replaced when the classes differ.")] = None,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="A named recipe (see --list-configs) or a YAML file.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Settings as key=value, e.g. lr=5e-4 epochs=30.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Train a model (under torchrun: distributed). Interrupted runs continue exactly with --resume."""
    import importlib

    from attnzoo.pipelines import get_task

    spec = get_task(task)
    if spec.name not in TRAIN_RECIPES:
        raise typer.BadParameter(f"no training recipe for {spec.name} yet (available: {', '.join(TRAIN_RECIPES)})")
    module, fn = TRAIN_RECIPES[spec.name].split(":")
    recipe = getattr(importlib.import_module(module), fn)
    result = recipe(model or TRAIN_DEFAULT_MODELS.get(spec.name, spec.default_model), data, out, config=config, overrides=overrides or [], weights=weights, resume=resume, device=device)
    best = f" best={result['best']:.3f}" if result.get("best") is not None else ""
    _echo(f"trained {result['step']} steps{best}; wrote {Path(out)}")


@app.command()
def models(pattern: Annotated[Optional[str], typer.Argument(help="Shell-style filter, e.g. 'biformer*'.")] = None,
           pretrained: Annotated[bool, typer.Option("--pretrained", help="List name.tag entries with weights.")] = False) -> None:
    """List model names that create_model and --model accept."""
    from attnzoo.factory import list_models

    for name in list_models(pattern, pretrained=pretrained):
        _echo(name)


@app.command()
def tasks() -> None:
    """List the tasks pipeline() and the CLI accept."""
    from attnzoo.pipelines import SUPPORTED_TASKS

    for spec in SUPPORTED_TASKS.values():
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        _echo(f"{spec.name}: {spec.description} [default model: {spec.default_model}]{aliases}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("attnzoo-demo"),
    device: DeviceOpt = None,
) -> None:
    """Run every pipeline on bundled sample photographs; write results and pictures to --out."""
    from attnzoo.demo import run_demo

    run_demo(out, device=device, log=_echo)


@weights_app.command("list")
def weights_list(pattern: Annotated[Optional[str], typer.Argument(help="Shell-style filter.")] = None) -> None:
    """List registered official checkpoints."""
    from attnzoo.factory import _load_families
    from attnzoo.weights import list_checkpoints

    _load_families()
    entries = list_checkpoints(pattern)
    if not entries:
        _echo("no official checkpoints registered yet" + (f" matching {pattern!r}" if pattern else ""))
        _echo("(timm's own pretrained weights load with --model NAME; see 'attnzoo models --pretrained')")
    for e in entries:
        _echo(f"{e.name}\t{e.source}\tsha256={e.sha256 or 'unknown'}")


@weights_app.command("download")
def weights_download(name: Annotated[str, typer.Argument(help="Registered checkpoint name, URL or hf-hub:org/repo/file.")]) -> None:
    """Download (or find in the cache) a checkpoint, verify it, and print its path."""
    from attnzoo.factory import _load_families
    from attnzoo.weights import resolve_checkpoint

    _load_families()
    _echo(str(resolve_checkpoint(name)))


@weights_app.command("verify")
def weights_verify(
    name: Annotated[str, typer.Argument(help="Registered checkpoint name or local file.")],
    sha256: Annotated[Optional[str], typer.Option("--sha256", help="Expected sha256 (default: the registered one).")] = None,
) -> None:
    """Check a checkpoint file against its sha256."""
    from attnzoo.errors import WeightsError
    from attnzoo.factory import _load_families
    from attnzoo.weights import get_checkpoint, is_checkpoint, resolve_checkpoint, sha256_file, verify_file

    _load_families()
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
        from attnzoo.factory import _module_filter_fn

        converter = _module_filter_fn(net)
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
    exit_types, abort_types, click_errors = _click_exception_types()
    try:
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
        return 1
    except KeyboardInterrupt:
        _echo("interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        _echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and please report it)", err=True)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
