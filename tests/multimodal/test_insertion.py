"""Subject insertion's building blocks: the panel layout (odd sizes, both orientations), masks (VIA in both
behaviours, arrays, images), the attention processors (switched off = stock, the shift = boosted
probabilities, head weights, block and step windows, installing and restoring), the latent blending."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.errors import InvalidInputError
from attnzoo.multimodal.insertion.in_context_brush import (
    InsertionAttention,
    InsertionState,
    check_flux_transformer,
    head_weights,
    insertion_processors,
    install_processors,
)
from attnzoo.multimodal.insertion.layout import (
    PanelLayout,
    build_canvas,
    official_token_sets,
    pack_latents,
    rasterize_via,
    read_mask,
    subject_on_white,
    unpack_latents,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(3, 5), (5, 3), (1, 1), (4, 7)])
def test_vertical_token_sets_are_the_two_halves(rows, cols):
    layout = PanelLayout(rows * 16, cols * 16, "vertical", 8, 2)
    assert layout.canvas_tokens == (2 * rows, cols) and layout.canvas_size == (2 * rows * 16, cols * 16)
    sets = layout.token_sets(7)
    n = rows * cols
    assert sets.text == slice(0, 7) and sets.demo == slice(7, 7 + n) and sets.query == slice(7 + n, 7 + 2 * n)


@pytest.mark.parametrize("rows,cols", [(3, 5), (5, 3), (2, 1)])
def test_horizontal_token_sets_split_by_column(rows, cols):
    """Row-major packing over a (rows, 2 * cols) grid: the left cols columns of every row are the demo."""
    layout = PanelLayout(rows * 2, cols * 2, "horizontal", 1, 2)  # VAE factor 1, as the tiny model
    sets = layout.token_sets(4)
    grid = torch.arange(rows * 2 * cols).view(rows, 2 * cols) + 4
    assert torch.equal(sets.demo, grid[:, :cols].reshape(-1)) and torch.equal(sets.query, grid[:, cols:].reshape(-1))
    masks = sets.masks(4 + rows * 2 * cols)
    assert masks["text"][:4].all() and not (masks["demo"] & masks["query"]).any()
    assert int(masks["demo"].sum()) == int(masks["query"].sum()) == rows * cols


def test_official_token_sets_ignore_the_real_text_length():
    sets = official_token_sets(512 + 2 * 9)
    assert (sets.text, sets.demo, sets.query) == (slice(0, 512), slice(512, 521), slice(521, 530))


def test_layout_sizes_are_checked_and_fitted():
    with pytest.raises(InvalidInputError, match="not a multiple of 16"):
        PanelLayout(100, 96)
    with pytest.raises(InvalidInputError, match="orientation"):
        PanelLayout(16, 16, "diagonal")
    with pytest.warns(UserWarning, match="using 96 px"):
        layout = PanelLayout.fit(100, 90)
    assert (layout.panel_height, layout.panel_width) == (96, 96)
    with pytest.warns(UserWarning, match="using 8 px"):
        assert PanelLayout.fit(7, vae_scale_factor=1).panel_height == 8


def test_pack_unpack_round_trip():
    x = torch.randn(2, 3, 6, 4)
    packed = pack_latents(x)
    assert packed.shape == (2, 6, 12)
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    assert torch.equal(packed[0, 1, :4].view(2, 2), x[0, 0, 0:2, 2:4])  # token 1 = the second 2x2 patch of row 0


# -- masks and the canvas -------------------------------------------------------------------------

VIA = {
    "img.jpg1": {
        "filename": "img.jpg",
        "regions": [
            {"shape_attributes": {"name": "ellipse", "cx": 30, "cy": 10, "rx": 8, "ry": 5}},
            {"shape_attributes": {"name": "polygon", "all_points_x": [2, 12, 6], "all_points_y": [20, 22, 28]}},
        ],
    }
}


def test_via_official_is_transposed_corrected_is_upright():
    corrected = rasterize_via(VIA, (30, 40))
    official = rasterize_via(VIA, (30, 40), behaviour="official")
    assert corrected.shape == (30, 40) and official.shape == (40, 30)
    assert corrected[10, 30] == 255 and corrected[10, 10] == 0  # the ellipse's centre (x=30, y=10)
    assert corrected[24, 6] == 255  # inside the polygon
    square = rasterize_via(VIA, (40, 40))
    assert np.array_equal(square, rasterize_via(VIA, (40, 40), behaviour="official"))  # square targets agree


def test_read_mask_forms(tmp_path):
    size = (30, 40)
    expected = rasterize_via(VIA, size)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(VIA))
    for form in (VIA, json.dumps(VIA), path, str(path), VIA["img.jpg1"], VIA["img.jpg1"]["regions"]):
        assert np.array_equal(read_mask(form, size), expected)
    boolean = expected > 0
    assert np.array_equal(read_mask(boolean, size), expected)
    assert np.array_equal(read_mask(torch.from_numpy(boolean.astype(np.float32)), size), expected)
    assert np.array_equal(read_mask(Image.fromarray(expected), size), expected)
    rgba = np.zeros((*size, 4), np.uint8)
    rgba[..., 3] = expected  # a transparent PNG: the alpha is the mask
    assert np.array_equal(read_mask(Image.fromarray(rgba), size), expected)
    with pytest.raises(InvalidInputError, match="mask is 40x31"):
        read_mask(np.zeros((31, 40)), size)
    with pytest.raises(InvalidInputError, match="no regions"):
        read_mask({"regions": []}, size)
    with pytest.raises(InvalidInputError, match="not supported"):
        read_mask({"regions": [{"shape_attributes": {"name": "circle", "cx": 1, "cy": 1, "r": 3}}]}, size)
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        read_mask("{broken", size)


def test_read_mask_arrays_fill_where_non_zero_floats_from_one_half():
    """Integer and bool arrays: non-zero = fill (a 0/1 uint8 mask is not empty); floats: >= 0.5; images: >= 128."""
    size = (4, 6)
    ones = np.zeros(size, np.uint8)
    ones[1:3, 2:5] = 1
    expected = np.where(ones > 0, 255, 0).astype(np.uint8)
    for form in (ones, ones * 255, ones.astype(bool), ones.astype(np.int16) * -3, torch.from_numpy(ones)):
        assert np.array_equal(read_mask(form, size), expected)
    soft = ones * np.float32(0.5) + np.float32(0.2)  # 0.2 outside, 0.7 inside: not scaled by its max
    assert np.array_equal(read_mask(soft, size), expected)
    assert not read_mask(np.full(size, 0.2), size).any() and read_mask(np.full(size, 0.5), size).all()
    image = Image.fromarray(np.where(ones > 0, 128, 127).astype(np.uint8))  # images keep white = fill
    assert np.array_equal(read_mask(image, size), expected)
    # leading/trailing unit axes go, the image's own axes stay (a 1x1 target keeps its 1x1 mask)
    for form in (ones[None], ones[None, None], ones[..., None]):
        assert np.array_equal(read_mask(form, size), expected)
    assert read_mask(np.ones((1, 1), np.uint8), (1, 1)).shape == (1, 1)


def test_canvas_puts_the_subject_first():
    subject = np.full((10, 12, 3), 40, np.uint8)
    target = np.full((20, 30, 3), 200, np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 255
    for orientation, shape in (("vertical", (32, 16)), ("horizontal", (16, 32))):
        layout = PanelLayout(16, 16, orientation, 8, 2)
        image, canvas_mask = build_canvas(subject, target, mask, layout)
        assert image.shape == (*shape, 3) and canvas_mask.shape == shape
        first = image[:16, :16] if orientation == "vertical" else image[:16, :16]
        second = image[16:, :] if orientation == "vertical" else image[:, 16:]
        assert (first == 40).all() and (second == 200).all()
        panel_mask = canvas_mask[16:] if orientation == "vertical" else canvas_mask[:, 16:]
        assert canvas_mask.sum() == panel_mask.sum() > 0
    pasted = subject_on_white(np.full((2, 2, 3), 7, np.uint8), np.array([[1, 0], [0, 1]], np.uint8))
    assert pasted[0, 0, 0] == 7 and pasted[0, 1, 0] == 255


# -- processors -------------------------------------------------------------------------------------


def tiny_transformer(heads=3, seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        out_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    return model.eval()


def transformer_inputs(layout, text=5, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows, cols = layout.canvas_tokens
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return dict(
        hidden_states=torch.randn(batch, rows * cols, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.tensor([0.7] * batch),
        img_ids=img_ids.view(-1, 3),
        txt_ids=torch.zeros(text, 3),
        guidance=torch.tensor([30.0] * batch),
        return_dict=False,
    )


LAYOUT = PanelLayout(6, 4, "vertical", 1, 2)  # 3x2 tokens per panel


def run(model, settings, state=None, **kw):
    inputs = transformer_inputs(LAYOUT, **kw)
    with insertion_processors(model, settings, state or InsertionState(layout=LAYOUT)) as used, torch.no_grad():
        return model(**inputs)[0], used


def test_switched_off_equals_the_stock_processor():
    model = tiny_transformer()
    with torch.no_grad():
        stock = model(**transformer_inputs(LAYOUT))[0]
    for off in (
        InsertionAttention(shift_img=0.0, shift_txt=0.0, head_gain=0.0),
        InsertionAttention.none(),
        InsertionAttention.diptych(1.0),
    ):
        out, _ = run(model, off)
        torch.testing.assert_close(out, stock, atol=1e-6, rtol=0)
    edited, _ = run(model, InsertionAttention())
    assert (edited - stock).abs().max() > 1e-3


def test_processors_are_restored_and_given_a_copied_dict():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_transformer()
    before = dict(model.attn_processors)
    with insertion_processors(model, InsertionAttention()) as state:
        names = [type(p).__name__ for p in model.attn_processors.values()]
        assert set(names) == {"InContextAttnProcessor"} and isinstance(state, InsertionState)
        indices = [p.index for p in model.attn_processors.values()]
        assert indices == [0, 1, 2, 3]  # double blocks first, then single
    assert all(isinstance(p, FluxAttnProcessor) for p in model.attn_processors.values())
    assert list(model.attn_processors) == list(before)


def test_shift_equals_boosting_the_probabilities():
    """The processor's attention on random q/k/v: query rows' probabilities on the demo and text keys times
    1 + shift (explicitly, fp64), each head times its weight."""
    from attnzoo.multimodal.insertion.in_context_brush import InContextAttnProcessor

    settings = InsertionAttention(shift_img=0.4, shift_txt=0.2, head_gain=0.3)
    state = InsertionState(layout=LAYOUT, text_len=5)
    proc = InContextAttnProcessor(settings, state, 0, "transformer_blocks.0")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5 + 12, 3, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out = proc.attention(q, k, v, double=True)
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / 4.0, dim=-1)
    gain = torch.ones(17, 17, dtype=torch.float64)
    gain[11:, 5:11] += 0.4
    gain[11:, :5] += 0.2
    scores = probs[:, :, 11:, :5].sum((-1, -2))
    weights = 1 + 0.3 * (scores - scores.min(1, keepdim=True).values) / (
        scores.max(1, keepdim=True).values - scores.min(1, keepdim=True).values + torch.finfo(torch.float64).eps
    )
    expected = torch.einsum("bhij,bjhd->bihd", probs * gain, v) * weights[:, None, :, None]
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    single = InContextAttnProcessor(settings, state, 2, "single_transformer_blocks.0").attention(q, k, v, double=False)
    torch.testing.assert_close(single, torch.einsum("bhij,bjhd->bihd", probs, v) * weights[:, None, :, None])


def test_head_weights_range_and_argmax():
    scores = torch.tensor([[0.2, 1.4, 0.9, 0.2], [3.0, 1.0, 2.0, 2.5]])
    w = head_weights(scores, 0.2, 1e-7)
    assert torch.all(w >= 1.0) and torch.all(w <= 1.2 + 1e-6)
    assert torch.equal(w.argmax(1), scores.argmax(1)) and torch.equal(w.argmin(1), scores.argmin(1))
    assert torch.allclose(w.max(1).values, torch.tensor(1.2))


def test_records_and_windows():
    model = tiny_transformer()
    _, state = run(model, InsertionAttention(), InsertionState(layout=LAYOUT, record=True))
    assert [r["block"] for r in state.records] == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    for r in state.records:
        assert r["head_weights"].shape == (1, 3) and float(r["head_weights"].max()) == pytest.approx(1.2)
    _, state = run(model, InsertionAttention(blocks=(1, 3)), InsertionState(layout=LAYOUT, record=True))
    assert [r["block"] for r in state.records] == ["transformer_blocks.1", "single_transformer_blocks.1"]
    # a window of blocks 1 and 3 changes the output less than all blocks, but does change it
    full, _ = run(model, InsertionAttention())
    part, _ = run(model, InsertionAttention(blocks=(1, 3)))
    none, _ = run(model, InsertionAttention.none())
    assert 0 < (part - none).abs().max() and not torch.allclose(part, full)


def test_step_window_follows_callback_on_step_end():
    state = InsertionState().reset(num_steps=10)
    window = (2, 4)
    seen = []
    for step in range(10):
        seen.append(state.in_steps(window))
        assert state.callback_on_step_end(None, step, None, {}) == {}
    assert seen == [False, False, True, True] + [False] * 6
    state.reset(num_steps=10)
    fractions = []
    for step in range(10):
        fractions.append(state.in_steps((0.0, 0.5)))
        state.callback_on_step_end(None, step, None, {})
    assert fractions == [True] * 5 + [False] * 5
    with pytest.raises(InvalidInputError, match="step count"):
        InsertionState().in_steps((0.0, 0.5))


def test_settings_and_transformer_are_checked():
    with pytest.raises(InvalidInputError, match="shift_blocks"):
        InsertionAttention(shift_blocks="some")
    with pytest.raises(InvalidInputError, match="finite"):
        InsertionAttention(head_gain=float("nan"))
    with pytest.raises(InvalidInputError, match="behaviour"):
        InsertionAttention(behaviour="paper")
    with pytest.raises(InvalidInputError, match="start < stop"):
        InsertionAttention(steps=(5, 2))
    with pytest.raises(InvalidInputError, match="not a FLUX transformer"):
        check_flux_transformer(torch.nn.Linear(2, 2))
    from diffusers import SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    )
    with pytest.raises(InvalidInputError, match="not a FLUX transformer"):
        install_processors(sd3, InsertionAttention())


@pytest.mark.parametrize(
    "settings",
    [
        InsertionAttention(blocks=(4, 5)),
        InsertionAttention.diptych(blocks=(0, 9)),
        InsertionAttention.none(blocks=(4,)),
    ],
)
def test_blocks_past_the_last_are_refused(settings):
    """An index the transformer does not have would leave the edit off unseen (the tiny one has blocks 0-3)."""
    model = tiny_transformer()
    with pytest.raises(InvalidInputError, match="has 4 attention blocks, 0-3"):
        install_processors(model, settings)
    install_processors(model, InsertionAttention(blocks=(0, 3)))


def test_layout_must_match_the_tokens():
    model = tiny_transformer()
    wrong = PanelLayout(8, 4, "vertical", 1, 2)
    with pytest.raises(InvalidInputError, match="image tokens"):
        run(model, InsertionAttention(), InsertionState(layout=wrong))
