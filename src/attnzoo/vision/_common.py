"""What attnzoo's model families share: timm's classifier API, the builder that loads pretrained
weights through :mod:`attnzoo.weights`, the official-keyword check, the ``output_fmt`` check of
``forward_intermediates``, ViT initialisation, seeded generators."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from attnzoo.errors import AttnzooError, InvalidInputError, WeightsError

_M = TypeVar("_M", bound=nn.Module)


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


def build_classifier(
    model_cls: Callable[..., _M],
    variant: str,
    pretrained: bool,
    *,
    filter_fn: Callable[..., dict],
    feature_cfg: dict[str, Any],
    **kwargs: Any,
) -> _M:
    """timm's ``build_model_with_cfg``, except that ``pretrained=True`` reads the checkpoint through
    :mod:`attnzoo.weights`: the registered entry's file in attnzoo's cache (its own file name,
    sha256-checked, loaded without running pickled code), with attnzoo's typed errors offline.

    timm's own download would name its cache file after the URL's last path part, which is
    ``content`` for every OneDrive link (so the BiFormer checkpoints overwrite each other) and empty
    for Tsinghua Cloud's ``.../?dl=1`` (so the cache folder itself is read), and would fail with
    urllib's errors. A source given in ``pretrained_cfg_overlay`` (``file``, ``state_dict``,
    ``url``, ``hf_hub_id``) still wins, and timm's adaptation is kept: another ``num_classes`` (or
    ``features_only``) drops the classifier, another ``in_chans`` adapts the first convolution. Every
    other key must match, where timm would load what it can and only log the rest.
    """
    from timm.models import build_model_with_cfg

    if not pretrained:
        return build_model_with_cfg(
            model_cls, variant, False, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs
        )
    from timm.models import load_pretrained, resolve_pretrained_cfg

    from attnzoo.weights import classifier_names, keys_under, summarise_mismatch

    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")).to_dict()
    checkpoint = pretrained_checkpoint(cfg, kwargs.get("pretrained_cfg_overlay") or {})  # before building: fail fast
    if checkpoint is None:  # a Hub repo or URL the caller named: timm's own loading, in its own order
        return build_model_with_cfg(
            model_cls, variant, True, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs
        )
    features = bool(kwargs.get("features_only"))

    def build_and_load(**model_kwargs: Any) -> _M:
        model = model_cls(**model_kwargs)
        num_classes = 0 if features else getattr(model, "num_classes", 1000)  # timm's rule
        filtered: dict[str, None] = {}  # the keys the filter gave timm, in order

        def recording_filter(state: Any, model: nn.Module) -> dict:
            state = filter_fn(state, model)
            filtered.update(dict.fromkeys(state))
            return state

        try:
            load_pretrained(
                model,
                {**cfg, "state_dict": checkpoint},
                num_classes=num_classes,
                in_chans=model_kwargs.get("in_chans", 3),
                filter_fn=recording_filter,
            )
        except AttnzooError:
            raise
        except (RuntimeError, KeyError, ValueError) as err:  # torch's load_state_dict: keys or shapes differ
            if filtered:  # a few keys of each kind, rather than torch's list of them all
                check_keys(model, filtered, num_classes)
            raise WeightsError(f"the pretrained checkpoint does not fit {variant}: {str(err)[:600]}") from err
        check_keys(model, filtered, num_classes)
        return model

    def check_keys(model: nn.Module, filtered: Mapping[str, None], num_classes: int) -> None:
        """timm loads with ``strict=False`` once it leaves the classifier out, and then only logs what else did
        not match: a checkpoint of another depth loads in part, one with a ``backbone.`` prefix not at all.
        Every key but the classifier's must match."""
        dropped = set()
        if num_classes != cfg.get("num_classes"):  # timm left the classifier out
            dropped = keys_under(classifier_names(cfg), [*model.state_dict(), *filtered])
        own = model.state_dict()
        problem = summarise_mismatch(
            missing=[k for k in own if k not in filtered and k not in dropped],
            unexpected=[k for k in filtered if k not in own and k not in dropped],
        )
        if problem:
            raise WeightsError(f"the pretrained checkpoint does not fit {variant}: {problem}")

    return build_model_with_cfg(
        build_and_load, variant, False, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs
    )


def pretrained_checkpoint(cfg: Mapping[str, Any], overlay: Mapping[str, Any]) -> Any | None:
    """The checkpoint a resolved timm pretrained cfg points at, read through :mod:`attnzoo.weights`: an
    in-memory ``state_dict``, a local ``file``, else the registered entry ``<architecture>.<tag>``
    (attnzoo's cache, sha256). None where timm should load it itself: a ``url`` / ``hf_hub_id`` the caller put
    in ``pretrained_cfg_overlay``, a model named ``hf-hub:...`` or ``local-dir:...`` (timm prefers the Hub
    repo to the official URL, and reads a saved folder), or a cfg of no registered entry."""
    from attnzoo.weights import is_checkpoint, load_checkpoint, load_checkpoint_file

    if cfg.get("state_dict") is not None:
        return cfg["state_dict"]
    if cfg.get("source") in ("hf-hub", "local-dir") or overlay.get("url") or overlay.get("hf_hub_id"):
        return None
    if cfg.get("file"):
        return load_checkpoint_file(cfg["file"])
    name = f"{cfg.get('architecture')}.{cfg.get('tag')}"
    if is_checkpoint(name):
        return load_checkpoint(name)
    if cfg.get("url") or cfg.get("hf_hub_id"):
        return None
    raise WeightsError(
        f"no pretrained weights are known for {name}: pass pretrained_cfg_overlay=dict(file=PATH) to timm, "
        "weights=PATH to attnzoo.create_model, or pretrained=False (on the command line: --weights PATH, or "
        "--weights none for random weights)"
    )
