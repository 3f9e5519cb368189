"""attnzoo.pipeline(...) used as a transformers user would: what model= takes, weights=/pretrained= with a model
object, file objects as inputs, and the wording of errors about tasks, devices and tensor shapes."""

from __future__ import annotations

import functools
import io
import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import InvalidInputError, InvalidOptionError, UnknownNameError
from attnzoo.pipelines.base import is_single_input
from attnzoo.pipelines.image_classification import ImageClassificationPipeline
from attnzoo.tasks import list_tasks

pytestmark = pytest.mark.usefixtures("one_thread")

BUILT_IN = (
    "hallucination-mitigation",
    "image-classification",
    "multiview-3d-reconstruction",
    "scanpath",
    "subject-insertion",
    "wsi-classification",
)


@pytest.fixture
def classify(tiny_model):
    return attnzoo.pipeline("image-classification", model=tiny_model, device="cpu")


def same_classes(a, b) -> bool:
    return [p.index for p in a] == [p.index for p in b] and np.allclose([p.score for p in a], [p.score for p in b])


# ------------------------------------------------------------------------------------------------- model=


@pytest.mark.parametrize("task", BUILT_IN)
def test_model_as_a_path_reads_as_the_same_string_in_every_task(task, tmp_path):
    """A Path was handed to the pipeline as a model object: 'PosixPath' object has no attribute 'to'."""
    checkpoint = tmp_path / "sd.pth"
    torch.save({"w": torch.zeros(1)}, checkpoint)
    with pytest.raises(InvalidOptionError) as by_str:
        attnzoo.pipeline(task, model=str(checkpoint), device="cpu")
    with pytest.raises(InvalidOptionError) as by_path:
        attnzoo.pipeline(task, model=checkpoint, device="cpu")
    assert str(by_path.value) == str(by_str.value) and "weights=" in str(by_path.value)
    with pytest.raises(UnknownNameError, match="no_such_model_xyz"):
        attnzoo.pipeline(task, model=Path("no_such_model_xyz"), device="cpu")


class OnlyTo:
    """Has .to (as a tensor, a transformers BatchEncoding) but is no model: no .eval."""

    def to(self, *args, **kwargs):
        return self


@pytest.mark.parametrize("task", BUILT_IN)
@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"fc.weight": torch.zeros(2, 2)}, r"got a mapping \(dict\): a state dict goes in weights="),
        (0, "got int 0"),
        (True, "got bool True"),
        (object, "got the class object: build the model first"),
        (torch.zeros(3), r"got a tensor of shape \(3,\): a tensor holds weights or data, not a model"),
        (torch.nn.Parameter(torch.zeros(2, 2)), r"got a tensor of shape \(2, 2\)"),
        (OnlyTo(), "got OnlyTo"),
    ],
    ids=["state-dict", "int", "bool", "class", "tensor", "parameter", "to-without-eval"],
)
def test_what_is_not_a_model_is_refused_saying_what_model_takes(task, model, match):
    with pytest.raises(InvalidOptionError, match="model= takes a model name .* or a model object") as info:
        attnzoo.pipeline(task, model=model, device="cpu")
    assert re.search(match, str(info.value)), str(info.value)


def test_a_pipeline_class_refuses_a_non_model_itself(tmp_path):
    with pytest.raises(InvalidOptionError, match="got PosixPath"):
        ImageClassificationPipeline(tmp_path / "sd.pth", device="cpu")
    with pytest.raises(InvalidOptionError, match="got a tensor of shape"):  # was: 'Tensor' has no attribute 'eval'
        ImageClassificationPipeline(torch.zeros(3), device="cpu")


def test_model_objects_that_are_not_modules_still_pass(tiny_model):
    """The wrappers a task takes (an unloaded LVLMCheckpoint, NevaClip, attnzoo's FluxFillModel and the diffusers
    FluxFillPipeline it wraps, OAT, a timm module) pass the check that refuses tensors and objects without .eval."""
    from attnzoo.multimodal.hallucination.models import LVLMCheckpoint
    from attnzoo.multimodal.insertion import tiny_flux_fill
    from attnzoo.pipelines.base import check_model_object
    from tests.scanpath_helpers import tiny_nevaclip, tiny_oat

    flux = tiny_flux_fill()
    lvlm = LVLMCheckpoint("llava-hf/llava-1.5-7b-hf")  # never loaded here
    for model in (tiny_model, lvlm, tiny_nevaclip(), flux, flux.pipe, tiny_oat()):
        check_model_object(model)


# ------------------------------------------------------------------------ weights= / pretrained= with an object


@pytest.mark.parametrize("pretrained", [True, False])
def test_pretrained_with_a_model_object_is_refused(tiny_model, pretrained):
    """pretrained=True was ignored silently; pretrained=False relabelled the untouched weights as random."""
    with pytest.raises(InvalidOptionError, match=rf"pretrained={pretrained} applies to a model given by name"):
        attnzoo.pipeline("image-classification", model=tiny_model, pretrained=pretrained, device="cpu")


def test_weights_none_with_a_model_object_only_records_them_as_random(tiny_model):
    """Documented (docs/weights.md): the object's weights stay as they are; the record says what the caller said."""
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    pipe = attnzoo.pipeline("image-classification", model=tiny_model, weights="none", device="cpu")
    assert pipe.weights_label == "random"
    assert all(torch.equal(before[k], v) for k, v in pipe.model.state_dict().items())
    assert attnzoo.pipeline("image-classification", model=tiny_model, device="cpu").weights_label is None


# ------------------------------------------------------------------------------------------- file objects


def test_a_file_object_is_one_image_in_image_classification(classify, photo, tmp_path):
    """It was read as a batch of byte lines: "cannot read an image from bytes"."""
    path = tmp_path / "cat.png"
    photo.save(path)
    expected = classify(path)
    with path.open("rb") as opened:
        for source in (io.BytesIO(path.read_bytes()), opened):
            assert is_single_input(source)
            got = classify(source)
            assert same_classes(got, expected)
            assert got.plot().size == expected.plot().size
        in_a_list = classify([io.BytesIO(path.read_bytes()), opened], num_workers=1)
    assert len(in_a_list) == 2 and all(same_classes(r, expected) for r in in_a_list)


def test_a_file_object_is_read_where_it_stands_and_put_back(classify, photo, tmp_path):
    path = tmp_path / "cat.png"
    photo.save(path)
    handle = io.BytesIO(b"prefix" + path.read_bytes())
    handle.seek(6)
    assert same_classes(classify(handle), classify(path)) and handle.tell() == 6


def test_file_objects_that_hold_no_image_are_typed_errors(classify, photo, tmp_path):
    (tmp_path / "note.txt").write_text("hello")
    with open(tmp_path / "note.txt") as text, pytest.raises(InvalidInputError, match="binary mode"):
        classify(text)
    with pytest.raises(InvalidInputError, match=r"<BytesIO>: not an image format PIL can read"):
        classify(io.BytesIO(b"junk"))
    photo.save(tmp_path / "cat.png")
    data = (tmp_path / "cat.png").read_bytes()
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        classify(io.BytesIO(data[: len(data) // 2]))
    closed = open(tmp_path / "cat.png", "rb")  # noqa: SIM115
    closed.close()
    with pytest.raises(InvalidInputError, match="cannot read the file object"):
        classify(closed)


class SlowFile(io.RawIOBase):
    """A binary file read a KB at a time, slowly (a network share), straight from its OS file descriptor: forked
    DataLoader workers share that descriptor's one position, as they share a plain open file's."""

    def __init__(self, path):
        super().__init__()
        self.name, self.fd = str(path), os.open(path, os.O_RDONLY)

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=os.SEEK_SET):
        return os.lseek(self.fd, offset, whence)

    def readinto(self, buffer):
        time.sleep(0.002)
        data = os.read(self.fd, min(len(buffer), 1024))
        buffer[: len(data)] = data
        return len(data)

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


@pytest.fixture
def in_workers(monkeypatch):
    """Runs the pipeline's DataLoader workers under a start method: "spawn" (macOS's default, Linux's from Python
    3.14) pickles the inputs; "fork" shares open files with the calling process."""

    def use(method):
        monkeypatch.setattr(
            torch.utils.data,
            "DataLoader",
            functools.partial(torch.utils.data.DataLoader, multiprocessing_context=method),
        )

    return use


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_one_file_object_given_several_times_is_read_once_for_the_workers(
    classify, photo, tmp_path, in_workers, method
):
    """With fork, workers read the one file at one shared position ("not an image format PIL can read", now and
    then); with spawn, the open file could not be sent to them (a raw "cannot pickle '_io.BufferedReader'")."""
    path = tmp_path / "cat.png"
    photo.resize((192, 128)).save(path)
    expected = classify(path)
    in_workers(method)
    with SlowFile(path) if method == "fork" else path.open("rb") as handle:
        handle.seek(0)
        results = list(classify.iterate([handle] * 4, num_workers=2, on_error="skip"))
        assert handle.tell() == 0  # put back where it stood
    assert [index for index, _ in results] == [0, 1, 2, 3]
    assert all(not isinstance(got, Exception) and same_classes(got, expected) for _, got in results), results


def test_a_file_object_given_several_times_is_read_once(classify, photo, tmp_path):
    path = tmp_path / "cat.png"
    photo.save(path)
    reads = []

    class Counted(io.BytesIO):
        def read(self, *args):
            reads.append(args)
            return super().read(*args)

    handle = Counted(path.read_bytes())
    got = classify([handle, handle, handle])
    assert len(got) == 3 and all(same_classes(g, got[0]) for g in got) and len(reads) == 1


def test_a_file_that_cannot_be_read_is_set_aside_as_its_input(classify, photo, tmp_path):
    """A file object read in the calling process still fails as its own input, with its own name."""
    photo.save(tmp_path / "cat.png")
    closed = open(tmp_path / "cat.png", "rb")  # noqa: SIM115
    closed.close()
    results = list(classify.iterate([closed, tmp_path / "cat.png"], num_workers=1, on_error="skip"))
    assert isinstance(results[0][1], InvalidInputError) and "cat.png>: cannot read the file object" in str(
        results[0][1]
    )
    assert not isinstance(results[1][1], Exception)


def test_an_object_whose_read_takes_arguments_is_a_typed_error(classify, tmp_path):
    """A zipfile.ZipFile passes for a file object (it has .read) but its read() needs a member's name: a raw
    TypeError escaped."""
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("cat.png", b"")
    with zipfile.ZipFile(tmp_path / "images.zip") as archive:
        with pytest.raises(InvalidInputError, match=r"<ZipFile>: cannot read the file object: its read\(\) does not"):
            classify(archive)
        assert isinstance(next(classify.iterate([archive], on_error="skip"))[1], InvalidInputError)


def test_a_file_object_is_one_image_in_scanpath(tmp_path):
    from tests.scanpath_helpers import tiny_oat

    shelf = np.full((120, 150, 3), 128, np.uint8)
    shelf[::7] = 30
    Image.fromarray(shelf).save(tmp_path / "shelf.png")
    boxes = np.array([(10 + 45 * c, 8 + 56 * r, 48 + 45 * c, 56 + 56 * r) for r in range(2) for c in range(3)], float)
    search = attnzoo.pipeline("scanpath", model=tiny_oat(), max_len=4)
    expected = search(tmp_path / "shelf.png", boxes=boxes, target=4)
    got = search(io.BytesIO((tmp_path / "shelf.png").read_bytes()), boxes=boxes, target=4)
    np.testing.assert_array_equal(got.objects, expected.objects)
    assert got.plot().size == expected.plot().size  # the picture reads the file object again


def test_file_objects_are_images_in_subject_insertion(tmp_path):
    from attnzoo.multimodal.insertion import tiny_flux_fill

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    mask = np.zeros((48, 64), bool)
    mask[10:30, 10:40] = True
    insert = attnzoo.pipeline("subject-insertion", model=tiny_flux_fill(), panel_size=16, steps=1)
    by_path = insert(tmp_path / "t.png", subject=tmp_path / "s.png", mask=mask, prompt="a cup", seed=0)
    by_file = insert(
        io.BytesIO((tmp_path / "t.png").read_bytes()),
        subject=io.BytesIO((tmp_path / "s.png").read_bytes()),
        mask=mask,
        prompt="a cup",
        seed=0,
    )
    np.testing.assert_array_equal(np.asarray(by_file.image), np.asarray(by_path.image))
    # subject=open(...) goes with every input: forked workers read the one file at one shared position
    with SlowFile(tmp_path / "s.png") as subject:
        results = list(
            insert.iterate([tmp_path / "t.png"] * 2, subject=subject, mask=mask, prompt="a cup", seed=0, num_workers=2)
        )
    assert [index for index, _ in results] == [0, 1]
    for _, got in results:
        np.testing.assert_array_equal(np.asarray(got.image), np.asarray(by_path.image))


# ------------------------------------------------------------------------------------------------ wording


def test_an_unknown_task_lists_the_tasks():
    with pytest.raises(UnknownNameError) as info:
        attnzoo.pipeline("unknown-task")
    assert all(task in str(info.value) for task in list_tasks())
    with pytest.raises(UnknownNameError, match="Did you mean: image-classification"):
        attnzoo.pipeline("image-clasification")
    assert UnknownNameError("model", "x", ["y"]).args[0] == "unknown model 'x'."  # models are not listed


def test_an_hxwxc_tensor_is_named_by_the_shape_it_was_given(classify):
    """(64, 96, 3) was reported as "got shape (96, 3, 64)", the shape after moving its first axis."""
    with pytest.raises(InvalidInputError, match=r"got shape \(64, 96, 3\); an HxWxC tensor\? .*permute\(2, 0, 1\)"):
        classify(torch.zeros(64, 96, 3, dtype=torch.uint8))
    with pytest.raises(InvalidInputError, match=r"got shape \(5, 64, 96\)$"):
        classify(torch.zeros(5, 64, 96, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("device", "shown"),
    [
        (True, "bool True"),
        (np.True_, "bool np.True_"),
        (1.5, "float 1.5"),
        ([0], "list [0]"),
        (torch.tensor(0.5), "Tensor"),
    ],
)
def test_a_device_that_is_no_name_ordinal_or_device_is_a_clear_typed_error(tiny_model, device, shown):
    """device=True read as "cuda:True"; device=1.5 dumped torch's list of overloads."""
    with pytest.raises(InvalidInputError, match="device must be a name such as 'cpu'") as info:
        attnzoo.pipeline("image-classification", model=tiny_model, device=device)
    assert shown in str(info.value) and "overload" not in str(info.value) and "cuda:" not in str(info.value)[-30:]


def test_numpy_integers_are_device_ordinals(tiny_model):
    assert attnzoo.pipeline("image-classification", model=tiny_model, device=np.int64(-1)).device == torch.device("cpu")
