"""The intervention layer: training-free methods attach to a loaded transformers LVLM and detach
cleanly, without touching ``generate``.

Three kinds of edit, one mechanism each:

- **Attention-time edits** (:class:`AttentionEdit`: VAR, PAI, PAINT) run inside a custom
  attention function registered with transformers' ``AttentionInterface``, together with the
  matching ``AttentionMaskInterface`` entry (``eager_mask``): a custom name without one gets
  ``attention_mask=None`` at prefill and silently loses causal masking. Only the language model
  switches to it, through the dict form of ``set_attn_implementation`` (the plain string would
  also hit the vision tower, which crashes on LLaVA). The function computes eager attention where
  the method edits, so a model loaded with SDPA or flash attention works as well. The forwards it
  does not edit run the model's own SDPA on the model's own mask (bitwise the stock model) when
  the model was loaded with SDPA, and the same eager path, unchanged, otherwise or when the
  weights are asked for (``output_attentions``, :func:`eager_language_model`).
- **Hooks** (forward pre-hooks) where a method reads hidden states (VAR's sink detection) or the
  vision tower (PAINT's CLS attention).
- **Logits-time methods** (:class:`ContrastBranchProcessor`: PAI's CFG, VCD, AGLA) are
  ``LogitsProcessor`` s that run their own contrast branch of the same model with their own KV
  cache; pass them to ``generate(logits_processor=...)``. Greedy, sampling and ``num_beams=1``
  work; beam search (which reorders sequences under the branch's cache) raises.

Every forward runs in a *stream*: the main generation, or a contrast branch. Interventions keep
per-stream state (the image tokens of the prompt, VAR's sinks), so a branch's prefill never
overwrites what the main generation found. Several interventions compose on one model (one
attention edit plus any processors); two attention edits on the same model raise
:class:`InterventionConflictError`. After the last one detaches, the model is the stock model bit
for bit: same attention implementations, no hooks, same outputs.
"""

from __future__ import annotations

import itertools
import math
import operator
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.masking_utils import eager_mask

from attnzoo.errors import AttnzooError, InvalidOptionError

from .layouts import Family, FixedImageSpan, ImageTokens, LayoutError, resolve_family
from .transformers_compat import cache_keyword, output_cache


class InterventionError(AttnzooError, RuntimeError):
    """An intervention cannot run as asked (not attached, a generation mode it does not support)."""


class InterventionConflictError(InterventionError, InvalidOptionError):
    """Two interventions that cannot share a model (two attention edits, the same one twice): a usage
    error, so the CLI exits with 2 as for any bad option."""


BEHAVIOURS = ("official", "paper")
MAIN_STREAM = "main"
_STREAM: ContextVar[tuple[str, bool]] = ContextVar("attnzoo_lvlm_stream", default=(MAIN_STREAM, True))


def current_stream() -> str:
    """The name of the stream the forwards now run in (``MAIN_STREAM`` outside any branch)."""
    return _STREAM.get()[0]


@contextmanager
def branch_stream(name: str, *, edits: bool = True) -> Iterator[None]:
    """Run the forwards inside as stream ``name``; ``edits=False`` switches attention edits off there."""
    token = _STREAM.set((name, edits))
    try:
        yield
    finally:
        _STREAM.reset(token)


def check_behaviour(behaviour: str) -> str:
    if behaviour not in BEHAVIOURS:
        raise InvalidOptionError(f"behaviour must be one of {BEHAVIOURS}, got {behaviour!r}")
    return behaviour


def check_number(
    method: str,
    name: str,
    value: Any,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
) -> float:
    """``value`` as a finite float within the given bounds (the methods' strengths and thresholds: a nan
    or inf would silently turn every answer into padding or the method into a no-op). A value that is
    no number raises float's own TypeError / ValueError, which the pipeline names as a wrong type; a flag
    (``True``, numpy's or torch's bool) is no number either: refused here, naming the setting (it read as 1)."""
    if _is_flag(value):
        raise InvalidOptionError(f"{method}'s {name} must be a number, not a flag: got {value!r}")
    number = float(value)
    given = ((">=", operator.ge, at_least), (">", operator.gt, above), ("<=", operator.le, at_most))
    limits = [(sign, holds, bound) for sign, holds, bound in given if bound is not None]
    if not (math.isfinite(number) and all(holds(number, bound) for _, holds, bound in limits)):
        stated = "".join(f" and {sign} {bound}" for sign, _, bound in limits)
        raise InvalidOptionError(f"{method}'s {name} must be finite{stated}, got {value!r}")
    return number


def _is_flag(value: Any) -> bool:
    """A bool of Python, numpy or torch (a one-element bool tensor), which ``float`` would take as 0 or 1."""
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, (bool, np.bool_))


def check_cutoff(method: str, alpha: float, beta: float) -> tuple[float, float]:
    """alpha finite and >= 0 and beta in [0, 1], as floats (VCD and AGLA share them)."""
    return (
        check_number(method, "alpha", alpha, at_least=0.0),
        check_number(method, "plausibility cutoff beta", beta, at_least=0.0, at_most=1.0),
    )


def check_batched(method: str, batched: bool) -> bool:
    if not isinstance(batched, bool):
        raise InvalidOptionError(f"{method}'s batched must be True or False, got {batched!r}")
    return batched


@dataclass
class StreamState:
    """What one stream knows about its current prompt; ``slots`` hold each intervention's own state."""

    name: str = MAIN_STREAM
    prefill: bool = False
    step: int = 0
    image_tokens: ImageTokens | None = None
    prompts: int = 0
    pending_ids: torch.Tensor | None = None
    pending_images: dict | None = None
    slots: dict[int, Any] = field(default_factory=dict)


# -- attention -------------------------------------------------------------------------------


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * groups, S, D] (grouped-query attention)."""
    if groups == 1:
        return states
    b, h, s, d = states.shape
    return states[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    edit: AttentionEdit | None = None,
    state: StreamState | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (same ops, same order: bitwise its output without an edit),
    with the edit's pre-softmax (logits) and post-softmax (weights) hooks."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        weights = weights + attention_mask
    layer = module.layer_idx
    if edit is not None:
        weights = edit._pre_softmax(layer, weights, state)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    if edit is not None:
        weights = edit._post_softmax(layer, weights, state)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


# -- the per-model session -------------------------------------------------------------------

#: The attribute under which a model holds its session while interventions are attached (removed at
#: the last detach); a model dropped without detaching is collected with its session.
_SESSION_ATTRIBUTE = "_attnzoo_interventions"
_LIVE_SESSIONS: weakref.WeakSet[_Session] = weakref.WeakSet()
_names = itertools.count()


def session_of(model: nn.Module) -> _Session | None:
    return model.__dict__.get(_SESSION_ATTRIBUTE)


def _drop_stream(name: str) -> None:
    for session in list(_LIVE_SESSIONS):
        session.streams.pop(name, None)
        for intervention in session.interventions:
            intervention._drop_stream(name)


class _Session:
    """Everything shared by the interventions attached to one model: its family, the hooks that
    find each prompt's image tokens, the per-stream state and the attention function."""

    def __init__(self, model: nn.Module, layout: FixedImageSpan | None):
        self.model = model
        self.layout = layout
        self.family: Family = resolve_family(model, allow_plain=layout is not None)
        self.text_model = self.family.text_model()
        self.layers = self.text_model.layers
        self.interventions: list[Intervention] = []
        self.streams: dict[str, StreamState] = {}
        self.attention_edit: AttentionEdit | None = None
        self._attn_name: str | None = None
        self._attn_snapshot: list[tuple[Any, Any]] = []
        #: the model's own attention function and mask function (SDPA's) that forwards no edit touches run
        #: on, and the stock masks of the last forwards by their eager mask (see :meth:`_masks`)
        self._stock: tuple[Any, Any] | None = None
        self._stock_masks: list[tuple[torch.Tensor, Any]] = []
        #: > 0 while someone reads every layer's weights (eager_language_model): no forward runs SDPA then
        self.weights_wanted = 0
        #: whether the running forward was asked for its attentions (older transformers tell only the model)
        self._forward_wants_weights = False
        self._handles = [
            self.text_model.register_forward_pre_hook(self._on_text_forward, with_kwargs=True),
            # A forward's masks may be built before it starts (generate's static cache builds them in
            # prepare_inputs_for_generation): they are dropped when it ends, not when it starts.
            self.text_model.register_forward_hook(self._after_text_forward, always_call=True),
            self.text_model.get_input_embeddings().register_forward_pre_hook(self._on_embed, with_kwargs=True),
        ]
        info_module = self.family.image_info_module()
        if info_module is not None:
            self._handles.append(info_module.register_forward_pre_hook(self._on_images, with_kwargs=True))

    @classmethod
    def of(cls, model: nn.Module, layout: FixedImageSpan | None) -> _Session:
        session = session_of(model)
        if session is None:
            session = cls(model, layout)
            model.__dict__[_SESSION_ATTRIBUTE] = session
            _LIVE_SESSIONS.add(session)
        elif layout is not None and layout != session.layout:
            raise InterventionConflictError(
                f"the model already has interventions attached with image layout {session.layout}; got {layout}"
            )
        return session

    def state(self) -> StreamState:
        name = _STREAM.get()[0]
        state = self.streams.get(name)
        if state is None:
            state = self.streams[name] = StreamState(name=name)
        return state

    # hooks shared by every intervention
    def _on_embed(self, module, args, kwargs):
        state = self.state()
        ids = state.pending_ids = args[0] if args else kwargs.get("input")
        if self.layout is None and ids.ndim == 2 and ids.shape[1] > 1:
            # Check a prompt's image tokens before the model's own check (an untyped ValueError) runs.
            if state.pending_images is not None or not self.family.counts_need_image_info:
                self.family.image_tokens(ids, state.pending_images)

    def _on_images(self, module, args, kwargs):
        info = self.family.read_image_info(args, kwargs)
        if info is not None:
            self.state().pending_images = info

    def _on_text_forward(self, module, args, kwargs):
        config = getattr(module, "config", None)
        self._forward_wants_weights = bool(
            kwargs.get("output_attentions") or getattr(config, "output_attentions", False)
        )
        state = self.state()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = 0 if cache is None else cache.get_seq_length()
        state.prefill = cached == 0
        if cached and _STREAM.get()[1]:
            lead = kwargs.get("input_ids", args[0] if args else None)
            lead = kwargs.get("inputs_embeds") if lead is None else lead
            if lead is not None and lead.shape[1] > 1:
                names = "+".join(i.method for i in self.interventions)
                raise InterventionError(
                    f"{names}: a forward of {lead.shape[1]} tokens continues a cache of {cached} (a cached prompt "
                    "prefix, chunked prefill or assisted decoding); the interventions read the whole prompt in one "
                    "forward, so pass the whole prompt to generate, without a KV cache"
                )
        state.step = 0 if state.prefill else state.step + 1
        if state.prefill:
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            shape = tuple(ids.shape[:2]) if ids is not None else tuple(embeds.shape[:2])
            pending = state.pending_ids
            if (
                ids is None
                and pending is not None
                and pending.shape[1] == shape[1]
                and shape[0] % pending.shape[0] == 0
            ):
                # the embedded prompt; beam search (InstructBLIP's generate) repeats each row after embedding it
                ids = pending.repeat_interleave(shape[0] // pending.shape[0], dim=0)
            state.image_tokens = self._image_tokens(ids, shape, state.pending_images)
            state.prompts += 1
            for intervention in self.interventions:
                intervention._on_prefill(state)
            state.pending_images = None
        state.pending_ids = None

    def _after_text_forward(self, module, args, output):
        self._stock_masks, self._forward_wants_weights = [], False

    def _image_tokens(self, ids, shape, image_info) -> ImageTokens:
        if self.layout is not None:
            return self.layout.image_tokens(*shape, device=ids.device if ids is not None else None)
        if ids is None:
            raise LayoutError(
                f"{self.family.name}: the interventions find the image tokens from input_ids; this forward got "
                "inputs_embeds only (pass input_ids, or attach with a FixedImageSpan)"
            )
        return self.family.image_tokens(ids, image_info)

    # membership
    def add(self, intervention: Intervention) -> None:
        if intervention in self.interventions:
            raise InterventionConflictError(f"{intervention.method} is already attached to this model")
        if isinstance(intervention, AttentionEdit):
            if self.attention_edit is not None:
                raise InterventionConflictError(
                    f"{intervention.method} and {self.attention_edit.method} both edit the language model's attention "
                    "function; attach one of them (an attention edit composes with logits processors such as VCD, "
                    "AGLA or PAI's CFG, not with another attention edit)"
                )
            self._install_attention()
            self.attention_edit = intervention
        self.interventions.append(intervention)

    def remove(self, intervention: Intervention) -> None:
        self.interventions.remove(intervention)
        for state in self.streams.values():
            state.slots.pop(id(intervention), None)
        if intervention is self.attention_edit:
            self.attention_edit = None
            self._uninstall_attention()
        self.close_if_unused()

    def close_if_unused(self) -> None:
        if not self.interventions:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self.model.__dict__.pop(_SESSION_ATTRIBUTE, None)
            _LIVE_SESSIONS.discard(self)

    # the attention function
    def _install_attention(self) -> None:
        from transformers import AttentionInterface, AttentionMaskInterface

        name = f"attnzoo_intervention_{next(_names)}"
        stock = self.family.text_config()._attn_implementation
        # A forward that no edit touches runs the model's own SDPA on its own mask: bitwise the stock model,
        # and on the CPU ~40% cheaper a decode layer than eager. Other implementations (flash attention's
        # masks are 2-D) run the eager path throughout.
        functions, masks = AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping
        self._stock = (functions["sdpa"], masks["sdpa"]) if stock == "sdpa" else None
        AttentionInterface.register(name, self._attention)
        AttentionMaskInterface.register(name, eager_mask if self._stock is None else self._masks)
        self._attn_name = name
        self._attn_snapshot = [(c, c._attn_implementation_internal) for c in _all_configs(self.model)]
        key = self.family.text_config_key
        try:
            self.model.set_attn_implementation({key: name} if key else name)
        except Exception:
            self._uninstall_attention()
            raise

    def _uninstall_attention(self) -> None:
        """Restore every config's implementation as it was (no re-dispatch: bit for bit the stock state)."""
        for config, implementation in self._attn_snapshot:
            config._attn_implementation_internal = implementation
        if self._attn_name is not None:
            self._unregister(self._attn_name)
        self._attn_name, self._attn_snapshot = None, []
        self._stock, self._stock_masks = None, []

    @staticmethod
    def _unregister(name: str) -> None:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)

    def _masks(self, *args, **kwargs):
        """The mask function: the eager (additive) mask the edited forwards need, with the stock SDPA mask
        of the same call kept for the forwards no edit touches (a forward may build several: full and
        sliding-window layers)."""
        mask = eager_mask(*args, **kwargs)
        if isinstance(mask, torch.Tensor) and self._stock is not None:
            self._stock_masks = [*self._stock_masks[-3:], (mask, self._stock[1](*args, **kwargs))]
        return mask

    def _stock_mask(self, mask: torch.Tensor | None) -> tuple[bool, Any]:
        for eager, stock in reversed(self._stock_masks):
            if eager is mask:
                return True, stock
        return False, None

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        edit = self.attention_edit
        state = None
        if edit is not None and _STREAM.get()[1]:
            state = self.state()
            if not edit._applies(module.layer_idx, state):
                edit = None
        else:
            edit = None
        weights_wanted = self.weights_wanted or self._forward_wants_weights or kwargs.get("output_attentions")
        if edit is None and self._stock is not None and not weights_wanted:
            found, stock_mask = self._stock_mask(attention_mask)
            if found:
                return self._stock[0](module, query, key, value, stock_mask, scaling=scaling, dropout=dropout, **kwargs)
        if edit is not None and not weights_wanted and not (dropout and module.training):
            fused = edit._fused(module.layer_idx, query, key, value, attention_mask, scaling, state)
            if fused is not None:
                return fused, None
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout, edit, state)


def _all_configs(model: nn.Module) -> list:
    """Every config object of the model and its sub-models, nested sub-configs included."""
    seen: dict[int, Any] = {}
    queue = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation_internal")]
    while queue:
        config = queue.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}):
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                queue.append(sub)
    return list(seen.values())


# -- interventions ---------------------------------------------------------------------------


class Intervention:
    """Base of every attachable method. ``with method.attach(model): ...`` or attach/detach."""

    method: ClassVar[str] = "intervention"

    def __init__(self, behaviour: str = "official"):
        self.behaviour = check_behaviour(behaviour)
        self._session: _Session | None = None
        self._handles: list = []

    # public API
    def attach(self, model: nn.Module, *, layout: FixedImageSpan | None = None) -> Intervention:
        """Attach to a loaded transformers LVLM (``layout`` only for models without an image layout
        of their own, e.g. a plain causal LM fed ``inputs_embeds``)."""
        if self._session is not None:
            raise InterventionConflictError(f"{self.method} is already attached; detach it first")
        session = _Session.of(model, layout)
        try:
            self._check_model(session)
            session.add(self)
        except Exception:
            session.close_if_unused()
            raise
        self._session = session
        try:
            self._install(session)
        except Exception:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook and restore the model's attention implementation (idempotent)."""
        session, self._session = self._session, None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if session is not None:
            session.remove(self)

    @property
    def attached(self) -> bool:
        return self._session is not None

    def __enter__(self) -> Intervention:
        if self._session is None:
            raise InterventionError(f"call {self.method}.attach(model) before entering its context")
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def describe(self) -> dict[str, Any]:
        """What ran: the method, its behaviour and every setting (recorded with each result)."""
        return {"method": self.method, "behaviour": self.behaviour, **self._settings()}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "method")
        return f"{type(self).__name__}({settings})"

    # for subclasses
    def _settings(self) -> dict[str, Any]:
        return {}

    def _check_model(self, session: _Session) -> None:
        """Raise before anything is installed when the model cannot run this method."""

    def _install(self, session: _Session) -> None:
        """Register the method's own hooks with :meth:`_hook`."""

    def _hook(self, module: nn.Module, fn) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def _on_prefill(self, state: StreamState) -> None:
        """A new prompt starts in ``state``'s stream (its ``image_tokens`` are set)."""

    def _slot(self, state: StreamState) -> Any:
        slot = state.slots.get(id(self))
        if slot is None:
            slot = state.slots[id(self)] = self._new_slot()
        return slot

    def _new_slot(self) -> Any:
        return {}

    def _drop_stream(self, name: str) -> None:
        """A stream ended (its contrast processor was collected): forget any state kept for it."""

    def _session_or_raise(self) -> _Session:
        if self._session is None:
            raise InterventionError(f"{self.method} is not attached to a model")
        return self._session


class AttentionEdit(Intervention):
    """An intervention that edits the language model's attention logits or weights."""

    def _applies(self, layer: int, state: StreamState) -> bool:
        """Whether this forward of ``layer`` in ``state``'s stream is edited at all."""
        return False

    def _pre_softmax(self, layer: int, scores: torch.Tensor, state: StreamState) -> torch.Tensor:
        return scores

    def _post_softmax(self, layer: int, weights: torch.Tensor, state: StreamState) -> torch.Tensor:
        return weights

    def _fused(self, layer: int, query, key, value, mask, scaling, state: StreamState) -> torch.Tensor | None:
        """The attention output [B, Q, H, D] of this edited forward from a fused kernel, or None for the
        eager path (no weights are returned then)."""
        return None


@contextmanager
def attached(model: nn.Module, *interventions: Intervention, layout: FixedImageSpan | None = None):
    """Attach several interventions for the duration of a block; detached in reverse order."""
    done: list[Intervention] = []
    try:
        for intervention in interventions:
            intervention.attach(model, layout=layout)
            done.append(intervention)
        yield interventions
    finally:
        for intervention in reversed(done):
            intervention.detach()


class GrowingColumns:
    """Per-key-position values of a prompt [..., S] kept in a buffer that grows with the decoded
    length, so each decode step takes a view instead of padding a new tensor."""

    def __init__(self, values: torch.Tensor, fill: float, dim: int = -1):
        self.fill, self.dim = fill, dim % values.ndim
        self._buffer = values
        self._length = values.shape[self.dim]

    def view(self, length: int) -> torch.Tensor:
        if length > self._buffer.shape[self.dim]:
            shape = list(self._buffer.shape)
            shape[self.dim] = max(length, 2 * shape[self.dim]) - shape[self.dim]
            pad = self._buffer.new_full(shape, self.fill)
            self._buffer = torch.cat([self._buffer, pad], dim=self.dim)
        return self._buffer.narrow(self.dim, 0, length)


# -- logits processors with a contrast branch ------------------------------------------------


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's unmasked tokens (0 where masked), as ``generate`` derives
    position ids from the attention mask: padding anywhere in a row shifts nothing after it."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


_branches = itertools.count()


@contextmanager
def eager_language_model(model: nn.Module, family: Family) -> Iterator[None]:
    """The language model on eager attention (weights returned) while inside; every config's
    implementation restored afterwards. An attached attention edit's function returns them too (its
    unedited forwards then run eager instead of the model's SDPA)."""
    session = session_of(model)
    if session is not None and session.attention_edit is not None:
        session.weights_wanted += 1
        try:
            yield
        finally:
            session.weights_wanted -= 1
        return
    if family.text_config()._attn_implementation == "eager":
        yield
        return
    with _text_attention(model, family, "eager"):
        yield


@contextmanager
def _text_attention(model: nn.Module, family: Family, implementation: str) -> Iterator[None]:
    """The language model on attention ``implementation`` while inside; every config's implementation
    (the vision tower's, an attached edit's) restored afterwards."""
    snapshot = [(config, config._attn_implementation_internal) for config in _all_configs(model)]
    key = family.text_config_key
    try:
        cast(Any, model).set_attn_implementation({key: implementation} if key else implementation)
        yield
    finally:
        for config, old in snapshot:
            config._attn_implementation_internal = old


_probe_names = itertools.count()


@contextmanager
def language_model_attention(model: nn.Module, family: Family, function: Any, mask: str = "sdpa") -> Iterator[None]:
    """The language model on ``function`` (transformers' attention-function signature) while inside,
    registered under a fresh name with transformers' ``mask`` builder; every config's implementation
    restored and the name unregistered afterwards (an attached edit's function included)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = f"attnzoo_probe_{next(_probe_names)}"
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask])
    try:
        with _text_attention(model, family, name):
            yield
    finally:
        _Session._unregister(name)


def family_for(model: nn.Module) -> Family:
    """The model's family (its session's, when interventions are attached); a plain causal LM gets
    the plain family."""
    session = session_of(model)
    return session.family if session is not None else resolve_family(model, allow_plain=True)


class ContrastBranchProcessor(LogitsProcessor):
    """A ``LogitsProcessor`` that runs a second, contrast branch of the same model next to
    ``generate``'s own and combines the two next-token logits (:meth:`combine`).

    ``branch_inputs`` are the model inputs of the branch's prompt (e.g. the text-only prompt of
    PAI's CFG, the noised image of VCD): the first call runs them as a prefill with the branch's
    own KV cache, every later call feeds the token ``generate`` just chose. The branch runs in its
    own stream, so attached interventions keep separate state for it; ``edit_branch=False``
    switches attention edits off inside the branch. The processor belongs to one batch of
    prompts; a new prompt (any call that does not extend the last one by one token) restarts the
    branch. ``generate`` appends custom processors after its own (e.g. ``min_new_tokens``); it
    builds temperature/top-k/top-p warpers from its arguments and the model's ``generation_config``,
    so to apply them after the contrast rule, pass them after this processor and neutralise generate's
    own (:func:`processors_then_warpers`).
    """

    method: ClassVar[str] = "contrast branch"
    edit_branch: ClassVar[bool] = True

    def __init__(self, model: nn.Module, branch_inputs: Mapping[str, Any] | None):
        self.model = model
        self.family = family_for(model)
        self.branch_inputs = {k: v for k, v in (branch_inputs or {}).items() if v is not None}
        self.stream = f"branch-{next(_branches)}"
        weakref.finalize(self, _drop_stream, self.stream)  # interventions forget the branch's state
        self.reset()

    def reset(self) -> None:
        """Forget the branch (its cache and position); the next call starts it again."""
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._next_position: torch.Tensor | None = None
        self._last_ids: torch.Tensor | None = None
        self._model_state: list | None = None
        self.branch_calls = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.combine(input_ids, scores, self.branch_logits(input_ids))

    def describe(self) -> dict[str, Any]:
        """What ran (recorded with each result); subclasses add their settings."""
        return {"method": self.method}

    def pairing_refusal(self) -> str | None:
        """Why the branch cannot run as rows of the main forward (:class:`PairedContrast`), or None."""
        if not self.edit_branch:
            return "its branch runs without attention edits, which rows of the main forward cannot switch off"
        return None

    def combine(self, input_ids: torch.Tensor, scores: torch.Tensor, branch_logits: torch.Tensor) -> torch.Tensor:
        """The method's rule on the main scores and the branch's next-token logits [B, V]."""
        raise NotImplementedError

    def branch_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Advance the branch to ``input_ids`` and return its next-token logits [B, V]."""
        last = self._last_ids
        continuing = (
            last is not None and input_ids.shape[0] == last.shape[0] and input_ids.shape[1] == last.shape[1] + 1
        )
        if continuing and not torch.equal(input_ids[:, :-1], last):
            raise InterventionError(
                f"{self.method}: the sequences were reordered between steps (beam search); the contrast branch "
                "keeps one cache per sequence and supports greedy decoding, sampling and num_beams=1"
            )
        with branch_stream(self.stream, edits=self.edit_branch), self._own_model_state():
            logits = self._step(input_ids[:, -1:]) if continuing else self._prefill(input_ids.shape[0])
        self._last_ids = input_ids
        self.branch_calls += 1
        return logits

    def _prefill(self, batch: int) -> torch.Tensor:
        self.reset()
        inputs = dict(self.branch_inputs)
        if "input_ids" not in inputs and "inputs_embeds" not in inputs:
            raise InvalidOptionError(f"{self.method}: the contrast branch needs input_ids (or inputs_embeds)")
        lead = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if lead.shape[0] != batch:
            raise InterventionError(
                f"{self.method}: the contrast branch holds {lead.shape[0]} prompt(s) but generate runs {batch} "
                "sequence(s); num_return_sequences > 1 and num_beams > 1 are not supported"
            )
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(lead.shape[:2], dtype=torch.long, device=lead.device)
        inputs["attention_mask"] = mask
        text_positions = mask_positions(mask)
        if "position_ids" not in inputs:
            positions = self.family.prefill_positions(inputs, text_positions)
            if positions is not None:
                inputs["position_ids"] = positions
        output = self.family.prefill(inputs, use_cache=True, logits_to_keep=1, **self._new_cache())
        self._mask = mask
        self._next_position = text_positions[:, -1:] + 1
        return self._keep(output)

    def _new_cache(self) -> dict[str, Any]:
        """The cache keyword for the branch's prefill (none: the model builds its own)."""
        return {}

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=-1)
        positions = self.family.step_positions(self._next_position)
        self._next_position = self._next_position + 1
        return self._keep(
            self.family.generation_module()(
                input_ids=token,
                attention_mask=self._mask,
                position_ids=positions,
                use_cache=True,
                **{cache_keyword(): self._cache},
            )
        )

    def _keep(self, output) -> torch.Tensor:
        self._cache = output_cache(output)
        return output.logits[:, -1, :]

    @contextmanager
    def _own_model_state(self) -> Iterator[None]:
        """Swap in the branch's copy of the state a model keeps between forwards (Qwen2-VL's RoPE deltas)."""
        attributes = self.family.stateful_attributes()
        saved = [getattr(module, name) for module, name in attributes]
        own = self._model_state or [None] * len(attributes)
        for (module, name), value in zip(attributes, own, strict=True):
            setattr(module, name, value)
        try:
            yield
        finally:
            self._model_state = [getattr(module, name) for module, name in attributes]
            for (module, name), value in zip(attributes, saved, strict=True):
                setattr(module, name, value)


#: The prompt's per-token inputs: the two halves of a paired batch are left-padded to one length.
_SEQUENCE_PADDING = {"attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}


class PairedContrast(LogitsProcessor):
    """A contrast branch run as B more rows of the main ``generate`` ("batched" mode of VCD and AGLA):
    every decoding step is then one batched forward over the prompts and their branch prompts,
    with one KV cache holding both halves, instead of a second forward per token.

    ``rule`` is the method's :class:`ContrastBranchProcessor`: its ``branch_inputs`` are the branch
    rows (never run as a branch of their own here) and its :meth:`~ContrastBranchProcessor.combine`
    the rule. Run it as ``generate(**paired.inputs(main), logits_processor=[paired])`` inside
    ``with paired.attached():``, then keep the first B rows. Each step, the rule combines the main
    rows' scores with the branch rows' raw logits (read off the forward, as the separate branch's
    own forward gives them: ``generate``'s own processors such as ``min_new_tokens`` do not touch
    them), the processors of :meth:`followed_by` (e.g. PAI's CFG, the warpers, a sampler) run on the
    main rows, and the result goes to both halves, so greedy selection gives each branch row its
    prompt's token and the two halves stop together. Draw sampled tokens in a processor of
    ``followed_by`` (``generate``'s own sampling would draw the halves apart, which raises).

    Attention edits attached to the model see the branch rows in the main stream with the per-row
    state of their own prompt, as the separate branch (``edit_branch=True``) gives them.
    """

    def __init__(self, rule: ContrastBranchProcessor):
        refusal = rule.pairing_refusal()
        if refusal is not None:
            raise InvalidOptionError(f"{rule.method} cannot run as rows of the main forward: {refusal}")
        lead = rule.branch_inputs.get("input_ids")
        if lead is None:
            raise InvalidOptionError(f"{rule.method}: a paired contrast branch needs input_ids")
        self.rule = rule
        self.rows = int(lead.shape[0])
        self.then = LogitsProcessorList()
        self._raw: torch.Tensor | None = None
        self._calls = 0

    def describe(self) -> dict[str, Any]:
        return {**self.rule.describe(), "batched": True}

    def followed_by(self, *processors: LogitsProcessor) -> PairedContrast:
        """Run ``processors`` after the rule, on the main rows (returns self)."""
        self.then = LogitsProcessorList(processors)
        return self

    def inputs(self, main: Mapping[str, Any], pad_token_id: int = 0) -> dict[str, Any]:
        """The 2B-row model inputs: ``main`` (left-padded prompts) and the branch prompts along the
        batch. A prompt of one half shorter than the other's is left-padded further (masked, so its
        outputs do not change beyond batching noise); Qwen2-VL's flattened patches and grids follow
        each other; image tiles of different counts (LLaVA-NeXT) are zero-padded as its processor does."""
        branch = self.rule.branch_inputs
        main = {k: v for k, v in main.items() if v is not None}
        if set(main) != set(branch):
            raise InvalidOptionError(
                f"{self.rule.method}: the main and branch prompts have different inputs ({sorted(main)} and "
                f"{sorted(branch)})"
            )
        width = max(main["input_ids"].shape[1], branch["input_ids"].shape[1])
        out: dict[str, Any] = {}
        for key, value in main.items():
            other = branch.get(key)
            if not isinstance(value, torch.Tensor):
                if other is not None and other != value:
                    raise InvalidOptionError(f"{self.rule.method}: the branch prompts' {key} differs from the main's")
                out[key] = value
            elif key == "input_ids" or key in _SEQUENCE_PADDING:
                fill = pad_token_id if key == "input_ids" else _SEQUENCE_PADDING[key]
                out[key] = torch.cat([_left_padded(value, width, fill), _left_padded(other, width, fill)])
            else:
                out[key] = _stacked(value, other.to(value.device), key, self.rule.method)
        return out

    def main_rows(self, paired: Mapping[str, Any], main: Mapping[str, Any]) -> dict[str, Any]:
        """``main`` with its per-token inputs as they ran in the paired batch (padded to its length)."""
        rows = {k: paired[k][: self.rows] for k in ("input_ids", *_SEQUENCE_PADDING) if k in paired}
        return {**main, **rows}

    @contextmanager
    def attached(self) -> Iterator[PairedContrast]:
        """Read the raw next-token logits of every main-stream forward while inside."""

        def read(module, args, output):
            if current_stream() == MAIN_STREAM:
                self._raw = output.logits[:, -1, :]

        handle = self.rule.family.generation_module().register_forward_hook(read)
        self._raw, self._calls = None, 0
        try:
            yield self
        finally:
            handle.remove()
            self._raw = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        b = self.rows
        if scores.shape[0] != 2 * b:
            raise InterventionError(
                f"{self.rule.method}: the paired batch holds {b} prompt(s) and their branch rows, but generate runs "
                f"{scores.shape[0]} sequence(s); num_return_sequences > 1 and num_beams > 1 are not supported"
            )
        raw, self._raw = self._raw, None
        if raw is None or raw.shape[0] != 2 * b:
            raise InterventionError(f"{self.rule.method}: run generate inside `with paired.attached():`")
        if self._calls and not torch.equal(input_ids[:b, -1], input_ids[b:, -1]):
            raise InterventionError(
                f"{self.rule.method}: the branch rows took other tokens than their prompts (generate sampled them): "
                "draw the tokens in a processor of followed_by(...) and let generate select greedily"
            )
        combined = self.then(input_ids[:b], self.rule.combine(input_ids[:b], scores[:b], raw[b:]))
        self._calls += 1
        self.rule.branch_calls += 1
        return combined.repeat(2, 1)


def _left_padded(values: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    missing = width - values.shape[1]
    if missing == 0:
        return values
    return torch.cat([values.new_full((values.shape[0], missing, *values.shape[2:]), fill), values], dim=1)


def _stacked(first: torch.Tensor, second: torch.Tensor, key: str, method: str) -> torch.Tensor:
    """Two tensors along dim 0; a longer dim 1 (LLaVA-NeXT's image tiles) zero-pads the other."""
    if first.shape[1:] != second.shape[1:]:
        if first.ndim < 3 or first.ndim != second.ndim or first.shape[2:] != second.shape[2:]:
            raise InvalidOptionError(
                f"{method}: the branch prompts' {key} {tuple(second.shape)} cannot join the main's {tuple(first.shape)}"
            )
        tiles = max(first.shape[1], second.shape[1])
        first, second = (
            torch.cat([t, t.new_zeros((t.shape[0], tiles - t.shape[1], *t.shape[2:]))], dim=1) for t in (first, second)
        )
    return torch.cat([first, second])


def processors_then_warpers(
    *processors: LogitsProcessor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0
) -> LogitsProcessorList:
    """Contrast processors first, then the sampling warpers (temperature -> top-k -> top-p), as the
    official VCD/AGLA/PAI loops order them. ``generate`` must build no second set: a checkpoint's
    ``generation_config`` may set its own (Qwen2-VL-Instruct: top_k 1), so call
    ``generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)`` (the pipeline strips the model's)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    chain = list(processors)
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(chain)


def log_tensor(value: float) -> float:
    """log(value) computed in float32, as the official loops do (``torch.log(torch.tensor(v))``)."""
    return float(torch.log(torch.tensor(value)))


__all__ = [
    "BEHAVIOURS",
    "MAIN_STREAM",
    "current_stream",
    "eager_language_model",
    "AttentionEdit",
    "ContrastBranchProcessor",
    "GrowingColumns",
    "Intervention",
    "InterventionConflictError",
    "InterventionError",
    "PairedContrast",
    "StreamState",
    "attached",
    "branch_stream",
    "check_behaviour",
    "eager_attention",
    "family_for",
    "log_tensor",
    "session_of",
    "processors_then_warpers",
    "repeat_kv",
]
