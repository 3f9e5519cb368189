"""BiFormer: official-checkpoint parity (fixture from the official code), timm integration, API.

BiFormer-STL / STL-nchw have no output fixture: their key layouts are checked against the
official ones, the two layouts against each other on divisible sizes, and the refactored
(nchw) BRA on non-divisible sizes against a plain-torch transcription of the official math.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo
import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.vision import biformer as B
from attnzoo.vision.biformer import NCHWAttentionLePE, NCHWBiLevelRoutingAttention
from tests.helpers import parity_device
from tests.vision._reference import assert_key_layout, key_manifest, load_fixture


@pytest.mark.parity
@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("flex", marks=pytest.mark.slow), pytest.param("triton", marks=pytest.mark.slow)],
)
def test_official_parity(reference_dir, backend, monkeypatch, request):
    """Every output of the fixture from the plain forward ``model(x)``: the logits, each stage's map
    and every BRA block's routing; on the torch backend, forward_intermediates + forward_head too."""
    device = parity_device(request, backend, monkeypatch)
    f = load_fixture(reference_dir, "biformer")
    model = B.BiFormer(**f.cfg["constructor_kwargs"]).eval()
    model.load_state_dict(
        B.checkpoint_filter_fn({"model": {f"module.{k}": v for k, v in f.state_dict.items()}}, model), strict=True
    )
    routes, stages = [], []
    real = B.region_routing
    monkeypatch.setattr(B, "region_routing", lambda *a: routes.append(real(*a)) or routes[-1])
    for stage in model.stages:
        stage.register_forward_hook(lambda module, args, out: stages.append(out))
    x = f.inputs["x"][:1] if backend == "triton" else f.inputs["x"]  # the interpreter is slow: the first image only
    expected = {k: v[: len(x)] for k, v in f.outputs.items()}
    model.to(device)
    with torch.no_grad(), K.use_backend(backend):
        logits = model(x.to(device)).cpu()
    torch.testing.assert_close(logits, expected["y"], **f.tolerance)
    compared = {"y"}
    for i, stage in enumerate(stages):
        torch.testing.assert_close(stage.cpu(), expected[f"stage{i}"], **f.tolerance)
        compared.add(f"stage{i}")
    names = sorted(k for k in expected if k.startswith("routing_idx"))
    assert len(routes) == len(names)
    for name, route in zip(names, routes, strict=True):
        # discrete outputs match exactly, as sets (the order of near-equal routing logits may differ)
        assert torch.equal(route.cpu().long().sort(-1).values, expected[name].sort(-1).values), name
        compared.add(name)
    assert compared == set(expected)
    if backend == "torch":  # timm's API path computes the same
        with torch.no_grad():
            final, intermediates = model.forward_intermediates(x)
            assert torch.equal(model.forward_head(final), logits)
        assert all(torch.equal(a, b) for a, b in zip(intermediates, stages[: len(intermediates)], strict=True))


@pytest.mark.parity
@pytest.mark.parametrize("backend", ["torch", pytest.param("flex", marks=pytest.mark.slow)])
def test_bra_module_official_parity(reference_dir, backend):
    """The official BRA module's fixture, loaded strictly into our BiLevelRoutingAttention and called
    as the official one was (``ret_attn_mask=True``): output, routing weights and indices, attention."""
    f = load_fixture(reference_dir, "biformer_bra_op")
    assert f.cfg["forward_call"].startswith("module(x, ret_attn_mask=True)")
    module = B.BiLevelRoutingAttention(**f.cfg["constructor_kwargs"]).eval()
    module.load_state_dict(f.state_dict, strict=True)
    assert sum(p.numel() for p in module.parameters()) == f.cfg["num_params"]
    with torch.no_grad(), K.use_backend(backend):
        y, r_weight, r_idx, attn_weight = module(f.inputs["x"], ret_attn_mask=True)
        plain = module(f.inputs["x"])
    got = {"y": y, "r_weight": r_weight, "attn_weight": attn_weight}
    assert set(got) | {"r_idx"} == set(f.outputs)
    assert r_idx.dtype == torch.int64 and torch.equal(r_idx, f.outputs["r_idx"])  # discrete: exactly, in order
    assert torch.equal(plain, y)
    for name, ours in got.items():
        torch.testing.assert_close(ours, f.outputs[name], **f.tolerance, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["tiny", "small", "base", "stl", "stl_nchw"])
def test_full_size_key_layouts(reference_dir, variant):
    """Our full-size models have exactly the official keys, shapes, dtypes and parameter counts."""
    manifest = key_manifest(reference_dir, "biformer", f"biformer_{variant}")
    with torch.device("meta"):  # shapes only
        model = timm.create_model(f"biformer_{variant}")
    assert_key_layout(model, manifest)


def test_timm_registration_and_local_official_checkpoint(tmp_path):
    torch.manual_seed(0)
    small = dict(
        depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16, qk_dims=[16, 32, 64, 128]
    )  # 1000 classes, as released
    src = timm.create_model("biformer_tiny", **small)
    torch.save({"model": src.state_dict(), "epoch": 300}, tmp_path / "biformer_tiny_in1k.pth")  # the official wrapper
    model = timm.create_model(
        "biformer_tiny",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "biformer_tiny_in1k.pth")),
        **small,
    )
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


def test_embed_dim_without_qk_dims_brings_its_own():
    """The released models all have qk_dims == embed_dim; the preset's qk_dims used to stay and the
    first forward failed in the kernel."""
    model = timm.create_model("biformer_tiny", embed_dim=[32, 32, 64, 64], depth=[1] * 4, head_dim=16, num_classes=3)
    assert [stage[0].attn.qk_dim for stage in model.stages[:3]] == [32, 32, 64]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 3)


@pytest.mark.parametrize("qk_dim", [8, 32])
def test_bra_with_qk_dim_other_than_dim_matches_the_oracle(qk_dim):
    """The official BRA allows qk_dim != dim (q, k narrower or wider than v); the kernel takes one
    head width, so the module pads the narrower side with zeros, which changes nothing."""
    from attnzoo.kernels import oracle

    torch.manual_seed(0)
    bra = B.BiLevelRoutingAttention(16, num_heads=2, n_win=2, qk_dim=qk_dim, topk=2).eval()
    x = torch.randn(2, 4, 6, 16)
    with torch.no_grad():
        q, k, v = bra.qkv(x.reshape(2, 24, 16))
        groups = bra.groups(4, 6, x.device)
        route = K.region_routing(q, k, groups, 2, bra.scale)
        heads = lambda t: t.reshape(2, 24, 2, -1)  # noqa: E731
        out = oracle.grouped_attention(heads(q), heads(k), heads(v), groups, groups, route, bra.scale)
        out = out.reshape(2, 4, 6, 16) + bra.lepe(v.reshape(2, 4, 6, 16).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(bra(x), bra.wo(out), atol=1e-5, rtol=1e-5)
    model = timm.create_model("biformer_tiny", embed_dim=[16] * 4, qk_dims=[qk_dim] * 4, depth=[1] * 4, head_dim=8)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl", "biformer_stl_nchw"])
def test_an_empty_batch_gives_an_empty_output(name):
    model = timm.create_model(name, num_classes=3, **STL_SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(0, 3, 224, 224)).shape == (0, 3)
        stages = model.forward_intermediates(torch.randn(0, 3, 224, 224), intermediates_only=True)
    assert [tuple(s.shape) for s in stages] == [(0, 16, 56, 56), (0, 32, 28, 28), (0, 64, 14, 14), (0, 128, 7, 7)]


# -- BiFormer-STL and STL-nchw ----------------------------------------------------------------

STL_SMALL = dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16)  # heads 1, 2, 4, 8


def legacy_to_nchw(state):
    """A biformer_stl state dict as biformer_stl_nchw weights: rename BRA projections, linear -> 1x1 conv."""
    out = {}
    for k, v in state.items():
        k = k.replace(".attn.qkv.qkv.", ".attn.qkv_linear.").replace(".attn.wo.", ".attn.output_linear.")
        out[k] = v[..., None, None] if k.startswith("stages.") and k.endswith("weight") and v.dim() == 2 else v
    return out


def randomise(model):
    """Non-trivial weights and BN statistics (eval mode uses the running stats)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                scale_like = "running_var" in name or ("norm" in name and name.endswith("weight"))
                t.copy_(torch.rand_like(t) + 0.5 if scale_like else torch.randn_like(t) * 0.2)
    return model.eval()


def test_stl_layouts_agree_on_divisible_sizes():
    """Legacy and nchw BRA are the same math when the maps divide into regions (official author, issue #19)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 112, 112)  # stage maps 28, 14, 7, 3
    # every stage routed (stage 4: one region, i.e. global attention through BRA): the whole model agrees
    kw = dict(STL_SMALL, n_wins=(7, 7, 7, 1), topks=(1, 4, 16, 1), num_classes=5)
    legacy = randomise(timm.create_model("biformer_stl", **kw))
    nchw = timm.create_model("biformer_stl_nchw", **kw).eval()
    nchw.load_state_dict(legacy_to_nchw(legacy.state_dict()), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(nchw(x), legacy(x), atol=2e-5, rtol=1e-4)
    # as released, stage 4 differs: LePE on the input (legacy AttentionLePE) vs on v (nchwAttentionLePE)
    legacy = randomise(timm.create_model("biformer_stl", **STL_SMALL))
    nchw = timm.create_model("biformer_stl_nchw", **STL_SMALL).eval()
    nchw.load_state_dict(legacy_to_nchw(legacy.state_dict()), strict=True)
    with torch.no_grad():
        ours, theirs = (
            nchw.forward_intermediates(x, intermediates_only=True),
            legacy.forward_intermediates(x, intermediates_only=True),
        )
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ours[3], theirs[3], atol=1e-3)


def official_nchw_bra(m, x):
    """Plain-torch transcription of the official nchwBRA + regional_routing_attention_torch (gather-based).

    Region size (H // n_win, W // n_win); region descriptors by avg_pool2d(ceil_mode=True,
    count_include_pad=False); unscaled routing; q, k, v zero-padded after the projection with
    the padded keys left unmasked; output cropped; LePE on v; 1x1 output conv.
    """
    N, C, H, W = x.shape
    nh, hd = m.num_heads, C // m.num_heads
    rh, rw = H // m.n_win, W // m.n_win
    q, k, v = F.conv2d(x, m.qkv_linear.weight, m.qkv_linear.bias).chunk(3, dim=1)
    q_r = F.avg_pool2d(q.detach(), (rh, rw), ceil_mode=True, count_include_pad=False)
    k_r = F.avg_pool2d(k.detach(), (rh, rw), ceil_mode=True, count_include_pad=False)
    gh, gw = q_r.shape[-2:]
    G, T = gh * gw, rh * rw
    idx = torch.topk(q_r.flatten(2).transpose(1, 2) @ k_r.flatten(2), k=m.topk, dim=-1).indices  # [N, G, topk]

    def regions(t):  # zero-pad to whole regions, then [N, nh, G, T, hd]
        t = F.pad(t, (0, gw * rw - W, 0, gh * rh - H)).reshape(N, nh, hd, gh, rh, gw, rw)
        return t.permute(0, 1, 3, 5, 4, 6, 2).reshape(N, nh, G, T, hd)

    qs, ks, vs = regions(q), regions(k), regions(v)
    index = idx[:, None, :, :, None, None].expand(N, nh, G, m.topk, T, hd)
    kg = torch.gather(ks[:, :, None].expand(N, nh, G, G, T, hd), 3, index).flatten(3, 4)
    vg = torch.gather(vs[:, :, None].expand(N, nh, G, G, T, hd), 3, index).flatten(3, 4)
    out = torch.softmax((qs * m.scale) @ kg.transpose(-1, -2), dim=-1) @ vg
    out = (
        out.reshape(N, nh, gh, gw, rh, rw, hd)
        .permute(0, 1, 6, 2, 4, 3, 5)
        .reshape(N, C, gh * rh, gw * rw)[:, :, :H, :W]
    )
    return F.conv2d(out + m.lepe(v), m.output_linear.weight, m.output_linear.bias)


def check_nchw_bra(H, W, n_win, topk, dim=16, heads=2, batch=2, device="cpu"):
    torch.manual_seed(0)
    m = NCHWBiLevelRoutingAttention(dim, num_heads=heads, n_win=n_win, topk=topk, side_dwconv=5).to(device)
    x = torch.randn(batch, dim, H, W).to(device).requires_grad_()
    y = m(x)
    d_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *m.parameters()], d_y)
    y_ref = official_nchw_bra(m, x)
    ref_grads = torch.autograd.grad(y_ref, [x, *m.parameters()], d_y)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "H, W, n_win, topk",
    [
        (11, 9, 3, 3),  # 3x3 regions, 4x3 of them (more than n_win), partial ones zero-padded; gathering path
        (11, 9, 3, 5),  # the same, on the dense masked-SDPA path of the torch backend
        (20, 23, 7, 16),  # a released stage config (n_win 7, topk 16) on a non-divisible map
    ],
)
def test_nchw_bra_pads_as_the_official_code(H, W, n_win, topk):
    check_nchw_bra(H, W, n_win, topk)


@pytest.mark.interpret
def test_nchw_bra_triton_backend(triton_device):
    with K.use_backend("triton"):
        check_nchw_bra(7, 8, 3, 2, dim=8, batch=1, device=triton_device)


def test_nchw_attention_lepe_matches_official_math():
    """Stage 4 of biformer_stl_nchw: 8 heads, head_dim ** -0.5, bias-free qkv, LePE on v (not on x)."""
    torch.manual_seed(0)
    m = NCHWAttentionLePE(32)
    x = torch.randn(2, 32, 5, 6)
    B, C, H, W = x.shape
    q, k, v = F.conv2d(x, m.qkv.weight).chunk(3, dim=1)
    heads = lambda t: t.reshape(B, 8, C // 8, H * W).transpose(-1, -2)  # noqa: E731
    attn = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) * (C // 8) ** -0.5, dim=-1)
    out = (attn @ heads(v)).transpose(-1, -2).reshape(B, C, H, W) + m.lepe(v)
    torch.testing.assert_close(m(x), F.conv2d(out, m.proj.weight, m.proj.bias), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["biformer_stl", "biformer_stl_nchw"])
def test_stl_local_official_checkpoint_and_api(tmp_path, name):
    torch.manual_seed(0)
    src = timm.create_model(name, **STL_SMALL)  # 1000 classes, as released
    path = tmp_path / f"{name}_in1k.pth"
    torch.save(
        {"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 300}, path
    )  # the official wrapper
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **STL_SMALL)
    ours = attnzoo.create_model(name, weights=path, **STL_SMALL)
    for m in (model, ours):
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values(), strict=True))
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["first_conv"] == "downsample_layers.0.0" and cfg["url"].endswith("/root/content")
    assert f"{name}.official_in1k" in [e.name for e in attnzoo.weights.list_checkpoints("biformer_stl*")]

    x = torch.randn(2, 3, 112, 112)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape == (2, 128, 3, 3) and model.forward_head(feats, pre_logits=True).shape == (2, 128)
    final, stages = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [tuple(s.shape[1:]) for s in stages] == [(16, 28, 28), (32, 14, 14), (64, 7, 7), (128, 3, 3)]
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    features = timm.create_model(name, features_only=True, out_indices=(1, 3), **STL_SMALL)
    assert features.feature_info.channels() == [32, 128] and features.feature_info.reduction() == [8, 32]
    assert [tuple(o.shape) for o in features(x)] == [(2, 32, 14, 14), (2, 128, 3, 3)]

    other = "biformer_stl_nchw" if name == "biformer_stl" else "biformer_stl"
    with pytest.raises(InvalidInputError, match=f"{name} checkpoint"):
        timm.create_model(other, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **STL_SMALL)


def test_stl_input_sizes():
    torch.manual_seed(0)
    legacy = timm.create_model("biformer_stl", num_classes=3, **STL_SMALL).eval()
    nchw = timm.create_model("biformer_stl_nchw", num_classes=3, **STL_SMALL).eval()
    with torch.no_grad():
        assert legacy(torch.randn(1, 3, 112, 224)).shape == (1, 3)  # stage maps 28/14/7 split into 7x7 regions
        with pytest.raises(InvalidInputError, match="multiples of 112"):
            legacy(torch.randn(1, 3, 256, 256))
        with pytest.raises(InvalidInputError, match="multiples of 112"):
            legacy.forward_intermediates(torch.randn(1, 3, 224, 240))
        assert nchw(torch.randn(1, 3, 250, 230)).shape == (1, 3)  # padded, as the official code
        with pytest.raises(InvalidInputError, match="at least 112"):
            nchw(torch.randn(1, 3, 100, 224))
    with pytest.raises(InvalidInputError, match="not supported"):
        B.BiFormerSTL(qk_scale=0.5)
    with pytest.raises(InvalidInputError, match="topk"):
        B.BiFormerSTL(layout="nchw", topks=(1, 4, 16, -2))
