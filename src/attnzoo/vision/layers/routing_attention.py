"""BiFormer's attention blocks: bi-level routing attention (BRA) and global attention with LePE.

Both take NHWC maps and keep the official parameter names (``qkv.qkv``, ``wo``, ``lepe``;
``qkv``, ``proj``, ``lepe``) so official checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import grouped_attention, region_routing, window_groups


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
    ``auto_pad=False`` asserts).
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: int | None = None, qk_scale: float | None = None,
                 topk: int = 4, side_dwconv: int = 5):
        super().__init__()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % self.n_win or W % self.n_win:
            raise InvalidInputError(
                f"BiLevelRoutingAttention: a {H}x{W} map does not split into {self.n_win}x{self.n_win} regions "
                f"(BiFormer needs input sizes whose stage maps divide by {self.n_win}, e.g. 224 or 448)"
            )
        q, k, v = self.qkv(x.reshape(B, H * W, C))
        groups = self.groups(H, W, x.device)
        route = region_routing(q, k, groups, self.topk, self.scale)
        heads = lambda t: t.reshape(B, H * W, self.num_heads, -1)  # noqa: E731
        out = grouped_attention(heads(q), heads(k), heads(v), groups, route=route, scale=self.scale).reshape(B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(v.reshape(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.wo(out)


class AttentionLePE(nn.Module):
    """BiFormer's last stage: plain multi-head attention over the whole map, LePE on the input.

    As the official code: ``qkv`` without bias, scale ``head_dim ** -0.5``, LePE (depthwise conv)
    applied to the block input ``x`` and added before ``proj``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None, side_dwconv: int = 5):
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
