import pytest
import torch
from safetensors.torch import save_file

import attnzoo
from attnzoo.errors import InvalidInputError, OfflineError, UnknownNameError, WeightsError
from attnzoo.registry import register_model
from attnzoo.weights import CheckpointEntry, PreprocessConfig, register_checkpoint, unregister_checkpoint


def test_create_timm_model_random():
    model = attnzoo.create_model("test_resnet", weights="none")
    assert not model.training
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_create_model_kwargs_device_dtype():
    model = attnzoo.create_model("test_resnet", num_classes=7, dtype=torch.float64, device="cpu")
    assert model(torch.randn(2, 3, 64, 64, dtype=torch.float64)).shape == (2, 7)


def test_create_model_takes_dtype_names_and_ints_as_a_pipeline_does():
    model = attnzoo.create_model("test_resnet", dtype="fp16", device=-1)
    assert next(model.parameters()).dtype == torch.float16 and next(model.parameters()).device.type == "cpu"
    assert next(attnzoo.create_model("test_resnet", dtype="bfloat16").parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "placement",
    [{"device": "meta"}, {"device": "mps"}, {"dtype": torch.int8}, {"dtype": torch.complex64}, {"dtype": "fp13"}],
)
def test_create_model_refuses_a_device_or_dtype_that_cannot_work(placement, monkeypatch):
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(InvalidInputError):
        attnzoo.create_model("test_resnet", **placement)


@pytest.mark.parametrize("placement", [{"device": "meta"}, {"dtype": "float13"}])
def test_a_pipeline_refuses_a_device_or_dtype_that_cannot_work_before_building_its_model(placement, monkeypatch):
    """Before any weights are fetched: a pretrained model built first would download its checkpoint only to be
    refused (offline: an error about the missing checkpoint instead of the device)."""
    import attnzoo.factory

    monkeypatch.setattr(attnzoo.factory, "create_model", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(InvalidInputError, match="device|dtype"):
        attnzoo.pipeline("image-classification", model="resnet18", **placement)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_create_model_on_cuda_without_cuda_is_a_typed_error():
    with pytest.raises(InvalidInputError, match="CUDA"):
        attnzoo.create_model("test_resnet", device="cuda")


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownNameError) as info:
        attnzoo.create_model("resnet5O")
    assert "resnet50" in info.value.suggestions
    from attnzoo.errors import InvalidOptionError

    for bad in (None, "", "  ", 3):
        with pytest.raises(InvalidOptionError, match="a model is named by a non-empty string"):
            attnzoo.create_model(bad)


def test_a_checkpoint_file_given_as_the_model_is_named(tmp_path, capsys):
    from attnzoo.cli import main
    from attnzoo.errors import InvalidOptionError

    checkpoint = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, checkpoint)
    with pytest.raises(InvalidOptionError, match=r"is a file; a model is given by name .* as weights= \(--weights\)"):
        attnzoo.create_model(str(checkpoint))
    assert main(["run", "image-classification", str(checkpoint), "--model", str(checkpoint)]) == 2
    assert "is a file; a model is given by name" in capsys.readouterr().err


def test_weights_from_local_file(tmp_path):
    torch.manual_seed(1)
    src = attnzoo.create_model("test_resnet")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    for file in ("w.safetensors", "w.pth"):
        model = attnzoo.create_model("test_resnet", weights=tmp_path / file)
        assert all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values(), strict=True)
        )


def test_weights_that_do_not_fit_raise(tmp_path):
    state = attnzoo.create_model("test_resnet", num_classes=3).state_dict()
    state["conv1.0.weight"] = state["conv1.0.weight"][
        :, :2
    ].contiguous()  # a body that does not fit: no head count mends it
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="conv1.0.weight"):
        attnzoo.create_model("test_resnet", weights=str(tmp_path / "w.safetensors"))


def test_a_plain_checkpoint_of_other_classes_builds_a_model_of_its_class_count(tmp_path):
    """A checkpoint trained on 4 classes (no training run beside it): the class count is read from its
    classifier (timm's pretrained_cfg["classifier"]), and a warning says the class names are unknown."""
    torch.manual_seed(5)
    src = attnzoo.create_model("test_resnet", num_classes=4)
    save_file(src.state_dict(), tmp_path / "four.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "four.pth")
    x = torch.randn(1, 3, 48, 48)
    for file in ("four.safetensors", "four.pth"):
        with pytest.warns(UserWarning, match=r"4 classes \(fc\.weight \(4, .*names are unknown"):
            model = attnzoo.create_model("test_resnet", weights=tmp_path / file)
        assert model.num_classes == 4 and model.pretrained_cfg["num_classes"] == 4
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(x), src.eval()(x))
    with pytest.warns(UserWarning, match="names are unknown"):
        classify = attnzoo.pipeline("image-classification", model="test_resnet", weights=tmp_path / "four.pth")
    assert classify.labels == ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"]
    assert "4 classes read from its fc.weight; class names unknown" in classify.weights_label
    with pytest.warns(UserWarning, match="left out"):  # a num_classes of the caller's still wins
        seven = attnzoo.create_model("test_resnet", weights=tmp_path / "four.safetensors", num_classes=7)
    assert seven.num_classes == 7 and "weights_note" not in seven.pretrained_cfg


def test_pretrained_offline_without_cache_fails_fast(monkeypatch):
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    with pytest.raises(OfflineError, match="timm/resnet18") as info:
        attnzoo.create_model("resnet18", pretrained=True)
    assert "`hf download timm/resnet18.a1_in1k`" in str(info.value) and "place it at" not in str(info.value)


def test_invalid_pretrained_tag():
    with pytest.raises(UnknownNameError, match="resnet18.a1_in1k"):
        attnzoo.create_model("resnet18.no_such_tag", pretrained=True)


def test_registered_checkpoint_sets_preprocessing(tmp_path):
    src = attnzoo.create_model("test_resnet")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    entry = CheckpointEntry(
        name="test_resnet.unit",
        model="test_resnet",
        url=(tmp_path / "w.safetensors").as_uri(),
        preprocess=PreprocessConfig(input_size=(3, 72, 72), crop_pct=1.0, interpolation="bilinear", colour_order="BGR"),
    )
    register_checkpoint(entry)
    try:
        model = attnzoo.create_model("test_resnet.unit", pretrained=True)
        assert model.pretrained_cfg["input_size"] == (3, 72, 72)
        assert model.pretrained_cfg["colour_order"] == "BGR"
        assert all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values(), strict=True)
        )
    finally:
        unregister_checkpoint("test_resnet.unit")


def test_own_registry_and_list_models():
    @register_model(name="unit_toy_net")
    def _toy(width: int = 4):
        return torch.nn.Linear(width, 2)

    model = attnzoo.create_model("unit_toy_net", width=5)
    assert model.in_features == 5
    with pytest.raises(WeightsError, match="no pretrained checkpoint") as err:
        attnzoo.create_model("unit_toy_net", pretrained=True)
    assert "--weights PATH, or --weights none" in str(err.value)  # the spelling of the command line too
    assert "unit_toy_net" in attnzoo.list_models("unit_*")
    assert "resnet18" in attnzoo.list_models("resnet1*")
    assert all(n.startswith("resnet18.") for n in attnzoo.list_models("resnet18.*", pretrained=True))


def test_pretrained_with_the_hub_unreachable_fails_at_once_with_the_ways_out():
    """tests/conftest.py makes the Hub unreachable: no retries, and both ways out are named."""
    with pytest.raises(OfflineError) as info:
        attnzoo.create_model("resnet18", pretrained=True)
    message = str(info.value)
    assert "cannot reach huggingface.co" in message and "resnet18" in message
    assert "--weights none" in message and "ATTNZOO_OFFLINE=1" in message


def test_pretrained_from_the_hugging_face_cache_without_the_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from safetensors.torch import save

    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    torch.manual_seed(5)
    state = attnzoo.create_model("test_resnet", weights="none").state_dict()
    snapshot = cache / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(save(state))
    (cache / "models--timm--test_resnet.r160_in1k" / "refs").mkdir()
    (cache / "models--timm--test_resnet.r160_in1k" / "refs" / "main").write_text("a" * 40)
    model = attnzoo.create_model("test_resnet", pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_pretrained_from_an_unreachable_url_fails_at_once(monkeypatch, tmp_path):
    """timm cfgs with a plain URL: the host is probed once, and a cached file would not need it."""
    import socket

    import timm.models
    from timm.models import PretrainedCfg

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setattr(
        timm.models, "resolve_pretrained_cfg", lambda name: PretrainedCfg(url=f"http://127.0.0.1:{port}/rn.pth")
    )
    with pytest.raises(OfflineError, match=r"cannot reach 127\.0\.0\.1.*--weights none"):
        attnzoo.create_model("resnet18", pretrained=True)
    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    with pytest.raises(OfflineError, match=rf"offline mode.*{tmp_path / 'torch_hub' / 'checkpoints' / 'rn.pth'}"):
        attnzoo.create_model("resnet18", pretrained=True)


def test_list_models_pretrained():
    from attnzoo.weights import list_checkpoints

    plain, tagged = set(attnzoo.list_models()), attnzoo.list_models(pretrained=True)
    assert tagged == sorted(tagged) and len(tagged) == len(set(tagged))
    assert "resnet50.a1_in1k" in tagged and "resnet50" not in tagged and "resnet50" in plain
    assert all("." in name for name in tagged)  # every name carries the tag of its weights
    ours = {e.name for e in list_checkpoints()}
    assert ours and ours <= set(tagged)  # attnzoo's registered checkpoints, timm-shaped or not
    assert {name.partition(".")[0] for name in tagged} <= plain  # every tagged name is a model create_model knows
    assert attnzoo.list_models("resnet18.*", pretrained=True) == [n for n in tagged if n.startswith("resnet18.")]
    assert attnzoo.list_models("no_such_model*", pretrained=True) == []


def test_a_registered_checkpoint_with_another_head_or_as_features_loads_like_timm(tmp_path):
    """``num_classes`` of the caller's, or ``features_only``, leaves the file's classifier out, as
    ``timm.create_model(pretrained=True)`` does, and loads every other key exactly; it was refused."""
    torch.manual_seed(2)
    src = attnzoo.create_model("test_resnet")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    register_checkpoint(
        CheckpointEntry(name="test_resnet.unit", model="test_resnet", url=(tmp_path / "w.safetensors").as_uri())
    )
    try:
        ten = attnzoo.create_model("test_resnet.unit", pretrained=True, num_classes=10)
        assert (
            ten.fc.weight.shape == (10, src.fc.in_features) and ten.pretrained_cfg["checkpoint"] == "test_resnet.unit"
        )
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in ten.state_dict().items() if not k.startswith("fc."))
        features = attnzoo.create_model("test_resnet.unit", pretrained=True, features_only=True, out_indices=(1, 2))
        expected = timm_features(src, out_indices=(1, 2))
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(features(x), expected(x), strict=True))
        assert "state_dict" not in features.pretrained_cfg  # the weights are not kept twice
        assert attnzoo.create_model("test_resnet.unit", pretrained=True, num_classes=1000).fc.weight.equal(
            src.fc.weight
        )
    finally:
        unregister_checkpoint("test_resnet.unit")


def timm_features(model, **features):
    import timm

    return timm.create_model(
        "test_resnet",
        pretrained=True,
        pretrained_cfg_overlay={"state_dict": model.state_dict()},
        features_only=True,
        **features,
    ).eval()


def test_a_file_with_another_head_keeps_strict_on_everything_else(tmp_path):
    torch.manual_seed(3)
    src = attnzoo.create_model("test_resnet", num_classes=3)
    save_file(src.state_dict(), tmp_path / "three.safetensors")
    same = attnzoo.create_model("test_resnet", weights=tmp_path / "three.safetensors", num_classes=3)
    assert same.fc.weight.equal(src.fc.weight)  # the head fits: it is loaded
    five = attnzoo.create_model("test_resnet", weights=tmp_path / "three.safetensors", num_classes=5)
    assert five.fc.weight.shape[0] == 5
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in five.state_dict().items() if not k.startswith("fc."))
    prefixed = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    save_file(prefixed, tmp_path / "prefixed.safetensors")
    for adapted in (dict(num_classes=5), dict(features_only=True)):
        with pytest.raises(WeightsError, match=r"missing: .*unexpected: backbone\."):
            attnzoo.create_model("test_resnet", weights=tmp_path / "prefixed.safetensors", **adapted)
    with pytest.warns(UserWarning, match="names are unknown"):  # no num_classes asked for: the file's count
        three = attnzoo.create_model("test_resnet", weights=tmp_path / "three.safetensors")
    assert three.num_classes == 3 and all(torch.equal(v, src.state_dict()[k]) for k, v in three.state_dict().items())


def test_our_classifiers_agree_with_timm_on_features_and_another_head(tmp_path):
    import timm

    small = dict(depths=[2, 2, 2, 2], dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4])
    torch.manual_seed(4)
    source = timm.create_model("l2vit_tiny", **small)
    torch.save({"model": source.state_dict()}, tmp_path / "official.pth")
    overlay = dict(file=str(tmp_path / "official.pth"))
    x = torch.randn(1, 3, 224, 224)
    for adapted in (dict(num_classes=10), dict(features_only=True)):
        ours = attnzoo.create_model("l2vit_tiny", weights=tmp_path / "official.pth", **adapted, **small)
        theirs = timm.create_model("l2vit_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **adapted, **small)
        ours_state, theirs_state = ours.state_dict(), theirs.eval().state_dict()
        assert ours_state.keys() == theirs_state.keys()
        assert all(torch.equal(v, theirs_state[k]) for k, v in ours_state.items() if "head." not in k)  # a new head
        if adapted.get("features_only"):
            with torch.no_grad():
                assert all(torch.allclose(a, b) for a, b in zip(ours(x), theirs(x), strict=True))
