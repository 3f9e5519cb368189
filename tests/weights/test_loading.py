import argparse
import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnzoo.errors import UnknownNameError, WeightsError
from attnzoo.weights import (
    CheckpointEntry,
    PreprocessConfig,
    convert_checkpoint,
    default_checkpoint,
    get_checkpoint,
    list_checkpoints,
    load_checkpoint_file,
    load_weights,
    register_checkpoint,
    resolve_checkpoint,
    unregister_checkpoint,
    unwrap_state_dict,
)
from tests.helpers import http_server


class Evil:
    """Unpickling this would run code (any global outside torch's allow-list)."""

    def __reduce__(self):
        return (print, ("pwned",))


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_safetensors_round_trip(tmp_path):
    sd = small_net().state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    loaded = load_checkpoint_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_safetensors_detected_by_content_not_suffix(tmp_path):
    sd = small_net().state_dict()
    save_file(sd, tmp_path / "w.bin")
    assert set(load_checkpoint_file(tmp_path / "w.bin")) == set(sd)


def test_pickle_needing_code_execution_is_refused(tmp_path):
    torch.save({"model": small_net().state_dict(), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="code execution"):
        load_checkpoint_file(tmp_path / "evil.pth")


def test_official_style_checkpoint_with_args_namespace_loads(tmp_path):
    """DeiT-style checkpoints keep argparse.Namespace beside the weights: harmless, allowed."""
    sd = small_net().state_dict()
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": 299}, tmp_path / "ck.pth")
    state = unwrap_state_dict(load_checkpoint_file(tmp_path / "ck.pth"))
    assert set(state) == set(sd)


def test_corrupt_files_are_weights_errors(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError):
        load_checkpoint_file(tmp_path / "bad.pth")
    good = tmp_path / "w.safetensors"
    save_file(small_net().state_dict(), good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="safetensors"):
        load_checkpoint_file(tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.pth")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd, "optimizer": {"lr": 1}},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
)
def test_unwrap_state_dict_layouts(wrap):
    sd = small_net().state_dict()
    out = unwrap_state_dict(wrap(sd))
    assert list(out) == list(sd)


def test_unwrap_without_state_dict_names_keys():
    with pytest.raises(WeightsError, match="epoch"):
        unwrap_state_dict({"epoch": 3, "best": 0.1})


def test_load_weights_exact_and_mismatch_messages(tmp_path):
    src, dst = small_net(), torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.save({"model": src.state_dict()}, tmp_path / "ck.pth")
    load_weights(dst, tmp_path / "ck.pth")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with pytest.raises(WeightsError, match=r"shape mismatch.*0\.weight \(3, 4\) vs \(5, 4\)"):
        load_weights(bigger, tmp_path / "ck.pth")
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="1 unexpected: extra.weight"):
        load_weights(dst, sd)


def test_registry_resolve_download_convert(tmp_path):
    """An 'official' checkpoint with other key names: registered, fetched, converted, loaded."""
    official = {f"backbone.{k}": v for k, v in small_net().state_dict().items()}
    torch.save({"model": official, "args": argparse.Namespace(epochs=1)}, tmp_path / "official.pth")
    payload = (tmp_path / "official.pth").read_bytes()

    def convert(sd, model):
        return {k.removeprefix("backbone."): v for k, v in sd.items()}

    with http_server({"/official.pth": payload}) as (base, _):
        entry = register_checkpoint(
            CheckpointEntry(
                name="tinynet.test_in1k",
                model="tinynet",
                url=f"{base}/official.pth",
                sha256=hashlib.sha256(payload).hexdigest(),
                converter=convert,
                default=True,
                preprocess=PreprocessConfig(input_size=(3, 32, 32)),
            )
        )
        try:
            assert get_checkpoint("tinynet.test_in1k") is entry
            assert default_checkpoint("tinynet") is entry
            assert [e.name for e in list_checkpoints("tinynet*")] == ["tinynet.test_in1k"]
            path = resolve_checkpoint("tinynet.test_in1k")
            assert path.read_bytes() == payload and path.name == "official.pth"
            model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
            out = convert_checkpoint("tinynet.test_in1k", tmp_path / "ours.safetensors", model, converter=convert)
            ours = load_file(out)
            assert all(torch.equal(ours[k], small_net().state_dict()[k]) for k in ours)
            with pytest.raises(UnknownNameError, match="tinynet.test_in1k"):
                get_checkpoint("tinynet.test_in1")
        finally:
            unregister_checkpoint("tinynet.test_in1k")


def test_resolve_rejects_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(UnknownNameError):
        resolve_checkpoint("no_such_checkpoint")


def test_entry_needs_a_source():
    with pytest.raises(ValueError):
        CheckpointEntry(name="a.b", model="a")
    entry = CheckpointEntry(
        name="a.b", model="a", converter="attnzoo.weights.loading:unwrap_state_dict", url="https://x/y/w.pth?dl=1"
    )
    assert entry.cache_filename == "w.pth"
    assert entry.resolve_converter() is unwrap_state_dict


def test_a_downloaded_web_page_is_named_as_such(tmp_path):
    from attnzoo.weights.loading import load_checkpoint_file

    (tmp_path / "model.pth").write_bytes(b"\n<!DOCTYPE html><html><body>Sign in to OneDrive</body></html>")
    with pytest.raises(WeightsError, match="web page.*delete the file"):
        load_checkpoint_file(tmp_path / "model.pth")
