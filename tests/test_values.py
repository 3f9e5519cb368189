"""The shared checks of setting values (attnzoo._values)."""

from fractions import Fraction

import numpy as np
import pytest

import attnzoo._values as values
from attnzoo._values import (
    check_worker_count,
    comma_items,
    flag,
    is_integer,
    listed,
    nonblank_text,
    process_limit,
    real_number,
    to_real,
    whole_number,
)
from attnzoo.errors import InvalidInputError, InvalidOptionError


@pytest.mark.parametrize("value", [1, 7, np.int64(3)])
def test_whole_number_takes_integers_in_range(value):
    assert whole_number(value, "n", high=7) == int(value)
    assert type(whole_number(value, "n")) is int


@pytest.mark.parametrize("value", [0, -1, 8, 2.0, True, "3", None, np.float32(2)])
def test_whole_number_refuses_others_naming_the_setting(value):
    with pytest.raises(InvalidOptionError, match=r"--steps must be an integer in \[1, 7\] \(the limit\)"):
        whole_number(value, "--steps", high=7, why="the limit")


def test_whole_number_wording_and_error_type():
    with pytest.raises(InvalidOptionError, match="n must be a positive integer, got 0"):
        whole_number(0, "n")
    with pytest.raises(InvalidOptionError, match="n must be an integer >= 0, got -1"):
        whole_number(-1, "n", low=0)
    with pytest.raises(InvalidInputError) as caught:
        whole_number(0, "n", error=InvalidInputError)
    assert type(caught.value) is InvalidInputError
    assert whole_number(0, "n", low=0) == 0


def test_whole_number_takes_integral_floats_when_asked():
    assert (
        whole_number(7.0, "n", integral_floats=True) == 7 and type(whole_number(7.0, "n", integral_floats=True)) is int
    )
    assert whole_number(np.float32(3), "n", integral_floats=True) == 3
    for bad in (2.5, float("nan"), float("inf"), 0.0, 8.0, True, "7"):
        with pytest.raises(InvalidOptionError, match=rf"n must be an integer in \[1, 7\], got {bad!r}$"):
            whole_number(bad, "n", high=7, integral_floats=True)  # the value as given, not as converted
    with pytest.raises(InvalidOptionError):
        whole_number(7.0, "n")  # floats stay refused by default


def test_is_integer():
    assert is_integer(3) and is_integer(np.int8(-1)) and is_integer(10**400)
    assert not any(is_integer(v) for v in (True, np.True_, 3.0, np.float64(3), "3", None))


@pytest.mark.parametrize("value", [2, 2.5, np.float32(0.5), np.int64(-3), Fraction(1, 3), np.float64(1e300)])
def test_to_real_takes_python_and_numpy_numbers(value):
    assert to_real(value) == float(value) and type(to_real(value)) is float


@pytest.mark.parametrize(
    "value", [True, np.True_, "1", None, 1j, np.complex64(1), [1.0], 10**400, float("nan"), float("-inf")]
)
def test_to_real_refuses_the_rest(value):
    assert to_real(value) is None


def test_to_real_takes_non_finite_numbers_when_asked():
    assert to_real(float("inf"), finite=False) == float("inf")
    assert np.isnan(to_real(np.float32("nan"), finite=False))
    assert to_real(10**400, finite=False) is None  # no float holds it


@pytest.mark.parametrize(
    ("bounds", "inside", "outside", "wanted"),
    [
        ({}, [-1e300, 0, 7], [float("nan"), float("inf")], "a finite number"),
        ({"above": 0}, [1e-300, 5], [0, -1, float("inf")], "a positive finite number"),
        ({"low": 0}, [0, 5], [-1e-9, float("nan")], "a finite number >= 0"),
        ({"high": 1}, [1, -5], [1.5, float("-inf")], "a finite number <= 1"),
        ({"low": 0, "high": 1}, [0, 0.5, 1], [-0.1, 1.1, float("nan")], r"a number in \[0, 1\]"),
        ({"above": 0, "high": 1}, [1, 0.5], [0, 1.1], r"a number in \(0, 1\]"),
        ({"above": 2, "finite": False}, [float("inf")], [2, float("nan")], "a number > 2"),
    ],
)
def test_real_number_bounds_and_wording(bounds, inside, outside, wanted):
    for value in inside:
        assert real_number(value, "x", **bounds) == float(value)
    for value in [*outside, True, "0.5", None, 10**400]:
        with pytest.raises(InvalidOptionError, match=rf"^x must be {wanted} \(why\), got "):
            real_number(value, "x", why="why", **bounds)


def test_real_number_error_type():
    with pytest.raises(InvalidInputError) as caught:
        real_number("1", "x", error=InvalidInputError)
    assert type(caught.value) is InvalidInputError
    assert real_number(np.float32(0.25), "x", low=0, high=1) == 0.25


def test_process_limit_is_a_positive_int_or_unknown():
    limit = process_limit()
    assert limit is None or (type(limit) is int and limit > 0)


def test_worker_counts_at_the_process_limit_are_refused(monkeypatch):
    monkeypatch.setattr(values, "process_limit", lambda: 8)
    assert check_worker_count(7) == 7 and check_worker_count(0) == 0
    with pytest.raises(InvalidOptionError, match=r"^num_workers=8 is more worker processes than this system lets one"):
        check_worker_count(8)
    with pytest.raises(InvalidOptionError, match=r"^--num-workers=9 is more worker processes .*\(8\)"):
        check_worker_count(9, "--num-workers")
    monkeypatch.setattr(values, "process_limit", lambda: None)  # the system does not say: its bound is not applied
    assert check_worker_count(64) == 64


def test_worker_counts_past_what_any_run_uses_are_refused_whatever_the_system_allows(monkeypatch):
    """``num_workers=10**7`` passed wherever the system's process limit was unknown or higher (pid_max is 4 million
    on many machines): every worker is forked before the first batch. The most a run uses: 64, or 8 per core."""
    monkeypatch.setattr(values, "process_limit", lambda: None)
    monkeypatch.setattr(values.os, "cpu_count", lambda: 2)
    assert values.useful_worker_limit() == 64 and check_worker_count(64) == 64
    with pytest.raises(
        InvalidOptionError, match=r"^num_workers=65 is more worker processes than any run uses \(at most 64"
    ):
        check_worker_count(65)
    monkeypatch.setattr(values.os, "cpu_count", lambda: 32)
    assert values.useful_worker_limit() == 256 and check_worker_count(256) == 256
    with pytest.raises(InvalidOptionError, match=r"^--num-workers=10000000 is more worker processes .*\(at most 256"):
        check_worker_count(10**7, "--num-workers")
    monkeypatch.setattr(values.os, "cpu_count", lambda: None)  # unknown: one core assumed
    assert values.useful_worker_limit() == 64
    monkeypatch.setattr(values, "process_limit", lambda: 4_194_304)  # pid_max: no help against 10**6
    with pytest.raises(InvalidOptionError, match=r"^num_workers=1000000 is more worker processes than any run uses"):
        check_worker_count(10**6)


def test_comma_items_strips_and_keeps_order():
    assert comma_items(" a, b ,c", "--x") == ["a", "b", "c"]
    assert comma_items("7", "--x") == ["7"]


def test_comma_items_nested_keeps_what_parentheses_hold():
    assert comma_items("none, pai(alpha=0.5,gamma=1)+vcd", "--methods", nested=True) == [
        "none",
        "pai(alpha=0.5,gamma=1)+vcd",
    ]
    assert comma_items("pai(a=1)+vcd(b=2,c=3)", "--method", separators="+,", nested=True) == [
        "pai(a=1)",
        "vcd(b=2,c=3)",
    ]
    assert comma_items("a(b,c)", "--x") == ["a(b", "c)"]  # parentheses are text unless nested
    with pytest.raises(InvalidOptionError, match="leaves a parenthesis open"):
        comma_items("pai(alpha=1", "--method", nested=True)
    with pytest.raises(InvalidOptionError, match="closes a parenthesis it did not open"):
        comma_items("pai),vcd(", "--method", nested=True)
    with pytest.raises(InvalidOptionError, match="blank item"):
        comma_items("pai(alpha=1),", "--method", nested=True)


@pytest.mark.parametrize("value", ["", " ", "a,,b", "a,", ",a", ","])
def test_comma_items_refuses_blank_items(value):
    with pytest.raises(InvalidOptionError, match="--layers .* blank item"):
        comma_items(value, "--layers")


def test_nonblank_text():
    assert nonblank_text("x", "--out") == "x"
    for value in ("", "  ", None, 3):
        with pytest.raises(InvalidOptionError, match="--out must be a non-empty string"):
            nonblank_text(value, "--out")


def test_listed_names_the_first_and_counts_the_rest():
    assert listed([]) == "none"
    assert listed(["a", "b"]) == "a, b"
    assert listed([str(i) for i in range(12)], 3) == "0, 1, 2, ... (12 in all)"


def test_flag_takes_python_and_numpy_booleans_only():
    for given, expected in ((True, True), (False, False), (np.True_, True), (np.False_, False)):
        got = flag(given, "progress")
        assert got is expected  # a Python bool, numpy's converted
    for bad in ("yes", "no", 1, 0, 1.0, None, [True], np.array([True])):
        with pytest.raises(InvalidOptionError, match=r"^truncate must be True or False, got "):
            flag(bad, "truncate")


def test_flag_takes_none_where_asked_and_says_what_it_means():
    assert flag(None, "progress", allow_none=True) is None
    assert flag(np.True_, "progress", allow_none=True) is True
    with pytest.raises(InvalidInputError, match=r"^progress must be True, False or None \(on a terminal\), got 'yes'$"):
        flag("yes", "progress", allow_none=True, none_means="on a terminal", error=InvalidInputError)
    with pytest.raises(InvalidOptionError, match=r"^amp must be True, False or None, got 2$"):
        flag(2, "amp", allow_none=True)


# ---- tensors: the meta guard, seeds, to_numpy (torch is imported by these tests only; _values does not import it)


def test_refuse_meta_names_the_input_and_says_what_to_do():
    import torch

    from attnzoo.errors import DatasetFormatError

    with pytest.raises(InvalidInputError, match=r"^boxes is a meta tensor: it holds no data .*load real weights or "):
        values.refuse_meta(torch.zeros(2, 4, device="meta"), "boxes")
    with pytest.raises(DatasetFormatError, match=r"^slide\.pt: features is a meta tensor.*materialize it"):
        values.refuse_meta(torch.zeros(3, device="meta"), "slide.pt: features", error=DatasetFormatError)
    for fine in (torch.zeros(2), torch.zeros(2).to_sparse(), np.zeros(2), [1, 2], None, "meta"):
        assert values.refuse_meta(fine, "x") is None
    with pytest.raises(InvalidInputError, match=r"^labels is a meta tensor: it holds no data .*materialize it"):
        values.to_numpy(torch.zeros(2, device="meta"), "labels")  # to_numpy refuses through it: one wording


def test_generator_seed_lives_in_values_and_stays_importable_from_pipelines():
    from attnzoo.pipelines import base

    assert base.generator_seed is values.generator_seed
    assert values.generator_seed(0) == 0 and values.generator_seed(2**64 - 1) == 2**64 - 1
    assert type(values.generator_seed(np.uint64(7))) is int
    for bad in (-1, 2**64, True, 1.0, "3", None):
        with pytest.raises(InvalidOptionError, match=rf"^--seed must be an integer in \[0, 2\*\*64\), got {bad!r}$"):
            values.generator_seed(bad, "--seed")
    with pytest.raises(InvalidOptionError, match=r"\[0, 2\*\*64 - 1\)"):
        values.generator_seed(2**64 - 1, spare=1)  # seed + 1 must be a seed too


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_to_numpy_reads_conjugate_and_negative_views_as_their_values():
    """``x.conj()`` and ``torch._neg_view`` are lazy views (a bit on the tensor): torch's ``.numpy()`` refused them
    with a bare RuntimeError; their values are the conjugate and the negation of the data beneath."""
    import torch

    data = torch.tensor([[1 + 2j, -3 - 0.5j], [0j, 4 - 1j]])
    conjugate = data.conj()
    assert conjugate.is_conj()
    got = values.to_numpy(conjugate)
    np.testing.assert_array_equal(got, np.conj(data.numpy()))
    assert got.dtype == np.complex64
    real = torch.tensor([1.5, -2.0, 0.25])
    negated = torch._neg_view(real)
    assert negated.is_neg()
    np.testing.assert_array_equal(values.to_numpy(negated), -real.numpy())
    half = torch.tensor([1 + 1j], dtype=torch.complex32).conj()  # widened and resolved alike
    np.testing.assert_array_equal(values.to_numpy(half), np.array([1 - 1j], np.complex64))
    np.testing.assert_array_equal(values.to_numpy(torch.eye(2, dtype=torch.cfloat).to_sparse().conj()), np.eye(2))
    assert not data.is_conj() and data[0, 0].item() == 1 + 2j  # the caller's tensor is left as it was


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*deprecated")
def test_to_numpy_reads_quantized_tensors_as_the_values_they_stand_for():
    """A quantized tensor's ``.numpy()`` was a bare ``TypeError: Got unsupported ScalarType QUInt8``; its values are
    ``scale * (q - zero_point)``, computed here from its integers."""
    import torch

    x = torch.tensor([[0.5, 1.25], [-0.75, 2.0]])
    for quantized in (
        torch.quantize_per_tensor(x, 0.25, 4, torch.quint8),
        torch.quantize_per_tensor(x, 0.1, 0, torch.qint8),
        torch.quantize_per_channel(x, torch.tensor([0.25, 0.5]), torch.tensor([4, 2]), 0, torch.quint8),
    ):
        got = values.to_numpy(quantized, "probabilities")
        integers = quantized.int_repr().numpy().astype(np.float64)
        if quantized.qscheme() == torch.per_tensor_affine:
            expected = quantized.q_scale() * (integers - quantized.q_zero_point())
        else:
            scales = quantized.q_per_channel_scales().numpy()[:, None]
            expected = scales * (integers - quantized.q_per_channel_zero_points().numpy()[:, None])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6)
