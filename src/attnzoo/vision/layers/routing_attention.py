"""BiFormer's attention blocks: bi-level routing attention (BRA) and global attention with LePE.

Two families, as in the official code, each keeping the official parameter names so official
checkpoints load without renaming:

- the legacy ones (``ops/bra_legacy.py``, ``models/_common.py``) take NHWC maps:
  ``BiLevelRoutingAttention`` (``qkv.qkv``, ``wo``, ``lepe``) and ``AttentionLePE``
  (``qkv``, ``proj``, ``lepe``);
- the refactored ones (``ops/bra_nchw.py``, ``nchwAttentionLePE``) take NCHW maps and hold
  1x1 convolutions: ``NCHWBiLevelRoutingAttention`` (``qkv_linear``, ``output_linear``,
  ``lepe``) and ``NCHWAttentionLePE`` (``qkv``, ``proj``, ``lepe``).
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

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_scale: float | None = None, topk: int = 4, side_dwconv: int = 3):
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
            self._groups[key] = (window_groups(height, width, region, device=device), window_groups(*padded, region, device=device))
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
        route = region_routing(q.reshape(B, H * W, C), k.reshape(B, H * W, C), q_groups, self.topk, 1.0)  # unscaled, as official
        region = (H // self.n_win, W // self.n_win)
        pad_b, pad_r = -H % region[0], -W % region[1]
        kp, vp = (F.pad(t, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else t for t in (k, v))  # zeros, unmasked
        q, kp, vp = (t.reshape(B, -1, self.num_heads, C // self.num_heads) for t in (q, kp, vp))  # heads: views, no copy
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

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None, side_dwconv: int = 5):
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
