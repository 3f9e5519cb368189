"""Resumable patch feature extraction (attnzoo.pipelines.wsi_features), end to end on small pyramidal
TIFFs that OpenSlide itself opens (tests/wsi_helpers.py)."""

import json
import os
import re

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attnzoo.datasets.mil_features import read_feature_bags
from attnzoo.datasets.wsi import PatchTransform, open_slide, patch_grid, segment_tissue
from attnzoo.errors import InvalidInputError, InvalidOptionError, UnknownNameError
from attnzoo.pipelines import wsi_features
from attnzoo.pipelines.wsi_features import check_segment_kwargs, create_patch_encoder, extract_features, extract_slides
from tests.datasets.fuzzing import FUZZ, odd_numbers
from tests.wsi_helpers import SEG, TinyEncoder, slide_image, tissue_truth, write_slide, write_test_slides


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_test_slides(tmp_path_factory.mktemp("slides"))


def run(slide, out, encoder, **kw):
    kw = {"patch_size": 112, "num_workers": 0, "batch_size": 4, "segment_kwargs": SEG, "progress": False, **kw}
    return extract_features(slide, encoder, out, **kw)


# ---------------------------------------------------------------------------------------- extraction


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
    assert all(truth[y : y + 224, x : x + 224].mean() > 0.4 for x, y in coords)
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


def test_slide_without_tissue_is_refused(slides, tmp_path):
    with pytest.raises(InvalidInputError, match="no tissue"):
        run(slides["blank"], tmp_path / "blank.h5", TinyEncoder())
    assert not (tmp_path / "blank.h5").exists()


def test_read_level_base_is_recorded_and_another_level_is_other_settings(tmp_path):
    """CLAM's and ACMIL's reading (level 0, resized) of a Camelyon16-like pyramid with a 2x level."""
    path = write_slide(tmp_path / "camelyon_like.tif", slide_image(), downsamples=(2, 4))
    out = extract_features(
        path,
        TinyEncoder(),
        tmp_path / "base.h5",
        patch_size=112,
        read_level="base",
        num_workers=0,
        progress=False,
        segment_kwargs=SEG,
    )
    with h5py.File(out, "r") as f:
        assert f["coords"].attrs["patch_level"] == 0 and f["coords"].attrs["patch_size"] == 224
    with pytest.raises(InvalidInputError, match="other settings"):  # the same file, asked for at another level
        extract_features(path, TinyEncoder(), out, patch_size=112, num_workers=0, progress=False, segment_kwargs=SEG)


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


def test_overwrite_stale_replaces_only_files_made_otherwise(slides, tmp_path):
    out = run(slides["aperio"], tmp_path / "s.h5", TinyEncoder())
    same = TinyEncoder()
    run(slides["aperio"], out, same, overwrite="stale")
    assert same.calls == 0
    other = TinyEncoder()
    run(slides["aperio"], out, other, patch_size=96, overwrite="stale")  # no "pass overwrite=True"
    with h5py.File(out) as f:
        assert other.rows == len(f["features"]) and f.attrs["patch_size"] == 96
    with pytest.raises(InvalidInputError, match="overwrite must be"):
        run(slides["aperio"], out, TinyEncoder(), overwrite="yes")


def test_bad_arguments_are_typed_errors_before_any_work(slides, tmp_path):
    for bad in (
        {"segment_kwargs": {"a_t": -1}},
        {"segment_kwargs": {"sthresh": "8"}},
        {"segment_kwargs": {"close": 1.5}},
        {"segment_kwargs": {"seg_downsample": 0}},
        {"segment_kwargs": {"level": -1}},
        {"segment_kwargs": {"nope": 1}},
        {"segment_kwargs": "a_t=1"},
        {"patch_size": "big"},
        {"input_size": 0},
        {"stride": "x"},
        {"min_tissue": "half"},
        {"min_tissue": float("nan")},
        {"batch_size": 0},
        {"num_workers": -1},
        {"device": "nonsense"},
        {"transform": 3},
    ):
        with pytest.raises(InvalidInputError):
            run(slides["aperio"], tmp_path / "x.h5", TinyEncoder(), **bad)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize(
    "setting, why",
    [
        ({"input_size": 100_000}, r"input_size must be an integer in \[1, 1792\] \(pixels, at most 16x patch_size 112"),
        ({"patch_size": 100_000}, r"patch_size must be .* read in one piece of at most 16384x16384.*usual: 256 px"),
        ({"patch_size": 1, "input_size": 224}, r"at most 16x patch_size 1\b"),
        ({"stride": 1}, r"stride must be an integer in \[7, .*every pixel in more than 256 patches"),
        ({"batch_size": 10**8}, r"over 2\*\*31 .*use batch_size 14266 or less"),
        ({"input_size": 1792, "batch_size": 1000}, r"use batch_size 222 or less"),
    ],
)
def test_sizes_that_cannot_be_meant_are_refused_with_the_reason(slides, tmp_path, setting, why):
    """--input-size 100000 ran out of memory, patch_size=1 or stride=1 cut billions of patches from a real
    slide; each is refused before the slide is opened, saying why and what is usual."""
    with pytest.raises(InvalidOptionError, match=why):
        run(slides["aperio"], tmp_path / "x.h5", TinyEncoder(), **{"input_size": 224, **setting})
    assert not any(tmp_path.iterdir())


def test_worker_counts_at_the_process_limit_are_refused_as_in_training(slides, tmp_path, monkeypatch):
    """DataLoader forks every worker before the first batch: num_workers=10**6 exhausted the process table."""
    import attnzoo._values

    monkeypatch.setattr(attnzoo._values, "process_limit", lambda: 4)
    assert wsi_features.check_batch(8, 3, 224) == (8, 3)
    with pytest.raises(InvalidOptionError, match=r"^num_workers=4 is more worker processes than this system lets"):
        run(slides["aperio"], tmp_path / "x.h5", TinyEncoder(), num_workers=4)
    assert not any(tmp_path.iterdir())


def test_an_encoder_that_cannot_take_the_input_size_says_which_setting(slides, tmp_path):
    """TinyEncoder's 4x4 convolution on 2x2 inputs raised a bare RuntimeError (an internal error in the CLI)."""
    with pytest.raises(
        InvalidOptionError, match=r"encoder TinyEncoder cannot take a batch of \(4, 3, 2, 2\).*--input-size"
    ):
        run(slides["aperio"], tmp_path / "x.h5", TinyEncoder(), input_size=2)
    with pytest.raises(InvalidInputError, match="amp must be True or False"):
        run(slides["aperio"], tmp_path / "x.h5", TinyEncoder(), amp="no")  # was autocast switched on


def test_no_tissue_advice_names_the_python_keyword_and_the_cli_option(slides, tmp_path):
    with pytest.raises(InvalidInputError) as blank:
        run(slides["blank"], tmp_path / "blank.h5", TinyEncoder())
    assert (
        "lower sthresh (now 8): segment_kwargs={'sthresh': 4} in Python, --segment sthresh=4 on the command line"
        in (str(blank.value))
    )
    with pytest.raises(InvalidInputError) as small:
        run(slides["aperio"], tmp_path / "small.h5", TinyEncoder(), segment_kwargs={})  # CLAM's a_t=100
    advice = re.search(
        r"lower a_t to (\S+) or less: segment_kwargs=\{'a_t': (\S+)\} in Python, --segment a_t=(\S+) on",
        str(small.value),
    )
    assert advice is not None and float(advice[1]) == float(advice[2]) == float(advice[3]) < 100
    assert run(slides["aperio"], tmp_path / "ok.h5", TinyEncoder(), segment_kwargs={"a_t": float(advice[3])}).exists()


def test_progress_bars_over_patches_and_slides(slides, tmp_path, capsys):
    run(slides["aperio"], tmp_path / "quiet.h5", TinyEncoder(), progress=None)  # stderr is no terminal here
    assert capsys.readouterr().err == ""
    extract_slides(
        [slides["aperio"]],
        TinyEncoder(),
        tmp_path / "many",
        patch_size=112,
        num_workers=0,
        segment_kwargs=SEG,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "slides" in err and "patch" in err


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
    stamp = out.stat().st_mtime_ns  # the random encoder is drawn from a fixed seed: a rerun reuses the file
    assert run(slides["generic"], out, "resnet18", weights="none", mpp=2.0, patch_size=64).stat().st_mtime_ns == stamp


def test_extract_slides_skips_failures_and_reuses_results(slides, tmp_path):
    paths = [slides["aperio"], slides["blank"]]
    with pytest.warns(UserWarning, match="blank"):
        done = extract_slides(
            paths,
            TinyEncoder(),
            tmp_path,
            skip_errors=True,
            patch_size=112,
            num_workers=0,
            segment_kwargs=SEG,
            progress=False,
        )
    assert list(done) == ["aperio_slide"] and done["aperio_slide"] == tmp_path / "aperio_slide.h5"
    bags = read_feature_bags(tmp_path)
    assert list(bags) == ["aperio_slide"] and bags.layout == "attnzoo"
    with pytest.raises(InvalidInputError, match="no tissue"):
        extract_slides(
            paths, TinyEncoder(), tmp_path, patch_size=112, num_workers=0, segment_kwargs=SEG, progress=False
        )
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


def test_amp_features_stay_close(slides, tmp_path):
    exact = run(slides["aperio"], tmp_path / "fp32.h5", TinyEncoder())
    mixed = run(slides["aperio"], tmp_path / "amp.h5", TinyEncoder(), amp=True)
    with h5py.File(exact) as a, h5py.File(mixed) as b:
        assert b["features"].dtype == np.float32 and json.loads(b.attrs["fingerprint"])["amp"] is True
        assert np.allclose(a["features"][()], b["features"][()], atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_encoder_in_half_precision_takes_the_patches_in_its_own_dtype(slides, tmp_path, dtype):
    """A bfloat16 or float16 module was given float32 patches and refused with advice to change input_size."""
    exact = run(slides["aperio"], tmp_path / "fp32.h5", TinyEncoder())
    half = run(slides["aperio"], tmp_path / "half.h5", TinyEncoder().to(dtype))
    mixed = run(slides["aperio"], tmp_path / "amp.h5", TinyEncoder().to(dtype), amp=True)
    with h5py.File(exact) as a, h5py.File(half) as b, h5py.File(mixed) as c:
        assert b["features"].dtype == np.float32 and np.isfinite(b["features"][()]).all()
        np.testing.assert_allclose(b["features"][()], a["features"][()], atol=0.05)
        np.testing.assert_allclose(c["features"][()], a["features"][()], atol=0.05)


class _TwoDtypes(torch.nn.Module):
    """A bfloat16 convolution feeding a float32 linear layer: no single input dtype suits it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 4, stride=4).to(torch.bfloat16)
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_an_encoder_mixing_dtypes_is_told_so_not_to_change_input_size(slides, tmp_path):
    with pytest.raises(InvalidOptionError, match=r"two dtypes meet in it .*bfloat16 and float32.*one dtype") as err:
        run(slides["aperio"], tmp_path / "x.h5", _TwoDtypes())
    assert "input_size" not in str(err.value) and not (tmp_path / "x.h5").exists()


def test_a_device_mismatch_is_not_said_as_a_dtype_mismatch():
    """torch's convolution names the input's and the weight's device as their "type": that is no dtype mismatch."""

    class SplitEncoder(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError(
                "Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) should be the same or input "
                "should be a MKLDNN tensor and weight is a dense tensor"
            )

    with pytest.raises(InvalidOptionError, match="input_size") as err:
        wsi_features._encode(SplitEncoder(), "split", torch.zeros(2, 3, 8, 8), 2, False)
    assert "dtypes meet" not in str(err.value)


@pytest.mark.parametrize(
    "spelling, stored",
    [
        ("fp16", "float16"),
        ("half", "float16"),
        (torch.float16, "float16"),
        ("torch.float16", "float16"),
        ("FLOAT16", "float16"),
        ("fp32", "float32"),
        (torch.float32, "float32"),
        ("float32", "float32"),
    ],
)
def test_stored_dtype_takes_the_spellings_every_dtype_setting_takes(spelling, stored):
    """--dtype fp16 (or torch.float16) was refused here while every other --dtype takes it; the same features
    spelled otherwise are the same settings (a file made with "float16" is reused for "fp16")."""
    settings = wsi_features.check_settings(dtype=spelling)
    assert settings.dtype == stored
    assert settings.digest("e", "w") == wsi_features.check_settings(dtype=stored).digest("e", "w")


@pytest.mark.parametrize("bad", ["bf16", torch.bfloat16, "float64", "auto", None, torch.int8, "f16", 16])
def test_stored_dtype_other_than_float32_or_float16_is_refused(bad):
    with pytest.raises(InvalidInputError, match=r"^dtype \(of the stored features\) must be float32 or float16"):
        wsi_features.check_settings(dtype=bad)


def test_extracting_with_dtype_fp16_stores_float16(slides, tmp_path):
    out = run(slides["aperio"], tmp_path / "f.h5", TinyEncoder(), dtype="fp16")
    with h5py.File(out) as f:
        assert f["features"].dtype == np.float16
    assert run(slides["aperio"], out, TinyEncoder(), dtype=torch.float16) == out  # the same settings: reused


# ------------------------------------------------------------------------------------------ encoders


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
    calls = []

    class Stub(torch.nn.Module):  # enough of a timm ResNet to be truncated
        def reset_classifier(self, num_classes, global_pool):
            pass

    def fake_create_model(name, pretrained=False, weights=None, **kwargs):
        calls.append((name, pretrained, weights, kwargs.get("num_classes")))
        return Stub()

    monkeypatch.setattr(wsi_features, "create_model", fake_create_model)
    create_patch_encoder("resnet18")
    create_patch_encoder("resnet50_trunc")
    create_patch_encoder("vit_small_patch16_224", weights="dino_vit_small_patch16_ep200.torch")
    assert calls == [
        ("resnet18.tv_in1k", True, None, 0),
        ("resnet50.tv_in1k", True, None, None),
        ("vit_small_patch16_224", False, "dino_vit_small_patch16_ep200.torch", 0),
    ]


SEGMENT_KEYS = [
    "sthresh",
    "mthresh",
    "close",
    "use_otsu",
    "a_t",
    "a_h",
    "max_n_holes",
    "ref_patch_size",
    "seg_downsample",
    "level",
]


@settings(
    max_examples=int(os.environ.get("ATTNZOO_FUZZ_EXAMPLES", "30")),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    kwargs=st.dictionaries(
        st.sampled_from([*SEGMENT_KEYS, "other"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-3, 300),
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=3),
        ),
        max_size=4,
    )
)
def test_fuzz_segment_kwargs(slides, kwargs):
    """Any segment_kwargs: a tissue mask, or a typed error naming the setting (never a crash deep inside)."""
    try:
        checked = check_segment_kwargs(kwargs)
    except InvalidInputError as err:
        assert "segment_kwargs" in str(err)
        return
    slide = open_slide(slides["aperio"])
    try:
        mask = segment_tissue(slide, **checked)
    except InvalidInputError:
        return
    assert mask.mask.dtype == bool and mask.mask.ndim == 2


@FUZZ
@given(
    key=st.sampled_from(
        ["magnification", "mpp", "base_mpp", "patch_size", "stride", "input_size", "min_tissue", "batch_size", "dtype"]
    ),
    value=odd_numbers(),
)
def test_fuzz_extraction_settings(key, value):
    """Any value of one setting: settings within the bounds an extraction can run with, or a typed error naming it."""
    given = {"magnification": 20, "patch_size": 256, "input_size": 224, "batch_size": 64, key: value}
    batch_size = given.pop("batch_size")
    try:
        checked = wsi_features.check_settings(**given)
        batch_size, _ = wsi_features.check_batch(batch_size, 0, checked.input_size)
    except InvalidInputError as err:
        assert key in str(err), err
        return
    assert 1 <= checked.patch_size <= 16384 and 1 <= checked.input_size <= 16 * checked.patch_size
    assert checked.stride is None or 16 * checked.stride >= checked.patch_size
    assert batch_size * 3 * checked.input_size**2 < 2**31 and 0 <= checked.min_tissue <= 1
