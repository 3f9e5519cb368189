"""Where a model runs and in which dtype: the checks every entry point (pipelines, ``create_model``,
NevaClip) shares, so a device or dtype that cannot work fails at once with a typed error instead of
inside torch on the first forward pass. A leaf: it imports only torch and :mod:`attnzoo.errors`."""

from __future__ import annotations

import os
from typing import Any

import torch

from attnzoo.errors import InvalidInputError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
_FLOATING = frozenset(_DTYPES.values())


def _this_process_cuda() -> torch.device:
    """``cuda``, or under a multi-process ``torchrun`` this process's own GPU (``cuda:LOCAL_RANK``):
    a bare ``cuda`` means whichever device is current, which changes once the process group is set up."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("LOCAL_RANK", "").isdigit():
        return torch.device(f"cuda:{local_cuda_ordinal(int(os.environ['LOCAL_RANK']))}")
    return torch.device("cuda")


def local_cuda_ordinal(local_rank: int) -> int:
    """The GPU of the process with ``local_rank`` on its node: that ordinal, or 0 where each process sees a single
    GPU of its own (a scheduler binding one per task: ``CUDA_VISIBLE_DEVICES`` names one). More processes on a node
    than the GPUs they see is refused, where torch would fail inside the process group's setup."""
    count = _device_count(torch.device("cuda"))
    if count is None or local_rank < count:
        return local_rank
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if (
        count == 1 and visible.strip() and "," not in visible
    ):  # bound to this process (one GPU on a 1-GPU node: refused)
        return 0
    there = {0: "no CUDA device is", 1: "only 1 CUDA device is"}.get(count, f"only {count} CUDA devices are")
    raise InvalidInputError(
        f"torchrun started local rank {local_rank} (LOCAL_RANK), but {there} visible to it: start at most "
        f"{count} processes per node (--nproc_per_node {count}) or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
    )


def _backend_available(device: torch.device) -> bool:
    """torch's own ``torch.<type>.is_available()`` where the backend has a module (cuda, mps, xpu, ...);
    otherwise whether an empty tensor can be made there (torch raises assorted errors when it cannot)."""
    is_available = getattr(getattr(torch, device.type, None), "is_available", None)
    if callable(is_available):
        return bool(is_available())
    try:
        torch.empty(0, device=device)
    except Exception:  # noqa: BLE001  RuntimeError, NotImplementedError, AssertionError, ImportError by backend
        return False
    return True


def _device_count(device: torch.device) -> int | None:
    """How many devices of ``device``'s type torch sees here (``torch.<type>.device_count()``), or None for a
    backend without that count."""
    device_count = getattr(getattr(torch, device.type, None), "device_count", None)
    if not callable(device_count):
        return None
    try:
        return int(device_count())
    except Exception:  # noqa: BLE001  a backend that cannot count its devices: left to torch
        return None


def _is_ordinal(text: str) -> bool:
    """``"0"``, ``"3"``, ``"-1"``: a device ordinal written as on a command line (``--device 0``)."""
    return text.removeprefix("-").isdigit() and text.isascii()


def resolve_device(device: str | int | torch.device | None) -> torch.device:
    """``None`` picks CUDA when present; ints mean CUDA ordinals, as in transformers (``-1``: the CPU), and so
    does a string of one (``"0"``, ``"-1"``, as ``--device 0`` gives). A device whose backend is not available
    here, one past the devices there are (``cuda:3`` on a machine with one GPU), or ``meta`` (no data to
    compute on), is refused."""
    if device is None:
        return _this_process_cuda() if torch.cuda.is_available() else torch.device("cpu")
    given = device
    if isinstance(device, str) and _is_ordinal(device.strip()):
        device = int(device.strip())
    if not isinstance(device, (str, torch.device)):
        # an int or a numpy integer (which have __index__; numpy's bool has none): a CUDA ordinal. True would read
        # as the ordinal 1 ("cuda:True"), 1.5 would dump torch's list of overloads
        try:
            ordinal = None if isinstance(device, bool) else int(device.__index__())
        except (AttributeError, TypeError, ValueError, RuntimeError):  # no __index__, or a tensor that is not one int
            ordinal = None
        if ordinal is None:
            raise InvalidInputError(
                f"device must be a name such as 'cpu', 'cuda' or 'cuda:1', a CUDA ordinal (an int; -1: the CPU) or "
                f"a torch.device, got {type(device).__name__} {device!r}"
            )
        device = "cpu" if ordinal < 0 else f"cuda:{ordinal}"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"device={given!r} is not a device torch knows ({err})") from None
    if resolved.type == "meta":
        raise InvalidInputError(f"device={given!r} holds no data, so a model cannot run there; use 'cpu' or 'cuda'")
    if resolved.type != "cpu" and not _backend_available(resolved):
        what = resolved.type.upper()
        raise InvalidInputError(f"device={given!r} asked for {what}, but no {what} device is available here")
    count = _device_count(resolved) if resolved.type != "cpu" and resolved.index is not None else None
    if count is not None and resolved.index is not None and resolved.index >= count:
        what = resolved.type.upper()
        there = {0: f"no {what} device is", 1: f"only 1 {what} device is"}.get(count, f"{count} {what} devices are")
        ordinals = "" if count == 0 else f" (ordinals 0 to {count - 1}, counting the devices this process may see)"
        raise InvalidInputError(
            f"device={given!r} asked for {what} device {resolved.index}, but {there} available here{ordinals}"
        )
    return _this_process_cuda() if resolved.type == "cuda" and resolved.index is None else resolved


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A floating dtype models run in (float16, bfloat16, float32, float64), from a torch dtype or its name;
    None, or ``"auto"`` as transformers spells it, for the model's own (None)."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _FLOATING:
            floating = ", ".join(sorted(str(d) for d in _FLOATING))
            raise InvalidInputError(f"dtype={dtype} is not a dtype models run in here; use one of {floating}")
        return dtype
    try:
        return _DTYPES[str(dtype).strip().lower().removeprefix("torch.")]
    except KeyError:
        raise InvalidInputError(
            f"dtype={dtype!r} is not one of {sorted(_DTYPES)} (or 'auto': the model's own)"
        ) from None


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """The name of the dtype ``dtype`` names (``bf16``, ``BF16`` and ``torch.bfloat16`` alike ``bfloat16``), None for
    the model's own (``auto`` or None), as runs record ``--dtype``; refused as :func:`resolve_dtype` refuses."""
    resolved = resolve_dtype(dtype)
    return None if resolved is None else str(resolved).removeprefix("torch.")


def parameter_dtype(model: Any) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (as transformers reads a model's dtype), or None
    for a model without floating parameters or not a module."""
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return None
    return next((p.dtype for p in parameters() if p.is_floating_point()), None)
