import hashlib
import os
import threading
from types import SimpleNamespace

import pytest

import attnzoo.weights.hub as hub
from attnzoo.errors import ChecksumError, OfflineError, WeightsError
from attnzoo.weights import checkpoints_dir, download_url, is_offline, sha256_file, url_reachable, verify_file
from tests.helpers import http_server

PAYLOAD = os.urandom(3 * (1 << 20) + 123)  # several chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_writes_verified_file(tmp_path):
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        path = download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "w.bin.part").exists()
    assert log == [("/w.bin", None)]


def test_cached_file_is_not_downloaded_again(tmp_path):
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
        download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
    assert len(log) == 1


def version(body: bytes) -> str:
    """The ETag the ``versioned_server`` fixture gives ``body``."""
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


@pytest.fixture
def no_waits(monkeypatch):
    monkeypatch.setattr(hub, "time", SimpleNamespace(sleep=lambda s: None))  # no back-off waits in a test


def cut_short(server, tmp_path, body: bytes, sent: int) -> str:
    """A download of ``body`` that stops after ``sent`` bytes, leaving its ``.part``; returns the URL."""
    server.files["/w.bin"], server.cut_after["/w.bin"] = body, sent
    with pytest.raises(WeightsError, match=rf"{sent} bytes are kept in .*w\.bin\.part: run the same command again"):
        download_url(server.url("/w.bin"), tmp_path / "w.bin", retries=0, progress=False)
    return server.url("/w.bin")


def test_resume_after_cut_connection(tmp_path, versioned_server):
    cut = 1_500_000
    versioned_server.files["/w.bin"], versioned_server.cut_after["/w.bin"] = PAYLOAD, cut
    path = download_url(versioned_server.url("/w.bin"), tmp_path / "w.bin", sha256=SHA, progress=False)
    assert path.read_bytes() == PAYLOAD
    log = versioned_server.log
    assert log[0][:2] == ("/w.bin", None)
    assert log[1] == ("/w.bin", f"bytes={cut}-", version(PAYLOAD))  # resumed, as long as the file is the same
    # no .part, no resume record left; the record that attnzoo downloaded it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "w.bin.download.json", "w.bin.lock"]


@pytest.mark.usefixtures("no_waits")
def test_resume_from_part_left_by_earlier_process(tmp_path, versioned_server):
    url = cut_short(versioned_server, tmp_path, PAYLOAD, 1000)
    download_url(url, tmp_path / "w.bin", sha256=SHA, progress=False)  # a later process
    assert versioned_server.log[1] == ("/w.bin", "bytes=1000-", version(PAYLOAD))
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD


def test_a_server_ignoring_if_range_does_not_splice_two_versions(tmp_path, versioned_server):
    """It answers the Range with the new version's bytes, but names that version (its ETag): fetched whole again."""
    url = cut_short(versioned_server, tmp_path, PAYLOAD, 1000)
    newer = bytes(255 - b for b in PAYLOAD)  # the same size: the Content-Range check alone cannot tell
    versioned_server.files["/w.bin"], versioned_server.ignore_if_range = newer, True
    assert download_url(url, tmp_path / "w.bin", progress=False).read_bytes() == newer


def test_a_part_of_unknown_version_is_not_resumed(tmp_path, versioned_server):
    """A ``.part`` with no record of the version it came from (an older release, another server) starts
    over: resuming it with the new file's tail would cache a file that is neither."""
    (tmp_path / "w.bin.part").write_bytes(os.urandom(1000))
    versioned_server.files["/w.bin"] = PAYLOAD
    download_url(versioned_server.url("/w.bin"), tmp_path / "w.bin", progress=False)
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD
    assert versioned_server.log == [("/w.bin", None, None)]


@pytest.mark.usefixtures("no_waits")
def test_a_part_of_an_older_release_starts_over(tmp_path, versioned_server):
    old = os.urandom(len(PAYLOAD))
    url = cut_short(versioned_server, tmp_path, old, 1000)
    versioned_server.files["/w.bin"] = PAYLOAD  # a new release at the same URL
    download_url(url, tmp_path / "w.bin", progress=False)
    assert versioned_server.log[1] == ("/w.bin", "bytes=1000-", version(old))  # "only if it is still that one"
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD  # the server sent the whole new file


@pytest.mark.usefixtures("no_waits")
def test_a_range_that_does_not_continue_the_part_starts_over(tmp_path, versioned_server):
    url = cut_short(versioned_server, tmp_path, PAYLOAD, 1000)
    versioned_server.wrong_range_start = True  # 206 from byte 0, whatever was asked
    download_url(url, tmp_path / "w.bin", progress=False)
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD
    assert [entry[1] for entry in versioned_server.log] == [None, "bytes=1000-", None]


@pytest.mark.usefixtures("no_waits")
def test_http_416_completes_a_part_only_when_it_is_the_whole_file(tmp_path, versioned_server):
    url = cut_short(versioned_server, tmp_path, PAYLOAD, 1000)
    part = tmp_path / "w.bin.part"
    part.write_bytes(part.read_bytes() + os.urandom(len(PAYLOAD)))  # longer than the file: not a finished download
    download_url(url, tmp_path / "w.bin", progress=False)
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD
    assert [entry[1] for entry in versioned_server.log] == [None, f"bytes={len(PAYLOAD) + 1000}-", None]

    (tmp_path / "w.bin").unlink()
    versioned_server.log.clear()
    cut_short(versioned_server, tmp_path, PAYLOAD, 1000)
    part.write_bytes(PAYLOAD)  # every byte arrived, the rename did not happen
    download_url(url, tmp_path / "w.bin", sha256=SHA, progress=False)
    assert [entry[1] for entry in versioned_server.log] == [None, f"bytes={len(PAYLOAD)}-"]  # 416: nothing left


@pytest.mark.usefixtures("no_waits")
def test_a_server_that_names_no_version_gives_no_resume(tmp_path, versioned_server):
    versioned_server.validators = False
    versioned_server.files["/w.bin"], versioned_server.cut_after["/w.bin"] = PAYLOAD, 1000
    url = versioned_server.url("/w.bin")
    with pytest.raises(WeightsError, match="1000 bytes were received, but .* run the same command again to start over"):
        download_url(url, tmp_path / "w.bin", retries=0, progress=False)
    assert not (tmp_path / "w.bin.part").exists()
    download_url(url, tmp_path / "w.bin", sha256=SHA, progress=False)
    assert [entry[1] for entry in versioned_server.log] == [None, None]


def test_checksum_mismatch_never_reaches_cache(tmp_path):
    with http_server({"/w.bin": PAYLOAD}) as (base, _):
        with pytest.raises(ChecksumError, match="sha256"):
            download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "w.bin").exists()
    assert not (tmp_path / "w.bin.part").exists()


def test_http_404_is_weights_error(tmp_path):
    with http_server({}) as (base, _):
        with pytest.raises(WeightsError, match="404"):
            download_url(f"{base}/missing.bin", tmp_path / "m.bin", progress=False)


def test_unreachable_host_fails_at_once_with_the_ways_out(tmp_path, closed_port):
    """No retries against a host that refuses connections, and no "resume" when nothing was received."""
    url = f"http://127.0.0.1:{closed_port}/none.bin"
    with pytest.raises(OfflineError) as info:
        download_url(url, tmp_path / "n.bin", progress=False)
    message = str(info.value)
    assert "cannot reach 127.0.0.1" in message and "resume" not in message
    assert "--weights none" in message and "ATTNZOO_OFFLINE=1" in message
    assert not (tmp_path / "n.bin.part").exists()


@pytest.mark.usefixtures("no_waits")
def test_failed_download_offers_resume_only_when_bytes_were_kept(tmp_path, monkeypatch):
    def half_then_cut(url, part, *, progress, timeout):
        hub._start_record(part, url, {"ETag": '"v1"'}, len(PAYLOAD))  # a server that names the version
        with open(part, "ab") as fh:
            fh.write(PAYLOAD[:1000])
        raise ConnectionResetError("connection reset by peer")

    def nothing(url, part, *, progress, timeout):
        raise TimeoutError("timed out")

    with http_server({}) as (base, _):  # a host that answers, so the probe passes
        monkeypatch.setattr(hub, "_fetch_into", half_then_cut)
        with pytest.raises(WeightsError, match=r"bytes are kept in .*w\.bin\.part: run the same command again"):
            download_url(f"{base}/w.bin", tmp_path / "w.bin", retries=1, progress=False)
        monkeypatch.setattr(hub, "_fetch_into", nothing)
        with pytest.raises(WeightsError) as info:
            download_url(f"{base}/v.bin", tmp_path / "v.bin", retries=1, progress=False)
    assert "resume" not in str(info.value) and "nothing was received" in str(info.value)
    assert "--weights none" in str(info.value)


def test_reachability_is_probed_once_per_host(monkeypatch, closed_port):
    calls = []
    real = hub._connects
    monkeypatch.setattr(hub, "_connects", lambda *target: calls.append(target) or real(*target))
    with http_server({}) as (base, _):
        assert url_reachable(f"{base}/a.bin") and url_reachable(f"{base}/b.bin")
    assert not url_reachable(f"http://127.0.0.1:{closed_port}/x") and not url_reachable(
        f"http://127.0.0.1:{closed_port}/y"
    )
    assert [target[1] for target in calls] == [int(base.rsplit(":", 1)[1]), closed_port]
    assert url_reachable("file:///nowhere/w.pth")  # nothing to connect to


def test_a_host_that_never_answers_costs_one_short_timeout(monkeypatch):
    """A black-holed network (packets dropped, name lookups hanging): the verdict comes while the
    connection attempt is still hanging, and is remembered."""
    release, events = threading.Event(), []

    def hangs(address, timeout=None):
        events.append("tried")
        release.wait(30)
        events.append("gave up")
        raise OSError("gave up")

    probes = []
    real = hub._connects
    monkeypatch.setattr(hub, "_connects", lambda *target: probes.append(target) or real(*target))
    monkeypatch.setattr(hub, "CONNECT_TIMEOUT", 0.1)
    monkeypatch.setattr(hub.socket, "create_connection", hangs)
    try:
        assert not url_reachable("https://hub.invalid/model.safetensors")
        assert not url_reachable("https://hub.invalid/other.safetensors")
        assert "gave up" not in events  # both answers came while the attempt still hung
        assert probes == [("hub.invalid", 443, 0.1)]
    finally:
        release.set()


def test_the_probe_goes_to_the_proxy_when_one_is_set(monkeypatch, closed_port):
    probed = []
    monkeypatch.setattr(hub, "_connects", lambda host, port, timeout: probed.append((host, port)) or False)
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("no_proxy", "")
    assert not url_reachable("https://example.org/w.pth")
    assert probed == [("127.0.0.1", closed_port)]


@pytest.mark.parametrize("var", ["ATTNZOO_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_fails_fast_naming_the_place(tmp_path, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    assert is_offline()
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        with pytest.raises(OfflineError) as info:
            download_url(f"{base}/w.bin", tmp_path / "w.bin", progress=False)
    assert log == []
    assert str(tmp_path / "w.bin") in str(info.value) and f"{base}/w.bin" in str(info.value)


def test_offline_mode_uses_cache(tmp_path, monkeypatch):
    (tmp_path / "w.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    assert download_url("http://127.0.0.1:9/w.bin", tmp_path / "w.bin", sha256=SHA).read_bytes() == PAYLOAD


def test_verify_and_sha256(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
    verify_file(f, hashlib.sha256(b"abc").hexdigest().upper())
    with pytest.raises(ChecksumError):
        verify_file(f, hashlib.sha256(b"abd").hexdigest())


def test_cache_dir_follows_attnzoo_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNZOO_HOME", str(tmp_path / "h"))
    assert checkpoints_dir() == tmp_path / "h" / "checkpoints"


def test_pretrained_loading_reads_the_cache_only_when_the_hub_cannot_be_used(monkeypatch, tmp_path):
    """The shared wrapper of the libraries' from_pretrained: cache only (and HF offline inside) with the Hub
    unreachable, a typed error naming what failed, a missing local path refused before any load."""
    import huggingface_hub.constants as hf_constants

    from attnzoo.errors import InvalidInputError

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with hub.pretrained_loading("the thing org/model", "org/model") as cache_only:
        assert cache_only and hf_constants.HF_HUB_OFFLINE
    with pytest.raises(OfflineError, match="the thing org/model"):
        with hub.pretrained_loading("the thing org/model", "org/model"):
            raise OSError("not in the cache")
    with pytest.raises(OfflineError, match="pass it as thing=") as info:
        with hub.pretrained_loading("the thing", "org/model", ways_out="pass it as thing="):
            raise OSError("not in the cache")
    assert "--weights" not in str(info.value)
    with hub.pretrained_loading("a folder", tmp_path) as cache_only:
        assert not cache_only  # a local folder is read as it is
    for missing in (tmp_path / "nowhere", "./nowhere", "a/b/c", "~/nowhere", "models\\nowhere"):
        with pytest.raises(WeightsError, match="no such folder"):
            with hub.pretrained_loading("a folder", missing):
                pytest.fail("the load ran")
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    with pytest.raises(WeightsError, match="cannot load the thing: bad config") as info:
        with hub.pretrained_loading("the thing", "org/model") as cache_only:
            assert not cache_only
            raise ValueError("bad config")
    assert not isinstance(info.value, OfflineError)
    with pytest.raises(InvalidInputError, match="ours"):  # attnzoo's own errors pass unchanged
        with hub.pretrained_loading("the thing", "org/model"):
            raise InvalidInputError("ours")
    with pytest.raises(RuntimeError, match="other"):  # errors not listed pass unchanged
        with hub.pretrained_loading("the thing", "org/model"):
            raise RuntimeError("other")


def test_a_lock_file_left_by_a_killed_download_does_not_block_the_next(tmp_path):
    """The ``.lock`` beside a download stays after it (filelock keeps Unix lock files on purpose: deleting a path
    another process is waiting on breaks the mutual exclusion); it holds nothing once its holder is gone, even one
    killed while holding it (the kernel drops a dead process's flock), so the next download takes it at once."""
    import signal
    import subprocess
    import sys
    import time

    lock = tmp_path / "w.bin.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import filelock,sys,time; filelock.FileLock({str(lock)!r}).acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert lock.exists()
    start = time.monotonic()
    with http_server({"/w.bin": PAYLOAD}) as (base, _):
        assert download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False).read_bytes() == PAYLOAD
    assert time.monotonic() - start < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "w.bin.download.json", "w.bin.lock"]
