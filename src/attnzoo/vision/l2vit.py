"""L²ViT: The Linear Attention Resurrection in Vision Transformer.

Zheng et al., 2025. https://arxiv.org/abs/2501.16182
Official code: https://github.com/ChuanyangZheng/L2ViT (classification/models/l2vit.py).

Hierarchical ViT on tokens. Stages alternate two blocks: local window attention (7x7,
non-shifted, unmasked zero padding) and enhanced linear global attention (ReLU features,
denominator clamped at 100, per-head temperature) followed by the local concentration module
(depthwise 7x7 conv, GELU, BN, depthwise 7x7). Every block starts with a depthwise 3x3
conditional position encoding. Attention goes through ``attnzoo.kernels``. Parameter names
follow the official checkpoints (``checkpoint['model']``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from attnzoo.kernels import grouped_attention, l2vit_linear_attention, window_groups
from attnzoo.vision._common import ClassifierMixin, build_classifier, check_official_kwargs, check_output_fmt
from attnzoo.weights import register_checkpoints, unwrap_state_dict

__all__ = ["L2ViT"]


def _nchw(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *size)


def _nhwc(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x.reshape(x.shape[0], *size, x.shape[-1])


class ConvPosEnc(nn.Module):
    """Depthwise 3x3 conv on the token map (``cpe.{0,1}.proj``); the caller adds the residual."""

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.proj(_nchw(x, size)).flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """Softmax attention in non-overlapping windows; maps are zero-padded after the norm, unmasked."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7):
        super().__init__()
        self.num_heads, self.window_size = num_heads, window_size
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        ws = self.window_size
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        if (Hp, Wp) != (H, W):  # the official code pads with zero tokens that take part in the softmax
            x = F.pad(x.reshape(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H)).reshape(B, Hp * Wp, C)
        q, k, v = self.qkv(x).reshape(B, Hp * Wp, 3, self.num_heads, C // self.num_heads).unbind(2)
        groups = window_groups(Hp, Wp, ws, device=x.device)
        out = grouped_attention(q, k, v, groups, scale=self.scale).reshape(B, Hp, Wp, C)[:, :H, :W]
        return self.proj(out.reshape(B, N, C))


class LinearAttention(nn.Module):
    """Enhanced linear attention over all tokens of the stage (``temperature`` per head)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), (dim // num_heads) ** -0.5))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = l2vit_linear_attention(q, k, v, temperature=self.temperature, denom_min=100.0)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class LocalConcentration(nn.Module):
    """LCM (``local_mp``): depthwise 7x7, GELU, BN, depthwise 7x7 on the token map."""

    def __init__(self, dim: int, kernel: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv2(self.bn(self.act(self.conv1(_nchw(x, size))))).flatten(2).transpose(1, 2)


class LocalWindowBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, drop_path: float):
        super().__init__()
        self.cpe = nn.ModuleList([ConvPosEnc(dim), ConvPosEnc(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.cpe[0](x, size)
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        x = x + self.cpe[1](x, size)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LinearGlobalBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.cpe = nn.ModuleList([ConvPosEnc(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.local_mp = LocalConcentration(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.cpe[0](x, size)
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        x = x + self.drop_path(self.local_mp(self.norm3(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvStem(nn.Module):
    """Two stride-2 3x3 convs with BN (ReLU between), then tokens and LayerNorm."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Module()
        self.proj.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, 2, 1),
            nn.BatchNorm2d(dim // 2),
            nn.ReLU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1),
            nn.BatchNorm2d(dim),
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj.proj(x)
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size


class PatchMerging(nn.Module):
    """LayerNorm on tokens, then a 2x2 stride-2 conv (odd sides zero-padded right/bottom)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Conv2d(dim, out_dim, 2, stride=2)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        x = _nchw(self.norm(x), size)
        if size[0] % 2 or size[1] % 2:
            x = F.pad(x, (0, size[1] % 2, 0, size[0] % 2))
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class L2ViT(ClassifierMixin, nn.Module):
    """Keyword names mirror the official constructor (``depths``, ``dims``, ``num_heads`` ...).

    As timm's Swin, ``forward_features`` returns the normed last stage as an NHWC map
    (``output_fmt``) and ``forward_intermediates`` NCHW maps (or the official NLC tokens).
    """

    output_fmt = "NHWC"

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float | Sequence[float] = 4.0,
        window_size: int = 7,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        layer_scale_init_value: float = 1e-6,  # accepted and ignored, as in the official code
        head_init_scale: float = 1.0,
        **unsupported: Any,
    ):
        super().__init__()
        check_official_kwargs("L2ViT", unsupported, _OFFICIAL_DEFAULTS)
        ratios = list(mlp_ratio) if isinstance(mlp_ratio, Sequence) else [mlp_ratio] * 4
        self.num_classes, self.global_pool = num_classes, self.check_global_pool(global_pool)
        self.num_features = self.head_hidden_size = dims[-1]
        self.downsample_layers = nn.ModuleList(
            [ConvStem(in_chans, dims[0])] + [PatchMerging(dims[i], dims[i + 1]) for i in range(3)]
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.feature_info = []
        cursor = 0
        for i in range(4):
            blocks = [
                LocalWindowBlock(dims[i], num_heads[i], ratios[i], window_size, rates[cursor + j])
                if j % 2 == 0
                else LinearGlobalBlock(dims[i], num_heads[i], ratios[i], rates[cursor + j])
                for j in range(depths[i])
            ]
            self.stages.append(nn.ModuleList(blocks))
            cursor += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.norm = nn.LayerNorm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _stages(self, x: torch.Tensor):
        """Yield (tokens [B, N, C], (H, W)) after each stage."""
        size = None
        for i, (down, blocks) in enumerate(zip(self.downsample_layers, self.stages, strict=True)):
            x, size = down(x) if i == 0 else down(x, size)
            for block in blocks:
                if self.grad_checkpointing and self.training:
                    x = torch.utils.checkpoint.checkpoint(block, x, size, use_reentrant=False)
                else:
                    x = block(x, size)
            yield x, size

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs as NCHW maps or NLC tokens at ``indices`` (last n if an int), and the final
        NHWC map of ``forward_features``: timm's contract."""
        check_output_fmt(output_fmt)
        take, last = feature_take_indices(len(self.stages), indices)
        intermediates = []
        for i, (tokens, size) in enumerate(self._stages(x)):
            if i in take:
                out = self.norm(tokens) if norm and i == len(self.stages) - 1 else tokens
                intermediates.append(_nchw(out, size) if output_fmt == "NCHW" else out)
            if stop_early and i >= last:
                break
        if intermediates_only:
            return intermediates
        final = self.norm(tokens) if i == len(self.stages) - 1 else tokens  # the norm is sized for the last stage
        return _nhwc(final, size), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        *_, (tokens, size) = self._stages(x)  # the last stage's tokens
        return _nhwc(self.norm(tokens), size)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.pool_and_classify(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_OFFICIAL_DEFAULTS = {
    "cpe": False,
    "sub_cpe": False,
    "cpe_kernel": 3,
    "cpe_act": False,
    "conv_stem": True,
    "conv_stem_type": "2L",
    "stem_overlapped": False,
    "overlapped": False,
    "ffn_conv": False,
    "rffn_conv": False,
    "token_mixer": "csmix",
    "channel_mixer": "mlp",
    "block_type": "mix_local_enhanced_vit",
    "norm": {"type": "LN"},
    "last_proj": False,
}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official checkpoints keep the weights under ``model`` (and the EMA under ``model_ema``); our names."""
    return unwrap_state_dict(state_dict)


def _create_l2vit(variant: str, pretrained: bool = False, **kwargs: Any) -> L2ViT:
    return build_classifier(
        L2ViT,
        variant,
        pretrained,
        filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(file: str, **kwargs: Any) -> dict[str, Any]:
    """The official evaluation: resize S/0.875 bicubic and centre crop below 384 px, ImageNet mean/std."""
    return {
        "url": f"https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0/{file}",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "downsample_layers.0.proj.proj.0",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    register_checkpoints(
        {
            "l2vit_tiny.official_in1k": _cfg("L2ViT-Tiny-checkpoint-best-ema.pth"),
            "l2vit_small.official_in1k": _cfg("L2ViT-Small-checkpoint-best-ema.pth"),
            "l2vit_base.official_in1k": _cfg("L2ViT-Base-checkpoint-best-ema.pth"),
            "l2vit_base_384.official_in22k_ft_in1k": _cfg(
                "L2ViT-Base-22k21k-finetune-384-checkpoint-best.pth",
                input_size=(3, 384, 384),
                pool_size=(12, 12),
                crop_pct=1.0,
            ),
        },
        converter="attnzoo.vision.l2vit:checkpoint_filter_fn",
    )
)


@register_model
def l2vit_tiny(pretrained: bool = False, **kwargs: Any) -> L2ViT:
    args = dict(depths=[2, 2, 6, 2], dims=[96, 192, 384, 768], num_heads=[3, 6, 12, 24], window_size=7)
    return _create_l2vit("l2vit_tiny", pretrained, **dict(args, **kwargs))


@register_model
def l2vit_small(pretrained: bool = False, **kwargs: Any) -> L2ViT:
    args = dict(depths=[2, 2, 18, 2], dims=[96, 192, 384, 768], num_heads=[3, 6, 12, 24], window_size=7)
    return _create_l2vit("l2vit_small", pretrained, **dict(args, **kwargs))


@register_model
def l2vit_base(pretrained: bool = False, **kwargs: Any) -> L2ViT:
    args = dict(depths=[2, 2, 18, 2], dims=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32], window_size=7)
    return _create_l2vit("l2vit_base", pretrained, **dict(args, **kwargs))


@register_model
def l2vit_base_384(pretrained: bool = False, **kwargs: Any) -> L2ViT:
    args = dict(depths=[2, 2, 18, 2], dims=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32], window_size=12)
    return _create_l2vit("l2vit_base_384", pretrained, **dict(args, **kwargs))
