"""Decode any image a user may hand us into an RGB ``PIL.Image``, or say clearly why not.

Handles paths, http(s) URLs, binary file objects, PIL images, numpy arrays and tensors; EXIF rotation; grayscale,
palette, CMYK, alpha (composited on white) and 16-bit images (scaled, not clipped); and guards
against decompression bombs: an image whose header claims more than the pixel limit is refused
before any pixel is decoded, whatever its format.

EXIF orientation, one rule:

* a user's image (a path, URL or PIL image given to a pipeline) is turned upright, as a photo
  viewer shows it: a phone photo stored sideways is seen the right way up;
* a dataset's image (a :class:`DatasetImagePath`, which every dataset reader hands out) is used
  as stored. Published fixations, clicks and boxes were recorded on the stored pixels (MATLAB's
  ``imread`` does not rotate), and timm/torchvision's ImageNet evaluation does not rotate either, so
  published accuracies are on stored pixels. A reader's image size (its header's) and the image a
  pipeline decodes from that path are therefore in the same frame.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PosixPath, WindowsPath
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from attnzoo._io import PARSE_ERRORS, check_regular_file
from attnzoo._values import env_seconds, env_whole_number, to_numpy
from attnzoo.errors import AttnzooError, InvalidInputError

#: Largest image (in pixels) decoded, unless ``ATTNZOO_MAX_IMAGE_PIXELS`` says otherwise (read at each use);
#: PIL's own bomb limit is 2x its warning level.
MAX_PIXELS = 2 * 89_478_485
#: Largest image file (bytes) fetched from an http(s) URL, unless ``ATTNZOO_MAX_IMAGE_BYTES`` says otherwise.
MAX_DOWNLOAD_BYTES = 64 << 20
#: Seconds an http(s) image may take to connect, and between two pieces of its data, unless
#: ``ATTNZOO_URL_TIMEOUT`` says otherwise.
URL_TIMEOUT = 10.0

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

#: What PIL's plugins raise on damaged files besides the parse errors every parser raises.
_PIL_DAMAGE: tuple[type[BaseException], ...] = (
    *PARSE_ERRORS,
    Image.DecompressionBombError,
    KeyError,
    IndexError,
    TypeError,
    ZeroDivisionError,
)


def describe(source: Any) -> str:
    """A short name for an input, for error messages (a file object: its file's name, if it has one)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, FileContents):  # named as the file it was read from
        return f"<{source.kind} {source.name}>" if source.name else f"<{source.kind}>"
    if is_file_object(source):
        name = getattr(source, "name", None)
        return f"<{type(source).__name__} {name}>" if isinstance(name, str) and name else f"<{type(source).__name__}>"
    shape = getattr(source, "shape", None)
    if shape is None:
        shape = getattr(source, "size", None)  # PIL's (width, height)
    text = str(tuple(shape)) if isinstance(shape, (tuple, list)) else ""  # numpy/torch shapes, PIL sizes
    return f"<{type(source).__name__} {text}>".replace(" >", ">")


def max_image_pixels() -> int:
    """The pixel limit images are decoded within: ``ATTNZOO_MAX_IMAGE_PIXELS`` where set, else :data:`MAX_PIXELS`."""
    return env_whole_number("ATTNZOO_MAX_IMAGE_PIXELS", MAX_PIXELS)


_bomb_lock = threading.Lock()
_bomb_users = 0
_bomb_saved: int | None = None


@contextlib.contextmanager
def without_pil_bomb_check() -> Iterator[None]:
    """We apply our own pixel limit after reading the header, so PIL must not refuse first. PIL's
    limit is a global: it is restored when the last thread using this leaves, not before."""
    global _bomb_users, _bomb_saved
    with _bomb_lock:
        if _bomb_users == 0:
            _bomb_saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _bomb_users += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_users -= 1
            if _bomb_users == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


def check_image_size(
    size: tuple[int, int], name: str, *, max_pixels: int | None = None, error: type[AttnzooError] = InvalidInputError
) -> None:
    """Refuse an image whose (header's) size exceeds the pixel limit, before anything is decoded."""
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    width, height = size
    if width * height > limit:
        raise error(
            f"{name}: {width}x{height} image exceeds the {limit:,}-pixel limit (read from its header: nothing was "
            "decoded); downscale it first, or raise the limit with max_pixels= or ATTNZOO_MAX_IMAGE_PIXELS"
        )


@contextlib.contextmanager
def opened_image(
    source: str | os.PathLike | IO[bytes],
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    error: type[AttnzooError] = InvalidInputError,
    what: str = "image",
    missing: str = "no such file",
) -> Iterator[Image.Image]:
    """The image in ``source`` (a path or binary file), opened after its header's size passed
    :func:`check_image_size`. Every image file a reader decodes comes through here, so whatever PIL
    raises on a damaged file -- while opening or while the caller decodes in the block -- becomes
    ``error`` naming the file."""
    name = name or os.fspath(source)  # type: ignore[arg-type]
    if isinstance(source, (str, os.PathLike)):  # a FIFO would block PIL's open forever, a device never end
        check_regular_file(source, f"{'an' if what[0] in 'aeiou' else 'a'} {what} file", error=error)
    try:
        with without_pil_bomb_check(), Image.open(source) as image:
            check_image_size(image.size, name, max_pixels=max_pixels, error=error)
            yield image
    except AttnzooError:
        raise
    except FileNotFoundError:
        raise error(f"{name}: {missing}") from None
    except IsADirectoryError:
        raise error(f"{name}: is a directory, not {'an' if what[0] in 'aeiou' else 'a'} {what}") from None
    except UnidentifiedImageError:
        raise error(f"{name}: not an image format PIL can read") from None
    except _PIL_DAMAGE as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise error(f"{name}: truncated or corrupt {what} ({reason})") from None


if sys.platform == "win32":
    _NativePath = WindowsPath
else:
    _NativePath = PosixPath


class DatasetImagePath(_NativePath):
    """A dataset's image file: decoded as stored, EXIF orientation not applied, since the dataset's
    annotations (and its image size) are in the stored pixels' frame. A plain ``Path`` otherwise:
    equal to, and hashed as, the same ``Path``; ``/`` and ``.parent`` keep the type."""


def dataset_image_path(path: str | os.PathLike) -> DatasetImagePath:
    """``path`` marked as a dataset's image (see :class:`DatasetImagePath`)."""
    return path if isinstance(path, DatasetImagePath) else DatasetImagePath(path)


def open_image_file(
    path: str | os.PathLike | IO[bytes],
    *,
    max_pixels: int | None = None,
    keep_alpha: bool = False,
    name: str | None = None,
) -> Image.Image:
    """Open and fully decode an image file as RGB (RGBA with ``keep_alpha`` when it has transparency) within the
    pixel budget; upright by its EXIF orientation unless it is a :class:`DatasetImagePath`."""
    name = name or os.fspath(path)  # type: ignore[arg-type]
    with opened_image(path, name=name, max_pixels=max_pixels) as image:
        image.load()
        if not isinstance(path, DatasetImagePath):
            image = ImageOps.exif_transpose(image)  # a damaged EXIF block fails here: still inside the guard
        return to_rgb(image, name=name, keep_alpha=keep_alpha)


def is_url(source: Any) -> bool:
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))


def fetch_url(url: str, *, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
    """The bytes at an http(s) URL, read with a short timeout and refused past ``max_bytes``
    (announced or actual); any network or HTTP failure is an :class:`InvalidInputError` naming the URL."""
    import http.client
    import urllib.error
    import urllib.request

    from attnzoo.weights.hub import is_offline

    limit = env_whole_number("ATTNZOO_MAX_IMAGE_BYTES", MAX_DOWNLOAD_BYTES) if max_bytes is None else int(max_bytes)
    wait = env_seconds("ATTNZOO_URL_TIMEOUT", URL_TIMEOUT) if timeout is None else float(timeout)
    if is_offline():
        raise InvalidInputError(
            f"{url}: offline mode is on (ATTNZOO_OFFLINE/HF_HUB_OFFLINE); download the image and pass its path"
        )
    request = urllib.request.Request(url, headers={"User-Agent": "attnzoo"})
    try:
        with urllib.request.urlopen(request, timeout=wait) as response:
            announced = response.headers.get("Content-Length", "")
            if announced.isdigit() and int(announced) > limit:
                raise InvalidInputError(
                    f"{url}: the server announces {int(announced):,} bytes, over the {limit:,}-byte limit for "
                    "images (ATTNZOO_MAX_IMAGE_BYTES)"
                )
            data = _read_within(response, limit + 1, seconds=10 * wait, url=url)
    except urllib.error.HTTPError as err:
        raise InvalidInputError(f"{url}: the server answered HTTP {err.code} ({err.reason})") from None
    except urllib.error.URLError as err:
        raise InvalidInputError(f"{url}: cannot download the image ({err.reason})") from None
    except (OSError, ValueError, http.client.HTTPException) as err:  # timeouts, dropped connections, bad URLs
        raise InvalidInputError(f"{url}: cannot download the image ({type(err).__name__}: {err})") from None
    if len(data) > limit:
        raise InvalidInputError(
            f"{url}: more than {limit:,} bytes, over the limit for images (ATTNZOO_MAX_IMAGE_BYTES)"
        )
    if not data:
        raise InvalidInputError(f"{url}: the server sent an empty file")
    return data


def _read_within(response: IO[bytes], max_bytes: int, *, seconds: float, url: str) -> bytes:
    """Up to ``max_bytes`` of a response within ``seconds`` in all (a server sending a byte at a
    time would never trip the timeout of each read)."""
    deadline = time.monotonic() + seconds
    chunks, size = [], 0
    while size < max_bytes:
        if time.monotonic() > deadline:
            raise InvalidInputError(f"{url}: the download is too slow (gave up after {seconds:g} s)")
        chunk = response.read(min(1 << 16, max_bytes - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def to_rgb(image: Image.Image, *, name: str = "<image>", keep_alpha: bool = False) -> Image.Image:
    """RGB; transparent images are composited on white, or kept as RGBA with ``keep_alpha``."""
    if image.width == 0 or image.height == 0:  # image processors would divide by its size
        raise InvalidInputError(f"{name}: empty image of size {image.width}x{image.height}")
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
    return array_to_image((np.clip(data.astype(np.float32), 0, 1) * 255.0 + 0.5).astype(np.uint8), name=name)


def array_to_image(
    array: np.ndarray, *, name: str = "<array>", channels_first: bool = False, keep_alpha: bool = False
) -> Image.Image:
    """HxW, HxWxC (or CxHxW with ``channels_first``) arrays of uint8/uint16/bool/float in [0, 1]."""
    given = tuple(array.shape)  # errors name the shape as given, not as moved
    if array.ndim == 3 and channels_first:
        array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        layout = "CxHxW" if channels_first else "HxWxC"
        hint = ""
        if channels_first and len(given) == 3 and given[-1] in (1, 3, 4):
            hint = "; an HxWxC tensor? tensors are CxHxW: pass tensor.permute(2, 0, 1), or a numpy array"
        raise InvalidInputError(
            f"{name}: expected an HxW or {layout} image with 1, 3 or 4 channels, got shape {given}{hint}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"{name}: empty image of shape {array.shape}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = uint16_to_uint8(array)
    elif np.issubdtype(array.dtype, np.floating):
        return _float_to_rgb(array, name)  # checked in its own precision: 1e300 is out of range, not infinite
    elif array.dtype != np.uint8:
        raise InvalidInputError(f"{name}: unsupported dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1]")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)), name=name, keep_alpha=keep_alpha)


def uint16_to_uint8(array: np.ndarray) -> np.ndarray:
    """16-bit samples scaled to 8 bits, rounded to nearest (``round(v * 255 / 65535)``; no value lies on a half)
    in integer arithmetic, a block of rows at a time: 1 byte per sample beside the input, where dividing in
    float64 took 17 (a 16-bit slide at the in-memory reader's limit needed tens of GB)."""
    out = np.empty(array.shape, np.uint8)
    if array.size == 0:
        return out
    rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
    flat = out.reshape(rows.shape)
    step = max(1, (1 << 22) // max(1, rows.shape[1]))  # about 4M samples (16 MB of uint32) per block
    for start in range(0, rows.shape[0], step):
        wide = rows[start : start + step].astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        flat[start : start + step] = wide
    return out


def load_image(source: Any, *, max_pixels: int | None = None, keep_alpha: bool = False) -> Image.Image:
    """An RGB image from a path, an http(s) URL, a binary file object (an open file, ``io.BytesIO``), a PIL
    image, a numpy array (HxWxC) or a tensor (CxHxW); with ``keep_alpha`` an image with transparency comes back
    as RGBA (e.g. ShapeNet renderings). Files and downloads larger than ``max_pixels`` are refused from their
    header. Upright by EXIF orientation, except a dataset's :class:`DatasetImagePath` (module docstring)."""
    if is_url(source):
        data = fetch_url(source)
        return open_image_file(io.BytesIO(data), max_pixels=max_pixels, keep_alpha=keep_alpha, name=source)
    if isinstance(source, (str, Path, os.PathLike)):
        return open_image_file(source, max_pixels=max_pixels, keep_alpha=keep_alpha)
    if is_file_object(source):
        data = _read_file_object(source)
        return open_image_file(io.BytesIO(data), max_pixels=max_pixels, keep_alpha=keep_alpha, name=describe(source))
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source), name=describe(source), keep_alpha=keep_alpha)
    if isinstance(source, np.ndarray):
        return array_to_image(source, name=describe(source), keep_alpha=keep_alpha)
    try:
        import torch
    except ImportError:  # pragma: no cover
        pass
    else:
        if isinstance(source, torch.Tensor):
            # read as every tensor is (a meta tensor refused, bfloat16 and float8 widened to float32); float16,
            # which numpy has, is widened here too, so an image is checked and scaled in float32 as a bfloat16 one
            array = to_numpy(source, describe(source))
            array = array.astype(np.float32) if array.dtype == np.float16 else array
            return array_to_image(array, name=describe(source), channels_first=True, keep_alpha=keep_alpha)
    raise InvalidInputError(
        f"cannot read an image from {type(source).__name__}; pass a file path, http(s) URL, binary file object, PIL "
        "image, numpy array or tensor"
    )


def is_file_object(source: Any) -> bool:
    """An open file (or ``io.BytesIO``, or the :class:`FileContents` read from one): one input, read with
    ``.read()``, never a batch of its lines."""
    if isinstance(source, FileContents):
        return True
    return callable(getattr(source, "read", None)) and not isinstance(source, (str, bytes, os.PathLike))


class FileContents:
    """The bytes of a binary file object, read once in the calling process (:func:`file_contents`), from where the
    file stood (which it is put back to). A pipeline hands this to its DataLoader workers instead of the open file:
    forked workers would share the file's one position (the same file given twice, read by two workers at once,
    gives each a part), and a spawned worker cannot be sent an open file at all. Small and picklable; it keeps the
    file's type and name for messages (:func:`describe`: ``<BufferedReader cat.png>``, as the file itself). A file
    that could not be read keeps its error, raised where the input is read (so ``on_error="skip"`` sets it aside);
    one kept unread (``data`` None, for a task that refuses file objects by name) has neither."""

    __slots__ = ("data", "error", "kind", "name")

    def __init__(self, kind: str, name: str | None, data: bytes | None = None, error: str | None = None):
        self.kind, self.name, self.data, self.error = kind, name, data, error

    def __getstate__(self) -> tuple[str, str | None, bytes | None, str | None]:
        return self.kind, self.name, self.data, self.error

    def __setstate__(self, state: tuple[str, str | None, bytes | None, str | None]) -> None:
        self.kind, self.name, self.data, self.error = state

    def __repr__(self) -> str:
        held = f"{len(self.data):,} bytes" if self.data is not None else "unread" if self.error is None else "failed"
        return f"FileContents({describe(self)}, {held})"


def file_contents(source: Any, *, read: bool = True) -> FileContents:
    """``source``, a binary file object, as its :class:`FileContents` (``read=False``: its type and name only);
    a file that cannot be read gives one holding the typed error that reading it raises."""
    if isinstance(source, FileContents):
        return source
    name = getattr(source, "name", None)
    contents = FileContents(type(source).__name__, name if isinstance(name, str) and name else None)
    if read:
        try:
            contents.data = _read_file_object(source)
        except InvalidInputError as err:
            contents.error = str(err)
    return contents


def _read_file_object(source: Any) -> bytes:
    """The bytes of a binary file object from where it stands, which it is put back to where it can be (a
    result's ``plot()`` reads the image again); a text file, a closed one, one whose ``read()`` needs arguments
    (a ``zipfile.ZipFile``) or a failing read is a typed error naming it."""
    name = describe(source)
    if isinstance(source, FileContents):
        if source.data is None:
            raise InvalidInputError(source.error or f"{name}: the file object was not read")
        return source.data
    try:
        start = source.tell() if _seekable(source) else None
        data = source.read()
        if start is not None:
            source.seek(start)
    except (OSError, ValueError) as err:  # closed, not readable, or an I/O error
        raise InvalidInputError(f"{name}: cannot read the file object ({err})") from None
    except TypeError as err:  # a read() that takes arguments: zipfile.ZipFile.read(name)
        raise InvalidInputError(
            f"{name}: cannot read the file object: its read() does not read it whole ({err}); pass a binary file "
            "object, such as open(path, 'rb') or io.BytesIO(data)"
        ) from None
    if isinstance(data, str):
        raise InvalidInputError(f"{name}: a text file object; open the image in binary mode ('rb')")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"{name}: .read() gave a {type(data).__name__}, not bytes")
    return bytes(data)


def _seekable(source: Any) -> bool:
    try:
        return bool(source.seekable())
    except (AttributeError, OSError, ValueError):
        return False
