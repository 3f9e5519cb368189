import json

import pytest
import torch
from safetensors.torch import save_file

import attnzoo
from attnzoo.cli import main
from attnzoo.datasets.imagenet import imagenet_synsets
from attnzoo.errors import DatasetFormatError, InvalidInputError
from attnzoo.evaluation import EvalSample, TaskEvaluator, evaluate
from attnzoo.tasks import get_evaluator

WNIDS = imagenet_synsets()[0]


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory, photo):
    """A tiny ImageNet synset-folder tree where the expected accuracy is known in advance.

    A fixed-weight model's own predictions decide the folders: even images are filed under
    their top-1 class (hits), odd images under a class outside their top-5 (misses).
    """
    root = tmp_path_factory.mktemp("imagenet")
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet")
    save_file(model.state_dict(), root / "weights.safetensors")
    pipe = attnzoo.pipeline("image-classification", model=model, device="cpu")
    staging = root / "staging"
    staging.mkdir()
    expected = []
    for i in range(8):
        im = photo.rotate(25 * i).resize((72 + 8 * i, 64))
        im.save(staging / f"{i}.png")
        ranked = [p.index for p in pipe(staging / f"{i}.png", top_k=5)]
        target = ranked[0] if i % 2 == 0 else next(c for c in range(1000) if c not in ranked)
        folder = root / "val" / WNIDS[target]
        folder.mkdir(parents=True, exist_ok=True)
        (staging / f"{i}.png").rename(folder / f"img{i}.png")
        expected.append((target, ranked))
    (root / "val" / WNIDS[0]).mkdir(exist_ok=True)
    (root / "val" / WNIDS[0] / "unreadable.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root, expected


def test_cli_eval_writes_correct_metrics(imagenet_tree, tmp_path, capsys):
    root, expected = imagenet_tree
    code = main(
        [
            "eval",
            "image-classification",
            "--model",
            "test_resnet",
            "--weights",
            str(root / "weights.safetensors"),
            "--data",
            str(root),
            "--out",
            str(tmp_path / "out"),
            "--batch-size",
            "3",
            "--num-workers",
            "0",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["skipped"] == 1
    assert metrics["top1"] == pytest.approx(100 * 4 / 8)
    assert metrics["top5"] == pytest.approx(100 * sum(t in r for t, r in expected) / 8)
    assert metrics["skipped_inputs"][0].endswith("unreadable.png")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "50.00" in report and "unreadable.png" in report
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all(len(p["pred"]) == 5 for p in preds)
    assert "top1=50.0" in capsys.readouterr().out


def test_issue_command_resnet18_random_weights(imagenet_tree, tmp_path):
    root, _ = imagenet_tree
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "image-classification",
                "--model",
                "resnet18",
                "--weights",
                "none",
                "--data",
                str(root),
                "--out",
                str(out),
                "--limit",
                "5",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["n"] + metrics["skipped"] == 5 and metrics["n"] == len(preds)
    assert metrics["top1"] == pytest.approx(100 * sum(p["pred"][0] == p["target"] for p in preds) / len(preds))
    assert metrics["top5"] == pytest.approx(100 * sum(p["target"] in p["pred"] for p in preds) / len(preds))


class Interrupting:
    """Wraps a pipeline and dies (like Ctrl-C) after ``n`` results."""

    def __init__(self, pipe, n):
        self.pipe, self.n = pipe, n

    def iterate(self, *args, **kwargs):
        for count, item in enumerate(self.pipe.iterate(*args, **kwargs)):
            if count == self.n:
                raise KeyboardInterrupt
            yield item


def test_resume_after_interruption(imagenet_tree, tmp_path):
    root, _ = imagenet_tree
    pipe = attnzoo.pipeline(
        "image-classification", model="test_resnet", weights=root / "weights.safetensors", device="cpu"
    )
    evaluator_cls = get_evaluator("image-classification")
    settings = {"model": "test_resnet", "data": str(root)}
    full = evaluate(pipe, evaluator_cls(root), tmp_path / "full", settings=settings, batch_size=2, progress=False)

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        evaluate(Interrupting(pipe, 5), evaluator_cls(root), out, settings=settings, batch_size=2, progress=False)
    assert not (out / "metrics.json").exists()
    done = (out / "predictions.jsonl").read_text().splitlines()
    skipped_before = (out / "skipped.jsonl").read_text().splitlines()
    assert 0 < len(done) < 8
    with open(out / "predictions.jsonl", "a") as fh:
        fh.write('{"id": "torn by a ki')  # a line cut by SIGKILL
    seen = []

    class Recording:
        def iterate(self, inputs, **kwargs):
            seen.extend(inputs)
            return pipe.iterate(inputs, **kwargs)

    resumed = evaluate(Recording(), evaluator_cls(root), out, settings=settings, batch_size=2, progress=False)
    assert len(seen) == 9 - len(done) - len(skipped_before)  # only what the first run had not finished
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 8
    for key in ("top1", "top5", "n", "skipped"):
        assert resumed[key] == full[key]


def test_the_python_api_checks_the_model_as_the_command_line_does(imagenet_tree, tmp_path):
    """evaluate() refuses a model the evaluator cannot score (here 10 classes on ImageNet's 1000) before
    anything is written or answered, as ``attnzoo eval`` does; it used to report a meaningless accuracy."""
    root, _ = imagenet_tree
    model = attnzoo.create_model("test_resnet", weights="none", num_classes=10)
    pipe = attnzoo.pipeline("image-classification", model=model, device="cpu")
    with pytest.raises(DatasetFormatError, match="the model predicts 10"):
        evaluate(pipe, get_evaluator("image-classification")(root), tmp_path / "o", settings={}, progress=False)
    assert not (tmp_path / "o").exists()


class _Numbers(TaskEvaluator):
    task = "numbers"

    def samples(self):
        return [EvalSample(str(i), i, i) for i in range(4)]

    def record(self, sample, result):
        return {"value": result}

    def metrics(self, records):
        return {}

    def report(self, metrics):
        return ""


class _FailsInItsSecondBatch:
    """Batches of two: the first holds an unreadable input (skipped) and an answer; the second fails."""

    def iterate(self, inputs, **kwargs):
        yield 0, InvalidInputError("unreadable")
        yield 1, 10
        raise RuntimeError("out of memory")


def test_answers_made_before_a_failure_are_kept(tmp_path):
    """A batch whose skipped input left fewer answers than the batch size kept them in memory only: a failure
    in the next batch (or a kill) lost them, and the resumed run made them again."""
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate(_FailsInItsSecondBatch(), _Numbers(), tmp_path, settings={}, batch_size=2, progress=False)
    assert [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()] == [
        {"id": "1", "value": 10}
    ]
    assert [json.loads(line)["id"] for line in (tmp_path / "skipped.jsonl").read_text().splitlines()] == ["0"]


class _Answers:
    def iterate(self, inputs, **kwargs):
        yield from enumerate(inputs)


class _Scored(_Numbers):
    headline = ("score",)

    def metrics(self, records):
        return {"score": sum(r["value"] for r in records)}


def test_a_setting_never_stands_where_a_metric_goes(tmp_path):
    """A run setting named like a metric showed in the metric's place (POPE's precision as "float32", the
    3-D F-score as "False" when not computed): a setting of a headline metric's name is refused before
    anything is written, and a metric always wins over a setting in metrics.json."""
    with pytest.raises(ValueError, match=r"_Scored: run setting\(s\) \['score'\] are named like its metrics"):
        evaluate(_Answers(), _Scored(), tmp_path / "a", settings={"score": False}, progress=False)
    assert not (tmp_path / "a").exists()
    metrics = evaluate(_Answers(), _Numbers(), tmp_path / "b", settings={"n": "a setting"}, progress=False)
    assert metrics["n"] == 4 and json.loads((tmp_path / "b" / "metrics.json").read_text())["n"] == 4


def test_other_settings_in_same_out_dir_is_an_error(imagenet_tree, tmp_path):
    root, _ = imagenet_tree
    pipe = attnzoo.pipeline(
        "image-classification", model="test_resnet", weights=root / "weights.safetensors", device="cpu"
    )
    ev = get_evaluator("classification")(root, limit=2)
    evaluate(pipe, ev, tmp_path, settings={"model": "a"}, progress=False)
    with pytest.raises(InvalidInputError, match="model"):
        evaluate(pipe, ev, tmp_path, settings={"model": "b"}, progress=False)
    again = evaluate(pipe, ev, tmp_path, settings={"model": "b"}, overwrite=True, progress=False)
    assert again["n"] + again["skipped"] == 2
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == again["n"]  # not appended to the old run


def test_all_inputs_unreadable(tmp_path):
    folder = tmp_path / "val" / WNIDS[3]
    folder.mkdir(parents=True)
    (folder / "x.jpg").write_bytes(b"nope")
    pipe = attnzoo.pipeline("image-classification", model="test_resnet", weights="none", device="cpu")
    with pytest.raises(InvalidInputError, match="no sample"):
        evaluate(pipe, get_evaluator("image-classification")(tmp_path), tmp_path / "o", settings={}, progress=False)


def test_a_resumed_run_keeps_skipped_inputs_unless_asked_to_retry_them(tmp_path, photo, capsys):
    folder = tmp_path / "val" / WNIDS[3]
    folder.mkdir(parents=True)
    photo.save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = ["eval", "image-classification", "-m", "test_resnet", "-w", "none", "--data", str(tmp_path)]
    run += ["--out", str(tmp_path / "o"), "--num-workers", "0"]
    assert main(run) == 0
    first = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (first["n"], first["skipped"]) == (1, 1)
    photo.save(folder / "bad.png")  # mended
    assert main(run) == 0  # resumed: what was skipped stays skipped (nothing left to do)
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["skipped"] == 1
    assert main([*run, "--retry-skipped"]) == 0
    again = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (again["n"], again["skipped"], again["skipped_inputs"]) == (2, 0, [])
    assert "bad.png" not in (tmp_path / "o" / "report.md").read_text()
    ids = [json.loads(line)["id"] for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 2  # the earlier prediction kept, not run twice


def test_a_users_own_jsonl_files_in_out_are_neither_read_nor_deleted(imagenet_tree, tmp_path):
    root, _ = imagenet_tree
    pipe = attnzoo.pipeline("image-classification", model="test_resnet", weights="none", device="cpu")
    ev = get_evaluator("image-classification")(root, limit=4)
    out = tmp_path / "o"
    out.mkdir()
    ids = [sample.id for sample in ev.samples()]
    mine = "".join(json.dumps({"id": i, "pred": [0], "target": 0}) + "\n" for i in ids[:3])
    for name in ("predictions-first3.jsonl", "skipped-old.jsonl"):
        (out / name).write_text(mine)
    metrics = evaluate(pipe, ev, out, settings={}, progress=False)
    assert metrics["n"] + metrics["skipped"] == 4  # not 1: the user's file named no sample done
    evaluate(pipe, ev, out, settings={}, overwrite=True, progress=False)
    assert all((out / name).read_text() == mine for name in ("predictions-first3.jsonl", "skipped-old.jsonl"))


def test_generic_folder_with_more_classes_than_the_model(tmp_path, photo):
    for cls in "abcd":
        (tmp_path / cls).mkdir()
        photo.save(tmp_path / cls / "1.png")
    from attnzoo.errors import DatasetFormatError

    with pytest.raises(DatasetFormatError, match="4 classes .* but the model predicts 3"):
        get_evaluator("image-classification")(tmp_path, num_classes=3)
    with pytest.raises(DatasetFormatError, match="4 classes .* but the model predicts 1000"):  # meaningless, not silent
        get_evaluator("image-classification")(tmp_path, num_classes=1000)
    from attnzoo.errors import InvalidInputError

    for bad in (0, -1):
        with pytest.raises(InvalidInputError, match="--limit"):
            get_evaluator("image-classification")(tmp_path, num_classes=4, limit=bad)
    assert len(get_evaluator("image-classification")(tmp_path, num_classes=4).samples()) == 4


@pytest.mark.slow
def test_eval_under_torchrun_shards_and_gathers(imagenet_tree, tmp_path):
    """Two processes (gloo) each take every other image; process 0 merges: same metrics and predictions as one process."""
    import os
    import subprocess
    import sys

    root, _ = imagenet_tree
    args = [
        "eval",
        "image-classification",
        "--model",
        "test_resnet",
        "--weights",
        str(root / "weights.safetensors"),
        "--data",
        str(root),
        "--batch-size",
        "3",
        "--num-workers",
        "0",
    ]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # the rendezvous binds a free port itself: nothing fixed to collide with
        "--nproc_per_node",
        "2",
        "-m",
        "attnzoo.cli",
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for key in ("top1", "top5", "n", "skipped", "skipped_inputs"):
        assert one[key] == two[key], key
    lines = lambda d, f: (tmp_path / d / f).read_text().splitlines()  # noqa: E731
    assert sorted(lines("two", "predictions.jsonl")) == sorted(lines("one", "predictions.jsonl"))
    assert not list((tmp_path / "two").glob("*.rank*.jsonl")) and proc.stdout.count("top1=") == 1


def test_an_answer_written_twice_into_one_out_is_counted_once(tmp_path):
    """Two processes appending to one --out (the same command started twice) left every answer twice in
    predictions.jsonl, and a resume counted each sample twice (n=6 of 4). Read back, an id is counted once, by its
    first line (as the merge of torchrun's shards keeps it), and the run says how many lines repeated an id."""
    out = tmp_path / "o"
    first = evaluate(_Answers(), _Scored(), out, settings={}, progress=False)
    assert (first["n"], first["score"]) == (4, 0 + 1 + 2 + 3)
    predictions = out / "predictions.jsonl"
    lines = predictions.read_text().splitlines(keepends=True)
    later = [json.dumps({**json.loads(line), "value": 100}) + "\n" for line in lines[:2]]  # another answer, later
    predictions.write_text("".join(lines + later))
    (out / "skipped.jsonl").write_text(2 * (json.dumps({"id": "9", "input": "9", "reason": "x"}) + "\n"))
    said = []
    again = evaluate(_Answers(), _Scored(), out, settings={}, progress=False, log=said.append)
    assert (again["n"], again["score"]) == (4, first["score"])  # each sample once, with its first answer
    assert any("2 answer(s) and 1 skipped input(s) more than once" in line for line in said), said


def test_a_second_process_on_the_same_out_is_refused_while_the_first_runs(tmp_path):
    """The same command started twice answered every sample twice into one predictions.jsonl; while one process
    holds --out (its lock), another is refused before it reads, deletes or writes anything there."""
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "o"
    evaluate(_Answers(), _Numbers(), out, settings={}, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with open(out / ".attnzoo-eval.lock", "a") as held:  # what the first process holds while it runs
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for overwrite in (False, True):
            with pytest.raises(InvalidInputError, match=f"another process is evaluating into {out}"):
                evaluate(_Answers(), _Numbers(), out, settings={}, progress=False, overwrite=overwrite)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert evaluate(_Answers(), _Numbers(), out, settings={}, progress=False, overwrite=True)["n"] == 4  # released
    assert evaluate(_Answers(), _Numbers(), out, settings={}, progress=False)["n"] == 4  # and again after a run


def test_rank_0_of_a_torchrun_job_and_a_single_process_hold_the_same_lock(tmp_path, monkeypatch):
    """Rank 0 deletes and merges the shards: it takes the lock a single process takes, so that a plain
    ``attnzoo eval --overwrite`` on the same --out cannot delete the shards a torchrun job appends to."""
    fcntl = pytest.importorskip("fcntl")
    import attnzoo._distributed as distributed
    from attnzoo._distributed import DistributedContext

    out = tmp_path / "o"
    out.mkdir()
    monkeypatch.setattr(distributed, "distributed_context", lambda: DistributedContext(0, 2, 0))
    with open(out / ".attnzoo-eval.lock", "a") as held:  # a single process evaluating there
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InvalidInputError, match=f"another process is evaluating into {out}"):
            evaluate(_Answers(), _Numbers(), out, settings={}, progress=False, overwrite=True)
