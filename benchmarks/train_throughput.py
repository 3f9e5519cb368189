"""Training step throughput: attnzoo's engine against a plain hand-written torch loop, same model,
data, batch, optimizer and mixed precision, measured alternately in the same run (goal: engine >= 0.95x).

    python benchmarks/train_throughput.py                       # CPU, a reduced biformer_tiny, batch 16
    python benchmarks/train_throughput.py --model resnet18 --device cuda --batch 128 --images 2048
    python benchmarks/train_throughput.py --device cuda --batch 128 --images 1024 --amp bf16 --channels-last

On the CPU ``biformer_tiny`` is shrunk (``REDUCED``) so a run takes minutes; on a GPU it is the real model.

Only the steps are timed, the same way on both sides: a clock read (after a device sync) as each step's
loss starts, from the second step (the first is warm-up: kernels compile, allocator grows) to the last
step's start, so the engine's end-of-epoch checkpoint (~145 MiB, fsynced), its setup and the loaders'
start are left out. An epoch therefore needs at least three steps (``--images`` >= 3 x ``--batch``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import attnzoo
from attnzoo.training import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from kernels import device_name  # noqa: E402

REDUCED = {
    "biformer_tiny": dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 128, 256], head_dim=16, qk_dims=[32, 64, 128, 256])
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make(args):
    torch.manual_seed(0)
    shrink = REDUCED.get(args.model, {}) if torch.device(args.device).type == "cpu" else {}
    model = attnzoo.create_model(args.model, num_classes=10, **shrink).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = TensorDataset(torch.randn(args.images, 3, args.size, args.size), torch.randint(0, 10, (args.images,)))
    return model, data


def loss_of(args, clock: list[float]):
    """The step's loss on a batch, with the inputs in the model's memory format (both sides use it); appends
    to ``clock`` the time each step starts, after a sync, so both sides time their steps alike."""

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
        clock.append(time.perf_counter())
        x, y = batch
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return nn.functional.cross_entropy(model(x), y)

    return loss_fn


def steps_rate(clock: list[float], batch: int) -> float:
    """Images per second over the steps between the second step's start and the last step's start."""
    return (len(clock) - 2) * batch / (clock[-1] - clock[1])


def plain_loop(args) -> float:
    model, data = make(args)
    device = torch.device(args.device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=0)
    clock: list[float] = []
    loss_fn = loss_of(args, clock)
    amp = AMP_DTYPES.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # as the engine does for fp16
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = loss_fn(model, (x, y))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return steps_rate(clock, args.batch)


def engine(args) -> float:
    model, data = make(args)
    cfg = TrainConfig(
        epochs=1,
        batch_size=args.batch,
        lr=1e-4,
        weight_decay=0.05,
        num_workers=0,
        log_every=10**9,
        schedule="constant",
        amp=args.amp,
    )
    clock: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        Trainer(model, data, cfg, out, loss_fn=loss_of(args, clock), device=args.device).fit()
    return steps_rate(clock, args.batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="biformer_tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast in both loops")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in NHWC in both loops")
    args = p.parse_args()
    if args.images // args.batch < 3:
        p.error("--images must give at least three steps of --batch (the first is warm-up, the last ends the clock)")
    plain, ours = [], []
    for _ in range(args.rounds):  # alternate, so load drifts hit both
        plain.append(plain_loop(args))
        ours.append(engine(args))
    p_med, o_med = statistics.median(plain), statistics.median(ours)
    extras = (f" amp={args.amp}" if args.amp != "none" else "") + (" channels_last" if args.channels_last else "")
    print(
        f"model={args.model} device={device_name(args.device)} batch={args.batch} images/epoch={args.images} "
        f"rounds={args.rounds} torch={torch.__version__}" + extras
    )
    timed = args.images // args.batch - 2
    print(
        f"plain loop: {p_med:.1f} img/s   attnzoo engine: {o_med:.1f} img/s "
        f"(steps 2-{timed + 1} of each epoch: no warm-up step, no checkpoint)"
    )
    print(f"engine vs plain loop: {o_med / p_med:.3f}x")


if __name__ == "__main__":
    main()
