import math

import mcubes
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from attnzoo.errors import InvalidInputError
from attnzoo.metrics.reconstruction import (
    fscore,
    mesh_area,
    pointcloud_fscore,
    sample_surface,
    summarize_iou,
    voxel_iou,
    voxels_to_mesh,
)


def box(shape=(32, 32, 32), lo=(0, 0, 0), hi=(4, 4, 4), value=1.0):
    grid = np.zeros(shape, dtype=np.float32)
    grid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return grid


# --------------------------------------------------------------------------------------------- IoU


def test_iou_of_two_overlapping_cubes():
    gt = box(lo=(0, 0, 0), hi=(4, 4, 4))  # 64 voxels
    pred = box(lo=(2, 0, 0), hi=(6, 4, 4), value=0.45)  # 64 voxels at p = 0.45
    # t = 0.3, 0.4: the predicted cube is on; overlap 2*4*4 = 32, union 64 + 64 - 32 = 96.
    # t = 0.5: nothing is predicted; intersection 0, union 64.
    assert voxel_iou(pred, gt) == pytest.approx([32 / 96, 32 / 96, 0.0])
    assert voxel_iou(pred, gt, thresholds=(0.45,)) == pytest.approx([1 / 3])  # p >= t counts


def test_iou_batched_torch_and_channel_axis():
    rng = np.random.default_rng(0)
    pred = rng.random((5, 8, 8, 8)).astype(np.float32)
    gt = (rng.random((5, 8, 8, 8)) < 0.3).astype(np.float32)
    ious = voxel_iou(pred, gt)
    assert ious.shape == (5, 3)
    # the official loop, literally
    for i in range(5):
        for j, t in enumerate((0.3, 0.4, 0.5)):
            p, g = torch.ge(torch.from_numpy(pred[i]), t).float(), torch.from_numpy(gt[i])
            expected = (p.mul(g).sum() / torch.ge(p.add(g), 1).sum()).item()
            assert ious[i, j] == pytest.approx(expected, rel=1e-6)
    assert np.allclose(voxel_iou(torch.from_numpy(pred)[:, None], torch.from_numpy(gt)[:, None]), ious)
    assert np.allclose(voxel_iou(pred[0], gt[0] > 0), ious[0])


def test_iou_edge_cases():
    empty = np.zeros((4, 4, 4))
    assert voxel_iou(empty, empty).tolist() == [1.0, 1.0, 1.0]
    assert voxel_iou(empty, box((4, 4, 4), hi=(1, 1, 1))).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(InvalidInputError, match="does not match"):
        voxel_iou(np.zeros((2, 4, 4, 4)), np.zeros((4, 4, 4)))
    with pytest.raises(InvalidInputError, match="NaN"):
        voxel_iou(np.full((4, 4, 4), np.nan), empty)
    with pytest.raises(InvalidInputError, match="thresholds"):
        voxel_iou(empty, empty, thresholds=())


# ------------------------------------------------------------------------------------------ summary


def test_summary_weights_classes_by_samples_and_takes_the_max_threshold():
    ious = [[0.5, 0.6, 0.7], [0.7, 0.8, 0.5], [0.2, 0.9, 0.3]]
    summary = summarize_iou(
        ious, ["02691156", "02691156", "03001627"], taxonomy_names={"02691156": "aeroplane", "03001627": "chair"}
    )
    plane, chair = summary["per_class"]["02691156"], summary["per_class"]["03001627"]
    assert (
        plane["taxonomy_name"] == "aeroplane"
        and plane["n_samples"] == 2
        and plane["iou"] == pytest.approx([0.6, 0.7, 0.6])
    )
    assert chair["n_samples"] == 1 and chair["iou"] == pytest.approx([0.2, 0.9, 0.3])
    # sample-weighted: (2 * plane + 1 * chair) / 3, not the mean of the two classes
    assert summary["overall"] == pytest.approx([1.4 / 3, 2.3 / 3, 1.5 / 3])
    assert summary["class_mean"] == pytest.approx([0.4, 0.8, 0.45])
    assert summary["max_iou"] == pytest.approx(2.3 / 3) and summary["best_threshold"] == 0.4
    assert summary["n_samples"] == 3 and summary["thresholds"] == [0.3, 0.4, 0.5]


def test_summary_from_voxel_iou_with_per_sample_names():
    rng = np.random.default_rng(1)
    pred, gt = rng.random((6, 4, 4, 4)), rng.random((6, 4, 4, 4)) < 0.5
    ious = voxel_iou(pred, gt)
    summary = summarize_iou(ious, list("aabbbc"), taxonomy_names=["A", "A", "B", "B", "B", "C"])
    assert list(summary["per_class"]) == ["a", "b", "c"] and summary["per_class"]["b"]["taxonomy_name"] == "B"
    assert summary["overall"] == pytest.approx(ious.mean(axis=0).tolist())
    assert summary["max_iou"] == pytest.approx(ious.mean(axis=0).max())


def test_summary_errors():
    with pytest.raises(InvalidInputError, match="taxonomy ids"):
        summarize_iou([[0.5, 0.5, 0.5]], ["a", "b"])
    with pytest.raises(InvalidInputError, match="one column per threshold"):
        summarize_iou([[0.5, 0.5]], ["a"])
    with pytest.raises(InvalidInputError, match="zero samples"):
        summarize_iou(np.zeros((0, 3)), [])
    with pytest.raises(InvalidInputError, match="NaN"):
        summarize_iou([[np.nan, 0.5, 0.5]], ["a"])


# ------------------------------------------------------------------------------------------- meshes


def signed_volume(vertices, faces):
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6)


def test_single_voxel_is_an_octahedron():
    grid = box((3, 3, 3), lo=(1, 1, 1), hi=(2, 2, 2))
    # PyMCubes at level 0: vertices on the 6 empty neighbours (distance 1), faces equilateral with side sqrt(2).
    vertices, faces = voxels_to_mesh(grid, 0.0, normalize=False)
    assert len(vertices) == 6 and len(faces) == 8
    assert np.abs(vertices - 1).sum(axis=1).tolist() == [1.0] * 6
    assert mesh_area(vertices, faces) == pytest.approx(4 * math.sqrt(3))
    assert signed_volume(vertices, faces) == pytest.approx(4 / 3)  # closed, outward-facing
    # level 0.5 puts the vertices half-way: a different, smaller octahedron
    vertices, faces = voxels_to_mesh(grid, 0.5, normalize=False)
    assert mesh_area(vertices, faces) == pytest.approx(math.sqrt(3))


@pytest.mark.parametrize("level, r", [(0.0, 1.0), (0.5, 0.5)])
def test_box_mesh_is_the_box_grown_by_an_l1_ball(level, r):
    a, b, c = 5, 3, 4
    grid = box((9, 9, 9), lo=(2, 3, 1), hi=(2 + a, 3 + b, 1 + c))
    vertices, faces = voxels_to_mesh(grid, level, normalize=False)
    # Minkowski sum of the box of voxel centres, (a-1) x (b-1) x (c-1), with an L1 ball of radius r.
    la, lb, lc = a - 1, b - 1, c - 1
    area = 2 * (la * lb + lb * lc + la * lc) + 4 * math.sqrt(2) * r * (la + lb + lc) + 4 * math.sqrt(3) * r**2
    volume = la * lb * lc + 2 * r * (la * lb + lb * lc + la * lc) + 2 * r**2 * (la + lb + lc) + 4 / 3 * r**3
    assert mesh_area(vertices, faces) == pytest.approx(area)
    assert signed_volume(vertices, faces) == pytest.approx(volume)
    assert vertices.min(axis=0) == pytest.approx(np.array([2, 3, 1]) - r)


def test_mesh_normalisation_follows_legoformer():
    grid = box(lo=(10, 0, 31), hi=(11, 1, 32)).astype(bool)  # one voxel touching two faces of the grid
    vertices, _ = voxels_to_mesh(torch.from_numpy(grid))
    assert vertices.min() >= 0 and vertices.max() <= 1
    centre = (np.array([10, 0, 31]) + 1) / 33  # padded index / (padded size - 1)
    assert np.abs(vertices - centre).sum(axis=1) == pytest.approx(np.full(6, 1 / 33))


def test_empty_grid_gives_an_empty_mesh():
    vertices, faces = voxels_to_mesh(np.zeros((4, 4, 4), dtype=bool))
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)


def test_mesh_matches_pymcubes():
    rng = np.random.default_rng(0)
    grid = rng.random((12, 12, 12)) < 0.35
    padded = np.pad(grid.astype(np.float64), 1)
    ref_vertices, ref_faces = mcubes.marching_cubes(padded, 0)
    vertices, faces = voxels_to_mesh(grid, 0.0)
    assert mesh_area(vertices * 13, faces) == pytest.approx(mesh_area(ref_vertices, ref_faces))
    used = np.unique(
        ref_faces[
            np.linalg.norm(
                np.cross(*(ref_vertices[ref_faces[:, k]] - ref_vertices[ref_faces[:, 0]] for k in (1, 2))), axis=1
            )
            > 0
        ]
    )
    assert {tuple(v) for v in np.round(vertices * 13, 6)} == {tuple(v) for v in np.round(ref_vertices[used], 6)}


# ------------------------------------------------------------------------------------------ sampler


def test_sampler_follows_the_area():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 5], [3, 0, 5], [0, 2, 5]], dtype=float)
    faces = np.array([[0, 1, 2], [3, 4, 5]])  # areas 0.5 and 3
    points = sample_surface(vertices, faces, 40000, seed=0)
    on_big = points[:, 2] > 2.5
    assert on_big.mean() == pytest.approx(3 / 3.5, abs=0.01)
    small, big = points[~on_big], points[on_big]
    assert (small[:, :2].sum(axis=1) <= 1 + 1e-12).all() and (small.min(axis=0) >= 0).all()
    assert (big[:, 0] / 3 + big[:, 1] / 2 <= 1 + 1e-12).all() and np.allclose(big[:, 2], 5)
    assert small.mean(axis=0) == pytest.approx([1 / 3, 1 / 3, 0], abs=0.01)  # uniform: the centroid
    assert np.array_equal(points, sample_surface(vertices, faces, 40000, seed=0))


def test_sampler_agrees_with_the_mesh_area():
    # On the grown box the flat face x = max is a (b-1) x (c-1) rectangle: its share of the points is its share of the area.
    grid = box((9, 9, 9), lo=(2, 2, 2), hi=(7, 5, 6))
    vertices, faces = voxels_to_mesh(grid, 0.0, normalize=False)
    points = sample_surface(vertices, faces, 50000, seed=1)
    share = np.mean(np.isclose(points[:, 0], vertices[:, 0].max(), rtol=0, atol=1e-9))
    assert share == pytest.approx((2 * 3) / mesh_area(vertices, faces), abs=0.01)
    with pytest.raises(InvalidInputError, match="no surface area"):
        sample_surface(np.zeros((0, 3)), np.zeros((0, 3), dtype=int), 10)


# ------------------------------------------------------------------------------------------ F-score


def test_pointcloud_fscore_by_hand():
    pred = np.array([[0, 0, 0], [1, 0, 0]], dtype=float)
    gt = np.array([[0, 0, 0.005]])
    f, precision, recall = pointcloud_fscore(pred, gt, 0.01)
    assert (precision, recall) == (0.5, 1.0) and f == pytest.approx(2 / 3)


def test_fscore_identical_small_shapes_is_one():
    gt = box(lo=(10, 10, 10), hi=(13, 13, 13))
    pred = gt * 0.9  # probabilities above the 0.3 threshold
    assert fscore(pred, gt) == 1.0


def test_fscore_of_far_apart_shapes_is_zero():
    assert fscore(box(lo=(0, 0, 0), hi=(3, 3, 3)), box(lo=(25, 25, 25), hi=(28, 28, 28))) == 0.0


def test_fscore_empty_cases():
    shape, empty = box(lo=(4, 4, 4), hi=(8, 8, 8)), np.zeros((32, 32, 32), dtype=np.float32)
    assert fscore(empty, shape) == 0.0 and fscore(shape, empty) == 0.0
    assert fscore(shape * 0.2, shape) == 0.0  # below the 0.3 threshold: an empty prediction
    assert fscore(empty, empty) == 1.0


def test_fscore_of_the_shape_plus_a_far_copy_is_two_thirds():
    """By hand: every ground-truth point has a predicted neighbour (recall 1), and half the predicted
    surface is the far copy (precision 1/2, up to the binomial split of the samples: sd 0.003 at
    32768 points): F = 2 * 1/2 * 1 / (1/2 + 1) = 2/3."""
    gt = box(lo=(4, 4, 4), hi=(8, 8, 8))
    pred = gt + box(lo=(20, 20, 20), hi=(24, 24, 24))
    assert fscore(pred, gt, n_points=32768) == pytest.approx(2 / 3, abs=0.01)


def legoformer_fscore(pred_grid, gt_grid, n_points, seed, distance=0.01):
    """LegoFormer's F-score written a second way: PyMCubes (the official mesher) on the padded grids,
    vertices / (padded size - 1), points drawn by area with the parallelogram-reflection method (not
    sample_surface's square-root form), nearest neighbours in both directions."""
    rng = np.random.default_rng(seed)

    def points(grid):
        padded = np.pad(grid.astype(np.float64), 1)
        vertices, faces = mcubes.marching_cubes(padded, 0)
        a, b, c = (vertices[faces[:, k]] / (np.array(padded.shape) - 1) for k in range(3))
        areas = np.linalg.norm(np.cross(b - a, c - a), axis=1)
        pick = rng.choice(len(faces), n_points, p=areas / areas.sum())
        u, w = rng.random((2, n_points))
        flip = u + w > 1
        u[flip], w[flip] = 1 - u[flip], 1 - w[flip]
        return a[pick] + u[:, None] * (b - a)[pick] + w[:, None] * (c - a)[pick]

    pred_points, gt_points = points(pred_grid), points(gt_grid)
    precision = np.mean(cKDTree(gt_points).query(pred_points)[0] < distance)
    recall = np.mean(cKDTree(pred_points).query(gt_points)[0] < distance)
    return 2 * precision * recall / (precision + recall)


def test_fscore_of_a_shifted_cube_follows_the_official_recipe_and_is_reproducible():
    gt = box(lo=(8, 8, 8), hi=(16, 16, 16))
    shifted = box(lo=(9, 8, 8), hi=(17, 16, 16))
    value = fscore(shifted, gt)
    # about 0.55 both ways; two independent samplings of 8192 points differ by sd 0.004
    assert value == pytest.approx(legoformer_fscore(shifted >= 0.3, gt >= 0.5, 8192, seed=0), abs=0.015)
    assert fscore(shifted, gt) == value and fscore(shifted, gt, seed=1) != value
    farther = fscore(box(lo=(10, 8, 8), hi=(18, 16, 16)), gt)
    assert farther < value
    batch = fscore(np.stack([gt, shifted]), torch.from_numpy(np.stack([gt, gt]))[:, None][:, 0])
    assert batch.shape == (2,) and batch[1] == pytest.approx(value, abs=0.05) and batch[0] > 0.95
