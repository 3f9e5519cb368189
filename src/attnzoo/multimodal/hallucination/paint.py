"""PAINT, "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
Vision-Language Model" (arXiv 2501.12206; official code hasanar1f/PAINT, the ``modPAI`` fork of PAI).

Dual-stream token sets from the vision tower, per image: *local* tokens (top 25% of patches by CLS
attention at the first ViT layer) and *summary* tokens (IQR outliers of CLS attention at the
penultimate layer, the one LLaVA reads), local minus summary (the selection is
:func:`~attnzoo.multimodal.hallucination.functional.paint.paint_token_sets`). Then PAI's edit with
two strengths: on the pre-softmax logits of the last query row in layers [2, L), a[local] +=
alpha |a[local]| and a[summary] += beta |a[summary]| (official alpha 0.7, beta 0.3), all heads.

The CLS rows are read with forward pre-hooks on the CLIP attention modules (the CLS query against
every key, recomputed from the layer's own projections), so the vision tower may run with any
attention implementation. The method needs a CLIP tower whose patches map one to one onto the
image tokens: LLaVA-1.5; other families raise :class:`~.layouts.LayoutError`.

Code vs paper: the released code has no head-specific modulation (the paper's "learned margins");
neither mode offers it. The official code hard-wires 576 patches and reads only the first image of a
batch; here every image gets its own sets from its own patches. ``behaviour`` only concerns the CFG
coupling, as for PAI (``cfg_processor``; the PAINT CHAIR script's gamma is 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch

from attnzoo.errors import InvalidOptionError

from .base import StreamState, check_number
from .layouts import LayoutError
from .pai import ImageAttentionAmplifier

#: The official defaults (CLI) and the CFG strength of its CHAIR script.
DEFAULTS: dict[str, Any] = {
    "alpha": 0.7,
    "beta": 0.3,
    "start_layer": 2,
    "local_ratio": 0.25,
    "summary_layer": -2,
    "gamma": 2.0,
}


def _token_sets(cls_first: torch.Tensor, cls_summary: torch.Tensor, local_ratio: float, num_patches: int):
    from .functional.paint import paint_token_sets

    return paint_token_sets(cls_first, cls_summary, local_ratio, num_patches=num_patches)


class PAINT(ImageAttentionAmplifier):
    """PAINT: local tokens amplified by ``alpha``, summary tokens by ``beta`` (last row, layers
    [start_layer, end_layer)). ``token_sets=(local, summary)`` (patch indices) fixes the sets for every
    image instead of reading the vision tower (for text-only models fed image features).

    ``alpha`` and ``beta`` are finite and >= 0 (PAINT raises the two sets' attention), ``local_ratio``
    (the share of patches taken as local tokens) is in (0, 1], and ``summary_layer`` must index the
    vision tower (checked against its depth when the method attaches)."""

    method = "paint"

    def __init__(
        self,
        alpha: float = DEFAULTS["alpha"],
        beta: float = DEFAULTS["beta"],
        *,
        start_layer: int = DEFAULTS["start_layer"],
        end_layer: int | None = None,
        local_ratio: float = DEFAULTS["local_ratio"],
        summary_layer: int = DEFAULTS["summary_layer"],
        token_sets: tuple[Sequence[int] | torch.Tensor, Sequence[int] | torch.Tensor] | None = None,
        behaviour: str = "official",
    ):
        super().__init__(start_layer=start_layer, end_layer=end_layer, behaviour=behaviour)
        self.alpha = check_number("PAINT", "alpha", alpha, at_least=0.0)
        self.beta = check_number("PAINT", "beta", beta, at_least=0.0)
        self.local_ratio = check_number("PAINT", "local_ratio", local_ratio, above=0.0, at_most=1.0)
        integral = isinstance(summary_layer, Integral) or (
            isinstance(summary_layer, float) and float(summary_layer).is_integer()
        )
        if isinstance(summary_layer, bool) or not integral:
            raise InvalidOptionError(f"PAINT's summary_layer must be a vision-tower layer index, got {summary_layer!r}")
        self.summary_layer = int(summary_layer)
        self.token_sets = (
            None if token_sets is None else tuple(torch.as_tensor(s, dtype=torch.long) for s in token_sets)
        )
        self._attentions: dict[int, torch.nn.Module] = {}
        #: The (local, summary) patch indices of every image of the last prompt, in vision-batch order.
        self.last_token_sets: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _settings(self):
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "start_layer": self.start_layer,
            "end_layer": self.end_layer or self._end or None,
            "local_ratio": self.local_ratio,
            "summary_layer": self.summary_layer,
            "fixed_token_sets": self.token_sets is not None,
        }

    def cfg_processor(self, inputs, gamma: float = DEFAULTS["gamma"], **kwargs):
        """PAI's CFG processor with PAINT's CHAIR-script strength (gamma 2)."""
        return super().cfg_processor(inputs, gamma, **kwargs)

    def _check_model(self, session) -> None:
        super()._check_model(session)
        if self.token_sets is None:
            family = session.family
            self._attentions = {
                0: family.vision_attention(0, "PAINT"),
                1: family.vision_attention(self.summary_layer, "PAINT", "summary_layer"),
            }
            for module in self._attentions.values():
                if not all(hasattr(module, a) for a in ("q_proj", "k_proj", "head_dim")):
                    raise LayoutError(f"PAINT reads CLIP-style attention (q_proj, k_proj); got {type(module).__name__}")

    def _install(self, session) -> None:
        if self.token_sets is not None:
            return
        modules: dict[int, tuple[torch.nn.Module, list[int]]] = {}
        for which, module in self._attentions.items():
            modules.setdefault(id(module), (module, []))[1].append(which)
        for module, indices in modules.values():
            self._hook(module, self._cls_reader(indices))

    def _cls_reader(self, which: list[int]):
        def hook(module, args, kwargs):
            session = self._session
            if session is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            n, t, _ = hidden.shape
            query = module.q_proj(hidden[:, :1]).view(n, 1, -1, module.head_dim).transpose(1, 2)
            key = module.k_proj(hidden).view(n, t, -1, module.head_dim).transpose(1, 2)
            scale = getattr(module, "scale", module.head_dim**-0.5)
            rows = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scale, dim=-1, dtype=torch.float32)
            slot = self._slot(session.state())
            for index in which:
                slot.setdefault("cls", {})[index] = rows[:, :, 0]

        return hook

    def _token_strengths(self, state: StreamState) -> torch.Tensor:
        tokens = state.image_tokens
        strengths = torch.zeros(tokens.mask.shape, dtype=torch.float32, device=tokens.mask.device)
        if not tokens.runs:
            return strengths
        tokens.require_grid(self.method)
        slot = self._slot(state)
        cls = slot.pop("cls", None)
        if self.token_sets is None and (cls is None or cls[0].shape[0] != tokens.num_images):
            seen = "no image" if cls is None else f"{cls[0].shape[0]} image(s)"
            raise LayoutError(
                f"PAINT saw {seen} in the vision tower but {tokens.num_images} image(s) in the prompt's tokens"
            )
        self.last_token_sets = []
        for run in tokens.runs:  # beam search: a prompt's rows share its image's sets
            positions = run.grid_positions
            if self.token_sets is not None:
                local, summary = self.token_sets
            else:
                local, summary = _token_sets(cls[0][run.image], cls[1][run.image], self.local_ratio, len(positions))
            if any(s.numel() and int(s.max()) >= len(positions) for s in (local, summary)):
                raise InvalidOptionError(f"PAINT token sets index past the image's {len(positions)} patches")
            self.last_token_sets.append((local, summary))
            strengths[run.sample, positions[local].to(strengths.device)] = self.alpha
            strengths[run.sample, positions[summary].to(strengths.device)] = self.beta
        return strengths


__all__ = ["DEFAULTS", "PAINT"]
