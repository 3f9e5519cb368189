"""Helpers that write real file formats for tests (PNG at 16 bits, HTTP with Range)."""

from __future__ import annotations

import http.server
import struct
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def write_png(path: Path, array: np.ndarray) -> Path:
    """A PNG written byte by byte, so 16-bit grey and 16-bit RGB are exactly what the spec says."""
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    bits = 16 if array.dtype == np.uint16 else 8
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = array.astype(">u2" if bits == 16 else "u1").tobytes()
    row = width * channels * bits // 8
    body = b"".join(b"\x00" + raw[i * row : (i + 1) * row] for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")
    )
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width x height`` pixels but holds almost no data (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + ihdr
        + crc
        + struct.pack(">I", len(idat))
        + b"IDAT"
        + idat
        + struct.pack(">I", zlib.crc32(b"IDAT" + idat) & 0xFFFFFFFF)
    )
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    cut_after: dict[str, int] = {}  # path -> bytes to send before dropping the connection (once)
    requests: list[tuple[str, str | None]] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        type(self).requests.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = self.cut_after.pop(self.path, None)
        if cut is not None:
            self.wfile.write(body[start:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body[start:])


@contextmanager
def http_server(files: dict[str, bytes], cut_after: dict[str, int] | None = None):
    """Serve ``files`` on 127.0.0.1 with Range support; yields (base_url, request_log)."""
    handler = type("Handler", (_Handler,), {"files": dict(files), "cut_after": dict(cut_after or {}), "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


def register_test_model(monkeypatch, name: str, builder, like: str) -> None:
    """Register ``builder`` under ``name`` for one test, as a model of the same family and tasks as ``like``."""
    import attnzoo.registry
    from attnzoo.factory import load_families

    load_families()
    entry = attnzoo.registry.get_model_entry(like)
    monkeypatch.setitem(
        attnzoo.registry._MODELS, name, attnzoo.registry.ModelEntry(name, builder, entry.family, entry.tasks)
    )
