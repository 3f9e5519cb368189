"""Pure functions of VCD, AGLA, CARVE and PAINT (attnzoo.multimodal.hallucination.functional):
parity with the fixtures made by the official code (every setting from each config.json), the
methods' invariants as property tests, and bad input. The model-driven parts (AGLA's BLIP
augmenter, CARVE's probe) are in test_hallucination_functional_models.py."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from attnzoo.errors import InvalidInputError
from attnzoo.multimodal.hallucination import functional as F
from attnzoo.multimodal.hallucination.functional.carve import _image_token_span
from tests.vision._reference import load_fixture

FUZZ = settings(max_examples=30, deadline=None)
RULES = {"vcd_logits": F.contrastive_logits, "agla_logits": F.assembly_logits}


def assert_scaled_close(actual, expected, tol):
    """assert_close with the fixture's rtol and its atol scaled to the reference's magnitude (GradCAM
    values are ~1e-5, where a plain atol of 1e-5 would accept anything)."""
    expected = torch.as_tensor(expected)
    atol = tol["atol"] * float(expected.abs().max())
    torch.testing.assert_close(torch.as_tensor(actual), expected, atol=atol, rtol=tol["rtol"])


# -- VCD / AGLA logits rules ---------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(RULES))
def test_logits_rule_parity(reference_dir, name):
    """The rule applied to each (l_o[t], l_cd[t]) pair is the official one-step loop's output."""
    f = load_fixture(reference_dir, name)
    settings_ = f.cfg["method_settings"]
    assert f.cfg["warpers_built_by_generate"] == [], "the fixture's scores include warpers: not the rule alone"
    scores = RULES[name](f.inputs["logits_orig"], f.inputs["logits_cd"], settings_["cd_alpha"], settings_["cd_beta"])
    torch.testing.assert_close(scores, f.outputs["rule_scores"], **f.tolerance)
    torch.testing.assert_close(scores.softmax(-1), f.outputs["rule_probs"], **f.tolerance)
    assert torch.equal(scores.argmax(-1).T, f.outputs["rule_tokens_greedy"])


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(RULES))
def test_logits_rule_explains_the_official_loop(reference_dir, name):
    """The official loops' scores are the rule applied to what the contrast forward returned: for VCD
    its own branch at every step; for AGLA the ORIGINAL branch's cache from the second token on."""
    f = load_fixture(reference_dir, name)
    settings_ = f.cfg["method_settings"]
    effective = f.outputs["effective_logits_cd"]
    scores = RULES[name](f.inputs["logits_orig"], effective, settings_["cd_alpha"], settings_["cd_beta"])
    torch.testing.assert_close(scores, f.outputs["scores"], **f.tolerance)
    torch.testing.assert_close(scores.softmax(-1), f.outputs["probs"], **f.tolerance)
    assert torch.equal(scores.argmax(-1).T, f.outputs["tokens_greedy"])
    reused_original = torch.equal(effective[1:], f.inputs["logits_orig"][1:])
    assert reused_original == (name == "agla_logits")


@given(
    data=st.data(),
    alpha=st.floats(0.0, 5.0),
    beta=st.floats(0.0, 1.0),
    rule=st.sampled_from(sorted(RULES)),
)
@FUZZ
def test_cutoff_keeps_the_original_argmax_and_only_plausible_tokens(data, alpha, beta, rule):
    vocab = data.draw(st.integers(2, 40))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    original, other = (torch.randn(3, vocab, generator=g) * 4 for _ in range(2))
    scores = RULES[rule](original, other, alpha, beta)
    rows = torch.arange(3)
    assert torch.isfinite(scores[rows, original.argmax(-1)]).all()
    cutoff = (math.log(beta) if beta > 0 else -math.inf) + original.max(-1, keepdim=True).values
    removed = original < cutoff
    decided = (original - cutoff).abs() > 1e-5  # float32 log(beta) vs float64: away from the boundary only
    assert torch.equal(torch.isinf(scores)[decided], removed[decided])
    combined = (1 + alpha) * original - alpha * other if rule == "vcd_logits" else original + alpha * other
    assert torch.equal(scores[~torch.isinf(scores)], combined[~torch.isinf(scores)])


def test_logits_rules_reject_bad_input():
    with pytest.raises(InvalidInputError, match="one shape"):
        F.contrastive_logits(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(InvalidInputError, match="beta"):
        F.assembly_logits(torch.zeros(2, 5), torch.zeros(2, 5), beta=1.5)


# -- VCD noise -----------------------------------------------------------------------------------


@pytest.mark.parity
def test_diffusion_noise_parity(reference_dir):
    """Global-RNG draw after the fixture's seed, as the official torch.randn_like."""
    f = load_fixture(reference_dir, "vcd_logits")
    noise_cfg = f.cfg["noise"]
    torch.manual_seed(noise_cfg["noise_seed"])
    noised = F.add_diffusion_noise(f.inputs["image"], noise_cfg["noise_step"])
    torch.testing.assert_close(noised, f.outputs["image_cd"], **f.tolerance)
    torch.manual_seed(noise_cfg["noise_seed"])
    torch.testing.assert_close(torch.randn_like(f.inputs["image"]), f.outputs["noise"], atol=0, rtol=0)


def _schedule_float64(step: int) -> tuple[float, float]:
    """sqrt(abar_t), sqrt(1 - abar_t) of VCD's sigmoid schedule, in float64 from the formula."""
    t = np.linspace(-6, 6, 1000)
    betas = 1 / (1 + np.exp(-t)) * (5e-3 - 1e-5) + 1e-5
    abar = np.cumprod(1 - betas)[step]
    return math.sqrt(abar), math.sqrt(1 - abar)


@given(step=st.integers(0, 999), scale=st.floats(-2, 2), seed=st.integers(0, 2**16))
@FUZZ
def test_diffusion_noise_statistics(step, scale, seed):
    """Mean sqrt(abar) x and spread sqrt(1 - abar) around it; a generator reproduces its draw and
    leaves the global RNG alone."""
    signal, spread = _schedule_float64(step)
    image = torch.full((3, 64, 64), scale)
    state = torch.random.get_rng_state()
    noised = F.add_diffusion_noise(image, step, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(torch.random.get_rng_state(), state)
    again = F.add_diffusion_noise(image, step, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(noised, again)
    n = image.numel()
    assert abs(noised.mean().item() - signal * scale) < 5 * spread / math.sqrt(n) + 1e-5
    assert abs(noised.std().item() / spread - 1) < 5 / math.sqrt(2 * n) + 1e-4


def test_diffusion_noise_follows_image_dtype_and_rejects_bad_input():
    half = F.add_diffusion_noise(torch.zeros(2, 3, 4, 4, dtype=torch.float16), 10, torch.Generator().manual_seed(0))
    assert half.dtype == torch.float16 and half.shape == (2, 3, 4, 4)
    with pytest.raises(InvalidInputError, match="noise_step"):
        F.add_diffusion_noise(torch.zeros(3, 4, 4), 1000)
    with pytest.raises(InvalidInputError, match="floating-point"):
        F.add_diffusion_noise(torch.zeros(3, 4, 4, dtype=torch.uint8), 10)


# -- AGLA mask -----------------------------------------------------------------------------------


@pytest.mark.parity
def test_agla_gradcam_parity(reference_dir):
    """compute_gradcam's list entry [enc token, mean over real tokens, per-token maps]."""
    f = load_fixture(reference_dir, "agla_mask")
    grid = f.cfg["method_settings"]["grid"]
    cam = F.blip_gradcam(f.inputs["cams"], f.inputs["grads"], f.inputs["text_attention_mask"], grid=(grid, grid))
    official_layout = torch.cat([cam.token_maps[0, :1], cam.relevance, cam.token_maps[0, 1:]])
    assert_scaled_close(official_layout, f.outputs["gradcam"], f.tolerance)
    assert_scaled_close(cam.relevance[0], f.outputs["relevance"], f.tolerance)


@pytest.mark.parity
def test_agla_mask_parity(reference_dir):
    """k, threshold and mask exactly from the fixture's att_map; from the relevance grid, att_map
    within tolerance and the mask within the pixel budget the README allows (pixels near the
    threshold); the augmented image exactly."""
    f = load_fixture(reference_dir, "agla_mask")
    side = f.cfg["method_settings"]["image_side"]
    assert f.cfg["method_settings"]["blur_sigma"] == pytest.approx(0.02 * side)
    itc = f.inputs["itc_score"]
    exact = F.agla_mask_from_att_map(f.outputs["att_map"], itc)
    assert exact.keep_index_k == int(f.outputs["keep_index_k"])
    assert exact.threshold == float(f.outputs["threshold"])
    assert torch.equal(exact.mask.to(torch.uint8), f.outputs["mask"])
    assert int(exact.mask.sum()) == int(f.outputs["n_kept"])

    derived = F.agla_mask(f.inputs["relevance"], itc, size=side)
    torch.testing.assert_close(derived.att_map, f.outputs["att_map"], **f.tolerance)
    assert derived.keep_index_k == exact.keep_index_k
    budget = f.cfg["pixels_near_threshold"]["pixels_within_1e-05_of_threshold"]
    assert int((derived.mask != exact.mask).sum()) <= budget

    augmented = np.asarray(F.agla_masked_image(f.inputs["x"], exact.mask))
    assert np.array_equal(augmented, f.outputs["y"].numpy())


@pytest.mark.parity
def test_agla_masked_image_from_the_raw_image(reference_dir):
    """The masked image starts from PIL's default resize of the original (the official tensor_image);
    PIL's resampling may move a value by one level across versions."""
    f = load_fixture(reference_dir, "agla_mask")
    raw = Image.fromarray(f.inputs["raw_image"].numpy())
    augmented = np.asarray(F.agla_masked_image(raw, f.outputs["mask"].bool())).astype(int)
    assert np.abs(augmented - f.outputs["y"].numpy().astype(int)).max() <= 1


@given(
    grid=st.tuples(st.integers(2, 6), st.integers(2, 6)),
    itc=st.floats(-1.0, 1.0, width=32),
    seed=st.integers(0, 2**16),
    size=st.sampled_from([16, 24, 40]),
)
@FUZZ
def test_agla_keeps_the_stated_share_of_pixels(grid, itc, seed, size):
    """k = int(N * min(1 - ITC/2, 1 - 1e-5)), and the k + 1 best pixels survive (more only on ties)."""
    relevance = torch.rand(grid, generator=torch.Generator().manual_seed(seed))
    result = F.agla_mask(relevance, itc, size=size)
    n = size * size
    ratio = min(1 - itc / 2, 1 - 1e-5)
    assert abs(result.keep_index_k - n * ratio) <= 1
    above = int((result.att_map > result.threshold).sum())
    ties = int((result.att_map == result.threshold).sum())
    assert above <= result.keep_index_k < above + ties  # the threshold is the (k + 1)-th largest value
    assert int(result.mask.sum()) == above + ties  # so k + 1 pixels, unless values tie at the threshold
    assert bool((result.att_map[result.mask] >= result.threshold).all())
    assert bool((result.att_map[~result.mask] < result.threshold).all())
    assert float(result.att_map.min()) == 0.0 and float(result.att_map.max()) in (0.0, 1.0)


def test_agla_keep_count_follows_the_official_float32_arithmetic():
    assert F.agla_keep_count(torch.tensor([[0.42]]), 384 * 384) == int(torch.tensor(384 * 384) * (1 - 0.42 / 2))
    assert F.agla_keep_count(-0.5, 100) == int(100 * (1 - 1e-5))  # a poor match keeps all but the cap
    with pytest.raises(InvalidInputError, match="one score"):
        F.agla_keep_count(torch.zeros(2), 100)


def test_blip_gradcam_rejects_bad_input():
    cams = torch.rand(1, 2, 4, 17)
    with pytest.raises(InvalidInputError, match="no tokens"):
        F.blip_gradcam(cams, cams, torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(InvalidInputError, match="square"):
        F.blip_gradcam(torch.rand(1, 2, 4, 16), torch.rand(1, 2, 4, 16), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(InvalidInputError, match=r"\[B, L\]"):
        F.blip_gradcam(cams, cams, torch.ones(1, 5, dtype=torch.long))


def test_blip_caption_text_matches_the_blip_caption_processor():
    assert F.blip_caption_text('Is there a "dog" in the image?  Yes.') == "is there a dog in the image? yes"
    assert F.blip_caption_text("a b c d", max_words=2) == "a b"


# -- PAINT token sets ----------------------------------------------------------------------------


@pytest.mark.parity
def test_paint_token_sets_parity(reference_dir):
    f = load_fixture(reference_dir, "paint_attention")
    settings_ = f.cfg["method_settings"]
    assert settings_["spatial_token_ratio"] == 0.0, "the fixture uses the spatial top-k, which is not offered"
    rows = f.inputs["vit_cls_attn"]  # [ViT layers, heads, 1 + patches]: layer 0 and the penultimate
    local, summary = F.paint_token_sets(
        rows[0], rows[-2], settings_["local_token_ratio"], num_patches=settings_["num_vision_tokens"]
    )
    assert torch.equal(local, f.outputs["local_tokens_sorted"])
    assert torch.equal(summary, f.outputs["summary_tokens_sorted"])
    before = set(f.outputs["local_tokens_before_difference"].tolist())
    assert set(local.tolist()) == before - set(summary.tolist())
    assert len(summary) == f.cfg["token_set_margins"]["n_summary"]


@given(
    patches=st.integers(8, 600),
    heads=st.integers(1, 4),
    ratio=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
@FUZZ
def test_paint_token_sets_properties(patches, heads, ratio, seed):
    """Local = top int(n * ratio) of layer 0 less the summary set; summary = the IQR outliers."""
    g = torch.Generator().manual_seed(seed)
    early = torch.rand(heads, patches, generator=g)
    late = torch.rand(heads, patches, generator=g) ** 6  # heavy upper tail: some outliers
    local, summary = F.paint_token_sets(early, late, ratio)
    scores = late.sum(0).numpy().astype(np.float64)
    q1, q3 = np.percentile(scores, [25, 75])
    fence = q3 + 1.5 * (q3 - q1)
    decided = np.abs(scores - fence) > 1e-5
    assert set(np.flatnonzero((scores > fence) & decided)) <= set(summary.tolist())
    assert set(summary.tolist()) <= set(np.flatnonzero(scores > fence - 1e-5))
    top = set(torch.topk(early.sum(0), int(patches * ratio)).indices.tolist())
    assert set(local.tolist()) == top - set(summary.tolist())
    assert torch.equal(local, local.sort().values) and torch.equal(summary, summary.sort().values)


def test_paint_token_sets_accepts_summed_rows_and_rejects_bad_input():
    rows = torch.rand(2, 17)
    by_head = F.paint_token_sets(rows, rows, num_patches=16)
    summed = F.paint_token_sets(rows.sum(0), rows.sum(0), num_patches=16)
    assert all(torch.equal(a, b) for a, b in zip(by_head, summed, strict=True))
    with pytest.raises(InvalidInputError, match="different patch counts"):
        F.paint_token_sets(torch.rand(2, 16), torch.rand(2, 20))
    with pytest.raises(InvalidInputError, match="num_patches"):
        F.paint_token_sets(rows, rows, num_patches=40)
    with pytest.raises(InvalidInputError, match="CLS attention row"):
        F.paint_token_sets(torch.rand(1, 2, 16), torch.rand(1, 2, 16))


# -- CARVE ---------------------------------------------------------------------------------------


def carve_settings(cfg):
    s = cfg["method_settings"]
    return {
        "layers": s["layers"],
        "lam": s["lam"],
        "top_percent": s["top_percent"],
        "min_keep_regions": s["min_keep_regions"],
        "outlier_percent": s["outlier_percent"],
        "grid_shape": tuple(s["output_shape"]),
    }


@pytest.mark.parity
def test_carve_maps_and_image_span_parity(reference_dir):
    """Head means of the probes' last-row image attention, and the span the official loop found."""
    f = load_fixture(reference_dir, "carve_mask")
    for probe in ("query", "general"):
        maps = f.inputs[f"{probe}_attn_rows"].mean(dim=2)
        torch.testing.assert_close(maps, f.outputs[f"{probe}_maps"], atol=0, rtol=0)
    start, end = f.cfg["layout"]["image_span"]
    image_id = int(f.inputs["input_ids"][0, start])
    assert _image_token_span(f.inputs["input_ids"][0], image_id) == tuple(f.outputs["vision_token_positions"].tolist())
    assert end - start == f.cfg["layout"]["n_image_tokens"]


@pytest.mark.parity
@pytest.mark.parametrize("variant", ["v1", "v2", "v3", "v4"])
def test_carve_refine_parity(reference_dir, variant):
    """Fusion, mask, box and refined image of every released variant on the same probes."""
    f = load_fixture(reference_dir, "carve_mask")
    prefix = "" if variant == f.cfg["method_settings"]["version"] else f"{variant}."
    image = Image.fromarray(f.inputs["x"].numpy())
    result = F.carve_refine(
        f.outputs["query_maps"], f.outputs["general_maps"], image, variant=variant, **carve_settings(f.cfg)
    )
    expected = f.outputs[f"{prefix}sum_att_map"].numpy()
    np.testing.assert_allclose(result.sum_att_map, expected, rtol=f.tolerance["rtol"], atol=0)
    assert np.array_equal(result.mask.mask, f.outputs[f"{prefix}mask_map"].numpy())
    assert result.crop.bbox == tuple(f.outputs[f"{prefix}bbox"].tolist())
    assert np.array_equal(np.asarray(result.crop.refined_image), f.outputs[f"{prefix}refined_image"].numpy())


@pytest.mark.parity
def test_carve_mask_intermediates_parity(reference_dir):
    f = load_fixture(reference_dir, "carve_mask")
    s = carve_settings(f.cfg)
    fused = F.carve_fuse(
        f.outputs["query_maps"],
        f.outputs["general_maps"],
        tuple(f.cfg["layout"]["image_wh"]),
        layers=s["layers"],
        lam=s["lam"],
        step_mode=f.cfg["method_settings"]["step_mode"],
        grid_shape=s["grid_shape"],
    )
    mask = F.carve_mask(fused, s["top_percent"], s["min_keep_regions"], strategy=f.cfg["method_settings"]["strategy"])
    assert mask.threshold == pytest.approx(float(f.outputs["threshold"]), rel=f.tolerance["rtol"])
    assert np.array_equal(mask.labeled, f.outputs["labeled"].numpy())
    np.testing.assert_allclose(mask.component_scores, f.outputs["component_scores"].numpy(), rtol=f.tolerance["rtol"])
    assert np.array_equal(mask.kept_component_ids, f.outputs["kept_component_ids"].numpy())
    assert len(mask.kept_component_ids) == f.cfg["mask_stats"]["keep_count"]
    crop = F.carve_crop(Image.fromarray(f.inputs["x"].numpy()), mask.mask)
    assert np.array_equal(np.asarray(crop.masked_image), f.outputs["masked_image"].numpy())


def _components_4(binary: np.ndarray) -> list[set[tuple[int, int]]]:
    """4-connected components by breadth-first search (independent of scipy)."""
    seen = np.zeros_like(binary, dtype=bool)
    found = []
    for start in zip(*np.nonzero(binary), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, component = deque([start]), set()
        while queue:
            y, x = queue.popleft()
            component.add((int(y), int(x)))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < binary.shape[0] and 0 <= nx < binary.shape[1] and binary[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(component)
    return found


@given(
    shape=st.tuples(st.integers(4, 14), st.integers(4, 14)),
    top_percent=st.floats(0.05, 0.8),
    min_keep=st.integers(1, 4),
    strategy=st.sampled_from(["attention_sum", "size"]),
    seed=st.integers(0, 2**16),
)
@FUZZ
def test_carve_keeps_the_top_k_components(shape, top_percent, min_keep, strategy, seed):
    """The kept components are the K = max(min_keep, int(n * top_percent)) best by summed S (or by
    size) among the 4-connected components of S >= the (1 - top_percent) percentile."""
    rng = np.random.default_rng(seed)
    fused = rng.random(shape) ** 3 * 100
    result = F.carve_mask(fused, top_percent, min_keep, strategy=strategy)
    threshold = np.percentile(fused, (1 - top_percent) * 100)
    components = _components_4(fused >= threshold)
    assert result.threshold == threshold and len(result.component_scores) == len(components)
    score = (lambda c: sum(fused[p] for p in c)) if strategy == "attention_sum" else len
    keep = min(len(components), max(min_keep, int(len(components) * top_percent)))
    # components come in raster order of their first pixel, as labels do: a stable sort breaks ties alike
    ranked = sorted(components, key=score, reverse=True)
    kept_pixels = set().union(*ranked[:keep])
    assert set(zip(*np.nonzero(result.mask), strict=True)) == kept_pixels
    assert len(result.kept_component_ids) == keep


def test_carve_remove_small_drops_only_small_components():
    fused = np.zeros((20, 20))
    fused[1:9, 1:9] = 10  # 64 px
    fused[15, 15] = 10  # 1 px
    result = F.carve_mask(fused, top_percent=0.1, strategy="remove_small", outlier_percent=5.0)  # min size 3
    assert result.mask[15, 15] == 0 and result.mask[1:9, 1:9].all() and result.mask.sum() == 64


def test_carve_fuse_weights_steps_and_pairs_probes_by_step():
    """w_t = t + 1 over min(T_q, T_g) steps ("all"), step 0 alone ("first"); contrast A^Q / (A^G + lam)."""
    rng = np.random.default_rng(0)
    query = rng.random((3, 2, 16)).astype(np.float32)
    general = rng.random((2, 2, 16)).astype(np.float32) + 0.5
    size = (4, 4)  # a 4x4 grid resized to 4x4 is the identity
    fused = F.carve_fuse(query, general, size, lam=0.0)
    expected = sum((t + 1) * (query[t] / general[t]).sum(0).reshape(4, 4) for t in range(2))
    np.testing.assert_allclose(fused, expected, rtol=1e-6)
    first = F.carve_fuse(query, general, size, lam=0.0, step_mode="first", layers=[1])
    np.testing.assert_allclose(first, (query[0, 1] / general[0, 1]).reshape(4, 4), rtol=1e-6)
    assert F.CARVE_LAMBDA_CODE == 1e-8 and F.CARVE_LAMBDA_PAPER == 0.05
    np.testing.assert_allclose(F.carve_contrast(query[:2], general, 0.05), query[:2] / (general + 0.05), rtol=1e-6)


@pytest.mark.parametrize(
    ("tokens", "grid_shape", "known_grids", "size", "step_mode"),
    [
        (576, None, True, (200, 150), "all"),  # LLaVA's 24 x 24
        (576, None, True, (200, 150), "first"),
        (576, (18, 32), False, (320, 180), "all"),  # a wide Qwen2-VL image, the paper's grid
        (600, (20, 29), True, (13, 5), "all"),  # extra tokens dropped, an image smaller than the grid
    ],
)
def test_carve_fuse_equals_the_official_sum_of_resized_maps(tokens, grid_shape, known_grids, size, step_mode):
    """The official code resizes every (step, layer) contrast map to the image and sums them; fusing on
    the grid and resizing once gives the same S (bilinear resizing is linear) up to float32 rounding."""
    rng = np.random.default_rng(1)
    query = rng.random((5, 3, tokens)).astype(np.float32) * 1e-2
    general = rng.random((4, 3, tokens)).astype(np.float32) * 1e-2
    general[0, 0, :7] = 0.0  # A^G = 0: the contrast is A^Q / lam
    rows, cols = grid_shape if not known_grids else (24, 24) if tokens == 576 else grid_shape
    expected = np.zeros(size[::-1])
    for t in range(1 if step_mode == "first" else 4):
        for layer in (0, 2):
            contrast = query[t, layer] / (general[t, layer] + np.float32(1e-8))
            grid = contrast[: rows * cols].reshape(rows, cols)
            resized = Image.fromarray(grid.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
            expected += (t + 1 if step_mode == "all" else 1) * np.asarray(resized, dtype=np.float64)
    fused = F.carve_fuse(
        query, general, size, layers=[0, 2], grid_shape=grid_shape, known_grids=known_grids, step_mode=step_mode
    )
    np.testing.assert_allclose(fused, expected, rtol=1e-6)
    with pytest.raises(InvalidInputError, match="no steps"):
        F.carve_fuse(query[:0], general, size, grid_shape=grid_shape, known_grids=known_grids)


def test_carve_fuse_grid_rules():
    maps = np.ones((1, 1, 12), dtype=np.float32)
    assert F.carve_fuse(maps, maps, (6, 4), grid_shape=(3, 4)).shape == (4, 6)
    truncated = np.ones((1, 1, 13), dtype=np.float32)  # an extra token beyond the given grid is dropped
    assert F.carve_fuse(truncated, truncated, (4, 3), grid_shape=(3, 4)).shape == (3, 4)
    with pytest.raises(InvalidInputError, match="grid"):
        F.carve_fuse(maps, maps, (6, 4))
    with pytest.raises(InvalidInputError, match="layers"):
        F.carve_fuse(maps, maps, (6, 4), layers=[3], grid_shape=(3, 4))
    with pytest.raises(InvalidInputError, match="step_mode"):
        F.carve_fuse(maps, maps, (6, 4), step_mode="last", grid_shape=(3, 4))


@given(
    size=st.tuples(st.integers(8, 40), st.integers(8, 40)),
    box=st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.05, 1), st.floats(0.05, 1)),
)
@FUZZ
def test_carve_crop_covers_the_original_size(size, box):
    width, height = size
    x0, y0 = int(box[0] * width), int(box[1] * height)
    x1, y1 = max(x0 + 1, min(width, x0 + int(box[2] * width))), max(y0 + 1, min(height, y0 + int(box[3] * height)))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    image = Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8))
    crop = F.carve_crop(image, mask)
    assert crop.bbox == (x0, y0, x1, y1)
    refined_w, refined_h = crop.refined_image.size
    assert refined_w >= width - 1 and refined_h >= height - 1  # int() truncation may lose one pixel
    assert refined_w <= width or refined_h <= height  # the binding side is not overshot
    assert F.carve_crop(image, np.zeros_like(mask)).bbox == (0, 0, width, height)


def test_carve_refine_rejects_bad_input():
    maps = np.ones((1, 1, 16), dtype=np.float32)
    image = Image.new("RGB", (4, 4))
    with pytest.raises(InvalidInputError, match="variant"):
        F.carve_refine(maps, maps, image, variant="v9")
    with pytest.raises(InvalidInputError, match="top_percent"):
        F.carve_mask(np.ones((4, 4)), top_percent=0.0)
    with pytest.raises(InvalidInputError, match="does not match"):
        F.carve_crop(image, np.ones((3, 3), dtype=np.uint8))


@pytest.mark.parametrize("known_grids", [True, False])
def test_carve_fuse_grid_of_a_wide_qwen_image(known_grids):
    """576 tokens of an 18 x 32 grid (a 16:9 Qwen2-VL image): the official table reads them as 24 x 24,
    the paper's grid keeps the image's own, so one hot token lands in its own cell of the picture."""
    rows, cols, cell = 18, 32, 28
    query = np.full((1, 1, rows * cols), 1e-3, dtype=np.float32)
    query[0, 0, 9 * cols + 24] = 1.0
    fused = F.carve_fuse(
        query, np.ones_like(query), (cols * cell, rows * cell), grid_shape=(rows, cols), known_grids=known_grids
    )
    y, x = np.unravel_index(int(np.argmax(fused)), fused.shape)
    in_cell = bool(9 * cell <= y < 10 * cell and 24 * cell <= x < 25 * cell)
    assert in_cell is (not known_grids)
    if known_grids:  # token 312 of a 24 x 24 grid: row 13, col 0
        assert x < cols * cell / 24 and 13 * rows * cell / 24 <= y < 14 * rows * cell / 24
