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
    with pytest.raises(DatasetFormatError, match=r"training split lacks \(stone\).*cherry, leaf, sky.*config.yaml"):
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
    record = yaml.safe_load((run["out"] / "config.yaml").read_text())
    record["run"]["eval_transform"]["std"] = [0.2, 0.2]
    (folder / "config.yaml").write_text(yaml.safe_dump(record))
    with pytest.raises(WeightsError, match="eval_transform"):
        attnzoo.create_model("test_resnet", weights=folder / "model.safetensors")
    for other in ("a: [b\n", yaml.safe_dump({"lr": 0.1})):  # another tool's config (unreadable, or not a run's)
        (folder / "config.yaml").write_text(other)
        with pytest.warns(UserWarning, match="names are unknown"):
            plain = attnzoo.create_model("test_resnet", weights=folder / "model.safetensors")
        assert plain.num_classes == len(CLASSES) and "label_names" not in plain.pretrained_cfg
        assert "training_run" not in plain.pretrained_cfg and _state_equal(plain, folder / "model.safetensors")


def test_another_tools_config_yaml_beside_a_checkpoint_is_ignored(tmp_path):
    """A config.yaml that yaml's safe loader cannot read (``!!python/tuple``, as PyYAML's ``dump`` writes a tuple)
    is another tool's: the weights beside it load (fine-tuning, teachers, encoders take such files)."""
    from safetensors.torch import save_file

    folder = tmp_path / "other"
    folder.mkdir()
    source = attnzoo.create_model("test_resnet")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.dump({"img_size": (224, 224)}))
    assert "!!python/tuple" in (folder / "config.yaml").read_text()
    model = attnzoo.create_model("test_resnet", weights=folder / "model.safetensors")
    assert model.num_classes == source.num_classes and _state_equal(model, folder / "model.safetensors")
    assert "training_run" not in model.pretrained_cfg


def test_weights_beside_another_runs_config_are_refused_naming_both(run, tmp_path):
    """5-class weights beside a 3-class run's config.yaml: not the weights of that run; they were loaded with the
    run's input size and a note that named the run."""
    from safetensors.torch import save_file

    folder = tmp_path / "mixed"
    shutil.copytree(run["out"], folder)
    five = attnzoo.create_model("test_resnet", num_classes=5)
    save_file({k: v.contiguous() for k, v in five.state_dict().items()}, folder / "model.safetensors")
    weights, config = folder / "model.safetensors", (folder / "config.yaml").resolve()
    with pytest.raises(WeightsError, match="different runs") as caught:
        attnzoo.create_model("test_resnet", weights=weights)
    said = str(caught.value)
    assert "5 classes" in said and f"records {len(CLASSES)}" in said
    assert str(weights) in said and str(config) in said
    assert attnzoo.create_model("test_resnet", weights=weights, num_classes=5).num_classes == 5  # the caller's


def test_eval_matches_numbered_folders_by_index_as_training_does(run, tmp_path):
    """ImageNetV2's layout (folders 0/ .. K-1/, folder k holding class k) scored by a run with named classes."""
    data = tmp_path / "v2"
    for i, name in enumerate(CLASSES):
        shutil.copytree(run["data"] / "val" / name, data / "val" / str(i))
    evaluator = ClassificationEvaluator.plan(
        data, None, default_split="val", limit=None, model="test_resnet", weights=run["weights"]
    ).runs[0][1]
    assert evaluator.dataset.classes == CLASSES
    assert all(s.target == int(s.input.parent.name) for s in evaluator.samples())
    assert sorted({s.target for s in evaluator.samples()}) == [0, 1, 2]


def test_eval_accepts_imagenet_classes_whose_names_repeat(tmp_path):
    """A run fine-tuned on ImageNet-1k records its 1000 display names (two are "crane"): ImageNetV2's numbered
    folders are scored by index, ImageNet's own synset folders by WordNet id."""
    from attnzoo.datasets.imagenet import imagenet_synsets

    wnids, names = imagenet_synsets()
    assert len(set(names)) < len(names)
    v2 = tmp_path / "v2"
    for k in range(4):  # the first folders of 0/ .. 999/
        (v2 / "val" / str(k)).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(v2 / "val" / str(k) / "a.png")
    evaluator = ClassificationEvaluator(v2, "val", log=lambda _: None)
    evaluator.use_classes(names, source="runs/in1k/config.yaml")
    assert sorted(evaluator.dataset.targets) == [0, 1, 2, 3] and evaluator.dataset.classes == list(names)
    evaluator.check_num_classes(1000)
    crane = [w for w, n in zip(wnids, names, strict=True) if n == "crane"]
    synsets = tmp_path / "in"
    for w in crane:
        (synsets / "val" / w).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(synsets / "val" / w / "a.png")
    evaluator = ClassificationEvaluator(synsets, "val", classes=names, log=lambda _: None)
    assert sorted(evaluator.dataset.targets) == sorted(wnids.index(w) for w in crane)


def test_the_run_records_its_validation_transform_and_the_pipeline_applies_it(run, tmp_path):
    """A run started from another run's weights normalised as the first one's checkpoint did, not as the model's
    default: the recorded validation transform (not a guess from the starting weights) preprocesses its weights."""
    from timm.data import create_transform

    recorded = yaml.safe_load((run["out"] / "config.yaml").read_text())["run"]["eval_transform"]
    normalize = run["eval_tf"].transforms[-1]
    assert recorded["mean"] == pytest.approx(normalize.mean.tolist()) and recorded["input_size"] == SIZE
    assert recorded["std"] == pytest.approx(normalize.std.tolist())
    folder = tmp_path / "run2"
    shutil.copytree(run["out"], folder)
    record = yaml.safe_load((folder / "config.yaml").read_text())
    other = {**record["run"]["eval_transform"], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.3, 0.35], "crop_pct": 0.75}
    record["run"].update(eval_transform=other, weights=str(run["weights"]))
    (folder / "config.yaml").write_text(yaml.safe_dump(record))
    classify = attnzoo.pipeline(
        "image-classification", model="test_resnet", weights=folder / "model.safetensors", device="cpu"
    )
    picture = run["data"] / "val" / "leaf" / "0.png"
    expected = create_transform(
        (3, SIZE, SIZE),
        interpolation=other["interpolation"],
        crop_pct=other["crop_pct"],
        mean=other["mean"],
        std=other["std"],
    )(load_image(picture))
    pixels = classify.preprocess(str(picture))["pixel_values"]
    assert torch.allclose(pixels, expected) and not torch.allclose(pixels, run["eval_tf"](load_image(picture)))


def test_the_run_names_its_model_when_another_is_asked_for(run):
    with pytest.raises(WeightsError, match="test_resnet's"):
        attnzoo.create_model("test_vit", weights=run["weights"])
