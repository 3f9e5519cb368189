"""The README's first command in a fresh environment that holds attnzoo's core dependencies only.

The virtual environment is made from the distributions attnzoo's installed metadata requires
(no extras), linked from this environment rather than downloaded, then attnzoo is installed into
it with pip and ``attnzoo demo`` runs there: a core module importing an extra-only package, or a
demo step ending in "internal error", fails here.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def core_closure(root: str = "attnzoo") -> dict[str, md.Distribution]:
    """Every installed distribution ``root`` needs without extras (requirements followed transitively)."""
    found: dict[str, md.Distribution] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, ())]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if key in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement for another platform
        found[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            env = dict(default_environment())
            wanted = req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))
            if wanted:
                todo.append((req.name, tuple(req.extras)))
    found.pop(root, None)
    return found


def make_core_venv(path: Path) -> Path:
    """A venv whose site-packages links exactly the core closure's files; returns its python."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    for dist in core_closure().values():
        top = {
            str(f).split("/")[0]
            for f in dist.files or []
            if not str(f).startswith("..") and not str(f).endswith(".pth")
        }
        for name in top:
            source, target = Path(dist.locate_file(name)), site / name
            if source.exists() and not target.exists():
                target.symlink_to(source)
    return python


@pytest.mark.slow
def test_first_command_in_a_fresh_venv_without_extras(tmp_path):
    python = make_core_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(ATTNZOO_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", ATTNZOO_OFFLINE="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-e",
            str(ROOT),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    extras_missing = subprocess.run([python, "-c", "import openslide"], capture_output=True, env=env)
    assert extras_missing.returncode != 0, "the fresh environment must not hold the wsi extra"

    out = tmp_path / "demo"
    proc = subprocess.run(
        [python.parent / "attnzoo", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed
    assert "internal error" not in printed and "Traceback" not in printed
    assert "ERROR:" not in printed and "WARNING:" not in printed  # no third-party log lines
    assert f"writing results and pictures to {out}" in printed
    index = json.loads((out / "index.json").read_text())
    shown = {entry["task"]: entry for entry in index}
    from attnzoo.tasks import list_tasks

    assert set(shown) == set(list_tasks())  # every task shown, or skipped with its reason
    for entry in index:
        assert entry.get("files") or entry.get("skipped")
        for file in entry.get("files", []):
            assert Path(file).is_file() and Path(file).stat().st_size > 0
    assert not list(tmp_path.glob(".demo.*")), "no staging folder left behind"
