"""The distribution (dependencies, extras, lazy import, public API, errors) and the test suite's own
rules (where parity fixtures and Triton tests run)."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

import attnzoo
from attnzoo import errors
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


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


def test_every_name_in_all_resolves_and_list_tasks_is_top_level():
    """``from attnzoo import *`` gives every public name, list_tasks beside list_models, without torch."""
    code = "import sys, attnzoo; print(attnzoo.list_tasks()[:1], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['hallucination-mitigation'] False"
    from attnzoo.tasks import list_tasks

    assert "list_tasks" in attnzoo.__all__ and "list_tasks" in dir(attnzoo) and attnzoo.list_tasks is list_tasks
    assert all(getattr(attnzoo, name) is not None for name in attnzoo.__all__)


def test_dependency_ranges_admit_the_pinned_torch_pair():
    reqs = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
    assert reqs["torch"].specifier.contains("2.14.1")
    assert reqs["torchvision"].specifier.contains("0.29.1")
    extras = PROJECT["optional-dependencies"]
    assert {"wsi", "train", "all", "dev"} <= set(extras)
    assert PROJECT["scripts"]["attnzoo"] == "attnzoo.cli:main"


def requirements(extra: str) -> list[Requirement]:
    """An extra's requirements, with ``attnzoo[a,b]`` expanded to the extras it names."""
    found = []
    for line in PROJECT["optional-dependencies"][extra]:
        req = Requirement(line)
        if req.name == "attnzoo":
            found += [r for sub in sorted(req.extras) for r in requirements(sub)]
        elif req.marker is None or req.marker.evaluate():
            found.append(req)
    return found


@pytest.mark.parametrize("requirement", requirements("all") + requirements("dev"), ids=str)
def test_every_package_of_the_test_install_is_installed(requirement):
    """The suite imports these plainly (no importorskip): an extra that failed to install fails here
    by name instead of hiding the tests that need it."""
    version = importlib.metadata.version(requirement.name)
    assert requirement.specifier.contains(version, prereleases=True), f"{requirement} but {version} is installed"


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


# -- the suite's own rules ---------------------------------------------------------------------


def test_fixtures_are_required_in_ci_or_when_a_folder_is_named(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNZOO_REQUIRE_FIXTURES", raising=False)
    monkeypatch.delenv("ATTNZOO_REFERENCE_DIR", raising=False)
    assert not helpers.fixtures_required()
    assert helpers.reference_root() == ROOT.parent / "shared" / "reference"
    with pytest.raises(pytest.skip.Exception, match="absent not found"):
        helpers.reference_path(tmp_path, "absent")
    (tmp_path / "present").mkdir()
    assert helpers.reference_path(tmp_path, "present") == tmp_path / "present"
    monkeypatch.setenv("ATTNZOO_REQUIRE_FIXTURES", "0")
    assert not helpers.fixtures_required()
    monkeypatch.setenv("ATTNZOO_REQUIRE_FIXTURES", "1")
    with pytest.raises(pytest.fail.Exception, match="absent not found"):
        helpers.reference_path(tmp_path, "absent")
    monkeypatch.delenv("ATTNZOO_REQUIRE_FIXTURES")
    monkeypatch.setenv("ATTNZOO_REFERENCE_DIR", str(tmp_path / "elsewhere"))
    assert helpers.fixtures_required() and helpers.reference_root() == tmp_path / "elsewhere"
    with pytest.raises(pytest.fail.Exception, match="absent not found"):
        helpers.reference_path(tmp_path, "absent")


PROBE = """
from tests.helpers import reference_path

def test_root(reference_dir):
    pass

def test_fixture_folder(reference_dir):
    reference_path(reference_dir, "no_such_fixture")
"""


@pytest.mark.parametrize(
    "env, required",
    [
        ({"ATTNZOO_REFERENCE_DIR": "{tmp}/missing"}, True),  # a wrong folder named on purpose
        ({"ATTNZOO_REQUIRE_FIXTURES": "1"}, True),  # CI, with the default folder: a fixture in it is missing
        ({}, False),  # a checkout without (some) fixtures: skipped, not failed
    ],
)
def test_a_missing_fixture_fails_a_pytest_run_where_fixtures_are_required(tmp_path, env, required):
    """The rule end to end: pytest run on a probe test file with the repository's conftest as a plugin."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    clean = {k: v for k, v in os.environ.items() if k not in ("ATTNZOO_REFERENCE_DIR", "ATTNZOO_REQUIRE_FIXTURES")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest"]
        + ["--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        cwd=ROOT,
        env={**clean, **{k: v.format(tmp=tmp_path) for k, v in env.items()}},
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = proc.stdout.strip().splitlines()[-1]
    if required:
        assert proc.returncode == 1 and "skipped" not in summary, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        assert proc.returncode == 0 and "skipped" in summary, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_triton_tests_run_natively_on_cuda_and_interpreted_on_the_cpu(monkeypatch):
    """The decision behind the kernel_device / triton_device fixtures, on a machine with and without a GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert helpers.kernel_device() == "cuda" and helpers.triton_unavailable("cuda") is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert helpers.triton_unavailable("cuda") is None  # natively: the interpreter plays no part
    assert helpers.triton_dtypes() == [torch.float32, torch.float16, torch.bfloat16]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert helpers.kernel_device() == "cpu"
    assert helpers.triton_dtypes() == [torch.float32, torch.float16]  # the interpreter computes bf16 wrongly
    assert "TRITON_INTERPRET=1" in helpers.triton_unavailable("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert helpers.triton_unavailable("cpu") is None


def test_this_session_runs_triton_where_the_fixture_says(triton_device):
    """conftest set the interpreter exactly when there is no GPU, before triton was imported."""
    import torch

    assert triton_device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (triton_device == "cpu")


def test_property_tests_draw_the_same_examples_unless_asked_to_explore():
    """CI must not turn red on a random draw: the conftest profile derandomizes, and the settings a
    test module writes itself (max_examples, deadline) keep that."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tests.multimodal.test_hallucination_functional import FUZZ

    exploring = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
    assert settings.default.derandomize is not exploring and FUZZ.derandomize is not exploring
    drawn: list[list[int]] = [[], []]
    for run in drawn:

        @settings(max_examples=5)
        @given(st.integers())
        def draw(value):
            run.append(value)  # noqa: B023 (draw runs inside this iteration)

        draw()
    if not exploring:
        assert drawn[0] and drawn[0] == drawn[1]


def test_every_ci_step_stops_the_run_when_it_fails():
    """.ci/run is `set -e`: a command failing inside an `a && b` list other than its last does not stop it (a
    lint failure once let the tests run and CI pass), so every list but the final command's is one command."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert "set -euo pipefail" in commands
    assert [c for c in commands[:-1] if "&&" in c or "||" in c] == []
    assert any(c.startswith("ruff check") for c in commands) and "mypy" in commands
