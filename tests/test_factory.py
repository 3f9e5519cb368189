import pytest
import torch
from safetensors.torch import save_file

import attnzoo
from attnzoo.errors import OfflineError, UnknownNameError, WeightsError
from attnzoo.registry import register_model
from attnzoo.weights import CheckpointEntry, PreprocessConfig, register_checkpoint, unregister_checkpoint


def test_create_timm_model_random():
    model = attnzoo.create_model("test_resnet", weights="none")
    assert not model.training
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_create_model_kwargs_device_dtype():
    model = attnzoo.create_model("test_resnet", num_classes=7, dtype=torch.float64, device="cpu")
    assert model(torch.randn(2, 3, 64, 64, dtype=torch.float64)).shape == (2, 7)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownNameError) as info:
        attnzoo.create_model("resnet5O")
    assert "resnet50" in info.value.suggestions


def test_weights_from_local_file(tmp_path):
    torch.manual_seed(1)
    src = attnzoo.create_model("test_resnet")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    for file in ("w.safetensors", "w.pth"):
        model = attnzoo.create_model("test_resnet", weights=tmp_path / file)
        assert all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values(), strict=True)
        )


def test_weights_that_do_not_fit_raise(tmp_path):
    save_file(attnzoo.create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="fc.weight"):
        attnzoo.create_model("test_resnet", weights=str(tmp_path / "w.safetensors"))


def test_pretrained_offline_without_cache_fails_fast(monkeypatch):
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    with pytest.raises(OfflineError, match="timm/resnet18"):
        attnzoo.create_model("resnet18", pretrained=True)


def test_invalid_pretrained_tag():
    with pytest.raises(UnknownNameError, match="resnet18.a1_in1k"):
        attnzoo.create_model("resnet18.no_such_tag", pretrained=True)


def test_registered_checkpoint_sets_preprocessing(tmp_path):
    src = attnzoo.create_model("test_resnet")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    entry = CheckpointEntry(
        name="test_resnet.unit",
        model="test_resnet",
        url=(tmp_path / "w.safetensors").as_uri(),
        preprocess=PreprocessConfig(input_size=(3, 72, 72), crop_pct=1.0, interpolation="bilinear", colour_order="BGR"),
    )
    register_checkpoint(entry)
    try:
        model = attnzoo.create_model("test_resnet.unit", pretrained=True)
        assert model.pretrained_cfg["input_size"] == (3, 72, 72)
        assert model.pretrained_cfg["colour_order"] == "BGR"
        assert all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values(), strict=True)
        )
    finally:
        unregister_checkpoint("test_resnet.unit")


def test_own_registry_and_list_models():
    @register_model(name="unit_toy_net")
    def _toy(width: int = 4):
        return torch.nn.Linear(width, 2)

    model = attnzoo.create_model("unit_toy_net", width=5)
    assert model.in_features == 5
    with pytest.raises(WeightsError, match="no pretrained checkpoint"):
        attnzoo.create_model("unit_toy_net", pretrained=True)
    assert "unit_toy_net" in attnzoo.list_models("unit_*")
    assert "resnet18" in attnzoo.list_models("resnet1*")
    assert all(n.startswith("resnet18.") for n in attnzoo.list_models("resnet18.*", pretrained=True))
