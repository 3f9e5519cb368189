"""pipeline("wsi-classification") used as a transformers user would: a corrupt slide or feature file is skipped
like any bad input (in DataLoader workers too, and by ``attnzoo run``), URLs and file objects are refused by
name, sizes are whole numbers (64.0 too), numpy's booleans are flags, and a bag without coordinates has a picture."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError
from attnzoo.pipelines.wsi_classification import SlidePrediction
from tests.wsi_helpers import TinyEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def wsi(tmp_path):
    torch.manual_seed(0)
    model = attnzoo.create_model("acmil_ga", in_dim=8, inner_dim=8)
    return attnzoo.pipeline(
        "wsi-classification", model=model, device="cpu", encoder=TinyEncoder(), feature_dir=tmp_path
    )


@pytest.fixture
def damaged(tmp_path):
    """A text file and a truncated PNG given as slides, and an .h5 feature file that is no HDF5."""
    (tmp_path / "notimg.txt").write_text("hello")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(buffer, "PNG")
    (tmp_path / "trunc.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "bad.h5").write_bytes(b"junk")
    return [tmp_path / "notimg.txt", tmp_path / "bad.h5", tmp_path / "trunc.png"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_corrupt_slide_or_feature_file_is_skipped_as_any_bad_input(wsi, damaged, num_workers):
    """A DatasetFormatError stopped the whole iteration (with workers: torch's "Caught DatasetFormatError in
    DataLoader worker process 0" and its traceback as the message)."""
    bag = torch.randn(30, 8)
    results = list(wsi.iterate([bag, *damaged, bag], on_error="skip", num_workers=num_workers))
    assert [i for i, _ in results] == [0, 1, 2, 3, 4]
    assert isinstance(results[0][1], SlidePrediction) and isinstance(results[4][1], SlidePrediction)
    np.testing.assert_allclose(results[0][1].probabilities, wsi(bag).probabilities, atol=1e-6)
    for (_, error), path in zip(results[1:4], damaged):
        assert type(error) is DatasetFormatError and str(error).startswith(str(path))
        assert "DataLoader" not in str(error) and "Traceback" not in str(error)
    # without "skip" the first bad input raises its own typed error, workers or not
    with pytest.raises(DatasetFormatError) as info:
        wsi([bag, damaged[1]], num_workers=num_workers)
    assert str(info.value).startswith(str(damaged[1])) and "DataLoader" not in str(info.value)


def test_attnzoo_run_writes_the_good_inputs_and_lists_the_corrupt_one_as_skipped(
    tmp_path, damaged, monkeypatch, capsys
):
    from attnzoo.cli import main
    from attnzoo.vision.acmil import ACMILGatedAttention
    from tests.helpers import register_test_model

    register_test_model(
        monkeypatch, "acmil_tiny_api", lambda **kw: ACMILGatedAttention(in_dim=512, inner_dim=16), like="acmil_ga"
    )
    torch.save(torch.randn(10, 512), tmp_path / "a.pt")
    torch.save(torch.randn(12, 512), tmp_path / "b.pt")
    out = tmp_path / "out"
    inputs = [str(tmp_path / "a.pt"), str(damaged[1]), str(tmp_path / "b.pt")]
    assert main(["run", "wsi-classification", *inputs, "-m", "acmil_tiny_api", "-w", "none", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"skipped: {damaged[1]}: not a readable HDF5 feature file" in err and "1 of 3 inputs" in err
    record = json.loads((out / "results.json").read_text())
    assert sorted(record["results"]) == sorted([inputs[0], inputs[2]])
    assert record["files"] == {inputs[0]: ["a.png"], inputs[2]: ["b.png"]}
    assert (out / "a.png").is_file() and (out / "b.png").is_file()  # bags without coordinates get a picture too


def test_a_bag_without_coordinates_has_a_picture_but_no_heatmap(wsi):
    result = wsi(torch.randn(10, 8))
    picture = result.plot(size=400)
    assert picture.width == 400
    with pytest.raises(InvalidInputError, match="no patch coordinates"):
        result.heatmap()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.svs", "https://127.0.0.1:9/feats.h5", "s3://bucket/x.tif"])
def test_a_url_is_refused_saying_to_download_it_first(wsi, url, tmp_path):
    """Path() folded the URL's // into "http:/127.0.0.1:9/x.svs: no such file"."""
    with pytest.raises(InvalidInputError, match="download it first") as info:
        wsi(url)
    assert str(info.value).startswith(url + ":")
    results = list(wsi.iterate([torch.randn(5, 8), url], on_error="skip", num_workers=1))
    assert isinstance(results[1][1], InvalidInputError) and url in str(results[1][1])
    assert not list(tmp_path.iterdir())  # nothing was fetched or made


def test_a_file_object_is_one_input_refused_by_name(wsi, tmp_path):
    torch.save(torch.randn(5, 8), tmp_path / "bag.pt")
    with open(tmp_path / "bag.pt", "rb") as handle, pytest.raises(InvalidInputError, match="file object") as info:
        wsi(handle)
    assert "bag.pt" in str(info.value) and "pass the file's path" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"), [("patch_size", 64.0), ("input_size", 224.0), ("patch_size", np.float64(64))]
)
def test_sizes_take_whole_number_floats_as_json_and_command_lines_give_them(wsi, name, value):
    """Sizes in pixels take 64.0 as 64 (commit 7f03257: a size read from JSON or a command line); a size that is not
    a whole number is refused; batch_size stays an integer."""
    built = attnzoo.pipeline("wsi-classification", model=wsi.model, device="cpu", **{name: value})
    assert built._defaults[0][name] == int(value) and type(built._defaults[0][name]) is int
    for bad in (value + 0.5, float("nan")):
        with pytest.raises(InvalidOptionError, match=rf"{name} must be an integer"):
            wsi(torch.randn(5, 8), **{name: bad})
        with pytest.raises(InvalidOptionError, match=rf"{name} must be an integer"):
            attnzoo.pipeline("wsi-classification", model=wsi.model, device="cpu", **{name: bad})
    with pytest.raises(InvalidInputError, match="batch_size must be a positive integer"):
        wsi(torch.randn(5, 8), batch_size=2.0)


def test_extraction_sizes_take_whole_number_floats():
    from attnzoo.pipelines import wsi_features

    assert wsi_features.check_stride(64, 64) == 64 and wsi_features.check_patch_side("patch_size", np.int64(64)) == 64
    for got in (
        wsi_features.check_stride(64.0, 64),
        wsi_features.check_patch_side("patch_size", 64.0),
        wsi_features.check_input_size(64.0, 256),
        wsi_features.check_input_size(64.0, None),
    ):
        assert got == 64 and type(got) is int
    for check in (
        lambda: wsi_features.check_stride(64.5, 64),
        lambda: wsi_features.check_patch_side("patch_size", 255.5),
        lambda: wsi_features.check_input_size(224.5, 256),
        lambda: wsi_features.check_input_size(224.5, None),
    ):
        with pytest.raises(InvalidOptionError, match="must be an integer"):
            check()


def test_numpy_booleans_are_flags(wsi):
    """progress=np.True_ was refused here while scanpath took it."""
    from attnzoo.pipelines.wsi_features import check_segment_kwargs

    bag = torch.randn(5, 8)
    assert isinstance(wsi(bag, progress=np.True_), SlidePrediction)
    assert isinstance(wsi(bag, progress=np.False_), SlidePrediction)
    checked = check_segment_kwargs({"use_otsu": np.True_})
    assert checked == {"use_otsu": True} and type(checked["use_otsu"]) is bool
    with pytest.raises(InvalidInputError, match="progress must be True, False or None"):
        wsi(bag, progress="yes")


def test_extraction_progress_takes_flags_only(tmp_path):
    """progress="yes" went through unchecked (any truthy value drew a bar); numpy's booleans are flags."""
    from attnzoo.pipelines.wsi_cohort import extract_cohort
    from attnzoo.pipelines.wsi_features import extract_features

    with pytest.raises(InvalidInputError, match="progress must be True, False or None"):
        extract_features(tmp_path / "missing.svs", TinyEncoder(), tmp_path / "f.h5", progress="yes")
    with pytest.raises(InvalidInputError, match="progress must be True, False or None"):
        extract_cohort([tmp_path / "missing.svs"], TinyEncoder(), tmp_path / "out", progress="yes")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DatasetFormatError, match="no such slide file"):  # got past the flag, to the slide
        extract_features(tmp_path / "missing.svs", TinyEncoder(), tmp_path / "f.h5", progress=np.True_)
