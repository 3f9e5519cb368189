"""LRGT encoder time, long-range grouping attention through ``attnzoo.kernels.grouped_attention``
against the official formulation (permute the tokens into their 49 groups, dense attention per
group, permute back), same weights, measured alternately in the same run, at 3, 8 and 20 views.

    python benchmarks/lrgt.py                           # CPU, fp32, batch 1, the full-size encoder
    python benchmarks/lrgt.py --device cuda --dtype bfloat16 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import attnzoo

sys.path.insert(0, str(Path(__file__).parent))
from classification_models import patched  # noqa: E402
from kernels import backends_used, device_name  # noqa: E402


def official_lga(q, k, v, groups, *, scale, **_):
    """The official code's LGA: gather each group's tokens (4 per view, all views) into one sequence,
    plain softmax attention inside it, and scatter back (groups partition the tokens)."""
    B, N, H, D = q.shape
    idx = groups.reshape(-1).long()
    G, T = groups.shape
    q, k, v = (t[:, idx].view(B, G, T, H, D).permute(0, 1, 3, 2, 4) for t in (q, k, v))  # [B, G, H, T, D]
    out = ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v
    result = torch.empty(B, N, H, D, dtype=out.dtype, device=out.device)
    result[:, idx] = out.permute(0, 1, 3, 2, 4).reshape(B, G * T, H, D)
    return result


def once(encoder, x, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    encoder(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", default="3,8,20")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    encoder = attnzoo.create_model("lrgt").encoder.eval().to(device, dtype)
    print(
        f"device={device_name(device)} dtype={args.dtype} batch={args.batch} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} torch={torch.__version__}"
    )
    print(f"{'views':>5} {'ours ms':>9} {'official ms':>12} {'speedup':>8} {'max |diff|':>10}")
    for views in (int(v) for v in args.views.split(",")):
        x = torch.randn(args.batch, views, 3, 224, 224, device=device, dtype=dtype)
        ours, base = [], []
        with torch.inference_mode():
            y, y_ref = encoder(x), None
            with patched("attnzoo.vision.lrgt", "grouped_attention", official_lga):
                y_ref = encoder(x)
            for _ in range(args.repeats):
                ours.append(once(encoder, x, device))
                with patched("attnzoo.vision.lrgt", "grouped_attention", official_lga):
                    base.append(once(encoder, x, device))
            used = backends_used(lambda: encoder(x))  # noqa: B023  (called at once)
        o, b = statistics.median(ours), statistics.median(base)
        print(
            f"{views:>5} {o * 1e3:>9.1f} {b * 1e3:>12.1f} {b / o:>7.2f}x {(y.float() - y_ref.float()).abs().max().item():>10.2e}"
        )
        print(f"      {views} views ran on backend {used}")


if __name__ == "__main__":
    main()
