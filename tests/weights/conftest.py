"""Fixtures for the weights layer: a Hugging Face cache the test fills itself, a port nobody listens
on, and a fresh reachability memory per test (nothing here touches the network)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


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
