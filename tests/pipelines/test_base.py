"""The pipeline base: device/dtype checks (attnzoo._placement, re-exported here) and input placement."""

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.errors import InvalidInputError
from attnzoo.pipelines import base
from attnzoo.pipelines.base import Pipeline, resolve_device, resolve_dtype
from tests.pipelines.test_image_classification import manual_scores

SRC = Path(attnzoo.__file__).parent


def test_the_resolvers_stay_importable_from_the_pipeline_base():
    from attnzoo import _placement

    assert base.resolve_device is _placement.resolve_device and base.resolve_dtype is _placement.resolve_dtype
    assert attnzoo.pipelines.resolve_device is _placement.resolve_device


@pytest.mark.parametrize("module", ["_placement.py", "factory.py", "multimodal/nevaclip.py"])
def test_placement_is_a_leaf_and_models_do_not_import_pipelines(module):
    tree = ast.parse((SRC / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(name.startswith("attnzoo.pipelines") for name in imported)
    if module == "_placement.py":
        assert {name for name in imported if name != "__future__"} <= {"os", "typing", "torch", "attnzoo.errors"}


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:0", "hip"])
def test_a_device_whose_backend_is_missing_is_refused(device):
    kind = device.split(":")[0]
    backend = getattr(torch, kind, None)
    if backend is not None and backend.is_available():
        pytest.skip(f"this machine has {kind}")
    with pytest.raises(InvalidInputError, match=kind.upper()):
        resolve_device(device)


def test_a_backend_that_is_available_is_accepted(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)  # xpu:1 is the second of two
    assert resolve_device("xpu:1") == torch.device("xpu:1")
    assert resolve_device(-1) == resolve_device("cpu") == torch.device("cpu")


def test_meta_is_refused_as_cuda_is():
    with pytest.raises(InvalidInputError, match="meta"):
        resolve_device("meta")
    with pytest.raises(InvalidInputError, match="meta"):
        resolve_device(torch.device("meta"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_only_floating_dtypes_models_run_in_are_accepted(dtype):
    with pytest.raises(InvalidInputError, match="float32"):
        resolve_dtype(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_floating_dtypes_and_their_names_resolve(dtype):
    name = str(dtype).removeprefix("torch.")
    assert resolve_dtype(dtype) is dtype and resolve_dtype(name) is dtype and resolve_dtype(str(dtype)) is dtype
    assert resolve_dtype(None) is None


def test_a_pipeline_refuses_a_bad_device_or_dtype_before_touching_the_model(tiny_model):
    for bad in ({"device": "meta"}, {"device": "mps"}, {"device": "cpu", "dtype": torch.complex64}):
        with pytest.raises(InvalidInputError):
            attnzoo.pipeline("image-classification", model=tiny_model, **bad)
    assert next(tiny_model.parameters()).dtype == torch.float32 and next(tiny_model.parameters()).device.type == "cpu"


class _Recorder(Pipeline):
    """Records what reaches ``_forward``: the dtypes of a float and an integer input."""

    def preprocess(self, item):
        return {"x": torch.full((2,), float(item)), "ids": torch.tensor([item])}

    def _forward(self, batch):
        return {"x": batch["x"].float(), "x_dtype": [batch["x"].dtype], "ids_dtype": [batch["ids"].dtype]}

    def postprocess(self, outputs):
        return outputs["x_dtype"], outputs["ids_dtype"]


class _NotAModule:
    """A model object without parameters (as NevaClip): floating inputs keep their dtype."""

    def to(self, device=None, dtype=None):
        return self

    def eval(self):
        return self


@pytest.mark.parametrize(
    "model, dtype, expected",
    [
        (torch.nn.Linear(2, 2).bfloat16(), None, torch.bfloat16),  # the model's own dtype
        (torch.nn.Linear(2, 2).half(), None, torch.float16),
        (torch.nn.Linear(2, 2), None, torch.float32),
        (torch.nn.Linear(2, 2), "float64", torch.float64),  # the pipeline's dtype wins
        (_NotAModule(), None, torch.float32),
    ],
)
def test_floating_inputs_go_in_the_models_dtype_and_integers_stay(model, dtype, expected):
    assert _Recorder(model, device="cpu", dtype=dtype)(3) == (expected, torch.int64)


def test_a_model_already_in_bfloat16_classifies_float32_pictures(tiny_model, photo):
    """dtype=None: the pipeline feeds the model in its own dtype (it used to fail in conv2d)."""
    bf16 = copy.deepcopy(tiny_model).bfloat16()
    result = attnzoo.pipeline("image-classification", model=bf16, device="cpu")(photo, top_k=1000)
    scores = np.zeros(1000)
    scores[[p.index for p in result]] = [p.score for p in result]
    by_hand = manual_scores(bf16, photo).double().numpy()  # the picture cast to bfloat16 by hand
    np.testing.assert_allclose(scores, by_hand, rtol=0, atol=1e-12)
    in_fp32 = manual_scores(tiny_model, photo).double().numpy()
    assert result[0].index == in_fp32.argmax()  # a margin of 1e-4 against a bfloat16 error under 1e-6
    # bfloat16 keeps 8 bits of mantissa: its scores are the fp32 ones to a few percent of the largest
    np.testing.assert_allclose(scores, in_fp32, rtol=0, atol=0.05 * in_fp32.max())


def test_check_batching_refuses_worker_counts_at_the_process_limit(monkeypatch):
    """The one batching check of run, eval and extraction: DataLoader would fork every worker before a batch."""
    import attnzoo._values
    from attnzoo.errors import InvalidOptionError

    monkeypatch.setattr(attnzoo._values, "process_limit", lambda: 5)
    assert base.check_batching(8, 4) == (8, 4)
    with pytest.raises(InvalidOptionError, match="num_workers=5 is more worker processes"):
        base.check_batching(8, 5)
    with pytest.raises(InvalidInputError, match="num_workers must be an integer >= 0"):
        base.check_batching(8, -1)


def test_a_pipeline_refuses_worker_counts_no_run_uses_at_construction_and_at_a_call(monkeypatch):
    """``num_workers=10**7`` was taken by a pipeline (only ``>= 0`` was checked) and would fork until the process
    table filled; refused, saying why, before any worker starts. The most any run uses is taken."""
    import attnzoo._values
    from attnzoo._values import useful_worker_limit
    from attnzoo.errors import InvalidOptionError

    monkeypatch.setattr(attnzoo._values, "process_limit", lambda: None)  # whatever the system allows
    monkeypatch.setattr(Pipeline, "_batches", lambda *a, **k: pytest.fail("workers were to start"))
    useful = useful_worker_limit()
    for count in (10**7, useful + 1):
        with pytest.raises(InvalidOptionError, match=rf"^num_workers={count} is more worker processes than any run"):
            _Recorder(torch.nn.Linear(1, 1), num_workers=count)
    recorder = _Recorder(torch.nn.Linear(1, 1), num_workers=useful)  # the bound itself is taken
    assert recorder.num_workers == useful
    with pytest.raises(InvalidOptionError, match=r"^num_workers=10000000 is more worker processes .*per CPU core"):
        list(_Recorder(torch.nn.Linear(1, 1)).iterate([1, 2], num_workers=10**7))
    with pytest.raises(InvalidOptionError, match="num_workers=10000000 is more worker processes"):
        base.check_batching(8, 10**7)
