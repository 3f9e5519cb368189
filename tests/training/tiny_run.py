"""A tiny training run for the engine tests, run as a subprocess (also under torchrun).

python tiny_run.py OUT [--resume] [--slow SECONDS] [--dropout P] [--accum N] [--ema D]
"""

import argparse
import sys
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from attnzoo.training import TrainConfig, Trainer


class Net(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(16), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def dataset():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(48, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--ema", type=float, default=None)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = TrainConfig(
        epochs=a.epochs,
        batch_size=8,
        accum_steps=a.accum,
        lr=1e-2,
        warmup_epochs=1,
        clip_grad=1.0,
        ema_decay=a.ema,
        checkpoint_every=2,
        keep_last=2,
        num_workers=0,
        log_every=1,
        best_metric="acc",
    )
    data = dataset()

    def loss_fn(model, batch):
        if a.slow:
            time.sleep(a.slow)
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def eval_fn(model):
        x, y = data.tensors
        return {"acc": float((model(x).argmax(-1) == y).float().mean())}

    trainer = Trainer(Net(a.dropout), data, cfg, a.out, loss_fn=loss_fn, eval_fn=eval_fn, device="cpu")
    trainer.fit(resume=a.resume)
    if trainer.ctx.is_main:
        torch.save(trainer.model.state_dict(), f"{a.out}/final.pt")


if __name__ == "__main__":
    sys.exit(main())
