"""pipeline("wsi-classification"): slide file -> tiles -> features -> ACMIL -> probabilities, attention, heatmap."""

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.datasets.mil_features import FeatureBag
from attnzoo.errors import InvalidInputError
from tests.wsi_helpers import write_slide

pytest.importorskip("openslide")


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    torch.manual_seed(0)
    model = attnzoo.create_model("acmil_ga", in_dim=512, inner_dim=32)
    return attnzoo.pipeline("wsi-classification", model=model, device="cpu", encoder="resnet18", encoder_weights="none",
                            magnification=20, patch_size=112, input_size=64, feature_dir=tmp_path_factory.mktemp("feats"),
                            labels=["normal", "tumour"], segment_kwargs={"a_t": 1})


def test_slide_to_prediction_and_heatmap(wsi, tmp_path):
    slide = write_slide(tmp_path / "slide.tif", downsamples=(2, 4))  # a 2x level, as Camelyon16's TIFFs have
    result = wsi(slide)
    assert result.probabilities.shape == (2,) and abs(result.probabilities.sum() - 1) < 1e-5
    assert result.label in ("normal", "tumour") and len(result.attention) == len(result.coords) > 0
    assert abs(result.attention.sum() - 1) < 1e-4  # a distribution over the patches
    import h5py

    with h5py.File(wsi.feature_dir / "slide.h5", "r") as f:  # ACMIL's reading: level 0 of the 40x slide, not level 1
        assert f["coords"].attrs["patch_level"] == 0 and f["coords"].attrs["patch_size"] == 224
    again = wsi(wsi.feature_dir / "slide.h5")  # the extracted features, read back: the same prediction
    np.testing.assert_allclose(again.probabilities, result.probabilities, atol=1e-6)
    picture = result.heatmap(size=256)
    assert picture.size[0] == 256 and len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 20
    tensor = wsi(torch.randn(30, 512))
    assert tensor.attention.shape == (30,) and tensor.coords is None
    with pytest.raises(InvalidInputError, match="no patch coordinates"):
        tensor.heatmap()


def test_bad_input(wsi, tmp_path):
    with pytest.raises(InvalidInputError, match="empty bag"):
        wsi(FeatureBag("empty", torch.zeros(0, 512)))
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
    monkeypatch.setitem(attnzoo.factory._OWN_MODELS, "acmil_test", lambda **kw: wsi.model)
    out = tmp_path / "eval"
    assert main(["eval", "wsi-classification", "--model", "acmil_test", "--weights", "none", "--data", str(data), "--out", str(out),
                 "--num-workers", "0"]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    from attnzoo.datasets.mil_features import read_acmil_h5

    bags = read_acmil_h5(data)
    test = [s for s in sorted(bags) if "test" in s]
    with torch.no_grad():
        probs = np.stack([torch.softmax(wsi.model(bags[s].features).slide_logits, -1)[0].numpy() for s in test])
    expected = mil_metrics(probs, np.array([bags[s].label for s in test]))
    assert metrics["n"] == len(test) and metrics["auc"] == pytest.approx(expected["auc"], abs=1e-4)
    assert metrics["f1_micro"] == pytest.approx(expected["f1_micro"], abs=1e-4) and "F1 micro" in (out / "report.md").read_text()
