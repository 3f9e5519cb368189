"""What every attnzoo classifier shares: timm's classifier API, gradient checkpointing."""

import json

import pytest
import timm
import torch

import attnzoo  # registers the families with timm
from attnzoo.cli import main
from attnzoo.datasets.imagenet import imagenet_synsets
from attnzoo.errors import WeightsError

SMALL = {
    "biformer_tiny": dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16, qk_dims=[16, 32, 64, 128]),
    "biformer_stl_nchw": dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16),
    "l2vit_tiny": dict(depths=[2, 2, 2, 2], dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4]),
    "sparsifiner_deit_small": dict(embed_dim=32, depth=2, num_heads=2),
    "inline_swin_tiny": dict(
        embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], attn_type="IIMS1", drop_path_rate=0.0
    ),
    "inline_deit_tiny": dict(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **SMALL[name])
    x = torch.randn(2, 3, 224, 224)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("name", list(SMALL))
def test_classifier_api(name):
    model = timm.create_model(name, num_classes=3, **SMALL[name]).eval()
    x = torch.randn(1, 3, 224, 224)
    assert model.get_classifier() is model.head and model(x).shape == (1, 3)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        timm.create_model(name, no_such_option=1)


@pytest.mark.parametrize("name", ["biformer_tiny", "l2vit_tiny", "sparsifiner_deit_small", "inline_deit_tiny"])
def test_cli_run_and_eval_with_an_official_checkpoint_file(name, tmp_path, photo, capsys):
    """`attnzoo run` / `attnzoo eval` with a full-size model and a local file in the official layout."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    checkpoint = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 299}, checkpoint)
    photo.save(tmp_path / "cat.png")
    expected = attnzoo.pipeline("image-classification", model=model)(tmp_path / "cat.png", top_k=1)[0].index
    assert (
        main(
            [
                "run",
                "image-classification",
                str(tmp_path / "cat.png"),
                "--model",
                name,
                "--weights",
                str(checkpoint),
                "--out",
                str(tmp_path / "run"),
                "--top-k",
                "1",
            ]
        )
        == 0
    )
    (result,) = json.loads((tmp_path / "run" / "results.json").read_text())["results"].values()
    assert result[0]["index"] == expected
    val = tmp_path / "imagenet" / "val" / imagenet_synsets()[0][expected]
    val.mkdir(parents=True)
    photo.save(val / "cat.png")
    assert (
        main(
            [
                "eval",
                "image-classification",
                "--model",
                name,
                "--weights",
                str(checkpoint),
                "--data",
                str(tmp_path / "imagenet"),
                "--out",
                str(tmp_path / "eval"),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["top1"] == 100.0


def saved(tmp_path, state: dict, name: str = "official.pth") -> dict:
    """``state`` in the official wrapper, as the ``pretrained_cfg_overlay`` that makes timm read it."""
    torch.save({"model": state, "epoch": 299}, tmp_path / name)
    return dict(file=str(tmp_path / name))


@pytest.mark.parametrize("name", ["l2vit_tiny", "inline_deit_tiny"])
def test_timm_adaptation_leaves_out_the_classifier_and_loads_everything_else(name, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model(name, **SMALL[name]).state_dict()
    overlay = saved(tmp_path, source)
    ten = timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay, **SMALL[name])
    assert ten.head.weight.shape[0] == 10
    assert all(torch.equal(v, source[k]) for k, v in ten.state_dict().items() if not k.startswith("head."))
    features = timm.create_model(
        name, pretrained=True, features_only=True, pretrained_cfg_overlay=overlay, **SMALL[name]
    )
    assert len(features(torch.randn(1, 3, 224, 224))) == len(features.feature_info)


@pytest.mark.parametrize("adapted", [dict(num_classes=10), dict(features_only=True), {}])
def test_a_checkpoint_that_does_not_fit_is_refused_also_when_timm_adapts_the_model(adapted, tmp_path):
    """timm loads with strict=False once it leaves the classifier out, and only logs the rest: a deeper
    sibling's file loaded in part, a file with every key prefixed loaded nothing, without an error."""
    small = SMALL["l2vit_tiny"]
    deeper = timm.create_model("l2vit_tiny", **{**small, "depths": [2, 2, 4, 2]}).state_dict()
    with pytest.raises(WeightsError, match=r"(?s)does not fit l2vit_tiny: .*stages\.2\.[23]\."):
        timm.create_model(
            "l2vit_tiny", pretrained=True, pretrained_cfg_overlay=saved(tmp_path, deeper), **adapted, **small
        )
    prefixed = {f"backbone.{k}": v for k, v in timm.create_model("l2vit_tiny", **small).state_dict().items()}
    with pytest.raises(WeightsError, match=r"(?s)does not fit l2vit_tiny: .*(missing|Missing).*backbone\."):
        timm.create_model(
            "l2vit_tiny", pretrained=True, pretrained_cfg_overlay=saved(tmp_path, prefixed, "p.pth"), **adapted, **small
        )
