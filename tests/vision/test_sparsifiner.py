"""Sparsifiner: official parity (fixture from the official code), DeiT weights, phases, sparsity report."""

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

import attnzoo
import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.vision import sparsifiner as S

TINY = dict(embed_dim=64, depth=2, num_heads=2)


def load_fixture(reference_dir, name="sparsifiner"):
    folder = reference_dir / name
    if not folder.is_dir():
        pytest.skip(f"{name} fixture absent")
    cfg = json.loads((folder / "config.json").read_text())
    return cfg, *(load_file(folder / f"{n}.safetensors") for n in ("state_dict", "inputs", "outputs"))


def build_from_fixture(cfg, state):
    kwargs = {
        k: v for k, v in cfg["constructor_kwargs"].items() if k != "norm_layer"
    }  # documented as "None (-> LN 1e-6)"
    spar = cfg["cfg_object"]["SPAR"]
    kwargs.update(basis_threshold=spar["BASIS_THRESHOLD"], coef_topk=spar["BASIS_COEF"]["TOPK"])
    model = S.Sparsifiner(**kwargs).eval()
    model.load_state_dict(
        S.checkpoint_filter_fn({"model": {f"module.{k}": v for k, v in state.items()}}, model), strict=True
    )
    return model


@pytest.mark.parity
@pytest.mark.parametrize("backend", ["torch", "flex", pytest.param("triton", marks=pytest.mark.slow)])
def test_official_parity(reference_dir, backend):
    cfg, state, inputs, expected = load_fixture(reference_dir)
    model = build_from_fixture(cfg, state)
    tol = dict(atol=cfg["suggested_tolerance"]["atol"], rtol=cfg["suggested_tolerance"]["rtol"])
    if backend == "triton":  # the interpreter is slow: the first image only
        inputs = {"x": inputs["x"][:1]}
        expected = {k: v[:1] if v.dim() else v for k, v in expected.items() if not k.endswith("sparsity")}
    with torch.no_grad(), K.use_backend(backend):
        out = model.forward_detailed(inputs["x"])
        logits = model(inputs["x"])
        report = model.sparsity_report(inputs["x"])
    torch.testing.assert_close(out.logits, expected["y"], **tol)
    torch.testing.assert_close(logits, expected["y"], **tol)
    torch.testing.assert_close(out.features, expected["features"], **tol)
    for i in range(len(model.blocks)):
        assert torch.equal(out.attn_mask[i], expected[f"attn_mask.{i}"]), (
            f"layer {i}: key sets differ"
        )  # discrete: exact
        for name, ours in (
            ("approx_attn", out.approx_attn),
            ("basis_coef", out.basis_coef),
            ("block_in", out.block_inputs),
        ):
            torch.testing.assert_close(ours[i], expected[f"{name}.{i}"], **tol)
    for name in ("basis_sparsity", "basis_coef_sparsity", "attn_mask_sparsity") if backend != "triton" else ():
        assert getattr(report, name) == pytest.approx(expected[name].item(), abs=1e-6), name


@pytest.mark.parity
def test_full_size_key_layout(reference_dir):
    keys = json.loads((reference_dir / "sparsifiner" / "keys_sparsifiner_deit_small.json").read_text())
    model = timm.create_model("sparsifiner_deit_small")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: list(v["shape"]) for k, v in keys["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == keys["total_params"]


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
