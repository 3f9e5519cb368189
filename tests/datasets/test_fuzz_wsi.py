"""Fuzz the whole-slide readers: damaged slide files (pyramidal TIFF, plain PNG), any tissue mask a
caller may build, any grid or patch request -- a result that keeps its promises, or a typed error."""

from __future__ import annotations

import functools

import numpy as np
import openslide  # noqa: F401  (the wsi extra: a failed install must fail here, not skip)
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from attnzoo.datasets.wsi import PatchDataset, TissueMask, open_slide, patch_grid, segment_tissue
from attnzoo.errors import InvalidInputError
from tests.datasets.fuzzing import FUZZ, damaged, odd_numbers, read_or_refuse, scratch
from tests.wsi_helpers import SEG, slide_image, write_slide


@functools.cache
def small_slide(kind: str) -> bytes:
    """A 256x192 pyramidal TIFF (OpenSlide's aperio) or PNG of one tissue blob, as bytes."""
    from PIL import Image

    image = slide_image(256, 192, blobs=((90, 80, 60, 50, (205, 120, 175)),))
    with scratch() as folder:
        if kind == "svs":
            return write_slide(folder / "s.svs", image, downsamples=(4,), tile=64).read_bytes()
        Image.fromarray(image).save(folder / "s.png")
        return (folder / "s.png").read_bytes()


def _read_everything(path):
    """What an extraction does with a slide: open, segment, tile, read the first patch."""
    slide = open_slide(path, mpp=0.5, objective_power=20)
    mask = segment_tissue(slide, seg_downsample=4, **SEG)
    grid = patch_grid(slide, mask, magnification=10, patch_size=16, min_tissue=0)
    patches = PatchDataset(slide, grid)
    return slide, mask, grid, (patches[0][0] if len(patches) else None)


@FUZZ
@given(kind=st.sampled_from(["svs", "png"]), data=st.data())
def test_damaged_slides(kind, data):
    content = data.draw(damaged(small_slide(kind)))
    with scratch() as folder:
        path = folder / f"slide.{kind}"
        path.write_bytes(content)
        result = read_or_refuse(lambda: _read_everything(path), path)
    if result is not None:
        slide, mask, grid, patch = result
        assert min(slide.dimensions) >= 1 and mask.mask.dtype == np.bool_ and mask.mask.ndim == 2
        assert grid.coords.dtype == np.int64 and grid.coords.shape[1] == 2
        assert patch is None or (patch.shape == (3, 16, 16) and bool(patch.isfinite().all()))


@FUZZ
@given(
    mask=st.one_of(
        hnp.arrays(st.sampled_from([np.bool_, np.uint8, np.int64, np.float64]), hnp.array_shapes(max_dims=3)),
        st.just([[1, 0], [0, 1]]),
    ),
    downsample=st.one_of(st.tuples(odd_numbers(), odd_numbers()), odd_numbers(), st.just((4.0, 4.0))),
)
@example(mask=[[1, 0], [0, 1]], downsample=(1.0, 5e-324))  # once gave NaN coverage
def test_tissue_masks_built_by_hand(mask, downsample):
    built = read_or_refuse(lambda: TissueMask(mask, downsample), "tissue mask")
    if built is not None:
        assert built.mask.dtype == np.bool_ and built.mask.ndim == 2
        assert all(np.isfinite(built.downsample)) and min(built.downsample) > 0
        coverage = built.coverage(np.array([[0, 0], [8, 8]]), 16)
        assert ((coverage >= 0) & (coverage <= 1)).all()


@FUZZ
@given(
    key=st.sampled_from(["patch_size", "stride", "min_tissue", "magnification", "mpp", "base_magnification"]),
    value=odd_numbers(),
)
@example(key="magnification", value=2.225073858507e-311)  # once ended in OverflowError (downsample inf)
def test_patch_grid_settings(key, value):
    with scratch() as folder:
        (folder / "s.png").write_bytes(small_slide("png"))
        slide = open_slide(folder / "s.png", objective_power=20)
        settings = {"patch_size": 16, "magnification": 10, key: value}
        if key == "mpp":
            settings.pop("magnification")
        grid = read_or_refuse(lambda: patch_grid(slide, **settings), key, "s.png")
    if grid is not None:
        assert grid.coords.dtype == np.int64 and grid.patch_size >= 1 and grid.stride >= 1


@FUZZ
@given(
    key=st.sampled_from(
        ["seg_downsample", "sthresh", "mthresh", "close", "a_t", "a_h", "max_n_holes", "ref_patch_size"]
    ),
    value=odd_numbers(),
)
def test_segment_tissue_settings(key, value):
    with scratch() as folder:
        (folder / "s.png").write_bytes(small_slide("png"))
        slide = open_slide(folder / "s.png")
        mask = read_or_refuse(lambda: segment_tissue(slide, **{"seg_downsample": 4, **SEG, key: value}), key)
    if mask is not None:
        assert mask.mask.dtype == np.bool_ and mask.mask.ndim == 2


@FUZZ
@given(
    coords=st.one_of(
        hnp.arrays(
            st.sampled_from([np.int64, np.float64, np.complex64]), st.tuples(st.integers(0, 3), st.integers(1, 3))
        ),
        st.just([["a", 1]]),
    ),
    location=st.tuples(odd_numbers(), odd_numbers()),
    size=st.tuples(odd_numbers(), odd_numbers()),
)
def test_patch_coords_and_regions(coords, location, size):
    with scratch() as folder:
        (folder / "s.png").write_bytes(small_slide("png"))
        slide = open_slide(folder / "s.png", objective_power=20)
        grid = patch_grid(slide, magnification=10, patch_size=8)
        patches = read_or_refuse(lambda: PatchDataset(slide, grid, coords=coords), "patch coords")
        if patches is not None and len(patches):
            assert patches[0][0].shape == (3, 8, 8)
        region = read_or_refuse(lambda: slide.read_region(location, 0, size), "read_region", "region")
    if region is not None:
        assert region.mode == "RGB" and region.size == tuple(int(v) for v in size)


def test_a_mask_of_nan_downsample_is_refused():
    with pytest.raises(InvalidInputError, match="downsample"):
        TissueMask(np.ones((2, 2), bool), (float("nan"), 1.0))
    # found by the fuzz test below: a subnormal downsample made coverage NaN (coordinates / 5e-324 = inf)
    with pytest.raises(InvalidInputError, match="at least 1e-06"):
        TissueMask(np.eye(2, dtype=bool), (1.0, 5e-324))


def test_patch_coords_beyond_any_slide_are_refused_when_given():
    """Found by the fuzz test above: coordinates past 2^31 were accepted and failed only when read."""
    with scratch() as folder:
        (folder / "s.png").write_bytes(small_slide("png"))
        slide = open_slide(folder / "s.png", objective_power=20)
        grid = patch_grid(slide, magnification=10, patch_size=8)
        with pytest.raises(InvalidInputError, match="patch coords must lie within"):
            PatchDataset(slide, grid, coords=np.array([[2**31 + 1, 0]]))
