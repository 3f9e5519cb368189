"""``pipeline("hallucination-mitigation")``: answer questions about images with a transformers LVLM,
with a training-free hallucination-mitigation method (VAR, PAI, PAINT, VCD, AGLA, CARVE, or a
combination such as ``"var+agla"``) or none.

>>> ask = attnzoo.pipeline("hallucination-mitigation", model="llava-hf/llava-1.5-7b-hf", method="var")  # doctest: +SKIP
>>> out = ask("kitchen.jpg", question="Is there a dog in the image?")                               # doctest: +SKIP
>>> out.answer, out.settings["methods"]                                                              # doctest: +SKIP

Per batch of prompts: the questions go into the model family's prompt template (the processor's chat
template: "USER: <image>\\n{question} ASSISTANT:" for llava-hf LLaVA-1.5), are encoded left-padded,
their image tokens are checked against the family's layout, the methods prepare the prompts (CARVE),
their interventions are attached (VAR, PAI, PAINT), their logits processors built (VCD, AGLA, PAI's
CFG), and ``generate`` runs; then everything is detached, so the model is the stock model between
calls. A contrast method in batched mode (VCD; AGLA's paper behaviour) runs its branch prompts as B
more rows of the same ``generate`` (one batched forward per token; both halves take the main rows'
token) and only the first B rows are answers. Each batch is a fresh run of each method: an answer never depends on what was asked before it
(VAR's official carry-over of the first question's sinks stays within one ``generate`` call).

Decoding is exactly what the result records: greedy (default) or sampled, with the model's own
``generation_config`` penalties and sampling defaults left out. Sampled decoding draws every answer
from its own generator seeded by its ``seed`` (the input's, else the call's), so an answer is the same
whatever batch it ran in; the contrast processors come before temperature, top-k and top-p, as in the
official VCD / AGLA / PAI loops.

``return_attention=True`` adds the answer's attention over the image's token grid (the last query row
of every decoding step, mean over heads and the chosen layers, and over the answer's tokens) and,
with a method, the same for the stock model's answer (a second run without the method), so
``result.plot()`` shows both over the image. The language model runs eager attention for it (an
attached attention edit's function computes it on every layer then, the ones it leaves alone included). Where the method answers on other images than the one given
(CARVE: [original, refined] with its official behaviour, the refined image alone with the paper's),
``answered_on`` says which, each grid is drawn over the image it belongs to, and the stock answer's
over the original.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from attnzoo._values import (
    comma_items,
    flag,
    is_integer,
    listed,
    nonblank_text,
    refuse_per_input_defaults,
    to_real,
    whole_number,
)
from attnzoo.errors import AttnzooError, InvalidInputError, InvalidOptionError, OfflineError, WeightsError, close_names
from attnzoo.pipelines.base import Pipeline, generator_seed, list_collate, weights_note

__all__ = [
    "CHAT_TEMPLATES",
    "HallucinationMitigationPipeline",
    "MitigationResult",
    "decoding_record",
]

#: Named prompt templates beside the processor's own ("model"); any other string with ``{question}``
#: (and ``{image}`` where the image goes: the family's image text, ``Family.prompt_placeholder``) is used literally.
CHAT_TEMPLATES = {
    # LLaVA's original vicuna_v1 conversation (system message): what VCD, AGLA, VAR and PAINT ran with
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. USER: {image}\n{question} ASSISTANT:",
}
_CALL_KEYWORDS = (
    "method",
    "method_settings",
    "unused_settings",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "num_beams",
    "seed",
    "chat_template",
    "return_attention",
    "attention_layers",
)
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class MitigationResult:
    """One answer and everything that made it."""

    question: str
    answer: str
    prompt: str
    """The text the processor encoded (template applied, one image placeholder)."""
    image: Image.Image
    settings: dict[str, Any] = field(default_factory=dict)
    """Model, family, method (``"var+agla"``), each method's settings as it ran, decoding, prompt template."""
    seed: int | None = None
    """The sampling seed of this answer (None: greedy or beam search)."""
    token_ids: list[int] = field(default_factory=list)
    attention: np.ndarray | None = None
    """``[rows, cols]``: the answer's attention over the token grid of the first image it was answered on
    (``answered_on[0]``), with the method."""
    baseline_answer: str | None = None
    """The stock model's answer (with ``return_attention`` and a method)."""
    baseline_attention: np.ndarray | None = None
    """The stock answer's attention over the original image's grid."""
    view: Image.Image | None = None
    """The first image answered on as the vision tower saw it (resized and cropped; the image itself where
    the model's pixels are no picture, as Qwen2-VL's patches), where ``attention`` lies."""
    weights: str | None = None
    answered_on: tuple[str, ...] = ("original",)
    """The images of the prompt the answer was generated on, in order: ``"original"`` (the one given) or
    ``"refined"`` (made by the method: CARVE answers on ("original", "refined"), or ("refined",) with the
    paper's behaviour)."""
    refined_attention: np.ndarray | None = None
    """The answer's attention over the refined image's grid, when it was answered on the original and the
    refined image (CARVE's official behaviour); ``attention`` is then the original's share."""
    refined_view: Image.Image | None = None
    """The refined image as the vision tower saw it, where ``refined_attention`` lies (set with it)."""
    baseline_view: Image.Image | None = None
    """The original image as the vision tower saw it in the stock run."""

    @property
    def method(self) -> str:
        return str(self.settings.get("method", "none"))

    def summary(self) -> str:
        decoding = self.settings.get("decoding", {}).get("mode", "greedy")
        text = f"{self.question!r} -> {self.answer!r} ({self.method}, {decoding})"
        if self.baseline_answer is not None:
            text += f"; without the method: {self.baseline_answer!r}"
        return text

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "question": self.question,
            "answer": self.answer,
            "prompt": self.prompt,
            "seed": self.seed,
            "weights": self.weights,
            **self.settings,
            "answered_on": list(self.answered_on),
        }
        if self.baseline_answer is not None:
            record["baseline_answer"] = self.baseline_answer
        grids = (
            ("attention", self.attention),
            ("refined_attention", self.refined_attention),
            ("baseline_attention", self.baseline_attention),
        )
        for key, grid in grids:
            if grid is not None:
                record[key] = np.round(grid.astype(np.float64), 6).tolist()
        return record

    def plot(self, size: int = 256) -> Image.Image:
        """The image, then the answer's attention over each image it was answered on with the method, and
        over the original without it (when measured), on one colour scale, with the question and the
        answers below; each picture fits a ``size`` box (a positive whole number of pixels)."""
        from attnzoo.viz.drawing import NOTE_COLOUR, load_font, wrap_text

        size = whole_number(size, "plot size", why="the pixels of the box each picture fits")
        first = self.answered_on[0] if self.answered_on else "original"
        original = _first_given(self.baseline_view, self.view if first == "original" else None) or self.image
        panels = [(_image_title(self.image, original), _fit(original, size))]
        grids = [g for g in (self.attention, self.refined_attention, self.baseline_attention) if g is not None]
        scale = (min(float(g.min()) for g in grids), max(float(g.max()) for g in grids)) if grids else (0.0, 1.0)
        name = f"with {self.method}" if self.baseline_attention is not None else f"attention ({self.method})"
        if self.attention is not None:
            where = f"{first} image" if self.refined_attention is not None or first != "original" else ""
            base = _first_given(self.view, self.image if first == "original" else None)
            if base is not None:
                panels.append(
                    (f"{name}, {where}" if where else name, _overlay(_fit(base, size), self.attention, scale))
                )
        if self.refined_attention is not None and self.refined_view is not None:
            panels.append(
                (f"{name}, refined image", _overlay(_fit(self.refined_view, size), self.refined_attention, scale))
            )
        if self.baseline_attention is not None:
            panels.append(("without a method", _overlay(_fit(original, size), self.baseline_attention, scale)))
        font, small = load_font(14), load_font(12)
        pad, head = 8, 22
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        slots = [max(picture.width, math.ceil(measure.textlength(title, font=font))) for title, picture in panels]
        width = pad + sum(slot + pad for slot in slots)
        tallest = max(picture.height for _, picture in panels)
        lines = [f"Q: {self.question}", f"A ({self.method}): {self.answer}"]
        if self.baseline_answer is not None:
            lines.append(f"A (no method): {self.baseline_answer}")
        if grids:
            lines.append(
                f"colour: the answer's attention per image token, {scale[0]:.3g} (dark) to {scale[1]:.3g} (light)"
            )
        if self.refined_attention is not None:
            lines.append("the answer's attention is shared between the original and the refined image")
        note = weights_note(self.weights)
        text = (40, 40, 40)
        coloured = [(line, text) for line in lines] + (
            [(f"{note}: the answers are meaningless", NOTE_COLOUR)] if note else []
        )
        wrapped = [(part, colour) for line, colour in coloured for part in wrap_text(line, small, width - 2 * pad)]
        sheet = Image.new("RGB", (width, head + tallest + pad + 16 * len(wrapped) + pad), "white")
        draw = ImageDraw.Draw(sheet)
        x = pad
        for (title, picture), slot in zip(panels, slots, strict=True):
            sheet.paste(picture, (x, head))
            draw.text((x, 4), title, fill=(0, 0, 0), font=font)
            x += slot + pad
        y = head + tallest + pad
        for line, colour in wrapped:
            draw.text((pad, y), line, fill=colour, font=small)
            y += 16
        return sheet


def _image_title(image: Image.Image, shown: Image.Image) -> str:
    """The first panel's title: ``"image"`` when it shows ``image`` itself, else ``"model's view"``, with
    how it differs from the image when its shape does: "(centre crop)" or "(stretched)" when the view
    matches that of the image (to within 12 grey levels on average, the better by 1), else "(reshaped)"."""
    if shown is image:
        return "image"
    width, height = image.size
    aspect = shown.width / shown.height
    if abs(aspect / (width / height) - 1) <= max(0.02, 2 / min(shown.size)):  # a rounding of the same shape
        return "model's view"
    crop = (width - height * aspect, 0) if width / height > aspect else (0, height - width / aspect)
    box = (crop[0] / 2, crop[1] / 2, width - crop[0] / 2, height - crop[1] / 2)
    seen = np.asarray(shown.convert("RGB"), dtype=np.float32)
    rgb = image.convert("RGB")
    errors = {
        how: float(
            np.abs(np.asarray(rgb.resize(shown.size, Image.Resampling.BICUBIC, box=area), np.float32) - seen).mean()
        )
        for how, area in (("centre crop", box), ("stretched", None))
    }
    best = min(errors, key=lambda how: errors[how])
    if errors[best] > 12 or max(errors.values()) - errors[best] < 1:
        return "model's view (reshaped)"
    return f"model's view ({best})"


def _first_given(*pictures: Image.Image | None) -> Image.Image | None:
    return next((picture for picture in pictures if picture is not None), None)


def _fit(picture: Image.Image, size: int) -> Image.Image:
    """``picture`` in RGB, scaled to fit a ``size`` box (a small one magnified to show its pixels)."""
    from attnzoo.viz.drawing import resize_picture

    fit = size / max(picture.width, picture.height)
    return resize_picture(
        picture.convert("RGB"), (max(1, round(picture.width * fit)), max(1, round(picture.height * fit)))
    )


def _overlay(base: Image.Image, grid: np.ndarray, scale: tuple[float, float]) -> Image.Image:
    """``grid`` on the viridis ramp (``scale`` = the values of its ends), one square per token, over ``base``."""
    from attnzoo.viz.wsi import attention_colours

    low, high = scale
    values = (np.asarray(grid, dtype=np.float64) - low) / (high - low if high > low else 1.0)
    colours = Image.fromarray(attention_colours(values)).resize(base.size, Image.Resampling.NEAREST)
    return Image.blend(base, colours, 0.55)


def decoding_record(
    *,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    num_beams: int = 1,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
) -> dict[str, Any]:
    """The decoding as it runs (the shape ``attnzoo eval`` records): greedy, sampled or beam search."""
    return {
        "mode": "sampled" if do_sample else "beam" if num_beams > 1 else "greedy",
        "do_sample": do_sample,
        "temperature": (1.0 if temperature is None else temperature) if do_sample else None,
        "top_p": (1.0 if top_p is None else top_p) if do_sample else None,
        "top_k": top_k if do_sample else None,
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }


def _generation_limits(given: dict[str, Any], context: int | None, vocab: int | None) -> dict[str, Any]:
    """``max_new_tokens`` and ``num_beams`` of ``given`` checked (whole numbers) against what the language model
    can take: fewer new tokens than its context (the prompt holds at least one token), no more beams than its
    vocabulary. None: that limit is not known (nothing invented)."""
    if given.get("max_new_tokens") is not None:
        why = f"the language model's context is {context} tokens and the prompt takes at least one" if context else ""
        high = context - 1 if context else None
        given["max_new_tokens"] = whole_number(given["max_new_tokens"], "max_new_tokens", high=high, why=why)
    if given.get("num_beams") is not None:
        why = (
            f"the vocabulary's {vocab} tokens: every beam starts from the same prompt, so its first step has no "
            "more distinct continuations"
            if vocab
            else ""
        )
        given["num_beams"] = whole_number(given["num_beams"], "num_beams", high=vocab, why=why)
    return given


def _check_before_loading(checkpoint: Any, given: Mapping[str, Any], revision: str | None) -> None:
    """The ``max_new_tokens`` / ``num_beams`` that the checkpoint's config alone rules out, refused from its
    config.json before its weights load (minutes for a 7B model)."""
    from attnzoo.multimodal.hallucination.layouts import language_model_limits

    asked = {k: given[k] for k in ("max_new_tokens", "num_beams") if given.get(k) is not None}
    if not asked:
        return
    _generation_limits(dict(asked), None, None)  # a value of the wrong kind is refused without reading anything
    config = checkpoint.config(**({"revision": revision} if revision is not None else {}))
    _generation_limits(asked, *language_model_limits(config))


#: Layer indices taken where the model's depth is not known: no language model has this many layers.
_MAX_LAYERS = 10_000


def _layers(value: Any, depth: int | None = None) -> tuple[int, ...]:
    """Layer indices from ints or a string like ``"10-12"`` / ``"2,5,8-9"`` (a blank item refused), each within the
    language model's ``depth`` (counted from the end where negative); a range is checked before it is spelled
    out, so ``"0-30000000"`` is refused at once, in a short message."""
    from attnzoo.multimodal.hallucination.methods import index_span

    parts = comma_items(value, "attention_layers") if isinstance(value, str) else value
    spans: list[tuple[int, int]] = []
    try:
        for part in parts if not isinstance(parts, (int, np.integer)) else [parts]:
            span = index_span(part, "attention_layers") if isinstance(part, str) else None
            if span is not None:
                spans.append(span)
            elif isinstance(part, (bool, np.bool_)):  # a flag is no layer index
                raise TypeError(part)
            else:
                spans.append((int(part), int(part)))
    except InvalidOptionError:  # a range that runs backwards, said as such
        raise
    except (TypeError, ValueError):
        raise InvalidOptionError(
            f"attention_layers must be layer indices like '10-12' or [10, 11], got {_shown(value)}"
        ) from None
    bound = depth if depth is not None else _MAX_LAYERS
    outside = [
        f"{low}-{high}" if low != high else str(low)
        for low, high in spans
        if not (-bound <= low < bound and -bound <= high < bound)
    ]
    if outside:
        if depth is not None:
            whose = f"the language model's {depth} layers"
            runs = f"indices run 0..{depth - 1}, or -{depth}..-1 from the last"
        else:
            whose, runs = "any language model's depth", f"indices run {-bound}..{bound - 1} at most"
        raise InvalidOptionError(f"attention_layers {_shown(value)} reaches past {whose} ({listed(outside)}); {runs}")
    out = [index for low, high in spans for index in range(low, high + 1)]
    if not out:
        raise InvalidOptionError("attention_layers names no layer")
    return tuple(out)


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for a message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]} ...{text[-1]}"


def _chat_template(value: Any, markers: Sequence[str] = (), *, needs_image: bool = True) -> str:
    """A prompt template: ``"model"``, a name of :data:`CHAT_TEMPLATES`, or a literal holding ``{question}`` and
    ``{image}`` once (where the pipeline writes the image's text: as many placeholders as the prompt has images,
    two in CARVE's official final pass). A literal holding the model's own image text (``markers``: ``<image>``)
    is refused, as is one without ``{image}`` where the model's prompts hold an image text (``needs_image``;
    InstructBLIP's processor places the image's queries itself): the processor would count other images than
    the prompt has."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidOptionError(
            f"chat_template must be 'model', one of {list(CHAT_TEMPLATES)} or a string, got {value!r}"
        )
    if value in ("model", *CHAT_TEMPLATES):
        return value
    written = [marker for marker in markers if marker and marker in value]
    if written:
        raise InvalidOptionError(
            f"chat_template {_shown(value)} writes the model's image text {', '.join(map(repr, written))} itself: "
            "write {image} where the image goes instead (the pipeline puts the image's text there, once per image "
            "of the prompt)"
        )
    if "{question}" not in value or value.count("{image}") > 1 or (needs_image and "{image}" not in value):
        missing = "has no {question}" if "{question}" not in value else "has no {image}"
        if "{image}" in value and "{question}" in value:
            missing = f"has {{image}} {value.count('{image}')} times"
        raise InvalidOptionError(
            f"chat_template {_shown(value)} is neither 'model' nor one of {list(CHAT_TEMPLATES)}, and as a literal "
            f"template it {missing}: a literal needs {{question}} and, once, {{image}} where the image goes"
            + ("" if needs_image else " (or none: this model's processor places the image itself)")
        )
    return value


#: The sampling settings, which apply with ``do_sample=True`` only.
_SAMPLING = ("temperature", "top_p", "top_k")


def _scalar(value: Any) -> Any:
    """A zero-dimensional numpy array or torch tensor as its number (a bool one stays as it is, to be refused)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype != torch.bool:
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype != np.bool_:
        return value.item()
    return value


def _check_decoding(given: dict[str, Any]) -> dict[str, Any]:
    """The decoding settings of ``given`` checked, as the Python numbers ``generate`` takes (numpy's and torch's
    scalars too; a bool is no number); sampling settings given with ``do_sample=False`` are refused."""
    if "do_sample" in given:
        given["do_sample"] = flag(given["do_sample"], "do_sample")
    if "temperature" in given:
        temperature = to_real(_scalar(given["temperature"]))
        if temperature is None or temperature < 1e-4:
            # below, the scaled logits overflow to inf and sampling fails on NaN; greedy decoding is that limit
            raise InvalidOptionError(
                f"temperature must be a finite number >= 1e-4, got {given['temperature']!r} (for temperature -> 0, "
                "sample greedily: do_sample=False)"
            )
        given["temperature"] = temperature
    if "top_p" in given:
        top_p = to_real(_scalar(given["top_p"]))
        if top_p is None or not 0 < top_p <= 1:
            raise InvalidOptionError(f"top_p must be a number in (0, 1], got {given['top_p']!r}")
        given["top_p"] = top_p
    if "top_k" in given:
        top_k = _scalar(given["top_k"])
        if not is_integer(top_k) or top_k < 0:
            raise InvalidOptionError(f"top_k must be a non-negative integer (0: no top-k), got {given['top_k']!r}")
        given["top_k"] = int(top_k)
    if given.get("do_sample") is False and any(k in given for k in _SAMPLING):
        raise InvalidOptionError("temperature, top_p and top_k apply to sampled decoding: pass do_sample=True")
    return given


class HallucinationMitigationPipeline(Pipeline):
    """``p(image, question="...")``; also lists, one image with a list of questions, or dicts
    ``{"image": ..., "question": ..., "seed": ...}``.

    Constructor: ``processor`` (for a loaded model without one), ``attn_implementation`` (switches the
    language model's, or loads with it), ``revision`` and ``device_map`` (loading by name). Settings
    (constructor or call): ``method`` (a name, ``"var+agla"``, a list, a dict of per-method settings, or
    method objects), the methods' own settings as keywords (each goes to the methods that take it:
    ``tau``, ``alpha``, ``gamma``, ``behaviour``, ...), ``max_new_tokens`` (128), ``do_sample``,
    ``temperature``, ``top_p``, ``top_k``, ``num_beams`` (1), ``seed`` (0), ``chat_template`` ("model",
    "llava_v1" or a literal), ``return_attention``, ``attention_layers`` (all), ``unused_settings``
    ("error", or "ignore": a method setting none of the methods takes is left out, as in a comparison of
    methods that all get the same settings).

    A call's settings override the constructor's key by key; a keyword given as None is dropped (the
    constructor's, or the default, applies), so ``method=None`` in a call runs the pipeline's method, and
    ``method="none"`` the stock model. The constructor's method settings are defaults of a call that names
    no method or the same method(s) ("vcd", "VCD" and ["vcd"] are one; the order of a combination does not
    matter): the call's own override them key by key. A call naming other methods takes only its own
    settings (a VCD ``alpha`` is not PAI's), and warns naming the constructor's that it drops. A call with
    ``do_sample=False`` leaves the constructor's ``temperature``, ``top_p`` and ``top_k`` out (given in
    that call, they are refused).
    """

    task = "hallucination-mitigation"
    primary_field = "image"
    input_fields = ("question", "seed")
    collate = staticmethod(list_collate)

    # No accepts() of its own: attnzoo.pipeline lets a timm classifier's *name* into a pipeline that claims
    # models itself (a third party's task on timm backbones) and builds it, fetching its weights, before the
    # pipeline could say no. With the base's, a classifier (by name or as an object) is refused before it is
    # built, as a model for image-classification; any other object is checked first thing in __init__.

    def __init__(
        self,
        model: Any,
        *,
        processor: Any = None,
        device: str | int | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        attn_implementation: str | None = None,
        revision: str | None = None,
        device_map: Any = None,
        **kwargs: Any,
    ):
        from attnzoo.multimodal.hallucination.layouts import family_of
        from attnzoo.multimodal.hallucination.models import LVLMCheckpoint, processor_for
        from attnzoo.pipelines.base import resolve_device, resolve_dtype

        if not _is_lvlm(model):
            raise InvalidInputError(
                f"the {self.task} task has no pipeline for a {type(model).__name__}: it takes a loaded transformers "
                "vision-language model (with its config) or an LVLMCheckpoint; by name, use attnzoo.pipeline("
                f"{self.task!r}, model='llava_1_5_7b' or a registered Hub id such as llava-hf/llava-1.5-7b-hf, "
                "weights=<a local folder> to load it from there)"
            )
        #: The methods built for the last settings (:meth:`_build_methods`), newest last, at most _METHODS_KEPT.
        self._methods_cache: OrderedDict[Any, tuple[list[Any], list[Any]]] = OrderedDict()
        self._methods_guard = threading.Lock()
        #: What the methods load by name, shared between them (AGLA's BLIP model and processor).
        self._loaded: dict[Any, Any] = {}
        self._weights_label: str | None = None
        # before any loading: a question goes with each input, and a misspelled keyword would fail every call
        refuse_per_input_defaults(kwargs, ("question",), "p(image, question='Is there a dog?')")
        _check_keywords(kwargs)
        for name, value in (("attn_implementation", attn_implementation), ("revision", revision)):
            if value is not None:  # an empty one would read as "the model's own" (or transformers' default)
                nonblank_text(value, name)
        if isinstance(model, LVLMCheckpoint):
            if device is not None and (device_map if device_map is not None else model.device_map) is not None:
                raise InvalidOptionError(  # the device map would win, the device be ignored (transformers refuses both)
                    f"device={device!r} and device_map= both say where the model goes: pass only one of them"
                )
            _check_before_loading(model, kwargs, revision)
            overrides = {"revision": revision, "attn_implementation": attn_implementation, "device_map": device_map}
            with _attn_implementation_checked(attn_implementation):
                model, loaded = model.load(
                    device=resolve_device(device) if device_map is None else None,
                    dtype=resolve_dtype(dtype) or model.dtype,
                    **{k: v for k, v in overrides.items() if v is not None},
                )
            processor = processor if processor is not None else loaded
        elif revision is not None or device_map is not None:
            raise InvalidOptionError("revision= and device_map= apply when the pipeline loads the model by name")
        self.family = family_of(model)  # an unsupported model: UnknownFamilyError naming the supported types
        if attn_implementation is not None and self.text_attention(model) != attn_implementation:
            with _attn_implementation_checked(attn_implementation):
                model.set_attn_implementation({self.family.text_config_key: attn_implementation})
        if processor is None:
            processor = processor_for(model)
        self.processor = processor if processor is not None else _auto_processor(model)
        self._input_check = _InputCheck(self.family, self.processor)
        placed = _dispatched_device(model)
        if placed is not None:  # it stays where its device map put it, in the dtype it was loaded in
            _check_dispatched_placement(model, device, dtype)
        with _kept_in_place(model) if placed is not None else nullcontext():
            super().__init__(
                model, device=placed or device, dtype=dtype, batch_size=batch_size, num_workers=num_workers, **kwargs
            )
        self.dtype = self.model.dtype  # what the model runs in (and its inputs are cast to), as recorded
        defaults = self._defaults[1]
        methods: list[Any] = []
        if defaults.get("method") is not None or defaults.get("method_settings"):
            methods = self._build_methods(defaults)  # refused now (settings without a method too), not at every call
        # settings that would refuse every call (temperature without do_sample, beams with a contrast method): now
        _refuse_decoding(methods, self._decoding(defaults), bool(defaults.get("return_attention")))

    @property
    def weights_label(self) -> str | None:
        from attnzoo.multimodal.hallucination.models import TINY_NAMES

        if self.model_name in TINY_NAMES.values():  # say which model ran, whatever name asked for it
            return f"{self._weights_label or 'random'}, tiny {self.family.name} ({self.model_name})"
        return self._weights_label

    @weights_label.setter
    def weights_label(self, value: str | None) -> None:
        self._weights_label = value

    @property
    def model_name(self) -> str:
        return str(
            getattr(self.model, "name_or_path", "") or self.model.config._name_or_path or type(self.model).__name__
        )

    @staticmethod
    def text_attention(model: Any) -> str | None:
        """The attention implementation the model's language model runs (eager, sdpa, ...)."""
        from attnzoo.multimodal.hallucination.layouts import family_of

        return getattr(family_of(model).text_config(), "_attn_implementation", None)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task={self.task!r}, model={self.model_name!r}, weights={self.weights_label!r}, "
            f"device={str(self.device)!r}, dtype={self.model.dtype})"
        )

    # -- keywords ----------------------------------------------------------------------------------
    def _checked_parameters(self, kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
        """Call keywords plus the methods' own settings, which are open-ended (each method's keywords):
        they are checked against the methods when these are built."""
        _check_keywords(kwargs)
        named = {k: v for k, v in kwargs.items() if k in _CALL_KEYWORDS}
        # a method setting given as None is dropped, as every keyword is: the constructor's value or the default applies
        extra = {k: v for k, v in kwargs.items() if k not in _CALL_KEYWORDS and v is not None}
        if extra or named.get("method_settings"):
            given = _method_settings(named.get("method_settings") or {})
            named["method_settings"] = {**{k: v for k, v in given.items() if v is not None}, **extra}
        return self._sanitize_parameters(**named)

    def _sanitize_parameters(
        self,
        method: Any = None,
        method_settings: Mapping[str, Any] | None = None,
        unused_settings: str | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        num_beams: int | None = None,
        seed: int | None = None,
        chat_template: str | None = None,
        return_attention: bool | None = None,
        attention_layers: Any = None,
    ) -> tuple[dict, dict, dict]:
        from attnzoo.multimodal.hallucination.layouts import language_model_limits

        given = {k: v for k, v in locals().items() if k != "self" and v is not None}
        _generation_limits(given, *language_model_limits(self.model.config))
        if "seed" in given:
            given["seed"] = generator_seed(seed)
        if "chat_template" in given:
            given["chat_template"] = _chat_template(
                chat_template,
                self.family.image_markers(self.processor),
                needs_image=bool(self.family.prompt_placeholder(self.processor)),
            )
        if "return_attention" in given:
            given["return_attention"] = flag(return_attention, "return_attention")
        if "attention_layers" in given:
            given["attention_layers"] = _layers(attention_layers, self._depth())
        if unused_settings is not None and unused_settings not in ("error", "ignore"):
            raise InvalidOptionError(f"unused_settings must be 'error' or 'ignore', got {unused_settings!r}")
        if method_settings is not None:
            given["method_settings"] = _method_settings(method_settings)
        _check_decoding(given)  # the methods are built, and refused, with the constructor's or the call's merged
        return {}, given, given

    def _depth(self) -> int | None:
        """How many layers the language model has (None where its decoder stack has no ``layers``)."""
        layers = getattr(self.family.text_model(), "layers", None)
        return len(layers) if layers is not None else None

    def _merged_parameters(self, kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
        """The call's keywords over the constructor's (the class docstring's rule): the constructor's method
        settings are defaults of a call with no method or the same method(s), and dropped, with a warning,
        for a call naming other methods; a greedy call (``do_sample=False``) drops its sampling settings."""
        pre, call, _ = self._checked_parameters(kwargs)
        default = self._defaults[1]
        merged = {**default, **call}
        if call.get("do_sample") is False:  # the constructor's sampling settings are not the call's mistake
            for key in _SAMPLING:
                if key not in call:
                    merged.pop(key, None)
        merged.pop("method_settings", None)
        merged.update(_merged_methods(default, call))
        if merged.get("method") is not None or merged.get("method_settings"):
            self._build_methods(merged)  # the call's settings with the constructor's method: before any image is read
        return {**self._defaults[0], **pre}, merged, dict(merged)

    def _build_methods(self, given: Mapping[str, Any]) -> list[Any]:
        """The methods of ``given``'s ``method`` and ``method_settings``, built once per settings and kept for the
        last :data:`_METHODS_KEPT` of them. Settings holding objects (a BLIP model, a method object) are told
        apart by identity, and each entry keeps its objects, so that an id reused by a later object cannot
        find it; the AGLAs of the pipeline share the BLIP they load by name."""
        from attnzoo.multimodal.hallucination.methods import build_methods, check_on_model, parse_method_spec

        spec, settings = given.get("method"), dict(given.get("method_settings") or {})
        strict = given.get("unused_settings", "error") == "error"
        objects: list[Any] = []
        pairs = [(name, _value_key(item, objects)) for name, item in parse_method_spec(spec)]
        key = (tuple(pairs), _value_key(settings, objects), strict)
        with self._methods_guard:
            entry = self._methods_cache.get(key)
            if entry is not None and len(entry[0]) == len(objects) and all(map(_is, entry[0], objects)):
                self._methods_cache.move_to_end(key)
                return entry[1]
        methods = build_methods(spec, strict=strict, **settings)
        for method in methods:
            share = getattr(method, "share_loaded", None)
            if callable(share):
                share(self._loaded)
        with _model_lock(self.model):  # what this model rules out (VAR's sink dims), before any answer
            check_on_model(methods, self.model)
        with self._methods_guard:
            self._methods_cache[key] = (objects, methods)
            self._methods_cache.move_to_end(key)
            while len(self._methods_cache) > _METHODS_KEPT:
                self._methods_cache.popitem(last=False)
        return methods

    def _decoding(self, given: Mapping[str, Any]) -> dict[str, Any]:
        sampling = [k for k in ("temperature", "top_p", "top_k") if given.get(k) is not None]
        if sampling and not given.get("do_sample"):
            raise InvalidOptionError(f"{', '.join(sampling)} apply to sampled decoding: pass do_sample=True")
        return decoding_record(
            do_sample=bool(given.get("do_sample", False)),
            temperature=given.get("temperature"),
            top_p=given.get("top_p"),
            top_k=given.get("top_k"),
            num_beams=given.get("num_beams", 1),
            max_new_tokens=given.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
            seed=given.get("seed", 0),
        )

    # -- running -----------------------------------------------------------------------------------
    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        """One image with a list of questions asks each of them about it."""
        if inputs is None:
            raise InvalidInputError("give an image: p(image, question='...')")
        questions = kwargs.get("question")
        if self.is_single(inputs) and not isinstance(inputs, Mapping) and isinstance(questions, (list, tuple)):
            inputs = [inputs] * len(questions)
        return super().__call__(inputs, **kwargs)

    def _with_fields(self, items: list[Any], fields: dict[str, Any]) -> list[dict[str, Any]]:
        """A list of one question (or seed) goes with every input, as one value does."""
        fields = {
            name: value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
            for name, value in fields.items()
        }
        return super()._with_fields(items, fields)

    def preprocessor(self, *args: Any, **params: Any):
        return functools.partial(_read_item, fields=(self.primary_field, *self.input_fields), check=self._input_check)

    def preprocess(self, item: Any, **params: Any) -> dict[str, Any]:
        return self.preprocessor()(item)

    def forward(self, batch: dict[str, Any], **params: Any) -> dict[str, Any]:
        """``_forward`` under ``no_grad`` (not ``inference_mode``: AGLA's GradCAM turns gradients back on)."""
        with torch.no_grad():
            return self._forward(batch, **params)

    def _forward(self, batch: dict[str, list[Any]], **given: Any) -> dict[str, Any]:
        from attnzoo.multimodal.hallucination.methods import composition_name

        methods = self._build_methods(given)
        decoding = self._decoding(given)
        sampled = decoding["do_sample"]
        seeds = [(generator_seed(s) if s is not None else decoding["seed"]) if sampled else None for s in batch["seed"]]
        capture = bool(given.get("return_attention", False))
        template = given.get("chat_template", "model")
        run = self._answer(batch, methods, decoding, seeds, template, capture, given.get("attention_layers"))
        outputs: dict[str, Any] = {
            "question": batch["question"],
            "image": batch["image"],
            "seed": seeds,
            **run,
            "settings": {
                "model": self.model_name,
                "family": self.family.name,
                "method": composition_name(methods),
                "methods": [m.describe() for m in methods],
                "decoding": decoding,
                "chat_template": template,
                "attn_implementation": self.text_attention(self.model),
            },
        }
        if capture and methods:
            stock = self._answer(batch, [], decoding, seeds, template, capture, given.get("attention_layers"))
            outputs["baseline_answer"], outputs["baseline_attention"] = stock["answer"], stock["attention"]
            outputs["baseline_view"] = stock["view"]
        return outputs

    def postprocess(self, outputs: dict[str, Any], **given: Any) -> MitigationResult:
        settings, seed = outputs["settings"], outputs["seed"]
        if seed is not None and settings["decoding"]["seed"] != seed:  # an input's or the call's own seed
            settings = {**settings, "decoding": {**settings["decoding"], "seed": seed}}
        return MitigationResult(
            question=outputs["question"],
            answer=outputs["answer"],
            prompt=outputs["prompt"],
            image=outputs["image"],
            settings=settings,
            seed=outputs["seed"],
            token_ids=outputs["token_ids"],
            attention=outputs.get("attention"),
            baseline_answer=outputs.get("baseline_answer"),
            baseline_attention=outputs.get("baseline_attention"),
            view=outputs.get("view"),
            weights=self.weights_label,
            answered_on=outputs["answered_on"],
            refined_attention=outputs.get("refined_attention"),
            refined_view=outputs.get("refined_view"),
            baseline_view=outputs.get("baseline_view"),
        )

    # -- one generate ------------------------------------------------------------------------------
    def _answer(self, batch, methods, decoding, seeds, template, capture, layers) -> dict[str, list[Any]]:
        from transformers import LogitsProcessorList

        from attnzoo.multimodal.hallucination.base import attached, processors_then_warpers
        from attnzoo.multimodal.hallucination.method import PromptBatch
        from attnzoo.multimodal.hallucination.methods import ordered

        _refuse_decoding(methods, decoding, capture)
        if capture and not self.family.spatial:  # said before answering, not after
            from attnzoo.multimodal.hallucination.layouts import LayoutError

            raise LayoutError(
                f"return_attention draws the answer's attention over the image's patch grid, but {self.family.name} "
                f"has {self.family.vision_note}; use a projector model (LLaVA, Qwen2-VL)"
            )
        encode = functools.partial(self._encode, template=template)
        inputs = encode(batch["image"], batch["question"], names=batch["name"])
        self._image_tokens(inputs, batch["name"])
        self._check_room(inputs, decoding["max_new_tokens"], batch)  # before any pre-pass generates
        prompt_batch = PromptBatch(list(batch["image"]), list(batch["question"]), inputs, encode, {"seeds": seeds})
        runs = ordered(methods)
        if decoding["num_beams"] > 1:  # said before any pre-pass (CARVE's probes) runs
            answered = max((method.images_per_answered_prompt for method in runs), default=1)
            _check_beam_images(self.model, self.family, [answered] * len(prompt_batch.questions))
        for method in runs:  # prompts a pre-pass will lengthen, where their length is known before it runs
            known = method.prepared_inputs(self.model, prompt_batch)
            if known is not None:
                self._check_room(known, decoding["max_new_tokens"])
        with _model_lock(self.model), _plain_generation_config(self.model):
            for method in runs:
                prompt_batch = method.prepare(self.model, self.processor, prompt_batch)
            # the prompts as they answer (CARVE's longer), refused before any branch or edit is built on them
            if decoding["num_beams"] > 1:
                _check_beam_images(self.model, self.family, [_count(im) for im in prompt_batch.images])
            self._check_room(prompt_batch.inputs, decoding["max_new_tokens"])
            interventions = [i for m in runs for i in m.interventions()]
            with attached(self.model, *interventions):
                paired, processors = _contrast(runs, self.model, self.processor, prompt_batch)
                if decoding["do_sample"]:
                    chain = processors_then_warpers(
                        *processors,
                        temperature=decoding["temperature"],
                        top_k=decoding["top_k"],
                        top_p=decoding["top_p"],
                    )
                    chain.append(_RowSampler(seeds, self.device))
                else:
                    chain = LogitsProcessorList(processors)
                final = model_inputs = prompt_batch.inputs
                if prompt_batch.cached is not None and paired is None and not capture and decoding["num_beams"] == 1:
                    model_inputs = prompt_batch.generate_inputs()  # a prefix already computed (CARVE's probes)
                prompt_batch = replace(prompt_batch, cached=None)  # its cache is copied or unused: free it now
                if paired is not None:  # the contrast branch as rows of the same generate, after the main rows
                    model_inputs = paired.inputs(final, self._pad_token_id() or 0)
                    final = paired.main_rows(model_inputs, final)
                    chain = LogitsProcessorList([paired.followed_by(*chain)])
                self._check_room(model_inputs, decoding["max_new_tokens"])  # as laid out: paired rows, a cached prefix
                recorder = _AttentionRecorder(self.family, layers) if capture else None
                with (
                    self._attention_weights() if capture else nullcontext(),
                    recorder or nullcontext(),
                    paired.attached() if paired is not None else nullcontext(),
                ):
                    sequences = self.model.generate(
                        **model_inputs,
                        do_sample=False,
                        num_beams=decoding["num_beams"],
                        max_new_tokens=decoding["max_new_tokens"],
                        logits_processor=chain,
                        pad_token_id=self._pad_token_id(),
                    )
        tokens = self._image_tokens(final, batch["name"])
        new = sequences[: final["input_ids"].shape[0], model_inputs["input_ids"].shape[1] :].cpu()
        lengths = [_answer_length(row, self._eos_token_ids()) for row in new]
        # each prompt's images: (its index in the vision tower's order, its run of tokens), in order
        image_runs: dict[int, list[Any]] = {}
        for run in tokens.runs:
            image_runs.setdefault(run.sample, []).append(run)
        groups = [im if isinstance(im, (list, tuple)) else [im] for im in prompt_batch.images]
        answered_on = [
            tuple("original" if im is given else "refined" for im in group)
            for group, given in zip(groups, batch["image"], strict=True)
        ]
        grids = recorder.grids(tokens, image_runs, lengths) if recorder is not None else [[] for _ in new]
        views = [
            [
                im if v is None else v
                for v, im in zip(self._views(final, [r.image for r in image_runs.get(b, [])]), groups[b], strict=False)
            ]
            for b in range(len(new))
        ]
        has_refined_grid = [
            ("original", "refined") == answered_on[b][:2] and len(grids[b]) > 1 and len(views[b]) > 1
            for b in range(len(new))
        ]
        return {
            "answer": [a.strip() for a in self.processor.batch_decode(new, skip_special_tokens=True)],
            "prompt": [
                self._prompt(q, template, _count(im)) for q, im in zip(prompt_batch.questions, prompt_batch.images)
            ],
            "token_ids": [row[:n].tolist() for row, n in zip(new, lengths, strict=True)],
            "attention": [g[0] if g else None for g in grids],
            "view": [v[0] if v else None for v in views],
            "answered_on": answered_on,
            "refined_attention": [g[1] if r else None for g, r in zip(grids, has_refined_grid, strict=True)],
            "refined_view": [v[1] if r else None for v, r in zip(views, has_refined_grid, strict=True)],
        }

    def _prompt(self, question: str, template: str, images: int = 1) -> str:
        placeholder = self.family.prompt_placeholder(self.processor)
        if template == "model":
            if getattr(self.processor, "chat_template", None):
                content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
                conversation = [{"role": "user", "content": content}]
                return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            return question  # InstructBLIP: the processor puts the query tokens before the question
        if template in CHAT_TEMPLATES:
            if self.family.name not in ("LLaVA-1.5", "LLaVA-NeXT"):
                raise InvalidOptionError(f"chat_template={template!r} is LLaVA's; {self.family.name} has its own")
            template = CHAT_TEMPLATES[template]
        return template.replace("{image}", "\n".join([placeholder] * images)).replace("{question}", question)

    def _encode(
        self, images: Sequence[Any], questions: Sequence[str], *, template: str, names: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """The processor's tensors for the prompts, left-padded, on the model's device and dtype; an entry
        of ``images`` may be a list (several images in one prompt, as CARVE's final pass). ``names``: the
        inputs', for errors."""
        prompts = [self._prompt(q, template, _count(im)) for q, im in zip(questions, images, strict=True)]
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # InstructBLIP's Q-Former text stays right-padded
        try:
            encoded = self.processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
        except (ValueError, TypeError, KeyError) as err:
            raise InvalidInputError(f"the processor cannot encode the prompt(s) {prompts!r}: {err}") from None
        except MemoryError:  # the processor works on the image at full size: said as the input's, not raised raw
            sizes = [f"{im.width}x{im.height}" for entry in images for im in _flat(entry) if hasattr(im, "width")]
            raise InvalidInputError(
                f"{listed(list(names)) if names else 'image(s)'}: the model's processor ran out of memory encoding "
                f"the image(s) ({listed(sizes)} pixels); pass a smaller image (downscale it first)"
            ) from None
        finally:
            tokenizer.padding_side = side
        dtype = self.model.dtype
        return {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) if isinstance(v, torch.Tensor) else v
            for k, v in encoded.items()
        }

    def _check_room(
        self, inputs: Mapping[str, Any], max_new_tokens: int, batch: Mapping[str, Any] | None = None
    ) -> None:
        """The answer must fit the language model's context after the (left-padded) prompts. A prompt that
        alone fills the context is the input's fault, not ``max_new_tokens``'s: said so, with the longest
        prompt in tokens split into its image tokens and its text, what overflows (the image tokens alone,
        or with the text), and which input and question it is (of ``batch``, the inputs, where known)."""
        prompt_tokens = int(inputs["input_ids"].shape[1])
        limit = self.family.context_length()
        if limit is not None and prompt_tokens >= limit:
            raise InvalidInputError(self._overflow(inputs, limit, batch))
        self.family.check_room(prompt_tokens, max_new_tokens, "max_new_tokens")

    def _overflow(self, inputs: Mapping[str, Any], limit: int, batch: Mapping[str, Any] | None) -> str:
        """What a prompt that fills the context of ``limit`` tokens is made of (the longest row of ``inputs``
        in tokens, its padding left out), and what to change. Without ``batch``, ``inputs`` are a method's
        prompts (CARVE's final pass, paired rows), checked after the given ones fit."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        real = (
            mask.bool() if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else torch.ones_like(ids).bool()
        )
        row = int(real.sum(-1).argmax())
        total = int(real[row].sum())
        try:
            image = int(((ids[row] == self.family.image_token_id()) & real[row]).sum())
        except (AttributeError, TypeError, ValueError):  # a config without an image token id: not split
            image = None
        where = question = ""
        asked = None
        questions = batch.get("question") if batch is not None else None
        if questions and len(questions) == ids.shape[0]:
            names = batch.get("name") if batch is not None else None
            where = f"{names[row]}: " if names else ""
            asked = _question_tokens(self.processor, questions[row])
            question = f" of the question {_shown(questions[row])} ({len(questions[row]):,} characters)"
        smaller = "" if self.family.fixed_image_tokens else "pass a smaller image (fewer pixels, fewer image tokens)"
        if image is None:
            parts, remedy = "image tokens included", "shorten the question"
        else:
            parts = f"{image:,} image tokens and {total - image:,} of text: the template and the question"
            if image >= limit:
                if smaller:
                    remedy = f"the image tokens alone fill it: {smaller}"
                elif batch is None:  # the given prompt fit (checked first): the method's holds more images
                    remedy = (
                        "the image tokens alone fill it: the method's prompt holds more images than the one given "
                        "(CARVE's official [original, refined]; behaviour='paper' answers on the refined image alone)"
                    )
                else:
                    remedy = (
                        f"the image tokens alone fill it; {self.family.name} gives every image this many, so no prompt "
                        "with an image fits this model"
                    )
            elif asked is not None and total - asked >= limit:
                remedy = (
                    f"the image tokens and the prompt template alone take {total - asked:,} tokens, leaving no room "
                    f"for any question: {smaller + ' or ' if smaller else ''}use a shorter chat_template"
                )
            else:
                room = limit - 1 - image
                remedy = f"shorten the question (beside the image tokens, the text has room for {room:,} tokens)"
                remedy += f" or {smaller}" if smaller else ""
        return (
            f"{where}the prompt{question}{' as the method lays it out' if batch is None else ''} takes {total:,} "
            f"tokens ({parts}), which fills the language model's context "
            f"of {limit:,} tokens (max_position_embeddings) before any answer token: {remedy}"
        )

    def _image_tokens(self, inputs: Mapping[str, Any], names: Sequence[str]) -> Any:
        """The prompts' image tokens, checked against the family's layout (a processor that does not match
        the model otherwise fails deep inside the forward, or silently misplaces the image)."""
        from attnzoo.multimodal.hallucination.layouts import LayoutError

        try:
            return self.family.image_tokens(inputs["input_ids"], self.family.inputs_image_info(inputs))
        except LayoutError as err:
            raise LayoutError(f"image(s) {', '.join(names)}: {err}") from None

    def _views(self, inputs: Mapping[str, Any], indices: Sequence[int | None]) -> list[Image.Image | None]:
        """The images at ``indices`` (the vision tower's order) as the tower saw them (None where pixels
        are not an image grid)."""
        pixels = inputs.get("pixel_values")
        processor = getattr(self.processor, "image_processor", None)
        if pixels is None or pixels.ndim not in (4, 5) or processor is None:
            return [None] * len(indices)
        mean = torch.tensor(getattr(processor, "image_mean", (0.0, 0.0, 0.0)), dtype=torch.float32)[:, None, None]
        std = torch.tensor(getattr(processor, "image_std", (1.0, 1.0, 1.0)), dtype=torch.float32)[:, None, None]
        views: list[Image.Image | None] = []
        for index in indices:
            if index is None or index >= pixels.shape[0]:
                views.append(None)
                continue
            picture = pixels[index, 0] if pixels.ndim == 5 else pixels[index]  # LLaVA-NeXT: the base view first
            rgb = (picture.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            views.append(Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)))
        return views

    def _pad_token_id(self) -> int | None:
        config = self.model.generation_config
        tokenizer = getattr(self.processor, "tokenizer", None)
        for candidate in (config.pad_token_id, getattr(tokenizer, "pad_token_id", None)):
            if candidate is not None:
                return int(candidate)
        eos = self._eos_token_ids()
        return eos[0] if eos else None

    def _eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = getattr(getattr(self.processor, "tokenizer", None), "eos_token_id", None)
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def _attention_weights(self) -> Any:
        """Eager attention in the language model while inside (sdpa and flash attention return no
        weights); with an attention edit attached, its function computes them on every layer: CARVE's switch."""
        from attnzoo.multimodal.hallucination.base import eager_language_model

        return eager_language_model(self.model, self.family)


def _question_tokens(processor: Any, question: Any) -> int | None:
    """How many tokens ``question`` takes on its own (None where the tokenizer cannot say)."""
    try:
        return len(processor.tokenizer(str(question), add_special_tokens=False)["input_ids"])
    except Exception:  # noqa: BLE001 - only a message's detail: any tokenizer failure leaves it out
        return None


def _is_lvlm(model: Any) -> bool:
    """A model the pipeline may run: a checkpoint to load, or a transformers model (its config names its family;
    an unsupported one is refused naming the families). A model without a config (a timm classifier, a bare
    module) is no LVLM."""
    from attnzoo.multimodal.hallucination.models import LVLMCheckpoint

    return isinstance(model, LVLMCheckpoint) or (
        isinstance(model, torch.nn.Module) and getattr(model, "config", None) is not None
    )


def _contrast(methods: Sequence[Any], model: Any, processor: Any, batch: Any) -> tuple[Any, list[Any]]:
    """(the paired contrast branch or None, the other logits processors) of the methods, in order."""
    paired, processors = None, []
    for method in methods:
        pair = method.paired_contrast(model, processor, batch)
        if pair is None:
            processors += method.logits_processors(model, processor, batch)
        elif paired is not None:
            raise InvalidOptionError(f"{paired.rule.method} and {method.name} both pair a contrast branch; use one")
        else:
            paired = pair
    return paired, processors


def _count(images: Any) -> int:
    return len(images) if isinstance(images, (list, tuple)) else 1


def _flat(images: Any) -> list[Any]:
    """An entry of a batch's images as a list (several images in one prompt, or one)."""
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _refuse_decoding(methods: Sequence[Any], decoding: Mapping[str, Any], capture: bool) -> None:
    """Refuse decoding that the methods, ``return_attention`` (``capture``) or the decoding itself rule out."""
    from attnzoo.multimodal.hallucination.methods import decoding_refusal

    refusal = decoding_refusal(methods, decoding["num_beams"])
    if refusal is not None:
        raise InvalidOptionError(refusal)
    if capture and decoding["num_beams"] > 1:
        raise InvalidOptionError("return_attention follows one sequence per prompt: use num_beams=1")
    if decoding["do_sample"] and decoding["num_beams"] > 1:
        raise InvalidOptionError("sampling with num_beams > 1 (beam sampling) is not supported")


#: How many settings' methods a pipeline keeps built (a sweep over settings builds one set each).
_METHODS_KEPT = 8
#: Arrays up to this many values are told apart by their values in a methods key, larger ones by identity.
_KEYED_VALUES = 4096


def _is(a: Any, b: Any) -> bool:
    return a is b


def _value_key(value: Any, objects: list[Any]) -> Any:
    """A hashable key of a setting's value: numbers, text and their lists by value (with their type: ``1`` and
    ``True`` differ), small arrays by their values, anything else (a model, a processor, a method object) by
    identity, the object itself appended to ``objects`` for the cache entry to keep and compare with ``is``."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, np.generic):
        return (type(value).__name__, value.item())
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return ("mapping", tuple(sorted((k, _value_key(v, objects)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_value_key(v, objects) for v in value))
    if isinstance(value, torch.Tensor) and value.numel() <= _KEYED_VALUES:
        return ("tensor", str(value.dtype), tuple(value.shape), tuple(value.detach().reshape(-1).tolist()))
    if isinstance(value, np.ndarray) and value.size <= _KEYED_VALUES and value.dtype != object:
        return ("ndarray", str(value.dtype), value.shape, tuple(value.ravel().tolist()))
    objects.append(value)
    return ("object", id(value))


def _merged_methods(default: Mapping[str, Any], call: Mapping[str, Any]) -> dict[str, Any]:
    """``method`` and ``method_settings`` of a call merged with the constructor's (the pipeline's docstring):
    for the same methods, the constructor's keyword settings and the settings in its methods' parentheses or
    dicts are defaults that the call's override key by key (a call keyword replaces a method's own value where
    the keyword would otherwise go nowhere, as every method taking it has its own); for other methods, the call's
    alone, with a warning naming the constructor's keyword settings left out."""
    from attnzoo.multimodal.hallucination.methods import METHODS, parse_method_spec

    ctor_kw = dict(default.get("method_settings") or {})
    call_kw = dict(call.get("method_settings") or {})
    if "method" not in default and "method" not in call:
        merged = {**ctor_kw, **call_kw}
        return {"method_settings": merged} if merged else {}
    ctor_pairs = parse_method_spec(default.get("method"))
    if "method" in call:
        call_pairs = parse_method_spec(call["method"])
    else:  # the constructor's methods, with no settings of the call's own
        call_pairs = [(name, {} if isinstance(item, Mapping) else item) for name, item in ctor_pairs]
    if not _same_methods(ctor_pairs, call_pairs):
        if ctor_kw:
            warnings.warn(
                f"this call's method {_names(call_pairs)} is not the pipeline's ({_names(ctor_pairs)}): the "
                f"pipeline's setting(s) {', '.join(sorted(ctor_kw))}, given for its method, do not apply to it; "
                "give them in the call to use them",
                UserWarning,
                stacklevel=_outside_attnzoo(),
            )
        return {"method": call["method"], "method_settings": call_kw}
    ctor_own = {name: dict(item) for name, item in ctor_pairs if isinstance(item, Mapping)}
    pairs = [
        (name, {**ctor_own.get(name, {}), **item} if isinstance(item, Mapping) else item) for name, item in call_pairs
    ]

    def goes_nowhere(key: str) -> bool:  # every method taking it has its own value
        takers = [item for name, item in pairs if isinstance(item, Mapping) and key in METHODS[name].settings()]
        return bool(takers) and all(key in item for item in takers)

    for key in call_kw:  # a call keyword over the constructor's own values, where it would otherwise go nowhere
        if goes_nowhere(key):
            for (_, item), (_, given) in zip(pairs, call_pairs, strict=True):
                if isinstance(item, dict) and key in item and not (isinstance(given, Mapping) and key in given):
                    del item[key]
    shared = {key: value for key, value in ctor_kw.items() if not goes_nowhere(key)}
    return {"method": pairs, "method_settings": {**shared, **call_kw}}


def _same_methods(first: Sequence[tuple[str, Any]], second: Sequence[tuple[str, Any]]) -> bool:
    """Whether two parsed specs name the same methods, in any order (method objects: the same objects)."""
    if sorted(name for name, _ in first) != sorted(name for name, _ in second):
        return False
    objects = [item for _, item in first if not isinstance(item, Mapping)]
    others = [item for _, item in second if not isinstance(item, Mapping)]
    return len(objects) == len(others) and all(any(a is b for b in others) for a in objects)


def _names(pairs: Sequence[tuple[str, Any]]) -> str:
    return "+".join(name for name, _ in pairs) or "none"


def _outside_attnzoo() -> int:
    """The ``stacklevel`` that points a warning, given by the function calling this one, at the first frame
    outside attnzoo (the user's call of the pipeline)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "attnzoo":
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level if frame is not None else 2


class _InputCheck:
    """Per input, what the model's processor would refuse for the whole batch: an image its image processor
    refuses (the family's rule; Qwen2-VL: an aspect ratio over 200), a question holding an image marker
    (``<image>``, ``<|image_pad|>``: the processor would count it as an image). Asked in preprocessing,
    where the refusal is that input's error and ``on_error="skip"`` skips it."""

    def __init__(self, family: Any, processor: Any):
        self.family, self.image_processor = family, getattr(processor, "image_processor", None)
        self.markers = family.image_markers(processor)

    def image(self, image: Image.Image, name: str) -> None:
        if self.image_processor is None:
            return
        refusal = self.family.image_refusal(self.image_processor, image.width, image.height)
        if refusal is not None:
            raise InvalidInputError(
                f"{name}: the model's image processor refuses this {image.width}x{image.height} image: {refusal}"
            )

    def question(self, question: str, name: str) -> None:
        held = [marker for marker in self.markers if marker and marker in question]
        if held:
            raise InvalidInputError(
                f"{name}: the question holds {', '.join(map(repr, held))}, which {self.family.name}'s processor reads "
                "as an image's tokens; the pipeline places the image itself: leave it out of the question"
            )


def _read_item(item: Any, fields: tuple[str, ...], check: _InputCheck | None = None) -> dict[str, Any]:
    """One input: the decoded image (RGB, one the model's image processor takes), the question and the seed
    (checked, named in errors)."""
    from attnzoo.datasets.images import describe, load_image

    row = dict(item) if isinstance(item, Mapping) else {fields[0]: item}
    unknown = sorted(set(row) - set(fields))
    if unknown:
        raise InvalidInputError(f"unknown input keys {unknown}; an input takes {', '.join(fields)}")
    if row.get("image") is None:
        raise InvalidInputError("the image is missing")
    name = describe(row["image"])
    question = row.get("question")
    if question is None:
        raise InvalidInputError(f"{name}: question= is required, e.g. 'Is there a dog in the image?'")
    if not isinstance(question, str):
        raise InvalidInputError(f"{name}: the question must be text, got {type(question).__name__} {question!r}")
    if not question.strip():
        raise InvalidInputError(f"{name}: the question is empty ({question!r})")
    seed = row.get("seed")
    if seed is not None:
        try:
            seed = generator_seed(seed)
        except InvalidOptionError as err:
            raise InvalidInputError(f"{name}: {err}") from None
    if check is not None:
        check.question(question, name)
    _check_pixels(row["image"], name)
    try:
        image = load_image(row["image"])
    except MemoryError:  # decoding or converting it (an RGB copy) needs more memory than there is
        size = getattr(row["image"], "size", None)
        shown = f" ({size[0]}x{size[1]})" if isinstance(size, tuple) and len(size) == 2 else ""
        raise InvalidInputError(
            f"{name}: reading this image{shown} needs more memory than there is; pass a smaller image"
        ) from None
    if check is not None:
        check.image(image, name)
    return {"image": image, "question": question, "seed": seed, "name": name}


def _check_pixels(source: Any, name: str) -> None:
    """An image given in memory (a PIL image, an array, a tensor) held to the pixel limit image files are read
    within (:func:`attnzoo.datasets.images.max_image_pixels`): the processor would take it at full size and run
    out of memory inside it. Files are refused from their header by ``load_image``."""
    from attnzoo.datasets.images import max_image_pixels

    if isinstance(source, Image.Image):
        width, height = source.size
    elif isinstance(source, (np.ndarray, torch.Tensor)) and source.ndim in (2, 3):
        channels_first = isinstance(source, torch.Tensor) and source.ndim == 3
        height, width = (source.shape[-2], source.shape[-1]) if channels_first else (source.shape[0], source.shape[1])
    else:
        return
    limit = max_image_pixels()
    if int(width) * int(height) > limit:
        raise InvalidInputError(
            f"{name}: this {width}x{height} image has more than the {limit:,} pixels an image may have "
            "(ATTNZOO_MAX_IMAGE_PIXELS); downscale it first"
        )


def _answer_length(row: torch.Tensor, eos: Sequence[int]) -> int:
    """Generated tokens up to and including the first end-of-sequence token."""
    for index, token in enumerate(row.tolist()):
        if token in eos:
            return index + 1
    return len(row)


def _auto_processor(model: Any) -> Any:
    """The processor saved with the model's checkpoint (cache only when offline or the Hub is unreachable)."""
    from transformers import AutoProcessor

    from attnzoo.weights import hub

    name = getattr(model, "name_or_path", "") or model.config._name_or_path
    if not name:
        raise InvalidInputError(
            "this model came without a processor: pass processor= (e.g. AutoProcessor.from_pretrained(...))"
        )
    ways_out = "pass the model's processor with processor= (e.g. AutoProcessor.from_pretrained(a local folder))"
    with hub.pretrained_loading(f"the processor of {name}", name, ways_out=ways_out) as cache_only:
        return AutoProcessor.from_pretrained(name, local_files_only=cache_only)


@contextmanager
def _attn_implementation_checked(name: str | None) -> Iterator[None]:
    """transformers refuses an attention implementation it does not know (ValueError), whose package is
    missing (ImportError, e.g. flash_attention_2) or whose Hub kernel it cannot fetch: a bad option, named,
    also when a load by name wrapped it in a WeightsError. Other errors of the block (a load's) pass unchanged."""
    try:
        yield
    except (ValueError, ImportError, OSError, WeightsError) as err:
        cause = err.__cause__ if isinstance(err, WeightsError) and not isinstance(err, OfflineError) else err
        if name is None or isinstance(cause, AttnzooError) or not isinstance(cause, ValueError | ImportError | OSError):
            raise
        text = str(cause).strip()
        if name not in text and "attention" not in text.lower():
            raise
        reason = text.splitlines()[0] if text else type(cause).__name__
        raise InvalidOptionError(f"attn_implementation={name!r} cannot be used here: {reason}") from err


def _check_beam_images(model: Any, family: Any, images_per_prompt: Sequence[int]) -> None:
    """What transformers' beam search gets wrong with images, refused here, named: before 5.19 a prompt of
    several images gets other images in its beam rows (silently). (Prompts of LLaVA-NeXT images of
    different tile counts in one batch are fine: their beams match each prompt's own, 5.18 to 5.25.)"""
    from attnzoo.multimodal.hallucination.transformers_compat import beams_keep_prompt_images

    if max(images_per_prompt, default=1) > 1 and not beams_keep_prompt_images(model):
        import transformers

        raise InvalidOptionError(
            f"beam search on prompts of several images (CARVE's official final pass: [original, refined]) needs "
            f"transformers >= 5.19 for {family.name}: transformers {transformers.__version__} gives a prompt's beams "
            "other images; use num_beams=1 or CARVE's behaviour='paper', or upgrade transformers"
        )


def _method_settings(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidOptionError(
            f"method_settings must map setting names to values, e.g. {{'alpha': 1.0}}; got {value!r}"
        )
    return dict(value)


def _check_keywords(kwargs: Mapping[str, Any]) -> None:
    """Refuse a keyword that is neither a setting of the pipeline nor one of any registered method's (a method's
    setting that the chosen methods do not take is said by :func:`build_methods`, which knows them), naming the
    close ones: otherwise it would be read as a method setting and refused as one that no method takes, or, in a
    call without a question, hidden behind "question= is required"."""
    from attnzoo.multimodal.hallucination.methods import METHODS

    extra = [k for k in kwargs if k not in _CALL_KEYWORDS]
    if isinstance(kwargs.get("method_settings"), Mapping):
        extra += [k for k in kwargs["method_settings"] if isinstance(k, str)]
    if not extra:
        return
    settings = sorted({name for entry in METHODS.values() for name in entry.settings()})
    unknown = [k for k in extra if k not in settings]
    if unknown:
        known = [*_CALL_KEYWORDS, "question", *settings]
        hints = [
            f"{k!r} (did you mean {', '.join(close)}?)" if (close := close_names(k, known, limit=3)) else repr(k)
            for k in unknown
        ]
        raise InvalidOptionError(
            f"unknown keyword(s) {', '.join(hints)}: the pipeline takes {', '.join(_CALL_KEYWORDS)}, the inputs' "
            f"question and seed, and the methods' settings ({', '.join(settings)})"
        )


def _dispatched_device(model: Any) -> torch.device | None:
    """Where a model spread over several devices (``device_map``) takes its inputs; None otherwise."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map or len(set(map(str, device_map.values()))) <= 1:
        return None
    return model.get_input_embeddings().weight.device


def _check_dispatched_placement(model: Any, device: Any, dtype: Any) -> None:
    """Refuse a ``device`` or a ``dtype`` other than its own for a model spread over several devices: the
    pipeline leaves it where its device map put it, so either would be ignored."""
    from attnzoo.pipelines.base import resolve_dtype

    spread = sorted(set(map(str, model.hf_device_map.values())))
    how = f"the model is spread over devices {', '.join(spread)} by its device map (hf_device_map) and stays as loaded"
    if device is not None:
        raise InvalidOptionError(
            f"device={device!r} cannot apply: {how}; load it with the device_map you want instead, or leave device= out"
        )
    wanted = resolve_dtype(dtype)
    if wanted is not None and wanted != model.dtype:
        raise InvalidOptionError(
            f"dtype={dtype!r} cannot apply: {how}, in {model.dtype}; load it in the dtype you want instead "
            "(from_pretrained(..., dtype=..., device_map=...)), or leave dtype= out"
        )


@contextmanager
def _kept_in_place(model: Any) -> Iterator[None]:
    """The pipeline base moves its model to one device; a dispatched model must stay where it is."""
    model.__dict__["to"] = lambda *args, **kwargs: model
    try:
        yield
    finally:
        model.__dict__.pop("to", None)


_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(model: Any) -> threading.RLock:
    """One answer at a time per model: the methods attach to the model, keep per-prompt state in it and
    swap its generation config while generate runs, so pipelines sharing a model from several threads
    (a loaded checkpoint is shared by name) take turns instead of mixing their states."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def _plain_generation_config(model: Any) -> Iterator[None]:
    """Only the model's special token ids while inside: its generation_config's penalties and sampling
    defaults (e.g. Qwen2-VL's repetition penalty) would otherwise join every ``generate`` unrecorded."""
    from transformers import GenerationConfig

    saved = model.generation_config
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    model.generation_config = GenerationConfig(**{k: getattr(saved, k, None) for k in keep})
    try:
        yield
    finally:
        model.generation_config = saved


class _RowSampler:
    """The last logits processor of sampled decoding: draws each row's next token from its own
    generator and leaves only that token, which greedy selection then takes. An answer's draws depend on
    its seed alone, not on the batch it ran in (resumed and sharded evaluations draw the same)."""

    def __init__(self, seeds: Sequence[int | None], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s or 0)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1)
        if probs.shape[0] != len(self.generators):
            raise InvalidOptionError("sampled decoding draws one answer per prompt (num_return_sequences=1)")
        tokens = torch.stack(
            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators, strict=True)]
        )
        chosen = torch.full_like(scores, -math.inf)
        return chosen.scatter_(1, tokens, 0.0)


class _AttentionRecorder:
    """Forward hooks on the language model's attention modules: per forward of the main stream, the last
    query row's attention (mean over heads), summed over the chosen layers; contrast branches are skipped."""

    def __init__(self, family: Any, layers: Sequence[int] | None):
        self.family = family
        modules = family.text_model().layers
        self.layers = tuple(range(len(modules))) if layers is None else tuple(layers)
        if any(not -len(modules) <= i < len(modules) for i in self.layers):
            raise InvalidOptionError(f"attention_layers {self.layers} do not fit {len(modules)} layers")
        self.modules = [modules[i].self_attn for i in self.layers]
        self.steps: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _AttentionRecorder:
        self._handles = [self.family.text_model().register_forward_pre_hook(self._new_step)]
        self._handles += [m.register_forward_hook(self._record) for m in self.modules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    @staticmethod
    def _main_stream() -> bool:
        from attnzoo.multimodal.hallucination.base import MAIN_STREAM, current_stream

        return current_stream() == MAIN_STREAM

    def _new_step(self, module: Any, args: Any) -> None:
        if self._main_stream():
            self.steps.append(None)  # type: ignore[arg-type]

    def _record(self, module: Any, args: Any, output: Any) -> None:
        if not self._main_stream():
            return
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise InvalidOptionError("return_attention needs attention weights, and this attention returned none")
        row = weights[:, :, -1, :].float().mean(dim=1).cpu()
        self.steps[-1] = row if self.steps[-1] is None else self.steps[-1] + row

    def grids(self, tokens: Any, runs: Mapping[int, Sequence[Any]], lengths: Sequence[int]) -> list[list[np.ndarray]]:
        """Each prompt's attention over each of its images' grids (``runs``: its images' token runs, in
        order), averaged over layers and answer tokens."""
        tokens.require_grid("return_attention")
        out = []
        for sample, length in enumerate(lengths):
            if not runs.get(sample):
                raise InvalidInputError(f"prompt {sample} holds no image tokens")
            steps = self.steps[: max(length, 1)]
            means = [torch.stack([s[sample, run.grid_positions] for s in steps]).mean(0) for run in runs[sample]]
            out.append([(mean / len(self.layers)).reshape(run.grid).numpy() for mean, run in zip(means, runs[sample])])
        return out
