"""timm's model contract (the checks of timm's own tests/test_models.py, written again here) on
every classifier attnzoo registers with timm, built at a tiny width and depth so the suite stays
fast: forward at the model's own input size and at the small sizes its ``pretrained_cfg`` allows
(``fixed_input_size`` / ``min_input_size``), backward, the cfg keys, ``forward_features`` /
``forward_head`` / ``forward_intermediates`` shapes, ``reset_classifier``, ``global_pool=''``
feature maps and ``features_only``. TorchScript and FX tracing are not part of attnzoo's contract.

Token models (the DeiT-like Sparsifiner and InLine-DeiT, timm's "non-standard" ViT family) are
held to timm's ViT checks; the hierarchical ones to the standard checks with the spatial
layout their ``output_fmt`` declares (NCHW, or NHWC as timm's Swin).
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo

from tests.vision.test_registered_models import timm_models

MODELS = timm_models()

# timm's small sizes: backward at 128 px, features at 96 px, unless the cfg fixes or bounds the size
BACKWARD_SIZE, FEATURE_SIZE = 128, 96
MAX_FORWARD_OUT_SIZE = 448  # timm checks the unpooled output shapes up to this size

TINY: dict[str, dict[str, Any]] = {  # fnmatch pattern -> width/depth overrides; sizes stay the released ones
    "biformer_stl*": dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16),
    "biformer_*": dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16, qk_dims=[16, 32, 64, 128]),
    "l2vit_*": dict(depths=[2, 2, 2, 2], dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4]),
    "sparsifiner_*": dict(embed_dim=32, depth=3, num_heads=2),
    "inline_swin_*": dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], attn_type="IIMS1"),
    "inline_deit_*": dict(embed_dim=32, depth=3, num_heads=2),
}
TOKEN_MODELS = ("sparsifiner_*", "inline_deit_*")  # timm's NON_STD_FILTERS has vit_* and deit*
# parameters a model freezes by design (they ask for no gradient): Sparsifiner's connectivity
# predictors outside the reconstruction phase, as the official training script
FROZEN = {"sparsifiner_*": r"\.mask_predictor\."}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: handing each small op to a second thread costs more than it saves (3x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def matching(name: str, table: dict[str, Any]) -> Any:
    return next((value for pattern, value in table.items() if fnmatch.fnmatch(name, pattern)), None)


def create(name: str, **kwargs: Any) -> torch.nn.Module:
    tiny = matching(name, TINY)
    assert tiny is not None, f"{name} is registered with timm but has no tiny config in TINY"
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **tiny, **kwargs)


def is_token_model(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in TOKEN_MODELS)


def input_size(cfg: dict[str, Any], target: int | None = None) -> tuple[int, ...]:
    """timm's rule: a fixed size as is; above ``target``, the cfg's ``min_input_size`` or ``target``."""
    size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size") or target is None or max(size) <= target:
        return size
    return tuple(cfg["min_input_size"]) if cfg.get("min_input_size") else tuple(min(s, target) for s in size)


def image(size: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODELS)
def test_forward_at_its_own_and_small_sizes(name):
    """At the cfg's input size (where gradient checkpointing must not change the output) and at
    the small sizes timm's tests pick from the cfg."""
    model = create(name).eval()
    own = tuple(model.default_cfg["input_size"])
    sizes = {own} | {input_size(model.default_cfg, target) for target in (BACKWARD_SIZE, FEATURE_SIZE)}
    with torch.no_grad():
        outputs = {size: model(image(size)) for size in sorted(sizes)}
        for size, out in outputs.items():
            assert out.shape == (1, model.num_classes) and bool(torch.isfinite(out).all()), size
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(image(own)), outputs[own], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_trainable_parameter(name):
    """timm requires a gradient for every parameter; a parameter may go without one only when the
    model froze it (``requires_grad=False``) by design."""
    model = create(name, num_classes=42).train()
    out = model(image(input_size(model.default_cfg, BACKWARD_SIZE), batch=2))
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    by_design = matching(name, FROZEN)
    assert all(by_design and re.search(by_design, n) for n in frozen), frozen[:5]
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_and_head_api(name):
    model = create(name).eval()
    cfg = model.default_cfg
    assert {"input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier"} <= set(
        cfg
    )
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    for layer in (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]:
        assert f"{layer}.weight" in state, layer
    for layer in (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]:
        assert f"{layer}.weight" in state, layer
    size = tuple(cfg["input_size"])
    assert max(size) <= MAX_FORWARD_OUT_SIZE
    x = image(size)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        if is_token_model(name):  # timm's ViT: [B, tokens, C] features
            assert features.dim() == 3 and features.shape[-1] == model.num_features
        else:
            output_fmt = getattr(model, "output_fmt", "NCHW")
            spatial = get_spatial_dim(output_fmt)
            assert features.dim() == 4 and features.shape[get_channel_dim(output_fmt)] == model.num_features
            assert tuple(features.shape[i] for i in spatial) == tuple(cfg["pool_size"])
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre_logits.shape
        torch.testing.assert_close(pooled, pre_logits)
        if is_token_model(name):
            assert create(name, num_classes=0).eval()(x).shape == (1, model.num_features)
            return
        model.reset_classifier(0, "")  # no classifier, no pooling: the feature map
        unpooled = [model(x), create(name, num_classes=0, global_pool="").eval()(x)]
        for out in unpooled:
            assert out.shape == features.shape


def check_feature_maps(maps: list[torch.Tensor], info: FeatureInfo, size: tuple[int, ...]) -> None:
    """timm's feature check: one NCHW map per level, its channels, at most ceil(side / reduction) + 1."""
    assert len(maps) == len(info.channels())
    for channels, reduction, fmap in zip(info.channels(), info.reduction(), maps, strict=True):
        assert fmap.dim() == 4 and fmap.shape[0] == 1 and fmap.shape[1] == channels
        assert all(fmap.shape[2 + i] <= math.ceil(size[1 + i] / reduction) + 1 for i in range(2))
        assert not torch.isnan(fmap).any()


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_and_features_only(name):
    model = create(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    size = input_size(model.default_cfg, FEATURE_SIZE)
    x = image(size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, output_fmt="NCHW")
        check_feature_maps(maps, info, size)
        torch.testing.assert_close(final, model.forward_features(x))
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model.forward_intermediates(x, output_fmt="NCHW")[0], final, rtol=1e-4, atol=1e-5)
        extractor = create(name, features_only=True, feature_cls="getter").eval()  # attnzoo's default wrapper
        assert len(extractor.feature_info.channels()) >= 3
        check_feature_maps(extractor(x), extractor.feature_info, size)


@pytest.mark.parametrize("name", [n for n in MODELS if not is_token_model(n)])
def test_global_pool_choices(name):
    """``max`` pools the same map as ``avg``; ``''`` classifies every position; an unknown pool is refused."""
    model = create(name, num_classes=3).eval()
    x = image(input_size(model.default_cfg, BACKWARD_SIZE))
    output_fmt = getattr(model, "output_fmt", "NCHW")
    spatial = get_spatial_dim(output_fmt)
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(3, "max")
        torch.testing.assert_close(model(x), model.head(features.amax(spatial)))
        model.reset_classifier(3, "")
        per_position = model(x)
    channels_last = features if output_fmt == "NHWC" else features.permute(0, 2, 3, 1)
    expected = model.head(channels_last)
    torch.testing.assert_close(per_position if output_fmt == "NHWC" else per_position.permute(0, 2, 3, 1), expected)
    from attnzoo.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="global_pool"):
        model.reset_classifier(3, "avgmax")
    with pytest.raises(InvalidInputError, match="global_pool"):
        create(name, global_pool="token")
