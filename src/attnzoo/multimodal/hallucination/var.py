"""VAR, Visual Attention Redistribution ("See What You Are Told: Visual Attention Sink in Large
Multimodal Models", Kang et al., ICLR 2025; official code MICV-yonsei/VisAttnSink).

A few image tokens draw high attention whatever the text asks; they carry massive activations in
the same hidden dimensions as the language model's own sinks (BOS). VAR takes part of the attention
that image-centric heads spend on sinks and gives it to the other image tokens:

1. Sinks, at prefill, on the input x of layers 2..L-1: phi = max over the sink dimensions of
   |x / rms(x)| (no learned weight, eps 1e-6, float32); a token is a sink if phi > tau.
2. Image-centric (head, row) pairs, per layer, on the post-softmax weights A: the image share
   sum_img A >= summ, and the visual non-sink ratio >= rho (the code tests the visual-sink share
   sum_{img sinks} A / sum_img (A + 1e-6) <= 1 - rho).
3. Redistribution on those rows: every sink weight (visual and text, e.g. BOS) keeps (1 - p) of
   itself (the code's p); the p moved goes to the non-sink image tokens in proportion to their
   weights. Rows still sum to 1. A layer with no sink inside the image is not edited.

Parameter names follow the paper: ``rho`` is the minimum visual non-sink ratio and ``p`` the share of
sink attention moved. The official code uses ``rho_code = 1 - rho`` and ``p_code = 1 - p`` (the
maintainer confirmed it, seilk/VisAttnSink#5), so its yml values rho 0.5 / p 0.6 are the paper's
rho 0.5 / p 0.4; :meth:`VAR.from_code_values` takes the code's.

``behaviour="official"`` is what the released code does (it produced the published numbers; the
parity fixture follows it): the LAST layer is edited too (``except_last_layer`` is dead code), and
from the second prompt after attaching, the first prompt's sinks are reused and every prefill row
is edited, not only the rows after the image (its per-run state is never reset; :meth:`VAR.reset`
starts a new run). ``behaviour="paper"``: layers 2..L-2, sinks detected and rows after the image
edited for every prompt. Both edit the new token's row at every decode step with the prefill's
sinks; on a GPU that step runs as one fused kernel (:func:`attnzoo.kernels.redistributed_decode_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.kernels import dispatch
from attnzoo.kernels.redistributed_attention import (
    IMAGE,
    OP,
    SINK,
    redistributed_decode_attention,
    redistribution_keys,
)

from .base import AttentionEdit, GrowingColumns, StreamState, check_number, family_for

#: Sink dimensions of the language backbones, from the official code (``DIM_SINK``).
SINK_DIMS: dict[str, tuple[int, ...]] = {"llama-2-7b": (1415, 2533), "llama-2-13b": (2100, 4743)}
#: Checkpoint name fragments -> backbone (the official ``MODEL_LLM`` table, with the llava-hf names).
CHECKPOINT_BACKBONES: dict[str, str] = {
    "llava-v1.5-7b": "llama-2-7b",
    "llava-1.5-7b": "llama-2-7b",
    "llava-v1.5-13b": "llama-2-13b",
    "llava-1.5-13b": "llama-2-13b",
    "llava-v1.6-vicuna-13b": "llama-2-13b",
}
#: The official yml / LogicEngine values (paper convention for rho and p).
DEFAULTS = {"tau": 20.0, "rho": 0.5, "p": 0.4, "summ": 0.2}
_SHARE_EPS = 1e-6
_RMS_EPS = 1e-6


def sink_dims_for(model) -> tuple[int, ...]:
    """The sink dimensions of a known checkpoint (from its name); others need :func:`find_sink_dims`."""
    name = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")).lower()
    for fragment, backbone in CHECKPOINT_BACKBONES.items():
        if fragment in name:
            return SINK_DIMS[backbone]
    raise InvalidOptionError(
        f"VAR has no sink dimensions for {name or 'this model'} (known: {', '.join(CHECKPOINT_BACKBONES)}); "
        "measure them with find_sink_dims(model, samples) and pass VAR(sink_dims=...)"
    )


def sink_scores(hidden: torch.Tensor, sink_dims: Sequence[int]) -> torch.Tensor:
    """phi [B, S]: max over ``sink_dims`` of |hidden / rms(hidden)|, in float32."""
    x = hidden.to(torch.float32)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _RMS_EPS)
    return normed.abs()[..., list(sink_dims)].amax(dim=-1)


class _Indicators:
    """The per-key tensors of one layer's sinks, kept growing with the decoded length."""

    def __init__(self, image: torch.Tensor, sinks: torch.Tensor, p_code: float, dtype: torch.dtype):
        visual = sinks & image
        non_sink_image = image & ~visual
        moved = sinks.to(dtype) * torch.tensor(1 - p_code, dtype=dtype)
        columns = torch.stack([image.to(dtype), visual.to(dtype), moved, non_sink_image.to(dtype)], dim=-1)
        self.columns = GrowingColumns(columns, 0.0, dim=-2)  # [B, K, 4]
        scale = torch.where(sinks, torch.tensor(p_code, dtype=dtype), torch.tensor(1.0, dtype=dtype))
        self.sink_scale = GrowingColumns(scale.to(image.device)[:, None, None], 1.0)
        self.non_sink_image = GrowingColumns(non_sink_image.to(dtype)[:, None, None], 0.0)
        self.share_eps = (_SHARE_EPS * image.sum(-1).to(dtype))[:, None, None]
        has_visual = visual.any(-1)
        self.any_visual_sink = bool(has_visual.any())
        # None when every row has a visual sink (the usual batch of one): one op less per layer and step.
        self.has_visual_sink = None if bool(has_visual.all()) else has_visual[:, None, None]


def _redistribute(weights: torch.Tensor, ind: _Indicators, rho_code: float, summ: float):
    """(factor, candidates): the per-weight factor of the VAR edit of every row, and which (b, h, q)
    rows are image-centric.

    One matmul with the indicator columns gives each row's image, visual-sink, moved ((1 - p) x sink)
    and non-sink-image sums; the edit keeps p of every sink weight and scales the non-sink image
    tokens by 1 + moved / their sum, which hands them the moved mass in proportion to their weights."""
    b, h, q, k = weights.shape
    # [B, H * Q, K] @ [B, K, 4]: one bmm, without broadcasting the columns over the heads
    sums = torch.bmm(weights.reshape(b, h * q, k), ind.columns.view(k)).view(b, h, q, 4)
    image, visual_sinks, moved, rest = sums.unbind(-1)
    sink_scale, non_sink_image = ind.sink_scale.view(k), ind.non_sink_image.view(k)
    if weights.dtype == torch.float16:  # moved / rest overflows float16 (65504) where rest is tiny
        moved, rest, sink_scale, non_sink_image = (
            moved.float(),
            rest.float(),
            sink_scale.float(),
            non_sink_image.float(),
        )
    gain = moved / rest
    # A finite gain needs rest > 0: a row whose image attention is all on sinks has nowhere to move it (the
    # official code divides 0 by 0), nor has one whose rest is too small for the dtype (subnormal). With
    # moved, rest >= 0 the gain is in [0, inf] or NaN, so `gain < inf` is isfinite in one op instead of four.
    candidates = (visual_sinks / (image + ind.share_eps) <= rho_code) & (image >= summ) & (gain < math.inf)
    if ind.has_visual_sink is not None:
        candidates = candidates & ind.has_visual_sink
    return torch.addcmul(sink_scale, non_sink_image, gain[..., None]), candidates


def _edited(weights: torch.Tensor, factor: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """The weights of the ``selected`` rows times their factor (in the factor's dtype: float32 for
    float16 weights), the rest as they are."""
    scaled = weights * factor if factor.dtype == weights.dtype else (weights.float() * factor).to(weights.dtype)
    return torch.where(selected[..., None], scaled, weights)


def redistribute(
    weights: torch.Tensor,
    image_mask: torch.Tensor,
    sink_mask: torch.Tensor,
    *,
    rho: float = DEFAULTS["rho"],
    p: float = DEFAULTS["p"],
    summ: float = DEFAULTS["summ"],
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on post-softmax weights [B, H, Q, K] (paper's rho and p): (edited weights, selected
    [B, H, Q]). ``image_mask``/``sink_mask`` [B, K] bool; ``rows`` [B, Q] bool limits the rows
    that may be edited."""
    if (
        weights.ndim != 4
        or image_mask.shape != (weights.shape[0], weights.shape[-1])
        or sink_mask.shape != image_mask.shape
    ):
        raise InvalidInputError(
            f"redistribute needs weights [B, H, Q, K] and masks [B, K]; got {tuple(weights.shape)}, "
            f"{tuple(image_mask.shape)}, {tuple(sink_mask.shape)}"
        )
    ind = _Indicators(image_mask.bool(), sink_mask.bool(), 1 - p, weights.dtype)
    factor, selected = _redistribute(weights, ind, 1 - rho, summ)
    if rows is not None:
        selected = selected & rows[:, None]
    return _edited(weights, factor, selected), selected


class VAR(AttentionEdit):
    """Visual Attention Redistribution as an attention edit of a transformers LVLM.

    ``rho``/``p`` are the paper's (min visual non-sink ratio, share of sink attention moved); see the
    module docstring for the code's inverted values and the official-vs-paper behaviours. ``rho``,
    ``p`` and ``summ`` (the minimum image share of a row) are shares, in [0, 1]; ``tau`` (the sink
    threshold on phi >= 0) is any finite number (a negative one makes every token a sink). ``sink_dims``
    default to the backbone's known dims; ``sink_layers`` to layers 2..L-1. With ``trace=True`` every
    edited forward appends a record (sinks, candidate (b, h, q) rows, edited rows) to ``records``.
    """

    method = "var"

    def __init__(
        self,
        *,
        tau: float = DEFAULTS["tau"],
        rho: float = DEFAULTS["rho"],
        p: float = DEFAULTS["p"],
        summ: float = DEFAULTS["summ"],
        sink_dims: Sequence[int] | None = None,
        sink_layers: Iterable[int] | None = None,
        behaviour: str = "official",
        trace: bool = False,
    ):
        super().__init__(behaviour)
        self.tau = check_number("VAR", "tau", tau)
        self.rho, self.p, self.summ = (
            check_number("VAR", name, value, at_least=0.0, at_most=1.0)
            for name, value in (("rho", rho), ("p", p), ("summ", summ))
        )
        self.sink_dims = None if sink_dims is None else tuple(int(d) for d in sink_dims)
        self.sink_layers = None if sink_layers is None else tuple(sorted(int(i) for i in sink_layers))
        if self.sink_layers == ():
            raise InvalidOptionError("VAR needs at least one sink layer (sink_layers=[] would edit nothing)")
        self.trace = trace
        self.records: list[dict[str, Any]] = []
        self._dims: tuple[int, ...] = ()  # the dims on the model attached last (sink_dims or its backbone's)
        self._layers: tuple[int, ...] = ()
        self._edited: frozenset[int] = frozenset()
        self._first_sinks: dict[str, dict[int, torch.Tensor]] = {}

    @classmethod
    def from_code_values(cls, *, rho: float = 0.5, p: float = 0.6, **kwargs) -> VAR:
        """A VAR from the official code's rho/p (``rho_code = 1 - rho``, ``p_code = 1 - p``)."""
        return cls(rho=1 - rho, p=1 - p, **kwargs)

    @property
    def rho_code(self) -> float:
        return 1 - self.rho

    @property
    def p_code(self) -> float:
        return 1 - self.p

    @property
    def edited_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self._edited))

    def reset(self) -> None:
        """Start a new run: the official behaviour detects sinks again at the next prompt."""
        self._first_sinks.clear()
        self.records.clear()

    def _settings(self):
        return {
            "tau": self.tau,
            "rho": self.rho,
            "p": self.p,
            "rho_code": self.rho_code,
            "p_code": self.p_code,
            "summ": self.summ,
            "sink_dims": self._dims or self.sink_dims,
            "sink_layers": self._layers or self.sink_layers,
            "edited_layers": self.edited_layers or None,
        }

    def _check_model(self, session) -> None:
        n = len(session.layers)
        dims = self.sink_dims if self.sink_dims is not None else sink_dims_for(session.model)
        hidden = session.family.text_config().hidden_size
        if not dims or max(dims) >= hidden or min(dims) < 0:
            raise InvalidOptionError(f"VAR's sink_dims {dims} do not fit the hidden size {hidden}")
        layers = self.sink_layers if self.sink_layers is not None else tuple(range(2, n))
        if any(not 0 <= i < n for i in layers):
            raise InvalidOptionError(f"VAR's sink_layers {layers} do not fit {n} layers")
        last = n - 1
        edited = frozenset(i for i in layers if self.behaviour == "official" or i != last)
        if not layers:  # the answer would be the stock model's, recorded as VAR's
            raise InvalidOptionError(
                f"VAR would edit no layer: its default sink layers (2 to L - 1) are none of this model's {n}; "
                "give sink_layers"
            )
        if not edited:
            raise InvalidOptionError(
                f"VAR would edit no layer: its paper behaviour leaves the last layer ({last}) alone, and sink_layers "
                f"{layers} holds no other; give layers below {last}"
            )
        self._dims, self._layers, self._edited = tuple(dims), tuple(layers), edited

    def _install(self, session) -> None:
        for index in self._layers:
            self._hook(session.layers[index], self._detector(index))
        self._first_sinks.clear()

    def _drop_stream(self, name: str) -> None:
        self._first_sinks.pop(name, None)

    def _new_slot(self):
        return {"sinks": {}, "indicators": {}, "visual": {}, "codes": {}, "rows": None, "detect": True}

    def _on_prefill(self, state: StreamState) -> None:
        slot = self._slot(state)
        slot["indicators"], slot["visual"], slot["codes"] = {}, {}, {}
        carried = self._first_sinks.get(state.name)
        image = state.image_tokens.mask
        if self.behaviour == "official" and carried is not None:
            slot["detect"], slot["rows"] = False, None
            slot["sinks"] = {layer: _fit(mask, image.shape) for layer, mask in carried.items()}
        else:
            slot["detect"] = True
            slot["sinks"] = {}
            q = torch.arange(image.shape[1], device=image.device)
            slot["rows"] = (q[None, :] >= state.image_tokens.image_end()[:, None])[:, None]  # [B, 1, Q]

    def _detector(self, layer: int):
        def hook(module, args, kwargs):
            session = self._session
            if session is None:
                return
            state = session.state()
            if not state.prefill:
                return
            slot = self._slot(state)
            if not slot["detect"]:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            slot["sinks"][layer] = sink_scores(hidden, self._dims) > self.tau
            if self.behaviour == "official":
                self._first_sinks.setdefault(state.name, {}).setdefault(layer, slot["sinks"][layer])

        return hook

    def _applies(self, layer: int, state: StreamState) -> bool:
        if layer not in self._edited:
            return False
        slot = state.slots.get(id(self))
        if slot is None or layer not in slot["sinks"]:
            return False
        if self.trace:  # a record for every edited forward
            return True
        # A layer with no sink inside the image is not edited: it runs the model's own attention.
        visual = slot["visual"].get(layer)
        if visual is None:
            sinks = slot["sinks"][layer]
            visual = slot["visual"][layer] = bool((sinks & state.image_tokens.mask.to(sinks.device)).any())
        return visual

    def _fused(self, layer: int, query, key, value, mask, scaling, state: StreamState) -> torch.Tensor | None:
        """A decoding step on the GPU (or with the Triton backend forced): the whole edited attention row in
        one kernel (:func:`attnzoo.kernels.redistributed_decode_attention`; with its per-prompt key terms cached,
        three small allocations besides) where the eager path takes ~34 torch ops."""
        if state.prefill or self.trace or query.shape[2] != 1:
            return None
        forced = dispatch.forced_backend()
        if forced not in (None, "triton") or (not query.is_cuda and forced != "triton"):
            return None  # another backend forced (the eager path is VAR's torch backend), or the CPU
        if dispatch.available_backends(OP, query)["triton"] is not None:
            return None
        slot = state.slots[id(self)]
        codes = slot["codes"].get(layer)
        if codes is None:
            sinks = slot["sinks"][layer].to(query.device)
            image = state.image_tokens.mask.to(query.device)
            codes = slot["codes"][layer] = redistribution_keys(
                (image.to(torch.int8) * IMAGE) | (sinks.to(torch.int8) * SINK)
            )
        with dispatch.use_backend("triton"):
            out, _ = redistributed_decode_attention(
                query, key, value, mask, codes, keep=self.p_code, rho=self.rho_code, summ=self.summ, scale=scaling
            )
        return out

    def _post_softmax(self, layer: int, weights: torch.Tensor, state: StreamState) -> torch.Tensor:
        slot = state.slots[id(self)]
        ind = slot["indicators"].get(layer)
        if ind is None:
            ind = slot["indicators"][layer] = _Indicators(
                state.image_tokens.mask.to(weights.device), slot["sinks"][layer], self.p_code, weights.dtype
            )
        if not self.trace and not ind.any_visual_sink:
            return weights
        factor, candidates = _redistribute(weights, ind, self.rho_code, self.summ)
        rows = slot["rows"] if state.prefill else None
        selected = candidates if rows is None else candidates & rows
        if self.trace:
            self.records.append(
                {
                    "prompt": state.prompts,
                    "step": "prefill" if state.prefill else state.step - 1,
                    "layer": layer,
                    "sinks": [torch.nonzero(row).flatten() for row in slot["sinks"][layer]],
                    "candidates": torch.nonzero(candidates),
                    "edited": selected,
                }
            )
        return _edited(weights, factor, selected)


def _fit(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A carried-over sink mask at absolute positions, cut or padded to [B, S] (the first row is
    reused for every row when the batch size changed, as the batch-1 official loop would)."""
    batch, length = shape
    if mask.shape[0] != batch:
        mask = mask[:1].expand(batch, -1)
    if mask.shape[1] >= length:
        return mask[:, :length]
    return torch.cat([mask, mask.new_zeros(batch, length - mask.shape[1])], dim=1)


def find_sink_dims(
    model,
    samples: Iterable[Mapping[str, Any] | torch.Tensor],
    *,
    n_dims: int = 2,
    layers: Iterable[int] | None = None,
    return_scores: bool = False,
):
    """Measure a backbone's sink dimensions: the hidden dims where a few tokens carry massive
    activations, scored as max_token |x / rms(x)|[d] over the median of that max across dims, summed
    over ``samples`` (model-input dicts with ``input_ids``, or ``input_ids`` [B, S] / [S]) and layers
    2..L-1 (the layers VAR reads). Returns the ``n_dims`` best dims, ascending (and the scores [hidden]
    with ``return_scores``)."""
    family = family_for(model)
    text_layers = cast(nn.ModuleList, family.text_model().layers)
    depth, hidden_size = len(text_layers), family.text_config().hidden_size
    chosen = tuple(int(i) for i in layers) if layers is not None else tuple(range(min(2, depth - 1), depth))
    if not chosen or any(not 0 <= i < depth for i in chosen):
        raise InvalidOptionError(f"find_sink_dims: layers {list(chosen)} must be a non-empty subset of 0..{depth - 1}")
    if isinstance(n_dims, bool) or not isinstance(n_dims, int) or not 1 <= n_dims <= hidden_size:
        raise InvalidOptionError(f"find_sink_dims: n_dims must be an integer in 1..{hidden_size}, got {n_dims!r}")
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    scores = None
    handles: list[Any] = []
    try:
        handles = [text_layers[i].register_forward_pre_hook(capture, with_kwargs=True) for i in chosen]
        for index, sample in enumerate(samples):
            inputs = _calibration_inputs(index, sample)
            valid = inputs.get("attention_mask")
            if valid is not None and not bool(valid.bool().any(dim=-1).all()):
                raise InvalidInputError(f"find_sink_dims: sample {index} has a row with no tokens (attention_mask 0)")
            captured.clear()
            with torch.no_grad():
                family.prefill(inputs, use_cache=False)
            for hidden in captured:
                x = hidden.to(torch.float32)
                normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _RMS_EPS)).abs()
                if valid is not None:
                    normed = normed * valid[..., None].to(normed)
                peak = normed.amax(dim=1)  # [B, D]
                ratio = peak / peak.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
                scores = ratio.sum(0) if scores is None else scores + ratio.sum(0)
    finally:
        for handle in handles:
            handle.remove()
    if scores is None:
        raise InvalidInputError("find_sink_dims needs at least one sample")
    dims = tuple(sorted(int(i) for i in torch.topk(scores, n_dims).indices))
    return (dims, scores) if return_scores else dims


def _calibration_inputs(index: int, sample: Any) -> dict[str, Any]:
    """One sample as model inputs: a dict with ``input_ids`` (2-D), or ``input_ids`` themselves."""
    inputs = dict(sample) if isinstance(sample, Mapping) else {"input_ids": sample}
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.ndim not in (1, 2) or ids.numel() == 0:
        raise InvalidInputError(
            f"find_sink_dims: sample {index} must be input_ids (an integer tensor [B, S] or [S]) or a dict of model "
            f"inputs with them (a processor's output), got {type(sample).__name__}"
            + (f" with input_ids of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else "")
        )
    if ids.ndim == 1:
        inputs = {k: (v[None] if isinstance(v, torch.Tensor) and v.ndim == 1 else v) for k, v in inputs.items()}
    return inputs


__all__ = [
    "CHECKPOINT_BACKBONES",
    "DEFAULTS",
    "SINK_DIMS",
    "VAR",
    "find_sink_dims",
    "redistribute",
    "sink_dims_for",
    "sink_scores",
]
