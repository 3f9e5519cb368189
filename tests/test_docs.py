"""The docs are part of the spec: their Python examples run, and the README's test command is CI's."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page, i, code)
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


@pytest.mark.parametrize("page, index, code", BLOCKS, ids=[f"{p.name}#{i}" for p, i, _ in BLOCKS])
def test_python_examples_run(page, index, code, tmp_path, monkeypatch):
    from attnzoo.weights import registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_CHECKPOINTS", dict(registry._CHECKPOINTS))  # examples may register entries
    exec(compile(code, f"{page.name}#{index}", "exec"), {"__name__": "__docs__"})


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command.strip() in [line.strip() for line in ci]
