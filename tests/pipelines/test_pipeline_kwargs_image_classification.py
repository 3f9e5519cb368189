"""``pipeline("image-classification", max_pixels=...)``: a limit that cannot be used is refused when the pipeline
is built (it was taken, then every file failed as "truncated or corrupt image", or was refused as too large)."""

from __future__ import annotations

import pytest

import attnzoo
from attnzoo.errors import InvalidOptionError


@pytest.mark.parametrize("bad", ["x", "1000", 0, -1, 2.5, float("nan"), True, [100]])
def test_a_max_pixels_that_cannot_be_used_is_refused_when_the_pipeline_is_built(tiny_model, bad):
    with pytest.raises(InvalidOptionError, match=r"max_pixels must be a positive integer .*got"):
        attnzoo.pipeline("image-classification", model=tiny_model, device="cpu", max_pixels=bad)


def test_a_max_pixels_is_a_whole_number_of_pixels_or_none(tiny_model, photo, tmp_path):
    path = tmp_path / "cat.png"
    photo.save(path)  # 96 x 64 = 6144 pixels
    for limit in (6144, 6144.0, 10**9, None):
        classify = attnzoo.pipeline("image-classification", model=tiny_model, device="cpu", max_pixels=limit)
        assert len(classify(path, top_k=2)) == 2
    small = attnzoo.pipeline("image-classification", model=tiny_model, device="cpu", max_pixels=6143.0)
    assert small.max_pixels == 6143 and isinstance(small.max_pixels, int)
    with pytest.raises(attnzoo.errors.InvalidInputError, match="exceeds the 6,143-pixel limit"):
        small(path)


def test_labels_are_a_list_of_class_names_as_in_wsi_classification(tiny_model):
    """A string was split into one-letter labels, and int labels came back as ints (wsi gives names)."""
    n = tiny_model.num_classes
    with pytest.raises(InvalidOptionError, match="labels must be a list of class names"):
        attnzoo.pipeline("image-classification", model=tiny_model, device="cpu", labels="x" * n)
    classify = attnzoo.pipeline("image-classification", model=tiny_model, device="cpu", labels=range(n))
    assert classify.labels == [str(i) for i in range(n)]


def test_labels_as_a_mapping_are_refused_saying_to_pass_a_list_in_class_order():
    """labels={0: "cat", 1: "dog"} silently became ['0', '1'] (iterating a dict gives its keys)."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    for labels in ({0: "cat", 1: "dog"}, {"cat": 0, "dog": 1}):
        with pytest.raises(InvalidOptionError, match=r"class order .* got a dict: pass the names as a list"):
            attnzoo.pipeline("image-classification", model=model, device="cpu", labels=labels)
    assert attnzoo.pipeline("image-classification", model=model, device="cpu", labels=["cat", "dog"]).labels == [
        "cat",
        "dog",
    ]
