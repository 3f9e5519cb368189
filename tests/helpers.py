"""Helpers for tests: where parity fixtures and kernels live (one rule each), and writers of real
file formats (PNG at 16 bits, HTTP with Range)."""

from __future__ import annotations

import http.server
import os
import struct
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# -- parity fixtures ---------------------------------------------------------------------------


def fixtures_required() -> bool:
    """Whether a missing parity fixture is a failure rather than a skip: in CI
    (``ATTNZOO_REQUIRE_FIXTURES=1``) and whenever ``ATTNZOO_REFERENCE_DIR`` names a folder on purpose."""
    return os.environ.get("ATTNZOO_REQUIRE_FIXTURES") == "1" or bool(os.environ.get("ATTNZOO_REFERENCE_DIR"))


def reference_root() -> Path:
    """``$ATTNZOO_REFERENCE_DIR``, else ``../shared/reference`` beside the checkout."""
    return Path(os.environ.get("ATTNZOO_REFERENCE_DIR") or ROOT.parent / "shared" / "reference")


def missing_fixture(message: str) -> NoReturn:
    """Skip the test, or fail it where fixtures are required (so CI never passes a parity test unrun)."""
    if fixtures_required():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def reference_path(reference_dir: Path, *parts: str) -> Path:
    """``reference_dir / parts`` when it exists, else :func:`missing_fixture`."""
    path = Path(reference_dir).joinpath(*parts)
    if not path.exists():
        missing_fixture(f"parity fixture {'/'.join(parts)} not found under {reference_dir}")
    return path


# -- where kernels run -------------------------------------------------------------------------


def kernel_device() -> str:
    """Where kernel tests put their tensors: the CUDA device when there is one (native Triton,
    compiled flex), else the CPU (Triton under its interpreter, eager flex)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def triton_unavailable(device: str) -> str | None:
    """Why Triton cannot run on ``device`` in this process, or None: on the CPU only the
    interpreter runs it, and ``TRITON_INTERPRET=1`` must be set before triton is imported."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on the CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)"
    return None


def triton_dtypes() -> list:
    """The dtypes the Triton kernels are checked in: fp32 and fp16 everywhere, bf16 natively on
    CUDA only (the interpreter computes bf16 wrongly)."""
    import torch

    return [torch.float32, torch.float16, *([torch.bfloat16] if kernel_device() == "cuda" else [])]


# -- file formats ------------------------------------------------------------------------------


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


class LocalHTTPServer(http.server.ThreadingHTTPServer):
    """The tests' local HTTP server. A client that hangs up mid-response (a download interrupted on purpose)
    is expected, not an error: socketserver would print its traceback to the test's stderr."""

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


@contextmanager
def http_server(files: dict[str, bytes], cut_after: dict[str, int] | None = None):
    """Serve ``files`` on 127.0.0.1 with Range support; yields (base_url, request_log)."""
    handler = type("Handler", (_Handler,), {"files": dict(files), "cut_after": dict(cut_after or {}), "requests": []})
    server = LocalHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # attnzoo.weights remembers per process whether a host:port answered: an earlier test's port that
    # nobody listened on any more may be this server's now
    import attnzoo.weights.hub as hub

    hub._VERDICTS.pop(("127.0.0.1", server.server_address[1]), None)
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


def parity_device(request, backend: str, monkeypatch) -> str:
    """Where a parity test runs a backend: the Triton device (CUDA where present, else the interpreter's CPU)
    for ``triton``, else the CPU; TF32 stays off on CUDA, as the fixtures' README asks."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    if device != "cpu":
        import torch

        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return device
