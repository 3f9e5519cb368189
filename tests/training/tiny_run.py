"""A tiny training run for the engine tests, run as a subprocess (also under torchrun).

python tiny_run.py OUT [--resume] [--torn-checkpoint STEP] [--dropout P] [--accum N] [--ema D] [--epochs N]
"""

import argparse
import contextlib
import os
import sys
import threading
from pathlib import Path

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


def tear_checkpoint_and_wait(step: int) -> None:
    """Stand in for a SIGKILL that lands while the checkpoint of ``step`` is being written: its
    temporary file is left half-written, a line on stdout says so, and the run waits to be killed
    (the test kills it at this known point instead of racing a running loop)."""
    import attnzoo.training.engine as engine

    real, target = engine.atomic_write, f"checkpoint-{step:08d}.pt"

    @contextlib.contextmanager
    def torn(path, mode="wb"):
        with real(path, mode) as fh:
            yield fh
            if Path(path).name == target:
                fh.flush()
                fh.truncate(fh.tell() // 2)
                fh.flush()
                print(f"writing {target}", flush=True)
                threading.Event().wait(600)  # killed long before; never outlive a crashed test
                os._exit(1)

    engine.atomic_write = torn


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--torn-checkpoint", type=int, default=None)
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
    if a.torn_checkpoint is not None:
        tear_checkpoint_and_wait(a.torn_checkpoint)

    def loss_fn(model, batch):
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
