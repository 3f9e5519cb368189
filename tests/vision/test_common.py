"""What every attnzoo classifier shares: timm's classifier API, gradient checkpointing."""

import pytest
import timm
import torch

import attnzoo  # noqa: F401  (registers the families with timm)

SMALL = {
    "biformer_tiny": dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16, qk_dims=[16, 32, 64, 128]),
    "biformer_stl_nchw": dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16),
    "l2vit_tiny": dict(depths=[2, 2, 2, 2], dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4]),
    "sparsifiner_deit_small": dict(embed_dim=32, depth=2, num_heads=2),
    "inline_swin_tiny": dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], attn_type="IIMS1", drop_path_rate=0.0),
    "inline_deit_tiny": dict(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **SMALL[name])
    x = torch.randn(2, 3, 224, 224)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("name", list(SMALL))
def test_classifier_api(name):
    model = timm.create_model(name, num_classes=3, **SMALL[name]).eval()
    x = torch.randn(1, 3, 224, 224)
    assert model.get_classifier() is model.head and model(x).shape == (1, 3)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        timm.create_model(name, no_such_option=1)
