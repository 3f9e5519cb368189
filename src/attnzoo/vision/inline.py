"""InLine attention classifiers (InLine-Swin, InLine-DeiT).

Han, Pu, Xia, Han, Pan, Song, Huang. "Bridging the Divide: Reconsidering Softmax and Linear
Attention". NeurIPS 2024. https://arxiv.org/abs/2412.06590
Official code: https://github.com/LeapLabTHU/InLine (models/inline_swin.py, models/inline_deit.py).

InLine attention is linear attention with the identity feature map and a mean-key correction,
so each row of the implied attention matrix sums to one:
``o_i = q_i (K^T V) s/n + (1 - s q_i . kbar) vbar`` with ``s = head_dim ** -0.5`` and ``n`` the
number of tokens attended over (``attnzoo.kernels.inline_attention``). A local residual is added
before the output projection: a per-sample depthwise 3x3 conv on ``v`` whose kernel is predicted
from the token mean of the block input (``attn.residual``: grouped 1x1 conv, GELU, grouped 1x1
conv to 9 weights per channel).

- InLine-Swin: Swin-T/S/B layout. ``attn_type`` holds one letter per stage: ``I`` = InLine,
  ``S`` = Swin softmax window attention (window ``max(7, window_size // 8)`` with relative
  position bias, shifted on odd blocks), ``M<k>`` = the stage's first ``k`` blocks InLine and the
  rest softmax. Every window is clamped to the stage resolution, so with the released
  ``window_size=56`` the InLine stages are global (one window per stage, no shift).
- InLine-DeiT: DeiT with narrower widths; every block is InLine. The cls token takes part in
  the attention and in the mean that predicts the residual kernel, but not in the 3x3 conv.

Parameter and buffer names follow the official checkpoints (``checkpoint['model']``),
including the Swin ``relative_position_index`` and ``attn_mask`` buffers.
Not implemented: InLine-PVT, InLine-CSwin, InLine-Swin-B at 384 px (no released classifier
checkpoint for it in the README), non-identity feature maps (unused by every released model).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import inline_attention
from attnzoo.vision._common import (
    ClassifierMixin,
    build_classifier,
    check_official_kwargs,
    check_output_fmt,
    init_vit_weights,
)
from attnzoo.weights import register_checkpoints, unwrap_state_dict

__all__ = ["InLineAttention", "InLineDeiT", "InLineSwin", "checkpoint_filter_fn"]


# -- attention ---------------------------------------------------------------------------------


class InLineAttention(nn.Module):
    """InLine attention over all tokens it is given, plus the dynamic depthwise 3x3 residual on ``v``.

    ``forward(x, size)``: ``x`` is ``[B, N, C]``; the last ``size[0] * size[1]`` tokens form the
    ``size`` map the residual conv runs on (any tokens before them, e.g. DeiT's cls token, get no
    residual). The official code never applies attention dropout here, so there is none.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise InvalidInputError(f"InLineAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.residual = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size=1, groups=num_heads),
            nn.GELU(),
            nn.Conv1d(dim, dim * 9, kernel_size=1, groups=num_heads),
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        h, w = size
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        kernel = self.residual(x.mean(1).unsqueeze(-1)).reshape(B * C, 1, 3, 3)  # one 3x3 per sample and channel
        out = inline_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, N, C)
        prefix = N - h * w
        v_map = v[:, :, prefix:].transpose(1, 2).reshape(B, h, w, C).permute(0, 3, 1, 2).reshape(1, B * C, h, w)
        if B:
            local = F.conv2d(v_map, kernel, padding=1, groups=B * C).reshape(B, C, h * w).transpose(1, 2)
        else:  # an empty batch: conv2d refuses zero groups
            local = v_map.new_zeros(0, h * w, C)
        out = out + local if prefix == 0 else torch.cat([out[:, :prefix], out[:, prefix:] + local], dim=1)
        return self.proj_drop(self.proj(out))


def _relative_position_index(ws: int) -> torch.Tensor:
    """Swin's (ws*ws, ws*ws) index into the ((2ws-1)^2, heads) bias table (row-major offsets)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # 2, ws*ws
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # ws*ws, ws*ws, 2 (both >= 0)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Softmax attention inside square windows with a learned relative position bias (Swin's W-MSA)."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.window_size, self.num_heads = window_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer(
            "relative_position_index", _relative_position_index(window_size)
        )  # persistent, as released
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        Bw, N, C = x.shape
        q, k, v = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:  # (nW, N, N) of 0 / -100: tokens from different regions of a shifted window
            nW = mask.shape[0]
            attn = (attn.view(Bw // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(
                Bw, self.num_heads, N, N
            )
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(Bw, N, C)))


# -- blocks ------------------------------------------------------------------------------------


def _window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C), windows row-major (sizes spelt out: B may be 0)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * (H // ws) * (W // ws), ws * ws, C)


def _window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def _shift_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor:
    """Swin's SW-MSA mask: 0 within a region, -100 across the regions a cyclic shift brings together."""
    regions = torch.zeros(1, H, W, 1)
    label = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            regions[:, hs, wsl, :] = label
            label += 1
    windows = _window_partition(regions, ws).squeeze(-1)  # nW, ws*ws
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _parse_attn_type(attn_type: str, num_layers: int) -> list[str]:
    """One entry per stage: 'I', 'S' or 'M<k>' (the official suffix after the per-stage letters)."""
    letters, suffix = attn_type[:num_layers], attn_type[num_layers:]
    if len(letters) < num_layers or any(c not in "ISM" for c in letters) or ("M" in letters and not suffix.isdigit()):
        raise InvalidInputError(
            f"InLineSwin: attn_type {attn_type!r} must give one of I, S, M per stage ({num_layers} stages) and, if any "
            "stage is M, the number of leading InLine blocks after them (e.g. 'IIIS', 'IISS', 'IIMS2')"
        )
    return [c + suffix if c == "M" else c for c in letters]


def _block_plan(
    stage_type: str, depth: int, window_size: int, resolution: tuple[int, int]
) -> list[tuple[str, int, int]]:
    """(kind, window, shift) per block, exactly as the official BasicLayer/SwinTransformerBlock decide them."""
    plan = []
    for j in range(depth):
        kind = stage_type if stage_type[0] != "M" else ("I" if j < int(stage_type[1:]) else "S")
        ws = window_size if kind == "I" else max(7, window_size // 8)
        shift = 0 if j % 2 == 0 else ws // 2
        if min(resolution) <= ws:  # the window covers the map: no partition, no shift
            ws, shift = min(resolution), 0
        plan.append((kind, ws, shift))
    return plan


def _swin_size_problem(
    img_size: tuple[int, int], patch_size: int, depths: Sequence[int], window_size: int, stage_types: list[str]
) -> str | None:
    """Why these image sides cannot go through the network, or None if they can."""
    res = (img_size[0] // patch_size, img_size[1] // patch_size)
    if min(res) < 1:
        return f"the image is smaller than one {patch_size}x{patch_size} patch"
    for i, depth in enumerate(depths):
        for j, (_, ws, _) in enumerate(_block_plan(stage_types[i], depth, window_size, res)):
            if res[0] % ws or res[1] % ws:
                return f"stage {i} is {res[0]}x{res[1]} tokens and block {j}'s {ws}x{ws} windows do not tile it"
        if i < len(depths) - 1:
            if res[0] % 2 or res[1] % 2:
                return f"stage {i} is {res[0]}x{res[1]} tokens, not even, so patch merging cannot halve it"
            res = (res[0] // 2, res[1] // 2)
    return None


class InLineSwinBlock(nn.Module):
    """Pre-norm block on a fixed ``input_resolution``: (shifted) window attention, then the MLP."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        kind: str,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Any = nn.LayerNorm,
    ):
        super().__init__()
        self.input_resolution, self.kind = input_resolution, kind
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = norm_layer(dim)
        if kind == "I":
            self.attn: nn.Module = InLineAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        else:
            self.attn = WindowAttention(
                dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop
            )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        # The official blocks keep the shift mask as a (persistent) buffer whenever they shift, InLine blocks
        # included (InLine ignores it); we do the same so the released state dicts load strictly.
        mask = _shift_mask(*input_resolution, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        ws, shift = self.window_size, self.shift_size
        y = self.norm1(x).view(B, H, W, C)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        windows = _window_partition(y, ws)
        windows = self.attn(windows, (ws, ws)) if self.kind == "I" else self.attn(windows, self.attn_mask)
        y = _window_reverse(windows, ws, H, W)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated in Swin's (0,0), (1,0), (0,1), (1,1) order, LayerNorm(4C), Linear to 2C."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, norm_layer: Any = nn.LayerNorm):
        super().__init__()
        self.input_resolution = input_resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.input_resolution
        B, _, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(B, x.shape[1] * x.shape[2], 4 * C)))


class InLineSwinStage(nn.Module):
    """``layers.{i}``: the blocks, then (except in the last stage) patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        stage_type: str,
        window_size: int,
        drop_path: Sequence[float],
        downsample: bool,
        **block_kwargs: Any,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            [
                InLineSwinBlock(
                    dim, input_resolution, num_heads, kind, ws, shift, drop_path=drop_path[j], **block_kwargs
                )
                for j, (kind, ws, shift) in enumerate(_block_plan(stage_type, depth, window_size, input_resolution))
            ]
        )
        norm_layer = block_kwargs.get("norm_layer", nn.LayerNorm)
        self.downsample = PatchMerging(input_resolution, dim, norm_layer) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class InLineBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Any = nn.LayerNorm,
        act_layer: Any = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = InLineAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# -- models ------------------------------------------------------------------------------------


class InLineSwin(ClassifierMixin, nn.Module):
    """Keyword names mirror the official ``InLineSwin`` constructor (``attn_type`` as in the configs).

    The network is built for ``img_size`` (the shift masks and window clamping depend on each
    stage's resolution), so inputs must have exactly that size. As timm's Swin,
    ``forward_features`` returns the normed last stage as an NHWC map (``output_fmt``).
    """

    output_fmt = "NHWC"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 56,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Any = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        attn_type: str = "IIIS",
        global_pool: str = "avg",
        **unsupported: Any,
    ):
        super().__init__()
        check_official_kwargs("InLineSwin", unsupported, {})
        num_layers = len(depths)
        if len(num_heads) != num_layers:
            raise InvalidInputError(f"InLineSwin: {len(num_heads)} num_heads for {num_layers} stages")
        stage_types = _parse_attn_type(attn_type, num_layers)
        self.img_size = to_2tuple(img_size)
        problem = _swin_size_problem(self.img_size, patch_size, depths, window_size, stage_types)
        if problem:
            raise InvalidInputError(
                f"InLineSwin: img_size {self.img_size[0]}x{self.img_size[1]} does not fit (patch_size {patch_size}, window_size "
                f"{window_size}, attn_type {attn_type!r}): {problem}. "
                f"{self._working_sizes(patch_size, depths, window_size, stage_types)}"
            )
        self.num_classes, self.global_pool = num_classes, self.check_global_pool(global_pool)
        self.num_layers, self.embed_dim, self.ape = num_layers, embed_dim, ape
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_layers - 1))
        self.patch_embed = PatchEmbed(
            self.img_size, patch_size, in_chans, embed_dim, norm_layer=norm_layer if patch_norm else None
        )
        grid = self.patch_embed.grid_size
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_layers):
            dim, res = embed_dim * 2**i, (grid[0] // 2**i, grid[1] // 2**i)
            self.layers.append(
                InLineSwinStage(
                    dim,
                    res,
                    depths[i],
                    num_heads[i],
                    stage_types[i],
                    window_size,
                    rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < num_layers - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    norm_layer=norm_layer,
                )
            )
            self.feature_info.append({"num_chs": dim, "reduction": patch_size * 2**i, "module": f"layers.{i}"})
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Identity()  # the official head has no dropout (drop_rate acts inside the blocks)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_vit_weights)
        self.set_grad_checkpointing(use_checkpoint)

    @staticmethod
    def _working_sizes(
        patch_size: int, depths: Sequence[int], window_size: int, stage_types: list[str], limit: int = 1024
    ) -> str:
        ok = [
            s
            for s in range(patch_size, limit + 1, patch_size)
            if _swin_size_problem((s, s), patch_size, depths, window_size, stage_types) is None
        ]
        return f"Square sizes that work up to {limit}: {', '.join(map(str, ok)) or 'none'} (create the model with img_size=...)"

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[2:]) != self.img_size:
            raise InvalidInputError(
                f"InLineSwin was built for {self.img_size[0]}x{self.img_size[1]} inputs (its window clamping and shift masks "
                f"depend on the size), got shape {tuple(x.shape)}; create the model with img_size=(H, W) for other sizes"
            )
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        return self.pos_drop(x)

    def _nchw(self, x: torch.Tensor, i: int) -> torch.Tensor:
        H, W = self.layers[i].blocks[0].input_resolution
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], H, W)

    def _nhwc(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.layers[i].blocks[0].input_resolution, x.shape[-1])

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs before patch merging (NCHW maps, reductions 4/8/16/32, or NLC tokens) and
        the final NHWC map of ``forward_features``: timm's contract."""
        check_output_fmt(output_fmt)
        take, last = feature_take_indices(self.num_layers, indices)
        intermediates = []
        x = self._embed(x)
        for i, layer in enumerate(self.layers):
            x = layer.forward_blocks(x)
            if i in take:
                out = self.norm(x) if norm and i == self.num_layers - 1 else x
                intermediates.append(self._nchw(out, i) if output_fmt == "NCHW" else out)
            if stop_early and i >= last:
                break
            if layer.downsample is not None:
                x = layer.downsample(x)
        if intermediates_only:
            return intermediates
        final = self.norm(x) if i == self.num_layers - 1 else x  # the norm is sized for the last stage
        return self._nhwc(final, i), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for layer in self.layers:
            x = layer(x)
        return self._nhwc(self.norm(x), self.num_layers - 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.pool_and_classify(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_DEIT_OFFICIAL_DEFAULTS = {
    "representation_size": None,
    "distilled": False,
    "weight_init": "",
    "embed_layer": PatchEmbed,
}


class InLineDeiT(ClassifierMixin, nn.Module):
    """Keyword names mirror the official ``models/inline_deit.py::VisionTransformer``.

    ``global_pool``: ``'token'`` (the cls token, as released), ``'avg'`` (mean of the patch
    tokens) or ``''``. Inputs must be ``img_size``; official checkpoints made at another size
    load with the position embedding resampled (``checkpoint_filter_fn``).
    """

    output_fmt = "NLC"  # forward_features gives tokens [B, 1 + N, C], as timm's ViT
    global_pools = ("token", "avg", "")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,  # accepted; the official InLine attention never applies it
        drop_path_rate: float = 0.0,
        norm_layer: Any = None,
        act_layer: Any = None,
        global_pool: str = "token",
        **unsupported: Any,
    ):
        super().__init__()
        check_official_kwargs("InLineDeiT", unsupported, _DEIT_OFFICIAL_DEFAULTS)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU
        self.img_size = to_2tuple(img_size)
        if min(self.img_size) < patch_size:
            raise InvalidInputError(f"InLineDeiT: img_size {self.img_size} is smaller than one {patch_size}px patch")
        self.num_classes, self.global_pool = num_classes, self.check_global_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            [
                InLineBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, rates[i], norm_layer, act_layer)
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": patch_size, "module": f"blocks.{i}"} for i in range(depth)
        ]
        self.grad_checkpointing = False
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[2:]) != self.img_size:
            raise InvalidInputError(
                f"InLineDeiT was built for {self.img_size[0]}x{self.img_size[1]} inputs, got shape {tuple(x.shape)}; create "
                "the model with img_size=(H, W) for other sizes (official weights then load with a resampled pos_embed)"
            )
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(block, x, self.grid_size, use_reentrant=False)
        return block(x, self.grid_size)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Block outputs (timm's ViT contract): patch tokens as NCHW maps or NLC, cls split off."""
        check_output_fmt(output_fmt)
        take, last = feature_take_indices(len(self.blocks), indices)
        intermediates = []
        x = self._embed(x)
        for i, block in enumerate(self.blocks):
            x = self._block(block, x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
            if stop_early and i >= last:
                break
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.transpose(1, 2).reshape(y.shape[0], y.shape[-1], *self.grid_size) for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for block in self.blocks:
            x = self._block(block, x)
        return self.norm(x)  # [B, 1 + N, C], cls first

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(1)
        elif self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -- checkpoints -------------------------------------------------------------------------------

_GEOMETRY_BUFFERS = ("attn_mask", "relative_position_index")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official InLine checkpoints (``checkpoint['model']``, optional ``module.``) onto our model.

    - DeiT: ``pos_embed`` is resampled (bicubic, cls kept) when the checkpoint's grid differs.
    - Swin: ``relative_position_index`` and ``attn_mask`` are geometry buffers the official code
      saves. They follow from the architecture and the image size, not from training, so the
      model's own are always used (the parity tests check them against the official ones by
      value), and ones our model does not have are dropped. Everything else must match strictly.
    """
    state = unwrap_state_dict(state_dict)
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.rsplit(".", 1)[-1] in _GEOMETRY_BUFFERS:
            continue
        if k == "pos_embed" and isinstance(model, InLineDeiT) and v.shape != own[k].shape:
            v = resample_abs_pos_embed(v, new_size=list(model.grid_size), num_prefix_tokens=model.num_prefix_tokens)
        elif k == "patch_embed.proj.weight" and v.dim() < 4 and k in own:  # pre-conv patchify checkpoints
            v = v.reshape(own[k].shape)
        out[k] = v
    for k, v in own.items():
        if k.rsplit(".", 1)[-1] in _GEOMETRY_BUFFERS:
            out[k] = v
    return out


def _create(cls: type, variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    out_indices = (
        (0, 1, 2, 3) if cls is InLineSwin else min(3, kwargs["depth"])
    )  # DeiT: the last 3 blocks, as timm's ViT
    return build_classifier(
        cls,
        variant,
        pretrained,
        filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **kwargs,
    )


def _cfg(url: str, size: int = 224, **kwargs: Any) -> dict[str, Any]:
    """The official evaluation: bicubic resize to size/0.875, centre crop, ImageNet default mean/std."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, size, size),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "fixed_input_size": True,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


def _official(model: str, file_id: str, size: int = 224) -> dict[str, Any]:
    """A release on Tsinghua Cloud (LeapLabTHU/InLine README), cached as ``<model>_in1k.pth``."""
    return _cfg(
        f"https://cloud.tsinghua.edu.cn/f/{file_id}/?dl=1",
        size,
        filename=f"{model}_in1k.pth",
        notes=("official release (Tsinghua Cloud, LeapLabTHU/InLine README)",),
        **({"pool_size": (7, 7)} if model.startswith("inline_swin") else {}),
    )


default_cfgs = generate_default_cfgs(
    register_checkpoints(
        {
            "inline_swin_tiny.official_in1k": _official("inline_swin_tiny", "32810869fcc34410966b"),
            "inline_swin_small.official_in1k": _official("inline_swin_small", "e9657fd247c04c7cb1a1"),
            "inline_swin_base.official_in1k": _official("inline_swin_base", "bf23564bb64c420aafe1"),
            "inline_deit_tiny.official_in1k": _official("inline_deit_tiny", "1d6b8191ad6d4114b291"),
            "inline_deit_small.official_in1k": _official("inline_deit_small", "2f3898b07e9247f3beb3", 288),
            "inline_deit_base.official_in1k": _official("inline_deit_base", "10bdd726d4b0435eb34e", 448),
        },
        converter="attnzoo.vision.inline:checkpoint_filter_fn",
    )
)


@register_model
def inline_swin_tiny(pretrained: bool = False, **kwargs: Any) -> InLineSwin:
    """InLine-Swin-T: attn_type IIIS (the maintainer's correction of the paper's IISS, InLine issue #11)."""
    args = {
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 56,
        "attn_type": "IIIS",
        "drop_path_rate": 0.2,
    }
    return _create(InLineSwin, "inline_swin_tiny", pretrained, **dict(args, **kwargs))


@register_model
def inline_swin_small(pretrained: bool = False, **kwargs: Any) -> InLineSwin:
    args = {
        "embed_dim": 96,
        "depths": [2, 2, 18, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 56,
        "attn_type": "IISS",
        "drop_path_rate": 0.3,
    }
    return _create(InLineSwin, "inline_swin_small", pretrained, **dict(args, **kwargs))


@register_model
def inline_swin_base(pretrained: bool = False, **kwargs: Any) -> InLineSwin:
    args = {
        "embed_dim": 128,
        "depths": [2, 2, 18, 2],
        "num_heads": [4, 8, 16, 32],
        "window_size": 56,
        "attn_type": "IIMS2",
        "drop_path_rate": 0.5,
    }
    return _create(InLineSwin, "inline_swin_base", pretrained, **dict(args, **kwargs))


@register_model
def inline_deit_tiny(pretrained: bool = False, **kwargs: Any) -> InLineDeiT:
    args = {"img_size": 224, "patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 6, "drop_path_rate": 0.1}
    return _create(InLineDeiT, "inline_deit_tiny", pretrained, **dict(args, **kwargs))


@register_model
def inline_deit_small(pretrained: bool = False, **kwargs: Any) -> InLineDeiT:
    """Evaluated (and released) at 288 px."""
    args = {"img_size": 288, "patch_size": 16, "embed_dim": 320, "depth": 12, "num_heads": 10, "drop_path_rate": 0.1}
    return _create(InLineDeiT, "inline_deit_small", pretrained, **dict(args, **kwargs))


@register_model
def inline_deit_base(pretrained: bool = False, **kwargs: Any) -> InLineDeiT:
    """Evaluated (and released) at 448 px."""
    args = {"img_size": 448, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 12, "drop_path_rate": 0.1}
    return _create(InLineDeiT, "inline_deit_base", pretrained, **dict(args, **kwargs))
