"""Every GPU check of the project in one call: the GPU tests, then each benchmark script of this folder.

GPU time comes in short leases (about 15 minutes, a machine's start included), so the suite is
prepared and dry-run on the CPU and spends a lease in one command of at most 8 minutes. Each part runs
its commands as subprocesses (their own process group) under the part's own time limit, so one hang
cannot eat the rest; every part writes ``OUT/<part>.json`` (status, wall time, each command's output
lines and return code, the pytest counts) and ``OUT/<part>.log`` (everything the commands printed),
and ``OUT/summary.json`` names the card, driver, torch and triton and each part's status.

    python benchmarks/gpu_suite.py --out /tmp/suite                      # the GPU run (cuda when there is one)
    python benchmarks/gpu_suite.py --out /tmp/suite --device cpu --quick # the CPU dry run (tests/test_gpu_suite.py)
    python benchmarks/gpu_suite.py --out /tmp/suite --parts kernels,models --limit kernels=200
    python benchmarks/gpu_suite.py --prepare build/gpu_carry             # wheels + fixtures to carry to the GPU machine

On the CPU, commands that only mean something on a GPU are recorded as "skipped (needs CUDA)"; for
those the suite still checks that the script accepts every flag it would be given (``missing_flags``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_CUDA = "skipped (needs CUDA)"
SKIPPED_BUDGET = "skipped (budget spent)"
OUTPUT_LINES = 400  # the last lines of a command's output kept in its part's JSON
KILL_GRACE_S = 5.0
QUICK_LIMIT_S = 90.0  # each part's limit in a --quick run: only a guard against hangs (shared CPUs vary)
# Packages the device image lacks (read from /work/.library/device/KINDS.md): carried as wheels.
CARRIED_WHEELS = ("open_clip_torch", "ftfy", "wcwidth", "openslide-python", "openslide-bin")
# Parity fixtures the GPU tests read (tests/kernels and the vision tests selected with -k triton).
CARRIED_FIXTURES = ("biformer", "biformer_bra_op", "inline_deit", "lrgt_encoder")
# The wsi part's synthetic slide (Camelyon16 pyramid): large enough for several encoder batches of 32 (about
# 140 patches at 20x; 8192 px gave 62, under one batch). Written by the first GPU run into this ignored folder
# (the file is ~95 MB: too big to carry); a rerun on a machine still warm (rare: an idle one goes back within
# about 30 s) reuses it. 16384 px would take ~100 s to write.
WSI_SIZE = 12288
WSI_SLIDE = f"build/gpu_suite/slide_{WSI_SIZE}.tif"
# kernels.py's lines worth the summary: per-op speedups, % of HBM, the backends that could not run a case.
KERNEL_HEADLINE = r"speedup|HBM|skipped"
#: The LVLM methods on a random LLaVA-1.5 with 16 layers of LLaVA-1.5-7B's language-model shape (half
#: of its 32; built on the GPU in bfloat16): the machine cannot download the checkpoint, the ratios depend
#: on the shape, not the weights, and the whole 7B would not fit the part's time.
LLAVA_7B_SHAPE = ("--text-shape", "llava-7b", "--layers", "16")


@dataclass(frozen=True)
class Step:
    """One command of a part: ``python <argv>`` from the repository root."""

    name: str
    argv: tuple[str, ...]
    headline: str = ""  # regex: the output lines worth showing in the summary
    needs_cuda: bool = False


@dataclass
class Part:
    name: str
    description: str
    limit_s: float
    steps: list[Step] = field(default_factory=list)


def plan(device: str, quick: bool) -> list[Part]:
    """The parts in the order they run. ``quick``: the smallest shapes and repeats (the CPU dry run)."""
    dev = ("--device", device)
    pytest = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "120")
    # Triton's compiles are CPU-bound: spread the kernel tests over the GPU machine's 16 cores where xdist is there.
    spread = ("-n", "8") if not quick and importlib.util.find_spec("xdist") else ()
    vision_tests = ("tests/vision/test_biformer.py", "tests/vision/test_inline.py", "tests/vision/test_lrgt.py")
    passed = r"\d+ (passed|failed|error)"
    parts = [
        Part(
            "gpu_tests",
            "Triton kernels on the GPU in fp32/fp16/bf16 against the oracle (fwd + bwd), bitwise-deterministic "
            "grouped backward, the other kernel tests natively, and the models' parity on the triton backend",
            100,
            [
                Step("gpu_marked", (*pytest, "tests/kernels/test_gpu.py"), passed, needs_cuda=True),
                Step(
                    "kernels",
                    (*pytest, *spread, "tests/kernels", "--ignore=tests/kernels/test_gpu.py"),
                    passed,
                    needs_cuda=True,
                ),
                Step("vision_triton", (*pytest, *vision_tests, "-k", "triton"), passed, needs_cuda=True),
            ],
        ),
        Part(
            "kernels",
            "the LRGT encoder against the official LGA; BRA, L2ViT linear/window, Sparsifiner masked, LRGT "
            "grouped, InLine: fwd+bwd against the official-style reference, the torch and triton backends and "
            "SDPA; GB/s, % of HBM, peak memory (FlexAttention: the flex_bra part)",
            90,
            [
                Step(
                    "lrgt_encoder",
                    ("benchmarks/lrgt.py", *dev)
                    + (("--views", "3", "--repeats", "1") if quick else ("--dtype", "bfloat16", "--batch", "8")),
                    r"^\s*\d+\s",
                    needs_cuda=True,
                ),
                Step(
                    "ops",
                    ("benchmarks/kernels.py", *dev)
                    + (
                        ("--quick", "--cases", "bra,inline", "--repeats", "2")
                        if quick
                        else ("--dtype", "bfloat16", "--backward", "--batch", "128", "--repeats", "10")
                        + ("--backends", "torch,triton")  # compiled flex costs minutes over all shapes: flex_bra
                    ),
                    KERNEL_HEADLINE,
                ),
            ],
        ),
        Part(
            "models",
            "whole classifiers (bf16, channels-last) against their official-style attention and timm's swin_tiny / "
            "deit_small; training step (bf16 AMP) of the engine against a plain loop",
            70,
            [
                Step(
                    "forward",
                    ("benchmarks/classification_models.py", *dev)
                    + (
                        ("--models", "inline_deit_tiny", "--batch", "1", "--repeats", "1", "--no-baselines")
                        if quick
                        else ("--dtype", "bfloat16", "--batch", "128", "--repeats", "10")
                    )
                    + ("--channels-last",),
                    r"x\s|speedup|skipped|error|backend",
                ),
                Step(
                    "train_step",
                    ("benchmarks/train_throughput.py", *dev)
                    + (
                        ("--model", "resnet18", "--batch", "2", "--images", "6", "--size", "32", "--rounds", "1")
                        if quick
                        # 8 steps an epoch, 6 timed (the first warms up); three rounds, fresh models, median
                        else ("--model", "biformer_tiny", "--batch", "128", "--images", "1024", "--rounds", "3")
                    )
                    + ("--amp", "bf16"),
                    r"vs plain loop",
                ),
            ],
        ),
        Part(
            "nevaclip",
            "NevaClip RN50: 8 images optimised together against one at a time, identical scanpaths",
            35,
            [
                Step(
                    "batching",
                    ("benchmarks/scanpath.py", *dev)
                    + (
                        ("--images", "2", "--fixations", "1", "--iterations", "1")
                        if quick
                        else ("--images", "8", "--fixations", "5", "--iterations", "10", "--channels-last")
                        + ("--rounds", "2")  # a median of two; the official-style variant would double the time
                    )
                    + ("--skip-official-style",),
                    r"^ratio",
                    needs_cuda=True,
                ),
            ],
        ),
        Part(
            "wsi",
            "extract_features from a synthetic pyramidal slide against the bare encoder on in-memory patches "
            "(the slide's writing, about 45 s on 2 shared cores here, included)",
            75,
            [
                Step(
                    "extract_features",
                    ("benchmarks/wsi_features.py", *dev)
                    + (
                        ("--size", "2048", "--batch", "8", "--workers", "0", "--rounds", "1")
                        if quick
                        else ("--size", str(WSI_SIZE), "--batch", "32", "--workers", "4", "--rounds", "2")
                    )
                    + (() if quick else ("--slide", WSI_SLIDE)),
                    r"vs bare encoder",
                ),
            ],
        ),
        Part(
            "subject_insertion",
            "In-Context Brush's boosted attention against stock SDPA and the official explicit softmax",
            20,
            [
                Step(
                    "attention",
                    ("benchmarks/subject_insertion.py", *dev)
                    + (
                        ("--scale", "0.05", "--heads", "2", "--head-dim", "16", "--repeats", "1")
                        if quick
                        else ("--dtype", "bfloat16", "--official", "--repeats", "10")
                    ),
                    r"^(stock|boosted|official)\s",
                ),
            ],
        ),
        Part(
            "lvlm",
            "per-token decode time of VAR, PAI, VCD, AGLA against plain generate, and CARVE's whole answer "
            "against a plain one (random LLaVA-1.5, 16 layers of the 7B's shape)",
            50,
            [
                Step(
                    "decode",
                    ("benchmarks/lvlm_interventions.py", *dev)
                    + (
                        ("--methods", "var", "--tokens", "3", "--repeats", "1", "--text-hidden", "64", "--layers", "1")
                        if quick
                        else ("--methods", "var,var-eager,pai,vcd,agla-paper", "--dtype", "bfloat16", "--tokens", "32")
                        + ("--repeats", "3", "--interleave", *LLAVA_7B_SHAPE)
                    ),
                    r"^(plain|var|var-eager|pai|vcd|agla-paper)\s",
                ),
                Step(
                    "carve",
                    ("benchmarks/lvlm_interventions.py", *dev)
                    + (
                        (
                            "--methods",
                            "carve",
                            "--tokens",
                            "2",
                            "--repeats",
                            "1",
                            "--text-hidden",
                            "64",
                            "--layers",
                            "1",
                        )
                        if quick
                        else (
                            "--methods",
                            "carve,carve-paper",
                            "--dtype",
                            "bfloat16",
                            "--tokens",
                            "32",
                            "--repeats",
                            "3",
                            *LLAVA_7B_SHAPE,
                        )
                    ),
                    r"^(plain answer|carve|carve-paper)\s",
                ),
            ],
        ),
        Part(
            "flex_bra",
            "BRA (BiFormer-T 224 px stages, fwd+bwd) on compiled FlexAttention against the official gather: last, "
            "as its compiles are the slowest part; it gets whatever time the earlier parts left",
            10,
            [
                Step(
                    "flex",
                    ("benchmarks/kernels.py", *dev, "--cases", "bra", "--backends", "flex", "--resolutions", "224")
                    + (
                        ("--quick", "--repeats", "2")
                        if quick
                        else ("--dtype", "bfloat16", "--backward", "--batch", "128", "--repeats", "5")
                    ),
                    KERNEL_HEADLINE,
                    needs_cuda=True,
                ),
            ],
        ),
    ]
    for part in parts if quick else ():
        part.limit_s = QUICK_LIMIT_S
    return parts


# -- running ----------------------------------------------------------------------------------


def child_env(home: Path) -> dict[str, str]:
    """The children's environment: the project's src importable without an install (the GPU machine
    has none), nothing fetched from the network (it has none: fail fast instead of waiting), output unbuffered
    (a killed command keeps what it printed) and a private cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    env.update(
        PYTHONUNBUFFERED="1",
        ATTNZOO_HOME=str(home),
        ATTNZOO_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MPLBACKEND="Agg",
    )
    return env


def run_command(argv: list[str], log, env: dict[str, str], timeout_s: float) -> tuple[int | None, float]:
    """Run ``argv`` into ``log`` in its own process group; (return code or None on timeout, seconds).
    On timeout the whole group (DataLoader workers, the memory probes' subprocesses) is ended."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code: int | None = proc.wait(timeout=max(timeout_s, 0.01))
    except subprocess.TimeoutExpired:
        code = None
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc.pid, signal.SIGKILL)  # whatever the command left behind (workers, probes)
    proc.wait()
    return code, time.perf_counter() - start


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def flags_of(argv: tuple[str, ...]) -> list[str]:
    return [a for a in argv if re.fullmatch(r"--[a-z][a-z0-9-]*", a)]


def missing_flags(step: Step) -> list[str]:
    """The flags of ``step`` its script does not declare (read from its source: no import, no time), or the
    test paths that do not exist."""
    if step.argv[0] == "-m":
        return [a for a in step.argv if a.startswith("tests/") and not (ROOT / a).exists()]
    if not step.argv[0].endswith(".py"):  # python -c: nothing to check
        return []
    script = ROOT / step.argv[0]
    if not script.is_file():
        return [f"{step.argv[0]} does not exist"]
    declared = set(re.findall(r"add_argument\(\s*[\"'](--[a-z][a-z0-9-]*)", script.read_text()))
    return [flag for flag in flags_of(step.argv) if flag not in declared]


def pytest_counts(xml_path: Path) -> dict:
    """Tests, failures, errors, skips and the failing tests' ids from pytest's JUnit XML."""
    if not xml_path.is_file():
        return {}
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def run_part(
    part: Part, out: Path, device: str, limit_s: float, env: dict[str, str], scratch: Path, card: str | None = None
) -> dict:
    """Run ``part``'s steps in order within ``limit_s``; write ``<part>.log`` and ``<part>.json``; the record."""
    start = time.perf_counter()
    deadline = start + limit_s
    steps = []
    log_path = out / f"{part.name}.log"
    log_path.write_bytes(b"")
    with open(log_path, "ab") as log:  # appending: the suite and its commands share the file
        for step in part.steps:
            record: dict = {"name": step.name, "command": shlex.join(["python", *step.argv])}
            steps.append(record)
            log.write(f"\n===== {part.name}/{step.name}: {record['command']}\n".encode())
            lacking = missing_flags(step)
            if step.needs_cuda and device != "cuda":
                record.update(status=SKIPPED_CUDA, missing_flags=lacking)
                log.write(f"{SKIPPED_CUDA}; flags the script lacks: {lacking}\n".encode())
            elif lacking:  # fail fast and say why, rather than the script's argparse usage message
                record.update(status="error", missing_flags=lacking, error=f"the script lacks {lacking}")
                log.write(f"error: the script lacks {lacking}\n".encode())
            elif deadline - time.perf_counter() <= 0:
                record["status"] = SKIPPED_BUDGET
            else:
                record.update(execute(step, log, log_path, env, deadline - time.perf_counter(), scratch / part.name))
            log.flush()
    result = {
        "part": part.name,
        "description": part.description,
        "status": part_status([s["status"] for s in steps]),
        "wall_s": round(time.perf_counter() - start, 2),
        "limit_s": round(limit_s, 1),
        "device": device,
        "card": card,
        "steps": steps,
    }
    (out / f"{part.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def execute(step: Step, log, log_path: Path, env: dict[str, str], left: float, scratch: Path) -> dict:
    """Run one step with ``left`` seconds; its record: status, return code, wall time, output lines."""
    argv = [sys.executable, *step.argv]
    junit = scratch.with_name(f"{scratch.name}.{step.name}.xml")
    if step.argv[:2] == ("-m", "pytest"):
        argv += ["--junitxml", str(junit)]
    log.flush()
    offset = log.tell()
    code, seconds = run_command(argv, log, env, left)
    lines = log_path.read_bytes()[offset:].decode(errors="replace").splitlines()
    record: dict = {"returncode": code, "wall_s": round(seconds, 2), "output": lines[-OUTPUT_LINES:]}
    record["headlines"] = [line.strip() for line in lines if step.headline and re.search(step.headline, line)]
    if junit.is_file():
        record["tests"] = pytest_counts(junit)
    if code is None:
        record.update(status="timeout", error=f"killed after {left:.0f} s (the part's limit)")
        log.write(f"\n===== timeout after {left:.0f} s\n".encode())
    elif code != 0:
        record.update(status="error", error=(lines or ["(no output)"])[-1][-500:])
    else:
        record["status"] = "ok"
    return record


def part_status(statuses: list[str]) -> str:
    """A part's status from its steps': the worst of timeout, error, ok; skipped when none ran."""
    for worst in ("timeout", "error", "ok"):
        if worst in statuses:
            return worst
    return statuses[0] if statuses else "ok"


def machine(device: str) -> dict:
    """Card, driver and library versions, read without importing torch (the parent stays light)."""
    info: dict = {
        "device": device,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    for name in ("torch", "triton", "torchvision", "timm", "transformers", "open_clip_torch", "openslide-python"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        found = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        if found.returncode == 0 and found.stdout.strip():
            name, driver, memory = (x.strip() for x in found.stdout.strip().splitlines()[0].split(","))
            info.update(card=name, driver=driver, memory=memory)
            return info
    info.update(card=platform.processor() or platform.machine(), driver=None, memory=None)
    return info


def torch_builds() -> dict:
    """The CUDA and cuDNN versions torch was built with, and the card as torch names it, read in a child
    process (importing torch here would slow the parent and hold a CUDA context through every part)."""
    probe = (
        "import json, torch; cuda = torch.cuda.is_available(); print(json.dumps({'torch_cuda': torch.version.cuda, "
        "'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None, "
        "'torch_card': torch.cuda.get_device_name() if cuda else None}))"
    )
    try:
        found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        return json.loads(found.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as err:
        return {"torch_cuda": None, "cudnn": None, "torch_card": None, "torch_probe_error": repr(err)[:200]}


def run_suite(
    parts: list[Part], out: Path, device: str, budget_s: float, limits: dict[str, float] | None = None
) -> dict:
    """Run ``parts`` in order, each within its limit and what is left of ``budget_s``; write summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    limits = limits or {}
    summary: dict = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "budget_s": budget_s,
        **machine(device),
        **torch_builds(),
        "parts": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as scratch:
        env = child_env(Path(scratch) / "home")
        own = [limits.get(part.name, part.limit_s) for part in parts]
        for i, part in enumerate(parts):
            left = budget_s - (time.perf_counter() - start)
            limit = part_limit(own[i], left, sum(own[i + 1 :]))
            if limit <= 0:
                result: dict = {"part": part.name, "description": part.description, "status": SKIPPED_BUDGET}
                result.update(wall_s=0.0, limit_s=0.0, device=device, card=summary["card"], steps=[])
                (out / f"{part.name}.json").write_text(json.dumps(result, indent=1) + "\n")
                (out / f"{part.name}.log").write_text(f"{SKIPPED_BUDGET}\n")
            else:
                print(f"[{part.name}] up to {limit:.0f} s: {part.description}", flush=True)
                result = run_part(part, out, device, limit, env, Path(scratch), summary["card"])
            headlines = [h for s in result["steps"] for h in s.get("headlines", [])]
            summary["parts"].append(
                {key: result[key] for key in ("part", "status", "wall_s", "limit_s")}
                | {
                    "headlines": headlines,
                    "missing_flags": [f for s in result["steps"] for f in s.get("missing_flags", [])],
                }
            )
            print(f"[{part.name}] {result['status']} in {result['wall_s']:.1f} s", flush=True)
    summary["wall_s"] = round(time.perf_counter() - start, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def part_limit(own_s: float, left_s: float, later_s: float) -> float:
    """A part's seconds: its own limit, or more when the earlier parts left time the later ones' limits do
    not claim (so time an early part did not use passes on), never past what is left of the budget."""
    return min(max(own_s, left_s - later_s), left_s)


def print_table(summary: dict) -> None:
    print(
        f"\n{summary['card']} | driver {summary['driver']} | torch {summary['torch']} (CUDA {summary['torch_cuda']}, "
        f"cuDNN {summary['cudnn']}) | triton {summary['triton']} | timm {summary['timm']} "
        f"| transformers {summary['transformers']} "
        f"| {summary['wall_s']:.0f} s of {summary['budget_s']:.0f}"
    )
    print(f"{'part':<18} {'status':<24} {'wall s':>7} {'limit s':>8}  headline")
    for row in summary["parts"]:
        note = row["headlines"] or [f"flags the script lacks: {row['missing_flags']}" if row["missing_flags"] else ""]
        print(f"{row['part']:<18} {row['status']:<24} {row['wall_s']:>7.1f} {row['limit_s']:>8.0f}  {note[-1][:90]}")


# -- what the GPU machine needs carried -------------------------------------------------------


def prepare(folder: Path) -> None:
    """Wheels of the packages the device image lacks (CPython 3.12, manylinux x86-64, the versions
    installed here) and the parity fixtures of the GPU tests, into ``folder`` (an ignored path to carry)."""
    wheels, fixtures = folder / "wheels", folder / "reference"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED_WHEELS]
    platforms = [f"--platform=manylinux{tag}_x86_64" for tag in ("_2_28", "_2_27", "_2_17", "2014", "1")]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version=3.12"]
        + ["--implementation=cp", *platforms, "-d", str(wheels), *pins],
        check=True,
    )
    source = Path(os.environ.get("ATTNZOO_REFERENCE_DIR") or ROOT.parent / "shared" / "reference")
    for name in CARRIED_FIXTURES:
        shutil.copytree(source / name, fixtures / name, dirs_exist_ok=True)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(folder)], cwd=ROOT).returncode == 0
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    print(f"{folder}: {size:.1f} MiB" + ("" if ignored else " -- NOT ignored by git: add it to .git/info/exclude"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for <part>.json, <part>.log and summary.json")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: cuda when nvidia-smi sees a GPU"
    )
    parser.add_argument("--quick", action="store_true", help="smallest shapes and repeats (the CPU dry run)")
    parser.add_argument("--parts", default=None, help="comma-separated subset, in the suite's order (default: all)")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run's seconds (default 450; quick 300)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=S", help="override a part's time limit")
    parser.add_argument(
        "--prepare", type=Path, metavar="DIR", help="download the wheels and copy the fixtures to carry"
    )
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if args.out is None:
        parser.error("--out is required")
    device = args.device or ("cuda" if machine("cuda").get("driver") else "cpu")
    parts = plan(device, args.quick)
    limits = {name: float(seconds) for name, seconds in (item.split("=", 1) for item in args.limit)}
    chosen = args.parts.split(",") if args.parts else [p.name for p in parts]
    unknown = (set(chosen) | set(limits)) - {p.name for p in parts}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; the parts: {','.join(p.name for p in parts)}")
    parts = [p for p in parts if p.name in chosen]
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.quick else 450.0)
    summary = run_suite(parts, args.out, device, budget, limits)
    print_table(summary)
    sys.exit(0 if all(row["status"] in ("ok", SKIPPED_CUDA) for row in summary["parts"]) else 1)


if __name__ == "__main__":
    main()
