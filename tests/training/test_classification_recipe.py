"""The image-classification recipe: a tiny BiFormer learns coloured shapes on the CPU; CLI; fine-tuning."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import attnzoo
from attnzoo.cli import main
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError
from attnzoo.training.classification import METRICS, train_classification

TINY_BIFORMER = dict(depth=[1, 1, 1, 1], embed_dim=[16, 32, 64, 128], head_dim=16, qk_dims=[16, 32, 64, 128])
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 210, 30)]


def shapes_dataset(root, per_class_train=12, per_class_val=6, seed=0):
    """4 classes = 4 colours; random shape kind, size and position, noisy grey background."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                bg = rng.integers(90, 160, size=(64, 64, 3), dtype=np.uint8)
                im = Image.fromarray(bg)
                d = ImageDraw.Draw(im)
                r = int(rng.integers(10, 22))
                x, y = (int(v) for v in rng.integers(r, 64 - r, size=2))
                box = [x - r, y - r, x + r, y + r]
                (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
                im.save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_tiny_biformer_learns_coloured_shapes(tmp_path):
    data = shapes_dataset(tmp_path / "shapes")
    overrides = dict(
        epochs=6,
        batch_size=8,
        lr=2e-3,
        warmup_epochs=1,
        num_workers=0,
        log_every=2,
        best_metric="top1",
        auto_augment=None,
        mixup=0.0,
        cutmix=0.0,
        reprob=0.0,
        smoothing=0.0,
        drop_path=0.0,
        eval_batch_size=24,
    )
    result = train_classification(
        "biformer_tiny",
        data,
        tmp_path / "run",
        config="finetune",
        overrides=overrides,
        model_kwargs=TINY_BIFORMER,
        device="cpu",
    )
    assert result["best"] >= 60.0  # chance is 25% on the 24 held-out images
    assert result["classes"] == ["class0", "class1", "class2", "class3"]
    model = attnzoo.create_model(
        "biformer_tiny", weights=tmp_path / "run" / "model.safetensors", num_classes=4, **TINY_BIFORMER
    )
    assert model.num_classes == 4
    assert (tmp_path / "run" / "eval.csv").read_text().count("\n") == 7  # header + one row per epoch


def test_fine_tuning_from_an_official_checkpoint_file_replaces_the_head(tmp_path):
    data = shapes_dataset(tmp_path / "shapes", per_class_train=2, per_class_val=1)
    torch.manual_seed(0)
    src = attnzoo.create_model("biformer_tiny", **TINY_BIFORMER)  # 1000 classes, as released
    torch.save({"model": src.state_dict()}, tmp_path / "official.pth")
    result = train_classification(
        "biformer_tiny",
        data,
        tmp_path / "run",
        config="finetune",
        weights=tmp_path / "official.pth",
        overrides=["epochs=1", "batch_size=8", "num_workers=0", "auto_augment=null"],
        model_kwargs=TINY_BIFORMER,
        device="cpu",
    )
    assert result["step"] == 1
    state = torch.load(tmp_path / "run" / "checkpoint-00000001.pt", weights_only=True)
    assert state["model"]["head.weight"].shape == (4, 128)  # the head was replaced for the 4 classes
    assert not torch.equal(state["model"]["stages.0.0.attn.wo.weight"], src.state_dict()["stages.0.0.attn.wo.weight"])
    assert state["run"]["weights"].endswith("official.pth")


def train_resnet18(data, out) -> list[str]:
    """``attnzoo train image-classification`` of resnet18 on ``data`` into ``out`` (settings follow)."""
    return ["train", "image-classification", "--model", "resnet18", "--data", str(data), "--out", str(out)]


def test_cli_train_command_and_errors(tmp_path, capsys):
    data = shapes_dataset(tmp_path / "shapes", per_class_train=2, per_class_val=1)
    command = [
        *train_resnet18(data, tmp_path / "run"),
        "--config",
        "finetune",
        "epochs=1",
        "batch_size=8",
        "num_workers=0",
        "auto_augment=null",
        "input_size=64",
        "--device",
        "cpu",
    ]
    code = main(command)
    assert code == 0, capsys.readouterr().err
    assert "trained 1 steps" in capsys.readouterr().out
    evaluated = (tmp_path / "run" / "eval.csv").read_text().splitlines()[0].split(",")[2:]
    assert evaluated == [f"eval_{name}" for name in METRICS]  # the names best_metric is checked against
    assert (
        json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "run" / "config.yaml").read_text())))["run"][
            "model"
        ]
        == "resnet18"
    )
    assert (
        main(
            [
                "train",
                "image-classification",
                "--model",
                "resnet18",
                "--data",
                str(tmp_path / "nothing"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err
    assert main([*command[:6], "--out", str(tmp_path / "o"), "lrr=1"]) == 1  # the same command, a misspelt setting
    assert "Did you mean" in capsys.readouterr().err
    assert main(command) == 2  # the same command again: the earlier run is kept, not mixed with
    refused = capsys.readouterr().err
    assert "holds an earlier run" in refused and "--overwrite" in refused
    assert main([*command, "--overwrite"]) == 0 and "trained 1 steps" in capsys.readouterr().out
    for device in ("mps", "bogus"):  # typed, not a RuntimeError from torch
        assert main([*command[:-1], device, "--overwrite"]) == 1
        assert f"device={device!r}" in capsys.readouterr().err
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetFormatError):
        train_classification("resnet18", tmp_path / "empty", tmp_path / "o2", overrides=["epochs=1"])
    with pytest.raises(InvalidInputError, match="unknown image-classification settings"):
        train_classification("resnet18", data, tmp_path / "o3", overrides={"extra.colour": 1})


def test_sparsifiner_two_phase_recipe(tmp_path):
    """Phase 1 trains only the predictors (dense backbone), phase 2 only the backbone, against a dense teacher."""
    import timm
    from safetensors.torch import load_file

    tiny = dict(embed_dim=32, depth=2, num_heads=2)
    data = shapes_dataset(tmp_path / "shapes", per_class_train=2, per_class_val=1)
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", num_classes=4, **tiny)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")  # the official DeiT release layout
    common = [
        "epochs=1",
        "batch_size=8",
        "num_workers=0",
        "auto_augment=null",
        "reprob=0",
        "color_jitter=0",
        "warmup_epochs=0",
        "lr=1e-2",
    ]
    torch.manual_seed(0)  # the predictors' initial values, rebuilt by S_init
    train_classification(
        "sparsifiner_deit_small",
        data,
        tmp_path / "recon",
        config="sparsifiner_recon",
        weights=tmp_path / "deit.pth",
        overrides=common,
        model_kwargs=tiny,
        device="cpu",
    )
    recon = load_file(tmp_path / "recon" / "model.safetensors")
    dense = deit.state_dict()
    assert all(torch.equal(recon[k], v) for k, v in dense.items())  # the backbone did not move
    assert not torch.equal(
        recon["blocks.0.attn.mask_predictor.proj_n"], S_init(tiny)["blocks.0.attn.mask_predictor.proj_n"]
    )
    train_classification(
        "sparsifiner_deit_small",
        data,
        tmp_path / "distill",
        config="sparsifiner_distill",
        weights=tmp_path / "recon" / "model.safetensors",
        model_kwargs=tiny,
        device="cpu",
        overrides=[*common, "mixup=0", "cutmix=0", "ema_decay=null", f"teacher_weights={tmp_path / 'deit.pth'}"],
    )
    distilled = load_file(tmp_path / "distill" / "model.safetensors")
    assert all(torch.equal(distilled[k], v) for k, v in recon.items() if "mask_predictor" in k)  # predictors frozen
    assert not torch.equal(distilled["blocks.0.attn.qkv.weight"], recon["blocks.0.attn.qkv.weight"])
    with pytest.raises(InvalidInputError, match="teacher_weights"):
        train_classification(
            "sparsifiner_deit_small",
            data,
            tmp_path / "x",
            config="sparsifiner_distill",
            model_kwargs=tiny,
            overrides=[*common, "mixup=0", "cutmix=0"],
            weights=tmp_path / "recon" / "model.safetensors",
        )


def test_sparsifiner_lvvit_reconstruction_phase_and_no_deit_teacher(tmp_path):
    """LV-ViT Sparsifiner: the reconstruction phase trains its predictors only; the distillation
    phase, whose dense teacher is a DeiT, refuses it instead of distilling from the wrong model."""
    from safetensors.torch import load_file

    tiny = dict(embed_dim=32, depth=2, num_heads=2)
    data = shapes_dataset(tmp_path / "shapes", per_class_train=2, per_class_val=1)
    common = ["epochs=1", "batch_size=8", "num_workers=0", "auto_augment=null", "reprob=0", "color_jitter=0"]
    common += ["warmup_epochs=0", "lr=1e-2"]
    torch.manual_seed(0)
    start = dict(attnzoo.create_model("sparsifiner_lvvit_s", num_classes=4, **tiny).named_parameters())
    torch.manual_seed(0)
    train_classification(
        "sparsifiner_lvvit_s",
        data,
        tmp_path / "recon",
        config="sparsifiner_recon",
        overrides=common,
        model_kwargs=tiny,
        device="cpu",
    )
    recon = load_file(tmp_path / "recon" / "model.safetensors")
    # the backbone's parameters did not move (its stem's BatchNorm statistics do, in training mode, as officially)
    assert all(torch.equal(recon[k], v) for k, v in start.items() if "mask_predictor" not in k)
    assert not torch.equal(recon["blocks.0.attn.mask_predictor.proj_n"], start["blocks.0.attn.mask_predictor.proj_n"])
    with pytest.raises(InvalidInputError, match="LV-ViT"):
        train_classification(
            "sparsifiner_lvvit_s",
            data,
            tmp_path / "distill",
            config="sparsifiner_distill",
            weights=tmp_path / "recon" / "model.safetensors",
            model_kwargs=tiny,
            device="cpu",
            overrides=[*common, "mixup=0", "cutmix=0", f"teacher_weights={tmp_path / 'recon' / 'model.safetensors'}"],
        )


def S_init(tiny):
    """The predictors a fresh model starts with (the recon run builds its model the same way, seed 0)."""
    torch.manual_seed(0)
    return attnzoo.create_model("sparsifiner_deit_small", num_classes=4, **tiny).state_dict()


def test_a_run_never_writes_over_its_inputs_or_into_its_data(tmp_path):
    """Refused before any work: weights or a config file that the run would replace (fine-tuning
    ``ft/model.safetensors`` into ``--out ft``), and ``--out`` equal to or inside ``--data`` (a later
    run would read ``tensorboard/`` as a class)."""
    data = shapes_dataset(tmp_path / "shapes", per_class_train=2, per_class_val=1)
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "model.safetensors").write_bytes(b"weights")
    (ft / "config.yaml").write_text("epochs: 1\n")
    common = {"overrides": ["epochs=1", "batch_size=8", "num_workers=0"], "device": "cpu"}
    for inputs in ({"weights": ft / "model.safetensors"}, {"config": str(ft / "config.yaml")}):
        for again in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(InvalidOptionError, match="would be replaced"):
                train_classification("resnet18", data, ft, **inputs, **again, **common)
    assert (ft / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in ft.iterdir()) == ["config.yaml", "model.safetensors"]
    for out in (data, data / "run", data / "train" / "run"):
        with pytest.raises(InvalidOptionError, match="inside the training data"):
            train_classification("resnet18", data, out, **common)
    assert sorted(p.name for p in data.iterdir()) == ["train", "val"]


def test_a_run_resumes_from_another_working_folder(tmp_path, monkeypatch):
    """The data is recorded resolved: a job resumed from another folder, naming the same data by another
    relative path (a scheduler's working folder), is the same run."""
    shapes_dataset(tmp_path / "shapes", per_class_train=2, per_class_val=1)
    (tmp_path / "jobs").mkdir()
    common = {"config": "finetune", "device": "cpu"}
    settings = ["batch_size=8", "num_workers=0", "auto_augment=null", "input_size=64", "checkpoint_every=1"]
    monkeypatch.chdir(tmp_path)
    train_classification("resnet18", "shapes", tmp_path / "run", overrides=["epochs=1", *settings], **common)
    monkeypatch.chdir(tmp_path / "jobs")
    resumed = train_classification(
        "resnet18", "../shapes", tmp_path / "run", overrides=["epochs=2", *settings], resume=True, **common
    )
    assert resumed["step"] == 2


def test_bad_sizes_and_a_damaged_image_in_a_worker_are_one_line_errors(tmp_path, capsys):
    """input_size=-1 reached a DataLoader worker: the CLI printed the worker's whole traceback as an internal error."""
    data = shapes_dataset(tmp_path / "shapes", per_class_train=2, per_class_val=1)
    command = train_resnet18(data, tmp_path / "o")
    settings = ["epochs=1", "batch_size=8", "auto_augment=null", "--device", "cpu"]
    for bad, said in [
        ("input_size=-1", "input_size must be a positive integer, got -1"),
        ("eval_batch_size=0", "eval_batch_size must be a positive integer, got 0"),
        ("reprob=2", "reprob must be a number in [0.0, 1.0], got 2.0"),
    ]:
        assert main([*command, *settings, bad]) == 2
        assert capsys.readouterr().err == f"error: {said}\n"
    (data / "train" / "class1" / "0.png").write_bytes(b"not a png at all")
    assert main([*command, *settings, "input_size=32", "num_workers=1"]) == 1
    said = capsys.readouterr().err
    assert said == f"error: {data / 'train' / 'class1' / '0.png'}: not an image format PIL can read\n", said


class _ColourOracle(torch.nn.Module):
    """Predicts class k from the image's strongest colour channel k: right on every solid-colour image."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.mean((2, 3)) + 0.0 * self.unused


def colour_folders(root, split, names, n=4):
    """One solid colour per class, in the order of ``names``' position in ``"abc"`` (a red, b green, c blue)."""
    for name in names:
        folder = root / split / name
        folder.mkdir(parents=True)
        colour = [0, 0, 0]
        colour["abc".index(name) if name in "abc" else 0] = 255
        for i in range(n):
            Image.new("RGB", (8, 8), tuple(colour)).save(folder / f"{i}.png")


def train_oracle(tmp_path, monkeypatch, data):
    monkeypatch.setattr(attnzoo, "create_model", lambda name, **kw: _ColourOracle())
    settings = ["epochs=1", "batch_size=4", "num_workers=0", "input_size=8", "auto_augment=null", "best_metric=top1"]
    return train_classification("oracle", data, tmp_path / "run", overrides=settings, device="cpu")


def test_a_val_split_lacking_a_class_is_scored_against_the_training_classes(tmp_path, monkeypatch, caplog):
    """val/ without b was read on its own: its c got target 1 (train's b), and a perfect model scored top1 50."""
    colour_folders(tmp_path / "d", "train", "abc")
    colour_folders(tmp_path / "d", "val", "ac")
    with caplog.at_level("WARNING", logger="attnzoo.training.classification"):
        result = train_oracle(tmp_path, monkeypatch, tmp_path / "d")
    assert result["eval_top1"] == 100.0
    assert "no images of 1 of the 3 training classes (b)" in caplog.text


def test_a_val_class_the_training_split_lacks_is_refused(tmp_path, monkeypatch):
    colour_folders(tmp_path / "d", "train", "ab")
    colour_folders(tmp_path / "d", "val", ["a", "b", "dog"])
    with pytest.raises(DatasetFormatError, match="training split lacks \\(dog\\)"):
        train_oracle(tmp_path, monkeypatch, tmp_path / "d")


def test_an_empty_training_class_folder_is_refused_naming_it(tmp_path, monkeypatch):
    """It became a class without examples, silently."""
    colour_folders(tmp_path / "d", "train", "ac")
    (tmp_path / "d" / "train" / "b").mkdir()
    colour_folders(tmp_path / "d", "val", "abc")
    with pytest.raises(DatasetFormatError, match="class folder\\(s\\) b hold no images"):
        train_oracle(tmp_path, monkeypatch, tmp_path / "d")
