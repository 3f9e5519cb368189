"""``hf-hub:`` weights, read from a Hugging Face cache the test fills itself: the Hub is unreachable
in every test (tests/conftest.py), so only the cache can answer."""

import hashlib

import pytest
import torch
from safetensors.torch import save

import attnzoo
from attnzoo.errors import ChecksumError, OfflineError, WeightsError
from attnzoo.weights import hf_download, parse_hf_hub, resolve_checkpoint


def tiny_state():
    torch.manual_seed(3)
    return attnzoo.create_model("test_resnet", weights="none").state_dict()


def test_hf_hub_weights_come_from_the_cache_when_the_hub_is_unreachable(hf_cache):
    state = tiny_state()
    payload = save(state)
    cached = hf_cache("my-lab/tiny-resnet", "weights/model.safetensors", payload)
    assert resolve_checkpoint("hf-hub:my-lab/tiny-resnet/weights/model.safetensors") == cached
    model = attnzoo.create_model("test_resnet", weights="hf-hub:my-lab/tiny-resnet/weights/model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert hf_download("my-lab/tiny-resnet", "weights/model.safetensors", sha256=hashlib.sha256(payload).hexdigest())
    with pytest.raises(ChecksumError):
        hf_download("my-lab/tiny-resnet", "weights/model.safetensors", sha256="0" * 64)


def test_hf_hub_file_not_cached_fails_at_once_with_the_ways_out(hf_cache):
    with pytest.raises(OfflineError) as info:
        resolve_checkpoint("hf-hub:my-lab/tiny-resnet/model.safetensors")
    message = str(info.value)
    assert "huggingface.co" in message and "my-lab/tiny-resnet/model.safetensors" in message
    assert "--weights none" in message and "ATTNZOO_OFFLINE=1" in message
    assert "`hf download my-lab/tiny-resnet model.safetensors`" in message


def test_hf_hub_in_offline_mode_names_the_cache(hf_cache, monkeypatch):
    """The advice is the Hub client's download into its cache: a file copied into that folder by hand is
    never found there (the cache is keyed by repo and commit)."""
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline mode") as info:
        resolve_checkpoint("hf-hub:my-lab/tiny-resnet/model.safetensors")
    message = str(info.value)
    assert str(hf_cache.root) in message and "--weights none" in message
    assert "`hf download my-lab/tiny-resnet model.safetensors`" in message and "place it at" not in message
    hf_cache("my-lab/tiny-resnet", "model.safetensors", save(tiny_state()))
    assert resolve_checkpoint("hf-hub:my-lab/tiny-resnet/model.safetensors").is_file()


@pytest.mark.parametrize(
    "spec",
    [
        "hf-hub:",
        "hf-hub:my-lab",
        "hf-hub:my-lab/tiny-resnet",
        "hf-hub:my-lab//model.safetensors",
        "hf-hub:/tiny-resnet/model.safetensors",
        "hf-hub:my-lab/tiny-resnet/",
        "hf-hub:my lab/tiny-resnet/model.safetensors",
        "hf-hub:my-lab/tiny--resnet/model.safetensors",
        "hf-hub:-lab/x/model.safetensors",
    ],
)
def test_malformed_hf_hub_names_are_typed_errors(spec, hf_cache):
    with pytest.raises(WeightsError, match="hf-hub:|repo id"):
        resolve_checkpoint(spec)
    with pytest.raises(WeightsError):
        attnzoo.create_model("test_resnet", weights=spec)


def test_parse_hf_hub_keeps_folders_in_the_file_name():
    assert parse_hf_hub("hf-hub:timm/resnet18.a1_in1k/sub/dir/model.safetensors") == (
        "timm/resnet18.a1_in1k",
        "sub/dir/model.safetensors",
    )
