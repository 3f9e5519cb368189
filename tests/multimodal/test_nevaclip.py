"""NevaClip: official parity (fixture from NeVA.py::NeVAWrapper on a tiny open_clip RN tower),
the foveation formulas against independent numpy/scipy computations, pixel mapping, open_clip
preprocessing, batched == one-at-a-time scanpaths, RNG modes, caption targets and bad input."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attnzoo.errors import InvalidInputError, UnknownNameError
from attnzoo.multimodal import nevaclip as N
from tests.scanpath_helpers import make_sensitive_, register_tiny_open_clip
from tests.scanpath_helpers import tiny_clip as make_tiny_clip
from tests.vision._reference import load_fixture, manual_seed

# -- helpers -------------------------------------------------------------------------------


# one_thread (tests/conftest.py): the models are tiny: one thread is as fast, and two stall each other when other work
# shares the cores (the full parity run took 173 s with two threads on a loaded 2-core machine, 11 s with one). The
# fixture was made with two threads; one changes the last bits (< 1e-6, config.json's determinism), inside its
# tolerance, and no discrete decision (its loop margins are >= 1e-5).
pytestmark = pytest.mark.usefixtures("one_thread")


def fixture_tower(cfg, state_dict):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    oc = cfg["constructor_kwargs"]["downstream_model"]["open_clip_model_cfg"]
    tower = _build_vision_tower(oc["embed_dim"], CLIPVisionCfg(**oc["vision_cfg"]))
    tower.load_state_dict(state_dict)
    return tower.eval()


def fixture_neva(cfg):
    """Our NevaClip's settings from the fixture's (official main.py) hyper-parameters."""
    kw = cfg["constructor_kwargs"]["NeVAWrapper"]
    return {
        "foveation_sigma": kw["foveation_sigma"],
        "blur_filter_size": kw["blur_filter_size"],
        "blur_sigma": kw["blur_sigma"],
        "amplitude": kw["foveation_aggregation"],
    }


def sensitive_tower(image_size=64, seed=0, embed_dim=32):
    """A tiny open_clip ModifiedResNet whose output depends on the image (He-init convs, BN stats
    calibrated), so the search's decisions are not decided by rounding noise."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(seed)
    tower = _build_vision_tower(embed_dim, CLIPVisionCfg(image_size=image_size, layers=[1, 1, 1, 1], width=8))
    make_sensitive_(tower, seed, image_size)
    return tower


def smooth_images(n, size=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, 3, size, size, generator=gen), 7, 1, 3) * 3


@pytest.fixture(scope="module")
def tower():
    return sensitive_tower()


@pytest.fixture(scope="module")
def tiny_clip():
    """A tiny open_clip CLIP (RN visual + 1-layer text transformer, the real BPE vocabulary)."""
    return make_tiny_clip(0, image_size=64, embed_dim=32)


# -- parity with the official code ---------------------------------------------------------


@pytest.mark.parity
def test_blur_and_foveation_parity(reference_dir):
    f = load_fixture(reference_dir, "nevaclip")
    kw = f.cfg["constructor_kwargs"]["NeVAWrapper"]
    x, out = f.inputs["x"], f.outputs
    torch.testing.assert_close(
        N.gaussian_blur_difference(x, kw["blur_filter_size"], kw["blur_sigma"]), out["blur"], **f.tolerance
    )
    mask = N.foveation_mask(f.inputs["probe_pos"], kw["image_size"], kw["foveation_sigma"], kw["foveation_aggregation"])
    torch.testing.assert_close(mask, out["foveation_probe"], **f.tolerance)


@pytest.mark.parity
def test_forward_loss_and_gradient_parity(reference_dir):
    f = load_fixture(reference_dir, "nevaclip")
    kw = f.cfg["constructor_kwargs"]["NeVAWrapper"]
    tower = fixture_tower(f.cfg, f.state_dict)
    x, text, out = f.inputs["x"], f.inputs["text_embedding"], f.outputs
    size, tol = kw["image_size"], f.tolerance
    blur = N.gaussian_blur_difference(x, kw["blur_filter_size"], kw["blur_sigma"])
    memory = torch.zeros(x.shape[0], 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), out["visual_out_clean"], **tol)
        probe = N.foveation_mask(f.inputs["probe_pos"], size, kw["foveation_sigma"])
        torch.testing.assert_close(tower(N.foveate(x, blur, memory, probe)), out["visual_out_probe"], **tol)
    pos = torch.zeros(x.shape[0], 2, 1, 1, requires_grad=True)
    y = tower(N.foveate(x, blur, memory, N.foveation_mask(pos, size, kw["foveation_sigma"])))
    loss = 1 - F.cosine_similarity(y, text, 1)  # utils.cosine_sim
    (grad,) = torch.autograd.grad(loss.mean(), pos)
    torch.testing.assert_close(y, out["visual_out_p0"], **tol)
    torch.testing.assert_close(loss, out["loss_p0"], **tol)
    torch.testing.assert_close(grad, out["grad_p0"], **tol)


@pytest.mark.parity
@pytest.mark.parametrize("mode", ["scanpath", "scanpath_norestart"])
def test_scanpath_parity(reference_dir, mode):
    """The whole official trace (every step, every inner iteration), official RNG mode seeded as the fixture's
    runs were; every setting from config.json. One thread makes it fast enough for every run (~6 s)."""
    f = load_fixture(reference_dir, "nevaclip")
    run = f.cfg["constructor_kwargs"]["run_optimization"]
    steps = run["scanpath_length"]
    model = N.NevaClip(visual=fixture_tower(f.cfg, f.state_dict), **fixture_neva(f.cfg))
    result = model.predict(
        f.inputs["x"],
        f.inputs["text_embedding"],
        fixations=steps,
        iterations=run["opt_iterations"],
        lr=run["learning_rate"],
        forgetting=f.cfg["constructor_kwargs"]["NeVAWrapper"]["forgetting"],
        random_restarts=mode == "scanpath",  # scanpath_norestart: run_optimization(..., random_restarts=False)
        seed=manual_seed(f.cfg["rng"]),
        rng="official",
        return_traces=True,
        progress=False,
    )
    out = f.outputs
    assert out[f"{mode}.pos_trace"].shape[:2] == (steps, run["opt_iterations"])
    exact = {"atol": 1e-6, "rtol": 0.0}  # suggested_tolerance["scanpath"]: exact up to float rounding
    torch.testing.assert_close(result.pos_trace, out[f"{mode}.pos_trace"], **exact)
    torch.testing.assert_close(result.loss_trace, out[f"{mode}.loss_trace"], **f.tolerance)
    torch.testing.assert_close(result.positions, out[mode], **exact)


@pytest.mark.parity
def test_preprocessing_parity(reference_dir):
    f = load_fixture(reference_dir, "nevaclip")
    inputs = f.inputs
    images = [inputs[f"image_uint8.{i}"].numpy() for i in range(inputs["x"].shape[0])]
    x, sizes = N.preprocess_images(images, f.cfg["constructor_kwargs"]["NeVAWrapper"]["image_size"])
    torch.testing.assert_close(x, inputs["x"], **f.tolerance)
    assert sizes == [(im.shape[1], im.shape[0]) for im in images]


# -- foveation formulas --------------------------------------------------------------------


def test_gaussian_window_is_the_normalised_outer_product():
    size, sigma = 9, 2.5
    taps = np.exp(-((np.arange(size) - 4) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    np.testing.assert_allclose(N.gaussian_window(size, sigma).numpy(), np.outer(taps, taps), rtol=1e-6, atol=1e-8)
    with pytest.raises(InvalidInputError, match="odd"):
        N.gaussian_window(4, 1.0)


def test_blur_difference_matches_scipy_mirror_filter():
    from scipy import ndimage

    x = torch.randn(2, 3, 30, 26, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    window = N.gaussian_window(9, 3.0).double().numpy()
    expected = np.stack([[ndimage.correlate(c, window, mode="mirror") for c in im] for im in x.numpy()]) - x.numpy()
    np.testing.assert_allclose(N.gaussian_blur_difference(x, 9, 3.0).numpy(), expected, atol=1e-6)
    # a constant image has nothing to blur
    assert N.gaussian_blur_difference(torch.full((1, 3, 50, 50), 0.7), 41, 10.0).abs().max() < 1e-5
    with pytest.raises(InvalidInputError):
        N.gaussian_blur_difference(torch.zeros(3, 50, 50))


def test_foveation_mask_formula_and_orientation():
    size, sigma = 11, 0.2
    pos = torch.tensor([[-1.0, 1.0], [0.3, -0.5]])
    grid = np.linspace(-1, 1, size)
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    expected = np.stack([np.exp(-((rows - p0) ** 2 + (cols - p1) ** 2) / sigma) for p0, p1 in pos.numpy()])[:, None]
    mask = N.foveation_mask(pos, size, sigma)
    assert mask.shape == (2, 1, size, size)
    np.testing.assert_allclose(mask.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert mask[0, 0].argmax() == size - 1  # p0 = -1: top row; p1 = 1: right column
    torch.testing.assert_close(N.foveation_mask(pos[:, :, None, None], size, sigma, 0.5), 0.5 * mask)


def test_foveate_and_memory_update():
    x, blur = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    zero, one = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    torch.testing.assert_close(N.foveate(x, blur, zero, zero), x + blur)  # nothing fixated: fully blurred
    torch.testing.assert_close(N.foveate(x, blur, zero, one), x)  # fixated everywhere: sharp
    torch.testing.assert_close(N.foveate(x, blur, one, one), x)  # 1 - 2 is clipped to 0, not negative
    half = torch.full((1, 1, 8, 8), 0.25)
    torch.testing.assert_close(N.foveate(x, blur, half, half), x + 0.5 * blur)
    torch.testing.assert_close(N.update_memory(half, one, 0.0), one)
    torch.testing.assert_close(N.update_memory(half, one, 0.7), 0.175 + one)


# -- coordinates and preprocessing ---------------------------------------------------------


def test_fixations_to_pixels_by_hand():
    corners = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
    # 448x448 -> 224x224 (scale 2, no crop): crop pixel 0 is original pixels [0, 2), centre 1.0
    np.testing.assert_allclose(N.fixations_to_pixels(corners, (448, 448)), [[1.0, 1.0], [447.0, 447.0], [224.0, 224.0]])
    # 320x256 -> 280x224 (long side truncated), crop left = round(56 / 2) = 28: the centre maps to the centre
    xy = N.fixations_to_pixels(corners, (320, 256))
    np.testing.assert_allclose(xy[2], [160.0, 128.0])
    np.testing.assert_allclose(xy[0], [(28 + 0.5) * 320 / 280, 0.5 * 256 / 224])
    # portrait 203x301: resized to 224x332 (int(224 * 301 / 203) = 332), top = round(108 / 2) = 54
    np.testing.assert_allclose(N.fixations_to_pixels(corners[:1], (203, 301)), [[0.5 * 203 / 224, 54.5 * 301 / 332]])
    with pytest.raises(InvalidInputError):
        N.fixations_to_pixels(torch.zeros(3, 3), (10, 10))
    with pytest.raises(InvalidInputError, match="resize_mode"):
        N.fixations_to_pixels(corners, (10, 10), resize_mode="crop")
    # longest: 400x200 -> 224x112 padded by 56 rows above; the top-left corner of the square is padding
    np.testing.assert_allclose(
        N.fixations_to_pixels(corners[:1], (400, 200), resize_mode="longest"), [[0.5 * 400 / 224, 0.0]]
    )


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("width, height, dot", [(500, 333, (351, 95)), (333, 500, (40, 300)), (1024, 768, (700, 100))])
def test_fixations_to_pixels_finds_a_marker_through_the_real_transform(width, height, dot, mode):
    """A Gaussian spot centred on a known point; its centroid in the preprocessed image, mapped
    back, lands on that point (a mapping without pixel-centre alignment is off by up to 1.2 px here),
    for each of open_clip's resize modes (SigLIP models squash, some pad)."""
    new_w, new_h, _, _ = N._resize_geometry(width, height, 224, mode)
    scale = max(width / new_w, height / new_h)  # original pixels per model pixel
    sigma = 2.0 * scale  # two model pixels wide whatever the resize, so the centroid stays precise
    yy, xx = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    spot = np.exp(-((xx - dot[0] - 0.5) ** 2 + (yy - dot[1] - 0.5) ** 2) / (2 * sigma**2))
    picture = np.repeat(np.round(spot * 255).astype(np.uint8)[..., None], 3, axis=2)
    x, sizes = N.preprocess_images([picture], resize_mode=mode)
    grey = x[0].sum(0).double()
    weight = grey - grey[grey.argmin() // 224, :].median()  # black background (also the padding) -> 0
    peak_r, peak_c = divmod(int(weight.argmax()), 224)
    win = slice(max(peak_r - 8, 0), peak_r + 9), slice(max(peak_c - 8, 0), peak_c + 9)
    w = weight[win].clamp(min=0)
    rows, cols = torch.meshgrid(
        torch.arange(224, dtype=torch.float64)[win[0]], torch.arange(224, dtype=torch.float64)[win[1]], indexing="ij"
    )
    row, col = (w * rows).sum() / w.sum(), (w * cols).sum() / w.sum()
    rel = torch.stack([row / 223 * 2 - 1, col / 223 * 2 - 1])[None]
    np.testing.assert_allclose(N.fixations_to_pixels(rel, sizes[0], resize_mode=mode)[0], np.array(dot) + 0.5, atol=0.1)


def test_preprocess_matches_open_clip_for_any_mode_and_size(tmp_path):
    from open_clip.transform import image_transform

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (203, 301, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    grey.save(tmp_path / "g.png")
    x, sizes = N.preprocess_images([rgb, tmp_path / "g.png", np.asarray(rgb).astype(np.uint16) * 257])
    reference = image_transform(224, is_train=False, mean=N.OPENAI_DATASET_MEAN, std=N.OPENAI_DATASET_STD)
    torch.testing.assert_close(x[0], reference(rgb))
    torch.testing.assert_close(x[1], reference(grey.convert("RGB")))
    torch.testing.assert_close(x[2], x[0])  # 16-bit scaled to the same 8-bit picture
    assert sizes == [(301, 203)] * 3


# -- the search ----------------------------------------------------------------------------


def _stuck_counts(result):
    """Per sample, how many iterations did not improve on the best loss (each one draws)."""
    trace = result.loss_trace  # [T, I, B]
    best = torch.cummin(trace, dim=1).values
    return ((trace[:, 1:] >= best[:, :-1]).sum((0, 1))).tolist()


@pytest.mark.parametrize("restarts", [True, False])
def test_batched_per_sample_equals_one_at_a_time(tower, restarts):
    model = N.NevaClip(visual=tower)
    x, target = smooth_images(3), torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    seeds = [7, 8, 9]
    kw = {"fixations": 3, "iterations": 6, "random_restarts": restarts, "return_traces": True}
    batched = model.predict(x, target, seed=seeds, **kw)
    assert all(n > 0 for n in _stuck_counts(batched))  # every sample drew restarts
    for i in range(3):
        alone = model.predict(x[i : i + 1], target[i], seed=seeds[i], **kw)
        assert torch.equal(batched.positions[i], alone.positions[0])
        assert torch.equal(batched.pos_trace[:, :, i], alone.pos_trace[:, :, 0])


def test_per_sample_batch_of_one_is_the_official_draw(tower):
    model = N.NevaClip(visual=tower)
    x, target = smooth_images(1), torch.randn(1, 32, generator=torch.Generator().manual_seed(5))
    kw = {"fixations": 2, "iterations": 6, "return_traces": True}
    per_sample = model.predict(x, target, seed=4, rng="per_sample", **kw)
    official = model.predict(x, target, seed=4, rng="official", **kw)
    torch.manual_seed(4)  # the official protocol: global RNG seeded right before the run
    global_rng = model.predict(x, target, seed=None, rng="official", **kw)
    assert _stuck_counts(per_sample)[0] > 0
    assert torch.equal(per_sample.pos_trace, official.pos_trace) and torch.equal(
        official.pos_trace, global_rng.pos_trace
    )
    assert torch.equal(per_sample.positions, official.positions)


def test_best_position_is_the_one_after_the_sign_step_and_restarts_stay_in_range(tower):
    model = N.NevaClip(visual=tower)
    x, target = smooth_images(2), torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    iterations, lr = 6, 0.1
    result = model.predict(x, target, fixations=3, iterations=iterations, lr=lr, return_traces=True)
    # iteration 0 always improves on +inf, so iteration 1 is fed (0, 0) - lr * sign(grad)
    assert torch.allclose(result.pos_trace[:, 1].abs(), torch.full_like(result.pos_trace[:, 1], lr))
    torch.testing.assert_close(result.losses, result.loss_trace.min(1).values.T)
    checked = 0
    for t in range(3):
        for b in range(2):
            k = int(result.loss_trace[t, :, b].argmin())  # first minimum: the last strict improvement
            if k + 1 < iterations:  # the official quirk: "best" is where that iteration's sign step went
                assert torch.equal(result.positions[b, t], result.pos_trace[t, k + 1, b])
                assert not torch.equal(result.positions[b, t], result.pos_trace[t, k, b])
                checked += 1
    assert checked > 0
    assert (result.positions.abs() <= 1 + lr + 1e-6).all()


def test_second_target_is_blended_in_with_the_official_weight(tower):
    model = N.NevaClip(visual=tower)
    gen = torch.Generator().manual_seed(3)
    x, first, second = smooth_images(1), torch.randn(1, 32, generator=gen), torch.randn(1, 32, generator=gen)
    blended = model.predict(x, first, second_target=second, fixations=2, iterations=3, return_traces=True)
    only_second = model.predict(x, second, fixations=1, iterations=3)
    assert torch.equal(blended.positions[:, 0], only_second.positions[:, 0])  # step 0: weight 0 on the target
    # step 1 starts at (0, 0) with memory = the first fixation; its loss uses 0.25 * first + 0.75 * second
    blur = N.gaussian_blur_difference(x)
    memory = N.foveation_mask(blended.positions[:, 0], 64)
    with torch.no_grad():
        out = tower(N.foveate(x, blur, memory, N.foveation_mask(torch.zeros(1, 2), 64)))
    expected = 1 - F.cosine_similarity(out, 0.25 * first + 0.75 * second, 1)
    torch.testing.assert_close(blended.loss_trace[1, 0], expected)


def test_parameters_stay_frozen_and_untouched(tower):
    model = N.NevaClip(visual=tower)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    model.predict(smooth_images(1), torch.randn(32), fixations=1, iterations=2)
    assert not any(p.requires_grad for p in tower.parameters()) and all(p.grad is None for p in tower.parameters())
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())


def test_float64_and_vit_towers():
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(0)
    vit = _build_vision_tower(16, CLIPVisionCfg(image_size=64, patch_size=16, width=32, layers=1, head_width=16))
    model = N.NevaClip(visual=vit, dtype=torch.float64)
    result = model.predict(
        smooth_images(2).double(), torch.randn(2, 16, dtype=torch.float64), fixations=2, iterations=3
    )
    assert result.positions.shape == (2, 2, 2) and result.positions.dtype == torch.float64
    assert torch.isfinite(result.losses).all()


def test_device_and_dtype_are_checked_as_a_pipelines_are():
    """A named model is built lazily, so a device or dtype that cannot work must fail at construction."""
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA"):
            N.NevaClip(device="cuda")
    for bad in ({"device": "meta"}, {"dtype": torch.int8}, {"dtype": torch.complex64}, {"dtype": "float13"}):
        with pytest.raises(InvalidInputError):
            N.NevaClip(**bad)
    assert N.NevaClip(dtype="fp16", device=-1).dtype == torch.float16  # names and ints, as a pipeline takes them


def test_to_takes_a_device_or_dtype_positionally_as_a_module_does():
    tower = sensitive_tower(embed_dim=16)
    model = N.NevaClip(visual=tower)
    assert model.to(torch.float64) is model and model.dtype == torch.float64
    assert next(tower.parameters()).dtype == torch.float64
    model.to("cpu", torch.float16)
    assert model.dtype == torch.float16 and next(tower.parameters()).dtype == torch.float16
    model.to(torch.zeros(1, dtype=torch.bfloat16))  # a tensor's device and dtype
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    model.to(dtype="float32")
    assert next(tower.parameters()).dtype == torch.float32
    for args, kwargs in [
        ((torch.int8,), {}),
        (("meta",), {}),
        (("cpu", torch.float32, "x"), {}),
        ((), {"dtype": "f13"}),
    ]:
        with pytest.raises(InvalidInputError):
            model.to(*args, **kwargs)
    assert (model.dtype, model.device) == (torch.float32, torch.device("cpu"))  # a refused call moves nothing
    assert next(tower.parameters()).dtype == torch.float32


class _TowerElsewhere(torch.nn.Module):
    """A stand-in tower whose weights say they are on ``where`` (a GPU, without one here): ``to`` records where it
    is sent instead of moving (NevaClip reads a given model's device from its parameters)."""

    class _Weight:
        def __init__(self, tower):
            self.tower, self.is_meta = tower, False

        @property
        def device(self):
            return self.tower.where

        def requires_grad_(self, _):
            return self

    def __init__(self, where):
        super().__init__()
        self.where, self.moves = torch.device(where), []

    def named_parameters(self, *args, **kwargs):
        yield "weight", self._Weight(self)

    def parameters(self, *args, **kwargs):
        yield self._Weight(self)

    def to(self, *args, device=None, **kwargs):
        self.moves.append(device)
        self.where = device if device is not None else self.where
        return self


def test_a_given_clip_stays_on_its_own_device_unless_device_names_another():
    """NevaClip(model=cuda_clip) without device= moved the user's CLIP to the CPU; as with a transformers or
    open_clip model, it now stays where its parameters are, and device= still moves it."""
    tower = _TowerElsewhere("cuda:3")
    neva = N.NevaClip(visual=tower, dtype="float32")
    assert neva.device == torch.device("cuda:3")
    assert tower.where == torch.device("cuda:3") and set(tower.moves) == {torch.device("cuda:3")}  # never moved away
    moved = _TowerElsewhere("cuda:3")
    assert N.NevaClip(visual=moved, dtype="float32", device="cpu").device == torch.device("cpu")
    assert moved.where == torch.device("cpu")  # device= given: moved as asked
    real = sensitive_tower(embed_dim=16)
    assert N.NevaClip(visual=real).device == next(real.parameters()).device
    assert N.NevaClip(pretrained=None).device == torch.device("cpu")  # a CLIP loaded by name: built on the CPU


def test_a_clip_on_the_meta_device_is_refused_naming_the_weight():
    """A CLIP built without weights (``device="meta"``) was torch's bare ``NotImplementedError: Cannot copy out of
    meta tensor`` from moving it; it has nothing to run, with or without device=."""
    tower = sensitive_tower(embed_dim=16).to("meta")
    for kwargs in ({}, {"device": "cpu"}):
        with pytest.raises(InvalidInputError, match=r"^visual's parameter \S+ is a meta tensor: .*load real weights"):
            N.NevaClip(visual=tower, **kwargs)


@pytest.mark.gpu
def test_a_clip_on_the_gpu_stays_there():
    tower = sensitive_tower(embed_dim=16).cuda()
    neva = N.NevaClip(visual=tower)
    assert neva.device.type == "cuda" and next(tower.parameters()).is_cuda
    assert N.NevaClip(visual=tower, device="cpu").device == torch.device("cpu") and not next(tower.parameters()).is_cuda


def test_a_given_clip_keeps_its_own_dtype_and_searches_in_it():
    """A bf16 or fp16 CLIP handed over stays in its dtype (it used to be cast to float32 in place: the user's own
    module changed); dtype= still casts, a pipeline without dtype= keeps it, and the search in the tower's dtype
    stays finite, starts where the float32 one does and keeps its positions and losses float32."""
    import open_clip

    import attnzoo

    tokenizer = open_clip.get_tokenizer("RN50")
    x, captions = smooth_images(2), ["a cat sitting on a sofa", "a red car"]
    kw = {"fixations": 2, "iterations": 3, "return_traces": True}
    reference = N.NevaClip(model=make_tiny_clip(0, image_size=64, embed_dim=32), tokenizer=tokenizer)
    wide = reference.predict(x, captions, **kw)
    for dtype in (torch.bfloat16, torch.float16):
        clip = make_tiny_clip(0, image_size=64, embed_dim=32).to(dtype)
        model = N.NevaClip(model=clip, tokenizer=tokenizer)
        assert model.dtype == dtype and {p.dtype for p in clip.parameters()} == {dtype}
        narrow = model.predict(x, captions, **kw)
        assert narrow.positions.dtype == torch.float32 and narrow.losses.dtype == torch.float32
        assert torch.isfinite(narrow.losses).all() and narrow.positions.abs().max() <= 1
        # the first step of the first fixation looks at the same place in both: the same loss, up to rounding
        torch.testing.assert_close(narrow.loss_trace[0, 0], wide.loss_trace[0, 0], atol=0.05, rtol=0)
        assert (narrow.losses <= narrow.loss_trace[:, 0].T).all()  # each fixation keeps its best step
        attnzoo.pipeline("scanpath", model=model, device="cpu")
        assert model.dtype == dtype and next(clip.parameters()).dtype == dtype  # the pipeline keeps it too
        assert N.NevaClip(visual=clip.visual, dtype="float32").dtype == torch.float32
        assert next(clip.visual.parameters()).dtype == torch.float32  # dtype= given: cast as asked
    assert N.NevaClip(pretrained=None).dtype == torch.float32  # a CLIP loaded by name: float32


def test_a_clip_mixing_parameter_dtypes_is_not_cast_to_its_first_ones():
    """open_clip's low-precision towers keep their norms in float32: taking the first parameter's float16 for the
    whole module cast the norms in place; a mix runs in float32, as before."""
    import open_clip

    clip = make_tiny_clip(0, image_size=64, embed_dim=32)
    first = next(p for p in clip.visual.parameters() if p.is_floating_point())
    first.data = first.data.half()
    model = N.NevaClip(visual=clip.visual, tokenizer=open_clip.get_tokenizer("RN50"))
    assert model.dtype == torch.float32


# -- captions and pictures -----------------------------------------------------------------


def test_caption_targets_equal_their_open_clip_embeddings(tiny_clip):
    import open_clip

    tokenizer = open_clip.get_tokenizer("RN50")
    model = N.NevaClip(model=tiny_clip, tokenizer=tokenizer)
    captions = ["a cat sitting on a sofa", "two people walking on a beach"]
    with torch.no_grad():
        embedding = tiny_clip.encode_text(tokenizer(captions))  # un-normalised, as main.py
    x = smooth_images(1)
    kw = {"fixations": 2, "iterations": 3}
    from_text = model.predict(x, captions, **kw)  # one image, two captions
    from_embedding = model.predict(x.expand(2, -1, -1, -1), embedding, **kw)
    assert from_text.positions.shape == (2, 2, 2)
    assert torch.equal(from_text.positions, from_embedding.positions)
    single = model.predict(x, captions[1], **kw)
    assert torch.equal(single.positions[0], from_text.positions[1])


def test_pictures_in_pixels_out(tiny_clip, photo, tmp_path):
    photo.save(tmp_path / "p.png")
    model = N.NevaClip(model=tiny_clip)
    result = model.predict([tmp_path / "p.png", np.asarray(photo)], torch.randn(32), fixations=3, iterations=2)
    assert len(result.xy) == 2 and result.xy[0].shape == (3, 2)
    for i in range(2):
        np.testing.assert_allclose(result.xy[i], N.fixations_to_pixels(result.positions[i], photo.size, 64))
    assert torch.equal(result.positions[0], result.positions[1])  # same picture, same target seed, same search


def test_bad_input_is_refused_with_a_clear_message(tiny_clip, tower):
    import open_clip

    model = N.NevaClip(model=tiny_clip, tokenizer=open_clip.get_tokenizer("RN50"))
    x = smooth_images(1)
    long_caption = " ".join(["word"] * 100)
    with pytest.raises(InvalidInputError, match=r"102 tokens long.*context is 77.*truncate=True"):
        model.predict(x, long_caption, fixations=1, iterations=1)
    assert model.predict(x, long_caption, truncate=True, fixations=1, iterations=1).positions.shape == (1, 1, 2)
    with pytest.raises(InvalidInputError, match="empty"):
        model.predict(x, "   ", fixations=1, iterations=1)
    with pytest.raises(InvalidInputError, match="dimension 10 but the vision tower outputs 32"):
        model.predict(x, torch.randn(10), fixations=1, iterations=1)
    with pytest.raises(InvalidInputError, match="pre-processed batch"):
        model.predict(x[0], torch.randn(32), fixations=1, iterations=1)
    with pytest.raises(InvalidInputError, match=r"\[B, 3, 64, 64\]"):
        model.predict(torch.zeros(1, 3, 32, 32), torch.randn(32), fixations=1, iterations=1)
    with pytest.raises(InvalidInputError, match="HxW"):
        model.predict(np.zeros((2, 8, 8, 3), np.uint8), torch.randn(32), fixations=1, iterations=1)
    with pytest.raises(InvalidInputError, match="2 targets for a batch of 3"):
        model.predict(smooth_images(3), torch.randn(2, 32), fixations=1, iterations=1)
    with pytest.raises(InvalidInputError, match="rng must be"):
        model.predict(x, torch.randn(32), rng="global")
    with pytest.raises(InvalidInputError, match="list of 1 ints"):
        model.predict(x, torch.randn(32), seed=[1, 2])
    with pytest.raises(InvalidInputError, match="no text encoder"):
        N.NevaClip(visual=tower).predict(x, "a caption")
    with pytest.raises(InvalidInputError, match="images is a meta tensor: it holds no data"):
        model.predict(x.to("meta"), torch.randn(32), fixations=1, iterations=1)
    with pytest.raises(InvalidInputError, match="fixations is a meta tensor: it holds no data"):
        N.fixations_to_pixels(torch.zeros(3, 2, device="meta"), (64, 64), 64)


@pytest.mark.parametrize(
    "target, match",
    [
        (torch.full((32,), float("nan")), "NaN or infinite"),
        (torch.tensor([float("inf")] + [0.0] * 31), "NaN or infinite"),
        (torch.full((32,), 1e39, dtype=torch.float64), "NaN or infinite"),  # overflows the float32 search
        (torch.zeros(32), "zero vector"),
        (np.zeros((2, 32)), "zero vector"),
        (torch.zeros(1, 0), r"\[D\] or \[N, D\]"),
        (torch.ones(32, dtype=torch.complex64), "real numbers"),
        (torch.ones(32, dtype=torch.bool), "real numbers"),
        (np.array(["a"] * 32), "real numbers"),
        ([torch.ones(32), torch.ones(31)], "one size"),
        (torch.ones(32, device="meta"), "target_?s? embedding is a meta tensor: it holds no data"),
        ([torch.ones(32, device="meta")], "meta tensor: it holds no data"),
    ],
)
def test_targets_without_a_direction_are_refused(tower, target, match):
    """A NaN, infinite or zero target used to give the image centre (every step's loss NaN, nothing improves)."""
    model = N.NevaClip(visual=tower)
    with pytest.raises(InvalidInputError, match=match):
        model.predict(smooth_images(1), target, fixations=1, iterations=1)
    with pytest.raises(InvalidInputError, match=match):
        model.predict(smooth_images(1), torch.randn(32), second_target=target, fixations=1, iterations=1)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"fixations": 0}, r"fixations must be an integer in \[1, 1000\]"),
        ({"fixations": True}, r"fixations must be an integer in \[1, 1000\]"),
        ({"fixations": 10**9}, r"fixations must be an integer in \[1, 1000\] \(human scanpaths hold tens"),
        ({"iterations": 1.0}, r"iterations must be an integer in \[1, 10000\]"),
        ({"iterations": 10**6}, r"iterations must be an integer in \[1, 10000\] \(gradient steps"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"lr": 10**400}, r"lr must be a positive finite number \(the sign-gradient step"),  # was an OverflowError
        ({"forgetting": 2}, r"forgetting must be a number in \[0, 1\] \(the share of earlier fixations"),
        ({"forgetting": -0.5}, "forgetting"),
        ({"forgetting": float("nan")}, "forgetting"),
        ({"random_restarts": 1}, "random_restarts"),
        ({"seed": True}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_search_settings_that_cannot_mean_anything_are_refused(tower, settings, match):
    with pytest.raises(InvalidInputError, match=match):
        N.NevaClip(visual=tower).predict(
            smooth_images(1), torch.randn(32), **{"fixations": 1, "iterations": 1, **settings}
        )


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_over_the_fixations_on_a_terminal_only(tower, monkeypatch):
    model = N.NevaClip(visual=tower)
    x, target = smooth_images(2), torch.randn(32)
    for stream, progress, shown in (
        (_Terminal(), True, True),
        (_Terminal(), False, False),
        (io.StringIO(), True, False),
    ):
        monkeypatch.setattr(sys, "stderr", stream)
        model.predict(x, target, fixations=3, iterations=2, progress=progress)
        text = stream.getvalue()
        assert ("NevaClip search (2 images)" in text) == shown, text
        if shown:
            assert "/3 [" in text and "iteration 1/2" in text  # 3 fixation steps, 2 iterations each


def test_named_model_loads_lazily_and_unknown_names_fail_fast():
    model = N.NevaClip()  # the paper's RN50 / openai: nothing is built or downloaded yet
    assert model._visual is None and (model.model_name, model.pretrained) == ("RN50", "openai")
    with pytest.raises(UnknownNameError, match="RN5O"):
        _ = N.NevaClip("RN5O").visual


def test_package_import_is_cheap():
    code = (
        "import sys, attnzoo; had = 'open_clip' in sys.modules; import attnzoo.multimodal as m; "
        "assert had or 'open_clip' not in sys.modules; print(m.NevaClip.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "NevaClip", out.stderr


@pytest.fixture
def tiny_open_clip_name(monkeypatch):
    """A tiny RN CLIP registered under an open_clip model name for one test (random init only: no weights exist)."""
    return register_tiny_open_clip(monkeypatch)


def test_a_random_named_clip_is_drawn_from_the_rng_state_at_construction(tiny_open_clip_name):
    """The named CLIP is built on first use; with random weights it is the CLIP an eager build at construction
    would draw, whatever the global RNG went through in between, and the build leaves the caller's RNG alone."""
    import open_clip

    def weights(model):
        return {k: v.clone() for k, v in model._module.state_dict().items()}

    built = []
    for advance in (1, 1000):
        torch.manual_seed(7)
        model = N.NevaClip(tiny_open_clip_name, pretrained=None)
        assert model._visual is None
        torch.rand(advance)
        before = torch.random.get_rng_state()
        model.encode_captions(["a dog"])  # the first use builds the CLIP
        built.append((weights(model), torch.equal(torch.random.get_rng_state(), before)))
    torch.manual_seed(7)
    eager = open_clip.create_model(tiny_open_clip_name, pretrained=None).state_dict()
    for state, rng_untouched in built:
        assert state.keys() == eager.keys()
        assert all(torch.equal(state[k], eager[k]) for k in eager)
        assert rng_untouched
    # weights that are loaded are not drawn at random: nothing is kept for them
    for name, tag in (("RN50", "openai"), ("hf-hub:timm/some-clip", None), ("local-dir:/x", "")):
        assert not N.NevaClip(name, pretrained=tag).random_init
    assert N.NevaClip("RN50", pretrained="openai")._init_rng_state is None
