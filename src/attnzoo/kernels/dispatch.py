"""Backend registry and dispatch: the best backend whose constraint checks pass, with logged reasons.

Each op has up to three backends, registered under :data:`BACKEND_NAMES` and preferred in that
order: ``triton`` (fused kernels), ``flex`` (FlexAttention) and ``torch`` (plain PyTorch, which
can run every call). A backend is a function plus checks; a check returns ``None`` when the call
is fine or a short reason when it is not.
``use_backend(name)`` (a context manager) or ``ATTNZOO_ATTN_BACKEND`` forces one backend: a
forced backend that cannot run raises :class:`BackendUnavailableError` instead of falling back.
``dispatch_counts()`` says which backends ran each op since ``reset_dispatch_counts()`` (benchmarks
that time the default dispatch report it).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from attnzoo.errors import BackendUnavailableError, InvalidInputError, UnknownNameError

BACKEND_NAMES = ("triton", "flex", "torch")
logger = logging.getLogger("attnzoo.kernels")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnzoo_attn_backend", default=None)

Check = Callable[..., "str | None"]


@dataclass
class _Backend:
    name: str
    fn: Callable[..., Any]
    checks: list[Check] = field(default_factory=list)

    def why_not(self, *args: Any, **kwargs: Any) -> str | None:
        for check in self.checks:
            reason = check(*args, **kwargs)
            if reason:
                return reason
        return None


_REGISTRY: dict[str, list[_Backend]] = {}
_COUNTS: dict[str, dict[str, int]] = {}


def dispatch_counts() -> dict[str, dict[str, int]]:
    """``{op: {backend: calls}}`` of the calls dispatched since the last :func:`reset_dispatch_counts`
    (a copy): which backend a model's default dispatch actually chose, per op."""
    return {op: dict(by_backend) for op, by_backend in _COUNTS.items()}


def reset_dispatch_counts() -> None:
    _COUNTS.clear()


def _ran(op: str, backend: _Backend) -> Callable[..., Any]:
    by_backend = _COUNTS.setdefault(op, {})
    by_backend[backend.name] = by_backend.get(backend.name, 0) + 1
    return backend.fn


def register_backend(op: str, name: str, fn: Callable[..., Any], checks: list[Check] | None = None) -> None:
    """Add ``name`` to ``op``'s backends; registration order is preference order."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    backends = _REGISTRY.setdefault(op, [])
    backends[:] = [b for b in backends if b.name != name] + [_Backend(name, fn, list(checks or []))]
    backends.sort(key=lambda b: BACKEND_NAMES.index(b.name))


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKEND_NAMES:
        raise InvalidInputError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    return name.strip().lower()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend for every kernel op called inside the block."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    name = _forced.get()
    if name is None and os.environ.get("ATTNZOO_ATTN_BACKEND"):
        name = _check_name(os.environ["ATTNZOO_ATTN_BACKEND"])
    return name


def available_backends(op: str, *args: Any, **kwargs: Any) -> dict[str, str | None]:
    """For each backend of ``op``: ``None`` if it can run these arguments, else why not."""
    return {b.name: b.why_not(*args, **kwargs) for b in _backends(op)}


def _backends(op: str) -> list[_Backend]:
    if not isinstance(op, str) or op not in _REGISTRY:
        raise UnknownNameError("kernel op", str(op), _REGISTRY)
    return _REGISTRY[op]


def dispatch(op: str, *args: Any, **kwargs: Any) -> Any:
    backends = _backends(op)
    forced = forced_backend()
    if forced is not None:
        backend = next((b for b in backends if b.name == forced), None)
        if backend is None:
            raise BackendUnavailableError(
                f"{op} has no {forced!r} backend (it has: {', '.join(b.name for b in backends)})"
            )
        reason = backend.why_not(*args, **kwargs)
        if reason:
            raise BackendUnavailableError(f"{op}: the forced {forced!r} backend cannot run this call: {reason}")
        return _ran(op, backend)(*args, **kwargs)
    for backend in backends:
        reason = backend.why_not(*args, **kwargs)
        if reason is None:
            return _ran(op, backend)(*args, **kwargs)
        logger.debug("%s: skipping %s backend: %s", op, backend.name, reason)
    raise BackendUnavailableError(f"{op}: no backend can run this call")  # pragma: no cover - torch always can


# -- common checks -------------------------------------------------------------------------


def triton_importable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def on_gpu_or_interpreter(tensor: torch.Tensor) -> str | None:
    """Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1 and only when forced."""
    if tensor.is_cuda:
        return None
    if interpreting() and forced_backend() == "triton":
        return None
    return "inputs are not on a CUDA device (CPU runs Triton only under TRITON_INTERPRET=1 when forced)"


def triton_can_run(q: torch.Tensor, max_head_dim: int) -> str | None:
    """The checks every Triton backend shares: importable, a device it runs on, a head dim it takes."""
    return (
        triton_importable()
        or on_gpu_or_interpreter(q)
        or (f"head dim {q.shape[-1]} > {max_head_dim}" if q.shape[-1] > max_head_dim else None)
    )


def flex_can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: object) -> str | None:
    """FlexAttention exists in this torch; on the CPU (eager, dense scores, no backward) only when forced."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return "this torch has no FlexAttention"
    if q.is_meta:
        return "FlexAttention does not run on meta tensors"
    if not q.is_cuda:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return "FlexAttention has no backward on the CPU"
        if forced_backend() != "flex":
            return "eager FlexAttention on the CPU materialises dense scores (used only when forced)"
    return None
