"""pipeline("wsi-classification"): slide file -> tiles -> features -> ACMIL -> probabilities, attention, heatmap."""

import os
import tempfile
from pathlib import Path

import numpy as np
import openslide  # noqa: E402,F401  (the wsi extra: installed with .[all])
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import attnzoo
from attnzoo.datasets.mil_features import FeatureBag
from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.pipelines.wsi_classification import SlidePrediction
from tests.helpers import register_test_model
from tests.wsi_helpers import TinyEncoder, slide_image, write_section_slide, write_slide


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    torch.manual_seed(0)
    model = attnzoo.create_model("acmil_ga", in_dim=512, inner_dim=32)
    return attnzoo.pipeline(
        "wsi-classification",
        model=model,
        device="cpu",
        encoder="resnet18",
        encoder_weights="none",
        magnification=20,
        patch_size=112,
        input_size=64,
        feature_dir=tmp_path_factory.mktemp("feats"),
        labels=["normal", "tumour"],
        segment_kwargs={"a_t": 1},
    )


def test_slide_to_prediction_and_heatmap(wsi, tmp_path):
    slide = write_slide(tmp_path / "slide.tif", downsamples=(2, 4))  # a 2x level, as Camelyon16's TIFFs have
    result = wsi(slide)
    assert result.probabilities.shape == (2,) and abs(result.probabilities.sum() - 1) < 1e-5
    assert result.label in ("normal", "tumour") and len(result.attention) == len(result.coords) > 0
    assert abs(result.attention.sum() - 1) < 1e-4  # a distribution over the patches
    import h5py

    (features,) = wsi.feature_dir.glob("slide-*.h5")
    with h5py.File(features, "r") as f:  # ACMIL's reading: level 0 of the 40x slide, not level 1
        assert f["coords"].attrs["patch_level"] == 0 and f["coords"].attrs["patch_size"] == 224
    again = wsi(features)  # the extracted features, read back: the same prediction
    np.testing.assert_allclose(again.probabilities, result.probabilities, atol=1e-6)
    picture = result.heatmap(size=256)
    assert picture.size[0] == 256 and len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 20
    bag = torch.randn(30, 512)
    tensor = wsi(bag)
    assert tensor.attention.shape == (30,) and tensor.coords is None
    np.testing.assert_array_equal(wsi(bag[None]).probabilities, tensor.probabilities)  # [1, N, D], as the model takes
    with pytest.raises(InvalidInputError, match="no patch coordinates"):
        tensor.heatmap()


def test_slides_of_the_same_name_and_other_settings_get_their_own_features(wsi, tmp_path):
    image_a = slide_image(blobs=((600, 500, 420, 330, (205, 120, 175)),))
    image_b = slide_image(blobs=((1400, 900, 420, 330, (150, 85, 165)),))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = wsi(write_slide(tmp_path / "a" / "slide.tif", image_a))
    b = wsi(write_slide(tmp_path / "b" / "slide.tif", image_b))  # same file name, other slide: no "already exists"
    assert not np.array_equal(a.coords, b.coords)
    other = attnzoo.pipeline(
        "wsi-classification",
        model=wsi.model,
        device="cpu",
        encoder="resnet18",
        encoder_weights="none",
        magnification=20,
        patch_size=112,
        input_size=64,
        feature_dir=wsi.feature_dir,
        segment_kwargs={"a_t": 1},
        read_level="auto",
    )
    again = other(tmp_path / "a" / "slide.tif")  # the same slide, read another way, into the same folder
    np.testing.assert_array_equal(again.coords, a.coords)
    assert len(list(wsi.feature_dir.glob("slide-*.h5"))) >= 3


def test_heatmap_of_clam_features_uses_their_patch_size(wsi, tmp_path):
    import h5py

    coords = np.array([[x, y] for y in range(0, 2048, 512) for x in range(0, 2048, 512)], np.int64)
    for name, level, expected in (
        ("level0.h5", 0, 512),
        ("level1.h5", 1, 512),
    ):  # level 1: 256 px read there = 512 at level 0
        with h5py.File(tmp_path / name, "w") as f:
            f["features"] = np.random.default_rng(0).normal(size=(len(coords), 512)).astype(np.float32)
            f["coords"] = coords
            f["coords"].attrs["patch_level"] = level
            f["coords"].attrs["patch_size"] = 512 if level == 0 else 256
        assert wsi(tmp_path / name).patch_size_level0 == expected


def test_patch_size_of_outside_feature_files_from_their_attributes_or_grid(wsi, tmp_path):
    """TRIDENT puts patch_size_level0 on the coords dataset; a file without any size gets its grid's step,
    also when its patches form a single column (one x, many y)."""
    import h5py

    column = np.array([[1024, y] for y in range(0, 2048, 256)], np.int64)
    row = column[:, ::-1].copy()
    for name, coords, attrs, expected in (
        ("trident.h5", column, {"patch_size_level0": 512, "patch_size": 256, "patch_level": 0}, 512),
        ("column.h5", column, {}, 256),
        ("row.h5", row, {}, 256),
    ):
        with h5py.File(tmp_path / name, "w") as f:
            f["features"] = np.random.default_rng(0).normal(size=(len(coords), 512)).astype(np.float32)
            f["coords"] = coords
            f["coords"].attrs.update(attrs)
        prediction = wsi(tmp_path / name)
        assert prediction.patch_size_level0 == expected
        heatmap = np.asarray(prediction.heatmap(size=300)).astype(int)[:, : 300 - 124]  # left of the colour bar
        coloured = (np.ptp(heatmap, axis=-1) > 40).sum()  # viridis squares, not the grey canvas or the text
        assert coloured > len(coords) * 15**2  # squares the patches' size (about 20 px here), not 2 px dots


def test_bad_input(wsi, tmp_path):
    with pytest.raises(InvalidInputError, match="empty bag"):
        wsi(FeatureBag("empty", torch.zeros(0, 512)))
    with pytest.raises(InvalidInputError, match=r"\[N, D\]"):
        wsi(torch.randn(2, 10, 512))
    with pytest.raises(InvalidInputError):
        wsi(torch.randn(10, 384))  # the model expects 512-d features
    with pytest.raises(InvalidInputError, match="NaN|finite"):
        wsi(torch.full((4, 512), float("nan")))
    with pytest.raises(InvalidInputError, match="no such file"):
        wsi(tmp_path / "missing.svs")
    (tmp_path / "broken.svs").write_bytes(b"not a slide")
    with pytest.raises(attnzoo.errors.AttnzooError):
        wsi(tmp_path / "broken.svs")


def test_eval_command_on_feature_bags(wsi, tmp_path, capsys, monkeypatch):
    import json

    from attnzoo.cli import main
    from attnzoo.metrics.mil import mil_metrics
    from tests.training.test_wsi_recipe import write_acmil_h5

    data = write_acmil_h5(tmp_path / "feats.h5", n_slides=16, dim=512)
    register_test_model(monkeypatch, "acmil_test", lambda **kw: wsi.model, like="acmil_ga")
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "wsi-classification",
                "--model",
                "acmil_test",
                "--weights",
                "none",
                "--data",
                str(data),
                "--out",
                str(out),
                "--num-workers",
                "0",
            ]
        )
        == 0
    ), capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    from attnzoo.datasets.mil_features import read_acmil_h5

    bags = read_acmil_h5(data)
    test = [s for s in sorted(bags) if "test" in s]
    with torch.no_grad():
        probs = np.stack([torch.softmax(wsi.model(bags[s].features).slide_logits, -1)[0].numpy() for s in test])
    expected = mil_metrics(probs, np.array([bags[s].label for s in test]))
    assert metrics["n"] == len(test) and metrics["auc"] == pytest.approx(expected["auc"], abs=1e-4)
    assert (
        metrics["f1_micro"] == pytest.approx(expected["f1_micro"], abs=1e-4)
        and "F1 micro" in (out / "report.md").read_text()
    )
    args = [
        "eval",
        "wsi-classification",
        "--model",
        "acmil_test",
        "--weights",
        "none",
        "--data",
        str(data),
        "--out",
        str(out),
        "--num-workers",
        "0",
        "--limit",
        "2",
    ]
    assert main(args) != 0  # other settings in the same --out: refused, never mixed with the earlier run
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["n"] == 2


def test_evaluator_splits_and_labels_csv(tmp_path):
    import json

    import h5py

    from attnzoo.errors import DatasetFormatError
    from attnzoo.evaluation.wsi import WSIClassificationEvaluator

    folder = tmp_path / "h5_files"
    folder.mkdir()
    names = [f"BRACS_{i}" for i in range(6)]
    for name in names:  # per-slide h5 without labels (CLAM's layout), labels beside them as words
        with h5py.File(folder / f"{name}.h5", "w") as f:
            f["features"] = np.zeros((3, 8), np.float32)
            f["coords"] = np.zeros((3, 2), np.int64)
    (folder / "labels.csv").write_text(
        "slide_id,label\n" + "".join(f"{n},{'tumor' if i % 2 else 'normal'}\n" for i, n in enumerate(names))
    )
    with pytest.raises(
        DatasetFormatError, match="no slide id contains 'test'"
    ):  # not a silent evaluation on every slide
        WSIClassificationEvaluator(folder, "test")
    assert WSIClassificationEvaluator(folder, "all").ids == names
    split = tmp_path / "split_1.json"
    split.write_text(json.dumps({"train_names": names[:3], "val_names": names[3:4], "test_names": names[4:]}))
    evaluator = WSIClassificationEvaluator(folder, str(split))
    assert evaluator.ids == names[4:] and [s.target for s in evaluator.samples()] == [0, 1]
    split.write_text(json.dumps({"train_names": names[:3], "val_names": [], "test_names": names[4:] + ["BRACS_99"]}))
    with pytest.raises(DatasetFormatError, match="BRACS_99"):
        WSIClassificationEvaluator(folder, str(split))


def test_evaluator_scores_the_probabilities_the_model_gave_not_rounded_ones():
    """A confident model's softmax rounds to exactly 0 or 1 at 6 decimals: the tied slides would be scored as
    half-ordered by AUC, where the raw softmax (what the official code scores) orders them."""
    from types import SimpleNamespace

    from attnzoo.evaluation.runner import EvalSample
    from attnzoo.evaluation.wsi import WSIClassificationEvaluator
    from attnzoo.metrics.mil import mil_metrics

    logits = torch.tensor([[0.0, 15.5], [0.0, 14.9], [0.0, -15.2], [0.0, -16.0], [0.0, -14.8], [0.0, 1.6e-6]])
    probabilities, targets = torch.softmax(logits.double(), -1).numpy(), [1, 0, 1, 0, 0, 1]
    evaluator = WSIClassificationEvaluator.__new__(WSIClassificationEvaluator)
    records = [
        evaluator.record(EvalSample(str(i), None, t), SimpleNamespace(probabilities=p))
        for i, (p, t) in enumerate(zip(probabilities, targets, strict=True))
    ]
    expected = mil_metrics(probabilities, np.array(targets))
    assert expected["auc"] != mil_metrics(np.round(probabilities, 6), np.array(targets))["auc"]  # the case bites
    got = evaluator.metrics(records)
    assert got["auc"] == round(expected["auc"], 4) and got["accuracy"] == round(expected["accuracy"], 4)
    # recorded in run.json: a run of rounded probabilities is not resumed into a mix of both
    assert evaluator.run_settings(None, batch_size=1) == {"probabilities": "full precision"}


# ------------------------------------------------------------------ settings, per call and at construction


def _tiny_pipeline(**kwargs):
    torch.manual_seed(0)
    return attnzoo.pipeline(
        "wsi-classification", model=attnzoo.create_model("acmil_ga", in_dim=8, inner_dim=8), device="cpu", **kwargs
    )


def test_defaults_find_tissue_on_a_whole_slide_sized_image(tmp_path):
    """ACMIL's recipe as is (CLAM's a_t=100 reference patches, 256 px at 20x from level 0): the section
    is tiled, the speck of debris beside it is not."""
    slide = write_section_slide(tmp_path / "section.svs")
    result = _tiny_pipeline(encoder=TinyEncoder(), feature_dir=tmp_path / "f")(slide)
    assert 100 <= len(result.coords) <= 120 and result.patch_size_level0 == 512
    assert (result.coords[:, 0] < 7400).all()  # nothing from the debris at (7600, 600)


def test_settings_work_per_call_and_at_construction_alike(tmp_path):
    """base_magnification (a PNG has no metadata), segment_kwargs, encoder_weights: either place."""
    png = tmp_path / "plain.png"
    Image.fromarray(slide_image(1024, 768, blobs=((500, 380, 330, 260, (200, 110, 170)),))).save(png)
    settings = {"base_magnification": 40, "segment_kwargs": {"a_t": 0.1}, "patch_size": 64, "input_size": 32}
    bare = _tiny_pipeline(encoder=TinyEncoder(), feature_dir=tmp_path / "a")
    with pytest.raises(InvalidInputError, match="base_magnification"):
        bare(png, segment_kwargs={"a_t": 0.1})
    per_call = bare(png, **settings)
    built = _tiny_pipeline(encoder=TinyEncoder(), feature_dir=tmp_path / "b", **settings)(png)
    np.testing.assert_array_equal(per_call.coords, built.coords)
    np.testing.assert_allclose(per_call.probabilities, built.probabilities, atol=1e-6)
    assert per_call.patch_size_level0 == 128  # 64 px at 20x of a 40x scan
    finer = bare(png, **{**settings, "magnification": 40})  # a call's setting wins over the constructor's
    assert finer.patch_size_level0 == 64 and len(finer.coords) > len(per_call.coords)


def test_default_feature_folder_is_removed_with_the_pipeline(tmp_path):
    """Without feature_dir, features go to a temporary folder that leaves with the pipeline (a run
    over many pipelines once left one folder per pipeline in /tmp)."""
    import gc

    pipe = _tiny_pipeline(encoder=TinyEncoder())
    folder = pipe.feature_dir
    assert folder.is_dir() and pipe.feature_dir == folder
    bag = folder / "kept-until-the-pipeline-goes.h5"
    bag.write_bytes(b"x")
    del pipe
    gc.collect()
    assert not folder.exists()


def test_second_call_on_a_slide_with_a_random_encoder_reuses_its_features(wsi, tmp_path):
    slide = write_slide(tmp_path / "again.tif")
    first = wsi(slide)
    (made,) = wsi.feature_dir.glob("again-*.h5")
    stamp = made.stat().st_mtime_ns
    second = wsi(slide)  # once refused: "already exists ... pass overwrite=True"
    np.testing.assert_array_equal(first.probabilities, second.probabilities)
    assert [p.stat().st_mtime_ns for p in wsi.feature_dir.glob("again-*.h5")] == [stamp]
    assert first.encoder == "resnet18, random (seed 0)" and first.random_weights


def test_random_model_weights_mean_a_random_encoder_and_say_so(monkeypatch, tmp_path):
    """weights="none" must not download the encoder's ImageNet weights (they cannot make a random model's
    output meaningful); "pretrained" still asks for them. The picture and summary say "random weights"."""
    from attnzoo.pipelines import wsi_features

    asked = []

    def fake_encoder(name, weights=None, **kwargs):
        asked.append((name, weights))
        return TinyEncoder()

    monkeypatch.setattr(wsi_features, "create_patch_encoder", fake_encoder)
    wsi = attnzoo.pipeline(
        "wsi-classification",
        model="acmil_ga",
        weights="none",
        device="cpu",
        model_kwargs={"in_dim": 8, "inner_dim": 8},
        feature_dir=tmp_path,
        segment_kwargs={"a_t": 1},
        patch_size=128,
        input_size=32,
    )
    slide = write_slide(tmp_path / "s.tif")
    result = wsi(slide)
    wsi(slide, encoder_weights="pretrained")
    assert asked == [("resnet18", "none"), ("resnet18", None)]
    assert result.random_weights and result.weights == "random (seed 0)" and "random weights" in result.summary()
    assert result.to_dict()["weights"] == "random (seed 0)"
    picture = np.asarray(result.heatmap(size=400)).astype(int)
    red = (np.abs(picture - np.array([170, 20, 20])).sum(-1) < 60)[:60]  # the note, in the title band
    assert red.sum() > 50
    assert "array" not in repr(result) and "random weights" in repr(result)


def test_bad_settings_are_typed_errors_at_construction_and_per_call(wsi, tmp_path):
    (tmp_path / "file").write_text("x")
    bad = [
        {"segment_kwargs": {"no_such": 1}},
        {"segment_kwargs": {"a_t": "small"}},
        {"segment_kwargs": {"use_otsu": 1}},
        {"segment_kwargs": {"mthresh": 0}},
        {"segment_kwargs": [("a_t", 1)]},
        {"magnification": -20},
        {"magnification": float("nan")},
        {"base_mpp": "0.25"},
        {"patch_size": 0},
        {"patch_size": 12.5},
        {"input_size": True},
        {"read_level": 1},
        {"min_tissue": 2},
        {"labels": ["only one"]},
        {"labels": "ab"},
        {"feature_dir": tmp_path / "file"},
        {"progress": "yes"},
        {"encoder": 5},
        {"encoder_weights": 5},
        {"no_such_setting": 1},
    ]
    for setting in bad:
        with pytest.raises(InvalidInputError):
            attnzoo.pipeline("wsi-classification", model=wsi.model, device="cpu", **setting)
        with pytest.raises(InvalidInputError):
            wsi(torch.randn(3, 512), **setting)
    with pytest.raises(InvalidInputError, match="encoder_weights"):
        wsi(write_slide(tmp_path / "m.tif"), encoder=TinyEncoder(), encoder_weights="none")


def test_sizes_that_cannot_be_meant_are_refused_by_the_pipeline_too(wsi, tmp_path):
    """The extraction's bounds hold for a slide classified directly: at construction where the value alone
    decides, else when the slide is tiled (the input size is bounded relative to the patch size)."""
    with pytest.raises(InvalidOptionError, match="read in one piece"):
        attnzoo.pipeline("wsi-classification", model=wsi.model, device="cpu", patch_size=100_000)
    for setting in ({"min_tissue": np.float32(0.25)}, {"magnification": np.float32(10)}, {"input_size": 100_000.0}):
        attnzoo.pipeline("wsi-classification", model=wsi.model, device="cpu", **setting)  # accepted as before
    with pytest.raises(InvalidOptionError, match="at most 16x patch_size 112"):
        wsi(write_slide(tmp_path / "s.tif"), input_size=100_000)
    assert not list(wsi.feature_dir.glob("s-*"))


def test_complex_and_non_finite_features_are_refused(wsi):
    for features, match in (
        (torch.randn(5, 512, dtype=torch.complex64), "imaginary"),
        (torch.ones(5, 512, dtype=torch.bool), "real numbers"),
        (np.full((5, 512), 1 + 1j), "real numbers"),
        (np.array([["a"] * 512] * 5), "real numbers"),
        (torch.full((5, 512), float("inf")), "infinite"),
        (torch.full((5, 512), 1e300, dtype=torch.float64), "float32's range"),
        (torch.zeros(5, 0), "0 dimensions"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            wsi(features)
    bag = FeatureBag("s", torch.randn(4, 512), coords=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="one per patch"):
        wsi(bag)
    ints = wsi(np.ones((4, 512), np.int64))  # integer features are numbers: used as float32
    np.testing.assert_allclose(ints.probabilities, wsi(torch.ones(4, 512)).probabilities)
    results = list(wsi.iterate([torch.randn(3, 512), torch.randn(3, 384), torch.randn(2, 512)], on_error="skip"))
    assert isinstance(results[1][1], InvalidInputError) and isinstance(results[2][1], SlidePrediction)


def test_a_meta_tensor_bag_is_refused_naming_it(wsi):
    """A meta tensor (no data) gave a bare ``NotImplementedError: Cannot copy out of meta tensor``."""
    with pytest.raises(InvalidInputError, match=r"^the Tensor is a meta tensor: it holds no data"):
        wsi(torch.empty(5, 512, device="meta"))
    with pytest.raises(InvalidInputError, match=r"^s is a meta tensor"):
        wsi(FeatureBag("s", torch.empty(5, 512, device="meta")))
    with pytest.raises(InvalidInputError, match=r"^s: coords is a meta tensor"):
        wsi(FeatureBag("s", torch.randn(2, 512), coords=torch.empty(2, 2, device="meta")))


def test_a_meta_tensor_bag_gets_the_shared_wording_with_what_to_do(wsi):
    """The bag's features and its coordinates are refused through one guard (attnzoo._values.refuse_meta), with one
    wording: the input named, then what to do with a tensor that holds no values."""
    for bag in (
        FeatureBag("s", torch.empty(5, 512, device="meta")),
        FeatureBag("s", torch.randn(2, 512), coords=torch.empty(2, 2, device="meta")),
    ):
        with pytest.raises(InvalidInputError, match=r"^s(: coords)? is a meta tensor: it holds no data .*materialize"):
            wsi(bag)


def test_the_pipeline_dtype_is_the_patch_encoders_too(monkeypatch, tmp_path):
    """dtype="bf16" left a named encoder in float32 while the run recorded bfloat16; the encoder now runs in the
    pipeline's dtype, and a module given in bfloat16 takes its patches in bfloat16 (it was refused before)."""
    from attnzoo.evaluation.runner import execution_settings
    from attnzoo.pipelines import wsi_features

    monkeypatch.setattr(wsi_features, "create_patch_encoder", lambda name, weights=None, **kwargs: TinyEncoder())
    slide = write_slide(tmp_path / "s.tif")
    settings = {"feature_dir": tmp_path / "f", "segment_kwargs": {"a_t": 1}, "patch_size": 128, "input_size": 32}
    exact = _tiny_pipeline(encoder="resnet18", encoder_weights="none", **settings)
    low = _tiny_pipeline(encoder="resnet18", encoder_weights="none", dtype="bf16", **settings)
    reference, result = exact(slide), low(slide)
    ((encoder, *_),) = low._encoders.values()
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    assert execution_settings(low)["model_dtype"] == "bfloat16"
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=0.05)
    assert len(list((tmp_path / "f").glob("s-*.h5"))) == 2  # features of a bfloat16 encoder are other features
    given = TinyEncoder()
    _tiny_pipeline(encoder=given, dtype="bf16", **settings)(slide)
    assert given.conv.weight.dtype == torch.bfloat16
    as_is = _tiny_pipeline(encoder=TinyEncoder().to(torch.bfloat16), **settings)(slide)
    np.testing.assert_allclose(as_is.probabilities, reference.probabilities, atol=0.05)


def test_a_generator_of_bags_is_a_batch(wsi):
    bags = [torch.randn(3, 512), FeatureBag("s", torch.randn(2, 512)), np.ones((4, 512), np.float32)]
    expected = wsi(bags)
    for got in (wsi(bag for bag in bags), wsi(iter(bags)), wsi(tuple(bags))):
        assert [len(r.attention) for r in got] == [3, 2, 4]
        for result, want in zip(got, expected):
            np.testing.assert_allclose(result.probabilities, want.probabilities)
    assert isinstance(wsi(bags[0]), SlidePrediction) and isinstance(wsi(bags[1]), SlidePrediction)
    with pytest.raises(InvalidInputError, match="cannot classify a dict"):
        wsi({"features": bags[0]})  # a mapping is one (unreadable) input, not a batch of its keys


def test_progress_bar_over_a_slides_patches(wsi, tmp_path, capsys):
    slide = write_slide(tmp_path / "bar.tif")
    wsi(slide)  # progress=None and stderr is not a terminal here: no bar
    assert "patch" not in capsys.readouterr().err
    wsi(slide, progress=True, feature_dir=tmp_path / "again")
    assert "patch" in capsys.readouterr().err


def test_no_tissue_messages_say_which_setting_to_change(tmp_path):
    wsi = _tiny_pipeline(encoder=TinyEncoder(), feature_dir=tmp_path)
    with pytest.raises(InvalidInputError, match=r"below a_t=100 .*segment_kwargs=\{'a_t'"):
        wsi(write_slide(tmp_path / "small.tif"))  # tissue, but far less than CLAM's minimum region
    blank = write_slide(tmp_path / "blank.tif", np.full((512, 512, 3), 255, np.uint8), downsamples=(4,))
    with pytest.raises(InvalidInputError, match="lower sthresh"):
        wsi(blank)


# ------------------------------------------------------------------------------------------ fuzzing

#: Small by default (ATTNZOO_FUZZ_EXAMPLES=1000 for a deeper run by hand), never writing .hypothesis/ into the tree.
FUZZ = settings(
    max_examples=int(os.environ.get("ATTNZOO_FUZZ_EXAMPLES", "30")),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_pipeline(encoder=TinyEncoder(), feature_dir=tmp_path_factory.mktemp("fuzz"), labels=["a", "b"])


def _classified_or_refused(wsi, source, n=None):
    """The rule for every input: a well-formed prediction, or a typed error (never another exception)."""
    try:
        result = wsi(source)
    except attnzoo.errors.AttnzooError as err:
        event(f"refused: {type(err).__name__}")
        return None
    event("classified")
    assert isinstance(result, SlidePrediction) and result.probabilities.shape == (2,)
    assert np.isfinite(result.probabilities).all() and abs(result.probabilities.sum() - 1) < 1e-5
    assert np.isfinite(result.attention).all() and abs(result.attention.sum() - 1) < 1e-4
    assert n is None or len(result.attention) == n
    if result.coords is not None:  # any coordinates a file may hold draw a picture, at most as wide as asked
        assert 0 < result.heatmap(size=200).width <= 200
    return result


@st.composite
def feature_arrays(draw):
    """Bags of odd shapes (0-4 dims, empty ones too), dtypes (complex and bool included) and values (NaN, inf, huge)."""
    if draw(st.booleans()):  # half of them well-formed, so the path to a prediction is fuzzed too
        shape, elements = (draw(st.integers(1, 6)), 8), st.floats(-10, 10)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3))) + (draw(st.sampled_from([8, 8, 3, 0])),)
        elements = st.one_of(st.floats(-10, 10), st.sampled_from([np.nan, np.inf, -np.inf, 1e300, 0.0]))
    values = draw(hnp.arrays(np.float64, shape, elements=elements))
    kind = draw(st.sampled_from(["torch", "numpy", "complex", "bag"]))
    if kind == "complex":
        return values.astype(np.complex128) * (1 + 1j)
    tensor = torch.from_numpy(values).to(draw(st.sampled_from(DTYPES)))
    if kind == "numpy":
        return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    if kind == "bag":
        rows = tensor.shape[-2] if tensor.ndim >= 2 else 0
        coords = draw(st.one_of(st.none(), hnp.arrays(np.int64, (draw(st.sampled_from([rows, rows + 1])), 2))))
        return FeatureBag("fuzz", tensor, coords=None if coords is None else torch.from_numpy(coords))
    return tensor


@FUZZ
@given(features=feature_arrays())
def test_fuzz_tensors_arrays_and_bags(tiny, features):
    raw = features.features if isinstance(features, FeatureBag) else features
    tensor = torch.as_tensor(raw)
    finite_real = (
        not tensor.is_complex()
        and tensor.dtype != torch.bool
        and tensor.ndim in (2, 3)
        and (tensor.ndim == 2 or tensor.shape[0] == 1)
        and tensor.shape[-2] > 0
        and tensor.shape[-1] == 8
        and bool(torch.isfinite(tensor.float()).all())
    )
    coords_ok = not isinstance(features, FeatureBag) or features.coords is None or len(features.coords) == len(raw)
    result = _classified_or_refused(tiny, features, tensor.shape[-2] if tensor.ndim >= 2 else None)
    assert (result is not None) == (finite_real and coords_ok), (tensor.dtype, tuple(tensor.shape))


@FUZZ
@given(
    source=st.one_of(
        st.none(),
        st.integers(),
        st.floats(allow_nan=True),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        st.lists(st.integers(), max_size=2),
    )
)
def test_fuzz_objects_that_are_not_slides(tiny, source):
    try:
        out = tiny(source)
    except attnzoo.errors.AttnzooError:
        return
    assert out == [] or all(isinstance(r, SlidePrediction) for r in out)


@FUZZ
@given(
    suffix=st.sampled_from([".h5", ".hdf5", ".pt", ".pth", ".svs", ".tif", ".png", ".txt", ""]),
    content=st.binary(max_size=256),
)
def test_fuzz_files_of_any_content(tiny, suffix, content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(content)
        assert _classified_or_refused(tiny, path) is None  # random bytes are never a slide or features
        assert _classified_or_refused(tiny, Path(folder) / "missing.svs") is None
        assert _classified_or_refused(tiny, Path(folder)) is None  # a folder without features


@st.composite
def feature_files(draw, folder):
    """A per-slide HDF5 or .pt feature file, as CLAM/TRIDENT/attnzoo write them, with odd contents."""
    import h5py

    features = draw(feature_arrays())
    raw = features.features if isinstance(features, FeatureBag) else features
    raw = np.asarray(raw.float() if isinstance(raw, torch.Tensor) and raw.dtype == torch.bfloat16 else raw)
    n = raw.shape[-2] if raw.ndim >= 2 else 1
    coords = draw(st.one_of(st.none(), hnp.arrays(np.float64, (draw(st.sampled_from([n, n + 1])), 2))))
    if draw(st.booleans()):
        path = folder / "slide.h5"
        with h5py.File(path, "w") as f:
            f["features"] = raw
            if coords is not None:
                f["coords"] = coords
                f["coords"].attrs["patch_level"] = draw(st.integers(-1, 2))
                f["coords"].attrs["patch_size"] = draw(st.integers(0, 512))
            if draw(st.booleans()):
                f.attrs["slide_path"] = draw(
                    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=10)
                )
    else:
        path = folder / "slide.pt"
        payload = {"features": torch.as_tensor(raw)} if draw(st.booleans()) else torch.as_tensor(raw)
        torch.save(payload, path)
    return path, raw


@FUZZ
@given(data=st.data())
def test_fuzz_feature_files(tiny, data):
    with tempfile.TemporaryDirectory() as folder:
        path, raw = data.draw(feature_files(Path(folder)))
        result = _classified_or_refused(tiny, path)
        if result is not None:  # what was read is what was written
            assert raw.shape[-1] == 8 and len(result.attention) == raw.shape[-2]
            assert not np.iscomplexobj(raw) and raw.dtype != bool and np.isfinite(raw.astype(np.float32)).all()


def test_the_heatmap_title_counts_one_patch_in_the_singular(monkeypatch):
    import attnzoo.viz.wsi as wsi_viz

    titles = []
    draw = wsi_viz.plot_attention_heatmap

    def recording(*args, **kwargs):
        titles.append(kwargs["title"])
        return draw(*args, **kwargs)

    monkeypatch.setattr(wsi_viz, "plot_attention_heatmap", recording)
    for count in (1, 2):
        prediction = SlidePrediction(
            probabilities=np.array([0.4, 0.6]),
            attention=np.full(count, 1 / count),
            coords=np.array([[512 * i, 0] for i in range(count)]),
            patch_size_level0=512,
            labels=["normal", "tumour"],
        )
        assert prediction.heatmap(size=300).width == 300
    assert titles == ["tumour (60.0%), 1 patch", "tumour (60.0%), 2 patches"]
