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
