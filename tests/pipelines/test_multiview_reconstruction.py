"""pipeline("multiview-3d-reconstruction"): views in, occupancy out; exports; the ShapeNet evaluation and view sweep."""

import json

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.cli import main
from attnzoo.datasets.binvox import read_binvox
from attnzoo.errors import InvalidInputError
from attnzoo.metrics.reconstruction import voxel_iou
from attnzoo.vision import lrgt as L
from tests.shapes3d import primitive, renderings, write_shapenet

TINY = dict(embed_dim=64, depth=2, num_heads=2, lga_layers=(1,), merger_tokens=(49, 49), merger_heads=2,
            decoder_heads=2, decoder_depth=4, decoder_channels=(8, 2, 1))


@pytest.fixture(scope="module")
def recon():
    torch.manual_seed(0)
    model = L.LRGT(**TINY, noise_seed=0)
    return attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu")


def test_one_object_and_a_batch(recon):
    views = renderings(primitive("table"), n=3)
    shape = recon(views)
    expected = recon.model(L.preprocess_views(views)[None])[0]  # the official preprocessing, then the model
    assert shape.probabilities.shape == (32, 32, 32)
    np.testing.assert_allclose(shape.probabilities, expected.detach().numpy(), atol=1e-6)
    assert np.array_equal(shape.voxels, shape.probabilities >= 0.3)
    batch = recon([views, views[:2]], batch_size=1)
    assert len(batch) == 2 and np.allclose(batch[0].probabilities, shape.probabilities, atol=1e-6)
    rgb = recon(views, colour_order="rgb", threshold=0.5)
    assert rgb.threshold == 0.5 and not np.allclose(rgb.probabilities, shape.probabilities)


def test_exports_and_picture(recon, tmp_path):
    shape = recon(renderings(primitive("ball"), n=2))
    shape.probabilities = primitive("ball").astype(np.float32) * 0.9  # a known grid, to check the files
    assert np.array_equal(read_binvox(shape.save(tmp_path / "ball.binvox")).voxels, shape.voxels)
    vertices, faces = shape.to_mesh()
    obj = (tmp_path / "ball.obj")
    shape.save(obj)
    lines = obj.read_text().splitlines()
    assert sum(line.startswith("v ") for line in lines) == len(vertices) and sum(line.startswith("f ") for line in lines) == len(faces)
    ply = shape.save(tmp_path / "ball.ply").read_text()
    assert f"element vertex {len(vertices)}" in ply and f"element face {len(faces)}" in ply
    assert np.array_equal(np.load(shape.save(tmp_path / "ball.npy")), shape.probabilities)
    picture = shape.plot(title="ball")
    assert picture.size[0] > picture.size[1] and len(np.unique(np.asarray(picture.convert("L")))) > 10
    with pytest.raises(InvalidInputError, match="cannot save"):
        shape.save(tmp_path / "ball.stl")


def test_bad_input(recon, tmp_path):
    with pytest.raises(InvalidInputError, match="non-empty list"):
        recon([])
    views = renderings(primitive("box"), n=2)
    with pytest.raises(InvalidInputError, match="same size"):
        recon([views[0], views[1].resize((100, 100))])
    with pytest.raises(InvalidInputError, match="same number of views"):
        recon([views, views[:1]], batch_size=2)
    with pytest.raises(InvalidInputError, match="no such file"):
        recon([str(tmp_path / "missing.png")])
    grey = [v.convert("L") for v in views]  # no alpha: no compositing, grey to three channels
    assert recon(grey).probabilities.shape == (32, 32, 32)


def test_shapenet_evaluation_and_view_sweep(recon, tmp_path, capsys, monkeypatch):
    root = write_shapenet(tmp_path / "shapenet", kinds=("box", "table"), per_kind=(0, 0, 2), n_views=3)
    monkeypatch.setitem(attnzoo.factory._OWN_MODELS, "lrgt_tiny_test", lambda **kw: recon.model)
    out = tmp_path / "eval"
    code = main(["eval", "multiview-3d-reconstruction", "--model", "lrgt_tiny_test", "--weights", "none", "--data", str(root),
                 "--views", "1,3", "--out", str(out), "--num-workers", "0", "--batch-size", "2", "--fscore"])
    assert code == 0, capsys.readouterr().err
    for n in (1, 3):
        metrics = json.loads((out / f"views-{n}" / "metrics.json").read_text())
        ious = []
        for kind, tid in (("box", "01000000"), ("table", "02000000")):  # independently: the pipeline, then IoU by its definition
            pred = recon([str(root / "ShapeNetRendering" / tid / f"{kind}_test_0" / "rendering" / f"{v:02d}.png") for v in range(n)])
            ious += [voxel_iou(pred.probabilities, primitive(kind))] * 2
        overall = np.mean(ious, axis=0)
        assert metrics["n"] == 4 and metrics["n_views"] == n
        assert metrics["iou"] == pytest.approx(overall.max(), abs=1e-4)
        assert [row["n"] for row in metrics["per_class"]] == [2, 2] and "fscore" in metrics
    report = (out / "report.md").read_text()
    assert "| views | 1 | 3 |" in report and "F-score" in report
    assert main(["eval", "multiview-3d-reconstruction", "--data", str(root), "--out", str(out), "--views", "0,3"]) == 2
    assert main(["eval", "image-classification", "--data", str(root), "--out", str(out), "--views", "3"]) == 2
