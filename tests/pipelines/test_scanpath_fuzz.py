"""Fuzzing every input of the scanpath pipelines (images, captions, targets, boxes, dicts, dataset
records): each call returns a well-formed scanpath or raises InvalidInputError. Anything else (a raw
exception, a NaN fixation, a fixation off the image, an object index that is not a box) fails."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import attnzoo
from attnzoo.datasets.scanpaths import ScanpathRecord, SearchTrial
from attnzoo.errors import InvalidInputError
from attnzoo.pipelines.scanpath import Scanpath
from tests.scanpath_helpers import tiny_oat

FUZZ = settings(
    max_examples=int(os.environ.get("ATTNZOO_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
EMBED = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def neva(one_thread):
    import open_clip

    from attnzoo.multimodal.nevaclip import NevaClip
    from tests.scanpath_helpers import tiny_clip

    clip = tiny_clip(0, image_size=64, embed_dim=EMBED)
    return attnzoo.pipeline(
        "scanpath",
        model=NevaClip(model=clip, tokenizer=open_clip.get_tokenizer("RN50")),
        fixations=2,
        iterations=1,
        progress=False,
    )


@pytest.fixture(scope="module")
def search(one_thread):
    return attnzoo.pipeline("scanpath", model=tiny_oat(), max_len=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real files for path inputs: a picture, a text file, an empty file and a folder."""
    root = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "ok.png")
    (root / "text.png").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")
    (root / "folder").mkdir()
    return root


# -- strategies ----------------------------------------------------------------------------
SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30, float("nan"), float("inf"), float("-inf")])
HUGE = st.sampled_from([1e39, -1e39, 1e-50])  # finite in float64, infinite or zero in the search's float32


def arrays(max_side: int = 40):
    dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.float32, np.float64, np.bool_, np.complex64])
    shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=max_side)
    return dtypes.flatmap(
        lambda dt: hnp.arrays(
            dt,
            shapes,
            elements=(
                hnp.from_dtype(np.dtype(dt), allow_nan=True, allow_infinity=True) if dt != np.complex64 else None
            ),
        )
    )


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "1", "P", "I", "F", "CMYK", "LA", "I;16"]))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    return Image.new(mode, size)


def images(files):
    paths = st.sampled_from(["ok.png", "text.png", "empty.jpg", "folder", "missing.png"]).map(lambda n: files / n)
    return st.one_of(
        pil_images(),
        arrays(),
        arrays().map(lambda a: torch.from_numpy(a.copy())),
        paths,
        paths.map(str),
        st.none(),
        st.integers(),
        st.text(max_size=5).map(lambda t: str(files / "missing" / t)),
    )


captions = st.one_of(
    st.text(max_size=30), st.none(), st.integers(), st.just("word " * 80), st.lists(st.text(max_size=5), max_size=3)
)
targets = st.one_of(
    st.none(),
    hnp.arrays(np.float32, st.integers(0, 40), elements=st.one_of(st.floats(-3, 3, width=32), SPECIAL)),
    hnp.arrays(
        np.float64,
        st.sampled_from([(EMBED,), (1, EMBED), (2, EMBED)]),
        elements=st.one_of(st.floats(-3, 3), SPECIAL, HUGE),
    ),
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.text(max_size=5),
    st.integers(),
    arrays(),
)


def check_scanpath(sp, fixations: int) -> None:
    assert isinstance(sp, Scanpath)
    w, h = sp.image_size
    assert sp.xy.shape == (fixations, 2) and np.isfinite(sp.xy).all()
    assert ((sp.xy >= 0) & (sp.xy <= [w, h])).all()


def call(fn, *args, **kwargs):
    """The result, or None when refused with a typed error."""
    try:
        return fn(*args, **kwargs)
    except InvalidInputError as err:
        assert str(err)  # says something
        return None


# -- NevaClip ------------------------------------------------------------------------------
def check_all(result, fixations: int = 2) -> None:
    for sp in result if isinstance(result, list) else [result]:
        check_scanpath(sp, fixations)


@FUZZ
@given(data=st.data())
def test_nevaclip_images(neva, files, data):
    result = call(neva, data.draw(images(files)), caption="a photo")
    if result is not None:
        check_all(result)


@FUZZ
@given(caption=captions)
def test_nevaclip_captions(neva, files, caption):
    result = call(neva, files / "ok.png", caption=caption)
    if result is not None:
        check_all(result)


@FUZZ
@given(target=targets, caption=st.one_of(st.none(), st.just("a photo")))
def test_nevaclip_targets(neva, files, target, caption):
    result = call(neva, files / "ok.png", target=target, caption=caption)
    if result is not None:
        assert (target is None) != (caption is None)
        check_all(result)


@FUZZ
@given(
    item=st.dictionaries(
        st.sampled_from(["image", "caption", "target", "boxes", "colour"]),
        st.one_of(st.just(None), st.text(max_size=8), st.integers(), arrays(8)),
        max_size=5,
    ),
    picture=st.booleans(),
    caption=st.one_of(st.none(), st.text(min_size=1, max_size=10)),
)
def test_nevaclip_dict_inputs(neva, files, item, picture, caption):
    if picture:
        item["image"] = files / "ok.png"
    kwargs = {"caption": caption} if caption is not None else {}
    result = call(neva, item, **kwargs)
    if result is not None:
        check_scanpath(result, 2)


@FUZZ
@given(
    path=st.sampled_from(["ok.png", "text.png", "missing.png"]),
    caption=st.one_of(st.none(), st.text(max_size=20), st.integers()),
    as_record=st.booleans(),
)
def test_nevaclip_dataset_records(neva, files, path, caption, as_record):
    fields = {"image_path": files / path, "caption": caption}
    record = (
        ScanpathRecord("s", files / path, "u", np.zeros((0, 2)), caption=caption)
        if as_record
        else SimpleNamespace(**fields)
    )
    result = call(neva, record)
    if result is not None:
        assert path == "ok.png" and isinstance(caption, str)
        check_scanpath(result, 2)


@FUZZ
@given(
    image=hnp.arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4]))),
    caption=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=20),
)
def test_valid_nevaclip_inputs_always_give_a_scanpath(neva, image, caption):
    check_scanpath(neva(image, caption=caption), 2)


# -- OAT -----------------------------------------------------------------------------------
def shelf_boxes() -> np.ndarray:
    return np.array([(10 + 45 * c, 8 + 56 * r, 48 + 45 * c, 56 + 56 * r) for r in range(2) for c in range(3)], float)


@pytest.fixture(scope="module")
def shelf_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("shelf") / "shelf.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 150, 3), dtype=np.uint8)).save(path)
    return path


@st.composite
def boxes(draw):
    kind = draw(st.sampled_from(["valid", "perturbed", "random", "other"]))
    if kind == "valid":
        return shelf_boxes()
    if kind == "perturbed":
        b = shelf_boxes().copy()
        b[draw(st.integers(0, 5)), draw(st.integers(0, 3))] = draw(st.one_of(SPECIAL, st.floats(-500, 500)))
        return b
    if kind == "random":
        return draw(arrays(8))
    return draw(
        st.one_of(
            st.text(max_size=5), st.none(), st.integers(), st.lists(st.lists(st.integers(), max_size=5), max_size=7)
        )
    )


search_targets = st.one_of(
    st.integers(0, 5),
    st.integers(-3, 9),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.just(np.int64(2)),
)


def check_search(sp: Scanpath, b: np.ndarray, max_len: int = 3) -> None:
    assert isinstance(sp, Scanpath) and 1 <= len(sp) <= max_len
    assert ((sp.objects >= 0) & (sp.objects < 6)).all() and 0 <= sp.target < 6
    np.testing.assert_allclose(sp.xy, (b[sp.objects, :2] + b[sp.objects, 2:]) / 2)


@FUZZ
@given(
    b=boxes(),
    target=search_targets,
    options=st.fixed_dictionaries(
        {},
        optional={
            "max_len": st.one_of(st.integers(-2, 4), st.floats(allow_nan=True), st.text(max_size=2)),
            "strategy": st.sampled_from(["greedy", "sample", "beam", ""]),
            "num_samples": st.integers(-1, 3),
            "seed": st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=2)),
        },
    ),
)
def test_oat_boxes_targets_and_settings(search, shelf_image, b, target, options):
    if options.get("strategy") != "sample":
        options.pop("num_samples", None)  # greedy decoding takes no num_samples (its own refusal)
    result = call(search, shelf_image, boxes=b, target=target, **options)
    if result is not None:
        for sp in result if isinstance(result, list) else [result]:
            check_search(sp, np.asarray(b, dtype=float), options.get("max_len", 3))


@FUZZ
@given(
    item=st.dictionaries(
        st.sampled_from(["image", "boxes", "target", "caption"]),
        st.one_of(st.none(), st.text(max_size=5), st.integers(-2, 8), arrays(6)),
        max_size=4,
    ),
    complete=st.sampled_from([(), ("image",), ("boxes",), ("image", "boxes"), ("image", "boxes", "target")]),
)
def test_oat_dict_inputs(search, shelf_image, item, complete):
    valid = {"image": shelf_image, "boxes": shelf_boxes(), "target": 4}
    item.update({k: valid[k] for k in complete})
    result = call(search, item)
    if result is not None:
        check_search(result, shelf_boxes())


@FUZZ
@given(b=boxes(), target=search_targets, image=st.sampled_from(["shelf", "missing"]))
def test_oat_search_trial_records(search, shelf_image, b, target, image):
    path = shelf_image if image == "shelf" else Path(shelf_image).with_name("missing.png")
    trial = SearchTrial("s", path, "u", np.zeros((0, 2)), boxes=b, grid=(2, 3), target=target)
    result = call(search, trial)
    if result is not None:
        check_search(result, np.asarray(b, dtype=float))
