"""refuse_torch_zip_bomb: the sizes a PyTorch zip declares, checked before torch.load inflates anything.

Archives are built here from torch.save output; compressed entries are honest deflate streams of zeros, written in
1 MiB pieces (nothing allocates more than a few MiB)."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

from attnzoo import _io
from attnzoo._io import refuse_torch_zip_bomb
from attnzoo.errors import DatasetFormatError, WeightsError

MIB = 1 << 20


def _torch_zip(path: Path, compress_type: int = zipfile.ZIP_STORED) -> Path:
    """torch.save's zip of a tiny state, its entries re-written with ``compress_type``."""
    torch.save({"w": torch.ones(3)}, path.with_suffix(".src"))
    with zipfile.ZipFile(path.with_suffix(".src")) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename), compress_type=compress_type)
    return path


def _with_zeros(path: Path, mib: int, name: str = "archive/data/99") -> Path:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "a") as zout, zout.open(info, "w") as entry:
        for _ in range(mib):
            entry.write(bytes(MIB))
    return path


def _declared(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return sum(i.file_size for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED)


def test_stored_archives_pass_and_strict_mode_refuses_any_compressed_entry(tmp_path):
    stored = _torch_zip(tmp_path / "stored.pt")
    deflated = _torch_zip(tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    for allow in (False, True):
        refuse_torch_zip_bomb(stored, error=DatasetFormatError, allow_compressed=allow)
    refuse_torch_zip_bomb(deflated, error=WeightsError, allow_compressed=True)
    with pytest.raises(
        DatasetFormatError, match=r"deflated\.pt: not a torch\.save file: its zip entries are compressed .*Re-save it$"
    ):
        refuse_torch_zip_bomb(deflated, error=DatasetFormatError, allow_compressed=False, advice="Re-save it")


def test_compressed_entries_are_refused_only_when_large_and_far_beyond_their_compressed_size(tmp_path, monkeypatch):
    """Both conditions must hold: over ZIP_FREE_INFLATION beyond the file's size, and over ZIP_MAX_INFLATION_RATIO
    times the compressed bytes (the limits are lowered here so that the archives stay a few MiB)."""
    monkeypatch.setattr(_io, "ZIP_FREE_INFLATION", 2 * MIB)
    zeros = _with_zeros(_torch_zip(tmp_path / "zeros.pt", zipfile.ZIP_DEFLATED), 4)  # ~1000x, 4 MiB
    assert _declared(zeros) > 2 * MIB + zeros.stat().st_size
    with pytest.raises(WeightsError, match=r"zeros\.pt: its compressed zip entries .* as in a zip bomb"):
        refuse_torch_zip_bomb(zeros, error=WeightsError, allow_compressed=True)
    monkeypatch.setattr(_io, "ZIP_FREE_INFLATION", 8 * MIB)  # small enough in all: read as it is
    refuse_torch_zip_bomb(zeros, error=WeightsError, allow_compressed=True)
    monkeypatch.setattr(_io, "ZIP_FREE_INFLATION", 2 * MIB)
    monkeypatch.setattr(_io, "ZIP_MAX_INFLATION_RATIO", 2000)  # a ratio deflate never reaches: read as it is
    refuse_torch_zip_bomb(zeros, error=WeightsError, allow_compressed=True)


def test_entries_sharing_one_compressed_kernel_are_refused(tmp_path):
    """Many central-directory entries pointing at one local entry (an overlapping zip bomb), refused though what
    they declare (50 MiB) is under the size any file may inflate to."""
    path = _with_zeros(_torch_zip(tmp_path / "overlap.pt"), 1, name="archive/data/00")
    data = (tmp_path / "overlap.pt").read_bytes()
    end = data.rindex(b"PK\x05\x06")
    (count,) = struct.unpack_from("<H", data, end + 10)
    (cd_offset,) = struct.unpack_from("<I", data, end + 16)
    records, at = [], cd_offset
    for _ in range(count):
        n, m, k = struct.unpack_from("<HHH", data, at + 28)
        records.append(data[at : at + 46 + n + m + k])
        at += 46 + n + m + k
    kernel = next(r for r in records if r[46 : 46 + 15] == b"archive/data/00")
    copies = [kernel[:46] + f"archive/data/{i:02d}".encode() + kernel[46 + 15 :] for i in range(1, 50)]
    directory = b"".join(records + copies)
    tail = bytearray(data[end:])
    struct.pack_into("<HHI", tail, 8, count + 49, count + 49, len(directory))
    path.write_bytes(data[:cd_offset] + directory + bytes(tail))
    assert _declared(path) == 50 * MIB and len(zipfile.ZipFile(path).infolist()) == count + 49
    for allow in (False, True):
        with pytest.raises(WeightsError, match=r"overlap\.pt: its zip entries overlap one another .*archive/data/0"):
            refuse_torch_zip_bomb(path, error=WeightsError, allow_compressed=allow)


def test_what_is_not_a_torch_zip_is_left_to_torch_load(tmp_path):
    """The legacy pickle, a zip with bytes before it (torch.load reads it as a pickle), a cut-short archive, a
    missing file: nothing to refuse here; torch.load names what it is."""
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    deflated = _torch_zip(tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    (tmp_path / "prefixed.pt").write_bytes(b"junk" + deflated.read_bytes())
    (tmp_path / "cut.pt").write_bytes(deflated.read_bytes()[:200])
    for name in ("legacy", "prefixed", "cut", "absent"):
        refuse_torch_zip_bomb(tmp_path / f"{name}.pt", error=WeightsError, allow_compressed=False)
