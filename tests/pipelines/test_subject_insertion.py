"""pipeline("subject-insertion") end to end on the tiny random FLUX.1-Fill (no network, no text encoders):
images in, an image out, every input form, the latent blending, bad input as typed errors, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.errors import InvalidInputError, InvalidOptionError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from attnzoo.multimodal.insertion.flux import tiny_flux_fill

    return tiny_flux_fill(0)


@pytest.fixture
def pipe(tiny):
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    return SubjectInsertionPipeline(tiny, panel_size=16, steps=2)


@pytest.fixture
def registered_flux(monkeypatch):
    """``flux_fill`` in the model registry for this test only (importing its module registers it; a later
    test that lists the registry must not see it unless attnzoo's families already include it)."""
    import attnzoo.registry as registry
    from attnzoo.factory import load_families

    load_families()
    before = registry.get_model_entry("flux_fill")
    from attnzoo.multimodal.insertion import models

    entry = registry.ModelEntry("flux_fill", models.flux_fill, "insertion", ("subject-insertion",), True)
    if before is None:
        registry._MODELS.pop("flux_fill", None)
    monkeypatch.setitem(registry._MODELS, "flux_fill", before or entry)


def photo(h, w, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h)))


def box_mask(h, w, top, left, bottom, right):
    mask = np.zeros((h, w), bool)
    mask[top:bottom, left:right] = True
    return mask


SUBJECT, TARGET = photo(20, 24, 0), photo(30, 40, 1)
MASK = box_mask(30, 40, 8, 10, 22, 30)


def test_end_to_end_on_the_tiny_model(pipe):
    out = pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="a cat on a sofa")
    assert out.image.size == (40, 30) and out.canvas.size == (16, 32) and out.canvas_input.size == (16, 32)
    assert out.mask.shape == (30, 40) and out.mask.any() and out.subject_mask is None
    assert out.settings["method"] == "in-context-brush" and out.settings["behaviour"] == "corrected"
    assert out.settings["blend"] is True and out.settings["attention"]["shift_img"] == 0.3
    record = json.loads(json.dumps(out.to_dict()))
    assert record["seed"] == 0 and record["prompt"] == "a cat on a sofa" and record["steps"] == 2
    assert "in-context-brush (corrected)" in out.summary()
    picture = out.plot()
    assert picture.height > 256 and picture.width > 3 * 200
    again = pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="a cat on a sofa")
    assert np.array_equal(np.asarray(again.image), np.asarray(out.image))  # fixed seed: the same image
    other = pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="a cat on a sofa", seed=5)
    assert other.seed == 5 and not np.array_equal(np.asarray(other.image), np.asarray(out.image))


def test_methods_behaviours_and_batches(pipe):
    items = [
        {"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "a"},
        {"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "b", "seed": 3},
    ]
    results = pipe(items, method="diptych", behaviour="official")
    assert [r.seed for r in results] == [0, 3]
    assert all(r.settings["orientation"] == "horizontal" and r.settings["blend"] is False for r in results)
    assert results[0].canvas.size == (32, 16) and results[0].settings["attention"]["shift_img"] == pytest.approx(0.3)
    plain = pipe(target=TARGET, subject=SUBJECT, mask=MASK, prompt="a", method="none")
    assert plain.settings["attention"]["method"] == "none"


def test_blending_keeps_everything_outside_the_mask(tiny):
    """Corrected behaviour: after the last step the unmasked latents are the canvas's own (noise level 0);
    the official one leaves the scheduler's latents as they are."""
    from attnzoo.multimodal.insertion.flux import _blend_for, run_fill
    from attnzoo.multimodal.insertion.in_context_brush import InsertionAttention
    from attnzoo.multimodal.insertion.inputs import prepare_inputs
    from attnzoo.multimodal.insertion.layout import PanelLayout

    inputs = prepare_inputs(SUBJECT, TARGET, MASK, PanelLayout(16, 16, "vertical", 1, 2))
    embeds, pooled = tiny.encode_prompt("a cat")
    kwargs = dict(
        orientation="vertical",
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        num_inference_steps=3,
        seed=4,
        trace=True,
    )
    blended = run_fill(tiny, inputs.canvas, inputs.canvas_mask, InsertionAttention(), blend=True, **kwargs)
    blend = _blend_for(tiny, Image.fromarray(inputs.canvas), Image.fromarray(inputs.canvas_mask), 32, 16, 4)
    outside = blend.keep == 0
    assert outside.any() and (~outside).any()
    final = blended.trace["latents"][-1]
    assert torch.equal(final[outside], blend.source[outside])
    assert not torch.equal(blended.trace["latents_step"][-1][outside], blend.source[outside])
    official = run_fill(
        tiny, inputs.canvas, inputs.canvas_mask, InsertionAttention(behaviour="official"), blend=False, **kwargs
    )
    for step, after in zip(official.trace["latents_step"], official.trace["latents"], strict=True):
        assert torch.equal(step, after)


def test_input_forms(pipe, tmp_path):
    """An RGBA subject (its alpha is the mask), a grayscale target, a mask image and a VIA annotation on disk."""
    rgba = np.dstack([SUBJECT, np.where(box_mask(20, 24, 4, 4, 16, 20), 255, 0).astype(np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "subject.png")
    Image.fromarray(TARGET).convert("L").save(tmp_path / "target.png")
    Image.fromarray((MASK * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    out = pipe(
        str(tmp_path / "target.png"), subject=str(tmp_path / "subject.png"), mask=str(tmp_path / "mask.png"), prompt="x"
    )
    assert out.subject_mask.sum() == 12 * 16 and np.asarray(out.subject)[0, 0].tolist() == [255, 255, 255]
    via = {"regions": [{"shape_attributes": {"name": "ellipse", "cx": 20, "cy": 15, "rx": 8, "ry": 6}}]}
    (tmp_path / "mask.json").write_text(json.dumps(via))
    out = pipe(str(tmp_path / "target.png"), subject=SUBJECT, mask=str(tmp_path / "mask.json"), prompt="x")
    assert out.mask[15, 20] and not out.mask[0, 0]


def test_subject_word_goes_through_the_segmenter(tiny):
    from attnzoo.multimodal.insertion.segment import SubjectSegmenter
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    seen = []
    segmenter = SubjectSegmenter(
        detector=lambda image, word: seen.append(word) or [(0.4, (1, 1, 5, 5)), (0.9, (2, 3, 12, 15))],
        sam=lambda image, box: box_mask(image.height, image.width, int(box[1]), int(box[0]), int(box[3]), int(box[2])),
    )
    pipe = SubjectInsertionPipeline(tiny, panel_size=16, steps=1, segmenter=segmenter)
    out = pipe(TARGET, subject=SUBJECT, subject_word="teapot", mask=MASK, prompt="x")
    assert seen == ["teapot"] and out.subject_mask.sum() == 12 * 10  # the best-scoring box
    nothing = SubjectSegmenter(detector=lambda image, word: [], sam=lambda image, box: None)
    with pytest.raises(InvalidInputError, match="no 'teapot' found"):
        SubjectInsertionPipeline(tiny, panel_size=16, steps=1, segmenter=nothing)(
            TARGET, subject=SUBJECT, subject_word="teapot", mask=MASK, prompt="x"
        )


def test_prompt_embeddings_instead_of_a_prompt(pipe, tiny):
    embeds, pooled = tiny.encode_prompt("a cat")
    given = pipe(TARGET, subject=SUBJECT, mask=MASK, prompt_embeds=embeds[0], pooled_prompt_embeds=pooled)
    by_text = pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="a cat")
    assert np.array_equal(np.asarray(given.image), np.asarray(by_text.image))


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(mask=np.zeros((30, 40), bool)), "mask is empty"),
        (dict(mask=None), "mask= is required"),
        (dict(mask=box_mask(31, 40, 0, 0, 5, 5)), "give a mask of the image's size"),
        (
            dict(mask={"regions": [{"shape_attributes": {"name": "ellipse", "cx": 90, "cy": 90, "rx": 5, "ry": 5}}]}),
            "lies outside the 40x30 target",
        ),
        (dict(prompt=None), "prompt= is required"),
        (dict(prompt="  "), "prompt= is required"),
        (dict(subject=None), "subject= is required"),
        (dict(subject="no/such/file.png"), "subject"),
        (dict(subject_mask=np.zeros((20, 24), bool)), "selects no pixel"),
        (dict(subject_mask=np.ones((20, 24), bool), subject_word="cat"), "not both"),
        (dict(prompt_embeds=torch.zeros(1, 4, 32)), "pooled_prompt_embeds"),
        (
            dict(prompt_embeds=torch.zeros(1, 4, 64), pooled_prompt_embeds=torch.zeros(1, 32)),
            r"prompt_embeds must be 32 wide \(the transformer's joint_attention_dim\)",
        ),
        (
            dict(prompt_embeds=torch.zeros(1, 4, 32), pooled_prompt_embeds=torch.zeros(1, 16)),
            r"pooled_prompt_embeds must be 32 wide \(the transformer's pooled_projection_dim\)",
        ),
    ],
)
def test_bad_input_is_a_typed_error(pipe, change, error):
    item = {"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "a cat"} | change
    with pytest.raises(InvalidInputError, match=error):
        pipe(item)


def test_official_via_mask_falling_off_a_non_square_target(pipe):
    """The official behaviour draws VIA regions transposed; one that then misses the target is refused."""
    via = {"regions": [{"shape_attributes": {"name": "ellipse", "cx": 36, "cy": 4, "rx": 2, "ry": 2}}]}
    out = pipe(TARGET, subject=SUBJECT, mask=via, prompt="x")
    assert out.mask[4, 36]
    with pytest.raises(InvalidInputError, match="draws VIA regions transposed"):
        pipe(TARGET, subject=SUBJECT, mask=via, prompt="x", behaviour="official")


@pytest.mark.filterwarnings("ignore:behaviour=.official. slices")  # the tiny model's 16 text tokens
def test_official_via_mask_checked_on_the_canvas_it_is_drawn_on(pipe):
    """A region inside the official (transposed, 30 wide x 40 high) canvas but below the 30-high target is
    drawn by the official code, so it is used, not refused as lying outside the target."""
    via = {"regions": [{"shape_attributes": {"name": "ellipse", "cx": 10, "cy": 35, "rx": 3, "ry": 3}}]}
    out = pipe(TARGET, subject=SUBJECT, mask=via, prompt="x", behaviour="official")
    assert out.mask.any() and out.settings["behaviour"] == "official"


@pytest.mark.parametrize("mask", [MASK.astype(np.uint8), MASK.astype(np.int64), MASK * 255, MASK.astype(np.float32)])
def test_zero_one_masks_of_any_dtype_fill_where_non_zero(pipe, mask):
    out = pipe(TARGET, subject=SUBJECT, mask=mask, prompt="x")
    assert np.array_equal(out.mask, pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="x").mask)


def test_a_zero_one_subject_mask_selects_its_ones(pipe):
    chosen = box_mask(20, 24, 4, 4, 16, 20)
    out = pipe(TARGET, subject=SUBJECT, subject_mask=chosen.astype(np.uint8), mask=MASK, prompt="x")
    assert np.array_equal(out.subject_mask, chosen)


@pytest.mark.parametrize(
    "settings, error",
    [
        (dict(method="dreambooth"), "method must be one of"),
        (dict(behaviour="paper"), "behaviour must be one of"),
        (dict(steps=0), r"steps must be an integer in \[1, 1000\]"),
        (dict(steps=10**12), r"steps must be an integer in \[1, 1000\] \(the scheduler's 1000 training timesteps\)"),
        (dict(max_sequence_length=513), r"max_sequence_length .* T5 text encoder takes at most 512 tokens"),
        (dict(panel_size="1000000x1000000"), r"panel height must be an integer in \[1, 4096\] \(FLUX was trained"),
        (dict(panel_size=(768, 4097)), r"panel width must be an integer in \[1, 4096\]"),
        (dict(guidance=float("inf")), "guidance must be a finite number"),
        (dict(method="diptych", head_gain=0.1), "enforce"),
        (dict(method="none", shift_img=0.1), "takes no shift_img"),
        (dict(enforce=1.5), "Diptych's lambda"),
        (dict(step_window="5,2"), "start < stop"),
        (dict(step_window="nan,1"), "two finite numbers"),  # NaN compared False everywhere: no edit at all
        (dict(blocks="18-0"), "ranges low-high"),  # an empty range ran plain FLUX Fill as in-context-brush
        (dict(blocks=","), "no blanks"),
        (dict(blocks=[]), "blocks is empty"),
        (dict(blend="maybe"), "on or off"),
        (dict(panel_size="big"), "panel_size"),
        (dict(orientation="diagonal"), "orientation"),
        (dict(blocks="4-99"), r"blocks 4, 5, 6, 7, 8, ... do not exist: .* has 4 attention blocks, 0-3"),
        (dict(blocks=[0, 7]), "blocks 7 do not exist"),
        (dict(method="diptych", blocks="3,4"), "blocks 4 do not exist"),
        (dict(method="none", blocks="9"), "blocks 9 do not exist"),
    ],
)
def test_bad_settings_are_refused_up_front(tiny, settings, error):
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    with pytest.raises(InvalidOptionError, match=error):
        SubjectInsertionPipeline(tiny, **settings)


def test_a_step_window_after_the_last_step_is_refused(tiny):
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    pipe = SubjectInsertionPipeline(tiny, steps=2, step_window="5,9")
    target, subject = Image.new("RGB", (16, 16), "white"), Image.new("RGB", (16, 16), "red")
    with pytest.raises(InvalidOptionError, match=r"step_window \(5, 9\) starts at or after the last of the run's 2"):
        pipe(target, subject=subject, mask=np.ones((16, 16), np.uint8), prompt="a cat")


def test_a_fractional_step_window_holding_no_step_of_the_run_is_refused(tiny):
    """(0.6, 0.9) of 2 steps marks steps 1.2 to 1.8: no step, so the run would be plain FLUX Fill."""
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    pipe = SubjectInsertionPipeline(tiny, panel_size=16, steps=2, step_window=(0.6, 0.9))
    with pytest.raises(InvalidOptionError, match=r"step_window \(0.6, 0.9\) holds no step of the run's 2 steps"):
        pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="x")
    assert pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="x", steps=4).settings["attention"]["steps"] == [0.6, 0.9]


def test_official_slicing_on_a_canvas_it_was_not_made_for_warns_once_per_call(pipe):
    """The official op splits the tokens as a vertical diptych with 512 text tokens; a horizontal canvas puts
    half of each panel in the other's set."""
    import warnings

    items = [{"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "x", "seed": s} for s in (0, 1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet = pipe(items, orientation="horizontal")  # corrected: sliced by the layout, nothing to say
        assert not [w for w in caught if "official" in str(w.message)]
        results = pipe(items, orientation="horizontal", behaviour="official")
    said = [w for w in caught if "behaviour='official'" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, UserWarning)
    assert "horizontal canvas" in str(said[0].message) and "the text has 16 tokens" in str(said[0].message)
    assert len(results) == len(quiet) == 2
    with pytest.warns(UserWarning, match="the text has 16 tokens"):  # each call says it again
        pipe(items[0], behaviour="official")


def test_the_official_slicing_warning_is_each_calls_own_and_points_at_the_users_line(pipe):
    """The once-per-call flag lived on the pipeline, reset when iterate() was called: of two interleaved
    iterate() generators only the first warned. And stacklevel=2 pointed into the pipeline's _forward."""
    import warnings

    item = {"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "x"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = pipe.iterate([item, item], orientation="horizontal", behaviour="official", steps=1)
        second = pipe.iterate([item], orientation="horizontal", behaviour="official", steps=1)
        next(first)
        next(second)
        next(first)  # the first call's second input: said once per call already
    said = [w for w in caught if "behaviour='official'" in str(w.message)]
    assert len(said) == 2
    assert {w.filename for w in said} == {__file__}, [w.filename for w in said]


def test_cpu_offload_with_a_dtype_casts_then_offloads(monkeypatch):
    """``dtype=`` with ``cpu_offload=True`` was refused though the docs give them together: the model is cast
    first, then offloaded (accelerate and the accelerator stubbed: the hooks themselves are diffusers')."""
    import sys
    import types

    import attnzoo.pipelines.base as base
    from attnzoo.multimodal.insertion.flux import tiny_flux_fill
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    model = tiny_flux_fill(0)
    offloaded_in = []

    def enable_model_cpu_offload(device=None):
        offloaded_in.append((torch.device(device).type, model.dtype))

    monkeypatch.setitem(sys.modules, "accelerate", types.ModuleType("accelerate"))
    monkeypatch.setattr(model.pipe, "enable_model_cpu_offload", enable_model_cpu_offload, raising=False)
    monkeypatch.setattr(base, "resolve_device", lambda device: torch.device("cuda"))
    pipe = SubjectInsertionPipeline(model, device="cuda", dtype="bfloat16", cpu_offload=True)
    assert offloaded_in == [("cuda", torch.bfloat16)] and pipe.model.offloaded
    assert model.transformer.dtype == torch.bfloat16 and model.pipe.vae.dtype == torch.bfloat16
    assert model.to(dtype=torch.bfloat16) is model  # the dtype it was offloaded in: nothing to do
    with pytest.raises(InvalidInputError, match="already offloaded in torch.bfloat16"):
        model.to(dtype=torch.float32)


def test_sizes_not_divisible_by_the_packing_are_rounded_with_a_warning(tiny):
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    with pytest.warns(UserWarning, match="not a multiple of 2"):
        out = SubjectInsertionPipeline(tiny, panel_size=(15, 17), steps=1)(
            TARGET, subject=SUBJECT, mask=MASK, prompt="x"
        )
    assert out.canvas.size == (16, 32)
    assert out.settings["panel_size"] == [16, 16] and out.to_dict()["panel_size"] == [16, 16]  # the panels used


@pytest.mark.parametrize("panel_size, panels, canvas", [(65, [64, 64], (64, 128)), ("33x47", [32, 48], (48, 64))])
def test_results_record_the_panel_size_used_not_the_one_asked(tiny, panel_size, panels, canvas):
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    with pytest.warns(UserWarning, match="not a multiple of 2"):
        out = SubjectInsertionPipeline(tiny, panel_size=panel_size, steps=1)(
            TARGET, subject=SUBJECT, mask=MASK, prompt="x"
        )
    assert out.canvas.size == canvas and out.settings["panel_size"] == panels


def test_a_model_that_is_not_flux_fill_is_refused(tiny):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    from attnzoo.multimodal.insertion.flux import TINY_VAE, FluxFillModel
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    with pytest.raises(InvalidInputError, match="needs a diffusers FluxFillPipeline"):
        FluxFillModel(torch.nn.Linear(2, 2))
    odd = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(**TINY_VAE),
        transformer=torch.nn.Linear(2, 2),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    with pytest.raises(InvalidInputError, match="not a FLUX transformer"):
        SubjectInsertionPipeline(odd)
    assert SubjectInsertionPipeline.accepts(tiny.pipe) and SubjectInsertionPipeline.accepts(tiny)
    assert not SubjectInsertionPipeline.accepts(torch.nn.Linear(2, 2))
    no_text = FluxFillModel(tiny.pipe)  # the same pipeline without a stand-in encoder
    with pytest.raises(InvalidInputError, match="no text encoders"):
        SubjectInsertionPipeline(no_text, panel_size=16, steps=1)(TARGET, subject=SUBJECT, mask=MASK, prompt="x")


def test_attnzoo_pipeline_by_name(registered_flux):
    import attnzoo

    pipe = attnzoo.pipeline("subject-insertion", weights="none", panel_size=16, steps=1)
    assert pipe.weights_label == "random (seed 0)" and "flux_fill_tiny" in pipe.model.name
    assert pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="x").image.size == (40, 30)


def test_cli_run_writes_the_image_and_the_plot(registered_flux, tmp_path):
    from attnzoo.cli import main

    Image.fromarray(SUBJECT).save(tmp_path / "subject.png")
    Image.fromarray(TARGET).save(tmp_path / "target.png")
    Image.fromarray((MASK * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    common = [
        "--subject",
        str(tmp_path / "subject.png"),
        "--prompt",
        "a cat",
        "--weights",
        "none",
        "--steps",
        "1",
        "--panel-size",
        "16",
    ]
    out = tmp_path / "out"
    bad = main(
        [
            "run",
            "subject-insertion",
            str(tmp_path / "target.png"),
            "--mask",
            str(tmp_path / "subject.png"),
            *common,
            "-o",
            str(out),
        ]
    )
    assert bad == 1 and not out.exists()  # nothing half written
    assert (
        main(
            [
                "run",
                "subject-insertion",
                str(tmp_path / "target.png"),
                "--mask",
                str(tmp_path / "mask.png"),
                *common,
                "-o",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "subject-insertion" and record["weights"] == "random (seed 0)"
    (result,) = record["results"].values()
    assert result["prompt"] == "a cat" and result["method"] == "in-context-brush"
    assert Image.open(out / "target.png").width > 40


def test_loading_through_diffusers(tiny, tmp_path):
    """A saved pipeline folder loads through diffusers' from_pretrained (and by name with weights=FOLDER);
    an uncached Hub id with the Hub unreachable fails at once, saying the ways out."""
    from attnzoo.errors import OfflineError
    from attnzoo.multimodal.insertion import models
    from attnzoo.multimodal.insertion.flux import load_flux_fill

    tiny.pipe.save_pretrained(tmp_path / "tiny")
    no_text = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))  # saved without them
    loaded = load_flux_fill(tmp_path / "tiny", dtype="float32", **no_text)
    assert loaded.name == str(tmp_path / "tiny") and loaded.dtype == torch.float32
    for name, param in tiny.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[name], param), name
    assert models.flux_fill(weights=str(tmp_path / "tiny"), dtype=torch.float32, **no_text).vae_scale_factor == 1
    with pytest.raises(OfflineError, match="no cached copy|cannot reach"):
        load_flux_fill("attnzoo-tests/no-such-flux-fill")
    with pytest.raises(InvalidInputError, match="seed= only"):
        models.flux_fill(pretrained=False, dtype=torch.float16)


def test_offline_advice_names_the_setting_that_loads_each_helper_model(monkeypatch):
    """The CLIP/DINO embedders of the evaluation and the subject segmenter are not what --weights loads:
    offline, their errors say what does (not "use --weights none")."""
    import socket

    from attnzoo.errors import OfflineError
    from attnzoo.metrics.insertion import ClipEmbedder, DinoEmbedder
    from attnzoo.multimodal.insertion.segment import SubjectSegmenter

    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("a network connection was attempted"))
    for load, option in (
        (lambda: ClipEmbedder.from_name("ViT-B-32:attnzoo-tests-no-such-tag"), "--clip-model"),
        (lambda: DinoEmbedder.from_name("vit_small_patch16_224.attnzoo_tests_no_such_tag"), "--dino-model"),
        (
            lambda: SubjectSegmenter("attnzoo-tests/no-such-detector").detect(Image.new("RGB", (8, 8)), "barn"),
            "--subject-mask",
        ),
    ):
        with pytest.raises(OfflineError, match=option) as info:
            load()
        assert "--weights none" not in str(info.value)


def test_run_fill_refuses_embeddings_of_another_width(tiny):
    from attnzoo.multimodal.insertion.flux import run_fill
    from attnzoo.multimodal.insertion.in_context_brush import InsertionAttention

    canvas, mask = np.zeros((32, 16, 3), np.uint8), np.zeros((32, 16), np.uint8)
    for embeds, pooled, name in (
        (torch.zeros(1, 4, 8), torch.zeros(1, 32), "prompt_embeds must be 32 wide"),
        (torch.zeros(1, 4, 32), torch.zeros(1, 8), "pooled_prompt_embeds must be 32 wide"),
        (torch.full((1, 4, 32), float("nan")), torch.zeros(1, 32), "prompt_embeds holds NaN"),
    ):
        with pytest.raises(InvalidInputError, match=name):
            run_fill(
                tiny,
                canvas,
                mask,
                InsertionAttention(),
                orientation="vertical",
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                num_inference_steps=1,
            )


def test_seed_is_one_torch_generators_take():
    """The fill draws from Generator().manual_seed(seed) and (seed + 1): the seed must leave room for both."""
    from attnzoo.errors import InvalidOptionError
    from attnzoo.pipelines.subject_insertion import _seed

    assert _seed(0) == 0 and _seed(2**64 - 2) == 2**64 - 2
    torch.Generator().manual_seed(_seed(2**64 - 2) + 1)
    for bad in (2**64 - 1, -1, True, 1.5, "3"):
        with pytest.raises(InvalidOptionError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\)"):
            _seed(bad)


def test_settings_no_model_takes_are_refused_before_a_named_model_loads(monkeypatch, capsys):
    """FLUX.1-Fill is 34 GB: ``--steps 1000000`` was refused only after it had loaded (or failed to)."""
    import attnzoo
    import attnzoo.factory
    from attnzoo.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was built before its settings were checked")

    monkeypatch.setattr(attnzoo.factory, "create_model", no_loading)
    with pytest.raises(InvalidOptionError, match=r"steps must be an integer in \[1, 1000\]"):
        attnzoo.pipeline("subject-insertion", steps=10**6)
    with pytest.raises(InvalidOptionError, match="panel height"):
        attnzoo.pipeline("subject-insertion", panel_size="99999x8")
    assert main(["run", "subject-insertion", "t.png", "--subject", "s.png", "--steps", "1000000"]) == 2
    assert "steps must be an integer in [1, 1000]" in capsys.readouterr().err


def test_the_picture_wraps_a_long_caption_and_keeps_the_random_weights_note():
    from attnzoo.pipelines.subject_insertion import InsertionResult

    target, mask = Image.new("RGB", (512, 512), "white"), np.zeros((512, 512), bool)
    mask[300:400, 100:200] = True
    result = InsertionResult(
        image=target,
        canvas=target,
        canvas_input=target,
        canvas_mask=mask.astype(np.uint8),
        mask=mask,
        subject=Image.new("RGB", (512, 512), "white"),
        target=target,
        prompt="a small brown teddy bear sitting on the wooden bench next to the flowers in the garden",
        seed=0,
        settings={"method": "in-context-brush", "behaviour": "corrected"},
        weights="random (seed 0)",
    )
    picture = result.plot()
    footer = np.asarray(picture).astype(int)[22 + 256 :]
    assert not (footer[:, -4:].sum(-1) < 600).any()  # the caption is wrapped, not clipped at the right edge
    assert (np.abs(footer - np.array([170, 20, 20])).sum(-1) < 90).sum() > 20  # the note, whole, in red
    assert picture.height > 22 + 256 + 2 * 20
    cells = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    tiny = InsertionResult(**{**result.__dict__, "subject": Image.fromarray(cells).convert("RGB")})
    subject = np.asarray(tiny.plot())[22 : 22 + 256, 8 : 8 + 256]
    assert set(np.unique(subject)) == {0, 255}  # a 32 px subject magnified block by block, not blurred to grey


def _insertion_result(subject, target, mask):
    from attnzoo.pipelines.subject_insertion import InsertionResult

    return InsertionResult(
        image=target,
        canvas=target,
        canvas_input=target,
        canvas_mask=mask.astype(np.uint8),
        mask=mask,
        subject=subject,
        target=target,
        prompt="a cup",
        seed=0,
        settings={"method": "in-context-brush", "behaviour": "corrected"},
    )


def _ink(title, font):
    """How many pixels ``title`` inks, drawn alone as the picture draws it (at a whole-pixel place)."""
    from PIL import ImageDraw

    strip = Image.new("RGB", (400, 22), "white")
    ImageDraw.Draw(strip).text((0, 3), title, fill=(0, 0, 0), font=font)
    return int((np.asarray(strip) < 255).any(-1).sum())


def test_the_picture_keeps_titles_apart_and_panels_in_a_bounded_box():
    """A 25 px wide subject's title printed over the next one's ('subject' on 'target + mask'), and a
    2000x120 target made a picture thousands of pixels wide (every panel 256 px tall)."""
    from attnzoo.viz.drawing import load_font, text_width

    grey = (128, 128, 128)
    mask = np.zeros((120, 2000), bool)
    mask[30:90, 1000] = True  # one column: it still shows (and is outlined) in a panel a quarter of the width
    result = _insertion_result(Image.new("RGB", (25, 300), grey), Image.new("RGB", (2000, 120), grey), mask)
    picture = result.plot()
    assert picture.width <= 8 + 3 * (512 + 8) and picture.height <= 22 + 256 + 3 * 20 + 8
    font = load_font(14)
    header = (np.asarray(picture)[:22] < 255).any(-1)
    assert header.sum() == sum(_ink(title, font) for title in ("subject", "target + mask", "result"))  # apart
    panels = np.asarray(picture).astype(int)[22 : 22 + 256]
    drawn = np.flatnonzero((np.abs(panels - 255).sum(-1) > 0).any(0))
    left = np.flatnonzero(header.any(0))[0]  # where "subject" starts
    subject = drawn[drawn < left + text_width("subject", font) + 4]
    assert len(subject) == 21 and left <= subject.min() and subject.max() <= left + text_width("subject", font)
    assert (np.abs(panels - (255, 0, 0)).sum(-1) == 0).any()  # the one-column mask's outline
    for height in (64, 256):
        small = np.asarray(result.plot(height=height).convert("L"))
        content = np.flatnonzero((small[22:-60] < 250).any(1))
        assert content.max() - content.min() + 1 <= height  # the tallest panel fits the box


def test_the_mask_outline_is_thin_and_does_not_wrap_around():
    """A 20x20 target magnified 12.8x: its mask's outline was drawn at 20x20 and magnified into a
    thick frame, and np.roll set red pixels at the picture's opposite edges for a mask in the corner."""
    grey = Image.new("RGB", (20, 20), (128, 128, 128))
    mask = np.zeros((20, 20), bool)
    mask[12:, 12:] = True  # touches the bottom-right corner
    picture = np.asarray(_insertion_result(grey, grey, mask).plot()).astype(int)
    panel = picture[22 : 22 + 256, 8 + 256 + 8 : 8 + 256 + 8 + 256]  # the target's, at 256x256
    red = np.abs(panel - (255, 0, 0)).sum(-1) == 0
    start = 12 * 256 / 20  # where the mask begins on the panel (either side)
    rows, cols = np.nonzero(red)
    assert len(rows) and rows.min() >= start - 2 and cols.min() >= start - 2  # none away from the mask
    assert red.sum(1)[200] <= 3 and red.sum(0)[200] <= 3  # a thin line across the mask's middle
    assert red[200, : round(start) + 3].any() and red[: round(start) + 3, 200].any()  # outlined on both sides
    shaded = np.round(0.5 * 128 + 0.5 * np.array([255.0, 40.0, 40.0]))
    assert (panel[180:250, 180:250] == shaded).all()  # inside: shaded, not painted over


def test_a_bfloat16_mask_reads_as_its_float32_values(pipe):
    """bfloat16 has no numpy dtype: a bf16 (or float8) mask tensor is widened before it is read, as the images are."""
    expected = pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="x").mask
    for dtype in (torch.bfloat16, torch.float16):
        out = pipe(TARGET, subject=SUBJECT, mask=torch.from_numpy(MASK).to(dtype), prompt="x")
        assert np.array_equal(out.mask, expected), dtype
    chosen = box_mask(20, 24, 4, 4, 16, 20)
    out = pipe(TARGET, subject=SUBJECT, subject_mask=torch.from_numpy(chosen).bfloat16(), mask=MASK, prompt="x")
    assert np.array_equal(out.subject_mask, chosen)


def test_one_2d_mask_tensor_is_the_mask_of_every_target(pipe):
    """One [H, W] tensor mask= (or subject_mask=) for a list of targets is every target's mask, as the same mask as
    a numpy array is, not a row per target; a list of masks still gives one per target."""
    chosen = box_mask(20, 24, 4, 4, 16, 20)
    for mask in (torch.from_numpy(MASK), MASK):
        results = pipe([TARGET, TARGET], subject=SUBJECT, mask=mask, subject_mask=torch.from_numpy(chosen), prompt="x")
        assert len(results) == 2
        assert all(np.array_equal(r.mask, MASK) and np.array_equal(r.subject_mask, chosen) for r in results)
    other = box_mask(30, 40, 2, 2, 12, 12)
    alone = pipe(TARGET, subject=SUBJECT, mask=other, prompt="x").mask
    results = pipe([TARGET, TARGET], subject=SUBJECT, mask=[torch.from_numpy(MASK), other], prompt="x")
    assert np.array_equal(results[0].mask, MASK) and np.array_equal(results[1].mask, alone)
    with pytest.raises(InvalidInputError, match="3 values of mask="):
        pipe([TARGET, TARGET], subject=SUBJECT, mask=[MASK, MASK, MASK], prompt="x")


def test_one_via_region_list_per_target(pipe):
    """mask=[[regions of target 0], [regions of target 1]] gives each target its own regions (the 2-D mask rule
    read it as one mask for both, which no VIA reader takes)."""
    ellipse = {"shape_attributes": {"name": "ellipse", "cx": 20, "cy": 15, "rx": 8, "ry": 6}}
    rect = {"shape_attributes": {"name": "rect", "x": 2, "y": 2, "width": 8, "height": 6}}
    results = pipe([TARGET, TARGET], subject=SUBJECT, mask=[[ellipse], [rect]], prompt="x")
    alone = [pipe([TARGET], subject=SUBJECT, mask=[[regions]], prompt="x")[0].mask for regions in (ellipse, rect)]
    assert all(np.array_equal(r.mask, a) for r, a in zip(results, alone, strict=True))
    assert not np.array_equal(alone[0], alone[1])


def test_a_meta_tensor_mask_or_image_is_refused_by_name(pipe):
    meta = torch.from_numpy(MASK).to("meta")
    with pytest.raises(InvalidInputError, match="mask is a meta tensor: it holds no data"):
        pipe(TARGET, subject=SUBJECT, mask=meta, prompt="x")
    with pytest.raises(InvalidInputError, match="meta tensor: it holds no data"):
        pipe(torch.rand(3, 30, 40, device="meta"), subject=SUBJECT, mask=MASK, prompt="x")


def test_load_flux_fill_reads_dtype_names_as_every_dtype_is_read(tiny, tmp_path, monkeypatch):
    """dtype= takes the names every attnzoo dtype= takes ("bf16", "fp16") and refuses dtypes no model runs in
    ("int8", float8) before anything loads; None is bfloat16, the stored dtype of FLUX.1-Fill-dev."""
    from diffusers import FluxFillPipeline

    from attnzoo.multimodal.insertion.flux import load_flux_fill

    tiny.pipe.save_pretrained(tmp_path / "tiny")
    no_text = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))  # saved without them
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), (None, torch.bfloat16)):
        loaded = load_flux_fill(tmp_path / "tiny", dtype=name, **no_text)
        assert loaded.dtype == dtype and next(loaded.transformer.parameters()).dtype == dtype, name

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained ran with a refused dtype")

    monkeypatch.setattr(FluxFillPipeline, "from_pretrained", never)
    for bad in ("int8", torch.int8, "float8_e4m3fn", torch.float8_e4m3fn, "bogus"):
        with pytest.raises(InvalidInputError, match="dtype="):
            load_flux_fill(tmp_path / "tiny", dtype=bad, **no_text)


def test_one_grayscale_subject_tensor_is_every_targets_subject(pipe):
    """subject= as one [H, W] tensor (a grayscale image) with a list of targets is every target's subject, as the same
    image as a numpy array or a PIL image is, not a row per target; a 3-D tensor is one [C, H, W] image (as
    load_image reads it) and a 4-D one holds one subject per target."""
    gray = np.array(Image.fromarray(SUBJECT).convert("L"))
    expected = np.repeat(gray[..., None], 3, axis=-1)
    for subject in (torch.from_numpy(gray), gray, Image.fromarray(gray), torch.from_numpy(gray)[None]):
        results = pipe([TARGET, TARGET], subject=subject, mask=MASK, prompt="x", steps=1)
        assert len(results) == 2 and all(np.array_equal(np.asarray(r.subject), expected) for r in results)
    colour = torch.from_numpy(SUBJECT.copy()).permute(2, 0, 1)  # one RGB [C, H, W] tensor: every target's
    results = pipe([TARGET, TARGET], subject=colour, mask=MASK, prompt="x", steps=1)
    assert all(np.array_equal(np.asarray(r.subject), SUBJECT) for r in results)
    per_target = torch.stack([colour, torch.from_numpy(expected).permute(2, 0, 1)])  # [N, C, H, W]: one per target
    results = pipe([TARGET, TARGET], subject=per_target, mask=MASK, prompt="x", steps=1)
    assert np.array_equal(np.asarray(results[0].subject), SUBJECT)
    assert np.array_equal(np.asarray(results[1].subject), expected)
    results = pipe([TARGET, TARGET], subject=np.stack([expected, SUBJECT]), mask=MASK, prompt="x", steps=1)
    assert np.array_equal(np.asarray(results[0].subject), expected)
    assert np.array_equal(np.asarray(results[1].subject), SUBJECT)
    with pytest.raises(InvalidInputError, match=r"subject= is one image: a 3-D tensor is \[C, H, W\]"):
        pipe([TARGET, TARGET], subject=torch.from_numpy(np.stack([gray, gray])), mask=MASK, prompt="x")
    results = pipe([TARGET, TARGET], subject=colour[None], mask=MASK, prompt="x", steps=1)  # a batch of one: both's
    assert all(np.array_equal(np.asarray(r.subject), SUBJECT) for r in results)
    with pytest.raises(InvalidInputError, match="subject= is a 4-D tensor of 3 images"):
        pipe([TARGET, TARGET], subject=torch.stack([colour] * 3), mask=MASK, prompt="x")


def test_embeddings_with_a_batch_of_one_are_every_inputs(pipe, tiny):
    """prompt_embeds [1, S, D] / pooled_prompt_embeds [1, P] with several inputs are every input's (a batch of one
    broadcasts); a batch of one per input splits; another batch is refused naming the argument."""
    by_text = [pipe(TARGET, subject=SUBJECT, mask=MASK, prompt=p).image for p in ("a cat", "a dog")]
    assert not np.array_equal(np.asarray(by_text[0]), np.asarray(by_text[1]))  # so a swap or a broadcast would show
    (cat, cat_pooled), (dog, dog_pooled) = tiny.encode_prompt("a cat"), tiny.encode_prompt("a dog")
    for embeds, pooled in ((cat, cat_pooled), (cat[0], cat_pooled[0]), (cat.numpy(), cat_pooled.numpy())):
        results = pipe([TARGET, TARGET], subject=SUBJECT, mask=MASK, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        assert all(np.array_equal(np.asarray(r.image), np.asarray(by_text[0])) for r in results)
    both, both_pooled = torch.cat([cat, dog]), torch.cat([cat_pooled, dog_pooled])
    for pooled in (both_pooled, both_pooled.numpy()):
        results = pipe([TARGET, TARGET], subject=SUBJECT, mask=MASK, prompt_embeds=both, pooled_prompt_embeds=pooled)
        assert all(np.array_equal(np.asarray(r.image), np.asarray(t)) for r, t in zip(results, by_text, strict=True))
    with pytest.raises(InvalidInputError, match="pooled_prompt_embeds has a batch of 3 for 2 inputs"):
        pipe(
            [TARGET, TARGET],
            subject=SUBJECT,
            mask=MASK,
            prompt_embeds=cat,
            pooled_prompt_embeds=cat_pooled.repeat(3, 1),
        )
    with pytest.raises(InvalidInputError, match="prompt_embeds has a batch of 2 for 1 input: give a batch of 1"):
        pipe(TARGET, subject=SUBJECT, mask=MASK, prompt_embeds=both, pooled_prompt_embeds=cat_pooled)
    with pytest.raises(InvalidInputError, match=r"prompt_embeds must be \[batch, seq, dim\]"):
        pipe([TARGET, TARGET], subject=SUBJECT, mask=MASK, prompt_embeds=cat[None], pooled_prompt_embeds=cat_pooled)
    item = {
        "target": TARGET,
        "subject": SUBJECT,
        "mask": MASK,
        "prompt_embeds": both,
        "pooled_prompt_embeds": dog_pooled,
    }
    with pytest.raises(InvalidInputError, match=r"prompt_embeds of one input must be \[1, seq, dim\]"):
        pipe(item)


def test_one_via_region_list_is_one_targets_annotation(pipe):
    """mask=[region, region] (a VIA annotation's list of regions, which read_mask takes) for one target is its
    annotation, not one value per target; with several targets it is every target's, as a VIA dict is."""
    ellipse = {"shape_attributes": {"name": "ellipse", "cx": 20, "cy": 15, "rx": 8, "ry": 6}}
    rect = {"shape_attributes": {"name": "rect", "x": 2, "y": 2, "width": 8, "height": 6}}
    as_dict = pipe(TARGET, subject=SUBJECT, mask={"regions": [ellipse, rect]}, prompt="x", steps=1).mask
    assert as_dict[15, 20] and as_dict[5, 5] and not as_dict[28, 38]
    assert np.array_equal(pipe(TARGET, subject=SUBJECT, mask=[ellipse, rect], prompt="x", steps=1).mask, as_dict)
    one = pipe(TARGET, subject=SUBJECT, mask=[ellipse], prompt="x", steps=1).mask
    assert np.array_equal(one, pipe(TARGET, subject=SUBJECT, mask={"regions": [ellipse]}, prompt="x", steps=1).mask)
    results = pipe([TARGET, TARGET], subject=SUBJECT, mask=[ellipse, rect], prompt="x", steps=1)
    assert all(np.array_equal(r.mask, as_dict) for r in results)
    chosen = box_mask(20, 24, 4, 4, 16, 20)
    subject_regions = [{"shape_attributes": {"name": "rect", "x": 4, "y": 4, "width": 15, "height": 11}}]
    out = pipe(TARGET, subject=SUBJECT, subject_mask=subject_regions, mask=MASK, prompt="x", steps=1)
    assert np.array_equal(out.subject_mask, chosen)


def test_the_largest_seed_runs_and_run_fill_refuses_what_torch_cannot_seed(pipe, tiny):
    """The fill draws from seed and seed + 1: the pipeline's largest seed, 2**64 - 2, runs end to end; run_fill
    given a seed torch overflows on (2**64 - 1 with blending) or wraps (-1) refuses it with the pipeline's range."""
    from attnzoo.multimodal.insertion.flux import run_fill
    from attnzoo.multimodal.insertion.in_context_brush import InsertionAttention

    out = pipe(TARGET, subject=SUBJECT, mask=MASK, prompt="x", seed=2**64 - 2, steps=1)
    assert out.seed == 2**64 - 2 and out.settings["blend"] is True and out.to_dict()["seed"] == 2**64 - 2
    embeds, pooled = tiny.encode_prompt("x")
    canvas, mask = np.zeros((32, 16, 3), np.uint8), np.zeros((32, 16), np.uint8)
    mask[20:28, 4:12] = 255
    kwargs = dict(orientation="vertical", prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=1)
    for seed, blend, upper in ((2**64 - 1, True, r"2\*\*64 - 1\)"), (-1, False, r"2\*\*64\)"), (2**64, False, "")):
        with pytest.raises(InvalidOptionError, match=rf"seed must be an integer in \[0, {upper}"):
            run_fill(tiny, canvas, mask, InsertionAttention(), seed=seed, blend=blend, **kwargs)
    run_fill(tiny, canvas, mask, InsertionAttention(), seed=2**64 - 1, blend=False, **kwargs)
