"""Whole classifiers, forward, against their official-style attention and against timm baselines.

For each attnzoo model: the model as shipped (default kernel backend) and the same model, same
weights, with its attention op swapped for the official implementation's formulation (BiFormer:
the gather of routed K/V; Sparsifiner: dense logits, masked_fill, softmax; L²ViT and InLine:
their explicit matmuls), both measured in this run, outputs compared. timm's
swin_tiny_patch4_window7_224 and deit_small_patch16_224 are timed alongside.

    python benchmarks/classification_models.py                    # CPU, fp32, batch 8, 224 px
    python benchmarks/classification_models.py --models biformer_tiny --repeats 5
    python benchmarks/classification_models.py --device cuda --dtype bfloat16 --batch 128 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

import attnzoo  # noqa: F401  (registers the families with timm)

sys.path.insert(0, str(Path(__file__).parent))
from kernels import (  # noqa: E402  (op-level official baselines)
    backends_used,
    bra_gather_official,
    device_name,
    inline_official,
    l2vit_official,
)


class patched(contextlib.AbstractContextManager):  # noqa: N801  (reads like contextlib's helpers)
    """Swap ``module.name`` for ``fn`` while inside; reusable."""

    def __init__(self, module: str, name: str, fn: Callable):
        self.mod, self.name, self.fn = sys.modules[module], name, fn

    def __enter__(self) -> None:
        self.real = getattr(self.mod, self.name)
        setattr(self.mod, self.name, self.fn)

    def __exit__(self, *exc: object) -> None:
        setattr(self.mod, self.name, self.real)


def _bra_official(q, k, v, groups, *, route, scale):
    B, N, H, D = q.shape
    out = bra_gather_official(q, k, v, groups, route, scale)  # [B, H, G, T, D], region-major
    idx = groups.reshape(-1).long()
    result = q.new_empty(B, N, H, D)
    result[:, idx] = out.permute(0, 2, 3, 1, 4).reshape(B, -1, H, D)
    return result


def _masked_official(q, k, v, mask, *, scale):
    logits = (q @ k.transpose(-1, -2)) * scale
    return logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0) @ v


def _l2vit_official(q, k, v, *, temperature, denom_min, **_):
    return l2vit_official(q, k, v, temperature, denom_min)


def _inline_official(q, k, v, *, scale):
    return inline_official(q, k, v, scale)


# model -> (module holding the op, op name, official-style replacement)
OFFICIAL = {
    "biformer_tiny": ("attnzoo.vision.biformer", "grouped_attention", _bra_official),
    "l2vit_tiny": ("attnzoo.vision.l2vit", "l2vit_linear_attention", _l2vit_official),
    "sparsifiner_deit_small": ("attnzoo.vision.sparsifiner", "masked_attention", _masked_official),
    "inline_swin_tiny": ("attnzoo.vision.inline", "inline_attention", _inline_official),
    "inline_deit_tiny": ("attnzoo.vision.inline", "inline_attention", _inline_official),
}
BASELINES = ["swin_tiny_patch4_window7_224", "deit_small_patch16_224"]


def _once(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    y = model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, y


def timed_pair(
    model: torch.nn.Module,
    x: torch.Tensor,
    official: contextlib.AbstractContextManager,
    repeats: int,
    device: torch.device,
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Median times of the model as shipped and under ``official``, run alternately (so load drifts hit both)."""
    ours, base = [], []
    with torch.inference_mode():
        for r in range(repeats + 1):  # the first round warms up
            t, y = _once(model, x, device)
            with official:
                t_ref, y_ref = _once(model, x, device)
            if r:
                ours.append(t)
                base.append(t_ref)
    return statistics.median(ours), statistics.median(base), y, y_ref


def timed(model: torch.nn.Module, x: torch.Tensor, repeats: int, device: torch.device) -> float:
    with torch.inference_mode():
        _once(model, x, device)
        return statistics.median(_once(model, x, device)[0] for _ in range(repeats))


def prepared(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, nhwc: bool) -> torch.nn.Module:
    model = model.eval().to(device, dtype)
    return model.to(memory_format=torch.channels_last) if nhwc else model


def image_batch(batch: int, size: int, device: torch.device, dtype: torch.dtype, nhwc: bool) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if nhwc else x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(OFFICIAL))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument(
        "--channels-last", action="store_true", help="models and inputs in NHWC (the patch-embedding / conv layers)"
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(
        f"device={device_name(device)} dtype={args.dtype} batch={args.batch} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} torch={torch.__version__} timm={timm.__version__}"
        + (" channels_last" if args.channels_last else "")
    )
    print(f"{'model':<32} {'ms/batch':>9} {'img/s':>8} {'official ms':>12} {'speedup':>8} {'max |diff|':>10}")
    results = {}
    for name in args.models.split(","):
        if name not in timm.list_models(name):
            print(f"{name:<32} (not registered, skipped)")
            continue
        try:  # one model that fails (a backend, memory) says why; the others still run
            model = prepared(timm.create_model(name), device, dtype, args.channels_last)
            size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            x = image_batch(args.batch, size, device, dtype, args.channels_last)
            module, op, official = OFFICIAL[name]
            ours, base, y, y_ref = timed_pair(model, x, patched(module, op, official), args.repeats, device)
            diff = (y.float() - y_ref.float()).abs().max().item()
            with torch.inference_mode():
                used = backends_used(lambda: model(x))  # noqa: B023  (called at once)
        except Exception as err:
            print(f"model {name}: error {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[name] = base / ours
        print(
            f"{name:<32} {ours * 1e3:>9.1f} {args.batch / ours:>8.1f} {base * 1e3:>12.1f} {base / ours:>7.2f}x {diff:>10.2e}"
        )
        print(f"  {name} ran on backend {used}")
    if not args.no_baselines:
        for name in BASELINES:
            try:
                model = prepared(timm.create_model(name), device, dtype, args.channels_last)
                t = timed(model, image_batch(args.batch, 224, device, dtype, args.channels_last), args.repeats, device)
            except Exception as err:
                print(
                    f"model timm {name}: error {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                )
                continue
            print(f"{'timm ' + name:<32} {t * 1e3:>9.1f} {args.batch / t:>8.1f}")
    if "biformer_tiny" in results:
        print(f"biformer_tiny speedup vs gather reference: {results['biformer_tiny']:.2f}x")


if __name__ == "__main__":
    main()
