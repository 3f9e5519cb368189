"""benchmarks/gpu_suite.py: its CPU dry run (so the one-call GPU suite cannot rot between GPU leases)
and its time limits (a hung part is ended with its whole process group and the next part still runs)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left to a parent that does not reap counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_hung_part_times_out_with_its_children_and_the_next_part_runs(suite, tmp_path):
    hang = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print('child', child.pid, flush=True); time.sleep(120)"
    )
    parts = [
        suite.Part("hangs", "sleeps past its limit", 60, [suite.Step("sleep", ("-c", hang))]),
        suite.Part(
            "after", "runs after the hang", 60, [suite.Step("echo", ("-c", "print('speedup 2.5x')"), "speedup")]
        ),
        suite.Part("gpu_only", "needs CUDA", 60, [suite.Step("t", ("-m", "pytest", "tests/kernels"), needs_cuda=True)]),
    ]
    summary = suite.run_suite(parts, tmp_path, "cpu", budget_s=60, limits={"hangs": 1.5})

    assert [p["status"] for p in summary["parts"]] == ["timeout", "ok", suite.SKIPPED_CUDA]
    assert summary["parts"][0]["wall_s"] < 30
    assert summary["parts"][1]["headlines"] == ["speedup 2.5x"]
    hung = json.loads((tmp_path / "hangs.json").read_text())
    assert hung["steps"][0]["returncode"] is None and "killed after" in hung["steps"][0]["error"]
    child = int(next(line for line in hung["steps"][0]["output"] if line.startswith("child")).split()[1])
    assert not alive(child), "the hung command's own subprocess outlived the part's limit"
    assert "timeout after" in (tmp_path / "hangs.log").read_text()
    assert json.loads((tmp_path / "gpu_only.json").read_text())["steps"][0]["missing_flags"] == []


def test_budget_spent_skips_the_remaining_parts(suite, tmp_path):
    parts = [suite.Part(name, name, 60, [suite.Step("echo", ("-c", "print(1)"))]) for name in ("first", "second")]
    summary = suite.run_suite(parts, tmp_path, "cpu", budget_s=0)
    assert [p["status"] for p in summary["parts"]] == [suite.SKIPPED_BUDGET] * 2
    assert all((tmp_path / f"{name}.{ext}").is_file() for name in ("first", "second") for ext in ("json", "log"))


def test_time_an_earlier_part_left_passes_on_but_never_past_the_budget(suite):
    assert suite.part_limit(60, left_s=300, later_s=200) == 100  # 40 s unused before: passed on
    assert suite.part_limit(60, left_s=200, later_s=200) == 60  # nothing unused: its own limit
    assert suite.part_limit(60, left_s=30, later_s=0) == 30  # never past what is left
    limits = [p.limit_s for p in suite.plan("cuda", quick=False)]
    assert sum(limits) <= 450  # the default budget: a device call of at most 8 minutes


def test_every_flag_the_suite_passes_is_one_its_script_declares(suite):
    """Checked for the GPU plan too, which the dry run cannot execute."""
    for device, quick in (("cuda", False), ("cuda", True), ("cpu", True)):
        for part in suite.plan(device, quick):
            for step in part.steps:
                lacking = suite.missing_flags(step)
                assert not lacking, f"{part.name}: {step.argv[0]} does not declare {lacking}"


def test_pytest_counts_name_the_failing_tests(suite, tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.kernels.test_gpu" name="test_ok"/>'
        '<testcase classname="tests.kernels.test_gpu" name="test_bf16"><failure message="off"/></testcase>'
        '<testcase classname="tests.kernels.test_gpu" name="test_skip"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    assert suite.pytest_counts(xml) == {
        "tests": 3,
        "failures": 1,
        "errors": 0,
        "skipped": 1,
        "failed": ["tests.kernels.test_gpu::test_bf16"],
    }


@pytest.mark.slow
def test_cpu_dry_run_writes_every_part(suite, tmp_path):
    out = tmp_path / "suite"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", "--quick", "--budget-s", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [p.name for p in suite.plan("cpu", True)]
    assert [p["part"] for p in summary["parts"]] == names
    for key in ("card", "driver", "torch", "torch_cuda", "cudnn", "triton", "timm", "transformers", "python"):
        assert key in summary
    for key in ("budget_s", "wall_s", "started"):
        assert key in summary
    for row in summary["parts"]:
        assert set(row) >= {"part", "status", "wall_s", "limit_s", "headlines", "missing_flags"}
        part = json.loads((out / f"{row['part']}.json").read_text())
        assert part["status"] == row["status"] and part["card"] == summary["card"]
        assert (out / f"{row['part']}.log").read_text().strip()
        for step in part["steps"]:
            assert step["status"] in ("ok", suite.SKIPPED_CUDA), (row["part"], step["status"], step.get("error"))
            if step["status"] == "ok":
                assert step["returncode"] == 0 and step["output"] and step["headlines"], (row["part"], step)
    statuses = {row["part"]: row["status"] for row in summary["parts"]}
    assert statuses["gpu_tests"] == statuses["nevaclip"] == statuses["flex_bra"] == suite.SKIPPED_CUDA
    assert statuses["kernels"] == statuses["models"] == statuses["wsi"] == "ok"
    assert "part" in done.stdout and "status" in done.stdout  # the printed table
