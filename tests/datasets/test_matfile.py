"""The .mat check in front of scipy: every file MATLAB or scipy writes passes; the damage that makes
scipy's reader crash the process (a segmentation fault, not an exception) is refused first."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy
from scipy.io import loadmat, savemat

from attnzoo.datasets import matfile
from attnzoo.datasets.matfile import load_mat
from attnzoo.errors import DatasetFormatError

SCIPY_FILES = Path(scipy.__file__).parent / "io" / "matlab" / "tests" / "data"


def saved(compress: bool, **variables) -> bytes:
    buf = io.BytesIO()
    savemat(buf, variables, do_compression=compress)
    return buf.getvalue()


VARIABLES = {
    "gaze": np.random.default_rng(0).random((50, 2)),
    "z": np.array([1 + 2j, 3]),
    "text": "a string",
    "empty": np.zeros((0, 3)),
    "cell": np.array([[1, "a"]], dtype=object),
    "flags": np.array([True, False]),
    "s": {"DATA": {"eyeData": np.ones((3, 2))}, "user": "ajs"},
}


@pytest.mark.parametrize("compress", [False, True])
def test_what_scipy_writes_loads_unchanged(compress):
    data = saved(compress, **VARIABLES)
    ours, theirs = load_mat(data, "x.mat", simplify_cells=True), loadmat(io.BytesIO(data), simplify_cells=True)
    assert sorted(ours) == sorted(theirs)
    np.testing.assert_array_equal(ours["gaze"], theirs["gaze"])
    np.testing.assert_array_equal(ours["s"]["DATA"]["eyeData"], np.ones((3, 2)))


def test_every_v5_file_matlab_wrote_in_scipys_suite_passes():
    files = sorted(SCIPY_FILES.glob("*_[67].*_GLNX86.mat"))
    if not files:
        pytest.skip(f"scipy's MATLAB-written test files are not installed at {SCIPY_FILES}")
    read = 0
    for path in files:
        if path.stem.startswith(("testfunc", "testhdf5")):  # a function handle; a v7.3 file scipy cannot read
            continue
        load_mat(path.read_bytes(), path.name)
        read += 1
    assert read > 30  # structs, cells, objects, sparse, unicode, compressed and empty arrays among them


def _with_patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_damage_that_crashes_scipy_is_refused_first():
    data = saved(False, gaze=np.arange(6.0).reshape(3, 2))
    # the array flags of the first variable sit right after its two tags: 128 (header) + 8 + 8
    complex_without_imaginary = _with_patch(data, 136 + 8, struct.pack("<I", 0x806))
    with pytest.raises(DatasetFormatError, match=r"x.mat: .*1 data elements in an array of class 6 \(expected 2\)"):
        load_mat(complex_without_imaginary, "x.mat")
    # the numeric data's tag: find miDOUBLE (9) with 48 bytes and make it an unassigned type code
    tag = data.index(struct.pack("<II", 9, 48))
    with pytest.raises(DatasetFormatError, match="array data of element type 8"):
        load_mat(_with_patch(data, tag, struct.pack("<I", 8)), "x.mat")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no MATLAB v5 header"),
        (b"<html>not a MATLAB file</html>" * 10, "endian|version"),
        (b"\x00\x00\x00\x00" + b"x" * 200, "no MATLAB v5 header"),  # what scipy would take for MATLAB v4
    ],
)
def test_files_that_are_not_v5_mat_files(content, message):
    with pytest.raises(DatasetFormatError, match=message):
        load_mat(content, "x.mat")


def test_v73_files_say_so():
    header = bytearray(saved(False, a=np.ones(2))[:128])
    header[124:126] = struct.pack("<H", 0x0200)
    with pytest.raises(DatasetFormatError, match="v7.3"):
        load_mat(bytes(header) + b"\x89HDF\r\n\x1a\n", "x.mat")


def test_a_compressed_variable_inflating_past_the_limit_is_refused(monkeypatch):
    data = saved(True, big=np.zeros((300, 300)))
    monkeypatch.setattr(matfile, "MAX_MAT_BYTES", 10_000)
    with pytest.raises(DatasetFormatError, match="inflates past 10,000 bytes"):
        load_mat(data, "x.mat")
