"""Whole-slide cohorts: patch features for every slide of a cohort, sharded across processes, resumable per slide.

The loop behind ``attnzoo extract wsi-features`` (and :func:`~attnzoo.pipelines.wsi_features.extract_slides`)::

    attnzoo extract wsi-features slides/ --encoder resnet18 --out feats/
    torchrun --nproc_per_node 8 -m attnzoo.cli extract wsi-features cohort.csv --encoder resnet18 --out feats/

Slides come as files, folders, globs or CSVs (a path column, optional ``slide_id`` and ``label``).
Under ``torchrun`` rank 0 lists them and every rank takes a fixed share, the largest files first and
each to the rank with the fewest bytes so far, so the ranks finish together; each writes only its
own slides' files. Each slide's features are :func:`~attnzoo.pipelines.wsi_features.extract_features`'
file (``<out>/<slide_id>.h5``), or CLAM's ``h5_files/<slide_id>.h5`` + ``pt_files/<slide_id>.pt``.

A rerun of the same command skips every finished slide (its file's settings digest, slide name and
size match; only the file's attributes are read) and resumes a half-done one from its shards; a
slide that cannot be read is recorded as failed and the run goes on (``strict`` stops instead).
Each rank rewrites its own partial manifest (``<out>/.attnzoo-extract/rank-*.csv``) atomically
after every slide, so a kill loses nothing; at the end rank 0 gathers every rank's records and
writes ``manifest.csv`` (slide id, slide, patches, encoder, settings digest, status, seconds, error)
and, when the CSV gave labels, ``labels.csv`` (``slide_id,label``), which ``attnzoo train`` /
``attnzoo eval wsi-classification --data <out>`` read beside the features.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from glob import glob, has_magic
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from attnzoo._distributed import DistributedContext, distributed_context
from attnzoo._io import atomic_write, check_output_folder, read_csv_rows, write_text
from attnzoo._values import flag
from attnzoo.datasets.wsi import import_wsi_dependency, slide_id
from attnzoo.errors import AttnzooError, DatasetFormatError, InvalidInputError, InvalidOptionError
from attnzoo.pipelines.base import resolve_device
from attnzoo.pipelines.wsi_features import (
    ExtractionSettings,
    _resolve_encoder,
    check_batch,
    check_settings,
    extract_features,
    finished_features,
    remove_stale_temporaries,
    weights_digest,
)

__all__ = [
    "LAYOUTS",
    "MANIFEST_COLUMNS",
    "CohortResult",
    "CohortSlide",
    "SlideRecord",
    "extract_cohort",
    "list_slides",
    "shard_slides",
]

#: Output layouts: ours (``<slide_id>.h5``) and CLAM's (``h5_files/<slide_id>.h5`` + ``pt_files/<slide_id>.pt``).
LAYOUTS = ("attnzoo", "clam")
MANIFEST_COLUMNS = ("slide_id", "slide", "patches", "encoder", "fingerprint", "status", "seconds", "error")
#: What a folder contributes: the whole-slide formats OpenSlide reads (a plain image must be named).
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
#: Path columns of a slide CSV, in the order they are looked for (ours; TRIDENT's ``wsi``; BRACS's ``full_path``).
PATH_COLUMNS = ("slide_path", "path", "wsi", "full_path")
PARTIAL_DIR = ".attnzoo-extract"
#: What one slide may raise and the run still go on: its file is unreadable, it has no tissue, its
#: features came out non-finite... (settings are checked once, before any slide).
SLIDE_ERRORS = (DatasetFormatError, InvalidInputError)


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort: its id (the output file's name), file, label (as the CSV wrote it) and size in bytes."""

    slide_id: str
    path: Path
    label: str | None = None
    size: int = 0

    def __post_init__(self) -> None:
        _check_slide_id(self.slide_id)

    @classmethod
    def of(cls, path: str | os.PathLike, name: str | None = None, label: str | None = None) -> CohortSlide:
        """The slide at ``path``, called ``name`` (default: the file name without its extension)."""
        path = Path(os.path.abspath(path))  # absolute and without '..', symbolic links kept
        return cls(name or slide_id(path), path, label or None, _slide_bytes(path))


def _check_slide_id(name: str, where: str = "") -> str:
    """A slide id names its output file (``<out>/<slide_id>.h5``): one that is a path, or no name, could
    write outside the output folder or into a sub-folder of it."""
    separators = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    if not name.strip() or name in (".", "..") or any(s in name for s in separators):
        raise DatasetFormatError(
            f"{where}slide_id {name!r} is not a file name: a slide id names its output file <slide_id>.h5, so it "
            "must not be empty, '.' or '..', or contain '/' or '\\'"
        )
    return name


@dataclass(frozen=True)
class SlideRecord:
    """One row of the manifest."""

    slide_id: str
    slide: str
    patches: int | None
    encoder: str
    fingerprint: str
    status: str  # "done" or "failed"
    seconds: float | None
    error: str = ""
    reused: bool = field(default=False, compare=False)  # found finished, not computed by this run

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def row(self) -> dict[str, str]:
        values = {**vars(self), "seconds": None if self.seconds is None else f"{self.seconds:.2f}"}
        return {k: "" if values[k] is None else str(values[k]) for k in MANIFEST_COLUMNS}


@dataclass
class CohortResult:
    """What :func:`extract_cohort` did: every slide's record (on rank 0; this rank's own elsewhere)."""

    records: list[SlideRecord]
    seconds: float
    world_size: int = 1
    manifest: Path | None = None

    @property
    def failed(self) -> list[SlideRecord]:
        return [r for r in self.records if not r.ok]

    def summary(self) -> str:
        done = [r for r in self.records if r.ok]
        new = [r for r in done if not r.reused]
        patches = sum(r.patches or 0 for r in new)
        hours = max(self.seconds, 1e-9) / 3600
        line = (
            f"{len(done)} of {len(self.records)} slides have features ({len(new)} extracted now, "
            f"{len(done) - len(new)} found finished), {len(self.failed)} failed; {patches} patches in "
            f"{self.seconds:.1f} s ({patches / max(self.seconds, 1e-9):.1f} patches/s, {len(new) / hours:.0f} slides/h "
            f"over {self.world_size} process{'es' if self.world_size > 1 else ''})"
        )
        if self.failed:
            names = ", ".join(r.slide_id for r in self.failed[:5]) + (", ..." if len(self.failed) > 5 else "")
            line += f"\nfailed: {names} (errors in the manifest)"
        if self.manifest is not None:
            line += f"\nmanifest: {self.manifest}"
        return line


# ------------------------------------------------------------------------------------------ inputs


def list_slides(inputs: Iterable[str | os.PathLike | CohortSlide]) -> list[CohortSlide]:
    """The slides ``inputs`` name, in order: files, folders (the whole-slide files directly inside,
    sorted), globs (sorted; ``**`` recurses) and ``.csv`` files (a path column ``slide_path``/``path``/
    ``wsi``/``full_path``, relative to the CSV's folder unless it exists from here; optional
    ``slide_id`` and ``label``). A file named twice counts once; two files with one slide id, or a
    named file or glob that finds nothing, is an :class:`~attnzoo.errors.InvalidInputError`."""
    found: list[CohortSlide] = []
    for item in inputs:
        if isinstance(item, CohortSlide):
            found.append(item)
            continue
        path = Path(item)
        if path.is_file() and path.suffix.lower() == ".csv":
            found.extend(_csv_slides(path))
        elif path.is_dir():
            found.extend(CohortSlide.of(p) for p in sorted(path.iterdir()) if _is_slide_file(p))
        elif path.exists():
            found.append(CohortSlide.of(path))
        elif has_magic(os.fspath(item)):
            matches = sorted(Path(p) for p in glob(os.fspath(item), recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise InvalidInputError(f"{item}: the pattern matches no slide file")
            found.extend(CohortSlide.of(p) for p in files)
        else:
            raise InvalidInputError(f"{item}: no such file, folder or pattern")
    unique: dict[Path, CohortSlide] = {}
    for slide in found:
        unique.setdefault(slide.path.resolve(), slide)
    slides = list(unique.values())
    by_id: dict[str, list[CohortSlide]] = {}
    for slide in slides:
        by_id.setdefault(slide.slide_id, []).append(slide)
    clashes = {k: v for k, v in by_id.items() if len(v) > 1}
    if clashes:
        example = next(iter(clashes.values()))
        raise InvalidInputError(
            f"{len(clashes)} slide id(s) name several files (each slide's features go to <slide_id>.h5), e.g. "
            f"{example[0].slide_id}: {', '.join(str(s.path) for s in example[:3])}; give them slide_id in a CSV"
        )
    if not slides:
        raise InvalidInputError(
            "no slides given (the folders held no whole-slide files: " + ", ".join(SLIDE_SUFFIXES) + ")"
        )
    return slides


def _is_slide_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES


def _slide_bytes(path: Path) -> int:
    """The bytes a slide's reading touches (an MIRAX ``.mrxs`` keeps them in the folder beside it)."""
    try:
        size = path.stat().st_size
    except OSError:
        return 0
    data = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and data.is_dir():
        size += sum(p.stat().st_size for p in data.iterdir() if p.is_file())
    return size


def _csv_slides(csv_path: Path) -> list[CohortSlide]:
    header, rows = read_csv_rows(csv_path, "slide list (CSV)")
    column = next((c for c in PATH_COLUMNS if c in header), None)
    if column is None:
        raise DatasetFormatError(
            f"{csv_path}: a slide list needs a path column ({', '.join(PATH_COLUMNS)}); its header is {','.join(header)}"
        )
    slides = []
    for line, row in enumerate(rows, start=2):
        if not row[column]:
            raise DatasetFormatError(f"{csv_path} line {line}: empty {column}")
        path = Path(row[column]).expanduser()
        if not path.is_absolute() and not path.exists():
            path = csv_path.parent / path  # relative to the CSV, unless it names a file from here
        name = row.get("slide_id") or None
        if name is not None:
            _check_slide_id(name, f"{csv_path} line {line}: ")
        slides.append(CohortSlide.of(path, name, row.get("label") or None))
    return slides


def shard_slides(slides: Sequence[CohortSlide], world_size: int) -> list[list[CohortSlide]]:
    """Disjoint shares, one per rank, covering every slide: largest first, each to the rank with the
    fewest bytes so far (ties: the lower rank), so ranks finish about together; each share is in the
    order it is worked through, largest first."""
    shares: list[list[CohortSlide]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for slide in sorted(slides, key=lambda s: (-s.size, s.slide_id)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(slide)
        loads[rank] += slide.size
    return shares


# ------------------------------------------------------------------------------------ the cohort


def extract_cohort(
    slides: Iterable[str | os.PathLike | CohortSlide],
    encoder: str | torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    layout: str = "attnzoo",
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    strict: bool = False,
    overwrite: bool | str = False,
    distributed: bool = True,
    manifest: bool = True,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    **extract_kwargs: Any,
) -> CohortResult:
    """Features for every slide of ``slides`` (see :func:`list_slides`) into ``out_dir``.

    ``layout``: ``"attnzoo"`` (``<slide_id>.h5``) or ``"clam"`` (``h5_files/`` + ``pt_files/``).
    ``extract_kwargs`` go to :func:`~attnzoo.pipelines.wsi_features.extract_features` (checked once,
    before any slide). ``overwrite``: as there (``"stale"`` remakes only files made with other
    settings). ``distributed``: under ``torchrun``, share the slides between the ranks. ``manifest``:
    write the partial manifests and ``manifest.csv``. ``progress``: a bar over this rank's slides and
    one over each slide's patches, on rank 0 (``None``: when stderr is a terminal); ``log`` gets a
    line per slide when there is no bar (a cluster job's log). With ``strict`` the first slide that
    fails raises its error (after its record is written).
    """
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if overwrite not in (False, True, "stale"):
        raise InvalidInputError(f"overwrite must be False, True or 'stale', got {overwrite!r}")
    progress = flag(progress, "progress", allow_none=True, none_means="on a terminal", error=InvalidInputError)
    import_wsi_dependency("h5py")
    settings = _check_extract_kwargs(extract_kwargs)  # a wrong setting fails here, not once per slide
    out = check_output_folder(out_dir, "the output folder", InvalidInputError)
    ctx = distributed_context() if distributed else DistributedContext()
    slides = list(slides)
    writes = _Outputs(out, layout, manifest)
    cohort = _listed_on_rank0(slides, ctx, lambda listed: writes.refuse_inputs(slides, listed, weights))

    started = time.perf_counter()
    model, name = _resolve_encoder(encoder, weights)
    model_digest = weights_digest(model)
    digest = settings.digest(name, model_digest)
    earlier = _earlier_seconds(out, digest) if manifest else {}
    ctx.gather_objects(None)  # every rank has read the earlier records before any rewrites its own
    mine = shard_slides(cohort, ctx.world_size)[ctx.rank]
    partial = out / PARTIAL_DIR / f"rank-{ctx.rank:05d}-of-{ctx.world_size:05d}.csv"
    show = ctx.is_main and progress is not False
    job = _Slides(model, name, model_digest, digest, out, layout, overwrite, extract_kwargs, show and progress)
    records = []
    with _Progress(mine, ctx, show and progress, log) as bar:
        for slide in mine:
            record = job.run(slide, earlier.get(slide.slide_id))
            records.append(record)
            if manifest:
                _write_manifest(partial, records)
            bar.done(slide, record)
            if strict and job.last_error is not None:
                raise job.last_error
    everyone = ctx.gather_objects(records)  # also the barrier before rank 0 writes the manifest
    seconds = time.perf_counter() - started
    if not ctx.is_main:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        return CohortResult(records, seconds, ctx.world_size)
    by_id = {r.slide_id: r for share in everyone for r in share}
    merged = [by_id[s.slide_id] for s in cohort]
    result = CohortResult(merged, seconds, ctx.world_size)
    if manifest:
        result.manifest = out / "manifest.csv"
        _write_manifest(result.manifest, merged)
        _write_labels(out, cohort)
        shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    return result


def _check_extract_kwargs(extract_kwargs: dict[str, Any]) -> ExtractionSettings:
    """What :func:`~attnzoo.pipelines.wsi_features.extract_features` would refuse for every slide
    (an unknown keyword, a bad setting, batch size or device), refused once, before any slide."""
    per_slide = sorted({"slide_id", "_encoder_name", "_weights_digest"} & set(extract_kwargs))
    if per_slide:
        raise InvalidInputError(f"{', '.join(per_slide)}: set per slide (slide ids come from the slide list)")
    try:
        bound = inspect.signature(extract_features).bind("slide", "encoder", "out", **extract_kwargs)
    except TypeError as err:
        raise InvalidInputError(f"extract_features does not take these settings: {err}") from None
    bound.apply_defaults()
    given = bound.arguments
    settings = check_settings(**{k: given[k] for k in inspect.signature(check_settings).parameters})
    check_batch(given["batch_size"], given["num_workers"], settings.input_size)
    resolve_device(given["device"])
    return settings


def _listed_on_rank0(
    slides: Iterable[Any], ctx: DistributedContext, check: Callable[[list[CohortSlide]], None]
) -> list[CohortSlide]:
    """Rank 0 lists the slides (and ``check``s them) and sends the list (or its error) to every rank:
    every rank shards the very same list, even when files appear while the ranks start."""
    listed: list[CohortSlide] | AttnzooError | None = None
    if ctx.is_main:
        try:
            listed = list_slides(slides)
            check(listed)
        except AttnzooError as err:
            listed = err
    listed = ctx.broadcast_object(listed)
    if isinstance(listed, AttnzooError):
        raise listed
    return listed


def _slide_outputs(out: Path, layout: str, name: str) -> tuple[Path, Path | None]:
    """A slide's feature file, and in CLAM's layout its ``.pt`` too."""
    if layout == "clam":
        return out / "h5_files" / f"{name}.h5", out / "pt_files" / f"{name}.pt"
    return out / f"{name}.h5", None


@dataclass(frozen=True)
class _Outputs:
    """What a run writes into ``out``."""

    out: Path
    layout: str
    manifest: bool

    def files(self, cohort: Sequence[CohortSlide]) -> dict[Path, str]:
        """Every file the run may write (resolved) -> its name in ``out``."""
        named = [p for s in cohort for p in _slide_outputs(self.out, self.layout, s.slide_id) if p is not None]
        if self.manifest:
            named.append(self.out / "manifest.csv")
            if any(s.label is not None for s in cohort):
                named.append(self.out / "labels.csv")
        return {p.resolve(): p.relative_to(self.out).as_posix() for p in named}

    def refuse_inputs(
        self, inputs: Sequence[Any], cohort: Sequence[CohortSlide], weights: str | os.PathLike | Mapping | None
    ) -> None:
        """A run must not write over what it reads (a slide list ``<out>/labels.csv`` would come back as
        ``slide_id,label`` and the next run fail): refused before any work."""
        read: dict[Path, str] = {}
        for item in inputs:
            if not isinstance(item, CohortSlide) and Path(item).is_file():
                read.setdefault(Path(item).resolve(), f"the slide list {item}")
        for slide in cohort:
            read.setdefault(slide.path.resolve(), f"the slide {slide.path}")
        if isinstance(weights, (str, os.PathLike)) and os.fspath(weights) and Path(weights).is_file():
            read.setdefault(Path(weights).resolve(), f"the weights {weights}")
        written = self.files(cohort)
        scratch = (self.out / PARTIAL_DIR).resolve()  # removed at the end of a run
        for path, what in read.items():
            name = written.get(path) or (PARTIAL_DIR if self.manifest and path.is_relative_to(scratch) else None)
            if name is not None:
                raise InvalidOptionError(
                    f"--out {self.out} would replace {what} (the run writes {name} there): choose another --out"
                )


class _Slides:
    """One rank's work on one slide at a time, with the encoder built once."""

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        model_digest: str,
        digest: str,
        out: Path,
        layout: str,
        overwrite: bool | str,
        extract_kwargs: dict[str, Any],
        progress: bool | None,
    ):
        self.model, self.name, self.model_digest, self.digest = model, name, model_digest, digest
        self.out, self.layout, self.overwrite = out, layout, overwrite
        self.kwargs = {**extract_kwargs, "progress": progress}
        self.last_error: BaseException | None = None

    def paths(self, slide: CohortSlide) -> tuple[Path, Path | None]:
        return _slide_outputs(self.out, self.layout, slide.slide_id)

    def run(self, slide: CohortSlide, earlier_seconds: float | None) -> SlideRecord:
        """The slide's record; a slide's own error is recorded (and kept in ``last_error``), not raised."""
        h5, pt = self.paths(slide)
        started = time.perf_counter()
        record: dict[str, Any] = {
            "slide_id": slide.slide_id,
            "slide": str(slide.path),
            "encoder": self.name,
            "fingerprint": self.digest,
        }
        self.last_error = None
        try:
            patches = None if self.overwrite is True else finished_features(h5, slide.path, self.digest)
            if patches is not None and (pt is None or _derived_after(pt, h5)):
                return SlideRecord(**record, patches=patches, status="done", seconds=earlier_seconds, reused=True)
            if patches is None:
                extract_features(
                    slide.path,
                    self.model,
                    h5,
                    slide_id=slide.slide_id,
                    overwrite=self.overwrite,
                    _encoder_name=self.name,
                    _weights_digest=self.model_digest,
                    **self.kwargs,
                )
                patches = _patch_count(h5)
                if pt is not None:  # stale once its h5 is remade; a refused h5 leaves it as it was
                    pt.unlink(missing_ok=True)
            if pt is not None:
                _write_pt(h5, pt)
        except SLIDE_ERRORS as err:
            self.last_error = err
            error = " ".join(str(err).split())  # one line in the CSV
            return SlideRecord(**record, patches=None, status="failed", seconds=_elapsed(started), error=error)
        return SlideRecord(**record, patches=patches, status="done", seconds=_elapsed(started))


def _derived_after(pt: Path, h5: Path) -> bool:
    """Whether ``pt`` was written from ``h5`` as it is now: a ``.pt`` older than its h5 is stale (a run killed
    between remaking the h5 and removing the old ``.pt``), and is made again from the h5 (no extraction)."""
    try:
        return pt.stat().st_mtime_ns >= h5.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def _elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _patch_count(h5_path: Path) -> int:
    h5py = import_wsi_dependency("h5py")
    with h5py.File(h5_path, "r") as f:
        return int(f["features"].shape[0])


def _write_pt(h5_path: Path, pt_path: Path) -> None:
    """CLAM's ``pt_files/<slide>.pt``: the [N, D] features tensor. Saved through a buffer so the
    archive's inner folder is always ``archive`` (``torch.save`` to a path names it after the file,
    which would make the bytes depend on the temporary file's name)."""
    h5py = import_wsi_dependency("h5py")
    with h5py.File(h5_path, "r") as f:
        features = torch.from_numpy(f["features"][()])
    buffer = io.BytesIO()
    torch.save(features, buffer)
    remove_stale_temporaries(pt_path)
    with atomic_write(pt_path, "wb") as fh:
        fh.write(buffer.getvalue())


# ------------------------------------------------------------------------------------ manifests


def _write_manifest(path: Path, records: Sequence[SlideRecord]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.row() for r in records)
    write_text(path, text.getvalue())


def _earlier_seconds(out: Path, digest: str) -> dict[str, float]:
    """How long each slide finished with these settings took when it was extracted: from the last
    manifest and from partial manifests a killed run left (a damaged one is skipped)."""
    seconds: dict[str, float] = {}
    for path in (out / "manifest.csv", *sorted((out / PARTIAL_DIR).glob("rank-*.csv"))):
        if not path.is_file():
            continue
        try:
            _, rows = read_csv_rows(path, "manifest")
        except DatasetFormatError:
            continue
        for row in rows:
            with contextlib.suppress(ValueError):
                if row.get("status") == "done" and row.get("fingerprint") == digest and row.get("seconds"):
                    seconds[row["slide_id"]] = float(row["seconds"])
    return seconds


def _write_labels(out: Path, cohort: Sequence[CohortSlide]) -> None:
    """``labels.csv`` (``slide_id,label``) beside the features, where training and evaluation look."""
    labelled = [s for s in cohort if s.label is not None]
    if not labelled:
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("slide_id", "label"))
    writer.writerows((s.slide_id, s.label) for s in labelled)
    write_text(out / "labels.csv", text.getvalue())


# ------------------------------------------------------------------------------------- progress


class _Progress:
    """A bar over this rank's slides (slides done, patches per second, and a time left reckoned from
    the bytes still to read: the largest slides come first, so a count of slides would promise too
    soon), or, without a bar, a line per slide for ``log``."""

    def __init__(
        self,
        mine: Sequence[CohortSlide],
        ctx: DistributedContext,
        progress: bool | None,
        log: Callable[[str], None] | None,
    ):
        self.ctx, self.log, self.total = ctx, log, len(mine)
        self.bytes_left = sum(s.size for s in mine)
        self.bytes_done = self.patches = self.count = 0
        self.compute_seconds = 0.0
        self.bar = tqdm(
            total=len(mine),
            desc="slides" + (f" (rank 0 of {ctx.world_size})" if ctx.world_size > 1 else ""),
            unit="slide",
            dynamic_ncols=True,
            bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| [{elapsed}{postfix}]",
            disable=None if progress is None else not progress,
        )

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def done(self, slide: CohortSlide, record: SlideRecord) -> None:
        self.count += 1
        self.bytes_left -= slide.size
        if record.ok and not record.reused and record.seconds:
            self.bytes_done += slide.size
            self.patches += record.patches or 0
            self.compute_seconds += record.seconds
        rate = self.patches / self.compute_seconds if self.compute_seconds else 0.0
        eta = self.bytes_left * self.compute_seconds / self.bytes_done if self.bytes_done else None
        left = tqdm.format_interval(eta) if eta is not None else "?"
        self.bar.set_postfix_str(f"{rate:.1f} patches/s, {left} left", refresh=False)
        self.bar.update(1)
        if self.bar.disable and self.log is not None:
            rank = f"[rank {self.ctx.rank}/{self.ctx.world_size}] " if self.ctx.world_size > 1 else ""
            what = (
                f"failed: {record.error}"
                if not record.ok
                else f"{record.patches} patches, found finished"
                if record.reused
                else f"{record.patches} patches in {record.seconds:.1f} s"
            )
            self.log(f"{rank}{self.count}/{self.total} {record.slide_id}: {what} ({rate:.1f} patches/s, {left} left)")
