"""Training settings: every bad value is refused with a typed error naming the setting, before a run starts."""

import numpy as np
import pytest

from attnzoo.errors import InvalidOptionError, UnknownNameError
from attnzoo.training.config import TrainConfig, load_config, named_configs, recipe_config


@pytest.mark.parametrize(
    "override, key",
    [
        ("lr=abc", "lr"),
        ("lr=nan", "lr"),
        ("lr=.nan", "lr"),
        ("lr=inf", "lr"),
        ("lr=-1", "lr"),
        ("lr=0", "lr"),
        ("lr=[", "lr"),
        ("batch_size=0", "batch_size"),
        ("batch_size=2.5", "batch_size"),
        ("batch_size=true", "batch_size"),
        ("epochs=-1", "epochs"),
        ("num_workers=-1", "num_workers"),
        ("accum_steps=0", "accum_steps"),
        ("log_every=0", "log_every"),
        ("eval_every=0", "eval_every"),
        ("keep_last=0", "keep_last"),
        ("weight_decay=-0.1", "weight_decay"),
        ("momentum=1.5", "momentum"),
        ("clip_grad=0", "clip_grad"),
        ("min_lr=nan", "min_lr"),
        ("warmup_epochs=-1", "warmup_epochs"),
        ("decay_milestones=[30, x]", "decay_milestones"),
        ("decay_milestones=5", "decay_milestones"),
        ("decay_norms_and_biases=maybe", "decay_norms_and_biases"),
        ("optimizer=lamb", "optimizer"),
        ("schedule=linear", "schedule"),
        ("amp=fp8", "amp"),
        ("ema_decay=1.5", "ema_decay"),
        ("min_lr=1", "min_lr"),  # above lr: the cosine schedule climbed from lr to it
        ("seed=1e30", "seed"),
        ("seed=1" + "0" * 400, "seed"),  # an int past the float range: once an OverflowError from float()
        ("lr=1" + "0" * 400, "lr"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(override, key):
    with pytest.raises(InvalidOptionError, match=rf"^{key}\b"):
        load_config(None, [override])


def test_an_unused_min_lr_or_warmup_lr_may_exceed_lr():
    assert load_config(None, ["schedule=constant", "lr=1e-6"]).min_lr > 1e-6  # the constant schedule reads no min_lr
    with pytest.raises(InvalidOptionError, match="^warmup_lr must be at most lr"):
        load_config(None, ["warmup_epochs=1", "warmup_lr=1", "schedule=constant"])


def test_unknown_settings_are_refused_naming_the_key():
    with pytest.raises(UnknownNameError, match="'lrate'.*Did you mean: lr"):
        load_config(None, ["lrate=1e-3"])
    with pytest.raises(InvalidOptionError, match="key=value"):
        load_config(None, ["lr"])
    with pytest.raises(InvalidOptionError, match=r"unknown image-classification settings: colour \(known: .*mixup"):
        recipe_config(None, {"extra.colour": 1}, {"mixup": 0.0}, "image-classification")


def test_good_settings_are_normalised():
    cfg = load_config(None, ["lr=1e-4", "epochs=1e2", "clip_grad=none", "decay_milestones=[30, 60]", "seed=-3"])
    assert cfg.lr == 1e-4 and cfg.epochs == 100 and isinstance(cfg.epochs, int)
    assert cfg.clip_grad is None and cfg.decay_milestones == [30.0, 60.0] and cfg.seed == -3
    assert load_config(None, {"lr": 1}).lr == 1.0 and isinstance(load_config(None, {"lr": 1}).lr, float)
    from_numpy = load_config(None, {"epochs": np.int64(7), "batch_size": np.float32(16.0)})  # e.g. read off an array
    assert (from_numpy.epochs, from_numpy.batch_size) == (7, 16) and type(from_numpy.epochs) is int
    TrainConfig().validate()  # the defaults are valid
    for name in named_configs():
        load_config(name)  # and so is every shipped recipe


def test_recipe_settings_keep_the_kind_of_their_default():
    defaults = {"mixup": 0.0, "eval_batch_size": 64, "dataset": "camelyon16", "allow_missing": False, "teacher": None}
    cfg = recipe_config(None, ["mixup=1", "eval_batch_size=32.0", "teacher=deit_small"], defaults, "unit")
    assert cfg.extra["mixup"] == 1.0 and cfg.extra["eval_batch_size"] == 32 and cfg.extra["teacher"] == "deit_small"
    for override, key in [
        ("mixup=abc", "mixup"),
        ("mixup=nan", "mixup"),
        ("eval_batch_size=2.5", "eval_batch_size"),
        ("dataset=[1, 2]", "dataset"),
        ("allow_missing=3", "allow_missing"),
        ("mixup=null", "mixup"),
    ]:
        with pytest.raises(InvalidOptionError, match=rf"^{key}\b"):
            recipe_config(None, [override], defaults, "unit")


def test_an_unknown_named_config_lists_the_real_ones():
    with pytest.raises(UnknownNameError) as info:
        load_config("nosuch")
    message = str(info.value)
    assert "'nosuch'" in message and all(name in message for name in named_configs())
    assert "--list-configs" in message
    with pytest.raises(UnknownNameError, match="Did you mean: biformer"):
        load_config("bifomer")
    with pytest.raises(InvalidOptionError, match="does not exist.*biformer"):
        load_config("missing.yaml")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("epochs: [1,\n", "not valid YAML.*line"),
        ("epochs: 1\n  lr: 2\n", "not valid YAML"),
        ("key: value\n- item\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("1: 2\n", "must be a mapping"),
        ("extra: [1, 2]\n", "'extra' must be a mapping"),
        ("epochs: many\n", "^epochs must be an integer"),
        ("lr: .nan\n", "^lr must be a finite number"),
        ("batch_size: 0\n", "^batch_size must be at least 1"),
        ("epochs: " + "[" * 600 + "]" * 600 + "\n", "nested too deeply"),
    ],
)
def test_malformed_yaml_configs_are_typed_errors(tmp_path, text, problem):
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(InvalidOptionError, match=problem):
        load_config(tmp_path / "mine.yaml")


def test_a_binary_file_as_config_is_a_typed_error(tmp_path):
    (tmp_path / "mine.yaml").write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(InvalidOptionError, match="cannot be read as text"):
        load_config(tmp_path / "mine.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(InvalidOptionError, match="does not exist"):
        load_config(tmp_path / "folder.yaml")


def test_bounded_recipe_settings_are_refused_naming_the_key():
    defaults = {"input_size": 224, "reprob": 0.0, "n_classes": None}
    ranges = {"input_size": (1, None), "reprob": (0.0, 1.0), "n_classes": (2, None)}
    for override, wanted in [
        ("input_size=-1", "input_size must be a positive integer, got -1"),
        ("input_size=0", "input_size must be a positive integer"),
        ("reprob=1.5", r"reprob must be a number in \[0.0, 1.0\], got 1.5"),
        ("n_classes=1", r"n_classes must be an integer >= 2, got 1"),
        ("n_classes=abc", "n_classes must be an integer or null"),
    ]:
        with pytest.raises(InvalidOptionError, match=f"^{wanted}"):
            recipe_config(None, [override], defaults, "unit", ranges=ranges)
    cfg = recipe_config(None, ["input_size=32.0", "reprob=1", "n_classes=null"], defaults, "unit", ranges=ranges)
    assert cfg.extra == {"input_size": 32, "reprob": 1.0, "n_classes": None}


def _recipes():
    from attnzoo.training import classification, reconstruction, scanpath, wsi

    return [
        (classification.train_classification, "image-classification", ("top1", "top5")),
        (reconstruction.train_reconstruction, "multiview-3d-reconstruction", ("iou",)),
        (scanpath.train_scanpath, "scanpath", ("ss", "edit_distance", "delta", "model_length")),
        (wsi.train_wsi_classification, "wsi-classification", ("selection", "auc", "f1_micro")),
    ]


@pytest.mark.parametrize("recipe, task, metrics", _recipes(), ids=lambda v: getattr(v, "__name__", ""))
def test_every_recipe_refuses_an_unknown_best_metric_before_reading_its_data(tmp_path, recipe, task, metrics):
    """best_metric=nope was accepted: the run trained to its end and no best.pt was ever written."""
    with pytest.raises(InvalidOptionError, match=f"^best_metric 'nope' is not a metric the {task} evaluation") as info:
        recipe("any_model", tmp_path / "no data here", tmp_path / "out", overrides=["best_metric=nope"])
    assert all(name in str(info.value) for name in metrics)
    assert not (tmp_path / "out").exists()


def _scanpath(overrides):
    """The scanpath recipe's settings, as ``attnzoo train scanpath`` reads them (its metrics' directions are
    the shared table's)."""
    from attnzoo.training import scanpath

    return recipe_config(
        "oat", overrides, scanpath.RECIPE_DEFAULTS, "scanpath", metrics=scanpath.METRICS, ranges=scanpath.RECIPE_RANGES
    )


def test_best_mode_follows_the_best_metric_unless_given():
    """oat.yaml's best_mode=min stayed with best_metric=ss (higher is better): best.pt kept the worst epoch."""
    assert _scanpath([]).best_mode == "min"  # the recipe's delta: lower is better
    assert _scanpath(["best_metric=ss"]).best_mode == "max"
    assert _scanpath(["best_metric=edit_distance"]).best_mode == "min"
    assert _scanpath(["best_metric=model_length", "best_mode=min"]).best_mode == "min"  # no known direction
    assert _scanpath(["best_metric=model_length"]).best_mode == "max"
    assert _scanpath(["best_metric=ss", "best_mode=max"]).best_mode == "max"


@pytest.mark.parametrize("metric, mode", [("ss", "min"), ("delta", "max")])
def test_a_best_mode_contradicting_the_metric_is_refused_naming_both(metric, mode):
    with pytest.raises(InvalidOptionError, match=f"best_mode={mode} contradicts best_metric={metric}"):
        _scanpath([f"best_metric={metric}", f"best_mode={mode}"])


@pytest.mark.parametrize("recipe", ["classification", "reconstruction", "scanpath", "wsi"])
def test_every_recipe_knows_the_direction_of_its_metrics(recipe):
    import importlib

    module = importlib.import_module(f"attnzoo.training.{recipe}")
    assert set(module.METRIC_MODES) == set(module.METRICS)
    assert set(module.METRIC_MODES.values()) <= {"max", "min", None}
    from attnzoo.training.config import METRIC_MODES

    assert all(METRIC_MODES.get(k, v) == v for k, v in module.METRIC_MODES.items())  # no table contradicts another
