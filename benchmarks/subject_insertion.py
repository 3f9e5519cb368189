"""In-Context Brush's edited attention against the stock FLUX attention, at FLUX's full token count.

One double-stream attention call of FLUX.1-Fill on the official 768x1536 vertical diptych: 512 text
tokens + 2 x 2304 image tokens = 5120 tokens, 24 heads x 128, random q/k/v. Measured in the same run:

* ``stock``: fused SDPA, what diffusers' ``FluxAttnProcessor`` runs;
* ``boosted``: ``attnzoo.kernels.boosted_attention`` with In-Context Brush's edit (query rows boosted by
  0.3 on the demo image and on the text) and the head scores (query rows' mass on the text);
* ``official`` (``--official``): the official op's explicit softmax (all heads' 5120^2 probabilities).

Time: median over ``--repeats`` alternating calls. Peak memory: what a call allocates above its inputs,
each variant in a fresh process (CPU: the resident-set high-water mark, reset before the call, with glibc
returning large blocks to the system; GPU: ``torch.cuda.max_memory_allocated``). Goals: peak memory <=
1.2x stock; time <= 1.5x stock on a GPU.

    python benchmarks/subject_insertion.py                       # CPU, fp32, full size
    python benchmarks/subject_insertion.py --scale 0.5           # fewer tokens (a quarter of the work)
    python benchmarks/subject_insertion.py --device cuda --dtype bfloat16 --official
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("stock", "boosted", "official")


def sizes(args: argparse.Namespace) -> tuple[int, int]:
    """(text tokens, image tokens per panel) at ``--scale`` of the token count."""
    panel = max(1, round(args.panel_tokens * args.scale))
    return max(1, round(args.text * args.scale)), panel


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    text, panel = sizes(args)
    S = text + 2 * panel
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    return tuple(
        torch.randn(args.batch, S, args.heads, args.head_dim, generator=g).to(args.device, dtype) for _ in range(3)
    )


def run(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int, panel: int) -> torch.Tensor:
    """One attention call on ``[B, S, H, D]`` inputs; the output ``[B, S, H, D]`` (a view)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    if variant == "stock":
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2)
    query, demo, txt = slice(text + panel, text + 2 * panel), slice(text, text + panel), slice(0, text)
    if variant == "boosted":
        from attnzoo.kernels import boosted_attention

        found = boosted_attention(q, k, v, [(query, demo, 0.3), (query, txt, 0.3)], mass=(query, txt))
        return found.out
    probs = torch.softmax((qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5, dim=-1)
    out = probs @ vh
    out[:, :, query] += 0.3 * probs[:, :, query, demo] @ vh[:, :, demo] + 0.3 * probs[:, :, query, txt] @ vh[:, :, txt]
    probs[:, :, query, txt].sum((-1, -2))  # the head scores
    return out.transpose(1, 2)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(args: argparse.Namespace) -> None:
    """(In a fresh process.) Bytes a call allocates above its inputs; printed as JSON."""
    text, panel = sizes(args)
    q, k, v = make_inputs(args)
    with torch.no_grad():
        run(args.measure_memory, *(t[:, :8] for t in (q, k, v)), 0, 4)  # load the kernels and libraries first
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = run(args.measure_memory, q, k, v, text, panel)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark to the current RSS
                fh.write("5")
            base = rss_kib("VmRSS")
            out = run(args.measure_memory, q, k, v, text, panel)
            peak = (rss_kib("VmHWM") - base) * 1024
    print(
        json.dumps(
            {"variant": args.measure_memory, "peak_bytes": int(peak), "output_bytes": out.numel() * out.element_size()}
        )
    )


def peak_memory(args: argparse.Namespace, variant: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    argv = [sys.executable, __file__, "--measure-memory", variant, *sys.argv[1:]]
    found = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(found.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--text", type=int, default=512)
    parser.add_argument("--panel-tokens", type=int, default=2304, help="image tokens per panel (48x48 at 768 px)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the token count")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--official", action="store_true", help="also the explicit-softmax official op")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--measure-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory(args)
        return
    variants = [v for v in VARIANTS if v != "official" or args.official]
    text, panel = sizes(args)
    q, k, v = make_inputs(args)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        reference = run("stock", q, k, v, text, panel)
        ours = run("boosted", q, k, v, text, panel)
        plain = float((ours - reference).abs().max())
        for _ in range(args.repeats):
            for name in variants:
                sync()
                start = time.perf_counter()
                run(name, q, k, v, text, panel)
                sync()
                times[name].append(time.perf_counter() - start)
    peaks = {name: peak_memory(args, name) for name in variants}
    S = text + 2 * panel
    print(
        f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}, {args.dtype}, batch {args.batch}, {args.heads} heads x {args.head_dim}, "
        f"{S} tokens ({text} text + 2 x {panel} image), median of {args.repeats}"
    )
    print(f"max |boosted - stock| = {plain:.3g} (the edit's effect; nonzero by design)")
    base_time, base_peak = statistics.median(times["stock"]), peaks["stock"]
    print(f"{'variant':<10} {'ms':>10} {'time ratio':>11} {'peak MiB':>10} {'memory ratio':>13}")
    for name in variants:
        t = statistics.median(times[name])
        print(
            f"{name:<10} {t * 1e3:>10.1f} {t / base_time:>10.2f}x {peaks[name] / 2**20:>10.1f} {peaks[name] / base_peak:>12.2f}x"
        )


if __name__ == "__main__":
    main()
