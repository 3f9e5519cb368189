"""L²ViT: official-checkpoint parity (fixture from the official code), timm integration, API."""

import pytest
import timm
import torch

import attnzoo
import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.vision import l2vit as L
from tests.helpers import parity_device
from tests.vision._reference import assert_key_layout, key_manifest, load_fixture


@pytest.mark.parity
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_official_parity_including_padded_windows(reference_dir, backend, monkeypatch, request):
    """Every output of the fixture: logits at 224 and 256 px (padded windows) and each stage's tokens."""
    device = parity_device(request, backend, monkeypatch)
    f = load_fixture(reference_dir, "l2vit")
    model = L.L2ViT(**f.cfg["constructor_kwargs"]).eval()
    model.load_state_dict(L.checkpoint_filter_fn({"model": f.state_dict, "model_ema": {}}, model), strict=True)
    assert sum(p.numel() for p in model.parameters()) == f.cfg["num_params"]
    model.to(device)
    x, x_256 = f.inputs["x"].to(device), f.inputs["x_256"].to(device)
    with torch.no_grad(), K.use_backend(backend):
        final, stages = model.forward_intermediates(x, output_fmt="NLC")
        got = {"y": model(x), "y_256": model(x_256)}  # 256 px: stage sides 64/32/16/8 pad to 7s
        features = model.forward_features(x)
    final, features, stages = final.cpu(), features.cpu(), [s.cpu() for s in stages]
    got = {k: v.cpu() for k, v in got.items()}
    got |= {f"stage{i}": stage for i, stage in enumerate(stages)}  # the official tokens [B, H*W, C]
    assert set(got) == set(f.outputs)
    for name, want in f.outputs.items():
        torch.testing.assert_close(got[name], want, **f.tolerance, msg=lambda m, name=name: f"{name}: {m}")
    # forward_features is timm's Swin NHWC map: the last stage's tokens after the final norm
    assert torch.equal(final, features) and features.shape == (len(x), 7, 7, stages[-1].shape[-1])
    with torch.no_grad():
        torch.testing.assert_close(features.flatten(1, 2), model.norm(stages[-1].to(device)).cpu())


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["Tiny", "Small", "Base", "Base_384"])
def test_full_size_key_layouts(reference_dir, variant):
    """Our full-size models have exactly the official keys, shapes, dtypes and parameter counts."""
    manifest = key_manifest(reference_dir, "l2vit", f"L2ViT_{variant}")
    with torch.device("meta"):  # shapes only
        model = timm.create_model(f"l2vit_{variant.lower()}")
    assert_key_layout(model, manifest)


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
