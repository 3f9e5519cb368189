"""L²ViT: official-checkpoint parity (fixture from the official code), timm integration, API."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import attnzoo
import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.vision import l2vit as L


@pytest.mark.parity
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_official_parity_including_padded_windows(reference_dir, backend):
    folder = reference_dir / "l2vit"
    if not folder.is_dir():
        pytest.skip("l2vit fixture absent")
    cfg = json.loads((folder / "config.json").read_text())
    state, inputs, expected = (load_file(folder / f"{n}.safetensors") for n in ("state_dict", "inputs", "outputs"))
    model = L.L2ViT(**cfg["constructor_kwargs"]).eval()
    model.load_state_dict(L.checkpoint_filter_fn({"model": state, "model_ema": {}}, model), strict=True)
    tol = cfg["suggested_tolerance"]
    with torch.no_grad(), K.use_backend(backend):
        stages = model.forward_intermediates(inputs["x"], intermediates_only=True, output_fmt="NLC")
        logits, logits_256 = model(inputs["x"]), model(inputs["x_256"])  # 256 px: stage sides 64/32/16/8 pad to 7s
    torch.testing.assert_close(logits, expected["y"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(logits_256, expected["y_256"], atol=tol["atol"], rtol=tol["rtol"])
    for i, stage in enumerate(stages):
        torch.testing.assert_close(stage, expected[f"stage{i}"], atol=tol["atol"], rtol=tol["rtol"])


@pytest.mark.parity
def test_full_size_key_layouts(reference_dir):
    folder = reference_dir / "l2vit"
    for variant, name in (("tiny", "Tiny"), ("small", "Small"), ("base", "Base"), ("base_384", "Base_384")):
        keys = json.loads((folder / f"keys_L2ViT_{name}.json").read_text())
        keys = keys.get("keys", keys)
        ours = {k: list(v.shape) for k, v in timm.create_model(f"l2vit_{variant}").state_dict().items()}
        assert ours == {k: list(v["shape"]) for k, v in keys.items() if isinstance(v, dict) and "shape" in v}, variant


def test_forward_backward_features_and_checkpoint(tmp_path):
    small = dict(depths=[2, 2, 2, 2], dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4])
    torch.manual_seed(0)
    model = timm.create_model("l2vit_tiny", drop_path_rate=0.1, num_classes=4, **small)
    x = torch.randn(2, 3, 96, 96)  # 24/12/6/3 token maps: every window is padded
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    outs = timm.create_model("l2vit_tiny", features_only=True, **small)(x)
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 24, 24), (32, 12, 12), (48, 6, 6), (64, 3, 3)]
    torch.save(
        {"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 299},
        tmp_path / "L2ViT-Tiny-checkpoint-best-ema.pth",
    )
    loaded = attnzoo.create_model(
        "l2vit_tiny", weights=tmp_path / "L2ViT-Tiny-checkpoint-best-ema.pth", num_classes=4, **small
    )
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert loaded.pretrained_cfg["interpolation"] == "bicubic" and loaded.pretrained_cfg["mean"] == (
        0.485,
        0.456,
        0.406,
    )
    with pytest.raises(InvalidInputError, match="not supported"):
        L.L2ViT(last_proj=True)
