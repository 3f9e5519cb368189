import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.datasets.shapenet import N_RENDERINGS, ShapeNetDataset, read_rendering, read_shapenet_split
from attnzoo.errors import DatasetFormatError, InvalidInputError

PLANE, CHAIR = "02691156", "03001627"
MODELS = {  # taxonomy -> split -> model ids; "a3" has no binvox
    PLANE: {"train": ["a4"], "val": ["a5"], "test": ["a1", "a2", "a3"]},
    CHAIR: {"train": ["c2", "c3"], "val": [], "test": ["c1"]},
}
NAMES = {PLANE: "aeroplane", CHAIR: "chair"}
NO_VOXELS = {"a3"}


def model_number(model_id: str) -> int:
    return sorted(m for t in MODELS.values() for s in t.values() for m in s).index(model_id)


def binvox_bytes(x: int, y: int, z: int) -> bytes:
    """A 32^3 binvox with one voxel at (x, y, z), run-length encoded by hand in the file's x, z, y order."""
    index = x * 32 * 32 + z * 32 + y
    runs = []
    for value, count in ((0, index), (1, 1), (0, 32**3 - index - 1)):
        while count > 0:
            runs += [value, min(count, 255)]
            count -= 255
    return b"#binvox 1\ndim 32 32 32\ntranslate 0 0 0\nscale 1\ndata\n" + bytes(runs)


@pytest.fixture
def shapenet(tmp_path):
    renderings, voxels = tmp_path / "ShapeNetRendering", tmp_path / "ShapeNetVox32"
    for tid, splits in MODELS.items():
        for model_id in (m for ids in splits.values() for m in ids):
            folder = renderings / tid / model_id / "rendering"
            folder.mkdir(parents=True)
            for view in range(N_RENDERINGS):
                pixels = np.zeros((6, 5, 4), dtype=np.uint8)  # 6 rows x 5 columns
                pixels[..., 0], pixels[..., 1], pixels[2:4, 1:3, 3] = view, model_number(model_id), 255
                Image.fromarray(pixels, "RGBA").save(folder / f"{view:02d}.png")
            (folder / "renderings.txt").write_text("".join(f"{v:02d}.png\n" for v in range(N_RENDERINGS)))
            (folder / "rendering_metadata.txt").write_text(
                "".join(f"{15 * v} 25 0 0.8 25\n" for v in range(N_RENDERINGS))
            )
            if model_id not in NO_VOXELS:
                (voxels / tid / model_id).mkdir(parents=True)
                n = model_number(model_id)
                (voxels / tid / model_id / "model.binvox").write_bytes(binvox_bytes(n, 2 * n + 1, 31 - n))
    entries = [
        {"taxonomy_id": tid, "taxonomy_name": NAMES[tid], "baseline": {"1-view": 0.5, "5-view": 0.56}, **MODELS[tid]}
        for tid in MODELS
    ]
    split_file = tmp_path / "ShapeNet.json"
    split_file.write_text(json.dumps(entries, indent="\t"))
    return renderings, voxels, split_file


def make(shapenet, **kwargs):
    renderings, voxels, split_file = shapenet
    return ShapeNetDataset(renderings, voxels, split_file, **kwargs)


def test_read_split_file(shapenet):
    taxonomies = read_shapenet_split(shapenet[2])
    assert [(t.taxonomy_id, t.taxonomy_name) for t in taxonomies] == [(PLANE, "aeroplane"), (CHAIR, "chair")]
    assert taxonomies[0].models("test") == ["a1", "a2", "a3"] and taxonomies[1].train == ["c2", "c3"]
    assert taxonomies[0].baseline["1-view"] == 0.5


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"taxonomy_id": "1"}', "JSON list"),
        ('[{"taxonomy_id": "1", "taxonomy_name": "x", "train": [], "val": []}]', "lacks test"),
        (
            '[{"taxonomy_id": "1", "taxonomy_name": "x", "train": [1], "val": [], "test": []}]',
            "list of model id strings",
        ),
        (
            (
                '[{"taxonomy_id": "1", "taxonomy_name": "x", "train": [], "val": [], "test": []},'
                ' {"taxonomy_id": "1", "taxonomy_name": "y", "train": [], "val": [], "test": []}]'
            ),
            "appears twice",
        ),
    ],
)
def test_bad_split_files(tmp_path, content, message):
    path = tmp_path / "ShapeNet.json"
    path.write_text(content)
    with pytest.raises(DatasetFormatError, match=message) as info:
        read_shapenet_split(path)
    assert str(path) in str(info.value)


def test_test_split_skips_and_reports_models_without_voxels(shapenet):
    with pytest.warns(UserWarning, match="skipped 1 of 4 models"):
        data = make(shapenet, split="test", n_views=3)
    assert [(m.taxonomy_id, m.model_id) for m in data.samples] == [(PLANE, "a1"), (PLANE, "a2"), (CHAIR, "c1")]
    assert [m.model_id for m in data.missing] == ["a3"] and data.missing[0].voxel_path.name == "model.binvox"
    assert len(data) == 3 and data.view_selection == "first"


def test_item_views_and_voxels(shapenet):
    with pytest.warns(UserWarning):
        data = make(shapenet, split="test", n_views=3)
    item = data[2]
    assert (item["taxonomy_id"], item["taxonomy_name"], item["model_id"]) == (CHAIR, "chair", "c1")
    assert item["view_indices"] == [0, 1, 2]  # the first renderings, in file order
    assert len(item["views"]) == 3
    for view, array in zip(item["view_indices"], item["views"]):
        assert array.shape == (6, 5, 4) and array.dtype == np.uint8
        assert array[0, 0, 0] == view and array[0, 0, 1] == model_number("c1")
        assert array[0, 0, 3] == 0 and array[2, 1, 3] == 255  # alpha kept
    voxels = item["voxels"]
    n = model_number("c1")
    assert voxels.dtype == np.float32 and voxels.shape == (32, 32, 32)
    assert np.argwhere(voxels).tolist() == [[n, 2 * n + 1, 31 - n]]  # x, y, z (binvox fix_coords)


def test_random_views_are_reproducible_per_item_and_epoch(shapenet):
    data = make(shapenet, split="train", n_views=5, seed=3)
    assert data.view_selection == "random" and len(data) == 3
    first = [data.view_indices(i) for i in range(len(data))]
    for indices in first:
        assert len(set(indices)) == 5 and all(0 <= i < N_RENDERINGS for i in indices)
    assert first == [make(shapenet, split="train", n_views=5, seed=3).view_indices(i) for i in range(3)]
    assert first != [make(shapenet, split="train", n_views=5, seed=4).view_indices(i) for i in range(3)]
    data.set_epoch(1)
    assert [data.view_indices(i) for i in range(3)] != first
    data.set_epoch(0)
    item = data[1]
    assert item["view_indices"] == first[1]
    assert [int(v[0, 0, 0]) for v in item["views"]] == first[1]


def test_explicit_view_selection_and_n_views(shapenet):
    data = make(shapenet, split="train", n_views=2, view_selection="first")
    assert data[0]["view_indices"] == [0, 1]
    data.set_n_views(N_RENDERINGS)
    assert data[0]["view_indices"] == list(range(N_RENDERINGS))
    rand = make(shapenet, split="val", n_views=N_RENDERINGS, view_selection="random")
    assert sorted(rand[0]["view_indices"]) == list(range(N_RENDERINGS))
    for bad in (0, N_RENDERINGS + 1, 2.5, True):
        with pytest.raises(InvalidInputError, match="n_views"):
            make(shapenet, split="val", n_views=bad)
    with pytest.raises(InvalidInputError, match="n_views"):
        data.set_n_views(25)
    with pytest.raises(InvalidInputError, match="view_selection"):
        make(shapenet, split="val", view_selection="last")
    with pytest.raises(InvalidInputError, match="split"):
        make(shapenet, split="validation")


def test_transform_and_taxonomy_filter(shapenet):
    seen = []

    def transform(views):
        seen.append(len(views))
        return torch.stack([torch.from_numpy(v).permute(2, 0, 1).float() / 255 for v in views])

    data = make(shapenet, split="train", n_views=2, taxonomies=["chair"], transform=transform)
    assert [m.model_id for m in data.samples] == ["c2", "c3"]
    assert data[0]["views"].shape == (2, 4, 6, 5) and seen == [2]
    assert len(make(shapenet, split="train", taxonomies=PLANE)) == 1
    with pytest.raises(InvalidInputError, match="no taxonomy 'sofa'"):
        make(shapenet, split="train", taxonomies=["sofa"])


def test_default_collate(shapenet):
    with pytest.warns(UserWarning):
        data = make(shapenet, split="test", n_views=2)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
    assert batch["voxels"].shape == (2, 32, 32, 32) and len(batch["views"]) == 2
    assert batch["views"][0].shape == (2, 6, 5, 4) and batch["model_id"] == ["a1", "a2"]


def test_missing_rendering_names_the_file(shapenet):
    (shapenet[0] / PLANE / "a2" / "rendering" / "01.png").unlink()
    with pytest.warns(UserWarning):
        data = make(shapenet, split="test", n_views=2)
    data[0]  # a1 is complete
    with pytest.raises(DatasetFormatError, match=r"a2/rendering/01\.png: missing rendering"):
        data[1]


def test_corrupt_rendering_and_voxels(shapenet):
    (shapenet[0] / CHAIR / "c1" / "rendering" / "00.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (shapenet[1] / PLANE / "a1" / "model.binvox").write_bytes(binvox_bytes(0, 0, 0)[:-4])
    with pytest.warns(UserWarning):
        data = make(shapenet, split="test", n_views=1)
    with pytest.raises(DatasetFormatError, match=r"c1/rendering/00\.png"):
        data[2]
    with pytest.raises(DatasetFormatError, match=r"a1/model\.binvox: truncated binvox data"):
        data[0]


def test_wrong_roots(shapenet, tmp_path):
    renderings, _, split_file = shapenet
    with pytest.raises(DatasetFormatError, match="does not exist"):
        ShapeNetDataset(renderings, tmp_path / "nowhere", split_file)
    with pytest.raises(DatasetFormatError, match="none of the 4 test models"):
        ShapeNetDataset(renderings, renderings, split_file)  # voxel root points at the renderings


def test_read_rendering_converts_rgb_to_rgba(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.full((3, 4, 3), 7, dtype=np.uint8)).save(path)
    array = read_rendering(path)
    assert array.shape == (3, 4, 4) and (array[..., :3] == 7).all() and (array[..., 3] == 255).all()
