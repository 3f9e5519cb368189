"""NevaClip scanpaths per second: N images optimised together in one batch against the same N
images one at a time (goal >= 2x), with the same per-image seeds; the scanpaths must be identical.

Model: a real-size open_clip RN50 vision tower with random weights (nothing can be downloaded
here), made input-sensitive like the parity fixture (He-init convs, BatchNorm statistics
re-estimated on the benchmark images) so the search's decisions are not rounding noise. Images:
scikit-image's sample photographs through open_clip's eval transform; targets: random embeddings.

Timed, in alternating rounds, on the same machine:
- ``official-style``: one image at a time, CLIP parameters left trainable (``requires_grad=True``)
  as the official code leaves them;
- ``one-at-a-time``: one image at a time, parameters frozen (attnzoo's default);
- ``batched``: all images in one ``predict`` call (``rng="per_sample"``);
- ``batched+channels_last`` (``--channels-last``): the same with NHWC convolutions; its scanpaths
  are compared too (a different conv algorithm may round differently).

Then a roofline check of what batching can gain at all on this machine: the FLOPs of one search
iteration (tower forward + gradient to the input, counted by ``torch.utils.flop_counter``), the
throughput one image at a time reaches with them, and the device's sustained matmul throughput (the
best of a few large square products; float32 with the same threads on the CPU, float16 on CUDA,
where the search autocasts to float16). Batching only helps where one image leaves the device idle,
so peak / one-at-a-time throughput bounds the ratio.

    python benchmarks/scanpath.py --quick           # 2 fixations x 3 iterations
    python benchmarks/scanpath.py                   # the paper's 10 x 20 (long on a CPU)
    python benchmarks/scanpath.py --threads 1 --channels-last
    python benchmarks/scanpath.py --device cuda --fixations 5 --iterations 10 --channels-last
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
from torch import nn


def sensitive_rn50(images: torch.Tensor, seed: int = 0) -> nn.Module:
    """open_clip RN50 visual tower, random weights, He-init convs and BN stats calibrated on ``images``."""
    import open_clip

    torch.manual_seed(seed)
    visual = open_clip.create_model("RN50", pretrained=None).visual
    gen = torch.Generator().manual_seed(seed + 11)
    for module in visual.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = torch.randn(module.weight.shape, generator=gen) * math.sqrt(
                2.0 / module.weight[0].numel()
            )
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    visual.train()
    with torch.no_grad():
        from attnzoo.multimodal.nevaclip import gaussian_blur_difference

        visual(torch.cat([images, images + gaussian_blur_difference(images)]))
    return visual.eval()


def sample_images(count: int) -> list:
    from skimage import data

    names = [
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "motorcycle_left",
        "retina",
    ]
    pictures = []
    for i in range(count):
        loader = getattr(data, names[i % len(names)], data.astronaut)
        try:
            pictures.append(loader())
        except Exception:  # noqa: BLE001  a sample that needs pooch/network: fall back to a bundled one
            pictures.append(data.astronaut())
    return pictures


def iteration_flops(visual: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one search iteration for one image: the tower's forward and the gradient to its input."""
    from torch.utils.flop_counter import FlopCounterMode

    image = x[:1].clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        output = visual(image)
        (output[0] if isinstance(output, (tuple, list)) else output).square().sum().backward()
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    """Wait for the queued CUDA work, so a clock read after it times the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Sustained matmul FLOP/s on ``device`` (best of a few large square products; the current threads on a CPU)."""
    best = 0.0
    sizes = (1024, 2048, 3072) if device.type == "cpu" else (4096, 8192)
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        sync(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(sizes):
            torch.mm(a, b)
            count += 1
        sync(device)
        best = max(best, count * 2 * n**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--fixations", type=int, default=10)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="2 fixations x 3 iterations")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channels-last", action="store_true", help="also time batched NHWC")
    p.add_argument("--skip-official-style", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (there the search autocasts to float16)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.fixations, args.iterations = 2, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    from attnzoo.multimodal.nevaclip import NevaClip, preprocess_images

    x, _ = preprocess_images(sample_images(args.images))
    visual = sensitive_rn50(x)
    targets = torch.randn(args.images, visual.output_dim, generator=torch.Generator().manual_seed(1))
    seeds = list(range(100, 100 + args.images))
    kw = {"fixations": args.fixations, "iterations": args.iterations}
    frozen = NevaClip(visual=visual, device=device)  # moves the tower (shared with official_style) there

    def one_at_a_time(model: NevaClip) -> torch.Tensor:
        return torch.cat(
            [model.predict(x[i : i + 1], targets[i], seed=seeds[i], **kw).positions for i in range(args.images)]
        )

    def official_style() -> torch.Tensor:
        visual.requires_grad_(True)
        try:
            return one_at_a_time(frozen)
        finally:
            visual.requires_grad_(False)

    runs = {
        "one-at-a-time": lambda: one_at_a_time(frozen),
        "batched": lambda: frozen.predict(x, targets, seed=seeds, **kw).positions,
    }
    if not args.skip_official_style:
        runs = {"official-style": official_style, **runs}
    if args.channels_last:
        nhwc = NevaClip(visual=copy.deepcopy(visual), channels_last=True, device=device)
        runs["batched+channels_last"] = lambda: nhwc.predict(x, targets, seed=seeds, **kw).positions
    print(
        f"NevaClip RN50 (random, input-sensitive), {args.images} images, {args.fixations} fixations x {args.iterations} "
        f"iterations, CPU threads {torch.get_num_threads()}, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )
    frozen.predict(x[:1], targets[0], fixations=1, iterations=1)  # warm-up (oneDNN primitives)
    if device.type == "cuda":  # and the batch's shapes (CUDA context, cuDNN and autocast caches)
        for model in [frozen] + ([nhwc] if args.channels_last else []):
            model.predict(x, targets, seed=seeds, fixations=1, iterations=1)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            sync(device)
            start = time.perf_counter()
            outputs[name] = fn()
            sync(device)
            rates[name].append(args.images / (time.perf_counter() - start))
    reference = outputs["one-at-a-time"]
    for name, values in rates.items():
        same = torch.equal(outputs[name], reference)
        print(
            f"{name:>24}: {statistics.median(values):8.4f} scanpaths/s   scanpaths identical to one-at-a-time: {same}"
        )
    base = statistics.median(rates["one-at-a-time"])
    for name, values in rates.items():
        if name != "one-at-a-time":
            print(f"ratio {name} / one-at-a-time: {statistics.median(values) / base:.2f}x")
    if "official-style" in rates:
        print(
            f"ratio batched / official-style: {statistics.median(rates['batched']) / statistics.median(rates['official-style']):.2f}x"
        )
    flops = iteration_flops(visual, x.to(device)) * args.fixations * args.iterations  # per scanpath
    peak_dtype = torch.float16 if device.type == "cuda" else torch.float32  # what the search computes in
    peak = matmul_peak(device, peak_dtype)
    achieved = {name: statistics.median(values) * flops for name, values in rates.items()}
    print(
        f"roofline: {flops / 1e9:.1f} GFLOP per scanpath (tower forward + input gradient); this machine's "
        f"{str(peak_dtype).removeprefix('torch.')} matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    for name, value in achieved.items():
        print(f"{name:>24}: {value / 1e9:6.1f} GFLOP/s in the tower = {value / peak:.0%} of the matmul peak")
    print(
        f"so batching can gain at most about {peak / achieved['one-at-a-time']:.2f}x over one-at-a-time on this machine"
    )
    if not torch.equal(outputs["batched"], reference):
        raise SystemExit("batched scanpaths differ from one-at-a-time")


if __name__ == "__main__":
    main()
