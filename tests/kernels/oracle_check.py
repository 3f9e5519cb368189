"""What every kernel test does: run an op on one backend, forward and backward, and hold it
against the oracle (``attnzoo.kernels.oracle``) evaluated in fp64 on the same inputs, on the
device the backend runs on (``triton_device`` / ``kernel_device`` in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import attnzoo.kernels as K

FP32_TOL = dict(atol=2e-5, rtol=1e-4)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)  # 8 mantissa bits; checked natively on CUDA only


def tolerance(dtype: torch.dtype, fp16: float) -> dict[str, float]:
    """The tolerance of an op's check in ``dtype``; ``fp16`` is the op's own (its rounding steps differ)."""
    return {torch.float32: FP32_TOL, torch.float16: dict(atol=fp16, rtol=fp16), torch.bfloat16: BF16_TOL}[dtype]


def to_device(device: str | torch.device, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors (made on the CPU from seeded generators, so every device sees the same values) on ``device``."""
    return [None if t is None else t.to(device) for t in tensors]


def heads_first_qkv(B=2, H=2, N=20, D=16, dtype=torch.float32, seed=0, Nk=None, device="cpu"):
    """q ``[B, H, N, D]`` and k, v ``[B, H, Nk, D]``, seeded."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k, v = (torch.randn(B, H, Nk or N, D, generator=g).to(dtype) for _ in range(2))
    return tuple(to_device(device, q, k, v))


def assert_matches_oracle(
    backend: str,
    op: Callable[..., torch.Tensor],
    oracle: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    tol: dict[str, float],
) -> None:
    """``op`` forced onto ``backend`` equals ``oracle`` (fp64) in its output and in the gradient of
    every input, under one random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with K.use_backend(backend):
        out = op(*leaves)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = oracle(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, d_out.double())
    torch.testing.assert_close(out.double(), ref, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **tol)


def assert_flex_matches_oracle(
    op: Callable[..., torch.Tensor],
    oracle: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    tol: dict[str, float],
) -> None:
    """The flex backend against the oracle: forward and backward where it is compiled (CUDA), the
    forward alone on the CPU (eager FlexAttention has no backward there)."""
    if inputs[0].is_cuda:
        assert_matches_oracle("flex", op, oracle, inputs, tol)
        return
    with K.use_backend("flex"):
        out = op(*inputs)
    torch.testing.assert_close(out.double(), oracle(*(t.double() for t in inputs)), **tol)


def backend_device(request, backend: str) -> str:
    """The device a test of ``backend`` runs on: ``triton_device`` for Triton (skipped where it cannot run), else
    ``kernel_device`` (fixtures in tests/conftest.py)."""
    return request.getfixturevalue("triton_device" if backend == "triton" else "kernel_device")


def assert_backend_matches_oracle(
    backend: str,
    op: Callable[..., torch.Tensor],
    oracle: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    tol: dict[str, float],
) -> None:
    """:func:`assert_matches_oracle`, or for ``flex`` :func:`assert_flex_matches_oracle` (no backward on the CPU)."""
    if backend == "flex":
        assert_flex_matches_oracle(op, oracle, inputs, tol)
    else:
        assert_matches_oracle(backend, op, oracle, inputs, tol)
