"""Read and write binvox voxel files (the format of ShapeNetVox32), with the official axis convention.

A binvox file is an ASCII header followed by run-length-encoded voxels::

    #binvox 1
    dim 32 32 32
    translate -0.2 -0.1 -0.3
    scale 0.7
    data
    <value byte><count byte><value byte><count byte>...

Each (value, count) pair stands for ``count`` voxels (0-255) of ``value`` (0 or 1). The runs
fill the grid in the file's order, where y varies fastest, then z, then x (the linear index is
``x * dim_z * dim_y + z * dim_y + y``): a plain ``reshape(dims)`` therefore indexes ``[x, z, y]``.

``fix_coords=True`` (the default, and what the 3D-R2N2/Pix2Vox/LRGT loaders use via
``binvox_rw.read_as_3d_array(fix_coords=True)``) swaps the last two axes so that the array
indexes ``[x, y, z]``. ``dims`` is always the header's ``dim`` line, in file order, as binvox_rw
reports it. The header keywords may come in any order and unknown keywords are skipped, as the
reference C++ reader does; a missing ``translate`` or ``scale`` defaults to 0 / 1 as there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnzoo._io import atomic_write, check_regular_file
from attnzoo.errors import DatasetFormatError, InvalidInputError

__all__ = ["Binvox", "read_binvox", "parse_binvox", "encode_binvox", "write_binvox"]

_MAX_HEADER_LINES = 64
_MAX_HEADER_BYTES = 4096
_MAX_VOXELS = 1024**3  # refuse absurd dims before allocating


@dataclass
class Binvox:
    """A decoded binvox grid and its metadata.

    ``voxels`` is a boolean array indexed ``[x, y, z]`` when read with ``fix_coords=True``
    (``axis_order == "xyz"``), else ``[x, z, y]`` as stored (``axis_order == "xzy"``).
    ``translate`` and ``scale`` map voxel ``(i, j, k)`` (xyz) to model space:
    ``x = scale * (i + 0.5) / dims[0] + translate[0]`` and so on.
    """

    voxels: np.ndarray
    dims: tuple[int, int, int]
    translate: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    axis_order: str = "xyz"


def read_binvox(path: str | os.PathLike, fix_coords: bool = True) -> Binvox:
    """Decode the binvox file at ``path``; :class:`DatasetFormatError` naming the file if it is not one."""
    name = os.fspath(path)
    check_regular_file(path, "a binvox file")  # /dev/zero would be read until the memory runs out
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetFormatError(f"{name}: no such binvox file") from None
    except IsADirectoryError:
        raise DatasetFormatError(f"{name}: is a directory, not a binvox file") from None
    except OSError as err:
        raise DatasetFormatError(f"{name}: cannot read ({err})") from None
    except MemoryError:
        raise DatasetFormatError(f"{name}: too large to read into memory") from None
    return parse_binvox(data, fix_coords=fix_coords, name=name)


def parse_binvox(data: bytes, fix_coords: bool = True, *, name: str = "<binvox>") -> Binvox:
    """Decode binvox bytes (see :func:`read_binvox`); ``name`` is used in error messages."""
    dims, translate, scale, offset = _parse_header(data, name)
    payload = np.frombuffer(data, dtype=np.uint8, offset=offset)
    expected = dims[0] * dims[1] * dims[2]
    if payload.size % 2:
        raise DatasetFormatError(
            f"{name}: truncated binvox data: {payload.size} bytes after the header, an odd number "
            "(the data must be (value, count) byte pairs)"
        )
    values, counts = payload[0::2], payload[1::2]
    total = int(counts.sum(dtype=np.int64))
    if total != expected:
        what = "truncated binvox data" if total < expected else "binvox data is too long"
        raise DatasetFormatError(
            f"{name}: {what}: the run-length data covers {total} voxels but dim "
            f"{dims[0]} {dims[1]} {dims[2]} needs {expected}"
        )
    if values.size and values.max() > 1:
        bad = int(values[values > 1][0])
        raise DatasetFormatError(f"{name}: invalid binvox run value {bad} (values must be 0 or 1)")
    grid = np.repeat(values.astype(bool), counts).reshape(dims)
    if fix_coords:
        grid = np.ascontiguousarray(grid.transpose(0, 2, 1))
    return Binvox(grid, dims, translate, scale, "xyz" if fix_coords else "xzy")


def _parse_header(data: bytes, name: str) -> tuple[tuple[int, int, int], tuple[float, float, float], float, int]:
    """``(dims, translate, scale, offset of the first data byte)``."""
    if not data.startswith(b"#binvox"):
        start = data[:16]
        raise DatasetFormatError(f"{name}: not a binvox file (it should start with '#binvox 1', found {start!r})")
    dims = None
    translate: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale = 1.0
    offset = 0
    for number in range(_MAX_HEADER_LINES):
        end = data.find(b"\n", offset, offset + _MAX_HEADER_BYTES)
        if end < 0:
            raise DatasetFormatError(
                f"{name}: truncated binvox header (line {number + 1} has no end; expected a 'data' line)"
            )
        try:
            tokens = data[offset:end].decode("ascii").split()
        except UnicodeDecodeError:
            raise DatasetFormatError(f"{name}: binvox header line {number + 1} is not ASCII text") from None
        offset = end + 1
        if number == 0:
            if len(tokens) != 2 or tokens[0] != "#binvox" or not tokens[1].isdigit():
                raise DatasetFormatError(f"{name}: bad binvox header line {' '.join(tokens)!r} (expected '#binvox 1')")
            if int(tokens[1]) != 1:
                raise DatasetFormatError(f"{name}: unsupported binvox version {tokens[1]} (only version 1 exists)")
            continue
        if not tokens:
            continue
        key, args = tokens[0], tokens[1:]
        if key == "data":
            if dims is None:
                raise DatasetFormatError(f"{name}: binvox header has no 'dim' line before 'data'")
            return dims, translate, scale, offset
        if key == "dim":
            try:
                values = tuple(int(a) for a in args)
            except ValueError:
                values = ()
            if len(values) != 3 or min(values) < 1:
                raise DatasetFormatError(
                    f"{name}: bad binvox 'dim' line {' '.join(tokens)!r} (expected three positive integers)"
                )
            if math.prod(values) > _MAX_VOXELS:
                raise DatasetFormatError(f"{name}: binvox dim {' '.join(args)} is too large")
            dims = values  # type: ignore[assignment]
        elif key == "translate":
            floats = _floats(args, 3, tokens, name)
            translate = (floats[0], floats[1], floats[2])
        elif key == "scale":
            scale = _floats(args, 1, tokens, name)[0]
        # Unknown keywords are skipped, like the reference reader does.
    raise DatasetFormatError(f"{name}: binvox header has no 'data' line within {_MAX_HEADER_LINES} lines")


def _floats(args: list[str], n: int, tokens: list[str], name: str) -> list[float]:
    try:
        values = [float(a) for a in args]
    except ValueError:
        values = []
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise DatasetFormatError(
            f"{name}: bad binvox {tokens[0]!r} line {' '.join(tokens)!r} (expected {n} finite number{'s' if n > 1 else ''})"
        )
    return values


def encode_binvox(voxels, translate=(0.0, 0.0, 0.0), scale: float = 1.0, fix_coords: bool = True) -> bytes:
    """The bytes of a binvox file holding ``voxels`` (see :func:`write_binvox`)."""
    grid = _as_binary_grid(voxels)
    translate = tuple(float(t) for t in np.asarray(translate, dtype=np.float64).reshape(-1))
    if len(translate) != 3 or not all(math.isfinite(t) for t in translate):
        raise InvalidInputError(f"translate must be three finite numbers, got {translate}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise InvalidInputError(f"scale must be a positive finite number, got {scale}")
    stored = grid.transpose(0, 2, 1) if fix_coords else grid  # xyz -> the file's xzy
    flat = np.ascontiguousarray(stored).reshape(-1).view(np.uint8)
    header = (
        "#binvox 1\n"
        f"dim {stored.shape[0]} {stored.shape[1]} {stored.shape[2]}\n"
        f"translate {translate[0]!r} {translate[1]!r} {translate[2]!r}\n"
        f"scale {scale!r}\n"
        "data\n"
    ).encode("ascii")
    return header + _run_length_encode(flat)


def write_binvox(
    path: str | os.PathLike, voxels, translate=(0.0, 0.0, 0.0), scale: float = 1.0, fix_coords: bool = True
) -> Path:
    """Write ``voxels`` (a 3-D bool/0-1 array, numpy or torch) as a binvox file, atomically.

    With ``fix_coords=True`` the array is taken as ``[x, y, z]`` (what :func:`read_binvox`
    returns by default) and stored in the file's ``[x, z, y]`` order, so that
    ``read_binvox(path).voxels`` gives the same array back. Runs longer than 255 voxels are
    split into several pairs; no zero-count pairs are written.
    """
    data = encode_binvox(voxels, translate=translate, scale=scale, fix_coords=fix_coords)
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return path


def _as_binary_grid(voxels) -> np.ndarray:
    if hasattr(voxels, "detach"):
        voxels = voxels.detach().cpu().numpy()
    grid = np.asarray(voxels)
    if grid.ndim != 3 or 0 in grid.shape:
        raise InvalidInputError(f"voxels must be a non-empty 3-D grid, got shape {grid.shape}")
    if grid.dtype == np.bool_:
        return grid
    if not (np.issubdtype(grid.dtype, np.number)) or not np.isin(grid, (0, 1)).all():
        raise InvalidInputError(
            "voxels must be boolean or hold only 0 and 1; threshold probabilities first (e.g. p >= 0.3)"
        )
    return grid.astype(bool)


def _run_length_encode(flat: np.ndarray) -> bytes:
    """(value, count) byte pairs with counts of 1..255."""
    n = flat.size
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    lengths = np.diff(np.append(starts, n))
    values = flat[starts]
    pieces = (lengths + 254) // 255  # pairs per run
    out_values = np.repeat(values, pieces)
    out_counts = np.full(out_values.size, 255, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    out_counts[last] = lengths - 255 * (pieces - 1)
    pairs = np.empty(2 * out_values.size, dtype=np.uint8)
    pairs[0::2] = out_values
    pairs[1::2] = out_counts
    return pairs.tobytes()
