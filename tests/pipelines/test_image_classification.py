import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import InvalidInputError, UnknownNameError
from attnzoo.pipelines.image_classification import ImageClassificationPipeline
from attnzoo.tasks import TaskSpec, get_task, list_tasks, register_task, unregister_task


@pytest.fixture(scope="module")
def classify(tiny_model):
    return attnzoo.pipeline("image-classification", model=tiny_model, device="cpu")


def manual_scores(model, image):
    """The same prediction written out by hand with timm's own transform: logits in the model's
    dtype, probabilities in fp32."""
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    with torch.no_grad():
        logits = model(transform(image.convert("RGB"))[None].to(next(model.parameters()).dtype))
    return logits.float().softmax(-1)[0]


def test_result_matches_hand_written_inference(classify, tiny_model, photo):
    result = classify(photo, top_k=3)
    probs = manual_scores(tiny_model, photo)
    top = probs.topk(3)
    assert [p.index for p in result] == top.indices.tolist()
    assert np.allclose([p.score for p in result], top.values.numpy(), atol=1e-6)
    from timm.data import ImageNetInfo

    assert result[0].label == ImageNetInfo().index_to_description(result[0].index)
    assert result[0]["label"] == result[0].label and set(result[0].to_dict()) == {"label", "score", "index"}


def test_every_input_kind_gives_the_same_answer(classify, photo, tmp_path):
    photo.save(tmp_path / "p.png")
    arr = np.array(photo)
    sources = [tmp_path / "p.png", str(tmp_path / "p.png"), photo, arr, torch.from_numpy(arr).permute(2, 0, 1)]
    results = [classify(s) for s in sources]
    assert all(same(r, results[0]) for r in results)


def same(a, b):
    """Same ranking and scores up to float reassociation across batch sizes."""
    return [p.index for p in a] == [p.index for p in b] and np.allclose(
        [p.score for p in a], [p.score for p in b], atol=1e-6
    )


def test_batching_equals_one_by_one(classify, photo):
    images = [
        photo,
        photo.rotate(90, expand=True),
        photo.convert("L"),
        photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        photo.crop((0, 0, 40, 40)),
    ]
    singles = [classify(im) for im in images]
    for batch_size in (1, 2, 5):
        batched = classify(images, batch_size=batch_size)
        assert all(same(a, b) for a, b in zip(batched, singles))


def test_workers_and_generators_keep_order(classify, photo):
    images = [photo.rotate(a) for a in (0, 30, 60, 90)]
    plain = classify(images, batch_size=2)
    assert all(same(a, b) for a, b in zip(classify(iter(images), batch_size=3), plain, strict=True))
    assert [r for _, r in classify.iterate(images, batch_size=2, num_workers=2)] == plain


def test_four_d_array_is_a_batch(classify, photo):
    arr = np.stack([np.array(photo)] * 2)
    out = classify(arr)
    assert len(out) == 2 and out[0] == out[1] and same(out[0], classify(photo))


def test_top_k_and_labels(tiny_model, photo):
    model = attnzoo.create_model("test_resnet", num_classes=3)
    pipe = ImageClassificationPipeline(model, labels=["cat", "dog", "bird"], device="cpu", top_k=10)
    out = pipe(photo)
    assert len(out) == 3 and {p.label for p in out} == {"cat", "dog", "bird"}
    assert abs(sum(p.score for p in out) - 1) < 1e-5
    assert [p.label for p in ImageClassificationPipeline(model, device="cpu")(photo)][0].startswith("LABEL_")
    with pytest.raises(InvalidInputError, match="labels has 2"):
        ImageClassificationPipeline(model, labels=["a", "b"], device="cpu")
    with pytest.raises(InvalidInputError, match="top_k"):
        pipe(photo, top_k=0)
    with pytest.raises(InvalidInputError, match="unexpected arguments"):
        pipe(photo, topk=3)


def test_dtype_and_device(tiny_model, photo):
    pipe = attnzoo.pipeline("image-classification", model=tiny_model, device="cpu", dtype="float64")
    assert next(pipe.model.parameters()).dtype == torch.float64
    ref = attnzoo.pipeline("image-classification", model=attnzoo.create_model("test_resnet"), device="cpu")
    assert pipe(photo)[0].index == manual_scores(pipe.model.float(), photo).argmax().item()
    with pytest.raises(InvalidInputError, match="dtype"):
        attnzoo.pipeline("image-classification", model=tiny_model, device="cpu", dtype="float13")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA"):
            attnzoo.pipeline("image-classification", model=tiny_model, device="cuda")
    assert ref.device.type == "cpu"


@pytest.mark.parametrize("dtype, float32_gap", [("float64", 5e-11), ("bfloat16", 1e-7)])
def test_cli_run_computes_in_the_dtype_it_is_given(tiny_model, photo, tmp_path, dtype, float32_gap):
    """`attnzoo run --dtype`: every class's score is the model's, by hand, in that dtype, and
    measurably not the fp32 one (the gap: this model and photo's, at the least)."""
    from safetensors.torch import save_file

    from attnzoo.cli import main

    save_file(tiny_model.state_dict(), tmp_path / "weights.safetensors")
    photo.save(tmp_path / "cat.png")
    args = ["run", "image-classification", str(tmp_path / "cat.png"), "--model", "test_resnet", "--top-k", "1000"]
    args += ["--weights", str(tmp_path / "weights.safetensors"), "--device", "cpu", "--dtype", dtype]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())["results"][str(tmp_path / "cat.png")]
    scores = np.zeros(1000)
    scores[[p["index"] for p in record]] = [p["score"] for p in record]
    by_hand = manual_scores(copy.deepcopy(tiny_model).to(getattr(torch, dtype)), photo).double().numpy()
    in_fp32 = manual_scores(tiny_model, photo).double().numpy()
    np.testing.assert_allclose(scores, by_hand, rtol=0, atol=1e-12)
    assert np.abs(scores - in_fp32).max() > float32_gap


def test_model_by_name_with_random_weights(photo):
    pipe = attnzoo.pipeline("classification", model="test_resnet", weights="none", device="cpu")
    assert isinstance(pipe, ImageClassificationPipeline) and len(pipe(photo)) == 5


#: Tiny builds of fixed-input-size classifiers (attnzoo's families, and a timm ViT) at a size other than their
#: checkpoints' 224.
OTHER_SIZE = {
    "sparsifiner_deit_small": dict(img_size=64, embed_dim=32, depth=2, num_heads=2),
    "inline_deit_tiny": dict(img_size=32, embed_dim=32, depth=2, num_heads=2),
    "inline_swin_tiny": dict(img_size=64, embed_dim=32, depths=(1, 1), num_heads=(2, 2), window_size=4),
    "vit_tiny_patch16_224": dict(img_size=48, embed_dim=32, depth=1, num_heads=2),
}


@pytest.mark.parametrize("name", list(OTHER_SIZE))
def test_a_model_built_at_another_size_is_fed_that_size(name, photo):
    """timm keeps the checkpoint's input size in pretrained_cfg; the pipeline resizes to the size the model
    was built at (timm's resolve_input_data_config), with the rest of the checkpoint's preprocessing."""
    from timm.data import create_transform, resolve_data_config

    kwargs = OTHER_SIZE[name]
    size = kwargs["img_size"]
    torch.manual_seed(0)
    model = attnzoo.create_model(name, **kwargs)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    pipe = attnzoo.pipeline("image-classification", model=model, device="cpu")
    assert pipe.data_config["input_size"] == (3, size, size)
    assert {k: v for k, v in pipe.data_config.items() if k != "input_size"} == {
        k: v for k, v in resolve_data_config(model=model).items() if k != "input_size"
    }
    result = pipe(photo, top_k=3)
    transform = create_transform(**resolve_data_config({"input_size": (3, size, size)}, model=model))
    with torch.no_grad():
        probs = model(transform(photo.convert("RGB"))[None]).float().softmax(-1)[0]
    top = probs.topk(3)
    assert [p.index for p in result] == top.indices.tolist()
    assert np.allclose([p.score for p in result], top.values.numpy(), atol=1e-6)


def test_a_model_named_with_another_img_size_runs(photo):
    pipe = attnzoo.pipeline(
        "image-classification",
        model="inline_deit_tiny",
        weights="none",
        device="cpu",
        model_kwargs=OTHER_SIZE["inline_deit_tiny"],
    )
    assert pipe.data_config["input_size"] == (3, 32, 32) and len(pipe(photo, top_k=2)) == 2


def test_model_size_without_timms_input_traits(monkeypatch):
    """With a timm that has no resolve_input_data_config, a fixed-size model's patch embedding gives its size."""
    import timm.data

    from attnzoo.pipelines.image_classification import model_data_config

    torch.manual_seed(0)
    models = {name: attnzoo.create_model(name, **kw) for name, kw in OTHER_SIZE.items()}
    models["test_resnet"] = timm.create_model("test_resnet")  # not fixed-size: its checkpoint's size
    monkeypatch.delattr(timm.data, "resolve_input_data_config", raising=False)  # older timm releases have none
    for name, kw in OTHER_SIZE.items():
        expected = {
            **timm.data.resolve_data_config(model=models[name]),
            "input_size": (3, kw["img_size"], kw["img_size"]),
        }
        assert model_data_config(models[name]) == expected, name
    assert model_data_config(models["test_resnet"]) == timm.data.resolve_data_config(model=models["test_resnet"])


def test_bad_inputs_raise_naming_the_input(classify, photo, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(InvalidInputError, match="bad.jpg"):
        classify(tmp_path / "bad.jpg")
    with pytest.raises(InvalidInputError, match="bad.jpg"):
        classify([photo, tmp_path / "bad.jpg"])
    results = list(classify.iterate([photo, tmp_path / "bad.jpg", photo], on_error="skip"))
    assert [i for i, _ in results] == [0, 1, 2]
    assert isinstance(results[1][1], InvalidInputError) and same(results[0][1], results[2][1])


def test_every_input_kind_keeps_its_image_for_the_picture(classify, photo, tmp_path):
    """plot() works without passing the image again, whatever the input was: files are read again, in-memory
    inputs are kept as decoded (a copy: editing the caller's image afterwards changes nothing)."""
    photo.save(tmp_path / "p.png")
    arr = np.array(photo)
    canvas = photo.copy()
    sources = [tmp_path / "p.png", canvas, arr, torch.from_numpy(arr).permute(2, 0, 1)]
    results = classify(sources, batch_size=2)
    assert results[0].image == tmp_path / "p.png"
    for result in results[1:]:
        assert isinstance(result.image, Image.Image) and np.array_equal(np.asarray(result.image), arr)
    canvas.paste((0, 0, 0), (0, 0, 96, 64))
    assert np.array_equal(np.asarray(results[1].image), arr)
    pictures = [r.plot() for r in results]
    assert all(np.array_equal(np.asarray(p), np.asarray(pictures[0])) for p in pictures[1:])


def test_top_k_takes_numpy_integers(classify, photo):
    assert len(classify(photo, top_k=np.int64(3))) == 3 and len(classify(photo, top_k=np.uint8(2))) == 2
    for bad in (np.float64(3), "3", np.bool_(True)):
        with pytest.raises(InvalidInputError, match="top_k"):
            classify(photo, top_k=bad)


def test_task_registry():
    assert "image-classification" in list_tasks()
    assert get_task("classification").name == "image-classification"
    with pytest.raises(UnknownNameError, match="image-classification"):
        attnzoo.pipeline("image-clasification")
    spec = register_task(
        TaskSpec("unit-test-task", "a test", pipelines=(ImageClassificationPipeline,), default_model="test_resnet")
    )
    try:
        assert attnzoo.pipeline("unit-test-task", weights="none", device="cpu").task == "image-classification"
        assert spec.pipeline_classes() == [ImageClassificationPipeline]
        with pytest.raises(ValueError, match="already registered"):
            register_task(TaskSpec("unit-test-task", "again", pipelines=(ImageClassificationPipeline,)))
    finally:
        unregister_task("unit-test-task")
    with pytest.raises(UnknownNameError):
        get_task("unit-test-task")


def test_bare_cuda_means_this_processes_gpu_under_torchrun(monkeypatch):
    from attnzoo.pipelines.base import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # an explicit index is checked against it
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == torch.device("cuda:1") == resolve_device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")  # an explicit index is kept
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device(None) == torch.device("cuda")
