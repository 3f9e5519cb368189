"""One factory over timm's registry and ours: ``create_model`` and ``list_models``.

Classification backbones register with timm (so ``timm.create_model`` works after
``import attnzoo``); models that are not timm-shaped (3D reconstruction, scanpath, MIL)
register in the leaf module :mod:`attnzoo.registry`.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from attnzoo.errors import OfflineError, UnknownNameError, WeightsError
from attnzoo.registry import get_model_entry, registered_models
from attnzoo.weights import hub, registry
from attnzoo.weights.loading import load_weights

if TYPE_CHECKING:  # pragma: no cover
    import torch

_FAMILY_PACKAGES = ("attnzoo.vision", "attnzoo.multimodal.nevaclip")
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

    With ``pretrained=True`` the names carry their weight tag (``resnet50.a1_in1k``) and
    include our registered checkpoints.
    """
    import timm

    load_families()
    names = set(timm.list_models(pattern or "", pretrained=pretrained))
    own = set(registered_models())
    if pretrained:
        own = {e.name for e in registry.list_checkpoints() if get_model_entry(e.model) is not None}
        names |= {e.name for e in registry.list_checkpoints()}
    names |= {n for n in own if not pattern or fnmatch.fnmatch(n, pattern)}
    return sorted(n for n in names if not pattern or fnmatch.fnmatch(n, pattern))


def _split_name(name: str) -> tuple[str, str | None]:
    base, _, tag = name.partition(".")
    return base, tag or None


def create_model(
    name: str,
    pretrained: bool = False,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build ``name``; load its default official weights (``pretrained=True``) or ``weights``.

    ``weights`` is a local path, a URL, ``hf-hub:org/repo/file``, a registered checkpoint
    name, a state dict, or ``"none"`` for random initialisation. A registered checkpoint
    also sets the model's ``pretrained_cfg`` preprocessing.
    """
    import timm

    load_families()
    base, tag = _split_name(name)
    own_entry = get_model_entry(base)
    if own_entry is None and not timm.is_model(base):
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
        model = own_entry.fn(pretrained=pretrained, weights=weights, **kwargs)
        return _placed(model, device, dtype)
    if own_entry is not None:
        if weights is None and pretrained:
            raise WeightsError(
                f"no pretrained checkpoint is registered for {name}; pass weights=PATH or pretrained=False"
            )
        model = own_entry.fn(**kwargs)
    elif weights is None and pretrained:
        model = _timm_pretrained(name, **kwargs)
    else:
        model = timm.create_model(base if entry is not None else name, pretrained=False, **kwargs)

    if weights is not None:
        converter = entry.resolve_converter() if entry is not None else module_filter_fn(model)
        load_weights(model, weights, converter=converter)
        if entry is not None:
            _apply_preprocess(model, entry)
    return _placed(model, device, dtype)


def _placed(model: Any, device: Any, dtype: Any) -> Any:
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
    """timm's own pretrained weights, found in the HF cache first so offline use is instant."""
    import timm
    from timm.models import resolve_pretrained_cfg

    try:
        cfg = resolve_pretrained_cfg(name)
    except RuntimeError as err:  # timm: "Invalid pretrained tag"
        raise UnknownNameError("pretrained tag", name, timm.list_models(_split_name(name)[0], pretrained=True)) from err
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"no pretrained weights are known for {name}; pass weights=PATH or pretrained=False")
    overlay: dict[str, Any] = {}
    if cfg.hf_hub_id:
        cached = _hf_cached(cfg.hf_hub_id, cfg.hf_hub_filename)
        if cached:
            overlay = {"file": cached}
        elif hub.is_offline():
            raise OfflineError(
                f"offline mode (ATTNZOO_OFFLINE/HF_HUB_OFFLINE) and the timm weights {cfg.hf_hub_id} are not in the "
                "Hugging Face cache: fetch them once online, or download model.safetensors from "
                f"https://huggingface.co/{cfg.hf_hub_id} and pass weights=PATH"
            )
    elif hub.is_offline():
        raise OfflineError(
            f"offline mode and {name}'s weights ({cfg.url}) are not cached: download them and pass weights=PATH"
        )
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
