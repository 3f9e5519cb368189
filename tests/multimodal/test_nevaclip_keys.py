"""NevaClip's vision tower has the official layout: open_clip's RN50 visual tower (what the paper's
``clip.load("RN50")`` builds, and what NevaClip loads by default) against the full-size key
manifest made with the official code (``../shared/reference/nevaclip``)."""

import open_clip
import pytest
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower

from attnzoo.multimodal.nevaclip import NevaClip
from tests.vision._reference import assert_key_layout, key_manifest


@pytest.mark.parity
def test_default_tower_has_the_official_rn50_layout(reference_dir):
    manifest = key_manifest(reference_dir, "nevaclip", "openai_RN50_visual")
    model = NevaClip()  # the paper's RN50 / openai: nothing is built or downloaded yet
    assert (model.model_name, model.pretrained) == ("RN50", "openai")
    cfg = open_clip.get_model_config(model.model_name)
    torch.manual_seed(0)
    tower = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]))  # random weights
    assert_key_layout(tower, manifest)
    assert len(manifest["keys"]) == manifest["num_keys"]
    tensors = [*tower.parameters(), *tower.buffers()]
    assert sum(t.numel() for t in tensors) == manifest["total_params_incl_buffers"]
