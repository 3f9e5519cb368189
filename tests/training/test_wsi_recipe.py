"""The whole-slide classification recipe on synthetic bags where a few instances carry the label."""

import json

import h5py
import numpy as np
import pytest
import torch

from attnzoo.errors import InvalidOptionError
from attnzoo.training.wsi import METRICS, train_wsi_classification

# one_thread (tests/conftest.py): one bag per step makes thousands of tiny matmuls: on a shared 2-core machine a
# second torch thread only adds contention (the two training tests ran 3-4x slower with two threads than with one).
pytestmark = pytest.mark.usefixtures("one_thread")


def write_acmil_h5(path, n_slides=48, n_instances=40, dim=16, seed=0):
    """ACMIL's layout: one group per slide with float16 ``feat`` [N, D], ``coords`` [N, 2] and attrs['label'].
    Positive slides hide 3 instances shifted along one direction among background noise."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    with h5py.File(path, "w") as f:
        for i in range(n_slides):
            label = i % 2
            feats = rng.normal(size=(n_instances, dim))
            if label:
                feats[rng.choice(n_instances, 3, replace=False)] += 4 * direction
            name = f"test_{i:03d}" if i >= n_slides * 3 // 4 else f"slide_{i:03d}"  # ACMIL's rule: 'test' in the name
            g = f.create_group(name)
            g.create_dataset("feat", data=feats.astype(np.float16))
            g.create_dataset("coords", data=rng.integers(0, 10_000, size=(n_instances, 2)))
            g.attrs["label"] = label
    return path


@pytest.mark.parametrize("model", ["abmil", "acmil_ga"])
def test_training_beats_chance_and_reports_seeds(tmp_path, model):
    data = write_acmil_h5(tmp_path / "patch_feats_pretrain_synthetic.h5")
    overrides = {"epochs": 6, "lr": 2e-3, "seeds": [1, 2], "log_every": 1000, "val_fraction": 0.2}
    result = train_wsi_classification(
        model,
        data,
        tmp_path / "run",
        overrides=overrides,
        device="cpu",
        model_kwargs={"inner_dim": 32} if model == "abmil" else {"inner_dim": 32, "n_masked_patch": 2},
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["seeds"]) == {"1", "2"} and summary["mean"]["auc"] >= 0.85, summary["mean"]  # chance: 0.5
    assert {"accuracy", "auc", "f1_micro", "f1_macro"} <= set(summary["sd"])
    for seed in (1, 2):
        test = json.loads((tmp_path / "run" / f"seed-{seed}" / "test_metrics.json").read_text())
        assert (
            test == result["seeds"][seed]["test"] and (tmp_path / "run" / f"seed-{seed}" / "model.safetensors").exists()
        )


def test_cli_train_command(tmp_path, capsys):
    from attnzoo.cli import main

    data = write_acmil_h5(tmp_path / "feats.h5", n_slides=12)
    code = main(
        [
            "train",
            "wsi-classification",
            "--model",
            "abmil",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "epochs=1",
            "seeds=[3]",
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["seeds"]) == ["3"] and "auc" in summary["mean"]
    # 12 slides: 3 test, 1 of the other 9 for validation, 8 to train on, one bag per step (it said "1 steps")
    assert "trained 8 steps;" in captured.out and summary["seeds"]["3"]["step"] == 8
    two = ["train", "wsi-classification", "--model", "abmil", "--data", str(data), "--out", str(tmp_path / "two")]
    assert main([*two, "epochs=1", "seeds=[3,4]", "--device", "cpu"]) == 0
    assert "trained 16 steps over 2 seeds" in capsys.readouterr().out


def _write_split(path, train, val, test):
    path.write_text(json.dumps({"train_names": train, "val_names": val, "test_names": test}))
    return path


def test_split_files_per_seed_missing_slides_and_labels(tmp_path):
    data = write_acmil_h5(tmp_path / "feats.h5", n_slides=12)
    names = [f"slide_{i:03d}" for i in range(9)]
    tests = [f"test_{i:03d}" for i in range(9, 12)]
    _write_split(tmp_path / "split_1.json", names[:7], names[7:], tests)
    _write_split(tmp_path / "split_2.json", names[2:], names[:2], tests)
    overrides = {"epochs": 1, "seeds": [1, 2], "log_every": 1000, "split": str(tmp_path / "split_{seed}.json")}
    train_wsi_classification(
        "abmil", data, tmp_path / "run", overrides=overrides, device="cpu", model_kwargs={"inner_dim": 8}
    )
    for seed, val in ((1, names[7:]), (2, names[:2])):  # each seed trained on its own split file, as ACMIL's script
        config = (tmp_path / "run" / f"seed-{seed}" / "config.yaml").read_text()
        assert all(name in config.split("val:")[1].split("test:")[0] for name in val)

    with pytest.warns(UserWarning, match="one split file"):  # one file for several seeds: allowed, with a warning
        train_wsi_classification(
            "abmil",
            data,
            tmp_path / "fixed",
            overrides={**overrides, "split": str(tmp_path / "split_1.json")},
            device="cpu",
            model_kwargs={"inner_dim": 8},
        )

    _write_split(tmp_path / "gaps.json", names[:7] + ["slide_999"], names[7:], tests + ["test_999"])
    gaps = {"epochs": 1, "seeds": [1], "log_every": 1000, "split": str(tmp_path / "gaps.json")}
    from attnzoo.errors import DatasetFormatError

    with pytest.raises(DatasetFormatError, match="slide_999"):  # never a silently smaller test set
        train_wsi_classification(
            "abmil", data, tmp_path / "gaps", overrides=gaps, device="cpu", model_kwargs={"inner_dim": 8}
        )
    with pytest.warns(UserWarning, match="test_999"):
        result = train_wsi_classification(
            "abmil",
            data,
            tmp_path / "gaps",
            overrides={**gaps, "allow_missing": True},
            device="cpu",
            model_kwargs={"inner_dim": 8},
        )
    assert result["seeds"]


def test_unlabelled_bags_are_a_clear_error(tmp_path):
    from attnzoo.errors import DatasetFormatError

    data = write_acmil_h5(tmp_path / "feats.h5", n_slides=8)
    with h5py.File(data, "a") as f:
        del f["slide_001"].attrs["label"]
    with pytest.raises(DatasetFormatError, match="slide_001.*labels=CSV"):
        train_wsi_classification(
            "abmil",
            data,
            tmp_path / "run",
            overrides={"epochs": 1, "seeds": [1]},
            device="cpu",
            model_kwargs={"inner_dim": 8},
        )


def test_resuming_several_seeds_starts_afresh_a_seed_killed_before_its_first_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from attnzoo.errors import InvalidOptionError

    data = write_acmil_h5(tmp_path / "feats.h5", n_slides=12)
    kwargs = {"overrides": {"epochs": 1, "seeds": [1, 2], "log_every": 1}, "device": "cpu"}
    kwargs["model_kwargs"] = {"inner_dim": 8}
    train_wsi_classification("abmil", data, tmp_path / "run", **kwargs)
    seed2 = tmp_path / "run" / "seed-2"
    full = load_file(seed2 / "model.safetensors")
    with pytest.raises(InvalidOptionError, match="run holds an earlier run .*--resume"):  # a rerun without --resume
        train_wsi_classification("abmil", data, tmp_path / "run", **kwargs)
    for path in seed2.glob("checkpoint-*.pt"):  # finished, its checkpoints deleted to save space: kept, refused
        path.unlink()
    with pytest.raises(InvalidOptionError, match="seed-2 holds the results of a finished seed .*test_metrics.json"):
        train_wsi_classification("abmil", data, tmp_path / "run", resume=True, **kwargs)
    assert (seed2 / "test_metrics.json").is_file() and (seed2 / "model.safetensors").is_file()
    # seed 2 as killed before its first checkpoint: its config and first log rows only
    for path in [*seed2.glob("*.pt"), seed2 / "model.safetensors", seed2 / "test_metrics.json"]:
        path.unlink()
    result = train_wsi_classification("abmil", data, tmp_path / "run", resume=True, **kwargs)
    assert set(result["seeds"]) == {1, 2}
    resumed = load_file(seed2 / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # seed 2 trained again from its start
    steps = [int(r.split(",")[0]) for r in (seed2 / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps))  # no step logged twice


def test_a_resume_that_runs_an_owed_validation_says_so(tmp_path, monkeypatch):
    """The validation failed after the last epoch's checkpoint: the resume runs it, and its result says so (for
    `attnzoo train`'s last line), by seed; a resume with nothing owed does not."""
    from attnzoo.errors import DatasetFormatError
    from attnzoo.training.engine import Trainer

    data = write_acmil_h5(tmp_path / "feats.h5", n_slides=12)
    kwargs = {"overrides": {"epochs": 1, "seeds": [3]}, "device": "cpu", "model_kwargs": {"inner_dim": 8}}
    real = Trainer._validate

    def fails(self, epoch, writer):
        raise DatasetFormatError("a damaged bag")

    monkeypatch.setattr(Trainer, "_validate", fails)
    with pytest.raises(DatasetFormatError):
        train_wsi_classification("abmil", data, tmp_path / "run", **kwargs)
    monkeypatch.setattr(Trainer, "_validate", real)
    result = train_wsi_classification("abmil", data, tmp_path / "run", resume=True, **kwargs)
    assert result["owed_validation"] == {3: 0}
    assert "owed_validation" not in train_wsi_classification("abmil", data, tmp_path / "run", resume=True, **kwargs)


@pytest.mark.parametrize(
    "seeds, wanted",
    [
        ("[1,1]", "seeds lists 1 more than once"),
        ("[1.5,1.7]", r"seeds\[0\] must be an integer in \[-9223372036854775808, 9223372036854775807\]"),
        ("[]", "seeds is empty"),
        ("1,,2", "seeds '1,,2' has a blank item"),
        ("abc", "seeds must be integers"),
        ("[1, 9223372036854775808]", r"seeds\[1\] must be an integer in"),
        ("[true]", r"seeds\[0\] must be an integer"),
        ("{a: 1}", r"seeds\[0\] must be an integer"),
    ],
)
def test_bad_seeds_are_refused_before_anything_is_read(tmp_path, seeds, wanted):
    with pytest.raises(InvalidOptionError, match=f"^{wanted}"):
        train_wsi_classification("abmil", tmp_path / "no data", tmp_path / "run", overrides=[f"seeds={seeds}"])
    assert not (tmp_path / "run").exists()


def test_seed_settings_that_name_seeds():
    from attnzoo.training.wsi import seed_list

    assert seed_list(None, 7) == [7] and seed_list(3, 7) == [3] and seed_list("1, 2,-3", 7) == [1, 2, -3]
    assert seed_list([2, 1], 7) == [2, 1]


def test_overwrite_discards_an_earlier_runs_seed_folders_and_resume_keeps_its_seeds(tmp_path):
    """--overwrite left an earlier run's seed-<s> folders and a later --resume with other seeds mixed them in."""
    data = write_acmil_h5(tmp_path / "feats.h5", n_slides=12)
    out = tmp_path / "run"

    def train(seeds, **kwargs):
        overrides = {"epochs": 1, "seeds": seeds, "log_every": 1000}
        return train_wsi_classification(
            "abmil", data, out, overrides=overrides, device="cpu", model_kwargs={"inner_dim": 8}, **kwargs
        )

    result = train([1, 2])
    assert result["step"] == 16 and [run["step"] for run in result["seeds"].values()] == [8, 8]  # 8 slides each
    (out / "seed-1" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidOptionError, match=r"is a run of seeds \[1, 2\], not \[1, 3\]: resume it with seeds="):
        train([1, 3], resume=True)
    with pytest.raises(InvalidOptionError, match="is a run of seeds"):
        train([4], resume=True)
    assert train([2, 1], resume=True)["step"] == 16  # the same seeds, in another order: finished, nothing to do

    assert train([4], overwrite=True)["step"] == 8
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["seed-1", "tensorboard"]
    assert [p.name for p in (out / "seed-1").iterdir()] == ["notes.txt"]  # only the user's file is left
    assert json.loads((out / "summary.json").read_text())["seeds"].keys() == {"4"}
    with pytest.raises(InvalidOptionError, match=r"is a run of seeds \[4\], not \[1, 2\]"):
        train([1, 2], resume=True)
    eval_columns = (out / "eval.csv").read_text().splitlines()[0].split(",")[2:]
    assert eval_columns == [f"eval_{name}" for name in METRICS]  # the names best_metric is checked against


def test_resume_refuses_other_seeds_of_a_run_that_did_not_record_them(tmp_path):
    """A run made before seeds.json existed: its seed folders tell which seeds it has."""
    data = write_acmil_h5(tmp_path / "feats.h5", n_slides=12)
    kwargs = {"device": "cpu", "model_kwargs": {"inner_dim": 8}}
    train_wsi_classification("abmil", data, tmp_path / "run", overrides={"epochs": 1, "seeds": [1, 2]}, **kwargs)
    (tmp_path / "run" / "seeds.json").unlink()
    with pytest.raises(InvalidOptionError, match=r"is a run of seeds \[1, 2\], not \[1, 3\]"):
        train_wsi_classification(
            "abmil", data, tmp_path / "run", overrides={"epochs": 1, "seeds": [1, 3]}, resume=True, **kwargs
        )
