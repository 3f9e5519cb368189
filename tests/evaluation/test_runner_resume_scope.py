"""What a resumed evaluation may reuse: the same split file (path and content), the same labels, the same
device and precision; answers of samples no longer in the data left out; NaN written as JSON's null; and the
WSI evaluation's model built for (and checked against) the data's classes; --limit a positive count."""

import json
import math

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import attnzoo
from attnzoo.cli import main
from attnzoo.errors import DatasetFormatError, InvalidInputError
from attnzoo.evaluation import EvalSample, TaskEvaluator, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _strict_json(text):
    """JSON as the standard has it: a bare NaN or Infinity is an error."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _lines(path):
    return [_strict_json(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- the runner, in memory


class _Echo:
    """A pipeline that answers each input with itself (NaN included)."""

    def iterate(self, inputs, **kwargs):
        yield from enumerate(inputs)


class _Values(TaskEvaluator):
    task = "values"

    def __init__(self, ids, value=1.0):
        self.ids, self.value = list(ids), value

    def samples(self):
        return [EvalSample(str(i), self.value, None) for i in self.ids]

    def record(self, sample, result):
        return {"value": result}

    def metrics(self, records):
        values = [r["value"] for r in records]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return {"mean": float(np.mean(finite)) if finite else float("nan"), "ids": sorted(r["id"] for r in records)}

    def report(self, metrics):
        return f"mean: {metrics['mean']}\n"


def test_answers_of_samples_no_longer_in_the_data_are_left_out_but_kept(tmp_path, capsys):
    evaluate(_Echo(), _Values(range(4)), tmp_path, settings={}, progress=False)
    metrics = evaluate(_Echo(), _Values(range(2, 6)), tmp_path, settings={}, progress=False)
    assert metrics["n"] == 4 and metrics["ids"] == ["2", "3", "4", "5"]  # not 6: 0 and 1 are not in this data
    assert [r["id"] for r in _lines(tmp_path / "predictions.jsonl")] == ["0", "1", "2", "3", "4", "5"]  # kept
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "2 prediction(s)" in said[0] and "not among this run's 4 samples" in said[0]
    said = []
    evaluate(_Echo(), _Values(range(1)), tmp_path, settings={}, progress=False, log=said.append)  # said where asked
    assert len(said) == 1 and "5 prediction(s)" in said[0]


def test_nan_is_written_as_null(tmp_path):
    metrics = evaluate(_Echo(), _Values(range(3), float("nan")), tmp_path, settings={"lr": 1.0}, progress=False)
    assert metrics["mean"] is None
    assert [r["value"] for r in _lines(tmp_path / "predictions.jsonl")] == [None, None, None]
    assert _strict_json((tmp_path / "metrics.json").read_text())["mean"] is None
    _strict_json((tmp_path / "run.json").read_text())


def test_an_older_runs_nan_lines_still_resume(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"task": "values"}))
    (tmp_path / "predictions.jsonl").write_text('{"id": "0", "value": NaN}\n{"id": "1", "value": 2.0}\n')
    metrics = evaluate(_Echo(), _Values(range(3), 4.0), tmp_path, settings={}, progress=False)
    assert metrics["n"] == 3 and metrics["mean"] == 3.0  # only sample 2 was run; the NaN one read back as null
    assert _strict_json((tmp_path / "metrics.json").read_text())["n"] == 3


# ----------------------------------------------------------------------------- attnzoo eval wsi-classification


def _write_bags(path, labels, dim=16, seed=0, prefix="test_"):
    """ACMIL's one-file layout: a group per slide with ``feat``, ``coords`` and its label."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for i, label in enumerate(labels):
            g = f.create_group(f"{prefix}{i}")
            g.create_dataset("feat", data=rng.normal(size=(5, dim)).astype(np.float16))
            g.create_dataset("coords", data=np.zeros((5, 2), np.int64))
            if label is not None:
                g.attrs["label"] = label
    return path


def _eval(data, out, *extra):
    args = ["eval", "wsi-classification", "--model", "acmil_ga", "--data", str(data), "--out", str(out)]
    return main([*args, "--num-workers", "0", "--batch-size", "1", *extra])


def test_a_split_file_is_recorded_by_path_and_content(tmp_path, monkeypatch, capsys):
    data = _write_bags(tmp_path / "feats.h5", [0, 1] * 4, prefix="slide_")
    names = [f"slide_{i}" for i in range(8)]
    for folder, test in (("A", names[:4]), ("B", names[4:])):
        (tmp_path / folder).mkdir()
        split = {"train_names": [n for n in names if n not in test], "val_names": [], "test_names": test}
        (tmp_path / folder / "split_1.json").write_text(json.dumps(split))
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "A")
    assert _eval(data, out, "--weights", "none", "--split", "split_1.json") == 0
    run = _strict_json((out / "run.json").read_text())
    assert run["split"] == str((tmp_path / "A" / "split_1.json").resolve()) and len(run["split_sha256"]) == 64
    capsys.readouterr()
    monkeypatch.chdir(tmp_path / "B")  # another file of the same name: another split, not resumed into a mix
    assert _eval(data, out, "--weights", "none", "--split", "split_1.json") == 1
    assert "split" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "A")
    assert _eval(data, out, "--weights", "none", "--split", str(tmp_path / "A" / "split_1.json")) == 0  # same file
    run.pop("split_sha256")  # a run.json of an older attnzoo: the split's content cannot be checked
    (out / "run.json").write_text(json.dumps(run))
    capsys.readouterr()
    assert _eval(data, out, "--weights", "none", "--split", "split_1.json") == 1
    err = capsys.readouterr().err
    assert "did not record split_sha256" in err and "--overwrite" in err
    # the message gives the value this run records: the file unchanged since, adding it continues the run
    # (its predictions kept) instead of --overwrite
    digest = run["split_sha256"] = _sha256(tmp_path / "A" / "split_1.json")
    assert f'"split_sha256": "{digest}"' in err and "unchanged" in err and str(out / "run.json") in err
    (out / "run.json").write_text(json.dumps(run))
    done = (out / "predictions.jsonl").read_text()
    assert _eval(data, out, "--weights", "none", "--split", "split_1.json") == 0, capsys.readouterr().err
    assert (out / "predictions.jsonl").read_text() == done  # resumed, nothing answered again


def _sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_edited_labels_csv_is_another_run(tmp_path, capsys):
    data = _write_bags(tmp_path / "feats.h5", [None] * 4)
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"test_{i},{i % 2}\n" for i in range(4)))
    out = tmp_path / "out"
    assert _eval(data, out, "--weights", "none") == 0
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"test_{i},{1 - i % 2}\n" for i in range(4)))
    capsys.readouterr()
    assert _eval(data, out, "--weights", "none") == 1  # the slides done would keep their old targets
    assert "labels_sha256" in capsys.readouterr().err


def test_the_device_and_dtype_are_recorded_and_held_to(tmp_path, capsys):
    data = _write_bags(tmp_path / "feats.h5", [0, 1, 0, 1])
    out = tmp_path / "out"
    assert _eval(data, out, "--weights", "none", "--device", "cpu") == 0
    run = _strict_json((out / "run.json").read_text())
    assert (run["device"], run["model_dtype"]) == ("cpu", "float32") and "precision" not in run
    (out / "run.json").write_text(json.dumps({**run, "device": "cuda"}))  # as if started on a GPU
    capsys.readouterr()
    assert _eval(data, out, "--weights", "none", "--device", "cpu") == 1
    err = capsys.readouterr().err
    assert "device" in err and "--device" in err
    old = {k: v for k, v in run.items() if k not in ("device", "model_dtype")}  # an older attnzoo's run.json
    (out / "run.json").write_text(json.dumps(old))
    assert _eval(data, out, "--weights", "none", "--device", "cpu") == 0
    assert "does not record the device and model_dtype" in capsys.readouterr().err
    assert _strict_json((out / "run.json").read_text())["device"] == "cpu"  # recorded from now on
    renamed = {**old, "device": "cpu", "precision": "float32"}  # the release that named the dtype "precision"
    (out / "run.json").write_text(json.dumps(renamed))
    assert _eval(data, out, "--weights", "none", "--device", "cpu") == 0
    assert "does not record" not in capsys.readouterr().err
    (out / "run.json").write_text(json.dumps({**renamed, "precision": "bfloat16"}))
    assert _eval(data, out, "--weights", "none", "--device", "cpu") == 1  # held to as the dtype
    assert "model_dtype" in capsys.readouterr().err


def test_dtype_auto_is_the_run_of_no_dtype(tmp_path, capsys):
    """--dtype auto means the model's own dtype, as no --dtype does: a run started one way resumes the other."""
    data = _write_bags(tmp_path / "feats.h5", [0, 1, 0, 1])
    out = tmp_path / "out"
    assert _eval(data, out, "--weights", "none", "--device", "cpu", "--dtype", "auto") == 0
    assert _strict_json((out / "run.json").read_text())["dtype"] is None
    assert _eval(data, out, "--weights", "none", "--device", "cpu") == 0
    assert _eval(data, out, "--weights", "none", "--device", "cpu", "--dtype", "bfloat16") == 1  # another run


def test_a_dtype_spelled_another_way_is_the_same_run(tmp_path, capsys):
    """--dtype bf16 and --dtype bfloat16 (fp16, float16 and half ...) name one dtype: a run started with one spelling
    resumes with another, its answers kept, as does a run.json of an earlier attnzoo that recorded the spelling as
    typed; another dtype is still another run."""
    data = _write_bags(tmp_path / "feats.h5", [0, 1, 0, 1])
    out = tmp_path / "out"
    base = ("--weights", "none", "--device", "cpu")
    assert _eval(data, out, *base, "--dtype", "bf16") == 0, capsys.readouterr().err
    run = _strict_json((out / "run.json").read_text())
    answers = (out / "predictions.jsonl").read_text()
    assert len(answers.splitlines()) == 4 and run["model_dtype"] == "bfloat16"
    for spelling in ("bfloat16", "BF16", "torch.bfloat16"):
        assert _eval(data, out, *base, "--dtype", spelling) == 0, (spelling, capsys.readouterr().err)
        assert (out / "predictions.jsonl").read_text() == answers, spelling  # resumed: nothing answered again
    for recorded in ("bf16", "bfloat16", "BF16"):  # as an earlier attnzoo recorded it: as typed
        (out / "run.json").write_text(json.dumps({**run, "dtype": recorded}))
        for spelling in ("bf16", "bfloat16"):
            assert _eval(data, out, *base, "--dtype", spelling) == 0, (recorded, spelling, capsys.readouterr().err)
    capsys.readouterr()
    for other in ("float16", "fp32", "auto"):  # another dtype: refused naming the dtype settings
        assert _eval(data, out, *base, "--dtype", other) == 1, other
        err = capsys.readouterr().err
        assert "other settings" in err and "dtype" in err and "--dtype" in err, (other, err)
    assert _eval(data, out, *base) == 1  # no --dtype: the model's own (float32), another run
    assert (out / "predictions.jsonl").read_text() == answers
    half = tmp_path / "half"
    assert _eval(data, half, *base, "--dtype", "half") == 0, capsys.readouterr().err
    for spelling in ("fp16", "float16"):
        assert _eval(data, half, *base, "--dtype", spelling) == 0, (spelling, capsys.readouterr().err)
    assert _eval(data, half, *base, "--dtype", "bf16") == 1


@pytest.mark.filterwarnings("ignore:AUC is undefined")
def test_one_class_metrics_are_valid_json(tmp_path):
    data = _write_bags(tmp_path / "feats.h5", [1, 1, 1])
    assert _eval(data, tmp_path / "out", "--weights", "none") == 0
    metrics = _strict_json((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["auc"] is None and metrics["n"] == 3  # AUC needs both classes
    assert "| AUC (macro one-vs-rest) | n/a |" in (tmp_path / "out" / "report.md").read_text()


def _bracs(tmp_path, n=9):
    """BRACS's layout: CLAM's per-slide h5 files, and bracs.csv whose 7 subtypes map to 3 classes."""
    folder = tmp_path / "h5_files"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = [",case_id,slide_id,split_info,full_path,label"]
    for i in range(n):
        with h5py.File(folder / f"BRACS_{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(4, 16)).astype(np.float32)
            f["coords"] = np.zeros((4, 2), np.int64)
        rows.append(f"{i},c{i},BRACS_{i},{'test' if i >= 3 else 'train'},x,{i % 7}")
    (tmp_path / "bracs.csv").write_text("\n".join(rows) + "\n")
    return folder, tmp_path / "bracs.csv"


def test_bracs_is_evaluated_with_its_three_classes(tmp_path, capsys):
    folder, split = _bracs(tmp_path)
    out = tmp_path / "random"
    assert _eval(folder, out, "--weights", "none", "--split", str(split)) == 0, capsys.readouterr().err
    assert {len(r["probabilities"]) for r in _lines(out / "predictions.jsonl")} == {3}
    torch.manual_seed(0)  # a training run's weights: 3 classes, and widths other than the defaults
    trained = attnzoo.create_model("acmil_ga", in_dim=16, n_classes=3, inner_dim=32, n_token=3, attn_dim=8)
    save_file(trained.state_dict(), tmp_path / "model.safetensors")
    out = tmp_path / "trained"
    assert _eval(folder, out, "--weights", str(tmp_path / "model.safetensors"), "--split", str(split)) == 0, (
        capsys.readouterr().err
    )
    from attnzoo.datasets.mil_features import read_feature_bags

    bags = read_feature_bags(folder)
    with torch.no_grad():
        test = [f"BRACS_{i}" for i in range(3, 9)]
        expected = {s: torch.softmax(trained.eval()(bags[s].features).slide_logits, -1)[0] for s in test}
    got = {r["id"]: r["probabilities"] for r in _lines(out / "predictions.jsonl")}
    assert got.keys() == expected.keys()
    for slide, probabilities in got.items():
        assert probabilities == pytest.approx(expected[slide].tolist(), abs=1e-6)


def test_a_model_with_other_classes_than_the_labels_is_refused_before_any_slide(tmp_path, capsys):
    folder, split = _bracs(tmp_path)
    save_file(attnzoo.create_model("abmil", in_dim=16, n_classes=2).state_dict(), tmp_path / "two.safetensors")
    out = tmp_path / "out"
    assert _eval(folder, out, "--weights", str(tmp_path / "two.safetensors"), "--split", str(split)) == 1
    err = capsys.readouterr().err
    assert "3 classes" in err and "predicts 2" in err
    assert not (out / "predictions.jsonl").exists()
    from attnzoo.evaluation.wsi import WSIClassificationEvaluator

    evaluator = WSIClassificationEvaluator(_write_bags(tmp_path / "three.h5", [0, 1, 2]), "all")
    evaluator.check_model(attnzoo.create_model("acmil_ga", in_dim=16, n_classes=3))
    with pytest.raises(DatasetFormatError, match="3 classes, but the model predicts 2"):
        evaluator.check_model(attnzoo.create_model("acmil_ga", in_dim=16))


def test_an_abmil_checkpoint_is_built_as_abmil(tmp_path, capsys):
    """ABMIL fixes its single branch: the checkpoint's n_token (1) is not passed on to it."""
    data = _write_bags(tmp_path / "feats.h5", [0, 1, 2, 0])
    torch.manual_seed(0)
    save_file(
        attnzoo.create_model("abmil", in_dim=16, n_classes=3, inner_dim=8).state_dict(), tmp_path / "a.safetensors"
    )
    args = ["eval", "wsi-classification", "--model", "abmil", "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*args, "--weights", str(tmp_path / "a.safetensors"), "--num-workers", "0"]) == 0, (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("limit", ["-2", "0"])
def test_limit_must_be_a_positive_count(tmp_path, capsys, limit):
    data = _write_bags(tmp_path / "feats.h5", [0, 1, 0, 1])
    assert _eval(data, tmp_path / "out", "--weights", "none", "--limit", limit) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()


def test_evaluators_refuse_a_limit_that_is_not_a_positive_count(tmp_path):
    from attnzoo.evaluation.reconstruction import MultiViewReconstructionEvaluator
    from attnzoo.evaluation.scanpath import ScanpathEvaluator
    from attnzoo.evaluation.wsi import WSIClassificationEvaluator

    data = _write_bags(tmp_path / "feats.h5", [0, 1, 0, 1])
    for bad in (-1, 0, 1.5, True):
        with pytest.raises(InvalidInputError, match="--limit"):
            WSIClassificationEvaluator(data, "all", limit=bad)
        with pytest.raises(InvalidInputError, match="--limit"):
            ScanpathEvaluator(tmp_path, limit=bad)
        with pytest.raises(InvalidInputError, match="--limit"):
            MultiViewReconstructionEvaluator(tmp_path, limit=bad)
    assert len(WSIClassificationEvaluator(data, "all", limit=3).samples()) == 3


# ----------------------------------------------------------------------------- shared rules of every evaluator


def test_the_dtype_of_a_model_without_parameters_is_its_dtype_attribute():
    """Subject insertion's FluxFillModel wraps a diffusers pipeline: no parameters(), but a dtype."""
    from types import SimpleNamespace

    from attnzoo.evaluation.runner import execution_settings

    class Wrapped:  # no parameters()
        dtype = torch.bfloat16

    assert execution_settings(SimpleNamespace(device="cpu", model=Wrapped())) == {
        "device": "cpu",
        "model_dtype": "bfloat16",
    }
    module = torch.nn.Linear(2, 2).to(torch.float64)  # a module: its parameters' dtype, as before
    assert execution_settings(SimpleNamespace(device="cpu", model=module))["model_dtype"] == "float64"


def test_every_evaluator_refuses_a_bad_limit_alike(tmp_path):
    """One rule, one wording, one error type (a usage error: exit code 2) for --limit in every evaluator."""
    from attnzoo.cli import main as cli_main
    from attnzoo.errors import InvalidOptionError
    from attnzoo.evaluation.classification import ClassificationEvaluator
    from attnzoo.evaluation.hallucination import HallucinationEvaluator
    from attnzoo.evaluation.reconstruction import MultiViewReconstructionEvaluator
    from attnzoo.evaluation.runner import check_limit
    from attnzoo.evaluation.scanpath import ScanpathEvaluator
    from attnzoo.evaluation.subject_insertion import SubjectInsertionEvaluator
    from attnzoo.evaluation.wsi import WSIClassificationEvaluator

    assert issubclass(InvalidOptionError, InvalidInputError)
    assert check_limit(None) is None and check_limit(3) == 3
    with pytest.raises(InvalidOptionError) as expected:
        check_limit(0)
    wording = str(expected.value)
    assert wording.startswith("--limit must be a positive integer")
    for evaluator in (
        lambda: ClassificationEvaluator(tmp_path, limit=0),
        lambda: HallucinationEvaluator(tmp_path, limit=0),
        lambda: MultiViewReconstructionEvaluator(tmp_path, limit=0),
        lambda: ScanpathEvaluator(tmp_path, limit=0),
        lambda: SubjectInsertionEvaluator(tmp_path, limit=0),
        lambda: WSIClassificationEvaluator(tmp_path, "all", limit=0),
    ):
        with pytest.raises(InvalidOptionError) as err:
            evaluator()
        assert str(err.value) == wording
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidOptionError, match="--limit must be a positive integer"):
            ClassificationEvaluator(tmp_path, limit=bad)
    assert cli_main(["eval", "image-classification", "--data", str(tmp_path), "--limit", "0"]) == 2


def test_scanpath_and_hallucination_reports_show_a_missing_metric_as_n_a():
    """Every report writes a metric no sample could give as the runner's format_metric does ("n/a"); the
    scanpath Δ of a behaviour the observers never show stays "inf" (JSON and report)."""
    from attnzoo.evaluation.hallucination import HallucinationEvaluator
    from attnzoo.evaluation.runner import format_metric
    from attnzoo.evaluation.scanpath import ScanpathEvaluator, _nan_to_none

    missing = format_metric(None)
    assert missing == format_metric(math.nan) == "n/a"
    # report() reads only the metrics and, for scanpaths, which kind of dataset: no data needed
    search = object.__new__(ScanpathEvaluator)
    search.is_search = True
    row = {"ss": 0.5, "edit_distance": math.nan, "multimatch": None, "nss": 1.25, "delta": math.inf, "n": 3}
    metrics = _nan_to_none({"dataset": "amazon", "rows": {"model (greedy)": row}})
    assert metrics["rows"]["model (greedy)"]["delta"] == "inf"
    line = next(s for s in search.report(metrics).splitlines() if s.startswith("| model (greedy)"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:6] == ["0.5000", missing, missing, "1.2500", "inf"] and cells[-1] == "3"
    assert "–" not in line

    chair = {"benchmark": "chair", "chair_s": 12.5, "chair_i": None, "recall": math.nan, "length": 7, "n": 2}
    line = next(s for s in object.__new__(HallucinationEvaluator).report(chair).splitlines() if s.startswith("| none"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:] == ["12.50", missing, missing, "7", "2"]


# ----------------------------------------------------------------------------- one run or a plan of runs per --out


def _tree(folder):
    """Every file under ``folder`` with its bytes: what a refused command must leave as it was."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_sweep_and_a_single_run_never_share_an_out(tmp_path, monkeypatch, capsys):
    """A single run writes at the top of --out, a view sweep one sub-folder per run beside its report: either
    into the other's --out (--overwrite or not) is refused before anything is written; reruns still resume."""
    from attnzoo.vision.lrgt import LRGT
    from tests.helpers import register_test_model
    from tests.pipelines.test_multiview_reconstruction import TINY
    from tests.shapes3d import write_shapenet

    register_test_model(monkeypatch, "lrgt_layout_test", lambda **kw: LRGT(**TINY, noise_seed=0), like="lrgt")
    root = write_shapenet(tmp_path / "shapenet", kinds=("box",), per_kind=(0, 0, 1), n_views=2)
    args = ["eval", "multiview-3d-reconstruction", "--model", "lrgt_layout_test", "--weights", "none"]
    args += ["--data", str(root), "--num-workers", "0"]
    sweep, single = tmp_path / "sweep", tmp_path / "single"
    assert main([*args, "--out", str(sweep), "--views", "1,2"]) == 0
    assert main([*args, "--out", str(single), "--views", "1"]) == 0
    before = {out: _tree(out) for out in (sweep, single)}
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main([*args, "--out", str(sweep), "--views", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert "views-1/, views-2/" in err and "choose another --out or remove the folder" in err
        assert main([*args, "--out", str(single), "--views", "1,2", *extra]) == 2
        err = capsys.readouterr().err
        assert "holds a single run" in err and "choose another --out or remove the folder" in err
    assert {out: _tree(out) for out in (sweep, single)} == before  # nothing written, nothing removed
    assert main([*args, "--out", str(sweep), "--views", "1,2"]) == 0  # the same sweep again: resumed
    assert main([*args, "--out", str(single), "--views", "1"]) == 0
    assert not (sweep / "run.json").exists() and not any(p.is_dir() for p in single.iterdir())


def test_a_comparison_and_a_single_method_never_share_an_out(tmp_path, capsys):
    """The same for hallucination's --methods (sub-folders and comparison.md) and a single --method."""
    from tests.datasets.test_pope import write_pope_tree
    from tests.evaluation.test_hallucination_e2e import TINY, with_pictures

    pope = with_pictures(write_pope_tree(tmp_path / "pope", images=1, per_image=1))
    args = ["eval", "hallucination-mitigation", *TINY, "--benchmark", "pope", "--split", "random", "--data", str(pope)]
    compared, single = tmp_path / "compared", tmp_path / "single"
    assert main([*args, "--methods", "none,vcd", "--out", str(compared)]) == 0
    assert main([*args, "--method", "none", "--out", str(single)]) == 0
    before = {out: _tree(out) for out in (compared, single)}
    capsys.readouterr()
    assert main([*args, "--method", "none", "--out", str(compared), "--overwrite"]) == 2
    assert "none/, vcd/" in capsys.readouterr().err
    assert main([*args, "--methods", "none,vcd", "--out", str(single)]) == 2
    assert "holds a single run" in capsys.readouterr().err
    assert {out: _tree(out) for out in (compared, single)} == before
    assert main([*args, "--methods", "none,vcd", "--out", str(compared)]) == 0  # resumed


def test_eval_records_which_weights_ran_and_older_runs_still_resume(tmp_path, monkeypatch, capsys):
    """run.json and metrics.json name the weights that ran (the pipeline's label: a tiny stand-in, a random
    seed, a file by its absolute path), beside the "weights" setting as before; a run.json of an older attnzoo,
    without that label, is still resumed, and a file given by a relative path resumes the run of its absolute."""
    from tests.datasets.test_pope import write_pope_tree
    from tests.evaluation.test_hallucination_e2e import TINY, with_pictures

    pope = with_pictures(write_pope_tree(tmp_path / "pope", images=1, per_image=1))
    out = tmp_path / "lvlm"
    args = ["eval", "hallucination-mitigation", *TINY, "--benchmark", "pope", "--split", "random", "--data", str(pope)]
    assert main([*args, "--out", str(out)]) == 0
    ran = attnzoo.pipeline("hallucination-mitigation", weights="none", device="cpu").weights_label
    assert "tiny" in ran  # the task's default model name stands for a tiny random model without weights
    run, metrics = (_strict_json((out / name).read_text()) for name in ("run.json", "metrics.json"))
    assert run["weights"] == metrics["weights"] == "none"  # as before: older runs still compare alike
    assert run["weights_label"] == metrics["weights_label"] == ran
    older = {k: v for k, v in run.items() if k != "weights_label"}
    (out / "run.json").write_text(json.dumps(older))
    answered = (out / "predictions.jsonl").read_text()
    assert main([*args, "--out", str(out)]) == 0  # resumed, not refused for the label it lacks
    assert (out / "predictions.jsonl").read_text() == answered

    data = _write_bags(tmp_path / "feats.h5", [0, 1, 0, 1])
    torch.manual_seed(0)
    save_file(attnzoo.create_model("acmil_ga", in_dim=16, n_classes=2).state_dict(), tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    assert _eval(data, tmp_path / "wsi", "--weights", "w.safetensors") == 0
    recorded = _strict_json((tmp_path / "wsi" / "run.json").read_text())["weights_label"]
    assert recorded == str((tmp_path / "w.safetensors").resolve())
    assert _eval(data, tmp_path / "wsi", "--weights", str(tmp_path / "w.safetensors")) == 0  # the same run


@pytest.mark.filterwarnings("ignore:AUC is undefined")
def test_the_summary_line_shows_a_metric_no_sample_could_give_as_n_a(tmp_path, capsys):
    data = _write_bags(tmp_path / "feats.h5", [1, 1, 1])
    assert _eval(data, tmp_path / "out", "--weights", "none") == 0
    assert _strict_json((tmp_path / "out" / "metrics.json").read_text())["auc"] is None  # AUC needs both classes
    line = capsys.readouterr().out.splitlines()[0]
    assert " auc=n/a " in f" {line} " and "None" not in line
