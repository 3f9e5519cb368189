"""pipeline("multiview-3d-reconstruction"): the official preprocessing; views in, occupancy out; exports; the ShapeNet
evaluation and view sweep."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.cli import main
from attnzoo.datasets.binvox import read_binvox
from attnzoo.errors import InvalidInputError
from attnzoo.metrics.reconstruction import voxel_iou
from attnzoo.pipelines import multiview_reconstruction as mv
from attnzoo.pipelines.multiview_reconstruction import preprocess_views
from attnzoo.registry import ModelEntry
from attnzoo.vision import lrgt as L
from tests.shapes3d import primitive, renderings, write_shapenet

TINY = dict(
    embed_dim=64,
    depth=2,
    num_heads=2,
    lga_layers=(1,),
    merger_tokens=(49, 49),
    merger_heads=2,
    decoder_heads=2,
    decoder_depth=4,
    decoder_channels=(8, 2, 1),
)


@pytest.fixture(scope="module")
def recon():
    torch.manual_seed(0)
    model = L.LRGT(**TINY, noise_seed=0)
    return attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu")


def test_one_object_and_a_batch(recon):
    views = renderings(primitive("table"), n=3)
    shape = recon(views)
    expected = recon.model(preprocess_views(views)[None])[0]  # the official preprocessing, then the model
    assert shape.probabilities.shape == (32, 32, 32)
    np.testing.assert_allclose(shape.probabilities, expected.detach().numpy(), atol=1e-6)
    assert np.array_equal(shape.voxels, shape.probabilities >= 0.3)
    batch = recon([views, views[:2]], batch_size=1)
    assert len(batch) == 2 and np.allclose(batch[0].probabilities, shape.probabilities, atol=1e-6)
    rgb = recon(views, colour_order="rgb", threshold=0.5)
    assert rgb.threshold == 0.5 and not np.allclose(rgb.probabilities, shape.probabilities)


def test_exports_and_picture(recon, tmp_path):
    shape = recon(renderings(primitive("ball"), n=2))
    shape.probabilities = primitive("ball").astype(np.float32) * 0.9  # a known grid, to check the files
    assert np.array_equal(read_binvox(shape.save(tmp_path / "ball.binvox")).voxels, shape.voxels)
    vertices, faces = shape.to_mesh()
    obj = tmp_path / "ball.obj"
    shape.save(obj)
    lines = obj.read_text().splitlines()
    assert sum(line.startswith("v ") for line in lines) == len(vertices) and sum(
        line.startswith("f ") for line in lines
    ) == len(faces)
    ply = shape.save(tmp_path / "ball.ply").read_text()
    assert f"element vertex {len(vertices)}" in ply and f"element face {len(faces)}" in ply
    assert np.array_equal(np.load(shape.save(tmp_path / "ball.npy")), shape.probabilities)
    picture = shape.plot(title="ball")
    assert picture.size[0] > picture.size[1] and len(np.unique(np.asarray(picture.convert("L")))) > 10
    with pytest.raises(InvalidInputError, match="cannot save"):
        shape.save(tmp_path / "ball.stl")


def test_bad_input(recon, tmp_path):
    with pytest.raises(InvalidInputError, match="non-empty list"):
        recon([])
    views = renderings(primitive("box"), n=2)
    with pytest.raises(InvalidInputError, match="same size"):
        recon([views[0], views[1].resize((100, 100))])
    with pytest.raises(InvalidInputError, match="no such file"):
        recon([str(tmp_path / "missing.png")])
    grey = [v.convert("L") for v in views]  # no alpha: no compositing, grey to three channels
    assert recon(grey).probabilities.shape == (32, 32, 32)


def test_objects_with_other_view_counts_batch_together(recon):
    """Results do not depend on batching: objects are grouped by view count inside a batch, so a mixed batch
    gives what batch_size=1 gives, and with on_error="skip" one bad object costs only its own result."""
    table, ball = renderings(primitive("table"), n=3), renderings(primitive("ball"), n=2)
    objects = [ball, table, ball[::-1]]
    one_by_one = recon(objects, batch_size=1)
    batched = recon(objects, batch_size=3)
    assert [len(r.views) for r in batched] == [2, 3, 2]
    for got, expected in zip(batched, one_by_one):
        np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-6)
    results = list(recon.iterate([table, [], ball], batch_size=3, on_error="skip"))
    assert [i for i, _ in results] == [0, 1, 2] and isinstance(results[1][1], InvalidInputError)
    np.testing.assert_allclose(results[2][1].probabilities, one_by_one[0].probabilities, atol=1e-6)


def test_generators_and_lists_of_view_arrays_are_batches(recon):
    table, ball = renderings(primitive("table"), n=2), renderings(primitive("ball"), n=1)
    expected = recon([table, ball])
    from_generator = recon(views for views in (table, ball))
    assert isinstance(from_generator, list) and len(from_generator) == 2
    stacked = [np.stack([np.asarray(v) for v in views]) for views in (table, ball)]  # [V, H, W, C] each
    tensors = [torch.from_numpy(a).permute(0, 3, 1, 2) for a in stacked]  # [V, C, H, W], as tensors are read
    for got in (from_generator, recon(stacked), recon(tensors)):
        for result, want in zip(got, expected):
            np.testing.assert_allclose(result.probabilities, want.probabilities, atol=1e-6)
    one = recon(stacked[0])  # a 4-D array alone is still one object's views
    np.testing.assert_allclose(one.probabilities, expected[0].probabilities, atol=1e-6)


def test_a_model_built_at_another_size_gets_views_of_that_size():
    """LRGT built with img_size=112 says so in its pretrained_cfg: the pipeline resizes the views to 112, not
    the official 224 (by object, and by name with model_kwargs)."""
    torch.manual_seed(0)
    model = L.LRGT(**TINY, img_size=112, noise_seed=0)
    assert model.pretrained_cfg["input_size"] == (3, 112, 112)
    views = renderings(primitive("table"), n=2)
    shape = attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu")(views)
    with torch.no_grad():
        expected = model(preprocess_views(views, size=112)[None])[0]
    np.testing.assert_allclose(shape.probabilities, expected.numpy(), atol=1e-6)
    by_name = attnzoo.pipeline(
        "multiview-3d-reconstruction",
        model="lrgt",
        weights="none",
        device="cpu",
        model_kwargs={**TINY, "img_size": 112},
    )
    assert by_name(views).probabilities.shape == (32, 32, 32)


def test_threshold_must_be_a_number_in_the_open_unit_interval(recon):
    views = renderings(primitive("box"), n=1)
    for bad in ("0.5", True, float("nan"), 0, 1.0, [0.5]):
        with pytest.raises(InvalidInputError, match="threshold must be a number in"):
            recon(views, threshold=bad)
    for bad in (3, ["bgr"]):
        with pytest.raises(InvalidInputError, match="colour_order"):
            recon(views, colour_order=bad)
    assert recon(views, threshold=np.float32(0.25)).threshold == 0.25


def test_shapenet_evaluation_and_view_sweep(recon, tmp_path, capsys, monkeypatch):
    root = write_shapenet(tmp_path / "shapenet", kinds=("box", "table"), per_kind=(0, 0, 2), n_views=3)
    monkeypatch.setitem(
        attnzoo.registry._MODELS,
        "lrgt_tiny_test",
        ModelEntry("lrgt_tiny_test", lambda **kw: recon.model, "lrgt", ("multiview-3d-reconstruction",)),
    )
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "multiview-3d-reconstruction",
            "--model",
            "lrgt_tiny_test",
            "--weights",
            "none",
            "--data",
            str(root),
            "--views",
            "1,3",
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--batch-size",
            "2",
            "--fscore",
        ]
    )
    assert code == 0, capsys.readouterr().err
    for n in (1, 3):
        metrics = json.loads((out / f"views-{n}" / "metrics.json").read_text())
        ious = []
        for kind, tid in (
            ("box", "01000000"),
            ("table", "02000000"),
        ):  # independently: the pipeline, then IoU by its definition
            pred = recon(
                [
                    str(root / "ShapeNetRendering" / tid / f"{kind}_test_0" / "rendering" / f"{v:02d}.png")
                    for v in range(n)
                ]
            )
            ious += [voxel_iou(pred.probabilities, primitive(kind))] * 2
        overall = np.mean(ious, axis=0)
        assert metrics["n"] == 4 and metrics["n_views"] == n
        assert metrics["iou"] == pytest.approx(overall.max(), abs=1e-4)
        assert [row["n"] for row in metrics["per_class"]] == [2, 2] and "fscore" in metrics
        assert isinstance(metrics["fscore"], float) and metrics["with_fscore"] is True
    report = (out / "report.md").read_text()
    assert "| views | 1 | 3 |" in report and "F-score" in report
    plain = tmp_path / "plain"  # without --fscore: no F-score anywhere (the flag stood in its place)
    args = ["eval", "multiview-3d-reconstruction", "--model", "lrgt_tiny_test", "--weights", "none"]
    capsys.readouterr()
    assert main([*args, "--data", str(root), "--views", "3", "--out", str(plain), "--num-workers", "0"]) == 0
    metrics = json.loads((plain / "metrics.json").read_text())
    assert "fscore" not in metrics and metrics["with_fscore"] is False
    assert "F-score" not in (plain / "report.md").read_text() and "fscore" not in capsys.readouterr().out
    run = json.loads((plain / "run.json").read_text())
    old = {("fscore" if k == "with_fscore" else k): v for k, v in run.items()}  # the release before this one
    (plain / "run.json").write_text(json.dumps(old))
    assert main([*args, "--data", str(root), "--views", "3", "--out", str(plain), "--num-workers", "0"]) == 0
    assert main(["eval", "multiview-3d-reconstruction", "--data", str(root), "--out", str(out), "--views", "0,3"]) == 2
    assert main(["eval", "image-classification", "--data", str(root), "--out", str(out), "--views", "3"]) == 2


# -- preprocessing -------------------------------------------------------------------------


def rendering(seed=0, size=(137, 137)):
    """A ShapeNet-like RGBA rendering: an opaque object, a soft edge, transparent background."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    img[..., 3] = np.where(r < min(h, w) * 0.3, 255, np.where(r < min(h, w) * 0.35, 128, 0))
    return img


def np_bilinear(img, out):
    """Half-pixel-centre bilinear resampling with edge clamping (cv2.INTER_LINEAR), in float64."""

    def axis(n_in):
        s = np.clip((np.arange(out) + 0.5) * n_in / out - 0.5, 0, None)
        i0 = np.minimum(np.floor(s).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), s - i0

    y0, y1, fy = axis(img.shape[0])
    x0, x1, fx = axis(img.shape[1])
    rows = lambda ys: img[ys][:, x0] * (1 - fx)[None, :, None] + img[ys][:, x1] * fx[None, :, None]
    return rows(y0) * (1 - fy)[:, None, None] + rows(y1) * fy[:, None, None]


def np_preprocess(rgba, order="bgr", background=(240, 240, 240), crop=None):
    """Independent reference: crop, resize (alpha too), background where alpha == 0, order, [-1, 1]."""
    img = rgba.astype(np.float64) / 255
    h, w = img.shape[:2]
    c = crop or round(min(h, w) * 128 / 137)
    top, left = (h - c) // 2, (w - c) // 2
    img = np_bilinear(img[top : top + c, left : left + c], 224)
    colour = img[..., :3]
    if img.shape[2] == 4 and background is not None:
        colour = np.where(img[..., 3:] == 0, np.array(background, dtype=np.float64) / 255, colour)
    if order == "bgr":
        colour = colour[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(colour.transpose(2, 0, 1)) * 2 - 1).float()


def test_preprocess_matches_an_independent_computation(tmp_path):
    views = [rendering(i) for i in range(3)]
    x = preprocess_views(views)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    for i, v in enumerate(views):
        torch.testing.assert_close(x[i], np_preprocess(v), atol=1e-6, rtol=0)
    # the centre crop is 128 of 137 (offset 4), alpha 0 -> 240, soft alpha keeps its colour
    bg = np.float32(240 / 255) * 2 - 1
    assert torch.all(x[0, :, 0, 0] == bg) and torch.all(x[0, :, 112, 112] != bg)
    # RGB order is the BGR output flipped; PIL images and paths give the same tensor
    torch.testing.assert_close(preprocess_views(views, colour_order="RGB"), x.flip(1), atol=0, rtol=0)
    Image.fromarray(views[1]).save(tmp_path / "01.png")
    assert torch.equal(preprocess_views([Image.fromarray(views[0]), tmp_path / "01.png", views[2]]), x)
    assert torch.equal(preprocess_views(np.stack(views)), x)
    # another background (given as r, g, b), or none
    other = preprocess_views(views[:1], background=(10, 20, 30))
    torch.testing.assert_close(other[0], np_preprocess(views[0], background=(10, 20, 30)), atol=1e-6, rtol=0)
    assert other[0, 0, 0, 0].item() == pytest.approx(30 / 255 * 2 - 1, abs=1e-6)  # BGR: blue first
    torch.testing.assert_close(
        preprocess_views(views[:1], background=None)[0], np_preprocess(views[0], background=None), atol=1e-6, rtol=0
    )


def test_preprocess_other_sizes_and_modes():
    big = rendering(3, size=(300, 274))  # H 300, W 274: crop 256 px (128/137 of 274), centred
    torch.testing.assert_close(preprocess_views([big])[0], np_preprocess(big, crop=256), atol=1e-6, rtol=0)
    rgb = rendering(4)[..., :3]  # no alpha: no compositing
    torch.testing.assert_close(preprocess_views([rgb])[0], np_preprocess(rgb), atol=1e-6, rtol=0)
    grey = rendering(5)[..., 0]
    x = preprocess_views([Image.fromarray(grey)])
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])
    torch.testing.assert_close(x[0], np_preprocess(np.repeat(grey[..., None], 3, axis=2)), atol=1e-6, rtol=0)
    floats = rendering(6).astype(np.float32) / 255
    torch.testing.assert_close(preprocess_views([floats]), preprocess_views([rendering(6)]), atol=0, rtol=0)
    exact = rendering(7, size=(224, 224))  # crop 210 of 224 then back up to 224
    torch.testing.assert_close(preprocess_views([exact])[0], np_preprocess(exact), atol=1e-6, rtol=0)
    la = rendering(8)[..., [0, 3]]  # grey + alpha: composited like RGBA
    as_rgba = np.concatenate([np.repeat(la[..., :1], 3, axis=2), la[..., 1:]], axis=2)
    assert torch.equal(preprocess_views([Image.fromarray(la)]), preprocess_views([as_rgba]))
    assert torch.equal(
        preprocess_views([rendering(9).astype(np.uint16) * 257]), preprocess_views([rendering(9)])
    )  # 16 bit


def test_preprocess_reproduces_the_official_cv2_loader(tmp_path):
    """utils/data_transforms.py of the official repo: cv2 BGRA / 255, CenterCrop(224, 128), RandomBackground(240), x*2-1."""
    import cv2

    paths = []
    for i in range(2):
        Image.fromarray(rendering(10 + i)).save(tmp_path / f"{i:02d}.png")
        paths.append(tmp_path / f"{i:02d}.png")
    expected = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED).astype(np.float32) / 255.0  # BGRA
        img = cv2.resize(img[4:132, 4:132], (224, 224)).astype(np.float64)
        alpha = (img[:, :, 3:] == 0).astype(np.float32)
        img = alpha * (np.array([[[240, 240, 240]]]) / 255.0) + (1 - alpha) * img[:, :, :3]
        expected.append(torch.from_numpy(img.transpose(2, 0, 1)).float() * 2 - 1)
    ours = preprocess_views(paths)
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-6, rtol=0)


def test_preprocess_bad_inputs():
    view = rendering(0)
    cases = [
        ([], "at least one view"),
        ([view, rendering(1, size=(140, 137))], "same size"),
        ([np.zeros((137, 137, 5), np.uint8)], "channels"),
        ([view.astype(np.float32)], r"\[0, 1\]"),  # floats must be in [0, 1]
        ([np.zeros((137, 137, 3), np.int32)], "pixel type"),
        ([object()], "view 0"),
    ]
    for images, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            preprocess_views(images)
    with pytest.raises(InvalidInputError, match="colour_order"):
        preprocess_views([view], colour_order="hsv")
    for background in (256, (1, 2), "white", (1.5, 2, 3), True):
        with pytest.raises(InvalidInputError, match="background"):
            preprocess_views([view], background=background)
    with pytest.raises(InvalidInputError, match="cannot read"):
        preprocess_views(["/nonexistent/00.png"])


# -- the memory a view takes, and how many an object may have ------------------------------------


def old_preprocess(view, size=224, crop_fraction=128 / 137, background=240):
    """The preprocessing as it was before views were read one at a time: the whole view made float32, its crop
    resized in float64 by the separable cv2 INTER_LINEAR matrices (BGR, background where alpha is 0)."""
    arr = view.astype(np.float32) / np.float32(255)
    h, w = arr.shape[:2]
    side = max(1, int(round(min(h, w) * crop_fraction)))
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.from_numpy(np.ascontiguousarray(arr[top : top + side, left : left + side])).permute(2, 0, 1)
    if side != size:
        m = mv._linear_resize_matrix(side, size)
        x = (m @ x.double() @ m.T).float()
    fill = torch.tensor(mv._background(background), dtype=torch.float32).view(3, 1, 1).expand(3, size, size)
    colour = torch.where(x[3:] == 0, fill, x[:3]).flip(0)
    return (colour * 2 - 1).contiguous()


def test_views_up_to_twice_the_input_side_are_preprocessed_exactly_as_before():
    """ShapeNet's 137 px renderings and anything whose crop is at most twice the model's side: bit for bit."""
    for i, hw in enumerate([(137, 137), (224, 224), (300, 274), (256, 256), (479, 479)]):
        view = rendering(20 + i, size=hw)
        assert torch.equal(preprocess_views([view])[0], old_preprocess(view)), hw
    view = rendering(30, size=(137, 137))
    assert torch.equal(preprocess_views([view], size=64)[0], old_preprocess(view, size=64))


def test_a_large_view_is_resized_from_the_pixels_the_resize_reads():
    """A crop over twice the side: only the (at most 2 per output pixel) source rows and columns are made float;
    the same result as the whole crop in float64 up to rounding, and no float copy of the whole view."""
    import tracemalloc

    view = rendering(31, size=(1000, 1000))  # crop 934 px > 2 x 224
    tracemalloc.start()
    try:
        x = preprocess_views([view])[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    torch.testing.assert_close(x, old_preprocess(view), atol=1e-6, rtol=0)
    torch.testing.assert_close(x, np_preprocess(view), atol=1e-6, rtol=0)
    assert peak < 3 * view.nbytes, peak  # the whole view in float32 alone was 4 x its bytes


def test_views_per_object_are_capped_before_any_is_decoded(recon, tmp_path):
    """4000 views of one object ended in a raw allocator error after decoding all of them."""
    too_many = [tmp_path / f"{i:03d}.png" for i in range(mv.MAX_VIEWS + 1)]  # none exists: nothing is read
    with pytest.raises(InvalidInputError, match=r"000.png: 65 views of one object, more than the 64"):
        recon.preprocess(too_many)
    tiny = np.zeros((16, 16, 4), np.uint8)
    with pytest.raises(InvalidInputError, match="65 views of one object, more than the 64"):
        preprocess_views([tiny] * 65, size=8)
    assert preprocess_views([tiny] * 64, size=8).shape == (64, 3, 8, 8)


def test_running_out_of_memory_while_preprocessing_is_a_typed_error_naming_the_input(recon, monkeypatch):
    view = rendering(0)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(mv, "_process_one", no_memory)
    with pytest.raises(InvalidInputError, match=r"view 0 \(137x137\): not enough memory to preprocess it"):
        preprocess_views([view])
    monkeypatch.undo()

    def allocator_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 9 bytes")

    monkeypatch.setattr(mv, "load_image", allocator_fails)
    with pytest.raises(InvalidInputError, match=r"the object whose first view is .*: its 2 views do not fit in memory"):
        recon.preprocess([view, view])


def test_view_paths_are_read_by_the_project_loader(tmp_path, monkeypatch):
    """Plain Image.open let PIL's DecompressionBombError out raw and knew no pixel limit of ours."""
    from attnzoo.datasets import images

    Image.fromarray(rendering(0)).save(tmp_path / "00.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(InvalidInputError, match=r"view 0: cannot read image: .*00.png: 137x137 image exceeds the 100"):
        preprocess_views([tmp_path / "00.png"])
    if hasattr(os, "mkfifo"):
        from tests.datasets.special_files import fifo

        with pytest.raises(InvalidInputError, match=r"view 0: cannot read image: .*01.png: is a FIFO"):
            preprocess_views([fifo(tmp_path / "01.png")])


def _large_view(kind="table", size=(2000, 1500)):
    """A ShapeNet-like RGBA rendering blown up to ``size`` (W, H): smooth, with a transparent background."""
    return renderings(primitive(kind), n=1)[0].resize(size, Image.Resampling.BILINEAR)


def test_results_keep_each_view_as_a_thumbnail_for_the_picture(recon, tmp_path):
    """A result kept every view at full size for plot(): 64 views each just under the pixel limit took tens of GB.
    It keeps thumbnails of at most THUMBNAIL_SIDE px a side (aspect kept), and the picture looks as it did."""
    from attnzoo.viz.voxels import plot_reconstruction

    big = _large_view()
    big.save(tmp_path / "big.png")
    small = renderings(primitive("ball"), n=1)[0]
    shape = recon([big, tmp_path / "big.png"])  # an image in memory and a file
    assert len(shape.views) == 2 and all(v.mode == "RGBA" for v in shape.views)
    assert all(max(v.size) <= 512 for v in shape.views), [v.size for v in shape.views]  # a few hundred px at most
    side = mv.THUMBNAIL_SIDE
    assert [v.size for v in shape.views] == [(side, round(1500 * side / 2000))] * 2
    with torch.no_grad():  # the model still gets the views at full resolution, preprocessed as before
        expected = recon.model(preprocess_views([big, big])[None])[0]
    np.testing.assert_allclose(shape.probabilities, expected.numpy(), atol=1e-6)
    # the picture drawn from the thumbnails against one drawn from the full views: the same to the eye
    picture = shape.plot(title="t", note="")
    full = plot_reconstruction([big, big], shape.voxels, title="t", note="")
    assert picture.size == full.size
    diff = np.abs(np.asarray(picture, np.int16) - np.asarray(full, np.int16))
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 8, (diff.mean(), np.percentile(diff, 99))
    # a view within the bound is kept as it is (a copy, not the caller's image)
    kept = recon([small]).views[0]
    assert kept is not small and kept.size == small.size and np.array_equal(np.asarray(kept), np.asarray(small))


def test_each_view_is_released_before_the_next_is_decoded(recon, tmp_path, monkeypatch):
    """All views of an object were decoded before any was preprocessed, so the peak memory was the sum of the
    full views; now only one is held at full size at a time."""
    import gc
    import weakref

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        _large_view(size=(600, 450)).save(paths[-1])
    decoded = []  # weak references to the full views load_image returned
    most = []
    real = mv.load_image

    def tracking(source, **kwargs):
        gc.collect()
        most.append(sum(ref() is not None for ref in decoded))  # full views still held when this one is decoded
        image = real(source, **kwargs)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(mv, "load_image", tracking)
    shape = recon(paths)
    assert most == [0, 0, 0], most
    assert len(shape.views) == 3 and all(max(v.size) <= 512 for v in shape.views)


def test_half_precision_view_tensors_are_read_as_their_float32_values(recon):
    """bfloat16 has no numpy dtype: a bf16 (or fp16) CxHxW view tensor is widened, as load_image does, to the
    float32 values it holds; a meta tensor, which holds no data, is refused naming the view."""
    floats = rendering(6).astype(np.float32) / 255
    chw = torch.from_numpy(floats).permute(2, 0, 1)  # tensors are CxHxW, here as in load_image and the pipeline
    for dtype in (torch.bfloat16, torch.float16):
        view = chw.to(dtype)
        expected = preprocess_views([view.float().permute(1, 2, 0).numpy()])
        assert torch.equal(preprocess_views([view]), expected), dtype
    with pytest.raises(InvalidInputError, match="view 1 is a meta tensor: it holds no data"):
        preprocess_views([floats, chw.to("meta")])
    assert np.isfinite(recon([chw.bfloat16()]).probabilities).all()
    with pytest.raises(InvalidInputError, match="meta tensor: it holds no data"):
        recon([chw.to("meta")])


def test_view_tensors_are_channels_first_for_preprocess_views_as_for_load_image_and_the_pipeline(recon):
    """A tensor is C x H x W (an H x W one grey) for preprocess_views, as load_image (the pipeline's reader) reads
    it: the same tensor gives the same view by both paths, and the view of its H x W x C numpy array."""
    from attnzoo.datasets.images import load_image

    rgba = rendering(11)
    chw = torch.from_numpy(rgba).permute(2, 0, 1).contiguous()
    direct = preprocess_views([chw])
    assert direct.shape == (1, 3, 224, 224)
    assert torch.equal(direct, preprocess_views([load_image(chw, keep_alpha=True)]))  # the pipeline's reading
    assert torch.equal(direct, preprocess_views([rgba]))  # numpy arrays stay H x W x C
    expected = recon.model(direct[None])[0].detach().numpy()
    np.testing.assert_allclose(recon([chw]).probabilities, expected, atol=1e-6)
    # one object's views as a [V, C, H, W] tensor, as the pipeline takes it
    two = torch.stack([chw, torch.from_numpy(rendering(12)).permute(2, 0, 1)])
    assert torch.equal(preprocess_views(two), preprocess_views([rgba, rendering(12)]))
    # grey: H x W, or 1 x H x W, as load_image reads them
    grey = torch.from_numpy(rendering(13)[..., 0])
    for tensor in (grey, grey[None]):
        assert torch.equal(preprocess_views([tensor]), preprocess_views([load_image(tensor)])), tuple(tensor.shape)
        assert torch.equal(preprocess_views([tensor]), preprocess_views([grey.numpy()]))
    # a shape that reads either way (3 x 5 x 4: RGB 5x4, or RGBA 3x5) is C x H x W, as load_image reads it
    odd = torch.from_numpy(np.random.default_rng(14).integers(0, 256, (3, 5, 4), dtype=np.uint8))
    assert torch.equal(preprocess_views([odd]), preprocess_views([load_image(odd)]))
    assert torch.equal(preprocess_views([odd]), preprocess_views([odd.permute(1, 2, 0).numpy()]))
    # an H x W x C tensor is refused naming the view and its shape, saying how to pass it
    with pytest.raises(InvalidInputError, match=r"view 0: .*\(137, 137, 4\).*permute\(2, 0, 1\)"):
        preprocess_views([torch.from_numpy(rgba)])


def test_an_overwrite_of_a_view_sweep_removes_its_old_report_before_the_first_run(tmp_path):
    """``--views 1,3 --overwrite`` stopped part way left the earlier sweep's report.md and sweep.json beside new
    runs: they go before the first run starts over (what the CLI removes is the evaluator's summary files)."""
    from attnzoo.cli import _remove_summary
    from attnzoo.evaluation.reconstruction import MultiViewReconstructionEvaluator

    out = tmp_path / "eval"
    (out / "views-1").mkdir(parents=True)
    for name in ("sweep.json", "report.md", "notes.md", "views-1/report.md"):
        (out / name).write_text("earlier")
    _remove_summary(MultiViewReconstructionEvaluator, out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.md")) == ["notes.md", "views-1/report.md"]
    assert not (out / "sweep.json").exists()
