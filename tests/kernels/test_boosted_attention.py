"""boosted_attention (In-Context Brush's and Diptych Prompting's attention edit): both torch formulations
(the log-sum-exp split and the query-chunked one) equal the oracle in forward (fp32, fp16) and the chunked
one in backward; plain SDPA when nothing is boosted; typed errors."""

import importlib

import pytest
import torch

import attnzoo.kernels as K
from attnzoo.errors import InvalidInputError
from attnzoo.kernels import oracle as O
from tests.kernels.oracle_check import assert_matches_oracle, tolerance

BA = importlib.import_module("attnzoo.kernels.boosted_attention")  # the module (its op shadows it in the package)


def qkv(B=2, N=40, H=3, D=16, Nk=None, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g)
    k, v = (torch.randn(B, Nk or N, H, D, generator=g) for _ in range(2))
    return tuple(t.to(device, dtype) for t in (q, k, v))


def mask(n, idx):
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m


def icb_case(N=40, text=8):
    """[text | demo | query] in one sequence, as In-Context Brush's vertical diptych (consecutive sets)."""
    half = (N - text) // 2
    text_m, demo, query = mask(N, slice(0, text)), mask(N, slice(text, text + half)), mask(N, slice(text + half, N))
    return [(query, demo, 0.3), (query, text_m, 0.3)], (query, text_m)


def diptych_case(N=40, text=8, w=8):
    """Image tokens row-major over (h, w) after the text: right-panel rows boosted on left-panel keys (strided)."""
    cols = torch.arange(N - text) % w
    left = torch.cat([torch.zeros(text, dtype=torch.bool), cols < w // 2])
    right = torch.cat([torch.zeros(text, dtype=torch.bool), cols >= w // 2])
    return [(right, left, 0.5)], None


def overlapping_case(N=40, Nk=None):
    Nk = Nk or N
    g = torch.Generator().manual_seed(7)
    r1, r2 = torch.rand(N, generator=g) < 0.5, torch.rand(N, generator=g) < 0.3
    c1, c2 = torch.rand(Nk, generator=g) < 0.4, torch.rand(Nk, generator=g) < 0.6
    return [(r1, c1, 0.7), (r2, c2, -0.2), (r1, c1, 0.1)], (r2, c1)


CASES = {
    "icb": (icb_case, {}),
    "diptych_strided": (diptych_case, {}),
    "overlapping_random": (overlapping_case, {}),
    "cross_nk": (lambda: overlapping_case(30, 45), dict(N=30, Nk=45)),
}


def run_op(q, k, v, boosts, mass):
    found = K.boosted_attention(q, k, v, boosts, mass=mass)
    return found.out, found.mass


def run_oracle(q, k, v, boosts, mass):
    return O.boosted_attention(q, k, v, boosts, mass, q.shape[-1] ** -0.5)


@pytest.fixture(params=["split", "chunked"])
def formulation(request, monkeypatch):
    """Force one of the torch backend's two formulations (chunks of a few rows, so several are taken)."""
    monkeypatch.setattr(BA, "CHUNK_ELEMENTS", 2 * 3 * 45 * 7)
    monkeypatch.setattr(BA, "BLOCK_ELEMENTS", 2 * 20 * 16)
    if request.param == "chunked":
        monkeypatch.setattr(BA, "lse_sdpa_unavailable", lambda q: "forced off by the test")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_oracle(case, dtype, formulation):
    make, shape = CASES[case]
    boosts, mass = make()
    q, k, v = qkv(dtype=dtype, **shape)
    with torch.no_grad():
        out, got_mass = run_op(q, k, v, boosts, mass)
    ref, ref_mass = run_oracle(q.double(), k.double(), v.double(), boosts, mass)
    tol = tolerance(dtype, fp16=3e-3)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, **tol)
    if mass is None:
        assert got_mass is None
    else:
        torch.testing.assert_close(got_mass.double(), ref_mass, **tol)


@pytest.mark.parametrize("case", ["icb", "overlapping_random", "cross_nk"])
def test_backward_matches_oracle(case, monkeypatch):
    """With gradients the chunked formulation runs (each chunk recomputed in backward)."""
    monkeypatch.setattr(BA, "CHUNK_ELEMENTS", 2 * 3 * 45 * 7)
    make, shape = CASES[case]
    boosts, mass = make()

    def flat(fn):
        def joined(q, k, v):
            out, m = fn(q, k, v, boosts, mass)
            return torch.cat([out.flatten(), m.flatten().to(out.dtype)])

        return joined

    assert_matches_oracle("torch", flat(run_op), flat(run_oracle), qkv(**shape), tolerance(torch.float32, fp16=0))


def test_formulations_agree_on_a_large_call():
    """The split formulation (fused kernels + log-sum-exp) equals the chunked one at FLUX-like proportions."""
    boosts, mass = icb_case(N=600, text=88)
    q, k, v = qkv(B=1, N=600, H=4, D=32, seed=3)
    with torch.no_grad():
        split = BA.split_formulation(
            *(t.transpose(1, 2) for t in (q, k, v)), tuple(_checked(boosts, 600)), _checked_mass(mass, 600), 32**-0.5
        )
        chunked = BA.chunked_formulation(
            *(t.transpose(1, 2) for t in (q, k, v)), tuple(_checked(boosts, 600)), _checked_mass(mass, 600), 32**-0.5
        )
    torch.testing.assert_close(split[0], chunked[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(split[1], chunked[1], atol=2e-6, rtol=1e-5)


def _checked(boosts, n):
    return [
        BA.Boost(BA.as_token_set(r, n, "r", torch.device("cpu")), BA.as_token_set(c, n, "c", torch.device("cpu")), a)
        for r, c, a in boosts
    ]


def _checked_mass(mass, n):
    return tuple(BA.as_token_set(t, n, "m", torch.device("cpu")) for t in mass)


def test_nothing_boosted_is_plain_sdpa():
    q, k, v = qkv()
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    found = K.boosted_attention(q, k, v)
    assert found.mass is None
    assert torch.equal(found.out, sdpa)
    zero = K.boosted_attention(q, k, v, [(slice(0, 10), slice(0, 10), 0.0)])  # amount 0 and empty sets drop out
    empty = K.boosted_attention(q, k, v, [(slice(5, 5), slice(0, 10), 1.0)])
    assert torch.equal(zero.out, sdpa) and torch.equal(empty.out, sdpa)


def test_token_set_forms_agree():
    """A bool mask, sorted indices and a slice of the same tokens give the same result."""
    q, k, v = qkv()
    rows, keys = torch.arange(20, 40), torch.tensor([1, 3, 4, 9, 30])
    forms = [
        ([(mask(40, rows), mask(40, keys), 0.4)], (mask(40, rows), mask(40, keys))),
        ([(rows, keys, 0.4)], (rows, keys)),
        ([(slice(20, 40), keys, 0.4)], (slice(20, None), keys)),
    ]
    results = [K.boosted_attention(q, k, v, b, mass=m) for b, m in forms]
    for other in results[1:]:
        torch.testing.assert_close(other.out, results[0].out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(other.mass, results[0].mass, atol=1e-6, rtol=1e-6)


def test_mass_of_all_rows_on_all_keys_is_the_row_count():
    q, k, v = qkv(N=12)
    found = K.boosted_attention(q, k, v, mass=(slice(0, 12), slice(0, 12)))
    torch.testing.assert_close(found.mass, torch.full((2, 3), 12.0), atol=1e-5, rtol=0)


def test_chunks_stay_bounded(monkeypatch):
    """The chunked formulation never builds more than CHUNK_ELEMENTS probabilities at once."""
    seen = []
    real_softmax = torch.softmax

    def spy(x, dim, *a, **kw):
        seen.append(x.numel())
        return real_softmax(x, dim, *a, **kw)

    monkeypatch.setattr(BA, "CHUNK_ELEMENTS", 2 * 3 * 40 * 5)
    monkeypatch.setattr(BA, "lse_sdpa_unavailable", lambda q: "forced off")
    monkeypatch.setattr(BA.torch, "softmax", spy)
    boosts, mass = icb_case()
    K.boosted_attention(*qkv(), boosts, mass=mass)
    assert len(seen) == 8 and max(seen) <= 2 * 3 * 40 * 5


def test_split_formulation_never_forms_probabilities(monkeypatch):
    """With the fused log-sum-exp kernels no explicit softmax runs at all."""
    monkeypatch.setattr(BA.torch, "softmax", lambda *a, **k: pytest.fail("explicit softmax in the split formulation"))
    boosts, mass = icb_case()
    with torch.no_grad():
        K.boosted_attention(*qkv(), boosts, mass=mass)


def test_bad_input_is_refused():
    q, k, v = qkv()
    with pytest.raises(InvalidInputError, match="mask has 39 entries"):
        K.boosted_attention(q, k, v, [(torch.ones(39, dtype=torch.bool), slice(0, 4), 0.3)])
    with pytest.raises(InvalidInputError, match="must lie in"):
        K.boosted_attention(q, k, v, [(torch.tensor([0, 40]), slice(0, 4), 0.3)])
    with pytest.raises(InvalidInputError, match="sorted and unique"):
        K.boosted_attention(q, k, v, [(torch.tensor([3, 1]), slice(0, 4), 0.3)])
    with pytest.raises(InvalidInputError, match="finite"):
        K.boosted_attention(q, k, v, [(slice(0, 4), slice(0, 4), float("nan"))])
    with pytest.raises(InvalidInputError, match=r"\(rows, keys, amount\)"):
        K.boosted_attention(q, k, v, [(slice(0, 4), 0.3)])
    with pytest.raises(InvalidInputError, match="k and v must be"):
        K.boosted_attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(InvalidInputError, match="step 1"):
        K.boosted_attention(q, k, v, mass=(slice(0, 10, 2), slice(0, 4)))


@pytest.mark.gpu
def test_split_formulation_on_cuda_matches_oracle():
    """The CUDA flash (fp16/bf16) and memory-efficient (fp32) kernels with the log-sum-exp."""
    boosts, mass = icb_case(N=128, text=32)
    for dtype, tol in ((torch.float32, dict(atol=1e-4, rtol=1e-3)), (torch.bfloat16, dict(atol=3e-2, rtol=3e-2))):
        q, k, v = qkv(N=128, D=64, dtype=dtype, device="cuda")
        with torch.no_grad():
            out, got = run_op(q, k, v, [(r.cuda(), c.cuda(), a) for r, c, a in boosts], tuple(t.cuda() for t in mass))
        ref, ref_mass = run_oracle(*(t.double().cpu() for t in (q, k, v)), boosts, mass)
        torch.testing.assert_close(out.double().cpu(), ref, **tol)
        torch.testing.assert_close(got.double().cpu(), ref_mass, **tol)
