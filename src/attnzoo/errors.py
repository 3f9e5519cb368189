"""The typed exceptions every layer of attnzoo raises.

Each one also derives from the builtin a caller would naturally catch (``ValueError``,
``LookupError``, ``RuntimeError``), so code written against plain Python keeps working.
Messages say what was wrong and what to do about it; the CLI prints them as one line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AttnzooError(Exception):
    """Base class of every error attnzoo raises on purpose."""


class InvalidInputError(AttnzooError, ValueError):
    """An input (image, tensor, argument) cannot be used as given."""


class InvalidOptionError(InvalidInputError):
    """A setting (keyword argument or command-line option) has a value that cannot be used; the CLI
    exits with 2, as for any usage error."""


class DatasetFormatError(AttnzooError, ValueError):
    """A dataset on disk does not have the published layout (missing or malformed file)."""


class WeightsError(AttnzooError, RuntimeError):
    """A checkpoint cannot be found, fetched, trusted or loaded into the model."""


class ChecksumError(WeightsError):
    """A downloaded or local file does not have the sha256 its entry promises."""


class OfflineError(WeightsError):
    """A file that is not cached was asked for while the network cannot be used (offline mode, or its host unreachable)."""


class BackendUnavailableError(AttnzooError, RuntimeError):
    """An attention backend was forced but cannot run here (device, dtype, shape, missing package)."""


class MissingDependencyError(AttnzooError, ImportError):
    """An optional package a feature needs is not installed; the message says which extra installs it."""


class UnknownNameError(AttnzooError, LookupError):
    """A model, task or checkpoint name is not registered."""

    def __init__(
        self,
        kind: str,
        name: str,
        known: Iterable[str],
        *,
        choices: Iterable[str] | None = None,
        ignore_case: bool = False,
        unmatched: str = "",
    ):
        """``known``: the names a close match is looked for in (aliases included); ``choices``: the names to list
        in full when there are few enough to read (the tasks), else None (thousands of models); ``ignore_case``:
        a name in another case counts as close too (``BIFORMER_TINY.x`` suggests ``biformer_tiny.x``);
        ``unmatched``: what the message adds after the name where no close name is found."""
        self.kind, self.name = kind, name
        self.suggestions = close_names(name, known, ignore_case=ignore_case)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        listed = f" The {kind}s: {', '.join(choices)}." if choices is not None else ""
        super().__init__(f"unknown {kind} {name!r}{'' if self.suggestions else unmatched}.{hint}{listed}")

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return self.args[0]


def close_names(name: str, known: Iterable[str], *, ignore_case: bool = False, limit: int = 5) -> list[str]:
    """The ``known`` names closest to ``name`` (difflib, cutoff 0.5), best first; with ``ignore_case`` those
    that are close in any case come first (each as it is spelled in ``known``)."""
    known = list(dict.fromkeys(known))
    close = difflib.get_close_matches(name, known, n=limit, cutoff=0.5)
    if ignore_case:
        folded: dict[str, str] = {}
        for item in known:
            folded.setdefault(item.casefold(), item)
        caseless = difflib.get_close_matches(name.casefold(), list(folded), n=limit, cutoff=0.5)
        close = list(dict.fromkeys([*(folded[n] for n in caseless), *close]))[:limit]
    return close


__all__ = [
    "AttnzooError",
    "InvalidInputError",
    "InvalidOptionError",
    "DatasetFormatError",
    "WeightsError",
    "ChecksumError",
    "OfflineError",
    "BackendUnavailableError",
    "MissingDependencyError",
    "UnknownNameError",
]
