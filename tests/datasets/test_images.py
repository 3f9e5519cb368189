import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.datasets import images
from attnzoo.datasets.images import load_image
from attnzoo.errors import InvalidInputError
from tests.helpers import png_header_only, write_png


def test_inputs_of_every_kind_agree(photo, tmp_path):
    photo.save(tmp_path / "p.png")
    ref = np.asarray(photo)
    arr = np.array(photo)
    for source in (
        tmp_path / "p.png",
        str(tmp_path / "p.png"),
        photo,
        arr,
        torch.from_numpy(arr).permute(2, 0, 1),
        torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
        arr.astype(np.float64) / 255,
    ):
        assert np.array_equal(np.asarray(load_image(source)), ref), type(source)


def test_grayscale_palette_and_cmyk(photo, tmp_path):
    grey = photo.convert("L")
    grey.save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (64, 96, 3) and (out[..., 0] == np.asarray(grey)).all()
    photo.convert("CMYK").save(tmp_path / "c.jpg")
    out = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    assert np.abs(out - np.asarray(photo).astype(int)).mean() < 8  # same picture, not inverted
    photo.convert("P").save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").mode == "RGB"


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert (out[:2] == [255, 0, 0]).all() and (out[2:] == [255, 255, 255]).all()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    out = np.asarray(load_image(write_png(tmp_path / "g16.png", ramp)))[..., 0].astype(int)
    assert np.abs(out - np.round(ramp / 65535 * 255)).max() <= 1
    assert out.max() < 255  # a clip to 8 bits would saturate most of the ramp
    rgb = np.stack([ramp, ramp // 2, 65535 - ramp], -1).astype(np.uint16)
    out = np.asarray(load_image(write_png(tmp_path / "rgb16.png", rgb))).astype(int)
    assert np.abs(out - np.round(rgb / 257)).max() <= 1


def test_exif_rotation_is_applied(photo, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (photo.height, photo.width)
    expected = np.asarray(photo.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(out).astype(int) - expected).mean() < 6


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    assert np.asarray(load_image(tmp_path / "one.png")).tolist() == [[[10, 20, 30]]]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not an image"),
        (b"definitely not an image", "not an image"),
    ],
)
def test_unreadable_files_name_the_input(tmp_path, content, match):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=match) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg(photo, tmp_path):
    buf = io.BytesIO()
    photo.save(buf, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InvalidInputError, match="t.jpg: truncated or corrupt"):
        load_image(tmp_path / "t.jpg")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidInputError, match="directory"):
        load_image(tmp_path)


def test_huge_png_refused_before_decoding(tmp_path):
    path = png_header_only(tmp_path / "huge.png", 20000, 20000)
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"huge.png: 20000x20000 image exceeds"):
        load_image(path)
    assert time.perf_counter() - start < 5  # refused from the header: no 1.2 GB decode happened


def test_oversized_jpeg_decodes_at_reduced_scale(photo, tmp_path, monkeypatch):
    photo.resize((400, 300)).save(tmp_path / "big.jpg")
    monkeypatch.setattr(images, "MAX_PIXELS", 20_000)
    out = load_image(tmp_path / "big.jpg")
    assert out.width * out.height <= 20_000 and out.width >= 400 // 8
    assert abs(out.width / out.height - 4 / 3) < 0.05


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 3, 5), np.uint8),
        np.zeros((0, 3, 3), np.uint8),
        np.full((3, 3), 2.0),
        np.full((3, 3), np.nan),
        np.zeros((3, 3), np.int64),
        torch.zeros(5, 3, 3),
        "not-a-file.png",
        12,
    ],
)
def test_bad_arrays_and_objects(bad):
    with pytest.raises(InvalidInputError):
        load_image(bad)


def test_half_precision_tensors_load():
    x = torch.rand(3, 8, 8)
    for dtype in (torch.bfloat16, torch.float16):
        assert np.array_equal(np.asarray(load_image(x.to(dtype))), np.asarray(load_image(x.to(dtype).float())))
