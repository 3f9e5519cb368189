"""Whole-slide reading, tissue segmentation, tiling and resumable feature extraction, end to end on
small pyramidal TIFFs that OpenSlide itself opens (tests/wsi_helpers.py)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("openslide")
h5py = pytest.importorskip("h5py")

from attnzoo.datasets import wsi
from attnzoo.datasets.mil_features import read_feature_bags
from attnzoo.datasets.wsi import (
    PatchDataset,
    PatchTransform,
    create_patch_encoder,
    extract_features,
    extract_slides,
    magnification_from_mpp,
    open_slide,
    patch_grid,
    segment_tissue,
)
from attnzoo.errors import DatasetFormatError, InvalidInputError, UnknownNameError
from tests.wsi_helpers import slide_image, tissue_truth, write_slide

SEG = {"a_t": 1, "a_h": 1}  # the synthetic slide is far smaller than CLAM's 100-reference-patch minimum region


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    blank = np.full((768, 1024, 3), 255, np.uint8)
    out = {
        "aperio": write_slide(root / "aperio_slide.svs"),
        "generic": write_slide(root / "generic.tif", aperio=False, mpp=0.5),
        "blank": write_slide(root / "blank.tif", blank, downsamples=(4,)),
    }
    Image.fromarray(slide_image(1024, 768, blobs=((500, 380, 330, 260, (200, 110, 170)),))).save(root / "plain.png")
    out["png"] = root / "plain.png"
    return out


class TinyEncoder(torch.nn.Module):
    """A fast, deterministic stand-in for a patch encoder: [B, 3, H, W] -> [B, 8]."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.calls, self.rows, self.fail_after = 0, 0, fail_after

    def forward(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.rows += x.shape[0]
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def run(slide, out, encoder, **kw):
    kw = {"patch_size": 112, "num_workers": 0, "batch_size": 4, "segment_kwargs": SEG, "progress": False, **kw}
    return extract_features(slide, encoder, out, **kw)


# ----------------------------------------------------------------------------------------- reading


def test_synthetic_slide_opens_with_openslide(slides):
    import openslide

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
    assert magnification_from_mpp(0.5) == 20 and magnification_from_mpp(0.243) == 40 and magnification_from_mpp(0.226) == 40
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
    data[offset + 8:offset + count - 8] = bytes(count - 16)
    (tmp_path / "damaged.svs").write_bytes(bytes(data))
    slide = open_slide(tmp_path / "damaged.svs")
    with pytest.raises(DatasetFormatError, match=r"damaged.svs: cannot read the region at \(0, 0\)"):
        slide.read_region((0, 0), 0, (256, 256))


def test_missing_openslide_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(ImportError, match=r'pip install "attnzoo\[wsi\]"'):
        wsi._require("openslide")


def test_slides_survive_pickling(slides):
    import pickle

    slide = open_slide(slides["aperio"], mpp=0.3)
    copy = pickle.loads(pickle.dumps(slide))
    assert copy.mpp == 0.3 and copy.dimensions == slide.dimensions
    assert np.array_equal(np.asarray(copy.read_region((500, 400), 0, (32, 32))), np.asarray(slide.read_region((500, 400), 0, (32, 32))))


# ------------------------------------------------------------------------------------ tissue + grid


def test_tissue_mask_matches_the_blobs(slides):
    mask = segment_tissue(open_slide(slides["aperio"]), **SEG)
    assert mask.level == 2 and mask.shape == (96, 128) and mask.downsample == (16.0, 16.0)
    truth = tissue_truth()[8::16, 8::16]
    assert (mask.mask == truth).mean() > 0.97
    assert mask.mask[500 // 16, 600 // 16] and not mask.mask[0, 0]
    # CLAM's default minimum region (100 reference patches of 512^2 px) is larger than this whole slide
    assert not segment_tissue(open_slide(slides["aperio"])).any()


def test_slide_without_tissue(slides, tmp_path):
    mask = segment_tissue(open_slide(slides["blank"]), **SEG)
    assert not mask.any() and mask.fraction == 0
    with pytest.raises(InvalidInputError, match="no tissue"):
        run(slides["blank"], tmp_path / "blank.h5", TinyEncoder())
    assert not (tmp_path / "blank.h5").exists()


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
    covered = [truth[y:y + 224, x:x + 224].mean() for x, y in grid.coords]
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
    assert np.array_equal(got, level1[y // 2:y // 2 + 112, x // 2:x // 2 + 112])
    want = Image.fromarray(image[y:y + 224, x:x + 224]).resize((112, 112), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(PatchDataset(slide, base).read(0)), np.asarray(want))
    out = extract_features(path, TinyEncoder(), tmp_path / "base.h5", patch_size=112, read_level="base", num_workers=0,
                           progress=False, segment_kwargs=SEG)
    with h5py.File(out, "r") as f:
        assert f["coords"].attrs["patch_level"] == 0 and f["coords"].attrs["patch_size"] == 224
    with pytest.raises(InvalidInputError, match="other settings"):  # the same file, asked for at another level
        extract_features(path, TinyEncoder(), out, patch_size=112, num_workers=0, progress=False, segment_kwargs=SEG)
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


# ------------------------------------------------------------------------------------- extraction


def test_extract_features_end_to_end(slides, tmp_path):
    out = run(slides["aperio"], tmp_path / "feats" / "aperio_slide.h5", TinyEncoder(), dtype="float16")
    slide = open_slide(slides["aperio"])
    grid = patch_grid(slide, segment_tissue(slide, **SEG), magnification=20, patch_size=112)
    with h5py.File(out, "r") as f:
        feats, coords = f["features"][()], f["coords"][()]
        attrs = dict(f.attrs)
        assert f["coords"].attrs["patch_size"] == 224 and f["coords"].attrs["patch_level"] == 0
    assert feats.dtype == np.float16 and feats.shape == (len(grid), 8)
    assert np.array_equal(coords, grid.coords)
    truth = tissue_truth()
    assert all(truth[y:y + 224, x:x + 224].mean() > 0.4 for x, y in coords)
    assert attrs["magnification"] == 20 and attrs["mpp"] == pytest.approx(0.5) and attrs["patch_size"] == 112
    assert attrs["level"] == 0 and attrs["encoder"] == "TinyEncoder" and attrs["slide_id"] == "aperio_slide"
    assert json.loads(attrs["fingerprint"])["n"] == len(grid)
    # the stored features are the encoder applied to the read, resized, ImageNet-normalised patch
    x, y = coords[3]
    patch = slide.read_region((int(x), int(y)), 0, (224, 224)).resize((112, 112), Image.Resampling.BICUBIC)
    expected = TinyEncoder()(PatchTransform()(patch)[None])[0].detach().numpy()
    assert np.allclose(feats[3], expected, atol=2e-3)
    assert not list(tmp_path.joinpath("feats").glob("*.partial")) and not list(tmp_path.joinpath("feats").glob(".*tmp"))
    bags = read_feature_bags(out)
    assert bags.layout == "attnzoo" and bags["aperio_slide"].features.shape == (len(grid), 8)


def test_interrupted_extraction_leaves_nothing_and_resumes(slides, tmp_path):
    reference = run(slides["aperio"], tmp_path / "ref.h5", TinyEncoder())
    out = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        run(slides["aperio"], out, TinyEncoder(fail_after=2))
    assert not out.exists()  # atomic: no half-written file at the final path
    partial = tmp_path / "resumed.h5.partial"
    assert len(list(partial.glob("rows_*.npy"))) == 2
    encoder = TinyEncoder()
    run(slides["aperio"], out, encoder)
    with h5py.File(reference) as a, h5py.File(out) as b:
        n = len(a["features"])
        assert encoder.rows == n - 8  # only the patches after the two finished batches were computed
        assert np.allclose(a["features"][()], b["features"][()], atol=1e-6)
        assert np.array_equal(a["coords"][()], b["coords"][()])
    assert not partial.exists()
    # a finished file with the same settings is returned as is; other settings are refused
    again = TinyEncoder()
    run(slides["aperio"], out, again)
    assert again.calls == 0
    with pytest.raises(InvalidInputError, match="overwrite"):
        run(slides["aperio"], out, TinyEncoder(), patch_size=96)
    run(slides["aperio"], out, TinyEncoder(), patch_size=96, overwrite=True)
    with h5py.File(out) as f:
        assert f.attrs["patch_size"] == 96


def test_changed_settings_restart_a_partial_run(slides, tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(KeyboardInterrupt):
        run(slides["aperio"], out, TinyEncoder(fail_after=1))
    encoder = TinyEncoder()
    with pytest.warns(UserWarning, match="starting over"):
        run(slides["aperio"], out, encoder, min_tissue=0.25)
    with h5py.File(out) as f:
        assert encoder.rows == len(f["features"])


def test_workers_read_patches_in_parallel(slides, tmp_path):
    serial = run(slides["aperio"], tmp_path / "a.h5", TinyEncoder(), batch_size=8)
    parallel = run(slides["aperio"], tmp_path / "b.h5", TinyEncoder(), batch_size=8, num_workers=1)
    with h5py.File(serial) as a, h5py.File(parallel) as b:
        assert np.array_equal(a["features"][()], b["features"][()])


def test_resnet18_random_weights_at_an_mpp(slides, tmp_path):
    torch.manual_seed(0)
    out = run(slides["generic"], tmp_path / "g.h5", "resnet18", weights="none", mpp=2.0, patch_size=64)
    with h5py.File(out) as f:
        assert f["features"].shape[1] == 512 and f.attrs["encoder"] == "resnet18"
        assert f.attrs["mpp"] == 2.0 and f.attrs["level"] == 1 and f.attrs["read_size"] == 64
        assert np.isfinite(f["features"][()]).all()


def test_extract_slides_skips_failures_and_reuses_results(slides, tmp_path):
    paths = [slides["aperio"], slides["blank"]]
    with pytest.warns(UserWarning, match="blank"):
        done = extract_slides(paths, TinyEncoder(), tmp_path, skip_errors=True, patch_size=112, num_workers=0,
                              segment_kwargs=SEG, progress=False)
    assert list(done) == ["aperio_slide"] and done["aperio_slide"] == tmp_path / "aperio_slide.h5"
    bags = read_feature_bags(tmp_path)
    assert list(bags) == ["aperio_slide"] and bags.layout == "attnzoo"
    with pytest.raises(InvalidInputError, match="no tissue"):
        extract_slides(paths, TinyEncoder(), tmp_path, patch_size=112, num_workers=0, segment_kwargs=SEG, progress=False)
    again = TinyEncoder()
    extract_slides(paths[:1], again, tmp_path, patch_size=112, num_workers=0, segment_kwargs=SEG, progress=False)
    assert again.calls == 0  # the finished slide is reused, not recomputed


def _function_transform():
    """A new function object each call (another memory address, as in another process), same code."""
    normalise = PatchTransform()

    def transform(image):
        return normalise(image)

    return transform


def test_a_function_transform_still_resumes_and_reuses(slides, tmp_path):
    out = tmp_path / "f.h5"
    with pytest.raises(KeyboardInterrupt):
        run(slides["aperio"], out, TinyEncoder(fail_after=1), transform=_function_transform())
    resumed = TinyEncoder()
    run(slides["aperio"], out, resumed, transform=_function_transform())
    total = len(read_feature_bags(out)["aperio_slide"].features)
    assert 0 < resumed.rows < total  # the finished batch was kept, not started over
    reused = TinyEncoder()
    run(slides["aperio"], out, reused, transform=_function_transform())
    assert reused.calls == 0


class _Exploding(TinyEncoder):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        out = super().forward(x)
        return out + self.value if self.calls > 1 else out


def test_non_finite_features_never_reach_the_file(slides, tmp_path):
    out = tmp_path / "nan.h5"
    with pytest.raises(InvalidInputError, match="non-finite features"):
        run(slides["aperio"], out, _Exploding(float("nan")))
    assert not out.exists()
    with pytest.raises(InvalidInputError, match="float16's range"):
        run(slides["aperio"], tmp_path / "big.h5", _Exploding(1e6), dtype="float16")


def test_a_large_tiff_without_openslide_says_so(tmp_path, monkeypatch):
    import importlib.util

    path = write_slide(tmp_path / "camelyon.tif", aperio=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openslide" else real(name, *a))
    monkeypatch.setattr(wsi, "FALLBACK_MAX_PIXELS", 1000)
    monkeypatch.setattr(wsi, "_require", lambda module: (_ for _ in ()).throw(ImportError(module)))
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


def test_named_encoders(monkeypatch):
    torch.manual_seed(0)
    trunc = create_patch_encoder("resnet50_trunc", weights="none")
    assert trunc(torch.zeros(1, 3, 64, 64)).shape == (1, 1024)
    vit = create_patch_encoder("test_vit", weights="none")
    assert vit(torch.zeros(1, 3, 160, 160)).shape == (1, vit.num_features)
    with pytest.raises(UnknownNameError):
        create_patch_encoder("no_such_encoder", weights="none")


def test_weights_from_a_classification_checkpoint(tmp_path):
    """A checkpoint with the classifier head (torchvision-style fc) loads, then the head is dropped."""
    import timm

    torch.manual_seed(0)
    full = timm.create_model("test_resnet", num_classes=10)
    torch.save(full.state_dict(), tmp_path / "ckpt.pth")
    encoder = create_patch_encoder("test_resnet", weights=tmp_path / "ckpt.pth")
    full.reset_classifier(0)
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(encoder(x), full.eval()(x), atol=1e-5)


def test_default_weights_are_the_official_imagenet_ones(monkeypatch):
    """No download here: check which checkpoint each named encoder asks for by default."""
    import attnzoo.factory

    calls = []

    def fake_create_model(name, pretrained=False, weights=None, **kwargs):
        calls.append((name, pretrained, weights, kwargs.get("num_classes")))
        return torch.nn.Identity()

    monkeypatch.setattr(attnzoo.factory, "create_model", fake_create_model)
    monkeypatch.setattr(wsi, "_truncate_resnet50", lambda model: model)
    create_patch_encoder("resnet18")
    create_patch_encoder("resnet50_trunc")
    create_patch_encoder("vit_small_patch16_224", weights="dino_vit_small_patch16_ep200.torch")
    assert calls == [("resnet18.tv_in1k", True, None, 0), ("resnet50.tv_in1k", True, None, None),
                     ("vit_small_patch16_224", False, "dino_vit_small_patch16_ep200.torch", 0)]


def test_amp_features_stay_close(slides, tmp_path):
    exact = run(slides["aperio"], tmp_path / "fp32.h5", TinyEncoder())
    mixed = run(slides["aperio"], tmp_path / "amp.h5", TinyEncoder(), amp=True)
    with h5py.File(exact) as a, h5py.File(mixed) as b:
        assert b["features"].dtype == np.float32 and json.loads(b.attrs["fingerprint"])["amp"] is True
        assert np.allclose(a["features"][()], b["features"][()], atol=0.05)
