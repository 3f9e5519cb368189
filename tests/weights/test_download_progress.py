"""A download keeps what arrives as it arrives (a slow link fills the .part and moves the bar at once),
and Ctrl-C during ``attnzoo weights download`` says what was kept; the same command resumes from there."""

from __future__ import annotations

import http.server
import threading
import time

import attnzoo.weights.hub as hub
from attnzoo.cli import main
from attnzoo.weights import download_url
from tests.helpers import LocalHTTPServer

BODY = bytes(range(256)) * 1200  # 300 KiB: less than one of the reads a download used to wait for
FIRST = 100_000


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Sends ``FIRST`` bytes, then waits for ``release`` before the rest (a link that stalls)."""

    release: threading.Event

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        self.wfile.write(BODY[:FIRST])
        self.wfile.flush()
        self.release.wait(10)
        self.wfile.write(BODY[FIRST:])


def test_a_slow_download_keeps_what_has_arrived(tmp_path):
    release = threading.Event()
    server = LocalHTTPServer(("127.0.0.1", 0), type("H", (_SlowHandler,), {"release": release}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/w.bin"
    part = tmp_path / "w.bin.part"
    done: dict = {}
    fetch = threading.Thread(target=lambda: done.update(path=download_url(url, tmp_path / "w.bin", progress=False)))
    try:
        fetch.start()
        deadline, kept = time.monotonic() + 5, 0
        while time.monotonic() < deadline and kept < FIRST:  # the server holds back the rest meanwhile
            kept = part.stat().st_size if part.exists() else 0
            time.sleep(0.02)
        assert kept == FIRST  # on disk while the link stalls: an interrupt now keeps it
    finally:
        release.set()
        fetch.join(20)
        server.shutdown()
        server.server_close()
    assert done["path"].read_bytes() == BODY


def test_the_reads_return_what_has_arrived(tmp_path, monkeypatch):
    """Each piece read is written and counted at once (the bar moves with it); a response that cannot say
    what has arrived is read in small pieces."""

    class Response:
        status, headers = 200, {"Content-Length": str(len(BODY))}

        def __init__(self):
            self.at, self.sizes = 0, []

        def read(self, n=-1):
            self.sizes.append(n)
            piece = BODY[self.at : self.at + min(n, 1000)]
            self.at += len(piece)
            return piece

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    response = Response()
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda *a, **k: response)
    counted = []
    import tqdm.auto

    real_update = tqdm.auto.tqdm.update
    monkeypatch.setattr(tqdm.auto.tqdm, "update", lambda bar, n=1: (counted.append(n), real_update(bar, n))[1])
    part = tmp_path / "w.bin.part"
    hub._fetch_part("http://example.invalid/w.bin", part, progress=True, timeout=1)
    assert part.read_bytes() == BODY
    assert counted[:3] == [1000, 1000, 1000] and sum(counted) == len(BODY)
    assert max(response.sizes) <= 1 << 16


def test_ctrl_c_during_weights_download_says_what_was_kept_and_the_same_command_resumes(
    tmp_path, monkeypatch, capsys, versioned_server
):
    import tqdm.auto

    monkeypatch.setenv("ATTNZOO_HOME", str(tmp_path / "home"))
    body = bytes(range(256)) * 8000  # 2 MB: several reads
    versioned_server.files["/w.bin"] = body
    url = versioned_server.url("/w.bin")
    real_update = tqdm.auto.tqdm.update

    def interrupt(bar, n=1):  # Ctrl-C once the first bytes are in
        real_update(bar, n)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tqdm.auto.tqdm, "update", interrupt)
        assert main(["weights", "download", url]) == 130
    out, err = capsys.readouterr()
    err = err.rsplit("\r", 1)[-1]  # after the progress bar, which clears itself
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"interrupted: download of {url} stopped; ")
    assert "bytes are kept in" in err and "run the same command again to resume" in err
    kept = int(err.split("; ")[1].split()[0])
    assert 0 < kept < len(body)
    assert main(["weights", "download", url]) == 0
    path = capsys.readouterr().out.strip()
    assert open(path, "rb").read() == body
    assert versioned_server.log[-1][1] == f"bytes={kept}-"  # resumed, not started over
