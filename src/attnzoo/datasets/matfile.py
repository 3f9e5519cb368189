"""MATLAB v5 ``.mat`` files (MIT1003's gaze data, ImageNet's devkit ``meta.mat``), read safely.

scipy's v5 reader is not hardened against damaged files: an element whose type code is
unassigned (0, 8, 10, 11, 19, ...) where numbers belong makes it dereference a NULL pointer and the
whole process dies with a segmentation fault. So every file's element tree is first walked
against the format (type codes, sizes, array classes, nesting, the element count a cell or struct
promises), and only a file that passes is handed to :func:`scipy.io.loadmat`; a file that fails
is a :class:`~attnzoo.errors.DatasetFormatError` naming it.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from attnzoo._io import STRUCTURE_ERRORS, parse_errors
from attnzoo.errors import DatasetFormatError

__all__ = ["MAX_MAT_BYTES", "load_mat"]

#: Largest .mat file, or compressed variable once inflated, that is read (the datasets' are < 1 MB).
MAX_MAT_BYTES = 256 << 20
_MAX_DEPTH = 32
_MAX_ELEMENTS = 2**31
_HEADER = 128
_MATRIX, _COMPRESSED = 14, 15
#: Bytes per value of each numeric/text element type (miINT8 ... miUTF32); codes not listed are not data.
_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8, 16: 1, 17: 2, 18: 4}
_TEXT = (1, 2, 16)  # names: miINT8, miUINT8 and miUTF8 occur
_CELL, _STRUCT, _OBJECT, _CHAR, _SPARSE = 1, 2, 3, 4, 5
_NUMERIC_CLASSES = range(6, 16)  # mxDOUBLE_CLASS ... mxUINT64_CLASS


class _Malformed(Exception):
    """Raised inside the walk; turned into a DatasetFormatError naming the file at the boundary."""


def _elements(buf: bytes, start: int, end: int, order: str) -> Iterator[tuple[int, int, int]]:
    """``(type, first data byte, end of data)`` of each element in ``buf[start:end]``."""
    pos = start
    while pos < end:
        if end - pos < 8:
            raise _Malformed(f"a truncated element tag at byte {pos}")
        mdtype, nbytes = struct.unpack_from(order + "II", buf, pos)
        if mdtype >> 16:  # the small element format: type and size share the first four bytes
            nbytes, mdtype = mdtype >> 16, mdtype & 0xFFFF
            if nbytes > 4:
                raise _Malformed(f"a small element of {nbytes} bytes at byte {pos}")
            yield mdtype, pos + 4, pos + 4 + nbytes
            pos += 8
            continue
        data = pos + 8
        if nbytes > end - data:
            raise _Malformed(f"an element at byte {pos} claims {nbytes} bytes, {end - data} are left")
        yield mdtype, data, data + nbytes
        pos = data + nbytes
        if mdtype != _COMPRESSED:
            pos = min(end, pos + (-nbytes) % 8)


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(data, MAX_MAT_BYTES)
    except zlib.error as err:
        raise _Malformed(f"a compressed variable does not inflate ({err})") from None
    if inflater.unconsumed_tail:
        raise _Malformed(f"a compressed variable inflates past {MAX_MAT_BYTES:,} bytes")
    return body


def _check_matrix(buf: bytes, start: int, end: int, order: str, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed("arrays nested too deeply")
    if start == end:  # an empty array: scipy reads it as such
        return
    elements = list(_elements(buf, start, end, order))
    if len(elements) < 3:
        raise _Malformed("an array without flags, dimensions and name")
    (flags, fa, fb), (dims_type, da, db), (name_type, _, _) = elements[:3]
    if flags != 6 or fb - fa < 8:
        raise _Malformed("array flags that are not two uint32 values")
    flag_bits = struct.unpack_from(order + "I", buf, fa)[0]
    cls, complex_values = flag_bits & 0xFF, bool(flag_bits & 0x800)
    if dims_type not in (5, 6) or db == da or (db - da) % 4:
        raise _Malformed("array dimensions that are not int32 values")
    dims = struct.unpack_from(order + f"{(db - da) // 4}i", buf, da)
    count = math.prod(dims) if min(dims) >= 0 else -1
    if not 0 <= count <= _MAX_ELEMENTS:
        raise _Malformed(f"array dimensions {dims}")
    if name_type not in _TEXT:
        raise _Malformed(f"an array name of element type {name_type}")
    rest = elements[3:]
    if cls in (_CELL, _STRUCT, _OBJECT):
        if cls == _OBJECT:
            if not rest or rest[0][0] not in _TEXT:
                raise _Malformed("an object without a class name")
            rest = rest[1:]
        fields = 1
        if cls in (_STRUCT, _OBJECT):
            if len(rest) < 2 or rest[0][0] not in (5, 6) or rest[0][2] - rest[0][1] != 4 or rest[1][0] not in _TEXT:
                raise _Malformed("a struct without field names")
            length = struct.unpack_from(order + "i", buf, rest[0][1])[0]
            names = rest[1][2] - rest[1][1]
            if length <= 0 or names % length:
                raise _Malformed(f"struct field names of length {length} in {names} bytes")
            fields, rest = names // length, rest[2:]
        if len(rest) != count * fields:
            raise _Malformed(f"{len(rest)} values in an array of {count} x {fields} fields")
        for mdtype, a, b in rest:
            if mdtype != _MATRIX:
                raise _Malformed(f"a cell or field of element type {mdtype}")
            _check_matrix(buf, a, b, order, depth + 1)
    elif cls == _CHAR or cls == _SPARSE or cls in _NUMERIC_CLASSES:
        # scipy reads exactly these (row indices and column starts first for sparse, imaginary parts last)
        expected = (3 if cls == _SPARSE else 1) + (complex_values and cls != _CHAR)
        if len(rest) != expected:
            raise _Malformed(f"{len(rest)} data elements in an array of class {cls} (expected {expected})")
        for mdtype, a, b in rest:
            if mdtype not in _ITEMSIZE:
                raise _Malformed(f"array data of element type {mdtype}")
            if cls in _NUMERIC_CLASSES and b - a != count * _ITEMSIZE[mdtype]:
                raise _Malformed(f"{b - a} bytes of data for {count} values of element type {mdtype}")
    else:
        raise _Malformed(f"array class {cls} (only numbers, text, cells and structs are read)")


def _check(data: bytes) -> None:
    if len(data) > MAX_MAT_BYTES:
        raise _Malformed(f"{len(data):,} bytes, over the {MAX_MAT_BYTES:,}-byte limit")
    if len(data) < _HEADER or 0 in data[:4]:  # scipy takes a zero in the first 4 bytes for MATLAB v4
        raise _Malformed("no MATLAB v5 header (it should start with 'MATLAB 5.0 MAT-file')")
    order = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if order is None:
        raise _Malformed("no endian indicator in the header")
    version = struct.unpack_from(order + "H", data, 124)[0]
    if version == 0x0200:
        raise _Malformed("a MATLAB v7.3 (HDF5) file; save it with -v7 or older")
    if version != 0x0100:
        raise _Malformed(f"MAT-file version {version:#06x}")
    for mdtype, a, b in _elements(data, _HEADER, len(data), order):
        if mdtype == _COMPRESSED:
            body = _inflate(data[a:b])
            for inner, a2, b2 in _elements(body, 0, len(body), order):
                if inner != _MATRIX:
                    raise _Malformed(f"a compressed variable of element type {inner}")
                _check_matrix(body, a2, b2, order, 0)
        elif mdtype == _MATRIX:
            _check_matrix(data, a, b, order, 0)
        else:
            raise _Malformed(f"a top-level element of type {mdtype}")


def load_mat(data: bytes, name: str, what: str = "MATLAB v5 .mat file", **kwargs: Any) -> dict[str, Any]:
    """The variables of a v5 ``.mat`` file's bytes, as :func:`scipy.io.loadmat` gives them with
    ``kwargs``; a file that is damaged, another version or not a .mat file at all is a
    :class:`DatasetFormatError` naming ``name`` -- never a crash."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        _check(data)
    except _Malformed as err:
        raise DatasetFormatError(f"{name}: not a readable {what} ({err})") from None
    with parse_errors(name, what, also=(MatReadError, ZeroDivisionError, *STRUCTURE_ERRORS)):
        return loadmat(io.BytesIO(data), **kwargs)
