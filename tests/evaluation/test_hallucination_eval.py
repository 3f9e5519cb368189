"""The hallucination-mitigation evaluator end to end through attnzoo.evaluation.evaluate, with a fake
LVLM pipeline (answers drawn from the sample, the method and the sample's seed) over synthetic POPE,
CHAIR and MME folders in their published layouts: scores, recorded settings, kill-and-resume, the
--methods comparison table, and two torchrun processes against one."""

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from attnzoo.errors import InvalidInputError, InvalidOptionError, MissingDependencyError
from attnzoo.evaluation import evaluate
from attnzoo.evaluation.hallucination import (
    PROMPT_SUFFIXES,
    HallucinationEvaluator,
    comparison_table,
    sample_seed,
    write_comparison_table,
)
from tests.datasets.test_chair import write_agla_list, write_coco_tree
from tests.datasets.test_mme import write_mme_tree
from tests.datasets.test_pope import write_pope_tree

REPO = Path(__file__).resolve().parents[2]
ANSWERS = [
    "Yes",
    "No",
    "Yes, there is a dog in the image.",
    "There is no dog in the image.",
    "NO",
    "I cannot tell.",
    "Nope",
]
CAPTIONS = [
    "A man walks his dog on a leash.",
    "A cat and a dog sleep on a couch next to a pizza.",
    "People eat pizza at a dining table with a car outside.",
    "An empty room with a chair.",
]


@dataclass
class FakeAnswer:
    answer: str


class FakeLVLM:
    """What the runner needs of pipeline("hallucination-mitigation"): ``iterate`` yielding (index,
    result with .answer). Answers depend on the image name, the question, the method and the seed."""

    task = "hallucination-mitigation"

    def __init__(self, method="none", **settings):
        self.method, self.settings, self.seen = method, settings, []

    def answer(self, item):
        key = f"{self.method}|{Path(item['image']).name}|{item['question']}|{item.get('seed')}"
        h = int(hashlib.sha256(key.encode()).hexdigest(), 16)
        return CAPTIONS[h % len(CAPTIONS)] if "describe" in item["question"] else ANSWERS[h % len(ANSWERS)]

    def iterate(self, items, batch_size=1, num_workers=0, on_error="skip"):
        for i, item in enumerate(items):
            self.seen.append(item)
            yield i, FakeAnswer(self.answer(item))


class Interrupting(FakeLVLM):
    """Dies like Ctrl-C after ``n`` answers."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    def iterate(self, items, **kw):
        for count, pair in enumerate(super().iterate(items, **kw)):
            if count == self.n:
                raise KeyboardInterrupt
            yield pair


def make_plan(root, **options):
    return HallucinationEvaluator.plan(
        root, options.pop("split", None), limit=options.pop("limit", None), model="fake", weights=None, **options
    )


def test_a_temperature_whose_logits_would_overflow_is_refused(tmp_path):
    root = write_pope_tree(tmp_path / "data")
    for temperature in (1e-320, float("inf"), 0.0):
        with pytest.raises(InvalidOptionError, match="--temperature must be a finite number >= 1e-4"):
            make_plan(root, do_sample=True, temperature=temperature)


def test_a_comparison_records_only_the_settings_each_method_takes(tmp_path):
    root = write_pope_tree(tmp_path / "data")
    plan = make_plan(root, methods="none,var,vcd,var+vcd", tau=2.0, alpha=0.5)
    recorded = {name: run["method_settings"] for name, _, run in plan.runs}
    assert recorded == {"none": {}, "var": {"tau": 2.0}, "vcd": {"alpha": 0.5}, "var+vcd": {"tau": 2.0, "alpha": 0.5}}
    with pytest.raises(InvalidOptionError, match="gamma are taken by none of --methods none,var"):
        make_plan(root, methods="none,var", gamma=2.0)


def run_plan(plan, root, out, pipe_factory=FakeLVLM, overwrite=False):
    """What ``attnzoo eval`` does with a plan: a pipeline per run (built from the run's keywords)."""
    results = {}
    for name, evaluator, run_settings in plan.runs:
        settings = {
            "model": plan.model,
            "data": str(Path(root).resolve()),
            "split": plan.split,
            **plan.settings,
            **run_settings,
        }
        run_out = Path(out) if name is None else Path(out) / name
        pipe = pipe_factory(**evaluator.pipeline_kwargs)
        results[name] = evaluate(
            pipe, evaluator, run_out, settings=settings, batch_size=3, progress=False, overwrite=overwrite
        )
    return results


def pope_rule(answer):  # POPE's evaluate.py, written out independently
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if "No" in words or "no" in words or "not" in words else "yes"


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_pope_end_to_end_records_everything(tmp_path):
    root = write_pope_tree(tmp_path / "data")
    plan = make_plan(root, benchmark="pope", source="aokvqa", split="popular", method="var", alpha=0.5)
    assert plan.pipeline_kwargs == {
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": 64,
        "method": "var",
        "alpha": 0.5,
    }
    metrics = run_plan(plan, root, tmp_path / "out")[None]
    preds = read_lines(tmp_path / "out" / "predictions.jsonl")
    assert len(preds) == metrics["n"] == 12
    assert all(p["question"].endswith(PROMPT_SUFFIXES["one-word"]) for p in preds)
    hits = sum(pope_rule(p["answer"]) == p["label"] for p in preds)
    assert metrics["accuracy"] == pytest.approx(round(100 * hits / 12, 4))
    assert metrics["parser"] == "pope" and set(metrics["parsers"]) == {"pope", "opera", "vcd", "strict"}
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["decoding"] == {
        "mode": "greedy",
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "num_beams": 1,
        "max_new_tokens": 64,
        "seed": 0,
    }
    assert run["method"] == "var" and run["method_settings"] == {"alpha": 0.5} and run["source"] == "aokvqa"
    assert (
        run["prompt_suffix"] == " Please answer this question with one word."
        and run["attn_implementation"] == "model default"
    )
    assert len(run["questions_sha256"]) == 64 and run["split"] == "popular"
    report = (tmp_path / "out" / "report.md").read_text()
    assert (
        "| Accuracy | Precision | Recall | F1 | Yes-ratio |" in report
        and "greedy" in report
        and "parser opera" in report
    )


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path):
    root = write_pope_tree(tmp_path / "data")
    options = dict(benchmark="pope", split="adversarial", do_sample=True, temperature=0.7, seed=5)
    full = run_plan(make_plan(root, **options), root, tmp_path / "full")[None]
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_plan(make_plan(root, **options), root, out, pipe_factory=lambda **kw: Interrupting(7, **kw))
    done = read_lines(out / "predictions.jsonl")
    assert 0 < len(done) < 12 and not (out / "metrics.json").exists()
    with open(out / "predictions.jsonl", "a") as fh:
        fh.write('{"id": "adversarial/9", "answ')  # torn by SIGKILL
    pipes = []
    resumed = run_plan(
        make_plan(root, **options), root, out, pipe_factory=lambda **kw: pipes.append(FakeLVLM(**kw)) or pipes[-1]
    )[None]
    assert len(pipes[0].seen) == 12 - len(done)  # only what was not answered
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio", "parsers", "n"):
        assert resumed[key] == full[key], key
    ids = [p["id"] for p in read_lines(out / "predictions.jsonl")]
    assert len(ids) == len(set(ids)) == 12
    assert read_lines(out / "predictions.jsonl") == read_lines(tmp_path / "full" / "predictions.jsonl")


def test_sampled_inputs_carry_per_sample_seeds(tmp_path):
    root = write_pope_tree(tmp_path / "data")
    evaluator = make_plan(root, benchmark="pope", do_sample=True, seed=3).runs[0][1]
    samples = evaluator.samples()
    assert [s.input["seed"] for s in samples] == [sample_seed(3, s.id) for s in samples]
    assert len({s.input["seed"] for s in samples}) == len(samples)
    greedy = make_plan(root, benchmark="pope").runs[0][1].samples()
    assert "seed" not in greedy[0].input


def test_benchmark_images_are_decoded_as_stored(tmp_path):
    """As the official scripts read them (PIL's open, no EXIF rotation): a sideways-tagged COCO picture stays as
    stored, where a user's own picture is turned upright."""
    from PIL import Image

    from attnzoo.datasets.images import load_image

    root = write_pope_tree(tmp_path / "data")
    samples = make_plan(root, benchmark="pope").runs[0][1].samples()
    path = samples[0].input["image"]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    Image.new("RGB", (40, 20)).save(path, format="JPEG", exif=exif)
    assert load_image(samples[0].input["image"]).size == (40, 20)
    assert load_image(str(path)).size == (20, 40)


def test_resumed_run_with_other_settings_is_refused(tmp_path):
    root = write_pope_tree(tmp_path / "data")
    run_plan(make_plan(root, benchmark="pope"), root, tmp_path / "out")
    with pytest.raises(InvalidInputError, match="prompt_suffix"):
        run_plan(make_plan(root, benchmark="pope", prompt_suffix="llava"), root, tmp_path / "out")
    with pytest.raises(InvalidInputError, match="decoding"):
        run_plan(make_plan(root, benchmark="pope", max_new_tokens=8), root, tmp_path / "out")
    again = run_plan(make_plan(root, benchmark="pope", prompt_suffix="llava"), root, tmp_path / "out", overwrite=True)[
        None
    ]
    assert again["prompt_suffix"] == "\nAnswer the question using a single word or phrase."


def test_methods_comparison_table(tmp_path):
    root = write_pope_tree(tmp_path / "data")
    plan = make_plan(root, benchmark="pope", methods="none,var,agla", alpha=2.0, limit=8)
    assert [name for name, _, _ in plan.runs] == ["none", "var", "agla"]
    assert [ev.pipeline_kwargs.get("alpha") for _, ev, _ in plan.runs] == [None, None, 2.0]  # VAR takes no alpha
    assert "method" not in plan.pipeline_kwargs  # each run brings its own
    results = run_plan(plan, root, tmp_path / "out")
    message = HallucinationEvaluator.summarize(results, tmp_path / "out")
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "comparison of 3 methods" in message
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Accuracy" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["none", "var", "agla"]
    for row, name in zip(rows, ("none", "var", "agla")):
        assert f"{results[name]['accuracy']:.2f}" in row
    again = write_comparison_table([tmp_path / "out" / m for m in ("none", "var", "agla")], tmp_path / "again")
    assert again.read_text() == table
    assert json.loads((tmp_path / "again" / "comparison.json").read_text())["var"]["method"] == "var"
    other = dict(results)
    other["x"] = {**results["none"], "benchmark": "chair"}
    with pytest.raises(InvalidInputError, match="different benchmarks"):
        comparison_table(other)
    differ = {"none": results["none"], "var": {**results["var"], "prompt_suffix": "x"}}
    assert "differ in prompt_suffix" in comparison_table(differ)


def test_chair_end_to_end(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    listed = write_agla_list(tmp_path / "chair.jsonl", [1, 2, 3, 4, 5])
    plan = make_plan(root, benchmark="chair", image_list=str(listed), lemmatizer="builtin")
    assert plan.pipeline_kwargs["max_new_tokens"] == 512
    metrics = run_plan(plan, root, tmp_path / "out")[None]
    preds = read_lines(tmp_path / "out" / "predictions.jsonl")
    assert [p["image_id"] for p in preds] == [1, 2, 3, 4, 5]
    from attnzoo.metrics.hallucination import ChairScorer

    evaluator = plan.runs[0][1]
    scorer = ChairScorer.from_coco(*evaluator.dataset.ground_truth_inputs(), lemmatizer="builtin")
    expected = scorer.score((p["image_id"], p["answer"]) for p in preds)
    for key in ("chair_s", "chair_i", "recall", "length"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-4)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["prompt"] == "Please describe this image in detail." and run["lemmatizer"] == "builtin"
    assert run["image_list_sha256"] and run["chair_sample_seed"] is None
    assert "| CHAIR_s | CHAIR_i | Recall | Len |" in (tmp_path / "out" / "report.md").read_text()
    sampled = make_plan(root, benchmark="chair", chair_images=3, seed=1, lemmatizer="builtin").runs[0][1]
    assert len(sampled.samples()) == 3 and sampled.settings()["chair_sample_seed"] == 1


def test_mme_end_to_end(tmp_path):
    root = write_mme_tree(tmp_path / "mme", images=3)
    plan = make_plan(root, benchmark="mme", prompt_suffix="llava", limit=2)
    metrics = run_plan(plan, root, tmp_path / "out")[None]
    preds = read_lines(tmp_path / "out" / "predictions.jsonl")
    assert len(preds) == 16 and all(
        p["question"].endswith("\nAnswer the question using a single word or phrase.") for p in preds
    )
    assert all("Please answer yes or no" not in p["question"] for p in preds)
    assert set(metrics["subtasks"]) == {"existence", "count", "position", "color"}
    assert metrics["total"] == pytest.approx(sum(s["score"] for s in metrics["subtasks"].values()), abs=1e-3)
    existence = [p for p in preds if p["subtask"] == "existence"]
    hits = [p["parsed"]["mme"] == p["label"] for p in existence]
    both = sum(hits[i] and hits[i + 1] for i in (0, 2))
    assert metrics["subtasks"]["existence"]["score"] == pytest.approx(100 * sum(hits) / 4 + 100 * both / 2, abs=1e-3)
    released = make_plan(root, benchmark="mme").runs[0][1].samples()
    assert released[0].input["question"].endswith("Please answer yes or no.")


def test_option_errors(tmp_path, monkeypatch):
    root = write_pope_tree(tmp_path / "data")
    with pytest.raises(InvalidOptionError, match="--benchmark"):
        make_plan(root, benchmark="mmhal")
    with pytest.raises(InvalidOptionError, match="add --do-sample"):
        make_plan(root, benchmark="pope", temperature=0.5)
    with pytest.raises(InvalidOptionError, match="split"):
        make_plan(root, benchmark="pope", split="val2014")
    with pytest.raises(InvalidOptionError, match="--limit"):
        make_plan(root, benchmark="pope", limit=0)
    with pytest.raises(InvalidOptionError, match="--parser for POPE"):
        make_plan(root, benchmark="pope", parser="mme")
    with pytest.raises(InvalidOptionError, match="not both"):
        make_plan(root, benchmark="pope", method="var", methods="none,var")
    with pytest.raises(InvalidOptionError, match="each method once"):
        make_plan(root, benchmark="pope", methods="var,var")
    with pytest.raises(InvalidOptionError, match="--chair-images do not apply"):
        make_plan(root, benchmark="pope", chair_images=10)
    coco = write_coco_tree(tmp_path / "coco")
    with pytest.raises(InvalidOptionError, match="--parser"):
        make_plan(coco, benchmark="chair", parser="pope", lemmatizer="builtin")
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(MissingDependencyError, match="nltk"):  # refused before any model is loaded
        make_plan(coco, benchmark="chair")


@pytest.mark.slow
def test_two_torchrun_processes_equal_one(tmp_path):
    """Two gloo processes each answer every other question; process 0 merges: the same predictions and
    metrics as one process (sampled decoding, so the per-sample seeds are checked too)."""
    root = write_pope_tree(tmp_path / "data", images=4)
    options = dict(benchmark="pope", split="random", do_sample=True, seed=11, methods="none,agla")
    one = run_plan(make_plan(root, **options), root, tmp_path / "one")
    script = tmp_path / "run_two.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pathlib import Path\n"
        "from tests.evaluation.test_hallucination_eval import make_plan, run_plan\n"
        f"run_plan(make_plan(Path({str(root)!r}), **{options!r}), Path({str(root)!r}), Path({str(tmp_path / 'two')!r}))\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("none", "agla"):
        two = json.loads((tmp_path / "two" / method / "metrics.json").read_text())
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio", "parsers", "n", "skipped"):
            assert two[key] == one[method][key], (method, key)
        assert read_lines(tmp_path / "two" / method / "predictions.jsonl") == read_lines(
            tmp_path / "one" / method / "predictions.jsonl"
        )
        assert not list((tmp_path / "two" / method).glob("*.rank*.jsonl"))


def test_settings_are_checked_before_the_model_loads(tmp_path):
    """What the plan refuses, before any model loads: a seed the run command refuses (a 64-bit generator
    seed), blank list items, empty strings and zeros that read as "not given" (the default ran instead), and
    a contrast method with beam search (it failed after the methods before it in a comparison had run)."""
    root = write_pope_tree(tmp_path / "data")
    for seed in (2**64, -1, 2.5):
        with pytest.raises(InvalidOptionError, match=r"--seed must be an integer in \[0, 2\*\*64\)"):
            make_plan(root, seed=seed)
    assert make_plan(root, do_sample=True, seed=2**64 - 1).settings["decoding"]["seed"] == 2**64 - 1
    for options, message in (
        ({"methods": "var,,agla"}, "--methods 'var,,agla' has a blank item"),
        ({"methods": "none,"}, "has a blank item"),
        ({"method": ""}, "--method '' has a blank item"),
        ({"methods": " "}, "--methods ' ' has a blank item"),
        ({"benchmark": ""}, "--benchmark must be one of"),
        ({"source": ""}, "--source must be a non-empty string"),
        ({"parser": ""}, "--parser must be a non-empty string"),
        ({"split": " "}, "--split must be a non-empty string"),
        ({"questions": ""}, "--questions must be a non-empty string"),
        ({"image_folder": ""}, "--image-folder must be a non-empty string"),
        ({"chat_template": ""}, "--chat-template must be a non-empty string"),
        ({"revision": ""}, "--revision must be a non-empty string"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be a positive integer, got 0"),
        ({"num_beams": 0}, "--num-beams must be a positive integer"),
        ({"do_sample": True, "top_k": -1}, "--top-k must be an integer >= 0"),
        ({"methods": "none,vcd", "num_beams": 2}, "method vcd: vcd run.*num_beams=2 does not apply"),
    ):
        with pytest.raises(InvalidOptionError, match=message):
            make_plan(root, **options)
    coco = write_coco_tree(tmp_path / "coco")
    for options, message in (
        ({"chair_images": 0}, "--chair-images must be a positive integer, got 0"),
        ({"prompt": ""}, "--prompt must be a non-empty string"),
        ({"lemmatizer": ""}, "--lemmatizer must be a non-empty string"),
        ({"image_list": ""}, "--image-list must be a non-empty string"),
    ):
        with pytest.raises(InvalidOptionError, match=message):
            make_plan(coco, benchmark="chair", **options)
    mme = write_mme_tree(tmp_path / "mme", images=1)
    for subtasks in ("existence,,count", "", ["existence", " "]):
        with pytest.raises(InvalidOptionError, match="--subtasks"):
            make_plan(mme, benchmark="mme", subtasks=subtasks)


def test_every_method_of_a_comparison_is_checked_on_the_model_before_the_first_runs(tmp_path):
    """``attnzoo eval`` asks the first run's evaluator to check the model before answering: it checks every
    method of the plan, so VAR without sink dimensions for this model fails before "none" runs."""
    from attnzoo.multimodal.hallucination.models import tiny_llava

    root = write_pope_tree(tmp_path / "data")
    model = tiny_llava()
    first = make_plan(root, methods="none,var").runs[0][1]
    with pytest.raises(InvalidOptionError, match="VAR has no sink dimensions for attnzoo/tiny-random-llava"):
        first.check_model(model)
    first = make_plan(root, methods="none,carve", layers="2,3").runs[0][1]
    first.check_model(model)
    with pytest.raises(InvalidOptionError, match="none of CARVE's probe layers"):
        make_plan(root, methods="none,carve").runs[0][1].check_model(model)


def test_a_chair_resume_over_edited_annotations_is_refused(tmp_path, capsys):
    """Each CHAIR answer is scored when it is made, against the COCO annotations of that moment: a resume after
    the annotations were edited mixed the old ground truth with the new in one metric. The run records the sha256
    of each annotation file it read, so such a resume is refused; a run.json of an older attnzoo, which did not
    record them, still resumes (said), and records them from then on."""
    root = write_coco_tree(tmp_path / "coco")
    listed = write_agla_list(tmp_path / "chair.jsonl", [1, 2, 3, 4, 5])
    options = dict(benchmark="chair", image_list=str(listed), lemmatizer="builtin")
    out, older = tmp_path / "out", tmp_path / "older"
    for folder in (out, older):
        whole = run_plan(make_plan(root, **options), root, folder)[None]
        predictions = folder / "predictions.jsonl"
        predictions.write_text("".join(predictions.read_text().splitlines(keepends=True)[:2]))  # killed after two
    files = [f"annotations/{kind}_val2014.json" for kind in ("instances", "captions")]
    digests = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in files}
    assert json.loads((out / "run.json").read_text())["annotations_sha256"] == digests

    run = json.loads((older / "run.json").read_text())
    del run["annotations_sha256"]
    (older / "run.json").write_text(json.dumps(run))
    assert run_plan(make_plan(root, **options), root, older)[None]["n"] == whole["n"] == 5
    assert "does not record the annotations_sha256 of the earlier run" in capsys.readouterr().err
    assert json.loads((older / "run.json").read_text())["annotations_sha256"] == digests

    captions = root / "annotations" / "captions_val2014.json"
    content = json.loads(captions.read_text())
    content["annotations"].append({"image_id": 4, "caption": "A cat sits on the car."})
    captions.write_text(json.dumps(content))
    for folder in (out, older):
        with pytest.raises(InvalidInputError, match=r"other settings \(annotations_sha256\)"):
            run_plan(make_plan(root, **options), root, folder)
    assert len(read_lines(out / "predictions.jsonl")) == 2  # nothing answered against the edited annotations


def compared_on_pope(tmp_path, monkeypatch):
    """``attnzoo eval`` of a ``--methods none,vcd`` comparison on a tiny POPE tree, with the scripted model: its
    arguments and --out, once it has run."""
    import attnzoo.tasks
    from attnzoo.cli import main

    root = write_pope_tree(tmp_path / "data", images=2, per_image=1)
    monkeypatch.setattr(attnzoo.tasks, "pipeline", lambda task, **kw: FakeLVLM(kw.get("method", "none")))
    out = tmp_path / "out"
    args = ["eval", "hallucination-mitigation", "--weights", "none", "--num-workers", "0", "--benchmark", "pope"]
    args += ["--split", "random", "--methods", "none,vcd", "--data", str(root), "--out", str(out)]
    assert main(args) == 0
    return args, out


def test_an_overwrite_of_a_comparison_removes_its_old_table_before_the_first_method_runs(tmp_path, monkeypatch):
    """``--methods a,b --overwrite`` cleared each method's files only as that method started over, and rewrote
    comparison.md / comparison.json only once every method had run: stopped part way (Ctrl-C, out of memory),
    it left the earlier comparison beside new results. The old table goes before the first method runs; the
    user's own files beside it stay."""
    import attnzoo.evaluation
    from attnzoo.cli import main

    args, out = compared_on_pope(tmp_path, monkeypatch)
    assert (out / "comparison.md").is_file() and (out / "comparison.json").is_file()
    (out / "notes.md").write_text("mine")
    real, started = attnzoo.evaluation.evaluate, []

    def stopped_in_the_second(pipe, evaluator, run_out, **kwargs):
        started.append((Path(run_out).name, (out / "comparison.md").exists()))
        if Path(run_out).name == "vcd":
            raise KeyboardInterrupt
        return real(pipe, evaluator, run_out, **kwargs)

    monkeypatch.setattr(attnzoo.evaluation, "evaluate", stopped_in_the_second)
    assert main([*args, "--max-new-tokens", "8", "--overwrite"]) != 0
    assert started == [("none", False), ("vcd", False)]  # gone before the first method ran
    assert not (out / "comparison.md").exists() and not (out / "comparison.json").exists()
    assert (out / "notes.md").read_text() == "mine"
    monkeypatch.setattr(attnzoo.evaluation, "evaluate", real)
    assert main([*args, "--max-new-tokens", "8", "--overwrite"]) == 0  # run through: the table of the new runs
    compared = json.loads((out / "comparison.json").read_text())
    assert [m["decoding"]["max_new_tokens"] for m in compared.values()] == [8, 8]


def written_in(out):
    """Every file under ``out`` but the locks, by path, with its bytes."""
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "lock" not in p.name}


def test_a_comparison_started_again_while_it_runs_is_refused_before_it_removes_anything(tmp_path, monkeypatch, capsys):
    """Each run of a plan locks its own sub-folder only as it starts: the same ``--methods ... --overwrite`` started
    again removed the joint report and redid the runs the first had finished before it was refused. The plan's
    lock on --out is taken before anything is removed."""
    fcntl = pytest.importorskip("fcntl")
    from attnzoo.cli import main

    args, out = compared_on_pope(tmp_path, monkeypatch)
    before = written_in(out)
    with open(out / ".attnzoo-plan.lock", "a") as held:  # the first process, still running the plan
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main([*args, "--overwrite"]) == 1
    assert f"another process is evaluating into {out}" in capsys.readouterr().err
    assert written_in(out) == before
    assert main([*args, "--overwrite"]) == 0  # released
