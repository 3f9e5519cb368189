"""``attnzoo demo``: every registered pipeline on sample photographs that scikit-image ships.

Uses pretrained weights when they can be had (cache or network) and random weights
otherwise, and says which in its output and in each result file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnzoo._io import atomic_path, atomic_write, write_json
from attnzoo.errors import WeightsError

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
    reachable = hub.hub_reachable()
    try:
        with _offline_unless(reachable):
            return pipeline(task, model=model, **kwargs), True, model
    except WeightsError as err:
        reason = err if reachable or hub.is_offline() else "no network to the Hugging Face Hub and not in its cache"
        log(f"[{task}] pretrained weights for {model} unavailable ({reason})")
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
    weights_note = "pretrained" if pretrained else "random weights"
    for (image_name, image), preds in zip(images.items(), predictions):
        picture = plot_classification(image, preds, title=f"{name} ({weights_note})")
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
    picture = shape.plot(title=f"{name} ({weights_note}): 3 views -> 32^3 voxels")
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


def synthetic_slide(path: Path, size: int = 3072) -> Path:
    """A small pyramidal TIFF (0.25 µm/px, Aperio-style description) with H&E-coloured blobs on white."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    image = np.full((size, size, 3), 255, np.uint8)
    y, x = np.mgrid[:size, :size]
    for cx, cy, r, colour in (
        (0.3, 0.35, 0.18, (205, 120, 175)),
        (0.68, 0.62, 0.2, (150, 85, 165)),
        (0.35, 0.75, 0.1, (190, 110, 170)),
    ):
        inside = (x - cx * size) ** 2 + (y - cy * size) ** 2 < (r * size) ** 2
        image[inside] = np.clip(np.array(colour) + rng.normal(0, 12, (int(inside.sum()), 3)), 0, 255).astype(np.uint8)
    description = (
        f"Aperio Image Library v12.0.0\r\n{size}x{size} [0,0 {size}x{size}] (256x256) RAW|MPP = 0.25|AppMag = 40"
    )
    with atomic_path(path) as partial, tifffile.TiffWriter(partial) as tw:  # tifffile needs a named file
        tw.write(
            image,
            tile=(256, 256),
            compression="zlib",
            photometric="rgb",
            description=description,
            resolution=(4e4, 4e4),
            resolutionunit="CENTIMETER",
            metadata=None,
        )
        for ds in (4, 16):
            tw.write(
                np.ascontiguousarray(image[::ds, ::ds]),
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                subfiletype=1,
                metadata=None,
            )
    return path


def demo_wsi_classification(out: Path, model: str | None, log: Callable[[str], None], device: Any = None) -> DemoResult:
    from attnzoo.weights import hub

    encoder_weights = None if hub.hub_reachable() else "none"
    if encoder_weights == "none":
        log(
            "[wsi-classification] ResNet18 ImageNet weights unavailable offline: the patch encoder uses RANDOM weights too"
        )
    pipe, pretrained, name = _build(
        "wsi-classification",
        model,
        log,
        device=device,
        encoder_weights=encoder_weights,
        feature_dir=out / "features",
        labels=["normal", "tumour"],
        segment_kwargs={"a_t": 1},
    )
    slide = synthetic_slide(out / "synthetic_slide.tif")
    result = pipe(slide)
    weights_note = "pretrained" if pretrained else "random weights"
    with atomic_write(out / "heatmap.png", "wb") as fh:
        result.heatmap(size=768).save(fh, format="PNG")
    write_json(out / "results.json", {"model": name, "pretrained": pretrained, **result.to_dict()})
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
    try:
        pipe, pretrained, name = _build("scanpath", model, log, device=device, batch_size=2)
    except ImportError as err:
        log(f"[scanpath] open_clip is not installed ({err}); pip install 'attnzoo[multimodal]'")
        return DemoResult("scanpath", "nevaclip", False, note="open_clip missing")
    settings: dict[str, Any] = {}
    if not pretrained:  # a random RN50 gives meaningless (but runnable) scanpaths: keep the search short
        settings = {"fixations": 4, "iterations": 3}
        log("[scanpath] NevaClip with the random CLIP runs a short search (4 fixations x 3 iterations)")
    weights_note = "pretrained CLIP RN50" if pretrained else "random CLIP"
    result = DemoResult("scanpath", name, pretrained)
    summary: dict[str, Any] = {}
    paths = pipe(list(images.values()), caption=[captions[k] for k in images], **settings)
    for (image_name, image), sp in zip(images.items(), paths):
        path = out / f"{image_name}_scanpath.png"
        with atomic_write(path, "wb") as fh:
            sp.plot(image, title=f"NevaClip ({weights_note}): \u201c{sp.caption}\u201d").save(fh, format="PNG")
        result.files.append(path)
        summary[image_name] = sp.to_dict()
        log(f"[scanpath] {image_name}: {len(sp)} fixations, first at ({sp.xy[0, 0]:.0f}, {sp.xy[0, 1]:.0f})")

    shelf, boxes = synthetic_shelf()
    oat = attnzoo.pipeline("scanpath", model="oat_yogurt", weights="none", device=device, max_len=12)
    search = oat(shelf, boxes=boxes, target=13)
    with atomic_write(out / "shelf_search.png", "wb") as fh:
        search.plot(shelf, title="OAT (random weights: no weights were released), target in green").save(
            fh, format="PNG"
        )
    result.files.append(out / "shelf_search.png")
    summary["shelf"] = search.to_dict()
    log(
        f"[scanpath] shelf: OAT (random weights) looked at {search.objects.tolist()}, found the target: {search.found_target}"
    )
    write_json(out / "results.json", {"model": name, "pretrained": pretrained, "scanpaths": summary})
    result.files.append(out / "results.json")
    return result


DEMOS: dict[str, Callable[..., DemoResult]] = {
    "scanpath": demo_scanpath,
    "wsi-classification": demo_wsi_classification,
    "image-classification": demo_image_classification,
    "multiview-3d-reconstruction": demo_multiview_reconstruction,
}


def run_demo(
    out_dir: str | Path = "attnzoo-demo", *, device: Any = None, log: Callable[[str], None] = print
) -> list[DemoResult]:
    """Run the demo of every registered task that has one; results land in ``out_dir/<task>/``."""
    from attnzoo.tasks import list_tasks

    out = Path(out_dir)
    results = []
    for task in list_tasks():
        demo = DEMOS.get(task)
        if demo is None:
            log(f"[{task}] no demo yet")
            continue
        results.append(demo(out / task, None, log, device=device))
    index = [
        {"task": r.task, "model": r.model, "pretrained": r.pretrained, "files": [str(f) for f in r.files]}
        for r in results
    ]
    write_json(out / "index.json", index)
    log(f"wrote {sum(len(r.files) for r in results)} files to {out}/ (see {out / 'index.json'})")
    return results


__all__ = ["DEMOS", "DemoResult", "run_demo", "sample_images"]
