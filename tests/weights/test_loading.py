import argparse
import hashlib
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnzoo.errors import UnknownNameError, WeightsError
from attnzoo.weights import (
    CheckpointEntry,
    PreprocessConfig,
    checkpoints_dir,
    convert_checkpoint,
    default_checkpoint,
    get_checkpoint,
    list_checkpoints,
    load_checkpoint_file,
    load_weights,
    register_checkpoint,
    resolve_checkpoint,
    unregister_checkpoint,
    unwrap_state_dict,
)
from tests.helpers import http_server


class Evil:
    """Unpickling this would run code (any global outside torch's allow-list)."""

    def __reduce__(self):
        return (print, ("pwned",))


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_safetensors_round_trip(tmp_path):
    sd = small_net().state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    loaded = load_checkpoint_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_safetensors_detected_by_content_not_suffix(tmp_path):
    sd = small_net().state_dict()
    save_file(sd, tmp_path / "w.bin")
    assert set(load_checkpoint_file(tmp_path / "w.bin")) == set(sd)


def test_pickle_needing_code_execution_is_refused(tmp_path):
    torch.save({"model": small_net().state_dict(), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="code execution"):
        load_checkpoint_file(tmp_path / "evil.pth")


def test_official_style_checkpoint_with_args_namespace_loads(tmp_path):
    """DeiT-style checkpoints keep argparse.Namespace beside the weights: harmless, allowed."""
    sd = small_net().state_dict()
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": 299}, tmp_path / "ck.pth")
    state = unwrap_state_dict(load_checkpoint_file(tmp_path / "ck.pth"))
    assert set(state) == set(sd)


def test_corrupt_files_are_weights_errors(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError):
        load_checkpoint_file(tmp_path / "bad.pth")
    good = tmp_path / "w.safetensors"
    save_file(small_net().state_dict(), good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="safetensors"):
        load_checkpoint_file(tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="is a folder: give the checkpoint file in it"):
        load_checkpoint_file(tmp_path)
    with pytest.raises(WeightsError, match=r"tensors mixed with other values \(step\) and no state dict"):
        unwrap_state_dict({**small_net().state_dict(), "step": 5})


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd, "optimizer": {"lr": 1}},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
)
def test_unwrap_state_dict_layouts(wrap):
    sd = small_net().state_dict()
    out = unwrap_state_dict(wrap(sd))
    assert list(out) == list(sd)


def test_unwrap_without_state_dict_names_keys():
    with pytest.raises(WeightsError, match="epoch"):
        unwrap_state_dict({"epoch": 3, "best": 0.1})


def test_load_weights_exact_and_mismatch_messages(tmp_path):
    src, dst = small_net(), torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.save({"model": src.state_dict()}, tmp_path / "ck.pth")
    load_weights(dst, tmp_path / "ck.pth")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with pytest.raises(WeightsError, match=r"shape mismatch.*0\.weight \(3, 4\) vs \(5, 4\)"):
        load_weights(bigger, tmp_path / "ck.pth")
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="1 unexpected: extra.weight"):
        load_weights(dst, sd)


def test_registry_resolve_download_convert(tmp_path):
    """An 'official' checkpoint with other key names: registered, fetched, converted, loaded."""
    official = {f"backbone.{k}": v for k, v in small_net().state_dict().items()}
    torch.save({"model": official, "args": argparse.Namespace(epochs=1)}, tmp_path / "official.pth")
    payload = (tmp_path / "official.pth").read_bytes()

    def convert(sd, model):
        return {k.removeprefix("backbone."): v for k, v in sd.items()}

    with http_server({"/official.pth": payload}) as (base, _):
        entry = register_checkpoint(
            CheckpointEntry(
                name="tinynet.test_in1k",
                model="tinynet",
                url=f"{base}/official.pth",
                sha256=hashlib.sha256(payload).hexdigest(),
                converter=convert,
                default=True,
                preprocess=PreprocessConfig(input_size=(3, 32, 32)),
            )
        )
        try:
            assert get_checkpoint("tinynet.test_in1k") is entry
            assert default_checkpoint("tinynet") is entry
            assert [e.name for e in list_checkpoints("tinynet*")] == ["tinynet.test_in1k"]
            path = resolve_checkpoint("tinynet.test_in1k")
            assert path.read_bytes() == payload and path.name == "official.pth"
            model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
            out = convert_checkpoint("tinynet.test_in1k", tmp_path / "ours.safetensors", model, converter=convert)
            ours = load_file(out)
            assert all(torch.equal(ours[k], small_net().state_dict()[k]) for k in ours)
            with pytest.raises(UnknownNameError, match="tinynet.test_in1k"):
                get_checkpoint("tinynet.test_in1")
        finally:
            unregister_checkpoint("tinynet.test_in1k")


def test_resolve_rejects_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(UnknownNameError):
        resolve_checkpoint("no_such_checkpoint")
    for blank in ("", "  "):  # Path("") is the current folder
        with pytest.raises(WeightsError, match="weights is empty: give a path"):
            resolve_checkpoint(blank)


def test_entry_needs_a_source():
    with pytest.raises(ValueError):
        CheckpointEntry(name="a.b", model="a")
    entry = CheckpointEntry(
        name="a.b", model="a", converter="attnzoo.weights.loading:unwrap_state_dict", url="https://x/y/w.pth?dl=1"
    )
    assert entry.cache_filename == "w.pth"
    assert entry.resolve_converter() is unwrap_state_dict


def test_a_downloaded_web_page_is_named_as_such(tmp_path):
    from attnzoo.weights.loading import load_checkpoint_file

    (tmp_path / "model.pth").write_bytes(b"\n<!DOCTYPE html><html><body>Sign in to OneDrive</body></html>")
    with pytest.raises(WeightsError, match="web page.*delete the file"):
        load_checkpoint_file(tmp_path / "model.pth")


@pytest.mark.parametrize(
    "content",
    [
        b"\xef\xbb\xbf<!DOCTYPE html><html><body>Quota exceeded</body></html>",  # UTF-8 byte-order mark
        "<html><body>Sign in</body></html>".encode("utf-16"),  # UTF-16 with its byte-order mark
        b"  \r\n<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>",  # an S3 error page
    ],
)
def test_web_pages_are_named_as_such_whatever_their_encoding(tmp_path, content):
    (tmp_path / "model.pth").write_bytes(content)
    with pytest.raises(WeightsError, match="web page") as info:
        load_checkpoint_file(tmp_path / "model.pth")
    assert "code execution" not in str(info.value)


def test_a_text_file_is_named_as_such(tmp_path):
    """torch's weights-only unpickler raises a bare KeyError on text; the user must read what the file is."""
    (tmp_path / "weights.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(WeightsError, match=r"text file.*'version https://git-lfs"):
        load_checkpoint_file(tmp_path / "weights.pth")


def test_empty_and_garbage_files_are_not_called_malicious(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_checkpoint_file(tmp_path / "empty.pth")
    (tmp_path / "noise.pth").write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint") as info:
        load_checkpoint_file(tmp_path / "noise.pth")
    assert "code execution" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path, bad, fmt):
    state = small_net().state_dict()
    state["2.weight"][1, 0] = bad
    state["0.bias"][:] = bad
    path = tmp_path / f"w.{fmt}"
    save_file(state, path) if fmt == "safetensors" else torch.save({"model": state}, path)
    with pytest.raises(WeightsError, match=r"2 tensor\(s\):.*0\.bias \(3 of 3\).*2\.weight \(1 of 6\)"):
        load_checkpoint_file(path)
    with pytest.raises(WeightsError, match="allow_non_finite=True"):
        load_weights(small_net(), path)
    model = load_weights(small_net(), path, allow_non_finite=True)  # the opt-out, e.g. to inspect a diverged run
    assert not torch.isfinite(model[0].bias).any()
    with pytest.raises(WeightsError, match="NaN or inf"):
        load_weights(small_net(), state)  # a state dict in memory too


def test_non_finite_weights_through_create_model(tmp_path):
    import attnzoo

    state = attnzoo.create_model("test_resnet", weights="none").state_dict()
    state["fc.weight"].fill_(float("nan"))
    save_file(state, tmp_path / "nan.safetensors")
    with pytest.raises(WeightsError, match=r"fc\.weight \(\d+ of \d+\)"):
        attnzoo.create_model("test_resnet", weights=tmp_path / "nan.safetensors")


def test_integer_and_bool_tensors_are_not_checked_for_finiteness(tmp_path):
    torch.save({"index": torch.arange(5), "mask": torch.ones(3, dtype=torch.bool)}, tmp_path / "ints.pth")
    assert set(load_checkpoint_file(tmp_path / "ints.pth")) == {"index", "mask"}


def test_a_converter_that_cannot_read_the_file_is_a_weights_error(tmp_path):
    torch.save({"model": {"unrelated": torch.zeros(2)}}, tmp_path / "other.pth")

    def official_layout(state, model):
        return {k.removeprefix("backbone."): state[f"backbone.{k}"] for k in model.state_dict()}

    with pytest.raises(WeightsError, match=r"official_layout reads \(KeyError"):
        load_weights(small_net(), tmp_path / "other.pth", converter=official_layout)


def test_verify_report(tmp_path):
    from attnzoo.errors import InvalidOptionError
    from attnzoo.weights import verify_report

    path = tmp_path / "w.pth"
    path.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    ok, message = verify_report(str(path))
    assert ok and digest in message and "no known sha256" in message  # nothing to compare: report, not fail
    assert verify_report(str(path), digest.upper()) == (True, f"OK {path} sha256={digest}")
    ok, message = verify_report(str(path), "0" * 64)
    assert not ok and "MISMATCH" in message and digest in message
    with pytest.raises(InvalidOptionError, match="64 hexadecimal"):
        verify_report(str(path), "abc")


def test_convert_never_writes_over_its_source_nor_into_a_folder(tmp_path):
    from attnzoo.errors import InvalidOptionError

    official = tmp_path / "official.pth"
    torch.save(small_net().state_dict(), official)
    before = official.read_bytes()
    (tmp_path / "linked.pth").hardlink_to(official)
    for dst in (official, tmp_path / "." / "official.pth", tmp_path / "linked.pth"):
        with pytest.raises(InvalidOptionError, match="is the checkpoint being converted"):
            convert_checkpoint(official, dst, small_net())
    assert official.read_bytes() == before  # the official checkpoint is kept
    with pytest.raises(InvalidOptionError, match="is a folder: give the .safetensors file"):
        convert_checkpoint(official, tmp_path, small_net())
    with pytest.raises(InvalidOptionError, match="official.pth is a file, not a folder"):  # was FileExistsError
        convert_checkpoint(official, official / "x.safetensors", small_net())
    out = convert_checkpoint(official, tmp_path / "ours.safetensors", small_net())
    assert set(load_file(out)) == set(small_net().state_dict())


def test_convert_refuses_an_existing_output_unless_overwrite_and_a_name_not_safetensors(tmp_path):
    """The two paths swapped (``convert OURS.safetensors OFFICIAL.pth``) wrote over the official checkpoint, and any
    existing file at the output was replaced silently."""
    from attnzoo.errors import InvalidOptionError

    official = tmp_path / "official.pth"
    torch.save(small_net().state_dict(), official)
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"the user's own file")
    with pytest.raises(InvalidOptionError, match=f"{mine} exists: give another file, or overwrite=True"):
        convert_checkpoint(official, mine, small_net())
    assert mine.read_bytes() == b"the user's own file"
    other = tmp_path / "other.pth"
    other.write_bytes(b"another checkpoint")
    for dst in (other, tmp_path / "new.pth", tmp_path / "new"):  # an existing one, or not yet
        with pytest.raises(InvalidOptionError, match=f"{dst} is not a .safetensors file name"):
            convert_checkpoint(official, dst, small_net(), overwrite=True)
    assert other.read_bytes() == b"another checkpoint" and not (tmp_path / "new.pth").exists()
    out = convert_checkpoint(official, mine, small_net(), overwrite=True)  # replaced, as asked
    assert out == mine and set(load_file(mine)) == set(small_net().state_dict())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically: no temporary left


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_float8_weights_are_checked_for_finiteness(tmp_path, dtype, fmt):
    """float8 has no min/max kernel on the CPU: the check reads it in float32 instead of failing."""
    values = torch.linspace(-2, 2, 12).reshape(3, 4)
    path = tmp_path / f"w.{fmt}"
    for state in ({"w": values.to(dtype)}, {"w": values.index_fill(1, torch.tensor([2]), float("nan")).to(dtype)}):
        save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
        if torch.isfinite(state["w"].float()).all():
            assert torch.equal(load_checkpoint_file(path)["w"].float(), state["w"].float())
        else:
            with pytest.raises(WeightsError, match=r"1 tensor\(s\): w \(3 of 12\)"):
                load_checkpoint_file(path)


# -- configuration objects official training scripts pickle beside the weights ------------------------------

MARKER = "foreign-code-ran"
FOREIGN_MODULES = {
    "yacs/__init__.py": "",
    "yacs/config.py": """
import pathlib
pathlib.Path({marker!r}).touch()

class CfgNode(dict):  # yacs' own is a dict subclass with attributes of its own
    def __init__(self, init_dict=None):
        super().__init__(init_dict or {{}})
        self.__dict__["__immutable__"] = False

    def __setstate__(self, state):
        pathlib.Path({marker!r}).touch()
""",
    "omegaconf/__init__.py": "from omegaconf.dictconfig import DictConfig\n",
    "omegaconf/base.py": """
class Metadata:
    def __init__(self, ref_type, object_type):
        self.ref_type, self.object_type = ref_type, object_type
""",
    "omegaconf/nodes.py": """
class AnyNode:
    def __init__(self, value):
        self._val = value
""",
    "omegaconf/dictconfig.py": """
import typing

from omegaconf.base import Metadata
from omegaconf.nodes import AnyNode

class DictConfig:  # OmegaConf's is no dict: its state holds nodes and metadata naming types
    def __init__(self, content):
        self.__dict__["_content"] = {{k: AnyNode(v) for k, v in content.items()}}
        self.__dict__["_metadata"] = Metadata(typing.Any, dict)

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)
""",
    "utils/__init__.py": "",
    "utils/utils.py": """
class Struct:  # ACMIL's config
    def __init__(self, **entries):
        self.__dict__.update(entries)
""",
}


@pytest.fixture
def foreign(tmp_path, monkeypatch):
    """yacs, omegaconf and ACMIL's ``utils`` written into a folder on sys.path (importable while a test saves
    with them); ``.forget()`` drops the imported modules, ``.uninstall()`` deletes the folder too."""
    import importlib
    import shutil
    import sys
    from types import SimpleNamespace

    root, marker = tmp_path / "site", tmp_path / MARKER
    for name, text in FOREIGN_MODULES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text.format(marker=str(marker)))
    assert not {"yacs", "omegaconf", "utils"} & set(sys.modules)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yacs, omegaconf, utils = (importlib.import_module(n) for n in ("yacs.config", "omegaconf", "utils.utils"))

    def forget():
        for name in [n for n in sys.modules if n.partition(".")[0] in ("yacs", "omegaconf", "utils")]:
            del sys.modules[name]
        marker.unlink(missing_ok=True)

    def uninstall():
        forget()
        shutil.rmtree(root)
        importlib.invalidate_caches()

    yield SimpleNamespace(
        CfgNode=yacs.CfgNode,
        DictConfig=omegaconf.DictConfig,
        Struct=utils.Struct,
        marker=marker,
        forget=forget,
        uninstall=uninstall,
    )
    forget()


def official_with_configs(foreign, path, weights):
    """A file as the official training scripts write it: InLine's yacs ``config``, BiFormer's hydra ``args``,
    ACMIL's ``Struct``."""
    config = foreign.CfgNode({"MODEL": foreign.CfgNode({"NAME": "inline_deit_t", "DEPTHS": [2, 2, 6, 2]})})
    torch.save(
        {
            "model": weights,
            "optimizer": {"state": {}, "param_groups": []},
            "max_accuracy": 74.5,
            "epoch": 299,
            "config": config,
            "args": foreign.DictConfig({"lr": 1e-3, "model": "biformer_tiny"}),
            "struct": foreign.Struct(D_feat=32, n_class=2),
        },
        path,
    )


def test_official_configs_pickled_beside_the_weights_load_without_their_libraries(tmp_path, foreign):
    source = small_net()
    official_with_configs(foreign, tmp_path / "official.pth", source.state_dict())
    foreign.uninstall()
    loaded = load_weights(
        torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)), tmp_path / "official.pth"
    )
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values(), strict=True)
    )
    obj = load_checkpoint_file(tmp_path / "official.pth")
    assert obj["config"] == {"MODEL": {"NAME": "inline_deit_t", "DEPTHS": [2, 2, 6, 2]}}  # a plain dict now
    assert type(obj["config"]).__module__ == "collections" and obj["epoch"] == 299
    assert obj["struct"] == {"D_feat": 32, "n_class": 2}  # attribute state read back as the mapping's items


class _CallsSubprocess:
    def __reduce__(self):
        import subprocess

        return subprocess.check_call, (["true"],)


def test_a_foreign_call_beside_the_weights_is_refused_not_stood_in(tmp_path):
    """Stand-ins are for the configuration classes official scripts pickle, not for any global: a call stays refused."""
    torch.save({"model": small_net().state_dict(), "hook": _CallsSubprocess()}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="needs code execution"):
        load_checkpoint_file(tmp_path / "bad.pth")


def test_no_code_of_a_foreign_library_runs_even_where_it_is_installed(tmp_path, foreign):
    import sys

    official_with_configs(foreign, tmp_path / "official.pth", small_net().state_dict())
    foreign.forget()  # still importable, not imported
    load_checkpoint_file(tmp_path / "official.pth")
    assert not foreign.marker.exists() and "yacs.config" not in sys.modules


def test_weights_inside_a_foreign_object_are_refused(tmp_path, foreign):
    torch.save({"model": foreign.CfgNode(small_net().state_dict()), "epoch": 3}, tmp_path / "hidden.pth")
    foreign.uninstall()
    with pytest.raises(WeightsError, match=r"tensors inside a yacs\.config\.CfgNode object"):
        load_checkpoint_file(tmp_path / "hidden.pth")


def test_a_foreign_config_does_not_let_code_through(tmp_path, foreign):
    torch.save(
        {"model": small_net().state_dict(), "config": foreign.CfgNode({"A": 1}), "x": Evil()}, tmp_path / "e.pth"
    )
    foreign.uninstall()
    with pytest.raises(WeightsError, match="code execution"):
        load_checkpoint_file(tmp_path / "e.pth")


# -- downloads that are not checkpoints ----------------------------------------------------------------------


def test_a_download_that_is_not_a_checkpoint_is_deleted_and_fetched_again(tmp_path, versioned_server):
    """A server that sends no length and stops early leaves a file cut short that nothing can detect before
    it is read: reading it deletes it, so the next call fetches it again instead of failing forever."""
    import io

    buffer = io.BytesIO()
    torch.save({"model": small_net().state_dict()}, buffer)
    versioned_server.files["/w.pth"] = buffer.getvalue()[:600]
    url = versioned_server.url("/w.pth")
    with pytest.raises(
        WeightsError, match=r"not a readable PyTorch checkpoint.*deleted: the next call fetches it again"
    ):
        load_weights(small_net(), url)
    assert not list(checkpoints_dir().rglob("w.pth"))
    versioned_server.files["/w.pth"] = buffer.getvalue()
    load_weights(small_net(), url)
    assert len(versioned_server.log) == 2


def test_a_file_of_the_users_own_is_never_deleted(tmp_path):
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"\x80\x02garbage that is no pickle at all" * 10)
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint") as info:
        load_weights(small_net(), mine)
    assert mine.exists() and "deleted" not in str(info.value)


# -- another classifier -----------------------------------------------------------------------------------


def test_load_weights_leaves_a_classifier_that_does_not_fit_and_nothing_else():
    source = small_net().state_dict()
    five = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 5))
    fresh = five[2].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"classifier does not fit .*2.weight \(2, 3\) vs \(5, 3\)"):
        load_weights(five, source, classifier=("2",))  # said: a wrong file would otherwise go unnoticed
    assert torch.equal(five[0].weight, source["0.weight"]) and torch.equal(five[2].weight, fresh)
    two = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_weights(two, source, classifier=("2",))  # it fits: loaded, nothing to say
    assert torch.equal(two[2].weight, source["2.weight"])
    headless = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    with pytest.warns(UserWarning, match=r"2.weight \(2, 3\) vs none"):
        load_weights(headless, source, classifier=("2",))  # num_classes=0: the file's head is left out
    with pytest.raises(WeightsError, match="1 missing: 0.bias"):
        load_weights(five, {k: v for k, v in source.items() if k != "0.bias"}, classifier=("2",))
    with pytest.raises(WeightsError, match="unexpected: backbone.0.weight"):
        load_weights(five, {f"backbone.{k}": v for k, v in source.items()}, classifier=("2",))


def test_convert_saves_only_what_the_source_holds(tmp_path):
    """A converter may fill a part the official file lacks with the model's own initialisation (Sparsifiner's
    predictor on a dense DeiT): the conversion leaves it out and names it, so loading it says so again."""
    from safetensors import safe_open

    source = small_net().state_dict()
    torch.save({"model": {k: v for k, v in source.items() if not k.startswith("2.")}}, tmp_path / "dense.pth")

    def fill_from_model(state, model):
        return {**state, **{k: v for k, v in model.state_dict().items() if k.startswith("2.")}}

    convert_checkpoint(tmp_path / "dense.pth", tmp_path / "out.safetensors", small_net(), converter=fill_from_model)
    with safe_open(tmp_path / "out.safetensors", "pt") as fh:
        assert set(fh.keys()) == {"0.weight", "0.bias"}
        assert fh.metadata()["not_in_source"] == "2.weight,2.bias"
