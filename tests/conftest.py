"""Test setup: Triton's interpreter on CPU-only machines (before attnzoo is imported), an
isolated ATTNZOO_HOME per test, and small helpers that write real on-disk formats."""

from __future__ import annotations

import os

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own empty cache; nothing reaches the real ~/.cache or the network."""
    home = tmp_path_factory.mktemp("attnzoo_home")
    monkeypatch.setenv("ATTNZOO_HOME", str(home))
    monkeypatch.delenv("ATTNZOO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import attnzoo.weights.hub as hub

    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    return home


@pytest.fixture(scope="session")
def photo():
    """A real photograph (scikit-image's chelsea), small, as an RGB PIL image."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea()).resize((96, 64))


@pytest.fixture(scope="session")
def tiny_model():
    """timm's smallest real classifier (1000 ImageNet classes), random weights, fixed seed."""
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False).eval()


@pytest.fixture(scope="session")
def reference_dir():
    """Parity fixtures made with the official code: $ATTNZOO_REFERENCE_DIR or ../shared/reference."""
    from pathlib import Path

    root = Path(
        os.environ.get("ATTNZOO_REFERENCE_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    )
    if not root.is_dir():
        pytest.skip(f"parity fixtures not found at {root} (set ATTNZOO_REFERENCE_DIR)")
    return root
