"""Safe checkpoint loading: safetensors, or ``torch.load(weights_only=True)``, never arbitrary pickles."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnzoo.errors import UnknownNameError, WeightsError
from attnzoo.weights import hub, registry

if TYPE_CHECKING:  # pragma: no cover
    import torch

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "net")


def _harmless_globals() -> list[Any]:
    """Objects official checkpoints carry beside their tensors that construct nothing dangerous."""
    import argparse

    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.dtype]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed.append(scalar)
    allowed.extend(type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool"))
    return allowed


def resolve_checkpoint(spec: str | os.PathLike, *, progress: bool = True) -> Path:
    """A local path for a checkpoint given as a path, URL, ``hf-hub:repo/file`` or registered name."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if re.match(r"^(https?|file)://", text):
        name = text.rsplit("/", 1)[-1].split("?", 1)[0] or "checkpoint"
        # one folder per URL: two releases that share a file name must not share a cache entry
        folder = hashlib.sha256(text.encode()).hexdigest()[:16]
        return hub.download_url(text, hub.checkpoints_dir() / "url" / folder / name, progress=progress)
    if text.startswith("hf-hub:"):
        repo_file = text.removeprefix("hf-hub:")
        parts = repo_file.split("/")
        if len(parts) < 3:
            raise WeightsError(f"{text!r}: expected hf-hub:<org>/<repo>/<file>")
        return hub.hf_download("/".join(parts[:2]), "/".join(parts[2:]))
    if registry.is_checkpoint(text):
        return fetch_checkpoint(registry.get_checkpoint(text), progress=progress)
    if path.suffix or os.sep in text or path.exists():
        raise WeightsError(f"checkpoint file {text} does not exist (or is not a file)")
    raise UnknownNameError("checkpoint", text, [e.name for e in registry.list_checkpoints()])


def fetch_checkpoint(entry: registry.CheckpointEntry, *, progress: bool = True) -> Path:
    """Download (or find in the cache) the file of a registered checkpoint, verified."""
    if entry.hf_hub_id:
        return hub.hf_download(entry.hf_hub_id, entry.hf_filename or "", sha256=entry.sha256)
    cached = hub.checkpoints_dir() / entry.cache_filename
    if entry.manual_download:
        if cached.is_file():
            return cached
        raise WeightsError(
            f"{entry.name} cannot be downloaded automatically ({entry.notes or 'the host needs a browser'}): "
            f"download {entry.url} by hand and pass weights=PATH, or put the file at {cached}"
        )
    return hub.download_url(
        entry.url or "", hub.checkpoints_dir() / entry.cache_filename, sha256=entry.sha256, progress=progress
    )


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def load_checkpoint_file(path: str | os.PathLike, *, map_location: str = "cpu") -> Any:
    """The object stored in ``path``; pickles only through torch's weights-only unpickler."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint file {path} does not exist")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=map_location)
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path} is not a readable safetensors file: {err}") from None
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip()
    if head[:1] == b"<" or head[:15].lower().startswith(b"<!doctype"):  # a download that returned a web page
        raise WeightsError(
            f"{path} is a web page (HTML), not a checkpoint: the download link returned a page (a login, "
            "quota or error page?); delete the file and download it again, or fetch it by hand"
        )
    try:
        with torch.serialization.safe_globals(_harmless_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("\n")
        found = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0])
        raise WeightsError(
            f"{path} is a pickle that needs code execution to load ({found}); attnzoo refuses it. "
            "Ask for a safetensors release, or convert a file you trust with a script of your own."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {err}") from None


def unwrap_state_dict(obj: Any, *, prefixes: tuple[str, ...] = ("module.",)) -> dict[str, torch.Tensor]:
    """Take the state dict out of a training checkpoint (``model``/``state_dict`` wrappers, DDP prefixes)."""
    import torch

    while isinstance(obj, Mapping) and not _all_tensors(obj):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise WeightsError(
                f"checkpoint holds no state dict under any of {list(_WRAPPER_KEYS)}; top-level keys: {sorted(map(str, obj))[:10]}"
            )
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _all_tensors(obj: Mapping) -> bool:
    import torch

    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def describe_mismatch(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True, limit: int = 5
) -> str:
    """'' when ``state_dict`` fits ``model`` (exactly, if ``strict``), else a short account of what differs."""
    own = model.state_dict()
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = [("shape mismatch (file vs model)", shapes)]
    if strict:
        problems.insert(0, ("missing", [k for k in own if k not in state_dict]))
        problems.insert(1, ("unexpected", [k for k in state_dict if k not in own]))
    parts = []
    for label, items in problems:
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_weights(
    model: torch.nn.Module,
    weights: str | os.PathLike | Mapping[str, Any],
    *,
    converter: Callable[..., dict] | None = None,
    strict: bool = True,
) -> torch.nn.Module:
    """Load a checkpoint (path, URL, registered name or state dict) into ``model``, exactly.

    ``converter(state_dict, model)`` maps an official key layout onto ours; it receives the
    raw checkpoint only when no generic state dict can be unwrapped from it.
    """
    source = "<state dict>"
    if isinstance(weights, Mapping):
        obj: Any = weights
    else:
        source = os.fspath(weights)
        if converter is None and registry.is_checkpoint(source):
            converter = registry.get_checkpoint(source).resolve_converter()
        obj = load_checkpoint_file(resolve_checkpoint(source))
    try:
        state = unwrap_state_dict(obj)
    except WeightsError:
        if converter is None:
            raise
        state = obj
    if converter is not None:
        state = converter(state, model)
    problem = describe_mismatch(model, state, strict=strict)
    if problem:
        raise WeightsError(f"checkpoint {source} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=strict)
    return model
