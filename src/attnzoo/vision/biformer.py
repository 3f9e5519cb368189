"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Zhu, Wang, Ke, Zhang, Lau. CVPR 2023. https://arxiv.org/abs/2303.08810
Official code: https://github.com/rayleizhu/BiFormer (models/biformer.py, ops/bra_legacy.py).

Four stages on NCHW maps; each block: depthwise-conv position embedding, then (NHWC)
pre-norm attention and MLP. Stages 1-3 use bi-level routing attention (top-k 1/4/16 regions
of a 7x7 grid, so every query sees 64 keys at 224 px); stage 4 uses global attention with
LePE. BatchNorm before global pooling. Parameter names follow the official checkpoints.

Implemented here: biformer_tiny, biformer_small, biformer_base (the released classifiers
using the legacy BRA). Not yet: biformer_stl and biformer_stl_nchw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from attnzoo.vision._common import ClassifierMixin, check_official_kwargs
from attnzoo.vision.layers import AttentionLePE, BiLevelRoutingAttention
from attnzoo.weights import CheckpointEntry, PreprocessConfig, register_checkpoint

__all__ = ["BiFormer"]


class BiFormerBlock(nn.Module):
    def __init__(self, dim: int, *, num_heads: int, n_win: int, topk: int, qk_dim: int | None, mlp_ratio: float,
                 side_dwconv: int, before_attn_dwconv: int, drop_path: float = 0.0, qk_scale: float | None = None):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, before_attn_dwconv, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn: nn.Module = BiLevelRoutingAttention(dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale,
                                                           topk=topk, side_dwconv=side_dwconv)
        else:  # topk = -2 in the official configs: global attention (the 7x7 map is too small to route)
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW in and out
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class BiFormer(ClassifierMixin, nn.Module):
    """Keyword names mirror the official constructor, so official configs map one to one."""

    def __init__(
        self,
        depth: Sequence[int] = (2, 2, 8, 2),
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (64, 128, 256, 512),
        head_dim: int = 32,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        n_win: int = 7,
        topks: Sequence[int] = (1, 4, 16, -2),
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        qk_dims: Sequence[int | None] = (None, None, None, None),
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        global_pool: str = "avg",
        **unsupported: Any,
    ):
        super().__init__()
        check_official_kwargs("BiFormer", unsupported, _OFFICIAL_DEFAULTS)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, embed_dim[0] // 2, 3, stride=2, padding=1), nn.BatchNorm2d(embed_dim[0] // 2), nn.GELU(),
            nn.Conv2d(embed_dim[0] // 2, embed_dim[0], 3, stride=2, padding=1), nn.BatchNorm2d(embed_dim[0]),
        )])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(nn.Conv2d(embed_dim[i], embed_dim[i + 1], 3, stride=2, padding=1), nn.BatchNorm2d(embed_dim[i + 1])))
        rates = torch.linspace(0, drop_path_rate, sum(depth)).tolist()
        self.stages = nn.ModuleList()
        self.feature_info = []
        cursor = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                BiFormerBlock(embed_dim[i], num_heads=embed_dim[i] // head_dim, n_win=n_win, topk=topks[i], qk_dim=qk_dims[i],
                              mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv, before_attn_dwconv=before_attn_dwconv,
                              drop_path=rates[cursor + j], qk_scale=qk_scale)
                for j in range(depth[i])
            ]))
            cursor += depth[i]
            self.feature_info.append(dict(num_chs=embed_dim[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs (NCHW) at ``indices`` (last n if an int), timm's contract."""
        take = list(range(4)) if indices is None else ([i % 4 for i in range(4 - indices, 4)] if isinstance(indices, int) else [i % 4 for i in indices])
        intermediates = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take:
                intermediates.append(self.norm(x) if norm and i == 3 else x)
            if stop_early and i >= max(take):
                break
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = downsample(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3)) if self.global_pool == "avg" else x.flatten(2).amax(-1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_OFFICIAL_DEFAULTS = {
    "kv_downsample_mode": "identity", "kv_per_wins": [-1, -1, -1, -1], "layer_scale_init_value": -1, "param_routing": False,
    "diff_routing": False, "soft_routing": False, "pre_norm": True, "pe": None, "auto_pad": False, "param_attention": "qkvo",
    "mlp_dwconv": False, "representation_size": None, "use_checkpoint_stages": [], "kv_downsample_ratios": None,
    "kv_downsample_kernels": None, "pe_stages": [0], "attn_drop": 0.0,
}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official BiFormer checkpoints (``checkpoint['model']``, optional ``module.``) already use our names."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    return build_model_with_cfg(
        BiFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    """The official evaluation: resize 256/224 bicubic, centre crop, ImageNet mean/std (not timm's ViT defaults)."""
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "downsample_layers.0.0", "classifier": "head", "license": "mit", **kwargs,
    }


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvCh{}/root/content"
default_cfgs = generate_default_cfgs({
    "biformer_tiny.official_in1k": _cfg(_ONEDRIVE.format("HEOoGkgwgQzEDlM")),
    "biformer_small.official_in1k": _cfg(_ONEDRIVE.format("HDyM-x9KWRBZ832")),
    "biformer_base.official_in1k": _cfg(_ONEDRIVE.format("HI_XPhoadjaNxtO")),
})


for _variant, _key in (("tiny", "HEOoGkgwgQzEDlM"), ("small", "HDyM-x9KWRBZ832"), ("base", "HI_XPhoadjaNxtO")):
    register_checkpoint(CheckpointEntry(
        name=f"biformer_{_variant}.official_in1k", model=f"biformer_{_variant}", url=_ONEDRIVE.format(_key),
        filename=f"biformer_{_variant}_in1k.pth", converter="attnzoo.vision.biformer:checkpoint_filter_fn", default=True,
        preprocess=PreprocessConfig(crop_pct=0.875, interpolation="bicubic"), license="MIT",
        notes="official release (OneDrive; the links have been reported dead, issue #53): pass weights=PATH to a local copy",
    ))


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    args = dict(depth=[2, 2, 8, 2], embed_dim=[64, 128, 256, 512], mlp_ratios=[3, 3, 3, 3], head_dim=32, topks=[1, 4, 16, -2],
                qk_dims=[64, 128, 256, 512], n_win=7, side_dwconv=5, before_attn_dwconv=3)
    return _create_biformer("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    args = dict(depth=[4, 4, 18, 4], embed_dim=[64, 128, 256, 512], mlp_ratios=[3, 3, 3, 3], head_dim=32, topks=[1, 4, 16, -2],
                qk_dims=[64, 128, 256, 512], n_win=7, side_dwconv=5, before_attn_dwconv=3)
    return _create_biformer("biformer_small", pretrained, **dict(args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    args = dict(depth=[4, 4, 18, 4], embed_dim=[96, 192, 384, 768], mlp_ratios=[3, 3, 3, 3], head_dim=32, topks=[1, 4, 16, -2],
                qk_dims=[96, 192, 384, 768], n_win=7, side_dwconv=5, before_attn_dwconv=3)
    return _create_biformer("biformer_base", pretrained, **dict(args, **kwargs))


