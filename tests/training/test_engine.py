"""The training engine: exact resume after SIGKILL, DDP equivalence, accumulation, EMA, AMP, checkpoints, errors."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError, UnknownNameError, WeightsError
from attnzoo.training import TrainConfig, Trainer, latest_checkpoint, load_config, named_configs

SCRIPT = Path(__file__).with_name("tiny_run.py")


def run(out, *args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True, **kw)


def final_weights(out):
    return torch.load(Path(out) / "final.pt", weights_only=True)


def assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            torch.testing.assert_close(a[k], b[k], **tol)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path):
    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    out.mkdir()
    # Killed while writing the checkpoint of step 10 (6 steps per epoch: mid epoch 2), once the run says it is there.
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out), "--torn-checkpoint", "10"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            said = proc.stdout.readline()  # blocks until the child is inside the write, or has exited
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    assert said.strip() == "writing checkpoint-00000010.pt", (tmp_path / "stderr.txt").read_text()[-3000:]
    assert not (out / "final.pt").exists()
    torn = list(out.glob(".checkpoint-00000010.pt.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0  # the half-written file is there ...
    assert latest_checkpoint(out).name == "checkpoint-00000008.pt"  # ... and never taken for a checkpoint
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "checkpoint-00000006.pt", "checkpoint-00000008.pt"]
    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(final_weights(out), final_weights(tmp_path / "full"))
    assert not list(out.glob(".*.tmp"))  # the torn temporary went when the run resumed
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 19))  # no step logged twice


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    single = run(tmp_path / "one", "--dropout", "0")
    assert single.returncode == 0, single.stderr
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # the rendezvous binds a free port itself: nothing fixed to collide with
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        str(tmp_path / "two"),
        "--dropout",
        "0",
    ]
    ddp = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_same(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), atol=1e-5, rtol=1e-4)
    assert len(list((tmp_path / "two").glob("checkpoint-*.pt"))) == 2  # rank 0 alone writes checkpoints


def make_trainer(tmp_path, trainer_kwargs=None, **overrides):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 8, "lr": 0.05, "num_workers": 0, "log_every": 1, **overrides})
    return Trainer(
        model,
        data,
        cfg,
        tmp_path,
        loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        device="cpu",
        **(trainer_kwargs or {}),
    )


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    a = make_trainer(tmp_path / "a")
    a.fit()
    b = make_trainer(tmp_path / "b", accum_steps=4)
    b.fit()
    assert_same(a.model.state_dict(), b.model.state_dict(), atol=1e-6, rtol=1e-5)


def one_batch(trainer):
    """Cut the trainer's data to its first batch: fit() then takes exactly one step."""
    data = trainer.train_set.dataset
    data.tensors = tuple(t[: trainer.config.batch_size] for t in data.tensors)
    trainer.steps_per_epoch = trainer.total_steps = 1
    return trainer


def test_ema_follows_its_definition(tmp_path):
    trainer = one_batch(make_trainer(tmp_path, ema_decay=0.5, epochs=1))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    for k, v in trainer.ema.module.state_dict().items():
        torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * after[k])


def test_checkpoints_are_atomic_pruned_and_checked_on_resume(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3, checkpoint_every=1, keep_last=2)
    trainer.fit()
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00000011.pt", "checkpoint-00000012.pt"] and not list(tmp_path.glob(".*.tmp"))
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000012.pt"
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "metrics.csv").exists()
    (tmp_path / "checkpoint-00000013.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(WeightsError, match="checkpoint-00000013.pt"):
        make_trainer(tmp_path, epochs=3).fit(resume=True)
    (tmp_path / "checkpoint-00000013.pt").unlink()
    other = make_trainer(tmp_path, epochs=3)
    other.model = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 2))
    with pytest.raises(WeightsError, match="does not match"):
        other.fit(resume=True)
    with pytest.raises(WeightsError, match="batch_size=8"):
        make_trainer(tmp_path, epochs=3, batch_size=16).fit(resume=True)
    with pytest.raises(WeightsError, match="no checkpoint"):
        make_trainer(tmp_path / "empty").fit(resume=True)


def test_bad_settings_and_data_fail_before_training(tmp_path):
    with pytest.raises(DatasetFormatError, match="no samples"):
        Trainer(nn.Linear(2, 2), TensorDataset(torch.zeros(0, 2)), TrainConfig(), tmp_path, loss_fn=None)
    with pytest.raises(InvalidInputError, match="must divide"):
        make_trainer(tmp_path, batch_size=8, accum_steps=3)
    with pytest.raises(InvalidInputError, match="fewer than one batch"):
        make_trainer(tmp_path, batch_size=64)
    with pytest.raises(InvalidInputError, match="amp"):
        make_trainer(tmp_path, amp="fp8")
    trainer = make_trainer(tmp_path, lr=1e30)
    with pytest.raises(InvalidInputError, match="loss is"):
        trainer.fit()


def test_configs_load_and_override(tmp_path):
    assert {"biformer", "deit", "finetune", "l2vit", "inline_swin"} <= set(named_configs())
    cfg = load_config("biformer", ["lr=1e-4", "epochs=3", "mixup=0"])
    assert (
        cfg.lr == 1e-4
        and cfg.epochs == 3
        and cfg.extra["mixup"] == 0
        and cfg.extra["auto_augment"].startswith("rand-m9")
    )
    (tmp_path / "mine.yaml").write_text("epochs: 2\nbatch_size: 4\nsmoothing: 0.1\n")
    assert load_config(tmp_path / "mine.yaml").extra == {"smoothing": 0.1}
    with pytest.raises(UnknownNameError, match="Did you mean: lr"):
        load_config(None, ["lrr=1"])
    with pytest.raises(UnknownNameError, match="biformer"):
        load_config("bifomer")


def test_step_batches_split_every_global_batch_across_ranks_and_repeat_images():
    from attnzoo._distributed import DistributedContext
    from attnzoo.training.engine import StepBatches

    one = list(StepBatches(20, 8, 2, DistributedContext(), seed=3, epoch=1))
    ranks = [list(StepBatches(20, 8, 2, DistributedContext(r, 2), seed=3, epoch=1)) for r in range(2)]
    assert len(one) == 4 and all(len(b) == 4 for b in one) and all(len(b) == 2 for r in ranks for b in r)
    for m in range(4):  # the same micro-batch, split between the two processes
        assert sorted(ranks[0][m] + ranks[1][m]) == sorted(one[m])
    assert (
        list(StepBatches(20, 8, 2, DistributedContext(), seed=3, epoch=1, start_step=1)) == one[2:]
    )  # resume skips done steps
    rep = [item for b in StepBatches(20, 4, 1, DistributedContext(), seed=0, epoch=0, repeats=3) for item in b]
    assert len(rep) == 20 and {c for _, _, c in rep} == {0, 1, 2}
    assert [i for _, i, _ in rep[:3]] == [
        rep[0][1]
    ] * 3  # an image's copies are consecutive: different processes get them


def test_repeated_copies_are_augmented_differently(tmp_path):
    from attnzoo.training.engine import SeededSamples

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1).item()

    samples = SeededSamples(Noisy(), seed=0)
    assert samples[(0, 1, 0)] == samples[(0, 1, 0)] != samples[(0, 1, 1)] != samples[(1, 1, 0)]


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_step_is_the_autocast_step_written_by_hand(tmp_path, amp, dtype):
    """One SGD step (lr 1) under AMP moves every weight by the gradient of the loss computed under
    torch.autocast in ``dtype`` (fp16: with the loss scaled by GradScaler's initial 2**16, a power
    of two, so unscaling is exact), which is measurably not the fp32 gradient."""
    trainer = one_batch(make_trainer(tmp_path, amp=amp, optimizer="sgd", momentum=0.0, lr=1.0, weight_decay=0.0))
    before = copy.deepcopy(trainer.model)
    seen = []

    def recording_loss(model, batch):
        logits = model(batch[0])
        seen.append((batch, logits.dtype))
        return nn.functional.cross_entropy(logits, batch[1])

    trainer.loss_fn = recording_loss
    assert trainer.fit()["step"] == 1
    [((x, y), logits_dtype)] = seen
    assert logits_dtype == dtype
    scale = 2.0**16 if amp == "fp16" else 1.0

    def sgd_step(autocast):
        model = copy.deepcopy(before)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        (loss * scale).backward()
        return {name: p.detach() - p.grad / scale for name, p in model.named_parameters()}

    trained, by_hand, in_fp32 = dict(trainer.model.named_parameters()), sgd_step(True), sgd_step(False)
    for name, want in by_hand.items():
        torch.testing.assert_close(trained[name].detach(), want, atol=1e-7, rtol=1e-6)
    assert max((by_hand[n] - in_fp32[n]).abs().max().item() for n in by_hand) > 1e-5  # AMP made a difference


def test_schedule_warms_up_decays_and_cools_down(tmp_path):
    trainer = make_trainer(tmp_path, epochs=10, lr=0.1, min_lr=0.001, warmup_epochs=2, warmup_lr=0.0, cooldown_epochs=2)
    lrs = []
    for step in range(trainer.total_steps):
        trainer.scheduler.step_update(step)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    spe = trainer.steps_per_epoch
    assert lrs[0] == 0.0 and lrs[2 * spe] == pytest.approx(0.1)  # linear warm-up to the peak
    assert all(a >= b for a, b in zip(lrs[2 * spe :], lrs[2 * spe + 1 :]))  # then non-increasing
    assert lrs[-2 * spe :] == [pytest.approx(0.001)] * (2 * spe)  # cool-down at min_lr


def test_no_weight_decay_on_norms_biases_and_tokens(tmp_path):
    trainer = make_trainer(tmp_path, weight_decay=0.1)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    from attnzoo.vision.sparsifiner import Sparsifiner

    vit = Sparsifiner(
        embed_dim=32, depth=1, num_heads=2, num_classes=2
    )  # timm's no_weight_decay(): pos_embed, cls_token
    t = Trainer(
        vit,
        TensorDataset(torch.zeros(8, 3, 224, 224), torch.zeros(8).long()),
        TrainConfig(batch_size=8, num_workers=0),
        tmp_path / "vit",
        loss_fn=None,
        device="cpu",
    )
    no_decay_ids = {id(p) for p in t.optimizer.param_groups[1]["params"]}
    assert (
        id(vit.pos_embed) in no_decay_ids
        and id(vit.cls_token) in no_decay_ids
        and id(vit.blocks[0].norm1.weight) in no_decay_ids
    )


def test_step_schedule_and_clipping(tmp_path):
    trainer = make_trainer(tmp_path, epochs=4, lr=0.1, schedule="step", decay_epochs=2, decay_rate=0.5, clip_grad=1e-3)
    lrs = []
    for step in range(trainer.total_steps):
        trainer.scheduler.step_update(step)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    spe = trainer.steps_per_epoch
    assert lrs[: 2 * spe] == [pytest.approx(0.1)] * (2 * spe) and lrs[2 * spe :] == [pytest.approx(0.05)] * (2 * spe)
    multi = make_trainer(
        tmp_path / "m", epochs=4, lr=0.1, schedule="multistep", decay_milestones=[1, 3], decay_rate=0.1
    )
    for step, lr in ((0, 0.1), (spe, 0.01), (3 * spe - 1, 0.01), (3 * spe, 0.001)):
        multi.scheduler.step_update(step)
        assert multi.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    sgd = one_batch(
        make_trainer(
            tmp_path / "sgd", optimizer="sgd", momentum=0.0, lr=1.0, clip_grad=1e-3, epochs=1, weight_decay=0.0
        )
    )
    before = torch.cat([p.detach().flatten().clone() for p in sgd.model.parameters()])
    sgd.fit()
    after = torch.cat([p.detach().flatten() for p in sgd.model.parameters()])
    assert (after - before).norm() <= 1e-3 * 1.0001  # one SGD step of lr 1 moves by the clipped gradient norm


def test_best_checkpoint_and_logs(tmp_path):
    proc = run(tmp_path / "run", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    evals = (tmp_path / "run" / "eval.csv").read_text().splitlines()
    assert evals[0] == "step,epoch,eval_acc" and len(evals) == 3
    assert best["eval_acc"] == max(float(r.split(",")[2]) for r in evals[1:])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_early_stopping_after_patience_evaluations_without_a_better_metric(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.7, 0.65, 0.9, 0.95])  # best at the 2nd evaluation, then 3 without a new best
    trainer = make_trainer(tmp_path, epochs=7, best_metric="score", early_stop_patience=3)
    trainer.eval_fn = lambda model: {"score": next(scores)}
    result = trainer.fit()
    assert result["stopped_early"] and result["best"] == 0.7
    assert result["step"] == 5 * trainer.steps_per_epoch  # epochs 1-5 ran; 6 and 7 did not
    # The counter travels with the checkpoint: resuming the stopped run stops again at once.
    again = make_trainer(tmp_path, epochs=7, best_metric="score", early_stop_patience=3)
    again.eval_fn = lambda model: {"score": 1.0}
    assert again.fit(resume=True)["step"] == result["step"]
    with pytest.raises(InvalidInputError, match="best_metric"):
        TrainConfig(early_stop_patience=2).validate()


def test_a_non_finite_first_evaluation_does_not_block_later_bests(tmp_path):
    scores = iter([float("inf"), 0.9, 0.5, 0.7])  # min mode: inf first (e.g. a delta over a zero human statistic)
    trainer = make_trainer(tmp_path, epochs=4, best_metric="delta", best_mode="min", early_stop_patience=2)
    trainer.eval_fn = lambda model: {"delta": next(scores)}
    result = trainer.fit()
    assert result["best"] == 0.5 and not result["stopped_early"]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["eval_delta"] == 0.5


def run_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_fresh_run_refuses_a_folder_holding_an_earlier_run_and_overwrite_discards_it(tmp_path):
    """Two runs never mix: pruning by name kept the earlier run's later checkpoint and deleted the new
    run's own; best.pt, config.yaml were replaced and metrics.csv appended to."""
    make_trainer(tmp_path, epochs=5, keep_last=1, best_metric="acc").fit()
    (tmp_path / "notes.txt").write_text("mine")
    before = {name: (tmp_path / name).read_bytes() for name in run_files(tmp_path)}
    with pytest.raises(InvalidOptionError, match="earlier run .*--resume.*--overwrite"):
        make_trainer(tmp_path, epochs=1, keep_last=1).fit()
    assert {name: (tmp_path / name).read_bytes() for name in run_files(tmp_path)} == before  # untouched
    with pytest.raises(InvalidOptionError, match="exclude each other"):
        make_trainer(tmp_path, epochs=1).fit(resume=True, overwrite=True)
    make_trainer(tmp_path, epochs=1, keep_last=1).fit(overwrite=True)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000004.pt"
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint-00000004.pt"]
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4] and "epochs: 1" in (
        tmp_path / "config.yaml"
    ).read_text()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the names a run writes are discarded
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # the earlier run's went


def test_pruning_keeps_checkpoints_of_later_steps_it_did_not_write(tmp_path):
    trainer = make_trainer(tmp_path, keep_last=1)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "checkpoint-00000099.pt").write_bytes(b"someone else's")
    trainer.step = 4
    trainer.save_checkpoint(1, 0)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint-00000004.pt", "checkpoint-00000099.pt"]


def test_a_run_refuses_to_write_over_its_inputs_or_into_its_data(tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    for name in ("model.safetensors", "config.yaml", "checkpoint-00000003.pt"):
        (out / name).write_bytes(b"input")
        with pytest.raises(InvalidOptionError, match=f"{name} in .*ft: it would be replaced"):
            make_trainer(out, {"inputs": [out / "sub" / ".." / name]}).fit(overwrite=True)
        assert (out / name).read_bytes() == b"input"
    elsewhere = make_trainer(tmp_path / "other", {"inputs": [out / "model.safetensors"], "data": tmp_path / "data"})
    assert elsewhere.fit()["step"] == 4  # reading from one folder and writing to another is fine
    for data in (out, tmp_path):
        with pytest.raises(InvalidOptionError, match="inside the training data"):
            make_trainer(out, {"data": data}).fit(resume=True)
    assert run_files(out) == ["checkpoint-00000003.pt", "config.yaml", "model.safetensors"]


def test_resume_refuses_other_schedule_settings_and_reads_old_checkpoints_as_their_defaults(tmp_path):
    """The resumed steps must follow the checkpoint's schedule; a checkpoint written before a setting existed counts
    as that setting's default (the behaviour of its time), so a recipe that now says otherwise is refused."""
    make_trainer(tmp_path, epochs=2).fit()
    for change, named in (
        ({"lr": 0.1}, "lr 0.05 -> 0.1"),
        ({"sched_on": "epoch"}, "sched_on 'step' -> 'epoch'"),
        ({"amp": "fp16"}, "amp 'none' -> 'fp16'"),
        ({"lr_base_batch": 512}, "lr_base_batch None -> 512"),
    ):
        with pytest.raises(WeightsError, match=f"other training settings \\({named}\\)"):
            make_trainer(tmp_path, epochs=3, **change).fit(resume=True)
    path = latest_checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    for key in ("sched_on", "sched_update", "warmup_prefix", "drop_last", "eval_model", "lr_base_batch"):
        del state["config"][key]  # as a checkpoint from before these settings
    torch.save(state, path)
    with pytest.raises(WeightsError, match="sched_update 'before' -> 'after'"):
        make_trainer(tmp_path, epochs=3, sched_update="after").fit(resume=True)
    assert make_trainer(tmp_path, epochs=3).fit(resume=True)["step"] == 12  # more epochs: a longer run, allowed


def test_resume_refuses_a_checkpoint_of_another_model_or_dataset(tmp_path):
    info = {"task": "toy", "model": "mlp", "data": str(tmp_path / "data"), "classes": ["a", "b"], "weights": None}
    make_trainer(tmp_path, {"run_info": info}, epochs=2).fit()
    for change, named in (
        ({"data": str(tmp_path / "other")}, "data '.*data' -> '.*other'"),
        ({"classes": ["a", "c"]}, r"classes \['a', 'b'\] -> \['a', 'c'\]"),
        ({"model": "mlp2", "task": "toy2"}, "model 'mlp' -> 'mlp2'; task 'toy' -> 'toy2'"),
    ):
        with pytest.raises(WeightsError, match=f"another run \\({named}\\)"):
            make_trainer(tmp_path, {"run_info": {**info, **change}}, epochs=2).fit(resume=True)
    # the same data by another spelling, and other initial weights (the checkpoint replaces them), resume
    same = {**info, "data": os.path.relpath(tmp_path / "data"), "weights": "other.pth"}
    assert make_trainer(tmp_path, {"run_info": same}, epochs=3).fit(resume=True)["step"] == 12


def test_a_run_removes_the_temporaries_a_killed_write_left(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = [".checkpoint-00000010.pt.k3j_9xz0.tmp", ".best.pt.abcdefgh.tmp", ".metrics.csv.12345678.tmp"]
    others = [".notes.txt.abcdefgh.tmp", ".best.pt.abc.tmp", "notes.txt"]  # not a run's, or not atomic_write's
    for name in stale + others:
        (tmp_path / name).write_bytes(b"x" * 100)
    make_trainer(tmp_path).fit()
    assert sorted(p.name for p in tmp_path.glob(".*")) == sorted(others[:2])


def test_a_best_metric_the_evaluation_does_not_report_is_refused_at_the_first_evaluation(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3, best_metric="nope")
    trainer.eval_fn = lambda model: {"acc": 0.5, "loss": 1.0}
    with pytest.raises(
        InvalidOptionError, match="^best_metric 'nope' is not a metric this run's evaluation reports.*acc, loss"
    ):
        trainer.fit()
    assert trainer.step == trainer.steps_per_epoch  # refused after the first epoch, not after the last


class Damaged(torch.utils.data.Dataset):
    """Sample 5 fails the way a damaged file does, with a typed attnzoo error."""

    def __init__(self, error):
        g = torch.Generator().manual_seed(1)
        self.x, self.error = torch.randn(32, 4, generator=g), error

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == 5:
            raise self.error
        return self.x[i], int(self.x[i, 0] > 0)


@pytest.mark.parametrize(
    "error",
    [DatasetFormatError("sample 5: not an image PIL can read"), UnknownNameError("colour", "mauve", ["magenta"])],
    ids=["one-argument", "other-arguments"],
)
def test_a_typed_error_in_a_data_loader_worker_reaches_the_caller_as_itself(tmp_path, error):
    """With num_workers > 0 DataLoader re-raised it with the worker's traceback as the message (the CLI printed that
    whole traceback), or as a RuntimeError where the class's __init__ takes other arguments."""
    trainer = make_trainer(tmp_path, num_workers=1, epochs=1)
    trainer.train_set.dataset = Damaged(error)
    with pytest.raises(type(error)) as info:
        trainer.fit()
    assert type(info.value) is type(error) and str(info.value) == str(error) and "Traceback" not in str(info.value)
    assert vars(info.value) == vars(error)


def test_huge_counts_start_at_once_or_are_refused_with_the_reason(tmp_path):
    """Nothing before the first step costs time or memory in proportion to the counts; a count of steps past the
    float range (the schedule computes in floats) was an OverflowError at the first step."""
    from attnzoo._values import process_limit
    from attnzoo.training.engine import StepBatches

    trainer = make_trainer(tmp_path / "long", epochs=10**12, warmup_epochs=1e9, cooldown_epochs=1e9, log_every=10**30)
    steps = []

    def one_step(model, batch):
        if steps:
            raise KeyboardInterrupt  # the run got going: stop it there
        steps.append(len(batch[0]))
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    trainer.loss_fn = one_step
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.step == 1 and trainer.total_steps == 4 * 10**12
    # repeated_aug's order was built as n x repeats pairs, then cut to n
    order = [item for batch in StepBatches(20, 4, 1, _context(), seed=0, epoch=0, repeats=10**12) for item in batch]
    assert len(order) == 20 and len({i for _, i, _ in order}) == 1 and [c for _, _, c in order] == list(range(20))
    for overrides, key in [
        ({"epochs": 10**308}, "epochs"),
        ({"warmup_epochs": 1e308}, "warmup_epochs"),
        ({"cooldown_epochs": 1e308}, "cooldown_epochs"),
        ({"schedule": "step", "decay_epochs": 1e308}, "decay_epochs"),
        ({"schedule": "multistep", "decay_milestones": [1.0, 1e308]}, "decay_milestones"),
    ]:
        with pytest.raises(
            InvalidOptionError, match=f"^{key}=.* optimizer steps .*more than the learning-rate schedule"
        ):
            make_trainer(tmp_path / "refused", **overrides)
    if process_limit() is not None:  # DataLoader would start them all before the first batch
        with pytest.raises(InvalidOptionError, match="^num_workers=1000000000000 is more worker processes"):
            make_trainer(tmp_path / "refused", num_workers=10**12)
    assert not (tmp_path / "refused").exists()


def test_worker_counts_at_the_process_limit_are_refused(tmp_path, monkeypatch):
    import attnzoo._values

    monkeypatch.setattr(attnzoo._values, "process_limit", lambda: 3)
    with pytest.raises(InvalidOptionError, match=r"^num_workers=3 is more worker processes .*\(3\); use a few per"):
        make_trainer(tmp_path / "refused", num_workers=3)
    make_trainer(tmp_path / "kept", num_workers=2)  # below the limit: taken
    assert not (tmp_path / "refused").exists()


def _context():
    from attnzoo._distributed import DistributedContext

    return DistributedContext()


def test_the_logged_loss_is_the_mean_over_the_steps_since_the_last_row(tmp_path):
    """It was the loss of the one step at the log point."""
    seen = []

    def recording_loss(model, batch):
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        seen.append(loss.item())
        return loss

    trainer = make_trainer(tmp_path, epochs=1, log_every=3, accum_steps=2)  # 4 steps of 2 micro-batches
    trainer.loss_fn = recording_loss
    trainer.fit()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    logged = {int(r.split(",")[0]): float(r.split(",")[2]) for r in rows}
    steps = [(a + b) / 2 for a, b in zip(seen[::2], seen[1::2], strict=True)]  # each step: its micro-batches' mean
    assert logged.keys() == {3, 4}  # every 3 steps, and the epoch's end
    assert logged[3] == pytest.approx(sum(steps[:3]) / 3) and logged[4] == pytest.approx(steps[3])


def test_resume_refuses_other_recipe_settings_but_not_the_free_ones(tmp_path):
    """input_size=48 on resume of a run started at 32 trained on silently, and config.yaml said 48."""
    defaults = {"input_size": 224, "mixup": 0.0, "eval_batch_size": 64, "labels": None}
    free = {"recipe_defaults": defaults, "resumable": ("eval_batch_size",)}
    extra = {**defaults, "input_size": 32, "eval_batch_size": 8, "labels": str(tmp_path / "labels.csv")}
    make_trainer(tmp_path, free, epochs=2, extra=dict(extra)).fit()
    with pytest.raises(WeightsError, match="other recipe settings \\(input_size 32 -> 48\\)"):
        make_trainer(tmp_path, free, epochs=3, extra={**extra, "input_size": 48}).fit(resume=True)
    with pytest.raises(WeightsError, match="other training settings \\(weight_decay 0.05 -> 0.1\\)"):
        make_trainer(tmp_path, free, epochs=3, extra=dict(extra), weight_decay=0.1).fit(resume=True)
    path = latest_checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    del state["config"]["extra"]["mixup"]  # as a checkpoint from before the setting: its default
    torch.save(state, path)
    with pytest.raises(WeightsError, match="mixup 0.0 -> 0.8"):
        make_trainer(tmp_path, free, epochs=3, extra={**extra, "mixup": 0.8}).fit(resume=True)
    same_path = str(tmp_path / "x" / ".." / "labels.csv")  # one file by another spelling
    again = {**extra, "eval_batch_size": 16, "labels": same_path}  # the evaluation batch: free to change
    assert make_trainer(tmp_path, free, epochs=3, extra=again).fit(resume=True)["step"] == 12


def test_an_explicit_best_mode_against_the_metric_is_refused():
    with pytest.raises(InvalidOptionError, match="best_mode=min contradicts best_metric=top1"):
        make_trainer(Path("unused"), epochs=1, best_metric="top1", best_mode="min")
    trainer = make_trainer(Path("unused"), epochs=1, best_metric="delta")
    assert trainer.config.best_mode == "min"


@pytest.mark.slow
def test_the_process_group_attnzoo_made_is_destroyed_when_the_process_ends_normally(tmp_path):
    """Left to the interpreter's teardown, gloo's threads could abort a finished rank ("terminate called without an
    active exception", exit -6: a torchrun run that trained to the end failed). After an uncaught error the group is
    left alone, and so after the command line's failure (a destroy waits for the rank's queued collectives, which a
    stopped peer never matches)."""
    script = Path(__file__).with_name("group_exit.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ended = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2])
    assert ended.returncode == 0, ended.stderr[-3000:]
    # the two ranks' lines may interleave in torchrun's output: read the records, not the lines
    assert re.findall(r"rank (-|\d) group at exit: (True|False)", ended.stdout) == [("-", "False")] * 2
    failed = subprocess.run([*cmd, "fail"], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2])
    assert failed.returncode != 0 and "rank 1 fails" in failed.stderr
    assert ("1", "True") in re.findall(r"rank (-|\d) group at exit: (True|False)", failed.stdout)
    # the command line turns every failure into an exit status, never an uncaught error: kept too
    failed = subprocess.run(
        [*cmd, "command-fails"], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2]
    )
    assert failed.returncode != 0 and "/no/such/checkpoint.pth" in failed.stderr
    assert ("1", "True") in re.findall(r"rank (-|\d) group at exit: (True|False)", failed.stdout)


def test_the_runs_own_checkpoints_are_checked_for_zip_bombs_and_read_with_typed_errors(tmp_path, monkeypatch):
    """Resume and the recipes' best.pt read what the run wrote as any checkpoint is read: a zip that would
    inflate far beyond the file is refused before torch.load allocates it, a damaged file is a WeightsError."""
    import zipfile

    from attnzoo import _io
    from attnzoo.training.engine import load_best_state

    monkeypatch.setattr(_io, "ZIP_FREE_INFLATION", 1 << 20)  # so that the bomb stays a few MiB
    trainer = make_trainer(tmp_path, epochs=1, checkpoint_every=1)
    trainer.fit()
    latest = latest_checkpoint(tmp_path)
    bomb = tmp_path / "checkpoint-00000099.pt"
    with zipfile.ZipFile(latest) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
        zeros = zipfile.ZipInfo("archive/data/999")
        zeros.compress_type = zipfile.ZIP_DEFLATED
        with zout.open(zeros, "w") as entry:
            for _ in range(4):
                entry.write(bytes(1 << 20))
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(a))
    with pytest.raises(WeightsError, match=r"checkpoint-00000099\.pt: its compressed zip entries .* zip bomb"):
        make_trainer(tmp_path, epochs=1).fit(resume=True)
    with pytest.raises(WeightsError, match="zip bomb"):
        load_best_state(trainer.model, bomb)
    assert loaded == []  # refused before torch read anything
    monkeypatch.undo()
    torn = tmp_path / "best.pt"
    torn.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(WeightsError, match=r"cannot test the best epoch from .*best\.pt: not a readable"):
        load_best_state(trainer.model, torn)
    torch.save({"w": torch.ones(1)}, torn)
    with pytest.raises(WeightsError, match="no model state"):
        load_best_state(trainer.model, torn)
    expected = {k: v + 1 for k, v in trainer.model.state_dict().items()}
    torch.save({"model": expected}, torn)
    load_best_state(trainer.model, torn)
    assert all(torch.equal(v, expected[k]) for k, v in trainer.model.state_dict().items())
