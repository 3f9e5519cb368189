"""Synthetic whole-slide images for tests: small pyramidal tiled TIFFs that OpenSlide opens.

``write_slide`` draws tissue-like blobs (pink/purple ellipses with a little texture) on a white
background and writes level 0 plus 4x and 16x subresolution levels as tiled, deflate-compressed
IFDs. ``aperio=True`` adds an Aperio ImageDescription (OpenSlide then reports vendor ``aperio``,
``openslide.mpp-x`` and ``openslide.objective-power``); without it OpenSlide reads the file as a
generic TIFF and takes the µm/px from the resolution tags.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: Tissue segmentation for these slides: they are far smaller than CLAM's 100-reference-patch minimum region.
SEG = {"a_t": 1, "a_h": 1}

#: (centre x, centre y, radius x, radius y, RGB) of each blob on the default 2048x1536 slide.
BLOBS = (
    (600, 500, 420, 330, (205, 120, 175)),
    (1500, 1050, 360, 300, (150, 85, 165)),
)


def slide_image(width: int = 2048, height: int = 1536, blobs=BLOBS, seed: int = 0) -> np.ndarray:
    """Level-0 pixels: white background, textured coloured ellipses."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 255, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for cx, cy, rx, ry, colour in blobs:
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0
        texture = rng.integers(-25, 26, size=(int(inside.sum()), 3))
        image[inside] = np.clip(np.asarray(colour) + texture, 0, 255).astype(np.uint8)
    return image


def tissue_truth(width: int = 2048, height: int = 1536, blobs=BLOBS) -> np.ndarray:
    """The boolean level-0 tissue map the blobs make."""
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.zeros((height, width), bool)
    for cx, cy, rx, ry, _ in blobs:
        out |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0
    return out


def write_slide(
    path: Path,
    image: np.ndarray | None = None,
    *,
    mpp: float = 0.25,
    objective_power: int | None = 40,
    aperio: bool = True,
    downsamples: tuple[int, ...] = (4, 16),
    tile: int = 256,
) -> Path:
    """Write ``image`` (default :func:`slide_image`) as a pyramidal tiled TIFF at ``mpp`` µm/px."""
    import tifffile

    image = slide_image() if image is None else image
    height, width = image.shape[:2]
    description = None
    if aperio:
        description = (
            f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) RAW"
            f"|MPP = {mpp}" + (f"|AppMag = {objective_power}" if objective_power else "")
        )
    resolution = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            image,
            tile=(tile, tile),
            compression="zlib",
            photometric="rgb",
            description=description,
            resolution=resolution,
            resolutionunit="CENTIMETER",
            metadata=None,
        )
        for ds in downsamples:
            level = np.ascontiguousarray(image[::ds, ::ds])
            tw.write(
                level,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb",
                resolution=(resolution[0] / ds, resolution[1] / ds),
                resolutionunit="CENTIMETER",
                metadata=None,
                subfiletype=1,
            )
    return path


def write_section_slide(
    path: Path,
    width: int = 8192,
    height: int = 6144,
    sections=((3900, 3000, 3500, 2600, (205, 120, 175)), (7600, 600, 250, 200, (150, 85, 165))),
) -> Path:
    """A slide the size of a small real one at 40x (0.25 µm/px, Aperio description): flat H&E-coloured
    ellipses (by default a tissue section larger than CLAM's 100 reference patches, and a speck of
    debris smaller), written tile by tile by the demo's writer."""
    from attnzoo.demo import synthetic_slide

    return synthetic_slide(path, width, height, sections=sections, texture=0)


class TinyEncoder(torch.nn.Module):
    """A fast, deterministic stand-in for a patch encoder: [B, 3, H, W] -> [B, 8]."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.calls, self.rows, self.fail_after = 0, 0, fail_after

    def forward(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.rows += x.shape[0]
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def write_test_slides(root: Path) -> dict[str, Path]:
    """The slides the WSI tests share: an Aperio .svs, a generic TIFF at 0.5 µm/px, a blank slide and a plain PNG."""
    from PIL import Image

    blank = np.full((768, 1024, 3), 255, np.uint8)
    out = {
        "aperio": write_slide(root / "aperio_slide.svs"),
        "generic": write_slide(root / "generic.tif", aperio=False, mpp=0.5),
        "blank": write_slide(root / "blank.tif", blank, downsamples=(4,)),
    }
    Image.fromarray(slide_image(1024, 768, blobs=((500, 380, 330, 260, (200, 110, 170)),))).save(root / "plain.png")
    out["png"] = root / "plain.png"
    return out


#: Tissue segmentation for the cohort slides (smaller still than the default slide).
COHORT_SEG = {"a_t": 0.1, "a_h": 0.1}
#: (width, height) of each cohort slide: different sizes, so sharding by size has something to balance.
COHORT_SIZES = ((1536, 1024), (1024, 768), (1280, 1024), (768, 768), (1024, 1024))


def write_cohort(root: Path, sizes=COHORT_SIZES, corrupt: str | None = "corrupt.tif") -> list[Path]:
    """A small cohort: pyramidal slides ``s0.tif, s1.tif, ...`` of ``sizes``, each with two tissue blobs
    (tissue under :data:`COHORT_SEG`), plus ``corrupt`` (a truncated copy of the first, which no reader opens)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        blobs = (
            (w // 3, h // 2, w // 5, h // 4, (205, 120, 175)),
            (2 * w // 3, h // 2, w // 6, h // 5, (150, 85, 165)),
        )
        paths.append(write_slide(root / f"s{i}.tif", slide_image(w, h, blobs=blobs, seed=i)))
    if corrupt is not None:
        data = paths[0].read_bytes()
        (root / corrupt).write_bytes(data[: len(data) // 3])
        paths.append(root / corrupt)
    return paths
