import contextlib
import hashlib
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import attnzoo
from attnzoo.cli import main
from attnzoo.errors import InvalidOptionError
from attnzoo.weights import CheckpointEntry, register_checkpoint, unregister_checkpoint


def test_help_documents_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "eval", "train", "weights", "demo", "models", "tasks"):
        assert command in out
    assert main(["weights", "--help"]) == 0
    out = capsys.readouterr().out
    for command in ("list", "download", "verify", "convert"):
        assert command in out
    assert main(["--version"]) == 0 and attnzoo.__version__ in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "attnzoo.cli",
        "eval",
        "image-classification",
        "--model",
        "test_resnet",
        "--weights",
        "none",
        "--data",
        str(tmp_path / "missing"),
        "--out",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: dataset folder {tmp_path / 'missing'} does not exist"]
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DatasetFormatError" in debug.stderr


def test_unknown_model_and_task_suggest(capsys):
    assert main(["run", "image-classification", "x.png", "--model", "resnet5O"]) == 1
    assert "Did you mean: resnet50" in capsys.readouterr().err
    assert main(["run", "image-clasification", "x.png"]) == 1
    assert "image-classification" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main(["eval", "image-classification"]) == 2
    assert "--data" in capsys.readouterr().err


def test_run_prints_and_saves(tmp_path, photo, capsys):
    photo.save(tmp_path / "cat.png")
    (tmp_path / "imgs").mkdir()
    photo.save(tmp_path / "imgs" / "a.jpg")
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "image-classification",
                str(tmp_path / "cat.png"),
                str(tmp_path / "imgs"),
                "--model",
                "test_resnet",
                "--weights",
                "none",
                "--out",
                str(out),
                "--top-k",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "cat.png:" in printed and "a.jpg:" in printed
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "image-classification" and record["model"] == "test_resnet"
    assert record["weights"] == "random (seed 0)"
    results = record["results"]
    assert len(results) == 2 and all(len(v) == 3 for v in results.values())
    # the same (seeded) random model in Python gives the same top-3 for the same file
    expected = attnzoo.pipeline("image-classification", model="test_resnet", weights="none", device="cpu")(
        str(tmp_path / "cat.png"), top_k=3
    )
    got = results[str(tmp_path / "cat.png")]
    assert [(g["index"], g["label"]) for g in got] == [(p.index, p.label) for p in expected]
    assert [g["score"] for g in got] == pytest.approx([p.score for p in expected], rel=1e-5)
    assert (out / "cat.png").exists() and (out / "a.png").exists()
    (tmp_path / "imgs" / "b").mkdir()
    photo.save(tmp_path / "imgs" / "b" / "a.jpg")  # the same stem in another folder: its own picture
    main(
        [
            "run",
            "image-classification",
            str(tmp_path / "imgs"),
            "--model",
            "test_resnet",
            "--weights",
            "none",
            "--out",
            str(out),
            "--top-k",
            "3",  # the same settings: another --top-k would be refused (test_run_refuses_...other_settings)
        ]
    )
    assert (out / "a.png").exists() and (out / "a-2.png").exists()


def test_run_bad_file_is_an_error(tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert (
        main(["run", "image-classification", str(tmp_path / "bad.jpg"), "--model", "test_resnet", "--weights", "none"])
        == 1
    )
    assert "bad.jpg" in capsys.readouterr().err


def test_weights_commands(tmp_path, capsys):
    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet")
    official = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": official, "epoch": 3}, tmp_path / "official.pth")
    digest = hashlib.sha256((tmp_path / "official.pth").read_bytes()).hexdigest()
    entry = CheckpointEntry(
        name="test_resnet.cli_unit", model="test_resnet", url=(tmp_path / "official.pth").as_uri(), sha256=digest
    )
    register_checkpoint(entry)
    try:
        assert main(["weights", "list", "test_resnet.*"]) == 0
        assert "test_resnet.cli_unit" in capsys.readouterr().out
        assert main(["weights", "download", "test_resnet.cli_unit"]) == 0
        cached = capsys.readouterr().out.strip()
        assert cached.endswith("official.pth") and "checkpoints" in cached
        assert main(["weights", "verify", "test_resnet.cli_unit"]) == 0
        assert "OK" in capsys.readouterr().out
        assert main(["weights", "verify", str(tmp_path / "official.pth"), "--sha256", "0" * 64]) == 1
        assert "sha256" in capsys.readouterr().err
        assert (
            main(
                [
                    "weights",
                    "convert",
                    "test_resnet.cli_unit",
                    str(tmp_path / "ours.safetensors"),
                    "--model",
                    "test_resnet",
                ]
            )
            == 0
        )
        converted = load_file(tmp_path / "ours.safetensors")
        assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())
    finally:
        unregister_checkpoint("test_resnet.cli_unit")


def test_convert_refuses_unsafe_pickle_and_mismatch(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("x",))

    torch.save({"model": {}, "x": Evil()}, tmp_path / "evil.pth")
    assert (
        main(
            [
                "weights",
                "convert",
                str(tmp_path / "evil.pth"),
                str(tmp_path / "o.safetensors"),
                "--model",
                "test_resnet",
            ]
        )
        == 1
    )
    assert "code execution" in capsys.readouterr().err
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    assert (
        main(
            [
                "weights",
                "convert",
                str(tmp_path / "other.safetensors"),
                str(tmp_path / "o.safetensors"),
                "--model",
                "test_resnet",
            ]
        )
        == 1
    )
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_models_and_tasks(capsys):
    assert main(["models", "test_res*"]) == 0
    assert capsys.readouterr().out.split() == ["test_resnet"]
    assert main(["tasks"]) == 0
    assert "image-classification" in capsys.readouterr().out


def test_demo_writes_pictures_and_says_random(tmp_path, capsys):
    """The README's first command: every task, random weights said so, and values a second run of the same
    (seeded) random pipelines reproduces."""
    import numpy as np

    from attnzoo.datasets.binvox import read_binvox
    from attnzoo.demo import sample_images, synthetic_views
    from attnzoo.tasks import list_tasks

    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and f"writing results and pictures to {tmp_path / 'demo'}" in out
    # no network and no offline switch set by the user: the demo says so, not "offline mode"
    assert "no network to huggingface.co" in out and "offline mode" not in out
    index = {entry["task"]: entry for entry in json.loads((tmp_path / "demo" / "index.json").read_text())}
    assert set(index) == set(list_tasks()) and not any(e.get("skipped") for e in index.values())
    assert all(e["pretrained"] is False for e in index.values())  # no network here; LRGT/ACMIL/OAT: none to download

    folder = tmp_path / "demo" / "image-classification"
    results = json.loads((folder / "results.json").read_text())
    assert results["pretrained"] is False
    classify = attnzoo.pipeline("image-classification", model="resnet50.a1_in1k", weights="none", device="cpu")
    expected = classify(sample_images(("chelsea",))["chelsea"], top_k=5)
    assert [p["index"] for p in results["predictions"]["chelsea"]] == [p.index for p in expected]
    assert {f"{name}.png" for name in sample_images()} <= {p.name for p in folder.iterdir()}

    folder = tmp_path / "demo" / "multiview-3d-reconstruction"
    results = json.loads((folder / "results.json").read_text())
    voxels = read_binvox(folder / "table.binvox").voxels
    assert int(voxels.sum()) == results["occupied_voxels"]
    recon = attnzoo.pipeline("multiview-3d-reconstruction", model="lrgt", weights="none", device="cpu")
    assert np.array_equal(recon(synthetic_views(3)).voxels, voxels)  # seeded: the same random model, the same cube
    assert (folder / "table.png").is_file() and (folder / "table.obj").read_text().count("\nv ") > 0

    scanpaths = json.loads((tmp_path / "demo" / "scanpath" / "results.json").read_text())["scanpaths"]
    assert len(scanpaths["astronaut"]["xy"]) == 4 and scanpaths["shelf"]["target"] == 13
    assert {"astronaut_scanpath.png", "coffee_scanpath.png", "shelf_search.png"} <= {
        p.name for p in (tmp_path / "demo" / "scanpath").iterdir()
    }
    slide = json.loads((tmp_path / "demo" / "wsi-classification" / "results.json").read_text())
    assert slide["patches"] > 50 and sum(slide["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "demo" / "wsi-classification" / slide["slide"]).is_file()  # not the staging folder's path
    inserted = json.loads((tmp_path / "demo" / "subject-insertion" / "results.json").read_text())
    assert inserted["prompt"] and (tmp_path / "demo" / "subject-insertion" / "insertion.png").is_file()


def test_console_script_installed():
    proc = subprocess.run(["attnzoo", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and attnzoo.__version__ in proc.stdout


def test_eval_settings_name_local_weights_by_content_stamp(tmp_path):
    import os

    from attnzoo.evaluation import weights_identity as _weights_identity

    weights = tmp_path / "best.safetensors"
    weights.write_bytes(b"x" * 10)
    first = _weights_identity(str(weights))
    assert str(weights.resolve()) in first and _weights_identity(str(weights)) == first
    weights.write_bytes(b"y" * 12)  # retrained into the same path: a resumed eval must not reuse the old predictions
    os.utime(weights, ns=(1, 1))
    assert _weights_identity(str(weights)) != first
    assert _weights_identity(None) == "pretrained" and _weights_identity("resnet18.a1_in1k") == "resnet18.a1_in1k"


def test_random_weights_are_seeded_and_labelled(photo):
    one = attnzoo.pipeline("image-classification", model="test_resnet", weights="none", device="cpu")
    two = attnzoo.pipeline("image-classification", model="test_resnet", weights="none", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(one.model.state_dict().values(), two.model.state_dict().values()))
    assert one.weights_label == "random (seed 0)" and "random (seed 0)" in repr(one)
    state = torch.random.get_rng_state()
    attnzoo.pipeline("image-classification", model="test_resnet", weights="none", device="cpu")
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG stream is left alone
    result = one(photo)
    assert result.weights == "random (seed 0)"
    from attnzoo.pipelines.base import weights_note

    assert weights_note(one.weights_label) == "random weights" and weights_note("pretrained (x)") == ""


def test_run_every_task_kind(tmp_path, capsys, monkeypatch):
    """3D from a folder of views per object; slides or feature files for WSI; results name model and weights."""
    from attnzoo.vision.acmil import ACMILGatedAttention
    from attnzoo.vision.lrgt import LRGT
    from tests.helpers import register_test_model
    from tests.pipelines.test_multiview_reconstruction import TINY
    from tests.shapes3d import primitive, renderings
    from tests.training.test_wsi_recipe import write_acmil_h5

    register_test_model(monkeypatch, "lrgt_tiny_cli", lambda **kw: LRGT(**TINY, noise_seed=0), like="lrgt")
    for kind in ("table", "box"):
        folder = tmp_path / "objects" / kind
        folder.mkdir(parents=True)
        for i, view in enumerate(renderings(primitive(kind), n=2)):
            view.save(folder / f"{i:02d}.png")
    out = tmp_path / "out3d"
    assert (
        main(
            [
                "run",
                "3d-reconstruction",
                str(tmp_path / "objects" / "table"),
                str(tmp_path / "objects" / "box"),
                "--model",
                "lrgt_tiny_cli",
                "-w",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / "results.json").read_text())
    assert record["model"] == "lrgt_tiny_cli" and record["weights"] == "random (seed 0)"
    assert set(record["results"]) == {str(tmp_path / "objects" / k) for k in ("table", "box")}
    assert all(r["grid"] == [32, 32, 32] for r in record["results"].values())
    assert (out / "table.png").is_file() and (out / "box.png").is_file()
    assert "occupied voxels" in capsys.readouterr().out
    from attnzoo.datasets.binvox import read_binvox

    files = json.loads((out / "results.json").read_text())["files"][str(tmp_path / "objects" / "box")]
    assert files == ["box.png", "box.obj", "box.binvox"]  # the shape itself, as --help says, beside its picture
    voxels = read_binvox(out / "box.binvox").voxels
    assert int(voxels.sum()) == record["results"][str(tmp_path / "objects" / "box")]["occupied_voxels"]
    assert (out / "box.obj").read_text().count("\nv ") > 0
    assert (
        main(
            [
                "run",
                "3d-reconstruction",
                str(tmp_path / "objects" / "table" / "00.png"),
                "-m",
                "lrgt_tiny_cli",
                "-w",
                "none",
            ]
        )
        == 1
    )  # a file where a folder of views is wanted
    assert "folder" in capsys.readouterr().err

    data = write_acmil_h5(tmp_path / "feats.h5", n_slides=1, dim=512)
    register_test_model(
        monkeypatch, "acmil_tiny_cli", lambda **kw: ACMILGatedAttention(in_dim=512, inner_dim=16), like="acmil_ga"
    )
    out = tmp_path / "outwsi"
    assert main(["run", "wsi-classification", str(data), "-m", "acmil_tiny_cli", "-w", "none", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "wsi-classification" and len(record["results"]) == 1
    assert sum(next(iter(record["results"].values()))["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    # a slide's settings reach the pipeline (feature files do not use them)
    from attnzoo.pipelines.wsi_classification import WSIClassificationPipeline

    seen: dict = {}
    real_init = WSIClassificationPipeline.__init__

    def spy(self, model, **kwargs):
        seen.update(kwargs)
        real_init(self, model, **kwargs)

    monkeypatch.setattr(WSIClassificationPipeline, "__init__", spy)
    slide_options = ["--magnification", "10", "--patch-size", "128", "--read-level", "auto", "--base-mpp", "0.25"]
    assert main(["run", "wsi-classification", str(data), "-m", "acmil_tiny_cli", "-w", "none", *slide_options]) == 0
    assert {k: seen[k] for k in ("magnification", "patch_size", "read_level", "base_mpp")} == {
        "magnification": 10.0,
        "patch_size": 128,
        "read_level": "auto",
        "base_mpp": 0.25,
    }
    assert (
        main(["run", "wsi-classification", str(data), "-m", "acmil_tiny_cli", "-w", "none", "--min-tissue", "2"]) == 1
    )
    assert "min_tissue" in capsys.readouterr().err


def test_run_into_a_folder_keeps_what_it_did_not_write_and_adds_to_its_results(tmp_path, photo, capsys, monkeypatch):
    """A user's file in --out is never written over (the picture gets another name), a later run of the same
    model adds its results to results.json, and another model's run into it is refused before any work."""
    photos = tmp_path / "photos"
    photos.mkdir()
    photo.save(photos / "cat.jpg")
    photo.rotate(90).save(photos / "dog.jpg")
    (photos / "cat.png").write_bytes(b"the user's own picture")
    run = ["run", "classification", "-m", "test_resnet", "-w", "none", "--out", str(photos)]
    assert main([*run, str(photos / "cat.jpg")]) == 0
    assert (photos / "cat.png").read_bytes() == b"the user's own picture"
    record = json.loads((photos / "results.json").read_text())
    assert record["files"] == {str(photos / "cat.jpg"): ["cat-2.png"]}
    assert main([*run, str(photos / "cat.jpg"), str(photos / "dog.jpg")]) == 0  # cat again, and dog
    record = json.loads((photos / "results.json").read_text())
    assert sorted(record["results"]) == [str(photos / "cat.jpg"), str(photos / "dog.jpg")]
    assert record["files"] == {str(photos / "cat.jpg"): ["cat-2.png"], str(photos / "dog.jpg"): ["dog.png"]}
    assert not (photos / "cat-3.png").exists()  # cat's own earlier picture was replaced, not added to
    assert main([*run, str(photos / "dog.jpg")]) == 0  # an earlier input's results and picture stay
    assert len(json.loads((photos / "results.json").read_text())["results"]) == 2
    capsys.readouterr()
    resnet18 = ["run", "classification", "-m", "resnet18", "-w", "none", str(photos / "dog.jpg"), "--out"]
    with monkeypatch.context() as patch:  # refused before the model loads
        patch.setattr(attnzoo.tasks, "pipeline", lambda *a, **k: pytest.fail("the model was loaded first"))
        assert main([*resnet18, str(photos)]) == 2
    assert "holds the results of another run (model 'test_resnet', this run's 'resnet18')" in capsys.readouterr().err
    for out in (photos, photos / "out"):  # the next run over photos/ would read the pictures as inputs
        assert main(["run", "classification", "-m", "test_resnet", "-w", "none", str(photos), "--out", str(out)]) == 2
        assert f"--out {out} is inside the input folder {photos}" in capsys.readouterr().err
    record = json.loads((photos / "results.json").read_text())
    del record["files"]  # as written before results.json listed each input's files
    (photos / "results.json").write_text(json.dumps(record))
    assert main([*run, str(photos / "dog.jpg")]) == 0 and not (photos / "dog-2.png").exists()  # dog.png is its own
    torch.manual_seed(0)
    save_file(attnzoo.create_model("test_resnet").state_dict(), tmp_path / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    by_file = ["run", "classification", "-m", "test_resnet", str(photos / "dog.jpg"), "--out", str(tmp_path / "byw")]
    assert main([*by_file, "-w", "w.safetensors"]) == 0
    assert main([*by_file, "-w", str(tmp_path / "w.safetensors")]) == 0  # the same file, spelled otherwise
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.json").write_text("my notes")
    assert main([*run[:-1], str(tmp_path / "mine"), str(photos / "dog.jpg")]) == 2
    assert "results.json that attnzoo run did not write" in capsys.readouterr().err
    assert (tmp_path / "mine" / "results.json").read_text() == "my notes"


def test_out_must_be_a_folder_and_batching_is_checked_before_writing(tmp_path, photo, capsys):
    photo.save(tmp_path / "cat.png")
    (tmp_path / "taken").write_text("mine")
    assert (
        main(
            [
                "run",
                "classification",
                str(tmp_path / "cat.png"),
                "-m",
                "test_resnet",
                "-w",
                "none",
                "--out",
                str(tmp_path / "taken"),
            ]
        )
        == 2
    )
    assert "is a file" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "mine"
    run = ["run", "classification", str(tmp_path / "cat.png"), "-m", "test_resnet", "-w", "none", "--out"]
    assert main([*run, str(tmp_path / "taken" / "deeper" / "out")]) == 2  # before any work, not after it
    assert f"cannot be created: {tmp_path / 'taken'} is a file" in capsys.readouterr().err
    assert main([*run, "/proc/attnzoo-no-such/out"]) == 2
    assert "cannot be created in /proc" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "taken" / "x")]) == 2  # the demo too: before any demo runs
    assert "is a file" in capsys.readouterr().err
    assert main([*run, "/proc"]) == 2  # a folder that exists and takes no files (even as root)
    assert "--out /proc cannot be written to" in capsys.readouterr().err
    before = (tmp_path / "cat.png").read_bytes()
    assert main([*run, str(tmp_path)]) == 0  # an existing folder that takes files: the input's own
    assert (tmp_path / "cat.png").read_bytes() == before  # never written over by its picture
    assert (tmp_path / "cat-2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the picture, beside it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".attnzoo-probe-")]
    assert main([*run, str(tmp_path / "new" / "out")]) == 0 and (tmp_path / "new" / "out").is_dir()
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    photo.save(tmp_path / "data" / "val" / "a" / "x.png")
    for bad in ("-1", "0"):
        code = main(
            [
                "eval",
                "classification",
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "e"),
                "-m",
                "test_resnet",
                "-w",
                "none",
                "--batch-size",
                bad,
            ]
        )
        assert code == 1 and "batch_size" in capsys.readouterr().err
        assert not (tmp_path / "e" / "run.json").exists()


def test_models_marks_attnzoos_own_with_their_tasks(capsys):
    assert main(["models", "biformer_t*"]) == 0
    assert capsys.readouterr().out.split("\n")[0] == "biformer_tiny\t[attnzoo: image-classification]"
    assert main(["models", "nevaclip"]) == 0
    assert "[attnzoo: scanpath]" in capsys.readouterr().out
    assert main(["models", "resnet18"]) == 0
    assert capsys.readouterr().out.strip() == "resnet18"


def test_third_party_logs_are_quiet_unless_debug(caplog):
    import logging

    from attnzoo import cli

    def noisy():
        logging.error("Failed to download weights (a third-party log line)")
        logging.getLogger("attnzoo.test").warning("an attnzoo warning")

    with cli._quiet_third_party_logs(debug=False):
        noisy()
    assert [r.getMessage() for r in caplog.records] == ["an attnzoo warning"]
    caplog.clear()
    with cli._quiet_third_party_logs(debug=True):
        noisy()
    assert "Failed to download weights (a third-party log line)" in [r.getMessage() for r in caplog.records]
    assert main(["tasks", "--debug"]) == 0  # --debug is accepted after the command too


def test_demo_leaves_nothing_half_written_and_skips_a_missing_extra(tmp_path, monkeypatch, capsys):
    from attnzoo import demo
    from attnzoo.errors import MissingDependencyError

    def broken(out, model, log, device=None):
        out.mkdir(parents=True)
        (out / "half.png").write_bytes(b"x")
        raise RuntimeError("a bug")

    def needs_extra(out, model, log, device=None):
        raise MissingDependencyError("openslide is needed: pip install 'attnzoo[wsi]'")

    ok = demo.DemoResult("image-classification", "m", False, [])
    monkeypatch.setattr(demo, "DEMOS", {"image-classification": lambda out, *a, **k: ok, "scanpath": broken})
    assert main(["demo", "--out", str(tmp_path / "d")]) == 3
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*"))
    monkeypatch.setattr(demo, "DEMOS", {"image-classification": lambda out, *a, **k: ok, "scanpath": needs_extra})
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index[-1] == {"task": "scanpath", "skipped": "openslide is needed: pip install 'attnzoo[wsi]'"}
    assert "[scanpath] skipped: openslide is needed" in capsys.readouterr().out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    assert main(["demo", "--out", str(tmp_path / "mine")]) == 2  # not a demo folder: never replaced
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep"


@pytest.mark.parametrize(
    "args, named",
    [
        (["run", "image-classification", ""], "argument 3"),  # Path("") is the current folder: it walked cwd
        (["run", "image-classification", "x.png", "--out", ""], "--out"),
        (["run", "image-classification", "x.png", "-o", " "], "-o"),
        (["run", "image-classification", "x.png", "--model="], "--model"),
        (["eval", "image-classification", "--data", "d", "--out", "o", "--split", ""], "--split"),
        (["train", "image-classification", "--data", "d", "--out", "o", "--config", ""], "--config"),
        (["extract", "wsi-features", "s.svs", "--encoder", "", "--out", "o"], "--encoder"),
        (["eval", "hallucination-mitigation", "--data", "d", "--out", "o", "--prompt-suffix", ""], "--prompt-suffix"),
    ],
)
def test_an_empty_argument_is_refused_by_name_before_any_work(tmp_path, monkeypatch, capsys, args, named):
    """An empty value read as "not given" (the default ran) or, as a path, as the current folder."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    hint = "none for no suffix" if named == "--prompt-suffix" else "an unset shell variable?"
    assert f"error: {named} is empty; give a value ({hint})" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_extract_fails_when_every_slide_failed_and_not_when_some_did(tmp_path, capsys):
    from tests.wsi_helpers import write_cohort

    good, broken = write_cohort(tmp_path / "slides", sizes=((768, 768),))
    base = ["extract", "wsi-features", "--encoder", "test_resnet", "-w", "none", "--patch-size", "64"]
    base += ["--input-size", "32", "--num-workers", "0", "--segment", "a_t=0.1", "--segment", "a_h=0.1"]
    assert main([*base, str(broken), "--out", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "error: no slide has features: all 1 failed (errors in the manifest)" in err
    assert (tmp_path / "none" / "manifest.csv").is_file()  # the errors are there to read
    assert main([*base, str(broken), str(good), "--out", str(tmp_path / "some")]) == 0
    assert "1 of 2 slides have features" in capsys.readouterr().out


def _pictures(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def test_run_writes_each_result_as_it_arrives_and_an_interrupt_keeps_what_finished(
    tmp_path, photo, capsys, monkeypatch
):
    """results.json names each input's picture once its batch is done, so Ctrl-C (or a crash) on the last
    input keeps the others; the line printed says so, and the same command run again finishes the job
    into the same pictures (no -2 copies beside them)."""
    from attnzoo.pipelines.base import Pipeline

    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for i, name in enumerate("abc"):
        photo.rotate(90 * i).save(photos / f"{name}.jpg")
    real_iterate = Pipeline.iterate
    seen = []

    def iterate(self, items, **kwargs):
        for i, result in real_iterate(self, items, **kwargs):
            if i == 1:  # the first batch is done: its picture and its line in results.json are there
                record = json.loads((out / "results.json").read_text())
                seen.append((record["files"], _pictures(out)))
            if i == 2:
                raise KeyboardInterrupt
            yield i, result

    run = ["run", "classification", "-m", "test_resnet", "-w", "none", str(photos), "--out", str(out), "-b", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(Pipeline, "iterate", iterate)
        assert main(run) == 130
    assert seen == [({str(photos / "a.jpg"): ["a.png"]}, ["a.png"])]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"interrupted after 2 of 3 inputs: their results and pictures are kept in {out}")
    assert "run the same command again" in err
    record = json.loads((out / "results.json").read_text())
    assert record["files"] == {str(photos / "a.jpg"): ["a.png"], str(photos / "b.jpg"): ["b.png"]}
    assert sorted(record["results"]) == [str(photos / "a.jpg"), str(photos / "b.jpg")]
    assert _pictures(out) == ["a.png", "b.png"]
    assert main(run) == 0  # the same command: done
    record = json.loads((out / "results.json").read_text())
    assert record["files"] == {str(photos / f"{n}.jpg"): [f"{n}.png"] for n in "abc"}
    assert _pictures(out) == ["a.png", "b.png", "c.png"]


def test_ctrl_c_during_the_last_save_or_a_second_one_says_what_is_kept(tmp_path, photo, capsys, monkeypatch):
    """Ctrl-C after the last input (while results.json is written), and a second Ctrl-C during the save that
    follows it: the line still says what is kept, never "nothing was written"."""
    from attnzoo import cli

    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for name in "ab":
        photo.save(photos / f"{name}.jpg")
    real_save, calls = cli._RunOutput.save, []

    def save(self, when_due=False):
        calls.append(when_due)
        if not when_due:  # the final save and the one after the interrupt: both interrupted
            raise KeyboardInterrupt
        return real_save(self, when_due=when_due)

    monkeypatch.setattr(cli._RunOutput, "save", save)
    run = ["run", "classification", "-m", "test_resnet", "-w", "none", str(photos), "--out", str(out), "-b", "1"]
    assert main(run) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted after 2 of 2 inputs: their results and pictures are kept in {out}")
    assert "nothing was written" not in err and "Traceback" not in err and calls.count(False) == 2


@pytest.mark.parametrize("at", [1, 2, 3, 4])
def test_run_interrupted_while_writing_leaves_results_json_naming_exactly_its_pictures(
    tmp_path, photo, capsys, monkeypatch, at
):
    """Ctrl-C at any write (a picture, results.json): the pictures in --out are those results.json names,
    and the same command run again writes into them, not beside them."""
    import attnzoo._io

    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for i, name in enumerate("abc"):
        photo.rotate(90 * i).save(photos / f"{name}.jpg")
    real = attnzoo._io.atomic_write
    calls = []

    @contextlib.contextmanager
    def atomic_write(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == at:
            raise KeyboardInterrupt
        with real(path, *args, **kwargs) as fh:
            yield fh

    run = ["run", "classification", "-m", "test_resnet", "-w", "none", str(photos), "--out", str(out), "-b", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(attnzoo._io, "atomic_write", atomic_write)
        assert main(run) == 130
    assert "interrupted" in capsys.readouterr().err
    named = json.loads((out / "results.json").read_text())["files"] if (out / "results.json").exists() else {}
    assert _pictures(out) == sorted(n for names in named.values() for n in names)
    assert list(out.glob(".*")) == []  # no temporary left
    assert main(run) == 0
    assert _pictures(out) == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize(
    "command, patched, said",
    [
        (["eval", "classification", "--data", "{data}"], "_eval_task", "the predictions made so far are kept in"),
        (["train", "classification", "--data", "{data}"], "_train_task", "before the first checkpoint"),
        (["train", "classification", "--data", "{data}"], "_train_task", "with --resume (without --overwrite)"),
        (["extract", "wsi-features", "{data}", "-e", "resnet18"], "extract_cohort", "the slides finished are kept"),
    ],
)
def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch, capsys, command, patched, said):
    """typer turns Ctrl-C into a bare exit status 130: the command still ends with one line (no traceback)."""
    import attnzoo.cli
    import attnzoo.pipelines.wsi_cohort

    out = tmp_path / "out"

    def work(*args, **kwargs):
        if "--resume" in said:  # a run that saved a checkpoint before Ctrl-C
            out.mkdir(exist_ok=True)
            (out / "checkpoint-00000010.pt").write_bytes(b"")
        raise KeyboardInterrupt

    owner = attnzoo.pipelines.wsi_cohort if patched == "extract_cohort" else attnzoo.cli
    monkeypatch.setattr(owner, patched, work)
    args = [a.replace("{data}", str(tmp_path)) for a in command]
    assert main([*args, "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("interrupted") and said in captured.err and str(out) in captured.err


@pytest.mark.parametrize("kept", ["checkpoint-00000004.pt", "config.yaml"])
def test_ctrl_c_in_train_looks_only_at_the_runs_own_folders(tmp_path, monkeypatch, capsys, kept):
    """--out exps holding other runs (exps/old_run/): Ctrl-C before this run wrote anything said its checkpoints were
    kept, or to --resume "the run in exps" (refused: no checkpoint there). Only --out and the slides recipe's
    seed-<s> folders are the run's. The resume named is one that works after a run started with --overwrite too."""
    import attnzoo.cli

    out = tmp_path / "exps"
    (out / "old_run").mkdir(parents=True)
    (out / "old_run" / "config.yaml").write_text("seed: 0\n")
    (out / "old_run" / "checkpoint-00000010.pt").write_bytes(b"")

    def work(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attnzoo.cli, "_train_task", work)
    command = ["train", "classification", "--data", str(tmp_path), "--out", str(out)]
    assert main(command) == 130
    nothing = f"interrupted before the first checkpoint: nothing to resume; start again (with --overwrite: {out} holds"
    assert capsys.readouterr().err.startswith(nothing)
    (out / "seed-3").mkdir()
    (out / "seed-3" / kept).write_bytes(b"")  # a run of several seeds: its own
    assert main([*command, "--overwrite"]) == 130
    resume = "rerun the same command with --resume (without --overwrite)"
    said = (
        f"interrupted: the checkpoints saved in {out} are kept; {resume} to continue"
        if kept.startswith("checkpoint")
        else f"interrupted before the first checkpoint: {resume} to start the run in {out} again from step 0"
    )
    assert capsys.readouterr().err == said + "\n"


def test_a_run_name_is_one_folder_inside_out():
    """A method spec names a comparison's run folder: its path separators cannot nest folders or leave --out."""
    from attnzoo.cli import _folder_name

    assert _folder_name("pai(alpha=0.5)+vcd") == "pai(alpha=0.5)+vcd"
    assert _folder_name("agla(blip_model=../../x)") == "agla(blip_model=.._.._x)"
    assert _folder_name("agla(blip_model=C:\\models\\blip)") == "agla(blip_model=C:_models_blip)"
    assert _folder_name("..") == _folder_name(".") == "_"


def test_train_says_which_metric_is_best_and_when_nothing_was_left_to_train(tmp_path, capsys):
    """The summary names the metric best.pt follows and its direction; --resume of a finished run trains nothing
    and says so (not "trained N steps"); a resume with more epochs says how many steps this command trained."""
    import csv

    from tests.training.test_classification_recipe import shapes_dataset

    data = shapes_dataset(tmp_path / "shapes", per_class_train=2, per_class_val=1)
    out = tmp_path / "run"
    command = ["train", "image-classification", "--model", "test_resnet", "--data", str(data), "--out", str(out)]
    command += ["--device", "cpu", "--config", "finetune", "batch_size=8", "num_workers=0", "auto_augment=null"]
    command += ["input_size=32", "best_metric=top1"]
    assert main([*command, "epochs=1"]) == 0
    with open(out / "eval.csv") as fh:
        best = max(float(row["eval_top1"]) for row in csv.DictReader(fh))
    said = f"best top1={best:.3f} (higher is better)"
    assert capsys.readouterr().out.strip() == f"trained 1 steps; {said}; wrote {out}"
    assert main([*command, "epochs=1", "--resume"]) == 0
    assert capsys.readouterr().out.strip() == f"nothing left to train: the run in {out} had finished at step 1; {said}"
    assert main([*command, "epochs=2", "--resume"]) == 0
    assert capsys.readouterr().out.strip().startswith("trained 1 more steps (2 in all); best top1=")


def _tiny_train_command(tmp_path):
    from tests.training.test_classification_recipe import shapes_dataset

    data = shapes_dataset(tmp_path / "shapes", per_class_train=2, per_class_val=1)
    out = tmp_path / "run"
    command = ["train", "image-classification", "--model", "test_resnet", "--data", str(data), "--out", str(out)]
    command += ["--device", "cpu", "--config", "finetune", "batch_size=8", "num_workers=0", "auto_augment=null"]
    return [*command, "input_size=32", "best_metric=top1", "epochs=1"], data, out


def test_train_resume_that_ran_the_owed_validation_says_so(tmp_path, capsys):
    """--no-check-images skips the check of every image before any work: a damaged val image fails the last epoch's
    validation, after its checkpoint. The --resume that ran that validation said "nothing left to train" only, as if
    it had done nothing."""
    import csv

    import yaml

    command, data, out = _tiny_train_command(tmp_path)
    bad = data / "val" / "class1" / "0.png"
    whole = bad.read_bytes()
    bad.write_bytes(b"not a png")
    assert main(command) == 1  # the up-front check refuses it, before any work
    assert f"error: {bad}: not an image format PIL can read" in capsys.readouterr().err and not out.exists()
    assert main([*command, "--no-check-images"]) == 1  # trained, then failed in the validation
    assert f"error: {bad}: not an image format PIL can read" in capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["extra"]["check_images"] is False
    assert torch.load(out / "checkpoint-00000001.pt", weights_only=True)["eval_pending"] == 0
    bad.write_bytes(whole)
    assert main([*command, "--resume"]) == 0  # the check on again: check_images may change on resume
    with open(out / "eval.csv") as fh:
        (row,) = csv.DictReader(fh)  # the owed validation's, once
    best = f"best top1={float(row['eval_top1']):.3f} (higher is better)"
    assert capsys.readouterr().out.strip() == (
        "ran the owed validation of epoch 0 (epochs count from 0, as in eval.csv); nothing left to train: the run in "
        f"{out} had finished at step 1; {best}"
    )
    assert row["epoch"] == "0"
    assert (out / "best.pt").is_file()
    assert main([*command, "--resume"]) == 0  # nothing owed now: nothing done
    assert capsys.readouterr().out.strip().startswith("nothing left to train: ")
    assert main(["train", "scanpath", "--data", str(data), "--out", str(out), "--no-check-images"]) == 2  # no check


def test_train_resume_whose_owed_validation_stops_the_run_early_says_so(tmp_path, capsys, monkeypatch):
    """The owed validation of a middle epoch can end early stopping's patience: the line said "the owed validation
    of the last epoch; ... had finished (it had stopped early)", as if the run had ended before this command."""
    from attnzoo.errors import DatasetFormatError
    from attnzoo.training import engine, latest_checkpoint

    command, _, out = _tiny_train_command(tmp_path)
    command = [*command[:-1], "epochs=3", "early_stop_patience=1"]
    calls = []

    def flat(self, epoch):  # the same top1 each time: the second validation ends the patience
        calls.append(epoch)
        if len(calls) == 2:
            raise DatasetFormatError("val/class1/0.png: not an image format PIL can read")
        return {"eval_top1": 50.0}

    monkeypatch.setattr(engine.Trainer, "_evaluate", flat)
    assert main(command) == 1 and "not an image format" in capsys.readouterr().err
    assert main([*command, "--resume"]) == 0
    step = torch.load(latest_checkpoint(out), weights_only=True)["step"]
    assert calls == [0, 1, 1] and step == 2  # epoch 1's validation ran again; epoch 2 never trained
    assert capsys.readouterr().out.strip() == (
        f"ran the owed validation of epoch 1 (epochs count from 0, as in eval.csv); the run in {out} stopped early "
        f"after it, at step {step}; best top1=50.000 (higher is better)"
    )


def test_train_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_from_step_0(
    tmp_path, capsys, caplog, monkeypatch
):
    """Ctrl-C (or an error in the model) at step 0 left config.yaml and TensorBoard's file: the run said "nothing to
    resume", a rerun was refused (an earlier run is there) and --resume found no checkpoint."""
    from attnzoo.training import classification

    command, _, out = _tiny_train_command(tmp_path)
    with monkeypatch.context() as patch:

        def interrupted(self, model, batch):
            raise KeyboardInterrupt

        patch.setattr(classification._ClassificationLoss, "__call__", interrupted)
        assert main(command) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        "interrupted before the first checkpoint: rerun the same command with --resume (without --overwrite) to "
        f"start the run in {out} again from step 0"
    )
    assert (out / "config.yaml").is_file() and not list(out.glob("checkpoint-*.pt"))
    with caplog.at_level("WARNING", logger="attnzoo.training.engine"):
        assert main([*command, "--resume"]) == 0
    assert f"no checkpoint in {out} yet: starting from step 0" in caplog.messages
    assert capsys.readouterr().out.strip().startswith("trained 1 steps; best top1=")
    assert (out / "metrics.csv").read_text().count("step,epoch") == 1 and (out / "model.safetensors").is_file()


def test_weights_list_and_models_say_when_nothing_matches(capsys):
    from attnzoo.factory import load_families
    from attnzoo.weights import list_checkpoints

    load_families()
    registered = len(list_checkpoints())
    assert registered and main(["weights", "list", "nomatch*"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"no official checkpoint matches 'nomatch*' ({registered} registered: attnzoo weights list)"
    assert main(["models", "zzz*"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no model name matches 'zzz*'" in captured.err


def test_train_lists_and_takes_only_the_tasks_own_recipes(tmp_path, capsys):
    """--list-configs lists the task's named recipes; another task's is refused naming its task, and the hints
    name a command that runs."""
    code = main(["train", "image-classification", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "-c", "lrgt"])
    err = capsys.readouterr().err
    assert code == 2 and "'lrgt' is for multiview-3d-reconstruction" in err and "deit_weights" not in err
    assert "attnzoo train image-classification --list-configs" in err
    from attnzoo.training.config import CONFIG_TASKS, load_config, named_configs, recipe_config

    assert main(["train", "image-classification", "--list-configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == named_configs("image-classification") and "deit" in listed
    assert not {"acmil", "lrgt", "oat"} & set(listed)
    assert main(["train", "scanpath", "--list-configs"]) == 0
    assert capsys.readouterr().out.split() == ["oat"]
    assert main(["train", "image-classification", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "-c", "x"])
    hint = capsys.readouterr().err.split("(")[1].split(")")[0]
    assert main(hint.split()[1:]) == 0  # the hint's own command runs
    assert capsys.readouterr().out.split() == listed
    assert not (tmp_path / "o").exists()
    # every named recipe belongs to exactly one task: the one whose recipe takes its settings
    import attnzoo.training.classification as classification
    import attnzoo.training.reconstruction as reconstruction
    import attnzoo.training.scanpath as scanpath
    import attnzoo.training.wsi as wsi

    recipes = {
        "image-classification": classification,
        "multiview-3d-reconstruction": reconstruction,
        "scanpath": scanpath,
        "wsi-classification": wsi,
    }
    assert set(CONFIG_TASKS) == set(named_configs())
    for name in named_configs():
        cfg = load_config(name)  # a recipe takes the settings it knows and a best_metric its evaluation reports
        takers = [
            task
            for task, module in recipes.items()
            if set(cfg.extra) <= set(module.RECIPE_DEFAULTS) and cfg.best_metric in (None, *module.METRICS)
        ]
        assert takers == [CONFIG_TASKS[name]], name
        for task, module in recipes.items():
            if task == CONFIG_TASKS[name]:
                recipe_config(name, [], module.RECIPE_DEFAULTS, task, ranges=getattr(module, "RECIPE_RANGES", None))
            else:
                with pytest.raises(InvalidOptionError, match=f"is for {CONFIG_TASKS[name]}"):
                    recipe_config(name, [], module.RECIPE_DEFAULTS, task)


def test_the_steps_a_resume_starts_from_are_the_runs_own_not_another_runs_in_a_subfolder(tmp_path):
    """The summary's "trained N more steps" counted the checkpoints of every subfolder of --out (an earlier run kept
    in exps/old_run), not only the run's own and its seed-<s> folders."""
    from attnzoo.cli import _saved_steps

    (tmp_path / "old_run").mkdir()
    (tmp_path / "old_run" / "checkpoint-00000999.pt").write_bytes(b"")
    (tmp_path / "seed-1").mkdir()
    (tmp_path / "seed-1" / "checkpoint-00000007.pt").write_bytes(b"")
    (tmp_path / "checkpoint-00000003.pt").write_bytes(b"")
    (tmp_path / "checkpoint-00000005.pt").write_bytes(b"")
    assert _saved_steps(tmp_path) == 5 + 7


def test_weights_convert_refuses_an_existing_output_unless_overwrite(tmp_path, capsys, monkeypatch):
    """``attnzoo weights convert SRC DST`` replaced any file at DST: the two arguments swapped destroyed the
    official checkpoint. Refused before the model is built, naming the path; --overwrite replaces it."""
    import attnzoo.factory

    torch.manual_seed(0)
    model = attnzoo.create_model("test_resnet")
    torch.save(model.state_dict(), tmp_path / "official.pth")
    official = (tmp_path / "official.pth").read_bytes()
    ours = tmp_path / "ours.safetensors"
    ours.write_bytes(b"an earlier conversion")
    convert = ["weights", "convert", "--model", "test_resnet"]
    with monkeypatch.context() as patch:
        patch.setattr(attnzoo.factory, "create_model", lambda *a, **k: pytest.fail("the model was built first"))
        assert main([*convert, str(tmp_path / "official.pth"), str(ours)]) == 2
        assert f"{ours} exists: give another file, or --overwrite to replace it" in capsys.readouterr().err
        assert main([*convert, str(ours), str(tmp_path / "official.pth"), "--overwrite"]) == 2  # swapped
        assert f"{tmp_path / 'official.pth'} is not a .safetensors file name" in capsys.readouterr().err
    assert ours.read_bytes() == b"an earlier conversion" and (tmp_path / "official.pth").read_bytes() == official
    assert main([*convert, str(tmp_path / "official.pth"), str(ours), "--overwrite"]) == 0
    converted = load_file(ours)
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_run_refuses_an_out_holding_results_of_other_settings(tmp_path, photo, capsys, monkeypatch):
    """A second run into the same --out with another --top-k (another --method, --question ...) replaced the
    input's entry in results.json and its picture, with no record of which settings made which. The settings are
    recorded; other ones are refused before the model loads, naming them. A results.json written before settings
    were recorded is taken (they cannot be known), and records this run's from then on."""
    photo.save(tmp_path / "cat.jpg")
    out = tmp_path / "out"
    run = ["run", "classification", str(tmp_path / "cat.jpg"), "-m", "test_resnet", "-w", "none", "-o", str(out)]
    assert main([*run, "--top-k", "3"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["settings"] == {"top_k": 3} and len(record["results"][str(tmp_path / "cat.jpg")]) == 3
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with monkeypatch.context() as patch:  # refused before the model loads
        patch.setattr(attnzoo.tasks, "pipeline", lambda *a, **k: pytest.fail("the model was loaded first"))
        assert main(run) == 2  # --top-k's default, 5
    err = capsys.readouterr().err
    assert f"--out {out} holds the results of another run (--top-k 3, this run's 5): choose another --out" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced
    assert main([*run, "--top-k", "3"]) == 0  # the same settings: added to
    del record["settings"]  # as an attnzoo that did not record them wrote it
    (out / "results.json").write_text(json.dumps(record))
    assert main([*run, "--top-k", "4"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["settings"] == {"top_k": 4} and len(record["results"][str(tmp_path / "cat.jpg")]) == 4
    assert main([*run, "--top-k", "2"]) == 2  # recorded from then on
    assert "(--top-k 4, this run's 2)" in capsys.readouterr().err


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, photo, capsys, monkeypatch):
    """Two ``attnzoo run`` into one --out at once lost one's results.json entries and gave inputs the other's
    pictures: while one holds the folder (its OS lock), another is refused before it writes anything there."""
    import os

    fcntl = pytest.importorskip("fcntl")
    photo.save(tmp_path / "cat.jpg")
    out = tmp_path / "out"
    out.mkdir()
    run = ["run", "classification", str(tmp_path / "cat.jpg"), "-m", "test_resnet", "-w", "none", "-o", str(out)]
    held = os.open(out, os.O_RDONLY)  # what the first process holds while it runs
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with monkeypatch.context() as patch:
            patch.setattr(attnzoo.tasks, "pipeline", lambda *a, **k: pytest.fail("the model was loaded first"))
            assert main(run) == 1
        err = capsys.readouterr().err
        assert f"another process is writing attnzoo run's results into {out}: wait for it to finish" in err
        assert "choose another --out" in err and not any(out.iterdir())
    finally:
        os.close(held)  # the first process ends: its lock goes with it
    assert main(run) == 0 and (out / "results.json").is_file()
    capsys.readouterr()
    assert main([*run[:-1], str(tmp_path / "new"), "-m", "no_such_model"]) != 0  # failed before writing anything
    assert not (tmp_path / "new").exists()  # the folder made for the lock is not left behind


def test_a_skipped_folder_is_named(tmp_path, capsys):
    """``attnzoo run multiview-3d-reconstruction A B`` said "skipped: all views must have the same size ... (view 1)"
    without naming the folder skipped."""
    from attnzoo.demo import synthetic_views

    views = synthetic_views(2, size=64)
    for name, sizes in (("good", (64, 64)), ("odd", (64, 48))):
        (tmp_path / name).mkdir()
        for i, (view, size) in enumerate(zip(views, sizes)):
            view.resize((size, size)).save(tmp_path / name / f"{i}.png")
    good, odd = str(tmp_path / "good"), str(tmp_path / "odd")
    assert main(["run", "multiview-3d-reconstruction", good, odd, "-w", "none", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if line.startswith("skipped:")]
    assert line.startswith(f"skipped: {odd}: ") and "same size" in line
    assert f"{good}: " in captured.out


def test_dtype_help_names_every_dtype_accepted(capsys):
    from attnzoo._placement import _DTYPES

    assert main(["run", "image-classification", "--help"]) == 0
    said = " ".join(capsys.readouterr().out.split())  # as wrapped
    assert all(re.search(rf"\b{name}\b", said) for name in [*_DTYPES, "auto"])


def test_an_inputs_own_options_are_no_run_settings(tmp_path, photo, capsys):
    """--question (an input's own, as --mask or --boxes) goes with each input's result: a later run asking another
    question about another image adds to the same --out, where another --method is refused."""
    for name in ("cat.jpg", "dog.jpg"):
        photo.save(tmp_path / name)
    out = tmp_path / "out"
    run = ["run", "hallucination-mitigation", "-w", "none", "--max-new-tokens", "2", "-o", str(out)]
    assert main([*run, str(tmp_path / "cat.jpg"), "--question", "Is there a cat?"]) == 0
    assert main([*run, str(tmp_path / "dog.jpg"), "--question", "Is there a dog?"]) == 0, capsys.readouterr().err
    record = json.loads((out / "results.json").read_text())
    assert "question" not in record["settings"] and len(record["results"]) == 2
    capsys.readouterr()
    assert main([*run, str(tmp_path / "dog.jpg"), "--question", "Is there a dog?", "--method", "vcd"]) == 2
    assert "--method" in capsys.readouterr().err
