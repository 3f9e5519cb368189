"""Checkpoint entries: where an official checkpoint lives, how to trust it, how to convert it.

Model files register their entries at import time (``register_checkpoint``); the registry
itself imports nothing heavy so the CLI can list it cheaply.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from attnzoo.errors import UnknownNameError

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """How the official evaluation prepares an image for this checkpoint."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    interpolation: str = "bicubic"
    colour_order: Literal["RGB", "BGR"] = "RGB"

    def to_timm(self) -> dict[str, Any]:
        """The keys timm's ``resolve_data_config``/``create_transform`` understand."""
        cfg = asdict(self)
        cfg.pop("colour_order")
        return cfg


@dataclass(frozen=True)
class CheckpointEntry:
    """One released checkpoint. ``name`` is ``<model>.<tag>``, as in timm."""

    name: str
    model: str
    url: str | None = None
    hf_hub_id: str | None = None
    hf_filename: str | None = None
    sha256: str | None = None
    file_format: Literal["safetensors", "pytorch"] = "pytorch"
    converter: str | Callable[..., dict] | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    filename: str | None = None
    default: bool = False
    license: str | None = None
    notes: str = ""
    manual_download: bool = False  # the host needs a browser (e.g. Baidu Pan): fetch it by hand, pass weights=PATH

    def __post_init__(self) -> None:
        if not (self.url or self.hf_hub_id):
            raise ValueError(f"checkpoint {self.name!r} needs a url or an hf_hub_id")
        if self.hf_hub_id and not self.hf_filename:
            raise ValueError(f"checkpoint {self.name!r}: hf_hub_id needs hf_filename")

    @property
    def cache_filename(self) -> str:
        if self.filename:
            return self.filename
        if self.hf_filename:
            return self.hf_filename.rsplit("/", 1)[-1]
        return self.url.rsplit("/", 1)[-1].split("?", 1)[0]  # type: ignore[union-attr]

    @property
    def source(self) -> str:
        return f"hf-hub:{self.hf_hub_id}/{self.hf_filename}" if self.hf_hub_id else str(self.url)

    def resolve_converter(self) -> Callable[..., dict] | None:
        """Converters may be given as ``"module:function"`` so registering stays import-free."""
        if self.converter is None or callable(self.converter):
            return self.converter
        module, _, attr = self.converter.partition(":")
        return getattr(importlib.import_module(module), attr)


_CHECKPOINTS: dict[str, CheckpointEntry] = {}


def register_checkpoint(entry: CheckpointEntry, *, overwrite: bool = False) -> CheckpointEntry:
    if entry.name in _CHECKPOINTS and not overwrite and _CHECKPOINTS[entry.name] != entry:
        raise ValueError(f"checkpoint {entry.name!r} is already registered with other settings")
    _CHECKPOINTS[entry.name] = entry
    return entry


def unregister_checkpoint(name: str) -> None:
    _CHECKPOINTS.pop(name, None)


def get_checkpoint(name: str) -> CheckpointEntry:
    try:
        return _CHECKPOINTS[name]
    except KeyError:
        raise unknown_checkpoint(name) from None


def unknown_checkpoint(name: str, *, unmatched: str = "") -> UnknownNameError:
    """The error for a checkpoint name that is not registered, with the close names, in any case
    (``BIFORMER_TINY.official_in1k`` suggests ``biformer_tiny.official_in1k``); ``unmatched`` is added after the
    name where none is close."""
    return UnknownNameError("checkpoint", name, _CHECKPOINTS, ignore_case=True, unmatched=unmatched)


def is_checkpoint(name: str) -> bool:
    return name in _CHECKPOINTS


def default_checkpoint(model: str) -> CheckpointEntry | None:
    """The entry ``pretrained=True`` loads for ``model`` (exact ``model.tag`` names win)."""
    if model in _CHECKPOINTS:
        return _CHECKPOINTS[model]
    candidates = [e for e in _CHECKPOINTS.values() if e.model == model]
    for entry in candidates:
        if entry.default:
            return entry
    return candidates[0] if candidates else None


#: Keys of a ``default_cfgs`` entry that are attnzoo's own: timm's ``PretrainedCfg`` has no such fields.
#: timm never downloads attnzoo's classifiers itself: their builders (``vision._common.build_classifier``)
#: read ``pretrained=True`` through the registered entry, so its ``filename`` and ``sha256`` still apply.
CHECKPOINT_ONLY_KEYS = ("filename", "sha256", "file_format", "colour_order", "manual_download")
_PREPROCESS_KEYS = tuple(f.name for f in fields(PreprocessConfig))


def preprocess_from_cfg(cfg: Mapping[str, Any]) -> PreprocessConfig:
    """The preprocessing a timm-style pretrained cfg describes (timm's defaults where it is silent)."""
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in _PREPROCESS_KEYS
    }
    return PreprocessConfig(**values)


def checkpoint_entry(
    name: str, cfg: Mapping[str, Any], *, converter: str | Callable[..., dict] | None, default: bool = True
) -> CheckpointEntry:
    """The entry of the checkpoint a ``"model.tag"`` pretrained cfg points at (timm's keys plus
    :data:`CHECKPOINT_ONLY_KEYS`); timm's ``notes`` tuple becomes one line."""
    model, _, tag = name.partition(".")
    if not tag:
        raise ValueError(
            f"checkpoint {name!r} needs a tag: name pretrained cfgs with a source '<model>.<tag>', as timm"
        )
    notes = cfg.get("notes") or ""
    return CheckpointEntry(
        name=name,
        model=model,
        url=cfg.get("url") or None,
        hf_hub_id=cfg.get("hf_hub_id") or None,
        hf_filename=cfg.get("hf_hub_filename") or None,
        sha256=cfg.get("sha256"),
        file_format=cfg.get("file_format", "pytorch"),
        converter=converter,
        preprocess=preprocess_from_cfg(cfg),
        filename=cfg.get("filename"),
        default=default,
        license=cfg.get("license"),
        notes=notes if isinstance(notes, str) else " ".join(notes),
        manual_download=bool(cfg.get("manual_download", False)),
    )


def register_checkpoints(
    cfgs: Mapping[str, Mapping[str, Any]], *, converter: str | Callable[..., dict] | None
) -> dict[str, dict[str, Any]]:
    """Register a :class:`CheckpointEntry` for every ``"model.tag"`` of a model file's pretrained
    cfgs that has a source (``url`` or ``hf_hub_id``), and return the cfgs without attnzoo's own
    keys (:data:`CHECKPOINT_ONLY_KEYS`), ready for timm's ``generate_default_cfgs``.

    So each checkpoint is written once: its URL, crop and licence serve timm's ``pretrained_cfg``
    and our download/convert registry alike. A model's first tag is its default, as in timm.
    ``converter`` (``"module:function"`` keeps registering import-free) maps the files' key layout.
    """
    timm_cfgs: dict[str, dict[str, Any]] = {}
    has_default: set[str] = set()
    for name, cfg in cfgs.items():
        timm_cfgs[name] = {k: v for k, v in cfg.items() if k not in CHECKPOINT_ONLY_KEYS}
        if cfg.get("url") or cfg.get("hf_hub_id"):
            entry = register_checkpoint(
                checkpoint_entry(name, cfg, converter=converter, default=name.partition(".")[0] not in has_default)
            )
            has_default.add(entry.model)
    return timm_cfgs


def list_checkpoints(pattern: str | None = None) -> list[CheckpointEntry]:
    entries = sorted(_CHECKPOINTS.values(), key=lambda e: e.name)
    if pattern:
        entries = [e for e in entries if fnmatch.fnmatch(e.name, pattern)]
    return entries
