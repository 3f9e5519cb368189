"""Safe checkpoint loading: safetensors, or ``torch.load(weights_only=True)``, never arbitrary pickles."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnzoo.errors import ChecksumError, InvalidOptionError, UnknownNameError, WeightsError
from attnzoo.weights import hub, registry

if TYPE_CHECKING:  # pragma: no cover
    import torch

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "net")
#: What torch's weights-only unpickler says when a file asks for code (a global, a call, a class to build);
#: anything else it refuses is a file it cannot parse.
_NEEDS_CODE = re.compile(r"GLOBAL|reduce|Can only (create|build)", re.IGNORECASE)
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


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
    if not text.strip():  # Path("") is the current folder
        raise WeightsError("weights is empty: give a path, URL, hf-hub:org/repo/file, registered name or 'none'")
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if re.match(r"^(https?|file)://", text):
        name = text.rsplit("/", 1)[-1].split("?", 1)[0] or "checkpoint"
        # one folder per URL: two releases that share a file name must not share a cache entry
        folder = hashlib.sha256(text.encode()).hexdigest()[:16]
        return hub.download_url(text, hub.checkpoints_dir() / "url" / folder / name, progress=progress)
    if text.startswith("hf-hub:"):
        return hub.hf_download(*parse_hf_hub(text))
    if registry.is_checkpoint(text):
        return fetch_checkpoint(registry.get_checkpoint(text), progress=progress)
    if path.suffix or os.sep in text or path.exists():
        raise WeightsError(f"checkpoint file {text} does not exist (or is not a file)")
    raise UnknownNameError("checkpoint", text, [e.name for e in registry.list_checkpoints()])


def parse_hf_hub(spec: str) -> tuple[str, str]:
    """``hf-hub:<org>/<repo>/<file>`` as (repo id, file in the repo), checked before any network use."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    parts = spec.removeprefix("hf-hub:").split("/")
    if len(parts) < 3 or not all(parts):
        raise WeightsError(
            f"{spec!r}: expected hf-hub:<org>/<repo>/<file in the repo>, e.g. hf-hub:timm/resnet18.a1_in1k/model.safetensors"
        )
    repo_id = "/".join(parts[:2])
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise WeightsError(f"{spec!r}: {repo_id!r} is not a Hugging Face repo id ({err})") from None
    return repo_id, "/".join(parts[2:])


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


def _as_text(head: bytes) -> str | None:
    """The start of a file as text (a byte-order mark honoured), or None when it is binary."""
    encoding = "utf-8"
    for bom, name in _BOMS:
        if head.startswith(bom):
            head, encoding = head[len(bom) :], name
            break
    text = head.decode(encoding, errors="replace").lstrip("\ufeff")
    if not text.strip():
        return None
    printable = sum((c.isprintable() and c != "\ufffd") or c in "\t\n\r\f" for c in text)
    return text if "\x00" not in text and printable >= 0.95 * len(text) else None


def load_checkpoint_file(path: str | os.PathLike, *, map_location: str = "cpu", allow_non_finite: bool = False) -> Any:
    """The object stored in ``path``; pickles only through torch's weights-only unpickler.

    Non-finite floats (NaN, inf) are refused: no working model holds them, and a diverged run's
    checkpoint would otherwise give ``nan`` scores without a word. ``allow_non_finite=True`` reads
    such a file anyway (to inspect it).
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder: give the checkpoint file in it (.safetensors, .pth, .pt, .bin)")
    if not path.is_file():
        raise WeightsError(f"checkpoint file {path} does not exist")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty (0 bytes): an interrupted download or copy? Fetch it again")
    with open(path, "rb") as fh:
        text = _as_text(fh.read(512))
    if text is not None and text.lstrip().startswith("<"):  # a download that returned a web page
        raise WeightsError(
            f"{path} is a web page (HTML), not a checkpoint: the download link returned a page (a login, "
            "quota or error page?); delete the file and download it again, or fetch it by hand"
        )
    obj = _read_safetensors(path, map_location) if _is_safetensors(path) else _read_pickle(path, map_location, text)
    if not allow_non_finite:
        _refuse_non_finite(obj, str(path))
    return obj


def _read_safetensors(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=map_location)
    except Exception as err:  # safetensors' parser raises several types; all mean an unreadable file
        raise WeightsError(f"{path} is not a readable safetensors file: {err}") from None


def _read_pickle(path: Path, map_location: str, text: str | None) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals(_harmless_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # our error says more
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # one guard for every way torch's parsers fail on a file that is not theirs
        if text is not None:
            first = text.strip().splitlines()[0][:60]
            raise WeightsError(
                f"{path} is a text file, not a checkpoint (it starts with {first!r}): a wrong path, or a download "
                "that saved an error message?"
            ) from None
        reason = [line.strip() for line in str(err).splitlines() if line.strip()]
        needs_code = next((line for line in reason if _NEEDS_CODE.search(line)), None)
        if isinstance(err, pickle.UnpicklingError) and needs_code:
            raise WeightsError(
                f"{path} is a pickle that needs code execution to load ({needs_code}); attnzoo refuses it. "
                "Ask for a safetensors release, or convert a file you trust with a script of your own."
            ) from None
        detail = next((line for line in reason if "Unsupported operand" in line), reason[0] if reason else "")
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {detail[:200]}); "
            "a corrupt or truncated file, or not a checkpoint at all"
        ) from None


def _tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a loaded checkpoint with its key path (nested dicts and lists; cycles are skipped)."""
    import torch

    stack: list[tuple[str, Any]] = [("", obj)]
    seen: set[int] = set()
    while stack:
        name, item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield name or "<tensor>", item
        elif isinstance(item, (Mapping, list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            pairs = item.items() if isinstance(item, Mapping) else enumerate(item)
            stack.extend((f"{name}.{key}" if name else str(key), value) for key, value in reversed(list(pairs)))


def _refuse_non_finite(obj: Any, source: str, limit: int = 5) -> None:
    import torch

    bad = []
    for name, tensor in _tensors(obj):
        if tensor.layout != torch.strided or tensor.numel() == 0:
            continue
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        # min and max carry any NaN or inf: one vectorised pass, many times faster than isfinite(...).all()
        low, high = torch.aminmax(torch.view_as_real(tensor) if tensor.is_complex() else tensor)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            bad.append(f"{name} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()})")
    if bad:
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        raise WeightsError(
            f"{source} holds NaN or inf values in {len(bad)} tensor(s): {', '.join(bad[:limit])}{more}; no working "
            "model holds them (a training run that diverged?). Pass allow_non_finite=True to load it anyway"
        )


def unwrap_state_dict(obj: Any, *, prefixes: tuple[str, ...] = ("module.",)) -> dict[str, torch.Tensor]:
    """Take the state dict out of a training checkpoint (``model``/``state_dict`` wrappers, DDP prefixes)."""
    import torch

    while isinstance(obj, Mapping) and not _all_tensors(obj):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
            mixed = f"tensors mixed with other values ({', '.join(others[:5])}) and " if len(others) < len(obj) else ""
            raise WeightsError(
                f"checkpoint holds {mixed}no state dict under any of {list(_WRAPPER_KEYS)}; "
                f"top-level keys: {sorted(map(str, obj))[:10]}"
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
    allow_non_finite: bool = False,
) -> torch.nn.Module:
    """Load a checkpoint (path, URL, registered name or state dict) into ``model``, exactly.

    ``converter(state_dict, model)`` maps an official key layout onto ours; it receives the
    raw checkpoint only when no generic state dict can be unwrapped from it. Checkpoints with
    NaN or inf are refused unless ``allow_non_finite``.
    """
    import torch

    source = "<state dict>"
    if isinstance(weights, Mapping):
        obj: Any = weights
        if not allow_non_finite:
            _refuse_non_finite(obj, source)
    else:
        source = os.fspath(weights)
        if converter is None and registry.is_checkpoint(source):
            converter = registry.get_checkpoint(source).resolve_converter()
        obj = load_checkpoint_file(resolve_checkpoint(source), allow_non_finite=allow_non_finite)
    try:
        state = unwrap_state_dict(obj)
    except WeightsError:
        if converter is None:
            raise
        state = obj
    if converter is not None:
        try:
            state = converter(state, model)
        except Exception as err:  # a converter reads the official layout; anything else is not that checkpoint
            raise WeightsError(
                f"checkpoint {source} does not have the layout {getattr(converter, '__name__', 'the converter')} "
                f"reads ({type(err).__name__}: {err})"
            ) from err
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"checkpoint {source}: the converter did not return a state dict of tensors")
    problem = describe_mismatch(model, state, strict=strict)
    if problem:
        raise WeightsError(f"checkpoint {source} does not fit {type(model).__name__}: {problem}")
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:  # e.g. complex values for real parameters
        raise WeightsError(f"checkpoint {source} cannot be loaded into {type(model).__name__}: {err}") from None
    return model


def verify_report(name_or_file: str, sha256: str | None = None) -> tuple[bool, str]:
    """``attnzoo weights verify``: (whether the file is the one expected, the line to print).

    With no sha256 given or registered there is nothing to compare with: the file's own hash is
    reported, so it can be recorded, and that is not a failure.
    """
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise InvalidOptionError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    expected = sha256 or (
        registry.get_checkpoint(name_or_file).sha256 if registry.is_checkpoint(name_or_file) else None
    )
    try:
        path = resolve_checkpoint(name_or_file)  # a registered file with a known sha256 is verified on the way
    except ChecksumError as err:
        return False, f"MISMATCH {err}"
    actual = hub.sha256_file(path)
    if expected is None:
        return True, f"{path} sha256={actual} (no known sha256 to compare with: pass --sha256 HEX to check it)"
    if actual != expected.lower():
        return False, f"MISMATCH {path} sha256={actual}, expected {expected.lower()}: corrupt, or not the file released"
    return True, f"OK {path} sha256={actual}"
