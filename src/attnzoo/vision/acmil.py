"""ACMIL: Attention-Challenging Multiple Instance Learning for whole-slide image classification.

Zhang, Li, Sun, Zheng, Zhu, Yang. ECCV 2024. https://arxiv.org/abs/2311.07125
Official code: https://github.com/dazhangyu123/ACMIL (architecture/transformer.py ``ACMIL_GA``,
``ACMIL_MHA``, ``MutiHeadAttention(_modify)``; architecture/network.py ``DimReduction``,
``Attention_Gated``, ``Classifier_1fc``; Step3_WSI_classification_ACMIL.py for the losses).

One slide is one *bag* of pre-extracted patch features ``[1, N, D_feat]`` (or ``[N, D_feat]``):

* ``dimreduction``: Linear(D_feat -> D_inner, no bias) + ReLU.
* **MBA** (multiple branch attention), :class:`ACMILGatedAttention`: gated attention (Ilse et al.)
  with ``K = n_token`` output branches, ``A = W(tanh(V x) * sigmoid(U x))`` -> logits ``[K, N]``.
  :class:`ACMILMultiHead` instead gives each branch a learned query attending over the bag with
  8-head attention (own q/k/v/out projections, dropout, LayerNorm eps 1e-6).
* **STKIM** (stochastic top-K instance masking), training mode only and only if
  ``n_masked_patch > 0``: per branch (per head for MHA) take the ``k = min(n_masked_patch, N)``
  largest logits and set ``int(k * mask_drop)`` of them, chosen uniformly at random, to -1e9.
  The random choice is ``argsort(torch.rand(rows, k))``, the official draw: pass ``generator``
  to make it reproducible (``None`` uses torch's global RNG, as the official code).
* Branch ``k`` classifies ``softmax(A_k) @ x`` with its own Linear head (``sub_logits [K, C]``);
  the slide head classifies ``mean_k softmax(A_k) @ x`` (``slide_logits [1, C]``, the only output
  the official evaluation uses). MHA aggregates the bag with ``bag_attention`` (v/out projections
  + LayerNorm), weighting each head by the branch-mean of that head's softmaxed logits.
* Training loss (:func:`acmil_loss`): CE(sub_logits, label repeated K times) when K > 1, plus
  CE(slide_logits, label), plus the diversity term: the mean over branch pairs ``i < j`` of the
  cosine similarity of ``softmax(A_i)`` and ``softmax(A_j)`` (averaged over heads for MHA).

ABMIL (gated attention MIL) is the one-branch case without masking: :func:`abmil`.

Parameter names are the official ones, so checkpoints written by the official training script
load strictly once unwrapped (:func:`checkpoint_filter_fn`). **No trained ACMIL weights are
released.** The official ``save_model`` pickles ``{'model', 'optimizer', 'epoch', 'config'}``
where ``config`` is the repository's own ``utils.utils.Struct`` class: attnzoo's safe loader
(:func:`attnzoo.weights.load_checkpoint_file`, ``torch.load(weights_only=True)``) reads it with an
inert stand-in for that class (none of the repository's code runs; the config comes back as an
empty dict), so ``attnzoo.create_model("acmil_ga", weights="checkpoint-best.pth", ...)`` with the
same dimensions loads the file as it was written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.errors import InvalidInputError
from attnzoo.registry import register_model
from attnzoo.vision._common import as_generator
from attnzoo.weights import unwrap_state_dict

__all__ = [
    "PRETRAIN_DIMS",
    "ACMILGatedAttention",
    "ACMILLoss",
    "ACMILMultiHead",
    "ACMILOutput",
    "abmil",
    "acmil_ga",
    "acmil_loss",
    "acmil_mha",
    "checkpoint_filter_fn",
    "diversity_loss",
    "instance_attention",
    "stkim_mask",
]

# ``--pretrain`` of the official training script -> (D_feat, D_inner).
PRETRAIN_DIMS: dict[str, tuple[int, int]] = {
    "natural_supervised": (512, 256),  # ImageNet ResNet18 after avgpool
    "medical_ssl": (384, 128),  # Lunit DINO ViT-S/16
    "path-clip-B": (512, 256),
    "openai-clip-B": (512, 256),
    "plip": (512, 256),
    "quilt-net": (512, 256),
    "biomedclip": (512, 256),
    "path-clip-L-336": (768, 384),
    "openai-clip-L-336": (768, 384),
    "UNI": (1024, 512),
    "GigaPath": (1536, 768),
}
_MASK_VALUE = -1e9  # the official fill value of masked logits


# -- outputs and helpers -------------------------------------------------------------------


def instance_attention(attention: torch.Tensor) -> torch.Tensor:
    """Per-instance attention ``[N]`` for heatmaps: softmax over instances of the raw logits,
    averaged over every leading dimension (branches; heads too for MHA).

    For :class:`ACMILGatedAttention` this is the slide head's ``bag_A = mean_k softmax(A_k)``,
    which the official heatmap script (Step4) draws. For :class:`ACMILMultiHead` it is the mean
    over heads of the per-head bag weights ``bag_attention`` uses.
    """
    if attention.ndim < 2:
        raise InvalidInputError(f"attention logits must be [..., K, N], got shape {tuple(attention.shape)}")
    return attention.softmax(dim=-1).reshape(-1, attention.shape[-1]).mean(0)


class ACMILOutput(NamedTuple):
    """One bag's forward pass; unpacks like the official ``(sub_preds, slide_pred, attn)``."""

    sub_logits: torch.Tensor  # [K, C] one row per attention branch
    slide_logits: torch.Tensor  # [1, C] the slide prediction (the one evaluated)
    attention: torch.Tensor  # raw logits after STKIM: GA [1, K, N]; MHA [heads, K, N]

    def instance_attention(self) -> torch.Tensor:
        """``[N]`` heatmap scores, see :func:`instance_attention`."""
        return instance_attention(self.attention)


class ACMILLoss(NamedTuple):
    """The official training loss and its parts (``total = sub + slide + diversity``)."""

    total: torch.Tensor
    sub: torch.Tensor  # CE of the branch heads against the repeated label (0 when K == 1)
    slide: torch.Tensor  # CE of the slide head
    diversity: torch.Tensor  # mean pairwise cosine similarity of the branch attentions (0 when K == 1)


def diversity_loss(attention: torch.Tensor) -> torch.Tensor:
    """Mean over branch pairs ``i < j`` of ``cos(softmax(A_i), softmax(A_j))`` (each pair's
    similarity averaged over the leading dimension: 1 for GA, the heads for MHA).

    ``attention``: raw logits ``[H, K, N]`` (what the models return). 0 for a single branch.
    """
    if attention.ndim != 3:
        raise InvalidInputError(f"attention logits must be [H, K, N], got shape {tuple(attention.shape)}")
    k = attention.shape[1]
    loss = attention.new_zeros(())
    if k < 2:
        return loss
    probs = attention.softmax(dim=-1)
    pairs = k * (k - 1) / 2
    for i in range(k):
        for j in range(i + 1, k):
            loss = loss + F.cosine_similarity(probs[:, i], probs[:, j], dim=-1).mean() / pairs
    return loss


def _as_label(label: Any, n_classes: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(label, device=device)
    if t.numel() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(f"the label of one bag is one integer class index, got {label!r}")
    t = t.reshape(1).long()
    if not 0 <= int(t) < n_classes:
        raise InvalidInputError(f"label {int(t)} is outside the model's {n_classes} classes")
    return t


def acmil_loss(output: ACMILOutput | tuple, label: int | torch.Tensor) -> ACMILLoss:
    """The official training loss of one bag (Step3_WSI_classification_ACMIL.py).

    ``output``: the model's :class:`ACMILOutput` (or the official 3-tuple), computed in training
    mode so STKIM is active; ``label``: the bag's class index (an int or a 1-element tensor).
    """
    sub_logits, slide_logits, attention = output
    n_classes = slide_logits.shape[-1]
    target = _as_label(label, n_classes, slide_logits.device)
    k = sub_logits.shape[0]
    sub = F.cross_entropy(sub_logits, target.repeat(k)) if k > 1 else slide_logits.new_zeros(())
    slide = F.cross_entropy(slide_logits, target)
    div = diversity_loss(attention)
    return ACMILLoss(div + sub + slide, sub, slide, div)


def stkim_mask(
    logits: torch.Tensor, n_masked_patch: int, mask_drop: float, generator: torch.Generator | int | None = None
) -> torch.Tensor:
    """Stochastic top-K instance masking of ``logits [R, N]`` (one row per branch or head).

    In every row the ``k = min(n_masked_patch, N)`` largest logits are found and ``int(k * mask_drop)``
    of them, picked by ``argsort(torch.rand(R, k))`` (one draw for all rows, as the official code),
    are set to -1e9 (the dtype's lowest value below float32). Returns a new tensor.
    """
    rows, n = logits.shape
    k = min(int(n_masked_patch), n)
    if k <= 0:
        return logits
    _, top = torch.topk(logits, k, dim=-1)
    gen = as_generator(generator)
    if gen is None:
        noise = torch.rand(rows, k, device=logits.device)
    else:
        noise = torch.rand(rows, k, generator=gen, device=gen.device).to(logits.device)
    chosen = noise.argsort(dim=-1)[:, : int(k * mask_drop)]
    dropped = top.gather(-1, chosen)
    fill = _MASK_VALUE if logits.dtype in (torch.float32, torch.float64) else torch.finfo(logits.dtype).min
    return logits.scatter(-1, dropped, fill)


# -- building blocks -----------------------------------------------------------------------


class _DimReduction(nn.Module):
    """Linear(no bias) + ReLU; the official ``DimReduction`` with no residual blocks."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim, bias=False)
        self.relu1 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu1(self.fc1(x))


class _Head(nn.Module):
    """Linear classifier with optional input dropout (the official ``Classifier_1fc``)."""

    def __init__(self, dim: int, n_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, n_classes)
        self.dropout = nn.Dropout(drop_rate) if drop_rate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


class _GatedAttention(nn.Module):
    """``W(tanh(V x) * sigmoid(U x))`` -> logits ``[K, N]`` for instances ``x [N, L]``."""

    def __init__(self, dim: int, attn_dim: int, n_branches: int):
        super().__init__()
        self.attention_V = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh())
        self.attention_U = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid())
        self.attention_weights = nn.Linear(attn_dim, n_branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_weights(self.attention_V(x) * self.attention_U(x)).transpose(1, 0)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # [B, H, N, C/H]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, h * c)


class _QueryAttention(nn.Module):
    """One MHA branch: a learned query attends over the bag (the official ``MutiHeadAttention``)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float, n_masked_patch: int, mask_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.n_masked_patch, self.mask_drop = n_masked_patch, mask_drop
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(proj_drop)

    def forward(self, query: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None):
        """``query [1, 1, D]``, ``x [1, N, D]`` -> (feature ``[1, D]``, logits ``[H, 1, N]``)."""
        q = _split_heads(self.q_proj(query), self.num_heads)
        k = _split_heads(self.k_proj(x), self.num_heads)
        v = _split_heads(self.v_proj(x), self.num_heads)
        logits = (q @ k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1])  # [1, H, 1, N]
        if self.training and self.n_masked_patch > 0:
            b, h, nq, n = logits.shape
            logits = stkim_mask(logits.reshape(b * h * nq, n), self.n_masked_patch, self.mask_drop, generator).reshape(
                b, h, nq, n
            )
        out = _merge_heads(logits.softmax(dim=-1) @ v)
        out = self.layer_norm(self.dropout(self.out_proj(out)))
        return out[0], logits[0]


class _BagAttention(nn.Module):
    """Given per-head weights ``[H, 1, N]``, pool the bag's projected values (``MutiHeadAttention_modify``)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = _merge_heads(weights @ _split_heads(self.v_proj(x), self.num_heads))  # [1, 1, D]
        return self.layer_norm(self.dropout(self.out_proj(out)))[0]


# -- models --------------------------------------------------------------------------------


class _ACMILBase(nn.Module):
    in_dim: int
    inner_dim: int
    n_classes: int
    n_token: int
    n_masked_patch: int
    mask_drop: float

    def _check_args(
        self, in_dim: int, inner_dim: int, n_classes: int, n_token: int, n_masked_patch: int, mask_drop: float
    ) -> None:
        if min(in_dim, inner_dim, n_classes, n_token) < 1:
            raise InvalidInputError(
                f"in_dim, inner_dim, n_classes and n_token must be >= 1, got {in_dim}, {inner_dim}, {n_classes}, {n_token}"
            )
        if n_masked_patch < 0 or not 0.0 <= mask_drop <= 1.0:
            raise InvalidInputError(
                f"n_masked_patch must be >= 0 and mask_drop in [0, 1], got {n_masked_patch} and {mask_drop}"
            )
        self.in_dim, self.inner_dim, self.n_classes = int(in_dim), int(inner_dim), int(n_classes)
        self.n_token, self.n_masked_patch, self.mask_drop = int(n_token), int(n_masked_patch), float(mask_drop)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """One bag ``[1, N, in_dim]`` or ``[N, in_dim]`` -> ``[1, N, in_dim]`` in the weights' dtype."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise InvalidInputError(f"{name} expects a tensor of instance features, got {type(x).__name__}")
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if x.ndim != 3 or x.shape[0] != 1:
            raise InvalidInputError(
                f"{name} takes one bag at a time, [1, N, {self.in_dim}] or [N, {self.in_dim}], got "
                f"{tuple(x.shape)} (loop over bags: the official code trains with batch size 1)"
            )
        if x.shape[-1] != self.in_dim:
            raise InvalidInputError(
                f"{name} expects {self.in_dim} features per instance (in_dim={self.in_dim}), got "
                f"{x.shape[-1]}: build the model with in_dim={x.shape[-1]} (and the matching inner_dim)"
            )
        if x.shape[1] == 0:
            raise InvalidInputError(f"{name} got an empty bag (0 instances): a slide needs at least one patch feature")
        if not x.is_floating_point():
            raise InvalidInputError(f"{name} expects floating-point features, got {x.dtype}")
        x = x.to(self.dimreduction.fc1.weight.dtype)  # cast first: 1e300 in float64 is inf in float32
        if not bool(torch.isfinite(x).all()):
            raise InvalidInputError(
                f"{name} got NaN or infinite features (in {x.dtype}) in a bag of {x.shape[1]} instances"
            )
        return x

    def loss(self, output: ACMILOutput | tuple, label: int | torch.Tensor) -> ACMILLoss:
        """The official training loss, see :func:`acmil_loss`."""
        return acmil_loss(output, label)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, inner_dim={self.inner_dim}, n_classes={self.n_classes}, n_token={self.n_token}, "
            f"n_masked_patch={self.n_masked_patch}, mask_drop={self.mask_drop}"
        )


class ACMILGatedAttention(_ACMILBase):
    """ACMIL with gated multi-branch attention (official ``ACMIL_GA``; ``--arch ga``, the default).

    ``in_dim``/``inner_dim``: the official ``D_feat``/``D_inner`` (see :data:`PRETRAIN_DIMS`);
    ``n_classes``: ``n_class``; ``n_token``: branches K; ``n_masked_patch``/``mask_drop``: STKIM's
    top-K and dropped fraction; ``attn_dim``: the gate width ``D`` (128); ``drop_rate``: the
    official ``droprate``, dropout before every classifier (0). Defaults: the README's ACMIL with
    ResNet18 features.
    """

    def __init__(
        self,
        in_dim: int = 512,
        inner_dim: int = 256,
        n_classes: int = 2,
        n_token: int = 5,
        n_masked_patch: int = 10,
        mask_drop: float = 0.6,
        attn_dim: int = 128,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self._check_args(in_dim, inner_dim, n_classes, n_token, n_masked_patch, mask_drop)
        self.attn_dim, self.drop_rate = int(attn_dim), float(drop_rate)
        self.dimreduction = _DimReduction(in_dim, inner_dim)
        self.attention = _GatedAttention(inner_dim, attn_dim, n_token)
        self.classifier = nn.ModuleList(_Head(inner_dim, n_classes, drop_rate) for _ in range(n_token))
        self.Slide_classifier = _Head(inner_dim, n_classes, drop_rate)

    @classmethod
    def from_official_config(cls, conf: Mapping[str, Any], **kwargs: Any) -> ACMILGatedAttention:
        """From the official ``conf`` fields (``D_feat``, ``D_inner``, ``n_class``, ``n_token``,
        ``n_masked_patch``, ``mask_drop``) plus the official keywords ``D``/``droprate``."""
        return cls(**_from_official(conf, kwargs, {"D": "attn_dim", "droprate": "drop_rate"}))

    def forward(self, x: torch.Tensor, generator: torch.Generator | int | None = None) -> ACMILOutput:
        feats = self.dimreduction(self.check_input(x)[0])  # [N, D_inner]
        logits = self.attention(feats)  # [K, N]
        if self.training and self.n_masked_patch > 0:
            logits = stkim_mask(logits, self.n_masked_patch, self.mask_drop, generator)
        weights = F.softmax(logits, dim=1)
        branch_feats = torch.mm(weights, feats)  # [K, D_inner]
        sub = torch.stack([head(branch_feats[i]) for i, head in enumerate(self.classifier)], dim=0)
        bag_weights = weights.mean(0, keepdim=True)  # [1, N]
        slide = self.Slide_classifier(torch.mm(bag_weights, feats))
        return ACMILOutput(sub, slide, logits.unsqueeze(0))


class ACMILMultiHead(_ACMILBase):
    """ACMIL with learned-query multi-head attention branches (official ``ACMIL_MHA``; ``--arch mha``).

    Each of the ``n_token`` branches owns a query ``q[:, k]`` and an 8-head attention block
    (q/k/v/out projections, ``proj_drop`` dropout after ``out_proj``, LayerNorm eps 1e-6); STKIM
    masks per head. The queries start at N(0, 1e-6) as officially, i.e. uniform attention.
    ``attention`` in the output is ``[num_heads, K, N]``.
    """

    def __init__(
        self,
        in_dim: int = 512,
        inner_dim: int = 256,
        n_classes: int = 2,
        n_token: int = 5,
        n_masked_patch: int = 10,
        mask_drop: float = 0.6,
        num_heads: int = 8,
        proj_drop: float = 0.1,
    ):
        super().__init__()
        self._check_args(in_dim, inner_dim, n_classes, n_token, n_masked_patch, mask_drop)
        if num_heads < 1 or inner_dim % num_heads:
            raise InvalidInputError(f"inner_dim {inner_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.proj_drop = int(num_heads), float(proj_drop)
        self.dimreduction = _DimReduction(in_dim, inner_dim)
        self.sub_attention = nn.ModuleList(
            _QueryAttention(inner_dim, num_heads, proj_drop, n_masked_patch, mask_drop) for _ in range(n_token)
        )
        self.bag_attention = _BagAttention(inner_dim, num_heads, proj_drop)
        self.q = nn.Parameter(torch.zeros(1, n_token, inner_dim))
        nn.init.normal_(self.q, std=1e-6)
        self.classifier = nn.ModuleList(_Head(inner_dim, n_classes) for _ in range(n_token))
        self.Slide_classifier = _Head(inner_dim, n_classes)

    @classmethod
    def from_official_config(cls, conf: Mapping[str, Any], **kwargs: Any) -> ACMILMultiHead:
        """From the official ``conf`` fields (``D_feat``, ``D_inner``, ``n_class``, ``n_token``,
        ``n_masked_patch``, ``mask_drop``)."""
        return cls(**_from_official(conf, kwargs, {}))

    def forward(self, x: torch.Tensor, generator: torch.Generator | int | None = None) -> ACMILOutput:
        feats = self.dimreduction(self.check_input(x))  # [1, N, D_inner]
        gen = as_generator(generator)
        subs, logits = [], []
        for i in range(self.n_token):
            feat_i, logits_i = self.sub_attention[i](self.q[:, i].unsqueeze(0), feats, gen)
            subs.append(self.classifier[i](feat_i))
            logits.append(logits_i)
        attention = torch.cat(logits, dim=1)  # [H, K, N]
        bag = self.bag_attention(feats, attention.softmax(dim=-1).mean(1, keepdim=True))
        return ACMILOutput(torch.cat(subs, dim=0), self.Slide_classifier(bag), attention)


def _from_official(conf: Mapping[str, Any], kwargs: dict[str, Any], extra: dict[str, str]) -> dict[str, Any]:
    names = {
        "D_feat": "in_dim",
        "D_inner": "inner_dim",
        "n_class": "n_classes",
        "n_token": "n_token",
        "n_masked_patch": "n_masked_patch",
        "mask_drop": "mask_drop",
        **extra,
    }
    args = {names[k]: v for k, v in conf.items() if k in names}
    for key, value in kwargs.items():
        args[names.get(key, key)] = value
    return args


# -- checkpoints, builders, cfgs, registered models --------------------------------------------


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """An official checkpoint -> a state dict for ``model``.

    Unwraps ``{'model': ...}`` (what the official ``save_model`` writes) or ``{'state_dict': ...}``,
    strips DDP ``module.`` prefixes, and maps the layout of the separate official ``ABMIL`` class
    (architecture/network.py, ``Step3_WSI_classification.py --arch abmil``: a single
    ``classifier.fc``) onto a one-branch :class:`ACMILGatedAttention`: that classifier becomes both
    ``classifier.0`` and ``Slide_classifier``, so the slide logits are ABMIL's output.

    The file itself is read by :func:`attnzoo.weights.load_checkpoint_file` (weights only; see the
    module docstring for the official ``Struct`` config).
    """
    state = unwrap_state_dict(checkpoint)
    if (
        isinstance(model, ACMILGatedAttention)
        and model.n_token == 1
        and "classifier.fc.weight" in state
        and "Slide_classifier.fc.weight" not in state
    ):
        head = {k.removeprefix("classifier."): state.pop(k) for k in list(state) if k.startswith("classifier.fc.")}
        for prefix in ("classifier.0.", "Slide_classifier."):
            state.update({prefix + k: v.clone() for k, v in head.items()})
    return state


def _dims(pretrain: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    if pretrain is None:
        return kwargs
    if pretrain not in PRETRAIN_DIMS:
        raise InvalidInputError(f"unknown pretrain {pretrain!r}; known: {', '.join(PRETRAIN_DIMS)}")
    if "in_dim" in kwargs or "inner_dim" in kwargs:
        raise InvalidInputError("pass either pretrain or in_dim/inner_dim, not both")
    in_dim, inner_dim = PRETRAIN_DIMS[pretrain]
    return {"in_dim": in_dim, "inner_dim": inner_dim, **kwargs}


_M = TypeVar("_M", bound=_ACMILBase)


def _create_acmil(variant: str, cls: type[_M], pretrain: str | None, kwargs: dict[str, Any]) -> _M:
    model = cls(**_dims(pretrain, kwargs))
    model.pretrained_cfg = dict(default_cfgs[variant])
    return model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """What the official runs train on (README: ImageNet ResNet18 patch features, two classes). ACMIL
    released no trained weights, so there is no url: train one, then pass weights=PATH."""
    return {
        "num_classes": 2,
        "pretrain": "natural_supervised",
        "in_dim": 512,
        "input": "patch features of one slide [N, in_dim]",
        "license": "mit",
        "origin_url": "https://github.com/dazhangyu123/ACMIL",
        "paper_ids": "arXiv:2311.07125",
        **kwargs,
    }


default_cfgs: dict[str, dict[str, Any]] = {
    "acmil_ga": _cfg(),
    "acmil_mha": _cfg(),
    "abmil": _cfg(),
}


@register_model(family="acmil", tasks=("wsi-classification",))
def acmil_ga(pretrain: str | None = None, **kwargs: Any) -> ACMILGatedAttention:
    """ACMIL-GA as in the README: 512 -> 256 (ResNet18 features), 2 classes, 5 branches, STKIM
    top-10 with 0.6 dropped: 200,593 params. ``pretrain`` picks the dims of an official encoder."""
    return _create_acmil("acmil_ga", ACMILGatedAttention, pretrain, kwargs)


@register_model(family="acmil", tasks=("wsi-classification",))
def acmil_mha(pretrain: str | None = None, **kwargs: Any) -> ACMILMultiHead:
    """ACMIL-MHA, same defaults as :func:`acmil_ga`: 1,585,932 params."""
    return _create_acmil("acmil_mha", ACMILMultiHead, pretrain, kwargs)


@register_model(family="acmil", tasks=("wsi-classification",))
def abmil(pretrain: str | None = None, **kwargs: Any) -> ACMILGatedAttention:
    """ABMIL baseline as the README runs it: ``ACMIL_GA`` with n_token=1, n_masked_patch=0,
    mask_drop=0 (gated attention MIL; the loss reduces to the slide CE)."""
    for key in ("n_token", "n_masked_patch", "mask_drop"):
        if key in kwargs:
            raise InvalidInputError(f"abmil fixes n_token=1, n_masked_patch=0, mask_drop=0; use acmil_ga to set {key}")
    return _create_acmil(
        "abmil", ACMILGatedAttention, pretrain, {**kwargs, "n_token": 1, "n_masked_patch": 0, "mask_drop": 0.0}
    )
