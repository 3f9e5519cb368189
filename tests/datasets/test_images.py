import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.datasets import images
from attnzoo.datasets.images import load_image
from attnzoo.errors import InvalidInputError, InvalidOptionError
from tests.datasets.special_files import fifo, needs_fifo
from tests.helpers import http_server, png_header_only, write_png


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


def sideways_jpeg(path, size, seed=0):
    """A JPEG of ``size`` (width, height) pixels as stored, whose EXIF says: turn 90 degrees to display."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def test_dataset_images_are_decoded_as_stored(tmp_path):
    """A user's photo is turned upright; a dataset's image keeps the stored frame its annotations use."""
    path = sideways_jpeg(tmp_path / "r.jpg", (40, 30))
    marked = images.dataset_image_path(path)
    assert load_image(path).size == load_image(str(path)).size == (30, 40)
    assert load_image(marked).size == images.open_image_file(marked).size == (40, 30)
    with Image.open(path) as stored:
        assert np.array_equal(np.asarray(load_image(marked)), np.asarray(stored.convert("RGB")))
    # still a Path: equal to the plain one, and the mark survives derived paths and pickling (workers)
    assert marked == path and hash(marked) == hash(path) and marked.name == "r.jpg"
    assert isinstance(marked.parent / "r.jpg", images.DatasetImagePath)
    assert isinstance(pickle.loads(pickle.dumps(marked)), images.DatasetImagePath)
    assert images.dataset_image_path(marked) is marked


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


@pytest.fixture
def forbid_decoding(monkeypatch):
    """Call it once the test's files are written: from then on, decoding any image's pixels fails
    the test (refusals must come from the header)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("an image was decoded")

    def forbid():
        monkeypatch.setattr(Image.Image, "load", refuse)
        monkeypatch.setattr(Image.Image, "draft", refuse)

    return forbid


def test_huge_png_refused_before_decoding(tmp_path, forbid_decoding):
    path = png_header_only(tmp_path / "huge.png", 20000, 20000)
    forbid_decoding()
    with pytest.raises(InvalidInputError, match=r"huge.png: 20000x20000 image exceeds"):
        load_image(path)


def jpeg_claiming(photo, width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is rewritten to claim ``width x height``."""
    buf = io.BytesIO()
    photo.save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_jpeg_header_over_the_limit_is_refused_before_decoding(photo, tmp_path, forbid_decoding):
    path = tmp_path / "bomb.jpg"
    path.write_bytes(jpeg_claiming(photo, 65000, 65000))
    forbid_decoding()
    with pytest.raises(InvalidInputError, match=r"bomb.jpg: 65000x65000 image exceeds the 178,956,970-pixel limit"):
        load_image(path)


def test_oversized_jpeg_is_refused_and_max_pixels_raises_the_limit(photo, tmp_path, monkeypatch):
    photo.resize((400, 300)).save(tmp_path / "big.jpg")
    monkeypatch.setattr(images, "MAX_PIXELS", 20_000)
    with pytest.raises(InvalidInputError, match=r"big.jpg: 400x300 image exceeds the 20,000-pixel limit"):
        load_image(tmp_path / "big.jpg")
    assert load_image(tmp_path / "big.jpg", max_pixels=120_000).size == (400, 300)
    with pytest.raises(InvalidInputError, match="exceeds the 100-pixel limit"):
        load_image(tmp_path / "big.jpg", max_pixels=100)


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


@pytest.mark.parametrize("size", [(0, 7), (7, 0), (0, 0)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_empty_pil_images_are_refused(size, mode):
    """A 0-wide or 0-high PIL image would reach an image processor and divide by its size."""
    with pytest.raises(InvalidInputError, match=f"empty image of size {size[0]}x{size[1]}"):
        load_image(Image.new(mode, size))
    with pytest.raises(InvalidInputError, match="^photo: empty image"):
        images.to_rgb(Image.new(mode, size), name="photo")


def test_half_precision_tensors_load():
    x = torch.rand(3, 8, 8)
    for dtype in (torch.bfloat16, torch.float16):
        assert np.array_equal(np.asarray(load_image(x.to(dtype))), np.asarray(load_image(x.to(dtype).float())))


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*deprecated")
def test_tensors_torch_cannot_turn_into_numpy_load_as_their_values():
    """load_image reads tensors as every tensor is read (attnzoo._values.to_numpy): a negated or conjugated view,
    a quantized or a sparse tensor gave torch's bare RuntimeError / TypeError; each is the image of its values."""
    x = torch.rand(3, 8, 8)
    expected = np.asarray(load_image(x))
    assert np.array_equal(np.asarray(load_image(torch._neg_view(-x))), expected)
    assert np.array_equal(np.asarray(load_image((-x).to_sparse().neg())), expected)
    quantized = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
    assert np.array_equal(np.asarray(load_image(quantized)), np.asarray(load_image(quantized.dequantize())))
    with pytest.raises(
        InvalidInputError, match=r"^<Tensor \(3, 8, 8\)> is a meta tensor: it holds no data .*materialize"
    ):
        load_image(x.to("meta"))


# ---- images as http(s) URLs (a local server: tests never reach the internet) ---------------------------------


def test_url_images_load_like_files(photo, tmp_path):
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    with http_server({"/cat.png": buf.getvalue()}) as (base, requests):
        out = load_image(f"{base}/cat.png")
    assert np.array_equal(np.asarray(out), np.asarray(photo)) and requests == [("/cat.png", None)]


def test_url_failures_are_typed_and_name_the_url(photo, tmp_path, monkeypatch):
    buf = io.BytesIO()
    photo.save(buf, format="JPEG")
    bomb = png_header_only(tmp_path / "bomb.png", 20000, 20000).read_bytes()
    files = {"/cat.jpg": buf.getvalue(), "/bomb.png": bomb, "/text": b"<html>not an image</html>", "/empty": b""}
    with http_server(files) as (base, _):
        for path, message in [
            ("/missing.jpg", "HTTP 404"),
            ("/bomb.png", "20000x20000 image exceeds"),
            ("/text", "not an image format"),
            ("/empty", "empty file"),
        ]:
            with pytest.raises(InvalidInputError, match=message) as info:
                load_image(base + path)
            assert base + path in str(info.value)
        monkeypatch.setattr(images, "MAX_DOWNLOAD_BYTES", 1000)
        with pytest.raises(InvalidInputError, match="over the 1,000-byte limit"):
            load_image(f"{base}/cat.jpg")


def test_url_dropped_mid_body_is_typed(photo):
    buf = io.BytesIO()
    photo.save(buf, format="JPEG")
    with http_server({"/cut.jpg": buf.getvalue()}, cut_after={"/cut.jpg": 100}) as (base, _):
        with pytest.raises(InvalidInputError, match="cut.jpg"):
            load_image(f"{base}/cut.jpg")


def test_url_unreachable_or_silent_host_fails_fast(monkeypatch):
    import socket

    monkeypatch.setattr(images, "URL_TIMEOUT", 0.5)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(InvalidInputError, match=f"127.0.0.1:{port}/x.jpg: cannot download"):
        load_image(f"http://127.0.0.1:{port}/x.jpg")
    import urllib.request

    timeouts = []
    real_urlopen = urllib.request.urlopen

    def urlopen(request, *args, timeout=None, **kwargs):
        timeouts.append(timeout)
        return real_urlopen(request, *args, timeout=timeout, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        with pytest.raises(InvalidInputError, match="cannot download"):
            load_image(f"http://127.0.0.1:{silent.getsockname()[1]}/x.jpg")
    assert timeouts == [0.5]  # every request carries the short timeout, so a silent host cannot hang us


def test_url_in_offline_mode_is_refused_without_a_request(monkeypatch):
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    with http_server({"/a.png": b""}) as (base, requests):
        with pytest.raises(InvalidInputError, match="offline mode"):
            load_image(f"{base}/a.png")
    assert requests == []


def test_file_contents_are_the_bytes_of_a_file_object_named_as_the_file(tmp_path):
    """What a pipeline hands its DataLoader workers instead of an open file: picklable (a spawned worker cannot
    be sent an open file), named as the file in messages, the file put back where it stood."""
    write_png(tmp_path / "cat.png", np.full((8, 12, 3), 200, np.uint8))
    with open(tmp_path / "cat.png", "rb") as handle:
        handle.seek(0)
        contents = images.file_contents(handle)
        assert handle.tell() == 0 and contents.data == (tmp_path / "cat.png").read_bytes()
        assert images.describe(contents) == images.describe(handle) == f"<BufferedReader {tmp_path / 'cat.png'}>"
    copy = pickle.loads(pickle.dumps(contents))
    assert images.is_file_object(copy) and images.describe(copy) == images.describe(contents)
    assert np.array_equal(np.asarray(load_image(copy)), np.asarray(load_image(tmp_path / "cat.png")))
    assert images.file_contents(contents) is contents
    assert images.describe(images.file_contents(io.BytesIO(b"x"))) == "<BytesIO>"


def test_file_contents_keep_the_error_of_a_file_that_cannot_be_read(tmp_path):
    """Raised where the input is read (so on_error="skip" sets that input aside), not where it was read."""
    closed = open(tmp_path / "x.bin", "wb+")  # noqa: SIM115
    closed.close()
    contents = pickle.loads(pickle.dumps(images.file_contents(closed)))
    with pytest.raises(InvalidInputError, match=r"^<BufferedRandom .*x\.bin>: cannot read the file object"):
        load_image(contents)
    unread = images.file_contents(io.BytesIO(b"data"), read=False)
    assert unread.data is None and images.describe(unread) == "<BytesIO>"
    with pytest.raises(InvalidInputError, match="<BytesIO>: the file object was not read"):
        load_image(unread)


def test_an_object_whose_read_needs_arguments_is_a_typed_error(tmp_path):
    """A zipfile.ZipFile has .read, so it passes for a file object, but read() needs a member's name."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "a.zip", "w") as archive:
        archive.writestr("cat.png", b"")
    with (
        zipfile.ZipFile(tmp_path / "a.zip") as archive,
        pytest.raises(
            InvalidInputError, match=r"^<ZipFile>: cannot read the file object: its read\(\) does not read it whole"
        ),
    ):
        load_image(archive)


@needs_fifo
def test_a_fifo_or_device_with_an_image_name_is_refused_not_opened(tmp_path):
    """PIL's open of a FIFO waits for a writer forever; /dev/zero would be read without end."""
    pipe = fifo(tmp_path / "cat.png")
    with pytest.raises(InvalidInputError, match=r"cat.png: is a FIFO \(named pipe\), not a regular file"):
        load_image(pipe)
    (tmp_path / "dev.png").symlink_to("/dev/null")
    with pytest.raises(InvalidInputError, match="dev.png: is a character device, not a regular file"):
        load_image(tmp_path / "dev.png")
    with pytest.raises(InvalidInputError, match="cat.png: is a FIFO"):  # a dataset's path alike
        load_image(images.dataset_image_path(pipe))


@pytest.mark.parametrize(
    ("variable", "value", "check"),
    [
        ("ATTNZOO_MAX_IMAGE_PIXELS", "100M", "load"),
        ("ATTNZOO_MAX_IMAGE_PIXELS", "-1", "load"),
        ("ATTNZOO_MAX_IMAGE_PIXELS", "0", "load"),
        ("ATTNZOO_MAX_IMAGE_PIXELS", "2.5", "load"),
        ("ATTNZOO_MAX_IMAGE_BYTES", "64MB", "url"),
        ("ATTNZOO_URL_TIMEOUT", "-3", "url"),
        ("ATTNZOO_URL_TIMEOUT", "soon", "url"),
    ],
)
def test_a_bad_size_limit_in_the_environment_is_a_typed_error_naming_it(tmp_path, monkeypatch, variable, value, check):
    """Read when used, not at import (where '100M' was an internal ValueError and -1 refused every image)."""
    write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidOptionError, match=rf"the environment variable {variable} must be a positive"):
        if check == "load":
            load_image(tmp_path / "a.png")
        else:  # refused before any connection is tried
            images.fetch_url("http://127.0.0.1:9/a.png")


def test_size_limits_in_the_environment_are_read_when_used(tmp_path, monkeypatch):
    write_png(tmp_path / "a.png", np.zeros((40, 40, 3), np.uint8))
    for value in ("1000", "1e3", " 1_000 "):
        monkeypatch.setenv("ATTNZOO_MAX_IMAGE_PIXELS", value)
        with pytest.raises(InvalidInputError, match="40x40 image exceeds the 1,000-pixel limit"):
            load_image(tmp_path / "a.png")
    monkeypatch.setenv("ATTNZOO_MAX_IMAGE_PIXELS", "")  # blank: the default
    assert load_image(tmp_path / "a.png").size == (40, 40)
    assert images.max_image_pixels() == images.MAX_PIXELS == 2 * 89_478_485  # the documented default


def test_16_bit_arrays_are_scaled_in_integers_as_rounding_in_float_would():
    """Every one of the 65536 values gives round(v / 257) (no value lies on a half), without float64 copies."""
    import tracemalloc

    values = np.arange(65536, dtype=np.uint16)
    expected = np.array([round(int(v) * 255 / 65535) for v in values], np.uint8)
    assert np.array_equal(images.uint16_to_uint8(values), expected)
    grey = np.asarray(images.array_to_image(values.reshape(256, 256)))[..., 0]
    assert np.array_equal(grey.reshape(-1), expected)
    rgb = np.random.default_rng(0).integers(0, 65536, (512, 512, 3)).astype(np.uint16)
    tracemalloc.start()
    try:
        out = images.uint16_to_uint8(rgb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(out, expected[rgb])
    assert peak < 6 * rgb.size, peak  # dividing in float64 took 16 bytes a sample, and more
