import hashlib
import os

import pytest

from attnzoo.errors import ChecksumError, OfflineError, WeightsError
from attnzoo.weights import checkpoints_dir, download_url, is_offline, sha256_file, verify_file
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


def test_resume_after_cut_connection(tmp_path):
    cut = 1_500_000
    with http_server({"/w.bin": PAYLOAD}, cut_after={"/w.bin": cut}) as (base, log):
        path = download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert log[0] == ("/w.bin", None)
    assert log[1] == ("/w.bin", f"bytes={cut}-")  # the second request resumed, not restarted


def test_resume_from_part_left_by_earlier_process(tmp_path):
    (tmp_path / "w.bin.part").write_bytes(PAYLOAD[:1000])
    with http_server({"/w.bin": PAYLOAD}) as (base, log):
        download_url(f"{base}/w.bin", tmp_path / "w.bin", sha256=SHA, progress=False)
    assert log == [("/w.bin", "bytes=1000-")]
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD


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


def test_unreachable_server_gives_up_with_resume_hint(tmp_path):
    with pytest.raises(WeightsError, match="resume"):
        download_url("http://127.0.0.1:9/none.bin", tmp_path / "n.bin", retries=1, progress=False, timeout=2)


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
