"""Test setup: Triton's interpreter on CPU-only machines (before attnzoo is imported), an
isolated ATTNZOO_HOME per test, where parity fixtures and kernel tests run, and small shared inputs."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from tests import helpers

if helpers.kernel_device() == "cpu":  # Triton reads this once, at import: before attnzoo is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests draw the same examples on every run, so CI cannot turn red on a draw that no commit
# caused; HYPOTHESIS_PROFILE=explore draws new ones (and replays failures from .hypothesis/).
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


def pytest_collection_modifyitems(config, items):
    if helpers.kernel_device() == "cuda":
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models run as fast on one, and two stall each other on a shared 2-core machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


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
    """Parity fixtures made with the official code: $ATTNZOO_REFERENCE_DIR or ../shared/reference
    (a missing folder skips, or fails where fixtures are required: see tests/helpers.py)."""
    root = helpers.reference_root()
    if not root.is_dir():
        helpers.missing_fixture(f"parity fixtures not found at {root} (set ATTNZOO_REFERENCE_DIR)")
    return root


@pytest.fixture
def kernel_device():
    """The device kernel tests put their tensors on: the CUDA device where a GPU is present, else the CPU."""
    return helpers.kernel_device()


@pytest.fixture
def triton_device(kernel_device):
    """Where tests that force the Triton backend put their tensors: natively on CUDA where a GPU is
    present, else on the CPU under the interpreter (skipped if TRITON_INTERPRET was turned off)."""
    reason = helpers.triton_unavailable(kernel_device)
    if reason:
        pytest.skip(reason)
    return kernel_device
