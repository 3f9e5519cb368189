"""FIFOs and devices where a reader expects a file: a FIFO with no writer makes ``open`` wait forever, so each
test's FIFO has a watcher that, for a few seconds, lets a reader that did open it go (it opens the write end and
closes it: the reader sees an empty file). Code that refuses the FIFO never opens it, and the watcher gives up."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from pathlib import Path

import pytest

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/null").exists(), reason="POSIX only")


def fifo(path: Path, seconds: float = 3.0) -> Path:
    """A FIFO at ``path``, watched for ``seconds`` (module docstring): a reader that opens it is released."""
    os.mkfifo(path)

    def release() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader waits in open()
            except OSError as err:
                if err.errno not in (errno.ENXIO, errno.ENOENT):
                    return
                time.sleep(0.02)
                continue
            with contextlib.suppress(OSError):
                os.close(fd)
            time.sleep(0.02)

    threading.Thread(target=release, daemon=True).start()
    return path
