"""Fuzzing the checkpoint loaders: whatever the bytes, the answer is a loaded object or a WeightsError,
never a raw exception from a third-party parser."""

import io
import pickle

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from attnzoo.errors import WeightsError
from attnzoo.weights import load_checkpoint_file, load_weights, unwrap_state_dict

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": small_net().state_dict(), "epoch": 3}, buffer)
    return buffer.getvalue()


TORCH_ZIP = _torch_zip()
SAFETENSORS = save(small_net().state_dict())
PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _mutated(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data[: max(1, cut % (len(data) + 1))])
    for where, value in flips:
        buf[where % len(buf)] = value
    return bytes(buf)


def check_typed(tmp_path, payload: bytes, name: str = "ck.pth") -> None:
    """Every way in (file reader, unwrapping, loading into a model) answers or raises WeightsError."""
    path = tmp_path / name
    path.write_bytes(payload)
    for load in (
        lambda: unwrap_state_dict(load_checkpoint_file(path)),
        lambda: load_weights(small_net(), path),
        lambda: load_weights(small_net(), path, converter=lambda sd, model: sd["model"]),
    ):
        try:
            load()
        except WeightsError:
            pass


@FUZZ
@given(payload=st.binary(max_size=2048))
def test_random_bytes(tmp_path, payload):
    check_typed(tmp_path, payload)
    check_typed(tmp_path, payload, "ck.safetensors")


@FUZZ
@given(cut=st.integers(0, 10**6), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3))
def test_truncated_and_corrupted_torch_zips(tmp_path, cut, flips):
    check_typed(tmp_path, _mutated(TORCH_ZIP, cut, flips))


@FUZZ
@given(cut=st.integers(0, 10**6), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3))
def test_truncated_and_corrupted_safetensors(tmp_path, cut, flips):
    data = _mutated(SAFETENSORS, cut, flips)
    check_typed(tmp_path, data, "w.safetensors")
    check_typed(tmp_path, data, "w.bin")  # found by content


@FUZZ
@given(obj=PLAIN, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_pickles_with_random_content(tmp_path, obj, protocol):
    check_typed(tmp_path, pickle.dumps(obj, protocol=protocol))


@FUZZ
@given(obj=PLAIN, values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=6))
def test_torch_saves_with_random_content_and_values(tmp_path, obj, values):
    buffer = io.BytesIO()
    torch.save({"model": {"0.weight": torch.tensor(values)}, "extra": obj}, buffer)
    check_typed(tmp_path, buffer.getvalue())
