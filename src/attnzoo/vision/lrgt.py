"""LRGT: Long-Range Grouping Transformer for multi-view 3D reconstruction.

Yang, Zhu, Lin, Nong, Liang. ICCV 2023. https://arxiv.org/abs/2308.08724
Official code: https://github.com/LiyingCV/Long-Range-Grouping-Transformer (models/encoder/encoder.py,
models/transformer_base/attention.py, models/transformer_base/encoder/transformer_block.py,
models/merger/merger.py, models/decoder/decoder.py).

``[B, V, 3, 224, 224]`` views (any ``V >= 1``) -> ``[B, 32, 32, 32]`` occupancy probabilities, in
three modules, each with the official parameter names (the released checkpoint stores them as
three state dicts):

* **encoder**: a DeiT-B *distilled* ViT/16 over each view's 196 patch tokens (the cls/dist tokens
  exist but are never prepended; ``pos_embed[:, 2:]``). Blocks 5, 7, 9, 11 run *long-range
  grouping attention* (LGA): the 14x14 grid splits into 49 stride-7 dilated groups of 4 tokens,
  each group taken from every view (4V tokens) and attending inside itself, through
  :func:`attnzoo.kernels.grouped_attention`; a depthwise 3x3 conv of each view's values (IFS) is
  added before the output projection. The other blocks attend within one view.
* **merger**: two STM blocks (similar-token merger, from UMIFormer): DPC-kNN clusters the V*196
  tokens into 196 (densities get 1e-6 uniform noise to break ties: in eval mode one ``[N]`` draw per
  block, the same for every object of a batch, so an object clusters alike alone or at any batch
  row; in training the official ``[B, N]`` draw, the same for ``B = 1``; pass ``generator`` or
  ``noise_seed`` for reproducible ties), the score-weighted cluster means attend to all tokens
  (logits + per-key score), residual, MLP.
* **decoder**: 64 learned queries cross-attend to the merged tokens, then a progressive
  upsampling transformer: 4^3 -> 8^3 -> 16^3 -> 32^3 (transposed convs + BN + ReLU, with
  attention over 512 tokens at each resolution, sub-voxels packed into channels), sigmoid.

Inputs follow the official ShapeNet loader
(:func:`attnzoo.pipelines.multiview_reconstruction.preprocess_views`): **BGR** channel order (the
checkpoint was trained on ``cv2.imread``), centre crop 128 of the 137 px renderings, bilinear
resize to 224, a constant 240 background where alpha is 0, ``x * 2 - 1``.

Weights: the authors' 3-view checkpoint (Baidu Pan, must be downloaded by hand:
``attnzoo.create_model("lrgt", weights=PATH)``, converted by :func:`checkpoint_filter_fn`), or the
DeiT-B distilled ImageNet initialisation of the encoder
(:func:`attnzoo.training.reconstruction.load_deit_init`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from attnzoo.errors import InvalidInputError, WeightsError
from attnzoo.kernels import across_views, dilated_groups, grouped_attention
from attnzoo.registry import register_model
from attnzoo.vision._common import as_generator, init_vit_weights
from attnzoo.weights import register_checkpoints, unwrap_state_dict

__all__ = [
    "LRGT",
    "LRGTDecoder",
    "LRGTEncoder",
    "LRGTOutput",
    "LRGTMerger",
    "LRGTViT",
    "checkpoint_filter_fn",
    "default_cfgs",
    "lrgt",
]

VOXEL_SIZE = 32
_QUERY_SIDE = 4  # the decoder starts from 4^3 = 64 learned queries
_STATE_DICTS = ("encoder_state_dict", "merger_state_dict", "decoder_state_dict")


# -- shared attention ----------------------------------------------------------------------


class _QKVAttention(nn.Module):
    """Separate ``to_q``/``to_k``/``to_v`` projections (the official layout), fused SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise InvalidInputError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, H, N, D]
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if context is None else context
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(kv)), self._heads(self.to_v(kv))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).flatten(2))


# -- encoder -------------------------------------------------------------------------------


class LGAttention(_QKVAttention):
    """Intra-view attention, or long-range grouping attention (LGA) across views with the
    inter-view feature signature ``IFS`` (a depthwise 3x3 conv of V) added before ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias)
        self.IFS = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(
        self,
        x: torch.Tensor,
        views: int = 1,
        groups: torch.Tensor | None = None,  # type: ignore[override]
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if groups is None:  # intra-view: the official op order (the merger's clustering downstream is discrete)
            q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
            attn = ((q @ k.transpose(-1, -2)) * self.scale).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).flatten(2))
        BV, N, C = x.shape
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        # tokens numbered view-major within a sample: view v's token t is v * N + t
        as_groups = lambda t: t.view(BV // views, views * N, self.num_heads, self.head_dim)
        out = grouped_attention(as_groups(q), as_groups(k), as_groups(v), groups, scale=self.scale).view(BV, N, C)
        h, w = grid  # type: ignore[misc]
        ifs = self.IFS(v.transpose(1, 2).reshape(BV, C, h, w))  # channel h*D + d, as the official rearrange
        return self.proj(out + ifs.flatten(2).transpose(1, 2))


class LRGTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = LGAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # exact GELU

    def forward(
        self, x: torch.Tensor, views: int = 1, groups: torch.Tensor | None = None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), views, groups, grid)
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LRGTViT(nn.Module):
    """The official ``DistilledVisionTransformer`` with LGA blocks (parameter names as released)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        lga_layers: Sequence[int] = (5, 7, 9, 11),
        patch_group: int = 7,
    ):
        super().__init__()
        if img_size % patch_size:
            raise InvalidInputError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        side = img_size // patch_size
        if side % patch_group:
            raise InvalidInputError(
                f"a {side}x{side} token grid does not split into {patch_group}x{patch_group} dilated groups"
            )
        if any(not 0 <= i < depth for i in lga_layers):
            raise InvalidInputError(f"lga_layers {list(lga_layers)} must index blocks 0..{depth - 1}")
        self.img_size, self.in_chans, self.grid, self.patch_group = img_size, in_chans, (side, side), patch_group
        self.embed_dim = self.num_features = embed_dim
        self.lga_layers = tuple(sorted({int(i) for i in lga_layers}))
        # parameter order as the official state dict: cls_token, pos_embed, dist_token, then modules
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # never used in forward (as the official model)
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side + 2, embed_dim))  # slots 0, 1 belong to cls/dist
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # never used in forward
        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(LRGTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_vit_weights)  # the official ViT init; IFS and patch convs keep torch's
        for p in (self.cls_token, self.pos_embed, self.dist_token):
            nn.init.trunc_normal_(p, std=0.02)

    def group_table(self, views: int, device: torch.device) -> torch.Tensor:
        """LGA's groups over ``views`` stacked views: ``[49, 4 * views]``, ordered (token, view)."""
        per_view = dilated_groups(*self.grid, self.patch_group, device=device)
        return across_views(per_view, views, self.grid[0] * self.grid[1])

    def forward(
        self, x: torch.Tensor, return_blocks: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        V = x.shape[1]
        x = self.patch_embed(x.flatten(0, 1)) + self.pos_embed[:, 2:]  # [(B V), P, D]
        groups = self.group_table(V, x.device) if self.lga_layers else None
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, V, groups, self.grid) if i in self.lga_layers else blk(x)
            outs.append(x)
        x = self.norm(x)
        return (x, outs) if return_blocks else x


class LRGTEncoder(nn.Module):
    """The official ``Encoder``: a wrapper whose ``encoder`` is the ViT (keys ``encoder.*``).

    ``[B, V, 3, H, W]`` -> ``[B, V, P, D]``.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        lga_layers: Sequence[int] = (5, 7, 9, 11),
        patch_group: int = 7,
    ):
        super().__init__()
        self.encoder = LRGTViT(
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, lga_layers, patch_group
        )

    def check_input(self, views: torch.Tensor) -> None:
        vit = self.encoder
        expected = (vit.in_chans, vit.img_size, vit.img_size)
        if not isinstance(views, torch.Tensor) or views.dim() != 5 or tuple(views.shape[2:]) != expected:
            got = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
            hint = (
                " (one sample: add a batch dimension, views[None])"
                if isinstance(views, torch.Tensor) and views.dim() == 4
                else ""
            )
            raise InvalidInputError(f"LRGT expects views [B, V, {', '.join(map(str, expected))}], got {got}{hint}")
        if views.shape[0] < 1 or views.shape[1] < 1:
            raise InvalidInputError(f"LRGT needs at least one sample and one view, got {tuple(views.shape)}")
        if not views.is_floating_point():
            raise InvalidInputError(f"LRGT expects float views in [-1, 1] (see preprocess_views), got {views.dtype}")

    def forward(self, views: torch.Tensor, return_blocks: bool = False):
        self.check_input(views)
        B, V = views.shape[:2]
        out = self.encoder(views, return_blocks=return_blocks)
        feats, blocks = out if return_blocks else (out, None)
        feats = feats.unflatten(0, (B, V))
        return (feats, blocks) if return_blocks else feats


def _init_official(m: nn.Module) -> None:
    """``utils.helpers.init_weights``, the official merger/decoder initialisation."""
    if type(m) in (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        nn.init.kaiming_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif type(m) in (nn.BatchNorm2d, nn.BatchNorm3d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif type(m) is nn.Linear:
        nn.init.normal_(m.weight, 0.0, 0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# -- merger (STM) --------------------------------------------------------------------------


class STMAttention(nn.Module):
    """Cross-attention from the merged tokens to all tokens, each key's score added to its logits.

    Computed in the official op order (the merger's clustering downstream is discrete)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise InvalidInputError(f"merger dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q_input: torch.Tensor, kv_input: torch.Tensor, token_score: torch.Tensor) -> torch.Tensor:
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        q, k, v = heads(self.to_q(q_input)), heads(self.to_k(kv_input)), heads(self.to_v(kv_input))
        dots = (q @ k.transpose(-1, -2)) * self.scale
        attn = (dots + token_score.squeeze(-1)[:, None, None, :]).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).flatten(2))


class STMBlock(nn.Module):
    def __init__(self, dim: int, out_tokens: int, k: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.out_tokens, self.k = dim, out_tokens, k
        self.norm1 = nn.LayerNorm(dim)
        self.score_mlp = nn.Linear(dim, 1)
        self.attention_layer = STMAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    @torch.no_grad()
    def cluster(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DPC-kNN: the ``out_tokens`` densest-and-isolated tokens become centres; every token joins
        its nearest centre. Returns ``[B, N]`` cluster ids in ``[0, out_tokens)``.

        Density ties are broken by 1e-6 uniform noise drawn from ``generator`` (torch's global RNG when
        None): in training, one ``[B, N]`` draw, as the official code (each object its own noise); in
        eval mode, one ``[N]`` vector added to every object of the batch, so an object's answer does not
        depend on its batch row or batch size (the stream left for the next block does not either; for
        B = 1 both are the official draw)."""
        B = x.shape[0]
        dist = torch.cdist(x, x) / (self.dim**0.5)
        nearest, _ = torch.topk(dist, k=self.k, dim=-1, largest=False)
        density = (-(nearest**2).mean(dim=-1)).exp()
        shape = density.shape if self.training else density.shape[-1:]
        if generator is None:
            noise = torch.rand(shape, device=density.device, dtype=density.dtype)
        else:  # drawn where the generator lives, so a CPU seed gives the same clusters on any device
            noise = torch.rand(shape, generator=generator, device=generator.device, dtype=density.dtype).to(
                density.device
            )
        density = density + noise * 1e-6  # breaks density ties, as the official code
        denser = (density[:, None, :] > density[:, :, None]).type(x.dtype)  # [b, i, j]: j is denser than i
        dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
        delta, _ = (dist * denser + dist_max * (1 - denser)).min(dim=-1)
        centres = torch.topk(delta * density, k=self.out_tokens, dim=-1).indices  # [B, out]
        batch = torch.arange(B, device=x.device)[:, None]
        idx_cluster = dist[batch, centres].argmin(dim=1)  # [B, N]: nearest centre
        idx_cluster[batch.expand(B, self.out_tokens), centres] = torch.arange(self.out_tokens, device=x.device).expand(
            B, -1
        )
        return idx_cluster

    def merge(self, x: torch.Tensor, idx_cluster: torch.Tensor, token_score: torch.Tensor) -> torch.Tensor:
        """Per-cluster mean of ``x`` weighted by ``exp(score)`` (normalised within the cluster, +1e-6)."""
        B, N, D = x.shape
        idx = (idx_cluster + torch.arange(B, device=x.device)[:, None] * self.out_tokens).reshape(B * N)
        weight = token_score.exp()
        total = weight.new_zeros(B * self.out_tokens, 1).index_add_(0, idx, weight.reshape(B * N, 1)) + 1e-6
        norm_weight = weight / total[idx].view(B, N, 1)
        merged = x.new_zeros(B * self.out_tokens, D).index_add_(0, idx, (x * norm_weight).reshape(B * N, D).to(x.dtype))
        return merged.view(B, self.out_tokens, D)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] < max(self.k, self.out_tokens):
            raise InvalidInputError(
                f"an STM block merging into {self.out_tokens} tokens with k={self.k} needs at least "
                f"{max(self.k, self.out_tokens)} input tokens, got {x.shape[1]}"
            )
        x = self.norm1(x)
        score = self.score_mlp(x)  # [B, N, 1]
        idx_cluster = self.cluster(x, generator)
        q = self.merge(x, idx_cluster, score)
        feat = q + self.attention_layer(q, x, score)
        return feat + self.mlp(self.norm2(feat)), idx_cluster


class LRGTMerger(nn.Module):
    """The official ``Merger``: all views' tokens ``[B, V, P, D]`` -> ``[B, out_tokens[-1], D]``."""

    def __init__(
        self,
        *,
        dim: int = 768,
        out_tokens: Sequence[int] = (196, 196),
        k: int = 15,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if not out_tokens or any(int(t) < 1 for t in out_tokens) or k < 1:
            raise InvalidInputError(f"merger needs positive out_tokens and k, got {list(out_tokens)} and {k}")
        self.dim = dim
        self.blocks = nn.ModuleList(STMBlock(dim, int(t), k, num_heads, mlp_ratio) for t in out_tokens)
        self.apply(_init_official)

    def forward(
        self, tokens: torch.Tensor, generator: torch.Generator | int | None = None, return_clusters: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if (
            not isinstance(tokens, torch.Tensor)
            or tokens.dim() != 4
            or tokens.shape[-1] != self.dim
            or 0 in tokens.shape
        ):
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InvalidInputError(f"the LRGT merger expects tokens [B, V, P, {self.dim}], got {got}")
        gen = as_generator(generator)
        x = tokens.flatten(1, 2)
        clusters = []
        for blk in self.blocks:
            x, idx = blk(x, gen)
            clusters.append(idx)
        return (x, clusters) if return_clusters else x


# -- decoder -------------------------------------------------------------------------------


class DecoderBlock(nn.Module):
    """Pre-norm self-attention (no qkv bias) and MLP; LayerNorm eps 1e-5."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _QKVAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class QueryBlock(nn.Module):
    """Self-attention, cross-attention to the (un-normalised) merged tokens, MLP; all pre-norm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _QKVAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = _QKVAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class QueryPrepare(nn.Module):
    """64 learned queries (``emb``) and one :class:`QueryBlock` (the official ``Transformer``)."""

    def __init__(self, dim: int, num_heads: int, num_queries: int = _QUERY_SIDE**3, depth: int = 1):
        super().__init__()
        self.emb = nn.Embedding(num_queries, dim)
        self.blocks = nn.ModuleList(QueryBlock(dim, num_heads) for _ in range(depth))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.emb.weight.unsqueeze(0).expand(context.shape[0], -1, -1)
        for blk in self.blocks:
            x = blk(x, context)
        return x


def _upconv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(cin, cout, kernel_size=4, stride=2, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU()
    )


def _pack(x: torch.Tensor, s: int) -> torch.Tensor:
    """``b d (h s) (w s) (l s) -> b (h w l) (d s s s)``: sub-voxels into channels."""
    B, C, H, W, L = x.shape
    x = x.view(B, C, H // s, s, W // s, s, L // s, s).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, (H // s) * (W // s) * (L // s), C * s**3)


def _unpack(t: torch.Tensor, channels: int, side: int, s: int) -> torch.Tensor:
    B = t.shape[0]
    x = t.view(B, side, side, side, channels, s, s, s).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, channels, side * s, side * s, side * s)


class ProgressiveUpsampler(nn.Module):
    """The official ``TransformerDecoder``: ``[B, 64, D]`` -> ``[B, 1, 32, 32, 32]`` probabilities."""

    def __init__(
        self,
        dim: int = 768,
        num_heads: int = 12,
        depth: int = 8,
        channels: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if channels is not None and len(channels) != 3:
            raise InvalidInputError(
                f"decoder channels are the widths after upconv1/2/3, three ints; got {list(channels)}"
            )
        c1, c2, c3 = (int(c) for c in channels) if channels is not None else (dim // 8, dim // 64, dim // 256)
        if min(c1, c2, c3) < 1 or depth < 4:
            raise InvalidInputError(
                f"decoder channels {(c1, c2, c3)} must be positive (dim {dim} needs to be a multiple of 256 "
                f"for the default channels) and depth >= 4, got depth {depth}"
            )
        self.dim, self.channels = dim, (c1, c2, c3)
        n = depth // 4
        widths = (dim, c1, c2 * 8, c3 * 64)  # blocks3/blocks4 see 2^3 / 4^3 sub-voxels packed into channels
        for width in widths:
            if width % num_heads:
                raise InvalidInputError(
                    f"decoder width {width} (of {widths}) is not divisible by num_heads {num_heads}"
                )
        self.blocks1 = nn.ModuleList(DecoderBlock(widths[0], num_heads, mlp_ratio) for _ in range(n))
        self.blocks2 = nn.ModuleList(DecoderBlock(widths[1], num_heads, mlp_ratio) for _ in range(n))
        self.blocks3 = nn.ModuleList(DecoderBlock(widths[2], num_heads, mlp_ratio) for _ in range(n))
        self.blocks4 = nn.ModuleList(DecoderBlock(widths[3], num_heads, mlp_ratio) for _ in range(n))
        self.upconv1 = _upconv(dim, c1)
        self.upconv2 = _upconv(c1, c2)
        self.upconv3 = _upconv(c2, c3)
        self.upconv4 = nn.Sequential(nn.ConvTranspose3d(c3, 1, kernel_size=1, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, side = x.shape[0], _QUERY_SIDE
        c1, c2, c3 = self.channels
        for blk in self.blocks1:
            x = blk(x)
        x = self.upconv1(x.transpose(1, 2).reshape(B, self.dim, side, side, side))  # [B, c1, 8^3]
        side *= 2
        t = x.flatten(2).transpose(1, 2)
        for blk in self.blocks2:
            t = blk(t)
        x = self.upconv2(t.transpose(1, 2).reshape(B, c1, side, side, side))  # [B, c2, 16^3]
        t = _pack(x, 2)
        for blk in self.blocks3:
            t = blk(t)
        x = self.upconv3(x + _unpack(t, c2, side, 2))  # [B, c3, 32^3]
        t = _pack(x, 4)
        for blk in self.blocks4:
            t = blk(t)
        return self.upconv4(x + _unpack(t, c3, side, 4))


class LRGTDecoder(nn.Module):
    """The official ``Decoder``: merged tokens ``[B, P, D]`` -> ``[B, 1, 32, 32, 32]`` (sigmoid)."""

    def __init__(
        self,
        *,
        dim: int = 768,
        num_heads: int = 12,
        depth: int = 8,
        channels: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.dim = dim
        # registration order = the official state dict order
        self.transformer_decoder = ProgressiveUpsampler(dim, num_heads, depth, channels, mlp_ratio)
        self.prepare = QueryPrepare(dim, num_heads)
        self.layer_norm = nn.LayerNorm(dim)
        self.apply(_init_official)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        if (
            not isinstance(context, torch.Tensor)
            or context.dim() != 3
            or context.shape[-1] != self.dim
            or 0 in context.shape
        ):
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise InvalidInputError(f"the LRGT decoder expects merged tokens [B, P, {self.dim}], got {got}")
        return self.transformer_decoder(self.layer_norm(self.prepare(context)))


# -- the model -----------------------------------------------------------------------------


@dataclass
class LRGTOutput:
    """Every stage of one forward pass."""

    tokens: torch.Tensor  # [B, V, P, D] encoder features
    merged: torch.Tensor  # [B, P', D] merger output
    clusters: list[torch.Tensor]  # [B, N_in] cluster ids (int64) per STM block
    volume: torch.Tensor  # [B, 1, 32, 32, 32] decoder output (sigmoid)
    occupancy: torch.Tensor  # [B, 32, 32, 32] = volume.squeeze(1).clamp_max(1)


class LRGT(nn.Module):
    """Multi-view images ``[B, V, 3, 224, 224]`` (BGR in [-1, 1], see
    :func:`~attnzoo.pipelines.multiview_reconstruction.preprocess_views`) ->
    occupancy probabilities ``[B, 32, 32, 32]``. ``encoder``, ``merger`` and ``decoder`` hold the
    official state dicts (``encoder_state_dict`` etc. of the released checkpoint, minus ``module.``).

    ``noise_seed``: seed of the STM density noise (1e-6 uniform; in eval mode the same for every
    object of a batch) when ``forward`` gets no ``generator``; ``None`` draws from torch's global RNG, as the
    official code (results then follow its state where views tie exactly).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        lga_layers: Sequence[int] = (5, 7, 9, 11),
        patch_group: int = 7,
        merger_tokens: Sequence[int] = (196, 196),
        merger_k: int = 15,
        merger_heads: int = 12,
        decoder_heads: int = 12,
        decoder_depth: int = 8,
        decoder_channels: Sequence[int] | None = None,
        noise_seed: int | None = None,
    ):
        super().__init__()
        self.encoder = LRGTEncoder(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            lga_layers=lga_layers,
            patch_group=patch_group,
        )
        self.merger = LRGTMerger(dim=embed_dim, out_tokens=merger_tokens, k=merger_k, num_heads=merger_heads)
        self.decoder = LRGTDecoder(
            dim=embed_dim, num_heads=decoder_heads, depth=decoder_depth, channels=decoder_channels
        )
        self.noise_seed = noise_seed
        self.pretrained_cfg: dict[str, Any] = {
            "input_size": (3, img_size, img_size),
            "crop_pct": 128 / 137,
            "crop_mode": "center",
            "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "colour_order": "BGR",
            "background": 240,
        }

    def _generator(self, generator: torch.Generator | int | None) -> torch.Generator | None:
        if generator is None and self.noise_seed is not None:
            return torch.Generator().manual_seed(self.noise_seed)
        return as_generator(generator)

    def encode(self, views: torch.Tensor) -> torch.Tensor:
        """``[B, V, 3, 224, 224]`` -> ``[B, V, 196, D]``."""
        return self.encoder(views)

    def merge(self, tokens: torch.Tensor, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """``[B, V, 196, D]`` -> ``[B, 196, D]``."""
        return self.merger(tokens, self._generator(generator))

    def decode(self, context: torch.Tensor) -> torch.Tensor:
        """``[B, P, D]`` -> occupancy probabilities ``[B, 32, 32, 32]``."""
        return self.decoder(context).squeeze(1).clamp_max(1)

    def forward_detailed(self, views: torch.Tensor, generator: torch.Generator | int | None = None) -> LRGTOutput:
        tokens = self.encoder(views)
        merged, clusters = self.merger(tokens, self._generator(generator), return_clusters=True)
        volume = self.decoder(merged)
        return LRGTOutput(tokens, merged, clusters, volume, volume.squeeze(1).clamp_max(1))

    def forward(self, views: torch.Tensor, generator: torch.Generator | int | None = None) -> torch.Tensor:
        return self.decode(self.merge(self.encode(views), generator))


# -- weights -------------------------------------------------------------------------------


def _fill_bn_counters(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Older (Sync)BN state dicts may lack ``num_batches_tracked`` (unused in eval): take the model's."""
    for k, v in model.state_dict().items():
        if (
            k.endswith("num_batches_tracked")
            and k not in state
            and k.removesuffix("num_batches_tracked") + "running_mean" in state
        ):
            state[k] = v.clone()
    return state


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """The official checkpoint (``encoder_state_dict``/``merger_state_dict``/``decoder_state_dict``,
    DDP ``module.`` prefixes, SyncBN keys named as BN) -> one state dict for :class:`LRGT`.

    Also accepts such a dict for a single part when ``model`` is that part (``LRGTEncoder`` etc.),
    and a state dict already in :class:`LRGT`'s layout (with or without ``module.``).
    """
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"an LRGT checkpoint is a dict, got {type(checkpoint).__name__}")
    parts = {name: checkpoint[name] for name in _STATE_DICTS if isinstance(checkpoint.get(name), Mapping)}
    if parts:
        if isinstance(model, LRGT):
            missing = [n for n in _STATE_DICTS if n not in parts]
            if missing:
                raise WeightsError(f"the LRGT checkpoint lacks {', '.join(missing)} (it has {', '.join(parts)})")
            state = {
                f"{name.removesuffix('_state_dict')}.{k}": v
                for name in _STATE_DICTS
                for k, v in unwrap_state_dict(parts[name]).items()
            }
        else:
            part = {
                LRGTEncoder: "encoder_state_dict",
                LRGTMerger: "merger_state_dict",
                LRGTDecoder: "decoder_state_dict",
            }.get(type(model))
            if part is None or part not in parts:
                raise WeightsError(
                    f"cannot take a {type(model).__name__} out of an LRGT checkpoint with {', '.join(parts)}"
                )
            state = unwrap_state_dict(parts[part])
    else:
        tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise WeightsError(
                f"not an LRGT checkpoint: no {'/'.join(_STATE_DICTS)} and no tensors; keys: {sorted(map(str, checkpoint))[:10]}"
            )
        state = unwrap_state_dict(tensors)
    return _fill_bn_counters(dict(state), model)


# One entry per released checkpoint: timm's pretrained_cfg keys plus ours (filename, manual_download,
# colour_order), registered with attnzoo.weights for `attnzoo weights` and create_model(pretrained=True).
default_cfgs = register_checkpoints(
    {
        "lrgt.official_shapenet": {
            "url": "https://pan.baidu.com/s/16po1e4pxfQnd-_ppGH81Mg?pwd=ynq7",
            "filename": "lrgt_official_shapenet.pth",
            "manual_download": True,
            "license": "mit",
            "input_size": (3, 224, 224),
            "crop_pct": 128 / 137,
            "crop_mode": "center",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "interpolation": "bilinear",
            "colour_order": "BGR",
            "notes": (
                "the authors' 3-view LRGT (ShapeNet, re-trained on 2x RTX 4090, 'similar to the paper'), a Baidu Pan "
                "share (extraction code ynq7) that cannot be fetched automatically: download it by hand and pass "
                "weights=PATH (or save it as lrgt_official_shapenet.pth in attnzoo.weights.checkpoints_dir()). Inputs: "
                "preprocess_views (BGR, crop 128/137, bilinear 224, background 240, [-1, 1])"
            ),
        },
    },
    converter="attnzoo.vision.lrgt:checkpoint_filter_fn",
)


@register_model(family="lrgt", tasks=("multiview-3d-reconstruction",))
def lrgt(**kwargs: Any) -> LRGT:
    """LRGT as released (DeiT-B/16 encoder with LGA in blocks 5/7/9/11, 2 STM blocks, progressive decoder): 129.9M params."""
    return LRGT(**kwargs)
