import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

import attnzoo
from attnzoo import errors

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_lazy():
    """`import attnzoo` must not pull torch, timm or the models in."""
    code = "import sys, attnzoo; heavy = [m for m in ('torch', 'timm', 'attnzoo.factory') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("order", ["import attnzoo, timm", "import timm, attnzoo"])
def test_timm_knows_our_models_after_import_attnzoo(order):
    code = f"{order}; print(timm.list_models('biformer_tiny'), timm.create_model('biformer_tiny', num_classes=3).num_classes)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['biformer_tiny'] 3"


def test_public_api_resolves():
    assert callable(attnzoo.create_model) and callable(attnzoo.list_models) and callable(attnzoo.pipeline)
    assert attnzoo.errors is errors
    with pytest.raises(AttributeError):
        attnzoo.does_not_exist  # noqa: B018


def test_dependency_ranges_admit_the_pinned_torch_pair():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    assert reqs["torch"].specifier.contains("2.14.1")
    assert reqs["torchvision"].specifier.contains("0.29.1")
    extras = project["optional-dependencies"]
    assert {"multimodal", "diffusion", "wsi", "train", "all", "dev"} <= set(extras)
    assert project["scripts"]["attnzoo"] == "attnzoo.cli:main"


def test_error_hierarchy_matches_builtins():
    assert issubclass(errors.InvalidInputError, ValueError)
    assert issubclass(errors.DatasetFormatError, ValueError)
    assert issubclass(errors.ChecksumError, errors.WeightsError)
    assert issubclass(errors.OfflineError, errors.WeightsError)
    assert issubclass(errors.BackendUnavailableError, RuntimeError)
    for cls in (errors.InvalidInputError, errors.WeightsError, errors.UnknownNameError, errors.BackendUnavailableError):
        assert issubclass(cls, errors.AttnzooError)


def test_unknown_name_suggests_close_names():
    err = errors.UnknownNameError("model", "resnet5O", ["resnet50", "resnet18", "vit_base"])
    assert err.suggestions[0] == "resnet50"
    assert str(err).startswith("unknown model 'resnet5O'. Did you mean: resnet50")
    assert isinstance(err, LookupError)
