"""One factory over timm's registry and ours: ``create_model`` and ``list_models``.

Classification backbones register with timm (so ``timm.create_model`` works after
``import attnzoo``); models that are not timm-shaped (3D reconstruction, scanpath, MIL)
register in the leaf module :mod:`attnzoo.registry`.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnzoo._placement import resolve_device, resolve_dtype
from attnzoo.errors import InvalidOptionError, UnknownNameError, WeightsError
from attnzoo.registry import get_model_entry, registered_models
from attnzoo.weights import hub, registry
from attnzoo.weights.loading import classifier_names, load_weights

if TYPE_CHECKING:  # pragma: no cover
    import torch

_FAMILY_PACKAGES = (
    "attnzoo.vision",
    "attnzoo.multimodal.nevaclip",
    "attnzoo.multimodal.insertion.models",
    "attnzoo.multimodal.hallucination.models",
)
_families_loaded = False


def load_families() -> None:
    """Import every model family once, so that timm's registry, ours and the checkpoints are filled."""
    global _families_loaded
    if not _families_loaded:
        for package in _FAMILY_PACKAGES:
            importlib.import_module(package)
        _families_loaded = True


def list_models(pattern: str | None = None, *, pretrained: bool = False) -> list[str]:
    """Names ``create_model`` accepts: timm's registry (ours included) and our own models.

    With ``pretrained=True``, only names with weights: ``model.tag`` (``resnet50.a1_in1k``), timm's
    and our registered checkpoints.
    """
    import timm

    load_families()
    names = set(timm.list_models(pattern or "", pretrained=pretrained))
    if pretrained:
        names |= {e.name for e in registry.list_checkpoints(pattern)}
    else:
        names |= {n for n in registered_models() if not pattern or fnmatch.fnmatch(n, pattern)}
    return sorted(names)


def _split_name(name: str) -> tuple[str, str | None]:
    base, _, tag = name.partition(".")
    return base, tag or None


def create_model(
    name: str,
    pretrained: bool = False,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    device: str | int | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build ``name``; load its default official weights (``pretrained=True``) or ``weights``.

    ``weights`` is a local path, a URL, ``hf-hub:org/repo/file``, a registered checkpoint
    name, a state dict, or ``"none"`` for random initialisation. A registered checkpoint
    also sets the model's ``pretrained_cfg`` preprocessing. ``device`` / ``dtype`` are checked (as a
    pipeline's) before anything is built; ``device=None`` leaves the model on the CPU.
    """
    import timm

    if not isinstance(name, str) or not name.strip():
        raise InvalidOptionError(f"a model is named by a non-empty string, got {name!r}")
    device = resolve_device(device) if device is not None else None
    dtype = resolve_dtype(dtype)
    load_families()
    base, tag = _split_name(name)
    own_entry = get_model_entry(name if "/" in name else base)  # a Hub id may name one of our models
    if own_entry is None and not timm.is_model(base):
        if os.path.isfile(name):  # a checkpoint given where its model's name goes
            raise InvalidOptionError(
                f"model {name!r} is a file; a model is given by name (see 'attnzoo models' / 'attnzoo tasks'), "
                "its checkpoint as weights= (--weights)"
            )
        raise UnknownNameError("model", name, list_models())
    if isinstance(weights, str) and weights.strip().lower() == "none":
        weights, pretrained = None, False

    entry = None
    if weights is None and pretrained:
        entry = registry.default_checkpoint(name)
        if entry is None and tag and registry.is_checkpoint(name):
            entry = registry.get_checkpoint(name)
        if entry is not None:
            weights = entry.name
    elif isinstance(weights, (str, os.PathLike)) and registry.is_checkpoint(os.fspath(weights)):
        entry = registry.get_checkpoint(os.fspath(weights))

    if own_entry is not None and own_entry.own_weights:
        if weights is None and pretrained and name in own_entry.hub_ids:
            weights = name  # the Hub id given as the model name is what to load
        model = own_entry.fn(pretrained=pretrained, weights=weights, **kwargs)
        return _placed(model, device, dtype)
    if own_entry is not None:
        if weights is None and pretrained:
            raise WeightsError(
                f"no pretrained checkpoint is registered for {name}; pass weights=PATH or pretrained=False"
            )
        model = own_entry.fn(**kwargs)
        if weights is not None:
            load_weights(model, weights, converter=entry.resolve_converter() if entry else module_filter_fn(model))
    elif weights is None and pretrained:
        model = _timm_pretrained(name, **kwargs)
    elif weights is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        model = _timm_with_weights(base if entry is not None else name, weights, entry, kwargs)
    if weights is not None and entry is not None:
        _apply_preprocess(model, entry)
    return _placed(model, device, dtype)


#: timm's keywords that make a feature extractor of a model (``build_model_with_cfg`` takes them).
_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls")


def _timm_with_weights(
    name: str,
    weights: str | os.PathLike | Mapping[str, Any],
    entry: registry.CheckpointEntry | None,
    kwargs: dict[str, Any],
) -> torch.nn.Module:
    """A timm model with ``weights``, adapted as ``timm.create_model(pretrained=True)`` adapts its own: a
    ``num_classes`` of the caller's, or ``features_only``, leaves the file's classifier out where it does not
    fit; every other key loads exactly. A feature extractor is built by timm from the loaded model's weights."""
    import timm

    features = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs}
    model = timm.create_model(name, pretrained=False, **kwargs)
    new_head = "num_classes" in kwargs or bool(features.get("features_only"))
    load_weights(
        model,
        weights,
        converter=entry.resolve_converter() if entry is not None else module_filter_fn(model),
        classifier=classifier_names(getattr(model, "pretrained_cfg", None)) if new_head else (),
    )
    if not features.get("features_only"):
        return model
    overlay = {"state_dict": model.state_dict()}
    extractor = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs, **features)
    for module in extractor.modules():  # timm keeps the overlay in every pretrained_cfg: not the weights twice
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return extractor


def _placed(model: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def attnzoo_models() -> dict[str, tuple[str, ...]]:
    """attnzoo's own models (ours and the classifiers we register with timm) and the tasks each serves."""
    import timm.models

    load_families()
    models = {n: get_model_entry(n).tasks for n in registered_models()}  # type: ignore[union-attr]
    for n in timm.list_models():
        if timm.models.model_entrypoint(n).__module__.startswith("attnzoo."):
            models[n] = ("image-classification",)
    return dict(sorted(models.items()))


def module_filter_fn(model: Any) -> Callable[..., dict] | None:
    """timm's convention: a model file's ``checkpoint_filter_fn`` maps released layouts onto it."""
    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def _apply_preprocess(model: Any, entry: registry.CheckpointEntry) -> None:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(entry.preprocess.to_timm())
    cfg["colour_order"] = entry.preprocess.colour_order
    cfg["checkpoint"] = entry.name
    model.pretrained_cfg = cfg


def _timm_pretrained(name: str, **kwargs: Any) -> torch.nn.Module:
    """timm's own pretrained weights, from a cache first; offline or with the host unreachable, a
    file that is not cached fails at once with the ways out instead of after the Hub's retries."""
    import timm
    from timm.models import resolve_pretrained_cfg

    try:
        cfg = resolve_pretrained_cfg(name)
    except RuntimeError as err:  # timm: "Invalid pretrained tag"
        raise UnknownNameError("pretrained tag", name, timm.list_models(_split_name(name)[0], pretrained=True)) from err
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"no pretrained weights are known for {name}; pass weights=PATH or pretrained=False")
    overlay: dict[str, Any] = {}
    what = f"timm's pretrained weights for {name}"
    if cfg.hf_hub_id:
        cached = _hf_cached(cfg.hf_hub_id, cfg.hf_hub_filename)
        if cached:
            overlay = {"file": cached}
        else:
            how = hub.hf_fetch_advice(cfg.hf_hub_id)  # timm reads model.safetensors or pytorch_model.bin
            hub.ensure_can_download(what, f"{hub.hf_endpoint()}/{cfg.hf_hub_id}", how_to_fetch=how)
    elif cfg.url and not cfg.file:
        url, filename = cfg.url if isinstance(cfg.url, tuple) else (cfg.url, None)  # timm allows (url, filename)
        cached_url = _torch_hub_file(url, filename)
        if not cached_url.is_file():
            hub.ensure_can_download(what, url, cached_url)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise WeightsError(f"cannot load timm's pretrained weights for {name}: {err}") from err


def _hf_cached(repo_id: str, filename: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for candidate in filter(None, (filename, "model.safetensors", "pytorch_model.bin")):
        found = try_to_load_from_cache(repo_id, candidate)
        if isinstance(found, str):
            return found
    return None


def _torch_hub_file(url: str, filename: str | None = None) -> Path:
    """Where timm keeps a checkpoint it downloads from a plain URL (torch.hub's checkpoints folder)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / (filename or Path(urllib.parse.urlsplit(url).path).name)
