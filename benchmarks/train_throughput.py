"""Training step throughput: attnzoo's engine against a plain hand-written torch loop, same model,
data, batch, optimizer and mixed precision, measured alternately in the same run (goal: engine >= 0.95x).

    python benchmarks/train_throughput.py                       # CPU, a reduced biformer_tiny, batch 16
    python benchmarks/train_throughput.py --model resnet18 --device cuda --batch 128 --images 2048
    python benchmarks/train_throughput.py --device cuda --batch 128 --images 1024 --amp bf16 --channels-last

On the CPU ``biformer_tiny`` is shrunk (``REDUCED``) so a run takes minutes; on a GPU it is the real model.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import attnzoo
from attnzoo.training import TrainConfig, Trainer

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


def loss_of(args):
    """The step's loss on a batch, with the inputs in the model's memory format (both sides use it)."""

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return nn.functional.cross_entropy(model(x), y)

    return loss_fn


def plain_loop(args) -> float:
    model, data = make(args)
    device = torch.device(args.device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=0)
    loss_fn = loss_of(args)
    amp = AMP_DTYPES.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # as the engine does for fp16
    start, n = time.perf_counter(), 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = loss_fn(model, (x, y))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


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
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, data, cfg, out, loss_fn=loss_of(args), device=args.device)
        start = time.perf_counter()
        trainer.fit()
        elapsed = time.perf_counter() - start
    return trainer.steps_per_epoch * args.batch / elapsed


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
    plain, ours = [], []
    for _ in range(args.rounds):  # alternate, so load drifts hit both
        plain.append(plain_loop(args))
        ours.append(engine(args))
    p_med, o_med = statistics.median(plain), statistics.median(ours)
    extras = (f" amp={args.amp}" if args.amp != "none" else "") + (" channels_last" if args.channels_last else "")
    print(
        f"model={args.model} device={args.device} batch={args.batch} images/epoch={args.images} rounds={args.rounds}"
        + extras
    )
    print(f"plain loop: {p_med:.1f} img/s   attnzoo engine: {o_med:.1f} img/s (incl. its end-of-epoch checkpoint)")
    print(f"engine vs plain loop: {o_med / p_med:.3f}x")


if __name__ == "__main__":
    main()
