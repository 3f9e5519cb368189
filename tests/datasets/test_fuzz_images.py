"""Fuzz the image, voxel and classification readers: damaged files, odd arrays and random JSON must
give a well-formed result or a typed error naming the input -- never a raw exception."""

from __future__ import annotations

import io
import json
import tarfile
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from attnzoo.datasets.binvox import encode_binvox, read_binvox
from attnzoo.datasets.image_folder import read_image_folder
from attnzoo.datasets.imagenet import imagenet_synsets, read_imagenet
from attnzoo.datasets.images import load_image
from attnzoo.datasets.shapenet import N_RENDERINGS, ShapeNetDataset, read_rendering, read_shapenet_split
from attnzoo.errors import DatasetFormatError
from tests.datasets.fuzzing import FUZZ, damaged, deeply_nested, mutated_json, read_or_refuse, scratch
from tests.datasets.test_imagenet import devkit_meta


def _rotated() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # an EXIF orientation, so damage can hit the EXIF block too
    return exif


def _encoded(fmt: str, mode: str = "RGB", size=(12, 9), **kwargs) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


VALID_IMAGES = {
    "png": _encoded("PNG", "RGBA"),
    "jpg": _encoded("JPEG", "RGB", exif=_rotated()),
    "gif": _encoded("GIF", "P"),
    "tif": _encoded("TIFF", "RGB", compression="tiff_deflate"),
    "bmp": _encoded("BMP", "RGB"),
    "webp": _encoded("WEBP", "RGB"),
    "ppm": _encoded("PPM", "L"),
}


@FUZZ
@given(fmt=st.sampled_from(sorted(VALID_IMAGES)), data=st.data())
def test_load_image_on_damaged_files(fmt, data):
    content = data.draw(damaged(VALID_IMAGES[fmt]))
    limit = data.draw(st.sampled_from([None, 50, 10**6]))
    with scratch() as folder:
        path = folder / f"image.{fmt}"
        path.write_bytes(content)
        image = read_or_refuse(lambda: load_image(path, max_pixels=limit), path)
    if image is not None:
        assert image.mode == "RGB" and image.width * image.height <= (limit or 10**9)
        assert np.asarray(image).shape == (image.height, image.width, 3)


@FUZZ
@given(
    width=st.integers(1, 65535),
    height=st.integers(1, 65535),
    fmt=st.sampled_from(["jpg", "png"]),
)
def test_headers_claiming_any_size_are_checked_before_decoding(width, height, fmt):
    data = bytearray(VALID_IMAGES[fmt])
    if fmt == "jpg":
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    else:  # PNG: IHDR right after the signature (the CRC no longer matches: that is damage too)
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    with scratch() as folder:
        path = folder / f"claim.{fmt}"
        path.write_bytes(bytes(data))
        image = read_or_refuse(lambda: load_image(path, max_pixels=4096), path)
    if image is not None:
        assert image.width * image.height <= 4096


_DTYPES = st.sampled_from(
    [np.uint8, np.uint16, np.int8, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64]
)


@FUZZ
@given(array=hnp.arrays(_DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_load_image_on_any_array_or_tensor(array):
    for source in (array, torch.from_numpy(array) if array.dtype != np.uint16 else None):
        if source is None:
            continue
        image = read_or_refuse(partial(load_image, source), "<")
        if image is not None:
            assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


def _binvox_file() -> bytes:
    grid = np.random.default_rng(1).random((4, 3, 5)) > 0.5
    return encode_binvox(grid, translate=(0.1, 0.2, 0.3), scale=0.5)


@FUZZ
@given(data=st.data())
def test_read_binvox_on_damaged_files(data):
    content = data.draw(st.one_of(damaged(_binvox_file()), st.binary(max_size=64).map(lambda b: b"#binvox 1\n" + b)))
    with scratch() as folder:
        path = folder / "model.binvox"
        path.write_bytes(content)
        model = read_or_refuse(lambda: read_binvox(path), path)
    if model is not None:
        assert model.voxels.dtype == np.bool_ and model.voxels.size == np.prod(model.dims)
        assert np.isfinite(model.translate).all() and np.isfinite(model.scale)


SPLIT = [
    {
        "taxonomy_id": "02691156",
        "taxonomy_name": "aeroplane",
        "baseline": {"1-view": 0.5},
        "train": ["a1"],
        "val": [],
        "test": ["a1", "a2"],
    }
]


@FUZZ
@given(doc=mutated_json(SPLIT), raw=st.booleans(), data=st.data())
def test_read_shapenet_split_on_any_json(doc, raw, data):
    text = json.dumps(doc) if not raw else data.draw(damaged(json.dumps(SPLIT).encode())).decode("latin-1")
    with scratch() as folder:
        path = folder / "ShapeNet.json"
        path.write_bytes(text.encode("latin-1") if raw else text.encode())
        taxonomies = read_or_refuse(lambda: read_shapenet_split(path), path)
    for taxonomy in taxonomies or []:
        assert isinstance(taxonomy.taxonomy_id, str) and isinstance(taxonomy.taxonomy_name, str)
        assert all(isinstance(m, str) and m for s in ("train", "val", "test") for m in taxonomy.models(s))


@pytest.mark.parametrize("text", [deeply_nested(), b"\xff\xfe[\x00]\x00", '[{"taxonomy_id": NaN}]'])
def test_split_files_that_crash_parsers_name_the_file(tmp_path, text):
    path = tmp_path / "ShapeNet.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DatasetFormatError, match="ShapeNet.json"):
        read_shapenet_split(path)


def test_a_rendering_claiming_a_huge_size_is_refused_from_its_header(tmp_path):
    from tests.helpers import png_header_only

    path = png_header_only(tmp_path / "00.png", 60000, 60000)
    with pytest.raises(DatasetFormatError, match=r"00.png: 60000x60000 image exceeds"):
        read_rendering(path)


@FUZZ
@given(data=st.data())
def test_shapenet_items_with_damaged_rendering_or_voxels(data):
    rendering = data.draw(st.one_of(st.just(VALID_IMAGES["png"]), damaged(VALID_IMAGES["png"])))
    voxels = data.draw(st.one_of(st.just(_binvox_file()), damaged(_binvox_file())))
    with scratch() as root:
        (root / "R" / "t" / "m" / "rendering").mkdir(parents=True)
        for view in range(N_RENDERINGS):
            (root / "R" / "t" / "m" / "rendering" / f"{view:02d}.png").write_bytes(VALID_IMAGES["png"])
        (root / "R" / "t" / "m" / "rendering" / "00.png").write_bytes(rendering)
        (root / "V" / "t" / "m").mkdir(parents=True)
        (root / "V" / "t" / "m" / "model.binvox").write_bytes(voxels)
        split = [{"taxonomy_id": "t", "taxonomy_name": "thing", "train": [], "val": [], "test": ["m"]}]
        (root / "ShapeNet.json").write_text(json.dumps(split))
        dataset = ShapeNetDataset(root / "R", root / "V", root / "ShapeNet.json", n_views=1)
        item = read_or_refuse(lambda: dataset[0], "00.png", "model.binvox")
    if item is not None:
        view = item["views"][0]
        assert view.dtype == np.uint8 and view.ndim == 3 and view.shape[2] == 4
        assert item["voxels"].dtype == np.float32 and item["voxels"].ndim == 3


# ---- ImageNet ----------------------------------------------------------------------------------------
META, _ = devkit_meta()


def _flat_val(root, truth_lines: bytes, meta: bytes, packed: bool) -> None:
    for k in (1, 2):
        (root / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(VALID_IMAGES["jpg"])
    files = {"data/ILSVRC2012_validation_ground_truth.txt": truth_lines, "data/meta.mat": meta}
    if packed:
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            for name, body in files.items():
                info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    else:
        for name, body in files.items():
            (root / "ILSVRC2012_devkit_t12" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "ILSVRC2012_devkit_t12" / name).write_bytes(body)


@FUZZ
@given(part=st.sampled_from(["meta", "truth", "tarball"]), data=st.data())
def test_imagenet_devkit_damaged(part, data):
    meta = data.draw(damaged(META)) if part == "meta" else META
    truth = data.draw(damaged(b"1\n2\n")) if part == "truth" else b"1\n2\n"
    with scratch() as root:
        _flat_val(root, truth, meta, packed=part == "tarball")
        if part == "tarball":
            archive = root / "ILSVRC2012_devkit_t12.tar.gz"
            archive.write_bytes(data.draw(damaged(archive.read_bytes())))
        samples = read_or_refuse(lambda: read_imagenet(root), "ILSVRC2012_devkit_t12")
    if samples is not None:
        assert len(samples) == 2 and all(0 <= t < 1000 for t in samples.targets)


def test_a_meta_mat_that_is_not_a_mat_file_names_the_file(tmp_path):
    _flat_val(tmp_path, b"1\n2\n", b"<html>not a MATLAB file</html>", packed=False)
    with pytest.raises(DatasetFormatError, match=r"ILSVRC2012_devkit_t12 \(data/meta.mat\)"):
        read_imagenet(tmp_path)


@FUZZ
@given(data=st.data())
def test_imagenet_kaggle_solution_damaged(data):
    wnid = imagenet_synsets()[0][3]
    valid = f"ImageId,PredictionString\nILSVRC2012_val_00000001,{wnid} 1 2 3 4\nILSVRC2012_val_00000002,{wnid}\n"
    content = data.draw(damaged(valid.encode()))
    with scratch() as root:
        _flat_val(root, b"", b"", packed=False)
        (root / "LOC_val_solution.csv").write_bytes(content)
        samples = read_or_refuse(lambda: read_imagenet(root, labels=root / "LOC_val_solution.csv"), "LOC_val_solution")
    if samples is not None:
        assert len(samples) == 2 and all(0 <= t < 1000 for t in samples.targets)


@FUZZ
@given(
    names=st.lists(
        st.text(st.characters(blacklist_characters="/\\\x00", blacklist_categories=("Cs",)), min_size=1, max_size=8),
        max_size=4,
        unique=True,
    ),
    data=st.data(),
)
def test_image_folder_with_odd_class_names_and_files(names, data):
    with scratch() as root:
        written = []
        for name in names:
            if name in (".", ".."):
                continue
            try:
                (root / name).mkdir()
            except OSError:  # a name the file system refuses (too long in bytes, ...)
                continue
            content = data.draw(st.one_of(st.just(VALID_IMAGES["png"]), damaged(VALID_IMAGES["png"])))
            (root / name / "x.png").write_bytes(content)
            written.append(name)
        samples = read_or_refuse(lambda: read_image_folder(root), root)
    if samples is not None:
        assert samples.classes == sorted(c for c in written if not c.startswith("."))
        assert all(0 <= t < len(samples.classes) for t in samples.targets)
