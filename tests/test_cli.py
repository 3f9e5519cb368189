import hashlib
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

import attnzoo
from attnzoo.cli import main
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
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 2 and all(len(v) == 3 for v in results.values())
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
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    index = json.loads((tmp_path / "demo" / "index.json").read_text())
    assert index[0]["task"] == "image-classification" and index[0]["pretrained"] is False
    files = {p.name for p in (tmp_path / "demo" / "image-classification").iterdir()}
    assert {"chelsea.png", "coffee.png", "astronaut.png", "rocket.png", "motorcycle_left.png", "results.json"} <= files
    results = json.loads((tmp_path / "demo" / "image-classification" / "results.json").read_text())
    assert results["pretrained"] is False and len(results["predictions"]["chelsea"]) == 5
    assert (
        index[1]["task"] == "multiview-3d-reconstruction" and index[1]["pretrained"] is False
    )  # LRGT's weights need a manual download
    files = {p.name for p in (tmp_path / "demo" / "multiview-3d-reconstruction").iterdir()}
    assert {"table.png", "table.obj", "table.binvox", "results.json"} <= files
    assert index[2]["task"] == "scanpath" and index[2]["pretrained"] is False  # no network for CLIP RN50 here
    files = {p.name for p in (tmp_path / "demo" / "scanpath").iterdir()}
    assert {"astronaut_scanpath.png", "coffee_scanpath.png", "shelf_search.png", "results.json"} <= files
    scanpaths = json.loads((tmp_path / "demo" / "scanpath" / "results.json").read_text())["scanpaths"]
    assert len(scanpaths["astronaut"]["xy"]) == 4 and scanpaths["shelf"]["target"] == 13
    assert (
        index[3]["task"] == "wsi-classification" and index[3]["pretrained"] is False
    )  # no ACMIL weights were released
    files = {p.name for p in (tmp_path / "demo" / "wsi-classification").iterdir()}
    assert {"synthetic_slide.tif", "heatmap.png", "results.json"} <= files


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
