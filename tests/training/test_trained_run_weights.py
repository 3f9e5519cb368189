"""The weights of an ``attnzoo train image-classification`` run carry the run's settings: ``create_model``,
``pipeline`` and ``attnzoo eval`` / ``attnzoo run`` read the run's class names, class count and validation
preprocessing from the config.yaml beside ``model.safetensors``."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import attnzoo
import attnzoo.training.classification as recipe
from attnzoo.cli import main
from attnzoo.datasets.images import load_image
from attnzoo.errors import DatasetFormatError, WeightsError
from attnzoo.evaluation.classification import ClassificationEvaluator

CLASSES = ["cherry", "leaf", "sky"]
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]
SIZE = 32  # the run's input size; test_resnet's own pretrained_cfg says 160


def _colour_folders(root, classes=CLASSES, per_class=(3, 2)):
    """Class folders of coloured squares on noise, 56 x 44 pictures (not square: the resize and crop matter)."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            colour = COLOURS[CLASSES.index(name)] if name in CLASSES else (200, 200, 200)
            for i in range(n):
                im = Image.fromarray(rng.integers(90, 160, size=(44, 56, 3), dtype=np.uint8))
                x, y = (int(v) for v in rng.integers(4, 24, size=2))
                ImageDraw.Draw(im).rectangle([x, y, x + 18, y + 16], fill=colour)
                im.save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny test_resnet run on 3 classes at input_size=32, with the validation transform the recipe used."""
    root = tmp_path_factory.mktemp("trained")
    data = _colour_folders(root / "data")
    transforms = []

    class Recording(recipe.TransformedSamples):
        def __init__(self, samples, transform):
            super().__init__(samples, transform)
            transforms.append(transform)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe, "TransformedSamples", Recording)
        recipe.train_classification(
            "test_resnet",
            data,
            root / "run",
            overrides=dict(
                epochs=1,
                batch_size=3,
                num_workers=0,
                input_size=SIZE,
                warmup_epochs=0,
                auto_augment=None,
                ema_decay=None,
                eval_model="model",
                log_every=1,
            ),
            device="cpu",
        )
    train_tf, eval_tf = transforms
    return {"data": data, "out": root / "run", "weights": root / "run" / "model.safetensors", "eval_tf": eval_tf}


def _state_equal(model, path):
    saved = load_file(path)
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_create_model_builds_the_runs_classes_from_its_weights(run):
    model = attnzoo.create_model("test_resnet", weights=run["weights"])
    assert model.num_classes == len(CLASSES) and _state_equal(model, run["weights"])
    cfg = model.pretrained_cfg
    assert cfg["label_names"] == CLASSES
    assert cfg["input_size"] == (3, SIZE, SIZE)
    assert cfg["training_run"] == str((run["out"] / "config.yaml").resolve())


def test_the_pipeline_labels_and_preprocesses_as_the_run_validated(run):
    classify = attnzoo.pipeline("image-classification", model="test_resnet", weights=run["weights"], device="cpu")
    assert classify.labels == CLASSES
    assert "config.yaml" in classify.weights_label and f"input size {SIZE}" in classify.weights_label
    picture = run["data"] / "val" / "leaf" / "0.png"
    expected = run["eval_tf"](load_image(picture))  # the recipe's own validation transform
    pixels = classify.preprocess(str(picture))["pixel_values"]
    assert pixels.shape == expected.shape == (3, SIZE, SIZE)
    assert torch.equal(pixels, expected)
    result = classify(str(picture), top_k=3)
    assert sorted(p.label for p in result) == sorted(CLASSES)
    with torch.no_grad():
        probs = classify.model(expected[None]).softmax(-1)[0]
    assert result[0].label == CLASSES[int(probs.argmax())]


def test_eval_scores_the_runs_weights_as_its_own_validation_did(run, tmp_path):
    out = tmp_path / "ev"
    args = ["eval", "image-classification", "-m", "test_resnet", "-w", str(run["weights"]), "-d", str(run["data"])]
    assert main([*args, "-o", str(out), "--device", "cpu", "--num-workers", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    last = (run["out"] / "eval.csv").read_text().strip().splitlines()[-1].split(",")
    assert metrics["top1"] == pytest.approx(float(last[2]), abs=1e-3)  # the run's own top-1 on the same val split
    model = attnzoo.create_model("test_resnet", num_classes=len(CLASSES))
    model.load_state_dict(load_file(run["weights"]))
    for line in (out / "predictions.jsonl").read_text().splitlines():
        answer = json.loads(line)
        folder = run["data"] / "val"
        assert answer["target"] == CLASSES.index(answer["id"].split("/")[0])
        with torch.no_grad():  # the ranking of the recipe's validation transform through the trained weights
            logits = model(run["eval_tf"](load_image(folder / answer["id"]))[None])[0]
        assert answer["pred"] == logits.argsort(descending=True).tolist()
    settings = json.loads((out / "run.json").read_text())
    assert settings["classes"] == CLASSES and settings["input_size"] == [3, SIZE, SIZE]
    assert "config.yaml" in settings["weights_note"]


def test_run_labels_the_predictions_with_the_runs_classes(run, tmp_path):
    out = tmp_path / "r"
    images = run["data"] / "val" / "sky"
    args = ["run", "image-classification", str(images), "-m", "test_resnet", "-w", str(run["weights"])]
    assert main([*args, "-o", str(out), "--device", "cpu"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert "config.yaml" in record["weights"]
    labels = {p["label"] for answers in record["results"].values() for p in answers}
    assert labels and labels <= set(CLASSES)


def test_a_num_classes_of_the_callers_still_wins(run):
    same = attnzoo.create_model("test_resnet", weights=run["weights"], num_classes=len(CLASSES))
    assert _state_equal(same, run["weights"]) and same.pretrained_cfg["label_names"] == CLASSES
    with pytest.warns(UserWarning, match="left out"):
        five = attnzoo.create_model("test_resnet", weights=run["weights"], num_classes=5)
    assert five.num_classes == 5 and "label_names" not in five.pretrained_cfg
    assert five.pretrained_cfg["input_size"] == (3, SIZE, SIZE)  # the run's input size still holds


def test_eval_refuses_data_of_other_classes_naming_them(run, tmp_path, capsys):
    other = _colour_folders(tmp_path / "other", classes=["cherry", "leaf", "stone"])
    with pytest.raises(DatasetFormatError, match=r"not trained on \(stone\).*cherry, leaf, sky.*lacks sky"):
        ClassificationEvaluator.plan(
            other, None, default_split="val", limit=None, model="test_resnet", weights=run["weights"]
        )
    args = ["eval", "image-classification", "-m", "test_resnet", "-w", str(run["weights"]), "-d", str(other)]
    assert main([*args, "-o", str(tmp_path / "ev"), "--device", "cpu"]) != 0
    assert "stone" in capsys.readouterr().err
    evaluator = ClassificationEvaluator(other, "val")  # the same refusal from the model, through evaluate()
    with pytest.raises(DatasetFormatError, match="stone"):
        evaluator.check_model(attnzoo.create_model("test_resnet", weights=run["weights"]))


def test_eval_matches_a_split_lacking_a_class_by_name(run, tmp_path):
    data = tmp_path / "part"
    shutil.copytree(run["data"], data)
    shutil.rmtree(data / "val" / "cherry")  # read on its own, leaf would be class 0 and sky class 1
    said = []
    evaluator = ClassificationEvaluator.plan(
        data, None, default_split="val", limit=None, model="test_resnet", weights=run["weights"], log=said.append
    ).runs[0][1]
    assert evaluator.dataset.classes == CLASSES
    assert {CLASSES[s.target] for s in evaluator.samples()} == {"leaf", "sky"}
    assert all(CLASSES[s.target] == s.input.parent.name for s in evaluator.samples())
    assert said and "cherry" in said[0]


def test_a_broken_run_config_beside_the_weights_is_refused(run, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(run["weights"], folder / "model.safetensors")
    record = yaml.safe_load((run["out"] / "config.yaml").read_text())
    record["run"]["classes"] = None
    (folder / "config.yaml").write_text(yaml.safe_dump(record))
    with pytest.raises(WeightsError, match="classes"):
        attnzoo.create_model("test_resnet", weights=folder / "model.safetensors")
    (folder / "config.yaml").write_text("a: [b\n")
    with pytest.raises(WeightsError, match="cannot be read"):
        attnzoo.create_model("test_resnet", weights=folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump({"lr": 0.1}))  # another tool's config: not a run's
    with pytest.warns(UserWarning, match="names are unknown"):
        plain = attnzoo.create_model("test_resnet", weights=folder / "model.safetensors")
    assert plain.num_classes == len(CLASSES) and "label_names" not in plain.pretrained_cfg


def test_the_run_names_its_model_when_another_is_asked_for(run):
    with pytest.raises(WeightsError, match="test_resnet's"):
        attnzoo.create_model("test_vit", weights=run["weights"])
