"""ACMIL (GA and MHA) and ABMIL: official parity (fixtures from the official code), full-size key
layouts and parameter counts, STKIM, the official losses, the gated-attention formula, heatmap
scores, the factory, checkpoints and input errors."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import InvalidInputError, WeightsError
from attnzoo.vision import acmil as A
from attnzoo.weights import load_checkpoint_file
from tests.vision._reference import key_manifest, load_files, manual_seed, state_layout, tolerance

FIXTURES = {"acmil_ga": A.ACMILGatedAttention, "acmil_mha": A.ACMILMultiHead}
OUTPUT_NAMES = ("sub_preds", "slide_pred", "attention")  # the official forward's 3-tuple, in order


class Struct:
    """Stands in for the official ``utils.utils.Struct`` config that ``save_model`` pickles (under that name:
    see :func:`official_utils_module`)."""

    def __init__(self, **entries):
        self.__dict__.update(entries)


# -- fixtures ------------------------------------------------------------------------------


def build_from_config(name, cfg):
    kwargs = dict(cfg["constructor_kwargs"])
    conf = kwargs.pop("conf")
    return FIXTURES[name].from_official_config(conf, **kwargs)


def bag(n=40, dim=512, seed=0):
    return torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# -- parity --------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_eval_parity(reference_dir, name):
    cfg, f = load_files(reference_dir, name)
    model = build_from_config(name, cfg).eval()
    model.load_state_dict(f["state_dict"], strict=True)
    assert n_params(model) == cfg["num_params"]
    with torch.no_grad():
        out = model(f["inputs"]["x"])
    for key, got in zip(OUTPUT_NAMES, out):
        assert list(got.shape) == cfg["outputs_meta"][key]["shape"], key
        torch.testing.assert_close(got, f["outputs"][key], **tolerance(cfg))
    torch.testing.assert_close(out.slide_logits, f["outputs"]["y"], **tolerance(cfg))
    assert not (out.attention <= -1e8).any()  # eval mode: STKIM off


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_train_mode_stkim_parity(reference_dir, name):
    """Training-mode outputs, where the fixture has them; the RNG recipe is read from config.json."""
    cfg, f = load_files(reference_dir, name)
    keys = [k for k in f["outputs"] if k.startswith("train_stkim.")]
    if not keys:
        pytest.skip(f"{name} has no training-mode outputs")
    seed = manual_seed(cfg["outputs"]["train_stkim.*"])
    conf = cfg["constructor_kwargs"]["conf"]
    k = min(conf["n_masked_patch"], cfg["inputs_meta"]["x"]["shape"][1])
    n_dropped = int(k * conf["mask_drop"])
    model = build_from_config(name, cfg).train()
    model.load_state_dict(f["state_dict"], strict=True)
    with torch.no_grad():
        torch.manual_seed(seed)  # the official draw: torch's global RNG
        from_global = model(f["inputs"]["x"])
        from_generator = model(f["inputs"]["x"], generator=torch.Generator().manual_seed(seed))
        from_int = model(f["inputs"]["x"], generator=seed)
    ref_attention = f["outputs"]["train_stkim.attention"]
    for out in (from_global, from_generator, from_int):
        for key, got in zip(OUTPUT_NAMES, out):
            torch.testing.assert_close(got, f["outputs"][f"train_stkim.{key}"], **tolerance(cfg))
        # the discrete part, exactly: which logits were masked
        assert torch.equal(out.attention == -1e9, ref_attention == -1e9)
    assert ((ref_attention == -1e9).sum(-1) == n_dropped).all()


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_official_initialisation_order(reference_dir, name):
    """Built under the fixture's seed, every tensor the fixture did not perturb matches it: the
    modules are created in the official order (so torch.manual_seed reproduces official inits)."""
    cfg, f = load_files(reference_dir, name)
    torch.manual_seed(cfg["seed"])
    model = build_from_config(name, cfg)
    # perturbed: parameters constant after init (LayerNorm) and, per config.json, MHA's queries
    perturbed = {k for k in f["state_dict"] if "layer_norm" in k}
    if "`q`" in cfg["perturbation"]:
        perturbed.add("q")
    same = [k for k, v in model.state_dict().items() if k not in perturbed]
    assert same and all(torch.equal(model.state_dict()[k], f["state_dict"][k]) for k in same)


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("dims", ["512_256", "384_128"])
def test_full_size_key_layouts(reference_dir, name, dims):
    manifest = key_manifest(reference_dir, name, f"{name}_{dims}")
    found = re.search(r"D_feat=(\d+), D_inner=(\d+), n_class=(\d+), n_token=(\d+)", manifest["official_builder"])
    extra = re.search(r"n_masked_patch=(\d+), mask_drop=([\d.]+)", manifest["official_builder"])
    in_dim, inner_dim, n_class, n_token = map(int, found.groups())
    assert f"{in_dim}_{inner_dim}" == dims
    model = FIXTURES[name](
        in_dim=in_dim,
        inner_dim=inner_dim,
        n_classes=n_class,
        n_token=n_token,
        n_masked_patch=int(extra.group(1)),
        mask_drop=float(extra.group(2)),
    )
    layout = state_layout(model.state_dict())
    assert list(layout) == list(manifest["keys"])  # same keys, same (official) order
    assert layout == manifest["keys"]
    assert len(layout) == manifest["num_keys"]
    assert n_params(model) == manifest["total_params"]


# -- sizes (research notes d1) -------------------------------------------------------------


@pytest.mark.parametrize(
    "builder, pretrain, n_classes, expected",
    [
        ("acmil_ga", "medical_ssl", 2, 84_369),
        ("acmil_ga", "natural_supervised", 2, 200_593),
        ("acmil_mha", "medical_ssl", 2, 416_140),
        ("acmil_mha", "natural_supervised", 2, 1_585_932),
        ("acmil_ga", "UNI", 3, 665_495),
        ("acmil_mha", "UNI", 3, 6_320_658),  # the notes' "6.32M"
    ],
)
def test_parameter_counts(builder, pretrain, n_classes, expected):
    model = getattr(A, builder)(pretrain=pretrain, n_classes=n_classes)
    assert n_params(model) == expected


def test_factory_defaults_and_names():
    names = attnzoo.list_models("*mil*")
    assert {"acmil_ga", "acmil_mha", "abmil"} <= set(names)
    ga = attnzoo.create_model("acmil_ga")
    assert isinstance(ga, A.ACMILGatedAttention) and not ga.training
    assert (ga.in_dim, ga.inner_dim, ga.n_classes, ga.n_token, ga.n_masked_patch, ga.mask_drop) == (
        512,
        256,
        2,
        5,
        10,
        0.6,
    )
    assert n_params(ga) == 200_593
    mha = attnzoo.create_model("acmil_mha", n_classes=3)
    assert isinstance(mha, A.ACMILMultiHead) and mha.n_classes == 3 and mha.num_heads == 8
    ab = attnzoo.create_model("abmil", pretrain="medical_ssl")
    assert (ab.in_dim, ab.inner_dim, ab.n_token, ab.n_masked_patch, ab.mask_drop) == (384, 128, 1, 0, 0.0)
    assert set(ab.state_dict()) == {
        "dimreduction.fc1.weight",
        "attention.attention_V.0.weight",
        "attention.attention_V.0.bias",
        "attention.attention_U.0.weight",
        "attention.attention_U.0.bias",
        "attention.attention_weights.weight",
        "attention.attention_weights.bias",
        "classifier.0.fc.weight",
        "classifier.0.fc.bias",
        "Slide_classifier.fc.weight",
        "Slide_classifier.fc.bias",
    }
    with pytest.raises(InvalidInputError, match="n_token"):
        A.abmil(n_token=3)
    with pytest.raises(InvalidInputError, match="unknown pretrain"):
        A.acmil_ga(pretrain="resnet50")
    with pytest.raises(InvalidInputError, match="not both"):
        A.acmil_ga(pretrain="UNI", in_dim=1024)
    with pytest.raises(InvalidInputError, match="divisible"):
        A.ACMILMultiHead(inner_dim=100)
    with pytest.raises(InvalidInputError, match="mask_drop"):
        A.ACMILGatedAttention(mask_drop=1.5)


# -- STKIM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [40, 7])
@pytest.mark.parametrize("cls", [A.ACMILGatedAttention, A.ACMILMultiHead])
def test_stkim_masks_int_k_drop_of_the_top_k_in_training_only(cls, n):
    torch.manual_seed(0)
    model = cls(in_dim=32, inner_dim=16, n_token=3, n_masked_patch=10, mask_drop=0.6)
    x = bag(n, 32)
    k = min(10, n)
    n_dropped = int(k * 0.6)
    with torch.no_grad():
        clean = model.eval()(x).attention  # [H, K, N]
        assert not (clean == -1e9).any()
        model.train()
        if cls is A.ACMILMultiHead:  # dropout only changes values after the attention; keep it off here
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        masked = model(x, generator=1).attention
        again = model(x, generator=1).attention
        other = model(x, generator=2).attention
    assert torch.equal(masked, again)
    assert not torch.equal(masked, other)
    hit = masked == -1e9
    assert (hit.sum(-1) == n_dropped).all()
    top = clean.topk(k, dim=-1).indices
    in_top = torch.zeros_like(hit).scatter(-1, top, True)
    assert not (hit & ~in_top).any()  # only top-k logits are masked
    torch.testing.assert_close(masked[~hit], clean[~hit])  # the rest are untouched


def test_stkim_mask_function_and_edge_cases():
    logits = torch.arange(12.0).reshape(2, 6)
    out = A.stkim_mask(logits, 4, 0.5, generator=0)
    assert ((out == -1e9).sum(-1) == 2).all()
    assert ((out == -1e9) <= (logits >= 2)).all()  # within each row's top-4 (values 2..5 and 8..11)
    assert torch.equal(A.stkim_mask(logits, 0, 0.6), logits)
    assert torch.equal(A.stkim_mask(logits, 3, 0.0, generator=0), logits)
    assert (A.stkim_mask(logits, 100, 1.0, generator=0) == -1e9).all()
    half = A.stkim_mask(logits.half(), 4, 0.5, generator=0)
    assert ((half == torch.finfo(torch.half).min).sum(-1) == 2).all()


def test_abmil_has_no_masking():
    torch.manual_seed(0)
    model = A.abmil(in_dim=32, inner_dim=16)
    x = bag(30, 32)
    with torch.no_grad():
        ev = model.eval()(x)
        tr = model.train()(x)
    for a, b in zip(ev, tr):
        assert torch.equal(a, b)


# -- formulas ------------------------------------------------------------------------------


def test_abmil_equals_gated_attention_mil_formula():
    torch.manual_seed(0)
    model = A.abmil(in_dim=24, inner_dim=12, n_classes=3, attn_dim=8).eval()
    sd = model.state_dict()
    x = bag(17, 24)[0].double()
    p = {k: v.double() for k, v in sd.items()}
    h = torch.relu(x @ p["dimreduction.fc1.weight"].T)  # [N, L]
    v = torch.tanh(h @ p["attention.attention_V.0.weight"].T + p["attention.attention_V.0.bias"])
    u = torch.sigmoid(h @ p["attention.attention_U.0.weight"].T + p["attention.attention_U.0.bias"])
    a = (v * u) @ p["attention.attention_weights.weight"].T + p["attention.attention_weights.bias"]  # [N, 1]
    alpha = torch.exp(a - a.max()) / torch.exp(a - a.max()).sum()
    z = (alpha * h).sum(0, keepdim=True)  # [1, L]
    slide = z @ p["Slide_classifier.fc.weight"].T + p["Slide_classifier.fc.bias"]
    sub = z @ p["classifier.0.fc.weight"].T + p["classifier.0.fc.bias"]
    with torch.no_grad():
        out = model(x.float())
    torch.testing.assert_close(out.slide_logits.double(), slide, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sub_logits.double(), sub, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention.double(), a.T.unsqueeze(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.instance_attention().double(), alpha[:, 0], atol=1e-6, rtol=1e-5)


def direct_diversity(logits):
    """sum_{i<j} cos(softmax(A_i), softmax(A_j)) / (K(K-1)/2), each pair averaged over the first axis."""
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    p = e / e.sum(-1, keepdim=True)
    k = p.shape[1]
    total = 0.0
    for i in range(k):
        for j in range(i + 1, k):
            cos = (p[:, i] * p[:, j]).sum(-1) / (p[:, i].norm(dim=-1) * p[:, j].norm(dim=-1))
            total = total + cos.mean()
    return total / (k * (k - 1) / 2)


@pytest.mark.parametrize("shape", [(1, 5, 30), (8, 4, 11), (1, 2, 3)])
def test_diversity_loss_against_direct_formula(shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    torch.testing.assert_close(A.diversity_loss(logits), direct_diversity(logits))
    assert A.diversity_loss(torch.randn(1, 1, 9)).item() == 0.0
    same = torch.randn(1, 1, 9).expand(1, 4, 9)
    torch.testing.assert_close(A.diversity_loss(same), torch.tensor(1.0))  # identical branches: maximal


@pytest.mark.parametrize("cls", [A.ACMILGatedAttention, A.ACMILMultiHead])
def test_loss_parts_forward_backward(cls):
    torch.manual_seed(0)
    model = cls(in_dim=32, inner_dim=16, n_classes=3, n_token=4).train()
    out = model(bag(25, 32), generator=0)
    loss = model.loss(out, torch.tensor([2]))
    torch.testing.assert_close(loss.sub, F.cross_entropy(out.sub_logits, torch.full((4,), 2)))
    torch.testing.assert_close(loss.slide, F.cross_entropy(out.slide_logits, torch.tensor([2])))
    torch.testing.assert_close(loss.diversity, direct_diversity(out.attention))
    torch.testing.assert_close(loss.total, loss.sub + loss.slide + loss.diversity)
    assert A.acmil_loss(tuple(out), 2).total.item() == pytest.approx(loss.total.item())
    loss.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(
        p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if n.startswith(("dimreduction", "Slide_classifier"))
    )
    with pytest.raises(InvalidInputError, match="outside"):
        model.loss(out, 3)
    with pytest.raises(InvalidInputError, match="one integer"):
        model.loss(out, torch.tensor([0, 1]))


def test_single_branch_loss_is_slide_ce_only():
    torch.manual_seed(0)
    model = A.abmil(in_dim=32, inner_dim=16).train()
    out = model(bag(9, 32))
    loss = model.loss(out, 1)
    assert loss.sub.item() == 0.0 and loss.diversity.item() == 0.0
    torch.testing.assert_close(loss.total, F.cross_entropy(out.slide_logits, torch.tensor([1])))


@pytest.mark.parametrize("cls", [A.ACMILGatedAttention, A.ACMILMultiHead])
def test_instance_attention_for_heatmaps(cls):
    torch.manual_seed(0)
    model = cls(in_dim=32, inner_dim=16, n_token=3).eval()
    x = bag(21, 32)
    with torch.no_grad():
        out = model(x)
        two_d = model(x[0])
    for a, b in zip(out, two_d):
        assert torch.equal(a, b)
    scores = out.instance_attention()
    assert scores.shape == (21,)
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))
    torch.testing.assert_close(scores, out.attention.softmax(-1).mean(dim=(0, 1)))
    if cls is A.ACMILGatedAttention:  # the slide head pools exactly with these weights (bag_A)
        with torch.no_grad():
            feats = model.dimreduction(x[0])
            torch.testing.assert_close(model.Slide_classifier.fc(scores @ feats).unsqueeze(0), out.slide_logits)


# -- inputs --------------------------------------------------------------------------------


def test_bad_inputs():
    model = A.ACMILGatedAttention(in_dim=32, inner_dim=16).eval()
    with pytest.raises(InvalidInputError, match="empty bag"):
        model(torch.zeros(1, 0, 32))
    nan = bag(5, 32)
    nan[0, 2, 3] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        model(nan)
    huge = bag(5, 32).double()
    huge[0, 1, 1] = 1e300  # finite in float64, infinite in the model's float32
    with pytest.raises(InvalidInputError, match="infinite"):
        model(huge)
    with pytest.raises(InvalidInputError, match="expects 32 features per instance"):
        model(bag(5, 48))
    with pytest.raises(InvalidInputError, match="one bag at a time"):
        model(torch.randn(2, 5, 32))
    with pytest.raises(InvalidInputError, match="one bag at a time"):
        model(torch.randn(32))
    with pytest.raises(InvalidInputError, match="floating-point"):
        model(torch.ones(1, 5, 32, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="generator"):
        model.train()(bag(5, 32), generator="seed")
    mha = A.ACMILMultiHead(in_dim=32, inner_dim=16)
    with pytest.raises(InvalidInputError, match="expects 32 features"):
        mha(bag(5, 16))
    out = model.eval()(bag(5, 32).half())  # float16 features (the official h5 files) are cast
    assert out.slide_logits.dtype == torch.float32


# -- checkpoints ---------------------------------------------------------------------------


@pytest.fixture
def official_utils_module(monkeypatch):
    """The official repository's ``utils.utils`` importable while a test saves, so ``Struct`` pickles under its name."""
    import sys
    import types

    utils, inner = types.ModuleType("utils"), types.ModuleType("utils.utils")
    inner.Struct, utils.utils = Struct, inner
    monkeypatch.setattr(Struct, "__module__", "utils.utils")
    monkeypatch.setitem(sys.modules, "utils", utils)
    monkeypatch.setitem(sys.modules, "utils.utils", inner)


def test_official_checkpoint_loads_as_written(tmp_path, official_utils_module):
    """The official save_model pickles its own Struct config beside the weights: it loads as an inert mapping, the
    weights-only unpickler running no code of the repository's."""
    torch.manual_seed(0)
    trained = A.acmil_ga(in_dim=32, inner_dim=16).eval()
    official = tmp_path / "checkpoint-best.pth"
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in trained.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 7,
            "config": Struct(D_feat=32, D_inner=16, n_class=2),
        },
        official,
    )
    assert load_checkpoint_file(official)["config"] == {"D_feat": 32, "D_inner": 16, "n_class": 2}
    model = attnzoo.create_model("acmil_ga", weights=official, in_dim=32, inner_dim=16)
    x = bag(12, 32)
    with torch.no_grad():
        assert torch.equal(model(x).slide_logits, trained(x).slide_logits)
    wrapped = {"model": trained.state_dict(), "epoch": 3}
    assert set(A.checkpoint_filter_fn(wrapped, model)) == set(trained.state_dict())
    with pytest.raises(WeightsError):
        A.checkpoint_filter_fn({"epoch": 3}, model)


def test_official_abmil_class_layout_maps_onto_one_branch():
    """architecture/network.py::ABMIL keeps one ``classifier.fc``; it becomes the slide head."""
    torch.manual_seed(0)
    model = A.abmil(in_dim=32, inner_dim=16).eval()
    reference = A.abmil(in_dim=32, inner_dim=16).eval()
    official = {
        k: v for k, v in reference.state_dict().items() if not k.startswith(("classifier.", "Slide_classifier."))
    }
    official["classifier.fc.weight"] = reference.Slide_classifier.fc.weight.detach().clone()
    official["classifier.fc.bias"] = reference.Slide_classifier.fc.bias.detach().clone()
    attnzoo.weights.load_weights(model, {"model": official}, converter=A.checkpoint_filter_fn)
    x = bag(10, 32)
    with torch.no_grad():
        out, ref = model(x), reference(x)
    assert torch.equal(out.slide_logits, ref.slide_logits)
    assert torch.equal(out.sub_logits, out.slide_logits)


def test_sizes_follow_the_official_pretrain_table():
    assert A.PRETRAIN_DIMS["natural_supervised"] == (512, 256)
    assert A.PRETRAIN_DIMS["medical_ssl"] == (384, 128)
    for pretrain, (d_feat, d_inner) in A.PRETRAIN_DIMS.items():
        model = A.acmil_ga(pretrain=pretrain)
        assert model.dimreduction.fc1.weight.shape == (d_inner, d_feat)
        assert math.isclose(model.mask_drop, 0.6)
