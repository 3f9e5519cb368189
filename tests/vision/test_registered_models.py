"""Every model attnzoo registers builds at a tiny size and runs forward and backward (timm's
test_models.py idea). A registered name without a tiny config here fails the suite, so a new
model cannot land untested; the registered checkpoints are checked against timm's cfgs."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import import_module
from typing import Any

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg
from timm.models._registry import model_entrypoint

import attnzoo
from attnzoo.errors import InvalidInputError
from attnzoo.factory import load_families
from attnzoo.registry import get_model_entry, registered_models
from attnzoo.weights import get_checkpoint, list_checkpoints
from attnzoo.weights.registry import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

load_families()


def image(size: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(2, 3, size, size)


def views(size: int) -> Callable[[], torch.Tensor]:
    """LRGT: a batch of multi-view images [B, V, 3, H, W]."""
    return lambda: torch.randn(2, 2, 3, size, size)


def bag() -> torch.Tensor:
    """ACMIL/ABMIL: one slide, 10 patch features of width 16."""
    return torch.randn(10, 16)


def oat_batch() -> Any:
    """OAT: a teacher-forced batch of two search trials on a 2x3 shelf."""
    from attnzoo.vision.oat_inputs import CROP_SIZE, collate_oat

    crops = lambda seed: torch.randint(
        0, 256, (6, *CROP_SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return collate_oat([(crops(0), 4, [1, 4]), (crops(1), 2, [5, 2])], (2, 3))


def clip_tower() -> dict[str, Any]:
    """NevaClip: a tiny open_clip ModifiedResNet vision tower (32 px, 16-d embeddings)."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    return {"visual": _build_vision_tower(16, CLIPVisionCfg(image_size=32, layers=[1, 1, 1, 1], width=8))}


@dataclass(frozen=True)
class Tiny:
    kwargs: dict[str, Any] | Callable[[], dict[str, Any]]
    inputs: Callable[[], Any]  # the argument, or a tuple of arguments, of ``forward``
    forward: str = "__call__"
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    no_grad: str = ""  # regex of parameters that get no gradient by design (frozen, or kept for the official layout)
    backward: bool = True  # False: a frozen model whose forward runs its own backward (NevaClip's fixation search)

    def build(self, name: str) -> Any:
        return attnzoo.create_model(name, **(self.kwargs() if callable(self.kwargs) else self.kwargs))

    def run(self, model: Any) -> Any:
        args = self.inputs()
        return getattr(model, self.forward)(*(args if isinstance(args, tuple) else (args,)), **self.forward_kwargs)


BIFORMER = dict(
    depth=[1, 1, 1, 1],
    embed_dim=[16, 32, 64, 128],
    head_dim=16,
    qk_dims=[16, 32, 64, 128],
    n_win=2,
    topks=[1, 2, 4, -2],
)
BIFORMER_STL = dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16, n_wins=(2, 2, 2, 2))
L2VIT = dict(depths=[2, 2, 2, 2], dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], window_size=4)
SPARSIFINER = dict(img_size=64, embed_dim=32, depth=2, num_heads=2)
INLINE_SWIN = dict(img_size=64, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], attn_type="IIMS1")
INLINE_DEIT = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)
LRGT = dict(
    img_size=112,
    embed_dim=32,
    depth=2,
    num_heads=2,
    lga_layers=(1,),
    merger_tokens=(49, 49),
    merger_heads=2,
    decoder_heads=2,
    decoder_depth=4,
    decoder_channels=(8, 2, 1),
)
OAT = dict(grid=(2, 3), emb_size=32, nhead=2, dim_feedforward=32, num_encoder_layers=1, num_decoder_layers=1, CA_d_k=32)
MIL = dict(in_dim=16, inner_dim=8, n_classes=3)

# generator and LinearEmbedding: official modules OAT never calls, kept so official checkpoints load strictly
OAT_TINY = Tiny(OAT, oat_batch, "forward_batch", no_grad=r"^(generator|LinearEmbedding)\.")


def lvlm(family: str) -> Tiny:
    """The hallucination-mitigation models build the tiny random LVLM of their family with random weights
    (attnzoo.multimodal.hallucination.models.tiny_lvlm): a prompt holding its image tokens, and its pixels."""
    text = torch.tensor([[1, 40, 41, 42]])
    if family == "llava":  # 36 image tokens (id 100), an 84 px image
        return Tiny(
            {},
            lambda: (torch.cat([text, torch.full((1, 36), 100)], 1), torch.randn(1, 3, 84, 84)),
            # LLaVA reads the CLIP features of the second-to-last layer (vision_feature_layer=-2): the
            # last layer and the post-norm reach the outputs only through transformers >= 5.24's
            # image_outputs.
            no_grad=r"^model\.vision_tower\.(post_layernorm|encoder\.layers\.1)\.",
        )
    if family == "qwen2_vl":  # 4 image tokens (id 104) between the vision markers (102, 103): 4x4 patches
        ids = torch.cat([text, torch.tensor([[102, 104, 104, 104, 104, 103]])], 1)
        images = {
            "pixel_values": torch.randn(16, 3 * 2 * 14 * 14),
            "image_grid_thw": torch.tensor([[1, 4, 4]]),
            "mm_token_type_ids": (ids == 104).long(),
        }
        return Tiny({}, lambda: ids, forward_kwargs=images)
    return Tiny(  # instructblip: 4 query tokens (id 100) before the text, a 28 px image, the Q-Former's text
        {},
        lambda: (
            torch.randn(1, 3, 28, 28),
            torch.tensor([[1, 40, 41]]),
            torch.ones(1, 3, dtype=torch.long),
            torch.cat([torch.full((1, 4), 100), text], 1),
        ),
    )


TINY: dict[str, Tiny] = {
    "llava_1_5_7b": lvlm("llava"),
    "llava_1_5_13b": lvlm("llava"),
    "llava_v1_6_mistral_7b": lvlm("llava"),
    "llava_v1_6_vicuna_7b": lvlm("llava"),
    "llava_v1_6_vicuna_13b": lvlm("llava"),
    "qwen2_vl_7b_instruct": lvlm("qwen2_vl"),
    "qwen2_5_vl_3b_instruct": lvlm("qwen2_vl"),
    "qwen2_5_vl_7b_instruct": lvlm("qwen2_vl"),
    "instructblip_vicuna_7b": lvlm("instructblip"),
    "biformer_tiny": Tiny(BIFORMER, image(64)),
    "biformer_small": Tiny(BIFORMER, image(64)),
    "biformer_base": Tiny(BIFORMER, image(64)),
    "biformer_stl": Tiny(dict(BIFORMER_STL, topks=(1, 2, 4, -2)), image(64)),
    "biformer_stl_nchw": Tiny(dict(BIFORMER_STL, topks=(1, 2, 4, -1)), image(64)),
    "l2vit_tiny": Tiny(L2VIT, image(64)),
    "l2vit_small": Tiny(L2VIT, image(64)),
    "l2vit_base": Tiny(L2VIT, image(64)),
    "l2vit_base_384": Tiny(L2VIT, image(64)),
    "sparsifiner_deit_small": Tiny(SPARSIFINER, image(64), no_grad=r"\.mask_predictor\."),  # frozen in the sparse phase
    "sparsifiner_deit_base": Tiny(SPARSIFINER, image(64), no_grad=r"\.mask_predictor\."),
    "sparsifiner_lvvit_s": Tiny(SPARSIFINER, image(64), no_grad=r"\.mask_predictor\."),
    "inline_swin_tiny": Tiny(INLINE_SWIN, image(64)),
    "inline_swin_small": Tiny(INLINE_SWIN, image(64)),
    "inline_swin_base": Tiny(INLINE_SWIN, image(64)),
    "inline_deit_tiny": Tiny(INLINE_DEIT, image(32)),
    "inline_deit_small": Tiny(INLINE_DEIT, image(32)),
    "inline_deit_base": Tiny(INLINE_DEIT, image(32)),
    # cls/dist tokens and the IFS of blocks without LGA: the official DeiT layout keeps them, the forward never uses them
    "lrgt": Tiny(LRGT, views(112), no_grad=r"^encoder\.encoder\.(cls_token|dist_token|blocks\.\d+\.attn\.IFS\.)"),
    "oat": OAT_TINY,
    "oat_amazon": OAT_TINY,
    "oat_yogurt": OAT_TINY,
    "oat_wine": OAT_TINY,
    "nevaclip": Tiny(
        clip_tower,
        lambda: (torch.randn(2, 3, 32, 32), torch.randn(16)),
        "predict",
        {"fixations": 2, "iterations": 2},
        backward=False,
    ),
    "acmil_ga": Tiny(MIL, bag),
    "acmil_mha": Tiny(MIL, bag),
    "abmil": Tiny(MIL, bag),
    # random weights build the tiny FLUX.1-Fill configuration of the notes: its transformer, one step
    "flux_fill": Tiny(
        {},
        lambda: (),
        "transformer",
        dict(
            hidden_states=torch.randn(1, 8, 20),
            encoder_hidden_states=torch.randn(1, 4, 32),
            pooled_projections=torch.randn(1, 32),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(8, 3),
            txt_ids=torch.zeros(4, 3),
            guidance=torch.tensor([30.0]),
        ),
        backward=False,
    ),
}


def timm_models() -> list[str]:
    """attnzoo's classifiers in timm's registry."""
    return [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("attnzoo.")]


REGISTERED = sorted({*timm_models(), *registered_models()})


def test_every_registered_model_has_a_tiny_config():
    assert set(REGISTERED) - set(TINY) == set(), "add a tiny config (TINY) for these registered models"
    assert set(TINY) - set(REGISTERED) == set(), "these tiny configs name no registered model"


def _floats(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, a tuple, a NamedTuple or a dataclass)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if is_dataclass(out):
        out = [getattr(out, f.name) for f in fields(out)]
    if isinstance(out, tuple | list):
        return [t for o in out for t in _floats(o)]
    return []


@pytest.mark.parametrize("name", REGISTERED)
def test_tiny_forward_backward(name):
    if name not in TINY:
        pytest.fail(f"{name} is registered but has no tiny config in TINY")
    tiny = TINY[name]
    torch.manual_seed(0)
    model = tiny.build(name)
    if isinstance(model, torch.nn.Module):
        model.train()
    outputs = _floats(tiny.run(model))
    assert outputs and all(bool(torch.isfinite(t).all()) for t in outputs)
    if not tiny.backward:
        return
    sum(t.float().sum() for t in outputs).backward()
    by_design = re.compile(tiny.no_grad) if tiny.no_grad else None
    without = [n for n, p in model.named_parameters() if p.grad is None and not (by_design and by_design.search(n))]
    assert not without, f"parameters without a gradient: {without[:5]}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", timm_models())
def test_forward_intermediates_contract(name):
    """timm's indices (an int = the last n, negatives from the end) and a typed error for an unknown output_fmt."""
    tiny = TINY[name]
    model = tiny.build(name)
    x = tiny.inputs()[:1]
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        ends = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True, stop_early=True)
    assert len(last) == 1 and torch.equal(last[0], every[-1])
    assert len(ends) == 2 and torch.equal(ends[0], every[0]) and torch.equal(ends[1], every[-1])
    with pytest.raises(InvalidInputError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


# -- checkpoints: one description per checkpoint, timm's and ours agree ------------------------


def _family_module(model: str) -> Any:
    if timm.is_model(model):
        return import_module(model_entrypoint(model).__module__)
    entry = get_model_entry(model)
    assert entry is not None, f"a checkpoint names {model}, which is not a registered model"
    return import_module(entry.fn.__module__)


def _pretrained_cfg(name: str) -> dict[str, Any]:
    """What a checkpoint was registered from: timm's pretrained cfg, or the family's ``default_cfgs``."""
    model = name.partition(".")[0]
    return get_pretrained_cfg(name).to_dict() if timm.is_model(model) else _family_module(model).default_cfgs[name]


@pytest.mark.parametrize("name", [e.name for e in list_checkpoints()])
def test_checkpoint_entry_matches_its_pretrained_cfg(name):
    entry, cfg = get_checkpoint(name), _pretrained_cfg(name)
    assert entry.url == (cfg.get("url") or None)
    assert entry.hf_hub_id == (cfg.get("hf_hub_id") or None)
    assert entry.preprocess.input_size == tuple(cfg.get("input_size", (3, 224, 224)))
    assert entry.preprocess.crop_pct == cfg.get("crop_pct", 0.875)
    assert entry.preprocess.crop_mode == cfg.get("crop_mode", "center")
    assert entry.preprocess.interpolation == cfg.get("interpolation", "bicubic")
    assert entry.preprocess.mean == tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN))
    assert entry.preprocess.std == tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
    assert entry.license == cfg.get("license")
    notes = cfg.get("notes") or ""
    assert entry.notes == (notes if isinstance(notes, str) else " ".join(notes))
    assert entry.resolve_converter() is _family_module(entry.model).checkpoint_filter_fn


@pytest.mark.parametrize("model", timm_models())
def test_every_released_file_is_a_registered_checkpoint(model):
    """For download, convert and verify, each url in timm's cfgs of our classifiers is registered."""
    registered = {e.name for e in list_checkpoints()}
    for name, cfg in timm.models.get_arch_pretrained_cfgs(model).items():
        assert not cfg.url or name in registered, name
