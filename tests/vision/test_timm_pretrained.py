"""``timm.create_model(<attnzoo classifier>, pretrained=True)`` reads its checkpoint through
attnzoo.weights: the registered entry's source, attnzoo's cache under the entry's own file name,
sha256, safe loading and typed errors; timm's adaptation (another ``num_classes``, features) stays.

timm's own download named its cache file after the URL's last path part: ``content`` for every
BiFormer OneDrive link (one model then loaded another's file) and nothing for InLine's
``.../?dl=1`` (the cache folder itself was read). Nothing here reaches the network: the hosts are a
local HTTP server, and ``urlopen`` fails the test if anything but attnzoo's downloader calls it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import urllib.request

import pytest
import timm
import torch

import attnzoo.weights.hub as hub
from attnzoo.errors import ChecksumError, OfflineError, WeightsError
from attnzoo.weights import checkpoints_dir, get_checkpoint, list_checkpoints
from attnzoo.weights import registry as weights_registry
from tests.helpers import http_server
from tests.vision.test_registered_models import timm_models

STL_SMALL = dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16)
SWIN_SMALL = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4])
WITH_CHECKPOINTS = sorted({e.model for e in list_checkpoints()} & set(timm_models()))


@pytest.fixture
def only_attnzoo_downloads(monkeypatch):
    """urllib's ``urlopen`` for attnzoo's downloader only: timm's own (torch.hub) download fails the test."""
    real = urllib.request.urlopen

    def urlopen(request, *args, **kwargs):
        url = request.full_url if isinstance(request, urllib.request.Request) else str(request)
        assert url.startswith("http://127.0.0.1:"), f"a download outside attnzoo.weights: {url}"
        return real(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_local_server_forgets_a_remembered_verdict_for_its_port(monkeypatch):
    """attnzoo.weights remembers per process whether a host:port answered; a test's local server may get
    the port of an earlier one that is gone, so tests.helpers.http_server forgets the verdict for its port
    (a remembered "down" made this file's downloads fail as offline, once, in a full run)."""
    import attnzoo.weights.hub as hub

    class Remembered(dict):
        forgotten: set = set()

        def pop(self, key, *default):
            self.forgotten.add(key)
            return super().pop(key, *default)

    monkeypatch.setattr(hub, "_VERDICTS", Remembered())
    with http_server({"/a": b"x"}) as (base, _):
        assert ("127.0.0.1", int(base.rsplit(":", 1)[1])) in hub._VERDICTS.forgotten


def checkpoint_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "epoch": 300}, buffer)  # the official wrapper
    return buffer.getvalue()


def serve_as(monkeypatch, name: str, url: str, payload: bytes, sha256: str | None = None) -> None:
    """The registered checkpoint ``name`` with its file at ``url`` (timm's cfg keeps the official URL)."""
    entry = get_checkpoint(name)
    sha = sha256 or hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(weights_registry._CHECKPOINTS, name, dataclasses.replace(entry, url=url, sha256=sha))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.usefixtures("only_attnzoo_downloads")
@pytest.mark.parametrize("name", WITH_CHECKPOINTS)
def test_offline_every_family_fails_with_a_typed_error(name, monkeypatch):
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline mode") as info:
        timm.create_model(name, pretrained=True)
    tag = timm.models.get_pretrained_cfg(name).tag
    assert str(checkpoints_dir() / get_checkpoint(f"{name}.{tag}").cache_filename) in str(info.value)


@pytest.mark.usefixtures("only_attnzoo_downloads")
@pytest.mark.parametrize("name", WITH_CHECKPOINTS)
def test_without_a_network_every_family_fails_with_a_typed_error(name, monkeypatch):
    monkeypatch.setattr(hub, "_connects", lambda *target: False)  # every host unreachable
    with pytest.raises(OfflineError, match="cannot reach .*--weights none"):
        timm.create_model(name, pretrained=True)


@pytest.mark.usefixtures("only_attnzoo_downloads")
def test_two_biformer_models_whose_urls_end_alike_load_their_own_checkpoints(monkeypatch):
    torch.manual_seed(0)
    sources = {name: timm.create_model(name, **STL_SMALL) for name in ("biformer_stl", "biformer_stl_nchw")}
    files = {f"/s{i}/root/content": checkpoint_bytes(m) for i, m in enumerate(sources.values())}
    with http_server(files) as (base, log):
        for (name, _), path in zip(sources.items(), files, strict=True):
            serve_as(monkeypatch, f"{name}.official_in1k", base + path, files[path])
        for _ in range(2):  # the second round reads attnzoo's cache
            for name, source in sources.items():
                model = timm.create_model(name, pretrained=True, **STL_SMALL)
                assert same_weights(model, source), name
    assert sorted(p for p, _ in log) == sorted(files)  # one download each
    assert (checkpoints_dir() / "biformer_stl_in1k.pth").is_file()
    assert (checkpoints_dir() / "biformer_stl_nchw_in1k.pth").is_file()


@pytest.mark.usefixtures("only_attnzoo_downloads")
def test_inline_tsinghua_url_loads_and_timm_adaptation_is_kept(monkeypatch):
    torch.manual_seed(0)
    source = timm.create_model("inline_swin_tiny", **SWIN_SMALL)
    payload = checkpoint_bytes(source)
    with http_server({"/f/32810869fcc34410966b/?dl=1": payload}) as (base, _):
        serve_as(monkeypatch, "inline_swin_tiny.official_in1k", f"{base}/f/32810869fcc34410966b/?dl=1", payload)
        model = timm.create_model("inline_swin_tiny", pretrained=True, **SWIN_SMALL)
        assert same_weights(model, source)
        assert (checkpoints_dir() / "inline_swin_tiny_in1k.pth").is_file()
        # another num_classes: timm's rule, the classifier is left out and the rest loads
        five = timm.create_model("inline_swin_tiny", pretrained=True, num_classes=5, **SWIN_SMALL)
        assert five.head.weight.shape == (5, 128)
        assert torch.equal(
            five.state_dict()["layers.0.blocks.0.attn.qkv.weight"], source.layers[0].blocks[0].attn.qkv.weight
        )
        features = timm.create_model("inline_swin_tiny", pretrained=True, features_only=True, **SWIN_SMALL)
        with torch.no_grad():
            maps = features.eval()(torch.randn(1, 3, 224, 224))
        assert [m.shape[1] for m in maps] == [16, 32, 64, 128]


@pytest.mark.usefixtures("only_attnzoo_downloads")
def test_a_checkpoint_with_another_sha256_is_refused(monkeypatch):
    payload = checkpoint_bytes(timm.create_model("biformer_stl", **STL_SMALL))
    with http_server({"/x/root/content": payload}) as (base, _):
        serve_as(monkeypatch, "biformer_stl.official_in1k", f"{base}/x/root/content", payload, sha256="0" * 64)
        with pytest.raises(ChecksumError):
            timm.create_model("biformer_stl", pretrained=True, **STL_SMALL)
    assert not (checkpoints_dir() / "biformer_stl_in1k.pth").exists()


def test_a_local_file_in_the_overlay_still_wins_and_a_misfit_is_a_weights_error(tmp_path):
    path, source = tmp_path / "stl.pth", timm.create_model("biformer_stl", **STL_SMALL)
    path.write_bytes(checkpoint_bytes(source))
    overlay = dict(file=str(path))
    assert same_weights(
        timm.create_model("biformer_stl", pretrained=True, pretrained_cfg_overlay=overlay, **STL_SMALL), source
    )
    assert not checkpoints_dir().exists() or not any(checkpoints_dir().iterdir())  # nothing fetched
    with pytest.raises(WeightsError, match="does not fit biformer_stl"):
        timm.create_model("biformer_stl", pretrained=True, pretrained_cfg_overlay=overlay, head_dim=8, depth=[1] * 4)


def test_a_saved_local_dir_loads_through_timm(tmp_path):
    """``local-dir:`` (timm's save_for_hf folder) is timm's to read: attnzoo's file loader refused the folder."""
    from timm.models import _hub

    source = timm.create_model("biformer_stl", **STL_SMALL)
    _hub.save_for_hf(source, tmp_path)
    assert same_weights(timm.create_model(f"local-dir:{tmp_path}", pretrained=True, **STL_SMALL), source)


def test_a_hub_repo_the_caller_names_is_left_to_timm_not_the_official_file():
    """An overlay ``hf_hub_id`` (or an ``hf-hub:`` model name) must not be answered with the registered
    official checkpoint: timm loads the repo the caller named, as it prefers it to the cfg's URL."""
    from timm.models import resolve_pretrained_cfg

    from attnzoo.vision._common import pretrained_checkpoint

    overlay = {"hf_hub_id": "someone/biformer_tiny_finetuned"}
    cfg = resolve_pretrained_cfg("biformer_tiny", None, overlay).to_dict()
    assert cfg["url"] and pretrained_checkpoint(cfg, overlay) is None
    assert pretrained_checkpoint({**cfg, "source": "hf-hub"}, {}) is None
    assert not checkpoints_dir().exists() or not any(checkpoints_dir().iterdir())  # nothing fetched
