"""pipeline("wsi-classification"): slide file -> tiles -> features -> ACMIL -> probabilities, attention, heatmap."""

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.datasets.mil_features import FeatureBag
from attnzoo.errors import InvalidInputError
from tests.helpers import register_test_model
from tests.wsi_helpers import slide_image, write_slide

pytest.importorskip("openslide")


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
