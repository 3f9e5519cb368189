"""The named recipes train as the official code does: the rate scaled by the batch, the schedules step by step
against the official loops written out here, weight-decay exemptions, random erasing, AMP, evaluated weights,
SyncBatchNorm, the last partial batch, samples/s and the seed of the initial weights."""

import logging
import math
import types

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import attnzoo.training.classification as classification
import attnzoo.training.engine as engine
from attnzoo.errors import InvalidOptionError
from attnzoo.training import TrainConfig, Trainer, load_config


def recipe_trainer(tmp_path, name, steps_per_epoch=3, overrides=()):
    """A trainer of recipe ``name`` on a dataset of ``steps_per_epoch`` global batches (nothing is trained)."""
    cfg = load_config(name, ["num_workers=0", *overrides])
    data = TensorDataset(torch.zeros(steps_per_epoch * cfg.batch_size, 1))
    return Trainer(nn.Linear(1, 1), data, cfg, tmp_path, loss_fn=None, device="cpu")


def our_rates(trainer):
    rates = []
    for step in range(trainer.total_steps):
        trainer.scheduler.step_update(step)
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    return rates


def timm_cosine(t, base, warmup_init, warmup_t, t_initial, lr_min):
    """timm's CosineLRScheduler, one cycle, no warm-up prefix (the official scripts' setting)."""
    if t < warmup_t:
        return warmup_init + t * (base - warmup_init) / warmup_t
    if t < t_initial:
        return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / t_initial))
    return lr_min


@pytest.mark.parametrize("name", ["deit", "biformer"])
def test_deit_style_schedule_is_main_py_one_rate_per_epoch(tmp_path, name):
    """main.py: lr 5e-4 x 1024 / 512; timm's cosine over 300 epochs (no warm-up prefix), lr_scheduler.step(epoch)
    after each epoch of range(300): the warm-up start rate at creation, then epoch e at the value for e - 1."""
    trainer = recipe_trainer(tmp_path, name)
    n = trainer.steps_per_epoch

    def f(t):
        return timm_cosine(t, 5e-4 * 1024 / 512, 1e-6, 5, 300, 1e-5)

    official, lr = [], f(0)
    for epoch in range(300):
        official += [lr] * n
        lr = f(epoch)  # lr_scheduler.step(epoch), after the epoch
    assert trainer.total_steps == 300 * n
    assert our_rates(trainer) == pytest.approx(official, rel=1e-12, abs=0)


def test_inline_swin_schedule_is_the_swin_per_step_cosine(tmp_path):
    """Swin's lr_scheduler.py: t_initial = all steps, warm-up inside it, step_update(epoch * n + idx) after each
    step; main.py scales lr, warmup_lr and min_lr by the global batch / 512."""
    trainer = recipe_trainer(tmp_path, "inline_swin")
    n, scale = trainer.steps_per_epoch, 1024 / 512

    def f(t):
        return timm_cosine(t, 5e-4 * scale, 5e-7 * scale, 20 * n, 300 * n, 5e-6 * scale)

    official, lr = [], f(0)
    for epoch in range(300):
        for idx in range(n):
            official.append(lr)
            lr = f(epoch * n + idx)  # step_update, after the optimizer step
    assert our_rates(trainer) == pytest.approx(official, rel=1e-12, abs=0)


@pytest.mark.parametrize(
    "name, base, final, epochs, warmup", [("l2vit", 4e-3, 1e-6, 300, 20), ("sparsifiner_recon", 3e-4, 2e-4, 5, 3)]
)
def test_convnext_style_schedules_match_their_per_step_lists(tmp_path, name, base, final, epochs, warmup):
    """L2ViT's and Sparsifiner's utils.cosine_scheduler: a linear warm-up from 0 (np.linspace, which reaches the
    peak one step before timm's), then a cosine over the remaining steps, read before each step."""
    trainer = recipe_trainer(tmp_path, name)
    n = trainer.steps_per_epoch
    w, rest = warmup * n, (epochs - warmup) * n
    official = list(np.linspace(0, base, w)) + [
        final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / rest)) for i in range(rest)
    ]
    ours = our_rates(trainer)
    assert ours[w:] == pytest.approx(official[w:], rel=1e-12, abs=0)
    assert max(abs(a - b) for a, b in zip(ours[:w], official[:w])) <= base / w * (1 + 1e-9)


def test_the_rate_follows_the_global_batch_and_the_run_records_it(tmp_path):
    biformer = load_config("biformer")
    assert biformer.lr == 5e-4 and biformer.lr_base_batch == 512 and biformer.scaled_lrs()["lr"] == 1e-3
    assert load_config("biformer", ["batch_size=2048"]).scaled_lrs()["lr"] == 2e-3
    assert load_config("deit").scaled_lrs() == biformer.scaled_lrs() == {"lr": 1e-3, "warmup_lr": 1e-6, "min_lr": 1e-5}
    swin = load_config("inline_swin").scaled_lrs()
    assert swin == pytest.approx({"lr": 1e-3, "warmup_lr": 1e-6, "min_lr": 1e-5}, rel=1e-12)
    assert load_config("biformer", ["lr_base_batch=null"]).scaled_lrs()["lr"] == 5e-4
    with pytest.raises(InvalidOptionError, match="^lr_base_batch"):
        load_config(None, ["lr_base_batch=0"])
    x = torch.randn(16, 2)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, lr_base_batch=4, min_lr=0.0, num_workers=0, log_every=1)
    trainer = Trainer(nn.Linear(2, 2), TensorDataset(x, (x[:, 0] > 0).long()), cfg, tmp_path, loss_fn=_ce, device="cpu")
    trainer.fit()
    record = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert record["lr"] == 0.01 and record["effective"]["lr"] == 0.02
    first = (tmp_path / "metrics.csv").read_text().splitlines()[1].split(",")
    assert float(first[3]) == 0.02  # the logged rate of step 1


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_no_weight_decay_keywords_are_honoured(tmp_path):
    """InLine-Swin's relative_position_bias_table (2-D) is exempt by keyword, as the official optimizer.py."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
            self.qkv = nn.Linear(2, 6)

    class Swinish(nn.Module):
        def __init__(self):
            super().__init__()
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 2))
            self.blocks = nn.ModuleList([Attention(), Attention()])

        def no_weight_decay(self):
            return {"absolute_pos_embed"}

        def no_weight_decay_keywords(self):
            return {"relative_position_bias_table"}

    model = Swinish()
    trainer = Trainer(model, TensorDataset(torch.zeros(8, 2)), TrainConfig(batch_size=8), tmp_path, loss_fn=None)
    decay = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decay}
    assert names == {"blocks.0.qkv.weight", "blocks.1.qkv.weight"}


def image_folder(root, n=2):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    return root


class _Captured(Exception):
    pass


def captured_recipe(monkeypatch, tmp_path, out, **kwargs):
    """What train_classification hands the Trainer: the model's initial weights and the training transform."""
    seen = {}

    def capture(net, train_set, cfg, out_dir, **kw):
        seen.update(weights={k: v.clone() for k, v in net.state_dict().items()}, transform=train_set.transform)
        raise _Captured

    monkeypatch.setattr(classification, "Trainer", capture)
    with pytest.raises(_Captured):
        classification.train_classification("resnet18", tmp_path / "data", tmp_path / out, device="cpu", **kwargs)
    return seen


def test_random_erasing_fills_as_the_official_recipes(monkeypatch, tmp_path):
    image_folder(tmp_path / "data")
    common = ["batch_size=4", "repeated_aug=1", "input_size=32", "min_lr=1e-6"]  # min_lr below the scaled lr
    for overrides, mode in ((common, "pixel"), ([*common, "remode=const"], "const")):
        tf = captured_recipe(monkeypatch, tmp_path, "o", config="biformer", overrides=overrides)["transform"]
        [erasing] = [t for t in tf.transforms if type(t).__name__ == "RandomErasing"]
        assert erasing.mode == mode and erasing.probability == 0.25
    for name in ("deit", "biformer", "l2vit", "inline_swin", "sparsifiner_recon", "sparsifiner_distill"):
        assert load_config(name).extra["remode"] == "pixel", name
    with pytest.raises(InvalidOptionError, match="^remode"):
        captured_recipe(monkeypatch, tmp_path, "o", config="biformer", overrides=[*common, "remode=noise"])


def test_the_seed_decides_the_initial_weights(monkeypatch, tmp_path):
    image_folder(tmp_path / "data")
    runs = []
    for seed, before in ((0, 0), (0, 1), (7, 0)):
        torch.manual_seed(before)  # whatever ran before in the process
        weights = captured_recipe(monkeypatch, tmp_path, f"o{seed}{before}", overrides=[f"seed={seed}", "batch_size=4"])
        runs.append(weights["weights"])
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in ((runs[0], runs[1]), (runs[0], runs[2]))]
    assert same == [True, False]


def test_sparsifiner_phases_mix_their_images_and_keep_the_official_ema():
    recon, distill = load_config("sparsifiner_recon").extra, load_config("sparsifiner_distill")
    assert (recon["mixup"], recon["cutmix"]) == (0.8, 1.0) == (distill.extra["mixup"], distill.extra["cutmix"])
    assert distill.ema_decay == 0.9999
    seen = []

    def model(x, dense_attn):
        seen.append(x)
        attn = torch.rand(2, 2, 5, 5)
        return types.SimpleNamespace(approx_attn=[attn[..., 1:, :]], dense_attn=[attn])

    from timm.data import Mixup

    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    loss = classification._SparsifinerReconstructionLoss(0.01, Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=2))
    loss(model, (x.clone(), y))
    assert not torch.equal(seen[0], x)  # the predictors regress the attention of mixed images


@pytest.mark.parametrize("eval_model", ["ema", "model"])
def test_eval_model_chooses_the_weights_evaluated_kept_and_saved(tmp_path, eval_model):
    x = torch.randn(16, 2)
    cfg = TrainConfig(
        epochs=2, batch_size=8, lr=0.1, ema_decay=0.5, eval_model=eval_model, best_metric="score", num_workers=0
    )
    trainer = Trainer(nn.Linear(2, 2), TensorDataset(x, (x[:, 0] > 0).long()), cfg, tmp_path, loss_fn=_ce, device="cpu")
    evaluated = []
    trainer.eval_fn = lambda m: evaluated.append(m) or {"score": float(len(evaluated))}
    trainer.fit()
    trainer.save_weights()
    chosen, other = (trainer.ema.module, trainer.model) if eval_model == "ema" else (trainer.model, trainer.ema.module)
    assert all(m is chosen for m in evaluated)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    saved = load_file(tmp_path / "model.safetensors")
    for k, v in chosen.state_dict().items():
        assert torch.equal(best["model"][k], v) and torch.equal(saved[k], v)
    assert not torch.equal(chosen.weight, other.weight)
    assert ("ema" in best) == (eval_model == "model")
    assert [load_config(n).eval_model for n in ("deit", "biformer", "l2vit")] == ["model", "model", "ema"]


def test_official_amp_and_the_cpu_notice(tmp_path, caplog):
    assert [load_config(n).amp for n in ("deit", "biformer", "inline_swin", "l2vit")] == ["fp16"] * 3 + ["none"]
    with caplog.at_level(logging.WARNING, logger="attnzoo.training.engine"):
        Trainer(
            nn.Linear(1, 1),
            TensorDataset(torch.zeros(8, 1)),
            TrainConfig(amp="fp16", batch_size=8),
            tmp_path,
            loss_fn=None,
        )
    assert "amp=fp16 on the CPU" in caplog.text


def test_sync_bn_converts_batchnorm_under_torchrun():
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    weight = model[1].weight
    assert engine._synced_batchnorm(model, True, 1, torch.device("cpu")) is model  # one process: nothing to sync
    assert engine._synced_batchnorm(model, False, 2, torch.device("cuda")) is model
    synced = engine._synced_batchnorm(model, True, 2, torch.device("cuda"))
    assert isinstance(synced[1], nn.SyncBatchNorm) and synced[1].weight is weight
    with pytest.raises(InvalidOptionError, match="^sync_bn=true needs GPUs"):
        engine._synced_batchnorm(nn.Sequential(nn.BatchNorm1d(4)), True, 2, torch.device("cpu"))
    assert load_config("lrgt").sync_bn and not load_config("deit").sync_bn


class _Bags(Dataset):
    """WSI-like: one item is a bag of 50 patch features."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.randn(50, 4), torch.tensor(i % 2)


def _stack_bags(items):
    return types.SimpleNamespace(x=torch.stack([i[0] for i in items]), y=torch.stack([i[1] for i in items]))


@pytest.mark.parametrize("drop_last, sizes", [(True, [4, 4]), (False, [4, 4, 2])])
def test_samples_per_s_counts_dataset_items_and_drop_last(tmp_path, monkeypatch, drop_last, sizes):
    """Bags of 50 patches in a batch object (OAT's OATBatch is one too): the rate counts bags, not patches (or 0);
    with drop_last=false the epoch ends with the partial batch, as OAT's loader."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    seen = []

    def loss(model, batch):
        seen.append(len(batch.y))
        return nn.functional.cross_entropy(model(batch.x).mean(1), batch.y)

    cfg = TrainConfig(epochs=1, batch_size=4, drop_last=drop_last, num_workers=0, log_every=1)
    trainer = Trainer(nn.Linear(4, 2), _Bags(), cfg, tmp_path, loss_fn=loss, collate_fn=_stack_bags, device="cpu")
    trainer.fit()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert seen == sizes and [float(r.split(",")[4]) for r in rows[1:]] == sizes  # one tick per logged step
    assert load_config("oat").drop_last is False
    with pytest.raises(InvalidOptionError, match="^drop_last=false"):
        Trainer(
            nn.Linear(4, 2), _Bags(), TrainConfig(batch_size=4, accum_steps=2, drop_last=False), tmp_path, loss_fn=loss
        )
