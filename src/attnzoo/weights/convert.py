"""Turn an official checkpoint into our safetensors layout, verified against the model."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from attnzoo._io import atomic_write
from attnzoo.errors import InvalidOptionError, WeightsError
from attnzoo.weights.hub import DISK_FULL
from attnzoo.weights.loading import load_weights

if TYPE_CHECKING:  # pragma: no cover
    import torch


def save_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write a state dict as safetensors, atomically (shared or strided tensors are copied)."""
    from safetensors.torch import save

    seen: set[int] = set()
    tensors = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    payload = save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    try:
        with atomic_write(path, "wb") as fh:  # the temporary file is removed when a write fails
            fh.write(payload)
    except OSError as err:
        raise _write_error(path, err) from None
    return path


def _write_error(path: Path, err: OSError) -> WeightsError:
    """A file that could not be written, with the OS's reason (a full disk says to free space)."""
    then = ": free space there and run again" if err.errno in DISK_FULL else ""
    return WeightsError(f"cannot write {path}: {err.strerror or err}{then}")


def _check_writable(out: Path) -> None:
    """Refuse an output whose folder cannot be written (read-only, another user's), naming the OS's reason."""
    folder = next((p for p in (out.absolute().parent, *out.absolute().parents) if p.exists()), None)
    if folder is None:
        return
    try:  # can a file be made there? (a probe folder, removed at once)
        Path(tempfile.mkdtemp(prefix=".attnzoo-probe-", dir=folder)).rmdir()
    except OSError as err:
        raise InvalidOptionError(f"{out} cannot be written: {folder}: {err.strerror or err}") from None


def check_destination(
    src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False, flag: str = "overwrite=True"
) -> Path:
    """Refuse a conversion's output ``dst`` before any work: under a file, a folder, the checkpoint being
    converted, a name that does not end in ``.safetensors`` (the two paths swapped would write over the official
    checkpoint), or a file that exists unless ``overwrite`` (``flag`` names how to say so)."""
    out = Path(os.fspath(dst))
    blocked = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise InvalidOptionError(f"{out} cannot be written: {blocked} is a file, not a folder")
    if out.is_dir():
        raise InvalidOptionError(
            f"{out} is a folder: give the .safetensors file to write, e.g. {out / 'model.safetensors'}"
        )
    source = Path(os.fspath(src))
    if source.exists() and out.exists() and os.path.samefile(source, out):  # links and hard links included
        raise InvalidOptionError(f"{out} is the checkpoint being converted: write the conversion to another file")
    if out.suffix.lower() != ".safetensors":
        raise InvalidOptionError(
            f"{out} is not a .safetensors file name: the conversion is written as safetensors (were the official "
            f"checkpoint and the output swapped?); give e.g. {out.with_name(out.stem + '.safetensors')}"
        )
    if os.path.lexists(out) and not overwrite:
        raise InvalidOptionError(f"{out} exists: give another file, or {flag} to replace it")
    return out


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model: torch.nn.Module,
    *,
    converter: Callable[..., dict] | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Load ``src`` (official layout) into ``model`` strictly, then save the model's state dict to ``dst``
    (a new ``.safetensors`` file, written atomically; an existing one is replaced only with ``overwrite``, and
    never the official checkpoint itself, which would be lost). Weights the converter took from the model
    itself, because ``src`` has none for them, are not saved (metadata ``not_in_source`` names them): the file
    holds only what was released."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise InvalidOptionError(
            f"{type(model).__name__} has no single state dict to convert: it is built of parts that their own "
            "libraries load from their official files. 'attnzoo weights convert' takes a model that is one torch "
            "module (the image classifiers and backbones, such as those 'attnzoo weights list' names)"
        )
    out = check_destination(src, dst, overwrite=overwrite)
    _check_writable(out)  # before the conversion's work: a folder that cannot be written fails at once
    own = {k: v.data_ptr() for k, v in model.state_dict().items() if v.numel()}
    converted: dict[str, torch.Tensor] = {}
    recording = None
    if converter is not None:

        @functools.wraps(converter)
        def recording(state: dict, model: torch.nn.Module) -> dict:
            converted.update(converter(state, model))
            return converted

    load_weights(model, src, converter=recording, strict=True)
    # a part the official file lacks, which the converter filled with the model's own initialisation
    # (Sparsifiner's predictor on a dense DeiT): left out, so loading the conversion says so again
    not_in_source = [k for k, v in converted.items() if k in own and v.data_ptr() == own[k]]
    meta = {"format": "pt", "converted_from": Path(os.fspath(src)).name, **(metadata or {})}
    if not_in_source:
        meta["not_in_source"] = ",".join(not_in_source)
    state = {k: v for k, v in model.state_dict().items() if k not in not_in_source}
    return save_state_dict(state, dst, meta)
