"""The task layer: a task is one TaskSpec plus its own files; the CLI is generated from the specs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.cli import main
from attnzoo.errors import InvalidInputError
from attnzoo.evaluation import EvalSample, TaskEvaluator
from attnzoo.pipelines import Pipeline, list_collate
from attnzoo.registry import ModelEntry
from attnzoo.tasks import Option, TaskSpec, get_task, list_tasks, pipeline, register_task, unregister_task


class Brightness(torch.nn.Module):
    """A toy model: the mean of the image times a learnt gain."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1) * self.gain


@dataclass
class Reading:
    value: float
    label: str | None

    def to_dict(self) -> dict:
        return {"value": self.value, "label": self.label}

    def summary(self) -> str:
        return f"{self.value:.3f}" + (f" {self.label}" if self.label else "")

    def plot(self) -> Image.Image:
        return Image.new("RGB", (8, 8), (int(255 * min(self.value, 1.0)),) * 3)


class BrightnessPipeline(Pipeline):
    task = "toy-brightness"
    input_fields = ("label",)
    collate = staticmethod(list_collate)

    @classmethod
    def accepts(cls, model):
        return isinstance(model, Brightness)

    def _sanitize_parameters(self, scale: float | None = None):
        return {}, {}, ({"scale": scale} if scale is not None else {})

    def preprocess(self, item):
        item = item if isinstance(item, dict) else {"image": item}
        pixels = torch.from_numpy(np.asarray(Image.open(item["image"]).convert("L"), dtype=np.float32) / 255)
        return {"pixels": pixels, "label": item.get("label")}

    def _forward(self, batch):
        return {"value": self.model(torch.stack(batch["pixels"])), "label": batch["label"]}

    def postprocess(self, outputs, scale: float = 1.0):
        return Reading(float(outputs["value"]) * scale, outputs["label"])


class BrightnessEvaluator(TaskEvaluator):
    task = "toy-brightness"
    headline = ("mae",)

    def __init__(self, data, split, *, limit=None, target_scale: float = 1.0):
        self.files = sorted(Path(data, split).glob("*.png"))[:limit]
        self.target_scale = target_scale

    def samples(self):
        return [EvalSample(f.name, f, float(f.stem.split("_")[1]) * self.target_scale) for f in self.files]

    def record(self, sample, result):
        return {"error": abs(result.value - sample.target)}

    def metrics(self, records):
        return {"mae": round(float(np.mean([r["error"] for r in records])), 6)}

    def report(self, metrics):
        return f"MAE {metrics['mae']}"


@pytest.fixture
def toy_task(monkeypatch):
    """Everything the toy task is made of: its spec and its model's registry entry; nothing else changes."""
    monkeypatch.setitem(
        __import__("attnzoo.registry").registry._MODELS,
        "brightness",
        ModelEntry("brightness", Brightness, "toy", ("toy-brightness",)),
    )
    spec = register_task(
        TaskSpec(
            "toy-brightness",
            "the mean brightness of an image",
            pipelines=(BrightnessPipeline,),
            default_model="brightness",
            aliases=("toy",),
            evaluator=BrightnessEvaluator,
            eval_split="val",
            options=(
                Option("scale", float, "Multiply every reading.", ("run",)),
                Option("label", str, "A label carried with each input.", ("run",)),
                Option("target_scale", float, "Scale of the targets.", ("eval",)),
            ),
            data_help="A folder of val/<id>_<brightness>.png images.",
            inputs_help="Grey images to read the brightness of.",
        )
    )
    yield spec
    unregister_task("toy-brightness")


def _grey(path: Path, level: int) -> Path:
    Image.new("L", (4, 4), level).save(path)
    return path


def test_a_new_task_is_its_spec(toy_task, tmp_path, capsys):
    assert "toy-brightness" in list_tasks() and get_task("toy") is toy_task
    assert main(["tasks"]) == 0
    listed = capsys.readouterr().out
    assert "toy-brightness: the mean brightness of an image (aliases: toy)" in listed
    assert "models: brightness" in listed

    # per-task help: its own options and --data text
    assert main(["run", "toy-brightness", "--help"]) == 0
    assert "--scale" in (help_text := capsys.readouterr().out) and "--views" not in help_text
    assert "Grey images to read the brightness of." in help_text  # its own inputs text
    assert main(["eval", "toy", "--help"]) == 0
    assert "val/<id>_<brightness>.png" in (help_text := capsys.readouterr().out) and "--target-scale" in help_text

    image = _grey(tmp_path / "a.png", 51)  # 0.2 brightness -> 0.4 with the gain of 2
    out = tmp_path / "out"
    assert (
        main(["run", "toy", str(image), "--weights", "none", "--scale", "10", "--label", "grey", "--out", str(out)])
        == 0
    )
    assert "a.png: 4.000 grey" in capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert record["model"] == "brightness" and record["weights"] == "random (seed 0)"
    assert record["results"] == {str(image): {"value": pytest.approx(4.0), "label": "grey"}}
    assert Image.open(out / "a.png").size == (8, 8)

    (tmp_path / "data" / "val").mkdir(parents=True)
    for i, level in enumerate((51, 102)):
        _grey(tmp_path / "data" / "val" / f"{i}_{level / 255:.4f}.png", level)
    assert (
        main(
            [
                "eval",
                "toy",
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "eval"),
                "--target-scale",
                "2",
                "-w",
                "none",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["mae"] == pytest.approx(0.0, abs=1e-3) and metrics["n"] == 2 and metrics["target_scale"] == 2.0
    assert "mae=" in capsys.readouterr().out
    assert (
        main(["train", "toy", "--data", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    )  # no recipe: no train command


def test_the_model_picks_the_pipeline(toy_task):
    pipe = pipeline("toy-brightness", weights="none", device="cpu")
    assert isinstance(pipe, BrightnessPipeline) and "BrightnessPipeline(task='toy-brightness'" in repr(pipe)
    with pytest.raises(InvalidInputError, match="no pipeline for a Linear"):
        pipeline("toy-brightness", model=torch.nn.Linear(2, 2))


def test_pipeline_base_owns_keywords_fields_and_batching(toy_task, tmp_path):
    pipe = pipeline("toy", weights="none", device="cpu", batch_size=2)
    images = [_grey(tmp_path / f"{i}.png", 51 * i) for i in range(3)]
    with pytest.raises(InvalidInputError, match=r"unexpected arguments \['colour'\]; it takes scale"):
        pipe(images[0], colour="red")
    with pytest.raises(InvalidInputError, match="unexpected arguments"):
        pipeline("toy", weights="none", device="cpu", colour="red")
    one = pipe(images[1], label="x")
    assert isinstance(one, Reading) and one.value == pytest.approx(0.4, abs=1e-3) and one.label == "x"
    many = pipe(images, label=["a", "b", "c"], scale=2.0)
    assert [r.label for r in many] == ["a", "b", "c"] and many[2].value == pytest.approx(1.6, abs=1e-3)
    with pytest.raises(InvalidInputError, match="2 values of label= for 3 inputs"):
        pipe(images, label=["a", "b"])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidInputError, match="batch_size"):
            pipe(images, batch_size=bad)
    with pytest.raises(InvalidInputError, match="num_workers"):
        pipe(images, num_workers=-1)


def test_registering_a_taken_name_is_refused(toy_task):
    with pytest.raises(ValueError, match="already registered"):
        register_task(TaskSpec("other", "x", pipelines=(BrightnessPipeline,), aliases=("toy",)))
    assert get_task("toy") is toy_task


def test_builtin_tasks_name_their_parts():
    for name in list_tasks():
        spec = get_task(name)
        assert spec.pipeline_classes() and spec.default_model
        if spec.evaluator is not None:
            assert issubclass(spec.load_evaluator(), TaskEvaluator)
        if spec.docs:
            assert (Path(__file__).resolve().parents[1] / "docs" / spec.docs).is_file()


def test_a_model_of_another_task_is_refused_when_the_pipeline_is_built(toy_task, monkeypatch):
    """Names by their registry entry (before anything is built), model objects by their kind; a timm name is a
    classifier. The error names the task and the model, instead of a torch error at the first call."""
    import timm

    import attnzoo.factory
    from attnzoo.errors import InvalidOptionError
    from attnzoo.factory import create_model

    with monkeypatch.context() as patch:
        patch.setattr(attnzoo.factory, "create_model", lambda *a, **k: pytest.fail("a refused model was built"))
        for task, model, serves in (
            ("multiview-3d-reconstruction", "test_resnet", "image-classification"),
            ("wsi-classification", "test_resnet", "image-classification"),
            ("image-classification", "acmil_ga", "wsi-classification"),
            ("image-classification", "lrgt", "multiview-3d-reconstruction"),
            ("toy-brightness", "lrgt", "multiview-3d-reconstruction"),
        ):
            with pytest.raises(InvalidOptionError, match=rf"the {task} task does not take '{model}': .* for {serves}"):
                pipeline(task, model=model, weights="none", device="cpu")
    resnet = timm.create_model("test_resnet")
    for task, model, serves in (
        ("wsi-classification", resnet, "image-classification"),
        ("multiview-3d-reconstruction", resnet, "image-classification"),
        ("image-classification", create_model("acmil_ga", in_dim=8, inner_dim=8), "wsi-classification"),
        ("image-classification", Brightness(), "toy-brightness"),
        ("toy-brightness", resnet, "image-classification"),  # its pipeline claims Brightness models only
    ):
        with pytest.raises(
            InvalidOptionError, match=rf"the {task} task does not take a {type(model).__name__}: .* for {serves}"
        ):
            pipeline(task, model=model, device="cpu")


def test_models_keep_the_tasks_they_serve(toy_task):
    """A timm classifier runs in any task made of the image-classification pipeline and in a third party's
    pipeline that claims it with its own accepts(); a model attnzoo does not know goes to the pipelines as before."""
    from attnzoo.pipelines.image_classification import ImageClassificationPipeline
    from attnzoo.tasks import model_tasks

    class Backbone(ImageClassificationPipeline):
        task = "unit-backbone"

        @classmethod
        def accepts(cls, model):
            return hasattr(model, "forward_features")

    assert model_tasks("test_resnet") == ("image-classification",) and model_tasks("no_such_model") is None
    assert model_tasks(Brightness()) == ("toy-brightness",) and model_tasks(torch.nn.Linear(2, 2)) is None
    register_task(TaskSpec("unit-reuse", "x", pipelines=(ImageClassificationPipeline,), default_model="test_resnet"))
    register_task(TaskSpec("unit-backbone", "x", pipelines=(Backbone,), default_model="test_resnet"))
    try:
        assert pipeline("unit-reuse", weights="none", device="cpu").task == "image-classification"
        assert isinstance(pipeline("unit-backbone", weights="none", device="cpu"), Backbone)
        own = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        assert isinstance(pipeline("image-classification", model=own, device="cpu", labels=list("abcd")), Pipeline)
        assert isinstance(pipeline("toy", model=Brightness(), device="cpu"), BrightnessPipeline)
    finally:
        unregister_task("unit-reuse")
        unregister_task("unit-backbone")


def test_a_task_is_named_by_a_string():
    import attnzoo

    for bad in (None, 3, ["image-classification"]):
        with pytest.raises(InvalidInputError, match="a task is named by a string"):
            pipeline(bad)
    assert attnzoo.list_tasks() == list_tasks()
