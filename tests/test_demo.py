"""``attnzoo demo``'s output folder: an earlier demo's folder is replaced, anything else of the user's is
refused, never deleted (the demos themselves are stubbed: they only add files)."""

from __future__ import annotations

import json
import re

import pytest

from attnzoo import demo
from attnzoo.cli import main
from attnzoo.errors import InvalidOptionError


def stub_demo(task: str, run: int):
    """A demo that writes a listed picture, and a cache file it does not list (as the slide demo's features)."""

    def write(out, model, log, device=None):
        (out / "cache").mkdir(parents=True)
        (out / "picture.png").write_text(f"run {run}")
        (out / "cache" / "features.h5").write_text(f"run {run}")
        return demo.DemoResult(task, "m", False, [out / "picture.png"])

    return write


@pytest.fixture
def stubbed(monkeypatch):
    """Installs the stub demos of run ``n``."""

    def install(n: int) -> None:
        monkeypatch.setattr(demo, "DEMOS", {"image-classification": stub_demo("image-classification", n)})

    return install


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_default_folder_run_twice_is_replaced(tmp_path, monkeypatch, stubbed, capsys):
    """The newcomer's path: `attnzoo demo` twice, in the default folder; the second run replaces the first."""
    monkeypatch.chdir(tmp_path)
    for run in (1, 2):
        stubbed(run)
        assert main(["demo"]) == 0, capsys.readouterr()
        folder = tmp_path / "attnzoo-demo" / "image-classification"
        assert (folder / "picture.png").read_text() == f"run {run}"
    (entry,) = json.loads((tmp_path / "attnzoo-demo" / "index.json").read_text())
    assert entry["files"] == [str(folder / "picture.png"), str(folder / "cache" / "features.h5")]  # every file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attnzoo-demo"]  # no staging or old folder left


def test_a_folder_with_some_index_json_is_not_replaced(tmp_path, monkeypatch):
    """A website's folder (its own index.json, posts/thesis.md) is refused before any work, as it was."""
    monkeypatch.setattr(demo, "DEMOS", {})
    for index in ('{"title": "my site"}', "[]", '[{"task": "blog", "files": []}]', "not json"):
        site = tmp_path / "site"
        (site / "posts").mkdir(parents=True, exist_ok=True)
        (site / "index.json").write_text(index)
        (site / "posts" / "thesis.md").write_text("keep")
        before = tree(site)
        with pytest.raises(
            InvalidOptionError, match=f"--out {re.escape(str(site))} holds .*posts.*choose another folder"
        ):
            demo.run_demo(site, log=lambda line: None)
        assert tree(site) == before and sorted(p.name for p in tmp_path.iterdir()) == ["site"]


@pytest.mark.parametrize("added", ["notes.txt", "image-classification/notes.txt", "image-classification/cache/x"])
def test_a_file_added_to_a_demo_folder_is_never_deleted(tmp_path, stubbed, added):
    stubbed(1)
    out = tmp_path / "demo"
    demo.run_demo(out, log=lambda line: None)
    (out / added).write_text("mine")
    before = tree(out)
    stubbed(2)
    with pytest.raises(InvalidOptionError, match=f"{re.escape(str(out))} holds files .*{added}.*choose another folder"):
        demo.run_demo(out, log=lambda line: None)
    assert tree(out) == before
    (out / added).unlink()
    demo.run_demo(out, log=lambda line: None)  # the earlier demo alone again: replaced
    assert (out / "image-classification" / "picture.png").read_text() == "run 2"


def test_a_file_added_while_the_demo_runs_is_never_deleted(tmp_path, monkeypatch, stubbed):
    stubbed(1)
    out = tmp_path / "demo"
    demo.run_demo(out, log=lambda line: None)

    def add_a_file(folder, model, log, device=None):
        (out / "draft.md").write_text("mine")
        return stub_demo("image-classification", 2)(folder, model, log, device)

    monkeypatch.setattr(demo, "DEMOS", {"image-classification": add_a_file})
    with pytest.raises(InvalidOptionError, match="draft.md"):
        demo.run_demo(out, log=lambda line: None)
    assert (out / "draft.md").read_text() == "mine"
    assert (out / "image-classification" / "picture.png").read_text() == "run 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_a_moved_demo_folder_is_still_recognised(tmp_path, stubbed):
    """The index names files by absolute path; a renamed demo folder is still the demo's."""
    stubbed(1)
    demo.run_demo(tmp_path / "first", log=lambda line: None)
    (tmp_path / "first").rename(tmp_path / "moved")
    stubbed(2)
    demo.run_demo(tmp_path / "moved", log=lambda line: None)
    assert (tmp_path / "moved" / "image-classification" / "picture.png").read_text() == "run 2"


def test_a_file_or_a_folder_under_a_file_is_refused_through_the_python_api(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMOS", {})
    taken = tmp_path / "taken"
    taken.write_text("mine")
    with pytest.raises(InvalidOptionError, match="is a file; give a folder"):
        demo.run_demo(taken, log=lambda line: None)
    with pytest.raises(InvalidOptionError, match=f"cannot be created: {re.escape(str(taken))} is a file"):
        demo.run_demo(taken / "demo", log=lambda line: None)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and taken.read_text() == "mine"


def test_ctrl_c_says_nothing_was_written_and_to_run_it_again(tmp_path, monkeypatch, capsys):
    """The README promises one line saying what was kept and how to resume: it said only "interrupted"."""

    def interrupted(out, model, log, device=None):
        out.mkdir(parents=True)
        (out / "picture.png").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "DEMOS", {"image-classification": interrupted})
    assert main(["demo", "--out", str(tmp_path / "d")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"interrupted: nothing was written to {tmp_path / 'd'}") and "\n" not in err
    assert "run the same command again" in err
    assert not any(tmp_path.iterdir())  # as said: no folder, no staging left


def test_a_device_that_is_not_here_is_refused_before_any_demo_runs(tmp_path, monkeypatch, capsys):
    """``attnzoo demo --device cuda`` without CUDA started the demos before refusing (cuda:99 is refused with or
    without GPUs)."""
    ran = []
    monkeypatch.setattr(demo, "DEMOS", {"image-classification": lambda *a, **k: ran.append(a)})
    assert main(["demo", "--device", "cuda:99", "--out", str(tmp_path / "d")]) == 1
    assert "device='cuda:99' asked for CUDA" in capsys.readouterr().err
    assert ran == [] and not any(tmp_path.iterdir())
