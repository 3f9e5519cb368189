"""The hallucination evaluator's inputs: what a POPE question file's name says labels the run, a blank
question, a skipped MME question, prompt-suffix names, CHAIR's list and sample options, MME's data hash,
and settings that mean one thing to one compared method and another to the next."""

import json

import pytest

from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.evaluation import evaluate
from attnzoo.evaluation.hallucination import PROMPT_SUFFIXES, HallucinationEvaluator
from attnzoo.multimodal.hallucination.methods import build_methods
from tests.datasets.test_chair import write_agla_list, write_coco_tree
from tests.datasets.test_mme import write_mme_tree
from tests.datasets.test_pope import write_pope_tree
from tests.evaluation.test_hallucination_eval import FakeAnswer, FakeLVLM, make_plan, read_lines, run_plan


# -- 1. a POPE file's name says its split and source ------------------------------------------------
def test_a_question_file_labels_the_run_with_the_split_and_source_its_name_states(tmp_path):
    root = write_pope_tree(tmp_path / "data", images=1, per_image=1)
    random_file = root / "POPE" / "gqa" / "gqa_pope_random.json"
    plan = make_plan(root, questions=str(random_file), image_folder=str(root / "gqa" / "images"))
    evaluator = plan.runs[0][1]
    assert (plan.split, evaluator.split, evaluator.settings()["source"]) == ("random", "random", "gqa")
    assert [s.id for s in evaluator.samples()] == ["random/1", "random/2"]
    metrics = run_plan(plan, root, tmp_path / "out")[None]
    assert (metrics["source"], metrics["split"]) == ("gqa", "random")
    assert "Benchmark: **POPE gqa random**" in (tmp_path / "out" / "report.md").read_text()
    assert [p["id"] for p in read_lines(tmp_path / "out" / "predictions.jsonl")] == ["random/1", "random/2"]
    # --data pointing at the file, and POPE's own seem naming
    assert HallucinationEvaluator(root / "POPE" / "coco" / "coco_pope_popular.json").split == "popular"
    seem = root / "POPE" / "aokvqa" / "aokvqa_pope_seem_random.json"
    seem.write_text((root / "POPE" / "aokvqa" / "aokvqa_pope_random.json").read_text())
    by_seem = HallucinationEvaluator(root, questions=str(seem))
    assert (by_seem.split, by_seem.settings()["source"]) == ("random", "aokvqa")
    # a folder is still searched by the given (or default) split and source
    assert HallucinationEvaluator(root).split == "adversarial"
    assert (
        HallucinationEvaluator(root, "random", source="aokvqa")
        .settings()["questions"]
        .endswith("aokvqa_pope_random.json")
    )


def test_a_split_or_source_contradicting_the_file_name_is_refused(tmp_path):
    root = write_pope_tree(tmp_path / "data", images=1, per_image=1)
    random_file = root / "POPE" / "coco" / "coco_pope_random.json"
    with pytest.raises(InvalidOptionError, match="--split popular contradicts .*coco_pope_random.json.*split random"):
        HallucinationEvaluator(root, "popular", questions=str(random_file))
    with pytest.raises(InvalidOptionError, match="--source gqa contradicts .*source coco"):
        HallucinationEvaluator(random_file, source="gqa", image_folder=str(root / "val2014"))
    agreeing = HallucinationEvaluator(root, "random", source="coco", questions=str(random_file))
    assert agreeing.split == "random"


def test_a_question_file_whose_name_states_nothing_needs_split_and_source(tmp_path):
    root = write_pope_tree(tmp_path / "data", images=1, per_image=1)
    mine = root / "mine.json"
    mine.write_text((root / "POPE" / "gqa" / "gqa_pope_popular.json").read_text())
    with pytest.raises(InvalidOptionError, match="does not say its source and split.*--source and --split"):
        HallucinationEvaluator(root, questions=str(mine))
    with pytest.raises(InvalidOptionError, match="give --source"):
        HallucinationEvaluator(root, "popular", questions=str(mine))
    named = HallucinationEvaluator(root, "popular", source="gqa", questions=str(mine))
    assert (named.split, named.settings()["source"]) == ("popular", "gqa")
    assert named.samples()[0].id == "popular/1"


# -- 2. a skipped MME question ------------------------------------------------------------------------
class SkipsOne(FakeLVLM):
    """Refuses the second question asked (MME's first image's second question)."""

    def iterate(self, items, **kw):
        for i, item in enumerate(items):
            self.seen.append(item)
            yield (i, InvalidInputError("refused")) if i == 1 else (i, FakeAnswer("Yes"))


def test_an_mme_image_with_a_skipped_question_is_left_out_of_the_scores_and_reported(tmp_path):
    root = write_mme_tree(tmp_path / "mme", images=2)
    plan = make_plan(root, benchmark="mme")
    metrics = run_plan(plan, root, tmp_path / "out", pipe_factory=SkipsOne)[None]
    existence = metrics["subtasks"]["existence"]
    # the other image answers Yes to its Yes and its No question: 1 of 2 right, not both
    assert existence["images"] == 1 and existence["incomplete_images"] == 1
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (50.0, 0.0, 50.0)
    assert existence["incomplete"] == ["000000000000.jpg"]
    assert metrics["skipped"] == 1 and metrics["subtasks"]["count"]["images"] == 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "1 image(s) had one of their two questions skipped" in report and "existence: 000000000000.jpg" in report


# -- 4. prompt suffix names ---------------------------------------------------------------------------
def test_a_prompt_suffix_that_looks_like_a_name_must_be_one_of_the_benchmark(tmp_path):
    root = write_pope_tree(tmp_path / "data", images=1, per_image=1)
    with pytest.raises(InvalidOptionError, match="released is MME's only; for POPE use one of one-word, llava"):
        HallucinationEvaluator(root, prompt_suffix="released")
    for typo in ("one_word", "One-Word", "lava"):
        with pytest.raises(InvalidOptionError, match="names no suffix; the named suffixes of POPE are one-word"):
            HallucinationEvaluator(root, prompt_suffix=typo)
    mme = write_mme_tree(tmp_path / "mme", images=1)
    with pytest.raises(InvalidOptionError, match="named suffixes of MME are released, one-word"):
        HallucinationEvaluator(mme, benchmark="mme", prompt_suffix="yes_no")
    for name, text in PROMPT_SUFFIXES.items():
        assert HallucinationEvaluator(root, prompt_suffix=name).suffix == text


def test_free_text_suffix_is_joined_with_one_space(tmp_path):
    root = write_pope_tree(tmp_path / "data", images=1, per_image=1)
    question = HallucinationEvaluator(root).dataset.questions[0].text
    asked = HallucinationEvaluator(root, prompt_suffix="Answer briefly.").samples()[0].input["question"]
    assert asked == question + " Answer briefly."
    newline = HallucinationEvaluator(root, prompt_suffix="\nAnswer.").samples()[0].input["question"]
    assert newline == question + "\nAnswer."


# -- 5. CHAIR's options, MME's data hash --------------------------------------------------------------
def test_chair_images_with_an_image_list_is_refused(tmp_path):
    root = write_coco_tree(tmp_path / "coco")
    listed = write_agla_list(tmp_path / "chair.jsonl", [1, 2, 3])
    with pytest.raises(InvalidOptionError, match="--chair-images .* --image-list .* give one"):
        make_plan(root, benchmark="chair", image_list=str(listed), chair_images=2, lemmatizer="builtin")


def test_a_resumed_mme_run_over_edited_questions_is_refused(tmp_path):
    root = write_mme_tree(tmp_path / "mme", images=1)
    plan = make_plan(root, benchmark="mme", limit=1)
    evaluator, run = plan.runs[0][1], plan.runs[0][2]
    settings = {**plan.settings, **run}
    assert len(settings["questions_sha256"]) == 64
    evaluate(FakeLVLM(), evaluator, tmp_path / "out", settings=settings, progress=False)
    txt = root / "MME_Benchmark_release_version" / "count" / "000000000000.txt"
    txt.write_text(txt.read_text().replace("\tNo", "\tYes", 1))
    edited = make_plan(root, benchmark="mme", limit=1)
    assert edited.settings["questions_sha256"] != settings["questions_sha256"]
    with pytest.raises(InvalidInputError, match="questions_sha256"):
        evaluate(
            FakeLVLM(),
            edited.runs[0][1],
            tmp_path / "out",
            settings={**edited.settings, **edited.runs[0][2]},
            progress=False,
        )


# -- 6. one flag, several meanings --------------------------------------------------------------------
def _default(method, key):
    return build_methods(method, strict=False)[0].describe()[key]


def test_a_setting_the_compared_methods_read_differently_is_refused(tmp_path):
    root = write_pope_tree(tmp_path / "data", images=1, per_image=1)
    assert _default("vcd", "alpha") != _default("pai", "alpha")  # the premise: two meanings of --alpha
    with pytest.raises(InvalidOptionError) as err:
        make_plan(root, methods="none,vcd,pai", alpha=1.0)
    message = str(err.value)
    assert f"vcd (default {_default('vcd', 'alpha')})" in message
    assert f"pai (default {_default('pai', 'alpha')})" in message and "separately" in message
    with pytest.raises(InvalidOptionError, match="--beta is read by vcd .*agla"):
        make_plan(root, methods="vcd,agla", beta=0.1)
    with pytest.raises(InvalidOptionError, match="--gamma is read by pai .*paint"):
        make_plan(root, methods="pai,paint", gamma=1.5)
    with pytest.raises(InvalidOptionError, match="--alpha is read by vcd .*pai"):  # inside a composition too
        make_plan(root, methods="vcd,pai+var", alpha=1.0)


def test_a_setting_with_one_meaning_in_a_comparison_stays_allowed(tmp_path):
    root = write_pope_tree(tmp_path / "data", images=1, per_image=1)
    plan = make_plan(root, methods="none,var,vcd", alpha=0.5, tau=2.0)  # only VCD reads alpha
    assert {name: run["method_settings"] for name, _, run in plan.runs}["vcd"] == {"alpha": 0.5}
    same = make_plan(root, methods="var,pai", behaviour="paper")  # official code or paper, in each
    assert all(run["method_settings"] == {"behaviour": "paper"} for _, _, run in same.runs)
    assert make_plan(root, method="pai", alpha=1.0).runs[0][2]["method_settings"] == {"alpha": 1.0}
    own = make_plan(root, methods="none,PAI( alpha=0.5 ),pai(alpha=1)+vcd(alpha=2, beta=0.1)")  # each its own
    assert [name for name, _, _ in own.runs] == ["none", "pai(alpha=0.5)", "pai(alpha=1)+vcd(alpha=2,beta=0.1)"]
    described = {name: [m["alpha"] for m in run["method_description"]] for name, _, run in own.runs}
    assert described["pai(alpha=0.5)"] == [0.5] and described["pai(alpha=1)+vcd(alpha=2,beta=0.1)"] == [1.0, 2.0]
    shared = make_plan(root, methods="none,pai(alpha=0.5),vcd", alpha=1.0)  # only VCD reads the shared alpha
    settings = {name: run["method_settings"] for name, _, run in shared.runs}
    assert settings == {"none": {}, "pai(alpha=0.5)": {}, "vcd": {"alpha": 1.0}}  # recorded where it went
    with pytest.raises(InvalidOptionError, match="alpha are taken by none of --methods"):
        make_plan(root, methods="pai(alpha=0.5),vcd(alpha=2)", alpha=1.0)  # every reader has its own
    for twice in ("pai,PAI", "none,baseline", "pai(alpha=1),pai( alpha=1 )"):
        with pytest.raises(InvalidOptionError, match="lists each method once"):
            make_plan(root, methods=twice)


def test_run_json_records_the_file_label(tmp_path):
    root = write_pope_tree(tmp_path / "data", images=1, per_image=1)
    plan = make_plan(root, questions=str(root / "POPE" / "aokvqa" / "aokvqa_pope_popular.json"))
    run_plan(plan, root, tmp_path / "out")
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (run["source"], run["split"]) == ("aokvqa", "popular")
