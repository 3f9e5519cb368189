"""A damaged image is refused before any work; a failure in validation or in loading a sample keeps the training
done (the epoch's checkpoint is written before its validation) and a resume continues exactly."""

import csv

import pytest
import torch
from torch import nn

from attnzoo.errors import AttnzooError, DatasetFormatError, WeightsError
from attnzoo.training import TrainConfig, Trainer, latest_checkpoint
from attnzoo.training.classification import train_classification
from attnzoo.training.engine import failed_checks
from tests.training.test_classification_recipe import _ColourOracle, colour_folders

# -- refused before any work -------------------------------------------------------------------------------------


def oracle_run(tmp_path, monkeypatch, data, *settings, resume=False):
    import attnzoo

    made = []
    monkeypatch.setattr(attnzoo, "create_model", lambda name, **kw: made.append(name) or _ColourOracle())
    base = ["epochs=2", "batch_size=4", "num_workers=0", "input_size=8", "auto_augment=null", "best_metric=top1"]
    overrides = [*base, *settings]
    result = train_classification("oracle", data, tmp_path / "run", overrides=overrides, device="cpu", resume=resume)
    return result, made


def test_a_damaged_validation_image_is_refused_before_any_training(tmp_path, monkeypatch):
    """One unreadable val image: an epoch trained, then `error: ...bad.jpg: not an image format PIL can read`, no
    checkpoint, and neither a fresh run (an earlier run is there) nor --resume (no checkpoint) could go on."""
    data = tmp_path / "d"
    colour_folders(data, "train", "abc")
    colour_folders(data, "val", "abc")
    bad = data / "val" / "b" / "bad.jpg"
    bad.write_bytes(b"<html>a page saved as a .jpg</html>")
    with pytest.raises(DatasetFormatError) as info:
        oracle_run(tmp_path, monkeypatch, data)
    assert str(info.value) == f"{bad}: not an image format PIL can read"
    assert not (tmp_path / "run").exists()  # nothing written: no model built, no step taken
    bad.unlink()
    result, _ = oracle_run(tmp_path, monkeypatch, data)  # the same command, the data mended: a fresh run
    assert result["step"] == 6 and result["eval_top1"] == 100.0


def test_every_damaged_image_of_a_split_is_named_at_once(tmp_path, monkeypatch):
    """A PNG cut in half fails (verify reads PNG's data, and decoding fails too); the val split is named before the
    training one."""
    data = tmp_path / "d"
    colour_folders(data, "train", "abc")
    colour_folders(data, "val", "abc")
    whole = (data / "val" / "a" / "0.png").read_bytes()
    cut, empty = data / "val" / "a" / "1.png", data / "val" / "c" / "2.png"
    cut.write_bytes(whole[: len(whole) // 2])  # a 75-byte PNG: its pixel data cut
    empty.write_bytes(b"")
    (data / "train" / "b" / "3.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match=r"^2 of the 12 val images cannot be read \(") as info:
        oracle_run(tmp_path, monkeypatch, data)
    said = str(info.value)
    assert f"{cut}: " in said and f"{empty}: not an image format PIL can read" in said
    assert str(data / "train") not in said and not (tmp_path / "run").exists()
    cut.write_bytes(whole)
    empty.write_bytes(whole)
    with pytest.raises(DatasetFormatError, match=f"^{data / 'train' / 'b' / '3.png'}: not an image format"):
        oracle_run(tmp_path, monkeypatch, data)
    assert not (tmp_path / "run").exists()


def _fails_on_odd(item):
    if item % 2:
        raise DatasetFormatError(f"item {item} is odd")


@pytest.mark.parametrize("workers", [0, 2])
def test_failed_checks_name_every_failure_in_order_with_or_without_workers(workers):
    assert failed_checks(range(20), _fails_on_odd, num_workers=workers, chunk=3) == [
        f"item {i} is odd" for i in range(1, 20, 2)
    ]
    assert failed_checks([], _fails_on_odd, num_workers=workers) == []


# -- a failure after training started keeps the training done ----------------------------------------------------


class Mendable(torch.utils.data.Dataset):
    """32 samples; while ``broken``, the ``fail_at``-th sample loaded fails as a damaged file does."""

    def __init__(self, fail_at=None):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.fail_at, self.loads = fail_at, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.loads += 1
        if self.loads == self.fail_at:
            raise DatasetFormatError(f"sample {i}: truncated or corrupt image")
        return self.x[i], self.y[i]


def trainer(out, data=None, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 2))
    settings = {"epochs": 3, "batch_size": 8, "lr": 0.05, "num_workers": 0, "log_every": 1, "best_metric": "acc"}
    cfg = TrainConfig(**{**settings, **overrides})
    data = data if data is not None else Mendable()
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    return Trainer(model, data, cfg, out, loss_fn=loss, device="cpu")


def accuracy(model):
    data = Mendable()
    return {"acc": float((model(data.x).argmax(-1) == data.y).float().mean()), "n": float(len(data))}


def failing_once(on_call):
    calls = []

    def evaluate(model):
        calls.append(1)
        if len(calls) == on_call:
            raise DatasetFormatError("val/dog/bad.jpg: not an image format PIL can read")
        return accuracy(model)

    return evaluate


def rows(path, columns=("step", "epoch", "loss", "lr", "eval_acc", "eval_n")):
    with path.open(newline="") as fh:
        return [{k: v for k, v in r.items() if k in columns} for r in csv.DictReader(fh)]


def assert_same_run(out, full):
    assert rows(out / "metrics.csv") == rows(full.out_dir / "metrics.csv")  # no step logged twice or lost
    assert rows(out / "eval.csv") == rows(full.out_dir / "eval.csv")
    ours, theirs = (torch.load(p / "best.pt", weights_only=True) for p in (out, full.out_dir))
    assert ours["step"] == theirs["step"] and ours["eval_acc"] == theirs["eval_acc"]
    for k in theirs["model"]:
        assert torch.equal(ours["model"][k], theirs["model"][k]), k


def full_run(tmp_path, **overrides):
    full = trainer(tmp_path / "full", **overrides)
    full.eval_fn = accuracy
    full.fit()
    return full


@pytest.mark.parametrize("failing_epoch", [2, 3], ids=["mid-run", "last-epoch"])
def test_a_failure_in_validation_keeps_the_epoch_and_resume_runs_that_validation_first(tmp_path, failing_epoch):
    """The checkpoint was written after validation: a damaged val image lost the whole epoch (and, in the first
    epoch, left a folder a fresh run refused and --resume found no checkpoint in)."""
    full = full_run(tmp_path)
    out = tmp_path / "failed"
    failed = trainer(out)
    failed.eval_fn = failing_once(failing_epoch)
    with pytest.raises(DatasetFormatError, match="bad.jpg"):
        failed.fit()
    done = failing_epoch * failed.steps_per_epoch
    assert latest_checkpoint(out).name == f"checkpoint-{done:08d}.pt"  # the failing epoch's training is kept
    state = torch.load(latest_checkpoint(out), weights_only=True)
    assert state["eval_pending"] == failing_epoch - 1 and state["epoch"] == failing_epoch
    resumed = trainer(out)
    resumed.eval_fn = accuracy
    result = resumed.fit(resume=True)
    assert result["step"] == full.step and result["best"] == full.best
    assert resumed.evals_since_best == full.evals_since_best
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k  # bitwise: the resumed run is the same run
    assert_same_run(out, full)
    assert torch.load(latest_checkpoint(out), weights_only=True)["eval_pending"] is None


class Killed(Exception):
    pass


def test_a_crash_after_validation_logged_its_row_resumes_without_a_second_row(tmp_path, monkeypatch):
    """Killed after the validation wrote eval.csv and best.pt but before the checkpoint was written again with its
    outcome: the resume drops that row, validates again, and the logs are the uninterrupted run's."""
    full = full_run(tmp_path)
    out = tmp_path / "killed"
    killed = trainer(out)
    killed.eval_fn = accuracy
    real = Trainer.save_checkpoint

    def dies_after_the_second_validation(self, epoch, step_in_epoch, **pending):
        if epoch == 2 and pending.get("eval_pending") is None:
            raise Killed
        return real(self, epoch, step_in_epoch, **pending)

    monkeypatch.setattr(Trainer, "save_checkpoint", dies_after_the_second_validation)
    with pytest.raises(Killed):
        killed.fit()
    monkeypatch.setattr(Trainer, "save_checkpoint", real)
    assert len(rows(out / "eval.csv")) == 2  # the second validation's row was written
    resumed = trainer(out)
    resumed.eval_fn = accuracy
    resumed.fit(resume=True)
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert_same_run(out, full)


@pytest.mark.parametrize(
    "accum, fail_at",
    [(1, 20 + 32), (2, 22 + 32)],  # in the second epoch; with accumulation, part-way through a step's micro-batches
    ids=["between-steps", "mid-accumulation"],
)
def test_a_sample_that_fails_to_load_keeps_the_steps_done_and_resume_is_exact(tmp_path, accum, fail_at):
    """A damaged training file that passes the header check (a JPEG cut short) failed part-way through an epoch and
    lost every step since the last checkpoint."""
    full = full_run(tmp_path, accum_steps=accum)
    out = tmp_path / "failed"
    data = Mendable(fail_at=fail_at)
    failed = trainer(out, data, accum_steps=accum)
    failed.eval_fn = accuracy
    with pytest.raises(DatasetFormatError, match="truncated or corrupt"):
        failed.fit()
    assert failed.step == failed.steps_per_epoch + 2  # two steps of the second epoch done ...
    assert latest_checkpoint(out).name == f"checkpoint-{failed.step:08d}.pt"  # ... and kept
    data.fail_at = None  # the file mended
    resumed = trainer(out, data, accum_steps=accum)
    resumed.eval_fn = accuracy
    resumed.fit(resume=True)
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert_same_run(out, full)


def test_a_damaged_or_missing_validation_rendering_is_refused_before_any_training(tmp_path, monkeypatch):
    """The reconstruction recipe read its validation models at the first validation, after an epoch."""
    import attnzoo
    from attnzoo.registry import ModelEntry
    from attnzoo.training.reconstruction import train_reconstruction
    from attnzoo.vision.lrgt import LRGT
    from tests.shapes3d import write_shapenet
    from tests.training.test_reconstruction_recipe import TINY

    monkeypatch.setitem(
        attnzoo.registry._MODELS,
        "lrgt_tiny_test",
        ModelEntry("lrgt_tiny_test", lambda **kw: LRGT(**TINY, **kw), "lrgt", ("multiview-3d-reconstruction",)),
    )
    root = write_shapenet(tmp_path / "shapenet", kinds=("box", "ball"), per_kind=(2, 1, 0))
    damaged = root / "ShapeNetRendering" / "01000000" / "box_val_0" / "rendering" / "01.png"
    damaged.write_bytes(damaged.read_bytes()[:-30])
    missing = root / "ShapeNetRendering" / "02000000" / "ball_val_0" / "rendering" / "02.png"
    missing.unlink()
    settings = ["epochs=1", "batch_size=2", "num_workers=0", "deit_weights=null"]
    with pytest.raises(DatasetFormatError, match=r"^2 of the 2 validation models cannot be read \(") as info:
        train_reconstruction("lrgt_tiny_test", root, tmp_path / "run", overrides=settings, device="cpu")
    assert f"{damaged}: truncated or corrupt rendering" in str(info.value)
    assert f"{missing}: missing rendering" in str(info.value)
    assert not (tmp_path / "run").exists()
    # check_images=false: not read before training; the first validation meets a damaged model, after the epoch saved
    with pytest.raises(AttnzooError, match=r"(truncated or corrupt|missing) rendering"):
        train_reconstruction(
            "lrgt_tiny_test", root, tmp_path / "run", overrides=[*settings, "check_images=false"], device="cpu"
        )
    state = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert state["eval_pending"] == 0 and state["config"]["extra"]["check_images"] is False


def test_the_check_refuses_only_what_decoding_refuses(tmp_path):
    """PIL's verify is stricter than decoding: a PNG without its end marker, or with a bad checksum on a text chunk
    after the pixels, decodes fine (the loader reads it), so the check before training takes it too."""
    import struct

    from PIL import Image

    from attnzoo.datasets.images import load_image
    from attnzoo.training.classification import _check_image

    Image.new("RGB", (30, 20), (200, 40, 40)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    end = data.rindex(b"IEND") - 4
    (tmp_path / "no_end.png").write_bytes(data[:end])
    text = struct.pack(">I", 3) + b"tEXtk\x00v" + struct.pack(">I", 12345)  # a wrong CRC
    (tmp_path / "bad_text.png").write_bytes(data[:end] + text + data[end:])
    for name in ("no_end.png", "bad_text.png"):
        with Image.open(tmp_path / name) as image, pytest.raises(Exception):  # noqa: B017, PT011
            image.verify()  # the premise: verify refuses it
        load_image(tmp_path / name)  # the loader reads it
        _check_image(tmp_path / name)  # and so does the check
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFormatError, match="truncated or corrupt"):
        _check_image(tmp_path / "half.png")


# -- a run that saved no checkpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure, at_step",
    [(RuntimeError, 0), (KeyboardInterrupt, 0), (RuntimeError, 3)],
    ids=["error-in-first-forward", "ctrl-c-at-step-0", "error-before-first-checkpoint"],
)
def test_resume_of_a_run_that_saved_no_checkpoint_starts_it_again_from_step_0(tmp_path, caplog, failure, at_step):
    """A run stopped before its first checkpoint by something other than a sample failing to load (an error in the
    model's forward, Ctrl-C) left config.yaml, TensorBoard's file and maybe metrics.csv rows: a fresh run refused
    the folder (an earlier run is there) and --resume found no checkpoint in it. Now --resume starts it again from
    step 0, refusing other settings as a checkpoint's resume does, and the logs are those of one run."""
    full = full_run(tmp_path)
    out = tmp_path / "failed"
    failed = trainer(out)
    failed.eval_fn = accuracy
    loss = failed.loss_fn

    def fails_at_step(model, batch):
        if failed.step == at_step:
            raise failure("the model's forward failed")
        return loss(model, batch)

    failed.loss_fn = fails_at_step
    with pytest.raises(failure):
        failed.fit()
    assert latest_checkpoint(out) is None and (out / "config.yaml").is_file()
    assert len(rows(out / "metrics.csv")) == at_step if at_step else not (out / "metrics.csv").exists()
    with pytest.raises(WeightsError) as refused:  # no steps are kept: worded as what the run was started with
        trainer(out, lr=0.1).fit(resume=True)
    assert str(refused.value) == (
        f"cannot resume from {out / 'config.yaml'} (the run saved no checkpoint): it was started with other training "
        "settings (lr 0.05 -> 0.1); resume with the same settings, or start afresh with --overwrite or another --out"
    )
    resumed = trainer(out)
    resumed.eval_fn = accuracy
    with caplog.at_level("WARNING", logger="attnzoo.training.engine"):
        result = resumed.fit(resume=True)
    assert f"no checkpoint in {out} yet: starting from step 0" in caplog.messages
    assert result["step"] == full.step and result["best"] == full.best and "owed_validation" not in result
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k  # the run a fresh start gives
    assert_same_run(out, full)
    assert (out / "metrics.csv").read_text().count("step,epoch") == 1  # one header, each step once
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_resume_refuses_a_folder_holding_results_but_no_checkpoint(tmp_path):
    """Starting again from step 0 would discard a finished run's results whose checkpoints were removed."""
    out = tmp_path / "run"
    done = trainer(out, epochs=1)
    done.eval_fn = accuracy
    done.fit()
    for checkpoint in out.glob("checkpoint-*.pt"):
        checkpoint.unlink()
    logged = (out / "metrics.csv").read_text()
    with pytest.raises(WeightsError, match=r"holds the results of a run \(best.pt, eval.csv\) but no checkpoint"):
        trainer(out, epochs=1).fit(resume=True)
    assert (out / "best.pt").is_file() and len(rows(out / "eval.csv")) == 1
    assert (out / "metrics.csv").read_text() == logged  # its logs too: nothing is deleted before the refusal


def stopped_at_step_0(out, run_info):
    """A run of ``run_info`` stopped by Ctrl-C at step 0: config.yaml and TensorBoard's file, no checkpoint."""
    failed = trainer(out)
    failed.run_info = run_info

    def interrupted(model, batch):
        raise KeyboardInterrupt

    failed.loss_fn = interrupted
    with pytest.raises(KeyboardInterrupt):
        failed.fit()
    assert latest_checkpoint(out) is None and (out / "config.yaml").is_file()


@pytest.mark.parametrize("changed", ["model", "data"])
def test_resume_of_a_run_that_saved_no_checkpoint_refuses_another_model_or_data(tmp_path, changed):
    """The run restarted from step 0 is the one its config.yaml records: another model or data is another run,
    refused with the folder left as it was (as a checkpoint's resume refuses it)."""
    out = tmp_path / "run"
    recorded = {"task": "toy", "model": "mlp", "data": str(tmp_path / "data")}
    stopped_at_step_0(out, recorded)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = {**recorded, changed: "mlp_wide" if changed == "model" else str(tmp_path / "other")}
    resumed = trainer(out)
    resumed.run_info = other
    with pytest.raises(WeightsError) as refused:
        resumed.fit(resume=True)
    assert str(refused.value) == (
        f"cannot resume from {out / 'config.yaml'} (the run saved no checkpoint): it was started for another run "
        f"({changed} {recorded[changed]!r} -> {other[changed]!r}); resume with the same model and data, or start "
        "afresh with --overwrite or another --out"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    same = trainer(out)
    same.run_info = {**recorded, "data": str(tmp_path / "." / "data"), "weights": "other.safetensors"}
    assert same.fit(resume=True)["step"] == same.total_steps  # one path spelt two ways; the weights may change


@pytest.mark.parametrize(
    "record",
    [
        "batch_size: 8\nseed: 0\n",  # another tool's: the batch and seed match, no run recorded
        "batch_size: 8\nseed: 0\nrun: {}\neffective: {}\n",  # a run naming no task, model or data
        "batch_size: 8\nseed: 0\nrun: {task: toy, model: mlp, data: d}\n",  # no effective settings
        "batch_size: 8\nseed: 0\nrun: [toy, mlp]\neffective: {}\n",
        "- batch_size: 8\n",
    ],
    ids=["no-run", "run-naming-nothing", "no-effective", "run-not-a-mapping", "not-a-mapping"],
)
def test_resume_in_a_folder_of_another_tools_run_deletes_nothing(tmp_path, record):
    """A folder holding someone else's config.yaml (any YAML mapping passed: the keys it lacked counted as the
    defaults), metrics.csv and TensorBoard file: --resume deleted them and trained there. Only an attnzoo run's
    record (its effective settings, a run naming the task, model and data) is restarted; this is refused as any
    folder holding no checkpoint, untouched."""
    out = tmp_path / "theirs"
    (out / "tensorboard").mkdir(parents=True)
    (out / "config.yaml").write_text(record)
    (out / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
    (out / "tensorboard" / "events.out.tfevents.123.host").write_bytes(b"their events")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    mine = trainer(out)
    mine.run_info = {"task": "toy", "model": "mlp", "data": str(tmp_path / "d")}
    with pytest.raises(WeightsError) as refused:
        mine.fit(resume=True)
    assert str(refused.value) == f"--resume: no checkpoint-*.pt in {out} (--overwrite starts afresh)"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_validation_owed_on_resume_that_ends_the_patience_stops_the_run_early(tmp_path):
    """The validation a resume runs first can end the patience: the run stops early after it (``stopped_early``),
    while a run whose patience ends at its last validation ran every epoch (it did not stop early)."""
    calls = []

    def flat(model):  # the same score each time: no new best after the first validation
        calls.append(1)
        if len(calls) == 2:
            raise DatasetFormatError("val/dog/bad.jpg: not an image format PIL can read")
        return {"acc": 0.5}

    out = tmp_path / "failed"
    failed = trainer(out, epochs=3, early_stop_patience=1)
    failed.eval_fn = flat
    with pytest.raises(DatasetFormatError):
        failed.fit()
    resumed = trainer(out, epochs=3, early_stop_patience=1)
    resumed.eval_fn = flat
    result = resumed.fit(resume=True)
    assert result["owed_validation"] == 1 and result["stopped_early"]
    assert result["step"] == 2 * resumed.steps_per_epoch and len(rows(out / "eval.csv")) == 2  # epoch 2 never ran
    whole = trainer(tmp_path / "whole", epochs=2, early_stop_patience=1)
    whole.eval_fn = lambda model: {"acc": 0.5}
    result = whole.fit()
    assert result["step"] == whole.total_steps and not result["stopped_early"]


# -- the up-front check switched off -----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_with_check_images_false_a_damaged_image_fails_when_read_and_the_steps_done_are_kept(
    tmp_path, monkeypatch, split
):
    """check_images=false skips the check of every image before any work (1.5-2.5 min on ImageNet at each start):
    a damaged image then fails when it is read, with the training done saved, and --resume after mending it goes
    on. The setting is recorded, and may change on resume."""
    import yaml

    data = tmp_path / "d"
    colour_folders(data, "train", "abc")
    colour_folders(data, "val", "abc")
    bad = data / split / "b" / "bad.jpg"
    bad.write_bytes(b"<html>a page saved as a .jpg</html>")
    with pytest.raises(AttnzooError, match=f"^{bad}: not an image format PIL can read$"):  # typed, one line
        oracle_run(tmp_path, monkeypatch, data, "check_images=false")
    out = tmp_path / "run"
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["extra"]["check_images"] is False
    state = torch.load(latest_checkpoint(out), weights_only=True)
    if split == "val":  # the first epoch trained, saved before its validation
        assert state["step"] == 3 and state["eval_pending"] == 0
    else:  # 13 training images, 3 steps an epoch: the steps before the damaged one's are saved
        assert state["step"] < 6 and state["eval_pending"] is None
    with pytest.raises(DatasetFormatError, match=f"^{bad}: not an image format"):  # checked again: refused up front
        oracle_run(tmp_path, monkeypatch, data, "check_images=true", resume=True)
    bad.unlink()
    result, _ = oracle_run(tmp_path, monkeypatch, data, resume=True)
    assert result["step"] == 6 and result["eval_top1"] == 100.0
