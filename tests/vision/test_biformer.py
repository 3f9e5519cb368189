"""BiFormer: official-checkpoint parity (fixture from the official code), timm integration, API."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import attnzoo
import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.vision import biformer as B
from attnzoo.vision.layers import routing_attention


def load_fixture(reference_dir, name="biformer"):
    folder = reference_dir / name
    if not folder.is_dir():
        pytest.skip(f"{name} fixture absent")
    cfg = json.loads((folder / "config.json").read_text())
    return cfg, *(load_file(folder / f"{n}.safetensors") for n in ("state_dict", "inputs", "outputs"))


@pytest.mark.parity
@pytest.mark.parametrize("backend", ["reference", pytest.param("flex", marks=pytest.mark.slow)])
def test_official_parity(reference_dir, backend, monkeypatch):
    cfg, state, inputs, expected = load_fixture(reference_dir)
    model = B.BiFormer(**cfg["constructor_kwargs"]).eval()
    model.load_state_dict(B.checkpoint_filter_fn({"model": {f"module.{k}": v for k, v in state.items()}}, model), strict=True)
    routes = []
    real = routing_attention.region_routing
    monkeypatch.setattr(routing_attention, "region_routing", lambda *a: routes.append(real(*a)) or routes[-1])
    tol = cfg["suggested_tolerance"]
    with torch.no_grad(), K.use_backend(backend):
        logits, stages = model.forward_head(model.forward_features(inputs["x"])), model.forward_intermediates(inputs["x"], intermediates_only=True)
    torch.testing.assert_close(logits, expected["y"], atol=tol["atol"], rtol=tol["rtol"])
    for i, stage in enumerate(stages):
        torch.testing.assert_close(stage, expected[f"stage{i}"], atol=tol["atol"], rtol=tol["rtol"])
    names = sorted(k for k in expected if k.startswith("routing_idx"))
    assert len(routes) == 2 * len(names)  # forward_features, then forward_intermediates
    for name, route in zip(names, routes[: len(names)], strict=True):
        assert torch.equal(route.long(), expected[name]), name  # discrete outputs match exactly


@pytest.mark.parity
def test_full_size_key_layouts(reference_dir):
    """Our full-size models have exactly the official key names and shapes."""
    folder = reference_dir / "biformer"
    for variant in ("tiny", "small", "base"):
        keys = json.loads((folder / f"keys_biformer_{variant}.json").read_text())
        keys = keys.get("keys", keys)
        model = timm.create_model(f"biformer_{variant}")
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        official = {k: list(v["shape"]) for k, v in keys.items() if isinstance(v, dict) and "shape" in v}
        assert ours == official, variant


def test_timm_registration_and_local_official_checkpoint(tmp_path):
    torch.manual_seed(0)
    small = dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16, qk_dims=[16, 32, 64, 128])  # 1000 classes, as released
    src = timm.create_model("biformer_tiny", **small)
    torch.save({"model": src.state_dict(), "epoch": 300}, tmp_path / "biformer_tiny_in1k.pth")  # the official wrapper
    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "biformer_tiny_in1k.pth")), **small)
    ours = attnzoo.create_model("biformer_tiny", weights=tmp_path / "biformer_tiny_in1k.pth", **small)
    for m in (model, ours):
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values(), strict=True))
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and model.pretrained_cfg["crop_pct"] == 0.875
    assert "biformer_tiny.official_in1k" in [e.name for e in attnzoo.weights.list_checkpoints("biformer*")]


def test_forward_backward_and_api():
    small = dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16, qk_dims=[16, 32, 64, 128], num_classes=3)
    model = timm.create_model("biformer_tiny", drop_path_rate=0.1, **small)
    x = torch.randn(2, 3, 224, 224)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape == (2, 128, 7, 7) and model.forward_head(feats, pre_logits=True).shape == (2, 128)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    outs = timm.create_model("biformer_tiny", features_only=True, **small)(x)
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128] and outs[0].shape[-1] == 56
    with pytest.raises(InvalidInputError, match="divide by 7"):
        model(torch.randn(1, 3, 256, 256))
    with pytest.raises(InvalidInputError, match="not supported"):
        B.BiFormer(auto_pad=True)

