"""The one shape every hallucination-mitigation method takes in the pipeline, so that
``pipeline("hallucination-mitigation", method=...)`` treats VAR, PAI, PAINT, VCD, AGLA and CARVE
(and their combinations) alike instead of branching per method.

A method may do up to three things around one ``generate`` call on a batch of prompts (the
pipeline runs every method's ``prepare`` before any method's ``logits_processors``):

1. :meth:`MitigationMethod.prepare`: a pre-pass that changes the prompts (CARVE's probes and
   masked image); the default keeps them.
2. :meth:`MitigationMethod.interventions`: attention edits and hooks attached for the duration of
   ``generate`` (VAR, PAI, PAINT).
3. :meth:`MitigationMethod.logits_processors`: contrast branches built for this batch (PAI's CFG,
   VCD, AGLA), passed to ``generate(logits_processor=...)``.

A contrast method may instead run its branch as more rows of the same ``generate``
(:meth:`MitigationMethod.paired_contrast`, VCD's and AGLA's ``batched`` mode): the pipeline asks for
it first, and only calls ``logits_processors`` of a method that returns None. At most one method of a
call pairs (one contrast method per call).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image
from torch import nn
from transformers import LogitsProcessor

from .base import Intervention, PairedContrast
from .kv_cache import select_rows
from .transformers_compat import cache_keyword

#: One prompt's image(s): CARVE's official final pass asks about [original, refined] together.
PromptImages = Image.Image | Sequence[Image.Image]
#: encode(images, questions) -> the model inputs (processor output, on the model's device/dtype,
#: left-padded, one image placeholder per image of each prompt).
Encoder = Callable[[Sequence[PromptImages], Sequence[str]], dict[str, Any]]


@dataclass(frozen=True)
class CachedPrefix:
    """The prompts of a batch with their first columns already in a KV cache (CARVE's final pass
    starts with the image its probes encoded): ``inputs`` hold the whole prompts in the cache's
    column layout and only the images after the cached prefix; ``generate`` continues from a copy of
    ``cache`` and computes the same answer as on the whole prompts."""

    inputs: Mapping[str, Any]
    cache: Any = field(repr=False)
    #: The cache row each prompt starts from (None: row i for prompt i).
    rows: Sequence[int] | None = None

    def generate_inputs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate`` (a fresh copy of the cache each call: generate extends it), for
        one sequence per prompt: ``generate`` repeats the prompts for beams or ``num_return_sequences`` but
        not a cache passed in, so generate those on the whole prompts (``inputs``), as the pipeline does."""
        if self.rows is None:
            return {**self.inputs, cache_keyword(): copy.deepcopy(self.cache)}
        # The rows copied once, into room for the rest of the prompts (the prefill then writes in place).
        rest = int(self.inputs["input_ids"].shape[1]) - self.cache.get_seq_length()
        return {**self.inputs, cache_keyword(): select_rows(self.cache, self.rows, room_for=max(rest, 0))}


@dataclass(frozen=True)
class PromptBatch:
    """One batch of prompts as the pipeline built them: the decoded images, the questions, the
    model inputs, and the encoder that made them (for methods that re-encode an edited image)."""

    images: list[PromptImages]
    questions: list[str]
    inputs: Mapping[str, Any]
    encode: Encoder = field(repr=False)
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The same prompts with a prefix already computed (None: none is); ``inputs`` stay the reference.
    cached: CachedPrefix | None = None

    def with_images(self, images: Sequence[PromptImages]) -> PromptBatch:
        """The same questions over other images, re-encoded."""
        images = list(images)
        return replace(self, images=images, inputs=self.encode(images, self.questions), cached=None)

    def generate_inputs(self) -> dict[str, Any]:
        """What ``generate`` runs on: the cached prefix's inputs when there is one, else ``inputs``."""
        return self.cached.generate_inputs() if self.cached is not None else dict(self.inputs)


class MitigationMethod:
    """Base of every method the pipeline runs; subclasses override what they use."""

    #: the registry name ("var", "vcd", ...).
    name: str = "method"

    @property
    def images_per_answered_prompt(self) -> int:
        """How many images each prompt the answer is generated on holds after :meth:`prepare` (1: the one
        given; CARVE's official behaviour: 2), known before it runs."""
        return 1

    def interventions(self) -> list[Intervention]:
        """Interventions to attach to the model while ``generate`` runs (may be empty)."""
        return []

    def check_model(self, model: nn.Module) -> None:
        """Raise what running on ``model`` would raise from its settings alone (sink dimensions it has none
        of, layers it lacks), before any prompt is answered: a comparison of methods checks every method
        before the first one runs. The default: every intervention attached and detached again."""
        for intervention in self.interventions():
            intervention.attach(model).detach()

    def prepare(self, model: nn.Module, processor: Any, batch: PromptBatch) -> PromptBatch:
        """A pre-pass that may replace the prompts before ``generate`` (default: none)."""
        return batch

    def prepared_inputs(self, model: nn.Module, batch: PromptBatch) -> Mapping[str, Any] | None:
        """Model inputs as long as the prompts :meth:`prepare` will return, where that length is known before
        the pre-pass runs (the pipeline refuses an answer that would not fit the context before it), or
        None where it is not (default: a method without a pre-pass keeps the prompts, checked already)."""
        return None

    def logits_processors(self, model: nn.Module, processor: Any, batch: PromptBatch) -> list[LogitsProcessor]:
        """Logits processors for ``generate`` on this batch (may be empty)."""
        return []

    def paired_contrast(self, model: nn.Module, processor: Any, batch: PromptBatch) -> PairedContrast | None:
        """The contrast branch as extra rows of the main ``generate`` (one batched forward per token),
        or None (default) to run :meth:`logits_processors` instead."""
        return None

    def describe(self) -> dict[str, Any]:
        """The method and its settings as they ran (recorded with every answer)."""
        return {"method": self.name}

    def __repr__(self) -> str:
        """``VCD(alpha=1.0, ...)``; a class that wraps several methods names which: ``InterventionMethod(method='var', ...)``."""
        described = self.describe()
        named = type(self).__name__.lower() == str(described.get("method", "")).lower()
        settings = ", ".join(f"{k}={v!r}" for k, v in described.items() if k != "method" or not named)
        return f"{type(self).__name__}({settings})"


__all__ = ["CachedPrefix", "Encoder", "MitigationMethod", "PromptBatch", "PromptImages"]
