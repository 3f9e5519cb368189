"""Device and dtype placement as transformers users give them (attnzoo._placement, attnzoo.pipeline, the CLI):
an ordinal past the devices there are is refused with the count; ``"0"`` / ``"-1"`` read as the ints do;
``dtype="auto"`` is the model's own; ``torch_dtype=`` is ``dtype``'s older name. No GPU needed: CUDA is faked
by monkeypatching ``torch.cuda.is_available`` / ``device_count``."""

from __future__ import annotations

import json

import pytest
import torch

import attnzoo
from attnzoo._placement import resolve_device, resolve_dtype
from attnzoo.cli import main
from attnzoo.errors import InvalidInputError, InvalidOptionError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA device, as torch would report it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("device, index", [(1, 1), ("1", 1), ("cuda:3", 3), (torch.device("cuda", 7), 7)])
def test_a_cuda_ordinal_past_the_devices_there_are_is_refused_with_their_count(one_gpu, device, index):
    with pytest.raises(InvalidInputError, match=rf"CUDA device {index}\b.*only 1 CUDA device") as err:
        resolve_device(device)
    assert repr(device) in str(err.value)  # the option as given


def test_the_ordinals_there_are_pass(one_gpu):
    assert resolve_device(0) == resolve_device("cuda:0") == resolve_device(torch.device("cuda", 0))
    assert resolve_device(0) == torch.device("cuda:0")


def test_the_ordinal_count_of_another_accelerator_is_checked_too(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    assert resolve_device("xpu:1") == torch.device("xpu:1")
    with pytest.raises(InvalidInputError, match=r"XPU device 2\b.*2 XPU devices"):
        resolve_device("xpu:2")


@pytest.mark.parametrize("text, ordinal", [("0", 0), (" 2 ", 2), ("-1", -1)])
def test_an_ordinal_written_as_text_reads_as_the_int(monkeypatch, text, ordinal):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device(text) == resolve_device(ordinal)
    assert resolve_device(text) == (torch.device("cpu") if ordinal < 0 else torch.device("cuda", ordinal))


def test_an_ordinal_as_text_without_cuda_is_refused_as_the_int_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match="no CUDA device is available"):
        resolve_device("0")
    assert resolve_device("-1") == torch.device("cpu")


@pytest.mark.parametrize("auto", ["auto", "AUTO", " auto "])
def test_auto_dtype_is_the_models_own(auto):
    assert resolve_dtype(auto) is None


def test_dtype_names_are_read_with_spaces_around_as_auto_is():
    assert resolve_dtype(" bf16 ") == torch.bfloat16 == resolve_dtype("BFloat16\n")


def test_pipeline_and_create_model_take_auto_dtype(tiny_model):
    half = attnzoo.create_model("test_resnet", dtype="bfloat16")
    pipe = attnzoo.pipeline("image-classification", model=half, device="cpu", dtype="auto")
    assert pipe.dtype is None and next(pipe.model.parameters()).dtype == torch.bfloat16  # kept as it was
    made = attnzoo.create_model("test_resnet", dtype="auto")
    assert next(made.parameters()).dtype == torch.float32


def test_torch_dtype_is_taken_as_dtype(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    pipe = attnzoo.pipeline("image-classification", model=model, device="cpu", torch_dtype=torch.float64)
    assert pipe.dtype == torch.float64 and next(pipe.model.parameters()).dtype == torch.float64
    same = attnzoo.pipeline("image-classification", model=model, device="cpu", dtype="fp64", torch_dtype="float64")
    assert same.dtype == torch.float64
    with pytest.raises(InvalidOptionError, match=r"dtype='float16' and torch_dtype=torch.float64"):
        attnzoo.pipeline("image-classification", model=model, device="cpu", dtype="float16", torch_dtype=torch.float64)


def test_torch_dtype_reaches_the_hallucination_pipeline_as_dtype():
    from attnzoo.multimodal.hallucination.models import tiny_lvlm

    pipe = attnzoo.pipeline("hallucination-mitigation", model=tiny_lvlm("llava"), torch_dtype="bf16", device="cpu")
    assert pipe.dtype == pipe.model.dtype == torch.bfloat16


def test_the_command_line_takes_device_minus_one_and_dtype_auto(tmp_path, photo, capsys):
    photo.save(tmp_path / "cat.png")
    out = tmp_path / "out"
    argv = ["run", "image-classification", str(tmp_path / "cat.png"), "--model", "test_resnet", "--weights", "none"]
    assert main([*argv, "--device", "-1", "--dtype", "auto", "--out", str(out)]) == 0, capsys.readouterr().err
    record = json.loads((out / "results.json").read_text())
    assert len(record["results"]) == 1


@pytest.mark.parametrize(
    ("visible", "bound", "rank", "expected"),
    [(4, None, 3, "cuda:3"), (1, "5", 3, "cuda:0"), (2, None, 3, None), (1, None, 3, None), (1, "0,1", 3, None)],
)
def test_a_torchrun_rank_gets_its_own_gpu_or_a_typed_error(monkeypatch, visible, bound, rank, expected):
    """Under torchrun a bare 'cuda' is this rank's GPU; with one GPU made visible to each process (a scheduler's
    binding, CUDA_VISIBLE_DEVICES naming one) it is that one; more ranks on a node than the GPUs they see is
    refused, naming both, before torch fails inside the process group's setup (or NCCL, on one shared GPU)."""
    from attnzoo import _distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if bound is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", bound)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    if expected is not None:
        assert resolve_device(None) == resolve_device("cuda") == torch.device(expected)
        return
    for device in (None, "cuda"):
        with pytest.raises(InvalidInputError, match=rf"local rank 3 \(LOCAL_RANK\), but only {visible} CUDA device"):
            resolve_device(device)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(InvalidInputError, match=f"--nproc_per_node {visible}"):
        _distributed.distributed_context()
    assert chosen == []
