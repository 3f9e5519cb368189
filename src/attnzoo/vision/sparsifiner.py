"""Sparsifiner: learned, instance-dependent sparse attention on DeiT and LV-ViT backbones.

Wei, Duke, Jayasundara, Kotagiri, Taylor, Mou. CVPR 2023. https://arxiv.org/abs/2303.13755
Official code: https://github.com/lim142857/Sparsifiner (src/models/sparsifiner.py,
src/models/sparsifiner_lvvit.py).

A DeiT whose every attention layer owns a low-rank *connectivity predictor*: it scores all
query-key pairs cheaply (reduced channels, a learned token basis), keeps the top 25% of keys per
query and the attention runs only over those (the cls query stays dense). The backbone keeps
DeiT's parameter names, so dense DeiT checkpoints load; the predictor has to be trained (the
reconstruction phase of the two-phase recipe), since no trained Sparsifiner weights were released.

Implemented: sparsifiner_deit_small, sparsifiner_deit_base and sparsifiner_lvvit_s (the
official training script's three models; the paper's eval configuration: coefficient top-8,
basis threshold 0.02, keep rate 0.25, no token pruning). The LV-ViT model starts from the dense
LV-ViT-S release (zihangJiang/TokenLabeling). Not implemented: token pruning, and LV-ViT-M, which
the official script downloads but never builds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter
from torch import nn

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import masked_attention
from attnzoo.vision._common import build_classifier, check_official_kwargs, check_output_fmt, init_vit_weights
from attnzoo.weights import register_checkpoints, unwrap_state_dict

__all__ = [
    "ConnectivityPredictor",
    "LayerSparsity",
    "Sparsifiner",
    "SparsifinerAttention",
    "SparsifinerLVViT",
    "SparsifinerOutput",
    "SparsityReport",
]

_logger = logging.getLogger(__name__)


@dataclass
class Connectivity:
    """One layer's predicted connectivity (patch query rows only; the cls row is always dense)."""

    basis_coef: torch.Tensor  # [B, H, N-1, n_basis], top-k scattered, not renormalised
    approx_attn: torch.Tensor  # [B, H, N-1, N]
    key_index: torch.Tensor | None  # [B, H, N-1, budget]; None in reconstruction mode (dense attention)
    basis: torch.Tensor  # [n_basis, N] as used (thresholded |proj_back_n|^T at eval)


def check_keep_rate(rate: Any, what: str) -> float:
    """A kept fraction of keys in (0, 1]: checked when the model is built, not deep inside a forward."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(rate, bool) or not 0.0 < value <= 1.0:  # NaN fails the comparison too
        raise InvalidInputError(f"{what} must be a fraction of the keys in (0, 1] (0.25 in the paper), got {rate!r}")
    return value


class ConnectivityPredictor(nn.Module):
    """The official ``MaskPredictor``: low-rank approximate attention, then a per-row top-k key set.

    ``cheap = proj_c_q(q) @ (proj_c_k(k)^T @ proj_n) * num_heads**-0.5``; softmax over the ``n``
    basis slots; keep the top ``coef_topk`` coefficients (no renormalisation); multiply by the
    thresholded ``|proj_back_n|^T`` basis; keep the ``ceil(keep_rate * N)`` largest per row. The op
    order is the official one, so the chosen keys agree bit for bit on the CPU.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_tokens: int,
        keep_rate: float = 0.25,
        reduce_n_factor: int = 6,
        reduce_c_factor: int = 2,
        share_inout_proj: bool = False,
        basis_threshold: float = 0.02,
        coef_topk: int = 8,
    ):
        super().__init__()
        head_dim = dim // num_heads
        self.num_tokens, self.num_heads = num_tokens, num_heads
        self.reduced_c, self.reduced_n = head_dim // reduce_c_factor, num_tokens // reduce_n_factor
        if self.reduced_c < 1 or self.reduced_n < 1:
            raise InvalidInputError(
                f"ConnectivityPredictor: reduce factors leave no channels or basis slots "
                f"(head_dim {head_dim}/{reduce_c_factor}, tokens {num_tokens}/{reduce_n_factor})"
            )
        self.scale = num_heads**-0.5  # the official code scales by the head count, not the head width
        self.budget = math.ceil(check_keep_rate(keep_rate, "keep_rate") * num_tokens)
        self.coef_topk = min(coef_topk, self.reduced_n)
        self.basis_threshold = basis_threshold
        self.proj_c_q = nn.Linear(head_dim, self.reduced_c)
        self.proj_c_k = nn.Linear(head_dim, self.reduced_c)
        self.proj_n = nn.Parameter(trunc_normal_(torch.zeros(num_tokens, self.reduced_n), std=0.02))
        self.proj_back_n = (
            self.proj_n
            if share_inout_proj
            else nn.Parameter(trunc_normal_(torch.zeros(num_tokens, self.reduced_n), std=0.02))
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, reconstruction: bool = False) -> Connectivity:
        """``q``, ``k``: ``[B, H, N, head_dim]``. ``reconstruction``: the raw basis and all coefficients
        (the first training phase, where ``approx_attn`` regresses the dense attention)."""
        keys = self.proj_c_k(k).transpose(-1, -2) @ self.proj_n  # [B, H, c, n]
        coef = ((self.proj_c_q(q) @ keys) * self.scale)[..., 1:, :].softmax(dim=-1)  # cls row dropped
        if reconstruction:
            basis = self.proj_back_n.t()
            return Connectivity(coef, coef @ basis, None, basis)
        basis = F.threshold(self.proj_back_n.t().abs(), self.basis_threshold, 0.0)
        top, slots = coef.topk(self.coef_topk, sorted=False)
        coef = torch.zeros_like(coef).scatter_(-1, slots, top)
        approx = coef @ basis
        budget = min(self.budget, approx.shape[-1])
        return Connectivity(coef, approx, approx.detach().topk(budget, sorted=False).indices, basis)


def connectivity_mask(index: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean ``[B, H, N, N]`` mask from the patch rows' key sets, with a dense cls row prepended."""
    B, H, rows, _ = index.shape
    mask = torch.zeros(B, H, rows + 1, num_keys, dtype=torch.bool, device=index.device)
    mask[:, :, 0] = True
    mask[:, :, 1:].scatter_(-1, index.long(), True)
    return mask


@dataclass
class AttentionOutput:
    x: torch.Tensor
    connectivity: Connectivity
    mask: torch.Tensor | None  # bool [B, H, N, N], None in reconstruction mode
    dense_attn: torch.Tensor | None = None  # softmax(q k^T) rows, only when asked for
    masked_attn: torch.Tensor | None = None  # the sparse attention's probabilities, only when asked for


class SparsifinerAttention(nn.Module):
    """DeiT attention (``qkv``, ``proj``) whose query rows see only their predicted keys.

    ``attn_drop`` is accepted and ignored, as in the official code (it never applies it).

    The sparse attention goes through :func:`attnzoo.kernels.masked_attention`, so the Triton
    kernel skips the masked-out tiles instead of computing dense logits as the official code does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        num_tokens: int,
        keep_rate: float = 0.25,
        reduce_n_factor: int = 6,
        reduce_c_factor: int = 2,
        share_inout_proj: bool = False,
        basis_threshold: float = 0.02,
        coef_topk: int = 8,
    ):
        super().__init__()
        if dim % num_heads:
            raise InvalidInputError(f"SparsifinerAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mask_predictor = ConnectivityPredictor(
            dim,
            num_heads,
            num_tokens,
            keep_rate,
            reduce_n_factor,
            reduce_c_factor,
            share_inout_proj,
            basis_threshold,
            coef_topk,
        )
        self.reconstruction = False  # set by Sparsifiner.set_phase("reconstruction")

    def forward_detailed(self, x: torch.Tensor, dense_attn: bool = False, masked_attn: bool = False) -> AttentionOutput:
        """``dense_attn``: also the dense softmax attention; ``masked_attn``: also the probabilities
        of the sparse attention (the official ``masked_attn``: masked softmax, ``nan_to_num``)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        reconstruction = self.reconstruction and self.training
        conn = self.mask_predictor(q, k, reconstruction)
        logits = (q @ k.transpose(-2, -1)) * self.scale if dense_attn or masked_attn or reconstruction else None
        dense = logits.softmax(dim=-1) if logits is not None and (dense_attn or reconstruction) else None
        masked = None
        if reconstruction:  # the backbone stays dense so the regression target is undistorted
            mask, out = None, dense @ v
        else:
            mask = connectivity_mask(conn.key_index, N)
            out = masked_attention(q, k, v, mask, scale=self.scale)
            if logits is not None and masked_attn:
                masked = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1).nan_to_num()
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return AttentionOutput(out, conn, mask, dense, masked)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise InvalidInputError(
                "Sparsifiner predicts its own attention mask; attn_mask/is_causal are not supported"
            )
        return self.forward_detailed(x).x


@dataclass
class SparsifinerOutput:
    """Everything the official forward returns, per layer, plus each block's input."""

    logits: torch.Tensor
    features: torch.Tensor  # patch tokens after the final norm [B, N-1, C]
    block_inputs: list[torch.Tensor] = field(default_factory=list)
    basis_coef: list[torch.Tensor] = field(default_factory=list)
    approx_attn: list[torch.Tensor] = field(default_factory=list)
    attn_mask: list[torch.Tensor | None] = field(default_factory=list)
    dense_attn: list[torch.Tensor | None] = field(default_factory=list)
    masked_attn: list[torch.Tensor | None] = field(default_factory=list)
    basis: list[torch.Tensor] = field(default_factory=list)
    final_tokens: torch.Tensor | None = None  # all tokens after the final norm [B, N, C] (distillation target)


@dataclass
class LayerSparsity:
    density: list[float]  # kept fraction of the N x N attention entries, per image
    attention_macs: list[int]  # QK^T + AV multiply-adds actually computed, per image
    dense_attention_macs: int


@dataclass
class SparsityReport:
    """Per image: attention density and MHSA cost (multiply-adds) as run, against dense DeiT.

    ``attention_macs`` counts QK^T and AV over the kept entries only (the paper's sparse part);
    ``mhsa_macs`` adds the qkv and output projections and the connectivity predictor, against
    ``dense_mhsa_macs``, the same backbone with dense attention and no predictor.
    """

    layers: list[LayerSparsity]
    attention_macs: list[int]
    dense_attention_macs: int
    predictor_macs: int
    projection_macs: int
    basis_sparsity: float  # the official statistics, averaged over layers
    basis_coef_sparsity: float
    attn_mask_sparsity: float

    @property
    def mhsa_macs(self) -> list[int]:
        return [a + self.predictor_macs + self.projection_macs for a in self.attention_macs]

    @property
    def dense_mhsa_macs(self) -> int:
        return self.dense_attention_macs + self.projection_macs

    @property
    def attention_reduction(self) -> list[float]:
        return [1.0 - a / self.dense_attention_macs for a in self.attention_macs]

    @property
    def mhsa_reduction(self) -> list[float]:
        return [1.0 - m / self.dense_mhsa_macs for m in self.mhsa_macs]

    def __str__(self) -> str:
        lines = ["image  density  QK+AV GMACs (dense)  saved  MHSA GMACs incl. predictor (dense)  saved"]
        for i, (att, mhsa) in enumerate(zip(self.attention_macs, self.mhsa_macs, strict=True)):
            density = sum(layer.density[i] for layer in self.layers) / len(self.layers)
            lines.append(
                f"{i:>5}  {density:>7.1%}  {att / 1e9:>8.3f} ({self.dense_attention_macs / 1e9:.3f})  "
                f"{self.attention_reduction[i]:>5.1%}  {mhsa / 1e9:>20.3f} ({self.dense_mhsa_macs / 1e9:.3f})  "
                f"{self.mhsa_reduction[i]:>5.1%}"
            )
        return "\n".join(lines)


def _sparsity(t: torch.Tensor) -> float:
    return 1.0 - torch.count_nonzero(t).item() / t.numel()


class LVViTPatchEmbed(nn.Module):
    """LV-ViT's ``4_2`` patch embedding (official ``PatchEmbed4_2``): conv 7x7 stride 2, two
    convs 3x3 (64 channels, BN and ReLU after each), then a ``patch_size // 2`` strided projection.
    Tokens out ``[B, N, C]``, with the attributes timm's VisionTransformer reads."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        if not bias or dynamic_img_pad:
            raise InvalidInputError("LVViTPatchEmbed: the released stem has a projection bias and no dynamic padding")
        dd = {"device": device, "dtype": dtype}
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(64, **dd)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(64, **dd)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(64, **dd)
        stride = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.proj = nn.Conv2d(64, embed_dim, stride, stride=stride, **dd)

    def feat_ratio(self) -> int:
        return self.patch_size[0]

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class ResidualScale(nn.Module):
    """LV-ViT's ``skip_lam``: each residual branch is divided by it before the addition."""

    def __init__(self, skip_lam: float):
        super().__init__()
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.skip_lam

    def extra_repr(self) -> str:
        return f"skip_lam={self.skip_lam}"


# official constructor keywords accepted at the value every released model uses
_OFFICIAL_DEFAULTS = {
    "representation_size": None,
    "hybrid_backbone": None,
    "norm_layer": None,
    "distill": True,
    "cfg": None,
}
_LVVIT_OFFICIAL_DEFAULTS = {  # the official builder's values (src/main.py --model sparsifiner_lvvit)
    "representation_size": None,
    "hybrid_backbone": None,
    "norm_layer": nn.LayerNorm,
    "p_emb": "4_2",
    "drop_path_decay": "linear",
    "order": None,
    "return_dense": True,
    "mix_token": True,  # stored by the official model, which never mixes tokens in its forward
    "cfg": None,
}


class Sparsifiner(VisionTransformer):
    """timm's VisionTransformer (DeiT names and API) with Sparsifiner attention in every block.

    Constructor keywords mirror the official ``Sparsifiner``; ``attn_keep_rate_list`` gives the kept
    fraction of keys per layer. The official ``cfg`` fields become ``basis_threshold`` and
    ``coef_topk``; its training switch ``LOSS.USE_ATTN_RECON`` is :meth:`set_phase`.
    """

    # the backbone's patch embedding and norms (class attributes, so the LV-ViT variant swaps them)
    backbone_embed_layer: Callable[..., nn.Module] = PatchEmbed
    backbone_norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6)
    released_kwargs: dict[str, Any] = _OFFICIAL_DEFAULTS

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_keep_rate_list: Sequence[float] | None = None,
        reduce_n_factor: int = 6,
        reduce_c_factor: int = 2,
        share_inout_proj: bool = False,
        basis_threshold: float = 0.02,
        coef_topk: int = 8,
        global_pool: str = "token",
        **official: Any,
    ):
        _check_official(type(self).__name__, depth, official, self.released_kwargs)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            embed_layer=self.backbone_embed_layer,
            norm_layer=self.backbone_norm_layer,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        keep = list(attn_keep_rate_list) if attn_keep_rate_list is not None else [0.25] * depth
        if len(keep) != depth:
            raise InvalidInputError(f"Sparsifiner: attn_keep_rate_list has {len(keep)} entries for depth {depth}")
        keep = [check_keep_rate(rate, f"Sparsifiner: attn_keep_rate_list[{i}]") for i, rate in enumerate(keep)]
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        for block, rate in zip(self.blocks, keep, strict=True):
            block.attn = SparsifinerAttention(
                embed_dim,
                num_heads,
                qkv_bias,
                qk_scale,
                attn_drop_rate,
                0.0,
                num_tokens=num_tokens,
                keep_rate=rate,
                reduce_n_factor=reduce_n_factor,
                reduce_c_factor=reduce_c_factor,
                share_inout_proj=share_inout_proj,
                basis_threshold=basis_threshold,
                coef_topk=coef_topk,
            )
            block.attn.apply(init_vit_weights)
        self.img_size = self.patch_embed.img_size
        self.set_phase("sparse")  # the predictors get no gradient through the top-k: freeze them (DDP needs it)

    # -- phases of the official two-phase recipe ------------------------------------------------
    def set_phase(self, phase: str) -> None:
        """``"reconstruction"``: dense attention, raw basis, only the predictors trainable (phase 1).
        ``"sparse"`` (default): predicted sparse attention, the backbone trainable, predictors frozen (phase 2).
        """
        if phase not in ("reconstruction", "sparse"):
            raise InvalidInputError(
                f"Sparsifiner.set_phase: unknown phase {phase!r} (use 'reconstruction' or 'sparse')"
            )
        for name, p in self.named_parameters():
            p.requires_grad_(("mask_predictor" in name) == (phase == "reconstruction"))
        for block in self.blocks:
            block.attn.reconstruction = phase == "reconstruction"

    def predictor_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if "mask_predictor" in n]

    # -- forward ---------------------------------------------------------------------------------
    def _check_size(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[-2:]) != tuple(self.img_size):
            raise InvalidInputError(
                f"Sparsifiner takes {self.img_size[0]}x{self.img_size[1]} images only (its connectivity predictor is sized "
                f"by the token count), got shape {tuple(x.shape)}; resize first or build the model with img_size="
            )

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        self._check_size(x)
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **kwargs: Any,
    ):
        """timm's ViT contract (block outputs as NCHW maps or NLC tokens), at the built image size only."""
        check_output_fmt(output_fmt)
        self._check_size(x)
        return super().forward_intermediates(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only, **kwargs
        )

    def forward_detailed(
        self, x: torch.Tensor, dense_attn: bool = False, masked_attn: bool = False
    ) -> SparsifinerOutput:
        """The official forward's rich outputs: per-layer coefficients, approximate attention, masks.
        ``dense_attn=True`` also returns each layer's dense softmax attention (the reconstruction
        target), ``masked_attn=True`` the sparse attention's probabilities."""
        self._check_size(x)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        out = SparsifinerOutput(logits=x, features=x)
        for block in self.blocks:
            out.block_inputs.append(x)
            a = block.attn.forward_detailed(block.norm1(x), dense_attn=dense_attn, masked_attn=masked_attn)
            x = x + block.drop_path1(block.ls1(a.x))
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
            out.basis_coef.append(a.connectivity.basis_coef)
            out.approx_attn.append(a.connectivity.approx_attn)
            out.attn_mask.append(a.mask)
            out.dense_attn.append(a.dense_attn)
            out.masked_attn.append(a.masked_attn)
            out.basis.append(a.connectivity.basis)
        x = self.norm(x)
        out.final_tokens, out.features = x, x[:, self.num_prefix_tokens :]
        out.logits = self.forward_head(x)
        return out

    def forward(
        self, x: torch.Tensor, detailed: bool = False, dense_attn: bool = False
    ) -> torch.Tensor | SparsifinerOutput:
        """Logits; with ``detailed=True`` the :class:`SparsifinerOutput` (through ``forward``, so
        DistributedDataParallel sees the call when training with the rich outputs)."""
        if detailed or dense_attn:
            return self.forward_detailed(x, dense_attn=dense_attn)
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def sparsity_report(self, x: torch.Tensor) -> SparsityReport:
        """Attention sparsity and MHSA multiply-adds actually used for each image in ``x``."""
        out = self.forward_detailed(x)
        B, N, C = out.block_inputs[0].shape
        H = self.blocks[0].attn.num_heads
        d = C // H
        dense_attention = 2 * H * N * N * d
        layers, attention, predictor = [], [0] * B, 0
        for block, mask in zip(self.blocks, out.attn_mask, strict=True):
            p = block.attn.mask_predictor
            predictor += (
                2 * H * N * d * p.reduced_c + 2 * H * N * p.reduced_c * p.reduced_n + H * (N - 1) * p.reduced_n * N
            )
            kept = mask.flatten(1).sum(1).tolist() if mask is not None else [H * N * N] * B
            layer_macs = [2 * int(n) * d for n in kept]
            layers.append(LayerSparsity([n / (H * N * N) for n in kept], layer_macs, dense_attention))
            attention = [t + a for t, a in zip(attention, layer_macs, strict=True)]
        depth = len(self.blocks)
        masks = [m for m in out.attn_mask if m is not None]
        return SparsityReport(
            layers,
            attention,
            depth * dense_attention,
            predictor,
            depth * 4 * N * C * C,
            basis_sparsity=sum(_sparsity(b) for b in out.basis) / depth,
            basis_coef_sparsity=sum(_sparsity(c) for c in out.basis_coef) / depth,
            attn_mask_sparsity=sum(_sparsity(m) for m in masks) / len(masks) if masks else 0.0,
        )


class SparsifinerLVViT(Sparsifiner):
    """Sparsifiner on LV-ViT (official ``SparsifinerLVViT``, the released ``--model sparsifiner_lvvit``).

    Against the DeiT variant: the ``4_2`` convolutional patch embedding, qkv without bias,
    LayerNorm eps 1e-5, residual branches divided by ``skip_lam``, MLP ratio 3, and an
    ``aux_head`` on the patch tokens: logits = ``head(cls) + 0.5 * max_tokens aux_head(patches)``
    (the official evaluation output). The official training loop takes only ``head(cls)`` in
    training mode (``aux_head`` learns through its token distillation); here the logits are the
    same in both modes, as timm's VOLO, so plain fine-tuning trains both heads.
    """

    backbone_embed_layer = LVViTPatchEmbed
    backbone_norm_layer = nn.LayerNorm
    released_kwargs = _LVVIT_OFFICIAL_DEFAULTS
    global_pools = ("token", "")  # the class token, or every token unpooled (timm's feature wrappers)

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        skip_lam: float = 2.0,
        global_pool: str = "token",
        **kwargs: Any,
    ):
        self._check_pool(global_pool)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            global_pool=global_pool,
            **kwargs,
        )
        for block in self.blocks:
            block.ls1, block.ls2 = ResidualScale(skip_lam), ResidualScale(skip_lam)
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head.apply(init_vit_weights)
        trunc_normal_(self.cls_token, std=0.02)  # the official initialisation

    def _check_pool(self, global_pool: str | None) -> None:
        if global_pool is not None and global_pool not in self.global_pools:
            raise InvalidInputError(
                f"SparsifinerLVViT pools the class token (or nothing, ''), got global_pool={global_pool!r}"
            )

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._check_pool(global_pool)
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``head(cls) + 0.5 * aux_head(patches).max``; without a classifier, the class token's
        features; with ``global_pool=''``, every token through ``head``."""
        if not self.global_pool:
            x = self.head_drop(x)
            return x if pre_logits else self.head(x)
        cls = self.head_drop(x[:, 0])
        if pre_logits or self.num_classes == 0:
            return cls
        return self.head(cls) + 0.5 * self.aux_head(x[:, self.num_prefix_tokens :]).amax(dim=1)


def _check_official(family: str, depth: int, official: dict[str, Any], released: dict[str, Any]) -> None:
    """The official token-pruning keywords are accepted when pruning is off, as in the released config."""
    tokens = official.pop("token_keep_rate_list", None)
    prune = official.pop("token_pruning_loc_indicator", None)
    if (tokens is not None and any(r != 1.0 for r in tokens)) or (prune is not None and any(prune)):
        raise InvalidInputError(
            f"{family}: token pruning is not implemented (the paper's default configuration has it off)"
        )
    official.pop("distill", None)  # stored but unused by the official model
    check_official_kwargs(family, official, released)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Sparsifiner) -> dict[str, torch.Tensor]:
    """Sparsifiner checkpoints, or dense DeiT ones (official ``{'model': ...}`` or timm's), with
    ``module.`` prefixes; ``pos_embed`` resampled to the model's grid. A dense checkpoint has no
    connectivity predictor: the model's own (untrained) predictor is kept, with a warning."""
    state_dict = unwrap_state_dict(state_dict)
    predictor = {k: v for k, v in state_dict.items() if ".mask_predictor." in k}
    state_dict = _vit_filter({k: v for k, v in state_dict.items() if k not in predictor}, model)
    if not predictor:
        _logger.warning(
            "dense checkpoint: the connectivity predictors are untrained; run the reconstruction phase "
            "(Sparsifiner.set_phase('reconstruction')) before trusting the sparse model"
        )
        predictor = {k: v for k, v in model.state_dict().items() if ".mask_predictor." in k}
    return {**state_dict, **predictor}


def _create_sparsifiner(
    variant: str, pretrained: bool = False, cls: type[Sparsifiner] = Sparsifiner, **kwargs: Any
) -> Sparsifiner:
    return build_classifier(
        cls,
        variant,
        pretrained,
        filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=min(3, kwargs["depth"]), feature_cls="getter"),  # the last 3 blocks, as timm's ViT
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    """The official evaluation: resize 256 bicubic, centre crop 224, ImageNet mean/std (as DeiT)."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


_DEIT_NOTES = (
    "dense DeiT weights, the official initialisation: the connectivity predictor is untrained (no Sparsifiner "
    "weights were released); train it with the reconstruction phase",
)
default_cfgs = generate_default_cfgs(
    register_checkpoints(
        {
            "sparsifiner_deit_small.deit_in1k": _cfg(
                "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth", notes=_DEIT_NOTES
            ),
            "sparsifiner_deit_base.deit_in1k": _cfg(
                "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth", notes=_DEIT_NOTES
            ),
            "sparsifiner_lvvit_s.lvvit_in1k": _cfg(
                "https://github.com/zihangJiang/TokenLabeling/releases/download/1.0/lvvit_s-26M-224-83.3.pth.tar",
                filename="lvvit_s-26M-224-83.3.pth.tar",
                first_conv="patch_embed.conv1",
                classifier=("head", "aux_head"),
                notes=(
                    "dense LV-ViT-S weights (TokenLabeling release), the official initialisation: the connectivity "
                    "predictor is untrained; train it with the reconstruction phase",
                ),
            ),
        },
        converter="attnzoo.vision.sparsifiner:checkpoint_filter_fn",
    )
)


@register_model
def sparsifiner_deit_small(pretrained: bool = False, **kwargs: Any) -> Sparsifiner:
    args = dict(
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        mlp_ratio=4,
        qkv_bias=True,
        reduce_n_factor=6,
        reduce_c_factor=2,
    )
    return _create_sparsifiner("sparsifiner_deit_small", pretrained, **dict(args, **kwargs))


@register_model
def sparsifiner_deit_base(pretrained: bool = False, **kwargs: Any) -> Sparsifiner:
    args = dict(
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4,
        qkv_bias=True,
        reduce_n_factor=6,
        reduce_c_factor=2,
    )
    return _create_sparsifiner("sparsifiner_deit_base", pretrained, **dict(args, **kwargs))


@register_model
def sparsifiner_lvvit_s(pretrained: bool = False, **kwargs: Any) -> SparsifinerLVViT:
    """The official ``--model sparsifiner_lvvit`` (LV-ViT-S backbone, 26.4M parameters)."""
    args = dict(
        patch_size=16,
        embed_dim=384,
        depth=16,
        num_heads=6,
        mlp_ratio=3,
        qkv_bias=False,
        skip_lam=2.0,
        reduce_n_factor=6,
        reduce_c_factor=2,
    )
    return _create_sparsifiner("sparsifiner_lvvit_s", pretrained, SparsifinerLVViT, **dict(args, **kwargs))
