"""InLine-Swin / InLine-DeiT: official-checkpoint parity (fixtures from the official code),
full-size key layouts, timm integration, API and size errors."""

import pytest
import timm
import torch

import attnzoo
import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.vision import inline as I
from tests.vision._reference import assert_key_layout, key_manifest, load_fixture

SWIN_SMALL = {
    "embed_dim": 16,
    "depths": [1, 1, 2, 1],
    "num_heads": [1, 2, 2, 4],
    "attn_type": "IIMS1",
    "drop_path_rate": 0.0,
}
DEIT_SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.0}


GEOMETRY = ("attn_mask", "relative_position_index")  # buffers the model derives from its own geometry


def build_from_fixture(cfg, state, device="cpu"):
    """The official constructor keywords; ``norm_layer`` in config.json is a description of the default.

    The Swin geometry buffers are not taken from the fixture: the ones the model generated must
    equal the official ones (values and dtypes), and stay in place after loading.
    """
    kwargs = {k: v for k, v in cfg["constructor_kwargs"].items() if k != "norm_layer"}
    cls = I.InLineDeiT if "inline_deit" in cfg["official_class"] else I.InLineSwin
    model = cls(**kwargs).eval()
    generated = {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in GEOMETRY}
    official = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in GEOMETRY}
    assert set(generated) == set(official)
    for name, value in official.items():
        assert generated[name].dtype == value.dtype and torch.equal(generated[name], value), name
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 299}  # the official (DDP) wrapper
    model.load_state_dict(I.checkpoint_filter_fn(wrapped, model), strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in generated.items())
    assert sum(p.numel() for p in model.parameters()) == cfg["num_params"]
    return model.to(device)


def run_fixture(model, x):
    """Logits plus the fixture's intermediates: Swin ``layer{i}`` = stage output after patch merging,
    DeiT ``block{i}`` = block output tokens (cls first, before the final norm)."""
    out = {"y": model(x)}
    if isinstance(model, I.InLineSwin):
        stages = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        for i, (layer, stage) in enumerate(zip(model.layers, stages, strict=True)):
            out[f"layer{i}"] = stage if layer.downsample is None else layer.downsample(stage)
    else:
        blocks = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
        out.update({f"block{i}": torch.cat([cls, tokens], dim=1) for i, (tokens, cls) in enumerate(blocks)})
    return out


@pytest.mark.parity
@pytest.mark.parametrize("name", ["inline", "inline_swin_mixed", "inline_deit"])
def test_official_parity(reference_dir, name):
    f = load_fixture(reference_dir, name)
    model = build_from_fixture(f.cfg, f.state_dict)
    with torch.no_grad(), K.use_backend("torch"):
        got = run_fixture(model, f.inputs["x"])
    assert set(got) == set(f.outputs)  # logits and every intermediate the fixture names
    for key, want in f.outputs.items():
        torch.testing.assert_close(got[key], want, **f.tolerance, msg=lambda m, key=key: f"{name}/{key}: {m}")


@pytest.mark.parity
@pytest.mark.interpret
def test_official_parity_triton_backend(reference_dir, monkeypatch, triton_device):
    """The smallest fixture through the Triton InLine kernel (interpreted on CPU, native on CUDA)."""
    device = triton_device
    if device == "cuda":  # keep TF32 off, as the fixture README asks
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        torch.set_float32_matmul_precision("highest")
    f = load_fixture(reference_dir, "inline_deit")
    model = build_from_fixture(f.cfg, f.state_dict, device)
    with torch.no_grad(), K.use_backend("triton"):
        got = run_fixture(model, f.inputs["x"].to(device))
    assert set(got) == set(f.outputs)
    for key, want in f.outputs.items():
        torch.testing.assert_close(got[key].cpu(), want, **f.tolerance)


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["swin_tiny", "swin_small", "swin_base", "deit_tiny", "deit_small", "deit_base"])
def test_full_size_key_layouts(reference_dir, variant):
    """Our full-size models have exactly the official keys, shapes, dtypes (buffers included) and parameter count."""
    official = key_manifest(reference_dir, "inline", f"inline_{variant}")
    with torch.device("meta"):  # shapes only: fast even for InLine-Swin-B
        model = timm.create_model(f"inline_{variant}")
    assert_key_layout(model, official)


def test_variant_configs():
    with torch.device("meta"):
        swin_t, swin_b = (timm.create_model(n) for n in ("inline_swin_tiny", "inline_swin_base"))
    kinds = [[(b.kind, b.window_size, b.shift_size) for b in layer.blocks] for layer in swin_b.layers]
    assert kinds[0] == [("I", 56, 0)] * 2 and kinds[1] == [("I", 28, 0)] * 2  # InLine is global per stage
    assert kinds[2][:4] == [("I", 14, 0), ("I", 14, 0), ("S", 7, 0), ("S", 7, 3)]  # IIMS2: 2 InLine, then shifted Swin
    assert kinds[3] == [("S", 7, 0)] * 2  # 7x7 map: the window covers it, no shift
    assert [b.kind for b in swin_t.layers[2].blocks] == ["I"] * 6 and swin_t.layers[3].blocks[0].kind == "S"  # IIIS
    for name, size in (("inline_deit_tiny", 224), ("inline_deit_small", 288), ("inline_deit_base", 448)):
        cfg = timm.create_model(name, embed_dim=32, depth=1, num_heads=2).pretrained_cfg
        assert cfg["input_size"] == (3, size, size) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["url"].startswith("https://cloud.tsinghua.edu.cn/f/")
    names = {e.name: e for e in attnzoo.weights.list_checkpoints("inline*")}
    assert set(names) == {
        f"inline_{v}.official_in1k"
        for v in ("swin_tiny", "swin_small", "swin_base", "deit_tiny", "deit_small", "deit_base")
    }
    assert names["inline_swin_tiny.official_in1k"].cache_filename == "inline_swin_tiny_in1k.pth"
    assert names["inline_deit_base.official_in1k"].preprocess.input_size == (3, 448, 448)


@pytest.mark.parametrize(
    ("name", "small", "size"), [("inline_swin_tiny", SWIN_SMALL, 224), ("inline_deit_small", DEIT_SMALL, 288)]
)
def test_timm_registration_and_local_official_checkpoint(tmp_path, name, small, size):
    torch.manual_seed(0)
    src = timm.create_model(name, **small)  # 1000 classes, as released
    path = tmp_path / f"{name}_in1k.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 300}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **small)
    ours = attnzoo.create_model(name, weights=path, **small)
    for m in (model, ours):
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values(), strict=True))
    assert model.pretrained_cfg["input_size"] == (3, size, size) and model.pretrained_cfg["crop_pct"] == 0.875
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src.eval()(x))


def test_swin_forward_backward_features_and_api():
    model = timm.create_model("inline_swin_tiny", num_classes=3, **dict(SWIN_SMALL, drop_path_rate=0.1))
    x = torch.randn(2, 3, 224, 224)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    feats = model.forward_features(x)  # NHWC, as timm's Swin
    assert feats.shape == (2, 7, 7, 128) and model.forward_head(feats, pre_logits=True).shape == (2, 128)
    torch.testing.assert_close(model.forward_head(feats), model.head(feats.mean((1, 2))))
    stages = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(s.shape) for s in stages] == [(2, 16, 56, 56), (2, 32, 28, 28), (2, 64, 14, 14), (2, 128, 7, 7)]
    model.reset_classifier(7)
    assert model.get_classifier() is model.head and model(x).shape == (2, 7)
    features = timm.create_model("inline_swin_tiny", features_only=True, **SWIN_SMALL)
    assert features.feature_info.reduction() == [4, 8, 16, 32] and features.feature_info.channels() == [16, 32, 64, 128]
    assert [tuple(o.shape[1:]) for o in features(x)] == [(16, 56, 56), (32, 28, 28), (64, 14, 14), (128, 7, 7)]
    with pytest.raises(TypeError, match="unexpected keyword"):
        I.InLineSwin(no_such_option=1)


def test_deit_forward_backward_features_and_api():
    model = timm.create_model("inline_deit_tiny", num_classes=3, **dict(DEIT_SMALL, drop_path_rate=0.1))
    x = torch.randn(2, 3, 224, 224)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model.forward_features(x).shape == (2, 197, 32) and model.forward_head(
        model.forward_features(x), pre_logits=True
    ).shape == (2, 32)
    maps = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(maps) == 1 and maps[0].shape == (2, 32, 14, 14)
    model.reset_classifier(5, global_pool="avg")
    assert model(x).shape == (2, 5)
    features = timm.create_model("inline_deit_tiny", features_only=True, **DEIT_SMALL)
    assert len(features.feature_info) == 2 and [tuple(o.shape[1:]) for o in features(x)] == [(32, 14, 14)] * 2
    wide = timm.create_model(
        "inline_deit_tiny", img_size=(224, 160), **DEIT_SMALL
    )  # non-square grid: 14x10 residual conv
    assert wide(torch.randn(1, 3, 224, 160)).shape == (1, 1000)
    with pytest.raises(InvalidInputError, match="not supported"):
        I.InLineDeiT(distilled=True)


def test_residual_conv_skips_cls_and_uses_all_token_mean():
    """DeiT: the dynamic 3x3 conv runs on the patch tokens only, its kernel comes from all tokens' mean."""
    torch.manual_seed(0)
    attn = I.InLineAttention(8, 2).eval()
    x = torch.randn(1, 1 + 9, 8)
    with torch.no_grad(), K.use_backend("torch"):
        base = attn(x, (3, 3))
        _, _, v = attn.qkv(x).chunk(3, dim=-1)
        kernel = attn.residual(x.mean(1).unsqueeze(-1)).reshape(8, 1, 3, 3)
        local = torch.nn.functional.conv2d(v[:, 1:].transpose(1, 2).reshape(1, 8, 3, 3), kernel, padding=1, groups=8)
        q, k, v = (t.reshape(1, 10, 2, 4).transpose(1, 2) for t in attn.qkv(x).chunk(3, dim=-1))
        core = K.inline_attention(q, k, v).transpose(1, 2).reshape(1, 10, 8)
        core[:, 1:] += local.flatten(2).transpose(1, 2)
    torch.testing.assert_close(base, attn.proj(core))


@pytest.mark.parametrize(("name", "small"), [("inline_swin_tiny", SWIN_SMALL), ("inline_deit_tiny", DEIT_SMALL)])
def test_an_empty_batch_gives_an_empty_output(name, small):
    """The residual's per-sample depthwise conv has B * C groups: none for an empty batch."""
    model = timm.create_model(name, num_classes=3, **small).eval()
    with torch.no_grad():
        assert model(torch.randn(0, 3, 224, 224)).shape == (0, 3)
        stages = model.forward_intermediates(torch.randn(0, 3, 224, 224), intermediates_only=True)
        assert all(s.shape[0] == 0 and s.dim() == 4 for s in stages)


def test_sizes_the_architecture_cannot_take():
    with pytest.raises(InvalidInputError, match=r"56x56 windows do not tile it.*224, 448"):
        timm.create_model("inline_swin_tiny", img_size=256, **SWIN_SMALL)
    with pytest.raises(InvalidInputError, match="attn_type"):
        I.InLineSwin(attn_type="IIX", **{k: v for k, v in SWIN_SMALL.items() if k != "attn_type"})
    swin = timm.create_model("inline_swin_tiny", **SWIN_SMALL)
    with pytest.raises(InvalidInputError, match="built for 224x224"):
        swin(torch.randn(1, 3, 256, 256))
    deit = timm.create_model("inline_deit_small", **DEIT_SMALL)
    with pytest.raises(InvalidInputError, match="built for 288x288"):
        deit(torch.randn(1, 3, 224, 224))


def test_checkpoint_filter_resizes_and_regenerates_geometry():
    """DeiT pos_embed is resampled to the new grid; Swin shift masks follow the model's own geometry."""
    deit_288 = timm.create_model("inline_deit_small", **DEIT_SMALL)
    deit_224 = timm.create_model("inline_deit_small", img_size=224, **DEIT_SMALL)
    state = I.checkpoint_filter_fn({"model": deit_288.state_dict()}, deit_224)
    assert state["pos_embed"].shape == (1, 197, 32) and torch.equal(
        state["pos_embed"][:, 0], deit_288.pos_embed[:, 0].detach()
    )
    deit_224.load_state_dict(state, strict=True)
    swin_224 = timm.create_model("inline_swin_tiny", **SWIN_SMALL)
    swin_448 = timm.create_model("inline_swin_tiny", img_size=448, **SWIN_SMALL)
    official = {
        k: v for k, v in swin_224.state_dict().items() if not k.endswith("relative_position_index")
    }  # as if non-persistent
    state = I.checkpoint_filter_fn(official, swin_448)
    assert state["layers.2.blocks.1.attn_mask"].shape == (16, 49, 49)  # 28x28 map: 16 shifted windows, not 224 px's 4
    swin_448.load_state_dict(state, strict=True)
