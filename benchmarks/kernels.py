"""Attention ops at the real model shapes: every available backend against the official-style
torch implementation (gather for BRA, masked dense softmax for Sparsifiner, explicit matmuls
for L2ViT's and InLine's linear attention) and dense SDPA, all measured in the same run.

The variants of a case run interleaved, one call each per round (the first variant of a round
rotates), so that the load of a shared machine hits baseline and candidates alike; each ratio
is taken within a round and reported as the median over the rounds with its interquartile
range and min-max. Prints per case the median time, that ratio to the official-style baseline,
peak memory and, on a GPU, effective GB/s and % of HBM bandwidth from the compulsory traffic:
read q, k, v, write o forward; with ``--backward`` also read q, k, v, o, dO and write dQ, dK, dV
(12 q-sized tensors over the forward+backward time). Each op's summary line (the geometric mean over
its stages) prints as soon as its cases finish, so a run ended by a time limit keeps it.

    python benchmarks/kernels.py --quick          # CPU subset, under a minute
    python benchmarks/kernels.py --device cuda --dtype bfloat16 --backward --batch 128
    python benchmarks/kernels.py --device cuda --cases inline,bra --backends torch,triton
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

import attnzoo.kernels as K
from attnzoo.kernels import dispatch_counts, reset_dispatch_counts

HBM_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}
# The cases in the order they run; --quick runs only "bra" unless --cases says otherwise.
CASES = ("bra", "l2vit", "l2vit_window", "sparsifiner", "lrgt", "inline")
SUMMARY_NOTE = "geometric mean over the stages per round, each stage's backend the best by median"


# -- the official-style baselines ------------------------------------------------------------


def bra_gather_official(q, k, v, groups, route, scale):
    """BiFormer's legacy BRA: region-major permute, expand + gather of the routed K/V, dense softmax."""
    B, N, H, D = q.shape
    G, T = groups.shape
    topk = route.shape[-1]
    idx = groups.long()
    Q, Kr, Vr = (t[:, idx].permute(0, 3, 1, 2, 4) for t in (q, k, v))  # [B, H, G, T, D]
    sel = route.long()[:, None, :, :, None, None].expand(B, H, G, topk, T, D)
    Ks = torch.gather(Kr[:, :, None].expand(B, H, G, G, T, D), 3, sel).flatten(3, 4)
    Vs = torch.gather(Vr[:, :, None].expand(B, H, G, G, T, D), 3, sel).flatten(3, 4)
    attn = ((Q * scale) @ Ks.transpose(-1, -2)).softmax(-1)
    return attn @ Vs


def sparsifiner_masked_dense(q, k, v, index, scale):
    mask = torch.zeros(*q.shape[:3], k.shape[2], dtype=torch.bool, device=q.device).scatter_(-1, index.long(), True)
    logits = (q @ k.transpose(-1, -2)) * scale
    return logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0) @ v


def l2vit_official(q, k, v, tau, denom_min):
    q, k = F.relu(q), F.relu(k)
    kv = (k.transpose(-2, -1) @ v) * tau
    denom = (q @ k.sum(-2, keepdim=True).transpose(-2, -1)).clamp(min=denom_min)
    return (q @ kv) / denom


def inline_official(q, k, v, scale):
    """InLine's official formulation: the scaled ``K^T V`` state and the mean-key correction as explicit matmuls."""
    n = k.shape[-2]
    kv = (k.transpose(-2, -1) * (scale / n)) @ v
    return q @ kv + (1 - scale * (q @ k.mean(-2, keepdim=True).transpose(-2, -1))) * v.mean(-2, keepdim=True)


def device_name(device: str | torch.device) -> str:
    """The card's name on CUDA (``cuda`` alone does not say which card gave a number), else the device type."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def backends_used(run: Callable[[], Any]) -> str:
    """Which backend the default dispatch chose for each kernel op while ``run()`` ran: "op: backend xN"."""
    reset_dispatch_counts()
    run()
    used = dispatch_counts()
    return "; ".join(f"{op}: " + ", ".join(f"{b} x{n}" for b, n in by.items()) for op, by in used.items()) or "none"


def sdpa_dense(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


# -- timing ---------------------------------------------------------------------------------


def _step(fn: Callable[[], torch.Tensor], backward: bool, inputs: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        out = fn()
        if backward:
            out.float().square().mean().backward()
            for t in inputs:
                t.grad = None

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_interleaved(
    variants: list[tuple[str, Callable[[], torch.Tensor]]],
    device: str,
    backward: bool,
    inputs: list[torch.Tensor],
    repeats: int,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Milliseconds per round of every variant that runs (+ backward), and its peak extra memory
    (MiB, GPU only). A variant that fails its warm-up says why and is left out."""
    steps = []
    for name, fn in variants:
        step = _step(fn, backward, inputs)
        try:
            step()  # warm-up: compilation, caches
        except Exception as err:  # a backend that cannot run this case says why and is skipped
            print(f"    {name:<22} skipped: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
            continue
        steps.append((name, step))
    peaks = {}
    if device == "cuda":
        for name, step in steps:
            _sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            _sync(device)
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for round_ in range(repeats):
        first = round_ % max(len(steps), 1)
        for name, step in steps[first:] + steps[:first]:
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times, peaks


def spread(values: list[float]) -> str:
    """Median, interquartile range and min-max of ratios, as one printable string."""
    if len(values) < 2:
        return f"x{values[0]:6.2f}" if values else "n/a"
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")  # within min-max, unlike "exclusive"
    return f"x{statistics.median(values):6.2f} (IQR {q1:.2f}-{q3:.2f}, min-max {min(values):.2f}-{max(values):.2f})"


def gpu_bandwidth() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tb for key, tb in HBM_TBPS.items() if key in name), None)


def run_case(title, variants, device, backward, inputs, repeats, rows):
    """``variants[0]`` is the baseline; each other variant's ratio is baseline / variant time per round.
    ``inputs``: q, k, v (the compulsory traffic is counted in q-sized tensors)."""
    print(f"  {title}")
    times, peaks = measure_interleaved(variants, device, backward, inputs, repeats)
    baseline = variants[0][0]
    if baseline not in times:
        return
    hbm = gpu_bandwidth()
    tensors, which = (12, "fwd+bwd") if backward else (4, "fwd")
    traffic_bytes = tensors * inputs[0].numel() * inputs[0].element_size()
    for name, ms_list in times.items():
        ratios = [b / t for b, t in zip(times[baseline], ms_list, strict=True)]
        ms = statistics.median(ms_list)
        gbps = traffic_bytes / (ms * 1e-3) / 1e9
        extra = f" {gbps:7.1f} GB/s {100 * gbps / (hbm * 1e3):5.1f}% HBM ({which})" if device == "cuda" and hbm else ""
        mem = f" peak {peaks[name]:8.1f} MiB" if device == "cuda" else ""
        versus = "(baseline)" if name == baseline else f"{spread(ratios)} vs baseline"
        print(f"    {name:<22} {ms:9.3f} ms  {versus}{mem}{extra}")
        rows.append((title, name, ms_list, ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU subset (BiFormer-T stages at 224, forward)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of interleaved calls (default 15)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's); 1 steadies a shared machine"
    )
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated subset of {','.join(CASES)} (default: all; --quick: bra)"
    )
    parser.add_argument(
        "--resolutions",
        type=lambda text: tuple(int(px) for px in text.split(",")),
        default=None,
        help="BRA image sizes in px, comma-separated (default 224,448; --quick: 224)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated subset of torch,flex,triton (default: all on cuda, torch on cpu)",
    )
    args = parser.parse_args()
    cases = chosen(parser, "--cases", args.cases, CASES, ("bra",) if args.quick else CASES)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    batch = args.batch or (2 if args.quick else (128 if device == "cuda" else 8))
    repeats = args.repeats or 15
    default_backends = ("torch", "flex", "triton") if device == "cuda" else ("torch",)
    backends = chosen(parser, "--backends", args.backends, K.BACKEND_NAMES, default_backends)
    torch.manual_seed(0)
    print(
        f"device={device_name(device)} torch={torch.__version__} "
        f"dtype={dtype} batch={batch} backward={args.backward} threads={torch.get_num_threads()}"
    )
    try:
        import triton

        print(f"triton={triton.__version__}")
    except ImportError:
        pass
    rows: list[tuple[str, str, list[float], list[float]]] = []

    def tensors(*shape_list):
        return [torch.randn(*s, device=device, dtype=dtype, requires_grad=args.backward) for s in shape_list]

    # BiFormer-T: regions of a 7x7 grid, topk 1/4/16, heads 2/4/8, head dim 32, scale C^-0.5
    resolutions = args.resolutions or ((224,) if args.quick else (224, 448))
    for px in resolutions if "bra" in cases else ():
        for stage, (topk, heads) in enumerate(((1, 2), (4, 4), (16, 8))):
            side = px // 4 // 2**stage
            C = 64 * 2**stage
            N = side * side
            q, k, v = tensors(*[(batch, N, heads, C // heads)] * 3)
            groups = K.window_groups(side, side, side // 7, device=device)
            route = K.region_routing(
                q.detach().reshape(batch, N, C), k.detach().reshape(batch, N, C), groups, topk, C**-0.5
            )
            variants = [
                ("official gather", partial(bra_gather_official, q, k, v, groups, route, C**-0.5)),
                *backend_variants(backends, K.grouped_attention, q, k, v, groups, route=route, scale=C**-0.5),
            ]
            if not args.quick:
                variants.append(("dense SDPA (all keys)", partial(sdpa_dense, *(t.transpose(1, 2) for t in (q, k, v)))))
            run_case(
                f"BRA biformer_tiny {px}px stage{stage + 1}",
                variants,
                device,
                args.backward,
                [q, k, v],
                repeats,
                rows,
            )

    if "bra" in cases:
        print(f"BRA speedup vs official gather: {best_per_round(rows, 'BRA')} ({SUMMARY_NOTE})", flush=True)

    if "l2vit" in cases:
        # L2ViT-T linear global attention: stages at 224 px, heads 3/6/12/24, head dim 32
        for stage, heads in enumerate((3, 6, 12, 24)):
            N = (56 // 2**stage) ** 2
            q, k, v = tensors(*[(batch, heads, N, 32)] * 3)
            tau = torch.full((heads,), 32**-0.5, device=device, dtype=dtype)
            variants = [
                ("official matmuls", partial(l2vit_official, q, k, v, tau.view(-1, 1, 1), 100.0)),
                *backend_variants(
                    [b for b in backends if b != "flex"],
                    K.l2vit_linear_attention,
                    q,
                    k,
                    v,
                    temperature=tau,
                    denom_min=100.0,
                ),
            ]
            run_case(
                f"L2ViT-T linear stage{stage + 1}",
                variants,
                device,
                args.backward,
                [q, k, v],
                repeats,
                rows,
            )
    if "l2vit_window" in cases:
        # L2ViT-T local window attention 7x7 (identity routing)
        for stage, heads in enumerate((3, 6, 12)):
            side = 56 // 2**stage
            q, k, v = tensors(*[(batch, side * side, heads, 32)] * 3)
            groups = K.window_groups(side, side, 7, device=device)
            identity = torch.arange(groups.shape[0], device=device).view(1, -1, 1).expand(batch, -1, 1)
            variants = [
                ("official gather", partial(bra_gather_official, q, k, v, groups, identity, 32**-0.5)),
                *backend_variants(backends, K.grouped_attention, q, k, v, groups),
            ]
            run_case(
                f"L2ViT-T window stage{stage + 1}",
                variants,
                device,
                args.backward,
                [q, k, v],
                repeats,
                rows,
            )
    if "sparsifiner" in cases:
        # Sparsifiner DeiT-S: N=197, 6 heads, head dim 64, 50 keys per row
        q, k, v = tensors(*[(batch, 6, 197, 64)] * 3)
        index = torch.rand(batch, 6, 197, 197, device=device).topk(50, dim=-1).indices.int()
        mask = torch.zeros(*q.shape[:3], 197, dtype=torch.bool, device=device).scatter_(-1, index.long(), True)
        variants = [
            ("official masked dense", partial(sparsifiner_masked_dense, q, k, v, index, 0.125)),
            *backend_variants(backends, K.masked_attention, q, k, v, mask, scale=0.125),
            ("dense SDPA", partial(sdpa_dense, q, k, v)),
        ]
        run_case("Sparsifiner DeiT-S top-50", variants, device, args.backward, [q, k, v], repeats, rows)
    if "lrgt" in cases:
        # LRGT: ViT-B/16 tokens of V views, 49 long-range groups of 4V tokens, 12 heads, head dim 64
        for views in (3, 8, 20):
            q, k, v = tensors(*[(max(1, batch // 16), views * 196, 12, 64)] * 3)
            groups = K.across_views(K.dilated_groups(14, 14, 7, device=device), views, 196)
            identity = torch.arange(49, device=device).view(1, -1, 1).expand(q.shape[0], -1, 1)
            variants = [
                ("official gather", partial(bra_gather_official, q, k, v, groups, identity, 0.125)),
                *backend_variants(backends, K.grouped_attention, q, k, v, groups, scale=0.125),
            ]
            run_case(f"LRGT {views} views", variants, device, args.backward, [q, k, v], repeats, rows)

    if "inline" in cases:
        # InLine-Swin-T: its InLine stages at 224 px are global (3136/784/196 tokens), heads 3/6/12, head dim 32
        for stage, heads in enumerate((3, 6, 12)):
            N = (56 // 2**stage) ** 2
            q, k, v = tensors(*[(batch, heads, N, 32)] * 3)
            variants = [
                ("official matmuls", partial(inline_official, q, k, v, 32**-0.5)),
                *backend_variants([b for b in backends if b != "flex"], K.inline_attention, q, k, v, scale=32**-0.5),
            ]
            if not args.quick:
                variants.append(("dense SDPA (softmax)", partial(sdpa_dense, q, k, v)))
            run_case(
                f"InLine-Swin-T stage{stage + 1}",
                variants,
                device,
                args.backward,
                [q, k, v],
                repeats,
                rows,
            )
        print(f"InLine speedup vs official matmuls: {best_per_round(rows, 'InLine')} ({SUMMARY_NOTE})", flush=True)


def chosen(
    parser: argparse.ArgumentParser, flag: str, value: str | None, names: tuple[str, ...], default: tuple[str, ...]
) -> tuple[str, ...]:
    """The names a comma-separated ``flag`` picks (``default`` when not given); unknown ones are a usage error."""
    if value is None:
        return default
    picked = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in picked if name not in names]
    if unknown or not picked:
        parser.error(f"{flag}: unknown {unknown or value!r}; choose from {','.join(names)}")
    return picked


def best_per_round(rows: list[tuple[str, str, list[float], list[float]]], prefix: str) -> str:
    """Each case titled ``prefix...`` contributes its best backend, chosen by median time (a per-round maximum
    over backends would pick noise), with that backend's per-round ratios; the geometric mean over the cases
    per round, and which backend each case used."""
    best: dict[str, tuple[float, str, list[float]]] = {}
    for title, name, ms_list, ratios in rows:
        if title.startswith(prefix) and not name.startswith(("official", "dense")):
            ms = statistics.median(ms_list)
            if title not in best or ms < best[title][0]:
                best[title] = (ms, name, ratios)
    if not best:
        return "n/a (no backend ran)"
    per_round = [
        math.exp(statistics.mean(math.log(x) for x in stages))
        for stages in zip(*(ratios for _, _, ratios in best.values()), strict=True)
    ]
    return f"{spread(per_round)} [best: {', '.join(name for _, name, _ in best.values())}]"


def backend_variants(
    backends: Sequence[str], op: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """One variant per backend: ``op(*args, **kwargs)`` forced onto it."""
    return [(backend, partial(_forced, backend, partial(op, *args, **kwargs))) for backend in backends]


def _forced(backend: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with K.use_backend(backend):
        return fn()


if __name__ == "__main__":
    main()
