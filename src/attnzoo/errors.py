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

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name = kind, name
        self.suggestions = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"unknown {kind} {name!r}.{hint}")

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return self.args[0]


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
