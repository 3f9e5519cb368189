"""register_checkpoints: a model file's pretrained cfgs are the one description of its checkpoints."""

import pytest
from timm.models import generate_default_cfgs

from attnzoo.weights import PreprocessConfig, default_checkpoint, get_checkpoint, is_checkpoint, register_checkpoints
from attnzoo.weights import registry as R


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    monkeypatch.setattr(R, "_CHECKPOINTS", {})


CFGS = {
    "unit_net.lab_in1k": {
        "url": "https://example.org/unit_net_in1k.pth",
        "input_size": [3, 288, 288],
        "crop_pct": 0.95,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "num_classes": 1000,
        "first_conv": "stem.0",
        "license": "mit",
        "notes": ("released with the paper", "mirror it: the host is slow"),
        "filename": "unit_net_lab.pth",
        "sha256": "ab" * 32,
        "colour_order": "BGR",
        "manual_download": True,
    },
    "unit_net.lab_in22k": {
        "url": "https://example.org/unit_net_in22k.pth",
        "file_format": "safetensors",
        "notes": "one line",
    },
    "unit_net.untrained": {"num_classes": 10},  # no source: timm's cfg only
    "unit_hub.hf": {"hf_hub_id": "org/unit-hub", "hf_hub_filename": "model.safetensors"},
}


def test_each_checkpoint_with_a_source_becomes_an_entry():
    register_checkpoints(CFGS, converter="tests.unit:convert")
    entry = get_checkpoint("unit_net.lab_in1k")
    assert (entry.model, entry.url, entry.filename, entry.sha256) == (
        "unit_net",
        CFGS["unit_net.lab_in1k"]["url"],
        "unit_net_lab.pth",
        "ab" * 32,
    )
    assert entry.preprocess == PreprocessConfig(
        input_size=(3, 288, 288),
        crop_pct=0.95,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        colour_order="BGR",
    )
    assert entry.converter == "tests.unit:convert" and entry.manual_download and entry.license == "mit"
    assert entry.notes == "released with the paper mirror it: the host is slow"
    other = get_checkpoint("unit_net.lab_in22k")
    assert other.file_format == "safetensors" and other.notes == "one line" and other.preprocess == PreprocessConfig()
    assert not is_checkpoint("unit_net.untrained")
    hub = get_checkpoint("unit_hub.hf")
    assert (hub.hf_hub_id, hub.hf_filename, hub.url) == ("org/unit-hub", "model.safetensors", None)


def test_the_first_tag_of_a_model_is_its_default():
    register_checkpoints(CFGS, converter=None)
    assert get_checkpoint("unit_net.lab_in1k").default and not get_checkpoint("unit_net.lab_in22k").default
    assert default_checkpoint("unit_net").name == "unit_net.lab_in1k"
    assert get_checkpoint("unit_hub.hf").default


def test_returned_cfgs_are_timms_without_our_keys():
    cfgs = register_checkpoints(CFGS, converter=None)
    assert list(cfgs) == list(CFGS)
    assert set(cfgs["unit_net.lab_in1k"]) == set(CFGS["unit_net.lab_in1k"]) - set(R.CHECKPOINT_ONLY_KEYS)
    timm_cfg = generate_default_cfgs(cfgs)["unit_net"].cfgs["lab_in1k"]  # timm's PretrainedCfg takes every key left
    assert timm_cfg.url == CFGS["unit_net.lab_in1k"]["url"] and timm_cfg.crop_pct == 0.95


def test_registering_again_is_idempotent_but_a_conflict_raises():
    register_checkpoints(CFGS, converter=None)
    register_checkpoints(CFGS, converter=None)  # a module imported twice
    with pytest.raises(ValueError, match="already registered"):
        register_checkpoints({"unit_net.lab_in1k": {**CFGS["unit_net.lab_in1k"], "crop_pct": 1.0}}, converter=None)


def test_a_checkpoint_needs_a_tag():
    with pytest.raises(ValueError, match="tag"):
        register_checkpoints({"unit_net": {"url": "https://example.org/w.pth"}}, converter=None)


def test_an_unknown_checkpoint_is_one_unknown_name_error_built_whole():
    """The close names, in any case, come from UnknownNameError itself (the message is built once, not patched)."""
    from attnzoo.errors import UnknownNameError

    R.register_checkpoint(R.CheckpointEntry(name="unit_net.lab_in1k", model="unit_net", url="https://example.org/w"))
    error = R.unknown_checkpoint("UNIT_NET.lab_in1k", unmatched=", nor a file")
    assert error.suggestions == ["unit_net.lab_in1k"]
    assert str(error) == "unknown checkpoint 'UNIT_NET.lab_in1k'. Did you mean: unit_net.lab_in1k?"
    direct = UnknownNameError("checkpoint", "UNIT_NET.lab_in1k", ["unit_net.lab_in1k"], ignore_case=True)
    assert error.args == direct.args
    assert str(R.unknown_checkpoint("zzz", unmatched=", nor a file zzz")) == "unknown checkpoint 'zzz', nor a file zzz."
    # models and tasks keep matching by case
    assert str(UnknownNameError("model", "RESNET50", ["resnet50"])) == "unknown model 'RESNET50'."
