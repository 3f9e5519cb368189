"""In-Context Brush's attention edit (and Diptych Prompting's) as attention processors for diffusers'
``FluxTransformer2DModel`` (diffusers >= 0.35 layout: q/k/v ``[B, S, H, D]``, joint order ``[text | image]``).

Xu, Zhou, Guo, Zhang, Yin, Chen, Dong, Qi, Sheng. "In-Context Brush: Zero-shot Customized Subject Insertion
with Context-Aware Latent Space Manipulation" (arXiv 2505.20271; SIGGRAPH Asia 2025). Official code:
https://github.com/ICTMCG/In-context-Brush (a modified ``FluxAttnProcessor2_0`` in a forked diffusers).

With ``A = softmax(q k^T / sqrt(d))`` over the joint sequence:

* **intra-head latent feature shifting** (double-stream blocks): the rows of the query (target) image get
  ``+ shift_img * A[q, demo] V[demo] + shift_txt * A[q, text] V[text]``, i.e. their unrenormalised
  probabilities on the demo (subject) image and the text are multiplied by ``1 + shift`` (0.3 each);
* **inter-head attention reweighting** (every block): ``s_h = sum over query rows x text keys of A_h``,
  ``w_h = 1 + head_gain * (s_h - min_h s) / (max_h s - min_h s + eps)`` (0.2), and head ``h``'s whole output
  (text rows too, as the official code does) is multiplied by ``w_h`` before the output projection.

Diptych Prompting's reference-attention enhancement (Shin, Choi, Kim, Yoon, CVPR 2025;
https://github.com/chaehunshin/DiptychPrompting) is the same edit with other settings
(:meth:`InsertionAttention.diptych`): the query panel's probabilities on the reference panel are
multiplied by ``lambda = 1.3`` in every block, no text term, no head gain.

The edit runs through :func:`attnzoo.kernels.boosted_attention`, which never holds the ``S x S``
probabilities of all heads. Optional windows (ours, for ablations): the blocks the edit runs in (forward
order: double blocks first, then single blocks) and the denoising steps (``InsertionState`` is advanced by
``callback_on_step_end``; processors cannot see the timestep otherwise).

``behaviour="official"`` slices the tokens as the official op: a literal text length of 512 and the two
halves of what is left, whatever the real text length and panel layout; ``"corrected"`` (default) reads
the text length from the inputs and the panels from the :class:`~attnzoo.multimodal.insertion.layout.PanelLayout`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from attnzoo.errors import InvalidInputError
from attnzoo.kernels import boosted_attention
from attnzoo.multimodal.insertion.layout import PanelLayout, TokenSets, check_behaviour, official_token_sets

__all__ = [
    "InContextAttnProcessor",
    "InsertionAttention",
    "InsertionState",
    "check_blocks",
    "check_flux_transformer",
    "check_step_window",
    "head_weights",
    "install_processors",
    "insertion_processors",
    "window_bounds",
    "window_steps",
]

SHIFT_BLOCKS = ("double", "all")


@dataclass(frozen=True)
class InsertionAttention:
    """Settings of the attention edit; the defaults are the official In-Context Brush code's."""

    shift_img: float = 0.3
    """Extra weight of the query image's probabilities on the demo (subject) image tokens."""
    shift_txt: float = 0.3
    """Extra weight of the query image's probabilities on the text tokens."""
    head_gain: float = 0.2
    """Heads are weighted by ``1 + head_gain * minmax(text mass)``; 0 turns the reweighting off."""
    shift_blocks: str = "double"
    """Where the shift applies: ``"double"`` (double-stream blocks, In-Context Brush) or ``"all"`` (Diptych)."""
    blocks: tuple[int, ...] | None = None
    """Blocks (forward order: double blocks 0..18, then single blocks 19..56 in FLUX) the edit runs in; None: all."""
    steps: tuple[float, float] | None = None
    """Denoising steps ``[start, stop)`` the edit runs in: two ints are step indices, two floats in [0, 1]
    fractions of the run's steps (:func:`check_step_window`); None: all (the official code edits every step)."""
    behaviour: str = "corrected"
    method: str = "in-context-brush"

    def __post_init__(self) -> None:
        for name in ("shift_img", "shift_txt", "head_gain"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value != value
                or abs(value) == float("inf")
            ):
                raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
        if self.shift_blocks not in SHIFT_BLOCKS:
            raise InvalidInputError(f"shift_blocks must be 'double' or 'all', got {self.shift_blocks!r}")
        check_behaviour(self.behaviour)
        if self.blocks is not None:
            blocks = tuple(self.blocks)
            if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
                raise InvalidInputError(f"blocks must be non-negative block indices, got {self.blocks!r}")
            object.__setattr__(self, "blocks", blocks)
        if self.steps is not None:
            object.__setattr__(self, "steps", check_step_window(self.steps, "steps"))

    @classmethod
    def in_context_brush(cls, **settings: Any) -> InsertionAttention:
        return cls(**settings)

    @classmethod
    def diptych(cls, enforce: float = 1.3, **settings: Any) -> InsertionAttention:
        """Diptych Prompting's reference attention enhancement: ``lambda = enforce`` in every block."""
        base = dict(shift_img=float(enforce) - 1.0, shift_txt=0.0, head_gain=0.0, shift_blocks="all", method="diptych")
        return cls(**{**base, **settings})

    @classmethod
    def none(cls, **settings: Any) -> InsertionAttention:
        """No edit (plain FLUX Fill): what the method reduces to at shift 0 and gain 0."""
        return cls(**{**dict(shift_img=0.0, shift_txt=0.0, head_gain=0.0, method="none"), **settings})

    @property
    def is_identity(self) -> bool:
        return self.shift_img == 0 and self.shift_txt == 0 and self.head_gain == 0

    def with_behaviour(self, behaviour: str) -> InsertionAttention:
        return replace(self, behaviour=behaviour)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["blocks"] = list(self.blocks) if self.blocks is not None else None
        out["steps"] = list(self.steps) if self.steps is not None else None
        return out


@dataclass
class InsertionState:
    """What the processors of one transformer share: the panel layout of the current run, the denoising
    step (advanced by :meth:`callback_on_step_end`), the text length the double blocks saw (single blocks
    get ``[text | image]`` concatenated and cannot tell), and optional records of the head weights."""

    layout: PanelLayout | None = None
    step: int = 0
    num_steps: int | None = None
    text_len: int | None = None
    record: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    _sets: dict[tuple, TokenSets] = field(default_factory=dict, repr=False)

    def reset(self, num_steps: int | None = None, layout: PanelLayout | None = None) -> InsertionState:
        """Before a run: step 0 of ``num_steps``, the run's layout, no records."""
        self.step, self.num_steps, self.text_len = 0, num_steps, None
        if layout is not None:
            self.layout = layout
        self.records.clear()
        self._sets.clear()
        return self

    def callback_on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict:
        """diffusers' ``callback_on_step_end``: the next transformer call is step ``step + 1``."""
        self.step = int(step) + 1
        return {}

    def in_steps(self, window: tuple[float, float] | None) -> bool:
        """Whether the current step is in ``window`` (read by :func:`window_bounds`, as :func:`window_steps`)."""
        if window is None:
            return True
        start, stop = window_bounds(window, self.num_steps)
        return start <= self.step < stop

    def token_sets(self, length: int, text_len: int, slicing: str, device: torch.device) -> TokenSets:
        """``slicing``: ``"official"`` (In-Context Brush's literal slicing) or ``"layout"``."""
        key = (length, text_len, slicing, device)
        if key not in self._sets:
            self._sets[key] = self._make_sets(length, text_len, slicing, device)
        return self._sets[key]

    def _make_sets(self, length: int, text_len: int, slicing: str, device: torch.device) -> TokenSets:
        if slicing == "official":
            return official_token_sets(length, device)
        image_tokens = length - text_len
        if self.layout is None:  # no layout: a vertical diptych, the two halves of the image tokens
            half = image_tokens // 2
            return TokenSets(slice(0, text_len), slice(text_len, text_len + half), slice(text_len + half, length))
        if self.layout.image_tokens != image_tokens:
            raise InvalidInputError(
                f"the panel layout has {self.layout.image_tokens} image tokens ({self.layout.canvas_size[1]}x"
                f"{self.layout.canvas_size[0]} px) but the transformer got {image_tokens}: set the run's layout"
            )
        return self.layout.token_sets(text_len, device)


STEP_WINDOW_FORMS = (
    "two step indices (ints, e.g. (0, 25) or '0,25') or two fractions of the run's steps in [0, 1] "
    "(floats, e.g. (0.0, 0.5) or '0,0.5')"
)


def check_step_window(window: Any, name: str = "step_window") -> tuple[float, float]:
    """A step window ``(start, stop)``, checked: two ints (step indices, ``0 <= start < stop``) or two
    fractions in [0, 1] (``start < stop``; an int end of 0 or 1 beside a float reads as that fraction, so
    ``(0, 0.5)`` is ``(0.0, 0.5)``). A float outside [0, 1], an int index beside a float, or an empty window
    would edit no step (or all of them) unseen: :class:`InvalidInputError`."""
    try:
        start, stop = window
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be (start, stop): {STEP_WINDOW_FORMS}; got {window!r}") from None
    ends: list[float] = []
    for end in (start, stop):
        if isinstance(end, bool) or not isinstance(end, numbers.Real) or not math.isfinite(end):
            raise InvalidInputError(
                f"{name} must be two finite numbers: a window is {STEP_WINDOW_FORMS}; got {window!r}"
            )
        ends.append(int(end) if isinstance(end, numbers.Integral) else float(end))
    if any(isinstance(e, float) for e in ends) and not all(0 <= e <= 1 for e in ends):
        mixed = any(isinstance(e, int) for e in ends if not 0 <= e <= 1)
        problem = "mixes a step index with a fraction" if mixed else "has a fraction outside [0, 1]"
        raise InvalidInputError(f"{name} {tuple(window)} {problem}: a window is {STEP_WINDOW_FORMS}")
    if any(isinstance(e, float) for e in ends):
        ends = [float(e) for e in ends]
    if ends[0] < 0:
        raise InvalidInputError(f"{name} must start at 0 or later, got {tuple(window)}")
    if ends[1] <= ends[0]:
        raise InvalidInputError(
            f"{name} {tuple(window)} is empty: it must be (start, stop) with start < stop (stop is excluded), "
            "else the edit runs in no step"
        )
    return ends[0], ends[1]


def window_bounds(window: Any, num_steps: int | None) -> tuple[float, float]:
    """A step window ``(start, stop)`` in steps: the one rule :meth:`InsertionState.in_steps` (which edits
    ``start <= step < stop``) and :func:`window_steps` (which refuses a window of no step) read windows by.
    Indices are steps; fractions are of ``num_steps``, which they need."""
    start, stop = check_step_window(window)
    if isinstance(start, float):
        if num_steps is None:
            raise InvalidInputError("a fractional step window needs the run's step count: state.reset(num_steps)")
        start, stop = start * num_steps, stop * num_steps
    return start, stop


def window_steps(window: tuple[float, float] | None, num_steps: int) -> list[int]:
    """The steps of a ``num_steps`` run that a step window edits (as :meth:`InsertionState.in_steps` reads it)."""
    if window is None:
        return list(range(num_steps))
    start, stop = window_bounds(window, num_steps)
    return [step for step in range(num_steps) if start <= step < stop]


def head_weights(scores: torch.Tensor, gain: float, eps: float) -> torch.Tensor:
    """``1 + gain * (s - min_h s) / (max_h s - min_h s + eps)`` over the heads (last dim) of ``scores``."""
    low = scores.min(dim=-1, keepdim=True).values
    high = scores.max(dim=-1, keepdim=True).values
    return 1.0 + gain * (scores - low) / (high - low + eps)


class InContextAttnProcessor:
    """One FLUX attention (double- or single-stream) with the edit; stock attention outside its windows."""

    def __init__(self, settings: InsertionAttention, state: InsertionState, index: int, name: str):
        self.settings, self.state, self.index, self.name = settings, state, index, name

    def active(self) -> bool:
        s = self.settings
        return not s.is_identity and (s.blocks is None or self.index in s.blocks) and self.state.in_steps(s.steps)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        if attention_mask is not None:
            raise InvalidInputError("the insertion attention processors take no attention mask (FLUX Fill passes none)")
        double = encoder_hidden_states is not None
        q, k, v = _projections(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if double:
            self.state.text_len = encoder_hidden_states.shape[1]  # type: ignore[union-attr]
        out = self.attention(q, k, v, double)
        out = out.flatten(2, 3).to(q.dtype)
        if not double:
            return out
        text_len = encoder_hidden_states.shape[1]  # type: ignore[union-attr]
        text_out, image_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, double: bool) -> torch.Tensor:
        """``[B, S, H, D]`` post-RoPE q/k/v -> the edited attention output ``[B, S, H, D]``."""
        s = self.settings
        if not self.active():
            return boosted_attention(q, k, v).out
        length = q.shape[1]
        slicing = "official" if self.official_slicing else "layout"
        text_len = length if self.official_slicing else self._text_len(length, double)
        sets = self.state.token_sets(length, text_len, slicing, q.device)
        boosts = []
        if double or s.shift_blocks == "all":
            boosts = [(sets.query, sets.demo, s.shift_img), (sets.query, sets.text, s.shift_txt)]
        mass = (sets.query, sets.text) if s.head_gain else None
        found = boosted_attention(q, k, v, boosts, mass=mass)
        if found.mass is None:
            return found.out
        weights = head_weights(found.mass, s.head_gain, torch.finfo(q.dtype).eps)
        if self.state.record:
            self.state.records.append(
                {"block": self.name, "step": self.state.step, "head_scores": found.mass, "head_weights": weights}
            )
        return found.out * weights[:, None, :, None].to(found.out.dtype)

    @property
    def official_slicing(self) -> bool:
        """In-Context Brush's official op slices a literal 512 text tokens and two halves; Diptych's official
        op derives its panels from the canvas geometry, which is what the layout gives."""
        return self.settings.behaviour == "official" and self.settings.method == "in-context-brush"

    def _text_len(self, length: int, double: bool) -> int:
        if double:
            return int(self.state.text_len)  # type: ignore[arg-type]
        layout = self.state.layout
        if layout is not None:
            return length - layout.image_tokens
        if self.state.text_len is None:
            raise InvalidInputError(
                "a single-stream block cannot tell the text length: run the whole transformer, or set the layout"
            )
        return self.state.text_len


def _projections(
    attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, image_rotary_emb: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FLUX's q/k/v as diffusers' stock processor makes them: per-head RMS norms, ``[text; image]``, RoPE."""
    from diffusers.models.embeddings import apply_rotary_emb

    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            eq, ek, ev = (
                attn.add_q_proj(encoder_hidden_states),
                attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states),
            )
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    return q, k, v


# -- installing ------------------------------------------------------------------------------------


def check_flux_transformer(transformer: Any) -> None:
    """A FLUX-shaped transformer: double- and single-stream blocks whose attention has FLUX's projections."""
    double = getattr(transformer, "transformer_blocks", None)
    single = getattr(transformer, "single_transformer_blocks", None)
    if not hasattr(transformer, "set_attn_processor") or double is None or single is None:
        raise InvalidInputError(
            f"{type(transformer).__name__} is not a FLUX transformer (diffusers' FluxTransformer2DModel: double- "
            "and single-stream blocks)"
        )
    for block in [*double, *single]:
        attn = getattr(block, "attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "head_dim")):
            raise InvalidInputError(
                f"{type(transformer).__name__}: block {type(block).__name__} has no FLUX attention (to_q/k/v, "
                "norm_q/k, head_dim)"
            )
    for block in double:
        if getattr(block.attn, "added_kv_proj_dim", None) is None:
            raise InvalidInputError(f"{type(transformer).__name__}: a double-stream block has no text projections")


def check_blocks(transformer: Any, settings: InsertionAttention) -> None:
    """The edit's blocks exist in ``transformer``: an index past its last block would turn the edit off unseen."""
    if settings.blocks is None:
        return
    count = len(block_names(transformer))
    missing = sorted({b for b in settings.blocks if b >= count})
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise InvalidInputError(
            f"blocks {shown} do not exist: {type(transformer).__name__} has {count} attention blocks, 0-{count - 1} "
            "(forward order: double-stream blocks, then single-stream blocks)"
        )


def install_processors(
    transformer: Any, settings: InsertionAttention, state: InsertionState | None = None
) -> InsertionState:
    """Put an :class:`InContextAttnProcessor` on every attention of ``transformer``; returns their shared state."""
    check_flux_transformer(transformer)
    check_blocks(transformer, settings)
    state = state if state is not None else InsertionState()
    processors: dict[str, Any] = {}
    names = list(transformer.attn_processors)
    double = [n for n in names if n.startswith("transformer_blocks.")]
    single = [n for n in names if n.startswith("single_transformer_blocks.")]
    if len(double) + len(single) != len(names):
        raise InvalidInputError(f"{type(transformer).__name__} has attention outside FLUX's blocks: {names}")
    for index, name in enumerate(double + single):
        processors[name] = InContextAttnProcessor(settings, state, index, name.removesuffix(".attn.processor"))
    transformer.set_attn_processor(dict(processors))  # diffusers pops entries from the dict it is given
    return state


@contextlib.contextmanager
def insertion_processors(
    transformer: Any, settings: InsertionAttention, state: InsertionState | None = None
) -> Iterator[InsertionState]:
    """The edit installed for the duration of a ``with`` block; the transformer's own processors come back after."""
    check_flux_transformer(transformer)
    saved = dict(transformer.attn_processors)
    try:
        yield install_processors(transformer, settings, state)
    finally:
        transformer.set_attn_processor(saved)


def block_names(transformer: Any) -> Sequence[str]:
    """The attention blocks in forward order (the indices of :attr:`InsertionAttention.blocks`)."""
    names = [n.removesuffix(".attn.processor") for n in transformer.attn_processors]
    return [n for n in names if n.startswith("transformer_blocks.")] + [
        n for n in names if n.startswith("single_transformer_blocks.")
    ]
