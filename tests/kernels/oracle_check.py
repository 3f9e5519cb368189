"""What every kernel test does: run an op on one backend, forward and backward, and hold it
against the oracle (``attnzoo.kernels.oracle``) evaluated in fp64 on the same inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import attnzoo.kernels as K

FP32_TOL = dict(atol=2e-5, rtol=1e-4)


def heads_first_qkv(B=2, H=2, N=20, D=16, dtype=torch.float32, seed=0, Nk=None):
    """q ``[B, H, N, D]`` and k, v ``[B, H, Nk, D]``, seeded."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k, v = (torch.randn(B, H, Nk or N, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v


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
