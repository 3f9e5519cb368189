"""Decode any image a user may hand us into an RGB ``PIL.Image``, or say clearly why not.

Handles paths, PIL images, numpy arrays and tensors; EXIF rotation; grayscale, palette,
CMYK, alpha (composited on white) and 16-bit images (scaled, not clipped); and guards
against decompression bombs: oversized JPEGs are decoded at reduced scale by the codec,
other oversized formats are refused before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from attnzoo.errors import InvalidInputError

#: Largest image (in pixels) decoded at full size; PIL's own bomb limit is 2x its warning level.
MAX_PIXELS = int(os.environ.get("ATTNZOO_MAX_IMAGE_PIXELS", 2 * 89_478_485))

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def describe(source: Any) -> str:
    """A short name for an input, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    shape = getattr(source, "shape", None) or getattr(source, "size", None)
    return f"<{type(source).__name__} {tuple(shape) if shape is not None else ''}>".replace(" >", ">")


@contextlib.contextmanager
def without_pil_bomb_check():
    """We apply our own pixel limit after reading the header, so PIL must not refuse first."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image_file(path: str | os.PathLike, *, max_pixels: int | None = None, keep_alpha: bool = False) -> Image.Image:
    """Open and fully decode an image file as RGB (RGBA with ``keep_alpha`` when it has transparency) within the pixel budget."""
    name = os.fspath(path)
    limit = max_pixels or MAX_PIXELS
    try:
        with without_pil_bomb_check():
            image = Image.open(path)
            width, height = image.size
            if width * height > limit:
                if image.format != "JPEG":
                    raise InvalidInputError(
                        f"{name}: {width}x{height} image exceeds the {limit:,}-pixel decode limit; "
                        "downscale it first or raise attnzoo.datasets.images.MAX_PIXELS"
                    )
                scale = next((s for s in (2, 4, 8) if math.ceil(width / s) * math.ceil(height / s) <= limit), None)
                if scale is None:
                    raise InvalidInputError(f"{name}: {width}x{height} JPEG is too large even at 1/8 scale")
                image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
            image.load()
    except InvalidInputError:
        raise
    except FileNotFoundError:
        raise InvalidInputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{name}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise InvalidInputError(f"{name}: not an image format PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidInputError(f"{name}: truncated or corrupt image ({err})") from None
    image = ImageOps.exif_transpose(image)
    return to_rgb(image, name=name, keep_alpha=keep_alpha)


def to_rgb(image: Image.Image, *, name: str = "<image>", keep_alpha: bool = False) -> Image.Image:
    """RGB; transparent images are composited on white, or kept as RGBA with ``keep_alpha``."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):  # 16/32-bit integer grayscale: scale, don't clip to white
        data = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if data.max(initial=0) <= 65535 else float(data.max())
        return Image.fromarray(np.clip(np.round(data / peak * 255.0), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        return _float_to_rgb(np.asarray(image, dtype=np.float32), name)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if keep_alpha:
            return rgba
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise InvalidInputError(f"{name}: cannot convert {mode} image to RGB ({err})") from None


def _float_to_rgb(data: np.ndarray, name: str) -> Image.Image:
    if not np.isfinite(data).all():
        raise InvalidInputError(f"{name}: image holds NaN or infinite values")
    low, high = float(data.min(initial=0.0)), float(data.max(initial=0.0))
    if low < -1e-3 or high > 1 + 1e-3:
        raise InvalidInputError(f"{name}: float image values must lie in [0, 1], found [{low:.3g}, {high:.3g}]")
    return array_to_image((np.clip(data, 0, 1) * 255.0 + 0.5).astype(np.uint8), name=name)


def array_to_image(
    array: np.ndarray, *, name: str = "<array>", channels_first: bool = False, keep_alpha: bool = False
) -> Image.Image:
    """HxW, HxWxC (or CxHxW with ``channels_first``) arrays of uint8/uint16/bool/float in [0, 1]."""
    if array.ndim == 3 and channels_first:
        array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        layout = "CxHxW" if channels_first else "HxWxC"
        raise InvalidInputError(
            f"{name}: expected an HxW or {layout} image with 1, 3 or 4 channels, got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"{name}: empty image of shape {array.shape}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        return _float_to_rgb(array.astype(np.float32), name)
    elif array.dtype != np.uint8:
        raise InvalidInputError(f"{name}: unsupported dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1]")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)), name=name, keep_alpha=keep_alpha)


def load_image(source: Any, *, max_pixels: int | None = None, keep_alpha: bool = False) -> Image.Image:
    """An RGB image from a path, PIL image, numpy array (HxWxC) or tensor (CxHxW); with
    ``keep_alpha`` an image with transparency comes back as RGBA (e.g. ShapeNet renderings)."""
    if isinstance(source, (str, Path, os.PathLike)):
        return open_image_file(source, max_pixels=max_pixels, keep_alpha=keep_alpha)
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source), name=describe(source), keep_alpha=keep_alpha)
    if isinstance(source, np.ndarray):
        return array_to_image(source, name=describe(source), keep_alpha=keep_alpha)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(source, torch.Tensor):
        tensor = source.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()  # bfloat16 has no numpy dtype; float16 is widened alike
        return array_to_image(tensor.numpy(), name=describe(source), channels_first=True, keep_alpha=keep_alpha)
    raise InvalidInputError(
        f"cannot read an image from {type(source).__name__}; pass a file path, PIL image, numpy array or tensor"
    )
