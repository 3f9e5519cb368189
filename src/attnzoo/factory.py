"""One factory over timm's registry and ours: ``create_model`` and ``list_models``.

Classification backbones register with timm (so ``timm.create_model`` works after
``import attnzoo``); models that are not timm-shaped (3D reconstruction, scanpath, MIL)
register in the leaf module :mod:`attnzoo.registry`.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import urllib.parse
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnzoo._placement import resolve_device, resolve_dtype
from attnzoo._values import listed
from attnzoo.errors import InvalidOptionError, UnknownNameError, WeightsError
from attnzoo.registry import get_model_entry, registered_models
from attnzoo.weights import hub, registry
from attnzoo.weights.loading import classifier_names, load_checkpoint, load_weights, unwrap_state_dict

if TYPE_CHECKING:  # pragma: no cover
    import torch

_FAMILY_PACKAGES = (
    "attnzoo.vision",
    "attnzoo.multimodal.nevaclip",
    "attnzoo.multimodal.insertion.models",
    "attnzoo.multimodal.hallucination.models",
)
_families_loaded = False
_logger = logging.getLogger(__name__)


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

    The weights of an ``attnzoo train image-classification`` run (a file beside the run's ``config.yaml``)
    carry the run's settings: the model gets the run's number of classes, its class names
    (``pretrained_cfg["label_names"]``) and the preprocessing its validation used (``input_size``, centre
    crop). Other weights whose classifier is of another class count than the model's default build a model
    of that count (with a warning: the class names are unknown). A ``num_classes`` of the caller's wins in
    both cases (the file's classifier is left out where it does not fit, as with any checkpoint).
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
    run = trained_run(weights) if entry is None and own_entry is None else None
    features_only = bool(kwargs.get("features_only"))

    if own_entry is not None and own_entry.own_weights:
        if weights is None and pretrained and name in own_entry.hub_ids:
            weights = name  # the Hub id given as the model name is what to load
        model = own_entry.fn(pretrained=pretrained, weights=weights, **kwargs)
        return _placed(model, device, dtype)
    if own_entry is not None:
        if weights is None and pretrained:
            raise WeightsError(
                f"no pretrained checkpoint is registered for {name}; pass weights=PATH or pretrained=False "
                "(on the command line: --weights PATH, or --weights none for random weights)"
            )
        model = own_entry.fn(**kwargs)
        if weights is not None:
            load_weights(model, weights, converter=entry.resolve_converter() if entry else module_filter_fn(model))
    elif weights is None and pretrained:
        model = _timm_pretrained(name, **kwargs)
    elif weights is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        try:
            model = _timm_with_weights(base if entry is not None else name, weights, entry, kwargs, run=run)
        except WeightsError as err:
            if run is not None and run.model and _split_name(run.model)[0] != base:
                raise WeightsError(f"{err} ({run.config} says these weights are {run.model}'s)") from err
            raise
    if weights is not None and entry is not None:
        _apply_preprocess(model, entry)
    if run is not None and not features_only:
        _apply_run(model, run)
    return _placed(model, device, dtype)


#: timm's keywords that make a feature extractor of a model (``build_model_with_cfg`` takes them).
_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls")


def _timm_with_weights(
    name: str,
    weights: str | os.PathLike | Mapping[str, Any],
    entry: registry.CheckpointEntry | None,
    kwargs: dict[str, Any],
    *,
    run: TrainedRun | None = None,
) -> torch.nn.Module:
    """A timm model with ``weights``, adapted as ``timm.create_model(pretrained=True)`` adapts its own: a
    ``num_classes`` of the caller's, or ``features_only``, leaves the file's classifier out where it does not
    fit; every other key loads exactly. A feature extractor is built by timm from the loaded model's weights.

    Without a ``num_classes`` of the caller's, the model has the classes of the training ``run`` the weights
    come from, else of the file's classifier where it has another count than the model's default (an
    unregistered checkpoint trained on other classes), said in a warning: its class names are unknown."""
    import timm

    features = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs}
    new_head = "num_classes" in kwargs or bool(features.get("features_only"))
    build = dict(kwargs)
    if run is not None and not new_head:
        build["num_classes"] = len(run.classes)
    model = timm.create_model(name, pretrained=False, **build)
    converter = entry.resolve_converter() if entry is not None else module_filter_fn(model)
    classifier = classifier_names(getattr(model, "pretrained_cfg", None))
    try:
        load_weights(model, weights, converter=converter, classifier=classifier if new_head else ())
    except WeightsError:
        rows = None if new_head or entry is not None else _checkpoint_classes(weights, model, converter, classifier)
        if rows is None or rows[0] == model.num_classes:
            raise
        count, key, shape = rows
        if run is not None:  # the run's classes are not the file's: not one run's weights and settings
            raise WeightsError(
                f"the weights {os.fspath(weights)} and the {RUN_CONFIG} beside them come from different runs: the "
                f"weights' classifier has {count} classes ({key} {shape}), {run.config} records {len(run.classes)} "
                f"({listed(run.classes)}); put the weights beside their own run's {RUN_CONFIG}, move them away "
                "from this one, or pass num_classes"
            ) from None
        model = timm.create_model(name, pretrained=False, **{**build, "num_classes": count})
        load_weights(model, weights, converter=converter)
        source = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "the state dict"
        warnings.warn(
            f"checkpoint {source} has a classifier of {count} classes ({key} {shape}): the model is built with "
            f"num_classes={count}. Its class names are unknown (predictions are labelled LABEL_0 .. "
            f"LABEL_{count - 1}); an attnzoo training run's weights name them through the config.yaml beside them",
            stacklevel=3,
        )
        head_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        head_cfg.pop("label_names", None)
        head_cfg.update(num_classes=count, weights_note=f"{count} classes read from its {key}; class names unknown")
        _set_pretrained_cfg(model, head_cfg)
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


def _set_pretrained_cfg(model: Any, cfg: dict[str, Any]) -> None:
    model.pretrained_cfg = cfg
    if hasattr(model, "default_cfg"):  # timm's older alias of the same dict
        model.default_cfg = cfg


#: The file an ``attnzoo train`` run writes its settings to, beside its weights (``model.safetensors``).
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class TrainedRun:
    """What an ``attnzoo train image-classification`` run recorded in the ``config.yaml`` beside its weights."""

    config: Path
    """The run's ``config.yaml`` (absolute)."""
    classes: tuple[str, ...]
    """The class names, in the order of the model's outputs (the training split's classes)."""
    input_size: int
    """The square size the run trained and validated at (its validation: a centre crop of that size)."""
    model: str | None = None
    weights: str | None = None
    """What the run started from (a registered checkpoint sets the normalisation of a run that did not record its
    ``eval_transform``)."""
    class_ids: tuple[str, ...] | None = None
    """The ids of ``classes`` where they are not the names (ImageNet's WordNet ids): what the data is matched by."""
    transform: Mapping[str, Any] | None = None
    """The run's validation transform (``run.eval_transform``: mean, std, crop_pct, interpolation); None for a run
    that did not record it."""

    def describe(self) -> str:
        return f"{len(self.classes)} classes and input size {self.input_size} from {self.config}"


def trained_run(weights: Any) -> TrainedRun | None:
    """The image-classification training run ``weights`` (a local file) come from: the run's ``config.yaml``
    beside the file, when it records an ``attnzoo train image-classification`` run; else None. A config.yaml
    that is not such a record (another tool's, even one YAML's safe loader cannot read) is ignored; one that says
    it is such a run (``run.task: image-classification``) but lacks its classes or input size is refused
    (:class:`WeightsError`)."""
    if not isinstance(weights, (str, os.PathLike)):
        return None
    path = Path(weights).expanduser()
    config = path.parent / RUN_CONFIG
    if not path.is_file() or not config.is_file():
        return None
    import yaml

    try:
        record = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:  # another tool's config (e.g. !!python/tuple)
        _logger.debug("%s beside %s is not read as a training run's (%s: %s)", config, path, type(err).__name__, err)
        return None
    run = record.get("run") if isinstance(record, dict) else None
    if not isinstance(run, dict) or run.get("task") != "image-classification":
        return None  # another tool's config, or another task's run
    classes, extra = run.get("classes"), record.get("extra")
    size = extra.get("input_size") if isinstance(extra, dict) else None
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) for c in classes)
        or isinstance(size, bool)
        or not isinstance(size, int)
        or size < 1
    ):
        raise WeightsError(
            f"{config} records an image-classification run without its classes (run.classes: a list of names) "
            "or input size (extra.input_size: a positive whole number); mend it, or move the weights away from it"
        )
    ids, transform = run.get("class_ids"), run.get("eval_transform")
    if ids is not None and (
        not isinstance(ids, list) or len(ids) != len(classes) or not all(isinstance(c, str) for c in ids)
    ):
        raise WeightsError(
            f"{config} records class ids (run.class_ids) that are not one name for each of its {len(classes)} "
            "classes; mend it, or move the weights away from it"
        )
    if transform is not None and not _valid_transform(transform):
        raise WeightsError(
            f"{config} records a validation transform (run.eval_transform) without a positive crop_pct, an "
            "interpolation name, and 3 mean and 3 positive std values; mend it, or move the weights away from it"
        )
    model, start = run.get("model"), run.get("weights")
    return TrainedRun(
        config.resolve(),
        tuple(classes),
        size,
        model=model if isinstance(model, str) else None,
        weights=start if isinstance(start, str) else None,
        class_ids=tuple(ids) if ids is not None else None,
        transform=transform,
    )


def _valid_transform(transform: Any) -> bool:
    def numbers(values: Any, positive: bool) -> bool:
        return (
            isinstance(values, list)
            and len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            and all(v > 0 for v in values if positive)
        )

    crop = transform.get("crop_pct") if isinstance(transform, dict) else None
    return (
        isinstance(transform, dict)
        and isinstance(crop, (int, float))
        and not isinstance(crop, bool)
        and crop > 0
        and isinstance(transform.get("interpolation"), str)
        and numbers(transform.get("mean"), False)
        and numbers(transform.get("std"), True)
    )


def _apply_run(model: Any, run: TrainedRun) -> None:
    """The run's class names (where the model has its class count) and the preprocessing its validation used:
    ``input_size`` square, resized by ``crop_pct`` and centre-cropped, normalised, in RGB, as the recipe's
    evaluation transform -- as the run recorded it (``run.eval_transform``); for a run that did not, with the
    model's normalisation (or the registered checkpoint's the run started from)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if run.transform is not None:
        t = run.transform
        cfg.update(
            mean=tuple(float(v) for v in t["mean"]),
            std=tuple(float(v) for v in t["std"]),
            crop_pct=float(t["crop_pct"]),
            interpolation=str(t["interpolation"]),
        )
    elif run.weights is not None and registry.is_checkpoint(run.weights):
        cfg.update(registry.get_checkpoint(run.weights).preprocess.to_timm())
    cfg.update(input_size=(3, run.input_size, run.input_size), crop_mode="center", colour_order="RGB")
    for key in ("test_input_size", "test_crop_pct"):
        cfg.pop(key, None)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes == len(run.classes):
        cfg.update(label_names=list(run.classes), num_classes=num_classes, weights_note=run.describe())
        if run.class_ids is not None:
            cfg["label_ids"] = list(run.class_ids)
    else:  # the caller's num_classes: the run's classifier was left out
        cfg.pop("label_names", None)
        cfg.pop("label_ids", None)
        cfg["weights_note"] = (
            f"input size {run.input_size} from {run.config}; its {len(run.classes)} classes left out "
            f"(num_classes={num_classes})"
        )
    cfg["training_run"] = str(run.config)
    _set_pretrained_cfg(model, cfg)


def _checkpoint_classes(
    weights: str | os.PathLike | Mapping[str, Any],
    model: Any,
    converter: Callable[..., dict] | None,
    classifier: tuple[str, ...],
) -> tuple[int, str, tuple[int, ...]] | None:
    """The class count of ``weights``' classifier (the rows of ``<classifier>.weight``, timm's
    ``pretrained_cfg["classifier"]`` naming the module): (count, key, shape); None where the file has none."""
    if not classifier:
        return None
    try:
        obj = weights if isinstance(weights, Mapping) else load_checkpoint(weights)
        state: Mapping[str, Any] = unwrap_state_dict(obj)
    except WeightsError:
        return None
    if converter is not None:
        try:
            state = converter(dict(state), model)
        except Exception:  # the converter's layout check: the raw keys are looked at instead
            pass
    found = {
        (int(state[k].shape[0]), k, tuple(state[k].shape))
        for k in (f"{name}.weight" for name in classifier)
        if k in state and getattr(state[k], "ndim", 0) >= 1
    }
    counts = {count for count, _, _ in found}
    return min(found) if len(counts) == 1 else None


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
        raise WeightsError(
            f"no pretrained weights are known for {name}; pass weights=PATH or pretrained=False "
            "(on the command line: --weights PATH, or --weights none for random weights)"
        )
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
