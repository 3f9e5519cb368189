"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Zhu, Wang, Ke, Zhang, Lau. CVPR 2023. https://arxiv.org/abs/2303.08810
Official code: https://github.com/rayleizhu/BiFormer (models/biformer.py, models/biformer_stl.py,
models/biformer_stl_nchw.py, ops/bra_legacy.py, ops/bra_nchw.py).

Four stages on NCHW maps; each block: depthwise-conv position embedding, then (NHWC)
pre-norm attention and MLP. Stages 1-3 use bi-level routing attention (top-k 1/4/16 regions
of a 7x7 grid, so every query sees 64 keys at 224 px); stage 4 uses global attention with
LePE. BatchNorm before global pooling. Parameter names follow the official checkpoints.

Bi-level routing attention (BRA), all of it in this file apart from the two kernel ops:

1. one projection gives q, k (width ``qk_dim``) and v;
2. the map is cut into ``n_win`` x ``n_win`` regions (``attnzoo.kernels.window_groups``);
3. region-to-region routing: the region means of q and k (detached, all heads together) score
   every region pair, and each region keeps its ``topk`` best key regions
   (``attnzoo.kernels.region_routing``);
4. token attention: each query attends to the tokens of its routed regions, per head, with the
   scale ``qk_dim ** -0.5`` of the released models (``attnzoo.kernels.grouped_attention``,
   which reads the routed keys in place instead of gathering them as the official code does);
5. LePE (a depthwise conv on v) is added and the output projection applied.

Implemented here: biformer_tiny, biformer_small, biformer_base (:class:`BiFormer`, the released
classifiers using the legacy BRA) and the two "Swin-Tiny-Layout" ablation models (:class:`BiFormerSTL`):
biformer_stl (legacy BRA, NHWC blocks) and biformer_stl_nchw (the refactored NCHW BRA, 1x1
convolutions, which zero-pads maps that do not divide into regions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, get_norm_layer
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import grouped_attention, region_means, region_routing, window_groups
from attnzoo.vision._common import (
    ClassifierMixin,
    build_classifier,
    check_official_kwargs,
    check_output_fmt,
    init_vit_weights,
)
from attnzoo.weights import register_checkpoints, unwrap_state_dict

__all__ = [
    "AttentionLePE",
    "BiFormer",
    "BiFormerSTL",
    "BiLevelRoutingAttention",
    "NCHWAttentionLePE",
    "NCHWBiLevelRoutingAttention",
]


# -- attention: BRA and global attention with LePE ---------------------------------------------
#
# Two families, as in the official code, each keeping the official parameter names so official
# checkpoints load without renaming: the legacy ones (ops/bra_legacy.py, models/_common.py) take
# NHWC maps; the refactored ones (ops/bra_nchw.py, nchwAttentionLePE) take NCHW maps and hold 1x1
# convolutions.


_BRA_OFFICIAL_DEFAULTS = {
    "kv_downsample_mode": "identity",
    "param_attention": "qkvo",
    "param_routing": False,
    "diff_routing": False,
    "soft_routing": False,
    "auto_pad": False,
}
_KV_DOWNSAMPLE_ONLY = ("kv_per_win", "kv_downsample_ratio", "kv_downsample_kernel")  # unread by the identity mode


class QKVLinear(nn.Module):
    """One projection to ``q | k | v`` (widths qk, qk, dim), as the official ``QKVLinear``."""

    def __init__(self, dim: int, qk_dim: int, bias: bool = True):
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)


class BiLevelRoutingAttention(nn.Module):
    """Region-to-region routing (top-k regions per region, shared by heads, no gradient), then
    token attention inside the routed regions, plus LePE (depthwise conv on v) before ``wo``.

    Compatible with the released BiFormer weights: ``scale = qk_dim ** -0.5`` (the full width,
    not the head width), ``n_win`` regions per side (the map must divide evenly, as the official
    ``auto_pad=False`` asserts). ``qk_dim`` may differ from ``dim``, as officially (the released
    models have them equal).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        topk: int = 4,
        side_dwconv: int = 5,
        **official: Any,
    ):
        super().__init__()
        if official.get("kv_downsample_mode", "identity") == "identity":
            for key in _KV_DOWNSAMPLE_ONLY:
                official.pop(key, None)
        check_official_kwargs("BiLevelRoutingAttention", official, _BRA_OFFICIAL_DEFAULTS)
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise InvalidInputError(f"dim {dim} and qk_dim {self.qk_dim} must be divisible by num_heads {num_heads}")
        self.scale = qk_scale or self.qk_dim**-0.5
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        self.wo = nn.Linear(dim, dim)
        self._groups: dict[tuple, torch.Tensor] = {}

    def groups(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (height, width, device)
        if key not in self._groups:
            self._groups[key] = window_groups(height, width, (height // self.n_win, width // self.n_win), device=device)
        return self._groups[key]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, N, heads * d]`` -> ``[B, N, heads, d]`` (heads are contiguous channel chunks, as official)."""
        return t.reshape(*t.shape[:2], self.num_heads, t.shape[-1] // self.num_heads)  # no -1: a batch may be empty

    def _one_width(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k and v of one width, as the kernel takes: with ``qk_dim != dim`` (which the
        official code allows) the narrower side is zero-padded. Zero columns add nothing to
        ``q . k``, and the padded columns of the output are cut off by :meth:`forward`."""
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        extra = q.shape[-1] - v.shape[-1]
        if extra > 0:
            v = F.pad(v, (0, extra))
        elif extra < 0:
            q, k = F.pad(q, (0, -extra)), F.pad(k, (0, -extra))
        return q, k, v

    def forward(
        self, x: torch.Tensor, ret_attn_mask: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """NHWC in and out. ``ret_attn_mask=True`` also returns, as the official module does,
        ``r_weight`` and ``r_idx`` (the routing, ``[B, G, topk]``) and ``attn_weight``
        (see :meth:`attention_weights`)."""
        B, H, W, C = x.shape
        if H % self.n_win or W % self.n_win:
            raise InvalidInputError(
                f"BiLevelRoutingAttention: a {H}x{W} map does not split into {self.n_win}x{self.n_win} regions "
                f"(BiFormer needs input sizes whose stage maps divide by {self.n_win}, e.g. 224 or 448)"
            )
        q, k, v = self.qkv(x.reshape(B, H * W, C))
        groups = self.groups(H, W, x.device)
        route = region_routing(q, k, groups, self.topk, self.scale)
        out = grouped_attention(*self._one_width(q, k, v), groups, route=route, scale=self.scale)
        out = out[..., : C // self.num_heads].reshape(B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(v.reshape(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)
        if not ret_attn_mask:
            return out
        return out, *self.attention_weights(q, k, groups, route)

    def attention_weights(
        self, q: torch.Tensor, k: torch.Tensor, groups: torch.Tensor, route: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the official module returns beside its output, for inspection (the forward never
        materialises them): ``r_weight``, the softmax of each region's top-k routing logits (computed
        but unused by the released hard routing); ``r_idx``; ``attn_weight`` ``[B * G, heads, T,
        topk * T]``, each region's post-softmax token attention, keys in routed-region order and
        row-major inside a region."""
        B, G, T = q.shape[0], *groups.shape
        index = route.long()
        with torch.no_grad():
            logits = (region_means(q, groups) * self.scale) @ region_means(k, groups).transpose(-1, -2)
        r_weight = logits.gather(-1, index).softmax(dim=-1)
        queries = self._heads(q)[:, groups.long()].permute(0, 1, 3, 2, 4)  # [B, G, heads, T, d]
        key_tokens = groups.long()[index].flatten(2)  # [B, G, topk * T]
        keys = self._heads(k)[torch.arange(B, device=q.device)[:, None, None], key_tokens]  # [B, G, topk*T, heads, d]
        attn = ((queries * self.scale) @ keys.permute(0, 1, 3, 4, 2)).softmax(dim=-1)
        return r_weight, index, attn.reshape(B * G, self.num_heads, T, attn.shape[-1])


class AttentionLePE(nn.Module):
    """BiFormer's last stage: plain multi-head attention over the whole map, LePE on the input.

    As the official code: ``qkv`` without bias, scale ``head_dim ** -0.5``, LePE (depthwise conv)
    applied to the block input ``x`` and added before ``proj``.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None, side_dwconv: int = 5
    ):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        q, k, v = self.qkv(tokens).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, H * W, C)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        return self.proj(out).reshape(B, H, W, C)


class NCHWBiLevelRoutingAttention(nn.Module):
    """The refactored BRA of BiFormer-STL-nchw (official ``nchwBRA``): NCHW in and out.

    Same math as :class:`BiLevelRoutingAttention` on maps that divide into ``n_win`` x ``n_win``
    regions (the 1x1 convolutions are the same linear maps; routing is unscaled, which picks the
    same regions). Other sizes are handled as the official code does, which differs from the
    legacy zero padding:

    - the region size is ``(H // n_win, W // n_win)``, so there are ``ceil(H / rh) x
      ceil(W / rw)`` regions (possibly more than ``n_win`` per side), the last ones partial;
    - region descriptors average only the valid tokens of a partial region (``avg_pool2d`` with
      ``ceil_mode=True, count_include_pad=False``);
    - keys and values are zero-padded *after* the projection to whole regions and the padded
      slots are **not masked**: each one adds a logit of 0 (with a zero value) to the softmax of
      every query that routes to its region. Padded queries are dropped.

    The map must be at least ``n_win`` tokens per side (the region size is then at least 1).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_scale: float | None = None,
        topk: int = 4,
        side_dwconv: int = 3,
    ):
        super().__init__()
        if dim % num_heads:
            raise InvalidInputError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if topk < 1:
            raise InvalidInputError(f"NCHWBiLevelRoutingAttention needs topk >= 1, got {topk}")
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = qk_scale or dim**-0.5  # the full width, as the official code (and the legacy models)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, kernel_size=1)
        self.output_linear = nn.Conv2d(dim, dim, kernel_size=1)
        self._groups: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def groups(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Query groups on the map (partial regions hold ``-1`` slots) and key/value groups on the
        zero-padded map (every slot a token), both in the same row-major region order."""
        key = (height, width, device)
        if key not in self._groups:
            region = (height // self.n_win, width // self.n_win)
            padded = (-(-height // region[0]) * region[0], -(-width // region[1]) * region[1])
            self._groups[key] = (
                window_groups(height, width, region, device=device),
                window_groups(*padded, region, device=device),
            )
        return self._groups[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H < self.n_win or W < self.n_win:
            raise InvalidInputError(
                f"NCHWBiLevelRoutingAttention: a {H}x{W} map is smaller than {self.n_win} regions per side "
                f"(the region size H // n_win, W // n_win must be at least 1)"
            )
        q_groups, kv_groups = self.groups(H, W, x.device)
        # the 1x1 conv as a linear map on NHWC tokens, so the kernels read token-major q, k, v
        qkv = F.linear(x.permute(0, 2, 3, 1), self.qkv_linear.weight.flatten(1), self.qkv_linear.bias)  # [B, H, W, 3C]
        q, k, v = qkv.chunk(3, dim=-1)
        route = region_routing(
            q.reshape(B, H * W, C), k.reshape(B, H * W, C), q_groups, self.topk, 1.0
        )  # unscaled, as official
        region = (H // self.n_win, W // self.n_win)
        pad_b, pad_r = -H % region[0], -W % region[1]
        kp, vp = (F.pad(t, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else t for t in (k, v))  # zeros, unmasked
        q, kp, vp = (
            t.reshape(B, t.shape[1] * t.shape[2], self.num_heads, C // self.num_heads) for t in (q, kp, vp)
        )  # heads: views, no copy (no -1: a batch may be empty)
        out = grouped_attention(q, kp, vp, q_groups, kv_groups, route=route, scale=self.scale).reshape(B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = F.linear(out, self.output_linear.weight.flatten(1), self.output_linear.bias)
        return out.permute(0, 3, 1, 2)


class NCHWAttentionLePE(nn.Module):
    """BiFormer-STL-nchw's last stage (official ``nchwAttentionLePE``): global attention, NCHW.

    Like :class:`AttentionLePE` (``num_heads=8``, bias-free ``qkv``, ``head_dim ** -0.5``), but
    with 1x1 convolutions and, unlike it, LePE applied to **v** rather than to the input.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None, side_dwconv: int = 5
    ):
        super().__init__()
        if dim % num_heads:
            raise InvalidInputError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=qkv_bias)
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = F.linear(x.permute(0, 2, 3, 1).reshape(B, H * W, C), self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = qkv.reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(v.transpose(2, 3).reshape(B, C, H, W)).permute(0, 2, 3, 1)
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)
        return out.permute(0, 3, 1, 2)


# -- blocks ------------------------------------------------------------------------------------


class BiFormerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        n_win: int,
        topk: int,
        qk_dim: int | None,
        mlp_ratio: float,
        side_dwconv: int,
        before_attn_dwconv: int,
        drop_path: float = 0.0,
        qk_scale: float | None = None,
    ):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, before_attn_dwconv, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn: nn.Module = BiLevelRoutingAttention(
                dim,
                num_heads=num_heads,
                n_win=n_win,
                qk_dim=qk_dim,
                qk_scale=qk_scale,
                topk=topk,
                side_dwconv=side_dwconv,
            )
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


class BiFormerSTLBlock(nn.Module):
    """BiFormer-STL block (official ``models/biformer_stl.py``), NHWC: pre-norm attention and MLP,
    no position-embedding conv, no layer scale; MLP keys ``mlp.0``/``mlp.2``."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        n_win: int,
        topk: int,
        mlp_ratio: float,
        side_dwconv: int,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn: nn.Module = BiLevelRoutingAttention(
                dim, num_heads=num_heads, n_win=n_win, qk_dim=dim, topk=topk, side_dwconv=side_dwconv
            )
        elif topk == -2:  # the released stage 4: global attention, LePE on the input
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv)
        elif topk == -1:  # the official plain ``Attention`` (same keys ``qkv``/``proj``, no LePE)
            self.attn = AttentionLePE(dim, side_dwconv=0)
        else:
            raise InvalidInputError(
                f"biformer_stl: topk={topk} is not supported (use > 0 for BRA, -2 for attention with LePE, -1 without)"
            )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NHWC in and out
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class NCHWBiFormerSTLBlock(nn.Module):
    """BiFormer-STL-nchw block (official ``models/biformer_stl_nchw.py``), NCHW: ``LayerNorm2d``
    (eps 1e-6), the refactored BRA or global attention with LePE on v, and a 1x1-conv MLP."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        n_win: int,
        topk: int,
        mlp_ratio: float,
        side_dwconv: int,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        if topk > 0:
            self.attn: nn.Module = NCHWBiLevelRoutingAttention(
                dim, num_heads=num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv
            )
        elif topk == -1:  # the released stage 4; the official block does not pass side_dwconv here (kernel 5)
            self.attn = NCHWAttentionLePE(dim)
        else:
            raise InvalidInputError(
                f"biformer_stl_nchw: topk={topk} is not supported (use > 0 for BRA, -1 for attention with LePE)"
            )
        self.norm2 = LayerNorm2d(dim)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW in and out
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BiFormerSTLStage(nn.Module):
    """``stages.{i}.blocks.{j}``; NCHW in and out (the legacy blocks run on an NHWC view)."""

    def __init__(self, blocks: Sequence[nn.Module], channels_last: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2) if self.channels_last else x


# -- models ------------------------------------------------------------------------------------

_OFFICIAL_DEFAULTS = {
    "kv_downsample_mode": "identity",
    "kv_per_wins": [-1, -1, -1, -1],
    "layer_scale_init_value": -1,
    "param_routing": False,
    "diff_routing": False,
    "soft_routing": False,
    "pre_norm": True,
    "pe": None,
    "auto_pad": False,
    "param_attention": "qkvo",
    "mlp_dwconv": False,
    "representation_size": None,
    "use_checkpoint_stages": [],
    "kv_downsample_ratios": None,
    "kv_downsample_kernels": None,
    "pe_stages": [0],
    "attn_drop": 0.0,
}

_STL_OFFICIAL_DEFAULTS = {"qk_scale": None, "use_checkpoint_stages": []}  # the official STL classes ignore qk_scale


class _BiFormerBase(ClassifierMixin, nn.Module):
    """What both layouts share: ``downsample_layers[i]`` then ``stages[i]`` on NCHW maps, a 2-D
    ``norm`` before pooling, a linear ``head``; timm's feature and classifier API."""

    downsample_layers: nn.ModuleList
    stages: nn.ModuleList
    norm: nn.Module
    head_drop: nn.Module

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for input sizes the model cannot take (the attention layers check too)."""

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs (NCHW) at ``indices`` (last n if an int), timm's contract."""
        check_output_fmt(output_fmt, ("NCHW",))
        self._check_input(x)
        take, last = feature_take_indices(len(self.stages), indices)
        intermediates = []
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages, strict=True)):
            x = stage(downsample(x))
            if i in take:
                intermediates.append(self.norm(x) if norm and i == len(self.stages) - 1 else x)
            if stop_early and i >= last:
                break
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = downsample(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.pool_and_classify(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class BiFormer(_BiFormerBase):
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
        self.num_classes, self.global_pool = num_classes, self.check_global_pool(global_pool)
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_chans, embed_dim[0] // 2, 3, stride=2, padding=1),
                    nn.BatchNorm2d(embed_dim[0] // 2),
                    nn.GELU(),
                    nn.Conv2d(embed_dim[0] // 2, embed_dim[0], 3, stride=2, padding=1),
                    nn.BatchNorm2d(embed_dim[0]),
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    nn.Conv2d(embed_dim[i], embed_dim[i + 1], 3, stride=2, padding=1), nn.BatchNorm2d(embed_dim[i + 1])
                )
            )
        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.feature_info = []
        cursor = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(
                    *[
                        BiFormerBlock(
                            embed_dim[i],
                            num_heads=embed_dim[i] // head_dim,
                            n_win=n_win,
                            topk=topks[i],
                            qk_dim=qk_dims[i],
                            mlp_ratio=mlp_ratios[i],
                            side_dwconv=side_dwconv,
                            before_attn_dwconv=before_attn_dwconv,
                            drop_path=rates[cursor + j],
                            qk_scale=qk_scale,
                        )
                        for j in range(depth[i])
                    ]
                )
            )
            cursor += depth[i]
            self.feature_info.append(dict(num_chs=embed_dim[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.apply(init_vit_weights)


class BiFormerSTL(_BiFormerBase):
    """BiFormer in the Swin-T layout (the paper's ablation model), both official implementations.

    ``layout="legacy"`` is ``models/biformer_stl.py`` (``BiFormerSTL``: legacy BRA, keys
    ``attn.qkv.qkv``/``attn.wo``; every BRA stage map must divide into ``n_wins[i]`` regions).
    ``layout="nchw"`` is ``models/biformer_stl_nchw.py`` (``nchwBiFormerSTL``: refactored BRA,
    keys ``attn.qkv_linear``/``attn.output_linear``, zero-pads other sizes as the official code).

    Patchify stem (Conv 4x4 s4 -> norm), patch merging (norm -> Conv 2x2 s2), blocks of
    pre-norm attention and MLP, ``norm`` before pooling, linear head. ``norm_layer`` (the stem,
    merging and final norms; a class or a timm name) defaults to ``BatchNorm2d``, as both
    released models; the official class default is ``LayerNorm2d``. ``topks`` defaults to the
    released ``(1, 4, 16, -2)`` (legacy) or ``(1, 4, 16, -1)`` (nchw): the last stage is global
    attention with LePE, on the input in the legacy model and on v in the nchw model, so the two
    released models differ there even on divisible sizes. The other keywords mirror the official
    constructor; ``drop_rate`` (unused officially) is dropout before the head.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depth: Sequence[int] = (2, 2, 6, 2),
        embed_dim: Sequence[int] = (96, 192, 384, 768),
        head_dim: int = 32,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        norm_layer: type[nn.Module] | str = nn.BatchNorm2d,
        pre_head_norm_layer: type[nn.Module] | str | None = None,
        n_wins: int | Sequence[int] = (7, 7, 7, 7),
        topks: Sequence[int] | None = None,
        side_dwconv: int = 5,
        layout: str = "legacy",
        global_pool: str = "avg",
        **unsupported: Any,
    ):
        super().__init__()
        check_official_kwargs("BiFormerSTL", unsupported, _STL_OFFICIAL_DEFAULTS)
        if layout not in ("legacy", "nchw"):
            raise InvalidInputError(f"BiFormerSTL: layout must be 'legacy' or 'nchw', got {layout!r}")
        self.layout = layout
        self.n_wins = [n_wins] * 4 if isinstance(n_wins, int) else list(n_wins)
        self.topks = list(topks if topks is not None else ((1, 4, 16, -2) if layout == "legacy" else (1, 4, 16, -1)))
        norm_layer = get_norm_layer(norm_layer) if isinstance(norm_layer, str) else norm_layer
        pre_head_norm = (
            get_norm_layer(pre_head_norm_layer)
            if isinstance(pre_head_norm_layer, str)
            else (pre_head_norm_layer or norm_layer)
        )
        self.num_classes, self.global_pool = num_classes, self.check_global_pool(global_pool)
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, embed_dim[0], 4, stride=4), norm_layer(embed_dim[0]))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(norm_layer(embed_dim[i]), nn.Conv2d(embed_dim[i], embed_dim[i + 1], 2, stride=2))
            )
        block_cls = BiFormerSTLBlock if layout == "legacy" else NCHWBiFormerSTLBlock
        rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.feature_info = []
        cursor = 0
        for i in range(4):
            self.stages.append(
                BiFormerSTLStage(
                    [
                        block_cls(
                            embed_dim[i],
                            num_heads=embed_dim[i] // head_dim,
                            n_win=self.n_wins[i],
                            topk=self.topks[i],
                            mlp_ratio=mlp_ratios[i],
                            side_dwconv=side_dwconv,
                            drop_path=rates[cursor + j],
                        )
                        for j in range(depth[i])
                    ],
                    channels_last=layout == "legacy",
                )
            )
            cursor += depth[i]
            self.feature_info.append(dict(num_chs=embed_dim[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.norm = pre_head_norm(embed_dim[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.apply(init_vit_weights)

    def _check_input(self, x: torch.Tensor) -> None:
        H, W = x.shape[-2:]
        routed = [i for i in range(4) if self.topks[i] > 0]
        sizes = [(H >> (i + 2), W >> (i + 2)) for i in range(4)]  # the stem and merging convs floor
        name = "biformer_stl" if self.layout == "legacy" else "biformer_stl_nchw"
        if self.layout == "nchw" or not routed:  # the nchw BRA pads any map with at least n_win tokens per side
            least = max([32] + [self.n_wins[i] << (i + 2) for i in routed])
            if min(H, W) < least:
                raise InvalidInputError(
                    f"{name} takes inputs of at least {least}x{least} px (a routed stage map "
                    f"needs at least n_win tokens per side), got {H}x{W}"
                )
            return
        if min(sizes[3]) >= 1 and all(
            s % self.n_wins[i] == 0 and s >= self.n_wins[i] for i in routed for s in sizes[i]
        ):
            return
        period = math.lcm(*[self.n_wins[i] << (i + 2) for i in routed])
        raise InvalidInputError(
            f"{name} (legacy BRA, no padding) needs every routed stage map (H/4, H/8, H/16) to split evenly into "
            f"n_win x n_win regions: input sizes that are multiples of {period} px (e.g. {2 * period} or {4 * period}); "
            f"got {H}x{W}. biformer_stl_nchw zero-pads instead and takes other sizes."
        )


# -- checkpoints, builders, pretrained cfgs, registered models ------------------------------


def _layout_of(keys: Any) -> str | None:
    """Which official model a set of state-dict keys comes from (for a clear mismatch error)."""
    keys = list(keys)
    if any(".attn.qkv_linear." in k for k in keys):
        return "biformer_stl_nchw"
    if any(k.startswith("stages.") and ".blocks." in k for k in keys):
        return "biformer_stl"
    if any(k.startswith("stages.") for k in keys):
        return "biformer_tiny/small/base"
    return None


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official BiFormer checkpoints (``checkpoint['model']``, optional ``module.``) already use our names.

    The five released checkpoints come in three key layouts (BiFormer-T/S/B, STL, STL-nchw); a
    checkpoint of another layout than ``model`` raises an error naming the model it belongs to.
    """
    state_dict = unwrap_state_dict(state_dict)
    found, expected = _layout_of(state_dict), _layout_of(model.state_dict())
    if found and expected and found != expected:
        raise InvalidInputError(
            f"this is a {found} checkpoint, but the model is a {expected} model: create {found.split('/')[0]} instead"
        )
    return state_dict


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    return build_classifier(
        BiFormer,
        variant,
        pretrained,
        filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _create_biformer_stl(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormerSTL:
    return build_classifier(
        BiFormerSTL,
        variant,
        pretrained,
        filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _preset(preset: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A released configuration with the caller's keywords over it. Every released model has
    ``qk_dims == embed_dim``, so a given ``embed_dim`` without ``qk_dims`` brings its own (the
    official builders take no ``embed_dim`` at all); ``qk_dims`` given alone still applies."""
    if "embed_dim" in kwargs and "qk_dims" not in kwargs:
        kwargs = dict(kwargs, qk_dims=list(kwargs["embed_dim"]))
    return dict(preset, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    """The official evaluation: resize 256/224 bicubic, centre crop, ImageNet mean/std (not timm's ViT defaults).

    ``min_input_size``: the smallest input whose stage maps split into the 7x7 routing regions
    (legacy BRA: sides that are multiples of 112; the nchw BRA pads, but needs 7 tokens per side).
    """
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, 112, 112),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "downsample_layers.0.0",
        "classifier": "head",
        "license": "mit",
        "notes": (
            "official release (OneDrive; the links have been reported dead, issue #53): pass weights=PATH to a local copy",
        ),
        **kwargs,
    }


def _official(variant: str, share: str) -> dict[str, Any]:
    return _cfg(
        f"https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvCh{share}/root/content",
        filename=f"biformer_{variant}_in1k.pth",
    )


default_cfgs = generate_default_cfgs(
    register_checkpoints(
        {
            "biformer_tiny.official_in1k": _official("tiny", "HEOoGkgwgQzEDlM"),
            "biformer_small.official_in1k": _official("small", "HDyM-x9KWRBZ832"),
            "biformer_base.official_in1k": _official("base", "HI_XPhoadjaNxtO"),
            "biformer_stl.official_in1k": _official("stl", "Sf-m7ujkvx9lIQ1"),
            "biformer_stl_nchw.official_in1k": _official("stl_nchw", "WYrKbWbMgqd2Ai0"),
        },
        converter="attnzoo.vision.biformer:checkpoint_filter_fn",
    )
)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    args = dict(
        depth=[2, 2, 8, 2],
        embed_dim=[64, 128, 256, 512],
        mlp_ratios=[3, 3, 3, 3],
        head_dim=32,
        topks=[1, 4, 16, -2],
        qk_dims=[64, 128, 256, 512],
        n_win=7,
        side_dwconv=5,
        before_attn_dwconv=3,
    )
    return _create_biformer("biformer_tiny", pretrained, **_preset(args, kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    args = dict(
        depth=[4, 4, 18, 4],
        embed_dim=[64, 128, 256, 512],
        mlp_ratios=[3, 3, 3, 3],
        head_dim=32,
        topks=[1, 4, 16, -2],
        qk_dims=[64, 128, 256, 512],
        n_win=7,
        side_dwconv=5,
        before_attn_dwconv=3,
    )
    return _create_biformer("biformer_small", pretrained, **_preset(args, kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    args = dict(
        depth=[4, 4, 18, 4],
        embed_dim=[96, 192, 384, 768],
        mlp_ratios=[3, 3, 3, 3],
        head_dim=32,
        topks=[1, 4, 16, -2],
        qk_dims=[96, 192, 384, 768],
        n_win=7,
        side_dwconv=5,
        before_attn_dwconv=3,
    )
    return _create_biformer("biformer_base", pretrained, **_preset(args, kwargs))


@register_model
def biformer_stl(pretrained: bool = False, **kwargs: Any) -> BiFormerSTL:
    """BiFormer-STL (Swin-T layout, legacy BRA), 28.4M params, 82.7% IN-1k top-1 (official README)."""
    args = dict(
        depth=[2, 2, 6, 2],
        embed_dim=[96, 192, 384, 768],
        mlp_ratios=[4, 4, 4, 4],
        head_dim=32,
        norm_layer=nn.BatchNorm2d,
        n_wins=(7, 7, 7, 7),
        topks=(1, 4, 16, -2),
        side_dwconv=5,
        layout="legacy",
    )
    return _create_biformer_stl("biformer_stl", pretrained, **dict(args, **kwargs))


@register_model
def biformer_stl_nchw(pretrained: bool = False, **kwargs: Any) -> BiFormerSTL:
    """BiFormer-STL with the refactored NCHW BRA (pads any size), 28.4M params, 82.7% IN-1k top-1 (official README)."""
    args = dict(
        depth=[2, 2, 6, 2],
        embed_dim=[96, 192, 384, 768],
        mlp_ratios=[4, 4, 4, 4],
        head_dim=32,
        norm_layer=nn.BatchNorm2d,
        n_wins=(7, 7, 7, 7),
        topks=(1, 4, 16, -1),
        side_dwconv=5,
        layout="nchw",
    )
    return _create_biformer_stl("biformer_stl_nchw", pretrained, **dict(args, **kwargs))
