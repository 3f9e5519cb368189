"""The download cache under faults: a read-only or misplaced cache, corrupt cached files, servers that answer
oddly (no length on a resumed range, a repeated length, a web page with status 200, a redirect loop),
malformed URLs, ``file://`` URLs offline, archives and files the user placed in the cache. Every case ends in
a typed error that says what to do, or in the right file; none in a raw OSError or a cached wrong file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.server
import io
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import attnzoo.weights.hub as hub
from attnzoo._io import write_json
from attnzoo.cli import main
from attnzoo.errors import ChecksumError, InvalidOptionError, OfflineError, UnknownNameError, WeightsError
from attnzoo.weights import (
    CheckpointEntry,
    checkpoints_dir,
    convert_checkpoint,
    download_url,
    hf_download,
    load_checkpoint,
    register_checkpoint,
    resolve_checkpoint,
    save_state_dict,
    unregister_checkpoint,
)
from tests.helpers import LocalHTTPServer, http_server

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def no_waits(monkeypatch):
    monkeypatch.setattr(hub, "time", SimpleNamespace(sleep=lambda s: None))  # no back-off waits in a test


def checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(3)}}, buffer)
    return buffer.getvalue()


class _OddHandler(http.server.BaseHTTPRequestHandler):
    """Answers by the first part of the path: ``ok`` (whole file with a version), ``nolen206`` (a cut first
    answer, then ranges answered without Content-Length), ``short206`` (ranges answered with only 1000 bytes and
    no length), ``star206`` and ``starshort206`` (the same, with a Content-Range that names no size:
    ``bytes a-b/*``), ``starpiece206`` (the same, each range answered in a piece of at most 100000 bytes, with
    its length and ``bytes a-b/*``: a server that answers in pieces), ``badlen`` (``Content-Length: N, N``), ``html`` (a login page with status 200), ``loop`` (a
    redirect to itself)."""

    body: bytes
    log: list

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode = self.path.strip("/").split("/")[0]
        rng = self.headers.get("Range")
        self.log.append((self.path, rng))
        body = self.body
        if mode == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "html":
            page = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if mode == "badlen":
            self.send_response(200)
            self.send_header("Content-Length", f"{len(body)}, {len(body)}")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        if mode == "starpiece206" and rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            end = min(start + 100_000, len(body)) - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/*")
            self.send_header("Content-Length", str(end + 1 - start))
            self.send_header("ETag", '"v1"')
            self.end_headers()
            self.wfile.write(body[start : end + 1])
            return
        if mode in ("nolen206", "short206", "star206", "starshort206") and rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            size = "*" if mode.startswith("star") else len(body)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{size}")
            self.send_header("ETag", '"v1"')
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[start:] if mode in ("nolen206", "star206") else body[start : start + 1000])
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if mode in ("nolen206", "short206", "star206", "starshort206", "starpiece206"):  # the first stops half-way
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextlib.contextmanager
def odd_server(body: bytes = PAYLOAD):
    log: list = []
    server = LocalHTTPServer(("127.0.0.1", 0), type("H", (_OddHandler,), {"body": body, "log": log}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def url_cache_path(url: str) -> Path:
    """Where ``resolve_checkpoint(url)`` caches ``url``."""
    return checkpoints_dir() / "url" / hashlib.sha256(url.encode()).hexdigest()[:16] / url.rsplit("/", 1)[-1]


def rot(path: Path) -> None:
    """Corrupt ``path`` as a failing disk does: its bytes change, its size and time do not."""
    info = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


# -- a cache that cannot be written ----------------------------------------------------------------------------


def test_a_cached_file_is_returned_without_any_write(tmp_path, monkeypatch):
    """A read-only cache (a shared, mounted one) still serves what it holds, offline too: no folder is made and
    no lock taken for a file that is there."""
    import filelock

    (tmp_path / "w.bin").write_bytes(PAYLOAD)

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(filelock, "FileLock", refuse)
    monkeypatch.setattr(Path, "mkdir", refuse)
    for offline in ("", "1"):
        monkeypatch.setenv("ATTNZOO_OFFLINE", offline)
        assert download_url("http://127.0.0.1:9/w.bin", tmp_path / "w.bin", sha256=SHA) == tmp_path / "w.bin"
        assert download_url("http://127.0.0.1:9/w.bin", tmp_path / "w.bin") == tmp_path / "w.bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]


def test_a_cache_folder_that_cannot_be_written_is_a_typed_error_naming_it(monkeypatch):
    """The lock (the first write) fails as on a read-only mount: the error names the folder and ATTNZOO_HOME."""
    import filelock

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    with http_server({"/w.pth": PAYLOAD}) as (base, log):
        with pytest.raises(WeightsError) as info:
            resolve_checkpoint(f"{base}/w.pth")
    message = str(info.value)
    assert str(url_cache_path(f"{base}/w.pth").parent) in message and "Read-only file system" in message
    assert "ATTNZOO_HOME" in message and log == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_a_read_only_cache_folder_for_real(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("ATTNZOO_HOME", str(home))
    (home / "checkpoints").chmod(0o555)
    try:
        with http_server({"/w.pth": PAYLOAD}) as (base, _):
            with pytest.raises(WeightsError, match="cannot write to the download folder .*ATTNZOO_HOME"):
                resolve_checkpoint(f"{base}/w.pth")
    finally:
        (home / "checkpoints").chmod(0o755)


def test_attnzoo_home_pointing_at_a_file_is_a_typed_error(monkeypatch, tmp_path):
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("ATTNZOO_HOME", str(tmp_path / "home"))
    with http_server({"/w.pth": PAYLOAD}) as (base, _):
        with pytest.raises(WeightsError, match=r"ATTNZOO_HOME \(.*home\) is a file, not a folder"):
            resolve_checkpoint(f"{base}/w.pth")


# -- corrupt cached files with a known sha256 ------------------------------------------------------------------


def test_a_corrupt_cached_download_is_fetched_again_once(tmp_path):
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        path = download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
        rot(path)
        assert download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False).read_bytes() == PAYLOAD
        assert download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False).read_bytes() == PAYLOAD
    assert len(log) == 2  # fetched again once, then served from the cache


@pytest.mark.parametrize("when", ["after it was read", "before it was read"])
def test_a_corrupt_copy_another_process_deletes_meanwhile_is_fetched_not_blamed(tmp_path, monkeypatch, when):
    """Another process deletes a corrupt download of attnzoo's own (to fetch it again) while this one reads it
    outside the lock: this one decides again under the lock, and fetches it, instead of calling the copy one
    placed by hand or failing on a file that is gone."""
    real = hub.sha256_file
    raced: list[Path] = []

    def racing(path):
        if raced or Path(path) != tmp_path / "w.bin":
            return real(path)
        raced.append(Path(path))
        if when == "before it was read":
            hub.forget_download(path)  # what the other process does, under its lock
            return real(path)
        digest = real(path)
        hub.forget_download(path)
        return digest

    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        rot(download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False))
        monkeypatch.setattr(hub, "sha256_file", racing)
        assert download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False).read_bytes() == PAYLOAD
    assert raced and len(log) == 2 and hub.is_own_download(tmp_path / "w.bin")


def test_a_mismatching_copy_in_a_read_only_cache_is_named_not_locked(tmp_path, monkeypatch):
    """A copy that cannot be used in a folder that cannot be written is named as such (placed by hand; attnzoo's
    own, corrupt, that cannot be fetched again there), not reported as a lock that cannot be taken. The first
    half is a guard (the code before judged every cached copy outside the lock)."""
    (tmp_path / "w.bin").write_bytes(b"mine")
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        rot(download_url(f"{base}/w.bin", tmp_path / "own.bin", sha256=SHA, progress=False))
        writable = os.access
        monkeypatch.setattr(
            os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path else writable(path, mode, **kw)
        )
        with pytest.raises(ChecksumError, match="placed there by hand.*kept"):
            download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
        with pytest.raises(ChecksumError, match="is corrupt .*cannot be fetched again there") as info:
            download_url(f"{base}/w.bin", tmp_path / "own.bin", sha256=SHA, progress=False)
    assert str(tmp_path / "own.bin") in str(info.value) and len(log) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own.bin", "own.bin.download.json", "own.bin.lock", "w.bin"]


def test_a_corrupt_cached_download_whose_server_copy_differs_too(tmp_path):
    with http_server({"/w.bin": PAYLOAD}) as (base, _):
        path = download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
    other = os.urandom(len(PAYLOAD))
    with http_server({"/w.bin": other}) as (base2, _):
        path.rename(tmp_path / "kept")
        (tmp_path / "w.bin.download.json").unlink()
        download_url(f"{base2}/w.bin", tmp_path / "w.bin", progress=False)  # the server's (other) file, recorded
        with pytest.raises(ChecksumError) as info:
            download_url(f"{base2}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
    message = str(info.value)
    assert "the server's file differs from the released one" in message
    assert f"{base2}/w.bin" in message and str(tmp_path / "w.bin") in message and ".part" not in message
    assert not (tmp_path / "w.bin").exists() and not (tmp_path / "w.bin.part").exists()


def test_a_corrupt_cached_download_is_kept_offline(tmp_path, monkeypatch):
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        path = download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
        rot(path)
        monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
        with pytest.raises(ChecksumError, match="corrupt") as info:
            download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
    assert str(path) in str(info.value) and "offline" in str(info.value)
    assert path.exists() and len(log) == 1


def test_a_mismatching_file_placed_by_hand_is_kept(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"mine")
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        with pytest.raises(ChecksumError, match="placed there by hand.*kept") as info:
            download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
    assert str(tmp_path / "w.bin") in str(info.value)
    assert (tmp_path / "w.bin").read_bytes() == b"mine" and log == []


def test_a_mismatching_cached_file_without_a_record_says_how_to_download_it_again():
    """A download of an older attnzoo (no record) in the cache is kept, and the error names it and says to delete
    it to download it again (not that attnzoo did not download it)."""
    entry = register_checkpoint(
        CheckpointEntry(name="tinynet.older_in1k", model="tinynet", url="http://127.0.0.1:9/older.pth", sha256=SHA)
    )
    try:
        cached = checkpoints_dir() / entry.cache_filename
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(PAYLOAD[:1000])
        with pytest.raises(ChecksumError) as info:
            resolve_checkpoint("tinynet.older_in1k", progress=False)
    finally:
        unregister_checkpoint("tinynet.older_in1k")
    message = str(info.value)
    assert "no download record (placed by hand, or downloaded by an older attnzoo)" in message
    assert f"delete {cached} and run again to download it again" in message and "did not download" not in message
    assert cached.read_bytes() == PAYLOAD[:1000]


def test_a_download_that_mismatches_names_the_url_and_the_destination(tmp_path):
    with http_server({"/w.bin": PAYLOAD}) as (base, _):
        with pytest.raises(ChecksumError) as info:
            download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256="0" * 64, progress=False)
    message = str(info.value)
    assert f"{base}/w.bin" in message and str(tmp_path / "w.bin") in message and ".part" not in message
    assert "--weights PATH" in message


def test_a_corrupt_hugging_face_copy_is_fetched_again_once(monkeypatch, tmp_path):
    import huggingface_hub

    blob = tmp_path / "model.safetensors"
    blob.write_bytes(b"rotten")
    calls = []

    def fake(repo_id, filename, *, revision=None, local_files_only=False, force_download=False):
        calls.append(force_download)
        if force_download:
            blob.write_bytes(PAYLOAD)
        return str(blob)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert hf_download("org/repo", "model.safetensors", sha256=SHA).read_bytes() == PAYLOAD
    assert calls == [False, True]
    blob.write_bytes(b"rotten")
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(ChecksumError, match="corrupt.*kept"):
        hf_download("org/repo", "model.safetensors", sha256=SHA)
    assert blob.read_bytes() == b"rotten"


def test_a_hugging_face_file_that_mismatches_when_first_fetched_is_fetched_and_hashed_once(monkeypatch, tmp_path):
    """Nothing cached: one download, hashed once; a mismatch then is the Hub's file, not a cached copy to fetch
    again. A cached copy that matches is used without asking the Hub."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    blob = tmp_path / "model.safetensors"
    calls, hashed = [], []

    def fake(repo_id, filename, *, revision=None, local_files_only=False, force_download=False):
        calls.append("cache" if local_files_only else ("forced" if force_download else "fetch"))
        if local_files_only and not blob.exists():
            raise LocalEntryNotFoundError("not in the cache")
        if not local_files_only:
            blob.write_bytes(b"upstream changed")
        return str(blob)

    real = hub.sha256_file
    monkeypatch.setattr(hub, "sha256_file", lambda path: hashed.append(path) or real(path))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    with pytest.raises(ChecksumError, match="changed upstream") as info:
        hf_download("org/repo", "model.safetensors", sha256=SHA)
    assert calls.count("fetch") + calls.count("forced") == 1 and len(hashed) == 1
    assert "fetched again" not in str(info.value) and str(blob) in str(info.value)
    blob.write_bytes(PAYLOAD)
    calls.clear()
    assert hf_download("org/repo", "model.safetensors", sha256=SHA) == blob
    assert calls == ["cache"]


# -- mistyped names ---------------------------------------------------------------------------------------------


def test_a_mistyped_checkpoint_name_suggests_the_registered_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    register_checkpoint(CheckpointEntry(name="tinynet.faults_in1k", model="tinynet", url="http://127.0.0.1:9/w.pth"))
    try:
        for typo in ("tinynet.faults_in1", "TINYNET.faults_in1k"):
            with pytest.raises(UnknownNameError, match="Did you mean: tinynet.faults_in1k"):
                resolve_checkpoint(typo)
        for path in ("missing.pth", "sub/missing", str(tmp_path / "missing.safetensors")):
            with pytest.raises(WeightsError, match="does not exist"):
                resolve_checkpoint(path)
        with pytest.raises(UnknownNameError) as info:
            resolve_checkpoint("tinynet.faults_in1k.onnx")  # close to a name: no word about files
        assert "nor a file" not in str(info.value) and "Did you mean: tinynet.faults_in1k" in str(info.value)
    finally:
        unregister_checkpoint("tinynet.faults_in1k")


@pytest.mark.parametrize("name", ["model.onnx", "my_weights.pht"])
def test_a_missing_file_of_an_unlisted_suffix_is_named_as_no_file_either(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownNameError) as info:
        resolve_checkpoint(name)
    assert str(info.value) == f"unknown checkpoint {name!r}, nor a file {name} in {tmp_path}."


# -- file:// URLs -----------------------------------------------------------------------------------------------


def test_file_urls_work_offline_and_a_missing_one_fails_at_once(tmp_path, monkeypatch):
    source = tmp_path / "w.pth"
    source.write_bytes(checkpoint_bytes())
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    assert load_checkpoint(source.as_uri(), progress=False)["model"]["w"].sum() == 3
    tries = []
    monkeypatch.setattr(hub, "_fetch_into", lambda *a, **k: tries.append(a))
    with pytest.raises(WeightsError, match="no such file") as info:
        resolve_checkpoint((tmp_path / "gone.pth").as_uri())
    assert tries == [] and "--weights none" not in str(info.value)
    assert not isinstance(info.value, OfflineError)


@pytest.mark.parametrize("form", ["file:{}", "file://localhost{}", "FILE://{}"])
def test_every_form_of_an_absolute_file_url_is_read_offline(tmp_path, monkeypatch, form):
    source = tmp_path / "w.bin"
    source.write_bytes(PAYLOAD)
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    url = form.format(source.as_posix())
    assert download_url(url, tmp_path / "out" / "w.bin", progress=False).read_bytes() == PAYLOAD


@pytest.mark.parametrize("url", ["file:w.bin", "file:./w.bin", "file:"])
def test_a_file_url_of_a_relative_path_fails_at_once(tmp_path, monkeypatch, url):
    """A relative path would be read from wherever the process happens to run: refused, in one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.bin").write_bytes(PAYLOAD)
    with pytest.raises(WeightsError, match="not a valid file URL: use file:///absolute/path") as info:
        download_url(url, tmp_path / "out" / "w.bin", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


# -- servers that answer oddly ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_waits")
def test_a_resumed_range_without_a_length_is_completed_not_cut(tmp_path):
    """A guard, not a regression test (it passes on the code before the completion check too): the check that
    keeps a cut range out of the cache (next test) must not refuse a whole remainder sent without a length."""
    with odd_server() as (base, log):
        assert download_url(f"{base}/nolen206/w.bin", tmp_path / "w.bin", progress=False).read_bytes() == PAYLOAD
        assert [entry[1] for entry in log] == [None, f"bytes={len(PAYLOAD) // 2}-"]


@pytest.mark.usefixtures("no_waits")
def test_a_resumed_range_cut_short_is_never_cached(tmp_path):
    with odd_server() as (base, _):
        with pytest.raises(WeightsError, match=rf"closed after \d+ of {len(PAYLOAD)} bytes") as info:
            download_url(f"{base}/short206/w.bin", tmp_path / "w.bin", retries=2, progress=False)
    assert not (tmp_path / "w.bin").exists()
    kept = (tmp_path / "w.bin.part").stat().st_size
    assert kept == len(PAYLOAD) // 2 + 2 * 1000 and f"{kept} bytes are kept" in str(info.value)


@pytest.mark.usefixtures("no_waits")
def test_a_resumed_range_whose_content_range_names_no_size_is_completed(tmp_path):
    """``Content-Range: bytes a-b/*`` names no size: the .part is continued (not taken for another version and
    fetched whole again), to the size first announced."""
    with odd_server() as (base, log):
        assert download_url(f"{base}/star206/w.bin", tmp_path / "w.bin", progress=False).read_bytes() == PAYLOAD
        assert [entry[1] for entry in log] == [None, f"bytes={len(PAYLOAD) // 2}-"]


@pytest.mark.usefixtures("no_waits")
def test_a_resumed_range_that_names_no_size_and_is_cut_is_never_cached(tmp_path):
    """Without a size in the Content-Range nor a length, the size first announced tells that the range was cut."""
    with odd_server() as (base, log):
        with pytest.raises(WeightsError, match=rf"closed after \d+ of {len(PAYLOAD)} bytes") as info:
            download_url(f"{base}/starshort206/w.bin", tmp_path / "w.bin", retries=2, progress=False)
    assert not (tmp_path / "w.bin").exists()
    kept = (tmp_path / "w.bin.part").stat().st_size
    assert kept == len(PAYLOAD) // 2 + 2 * 1000 and f"{kept} bytes are kept" in str(info.value)
    assert [entry[1] for entry in log][1:] == [f"bytes={len(PAYLOAD) // 2}-", f"bytes={len(PAYLOAD) // 2 + 1000}-"]


@pytest.mark.usefixtures("no_waits")
def test_a_file_answered_in_ranges_that_name_no_size_is_completed_to_the_size_first_announced(tmp_path):
    """``bytes a-b/*`` with a Content-Length ends at b, not at the end of the file: the size first announced
    says that more follows, so the next range is asked for, until the whole file is in."""
    with odd_server() as (base, log):
        assert download_url(f"{base}/starpiece206/w.bin", tmp_path / "w.bin", progress=False).read_bytes() == PAYLOAD
        half = len(PAYLOAD) // 2
        assert [entry[1] for entry in log] == [None, f"bytes={half}-", f"bytes={half + 100_000}-"]


@pytest.mark.usefixtures("no_waits")
def test_a_range_that_names_no_size_and_ends_short_of_the_size_first_announced_is_never_cached(tmp_path):
    with odd_server() as (base, _):
        with pytest.raises(WeightsError, match=rf"closed after \d+ of {len(PAYLOAD)} bytes") as info:
            download_url(f"{base}/starpiece206/w.bin", tmp_path / "w.bin", retries=1, progress=False)
    assert not (tmp_path / "w.bin").exists()
    kept = (tmp_path / "w.bin.part").stat().st_size
    assert kept == len(PAYLOAD) // 2 + 100_000 and f"{kept} bytes are kept" in str(info.value)


def test_a_repeated_content_length_is_read(tmp_path):
    with odd_server() as (base, _):
        assert download_url(f"{base}/badlen/w.bin", tmp_path / "w.bin", progress=False).read_bytes() == PAYLOAD


def test_a_web_page_served_with_status_200_is_refused(tmp_path, capsys):
    with odd_server() as (base, log):
        url = f"{base}/html/w.pth"
        assert main(["weights", "download", url]) == 1
        assert len(log) == 1
    err = capsys.readouterr().err
    assert f"download of {url} failed: the server sent a web page (text/html)" in err
    assert not url_cache_path(url).exists() and not list(url_cache_path(url).parent.glob("*.part"))


def test_weights_download_refuses_a_page_that_names_no_type_and_says_one_thing(tmp_path):
    """No Content-Type: the first bytes give it away; attnzoo's copy is deleted, and the message says so once
    (not also "delete the file")."""
    page = b"<!DOCTYPE html><html><body>Sign in</body></html>"
    with http_server({"/w.pth": page}) as (base, _):
        with pytest.raises(WeightsError, match="web page") as info:
            resolve_checkpoint(f"{base}/w.pth")
        with pytest.raises(WeightsError, match="web page") as again:
            load_checkpoint(f"{base}/w.pth", progress=False)
    for message in (str(info.value), str(again.value)):
        assert "was deleted: the next call fetches it again" in message and "delete the file" not in message
    assert not url_cache_path(f"{base}/w.pth").exists()


def test_a_redirect_loop_fails_at_once_in_one_line(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr(hub, "time", SimpleNamespace(sleep=slept.append))
    with odd_server() as (base, _):
        with pytest.raises(WeightsError, match=r"redirects in a loop \(HTTP 302\)") as info:
            download_url(f"{base}/loop/w.bin", tmp_path / "w.bin", progress=False)
    assert slept == [] and "\n" not in str(info.value)


@pytest.mark.parametrize("url", ["http://[::1/x.pth", "http://", "http://h:99999/x.pth", "http://h:abc/x.pth"])
def test_malformed_urls_fail_at_once(tmp_path, monkeypatch, url):
    slept = []
    monkeypatch.setattr(hub, "time", SimpleNamespace(sleep=slept.append))
    with pytest.raises(WeightsError, match="not a valid URL") as info:
        resolve_checkpoint(url)
    assert slept == [] and "--weights none" not in str(info.value)


@pytest.mark.parametrize("url", ["example.com/w.bin", "hxxp://example.com/w.bin", "ftp://127.0.0.1:9/w.bin", ""])
def test_a_url_of_a_scheme_that_cannot_be_downloaded_fails_at_once(tmp_path, monkeypatch, url):
    slept = []
    monkeypatch.setattr(hub, "time", SimpleNamespace(sleep=slept.append))
    with pytest.raises(WeightsError, match="is not a URL attnzoo can download") as info:
        download_url(url, tmp_path / "w.bin", progress=False)
    message = str(info.value)
    assert slept == [] and "\n" not in message and "http://, https://" in message
    assert list(tmp_path.iterdir()) == []


def test_a_destination_that_is_a_folder_fails_before_any_download(tmp_path):
    (tmp_path / "w.bin").mkdir()
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        with pytest.raises(WeightsError, match="is a folder, not a file") as info:
            download_url(f"{base}/w.bin", tmp_path / "w.bin", progress=False)
    assert str(tmp_path / "w.bin") in str(info.value) and ".part" not in str(info.value)
    assert log == [] and sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]


@pytest.mark.usefixtures("no_waits")
def test_a_full_disk_says_to_free_space(tmp_path, monkeypatch):
    class Full:
        def __init__(self, *args, **kwargs):
            pass

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            return 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(hub, "open", Full, raising=False)
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        with pytest.raises(WeightsError, match="no space left on the disk of .*Free space there") as info:
            download_url(f"{base}/w.bin", tmp_path / "w.bin", progress=False)
    assert len(log) == 1 and "after 4 attempts" not in str(info.value)


# -- files attnzoo did not download, archives --------------------------------------------------------------------


def test_a_file_placed_in_the_cache_by_hand_is_never_deleted(monkeypatch):
    """As the offline error tells: the file was put where attnzoo looks. Unreadable, it is named, not deleted."""
    entry = register_checkpoint(
        CheckpointEntry(name="tinynet.placed_in1k", model="tinynet", url="http://127.0.0.1:9/placed.pth")
    )
    try:
        placed = checkpoints_dir() / entry.cache_filename
        placed.parent.mkdir(parents=True, exist_ok=True)
        placed.write_bytes(b"\x80\x02garbage that is no pickle at all" * 10)
        for offline in ("1", ""):
            monkeypatch.setenv("ATTNZOO_OFFLINE", offline)
            with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint") as info:
                load_checkpoint("tinynet.placed_in1k", progress=False)
            assert placed.exists() and "deleted" not in str(info.value)
    finally:
        unregister_checkpoint("tinynet.placed_in1k")


def test_an_unreadable_download_of_an_older_attnzoo_is_kept_and_named():
    """A cut download an older attnzoo made (no record) is not deleted, but the error says how to fetch it again."""
    good = checkpoint_bytes()
    with http_server({"/w.pth": good}) as (base, log):
        path = resolve_checkpoint(f"{base}/w.pth", progress=False)
        path.write_bytes(good[: len(good) // 2])
        hub.download_record(path).unlink()
        for _ in range(2):
            with pytest.raises(WeightsError) as info:
                load_checkpoint(f"{base}/w.pth", progress=False)
            message = str(info.value)
            assert "no download record (placed by hand, or downloaded by an older attnzoo)" in message
            assert f"delete {path} and run again to download it again" in message
    assert path.read_bytes() == good[: len(good) // 2] and len(log) == 1


def test_an_unreadable_download_replaced_meanwhile_by_another_process_is_not_deleted(monkeypatch):
    """Between reading attnzoo's unreadable copy and deleting it, another process fetched a good one: that copy
    is kept (the deletion, under the lock, checks it is still the file read)."""
    import attnzoo.weights.loading as loading

    good = checkpoint_bytes()
    files = {"/w.pth": b"\x80\x02garbage that is no pickle at all" * 10}
    with http_server(files) as (base, _):
        url = f"{base}/w.pth"
        path = resolve_checkpoint(url, progress=False)
        real = loading.load_checkpoint_file

        def read_then_replace(*args, **kwargs):
            try:
                return real(*args, **kwargs)
            finally:  # the other process: deletes the copy and fetches the good file, under the lock
                with hub._cache_lock(path):
                    hub.forget_download(path)
                    (path.parent / "fresh").write_bytes(good)
                    info = (path.parent / "fresh").stat()
                    record = {"url": url, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
                    write_json(hub.download_record(path), record)
                    os.replace(path.parent / "fresh", path)

        monkeypatch.setattr(loading, "load_checkpoint_file", read_then_replace)
        with pytest.raises(WeightsError, match="changed meanwhile") as info:
            load_checkpoint(url, progress=False)
    assert "was deleted" not in str(info.value)
    assert path.read_bytes() == good and hub.is_own_download(path)


def test_an_unreadable_download_is_kept_offline(monkeypatch):
    with http_server({"/w.pth": b"\x80\x02garbage that is no pickle at all" * 10}) as (base, log):
        path = resolve_checkpoint(f"{base}/w.pth", progress=False)
        monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
        with pytest.raises(WeightsError, match="kept in offline mode") as info:
            load_checkpoint(f"{base}/w.pth", progress=False)
    assert path.exists() and str(path) in str(info.value) and len(log) == 1


@pytest.mark.parametrize("kind", ["zip", "tar", "gztar"])
def test_an_archive_is_named_as_such_and_kept(tmp_path, kind):
    import shutil

    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "model.pth").write_bytes(checkpoint_bytes())
    archive = Path(shutil.make_archive(str(tmp_path / "model"), kind, folder))
    with pytest.raises(WeightsError, match="is an archive .*extract the checkpoint"):
        load_checkpoint(archive)
    with http_server({"/" + archive.name: archive.read_bytes()}) as (base, log):
        for _ in range(2):
            with pytest.raises(WeightsError, match="is an archive .*extract the checkpoint") as info:
                load_checkpoint(f"{base}/{archive.name}", progress=False)
            assert "deleted" not in str(info.value)
    assert len(log) == 1 and url_cache_path(f"{base}/{archive.name}").exists()


def test_a_torch_zip_and_safetensors_are_no_archives(tmp_path):
    (tmp_path / "a.pth").write_bytes(checkpoint_bytes())
    assert load_checkpoint(tmp_path / "a.pth")["model"]["w"].sum() == 3
    save_state_dict({"w": torch.ones(2)}, tmp_path / "b.bin")
    assert resolve_checkpoint(tmp_path / "b.bin") == tmp_path / "b.bin"


# -- conversion ----------------------------------------------------------------------------------------------------


def test_converting_a_model_without_one_state_dict_is_a_typed_error(tmp_path):
    class Wrapper:  # NevaClip, FLUX Fill: parts loaded by their own libraries
        pass

    torch.save({"w": torch.ones(1)}, tmp_path / "src.pth")
    with pytest.raises(InvalidOptionError, match="Wrapper has no single state dict to convert"):
        convert_checkpoint(tmp_path / "src.pth", tmp_path / "out.safetensors", Wrapper())


def test_converting_into_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    import attnzoo.weights.convert as convert

    model = torch.nn.Linear(2, 2)
    torch.save(model.state_dict(), tmp_path / "src.pth")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(convert.tempfile, "mkdtemp", read_only)
        with pytest.raises(InvalidOptionError, match=r"out\.safetensors cannot be written: .*Read-only file system"):
            convert_checkpoint(tmp_path / "src.pth", tmp_path / "out" / "out.safetensors", model)


def test_a_full_disk_while_saving_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import attnzoo._io

    real_open = open

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            return False

    def full_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return Full(handle) if "w" in mode and str(path).endswith(".tmp") else handle

    monkeypatch.setattr(attnzoo._io, "open", full_open, raising=False)
    with pytest.raises(WeightsError, match=r"cannot write .*out\.safetensors: No space left on device: free space"):
        save_state_dict({"w": torch.ones(2)}, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_converting_into_a_read_only_folder_for_real(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.save(model.state_dict(), tmp_path / "src.pth")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(InvalidOptionError, match="cannot be written"):
            convert_checkpoint(tmp_path / "src.pth", tmp_path / "ro" / "out.safetensors", model)
    finally:
        (tmp_path / "ro").chmod(0o755)
