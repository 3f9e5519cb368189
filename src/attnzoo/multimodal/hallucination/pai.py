"""PAI, "Paying More Attention to Image" (Liu et al., ECCV 2024; official code LALBJ/PAI).

Two parts:

- Image-attention amplification: in layers [start_layer, end_layer) (official [2, 32) = all but the
  first two of LLaVA-1.5-7B), on the pre-softmax logits a of the LAST query row (the last prompt
  token at prefill, the new token while decoding), after the causal mask: a[image] += alpha * |a[image]|
  (the |a| raises logits of either sign), then softmax. Same alpha for every head. README / script
  default alpha 0.2.
- Classifier-free guidance on the logits (:class:`PAICFGLogitsProcessor`): with l_c the log-softmax of
  the conditional (image) scores and l_u that of a text-only branch run with its own KV cache and the
  attention edit off, out = gamma * (l_c - l_u) + l_u, then tokens with p_c < 0.1 * max p_c are
  dropped. README gamma 1.1 (the CHAIR script's default is 2); gamma = 1 returns l_c without running
  the branch.

``behaviour="official"``: with a CFG processor, the attention edit stays off until the processor's
first call (the official ``use_cfg`` flag starts True and only the processor resets it), so the
first generated token comes from an unedited pass. ``behaviour="paper"`` edits every pass.

:class:`ImageAttentionAmplifier` is the shared mechanism: PAINT (:mod:`.paint`) amplifies two token
sets with two strengths instead of the whole image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch

from attnzoo.errors import InvalidOptionError

from .base import (
    AttentionEdit,
    ContrastBranchProcessor,
    GrowingColumns,
    StreamState,
    check_number,
    family_for,
    log_tensor,
)

#: The official defaults (README / chair_eval.py).
DEFAULTS: dict[str, Any] = {"alpha": 0.2, "start_layer": 2, "gamma": 1.1, "cutoff": 0.1}


class ImageAttentionAmplifier(AttentionEdit):
    """a[last row, k] += w_k * |a[last row, k]| on the pre-softmax logits of layers
    [start_layer, end_layer); subclasses give the per-token strengths w [B, S] of each prompt."""

    def __init__(self, *, start_layer: int = 2, end_layer: int | None = None, behaviour: str = "official"):
        super().__init__(behaviour)
        self.start_layer, self.end_layer = int(start_layer), end_layer
        self._end = 0
        self._hold = False

    def _check_model(self, session) -> None:
        n = len(session.layers)
        end = n if self.end_layer is None else int(self.end_layer)
        if not 0 <= self.start_layer < end <= n:
            raise InvalidOptionError(
                f"{self.method}: layers [{self.start_layer}, {end}) do not fit a language model of {n} layers"
            )
        self._end = end
        self._hold = False  # a CFG processor of an earlier attachment never holds this one

    def detach(self) -> None:
        self._hold = False
        super().detach()

    def _token_strengths(self, state: StreamState) -> torch.Tensor:
        """[B, S] amplification of each prompt position (0 where nothing changes)."""
        raise NotImplementedError

    def _on_prefill(self, state: StreamState) -> None:
        self._slot(state)["strengths"] = self._token_strengths(state)
        self._slot(state)["columns"] = None

    def _applies(self, layer: int, state: StreamState) -> bool:
        return self.start_layer <= layer < self._end and not self._hold and id(self) in state.slots

    def _pre_softmax(self, layer: int, scores: torch.Tensor, state: StreamState) -> torch.Tensor:
        slot = state.slots[id(self)]
        columns = slot["columns"]
        if columns is None:
            strengths = slot["strengths"].to(device=scores.device, dtype=scores.dtype)[:, None, None]
            columns = slot["columns"] = (GrowingColumns(strengths, 0.0), GrowingColumns(strengths != 0, False))
        k = scores.shape[-1]
        strength, edited = columns[0].view(k), columns[1].view(k)
        last = scores[:, :, -1:, :]
        # where, not a plain add: a -inf logit (a mask overflowing in fp16) times a zero strength is nan
        amplified = torch.where(edited, last.abs() * strength + last, last)
        if scores.shape[-2] == 1:  # decoding: the last row is the only row
            return amplified
        scores[:, :, -1:, :] = amplified
        return scores

    # the official CFG coupling
    def _hold_until_cfg(self) -> None:
        if self.behaviour == "official":
            self._hold = True

    def _release(self) -> None:
        self._hold = False

    def cfg_processor(self, inputs: Mapping[str, Any], gamma: float = DEFAULTS["gamma"], **kwargs):
        """A :class:`PAICFGLogitsProcessor` for the prompt batch ``inputs`` (the full model inputs;
        the processor's branch is their text-only version), coupled to this attached intervention."""
        model = self._session_or_raise().model
        return PAICFGLogitsProcessor(model, text_only_inputs(model, inputs), gamma, intervention=self, **kwargs)


class PAI(ImageAttentionAmplifier):
    """PAI's attention amplification of every image token, ``alpha`` (official 0.2) on the last row.
    ``alpha`` is finite and >= 0: the method raises image attention (0 leaves it as it is)."""

    method = "pai"

    def __init__(
        self,
        alpha: float = DEFAULTS["alpha"],
        *,
        start_layer: int = DEFAULTS["start_layer"],
        end_layer: int | None = None,
        behaviour: str = "official",
    ):
        super().__init__(start_layer=start_layer, end_layer=end_layer, behaviour=behaviour)
        self.alpha = check_number("PAI", "alpha", alpha, at_least=0.0)

    def _settings(self):
        return {"alpha": self.alpha, "start_layer": self.start_layer, "end_layer": self.end_layer or self._end or None}

    def _token_strengths(self, state):
        return state.image_tokens.mask.to(torch.float32) * self.alpha


def text_only_inputs(model, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The text-only version of a prompt batch (image tokens and image markers removed, left-padded
    again): the unconditional branch of PAI's CFG (the official ``neg_prompt`` = BOS + text before +
    text after the image)."""
    return family_for(model).text_only(inputs)


def check_gamma(gamma: float, method: str = "PAI") -> float:
    """The CFG strength: any finite value (1 is no guidance, below 1 leans toward the text-only branch;
    the official processor takes any float), never nan or inf, which would make every score nan."""
    return check_number(method, "CFG strength gamma", gamma)


def check_cfg_cutoff(cutoff: float, method: str = "PAI") -> float:
    """The CFG's plausibility cutoff, a share of the top probability in (0, 1]."""
    return check_number(method, "CFG cutoff", cutoff, above=0.0, at_most=1.0)


class PAICFGLogitsProcessor(ContrastBranchProcessor):
    """PAI's classifier-free guidance: out = gamma (l_c - l_u) + l_u on log-softmax logits, l_u from a
    text-only branch with its own cache (attention edits off in it), tokens with p_c < cutoff * max p_c
    removed. Pass ``intervention`` (PAI or PAINT) to couple it as the official code does."""

    method = "pai-cfg"
    edit_branch = False

    def __init__(
        self,
        model,
        unconditional_inputs: Mapping[str, Any],
        gamma: float = DEFAULTS["gamma"],
        *,
        cutoff: float = DEFAULTS["cutoff"],
        intervention: ImageAttentionAmplifier | None = None,
    ):
        super().__init__(model, unconditional_inputs)
        method = intervention.method.upper() if intervention is not None else "PAI"
        self.gamma, self.cutoff = check_gamma(gamma, method), check_cfg_cutoff(cutoff, method)
        self.intervention = intervention
        if intervention is not None and self.gamma != 1.0:  # gamma 1 never runs the branch: nothing to wait for
            intervention._hold_until_cfg()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gamma": self.gamma, "cutoff": self.cutoff}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.gamma == 1.0:
            return cast(torch.FloatTensor, torch.log_softmax(scores, dim=-1))
        output = super().__call__(input_ids, scores)
        if self.intervention is not None:
            self.intervention._release()
        return output

    def combine(self, input_ids, scores, branch_logits):
        conditional = torch.log_softmax(scores, dim=-1)
        unconditional = torch.log_softmax(branch_logits.to(conditional.dtype), dim=-1)
        floor = log_tensor(self.cutoff) + conditional.max(dim=-1, keepdim=True).values
        guided = self.gamma * (conditional - unconditional) + unconditional
        return guided.masked_fill(conditional < floor, -float("inf"))


__all__ = [
    "DEFAULTS",
    "PAI",
    "ImageAttentionAmplifier",
    "PAICFGLogitsProcessor",
    "check_cfg_cutoff",
    "check_gamma",
    "text_only_inputs",
]
