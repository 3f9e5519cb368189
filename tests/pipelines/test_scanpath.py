"""pipeline("scanpath") with NevaClip (a tiny open_clip CLIP built here: no download) and the
scanpath evaluation on tiny CapMIT1003 / MIT1003 copies written by tests/scanpath_helpers.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import attnzoo
from attnzoo.errors import InvalidInputError
from tests.scanpath_helpers import (
    register_tiny_open_clip,
    spp_by_hand,
    tiny_nevaclip,
    tiny_oat,
    use_model,
    write_capmit1003,
    write_mit1003_pysaliency,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread is as fast, and two stall each other on cores shared with other work."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def neva(one_thread):
    return tiny_nevaclip()


def picture(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: size[1], : size[0]]
    base = np.stack([np.sin(x / (5 + seed)) * 120 + 128, np.cos(y / 7) * 100 + 128, (x + y) % 255], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


FAST = {"fixations": 4, "iterations": 3}


def test_one_image_and_a_caption_give_fixations_inside_the_image(neva):
    pipe = attnzoo.pipeline("scanpath", model=neva, **FAST)
    sp = pipe(picture(0), caption="a colourful pattern")
    assert sp.xy.shape == (4, 2) and sp.image_size == (96, 64)
    assert (sp.xy >= 0).all() and (sp.xy[:, 0] <= 96).all() and (sp.xy[:, 1] <= 64).all()
    assert sp.caption == "a colourful pattern" and sp.relative.shape == (4, 2) and sp.losses.shape == (4,)
    # the pixels are the model's (row, col) crop positions mapped back (the short side fills the 224 crop)
    from attnzoo.multimodal.nevaclip import fixations_to_pixels

    np.testing.assert_allclose(sp.xy, fixations_to_pixels(sp.relative, (96, 64), 224))
    d = sp.to_dict()
    assert d["caption"] == "a colourful pattern" and len(d["xy"]) == 4


def test_a_batch_gives_what_each_image_gets_alone(neva):
    pipe = attnzoo.pipeline("scanpath", model=neva, batch_size=3, **FAST)
    images = [picture(i, size=(96 + 16 * i, 64)) for i in range(3)]
    captions = ["a pattern", "stripes of colour", "a picture of waves"]
    together = pipe(images, caption=captions)
    alone = [pipe(im, caption=c) for im, c in zip(images, captions)]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.relative, b.relative)  # same decisions, bit for bit
        np.testing.assert_allclose(a.xy, b.xy)
    # one caption for all images, and embeddings instead of captions
    shared = pipe(images[:2], caption="a pattern")
    np.testing.assert_array_equal(shared[0].relative, together[0].relative)
    embedding = neva.encode_captions(["a pattern"])[0]
    by_embedding = pipe(images[0], target=embedding)
    np.testing.assert_array_equal(by_embedding.relative, together[0].relative)


def test_seed_changes_restarts_and_is_reproducible(neva):
    # on noise the foveated view changes a lot with the fixation, so the search gets stuck and restarts
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    pipe = attnzoo.pipeline("scanpath", model=neva, fixations=3, iterations=6)
    a, b = pipe(noise, caption="noise", seed=1), pipe(noise, caption="noise", seed=1)
    np.testing.assert_array_equal(a.relative, b.relative)
    other = pipe(noise, caption="noise", seed=2)
    assert not np.array_equal(other.relative, a.relative)
    # the difference is a restart's: sign steps from the centre alone stay on the lr = 0.1 lattice
    off_lattice = lambda sp: np.abs(sp.relative * 10 - np.round(sp.relative * 10)).max() > 1e-3  # noqa: E731
    assert off_lattice(a) and off_lattice(other)


def test_plot_draws_the_fixations_over_the_image(neva):
    pipe = attnzoo.pipeline("scanpath", model=neva, **FAST)
    sp = pipe(picture(2), caption="a pattern")
    plain = sp.plot(title="x")
    human = np.array([[10.0, 10.0], [80.0, 50.0], [40.0, 30.0]])
    both = sp.plot(others=[human])
    assert plain.width == 96 and both.height > 64  # the legend/title band sits above the image
    # the fixation marks change the picture where the first fixation is
    x, y = (sp.xy[0] + 0.5).astype(int)
    base = np.asarray(picture(2).convert("RGB"), dtype=float)
    drawn = np.asarray(plain, dtype=float)[-64:]
    assert np.abs(drawn[y, x] - base[y, x]).sum() > 30


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "caption"),
        ({"caption": "   "}, "empty"),
        ({"caption": "word " * 100}, "tokens long"),
        ({"target": torch.randn(12)}, "dimension"),
        ({"caption": "a", "target": torch.randn(64)}, "not both"),
        ({"caption": "a", "colour": 3}, "unexpected"),
        ({"target": torch.full((64,), float("nan"))}, "NaN or infinite"),
        ({"target": torch.full((64,), float("inf"))}, "NaN or infinite"),
        ({"target": np.full(64, 1e39)}, "NaN or infinite"),  # finite in float64, infinite in the search's float32
        ({"target": torch.zeros(64)}, "zero vector"),
        ({"target": torch.zeros(0)}, r"\[D\] or \[N, D\]"),
        ({"target": torch.ones(64, dtype=torch.complex64)}, "real numbers"),
        ({"target": torch.ones(64, device="meta")}, "target embedding is a meta tensor: it holds no data"),
        ({"target": "a caption"}, "tensor or an array"),
        ({"target": torch.randn(3, 64)}, "one embedding"),
        ({"caption": "a", "lr": float("nan")}, "lr"),
        ({"caption": "a", "lr": "abc"}, "lr"),
        ({"caption": "a", "fixations": 0}, "fixations"),
        ({"caption": "a", "iterations": 2.5}, "iterations"),
        ({"caption": "a", "forgetting": 2.0}, "forgetting"),
        ({"caption": "a", "random_restarts": "no"}, "random_restarts"),
        ({"caption": "a", "seed": "3"}, "seed"),
    ],
)
def test_bad_input_gives_clear_errors(neva, kwargs, match):
    pipe = attnzoo.pipeline("scanpath", model=neva, **FAST)
    with pytest.raises(InvalidInputError, match=match):
        pipe(picture(0), **kwargs)


def test_images_of_any_mode_and_size(neva, tmp_path):
    pipe = attnzoo.pipeline("scanpath", model=neva, fixations=1, iterations=1)
    grey = picture(3).convert("L")
    rgba = picture(3).convert("RGBA")
    path = tmp_path / "tall.png"
    picture(4, size=(20, 300)).save(path)
    for image, size in ((grey, (96, 64)), (rgba, (96, 64)), (path, (20, 300)), (np.asarray(picture(5)), (96, 64))):
        sp = pipe(image, caption="a thing")
        assert sp.image_size == size and (sp.xy[:, 0] <= size[0]).all() and (sp.xy[:, 1] <= size[1]).all()
    with pytest.raises(InvalidInputError):
        pipe(tmp_path / "missing.png", caption="a thing")


def test_pipeline_factory_names_and_task_listing(monkeypatch, neva):
    from attnzoo.pipelines.scanpath import NevaClipScanpathPipeline
    from attnzoo.tasks import get_task, list_tasks

    assert (
        "scanpath" in list_tasks()
        and get_task("gaze").name == "scanpath"
        and get_task("scanpath").default_model == "nevaclip"
    )

    seen = {}

    def fake_build(**kwargs):
        seen["kwargs"] = kwargs
        return neva

    use_model(monkeypatch, "nevaclip", fake_build)
    pipe = attnzoo.pipeline("gaze", model_kwargs={"model_name": "ViT-B-32"}, weights="laion2b_s34b_b79k")
    assert seen["kwargs"]["model_name"] == "ViT-B-32" and isinstance(pipe, NevaClipScanpathPipeline)
    assert seen["kwargs"]["weights"] == "laion2b_s34b_b79k"
    with pytest.raises(InvalidInputError, match="model= takes a model name"):
        attnzoo.pipeline("scanpath", model=object())


def test_the_registered_nevaclip_builder_maps_weights_to_open_clip_tags():
    from attnzoo.multimodal.nevaclip import nevaclip

    assert nevaclip(weights="laion2b_s34b_b79k").pretrained == "laion2b_s34b_b79k"
    assert nevaclip().pretrained == "openai" and nevaclip(pretrained=False).pretrained is None
    assert attnzoo.create_model("nevaclip", weights="none").pretrained is None
    with pytest.raises(InvalidInputError, match="as weights="):
        nevaclip(pretrained="laion2b_s34b_b79k")


# -- evaluation ------------------------------------------------------------------------------------
def test_capmit1003_evaluation_with_the_misleading_caption_control_and_resume(neva, tmp_path):
    from attnzoo.evaluation import evaluate
    from attnzoo.evaluation.scanpath import ScanpathEvaluator, free_viewing_scores

    data = write_capmit1003(tmp_path / "capmit")
    pipe = attnzoo.pipeline("scanpath", model=neva, batch_size=4, **FAST)
    evaluator = ScanpathEvaluator(data["db"].parent)
    assert evaluator.dataset == "capmit1003" and evaluator.conditions == ["own", "misleading"]
    samples = evaluator.samples()
    assert len(samples) == 2 * len(data["captions"])
    metrics = evaluate(pipe, evaluator, tmp_path / "out", settings={"model": "tiny"}, batch_size=4, progress=False)
    rows = metrics["rows"]
    assert set(rows) == {"model (own caption)", "model (misleading caption)", "humans (inter-subject)"}
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    # each record's scores are the metric functions applied to the saved scanpath and the caption's own clicks
    first = next(p for p in preds if p["id"] == "own|obs1")
    human = np.array([[10, 12], [20, 22], [5, 6]], dtype=float)  # obs1's clicks by click_id
    expected = free_viewing_scores(np.array(first["xy"]), [human], (40, 30))
    assert first["caption"] == "a street with cars"
    assert first["spp"] == pytest.approx(expected["spp"], abs=1e-3)
    misleading = next(p for p in preds if p["id"] == "misleading|obs1")
    assert misleading["caption"] in ("a red door", "a building")  # a caption of the other image
    own = [p["spp"] for p in preds if p["id"].startswith("own|") and p["spp"] is not None]
    assert rows["model (own caption)"]["spp"] == pytest.approx(np.mean(own), abs=1e-4)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "humans (inter-subject)" in report and "SPP" in report
    # the human row: each caption's clicks against the other observers of its image, averaged over captions
    from attnzoo.datasets.capmit1003 import CapMIT1003

    caps = CapMIT1003(data["db"].parent)
    sizes = {name: size for name, size in data["images"].values()}
    human = [
        free_viewing_scores(r.xy, [o.xy for o in caps if o.stimulus == r.stimulus and o is not r], sizes[r.stimulus])
        for r in caps
    ]
    scored = [h for h in human if any(v is not None and not np.isnan(v) for v in h.values())]
    assert len(scored) == 2 < len(human)  # two captions' images have no other observer: no score, not counted
    assert rows["humans (inter-subject)"]["n"] == len(scored)
    assert rows["humans (inter-subject)"]["scanmatch"] == pytest.approx(
        np.nanmean([h["scanmatch"] for h in human]), abs=1e-4
    )
    again = evaluate(
        pipe, ScanpathEvaluator(data["db"].parent), tmp_path / "out", settings={"model": "tiny"}, progress=False
    )
    assert again["rows"] == rows  # resumed: nothing recomputed, same numbers


def test_mit1003_evaluation_scores_every_observer(neva, tmp_path):
    from attnzoo.evaluation import evaluate
    from attnzoo.evaluation.scanpath import NEUTRAL_CAPTION, ScanpathEvaluator

    images = {"a.jpeg": (60, 40), "b.jpeg": (40, 60)}
    paths = [
        {
            "n": n,
            "subject": k,
            "xs": [5.0 + k, 30.0, 20.0 - k, 10.0],
            "ys": [5.0, 20.0 + k, 30.0, 12.0],
            "ts": [0.1, 0.3, 0.6, 0.9],
            "durations": [0.2] * 4,
        }
        for n in range(2)
        for k in range(3)
    ]
    write_mit1003_pysaliency(tmp_path / "mit", images, paths)
    evaluator = ScanpathEvaluator(tmp_path / "mit")
    assert evaluator.dataset == "mit1003"
    samples = evaluator.samples()
    assert len(samples) == 2 and all(s.input["caption"] == NEUTRAL_CAPTION for s in samples)
    pipe = attnzoo.pipeline("scanpath", model=neva, **FAST)
    metrics = evaluate(pipe, evaluator, tmp_path / "out", settings={}, progress=False)
    assert metrics["rows"]["humans (inter-subject)"]["n"] == 2
    # SPP written out by hand (nltk's edit distance) from the saved model scanpaths and the observers' fixations
    preds = {
        json.loads(line)["id"]: json.loads(line)
        for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    }
    observers = {
        name: [np.column_stack([p["xs"], p["ys"]]) for p in paths if p["n"] == n] for n, name in enumerate(images)
    }
    for name, humans in observers.items():
        np.testing.assert_allclose(np.concatenate([r.xy for r in evaluator._groups[name]]), np.concatenate(humans))
    model_spp = [spp_by_hand(preds[name]["xy"], humans, images[name]) for name, humans in observers.items()]
    human_spp = [
        np.mean([spp_by_hand(h, [o for o in humans if o is not h], images[name]) for h in humans])
        for name, humans in observers.items()
    ]
    assert metrics["rows"]["model"]["spp"] == pytest.approx(np.mean(model_spp), abs=1e-4)
    assert metrics["rows"]["humans (inter-subject)"]["spp"] == pytest.approx(np.mean(human_spp), abs=1e-4)
    assert 0 < np.mean(human_spp) < 1  # the observers' paths differ a little: neither all nor nothing matches


def test_evaluation_refuses_mismatched_models_and_options(tmp_path):
    from attnzoo.errors import DatasetFormatError
    from attnzoo.evaluation.scanpath import ScanpathEvaluator

    data = write_capmit1003(tmp_path / "capmit")
    with pytest.raises(InvalidInputError, match="OAT"):
        ScanpathEvaluator(data["db"].parent, model_kind="oat")
    with pytest.raises(InvalidInputError, match="captions"):
        ScanpathEvaluator(data["db"].parent, captions="own,made-up")
    with pytest.raises(InvalidInputError, match="no training"):
        ScanpathEvaluator(data["db"].parent, split="train")
    with pytest.raises(DatasetFormatError, match="which scanpath dataset"):
        ScanpathEvaluator(tmp_path)


# -- OAT (visual search) ----------------------------------------------------------------------------
def shelf(tmp_path, seed=0):
    """A 2x3 shelf of coloured packages on grey, and the packages' boxes in reading order."""
    rng = np.random.default_rng(seed)
    image = np.full((120, 150, 3), 128, np.uint8)
    boxes = []
    for r in range(2):
        for c in range(3):
            x0, y0 = 10 + 45 * c, 8 + 56 * r
            image[y0 : y0 + 48, x0 : x0 + 38] = rng.integers(0, 255, 3)
            boxes.append((x0, y0, x0 + 38, y0 + 48))
    path = tmp_path / f"shelf{seed}.png"
    Image.fromarray(image).save(path)
    return path, np.array(boxes, dtype=float)


def test_oat_search_points_at_objects_and_keeps_the_callers_box_order(tmp_path):
    from attnzoo.vision.oat_decoding import generate
    from attnzoo.vision.oat_inputs import crop_objects

    model = tiny_oat()
    pipe = attnzoo.pipeline("scanpath", model=model, max_len=5)
    path, boxes = shelf(tmp_path)
    sp = pipe(path, boxes=boxes, target=4)
    expected = generate(
        model, crop_objects(np.asarray(Image.open(path).convert("RGB")), boxes, colour_order="rgb"), 4, 5
    )[0][0]
    np.testing.assert_array_equal(sp.objects, expected.objects)
    assert sp.found_target == expected.terminated and sp.target == 4
    np.testing.assert_allclose(
        sp.xy, (boxes[sp.objects, :2] + boxes[sp.objects, 2:]) / 2
    )  # fixations at the box centres
    # the same shelf with the boxes listed in another order: the same search, reported in that order
    perm = np.array([5, 3, 0, 4, 1, 2])
    shuffled = pipe(path, boxes=boxes[perm], target=int(np.flatnonzero(perm == 4)[0]))
    np.testing.assert_array_equal(perm[shuffled.objects], sp.objects)
    assert sp.plot().size[0] == 150


def red_note_pixels(picture: Image.Image, image_height: int) -> int:
    """Pixels of the red note in the band above the image."""
    band = np.asarray(picture).astype(int)[: picture.height - image_height]
    return int((np.abs(band - np.array([170, 20, 20])).sum(-1) < 90).sum())


def test_random_weights_reach_the_record_and_the_picture(neva, tmp_path):
    """OAT has no released weights: its scanpaths (and a random NevaClip's) say so, in to_dict and the picture."""
    path, boxes = shelf(tmp_path)
    oat = attnzoo.pipeline("scanpath", model=tiny_oat(), weights="none", max_len=5)
    neva_random = attnzoo.pipeline("scanpath", model=neva, weights="none", **FAST)
    for sp in (oat(path, boxes=boxes, target=4), neva_random(picture(0), caption="a pattern")):
        assert sp.weights == "random" and json.loads(json.dumps(sp.to_dict()))["weights"] == "random"
        assert red_note_pixels(sp.plot(), sp.image_size[1]) > 20
        assert red_note_pixels(sp.plot(title="my own title"), sp.image_size[1]) > 20  # a title keeps the note
    known = attnzoo.pipeline("scanpath", model=neva, **FAST)(picture(0), caption="a pattern")
    assert known.weights is None and "weights" not in known.to_dict()
    assert red_note_pixels(known.plot(), 64) == 0


def test_shelf_variants_see_their_official_crops(tmp_path):
    from attnzoo.vision.oat_decoding import generate
    from attnzoo.vision.oat_inputs import display_crops

    model = attnzoo.create_model(
        "oat_wine", num_encoder_layers=1, num_decoder_layers=1, emb_size=64, nhead=2, dim_feedforward=32, CA_d_k=16
    ).eval()
    rng = np.random.default_rng(0)
    image = np.full((200, 11 * 20, 3), 128, np.uint8)
    boxes = np.array([[c * 20, 10 + r * 90, c * 20 + 18, 10 + r * 90 + 85] for r in range(2) for c in range(11)], float)
    for x0, y0, x1, y1 in boxes.astype(int):
        image[y0:y1, x0:x1] = rng.integers(0, 255, 3)
        image[y0 + 5 : y0 + 9, x0 + 2 : x1 - 2] = rng.integers(0, 255, 3)  # a label: no flat crop
    Image.fromarray(image).save(tmp_path / "wine.png")
    sp = attnzoo.pipeline("scanpath", model=model, max_len=4)(tmp_path / "wine.png", boxes=boxes, target=5)
    expected = generate(model, display_crops(image, boxes, "rgb_minmax"), 5, 4)[0][0]
    np.testing.assert_array_equal(sp.objects, expected.objects)


def test_oat_batches_sampling_and_search_trials(tmp_path):
    from attnzoo.datasets.scanpaths import SearchTrial

    model = tiny_oat()
    pipe = attnzoo.pipeline("scanpath", model=model, max_len=4, batch_size=2)
    (p0, b0), (p1, b1) = shelf(tmp_path, 0), shelf(tmp_path, 1)
    batch = pipe([{"image": p0, "boxes": b0, "target": 1}, {"image": p1, "boxes": b1, "target": 2}])
    alone = [pipe(p0, boxes=b0, target=1), pipe(p1, boxes=b1, target=2)]
    for a, b in zip(batch, alone):
        np.testing.assert_array_equal(a.objects, b.objects)
    trial = SearchTrial("s", p1, "u", np.zeros((0, 2)), boxes=b1, grid=(2, 3), target=2)
    np.testing.assert_array_equal(pipe([trial])[0].objects, alone[1].objects)
    # one display's boxes as a plain [N, 4] list (or a tensor) are that display's, for one or every image
    np.testing.assert_array_equal(pipe(p1, boxes=b1.tolist(), target=2).objects, alone[1].objects)
    shared = pipe([p1, p1], boxes=torch.as_tensor(b1), target=2)
    assert [s.objects.tolist() for s in shared] == [alone[1].objects.tolist()] * 2
    per_image = pipe([p0, p1], boxes=[b0.tolist(), b1.tolist()], target=[1, 2])
    assert [s.objects.tolist() for s in per_image] == [a.objects.tolist() for a in alone]
    with pytest.raises(InvalidInputError, match=r"boxes must be \[N, 4\]"):  # per image, the first one empty
        pipe([p0, p1], boxes=[[], b1.tolist()], target=[1, 2])
    samples = pipe(p0, boxes=b0, target=1, strategy="sample", num_samples=3, seed=7)
    again = pipe(p0, boxes=b0, target=1, strategy="sample", num_samples=3, seed=7)
    assert len(samples) == 3 and [s.objects.tolist() for s in samples] == [s.objects.tolist() for s in again]
    # a display's samples do not depend on its batch or its place in it (nor on --batch-size)
    together = pipe(
        [{"image": p1, "boxes": b1, "target": 2}, {"image": p0, "boxes": b0, "target": 1}],
        strategy="sample",
        num_samples=3,
        seed=7,
    )
    assert [s.objects.tolist() for s in together[1]] == [s.objects.tolist() for s in samples]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"boxes": np.zeros((5, 4)), "target": 0}, r"\[6, 4\]"),
        ({"target": 9}, "target"),
        ({"target": 1, "caption": "x"}, "caption"),
        ({"target": 1, "boxes": "huge"}, "outside"),
        ({"target": 1, "boxes": "nan"}, "box 2 .* NaN or infinite"),
        ({"target": 1, "boxes": "boxes.txt"}, r"\.json or \.npy"),
        ({"target": 1, "max_len": 0}, r"max_len must be an integer in \[1, 5000\] \(the decoder's position table"),
        ({"target": 1, "max_len": 10**8}, r"max_len must be an integer in \[1, 5000\]"),
        ({"target": 1, "strategy": "sample", "num_samples": 0}, r"num_samples must be an integer in \[1, 10000\]"),
        ({"target": 1, "strategy": "sample", "seed": 1.5}, "seed must be an integer"),
        ({"target": 1, "strategy": "sample", "seed": 2**64}, r"seed must be an integer in \[0, 2\*\*64\)"),
        ({"target": 1, "strategy": "sample", "seed": -(2**63) - 1}, "seed must be an integer in"),
        ({"target": 1, "strategy": "beam"}, "strategy"),
    ],
)
def test_oat_bad_input(tmp_path, kwargs, match):
    pipe = attnzoo.pipeline("scanpath", model=tiny_oat(), max_len=3)
    path, boxes = shelf(tmp_path)
    named = kwargs.get("boxes") if isinstance(kwargs.get("boxes"), str) else None
    if named == "huge":
        kwargs["boxes"] = boxes + np.array([0, 0, 500, 0])
    elif named == "nan":
        kwargs["boxes"] = np.where(np.arange(6)[:, None] == 2, np.nan, boxes)
    kwargs.setdefault("boxes", boxes)
    with pytest.raises(InvalidInputError, match=match):
        pipe(path, **kwargs)


def test_cli_eval_scanpath_on_capmit1003_with_the_search_settings(neva, tmp_path, monkeypatch, capsys):
    from attnzoo.cli import main
    from attnzoo.datasets.capmit1003 import CapMIT1003

    use_model(monkeypatch, "nevaclip", lambda **kw: neva)
    data = write_capmit1003(tmp_path / "capmit")
    out = tmp_path / "eval"
    search = ["--fixations", "2", "--iterations", "3", "--lr", "0.05", "--forgetting", "0.5", "--seed", "4"]
    code = main(
        ["eval", "scanpath", "--data", str(data["db"].parent), "--out", str(out), "--captions", "own", *search]
        + ["--num-workers", "0"]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["rows"]) == {"model (own caption)", "humans (inter-subject)"} and metrics["n"] == 4
    assert metrics["captions"] == "own" and metrics["dataset"] == "capmit1003"
    assert {k: metrics[k] for k in ("fixations", "iterations", "lr", "forgetting", "seed")} == {
        "fixations": 2,
        "iterations": 3,
        "lr": 0.05,
        "forgetting": 0.5,
        "seed": 4,
    }
    # the settings reached the search: each caption's scanpath is the pipeline's with them
    first = CapMIT1003(data["db"].parent)[0]
    pipe = attnzoo.pipeline("scanpath", model=neva, fixations=2, iterations=3, lr=0.05, forgetting=0.5, seed=4)
    expected = pipe(first.image_path, caption=first.caption)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(next(p["xy"] for p in preds if p["caption"] == first.caption), expected.xy, atol=0.01)
    capsys.readouterr()
    assert main(["eval", "image-classification", "--data", str(tmp_path), "--out", str(out), "--captions", "own"]) != 0
    # NevaClip's settings are refused for OAT, before any data is read
    assert (
        main(["eval", "scanpath", "--model", "oat_amazon", "--data", str(tmp_path), "--out", str(out), "--lr", "1"])
        == 1
    )
    assert "--lr: NevaClip's search settings" in capsys.readouterr().err


def test_cli_run_scanpath_writes_fixations_and_pictures(neva, tmp_path, monkeypatch, capsys):
    from attnzoo.cli import main

    use_model(monkeypatch, "nevaclip", lambda **kw: neva)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        picture(i).save(images / f"p{i}.png")
    out = tmp_path / "out"
    search = ["--fixations", "3", "--iterations", "2", "--lr", "0.2", "--forgetting", "0.25", "--seed", "5"]
    args = ["run", "scanpath", str(images), "--caption", "a pattern", *search, "--random-restarts", "--truncate"]
    assert main([*args, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 2 and all(r["caption"] == "a pattern" for r in results.values())
    pipe = attnzoo.pipeline("scanpath", model=neva, fixations=3, iterations=2, lr=0.2, forgetting=0.25, seed=5)
    expected = pipe(images / "p1.png", caption="a pattern")
    np.testing.assert_allclose(results[str(images / "p1.png")]["xy"], expected.xy, atol=0.01)
    assert (out / "p0.png").is_file() and "(" in capsys.readouterr().out
    assert main(["run", "scanpath", str(images)]) == 1  # no caption: a one-line error
    assert "--caption" in capsys.readouterr().err
    assert main(["run", "scanpath", str(images), "--caption", "a", "--fixations", "0"]) == 1
    assert "fixations must be an integer in [1, 1000]" in capsys.readouterr().err
    assert main(["run", "scanpath", str(images), "--caption", "a", "--fixations", "1000000000"]) == 1
    assert "fixations must be an integer in [1, 1000] (human scanpaths" in capsys.readouterr().err


def test_cli_run_scanpath_without_random_restarts(tmp_path, monkeypatch):
    import attnzoo.tasks
    from attnzoo.cli import main

    seen = {}

    def record(task, **kwargs):
        seen.update(kwargs)
        raise InvalidInputError("stop here")

    monkeypatch.setattr(attnzoo.tasks, "pipeline", record)
    picture(0).save(tmp_path / "p.png")
    assert main(["run", "scanpath", str(tmp_path / "p.png"), "--caption", "a", "--no-random-restarts"]) == 1
    assert seen.get("random_restarts") is False


def test_dtype_and_device_move_the_whole_clip(tmp_path):
    neva64 = tiny_nevaclip(1)
    pipe = attnzoo.pipeline("scanpath", model=neva64, dtype="float64", fixations=1, iterations=1)
    clip = neva64._module
    assert {p.dtype for p in clip.parameters()} == {torch.float64}  # the text tower too, not only the visual one
    assert pipe(picture(0), caption="a pattern").xy.shape == (1, 2)


def test_evaluation_skips_unusable_captions_and_limits_each_condition(neva, tmp_path):
    from attnzoo.evaluation import evaluate
    from attnzoo.evaluation.scanpath import ScanpathEvaluator
    from tests.scanpath_helpers import CAPMIT_CAPTIONS

    captions = [list(c) for c in CAPMIT_CAPTIONS]
    captions[1][3] = "word " * 90  # longer than CLIP's 77-token context
    data = write_capmit1003(tmp_path / "capmit", captions=[tuple(c) for c in captions])
    evaluator = ScanpathEvaluator(data["db"].parent, captions="own,misleading,other-subject", limit=2)
    samples = evaluator.samples()
    assert [s.id.split("|")[0] for s in samples].count("own") == 2 and [s.id.split("|")[0] for s in samples].count(
        "misleading"
    ) == 2
    pipe = attnzoo.pipeline("scanpath", model=neva, **FAST)
    metrics = evaluate(pipe, evaluator, tmp_path / "out", settings={}, progress=False)
    assert metrics["skipped"] >= 1 and any(
        "tokens long" in line for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()
    )
    assert "model (misleading caption)" in metrics["rows"]


def test_nevaclip_search_settings_are_refused_before_clip_loads(monkeypatch):
    """A named NevaClip loads CLIP when its pipeline is made: ``fixations=10**9`` was refused only after that."""
    from attnzoo.multimodal.nevaclip import NevaClip

    def no_loading(self):
        raise AssertionError("CLIP was loaded before the search settings were checked")

    monkeypatch.setattr(NevaClip, "visual", property(no_loading))
    with pytest.raises(InvalidInputError, match=r"fixations must be an integer in \[1, 1000\]"):
        attnzoo.pipeline("scanpath", model="nevaclip", weights="none", fixations=10**9)
    with pytest.raises(InvalidInputError, match="forgetting"):
        attnzoo.pipeline("scanpath", model="nevaclip", forgetting=2.0)


def test_a_random_nevaclip_is_the_same_model_in_every_build_and_process(monkeypatch):
    """weights="none" promises the CLIP drawn from RANDOM_INIT_SEED, though NevaClip builds it on first use, after
    attnzoo.pipeline's seeded block: whatever the global RNG held before, every build (rerun, process of a sharded
    run) gets that CLIP and the same scanpaths, and the caller's RNG is left as it was."""
    import open_clip

    from attnzoo.tasks import RANDOM_INIT_SEED

    name = register_tiny_open_clip(monkeypatch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        expected = open_clip.create_model(name, pretrained=None).state_dict()
    runs = []
    for advance in (1, 777):
        torch.rand(advance)  # what else the process drew before differs
        before = torch.random.get_rng_state()
        pipe = attnzoo.pipeline("scanpath", model="nevaclip", weights="none", model_kwargs={"model_name": name}, **FAST)
        sp = pipe(picture(3), caption="a pattern")
        state = pipe.model._module.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
        assert torch.equal(torch.random.get_rng_state(), before)
        assert pipe.weights_label == "random (seed 0)"
        runs.append(np.asarray(sp.xy))
    np.testing.assert_array_equal(runs[0], runs[1])


# -- hunt 24: bounded OAT sampling, boxes files read header first, typed run-file errors ----------


def test_oat_refuses_more_samples_than_the_cap_at_construction_and_call(tmp_path, monkeypatch):
    from attnzoo.errors import InvalidOptionError
    from attnzoo.vision import oat_decoding

    with pytest.raises(InvalidOptionError, match=r"num_samples must be an integer in \[1, 10000\] \(sampled"):
        attnzoo.pipeline("scanpath", model=tiny_oat(), strategy="sample", num_samples=10**9)
    pipe = attnzoo.pipeline("scanpath", model=tiny_oat(), max_len=3)
    path, boxes = shelf(tmp_path)
    # refused before any seed is drawn (a billion samples would loop for hours)
    monkeypatch.setattr(oat_decoding, "trial_seeds", lambda *a, **k: pytest.fail("seeds drawn before the check"))
    with pytest.raises(InvalidOptionError, match="num_samples"):
        pipe(path, boxes=boxes, target=1, strategy="sample", num_samples=10_001)


def _npy_header(path, shape, descr="<f8", data=b"\0" * 64, version=(1, 0)):
    """A .npy file of a few bytes whose header claims ``shape`` (nothing of that size is written)."""
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    with open(path, "wb") as fh:
        writer = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
        writer(fh, header)
        fh.write(data)
    return path


@pytest.mark.parametrize(
    "shape, descr, data, match",
    [
        ((10**9, 4), "<f8", b"\0" * 64, "claims 1,000,000,000 boxes, more than the 100,000"),
        ((2**40, 4), "<f4", b"\0" * 64, "claims 1,099,511,627,776 boxes"),
        ((2**62, 2**62), "<f8", b"\0" * 64, r"shape \(4611686018427387904, 4611686018427387904\), not \[N, 4\]"),
        ((6, 3), "<f8", b"\0" * 144, r"shape \(6, 3\), not \[N, 4\]"),
        ((24,), "<f8", b"\0" * 192, r"shape \(24,\), not \[N, 4\]"),
        ((6, 4), "<f8", b"\0" * 10, "more than its .* bytes hold"),
        ((6, 4), "|O", b"\0" * 64, "holds object"),
    ],
)
def test_a_boxes_npy_file_is_refused_from_its_header_before_its_data_is_read(
    tmp_path, monkeypatch, shape, descr, data, match
):
    pipe = attnzoo.pipeline("scanpath", model=tiny_oat(), max_len=3)
    path, _ = shelf(tmp_path)
    bad = _npy_header(tmp_path / "claims.npy", shape, descr, data)
    assert bad.stat().st_size < 512  # the file is tiny, whatever it claims
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load called on a file whose header is refused"))
    with pytest.raises(InvalidInputError, match=rf"boxes file .*claims\.npy: .*{match}"):
        pipe(path, boxes=str(bad), target=1)


def test_a_boxes_npy_file_never_raises_a_raw_parser_error(tmp_path, monkeypatch):
    pipe = attnzoo.pipeline("scanpath", model=tiny_oat(), max_len=3)
    path, boxes = shelf(tmp_path)
    good = tmp_path / "boxes.npy"
    np.save(good, boxes)
    expected = pipe(path, boxes=boxes, target=1)
    assert pipe(path, boxes=str(good), target=1).objects.tolist() == expected.objects.tolist()
    v2 = _npy_header(tmp_path / "v2.npy", (6, 4), data=boxes.astype("<f8").tobytes(), version=(2, 0))
    assert pipe(path, boxes=str(v2), target=1).objects.tolist() == expected.objects.tolist()
    for junk in (b"garbage", b"\x93NUMPY garbage"):  # no magic; a magic of no version
        (tmp_path / "junk.npy").write_bytes(junk)
        with pytest.raises(InvalidInputError, match="boxes file .*junk.npy"):
            pipe(path, boxes=str(tmp_path / "junk.npy"), target=1)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(np, "load", out_of_memory)  # what numpy raises when the data does not fit
    with pytest.raises(
        InvalidInputError, match=r"boxes\.npy could not be read \(it claims more memory than there is\)"
    ):
        pipe(path, boxes=str(good), target=1)


def test_a_boxes_json_file_too_long_for_max_boxes_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    from attnzoo.pipelines import scanpath as module

    pipe = attnzoo.pipeline("scanpath", model=tiny_oat(), max_len=3)
    path, boxes = shelf(tmp_path)
    good = tmp_path / "boxes.json"
    good.write_text(json.dumps(boxes.tolist(), indent=8))  # pretty-printed: still read
    expected = pipe(path, boxes=boxes, target=1)
    assert pipe(path, boxes=str(good), target=1).objects.tolist() == expected.objects.tolist()
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:  # sparse: no disk is used, whatever its length
        fh.write(b"[[0, 0, 1, 1],")
        fh.truncate(64 * 2**20)
    with monkeypatch.context() as patch:
        patch.setattr(json, "loads", lambda *a, **k: pytest.fail("a too long boxes file was parsed"))
        with pytest.raises(InvalidInputError, match=r"boxes file .*huge\.json: 67,108,864 bytes, more than the"):
            pipe(path, boxes=str(huge), target=1)
        # the bound follows MAX_BOXES: one byte past it is refused ...
        with open(huge, "r+b") as fh:
            fh.truncate(module.MAX_JSON_BOX_BYTES + 1)
        with pytest.raises(InvalidInputError, match=rf"huge\.json: {module.MAX_JSON_BOX_BYTES + 1:,} bytes"):
            pipe(path, boxes=str(huge), target=1)
    # ... and each of MAX_BOXES boxes fits in it even written one number per indented line
    widest = json.dumps([[-1.2345678901234567e-308] * 4], indent=8).encode()
    assert len(widest) <= module.MAX_JSON_BOX_BYTES // module.MAX_BOXES


def test_a_boxes_json_file_listing_more_than_max_boxes_is_refused_naming_it(tmp_path):
    from attnzoo.pipelines.scanpath import MAX_BOXES

    pipe = attnzoo.pipeline("scanpath", model=tiny_oat(), max_len=3)
    path, _ = shelf(tmp_path)
    many = tmp_path / "many.json"
    many.write_text(json.dumps([[0, 0, 1, 1]] * (MAX_BOXES + 1)))  # short enough to be parsed
    with pytest.raises(InvalidInputError, match=r"boxes file .*many\.json: lists 100,001 boxes, more than the 100,000"):
        pipe(path, boxes=str(many), target=1)


def test_a_damaged_decoding_json_beside_the_weights_is_a_typed_error(tmp_path):
    from attnzoo.errors import WeightsError
    from attnzoo.evaluation.scanpath import training_split
    from attnzoo.pipelines.scanpath import OATScanpathPipeline, run_decoding

    weights = tmp_path / "model.safetensors"  # only its folder is read here
    run = tmp_path / "decoding.json"
    for text, match in (
        ("{bad", "decoding.json: not valid JSON"),
        ("[1, 2]", "decoding.json: expected a JSON object"),
        ('{"max_len": "x"}', "decoding.json: max_len must be an integer"),
        ('{"split": "official"}', "decoding.json: max_len must be an integer"),
        ('{"max_len": 1000000}', r"decoding.json: max_len must be an integer in \[1, 5000\]"),
    ):
        run.write_text(text)
        with pytest.raises(WeightsError, match=match):
            OATScanpathPipeline.configure_model(tiny_oat(), weights)
    run.write_text("\xff\xfe garbage", encoding="latin-1")
    with pytest.raises(WeightsError, match="decoding.json"):
        run_decoding(weights)
    run.write_text('{"max_len": 4}')
    assert OATScanpathPipeline.configure_model(tiny_oat(), weights).max_len == 4
    assert training_split(weights) is None  # no split recorded: not a split to evaluate on
    for text in ('{"max_len": 4, "split": "official"}', '{"max_len": 4, "split": 3, "split_seed": 0}'):
        run.write_text(text)
        with pytest.raises(WeightsError, match="decoding.json: the training run's split"):
            training_split(weights)
    run.write_text('{"max_len": 4, "split": "official", "split_seed": 7}')
    assert training_split(weights)["split_seed"] == 7


def test_a_meta_tensor_image_is_refused_naming_it(neva):
    """A meta tensor holds no pixels: refused as bad input (it was torch's NotImplementedError from copying it)."""
    pipe = attnzoo.pipeline("scanpath", model=neva, **FAST)
    with pytest.raises(InvalidInputError, match=r"<Tensor \(3, 64, 96\)> is a meta tensor: it holds no data"):
        pipe(torch.rand(3, 64, 96, device="meta"), caption="a pattern")
    skipped = list(pipe.iterate([torch.rand(3, 64, 96, device="meta")], caption="a", on_error="skip"))
    assert isinstance(skipped[0][1], InvalidInputError)


def test_oat_boxes_in_half_precision_are_read_as_their_values(tmp_path):
    """bfloat16 has no numpy dtype: bf16 (and fp16) box tensors are widened to the numbers they hold (these boxes'
    corners are whole numbers below 256, exact in both), a meta tensor is refused."""
    pipe = attnzoo.pipeline("scanpath", model=tiny_oat(), max_len=4)
    path, boxes = shelf(tmp_path)
    expected = pipe(path, boxes=boxes, target=4)
    for dtype in (torch.bfloat16, torch.float16):
        sp = pipe(path, boxes=torch.from_numpy(boxes).to(dtype), target=4)
        np.testing.assert_array_equal(sp.objects, expected.objects)
        np.testing.assert_array_equal(sp.xy, expected.xy)
    with pytest.raises(InvalidInputError, match="boxes is a meta tensor: it holds no data"):
        pipe(path, boxes=torch.from_numpy(boxes).to("meta"), target=4)
