"""Safe checkpoint loading: safetensors, or ``torch.load(weights_only=True)``, never arbitrary pickles."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from attnzoo._io import refuse_torch_zip_bomb
from attnzoo.errors import ChecksumError, InvalidOptionError, WeightsError
from attnzoo.weights import hub, registry

if TYPE_CHECKING:  # pragma: no cover
    import torch

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "net")
#: What torch's weights-only unpickler says when a file asks for code (a global, a call, a class to build);
#: anything else it refuses is a file it cannot parse.
_NEEDS_CODE = re.compile(r"GLOBAL|reduce|Can only (create|build)", re.IGNORECASE)
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
#: Built-in types configuration objects name as values (OmegaConf's ``object_type=dict``): building them runs no code
#: and allocates no more than the pickle holds (``bytes``, which ``bytes(10**11)`` would make a memory bomb, is left out).
_INERT_BUILTINS = (bool, int, float, complex, str, list, tuple, dict, set, frozenset)
#: The foreign classes official training scripts pickle beside their weights, the only names that get stand-ins:
#: yacs' ``CfgNode`` (InLine, Swin), OmegaConf's containers and nodes (BiFormer's hydra ``args``), ACMIL's
#: ``utils.utils.Struct``, and what they reference (``typing.Any``, ``collections.defaultdict``). Any other global
#: (a call such as ``subprocess.check_call``) is refused as before.
_STAND_IN_PREFIXES = ("omegaconf.", "yacs.config.")
_STAND_IN_NAMES = frozenset({"utils.utils.Struct", "typing.Any", "collections.defaultdict"})
#: What :func:`_load_with_stand_ins` answers where stand-ins do not apply (None may be what a file holds).
_NOT_LOADED = object()


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


class _UnreadableFile(WeightsError):
    """A file that is not a checkpoint at all (empty, a web page, text, corrupt or cut short): ``what`` says what
    it is, ``advice`` what to do about a file of one's own (a download of attnzoo's is deleted instead)."""

    def __init__(self, what: str, advice: str = ""):
        super().__init__(f"{what}; {advice}" if advice else what)
        self.what, self.advice = what, advice


#: The file types a checkpoint is saved as: a name with one of them is a file, never a registered name.
_FILE_SUFFIXES = frozenset(
    {".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".pickle", ".tar", ".zip", ".gz", ".npz", ".h5"}
)
#: How archives begin (zip is told from a PyTorch zip checkpoint by its members): (offset, magic, name).
_ARCHIVE_MAGIC = (
    (0, b"\x1f\x8b\x08", "gzip"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!\x1a\x07", "rar"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (4, b"1AY&SY", "bzip2"),  # after "BZh" and the block size
    (257, b"ustar", "tar"),
)


def resolve_checkpoint(spec: str | os.PathLike, *, progress: bool = True) -> Path:
    """A local path for a checkpoint given as a path, URL, ``hf-hub:repo/file`` or registered name.

    What plainly is no checkpoint (empty, a web page, an archive) is refused here already, from its first bytes;
    a download of attnzoo's own that is one is deleted, so the next call fetches it again."""
    resolved = _resolve(spec, progress=progress)
    try:
        _refuse_plainly_not_a_checkpoint(resolved.path)
    except _UnreadableFile as err:
        raise _unreadable_download(err, resolved) from None
    return resolved.path


class _Resolved(NamedTuple):
    """Where a checkpoint was found, and what may be done with it when it turns out not to be one."""

    path: Path
    #: An unverified download of attnzoo's own, as it was when found: it may be deleted, to fetch it again.
    own: os.stat_result | None = None
    #: A file in attnzoo's download cache without a download record (placed by hand, or an older attnzoo's).
    unrecorded: bool = False


def _downloaded(path: Path) -> _Resolved:
    """A download into attnzoo's cache that no sha256 verified: deletable when it is attnzoo's own."""
    return _Resolved(path, hub.own_download_state(path), hub.has_no_record_in_cache(path))


def _resolve(spec: str | os.PathLike, *, progress: bool) -> _Resolved:
    """The local path of ``spec``; a download of attnzoo's own that no sha256 verified carries its ``stat``
    (it may be deleted to fetch it again), never a file given by path or placed in the cache by hand."""
    text = os.fspath(spec)
    if not text.strip():  # Path("") is the current folder
        raise WeightsError("weights is empty: give a path, URL, hf-hub:org/repo/file, registered name or 'none'")
    path = Path(text).expanduser()
    if path.is_file():
        return _Resolved(path)
    if re.match(r"^(https?|file)://", text, re.IGNORECASE):
        name = text.rsplit("/", 1)[-1].split("?", 1)[0] or "checkpoint"
        # one folder per URL: two releases that share a file name must not share a cache entry
        folder = hashlib.sha256(text.encode()).hexdigest()[:16]
        return _downloaded(hub.download_url(text, hub.checkpoints_dir() / "url" / folder / name, progress=progress))
    if text.startswith("hf-hub:"):
        return _Resolved(hub.hf_download(*parse_hf_hub(text)))
    if registry.is_checkpoint(text):
        return _fetch(registry.get_checkpoint(text), progress=progress)
    separators = {"/", os.sep, os.altsep or "/"}
    if any(sep in text for sep in separators) or path.suffix.lower() in _FILE_SUFFIXES or path.exists():
        raise WeightsError(f"checkpoint file {text} does not exist (or is not a file)")
    # every registered name has a dot: a mistyped one is no file name; with no name close, it may be a file's
    raise registry.unknown_checkpoint(text, unmatched=f", nor a file {text} in {Path.cwd()}")


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
    return _fetch(entry, progress=progress).path


def _fetch(entry: registry.CheckpointEntry, *, progress: bool) -> _Resolved:
    if entry.hf_hub_id:
        return _Resolved(hub.hf_download(entry.hf_hub_id, entry.hf_filename or "", sha256=entry.sha256))
    cached = hub.checkpoints_dir() / entry.cache_filename
    if entry.manual_download:  # a file the user placed: never deleted
        if cached.is_file():
            return _Resolved(cached)
        raise WeightsError(
            f"{entry.name} cannot be downloaded automatically ({entry.notes or 'the host needs a browser'}): "
            f"download {entry.url} by hand and pass weights=PATH, or put the file at {cached}"
        )
    path = hub.download_url(entry.url or "", cached, sha256=entry.sha256, progress=progress)
    # a verified file is the one released: fetching it again changes nothing
    return _Resolved(path) if entry.sha256 else _downloaded(path)


def load_checkpoint(spec: str | os.PathLike, *, allow_non_finite: bool = False, progress: bool = True) -> Any:
    """The object stored in the checkpoint ``spec`` names (path, URL, ``hf-hub:``, registered name).

    A download of attnzoo's own that is not a checkpoint at all (cut short by a server that sent no
    length, an error page) is deleted, so the next call fetches it again instead of failing forever.
    """
    resolved = _resolve(spec, progress=progress)
    try:
        return load_checkpoint_file(resolved.path, allow_non_finite=allow_non_finite)
    except _UnreadableFile as err:
        raise _unreadable_download(err, resolved) from None


def _unreadable_download(err: _UnreadableFile, resolved: _Resolved) -> WeightsError:
    """The error for a file that is not a checkpoint: a download of attnzoo's own is deleted (so the next call
    fetches it again), under its lock and only while it is still the file read, except offline, where nothing
    could replace it; any other file is kept (one in the cache without a download record says how to replace it)."""
    if resolved.own is None:
        return WeightsError(f"{err.what}; {hub.no_record_advice(resolved.path)}") if resolved.unrecorded else err
    if hub.is_offline():
        return WeightsError(
            f"{err.what}; it is attnzoo's download, kept in {hub.OFFLINE_REASON}: run again with the network "
            "after deleting it, to fetch it again"
        )
    try:
        deleted = hub.forget_own_download(resolved.path, resolved.own)
    except (OSError, WeightsError) as problem:
        reason = problem.strerror if isinstance(problem, OSError) and problem.strerror else problem
        return WeightsError(
            f"{err.what}; attnzoo could not delete its downloaded copy ({reason}): delete it, then run again to "
            "fetch it again"
        )
    if not deleted:
        return WeightsError(
            f"{err.what}; attnzoo's copy changed meanwhile (another process fetched it again, or deleted it), so it "
            "was not deleted: run again"
        )
    return WeightsError(f"{err.what}; attnzoo's downloaded copy was deleted: the next call fetches it again")


def _refuse_plainly_not_a_checkpoint(path: Path) -> str | None:
    """Refuse, from its first bytes, a file that is plainly no checkpoint (empty, a web page, an archive); returns
    its start as text when it is text (else None)."""
    if path.stat().st_size == 0:
        raise _UnreadableFile(
            f"{path} is empty (0 bytes): an interrupted download or copy?", "delete it and fetch it again"
        )
    with open(path, "rb") as fh:
        head = fh.read(512)
    text = _as_text(head)
    if text is not None and text.lstrip().startswith("<"):  # a download that returned a web page
        raise _UnreadableFile(
            f"{path} is a web page (HTML), not a checkpoint: the download link returned a page (a login, "
            "quota or error page?)",
            "delete the file and download it again, or fetch it by hand",
        )
    _refuse_archive(path, head)
    return text


def _refuse_archive(path: Path, head: bytes) -> None:
    """An archive (zip, tar, gzip, ...) holds a checkpoint but is none: it is named as such, and never deleted (a
    download of it is the file released; fetching it again changes nothing)."""
    if _has_safetensors_header(head) or head.startswith(b"\x80"):  # safetensors, or a pickle (protocol 2 and up)
        return
    kind = next((name for offset, magic, name in _ARCHIVE_MAGIC if head[offset : offset + len(magic)] == magic), None)
    if kind is None and head.startswith(b"PK\x03\x04") and _is_plain_zip(path):
        kind = "zip"
    if kind is not None:
        raise WeightsError(
            f"{path} is an archive ({kind}), not a checkpoint: extract the checkpoint file from it and pass that file"
        )


def _is_plain_zip(path: Path) -> bool:
    """A zip file that is not a PyTorch checkpoint (which is a zip holding ``<name>/data.pkl``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):  # cut short or damaged: not an archive to extract
        return False
    return not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:
        return _has_safetensors_header(fh.read(9))


def _has_safetensors_header(head: bytes) -> bool:
    """Whether ``head`` begins as safetensors does: an 8-byte header length, then the JSON header's ``{``."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


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
    such a file anyway (to inspect it). A PyTorch zip whose entries would inflate far beyond the file (a zip
    bomb: see :func:`attnzoo._io.refuse_torch_zip_bomb`) is refused before torch reads it.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder: give the checkpoint file in it (.safetensors, .pth, .pt, .bin)")
    if not path.is_file():
        raise WeightsError(f"checkpoint file {path} does not exist")
    text = _refuse_plainly_not_a_checkpoint(path)
    if _is_safetensors(path):
        obj = _read_safetensors(path, map_location)
    else:
        # before torch reads anything (the stand-ins' listing of names inflates data.pkl too); a bomb is what the
        # host serves, so a download of one is not deleted to be fetched again
        refuse_torch_zip_bomb(path, error=WeightsError, allow_compressed=True)
        obj = _read_pickle(path, map_location, text)
    if not allow_non_finite:
        _refuse_non_finite(obj, str(path))
    return obj


def _read_safetensors(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=map_location)
    except Exception as err:  # safetensors' parser raises several types; all mean an unreadable file
        raise _UnreadableFile(f"{path} is not a readable safetensors file: {err}") from None


def _read_pickle(path: Path, map_location: str, text: str | None) -> Any:
    try:
        return _weights_only_load(path, map_location)
    except Exception as err:  # one guard for every way torch's parsers fail on a file that is not theirs
        failure = err
    if text is not None:
        first = text.strip().splitlines()[0][:60]
        raise _UnreadableFile(
            f"{path} is a text file, not a checkpoint (it starts with {first!r}): a wrong path, or a download "
            "that saved an error message?",
        ) from None
    reason = [line.strip() for line in str(failure).splitlines() if line.strip()]
    needs_code = next((line for line in reason if _NEEDS_CODE.search(line)), None)
    if isinstance(failure, pickle.UnpicklingError) and needs_code:
        obj = _load_with_stand_ins(path, map_location) if "Unsupported global" in needs_code else _NOT_LOADED
        if obj is not _NOT_LOADED:
            return obj
        raise WeightsError(
            f"{path} is a pickle that needs code execution to load ({needs_code}); attnzoo refuses it. "
            "Ask for a safetensors release, or convert a file you trust with a script of your own."
        ) from None
    detail = next((line for line in reason if "Unsupported operand" in line), reason[0] if reason else "")
    raise _UnreadableFile(
        f"{path} is not a readable PyTorch checkpoint ({type(failure).__name__}: {detail[:200]}); "
        "a corrupt or truncated file, or not a checkpoint at all"
    ) from None


def _weights_only_load(path: Path, map_location: str, extra_globals: Collection[Any] = ()) -> Any:
    import torch

    with torch.serialization.safe_globals([*_harmless_globals(), *extra_globals]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")  # our error says more
        return torch.load(path, map_location=map_location, weights_only=True)


def _load_with_stand_ins(path: Path, map_location: str) -> Any:
    """``path`` loaded with inert stand-ins for the foreign classes it names (yacs' ``CfgNode`` in InLine's
    checkpoints, OmegaConf's ``DictConfig`` in BiFormer's, ACMIL's ``utils.utils.Struct``): still
    weights-only, no code of theirs runs, and each stand-in becomes a plain ``OrderedDict``. Refused
    (:data:`_NOT_LOADED`) where a name belongs to torch, numpy or the builtins, and an error where a
    tensor would sit inside a stand-in (the weights themselves behind a foreign class)."""
    import torch

    list_globals = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if list_globals is None:  # older torch: the names cannot be listed up front
        return _NOT_LOADED
    try:
        with torch.serialization.safe_globals(_harmless_globals()):
            names = [n for n in list_globals(path) if n not in {f"builtins.{t.__name__}" for t in _INERT_BUILTINS}]
    except Exception:  # e.g. a legacy (non-zip) file: refused as before
        return _NOT_LOADED
    if not names or not all(_may_stand_in(n) for n in names):
        return _NOT_LOADED
    built: list[tuple[str, OrderedDict, tuple]] = []
    try:
        obj = _weights_only_load(path, map_location, [*_INERT_BUILTINS, *(_stand_in(n, built) for n in names)])
    except Exception:
        return _NOT_LOADED
    for name, stand_in, args in built:
        if next(_tensors([args, dict(stand_in), vars(stand_in)]), None) is not None:
            raise WeightsError(
                f"{path} keeps tensors inside a {name} object, which attnzoo does not build (it would run that "
                "library's code); re-save the state dict from a file you trust"
            )
        if not stand_in:  # a plain object (ACMIL's Struct): its attributes become the mapping's items
            stand_in.update(vars(stand_in))
    return obj


def _may_stand_in(name: str) -> bool:
    """One of the configuration classes official scripts pickle (never a name of torch, numpy or the builtins,
    whose objects make up the tensors and containers)."""
    return name in _STAND_IN_NAMES or name.startswith(_STAND_IN_PREFIXES)


def _stand_in(full_name: str, built: list[tuple[str, OrderedDict, tuple]]) -> type:
    """A class registered under ``full_name`` whose construction, by any pickle opcode, gives an empty
    ``OrderedDict`` (the one dict type torch's weights-only unpickler fills and builds) and runs nothing else."""
    module, _, qualname = full_name.rpartition(".")

    def new(cls: type, *args: Any, **kwargs: Any) -> OrderedDict:
        made: OrderedDict = OrderedDict()
        built.append((full_name, made, (args, kwargs)))
        return made

    return type(qualname, (), {"__module__": module, "__qualname__": qualname, "__new__": new})


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
        try:  # min and max carry any NaN or inf: one vectorised pass, many times faster than isfinite(...).all()
            checked, (low, high) = tensor, _extremes(tensor)
        except (NotImplementedError, RuntimeError):  # float8 and other dtypes without min/max: in 32 bits
            checked = tensor.to(torch.complex64 if tensor.is_complex() else torch.float32)
            low, high = _extremes(checked)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            bad.append(f"{name} ({int((~torch.isfinite(checked)).sum())} of {tensor.numel()})")
    if bad:
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        raise WeightsError(
            f"{source} holds NaN or inf values in {len(bad)} tensor(s): {', '.join(bad[:limit])}{more}; no working "
            "model holds them (a training run that diverged?). Pass allow_non_finite=True to load it anyway"
        )


def _extremes(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return torch.aminmax(torch.view_as_real(tensor) if tensor.is_complex() else tensor)


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
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    ignore: Collection[str] = (),
    limit: int = 5,
) -> str:
    """'' when ``state_dict`` fits ``model`` (exactly, if ``strict``), else a short account of what differs.
    Keys in ``ignore`` may be missing from ``state_dict``."""
    own = model.state_dict()
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in own if k not in state_dict and k not in ignore] if strict else []
    unexpected = [k for k in state_dict if k not in own] if strict else []
    return summarise_mismatch(missing=missing, unexpected=unexpected, shapes=shapes, limit=limit)


def summarise_mismatch(
    *, missing: Collection[str] = (), unexpected: Collection[str] = (), shapes: Collection[str] = (), limit: int = 5
) -> str:
    """'' when nothing differs, else how many keys are missing, unexpected or mis-shaped, naming a few of each."""
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", shapes)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(list(items)[:limit])}{more}")
    return "; ".join(parts)


def load_weights(
    model: torch.nn.Module,
    weights: str | os.PathLike | Mapping[str, Any],
    *,
    converter: Callable[..., dict] | None = None,
    strict: bool = True,
    allow_non_finite: bool = False,
    classifier: Collection[str] = (),
) -> torch.nn.Module:
    """Load a checkpoint (path, URL, registered name or state dict) into ``model``, exactly.

    ``converter(state_dict, model)`` maps an official key layout onto ours; it receives the
    raw checkpoint only when no generic state dict can be unwrapped from it. Checkpoints with
    NaN or inf are refused unless ``allow_non_finite``. ``classifier`` names the classifier modules
    (timm's ``pretrained_cfg['classifier']``) of a model built with its own ``num_classes`` (or none):
    where the file's classifier does not fit it, the file's is left out and the model keeps its own,
    as timm does; every other key still loads exactly.
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
        obj = load_checkpoint(source, allow_non_finite=allow_non_finite)
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
    new_head = _unfitting_head(model, state, classifier)
    dropped = {k: tuple(state[k].shape) for k in sorted(new_head) if k in state}
    if dropped:  # meant when fine-tuning to other classes; a wrong file would otherwise go unnoticed
        own = model.state_dict()
        warnings.warn(
            f"checkpoint {source}: its classifier does not fit the model's and is left out (file "
            + ", ".join(f"{k} {shape} vs {tuple(own[k].shape) if k in own else 'none'}" for k, shape in dropped.items())
            + "); the model's own head stays as initialised",
            stacklevel=2,
        )
    state = {k: v for k, v in state.items() if k not in new_head}
    problem = describe_mismatch(model, state, strict=strict, ignore=new_head)
    if problem:
        raise WeightsError(f"checkpoint {source} does not fit {type(model).__name__}: {problem}")
    try:
        model.load_state_dict(state, strict=strict and not new_head)
    except RuntimeError as err:  # e.g. complex values for real parameters
        raise WeightsError(f"checkpoint {source} cannot be loaded into {type(model).__name__}: {err}") from None
    return model


def classifier_names(cfg: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The classifier modules a timm pretrained cfg names (``classifier``: one name or several)."""
    names = (cfg or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def keys_under(modules: Collection[str], keys: Iterable[str]) -> set[str]:
    """The ``keys`` that belong to one of ``modules`` (``head`` holds ``head.weight`` and ``head.fc.bias``)."""
    return {k for k in keys if any(k.startswith(f"{name}.") for name in modules)}


def _unfitting_head(model: torch.nn.Module, state: Mapping[str, torch.Tensor], classifier: Collection[str]) -> set[str]:
    """The keys (file's and model's) under the ``classifier`` modules when the file's do not fit the model's
    (another number of classes, or no classifier on either side), else none: a head is kept or left out whole."""
    own = model.state_dict()
    head = keys_under(classifier, [*own, *state])
    fits = all(k in own and k in state and own[k].shape == state[k].shape for k in head)
    return set() if fits else head


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
        path = _resolve(
            name_or_file, progress=True
        ).path  # a registered file with a known sha256 is verified on the way
    except ChecksumError as err:
        return False, f"MISMATCH {err}"
    actual = hub.sha256_file(path)
    if expected is None:
        return True, f"{path} sha256={actual} (no known sha256 to compare with: pass --sha256 HEX to check it)"
    if actual != expected.lower():
        return False, f"MISMATCH {path} sha256={actual}, expected {expected.lower()}: corrupt, or not the file released"
    return True, f"OK {path} sha256={actual}"
