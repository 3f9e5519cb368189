"""Input checks shared by the ops: typed errors before anything is launched."""

from __future__ import annotations

import torch

from attnzoo._values import to_real
from attnzoo.errors import InvalidInputError


def describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    """q, k, v are 4-D floating tensors of one dtype on one device (``layout`` names the dims).

    Annotated as tensors for the callers; checked at run time because users pass anything.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InvalidInputError(f"{op}: {name} must be a {layout} tensor, got {describe(t)}")
        if not t.is_floating_point():
            raise InvalidInputError(f"{op}: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidInputError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise InvalidInputError(f"{op}: q, k, v are on different devices")
    if q.shape[-1] == 0:  # no feature to attend with (and the default scale D ** -0.5 would divide by zero)
        raise InvalidInputError(f"{op}: q's head dim D must be at least 1, got {layout} = {tuple(q.shape)}")


def check_heads_first_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q ``[B, H, N, D]``, k and v ``[B, H, Nk, D]``."""
    check_qkv(op, q, k, v, "[B, H, N, D]")
    B, H, N, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise InvalidInputError(f"{op}: k and v must be [{B}, {H}, Nk, {D}], got {tuple(k.shape)} and {tuple(v.shape)}")


def check_index_tensor(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dtype == torch.bool:
        raise InvalidInputError(f"{op}: {name} must be an integer tensor, got {describe(t)}")
    if t.device != device:
        raise InvalidInputError(f"{op}: {name} is on {t.device}, q on {device}")


def repeated_entries(t: torch.Tensor) -> torch.Tensor:
    """Whether some row of ``t`` (along its last dim) holds a non-negative value twice (``-1`` padding may repeat), as a
    0-d bool tensor left on the device, so that several value checks can share one sync."""
    ordered = t.sort(-1).values
    return ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()


def real_scalar(op: str, name: str, value: object) -> float:
    """A finite real number (:func:`attnzoo._values.to_real`'s rule, or a one-element real tensor) as a float;
    anything else (None, a string, a bool, NaN, inf) is an :class:`InvalidInputError` naming ``op`` and ``name``."""
    number = value
    if isinstance(value, torch.Tensor):
        real = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
        number = value.item() if real else None
    checked = to_real(number)
    if checked is None:
        raise InvalidInputError(f"{op}: {name} must be a finite real number, got {value!r}")
    return checked
