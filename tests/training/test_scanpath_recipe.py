"""The OAT recipe on a tiny Amazon (STI layout) set, then its weights through pipeline("scanpath")
and the scanpath evaluation."""

import csv
import json

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.errors import InvalidInputError
from tests.helpers import register_test_model
from tests.scanpath_helpers import AMAZON_SIZE, write_amazon

SMALL = {
    "emb_size": 64,
    "nhead": 2,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "dim_feedforward": 64,
    "CA_d_k": 16,
}


def amazon_set(root, collages=4, subjects=5, seed=0):
    """Collages whose observers look at two covers (a a b a or a b b a) and end on the target (cell centres of the 10 px grid)."""
    rng = np.random.default_rng(seed)
    w, h = AMAZON_SIZE
    entries = {}
    for k in range(1, collages + 1):
        target = int(rng.integers(84))
        r, c = divmod(target, 14)
        fixations = {}
        for s in range(1, subjects + 1):
            a, b = rng.choice([o for o in range(84) if o != target], 2, replace=False)
            others = [a, a, b, a] if s % 2 else [a, b, b, a]  # a refixation and a revisit: every statistic > 0
            path = [(int(o % 14) * 10 + 5, int(o // 14) * 10 + 5) for o in others] + [(c * 10 + 5, r * 10 + 5)]
            fixations[str(s)] = [list(p) for p in path]
        entries[f"{k}.jpg"] = {
            "fixations": fixations,
            "ground_truth": [{"xmin": c * 10, "xmax": c * 10 + 10, "ymin": r * 10, "ymax": r * 10 + 10}],
            "size": {"height": h, "width": w},
            "target": f"target_{k % 5}.jpg",
        }
    return write_amazon(root, entries=entries)["folder"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from attnzoo.training.scanpath import train_scanpath

    root = tmp_path_factory.mktemp("oat")
    data = amazon_set(root / "data")
    result = train_scanpath(
        "oat_amazon",
        data,
        root / "run",
        overrides={"epochs": 4, "batch_size": 4, "lr": 2e-3, "log_every": 1},
        device="cpu",
        model_kwargs=SMALL,
    )
    return data, root / "run", result


def test_training_lowers_the_loss_and_keeps_the_best_epoch_by_delta(trained):
    data, run, result = trained
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    evals = list(csv.DictReader((run / "eval.csv").open()))
    assert evals and "eval_delta" in evals[0]
    import torch

    best = torch.load(run / "best.pt", weights_only=True)
    assert best["eval_delta"] == min(float(r["eval_delta"]) for r in evals)  # Δ: lower is better
    test = json.loads((run / "test_metrics.json").read_text())
    assert {"ss", "edit_distance", "delta", "max_len"} <= set(test)
    # the official max_len: the longest training sequence (4 fixations + the target here)
    assert test["max_len"] == 5 and result["max_len"] == 5
    assert (run / "model.safetensors").is_file() and "stopped_early" in result
    config = (run / "config.yaml").read_text()
    assert "early_stop_patience: 30" in config and "optimizer: adam" in config and "best_mode: min" in config


def test_every_evaluation_reports_the_metrics_best_metric_is_checked_against(trained, monkeypatch):
    """The model's statistics were left out of an evaluation where none of its scanpaths had any: eval.csv then
    took its columns from whichever row came first, and best_metric=model_length would be missing."""
    import attnzoo.training.scanpath as recipe

    data, run, result = trained
    with (run / "eval.csv").open() as fh:
        assert next(csv.reader(fh))[2:] == [f"eval_{name}" for name in recipe.METRICS]
    no_statistics = {"ss": 0.0, "edit_distance": 1.0, "delta": float("inf")}  # no scanpath reached the target
    monkeypatch.setattr(recipe, "evaluate_search", lambda model, samples, max_len: no_statistics)
    metrics = recipe._validation(torch.nn.Identity(), recipe.SearchSamples([]), 5)
    assert list(metrics) == list(recipe.METRICS) and all(np.isnan(metrics[k]) for k in recipe.METRICS[3:])


def test_trained_weights_run_in_the_pipeline_and_the_evaluation(trained, tmp_path):
    from attnzoo.datasets.visual_search import AmazonCovers, official_split
    from attnzoo.evaluation import evaluate
    from attnzoo.evaluation.scanpath import ScanpathEvaluator
    from attnzoo.metrics.scanpath import average_search_statistics, search_statistics

    data, run, _ = trained
    pipe = attnzoo.pipeline("scanpath", model="oat", weights=run / "model.safetensors", model_kwargs=SMALL)
    trial = AmazonCovers(data)[0]
    assert (
        pipe.model.max_len == json.loads((run / "test_metrics.json").read_text())["max_len"]
    )  # decoding.json beside the weights
    sp = pipe(trial)
    assert 1 <= len(sp) <= 5 and ((sp.objects >= 0) & (sp.objects < 84)).all()
    evaluator = ScanpathEvaluator(data, "all", model_kind="oat")
    metrics = evaluate(pipe, evaluator, tmp_path / "eval", settings={}, progress=False)
    assert set(metrics["rows"]) == {"model (greedy)", "humans (inter-subject)"}
    human = metrics["rows"]["humans (inter-subject)"]
    expected = average_search_statistics(search_statistics(t.objects, t.target) for t in AmazonCovers(data))
    assert human["length"] == pytest.approx(expected["length"], abs=1e-4) and human["correct_target"] == 1.0
    assert metrics["rows"]["model (greedy)"]["n"] == len(AmazonCovers(data))
    # the tiny collages are far smaller than OAT's layout of grid cells in px: MultiMatch and the model's NSS of
    # objects are said to be n/a (MultiMatch came out below 0) instead of reported
    from types import SimpleNamespace

    assert metrics["multimatch"] is None and metrics["rows"]["humans (inter-subject)"]["multimatch"] is None
    assert metrics["nss"] is None and "this display is" in metrics["layout_note"]
    assert metrics["layout_note"] in (tmp_path / "eval" / "report.md").read_text()
    assert evaluator._layout_misfit(SimpleNamespace(grid=trial.grid, image_size=(2560, 1600))) is None
    # sampled decoding (OAT's "multi" rows): statistics averaged over each trial's samples first
    sampled_pipe = attnzoo.pipeline(
        "scanpath",
        model="oat",
        weights=run / "model.safetensors",
        model_kwargs=SMALL,
        strategy="sample",
        num_samples=3,
        seed=0,
    )
    sampled = evaluate(
        sampled_pipe,
        ScanpathEvaluator(data, "all", model_kind="oat", samples_per_trial=3),
        tmp_path / "eval-multi",
        settings={},
        progress=False,
    )
    row = sampled["rows"]["model (3 samples per trial)"]
    preds = [json.loads(line) for line in (tmp_path / "eval-multi" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(p["samples"]) == 3 for p in preds)
    from attnzoo.metrics.scanpath import search_statistics_over_samples

    trials = AmazonCovers(data)
    per_trial = [
        search_statistics_over_samples([s for s in p["samples"] if s], t.target) for p, t in zip(preds, trials)
    ]
    assert row["length"] == pytest.approx(np.mean([s["length"] for s in per_trial]), abs=1e-4)
    assert row["nss"] is None or np.isfinite(row["nss"])
    assert "Δ" in (tmp_path / "eval" / "report.md").read_text()
    test_ids = {(t.stimulus, t.subject) for t in official_split(list(AmazonCovers(data)), 0)["test"]}
    assert len(ScanpathEvaluator(data, "test", model_kind="oat").samples()) == len(test_ids)


def test_a_max_len_past_the_position_table_is_refused_before_training(tmp_path):
    """It trained an epoch, then validation's decoding refused it (and the run's files were left behind)."""
    from attnzoo.training.scanpath import train_scanpath

    data = amazon_set(tmp_path / "data")
    overrides = {"epochs": 1, "batch_size": 4, "max_len": 6000}
    with pytest.raises(InvalidInputError, match=r"max_len must be an integer in \[1, 5000\]"):
        train_scanpath("oat_amazon", data, tmp_path / "run", overrides=overrides, device="cpu", model_kwargs=SMALL)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_negative_split_seed_is_refused_before_training(tmp_path):
    """random.Random(-1) is random.Random(1): the run would record -1 and train on seed 1's split, and its
    weights' decoding.json would then be refused by the evaluation."""
    from attnzoo.training.scanpath import train_scanpath

    data = amazon_set(tmp_path / "data")
    for seed in (-1, 2**64):  # and past the seed range every seed here has
        overrides = {"epochs": 1, "batch_size": 4, "split_seed": seed}
        with pytest.raises(InvalidInputError, match=rf"split_seed must be an integer .*got {seed}"):
            train_scanpath("oat_amazon", data, tmp_path / "run", overrides=overrides, device="cpu", model_kwargs=SMALL)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_device_zero_is_the_first_gpu_not_the_default(tmp_path, monkeypatch):
    """device=0 (falsy) was dropped, so training ran on the default device; it is CUDA device 0, as in every
    pipeline: refused where there is none."""
    from attnzoo.training.scanpath import train_scanpath

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = amazon_set(tmp_path / "data")
    with pytest.raises(InvalidInputError, match="device=0 asked for CUDA"):
        train_scanpath("oat_amazon", data, tmp_path / "run", overrides={"epochs": 1}, device=0, model_kwargs=SMALL)


def test_oat_loss_ignores_pad():
    import torch
    import torch.nn.functional as F

    from attnzoo.training.scanpath import oat_loss

    logits = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    tgt_pos = torch.tensor([[8, 8], [1, 2], [6, 6], [7, 3]])  # the PAD (7) at step 3 of sample 0 does not count
    terms = [
        -F.log_softmax(logits[t, b], dim=0)[tgt_pos[t + 1, b]]
        for t in range(3)
        for b in range(2)
        if tgt_pos[t + 1, b] != 7
    ]
    torch.testing.assert_close(oat_loss(logits, tgt_pos, pad_idx=7), torch.stack(terms).mean())
    with pytest.raises(InvalidInputError):
        oat_loss(logits, tgt_pos[:3], pad_idx=7)


def test_nevaclip_has_nothing_to_train(tmp_path):
    from attnzoo.training.scanpath import train_scanpath

    with pytest.raises(InvalidInputError, match="nothing to train"):
        train_scanpath("nevaclip", tmp_path, tmp_path / "run")


def test_evaluation_defaults_to_the_runs_own_split(trained, tmp_path, capsys):
    import sys

    from attnzoo.evaluation.scanpath import evaluation_split

    def _scanpath_split(family, weights, split, seed):
        return evaluation_split(family, weights, split, "test", seed, lambda m: print(m, file=sys.stderr))

    data, run, _ = trained
    info = json.loads((run / "decoding.json").read_text())
    assert info == {"max_len": 5, "dataset": "amazon", "split": "official", "split_seed": 0, "drop_outliers": True}
    weights = run / "model.safetensors"
    assert _scanpath_split("oat", weights, None, None) == ("test", 0, True) and capsys.readouterr().err == ""
    (tmp_path / "decoding.json").write_text(
        json.dumps({**info, "split": "layout", "split_seed": 3, "drop_outliers": False})
    )
    other = tmp_path / "model.safetensors"
    assert _scanpath_split("oat", other, None, None) == ("test-by-layout", 3, False) and capsys.readouterr().err == ""
    assert _scanpath_split("oat", other, "test", None) == (
        "test",
        3,
        False,
    )  # asked for another split: done, with a warning
    assert "trained on the layout split" in capsys.readouterr().err
    assert _scanpath_split("oat", other, None, 4)[1] == 4 and "seed 3" in capsys.readouterr().err
    assert _scanpath_split("nevaclip", None, None, None) == ("test", 0, True)


@pytest.mark.slow
def test_cli_train_scanpath_and_resume_after_an_interruption(tmp_path, monkeypatch):
    """`attnzoo train scanpath` through attnzoo.cli.main, and `--resume` of the same command after a
    Ctrl-C in its second step (one epoch, a checkpoint after every step): the resumed run ends with
    the uninterrupted run's weights and test metrics, and logs each step once."""
    import torch
    from safetensors.torch import load_file

    import attnzoo.training.scanpath as recipe
    from attnzoo.cli import main
    from attnzoo.vision.oat import oat_amazon

    register_test_model(monkeypatch, "oat_tiny_cli", lambda **kw: oat_amazon(**{**SMALL, **kw}), like="oat_amazon")
    data = amazon_set(tmp_path / "data", collages=2, subjects=3)

    def train(out, *extra):
        args = [
            "train",
            "scanpath",
            "--model",
            "oat_tiny_cli",
            "--data",
            str(data),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
        settings = ["epochs=1", "batch_size=2", "checkpoint_every=1", "log_every=1", "num_workers=0"]
        return main([*args, *extra, *settings])

    assert train(tmp_path / "full") == 0
    real_loss, calls = recipe.teacher_forced_loss, []

    def interrupted_in_step_2(model, batch):
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(recipe, "teacher_forced_loss", interrupted_in_step_2)
    assert train(tmp_path / "cut") == 130  # the CLI's exit status for an interruption
    assert [p.name for p in (tmp_path / "cut").glob("checkpoint-*.pt")] == ["checkpoint-00000001.pt"]
    assert train(tmp_path / "cut", "--resume") == 0
    assert len(calls) == 3  # the resumed run took step 2 only
    full, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("full", "cut"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert (tmp_path / "cut" / "test_metrics.json").read_text() == (tmp_path / "full" / "test_metrics.json").read_text()
    steps = [row["step"] for row in csv.DictReader((tmp_path / "cut" / "metrics.csv").open())]
    assert steps == [row["step"] for row in csv.DictReader((tmp_path / "full" / "metrics.csv").open())] == ["1", "2"]
