"""``attnzoo eval scanpath`` with OAT through the command line: ``--samples``, ``--seed`` and
``--dataset`` on a tiny synthetic yogurt shelf set (OAT's layout: gaze .xlsx + full-size shelf images),
with a tiny OAT registered under ``oat_yogurt`` for the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.cli import main
from tests.scanpath_helpers import OAT_SMALL, use_model, write_oat_shelf


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def shelves(tmp_path_factory):
    """20 yogurt searches on 4 shelf layouts (3 x 9 objects), each ending on its target."""
    rng = np.random.default_rng(0)
    scanpaths = []
    for i in range(20):
        target = int(rng.integers(1, 28))
        looked = [int(o) for o in rng.integers(1, 28, int(rng.integers(1, 4)))] + [target]
        scanpaths.append(
            {
                "ID": 100 + i,
                "Sub_ID": i % 5,
                "Target": f"T3_{i % 3 + 1}",
                "Question": f"Q3_{i % 4 + 1}",
                "T_Package": target,
                "Choice": looked,
                "X": [100.0 + 60 * o for o in looked],
                "Y": [300.0] * len(looked),
            }
        )
    root = tmp_path_factory.mktemp("yogurt")
    write_oat_shelf(root, "yogurt", scanpaths, image_size=(1680, 1050))
    return root


@pytest.fixture(scope="module")
def oat():
    return attnzoo.create_model("oat_yogurt", weights="none", seed=0, **OAT_SMALL).eval()


def evaluate(shelves, out, *options):
    return main(
        ["eval", "scanpath", "--model", "oat_yogurt", "--weights", "none", "--data", str(shelves), "--out", str(out)]
        + ["--num-workers", "0", *options]
    )


def test_samples_and_seed_reach_the_split_and_the_sampling(shelves, oat, tmp_path, monkeypatch):
    from attnzoo.datasets.visual_search import load_search_trials, split_search_trials

    use_model(monkeypatch, "oat_yogurt", lambda **kw: oat)
    trials = load_search_trials(shelves, "yogurt")
    tests = {seed: split_search_trials(trials, shelves, "yogurt", "official", seed)["test"] for seed in (3, 4)}
    assert [t.meta["scanpath_id"] for t in tests[3]] != [t.meta["scanpath_id"] for t in tests[4]]
    for seed in (3, 4):
        out = tmp_path / f"seed{seed}"
        assert evaluate(shelves, out, "--dataset", "yogurt", "--samples", "2", "--seed", str(seed)) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["dataset"] == "yogurt" and metrics["samples_per_trial"] == 2 and metrics["seed"] == seed
        assert "model (2 samples per trial)" in metrics["rows"] and metrics["n"] == len(tests[seed])
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        # the test trials of the split with this seed, in order, each with 2 scanpaths sampled with this seed
        assert [p["id"] for p in preds] == [str(t.meta["scanpath_id"]) for t in tests[seed]]
        pipe = attnzoo.pipeline("scanpath", model=oat, strategy="sample", num_samples=2, seed=seed)
        for pred, trial in zip(preds, tests[seed]):
            assert pred["samples"] == [sp.objects.tolist() for sp in pipe(trial)]


def test_greedy_without_samples_and_the_dataset_option(shelves, oat, tmp_path, monkeypatch, capsys):
    use_model(monkeypatch, "oat_yogurt", lambda **kw: oat)
    out = tmp_path / "greedy"
    assert evaluate(shelves, out, "--split", "all", "--limit", "3") == 0  # --dataset detected from the files
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "yogurt" and "model (greedy)" in metrics["rows"] and metrics["n"] == 3
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    pipe = attnzoo.pipeline("scanpath", model=oat)
    from attnzoo.datasets.visual_search import load_search_trials

    for pred, trial in zip(preds, load_search_trials(shelves, "yogurt")):
        assert pred["objects"] == pipe(trial).objects.tolist()
    capsys.readouterr()
    # the wrong shelf: its gaze file is not there (one line naming it); NevaClip's datasets are not OAT's
    assert evaluate(shelves, tmp_path / "wine", "--dataset", "wine") == 1
    assert "time_Q1_mousedel_new" in capsys.readouterr().err
    assert evaluate(shelves, tmp_path / "mit", "--dataset", "mit1003") == 1
    assert "OAT predicts visual search" in capsys.readouterr().err
    assert evaluate(shelves, tmp_path / "zero", "--samples", "-1") == 2  # a usage error
    assert "--samples" in capsys.readouterr().err


def test_run_oat_on_a_shelf_picture_with_boxes_from_a_file(shelves, oat, tmp_path, monkeypatch, capsys):
    from attnzoo.datasets.visual_search import shelf_boxes

    use_model(monkeypatch, "oat_yogurt", lambda **kw: oat)
    boxes = shelf_boxes("yogurt")
    (tmp_path / "boxes.json").write_text(json.dumps(boxes.tolist()))
    np.save(tmp_path / "boxes.npy", boxes)
    picture = shelves / "img" / "Question" / "Q3_1.png"
    expected = attnzoo.pipeline("scanpath", model=oat, max_len=3)(picture, boxes=boxes, target=4)
    for name in ("boxes.json", "boxes.npy"):
        out = tmp_path / name.replace(".", "-")
        args = ["run", "scanpath", str(picture), "--model", "oat_yogurt", "--weights", "none", "--out", str(out)]
        assert main([*args, "--boxes", str(tmp_path / name), "--target", "4", "--max-len", "3"]) == 0
        result = json.loads((out / "results.json").read_text())["results"][str(picture)]
        assert result["objects"] == expected.objects.tolist() and result["target"] == 4 and len(result["xy"]) <= 3
        assert result["weights"] == "random (seed 0)"  # OAT has no released weights: the record says so
        band = np.asarray(Image.open(out / "Q3_1.png").convert("RGB")).astype(int)[:44]  # the target line, the note
        assert (np.abs(band - np.array([170, 20, 20])).sum(-1) < 90).sum() > 20  # and the picture, in red
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("[[1, 2, 3, 4]")
    assert main([*args[:-2], "--boxes", str(tmp_path / "bad.json"), "--target", "4"]) == 1
    assert "bad.json could not be read" in capsys.readouterr().err
    assert main([*args[:-2], "--boxes", str(tmp_path / "boxes.json"), "--target", "4", "--fixations", "2"]) == 1
    assert "fixations" in capsys.readouterr().err  # NevaClip's setting, not OAT's


def test_samples_beyond_the_cap_are_refused_before_any_decoding(shelves, oat, tmp_path, monkeypatch, capsys):
    """A billion samples per trial would loop for hours drawing seeds: --samples is capped (the official
    evaluation samples 100), in the evaluator and on the command line, before anything is decoded."""
    from attnzoo.errors import InvalidOptionError
    from attnzoo.evaluation.scanpath import ScanpathEvaluator
    from attnzoo.vision import oat_decoding

    with pytest.raises(InvalidOptionError, match=r"--samples must be an integer in \[1, 10000\] \(sampled"):
        ScanpathEvaluator(shelves, model_kind="oat", samples_per_trial=10**9)
    with pytest.raises(InvalidOptionError, match="--samples"):
        ScanpathEvaluator(shelves, model_kind="oat", samples_per_trial=2.5)
    use_model(monkeypatch, "oat_yogurt", lambda **kw: oat)
    monkeypatch.setattr(oat_decoding, "trial_seeds", lambda *a, **k: pytest.fail("seeds drawn before the check"))
    capsys.readouterr()
    assert evaluate(shelves, tmp_path / "many", "--limit", "1", "--samples", "10001") == 2
    assert "--samples must be an integer in [1, 10000]" in capsys.readouterr().err


@pytest.mark.parametrize("samples", [(), ("--samples", "2")])
def test_a_negative_seed_is_refused_with_or_without_samples_before_the_data_is_read(
    shelves, oat, tmp_path, monkeypatch, capsys, samples
):
    """--seed seeds the split (``random.Random``, which takes -1 as 1: seed 1's split recorded as seed -1)
    and the sampling (torch generators, which the pipeline refuses a negative seed for): greedy or sampled,
    the same usage error naming --seed, before any trial is loaded."""
    from attnzoo.datasets import visual_search
    from attnzoo.errors import InvalidOptionError
    from attnzoo.evaluation.scanpath import ScanpathEvaluator

    use_model(monkeypatch, "oat_yogurt", lambda **kw: oat)
    assert evaluate(shelves, tmp_path / "ok", "--dataset", "yogurt", "--limit", "1", "--seed", "1", *samples) == 0
    monkeypatch.setattr(visual_search, "load_search_trials", lambda *a, **k: pytest.fail("trials loaded"))
    capsys.readouterr()
    assert evaluate(shelves, tmp_path / "negative", "--dataset", "yogurt", "--seed", "-1", *samples) == 2
    assert "--seed must be an integer in [0, 2**64), got -1" in capsys.readouterr().err
    assert not (tmp_path / "negative" / "metrics.json").exists()
    with pytest.raises(InvalidOptionError, match=r"--seed must be an integer in \[0, 2\*\*64\), got -3"):
        ScanpathEvaluator(shelves, model_kind="oat", seed=-3, samples_per_trial=2 if samples else None)
