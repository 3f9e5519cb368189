"""Training step throughput: attnzoo's engine against a plain hand-written torch loop, same model,
data, batch and optimizer, measured alternately in the same run (goal: engine >= 0.95x).

    python benchmarks/train_throughput.py                       # CPU, a reduced biformer_tiny, batch 16
    python benchmarks/train_throughput.py --model resnet18 --device cuda --batch 128 --images 2048
"""

from __future__ import annotations

import argparse
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


def make(args):
    torch.manual_seed(0)
    model = attnzoo.create_model(args.model, num_classes=10, **REDUCED.get(args.model, {})).train()
    data = TensorDataset(torch.randn(args.images, 3, args.size, args.size), torch.randint(0, 10, (args.images,)))
    return model, data


def plain_loop(args) -> float:
    model, data = make(args)
    device = torch.device(args.device)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=0)
    start, n = time.perf_counter(), 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def engine(args) -> float:
    model, data = make(args)
    cfg = TrainConfig(
        epochs=1, batch_size=args.batch, lr=1e-4, weight_decay=0.05, num_workers=0, log_every=10**9, schedule="constant"
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model, data, cfg, out, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), device=args.device
        )
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
    args = p.parse_args()
    plain, ours = [], []
    for _ in range(args.rounds):  # alternate, so load drifts hit both
        plain.append(plain_loop(args))
        ours.append(engine(args))
    p_med, o_med = statistics.median(plain), statistics.median(ours)
    print(f"model={args.model} device={args.device} batch={args.batch} images/epoch={args.images} rounds={args.rounds}")
    print(f"plain loop: {p_med:.1f} img/s   attnzoo engine: {o_med:.1f} img/s (incl. its end-of-epoch checkpoint)")
    print(f"engine vs plain loop: {o_med / p_med:.3f}x")


if __name__ == "__main__":
    main()
