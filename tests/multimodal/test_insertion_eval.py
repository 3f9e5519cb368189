"""Subject-insertion evaluation: the DreamBench insertion layout (manifest, classes, errors), the metrics
(crops, cosine, CLIP-I/DINO/CLIP-T), and a whole resumable run on a two-subject synthetic layout with a
tiny random CLIP and DINO."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.datasets.dreambench import read_dreambench_insertion, read_dreambooth_classes
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError
from attnzoo.metrics.insertion import ClipEmbedder, DinoEmbedder, cosine, crop_to_mask, insertion_scores, mask_box

pytestmark = pytest.mark.usefixtures("one_thread")


def picture(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((w, h))


def write_layout(root, pairs=None):
    """Two DreamBooth subjects (one with a mask, one through its class word), one background with a VIA mask."""
    for i, name in enumerate(("dog6", "red_cartoon")):
        (root / "dataset" / name).mkdir(parents=True)
        picture(20, 24, i).save(root / "dataset" / name / "01.jpg")
        picture(20, 24, i + 5).save(root / "dataset" / name / "00.jpg")
    (root / "masks").mkdir()
    mask = np.zeros((20, 24), np.uint8)
    mask[4:16, 5:20] = 255
    Image.fromarray(mask).save(root / "masks" / "dog.png")
    Image.fromarray(mask).save(root / "masks" / "cartoon.png")
    (root / "backgrounds").mkdir()
    picture(30, 40, 9).save(root / "backgrounds" / "room.png")
    via = {"regions": [{"shape_attributes": {"name": "ellipse", "cx": 20, "cy": 15, "rx": 9, "ry": 7}}]}
    (root / "backgrounds" / "room.json").write_text(json.dumps(via))
    (root / "dataset" / "prompts_and_classes.txt").write_text(  # where google/dreambooth has it, in its format
        "Classes\n\nsubject_name,class\ndog6,dog\nred_cartoon,cartoon\n\nPrompts\n\nObject Prompts\n\n"
        "prompt_list = [\n'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n"
    )
    manifest = {
        "backgrounds": [
            {"id": "room", "image": "backgrounds/room.png", "mask": "backgrounds/room.json", "prompt": "a {} in a room"}
        ],
        "subjects": {"dog6": {"mask": "masks/dog.png"}, "red_cartoon": {"mask": "masks/cartoon.png"}},
    }
    if pairs is not None:
        manifest["pairs"] = pairs
    (root / "insertion.json").write_text(json.dumps(manifest))
    return root


def test_layout_reader(tmp_path):
    root = write_layout(tmp_path)
    data = read_dreambench_insertion(root)
    assert [p.id for p in data.pairs] == ["dog6/room", "red_cartoon/room"]
    dog = data.pairs[0]
    assert dog.subject_image.name == "00.jpg" and dog.subject_mask.name == "dog.png"  # the first image by name
    assert dog.prompt == "a dog in a room" and dog.subject_word == "dog" and dog.mask.name == "room.json"
    assert (
        data.pairs[1].subject_word == "cartoon" and data.pairs[1].prompt == "a cartoon in a room"
    )  # not "red cartoon"
    classes = {"dog6": "dog", "red_cartoon": "cartoon"}
    assert read_dreambooth_classes(root / "dataset" / "prompts_and_classes.txt") == classes


def test_a_class_file_beside_dataset_is_read_too(tmp_path):
    root = write_layout(tmp_path)
    (root / "dataset" / "prompts_and_classes.txt").rename(root / "prompts_and_classes.txt")
    assert read_dreambench_insertion(root).pairs[1].subject_word == "cartoon"


def test_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetFormatError, match="manifest .* is missing"):
        read_dreambench_insertion(tmp_path)
    root = write_layout(tmp_path / "a", pairs=[{"subject": "cat", "background": "room"}])
    with pytest.raises(DatasetFormatError, match="names subject 'cat'"):
        read_dreambench_insertion(root)
    root = write_layout(tmp_path / "b")
    (root / "backgrounds" / "room.png").unlink()
    with pytest.raises(DatasetFormatError, match="room.png not found"):
        read_dreambench_insertion(root)
    (root / "insertion.json").write_text("{")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        read_dreambench_insertion(root)


def test_crops_and_cosine():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == (3, 2, 9, 5)
    image = picture(10, 12, 0)
    crop = crop_to_mask(image, mask, white_outside=True)
    assert crop.size == (6, 3)
    with pytest.raises(InvalidInputError, match="selects no pixel"):
        mask_box(np.zeros((3, 3)))
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine(a, np.array([[2.0, 0.0], [-1.0, -1.0]])), [1.0, -1.0])


def tiny_embedders():
    """A tiny random open_clip CLIP (with the real BPE tokenizer, offline) and a tiny timm ViT for DINO."""
    import open_clip
    import timm
    from torchvision import transforms

    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
    )
    dino = timm.models.VisionTransformer(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=2, num_classes=0)
    to_tensor = transforms.Compose(
        [transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    )
    return (
        ClipEmbedder(clip, open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32")),
        DinoEmbedder(dino, to_tensor),
    )


def test_scores_are_cosines_in_range():
    clip, dino = tiny_embedders()
    image = picture(30, 40, 1)
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:30] = True
    scores = insertion_scores(clip, dino, image, mask, picture(20, 24, 2), None, "a dog")
    assert set(scores) == {"clip_i", "dino", "clip_t"} and all(-1 <= v <= 1 for v in scores.values())
    same = insertion_scores(clip, dino, image, np.ones((30, 40), bool), image, None, "a dog")
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5) and same["dino"] == pytest.approx(1.0, abs=1e-5)


def test_evaluation_runs_and_resumes(tmp_path):
    from attnzoo.evaluation.runner import evaluate
    from attnzoo.evaluation.subject_insertion import SubjectInsertionEvaluator
    from attnzoo.multimodal.insertion.flux import tiny_flux_fill
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    root = write_layout(tmp_path / "data")
    clip, dino = tiny_embedders()
    plan = SubjectInsertionEvaluator.plan(
        root,
        None,
        default_split="test",
        limit=None,
        model="flux_fill",
        weights="none",
        seeds="0,1",
        steps=1,
        panel_size="16",
    )
    assert plan.pipeline_kwargs == {"steps": 1, "panel_size": "16"}
    assert plan.settings["seeds"] == [0, 1] and plan.settings["steps"] == 1 and plan.settings["guidance"] == 30.0
    assert plan.settings["attention"]["head_gain"] == 0.2 and plan.settings["behaviour"] == "corrected"
    evaluator = SubjectInsertionEvaluator(root, seeds="0,1", clip_model=clip, dino_model=dino)
    assert [s.id for s in evaluator.samples()] == [
        "dog6/room/seed0",
        "dog6/room/seed1",
        "red_cartoon/room/seed0",
        "red_cartoon/room/seed1",
    ]
    pipe = SubjectInsertionPipeline(tiny_flux_fill(0), **plan.pipeline_kwargs)
    out = tmp_path / "eval"
    settings = {"model": "flux_fill", **plan.settings}
    metrics = evaluate(pipe, evaluator, out, settings=settings, batch_size=2, progress=False)
    assert metrics["n"] == 4 and metrics["pairs"] == 2 and set(metrics["per_subject"]) == {"dog6", "red_cartoon"}
    assert all(-1 <= metrics[k] <= 1 for k in ("clip_i", "dino", "clip_t"))
    report = (out / "report.md").read_text()
    assert "CLIP-I" in report and "corrected behaviour" in report
    assert "- denoising steps: 1, guidance: 30.0, seeds: [0, 1]" in report
    assert "edited steps=all" in report and "steps=None" not in report  # the edit's window, said as one
    from attnzoo.evaluation.subject_insertion import _attention_setting

    assert _attention_setting("steps", [2, 4]) == "edited steps=[2, 4)"
    assert _attention_setting("steps", [0.0, 1.0]) == "edited steps=[0.0, 1.0) of the run's steps (fractions)"
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[1])["seed"] == 1

    calls = []
    original = pipe._forward
    pipe._forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    again = evaluate(pipe, evaluator, out, settings=settings, batch_size=2, progress=False)
    assert calls == [] and again["clip_i"] == metrics["clip_i"]  # resumed: nothing recomputed


def test_plan_refuses_bad_settings(tmp_path):
    from attnzoo.evaluation.subject_insertion import SubjectInsertionEvaluator

    root = write_layout(tmp_path)
    kw = dict(default_split="test", limit=None, model="flux_fill", weights=None)
    with pytest.raises(InvalidOptionError, match="seeds"):
        SubjectInsertionEvaluator.plan(root, None, seeds="0,0", **kw)
    # the pipeline's range (it draws seed + 1 too), refused here before the model loads instead of at the first pair
    with pytest.raises(
        InvalidOptionError, match=r"each of seeds must be an integer in \[0, 2\*\*64 - 1\), got 18446744073709551615"
    ):
        SubjectInsertionEvaluator.plan(root, None, seeds=f"0,{2**64 - 1}", **kw)
    assert SubjectInsertionEvaluator(root, seeds=f"0,{2**64 - 2}").seeds == (0, 2**64 - 2)
    with pytest.raises(InvalidOptionError, match="method must be one of"):
        SubjectInsertionEvaluator.plan(root, None, method="magic", **kw)


@pytest.mark.parametrize("panel_size, panels", [("65", [64, 64]), ("33x47", [32, 48])])
def test_plan_records_the_panel_size_the_model_uses(tmp_path, panel_size, panels):
    """The asked size is rounded to the model's whole tokens (2 px on the tiny model); run.json and the report
    record the panels used (the evaluator's run settings, once the pipeline is built)."""
    from attnzoo.evaluation.subject_insertion import SubjectInsertionEvaluator
    from attnzoo.multimodal.insertion.flux import tiny_flux_fill

    kw = dict(default_split="test", limit=None, model="flux_fill", weights=None)
    plan = SubjectInsertionEvaluator.plan(write_layout(tmp_path), None, panel_size=panel_size, **kw)
    assert plan.pipeline_kwargs["panel_size"] == panel_size
    with pytest.warns(UserWarning, match="not a multiple of 2"):
        ran = plan.runs[0][1].run_settings(SimpleNamespace(model=tiny_flux_fill(0)), batch_size=1)
    assert ran["panel_size"] == panels and ran["attention"]["head_gain"] == 0.2
