"""CHAIR's data: COCO val2014 instances + captions (train merged when present), the val2014 images,
AGLA's 100-image list layout, caption logs as lists, and the seeded 500-image protocol."""

import json

import pytest

from attnzoo.datasets.chair import (
    ChairDataset,
    coco_image_id,
    read_chair_list,
    read_coco_annotations,
    sample_chair_images,
)
from attnzoo.errors import DatasetFormatError, InvalidOptionError

CATEGORIES = ["person", "dog", "cat", "dining table", "pizza", "car"]
# image id: (boxes, human captions)
IMAGES = {
    1: (["person", "dog", "dog"], ["A man walks his dog.", "A person with a puppy on a leash."]),
    2: (["cat"], ["A cat sleeps on a sofa.", "A kitten on the couch."]),
    3: (["dining table", "pizza", "person"], ["People eat pizza at a table."]),
    4: (["car"], ["A red car parked on the street."]),
    5: ([], ["An empty room."]),
}


def write_coco_tree(root, images=IMAGES, train=None):
    """COCO's layout: annotations/{instances,captions}_val2014.json and val2014/*.jpg."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    for split, content in (("val2014", images), ("train2014", train)):
        if content is None:
            continue
        entries = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in content]
        instances = {
            "images": entries,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CATEGORIES)],
            "annotations": [
                {"image_id": i, "category_id": CATEGORIES.index(c) + 1}
                for i, (boxes, _) in content.items()
                for c in boxes
            ],
        }
        captions = {
            "images": entries,
            "annotations": [{"image_id": i, "caption": c} for i, (_, caps) in content.items() for c in caps],
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(captions))
        if split == "val2014":
            for entry in entries:
                (root / "val2014" / entry["file_name"]).write_bytes(b"jpeg")
    return root


def write_agla_list(path, ids, prompt="Please describe this image in detail."):
    lines = [
        json.dumps({"question_id": n, "image": f"COCO_val2014_{i:012d}.jpg", "text": prompt, "category": "detail"})
        for n, i in enumerate(ids)
    ]
    path.write_text("\n".join(lines))  # AGLA's file has no final newline
    return path


def test_reads_coco_annotations(tmp_path):
    write_coco_tree(tmp_path, train={9: (["cat"], ["A cat."])})
    ann = read_coco_annotations(tmp_path)
    assert ann.instances[1] == ["person", "dog", "dog"] and ann.instances[5] == []
    assert ann.captions[2] == ["A cat sleeps on a sofa.", "A kitten on the couch."]
    assert ann.split_ids == {1, 2, 3, 4, 5} and ann.files[9] == "COCO_train2014_000000000009.jpg"
    assert len(ann.sources) == 4


def test_chair_list_layouts(tmp_path):
    write_coco_tree(tmp_path)
    agla = write_agla_list(tmp_path / "chair.jsonl", [3, 1])
    ds = ChairDataset.from_root(tmp_path, list_file=agla)
    assert [im.image_id for im in ds.images] == [3, 1]
    assert ds.images[0].prompt == "Please describe this image in detail."
    log = tmp_path / "greedy.jsonl"  # OPERA's caption log
    log.write_text(json.dumps({"image_id": 4, "caption": "A car."}) + "\n")
    assert read_chair_list(log)[0].file_name == "COCO_val2014_000000000004.jpg"
    instances, captions = ds.ground_truth_inputs()
    assert instances == {3: ["dining table", "pizza", "person"], 1: ["person", "dog", "dog"]}
    assert captions[3] == ["People eat pizza at a table."]


def test_seeded_sample(tmp_path):
    write_coco_tree(tmp_path)
    a = ChairDataset.from_root(tmp_path, count=3, seed=7)
    assert [im.image_id for im in a.images] == [
        im.image_id for im in ChairDataset.from_root(tmp_path, count=3, seed=7).images
    ]
    orders = {tuple(im.image_id for im in ChairDataset.from_root(tmp_path, count=5, seed=s).images) for s in range(6)}
    assert len(orders) > 1 and all(sorted(o) == [1, 2, 3, 4, 5] for o in orders)
    files = {i: f"COCO_val2014_{i:012d}.jpg" for i in (5, 1, 3)}
    assert sample_chair_images(files, 3, seed=0) == sample_chair_images(dict(reversed(files.items())), 3, seed=0)
    with pytest.raises(DatasetFormatError, match="asks for 6 images"):
        ChairDataset.from_root(tmp_path, count=6)
    with pytest.raises(InvalidOptionError, match="at least 1"):
        sample_chair_images(files, 0)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        read_coco_annotations(tmp_path / "nope")
    with pytest.raises(DatasetFormatError, match="instances_val2014.json not found"):
        read_coco_annotations(tmp_path)
    write_coco_tree(tmp_path)
    (tmp_path / "annotations" / "captions_val2014.json").write_text("{")
    with pytest.raises(DatasetFormatError, match="captions_val2014.json"):
        read_coco_annotations(tmp_path)
    write_coco_tree(tmp_path)
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetFormatError, match="malformed COCO instances"):
        read_coco_annotations(tmp_path)
    write_coco_tree(tmp_path)
    bad = tmp_path / "list.jsonl"
    bad.write_text(json.dumps({"question_id": 0, "text": "x"}) + "\n")
    with pytest.raises(DatasetFormatError, match="list.jsonl, line 1: needs 'image'"):
        read_chair_list(bad)
    with pytest.raises(DatasetFormatError, match="not in the COCO annotations"):
        ChairDataset.from_root(tmp_path, list_file=write_agla_list(tmp_path / "l.jsonl", [1, 77]))
    (tmp_path / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(DatasetFormatError, match="1 CHAIR images are missing"):
        ChairDataset.from_root(tmp_path, list_file=write_agla_list(tmp_path / "l.jsonl", [1, 2]))
    with pytest.raises(DatasetFormatError, match="listed twice"):
        read_chair_list(write_agla_list(tmp_path / "l.jsonl", [1, 1]))
    assert coco_image_id("COCO_val2014_000000002239.jpg") == 2239
    with pytest.raises(DatasetFormatError, match="not a COCO image file name"):
        coco_image_id("cat.jpg")


def write_coco2017_tree(root, images=IMAGES):
    """COCO 2017's layout (PAI's setup): the same images under the same ids, named ``<id>.jpg`` in val2017/."""
    write_coco_tree(root / "from2014", images)
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for kind in ("instances", "captions"):
        content = json.loads((root / "from2014" / "annotations" / f"{kind}_val2014.json").read_text())
        for entry in content["images"]:
            entry["file_name"] = f"{entry['id']:012d}.jpg"
        (root / "annotations" / f"{kind}_val2017.json").write_text(json.dumps(content))
    for i in images:
        (root / "val2017" / f"{i:012d}.jpg").write_bytes(b"jpeg")
    return root


def test_lists_read_the_images_the_annotations_name(tmp_path):
    """A list line became COCO_val2014_<id>.jpg in root/<split>/ whatever the split: the 2017 release (PAI's
    setup) and lists naming train2014 images were refused although the images were there. An image's file is
    the one its annotations name, in the folder of the split that lists it."""
    coco17 = write_coco2017_tree(tmp_path / "coco17")
    log = tmp_path / "opera.jsonl"  # OPERA's caption log: bare ids
    log.write_text("".join(json.dumps({"image_id": i, "caption": "x"}) + "\n" for i in (4, 2)))
    agla = write_agla_list(tmp_path / "agla.jsonl", [3, 1])  # val2014 file names
    for listed, ids in ((log, [4, 2]), (agla, [3, 1])):
        ds = ChairDataset.from_root(coco17, list_file=listed, split="val2017")
        assert [im.image_id for im in ds.images] == ids
        assert [ds.image_path(im) for im in ds.images] == [coco17 / "val2017" / f"{i:012d}.jpg" for i in ids]
        assert ds.ground_truth_inputs()[0] == {i: IMAGES[i][0] for i in ids}

    coco = write_coco_tree(tmp_path / "coco", train={9: (["cat"], ["A cat."])})
    (coco / "train2014").mkdir()
    (coco / "train2014" / "COCO_train2014_000000000009.jpg").write_bytes(b"jpeg")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "\n".join(json.dumps({"image": f"COCO_{s}_{i:012d}.jpg"}) for s, i in (("train2014", 9), ("val2014", 2)))
    )
    ds = ChairDataset.from_root(coco, list_file=mixed)
    assert [ds.image_path(im) for im in ds.images] == [
        coco / "train2014" / "COCO_train2014_000000000009.jpg",
        coco / "val2014" / "COCO_val2014_000000000002.jpg",
    ]
    assert ds.ground_truth_inputs()[1][9] == ["A cat."]
    log.write_text(json.dumps({"image_id": 9}) + "\n")  # a bare id of a train image: its train file name
    assert ChairDataset.from_root(coco, list_file=log).image_path(read_chair_list(log)[0]).parent.name == "train2014"
    # the official val2014 setup: the files as before
    ds = ChairDataset.from_root(coco, list_file=agla)
    assert [ds.image_path(im) for im in ds.images] == [ds.image_folder / im.file_name for im in ds.images]


def test_a_missing_list_image_names_the_file_names_looked_for(tmp_path):
    coco17 = write_coco2017_tree(tmp_path / "coco17")
    (coco17 / "val2017" / "000000000002.jpg").unlink()
    log = tmp_path / "opera.jsonl"
    log.write_text(json.dumps({"image_id": 2, "caption": "x"}) + "\n")
    agla = write_agla_list(tmp_path / "agla.jsonl", [2])
    with pytest.raises(DatasetFormatError, match="1 CHAIR images are missing") as built:
        ChairDataset.from_root(coco17, list_file=log, split="val2017")
    with pytest.raises(DatasetFormatError, match="1 CHAIR images are missing") as given:
        ChairDataset.from_root(coco17, list_file=agla, split="val2017")
    for err, origin in ((built, "built from the list's image_id"), (given, "given by the list")):
        text = str(err.value)
        assert "000000000002.jpg (its file name in the COCO val2017 annotations)" in text
        assert f"COCO_val2014_000000000002.jpg ({origin})" in text and str(coco17 / "val2017") in text
    coco = write_coco_tree(tmp_path / "coco", train={9: (["cat"], ["A cat."])})
    listed = write_agla_list(tmp_path / "train.jsonl", [9])
    with pytest.raises(DatasetFormatError, match="there is no train2014 image folder in"):
        ChairDataset.from_root(coco, list_file=listed)
