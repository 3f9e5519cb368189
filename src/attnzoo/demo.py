"""``attnzoo demo``: every registered pipeline on sample photographs that scikit-image ships.

Uses pretrained weights when they can be had (cache or network) and random weights
otherwise, and says which in its output and in each result file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnzoo._io import atomic_path, atomic_write, check_output_folder, write_json
from attnzoo.errors import InvalidOptionError, MissingDependencyError, WeightsError

#: Photographs scikit-image ships in its wheel, by the names of their loaders in ``skimage.data``.
SAMPLE_IMAGES = {
    "chelsea": "chelsea",
    "coffee": "coffee",
    "astronaut": "astronaut",
    "rocket": "rocket",
    "motorcycle_left": "stereo_motorcycle",  # returns (left, right, disparity)
}


@dataclass
class DemoResult:
    task: str
    model: str
    pretrained: bool
    files: list[Path] = field(default_factory=list)
    note: str = ""


def sample_images(names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Real photographs bundled with scikit-image (no download), as RGB PIL images."""
    from PIL import Image
    from skimage import data

    images = {}
    for name in names or tuple(SAMPLE_IMAGES):
        array = getattr(data, SAMPLE_IMAGES[name])()
        images[name] = Image.fromarray(array[0] if isinstance(array, tuple) else array).convert("RGB")
    return images


@contextlib.contextmanager
def _offline_unless(reachable: bool) -> Iterator[None]:
    """Without a network, look in the caches only, instead of waiting through download retries."""
    saved = os.environ.get("ATTNZOO_OFFLINE")
    if not reachable:
        os.environ["ATTNZOO_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ATTNZOO_OFFLINE", None)
        else:
            os.environ["ATTNZOO_OFFLINE"] = saved


def _build(task: str, model: str | None, log: Callable[[str], None], **kwargs: Any) -> tuple[Any, bool, str]:
    """The task's pipeline with pretrained weights if they can be had, else with random ones."""
    from attnzoo.tasks import get_task, pipeline
    from attnzoo.weights import hub

    model = model or get_task(task).default_model
    saved_offline = hub.is_offline()
    reachable = hub.hub_reachable()
    try:
        with _offline_unless(reachable):
            return pipeline(task, model=model, **kwargs), True, model
    except WeightsError as err:
        reason = str(err)
        if not reachable and not saved_offline:  # the demo switched to the caches itself: say why
            host = urllib.parse.urlsplit(hub.hf_endpoint()).hostname
            reason = reason.replace(hub.OFFLINE_REASON, f"no network to {host}")
        log(f"[{task}] pretrained weights for {model} unavailable: {reason}")
        log(f"[{task}] using RANDOM weights instead: the predictions below are meaningless")
        return pipeline(task, model=model, weights="none", **kwargs), False, model


def demo_image_classification(
    out: Path, model: str | None, log: Callable[[str], None], device: Any = None
) -> DemoResult:
    from attnzoo.viz import plot_classification

    pipe, pretrained, name = _build("image-classification", model, log, device=device)
    images = sample_images()
    predictions = pipe(list(images.values()), top_k=5)
    result = DemoResult("image-classification", name, pretrained)
    summary = {}
    note = "" if pretrained else "random weights: the classes are meaningless"
    for (image_name, image), preds in zip(images.items(), predictions):
        picture = plot_classification(image, preds, title=name, note=note)  # the note in red, as every picture
        path = out / f"{image_name}.png"
        with atomic_write(path, "wb") as fh:
            picture.save(fh, format="PNG")
        result.files.append(path)
        summary[image_name] = [p.to_dict() for p in preds]
        log(f"[image-classification] {image_name}: {preds[0].label} ({preds[0].score:.1%})")
    write_json(out / "results.json", {"model": name, "pretrained": pretrained, "predictions": summary})
    result.files.append(out / "results.json")
    return result


def synthetic_views(n: int = 3, size: int = 137) -> list[Any]:
    """RGBA renderings (transparent background, like ShapeNetRendering) of a voxel table from n azimuths."""
    import numpy as np
    from PIL import Image

    from attnzoo.viz.voxels import render_voxels

    x, y, z = np.mgrid[:32, :32, :32]
    table = ((abs(x - 16) < 12) & (abs(z - 16) < 9) & (abs(y - 22) < 2)) | (
        (abs(abs(x - 16) - 9) < 2) & (abs(abs(z - 16) - 6) < 2) & (y < 21) & (y > 4)
    )
    views = []
    for k in range(n):
        rgb = np.asarray(render_voxels(np.rot90(table, k=k % 4, axes=(0, 2)), size=size))
        alpha = np.where((rgb == 255).all(-1), 0, 255).astype(np.uint8)
        views.append(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    return views


def demo_multiview_reconstruction(
    out: Path, model: str | None, log: Callable[[str], None], device: Any = None
) -> DemoResult:
    pipe, pretrained, name = _build("multiview-3d-reconstruction", model, log, device=device)
    views = synthetic_views(3)
    shape = pipe(views)
    result = DemoResult("multiview-3d-reconstruction", name, pretrained)
    weights_note = "pretrained" if pretrained else "random weights"
    picture = shape.plot(title=f"{name}: 3 views -> 32^3 voxels")  # random weights: plot() adds the red note
    with atomic_write(out / "table.png", "wb") as fh:
        picture.save(fh, format="PNG")
    result.files += [out / "table.png", shape.save(out / "table.obj"), shape.save(out / "table.binvox")]
    write_json(
        out / "results.json",
        {
            "model": name,
            "pretrained": pretrained,
            "occupied_voxels": int(shape.voxels.sum()),
            "threshold": shape.threshold,
        },
    )
    result.files.append(out / "results.json")
    log(
        f"[multiview-3d-reconstruction] 3 synthetic views -> {int(shape.voxels.sum())} occupied voxels ({weights_note})"
    )
    return result


#: The demo slide's ellipses (centre x, centre y, radius x, radius y, colour; level-0 pixels; later ones
#: paint over earlier).
SLIDE_SECTIONS = (
    (4000, 3100, 3600, 2700, (205, 120, 175)),  # the section: ~116 of CLAM's reference patches
    (2900, 3600, 1000, 750, (150, 85, 165)),  # a denser region inside it
    (7800, 400, 150, 110, (190, 110, 170)),  # a speck of debris, too small to count as tissue
)


def synthetic_slide(
    path: Path,
    width: int = 8192,
    height: int = 6144,
    sections: tuple = SLIDE_SECTIONS,
    texture: float = 12.0,
) -> Path:
    """A pyramidal TIFF the size of a small real slide at 40x (0.25 µm/px, Aperio description): a large
    H&E-coloured tissue section with a denser region, and a speck of debris on white, written tile by tile
    (the level-0 image is never in memory). Large enough for the pipeline's default tissue settings
    (CLAM's, which drop regions under 100 reference patches). ``texture``: the colour noise's standard
    deviation (0: flat colours)."""
    import numpy as np

    try:
        import tifffile
    except ImportError:
        raise MissingDependencyError(
            "the synthetic slide is a pyramidal TIFF, which needs tifffile: pip install 'attnzoo[wsi]'"
        ) from None

    tile = 256

    def tiles(ds: int):
        for ty in range(0, -(-height // ds), tile):
            for tx in range(0, -(-width // ds), tile):
                rng = np.random.default_rng(ty * 131 + tx + ds)
                y, x = np.ogrid[ty : ty + tile, tx : tx + tile]
                block = np.full((tile, tile, 3), 255, np.uint8)
                for cx, cy, rx, ry, colour in sections:
                    inside = ((x * ds - cx) / rx) ** 2 + ((y * ds - cy) / ry) ** 2 < 1
                    if texture:
                        noisy = np.clip(np.array(colour) + rng.normal(0, texture, (int(inside.sum()), 3)), 0, 255)
                        block[inside] = noisy.astype(np.uint8)
                    else:
                        block[inside] = colour
                yield block

    description = f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) RAW|MPP = 0.25|AppMag = 40"
    with atomic_path(path) as partial, tifffile.TiffWriter(partial) as tw:  # tifffile needs a named file
        for ds in (1, 4, 16, 64):
            tw.write(
                tiles(ds),
                shape=(-(-height // ds), -(-width // ds), 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb",
                description=description if ds == 1 else None,
                resolution=(4e4 / ds, 4e4 / ds),
                resolutionunit="CENTIMETER",
                subfiletype=0 if ds == 1 else 1,
                metadata=None,
            )
    return path


def demo_wsi_classification(out: Path, model: str | None, log: Callable[[str], None], device: Any = None) -> DemoResult:
    """ACMIL on a synthetic slide with the pipeline's default tiling and tissue settings (ACMIL's recipe);
    with random weights the patch encoder is random too (no download)."""
    pipe, pretrained, name = _build(
        "wsi-classification", model, log, device=device, feature_dir=out / "features", labels=["normal", "tumour"]
    )
    slide = synthetic_slide(out / "synthetic_slide.tif")
    result = pipe(slide)
    weights_note = "pretrained" if pretrained else "random weights"
    with atomic_write(out / "heatmap.png", "wb") as fh:
        result.heatmap(size=768).save(fh, format="PNG")
    # the slide beside results.json, by name: ``out`` is the demo's staging folder, renamed when it is done
    write_json(out / "results.json", {"model": name, "pretrained": pretrained, **result.to_dict(), "slide": slide.name})
    log(
        f"[wsi-classification] synthetic slide: {result.label} ({result.probabilities.max():.1%}, {weights_note}), "
        f"{len(result.attention)} patches"
    )
    return DemoResult("wsi-classification", name, pretrained, [slide, out / "heatmap.png", out / "results.json"])


def synthetic_shelf(rows: int = 3, cols: int = 9, cell: tuple[int, int] = (60, 90), seed: int = 0) -> tuple[Any, Any]:
    """A shelf of coloured packages (one per grid cell, reading order) and their boxes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = cell
    image = np.full((rows * h + 20, cols * w + 20, 3), 235, np.uint8)
    boxes = []
    for r in range(rows):
        for c in range(cols):
            x0, y0 = 10 + c * w + 6, 10 + r * h + 6
            image[y0 : y0 + h - 12, x0 : x0 + w - 12] = rng.integers(30, 225, 3)
            image[y0 + (h - 12) // 3 : y0 + (h - 12) // 3 + 8, x0 + 4 : x0 + w - 16] = 255  # a label stripe
            boxes.append((x0, y0, x0 + w - 12, y0 + h - 12))
    return Image.fromarray(image), np.array(boxes, dtype=float)


def demo_scanpath(out: Path, model: str | None, log: Callable[[str], None], device: Any = None) -> DemoResult:
    """NevaClip on two photographs with captions (the paper's settings when CLIP RN50 can be loaded,
    a short search otherwise), and OAT searching a synthetic shelf (random weights: none were released)."""
    import attnzoo

    images = sample_images(("astronaut", "coffee"))
    captions = {"astronaut": "an astronaut in a white suit holding a helmet", "coffee": "a cup of coffee on a saucer"}
    pipe, pretrained, name = _build("scanpath", model, log, device=device, batch_size=2)
    settings: dict[str, Any] = {}
    if not pretrained:  # a random RN50 gives meaningless (but runnable) scanpaths: keep the search short
        settings = {"fixations": 4, "iterations": 3}
        log("[scanpath] NevaClip with the random CLIP runs a short search (4 fixations x 3 iterations)")
    result = DemoResult("scanpath", name, pretrained)
    summary: dict[str, Any] = {}
    paths = pipe(list(images.values()), caption=[captions[k] for k in images], **settings)
    for (image_name, image), sp in zip(images.items(), paths):
        path = out / f"{image_name}_scanpath.png"
        with atomic_write(path, "wb") as fh:
            sp.plot(image, title=f"NevaClip: \u201c{sp.caption}\u201d").save(fh, format="PNG")  # random: a red note
        result.files.append(path)
        summary[image_name] = sp.to_dict()
        log(f"[scanpath] {image_name}: {len(sp)} fixations, first at ({sp.xy[0, 0]:.0f}, {sp.xy[0, 1]:.0f})")

    shelf, boxes = synthetic_shelf()
    oat = attnzoo.pipeline("scanpath", model="oat_yogurt", weights="none", device=device, max_len=12)
    search = oat(shelf, boxes=boxes, target=13)
    with atomic_write(out / "shelf_search.png", "wb") as fh:
        search.plot(shelf, title="OAT (no weights were released)").save(fh, format="PNG")  # the legend names the target
    result.files.append(out / "shelf_search.png")
    summary["shelf"] = search.to_dict()
    log(
        f"[scanpath] shelf: OAT (random weights) looked at {search.objects.tolist()}, found the target: {search.found_target}"
    )
    write_json(out / "results.json", {"model": name, "pretrained": pretrained, "scanpaths": summary})
    result.files.append(out / "results.json")
    return result


def demo_subject_insertion(out: Path, model: str | None, log: Callable[[str], None], device: Any = None) -> DemoResult:
    """In-Context Brush on two photographs with the tiny RANDOM FLUX.1-Fill configuration (the real model is
    about 34 GB): the pipeline, the diptych and the attention edit run for real, the pixels it paints are noise."""
    import numpy as np

    import attnzoo

    log("[subject-insertion] FLUX.1-Fill-dev is about 34 GB: the demo runs a tiny RANDOM FLUX (its result is noise)")
    images = sample_images(("astronaut", "coffee"))
    target, subject = images["astronaut"], images["coffee"]
    mask = np.zeros((target.height, target.width), bool)
    mask[300:480, 40:220] = True  # the table in the lower left
    pipe = attnzoo.pipeline("subject-insertion", weights="none", device=device, panel_size=64, steps=4)
    result = pipe(target, subject=subject, mask=mask, prompt="a cup of coffee on the table", seed=0)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "insertion.png", "wb") as fh:
        result.plot().save(fh, format="PNG")
    files = [out / "insertion.png", *result.write_files(out, "astronaut")]
    write_json(out / "results.json", {"model": "flux_fill (tiny, random)", "pretrained": False, **result.to_dict()})
    log(f"[subject-insertion] astronaut + coffee: {result.summary()} (tiny random FLUX)")
    return DemoResult("subject-insertion", "flux_fill", False, [*files, out / "results.json"])


def demo_hallucination_mitigation(
    out: Path, model: str | None, log: Callable[[str], None], device: Any = None
) -> DemoResult:
    """VAR on a photograph with the tiny RANDOM LLaVA-1.5 (the real model is about 14 GB): the prompt
    template, the attention edit and the attention picture run for real, the answers are gibberish."""
    import attnzoo

    log(
        "[hallucination-mitigation] LLaVA-1.5-7B is about 14 GB: the demo runs a tiny RANDOM LLaVA "
        "(its answers are gibberish), with VAR on made-up sink dimensions 3, 7 and tau 2"
    )
    image = sample_images(("chelsea",))["chelsea"]
    question = "Is there a cat in the image?"
    pipe = attnzoo.pipeline("hallucination-mitigation", weights="none", device=device, max_new_tokens=8)
    result = pipe(image, question=question, method="var", sink_dims=(3, 7), tau=2.0, return_attention=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "chelsea.png", "wb") as fh:
        result.plot().save(fh, format="PNG")
    write_json(out / "results.json", {"model": "tiny random LLaVA-1.5", "pretrained": False, **result.to_dict()})
    log(f"[hallucination-mitigation] chelsea: {result.summary()} (tiny random LLaVA)")
    return DemoResult(
        "hallucination-mitigation", "llava-hf/llava-1.5-7b-hf", False, [out / "chelsea.png", out / "results.json"]
    )


DEMOS: dict[str, Callable[..., DemoResult]] = {
    "hallucination-mitigation": demo_hallucination_mitigation,
    "subject-insertion": demo_subject_insertion,
    "scanpath": demo_scanpath,
    "wsi-classification": demo_wsi_classification,
    "image-classification": demo_image_classification,
    "multiview-3d-reconstruction": demo_multiview_reconstruction,
}


def run_demo(
    out_dir: str | Path = "attnzoo-demo", *, device: Any = None, log: Callable[[str], None] = print
) -> list[DemoResult]:
    """Run the demo of every registered task that has one; results land in ``out_dir/<task>/``.

    Everything is written into a staging folder first and put in place at the end, so a failed run
    leaves no half-written ``out_dir``; a task whose optional package is missing is skipped with a
    one-line reason.
    """
    from attnzoo._placement import resolve_device
    from attnzoo.tasks import list_tasks

    if device is not None:  # a device that is not here (cuda without CUDA) is refused before any demo runs
        resolve_device(device)
    out = Path(out_dir).absolute()
    _refuse_unless_replaceable(out)
    log(f"attnzoo demo: writing results and pictures to {out}/")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    results, skipped = [], {}
    try:
        for task in list_tasks():
            demo = DEMOS.get(task)
            if demo is None:
                log(f"[{task}] no demo yet")
                continue
            try:
                result = demo(staging / task, None, log, device=device)
                listed = set(result.files)  # the index lists every file, so a rerun knows what it may replace
                result.files += [f for f in _files_under(staging / task) if f not in listed]
                results.append(result)
            except MissingDependencyError as err:
                skipped[task] = str(err)
                log(f"[{task}] skipped: {err}")
                shutil.rmtree(staging / task, ignore_errors=True)
        index = [
            {
                "task": r.task,
                "model": r.model,
                "pretrained": r.pretrained,
                "files": [str(out / f.relative_to(staging)) for f in r.files],
            }
            for r in results
        ] + [{"task": task, "skipped": reason} for task, reason in skipped.items()]
        write_json(staging / "index.json", index)
        _replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for r in results:
        r.files = [out / f.relative_to(staging) for f in r.files]
    log(f"wrote {sum(len(r.files) for r in results) + 1} files to {out}/ (see {out / 'index.json'})")
    return results


def _files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, symbolic links included (not followed), sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [Path(root) / name for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]]
    return sorted(found)


def _demo_index(path: Path) -> tuple[set[str], set[str]] | None:
    """The tasks with a folder and the files (relative to the demo's folder) of the index ``run_demo``
    writes at ``path``; None when the file is not such an index."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(index, list):
        return None
    tasks: set[str] = set()
    files: set[str] = set()
    for entry in index:
        if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
            return None
        if set(entry) == {"task", "skipped"}:
            continue
        written = entry.get("files")
        if set(entry) != {"task", "model", "pretrained", "files"} or not isinstance(written, list):
            return None
        if not all(isinstance(f, str) for f in written):
            return None
        tasks.add(entry["task"])
        for file in map(Path, written):  # absolute, under the folder it was written to: it may have moved since
            folder = next((p for p in file.parents if p.name == entry["task"]), None)
            if folder is not None:
                files.add((Path(entry["task"]) / file.relative_to(folder)).as_posix())
    return tasks, files


def _refuse_unless_replaceable(out: Path) -> None:
    """``out`` is replaced whole: only a missing or empty folder, or an earlier demo's folder holding
    nothing but what its index lists, may be; anything else of the user's is refused, never deleted."""
    check_output_folder(out)  # a file, or under one: refused as by every command
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    index = _demo_index(out / "index.json")
    if index is None:
        what = "an index.json that no attnzoo demo wrote" if "index.json" in entries else "no index.json"
        raise InvalidOptionError(
            f"--out {out} holds other files ({_some(entries)}) and {what}; it is not an earlier attnzoo demo's "
            "folder: choose another folder"
        )
    tasks, listed = index
    folders = [
        out / name for name in entries if name in tasks and (out / name).is_dir() and not (out / name).is_symlink()
    ]
    foreign = [name for name in entries if name != "index.json" and out / name not in folders]
    foreign += [
        rel for folder in folders for f in _files_under(folder) if (rel := f.relative_to(out).as_posix()) not in listed
    ]
    if foreign:
        raise InvalidOptionError(
            f"--out {out} holds files the earlier attnzoo demo there did not write ({_some(foreign)}; its "
            "index.json does not list them): choose another folder (an older attnzoo's demo folder lists fewer files: "
            "delete it if nothing of yours is in it)"
        )


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _replace_folder(new: Path, old: Path) -> None:
    """Put ``new`` where ``old`` is, in two renames; an earlier demo's folder is removed only after,
    checked again (the user may have added a file while the demo ran)."""
    _refuse_unless_replaceable(old)
    previous = old.parent / f".{old.name}.old-{os.getpid()}"
    if old.exists():
        old.rename(previous)
    new.rename(old)
    shutil.rmtree(previous, ignore_errors=True)


__all__ = ["DEMOS", "DemoResult", "run_demo", "sample_images"]
