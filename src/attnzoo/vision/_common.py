"""What attnzoo's model families share: timm's classifier API, the official-keyword check,
the ``output_fmt`` check of ``forward_intermediates``, ViT initialisation, seeded generators."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.errors import InvalidInputError


class ClassifierMixin:
    """timm's uniform head API over ``self.head``, ``self.num_features`` and ``self.global_pool``.

    ``forward_features`` returns a map in ``output_fmt`` (timm's attribute: ``NCHW`` for the
    convolutional layouts, ``NHWC`` for the Swin-like token models); :meth:`pool_and_classify`
    pools it as timm's ``ClassifierHead`` does, ``global_pool=''`` keeping the map (the head,
    if any, then classifies every position).
    """

    head: nn.Module
    head_drop: nn.Module
    num_features: int
    num_classes: int
    global_pool: str
    grad_checkpointing: bool
    output_fmt: str = "NCHW"
    global_pools: tuple[str, ...] = ("avg", "max", "")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def check_global_pool(self, global_pool: str) -> str:
        if global_pool not in self.global_pools:
            raise InvalidInputError(
                f"{type(self).__name__}: global_pool must be one of {', '.join(map(repr, self.global_pools))}, "
                f"got {global_pool!r}"
            )
        return global_pool

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self.check_global_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def pool_and_classify(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``forward_head`` of a model whose features are a map in ``self.output_fmt``."""
        spatial = (2, 3) if self.output_fmt == "NCHW" else (1, 2)
        if self.global_pool == "avg":
            x = x.mean(spatial)
        elif self.global_pool == "max":
            x = x.amax(spatial)
        x = self.head_drop(x)
        if pre_logits:
            return x
        if not self.global_pool and self.output_fmt == "NCHW":  # the linear head on the channel axis
            return self.head(x.movedim(1, -1)).movedim(-1, 1)
        return self.head(x)


def check_output_fmt(output_fmt: str, supported: tuple[str, ...] = ("NCHW", "NLC")) -> None:
    """``forward_intermediates`` raises for a format it cannot give, rather than returning another one."""
    if output_fmt not in supported:
        raise InvalidInputError(f"output_fmt must be one of {', '.join(map(repr, supported))}, got {output_fmt!r}")


def as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """A ``torch.Generator`` from a generator, an int seed or None (the global RNG), for models with sampling steps."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise InvalidInputError(
            f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
        )
    return torch.Generator().manual_seed(generator)


def init_vit_weights(m: nn.Module) -> None:
    """The ViT/DeiT initialisation the official codes share: truncated normal (std 0.02) linear
    weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def check_official_kwargs(family: str, kwargs: dict[str, Any], released: dict[str, Any]) -> None:
    """Official constructor keywords are accepted when they hold the value every released model uses."""
    for key, value in kwargs.items():
        if key not in released:
            raise TypeError(f"{family} got an unexpected keyword argument {key!r}")
        expected = released[key]
        if value != expected and not (isinstance(expected, list) and list(value or []) == expected):
            raise InvalidInputError(f"{family}: {key}={value!r} is not supported (released models use {expected!r})")
