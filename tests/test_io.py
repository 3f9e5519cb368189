"""Atomic writes: the target appears whole or not at all, and no temporary file is left behind."""

import pytest

from attnzoo._io import atomic_path, atomic_write


def test_success_renames_into_place(tmp_path):
    with atomic_path(tmp_path / "sub" / "a.bin") as tmp:
        assert tmp.parent == tmp_path / "sub" and tmp.name != "a.bin"
        tmp.write_bytes(b"whole")
        assert not (tmp_path / "sub" / "a.bin").exists()  # not visible before the block ends
    with atomic_write(tmp_path / "b.txt", "w") as fh:
        fh.write("text")
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"whole" and (tmp_path / "b.txt").read_text() == "text"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.bin", "b.txt"]


def test_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "a.bin") as fh:
        fh.write(b"half")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "a.bin").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    from attnzoo import _io
    from attnzoo._io import write_json

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "new.json", {"a": 1})  # mkstemp's 0600 would hide results from the group
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o666 & ~_io._UMASK
        (tmp_path / "old.json").write_text("{}")
        os.chmod(tmp_path / "old.json", 0o640)
        write_json(tmp_path / "old.json", {"b": 2})  # replacing keeps the file's own mode
        assert (tmp_path / "old.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
