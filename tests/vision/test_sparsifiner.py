"""Sparsifiner (DeiT and LV-ViT): official parity (fixture from the official code), full-size key
layouts, dense DeiT / LV-ViT weights, phases, sparsity report."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo
import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.vision import sparsifiner as S
from tests.helpers import parity_device
from tests.vision._reference import assert_key_layout, key_manifest, load_fixture

TINY = dict(embed_dim=64, depth=2, num_heads=2)

# the official cfg switches our model has no keyword for, at the values it implements
IMPLEMENTED_SPAR = {
    "BASIS_COEF": {"USE_TOPK": True},
    "ATTN_SCORE": {"USE_TOPK": True},
    "TOKEN_PRUNING_LOC": [],
    "TOKEN_KEEP_RATE_BASE": 1.0,
    "PRUNE_ATTN_MATRIX_ROW": False,
    "PRUNE_ATTN_MATRIX_COL": False,
}


def build_from_fixture(cfg, state):
    """The official constructor keywords and cfg object (``cfg_object``) as our keywords."""
    kwargs = {
        k: v for k, v in cfg["constructor_kwargs"].items() if k != "norm_layer"
    }  # documented as "None (-> LN 1e-6)"
    spar, loss = cfg["cfg_object"]["SPAR"], cfg["cfg_object"]["LOSS"]
    for key, value in IMPLEMENTED_SPAR.items():
        got = spar[key] if not isinstance(value, dict) else {k: spar[key][k] for k in value}
        assert got == value, f"the fixture sets SPAR.{key}={got}, which Sparsifiner does not implement"
    assert not loss["USE_ATTN_RECON"]  # evaluation: the sparse phase
    for ours, official in (("reduce_n_factor", "REDUCE_N_FACTOR"), ("reduce_c_factor", "REDUCE_C_FACTOR")):
        assert kwargs[ours] == spar[official]
    assert kwargs["share_inout_proj"] == spar["SHARE_INOUT_PROJ"]
    assert set(kwargs["attn_keep_rate_list"]) == {spar["ATTN_KEEP_RATE"]}
    kwargs.update(basis_threshold=spar["BASIS_THRESHOLD"], coef_topk=spar["BASIS_COEF"]["TOPK"])
    model = S.Sparsifiner(**kwargs).eval()
    model.load_state_dict(
        S.checkpoint_filter_fn({"model": {f"module.{k}": v for k, v in state.items()}}, model), strict=True
    )
    assert sum(p.numel() for p in model.parameters()) == cfg["num_params"]
    return model


def _cpu(value):
    """Tensors (and lists of them) back on the CPU for comparison with the fixture."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    return [_cpu(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parity
@pytest.mark.parametrize("backend", ["torch", "flex", pytest.param("triton", marks=pytest.mark.slow)])
def test_official_parity(reference_dir, backend, monkeypatch, request):
    """Every output of the fixture: logits, features, each layer's mask (exactly), approximate
    attention, coefficients and block input, the masked attention and the sparsity statistics."""
    device = parity_device(request, backend, monkeypatch)
    f = load_fixture(reference_dir, "sparsifiner")
    model = build_from_fixture(f.cfg, f.state_dict).to(device)
    inputs, expected, tol = f.inputs, f.outputs, f.tolerance
    statistics = ("basis_sparsity", "basis_coef_sparsity", "attn_mask_sparsity")
    if backend == "triton":  # the interpreter is slow: the first image only (the statistics average both)
        inputs = {"x": inputs["x"][:1]}
        expected = {k: v[:1] for k, v in expected.items() if k not in statistics}
    x = inputs["x"].to(device)
    with torch.no_grad(), K.use_backend(backend):
        out = model.forward_detailed(x, masked_attn=True)
        logits = model(x).cpu()
        report = model.sparsity_report(x)
    out = type(out)(**{k: _cpu(v) for k, v in vars(out).items()}) if device != "cpu" else out
    got = {"y": logits, "features": out.features}
    for i in range(len(model.blocks)):
        got |= {f"approx_attn.{i}": out.approx_attn[i], f"basis_coef.{i}": out.basis_coef[i]}
        got |= {f"block_in.{i}": out.block_inputs[i], f"masked_attn.{i}": out.masked_attn[i]}
        # discrete: exactly
        assert torch.equal(out.attn_mask[i], expected.pop(f"attn_mask.{i}")), f"layer {i}: key sets differ"
    torch.testing.assert_close(out.logits, expected["y"], **tol)
    for name in statistics:
        if name in expected:
            assert getattr(report, name) == pytest.approx(expected.pop(name).item(), abs=1e-6), name
    assert set(expected) <= set(got), f"outputs of the fixture left unchecked: {set(expected) - set(got)}"
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["deit_small", "lvvit_s"])
def test_full_size_key_layouts(reference_dir, variant):
    """Our full-size models have exactly the official keys, shapes, dtypes and parameter counts;
    LV-ViT-S is the official training script's ``--model sparsifiner_lvvit``."""
    manifest = key_manifest(reference_dir, "sparsifiner", f"sparsifiner_{variant}")
    with torch.device("meta"):  # shapes only
        model = timm.create_model(f"sparsifiner_{variant}")
    assert_key_layout(model, manifest)


def test_predictor_matches_its_definition():
    """The connectivity from the notes' formula, written independently (dense top-k over a masked score)."""
    torch.manual_seed(0)
    p = S.ConnectivityPredictor(
        dim=64, num_heads=2, num_tokens=50, keep_rate=0.3, reduce_n_factor=5, basis_threshold=0.01, coef_topk=3
    )
    with torch.no_grad():
        p.proj_n.mul_(20)
    q, k = torch.randn(2, 2, 50, 32, dtype=torch.float64), torch.randn(2, 2, 50, 32, dtype=torch.float64)
    p = p.double()
    conn = p(q, k)
    cheap = torch.einsum("bhnc,bhmc,mr->bhnr", p.proj_c_q(q), p.proj_c_k(k), p.proj_n) * 2**-0.5
    coef = cheap[..., 1:, :].softmax(-1)
    kth = coef.sort(-1, descending=True).values[..., 2:3]
    coef = torch.where(coef >= kth, coef, 0.0)
    basis = p.proj_back_n.abs().t()
    approx = coef @ torch.where(basis > 0.01, basis, 0.0)
    torch.testing.assert_close(conn.approx_attn, approx)
    assert conn.key_index.shape[-1] == math.ceil(0.3 * 50)
    chosen = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, conn.key_index.long(), True)
    kth = approx.sort(-1, descending=True).values[..., 14:15]
    assert torch.equal(chosen, approx >= kth)
    mask = S.connectivity_mask(conn.key_index, 50)
    assert mask[:, :, 0].all() and torch.equal(mask[:, :, 1:], chosen)


def test_dense_deit_weights_load_into_the_backbone(tmp_path, caplog):
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", **TINY).eval()
    torch.save({"model": deit.state_dict(), "epoch": 299}, tmp_path / "deit.pth")  # the official DeiT release wrapper
    model = timm.create_model(
        "sparsifiner_deit_small", pretrained=True, **TINY, pretrained_cfg_overlay=dict(file=str(tmp_path / "deit.pth"))
    ).eval()
    assert "untrained" in caplog.text
    for name, value in deit.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # keeping every key, the sparse model is the dense DeiT
    for block in model.blocks:
        block.attn.mask_predictor.budget = 197
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), deit(x), atol=1e-5, rtol=1e-5)
    ours = attnzoo.create_model("sparsifiner_deit_small", weights=tmp_path / "deit.pth", **TINY)
    assert torch.equal(ours.state_dict()["blocks.0.attn.qkv.weight"], deit.state_dict()["blocks.0.attn.qkv.weight"])
    assert "sparsifiner_deit_small.deit_in1k" in [e.name for e in attnzoo.weights.list_checkpoints("sparsifiner*")]


def test_two_phases_train_the_right_parameters():
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_deit_small", num_classes=3, **TINY)
    x = torch.randn(2, 3, 224, 224)
    model.set_phase("reconstruction")
    out = model.forward_detailed(x)
    assert all(m is None for m in out.attn_mask)
    teacher = [a[..., 1:, :].detach() for a in out.dense_attn]
    loss = sum(((a - t) ** 2).sum() for a, t in zip(out.approx_attn, teacher, strict=True))
    loss.backward()
    assert all((p.grad is not None) == ("mask_predictor" in n) for n, p in model.named_parameters())
    with torch.no_grad():  # reconstruction mode runs the backbone dense: same logits as with every key kept
        dense_logits = out.logits
        model.set_phase("sparse")
        for block in model.blocks:
            block.attn.mask_predictor.budget = 197
        model.eval()
        torch.testing.assert_close(model(x), dense_logits, atol=1e-5, rtol=1e-5)
    model.train()
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert all((p.grad is not None) == ("mask_predictor" not in n) for n, p in model.named_parameters())
    with pytest.raises(InvalidInputError, match="unknown phase"):
        model.set_phase("distill")


def test_sparsity_report_counts_the_kept_entries():
    model = timm.create_model("sparsifiner_deit_small", num_classes=3, **TINY).eval()
    report = model.sparsity_report(torch.randn(2, 3, 224, 224))
    N, budget = 197, math.ceil(0.25 * 197)
    density = (N + (N - 1) * budget) / N**2  # dense cls row + budget keys per patch row
    assert all(d == pytest.approx(density) for layer in report.layers for d in layer.density)
    assert report.attention_reduction[0] == pytest.approx(1 - density)
    assert 0 < report.mhsa_reduction[0] < report.attention_reduction[0]
    assert report.attn_mask_sparsity == pytest.approx(1 - density)
    assert "density" in str(report) and len(str(report).splitlines()) == 3


def test_api_and_bad_input():
    model = timm.create_model("sparsifiner_deit_small", num_classes=3, **TINY)
    x = torch.randn(1, 3, 224, 224)
    model(x).sum().backward()
    model.eval()
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 64)
    feats = timm.create_model("sparsifiner_deit_small", features_only=True, out_indices=(0, 1), **TINY)(x)
    assert [f.shape for f in feats] == [(1, 64, 14, 14)] * 2
    with pytest.raises(InvalidInputError, match="224x224 images only"):
        model(torch.randn(1, 3, 256, 256))
    with pytest.raises(InvalidInputError, match="token pruning"):
        S.Sparsifiner(token_pruning_loc_indicator=[False] * 3 + [True] + [False] * 8)
    with pytest.raises(InvalidInputError, match="attn_keep_rate_list"):
        S.Sparsifiner(depth=2, attn_keep_rate_list=[0.25])


@pytest.mark.parametrize("rate", [-0.5, 0.0, 1.5, float("nan"), True, "half"])
def test_a_keep_rate_outside_zero_one_is_refused_when_built(rate):
    with pytest.raises(InvalidInputError, match=r"attn_keep_rate_list\[1\] must be .* in \(0, 1\]"):
        timm.create_model("sparsifiner_deit_small", attn_keep_rate_list=[0.25, rate], **TINY)
    with pytest.raises(InvalidInputError, match=r"keep_rate must be"):
        S.ConnectivityPredictor(64, 2, 197, keep_rate=rate)


@pytest.mark.parametrize("cls_name", ["sparsifiner_deit_small", "sparsifiner_lvvit_s"])
def test_features_only_of_a_model_shallower_than_three_blocks(cls_name):
    model = timm.create_model(cls_name, features_only=True, **TINY).eval()  # timm's ViT takes the last 3 blocks
    with torch.no_grad():
        assert [tuple(f.shape) for f in model(torch.randn(1, 3, 224, 224))] == [(1, 64, 14, 14)] * 2
    assert model.feature_info.channels() == [64, 64]


# -- LV-ViT ------------------------------------------------------------------------------------

LVVIT_TINY = dict(embed_dim=48, depth=2, num_heads=2, num_classes=5)


def lvvit_reference(model, x):
    """The official SparsifinerLVViT evaluation forward, written from its description (notes §3.1)
    in plain torch: the 4_2 conv stem, LayerNorm eps 1e-5, qkv without bias, the scale applied to q
    first, residual branches divided by skip_lam 2, logits = head(cls) + 0.5 * max over the patch
    tokens of aux_head. The key sets come from each layer's predictor (checked against the official
    one by the DeiT fixture)."""
    stem = model.patch_embed
    h = x
    for conv, bn in ((stem.conv1, stem.bn1), (stem.conv2, stem.bn2), (stem.conv3, stem.bn3)):
        h = F.conv2d(h, conv.weight, stride=conv.stride, padding=conv.padding)
        h = F.relu(F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))
    h = F.conv2d(h, stem.proj.weight, stem.proj.bias, stride=8).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(len(x), -1, -1), h], dim=1) + model.pos_embed
    B, N, C = h.shape
    norm = lambda t, ln: F.layer_norm(t, (C,), ln.weight, ln.bias, eps=1e-5)  # noqa: E731
    for block in model.blocks:
        attn = block.attn
        heads = attn.num_heads
        q, k, v = (norm(h, block.norm1) @ attn.qkv.weight.t()).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        mask = S.connectivity_mask(attn.mask_predictor(q, k).key_index, N)
        weights = ((q * (C // heads) ** -0.5) @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C)) / 2.0
        h = h + block.mlp.fc2(F.gelu(block.mlp.fc1(norm(h, block.norm2)))) / 2.0
    h = norm(h, model.norm)
    return model.head(h[:, 0]) + 0.5 * model.aux_head(h[:, 1:]).max(1).values


def test_lvvit_matches_the_official_forward():
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_lvvit_s", **LVVIT_TINY)
    with torch.no_grad():  # non-trivial BatchNorm statistics and a decisive predictor
        for name, t in model.state_dict().items():
            if "running_var" in name:
                t.uniform_(0.5, 1.5)
            elif "running_mean" in name or (name.endswith("bias") and t.is_floating_point()):
                t.normal_(0, 0.1)
        for block in model.blocks:
            block.attn.mask_predictor.proj_n.mul_(5)
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lvvit_reference(model, x), atol=1e-5, rtol=1e-5)
        out = model.forward_detailed(x)
    assert all(m[:, :, 1:].sum(-1).eq(math.ceil(0.25 * 197)).all() for m in out.attn_mask)  # sparse, as released
    torch.testing.assert_close(out.logits, model(x))


def test_lvvit_dense_release_loads_into_the_backbone(tmp_path, caplog):
    """The dense LV-ViT-S release (a bare state dict) loads; the untrained predictors are kept."""
    torch.manual_seed(0)
    source = timm.create_model("sparsifiner_lvvit_s", **LVVIT_TINY).eval()
    dense = {k: v for k, v in source.state_dict().items() if ".mask_predictor." not in k}
    torch.save(dense, tmp_path / "lvvit_s-26M-224-83.3.pth.tar")
    model = attnzoo.create_model("sparsifiner_lvvit_s", weights=tmp_path / "lvvit_s-26M-224-83.3.pth.tar", **LVVIT_TINY)
    assert "untrained" in caplog.text
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())
    entry = attnzoo.weights.get_checkpoint("sparsifiner_lvvit_s.lvvit_in1k")
    assert entry.url.endswith("/TokenLabeling/releases/download/1.0/lvvit_s-26M-224-83.3.pth.tar")
    assert model.pretrained_cfg["first_conv"] == "patch_embed.conv1"


def test_lvvit_head_api():
    model = timm.create_model("sparsifiner_lvvit_s", **LVVIT_TINY).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert torch.equal(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
        model.reset_classifier(0)
        assert torch.equal(model(x), tokens[:, 0])  # without a classifier: the class token, no aux term
    model.reset_classifier(3)
    assert model.aux_head.out_features == 3 and model(x).shape == (1, 3)
    with pytest.raises(InvalidInputError, match="pools the class token"):
        model.reset_classifier(3, global_pool="avg")
    with pytest.raises(InvalidInputError, match="not supported"):
        S.SparsifinerLVViT(p_emb="4_2_128")


def test_a_converted_dense_checkpoint_keeps_saying_its_predictor_is_untrained(tmp_path, caplog):
    """Converting a dense DeiT wrote the model's random predictor into the safetensors, and loading that
    file then looked like a trained Sparsifiner: the conversion holds only what the DeiT file had."""
    from safetensors import safe_open

    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", **TINY)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    model = attnzoo.create_model("sparsifiner_deit_small", **TINY)
    attnzoo.weights.convert_checkpoint(
        tmp_path / "deit.pth", tmp_path / "ours.safetensors", model, converter=S.checkpoint_filter_fn
    )
    with safe_open(tmp_path / "ours.safetensors", "pt") as fh:
        assert not [k for k in fh.keys() if ".mask_predictor." in k]
        assert "blocks.0.attn.mask_predictor.proj_c_q.weight" in fh.metadata()["not_in_source"]
    caplog.clear()
    loaded = attnzoo.create_model("sparsifiner_deit_small", weights=tmp_path / "ours.safetensors", **TINY)
    assert "untrained" in caplog.text
    assert torch.equal(loaded.state_dict()["blocks.0.attn.qkv.weight"], deit.state_dict()["blocks.0.attn.qkv.weight"])


def test_lvvit_with_another_head_leaves_both_classifiers_out(tmp_path):
    """LV-ViT's cfg names two classifiers (``head``, ``aux_head``): another ``num_classes`` drops both."""
    torch.manual_seed(0)
    source = timm.create_model("sparsifiner_lvvit_s", **LVVIT_TINY).state_dict()
    torch.save(source, tmp_path / "lvvit.pth")
    seven = {**LVVIT_TINY, "num_classes": 7}
    overlay = dict(file=str(tmp_path / "lvvit.pth"))
    for model in (
        attnzoo.create_model("sparsifiner_lvvit_s", weights=tmp_path / "lvvit.pth", **seven),
        timm.create_model("sparsifiner_lvvit_s", pretrained=True, pretrained_cfg_overlay=overlay, **seven),
    ):
        assert model.head.weight.shape[0] == 7 and model.aux_head.weight.shape[0] == 7
        assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items() if "head." not in k)
