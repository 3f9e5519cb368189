"""Generic ImageFolder helpers: a split read on its own is scored by the training classes; empty class folders."""

import pytest
from PIL import Image

from attnzoo.datasets.image_folder import (
    ClassificationSamples,
    align_classes,
    empty_class_folders,
    list_images,
    read_image_folder,
)
from attnzoo.errors import DatasetFormatError
from tests.datasets.special_files import fifo, needs_fifo


def folder(root, classes, n=1):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4)).save(root / name / f"{i}.png")
    return root


def test_a_split_lacking_a_class_is_scored_by_the_training_class_names(tmp_path):
    """val/ without b numbered c as 1 (train's b) on its own: a perfect model scored 50%."""
    train = read_image_folder(folder(tmp_path / "train", "abc"))
    val = read_image_folder(folder(tmp_path / "val", "ac"))
    aligned, missing = align_classes(val, train)
    assert [(p.parent.name, t) for p, t in aligned.samples] == [("a", 0), ("c", 2)]
    assert aligned.classes == train.classes and missing == ["b"]


def test_a_split_with_a_class_the_training_split_lacks_is_refused_naming_it(tmp_path):
    train = read_image_folder(folder(tmp_path / "train", "ab"))
    val = read_image_folder(folder(tmp_path / "val", ["a", "b", "dog"]))
    with pytest.raises(DatasetFormatError, match="training split lacks \\(dog\\)"):
        align_classes(val, train)


def test_folders_named_by_class_index_keep_their_index(tmp_path):
    """ImageNetV2's layout (0/ .. N-1/: folder k holds class k) against training classes with names."""
    train = read_image_folder(folder(tmp_path / "train", ["x", "y", "z"]))
    val = read_image_folder(folder(tmp_path / "val", ["0", "1"]))
    aligned, missing = align_classes(val, train)
    assert [(p.parent.name, t) for p, t in aligned.samples] == [("0", 0), ("1", 1)] and missing == ["z"]


def test_numbered_folders_against_numbered_classes_match_by_name(tmp_path):
    """Category ids as class folders (0 .. 10 and 12: a gap, so train's own order is 0, 1, 10, 12, 2, ...): a val
    folder 0 .. 9 is the class of its own name, not the class at that position."""
    train = read_image_folder(folder(tmp_path / "train", [*map(str, range(11)), "12"]))
    val = read_image_folder(folder(tmp_path / "val", list(map(str, range(10)))))
    aligned, missing = align_classes(val, train)
    assert all(train.classes[t] == p.parent.name for p, t in aligned.samples)
    assert missing == ["10", "12"]


def test_a_class_name_that_names_two_reference_classes_is_refused(tmp_path):
    """A reference of repeated keys (a run's ImageNet display names without their ids: two "crane") cannot be
    matched by name: a split's "crane" would be scored as one of them, silently."""
    reference = ClassificationSamples([], ["crane", "kite", "crane"], "training-run", tmp_path / "config.yaml")
    val = read_image_folder(folder(tmp_path / "val", ["crane", "kite"]))
    with pytest.raises(DatasetFormatError, match="crane name more than one"):
        align_classes(val, reference)
    only_kite = read_image_folder(folder(tmp_path / "kite", ["kite"]))
    assert align_classes(only_kite, reference)[0].targets == [1]


def test_empty_class_folders_are_found(tmp_path):
    root = folder(tmp_path / "train", "ac")
    (root / "b").mkdir()
    assert empty_class_folders(read_image_folder(root)) == ["b"]
    assert empty_class_folders(read_image_folder(folder(tmp_path / "full", "ab"))) == []


@needs_fifo
def test_fifos_and_devices_with_image_names_are_skipped(tmp_path):
    """Not image files: listed, a FIFO would hang the first read forever (a broken link is still listed: reading it
    says the file is missing, as before)."""
    root = folder(tmp_path / "data", "ab")
    fifo(tmp_path / "data" / "a" / "pipe.png")
    (tmp_path / "data" / "a" / "dev.jpg").symlink_to("/dev/null")
    (tmp_path / "data" / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    samples = read_image_folder(root)
    assert [(p.relative_to(root).as_posix(), t) for p, t in samples.samples] == [
        ("a/0.png", 0),
        ("b/0.png", 1),
        ("b/gone.png", 1),
    ]


def test_images_are_listed_folder_by_folder_in_name_order_once_through_links(tmp_path):
    """Each folder's files by name, then its subfolders by name (hidden ones and non-images skipped), as os.walk
    went; a link back to a parent is not followed round."""
    root = tmp_path / "c"
    for name in ("b.png", "a.JPG", ".hidden.png", "notes.txt", "z/2.png", "z/1.png", "m/x.png", ".git/h.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (root / "m" / "up").symlink_to(root, target_is_directory=True)
    assert [p.relative_to(root).as_posix() for p in list_images(root)] == [
        "a.JPG",
        "b.png",
        "m/x.png",
        "z/1.png",
        "z/2.png",
    ]
