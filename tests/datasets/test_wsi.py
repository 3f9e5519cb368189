"""Whole-slide reading, tissue segmentation, tiling and patch reading on small pyramidal TIFFs that
OpenSlide itself opens (tests/wsi_helpers.py); feature extraction is tests/pipelines/test_wsi_features.py."""

import os
import sys

import numpy as np
import openslide  # the wsi extra: a failed install must fail the suite, not skip it
import pytest
import torch
from PIL import Image

from attnzoo.datasets import wsi
from attnzoo.datasets.wsi import (
    PatchDataset,
    PatchTransform,
    magnification_from_mpp,
    open_slide,
    patch_grid,
    segment_tissue,
)
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError, MissingDependencyError
from tests.wsi_helpers import SEG, slide_image, tissue_truth, write_slide, write_test_slides


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_test_slides(tmp_path_factory.mktemp("slides"))


# ------------------------------------------------------------------------------------------- reading


def test_synthetic_slide_opens_with_openslide(slides):
    osr = openslide.OpenSlide(os.fspath(slides["aperio"]))
    assert osr.level_count > 1
    slide = open_slide(slides["aperio"])
    assert slide.backend == "openslide" and slide.vendor == "aperio" and slide.name == "aperio_slide"
    assert slide.dimensions == (2048, 1536) and slide.level_count == 3
    assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    assert slide.mpp == pytest.approx(0.25) and slide.objective_power == 40
    region = slide.read_region((600 - 8, 500 - 8), 0, (16, 16))
    assert region.mode == "RGB" and region.size == (16, 16)
    assert np.asarray(region).mean() < 230  # the centre of a blob is tissue-coloured
    assert np.array_equal(np.asarray(slide.read_region((0, 0), 1, (512, 384))), slide_image()[::4, ::4])
    thumb = slide.thumbnail(256)
    assert thumb.mode == "RGB" and thumb.size == (256, 192)


def test_region_outside_the_slide_is_white(slides):
    slide = open_slide(slides["aperio"])
    pixels = np.asarray(slide.read_region((1950, 1450), 0, (200, 200)))
    assert pixels.shape == (200, 200, 3) and (pixels[150:, :] == 255).all() and (pixels[:, 150:] == 255).all()
    plain = open_slide(slides["png"])
    pixels = np.asarray(plain.read_region((-50, -50), 0, (100, 100)))
    assert (pixels[:50] == 255).all()


def test_generic_tiff_takes_mpp_from_resolution_tags(slides):
    slide = open_slide(slides["generic"])
    assert slide.vendor == "generic-tiff" and slide.mpp == pytest.approx(0.5) and slide.objective_power is None
    assert (
        magnification_from_mpp(0.5) == 20
        and magnification_from_mpp(0.243) == 40
        and magnification_from_mpp(0.226) == 40
    )
    assert magnification_from_mpp(100.0) is None
    grid = patch_grid(slide, magnification=10, patch_size=64)  # 20x derived from 0.5 µm/px
    assert grid.base_magnification == 20 and grid.downsample == 2 and grid.mpp == pytest.approx(1.0)


def test_plain_image_fallback_and_unknown_resolution(slides):
    slide = open_slide(slides["png"])
    assert slide.backend == "image" and slide.level_count == 1 and slide.mpp is None and slide.objective_power is None
    with pytest.raises(InvalidInputError, match="base_magnification"):
        patch_grid(slide, magnification=20)
    with pytest.raises(InvalidInputError, match="base_mpp"):
        patch_grid(slide, mpp=0.5)
    grid = patch_grid(slide, magnification=20, base_magnification=40, patch_size=112)
    assert grid.level == 0 and grid.read_size == 224
    assert open_slide(slides["png"], mpp=0.25).mpp == 0.25  # metadata override


def test_corrupt_and_missing_slides_name_the_file(tmp_path, slides):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(DatasetFormatError, match="broken.svs"):
        open_slide(bad)
    with pytest.raises(DatasetFormatError, match="nowhere.tif"):
        open_slide(tmp_path / "nowhere.tif")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(slides["aperio"].read_bytes()[:60000])
    with pytest.raises(DatasetFormatError, match="truncated.tif"):
        open_slide(truncated)
    # intact directory, damaged tile: OpenSlide opens it and the read names the file and the region
    import tifffile

    data = bytearray(slides["aperio"].read_bytes())
    with tifffile.TiffFile(slides["aperio"]) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data[offset + 8 : offset + count - 8] = bytes(count - 16)
    (tmp_path / "damaged.svs").write_bytes(bytes(data))
    slide = open_slide(tmp_path / "damaged.svs")
    with pytest.raises(DatasetFormatError, match=r"damaged.svs: cannot read the region at \(0, 0\)"):
        slide.read_region((0, 0), 0, (256, 256))


def test_missing_openslide_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "attnzoo\[wsi\]"'):
        wsi.import_wsi_dependency("openslide")


def test_slides_survive_pickling(slides):
    import pickle

    slide = open_slide(slides["aperio"], mpp=0.3)
    copy = pickle.loads(pickle.dumps(slide))
    assert copy.mpp == 0.3 and copy.dimensions == slide.dimensions
    assert np.array_equal(
        np.asarray(copy.read_region((500, 400), 0, (32, 32))), np.asarray(slide.read_region((500, 400), 0, (32, 32)))
    )


# ------------------------------------------------------------------------------------- tissue + grid


def test_tissue_mask_matches_the_blobs(slides):
    mask = segment_tissue(open_slide(slides["aperio"]), **SEG)
    assert mask.level == 2 and mask.shape == (96, 128) and mask.downsample == (16.0, 16.0)
    truth = tissue_truth()[8::16, 8::16]
    assert (mask.mask == truth).mean() > 0.97
    assert mask.mask[500 // 16, 600 // 16] and not mask.mask[0, 0]
    # CLAM's default minimum region (100 reference patches of 512^2 px) is larger than this whole slide
    assert not segment_tissue(open_slide(slides["aperio"])).any()


def test_slide_without_tissue(slides):
    mask = segment_tissue(open_slide(slides["blank"]), **SEG)
    assert not mask.any() and mask.fraction == 0


def test_grid_at_20x_covers_tissue(slides):
    slide = open_slide(slides["aperio"])
    mask = segment_tissue(slide, **SEG)
    grid = patch_grid(slide, mask, magnification=20, patch_size=112)
    assert (grid.level, grid.read_size, grid.size_level0, grid.downsample) == (0, 224, 224, 2.0)
    acmil = patch_grid(slide, mask, magnification=20, patch_size=256)  # ACMIL/CLAM: 512 px at level 0 of a 40x slide
    assert (acmil.level, acmil.read_size) == (0, 512)
    assert grid.mpp == pytest.approx(0.5) and grid.magnification == 20
    assert len(grid) >= 8 and (grid.coords % 224 == 0).all()
    truth = tissue_truth()
    covered = [truth[y : y + 224, x : x + 224].mean() for x, y in grid.coords]
    assert min(covered) > 0.4 and np.all(grid.tissue >= 0.5)
    assert np.array_equal(grid.coords, grid.coords[np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))])  # row-major
    everything = patch_grid(slide, magnification=20, patch_size=112)  # no mask: the whole padded grid
    assert len(everything) == 10 * 7
    overlapping = patch_grid(slide, mask, magnification=20, patch_size=112, stride=56)
    assert len(overlapping) > 3 * len(grid) and overlapping.stride_level0 == 112


def test_grid_at_an_mpp_reads_a_coarser_level(slides):
    slide = open_slide(slides["aperio"])
    mask = segment_tissue(slide, **SEG)
    grid = patch_grid(slide, mask, mpp=1.0, patch_size=112)  # 4x coarser than the 0.25 µm/px scan = level 1
    assert (grid.level, grid.read_size, grid.size_level0, grid.magnification) == (1, 112, 448, 10)
    grid = patch_grid(slide, mask, mpp=0.75, patch_size=100)  # 3x: read 300 level-0 px from level 0
    assert (grid.level, grid.read_size) == (0, 300)


def test_read_level_auto_uses_a_2x_level_and_base_reads_level_0(tmp_path):
    """A Camelyon16-like pyramid (levels at 2x steps): 20x of a 40x scan is level 1 under "auto",
    level 0 resized under "base" (CLAM's and ACMIL's reading)."""
    image = slide_image()
    path = write_slide(tmp_path / "camelyon_like.tif", image, downsamples=(2, 4))
    slide = open_slide(path)
    mask = segment_tissue(slide, **SEG)
    auto = patch_grid(slide, mask, magnification=20, patch_size=112)
    base = patch_grid(slide, mask, magnification=20, patch_size=112, read_level="base")
    assert (auto.level, auto.read_size) == (1, 112) and (base.level, base.read_size) == (0, 224)
    assert np.array_equal(auto.coords, base.coords) and auto.attrs()["patch_level"] == 1
    x, y = (int(v) for v in auto.coords[0])
    level1 = image[::2, ::2]  # write_slide's level 1 is every other pixel of level 0
    got = np.asarray(PatchDataset(slide, auto).read(0))
    assert np.array_equal(got, level1[y // 2 : y // 2 + 112, x // 2 : x // 2 + 112])
    want = Image.fromarray(image[y : y + 224, x : x + 224]).resize((112, 112), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(PatchDataset(slide, base).read(0)), np.asarray(want))
    with pytest.raises(InvalidInputError, match="read_level"):
        patch_grid(slide, magnification=20, read_level=1)


def test_grid_refuses_bad_requests(slides):
    slide = open_slide(slides["aperio"])
    with pytest.raises(InvalidInputError, match="upsampled"):
        patch_grid(slide, magnification=80)
    with pytest.raises(InvalidInputError, match="exactly one"):
        patch_grid(slide, magnification=20, mpp=0.5)
    with pytest.raises(InvalidInputError, match="exactly one"):
        patch_grid(slide)
    with pytest.raises(InvalidInputError, match="min_tissue"):
        patch_grid(slide, magnification=20, min_tissue=1.5)
    other = segment_tissue(open_slide(slides["png"]), **SEG)
    with pytest.raises(InvalidInputError, match="another slide"):
        patch_grid(slide, other, magnification=20)


def test_a_grid_too_fine_for_the_slide_is_refused_before_it_is_laid(slides):
    """patch_size=1 at 20x on a 200000x100000 scan would lay 5e9 positions (80 GB of coordinates): refused
    from the slide's size, with the settings and the usual ones named, before any array is made."""
    slide = open_slide(slides["aperio"])
    slide.level_dimensions = ((200_000, 100_000), *slide.level_dimensions[1:])  # a large 40x scan
    with pytest.raises(InvalidOptionError, match=r"5,000,000,000 patch positions .* 16,777,216 .*usual: 256 px"):
        patch_grid(slide, magnification=20, patch_size=1)
    with pytest.raises(InvalidOptionError, match=r"stride=2 .*--stride"):
        patch_grid(slide, magnification=20, patch_size=256, stride=2)
    assert len(patch_grid(slide, magnification=20, patch_size=256)) == 391 * 196  # CLAM's grid: far below


def test_a_patch_larger_than_one_read_is_refused_from_the_grid(slides):
    slide = open_slide(slides["aperio"])  # 40x: a patch at 20x is read as twice its side from level 0
    side = wsi.max_patch_side()
    with pytest.raises(InvalidOptionError, match=rf"read as {2 * side}x{2 * side} px .*one read"):
        patch_grid(slide, magnification=20, patch_size=side, read_level="base")


def test_an_absurd_magnification_is_told_in_a_few_digits(slides):
    with pytest.raises(InvalidInputError, match=r"upsampled 2\.5e\+298x;"):  # was 300 digits
        patch_grid(open_slide(slides["aperio"]), magnification=1e300)


def test_a_subnormal_base_magnification_is_refused_not_divided_by(slides):
    """5e-324x over 20x underflows to a downsample of 0: the message divided by it (found by the WSI fuzz test)."""
    with pytest.raises(InvalidInputError, match=r"upsampled infx;"):
        patch_grid(open_slide(slides["aperio"]), magnification=20, base_magnification=5e-324)


def test_counts_take_whole_numbers_in_range_with_the_shared_wording():
    assert wsi._count(7.0, "mthresh") == 7 and wsi._count(np.int64(3), "close", minimum=0) == 3
    for bad in (0, 2.5, float("nan"), float("inf"), True, "7", 2**31 + 1):
        with pytest.raises(InvalidInputError, match=r"patch_size must be an integer in \[1, 2147483648\]"):
            wsi._count(bad, "patch_size")


# ------------------------------------------------------------------------------------------- patches


def test_a_large_tiff_without_openslide_says_so(tmp_path, monkeypatch):
    import importlib.util

    path = write_slide(tmp_path / "camelyon.tif", aperio=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openslide" else real(name, *a))
    monkeypatch.setattr(wsi, "FALLBACK_MAX_PIXELS", 1000)
    monkeypatch.setattr(wsi, "import_wsi_dependency", lambda module: (_ for _ in ()).throw(ImportError(module)))
    with pytest.raises(DatasetFormatError, match=r"not installed: pip install"):
        open_slide(path)


def test_patch_dataset_resizes_and_normalises(slides):
    slide = open_slide(slides["aperio"])
    grid = patch_grid(slide, segment_tissue(slide, **SEG), mpp=1.0, patch_size=112)
    data = PatchDataset(slide, grid, input_size=56)
    image, index = data[1]
    assert index == 1 and image.shape == (3, 56, 56) and image.dtype == torch.float32
    white = PatchTransform()(Image.new("RGB", (2, 2), (255, 255, 255)))
    assert torch.allclose(white[:, 0, 0], (1 - torch.tensor(wsi.IMAGENET_MEAN)) / torch.tensor(wsi.IMAGENET_STD))


# ----------------------------------------------------------------------------- the in-memory reader's limits


def _striped_tiff(path, array):
    """A striped (not tiled) TIFF: OpenSlide does not open it, so the in-memory reader does."""
    import tifffile

    extra = {"extrasamples": ["unassalpha"]} if array.ndim == 3 and array.shape[-1] == 4 else {}
    tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 else "minisblack", rowsperstrip=8, **extra)
    return path


def test_the_in_memory_reader_counts_bytes_as_well_as_pixels(tmp_path, monkeypatch):
    """A 16-bit RGBA page takes 8 bytes a pixel as stored: refused from its header past 4 bytes a pixel of the limit."""
    monkeypatch.setattr(wsi, "FALLBACK_MAX_PIXELS", 1000)
    rgba16 = _striped_tiff(tmp_path / "deep.tif", np.zeros((30, 30, 4), np.uint16))  # 900 px: under 1000
    with pytest.raises(
        DatasetFormatError, match=r"deep.tif: 30x30 image of 4 samples of 16 bits per pixel would take 7,200 bytes"
    ):
        open_slide(rgba16)
    rgb8 = _striped_tiff(tmp_path / "rgb8.tif", np.zeros((30, 30, 3), np.uint8))  # 2,700 bytes: read
    assert open_slide(rgb8).backend == "image"


def test_16_bit_tiffs_are_scaled_to_8_bits_by_rounding(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (16, 16, 3)).astype(np.uint16)
    slide = open_slide(_striped_tiff(tmp_path / "deep.tif", values))
    assert slide.backend == "image"
    expected = np.array([round(int(v) * 255 / 65535) for v in values.reshape(-1)], np.uint8).reshape(values.shape)
    assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, (16, 16))), expected)


def test_the_slide_pixel_limit_in_the_environment_is_read_when_used(tmp_path, monkeypatch):
    """Parsed at use with a typed error naming it ('100M' was an internal ValueError at import, -1 refused all)."""
    path = tmp_path / "plain.png"
    Image.new("RGB", (40, 40), (200, 100, 50)).save(path)
    for bad in ("100M", "-1", "0"):
        monkeypatch.setenv("ATTNZOO_MAX_SLIDE_PIXELS", bad)
        with pytest.raises(InvalidOptionError, match="the environment variable ATTNZOO_MAX_SLIDE_PIXELS must be"):
            open_slide(path)
    monkeypatch.setenv("ATTNZOO_MAX_SLIDE_PIXELS", "1000")
    with pytest.raises(DatasetFormatError, match="40x40 image is too large to hold in memory"):
        open_slide(path)
    assert wsi.max_patch_side() == 31
    monkeypatch.delenv("ATTNZOO_MAX_SLIDE_PIXELS")
    assert open_slide(path).dimensions == (40, 40) and wsi.max_patch_side() == 2**14  # the default, 2^28 pixels


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
def test_a_fifo_is_refused_not_opened(tmp_path):
    from tests.datasets.special_files import fifo

    with pytest.raises(DatasetFormatError, match=r"slide.tif: is a FIFO \(named pipe\), not a regular file"):
        open_slide(fifo(tmp_path / "slide.tif"))


def test_properties_openslide_lists_but_cannot_look_up_are_left_out():
    """A damaged SVS whose property name is not UTF-8 (found by the WSI fuzz test): OpenSlide lists the name
    decoded with replacements, and looking it up is a KeyError; the slide opens without that property."""
    from attnzoo.datasets.wsi import _readable_properties

    class Listed(dict):
        def __iter__(self):
            return iter([*super().__iter__(), "aperio.\ufffdppMag"])

    assert _readable_properties(Listed({"aperio.MPP": "0.25"})) == {"aperio.MPP": "0.25"}
