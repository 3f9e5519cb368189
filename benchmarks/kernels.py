"""Attention ops at the real model shapes: every available backend against the official-style
torch implementation (gather for BRA, masked dense softmax for Sparsifiner, explicit matmuls
for linear attention) and dense SDPA, all measured in the same run.

Prints per case the median time, the ratio to the official-style baseline, peak memory and,
on a GPU, effective GB/s (compulsory traffic: read q, k, v, write o) and % of HBM bandwidth.

    python benchmarks/kernels.py --quick          # CPU subset, under a minute
    python benchmarks/kernels.py --device cuda --dtype bfloat16 --backward --batch 128
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnzoo.kernels as K

HBM_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}


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


def sdpa_dense(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


# -- timing ---------------------------------------------------------------------------------

def measure(fn: Callable[[], torch.Tensor], device: str, backward: bool, inputs: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Median milliseconds and peak extra memory (MiB, GPU only) of ``fn`` (+ backward)."""
    def step():
        out = fn()
        if backward:
            out.float().square().mean().backward()
            for t in inputs:
                t.grad = None
    step()  # warm-up: compilation, caches
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return statistics.median(times), peak


def gpu_bandwidth() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tb for key, tb in HBM_TBPS.items() if key in name), None)


def run_case(title, variants, device, backward, inputs, repeats, traffic_bytes, rows):
    baseline_ms = None
    for name, fn in variants:
        try:
            ms, peak = measure(fn, device, backward, inputs, repeats)
        except Exception as err:  # a backend that cannot run this case says why and is skipped
            print(f"  {title:<34} {name:<22} skipped: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
            continue
        baseline_ms = baseline_ms or ms
        gbps = traffic_bytes / (ms * 1e-3) / 1e9
        hbm = gpu_bandwidth()
        extra = f" {gbps:7.1f} GB/s {100 * gbps / (hbm * 1e3):5.1f}% HBM" if device == "cuda" and hbm else ""
        mem = f" peak {peak:8.1f} MiB" if device == "cuda" else ""
        print(f"  {title:<34} {name:<22} {ms:9.3f} ms  x{baseline_ms / ms:6.2f} vs baseline{mem}{extra}")
        rows.append((title, name, ms, baseline_ms / ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU subset (BiFormer-T stages at 224, forward)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float16")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    batch = args.batch or (2 if args.quick else (128 if device == "cuda" else 8))
    repeats = args.repeats or (15 if args.quick else 10)
    backends = ["reference", "flex", "triton"] if device == "cuda" else ["reference"]
    torch.manual_seed(0)
    print(f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} torch={torch.__version__} "
          f"dtype={dtype} batch={batch} backward={args.backward} threads={torch.get_num_threads()}")
    try:
        import triton

        print(f"triton={triton.__version__}")
    except ImportError:
        pass
    rows: list = []
    elem = torch.finfo(dtype).bits // 8

    def tensors(*shape_list):
        return [torch.randn(*s, device=device, dtype=dtype, requires_grad=args.backward) for s in shape_list]

    # BiFormer-T: regions of a 7x7 grid, topk 1/4/16, heads 2/4/8, head dim 32, scale C^-0.5
    resolutions = (224,) if args.quick else (224, 448)
    for px in resolutions:
        for stage, (topk, heads) in enumerate(((1, 2), (4, 4), (16, 8))):
            side = px // 4 // 2**stage
            C = 64 * 2**stage
            N = side * side
            q, k, v = tensors(*[(batch, N, heads, C // heads)] * 3)
            groups = K.window_groups(side, side, side // 7, device=device)
            route = K.region_routing(q.detach().reshape(batch, N, C), k.detach().reshape(batch, N, C), groups, topk, C**-0.5)
            variants = [("official gather", lambda: bra_gather_official(q, k, v, groups, route, C**-0.5))]
            for backend in backends:
                variants.append((backend, lambda b=backend: _forced(b, lambda: K.grouped_attention(q, k, v, groups, route=route, scale=C**-0.5))))
            if not args.quick:
                qd, kd, vd = (t.transpose(1, 2) for t in (q, k, v))
                variants.append(("dense SDPA (all keys)", lambda: sdpa_dense(qd, kd, vd)))
            run_case(f"BRA biformer_tiny {px}px stage{stage + 1}", variants, device, args.backward, [q, k, v], repeats, 4 * q.numel() * elem, rows)

    if not args.quick:
        # L2ViT-T linear global attention: stages at 224 px, heads 3/6/12/24, head dim 32
        for stage, heads in enumerate((3, 6, 12, 24)):
            N = (56 // 2**stage) ** 2
            q, k, v = tensors(*[(batch, heads, N, 32)] * 3)
            tau = torch.full((heads,), 32**-0.5, device=device, dtype=dtype)
            variants = [("official matmuls", lambda: l2vit_official(q, k, v, tau.view(-1, 1, 1), 100.0))]
            for backend in (b for b in backends if b != "flex"):
                variants.append((backend, lambda b=backend: _forced(b, lambda: K.linear_attention(q, k, v, temperature=tau, denom_min=100.0))))
            run_case(f"L2ViT-T linear stage{stage + 1}", variants, device, args.backward, [q, k, v], repeats, 4 * q.numel() * elem, rows)
        # L2ViT-T local window attention 7x7 (identity routing)
        for stage, heads in enumerate((3, 6, 12)):
            side = 56 // 2**stage
            q, k, v = tensors(*[(batch, side * side, heads, 32)] * 3)
            groups = K.window_groups(side, side, 7, device=device)
            variants = [("official gather", lambda: bra_gather_official(q, k, v, groups, torch.arange(groups.shape[0], device=device).view(1, -1, 1).expand(batch, -1, 1), 32**-0.5))]
            for backend in backends:
                variants.append((backend, lambda b=backend: _forced(b, lambda: K.grouped_attention(q, k, v, groups))))
            run_case(f"L2ViT-T window stage{stage + 1}", variants, device, args.backward, [q, k, v], repeats, 4 * q.numel() * elem, rows)
        # Sparsifiner DeiT-S: N=197, 6 heads, head dim 64, 50 keys per row
        q, k, v = tensors(*[(batch, 6, 197, 64)] * 3)
        index = torch.rand(batch, 6, 197, 197, device=device).topk(50, dim=-1).indices.int()
        variants = [("official masked dense", lambda: sparsifiner_masked_dense(q, k, v, index, 0.125))]
        for backend in backends:
            variants.append((backend, lambda b=backend: _forced(b, lambda: K.topk_attention(q, k, v, index, scale=0.125))))
        mask = torch.zeros(*q.shape[:3], 197, dtype=torch.bool, device=device).scatter_(-1, index.long(), True)
        for backend in backends:
            variants.append((f"{backend} (bitmask)", lambda b=backend: _forced(b, lambda: K.masked_attention(q, k, v, mask, scale=0.125))))
        variants.append(("dense SDPA", lambda: sdpa_dense(q, k, v)))
        run_case("Sparsifiner DeiT-S top-50", variants, device, args.backward, [q, k, v], repeats, 4 * q.numel() * elem, rows)
        # LRGT: ViT-B/16 tokens of V views, 49 long-range groups of 4V tokens, 12 heads, head dim 64
        for views in (3, 8, 20):
            q, k, v = tensors(*[(max(1, batch // 16), views * 196, 12, 64)] * 3)
            groups = K.across_views(K.dilated_groups(14, 14, 7, device=device), views, 196)
            variants = [("official gather", lambda: bra_gather_official(q, k, v, groups, torch.arange(49, device=device).view(1, -1, 1).expand(q.shape[0], -1, 1), 0.125))]
            for backend in backends:
                variants.append((backend, lambda b=backend: _forced(b, lambda: K.grouped_attention(q, k, v, groups, scale=0.125))))
            run_case(f"LRGT {views} views", variants, device, args.backward, [q, k, v], repeats, 4 * q.numel() * elem, rows)

    bra = [r for r in rows if r[0].startswith("BRA") and r[1] != "official gather" and not r[1].startswith("dense")]
    best = {}
    for title, _, _, ratio in bra:
        best[title] = max(best.get(title, 0.0), ratio)
    speedup = math.exp(statistics.mean(math.log(x) for x in best.values())) if best else float("nan")
    print(f"BRA speedup vs gather reference: {speedup:.2f}x")


def _forced(backend: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with K.use_backend(backend):
        return fn()


if __name__ == "__main__":
    main()
