"""grouped_attention: every backend equals the oracle, forward and backward (Triton natively on CUDA
where a GPU is present, else under the interpreter)."""

import json
import logging

import pytest
import torch

import attnzoo.kernels as K
from attnzoo.errors import BackendUnavailableError, InvalidInputError, UnknownNameError
from attnzoo.kernels import dispatch_counts, reset_dispatch_counts
from attnzoo.kernels import oracle as O
from attnzoo.kernels import torch_impl as T
from tests.helpers import reference_path, triton_dtypes
from tests.kernels.oracle_check import (
    FP32_TOL,
    assert_backend_matches_oracle,
    assert_flex_matches_oracle,
    assert_matches_oracle,
    backend_device,
    to_device,
    tolerance,
)

interpret = pytest.mark.interpret


def make_case(
    B=2,
    Hm=8,
    Wm=8,
    H=2,
    D=16,
    window=4,
    topk=2,
    per_head=False,
    dtype=torch.float32,
    seed=0,
    grouping="window",
    device="cpu",
):
    g = torch.Generator().manual_seed(seed)
    groups = K.window_groups(Hm, Wm, window) if grouping == "window" else K.dilated_groups(Hm, Wm, window)
    G = groups.shape[0]
    q, k, v = (torch.randn(B, Hm * Wm, H, D, generator=g).to(dtype) for _ in range(3))
    route = None
    if topk is not None:
        shape = (B, H, G) if per_head else (B, G)
        route = (
            torch.stack([torch.randperm(G, generator=g)[:topk] for _ in range(int(torch.tensor(shape).prod()))])
            .view(*shape, topk)
            .int()
        )
    return tuple(to_device(device, q, k, v, groups, route))


CASES = {
    "bra_shared_route": dict(),
    "topk_1": dict(topk=1),
    "topk_all": dict(topk=4),
    "per_head_route": dict(per_head=True, H=3),
    "window_identity_batch1": dict(B=1, topk=None),
    "odd_map_padded_windows_d24": dict(Hm=5, Wm=7, window=3, D=24, topk=3, H=3),
    "big_groups_multi_tile": dict(B=1, Hm=10, Wm=10, window=10, topk=None, H=1, D=16),
    "dilated_groups": dict(grouping="dilated", window=2, topk=None),
}


def oracle_grads(q, k, v, groups, route, scale, d_out):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = O.grouped_attention(*leaves, groups, groups, route, scale)
    return out, torch.autograd.grad(out, leaves, d_out.double())


def check_backend(backend, case, dtype, device="cpu"):
    q, k, v, groups, route = make_case(dtype=dtype, device=device, **CASES[case])
    assert_matches_oracle(
        backend,
        lambda a, b, c: K.grouped_attention(a, b, c, groups, route=route, scale=0.3),
        lambda a, b, c: O.grouped_attention(a, b, c, groups, groups, route, 0.3),
        (q, k, v),
        tolerance(dtype, fp16=3e-3),
    )


@interpret
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_oracle(case, dtype, triton_device):
    check_backend("triton", case, dtype, triton_device)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_oracle(case):
    check_backend("torch", case, torch.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_flex_matches_oracle(case, kernel_device):
    """Compiled, forward and backward, on CUDA; eager and forward only on the CPU."""
    q, k, v, groups, route = make_case(device=kernel_device, **CASES[case])
    assert_flex_matches_oracle(
        lambda a, b, c: K.grouped_attention(a, b, c, groups, route=route, scale=0.3),
        lambda a, b, c: O.grouped_attention(a, b, c, groups, groups, route, 0.3),
        (q, k, v),
        FP32_TOL,
    )


@interpret
def test_triton_gradcheck_fp64(triton_device):
    q, k, v, groups, route = make_case(
        B=1, Hm=4, Wm=6, window=(2, 3), H=1, topk=2, dtype=torch.float64, device=triton_device
    )
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with K.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: K.grouped_attention(a, b, c, groups, route=route), leaves, fast_mode=True
        )


@interpret
def test_triton_backward_is_deterministic(triton_device):
    q, k, v, groups, route = make_case(topk=3, device=triton_device)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with K.use_backend("triton"):
            out = K.grouped_attention(*leaves, groups, route=route)
        runs.append(torch.autograd.grad(out.square().sum(), leaves))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@interpret
def test_triton_reads_non_contiguous_views_in_place(triton_device):
    """q, k, v as strided views of one fused qkv projection, as the models produce them."""
    B, N, H, D = 2, 64, 2, 16
    qkv = torch.randn(B, N, 3, H, D).to(triton_device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    groups = K.window_groups(8, 8, 4, device=triton_device)
    route = make_case(device=triton_device)[4]
    with K.use_backend("triton"):
        out = K.grouped_attention(q, k, v, groups, route=route)
    torch.testing.assert_close(out, O.grouped_attention(q, k, v, groups, groups, route, D**-0.5), **FP32_TOL)


@interpret
def test_query_group_with_no_valid_key_outputs_zero(triton_device):
    q, k, v, _, _ = make_case(B=1, Hm=4, Wm=4, topk=None, device=triton_device)
    q_groups, kv_groups, route = to_device(
        triton_device,
        torch.arange(16, dtype=torch.int32).view(2, 8),
        torch.tensor([[0, 1, 2, 3], [-1, -1, -1, -1]], dtype=torch.int32),
        torch.tensor([[[0], [1]]], dtype=torch.int32),
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for backend in ("triton", "torch"):
        with K.use_backend(backend):
            out = K.grouped_attention(*leaves, q_groups, kv_groups, route)
        assert torch.isfinite(out).all() and (out[:, 8:] == 0).all()
        grads = torch.autograd.grad(out.sum(), leaves)
        assert all(torch.isfinite(g).all() for g in grads) and (grads[0][:, 8:] == 0).all()


@interpret
def test_custom_op_passes_opcheck(triton_device):
    from attnzoo.kernels import ops

    q, k, v, groups, route = make_case(B=1, Hm=4, Wm=4, window=2, topk=2, device=triton_device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), groups, groups, route, 0.25)
    with K.use_backend("triton"):
        torch.library.opcheck(ops.grouped_attention_fwd, args)


def test_cpu_default_is_torch_and_skips_are_logged(caplog):
    q, k, v, groups, route = make_case()
    reasons = K.available_backends("grouped_attention", q, k, v, groups, groups, route, 1.0)
    assert reasons["torch"] is None and reasons["triton"] and reasons["flex"]
    with caplog.at_level(logging.DEBUG, logger="attnzoo.kernels"):
        K.grouped_attention(q, k, v, groups, route=route)
    assert "skipping triton backend" in caplog.text


def test_dispatch_counts_name_the_backend_each_call_ran_on():
    q, k, v, groups, route = make_case()
    reset_dispatch_counts()
    K.grouped_attention(q, k, v, groups, route=route)  # the CPU default: torch
    with K.use_backend("flex"), torch.no_grad():
        K.grouped_attention(q, k, v, groups, route=route)
    K.grouped_attention(q, k, v, groups, route=route)
    assert dispatch_counts() == {"grouped_attention": {"torch": 2, "flex": 1}}
    reset_dispatch_counts()
    assert dispatch_counts() == {}


def test_env_var_forces_backend(monkeypatch):
    q, k, v, groups, route = make_case()
    monkeypatch.setenv("ATTNZOO_ATTN_BACKEND", "flex")
    assert K.forced_backend() == "flex"
    q.requires_grad_()
    with pytest.raises(BackendUnavailableError, match="no backward on the CPU"):
        K.grouped_attention(q, k, v, groups, route=route)
    monkeypatch.setenv("ATTNZOO_ATTN_BACKEND", "torch")
    assert K.forced_backend() == "torch"
    monkeypatch.setenv("ATTNZOO_ATTN_BACKEND", "fastest")
    with pytest.raises(InvalidInputError, match="unknown attention backend"):
        K.grouped_attention(q, k, v, groups, route=route)
    with pytest.raises(InvalidInputError, match="choose one of triton, flex, torch"):
        with K.use_backend("reference"):  # the test oracle is not a backend
            pass


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, "must be a \\[B, N, H, D\\]"),
        (lambda a: {**a, "k": a["k"].half()}, "dtypes differ"),
        (lambda a: {**a, "v": a["v"][:, :, :1]}, "k and v must be"),
        (lambda a: {**a, "q": a["q"].long()}, "floating point"),
        (lambda a: {**a, "route": a["route"] + 10}, "outside"),
        (lambda a: {**a, "route": a["route"][:, :2]}, "does not match"),
        (lambda a: {**a, "route": a["route"].float()}, "integer"),
        (lambda a: {**a, "q_groups": a["q_groups"].clone().index_fill_(1, torch.tensor([1]), 0)}, "more than one"),
        (lambda a: {**a, "q_groups": a["q_groups"] + 100}, "outside"),
        (lambda a: {**a, "route": None, "kv_groups": a["q_groups"][:2]}, "same number of groups"),
        (lambda a: {**a, "route": a["route"][..., :1].expand_as(a["route"])}, "names a key group twice"),
        (
            lambda a: {**a, "kv_groups": a["q_groups"].clone().index_fill_(1, torch.tensor([1]), 0)},
            "lists a token twice",
        ),
        (lambda a: {n: t[..., :0] if n in "qkv" else t for n, t in a.items()}, "head dim D must be at least 1"),
        (lambda a: {n: None if t is None else t.to("meta") for n, t in a.items()}, "meta tensors"),
    ],
)
def test_bad_input_is_a_typed_error(mutate, match):
    q, k, v, groups, route = make_case()
    args = mutate(dict(q=q, k=k, v=v, q_groups=groups, kv_groups=None, route=route))
    with pytest.raises(InvalidInputError, match=match):
        K.grouped_attention(args["q"], args["k"], args["v"], args["q_groups"], args["kv_groups"], args["route"])


BACKENDS = ["torch", "flex", "triton"]


@interpret
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("route", [[0, 0, 1], [0, 0, 1, 2]])  # the torch backend gathers at topk < 4, masks at >= 4
def test_a_route_naming_a_key_group_twice_is_refused(backend, route, request):
    """Counting the group's keys twice (oracle, Triton) or once (flex, a token mask) are both guesses: refused."""
    device = backend_device(request, backend)
    q, k, v = (torch.randn(1, 16, 2, 4, device=device) for _ in range(3))
    groups = K.window_groups(4, 4, 2, device=device)
    repeated = torch.tensor([[route] * 4], dtype=torch.int32, device=device)
    with K.use_backend(backend), pytest.raises(InvalidInputError, match="names a key group twice"):
        K.grouped_attention(q, k, v, groups, route=repeated)


# 2x2 windows of a 4x4 map, each with a halo of the next window's first column or row: tokens 1, 2, 5, 6, 9, 10,
# 13 and 14 sit in two key groups
HALO_KV_GROUPS = [[0, 1, 4, 5, 2, 6], [2, 3, 6, 7, 1, 5], [8, 9, 12, 13, 10, 14], [10, 11, 14, 15, 9, 13]]


@interpret
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk", [1, 2, 4])  # the torch backend's gather (topk < 4) and token-mask (4) formulations
def test_overlapping_key_groups_count_a_token_once_per_routed_group(backend, topk, request):
    device = backend_device(request, backend)
    q, k, v = make_case(B=2, Hm=4, Wm=4, window=2, topk=None)[:3]
    groups, kv_groups = K.window_groups(4, 4, 2), torch.tensor(HALO_KV_GROUPS, dtype=torch.int32)
    route = torch.stack([torch.arange(4).roll(-g)[:topk] for g in range(4)]).int().expand(2, 4, topk)
    q, k, v, groups, kv_groups, route = to_device(device, q, k, v, groups, kv_groups, route)
    assert_backend_matches_oracle(
        backend,
        lambda a, b, c: K.grouped_attention(a, b, c, groups, kv_groups, route, scale=0.3),
        lambda a, b, c: O.grouped_attention(a, b, c, groups, kv_groups, route, 0.3),
        (q, k, v),
        FP32_TOL,
    )


@interpret
@pytest.mark.parametrize("dtype", triton_dtypes())
def test_triton_backward_adds_a_token_s_parts_from_every_key_group_holding_it(dtype, triton_device):
    """Token 3 in all four key groups (and a padding slot): its dK/dV sums four parts, per-head routes."""
    q, k, v = make_case(B=2, Hm=4, Wm=4, H=2, window=2, topk=None, dtype=dtype)[:3]
    extra = torch.tensor([[3], [-1], [3], [3]], dtype=torch.int32)
    kv_groups = torch.cat([torch.tensor(HALO_KV_GROUPS, dtype=torch.int32), extra], dim=1)
    route = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i))[:3] for i in range(16)])
    q, k, v, groups, kv_groups, route = to_device(
        triton_device, q, k, v, K.window_groups(4, 4, 2), kv_groups, route.view(2, 2, 4, 3).int()
    )
    assert_matches_oracle(
        "triton",
        lambda a, b, c: K.grouped_attention(a, b, c, groups, kv_groups, route, scale=0.3),
        lambda a, b, c: O.grouped_attention(a, b, c, groups, kv_groups, route, 0.3),
        (q, k, v),
        tolerance(dtype, fp16=3e-3),
    )


@interpret
def test_triton_per_slot_backward_writes_with_its_own_strides(triton_device):
    """One key in two key groups, k and v views whose size-1 token dimension has an odd stride: the per-slot
    gradient buffer was written with k's strides (dV off by 15)."""
    k, v = (torch.randn(1, 2, 1, 4).transpose(1, 2) for _ in range(2))  # [1, 1, 2, 4], strides (8, 4, 4, 1)
    assert k.stride() == (8, 4, 4, 1)
    q = torch.randn(1, 2, 2, 4)
    groups, kv_groups = torch.tensor([[0], [1]], dtype=torch.int32), torch.tensor([[0], [0]], dtype=torch.int32)
    route = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.int32)
    q, k, v, groups, kv_groups, route = to_device(triton_device, q, k, v, groups, kv_groups, route)
    assert_matches_oracle(
        "triton",
        lambda a, b, c: K.grouped_attention(a, b, c, groups, kv_groups, route, scale=0.5),
        lambda a, b, c: O.grouped_attention(a, b, c, groups, kv_groups, route, 0.5),
        (q, k, v),
        FP32_TOL,
    )


@interpret
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_give_the_empty_or_all_zero_output_on_every_backend(backend, request):
    device = backend_device(request, backend)
    groups, none = K.window_groups(4, 4, 2), torch.zeros(0, 4, dtype=torch.int32)
    cases = {  # (B, N, H, D), Nk, q_groups, kv_groups
        "no batch": ((0, 16, 2, 4), 16, groups, groups),
        "no head": ((1, 16, 0, 4), 16, groups, groups),
        "no query": ((1, 0, 2, 4), 0, none, none),
        "no key": ((1, 16, 2, 4), 0, groups, torch.full((4, 4), -1, dtype=torch.int32)),
        "no group": ((1, 16, 2, 4), 16, none, none),
    }
    for name, (shape, Nk, q_groups, kv_groups) in cases.items():
        q = torch.randn(shape)
        k, v = (torch.randn(shape[0], Nk, *shape[2:]) for _ in range(2))
        with K.use_backend(backend):
            out = K.grouped_attention(*to_device(device, q, k, v, q_groups, kv_groups))
        assert out.shape == q.shape and not out.any(), name


def test_group_tables():
    assert K.window_groups(2, 4, 2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert K.window_groups(1, 3, 2).tolist() == [[0, 1, -1, -1], [2, -1, -1, -1]]
    assert K.dilated_groups(2, 4, (1, 2)).tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(InvalidInputError):
        K.dilated_groups(3, 4, 2)
    lrgt = K.across_views(K.dilated_groups(14, 14, 7), views=3, tokens_per_view=196)
    assert lrgt.shape == (49, 12) and lrgt[0, :6].tolist() == [
        0,
        196,
        392,
        7,
        203,
        399,
    ]  # (0,0), then (0,7), each from 3 views
    assert sorted(lrgt.flatten().tolist()) == list(range(3 * 196))
    route = torch.tensor([[[[1, 0], [1, 2], [0, 1]]]])
    ptr, idx = K.inverse_routing(route, 3)
    assert ptr.tolist() == [[[0, 2, 5, 6]]] and idx.tolist() == [[[0, 2, 0, 1, 2, 1]]]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda g: K.across_views(g, -1, 16), "views must be an integer >= 0"),
        (lambda g: K.across_views(g, 2.0, 16), "views must be an integer >= 0"),
        (lambda g: K.across_views(g, 2, 0), "tokens_per_view must be a positive integer"),
        (lambda g: K.across_views(g, 2, 8), "outside \\[-1, 8\\)"),  # view 0's token 8 would be view 1's token 0
        (lambda g: K.across_views(g.float(), 2, 16), "integer \\[G, T\\] table"),
        (lambda g: K.inverse_routing(g[None], 4), "route must be an integer \\[B, R, G, topk\\]"),
        (lambda g: K.inverse_routing(g[None, None], -1), "num_kv_groups must be an integer >= 0"),
    ],
)
def test_group_table_helpers_refuse_bad_arguments(call, match):
    with pytest.raises(InvalidInputError, match=match):
        call(K.window_groups(4, 4, 2))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(topk=2.0), "topk must be an integer in \\[1, 4\\]"),
        (dict(topk=True), "topk must be an integer in \\[1, 4\\]"),
        (dict(topk=5), "topk must be an integer in \\[1, 4\\]"),
        (dict(scale=None), "scale must be a finite real number"),
        (dict(groups=K.window_groups(4, 4, 2).float()), "integer \\[G, T\\] table"),
        (dict(groups=K.window_groups(4, 4, 2).flatten()), "integer \\[G, T\\] table"),
        (dict(groups=K.window_groups(4, 4, 2) + 10), "outside \\[-1, 16\\)"),
        (dict(q=torch.ones(1, 16, 8, dtype=torch.long)), "floating q and k"),
    ],
)
def test_region_routing_refuses_bad_arguments(change, match):
    args = dict(q=torch.randn(1, 16, 8), k=torch.randn(1, 16, 8), groups=K.window_groups(4, 4, 2), topk=2, scale=1.0)
    with pytest.raises(InvalidInputError, match=match):
        K.region_routing(**(args | change))
    expected = K.region_routing(**args)
    assert torch.equal(K.region_routing(**(args | dict(topk=torch.tensor(2), scale=torch.tensor(1.0)))), expected)


def test_region_routing_reads_a_table_back_once_and_sees_in_place_edits(monkeypatch):
    """The table's range is read back (a host sync on a GPU) once per table and version, not on every call."""
    from attnzoo.kernels import grouping

    reads = []
    read = grouping._read_range
    monkeypatch.setattr(grouping, "_read_range", lambda t: reads.append(1) or read(t))
    q, k, groups = torch.randn(1, 16, 8), torch.randn(1, 16, 8), K.window_groups(4, 4, 2)
    first = K.region_routing(q, k, groups, 2, 1.0)
    assert torch.equal(K.region_routing(q, k, groups, 2, 1.0), first) and len(reads) == 1
    groups[0, 0] = 16  # an in-place edit after the table was checked is still seen
    with pytest.raises(InvalidInputError, match="outside \\[-1, 16\\)"):
        K.region_routing(q, k, groups, 2, 1.0)
    with torch.inference_mode():  # inference tensors keep no version: read on every call
        table = K.window_groups(4, 4, 2)
        K.region_routing(q, k, table, 2, 1.0), K.region_routing(q, k, table, 2, 1.0)
    assert len(reads) == 4


def test_unknown_op_is_a_typed_error():
    with pytest.raises(UnknownNameError, match="unknown kernel op 'nope'"):
        K.available_backends("nope")


@pytest.mark.parity
def test_biformer_bra_op_parity(reference_dir, triton_device):
    """The official BRA module, recomposed from the kernel ops: same routing, same output."""
    from safetensors.torch import load_file

    folder = reference_path(reference_dir, "biformer_bra_op")
    cfg = json.loads(reference_path(folder, "config.json").read_text())
    kw = cfg["constructor_kwargs"]
    sd, inputs, expected = (
        {name: t.to(triton_device) for name, t in load_file(reference_path(folder, f"{n}.safetensors")).items()}
        for n in ("state_dict", "inputs", "outputs")
    )
    x = inputs["x"]
    B, Hm, Wm, C = x.shape
    qk, heads, n_win, topk = kw["qk_dim"], kw["num_heads"], kw["n_win"], kw["topk"]
    scale = kw["qk_scale"] or qk**-0.5
    qkv = torch.nn.functional.linear(x, sd["qkv.qkv.weight"], sd["qkv.qkv.bias"]).reshape(B, Hm * Wm, -1)
    q, k, v = qkv.split([qk, qk, C], dim=-1)
    groups = K.window_groups(Hm, Wm, (Hm // n_win, Wm // n_win), device=triton_device)
    route = K.region_routing(q, k, groups, topk, scale)
    assert torch.equal(route.long(), expected["r_idx"])
    split = lambda t: t.reshape(B, Hm * Wm, heads, -1)  # noqa: E731
    tol = cfg["suggested_tolerance"]
    for backend in ("torch", "flex", "triton"):
        with K.use_backend(backend), torch.no_grad():
            attn = K.grouped_attention(split(q), split(k), split(v), groups, route=route, scale=scale).reshape(
                B, Hm, Wm, C
            )
        lepe = torch.nn.functional.conv2d(
            v.reshape(B, Hm, Wm, C).permute(0, 3, 1, 2),
            sd["lepe.weight"],
            sd["lepe.bias"],
            padding=kw["side_dwconv"] // 2,
            groups=C,
        ).permute(0, 2, 3, 1)
        y = torch.nn.functional.linear(attn + lepe, sd["wo.weight"], sd["wo.bias"])
        torch.testing.assert_close(y, expected["y"], atol=tol["atol"], rtol=tol["rtol"])


@pytest.mark.parametrize("case", list(CASES))
def test_dense_formulation_equals_the_oracle(case):
    """The torch backend's dense-under-a-mask formulation is the same op as the oracle."""
    q, k, v, groups, route = make_case(**CASES[case])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense = T.grouped_attention_dense(*leaves, groups, groups, route, 0.3)
    ref, ref_grads = oracle_grads(q, k, v, groups, route, 0.3, torch.ones_like(dense))
    torch.testing.assert_close(dense.double(), ref, **FP32_TOL)
    for got, want in zip(torch.autograd.grad(dense.sum(), leaves), ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **FP32_TOL)


def test_dense_formulation_with_empty_rows():
    q, k, v, _, _ = make_case(B=1, Hm=4, Wm=4, topk=None)
    q_groups = torch.arange(16, dtype=torch.int32).view(2, 8)
    kv_groups = torch.tensor([[0, 1, 2, 3], [-1, -1, -1, -1]], dtype=torch.int32)
    route = torch.tensor([[[0], [1]]], dtype=torch.int32)
    dense = T.grouped_attention_dense(q, k, v, q_groups, kv_groups, route, 0.5)
    torch.testing.assert_close(dense, O.grouped_attention(q, k, v, q_groups, kv_groups, route, 0.5))
    assert (dense[:, 8:] == 0).all()


def test_torch_backend_picks_the_cheaper_exact_formulation(monkeypatch):
    calls = []
    for name in ("grouped_attention_gather", "grouped_attention_dense", "grouped_attention_partition"):
        original = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    q, k, v, groups, route = make_case(
        Hm=8, Wm=8, window=2, topk=8
    )  # 16 regions of 4 tokens, 8 routed: BiFormer stage 3
    K.grouped_attention(q, k, v, groups, route=route)
    q, k, v, groups, _ = make_case(topk=None)  # plain windows: a partition of the tokens
    K.grouped_attention(q, k, v, groups)
    q, k, v, groups, route = make_case(**CASES["odd_map_padded_windows_d24"])  # padded windows
    K.grouped_attention(q, k, v, groups, route=route)
    assert calls == ["grouped_attention_dense", "grouped_attention_partition", "grouped_attention_gather"]


@pytest.mark.parametrize("per_head", [False, True])
def test_partition_formulation_equals_the_oracle(per_head):
    q, k, v, groups, route = make_case(H=3, per_head=per_head, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    expected = O.grouped_attention(q, k, v, groups, groups, route, 0.3)
    ours = T.grouped_attention_partition(q, k, v, groups, groups, route, 0.3)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(
        torch.autograd.grad(ours.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))
    )
