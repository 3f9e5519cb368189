"""Atomic writes: the target appears whole or not at all, and no temporary file is left behind."""

import os
import re
import threading
from pathlib import Path

import pytest

from attnzoo._io import (
    atomic_path,
    atomic_write,
    check_out_outside,
    check_regular_file,
    read_csv_rows,
    read_json,
    read_text,
    remove_stale_temporaries_in,
)
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError
from tests.datasets.special_files import fifo, needs_fifo


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


def test_stale_temporaries_of_the_named_files_only_are_removed(tmp_path):
    """What a killed atomic write left (a file, or a shard folder being set up), for the names given only."""
    stale = [".best.pt.k3j_9xz0.tmp", ".checkpoint-00000001.pt.ab_cd123.tmp", ".best.pt.abcdefgh.partial.tmp"]
    kept = [".other.pt.k3j_9xz0.tmp", ".best.pt.short.tmp", "best.pt", ".xbest.pt.abcdefgh.tmp"]
    (tmp_path / stale.pop()).mkdir()
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    remove_stale_temporaries_in(tmp_path, r"best\.pt|checkpoint-\d{8}\.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    remove_stale_temporaries_in(tmp_path / "missing", r"best\.pt")  # no folder: nothing to do


def test_an_output_folder_is_checked_before_any_work(tmp_path):
    from attnzoo._io import check_output_folder
    from attnzoo.errors import InvalidInputError, InvalidOptionError

    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists() and not any(tmp_path.iterdir())  # checked, nothing made or left
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InvalidOptionError, match=r"--out .*file is a file; give a folder"):
        check_output_folder(tmp_path / "file")
    with pytest.raises(InvalidInputError, match=r"out_dir .*file.x cannot be created: .*file is a file"):
        check_output_folder(tmp_path / "file" / "x", "out_dir", InvalidInputError)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_an_out_equal_to_or_inside_an_input_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for out in (data, data / "sub" / "run", data / "sub" / ".." / "new"):
        with pytest.raises(
            InvalidOptionError, match=f"^{re.escape(f'--out {out} is inside the training data {data}: why; ')}"
        ):
            check_out_outside(out, [tmp_path / "other", data], what="training data", why="why")
    monkeypatch.chdir(data)  # a relative --out is resolved too
    with pytest.raises(InvalidInputError, match="choose an --out outside it$") as caught:
        check_out_outside("run", [data], what="input folder", why="why", error=InvalidInputError)
    assert type(caught.value) is InvalidInputError
    for out in (tmp_path / "data-run", tmp_path, tmp_path / "other"):  # beside, above: allowed
        check_out_outside(out, [data], what="training data", why="why")
    check_out_outside(data, [], what="training data", why="why")


@needs_fifo
def test_devices_are_refused_before_they_are_opened_and_pipes_are_read_as_text(tmp_path):
    """/dev/zero never ends: a device is refused from a stat, typed. A FIFO is refused where a file must be a
    file (check_regular_file's default: opening one with no writer waits forever), but the text readers read
    one front to back, as a shell's <(...) gives them."""
    with pytest.raises(DatasetFormatError, match=r"labels.json: is a FIFO \(named pipe\), not a regular file"):
        check_regular_file(fifo(tmp_path / "labels.json"), "JSON file")
    for read, name, text, expected in (
        (read_text, "a.txt", "hello\n", "hello\n"),
        (read_json, "a.json", '{"a": 1}', {"a": 1}),
        (read_csv_rows, "a.csv", "slide,label\ns1,1\n", (["slide", "label"], [{"slide": "s1", "label": "1"}])),
    ):
        pipe = tmp_path / f"pipe-{name}"
        os.mkfifo(pipe)
        writer = threading.Thread(target=lambda p=pipe, t=text: Path(p).write_text(t), daemon=True)
        writer.start()
        assert read(pipe) == expected
        writer.join(5)
        with pytest.raises(DatasetFormatError, match=r"/dev/null: is a character device, not a regular file"):
            read("/dev/null")
    (tmp_path / "link.json").symlink_to("/dev/null")  # through links too
    with pytest.raises(DatasetFormatError, match="link.json: is a character device"):
        read_json(tmp_path / "link.json")
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "ok.json") == {"a": 1}
    with pytest.raises(DatasetFormatError, match="no such file"):  # missing files keep their own message
        read_json(tmp_path / "absent.json")
