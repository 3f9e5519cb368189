"""Tensors of dtypes numpy has none for (bfloat16, float8) reach every metric family as their float32 values (they
raised a bare ``TypeError: Got unsupported ScalarType BFloat16``), and meta tensors, which hold no data, are a typed
error naming the input (a bare ``NotImplementedError`` before)."""

import numpy as np
import pytest
import torch

from attnzoo._values import to_numpy
from attnzoo.errors import InvalidInputError
from attnzoo.metrics.mil import binary_auc, mil_metrics
from attnzoo.metrics.reconstruction import fscore, summarize_iou, voxels_to_mesh
from attnzoo.metrics.scanpath import nss, scaled_tde_similarity, sequence_score

LOW = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", LOW)
def test_to_numpy_widens_what_numpy_cannot_hold_exactly(dtype):
    tensor = torch.tensor([[0.25, -1.5], [3.0, 0.0]]).to(dtype)
    array = to_numpy(tensor)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, tensor.float().numpy())  # every bfloat16/float8 value is a float32 one
    half = torch.tensor([1.0, 2.0], dtype=torch.float16)
    assert to_numpy(half).dtype == np.float16  # numpy has float16: kept as is
    assert to_numpy(torch.tensor([1 + 2j], dtype=torch.complex32)).dtype == np.complex64
    assert to_numpy(torch.eye(3).to_sparse().bfloat16()).tolist() == np.eye(3).tolist()
    assert to_numpy([[1, 2]]).tolist() == [[1, 2]]


def test_mil_metrics_of_bfloat16_probabilities_are_those_of_their_values():
    probabilities = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.45, 0.55]]).bfloat16()
    labels = torch.tensor([0, 1, 1, 1, 0])
    got = mil_metrics(probabilities, labels)
    expected = mil_metrics(probabilities.float().numpy(), labels.numpy())
    assert got["auc"] == expected["auc"] and got["accuracy"] == expected["accuracy"]
    assert got["f1_macro"] == expected["f1_macro"]
    assert binary_auc(probabilities[:, 1], labels.bool()) == binary_auc(probabilities[:, 1].float(), labels.bool())
    with pytest.raises(InvalidInputError, match=r"^probabilities is a meta tensor: it holds no data"):
        mil_metrics(probabilities.to("meta"), labels)
    with pytest.raises(InvalidInputError, match=r"^labels is a meta tensor"):
        mil_metrics(probabilities, labels.to("meta"))


def test_scanpath_metrics_take_bfloat16_tensors():
    rng = np.random.default_rng(0)
    saliency = torch.from_numpy(rng.random((16, 16))).bfloat16()
    points = torch.tensor([[1.0, 2.0], [5.0, 9.0], [12.0, 3.0]])
    assert nss(saliency, points.bfloat16()) == nss(saliency.float().numpy(), points.numpy())
    human = torch.tensor([[10.0, 20.0], [40.0, 60.0], [90.0, 30.0], [50.0, 50.0]])
    model = human.flip(0)
    assert scaled_tde_similarity(human.bfloat16(), model.bfloat16(), (100, 100)) == scaled_tde_similarity(
        human.bfloat16().float().numpy(), model.bfloat16().float().numpy(), (100, 100)
    )
    assert sequence_score(torch.tensor([1.0, 2.0, 3.0]).bfloat16(), [1, 2, 3]) == 1.0
    with pytest.raises(InvalidInputError, match=r"^saliency_map is a meta tensor"):
        nss(saliency.to("meta"), points)
    with pytest.raises(InvalidInputError, match=r"^human is a meta tensor"):
        scaled_tde_similarity(human.to("meta"), model, (100, 100))


def test_reconstruction_metrics_take_bfloat16_tensors():
    grid = torch.zeros(8, 8, 8)
    grid[2:6, 2:6, 3:7] = 1.0
    noisy = (grid * 0.9 + 0.05).bfloat16()
    assert fscore(noisy, grid) == fscore(noisy.float().numpy(), grid.numpy())
    vertices, faces = voxels_to_mesh(noisy, level=0.5)
    expected_vertices, expected_faces = voxels_to_mesh(noisy.float().numpy(), level=0.5)
    np.testing.assert_array_equal(vertices, expected_vertices)
    np.testing.assert_array_equal(faces, expected_faces)
    ious = torch.tensor([[0.5, 0.6, 0.7], [0.25, 0.5, 0.75]]).bfloat16()
    summary = summarize_iou(ious, ["a", "b"])
    np.testing.assert_allclose(summary["overall"], ious.float().numpy().mean(0))
    with pytest.raises(InvalidInputError, match=r"^fscore: the prediction is a meta tensor"):
        fscore(noisy.to("meta"), grid)
    with pytest.raises(InvalidInputError, match=r"^voxels_to_mesh: the grid is a meta tensor"):
        voxels_to_mesh(grid.to("meta"))


def test_meta_inputs_of_every_metric_family_get_one_wording():
    """The paired reconstruction metrics checked meta tensors with their own words; they now share the guard that
    to_numpy uses (attnzoo._values.refuse_meta): the input named, then what to do."""
    grid = torch.zeros(4, 4, 4)
    advice = r"is a meta tensor: it holds no data \(only a shape\); load real weights or materialize it"
    with pytest.raises(InvalidInputError, match=rf"^fscore: the ground truth {advice}"):
        fscore(grid, grid.to("meta"))
    with pytest.raises(InvalidInputError, match=rf"^voxels_to_mesh: the grid {advice}"):
        voxels_to_mesh(grid.to("meta"))
    with pytest.raises(InvalidInputError, match=rf"^saliency_map {advice}"):
        nss(grid[0].to("meta"), torch.zeros(1, 2))
