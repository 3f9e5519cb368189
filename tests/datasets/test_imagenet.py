import io
import random
import tarfile

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from attnzoo.datasets.image_folder import read_image_folder
from attnzoo.datasets.imagenet import imagenet_synsets, read_classification_folder, read_imagenet
from attnzoo.errors import DatasetFormatError

WNIDS = imagenet_synsets()[0]
PICK = [WNIDS[0], WNIDS[281], WNIDS[999]]  # tench, tabby cat, toilet tissue


def jpeg(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path, format="JPEG")


def devkit_meta(seed=0):
    """A meta.mat shaped like the devkit's: leaves numbered 1..1000 in a non-sorted order, plus inner nodes."""
    ids = list(range(1, 1001))
    random.Random(seed).shuffle(ids)
    rows = [(i, w, f"words {w}", "gloss", 0, 0, 1300) for i, w in zip(ids, WNIDS)]
    rows += [(1001, "n00001740", "entity", "gloss", 3, 18, 0), (1002, "n00002137", "abstraction", "gloss", 2, 17, 0)]
    dtype = [
        (n, "O")
        for n in ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images")
    ]
    table = np.array(rows, dtype=dtype)
    buf = io.BytesIO()
    savemat(buf, {"synsets": table})
    return buf.getvalue(), {w: i for i, w in zip(ids, WNIDS)}


def flat_val(root, n=6):
    truth = {}
    for k in range(1, n + 1):
        wnid = PICK[k % 3]
        jpeg(root / f"ILSVRC2012_val_{k:08d}.JPEG", k)
        truth[k] = wnid
    return truth


def test_synset_folders_use_the_full_1k_index(tmp_path):
    for w in PICK:
        jpeg(tmp_path / "val" / w / "a.JPEG")
        jpeg(tmp_path / "val" / w / "b.JPEG")
    data = read_imagenet(tmp_path, "val")
    assert data.layout == "imagenet-synset-folders" and len(data) == 6
    assert sorted(set(data.targets)) == [0, 281, 999]
    assert len(data.classes) == 1000 and "tabby" in data.classes[281]
    assert read_classification_folder(tmp_path / "val").targets == data.targets


def test_flat_val_with_kaggle_solution(tmp_path):
    truth = flat_val(tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val")
    lines = ["ImageId,PredictionString"]
    lines += [f"ILSVRC2012_val_{k:08d},{w} 1 2 30 40 {w} 5 6 7 8" for k, w in truth.items()]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    data = read_imagenet(tmp_path / "ILSVRC" / "Data" / "CLS-LOC", "val")
    assert data.layout == "imagenet-flat-val"
    assert [WNIDS[t] for t in data.targets] == [truth[k] for k in sorted(truth)]


@pytest.mark.parametrize("packed", [False, True])
def test_flat_val_with_devkit(tmp_path, packed):
    truth = flat_val(tmp_path / "val")
    meta, wnid_to_id = devkit_meta()
    gt = "".join(f"{wnid_to_id[truth[k]]}\n" for k in sorted(truth)).encode()
    if packed:
        with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            for name, payload in (("data/meta.mat", meta), ("data/ILSVRC2012_validation_ground_truth.txt", gt)):
                info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        (tmp_path / "ILSVRC2012_devkit_t12" / "data").mkdir(parents=True)
        (tmp_path / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").write_bytes(meta)
        (tmp_path / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_bytes(gt)
    data = read_imagenet(tmp_path, "val")
    assert [WNIDS[t] for t in data.targets] == [truth[k] for k in sorted(truth)]


def test_flat_val_without_labels_says_what_to_place(tmp_path):
    flat_val(tmp_path / "val", 2)
    with pytest.raises(DatasetFormatError, match="LOC_val_solution.csv"):
        read_imagenet(tmp_path / "val")


def test_solution_missing_an_image(tmp_path):
    flat_val(tmp_path / "val", 2)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n"
    )
    with pytest.raises(DatasetFormatError, match="ILSVRC2012_val_00000002"):
        read_imagenet(tmp_path / "val")


def test_non_synset_folders(tmp_path):
    jpeg(tmp_path / "n99999999" / "a.JPEG")
    with pytest.raises(DatasetFormatError, match="n99999999"):
        read_imagenet(tmp_path)
    with pytest.raises(DatasetFormatError, match="not an ImageNet layout"):
        jpeg(tmp_path / "cats" / "a.jpg")
        read_imagenet(tmp_path / "cats")


def test_generic_image_folder(tmp_path):
    for cls in ("zebra", "ant", "moose"):
        jpeg(tmp_path / "train" / cls / "1.jpg")
        jpeg(tmp_path / "train" / cls / "sub" / "2.png")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    data = read_classification_folder(tmp_path, "train")
    assert data.layout == "image-folder" and data.classes == ["ant", "moose", "zebra"]
    assert data.targets == [0, 0, 1, 1, 2, 2]


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        read_image_folder(tmp_path / "nope")
    with pytest.raises(DatasetFormatError, match="no class subfolders"):
        read_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetFormatError, match="no image files"):
        read_image_folder(tmp_path)


def test_a_missing_split_is_not_read_as_classes(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "1.png")
    with pytest.raises(DatasetFormatError, match="no val/ split folder.*test/, train/"):
        read_classification_folder(tmp_path, "val")  # not two classes named 'test' and 'train'
    assert read_classification_folder(tmp_path, "test").classes == ["cat", "dog"]
    assert read_classification_folder(tmp_path / "train", "val").classes == ["cat", "dog"]  # a folder of classes


def test_a_link_loop_lists_each_image_once(tmp_path):
    jpeg(tmp_path / "cat" / "a.jpg")
    (tmp_path / "cat" / "again").symlink_to(tmp_path / "cat", target_is_directory=True)
    (tmp_path / "dog").symlink_to(tmp_path / "cat", target_is_directory=True)  # a class that is a link still counts
    data = read_image_folder(tmp_path)
    assert [(p.relative_to(tmp_path).as_posix(), t) for p, t in data.samples] == [("cat/a.jpg", 0), ("dog/a.jpg", 1)]


def test_imagenetv2_folders_are_numbered_by_class_index(tmp_path):
    """ImageNetV2's folders 0/ .. 999/ name the class index: text order would put 10 before 2."""
    for k in range(12):
        jpeg(tmp_path / "val" / str(k) / "a.jpeg", k)
    data = read_classification_folder(tmp_path, "val")
    assert data.classes == [str(k) for k in range(12)]
    assert [(path.parent.name, target) for path, target in data.samples] == [(str(k), k) for k in range(12)]
    # numbers that are not exactly 0 .. N-1 are names like any other: sorted as text
    (tmp_path / "val" / "0").rename(tmp_path / "val" / "12")
    assert read_image_folder(tmp_path / "val").classes == sorted(str(k) for k in range(1, 13))
    (tmp_path / "val" / "12").rename(tmp_path / "val" / "0")
    jpeg(tmp_path / "val" / "cats" / "a.jpeg")
    assert read_image_folder(tmp_path / "val").classes == sorted([*map(str, range(12)), "cats"])


def test_evaluation_decodes_dataset_images_as_stored(tmp_path):
    """timm/torchvision evaluate ImageNet without EXIF rotation: so does the classification evaluation."""
    import torch

    from attnzoo.evaluation.classification import ClassificationEvaluator
    from attnzoo.pipelines.image_classification import ImagePreprocessor
    from tests.datasets.test_images import sideways_jpeg

    sideways_jpeg(tmp_path / "synsets" / PICK[0] / "a.JPEG", (40, 30))
    sideways_jpeg(tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG", (40, 30))
    (tmp_path / "flat" / "LOC_val_solution.csv").write_text(
        f"ImageId,PredictionString\nILSVRC2012_val_00000001,{PICK[1]} 1\n"
    )
    sideways_jpeg(tmp_path / "folder" / "cats" / "a.jpg", (40, 30))
    size_of = ImagePreprocessor(lambda image: torch.tensor(image.size))  # the pipeline's decoding
    for name in ("synsets", "flat", "folder"):
        (sample,) = ClassificationEvaluator(tmp_path / name).samples()
        assert size_of(sample.input)["pixel_values"].tolist() == [40, 30], name
