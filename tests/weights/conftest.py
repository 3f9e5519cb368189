"""Fixtures for the weights layer: a Hugging Face cache the test fills itself, a port nobody listens
on, a local server of versioned files, and a fresh reachability memory per test (nothing here touches
the network)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import LocalHTTPServer


@pytest.fixture(autouse=True)
def _fresh_reachability(monkeypatch):
    import attnzoo.weights.hub as hub

    monkeypatch.setattr(hub, "_VERDICTS", {})


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; call the fixture's value with (repo_id, filename, bytes) to put a file in it,
    laid out as ``huggingface_hub`` writes it (refs/main -> snapshots/<commit>/<file>)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def put(repo_id: str, filename: str, payload: bytes) -> Path:
        commit = "0123456789abcdef0123456789abcdef01234567"
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        path = repo / "snapshots" / commit / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        return path

    put.root = cache  # type: ignore[attr-defined]
    return put


@pytest.fixture
def closed_port() -> int:
    """A local TCP port with nothing listening: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _VersionedHandler(http.server.BaseHTTPRequestHandler):
    """Answers as a CDN does: each file has a version (ETag and Last-Modified, unless ``validators`` is
    off), a Range is honoured only while If-Range names the current version, and a range past the end is
    a 416 naming the size. ``wrong_range_start`` misbehaves: every 206 starts at byte 0; ``ignore_if_range``
    honours a Range whatever version its If-Range names (simple servers, some proxies)."""

    state: SimpleNamespace

    def log_message(self, *args):
        pass

    def do_GET(self):
        state = self.state
        state.log.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        if self.path not in state.files:
            self.send_error(404)
            return
        body = state.files[self.path]
        version = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        if_range = None if state.ignore_if_range else if_range
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng and if_range in (None, version) else 0
        if start >= len(body) and rng and if_range in (None, version):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.end_headers()
            return
        if rng and if_range in (None, version):
            start = 0 if state.wrong_range_start else start
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if state.validators:
            self.send_header("ETag", version)
            self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = state.cut_after.pop(self.path, None)
        self.wfile.write(body[start:cut] if cut is not None else body[start:])
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def versioned_server():
    """A local HTTP server with versioned files: ``.files`` (path -> bytes, change it to publish a new version),
    ``.cut_after`` (path -> bytes sent before the connection drops, once), ``.log`` of (path, Range, If-Range),
    ``.url(path)``; ``.validators``, ``.wrong_range_start`` and ``.ignore_if_range`` switch behaviours."""
    state = SimpleNamespace(
        files={}, cut_after={}, log=[], validators=True, wrong_range_start=False, ignore_if_range=False
    )
    handler = type("Handler", (_VersionedHandler,), {"state": state})
    server = LocalHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = lambda path: f"http://127.0.0.1:{server.server_address[1]}{path}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
