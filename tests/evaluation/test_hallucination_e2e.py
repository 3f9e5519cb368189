"""``attnzoo eval hallucination-mitigation`` and ``attnzoo run hallucination-mitigation`` end to end
through the CLI, with the tiny random LLaVA (``--weights none``, no network) over synthetic POPE, CHAIR
and MME folders in their published layouts (the writers of the dataset tests, with real pictures)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import attnzoo
from attnzoo.cli import main
from tests.datasets.test_chair import write_agla_list, write_coco_tree
from tests.datasets.test_mme import write_mme_tree
from tests.datasets.test_pope import write_pope_tree

TASK = "hallucination-mitigation"
TINY = ["--weights", "none", "--device", "cpu", "--num-workers", "0", "--max-new-tokens", "3"]
VAR_ON_TINY = ["--sink-dims", "3,7", "--tau", "2"]  # tau 20 never fires on a width-64 model


def with_pictures(root: Path) -> Path:
    """The writers' placeholder .jpg files replaced by small real pictures (each its own pixels)."""
    for index, path in enumerate(sorted(root.rglob("*.jpg"))):
        pixels = np.random.default_rng(index).integers(0, 256, (40 + index % 3, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG")
    return root


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_cli(*args: str) -> int:
    return main(["eval", TASK, *TINY, *args])


@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    return with_pictures(write_pope_tree(tmp_path_factory.mktemp("pope") / "data", images=2, per_image=1))


def test_pope_methods_comparison_and_resume(pope, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--benchmark", "pope", "--split", "random", "--methods", "none,var", *VAR_ON_TINY, "--data", str(pope)]
    assert eval_cli(*args, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "comparison of 2 methods" in printed
    runs = {m: json.loads((out / m / "metrics.json").read_text()) for m in ("none", "var")}
    assert runs["none"]["n"] == runs["var"]["n"] == 4 and runs["var"]["method_settings"] == {
        "sink_dims": "3,7",
        "tau": 2.0,
    }
    assert runs["var"]["decoding"]["mode"] == "greedy" and runs["var"]["decoding"]["max_new_tokens"] == 3
    described = runs["var"]["method_description"][0]  # every setting as it ran, defaults included
    assert (described["tau"], described["rho"], described["behaviour"]) == (2.0, 0.5, "official")
    assert runs["none"]["method_description"] == [] and "rho_code" in (out / "var" / "report.md").read_text()
    table = (out / "comparison.md").read_text()
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| none") or line.startswith("| var")]
    assert [row[1].strip() for row in rows] == ["none", "var"]
    for row, (name, run) in zip(rows, runs.items(), strict=True):  # POPE's precision, not the model's dtype
        said_yes = [r for r in read_lines(out / name / "predictions.jsonl") if r["parsed"]["pope"] == "yes"]
        expected = 100 * sum(r["label"] == "yes" for r in said_yes) / len(said_yes) if said_yes else 0.0
        assert run["precision"] == pytest.approx(expected) and run["model_dtype"] == "float32"
        assert float(row[3]) == pytest.approx(expected, abs=0.01)

    # the answers are the pipeline's own, question by question
    ask = attnzoo.pipeline(
        TASK, weights="none", device="cpu", max_new_tokens=3, method="var", sink_dims=(3, 7), tau=2.0
    )
    for record in read_lines(out / "var" / "predictions.jsonl")[:2]:
        image = pope / "val2014" / record["image"]
        assert ask(image, question=record["question"]).answer == record["answer"]

    # a run cut short (its last answer and the metrics lost) resumes to the same result
    predictions = out / "var" / "predictions.jsonl"
    lines = predictions.read_text().splitlines(keepends=True)
    predictions.write_text("".join(lines[:-1]))
    (out / "var" / "metrics.json").unlink()
    assert eval_cli(*args, "--out", str(out)) == 0
    resumed = json.loads((out / "var" / "metrics.json").read_text())
    assert "".join(lines) == predictions.read_text()
    for key in ("accuracy", "f1", "yes_ratio", "parsers", "n"):
        assert resumed[key] == runs["var"][key]


def test_sampled_answers_do_not_depend_on_the_batch(pope, tmp_path):
    common = ["--benchmark", "pope", "--do-sample", "--temperature", "0.8", "--seed", "3", "--data", str(pope)]
    assert eval_cli(*common, "--batch-size", "4", "--out", str(tmp_path / "b4")) == 0
    assert eval_cli(*common, "--batch-size", "1", "--out", str(tmp_path / "b1")) == 0
    four, one = (read_lines(tmp_path / b / "predictions.jsonl") for b in ("b4", "b1"))
    assert [r["answer"] for r in four] == [r["answer"] for r in one] and len(four) == 4
    run = json.loads((tmp_path / "b4" / "run.json").read_text())
    assert run["decoding"]["mode"] == "sampled" and run["decoding"]["temperature"] == 0.8
    # what actually ran is recorded, not "model default"; a resume with another batch size is refused
    assert run["batch_size"] == 4 and run["attn_implementation"] in {"eager", "sdpa"}
    assert run["processor_chat_template_sha256"]
    assert eval_cli(*common, "--batch-size", "2", "--out", str(tmp_path / "b4")) != 0


def test_chair_and_mme(tmp_path):
    coco = with_pictures(write_coco_tree(tmp_path / "coco"))
    listed = write_agla_list(tmp_path / "chair.jsonl", [1, 2, 3])
    chair = ["--benchmark", "chair", "--image-list", str(listed), "--lemmatizer", "builtin", "--method", "var"]
    assert eval_cli(*chair, *VAR_ON_TINY, "--data", str(coco), "--out", str(tmp_path / "chair")) == 0
    metrics = json.loads((tmp_path / "chair" / "metrics.json").read_text())
    assert metrics["n"] == 3 and {"chair_s", "chair_i", "recall", "length"} <= set(metrics)
    assert metrics["method"] == "var" and metrics["prompt"] == "Please describe this image in detail."
    assert "CHAIR (3 images" in (tmp_path / "chair" / "report.md").read_text()
    limited = ["--limit", "2", "--out", str(tmp_path / "chair2")]
    assert eval_cli(*chair, *VAR_ON_TINY, "--data", str(coco), *limited) == 0
    assert "CHAIR (2 of 3 images" in (tmp_path / "chair2" / "report.md").read_text()  # what was scored

    mme = with_pictures(write_mme_tree(tmp_path / "mme", images=1))
    assert eval_cli("--benchmark", "mme", "--data", str(mme), "--out", str(tmp_path / "mme")) == 0
    metrics = json.loads((tmp_path / "mme" / "metrics.json").read_text())
    assert metrics["n"] == 8 and set(metrics["subtasks"]) == {"existence", "count", "position", "color"}


def test_bad_method_setting_is_refused_before_answering(pope, tmp_path, capsys):
    assert (
        eval_cli(
            "--benchmark", "pope", "--method", "var", "--alpha", "2", "--data", str(pope), "--out", str(tmp_path / "o")
        )
        == 2
    )
    assert "alpha" in capsys.readouterr().err
    assert not (tmp_path / "o" / "predictions.jsonl").exists() or not (tmp_path / "o" / "predictions.jsonl").read_text()


def test_run_writes_answers_and_the_attention_picture(pope, tmp_path, capsys):
    image = next((pope / "val2014").glob("*.jpg"))
    args = ["run", TASK, str(image), "--question", "Is there a dog in the image?", "--method", "var", *VAR_ON_TINY]
    assert (
        main(
            [
                *args,
                "--weights",
                "none",
                "--device",
                "cpu",
                "--max-new-tokens",
                "3",
                "--return-attention",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "Is there a dog in the image?" in capsys.readouterr().out
    record = json.loads((tmp_path / "results.json").read_text())
    result = record["results"][str(image)]
    assert record["task"] == TASK and record["weights"].startswith("random") and "tiny" in record["weights"]
    assert result["method"] == "var" and result["methods"][0]["sink_dims"] == [3, 7]
    assert np.asarray(result["attention"]).shape == (6, 6) and "baseline_answer" in result
    picture = Image.open(tmp_path / f"{image.stem}.png")
    assert picture.width > 3 * 200  # image | with var | without a method


def test_incompatible_methods_are_a_usage_error(pope, tmp_path, capsys):
    image = next((pope / "val2014").glob("*.jpg"))
    args = ["run", TASK, str(image), "--question", "dog?", "--method", "var+pai", "--weights", "none"]
    assert main([*args, "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "var" in capsys.readouterr().err and not (tmp_path / "results.json").exists()


def test_run_gives_each_method_of_a_composition_its_own_settings(pope, tmp_path, capsys):
    """--alpha once for PAI + VCD (an attention boost and a contrast) is a usage error saying how to give
    each its own; in the method's parentheses each runs with its own value."""
    image = next((pope / "val2014").glob("*.jpg"))
    args = ["run", TASK, str(image), "--question", "dog?", "--weights", "none", "--device", "cpu"]
    assert main([*args, "--method", "pai+vcd", "--alpha", "1", "--out", str(tmp_path / "shared")]) == 2
    assert "pai(alpha=1.0)+vcd(alpha=1.0)" in capsys.readouterr().err
    own = ["--method", "pai(alpha=0.5)+vcd(alpha=2, beta=0.1)", "--max-new-tokens", "2"]
    assert main([*args, *own, "--out", str(tmp_path / "own")]) == 0
    result = json.loads((tmp_path / "own" / "results.json").read_text())["results"][str(image)]
    assert [(m["method"], m["alpha"]) for m in result["methods"]] == [("pai", 0.5), ("vcd", 2.0)]
    assert result["methods"][1]["beta"] == 0.1


def test_run_with_beam_search_and_an_attention_edit(pope, tmp_path, capsys):
    """generate repeats each prompt's row for its beams after encoding the image once."""
    image = next((pope / "val2014").glob("*.jpg"))
    args = ["run", TASK, str(image), "--question", "dog?", "--method", "var", *VAR_ON_TINY, "--num-beams", "2"]
    assert main([*args, "--weights", "none", "--device", "cpu", "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())["results"][str(image)]
    assert result["method"] == "var" and result["decoding"]["mode"] == "beam" and result["decoding"]["num_beams"] == 2


def test_run_carve_with_its_layers_on_a_small_model(pope, tmp_path, capsys):
    """The tiny model has 4 layers, not CARVE's 20-25: --layers and --probe-tokens set them."""
    image = next((pope / "val2014").glob("*.jpg"))
    args = ["run", TASK, str(image), "--question", "dog?", "--method", "carve", "--weights", "none", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 2
    assert "--layers" in capsys.readouterr().err
    settings = ["--layers", "1,2,3", "--probe-tokens", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "set")]
    assert main([*args, *settings]) == 0
    result = json.loads((tmp_path / "set" / "results.json").read_text())["results"][str(image)]
    assert result["methods"][0]["layers"] == [1, 2, 3] and result["methods"][0]["probe_tokens"] == 2


def test_mme_subtask_named_twice_runs_once(tmp_path):
    mme = with_pictures(write_mme_tree(tmp_path / "mme", images=1))
    args = ["--benchmark", "mme", "--subtasks", "existence,existence", "--data", str(mme), "--out", str(tmp_path / "o")]
    assert eval_cli(*args) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["n"] == 2 and set(metrics["subtasks"]) == {"existence"}


def test_a_comparison_checks_every_method_before_the_first_answers(pope, tmp_path, capsys):
    """VAR has no sink dimensions for the tiny model: "none" ran over the whole dataset before VAR failed."""
    out = tmp_path / "o"
    assert eval_cli("--benchmark", "pope", "--methods", "none,var", "--data", str(pope), "--out", str(out)) == 2
    assert "VAR has no sink dimensions" in capsys.readouterr().err
    assert not any(path.read_text() for path in out.rglob("predictions.jsonl"))  # nothing answered


def test_a_comparison_with_agla_resolves_its_blip_before_the_first_answers(pope, tmp_path, capsys):
    """AGLA's BLIP loads on AGLA's first batch: a --blip-model that cannot load let "none" answer every question
    first. It is refused before anything answers, on the command line and through attnzoo.evaluation.evaluate
    (which checks the model against the evaluator as the command line does)."""
    from attnzoo.errors import WeightsError
    from attnzoo.evaluation import evaluate
    from attnzoo.evaluation.hallucination import HallucinationEvaluator

    missing = tmp_path / "no-blip"
    out = tmp_path / "cli"
    args = ["--benchmark", "pope", "--methods", "none,agla", "--blip-model", str(missing), "--data", str(pope)]
    assert eval_cli(*args, "--out", str(out)) == 1
    assert f"BLIP-ITM model {missing} (blip_model=, --blip-model): no such folder" in capsys.readouterr().err
    assert not any(path.read_text() for path in out.rglob("predictions.jsonl"))  # nothing answered

    plan = HallucinationEvaluator.plan(
        pope, None, limit=None, model="llava_1_5_7b", weights="none", methods="none,agla", blip_model=str(missing)
    )
    name, evaluator, _ = plan.runs[0]
    assert name == "none"
    pipe = attnzoo.pipeline(TASK, weights="none", device="cpu", **{**plan.pipeline_kwargs, **evaluator.pipeline_kwargs})
    with pytest.raises(WeightsError, match="--blip-model"):
        evaluate(pipe, evaluator, tmp_path / "python" / "none", settings=plan.settings, progress=False)
    assert not (tmp_path / "python").exists()


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_a_seed_the_run_command_refuses_is_refused_before_the_model_loads(pope, tmp_path, capsys, monkeypatch, seed):
    import attnzoo.tasks

    monkeypatch.setattr(attnzoo.tasks, "pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["--benchmark", "pope", "--do-sample", "--seed", seed, "--data", str(pope), "--out", str(tmp_path / "o")]
    assert eval_cli(*args) == 2
    assert r"--seed must be an integer in [0, 2**64)" in capsys.readouterr().err
