"""Checks of setting values shared by every layer, so that one rule gives one wording everywhere:
whole and real numbers in a range, flags, worker counts, comma lists without blank items, text that is not blank,
keywords that go with each input rather than to a pipeline's constructor, close names for a misspelled one."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from attnzoo.errors import InvalidInputError, InvalidOptionError


def is_integer(value: Any) -> bool:
    """A Python or numpy integer; a bool is not one (``True`` is a flag, not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_whole(value: Any) -> bool:
    """An integer (:func:`is_integer`) or an integral float (``1e2`` from YAML or a command line); ints are
    taken as they are, however large (no float on the way)."""
    return is_integer(value) or (isinstance(value, (float, np.floating)) and float(value).is_integer())


def whole_number(
    value: Any,
    name: str,
    *,
    low: int = 1,
    high: int | None = None,
    integral_floats: bool = False,
    why: str = "",
    error: type[InvalidInputError] = InvalidOptionError,
) -> int:
    """``value`` as an int in ``[low, high]`` (bools and floats refused; with ``integral_floats``, ``7.0`` from
    JSON or a command line is 7, 2.5 and NaN still refused), or ``error`` naming ``name``; ``why`` says what
    the upper bound stands for (e.g. "the model's context")."""
    given = value
    if integral_floats and is_whole(value):
        value = int(value)
    if not is_integer(value) or value < low or (high is not None and value > high):
        if high is None:
            wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
        else:
            wanted = f"an integer in [{low}, {high}]"
        raise error(f"{name} must be {wanted}{f' ({why})' if why else ''}, got {given!r}")
    return int(value)


@overload
def flag(
    value: Any,
    name: str,
    *,
    allow_none: Literal[False] = False,
    none_means: str = "",
    error: type[InvalidInputError] = InvalidOptionError,
) -> bool: ...


@overload
def flag(
    value: Any,
    name: str,
    *,
    allow_none: bool,
    none_means: str = "",
    error: type[InvalidInputError] = InvalidOptionError,
) -> bool | None: ...


def flag(
    value: Any,
    name: str,
    *,
    allow_none: bool = False,
    none_means: str = "",
    error: type[InvalidInputError] = InvalidOptionError,
) -> bool | None:
    """``value`` as a bool where it is ``True`` or ``False`` (numpy's ``np.True_`` too: a flag read from an array),
    None as None with ``allow_none`` (``none_means``: what None stands for, e.g. "on a terminal"); else ``error``
    naming ``name``. A string such as ``"no"`` or a number is refused: it would read as true."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    wanted = "True or False"
    if allow_none:
        wanted = f"True, False or None{f' ({none_means})' if none_means else ''}"
    raise error(f"{name} must be {wanted}, got {value!r}")


def to_real(value: Any, *, finite: bool = True) -> float | None:
    """``value`` as a float where it is a real number (a Python or numpy int or float, any
    :class:`numbers.Real`), else None: a bool, a string, None, a complex number, an int past the float range
    (``1`` and 400 zeros) and, with ``finite``, NaN and infinities."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError):
        return None
    return number if not finite or math.isfinite(number) else None


def real_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    finite: bool = True,
    why: str = "",
    error: type[InvalidInputError] = InvalidOptionError,
) -> float:
    """``value`` (see :func:`to_real`) as a float in ``[low, high]``, or over ``above`` (for "positive": a
    strict lower bound instead of ``low``); each bound optional. Else ``error`` naming ``name``; ``why`` says
    what the number is or why the bounds."""
    number = to_real(value, finite=finite)
    if number is None or not (  # written as what must hold, so that NaN (with finite=False) fails every bound
        (low is None or number >= low) and (high is None or number <= high) and (above is None or number > above)
    ):
        raise error(
            f"{name} must be {_real_wanted(low, high, above, finite)}{f' ({why})' if why else ''}, got {value!r}"
        )
    return number


def _real_wanted(low: float | None, high: float | None, above: float | None, finite: bool) -> str:
    """The words for a number within the given bounds: ``a number in [0, 1]``, ``a positive finite number``."""
    kind = "finite number" if finite else "number"
    opening = f"({above}" if above is not None else f"[{low}" if low is not None else None
    if opening is not None and high is not None:
        return f"a number in {opening}, {high}]"
    if above == 0:
        return f"a positive {kind}"
    if above is not None:
        return f"a {kind} > {above}"
    if low is not None:
        return f"a {kind} >= {low}"
    return f"a {kind} <= {high}" if high is not None else f"a {kind}"


def process_limit() -> int | None:
    """How many processes this user may have at once (``ulimit -u``, the kernel's ``pid_max``), where the system
    says; None where it does not."""
    limits = []
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(int(soft))
    except (ImportError, AttributeError, OSError, ValueError):
        pass
    try:
        limits.append(int(Path("/proc/sys/kernel/pid_max").read_text()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def useful_worker_limit() -> int:
    """The most worker processes any run here takes: ``max(64, 8 per CPU core)``. Workers only decode and
    check inputs for the main process, so beyond a few per core they add memory and start-up time, not speed;
    a count far past it is a typo (``10**7``) that would fork until the process table is full."""
    return max(64, 8 * (os.cpu_count() or 1))


def check_worker_count(num_workers: int, name: str = "num_workers") -> int:
    """A count of worker processes (an int >= 0, checked by the caller) below what this system lets one user run
    and no more than :func:`useful_worker_limit`: DataLoader forks them all before the first batch, so a typo
    such as 10**6 would otherwise exhaust the process table instead of being refused."""
    limit = process_limit()
    if limit is not None and num_workers >= limit:
        raise InvalidOptionError(
            f"{name}={num_workers} is more worker processes than this system lets one user run ({limit}); "
            f"use a few per CPU core ({os.cpu_count()} here)"
        )
    useful = useful_worker_limit()
    if num_workers > useful:
        raise InvalidOptionError(
            f"{name}={num_workers} is more worker processes than any run uses (at most {useful}, the larger of 64 "
            f"and 8 per CPU core, {os.cpu_count()} here): each is forked before the first batch; use a few per core"
        )
    return num_workers


def comma_items(value: str, name: str, separators: str = ",", nested: bool = False, strip: bool = True) -> list[str]:
    """The stripped items of ``"a, b,c"``; a blank item (``"a,,b"``, a trailing comma) or no item at all is
    refused: a dropped item would run something other than what was typed. ``nested``: separators inside
    parentheses belong to their item (``"pai(alpha=0.5,gamma=1),vcd"`` is two items); ``strip=False``
    keeps the white space around the items (text with commas in it, rejoined)."""
    items = _split_outside_parentheses(value, separators, name, nested)
    if not value.strip() or any(not item.strip() for item in items):
        raise InvalidOptionError(f"{name} {value!r} has a blank item; give comma-separated values such as 'a,b'")
    return [item.strip() for item in items] if strip else items


def _split_outside_parentheses(value: str, separators: str, name: str, nested: bool) -> list[str]:
    items, current, depth = [], [], 0
    for char in value:
        if nested and char in "()":
            depth += 1 if char == "(" else -1
            if depth < 0:
                raise InvalidOptionError(f"{name} {value!r} closes a parenthesis it did not open")
        if char in separators and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise InvalidOptionError(f"{name} {value!r} leaves a parenthesis open")
    return [*items, "".join(current)]


def listed(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` for a message, with how many there are in all when some are left out
    ("a, b, ... (12 in all)"); "none" for no names."""
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def nonblank_text(value: Any, name: str) -> str:
    """A string with something in it: an empty ``--out ''`` or ``model=""`` would otherwise read as "not given"
    and fall back to the default, or as the current folder."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidOptionError(f"{name} must be a non-empty string, got {value!r}")
    return value


def refuse_per_input_defaults(given: Iterable[str], fields: Sequence[str], example: str) -> None:
    """Refuse, among the keywords ``given`` to a pipeline's constructor, those of ``fields``: what goes with each
    input (a question, a caption, an image's boxes) is given at the call (``example``), not as a default of the
    pipeline. A clear refusal, instead of a generic "unexpected argument" (or a keyword taken and then refused
    at every call)."""
    misplaced = [name for name in given if name in fields]
    if misplaced:
        names = ", ".join(f"{name}=" for name in misplaced)
        verb = "goes" if len(misplaced) == 1 else "go"
        raise InvalidOptionError(
            f"{names} {verb} with the inputs, at each call ({example}); the constructor takes settings only"
        )


def _environment_text(variable: str) -> str | None:
    text = os.environ.get(variable, "").strip()
    return text or None  # unset or blank: the default


def env_whole_number(variable: str, default: int) -> int:
    """The positive whole number the environment variable ``variable`` holds (``1000000``, ``1e6``, ``1_000_000``),
    read when it is used (a bad value fails the read that needs it, not the import), or ``default`` where it is
    unset or blank; anything else (``100M``, ``-1``, ``0``) is an :class:`InvalidOptionError` naming it."""
    text = _environment_text(variable)
    if text is None:
        return default
    value: Any = text
    with contextlib.suppress(ValueError, OverflowError):
        value = int(text)
    if isinstance(value, str):
        with contextlib.suppress(ValueError, OverflowError):
            value = float(text)
    return whole_number(value, f"the environment variable {variable}", integral_floats=True, error=InvalidOptionError)


def env_seconds(variable: str, default: float) -> float:
    """The positive number of seconds the environment variable ``variable`` holds, read when it is used, or
    ``default`` where it is unset or blank; anything else is an :class:`InvalidOptionError` naming it."""
    text = _environment_text(variable)
    if text is None:
        return default
    value: Any = text
    with contextlib.suppress(ValueError):
        value = float(text)
    return real_number(value, f"the environment variable {variable}", above=0, why="seconds", error=InvalidOptionError)


def generator_seed(value: Any, name: str = "seed", *, spare: int = 0) -> int:
    """A seed torch's generators take: an integer in [0, 2**64 - ``spare``) (``spare``: how many seeds above
    it the caller draws from too, as seed + 1), or an :class:`InvalidOptionError` naming ``name``. A bool or a
    float is refused, as is a negative seed (``random.Random`` would take -n as n)."""
    if not is_integer(value) or not 0 <= value < 2**64 - spare:
        upper = f"2**64 - {spare}" if spare else "2**64"
        raise InvalidOptionError(f"{name} must be an integer in [0, {upper}), got {value!r}")
    return int(value)


def refuse_meta(x: Any, name: str, *, error: type[Exception] = InvalidInputError) -> None:
    """Refuse a meta tensor (``device="meta"``: a shape and a dtype, no values) as ``error`` naming ``name``:
    reading it would be torch's bare ``NotImplementedError: Cannot copy out of meta tensor``. Anything else
    (a tensor with data, an array, a list) passes."""
    if getattr(x, "is_meta", False) is True:
        raise error(
            f"{name} is a meta tensor: it holds no data (only a shape); load real weights or materialize it "
            "(e.g. .to_empty(device=...) and fill it) before passing it"
        )


#: torch dtypes with no numpy counterpart, by name (torch is not imported here), and the one each is widened to
#: (exactly): bfloat16 and the float8 kinds to float32, complex32 to complex64.
_NO_NUMPY_DTYPE = ("bfloat16", "float8", "complex32")


def to_numpy(x: Any, name: str = "the input", *, error: type[Exception] = InvalidInputError) -> np.ndarray:
    """``x`` as a numpy array. A torch tensor (any object with ``detach``) is detached, made dense and brought to
    the CPU, and a dtype numpy has none for (bfloat16, float8, complex32) is widened exactly (to float32 or
    complex64): ``.numpy()`` would raise a bare TypeError. A lazily conjugated or negated view (``x.conj()`` of a
    complex tensor, ``torch._neg_view``) gives the values it stands for, and a quantized tensor its dequantized
    (float32) values, ``scale * (q - zero_point)``: torch's ``.numpy()`` refuses all three. A meta tensor, which
    holds no data, is ``error`` naming ``name`` (:func:`refuse_meta`). The metrics, the feature readers, the
    image loader and the WSI pipeline read tensors through this."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        refuse_meta(x, name, error=error)
        x = x.detach()
        if str(getattr(x, "layout", "torch.strided")) != "torch.strided":
            x = x.to_dense()
        if getattr(x, "is_quantized", False):
            x = x.dequantize()
        if hasattr(x, "resolve_conj"):  # no-ops unless the bit is set
            x = x.resolve_conj().resolve_neg()
        dtype = str(x.dtype).removeprefix("torch.")
        if dtype.startswith(_NO_NUMPY_DTYPE):
            x = x.cfloat() if x.is_complex() else x.float()
        x = x.cpu().numpy()
    return np.asarray(x)
