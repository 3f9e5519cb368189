"""``pipeline("subject-insertion")``: put a subject from one photo into a masked region of another, with
FLUX.1-Fill and In-Context Brush's attention edit (or Diptych Prompting's, or none).

>>> insert = attnzoo.pipeline("subject-insertion")                   # FLUX.1-Fill-dev  # doctest: +SKIP
>>> out = insert("snow.jpg", subject="barn.jpg", subject_word="barn", mask="snow.json",
...              prompt="A barn in the snow")                                           # doctest: +SKIP
>>> out.image.save("barn-in-snow.png"); out.plot().save("barn-in-snow-plot.png")        # doctest: +SKIP

The subject (segmented with ``subject_mask=``, a ``subject_word`` through Grounding DINO + SAM, or an RGBA
photo's alpha) is pasted on white and put beside the target in one canvas (a vertical diptych by
default); FLUX.1-Fill inpaints the target's masked region with the edit installed in its attention.
``behaviour="corrected"`` (default) or ``"official"`` (see :mod:`attnzoo.multimodal.insertion.layout`
and the docs page); the result records which ran.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from attnzoo._values import real_number, refuse_per_input_defaults, whole_number
from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.pipelines.base import Pipeline, generator_seed, list_collate, weights_note

__all__ = [
    "METHODS",
    "InsertionResult",
    "SubjectInsertionPipeline",
    "attention_settings",
    "check_settings",
    "panel_layout",
    "run_settings",
]

METHODS = ("in-context-brush", "diptych", "none")
#: The forward parameter holding one call's record of the warnings it gave (each call its own).
_SAID = "_warnings_said"
#: A sample's key holding an input whose subject is still to segment (in the calling process).
_TO_SEGMENT = "subject_to_segment"
_SAMPLE_KEYS = ("inputs", "prompt", "seed", "prompt_embeds", "pooled")
#: Held while a pipeline builds its segmenter (module-wide: a pipeline stays picklable for DataLoader workers).
_SEGMENTER_LOCK = threading.Lock()
_METHOD_ALIASES = {
    "icb": "in-context-brush",
    "in_context_brush": "in-context-brush",
    "incontextbrush": "in-context-brush",
}


@dataclass
class InsertionResult:
    """One insertion: the target with the subject inserted, and everything that made it."""

    image: Image.Image
    """The target with the subject inserted, at the target's size."""
    canvas: Image.Image
    """The generated diptych (subject's panel and target's panel)."""
    canvas_input: Image.Image
    """The diptych FLUX inpainted: subject on white beside the target."""
    canvas_mask: np.ndarray
    """uint8 ``[H, W]`` over the canvas, white = filled."""
    mask: np.ndarray
    """bool ``[H, W]`` over the target: where it was filled."""
    subject: Image.Image
    """The subject pasted on white, as it went into the canvas."""
    target: Image.Image
    prompt: str | None
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    """Model, method, behaviour (official or corrected), steps, guidance, layout, attention settings, blending."""
    weights: str | None = None
    subject_mask: np.ndarray | None = None
    """bool over the subject photo: the subject's pixels (None: the whole photo)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "seed": self.seed,
            "target_size": list(self.target.size),
            "mask_pixels": int(self.mask.sum()),
            "canvas_size": list(self.canvas.size),
            **self.settings,
        }

    def summary(self) -> str:
        s = self.settings
        width, height = self.target.size
        return (
            f"{s.get('method')} ({s.get('behaviour')}), seed {self.seed}, {s.get('steps')} steps: filled "
            f"{int(self.mask.sum())} px of the {width}x{height} target"
        )

    #: The files :meth:`write_files` writes beside the picture: ``<stem>-<suffix>.png``.
    file_suffixes: ClassVar[tuple[str, ...]] = ("inserted", "canvas")

    def write_files(self, folder: str | os.PathLike, stem: str) -> list[Path]:
        """``<stem>-inserted.png`` (the result) and ``<stem>-canvas.png`` (the generated diptych), written atomically."""
        from attnzoo._io import atomic_write

        written = []
        for suffix, picture in zip(self.file_suffixes, (self.image, self.canvas), strict=True):
            path = Path(folder) / f"{stem}-{suffix}.png"
            with atomic_write(path, "wb") as fh:
                picture.save(fh, format="PNG")
            written.append(path)
        return written

    def plot(self, height: int = 256) -> Image.Image:
        """Subject | target with the mask | result, side by side, over the prompt and settings (wrapped
        to the width) and a red note when the weights were random. Each picture fits a box ``height``
        tall and twice as wide (its shape kept); each panel is at least as wide as its title."""
        from attnzoo.viz.drawing import NOTE_COLOUR, load_font, text_width, wrap_text

        pictures = [self.subject, self.target, self.image]
        sizes = [_fit_box(p.size, (2 * height, height)) for p in pictures]
        panels = [
            ("subject", _shown(self.subject, sizes[0])),
            ("target + mask", _mask_shown(self.target, self.mask, sizes[1])),
            ("result", _shown(self.image, sizes[2])),
        ]
        font = load_font(14)
        note = weights_note(self.weights)
        header, line, pad = 22, 20, 8
        slots = [max(picture.width, math.ceil(text_width(title, font))) for title, picture in panels]
        tallest = max(picture.height for _, picture in panels)
        width = sum(slots) + pad * (len(slots) + 1)
        caption = f"\u201c{self.prompt}\u201d  " if self.prompt else ""
        caption += f"{self.settings.get('method')}, {self.settings.get('behaviour')}, seed {self.seed}"
        lines = [(text, (60, 60, 60)) for text in wrap_text(caption, font, width - 2 * pad)]
        if note:
            lines += [
                (text, NOTE_COLOUR) for text in wrap_text(f"{note}: the result is meaningless", font, width - 2 * pad)
            ]
        sheet = Image.new("RGB", (width, tallest + header + line * len(lines) + pad), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        x = pad
        for (title, picture), slot in zip(panels, slots, strict=True):
            sheet.paste(picture, (x + (slot - picture.width) // 2, header))  # centred under a wider title
            draw.text((x, 3), title, fill=(0, 0, 0), font=font)
            x += slot + pad
        for i, (text, colour) in enumerate(lines):
            draw.text((pad, header + tallest + 4 + line * i), text, fill=colour, font=font)
        return sheet


def _fit_box(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """``size`` scaled (up or down, its shape kept) to the largest that fits ``box``; each side at least 1."""
    scale = min(box[0] / max(size[0], 1), box[1] / max(size[1], 1))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _shown(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    from attnzoo.viz.drawing import resize_picture

    return resize_picture(picture.convert("RGB"), size)


def _mask_shown(target: Image.Image, mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """``target`` at ``size``, the mask shaded red over it and outlined by a 2 px solid red line drawn at
    that size (so the line stays thin however much the target is magnified). The mask is resized as
    nearest when it grows and as "any pixel masked" when it shrinks (a thin mask does not vanish); the
    picture's border is no edge (a mask reaching it is outlined on its inner sides only)."""
    shaded = np.asarray(_shown(target, size), dtype=np.float32).copy()
    mask = np.asarray(mask, dtype=bool)
    grows = size[0] >= mask.shape[1] and size[1] >= mask.shape[0]
    if grows:
        shown = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127
    else:
        coverage = Image.fromarray(mask.astype(np.float32)).resize(size, Image.Resampling.BOX)
        shown = np.asarray(coverage) > 1e-6
    shaded[shown] = 0.5 * shaded[shown] + 0.5 * np.array([255.0, 40.0, 40.0])
    inner = shown
    for _ in range(2):  # erode twice (4-neighbours), the border padded as mask: what is left is the 2 px edge
        padded = np.pad(inner, 1, mode="edge")
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    shaded[shown & ~inner] = (255.0, 0.0, 0.0)
    return Image.fromarray(shaded.round().astype(np.uint8))


def _method(value: Any) -> str:
    name = str(value).strip().lower()
    name = _METHOD_ALIASES.get(name.replace(" ", "-"), name.replace("_", "-"))
    if name not in METHODS:
        raise InvalidOptionError(f"method must be one of {', '.join(METHODS)}, got {value!r}")
    return name


#: Bounds with their reason: FLUX's scheduler is trained on 1000 timesteps (more steps revisit them), its T5
#: encoder takes 512 tokens, and FLUX was trained up to about 2 megapixels (a panel side past 4096 px, doubled
#: by the diptych, needs more memory than any GPU has).
_LIMITS = {
    "steps": (1000, "the scheduler's 1000 training timesteps"),
    "max_sequence_length": (512, "FLUX's T5 text encoder takes at most 512 tokens"),
    "panel height": (4096, "FLUX was trained up to about 2 megapixels; the diptych doubles the panel"),
    "panel width": (4096, "FLUX was trained up to about 2 megapixels; the diptych doubles the panel"),
}


def _count(name: str, value: Any) -> int:
    high, why = _LIMITS[name]
    return whole_number(value, name, high=high, why=why)


def _step_window(value: Any) -> tuple[float, float]:
    """``(start, stop)`` steps: two ints are step indices, two floats in [0, 1] fractions of the run's steps;
    a pair or ``"0,25"`` / ``"0,0.5"`` (a string with a decimal point or exponent in either end is two
    fractions). Mixed or out-of-range windows and empty ones are refused (they would edit no step unseen)."""
    from attnzoo.multimodal.insertion.in_context_brush import STEP_WINDOW_FORMS, check_step_window

    parts = [v.strip() for v in value.replace(":", ",").split(",")] if isinstance(value, str) else value
    try:
        parts = list(parts)
        fractions = isinstance(value, str) and any(not p.lstrip("+-").isdigit() for p in parts)
        window = [
            float(v) if fractions else int(v) if isinstance(v, str) else v.item() if isinstance(v, np.generic) else v
            for v in parts
        ]
    except (TypeError, ValueError):
        raise InvalidOptionError(
            f"step_window must be two numbers (start, stop): a window is {STEP_WINDOW_FORMS}; got {value!r}"
        ) from None
    if len(window) != 2:
        raise InvalidOptionError(
            f"step_window must be two numbers (start, stop): a window is {STEP_WINDOW_FORMS}; got {value!r}"
        )
    try:
        return check_step_window(tuple(window))
    except InvalidInputError as err:
        raise InvalidOptionError(str(err)) from None


def _check_window_edits(window: tuple[float, float] | None, steps: int) -> None:
    """A step window that edits no step of a ``steps`` run is refused (the run would be plain FLUX Fill)."""
    from attnzoo.multimodal.insertion.in_context_brush import window_steps

    if window is None or window_steps(window, steps):
        return
    if isinstance(window[0], int):
        raise InvalidOptionError(
            f"step_window {tuple(window)} starts at or after the last of the run's {steps} steps: "
            "the edit would run in no step"
        )
    raise InvalidOptionError(
        f"step_window {tuple(window)} holds no step of the run's {steps} steps (the fractions mark steps "
        f"{window[0] * steps:g} to {window[1] * steps:g}, end excluded): the edit would run in no step; widen it"
    )


def _blocks(value: Any) -> tuple[int, ...]:
    """Block indices from ints, or a string like ``"0-18"`` / ``"0,3,5-7"``."""
    if isinstance(value, str):
        out: list[int] = []
        try:
            for part in value.split(","):
                if "-" in part.strip()[1:]:
                    low, high = part.split("-", 1)
                    if int(high) < int(low):
                        raise ValueError(part)
                    out.extend(range(int(low), int(high) + 1))
                else:
                    out.append(int(part))
        except ValueError:
            raise InvalidOptionError(
                f"blocks must be indices like '0-18' or '0,3,5-7' (ranges low-high, no blanks), got {value!r}"
            ) from None
        return tuple(out)
    try:
        out = [int(b) for b in value]
    except (TypeError, ValueError):
        raise InvalidOptionError(f"blocks must be block indices, got {value!r}") from None
    if not out:
        raise InvalidOptionError("blocks is empty: the edit would run in no block (leave it out for all blocks)")
    return tuple(out)


def _onoff(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise InvalidOptionError(f"blend must be on or off, got {value!r}")


class SubjectInsertionPipeline(Pipeline):
    """``p(target, subject=..., mask=..., prompt=...)``; also a dict per input or a list of them.

    Per input: ``subject`` (image), ``mask`` (where to insert: an array, a mask image or a VIA annotation),
    ``prompt``, optionally ``subject_mask`` or ``subject_word``, ``seed``, ``prompt_embeds`` and
    ``pooled_prompt_embeds`` (for a model without text encoders). Settings (constructor or call):
    ``method`` ("in-context-brush", "diptych", "none"), ``behaviour`` ("corrected", "official"), ``steps``
    (50), ``guidance`` (30), ``seed`` (0), ``panel_size`` (768), ``orientation`` (vertical; Diptych's
    default horizontal), ``blend`` (on with the corrected behaviour), ``shift_img``/``shift_txt`` (0.3),
    ``head_gain`` (0.2), ``enforce`` (Diptych's lambda, 1.3), ``blocks``, ``step_window``,
    ``max_sequence_length`` (512). Constructor only: ``cpu_offload``, ``segmenter``.

    A ``subject_word`` is segmented (Grounding DINO + SAM) in the calling process, by one segmenter built
    on first use and kept; with ``num_workers > 0`` the workers read and check the other inputs.
    """

    task = "subject-insertion"
    primary_field = "target"
    input_fields = (
        "subject",
        "mask",
        "prompt",
        "subject_mask",
        "subject_word",
        "seed",
        "prompt_embeds",
        "pooled_prompt_embeds",
    )
    # one 2-D mask (an array or a tensor, [height, width]) is the mask of every target, not a row per target; a
    # list of masks (arrays, images, paths, VIA annotations or region lists) gives one per target
    field_depths = {"mask": 2, "subject_mask": 2}
    collate = staticmethod(list_collate)
    prepared_here_key = _TO_SEGMENT

    @classmethod
    def accepts(cls, model: Any) -> bool:
        from diffusers import FluxFillPipeline

        from attnzoo.multimodal.insertion.flux import FluxFillModel

        return isinstance(model, (FluxFillModel, FluxFillPipeline))

    def __init__(
        self,
        model: Any,
        *,
        device: str | int | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 1,
        cpu_offload: bool = False,
        segmenter: Any = None,
        **kwargs: Any,
    ):
        from attnzoo.multimodal.insertion.flux import FluxFillModel, _offload
        from attnzoo.pipelines.base import resolve_device, resolve_dtype

        fields = [name for name in self.input_fields if name not in _named_settings(self._sanitize_parameters)]
        refuse_per_input_defaults(kwargs, fields, "p(target, subject=..., mask=..., prompt='...')")
        model = model if isinstance(model, FluxFillModel) else FluxFillModel(model)
        with without_empty_float32_warning():
            if cpu_offload and not model.offloaded:
                if dtype is not None:  # cast first, where the weights are: the offload hooks then move the cast weights
                    model.to(dtype=resolve_dtype(dtype))
                _offload(model, resolve_device(device))
            self.segmenter = segmenter
            super().__init__(model, device=device, dtype=dtype, batch_size=batch_size, **kwargs)

    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        """``p(target, ...)`` or ``p(target=..., ...)``."""
        if inputs is None:
            if kwargs.get("target") is None:
                raise InvalidInputError("give the target image: p(target, subject=..., mask=..., prompt=...)")
            inputs = kwargs.pop("target")
        return super().__call__(inputs, **kwargs)

    def _with_fields(self, items: list[Any], fields: dict[str, Any]) -> list[dict[str, Any]]:
        """The base's, after this task's rules for what is one value of a call keyword (for every target) and
        what is one per target (:func:`_per_target`)."""
        given = {name: _per_target(name, value, len(items)) for name, value in fields.items()}
        return super()._with_fields(items, given)

    def _merged_parameters(self, kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
        """The base's, and a fresh record of the warnings given, in the forward parameters of this one call
        (``__call__`` / ``iterate``): a warning is said once per call, and interleaved calls (two ``iterate``
        generators, two threads) each say their own."""
        pre, fwd, post = super()._merged_parameters(kwargs)
        return pre, {**fwd, _SAID: set()}, post

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        known = inspect.signature(check_settings).parameters
        check_settings(**{k: v for k, v in settings.items() if k in known})

    def _sanitize_parameters(
        self,
        method: str | None = None,
        behaviour: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        panel_size: int | tuple[int, int] | str | None = None,
        orientation: str | None = None,
        blend: bool | str | None = None,
        shift_img: float | None = None,
        shift_txt: float | None = None,
        head_gain: float | None = None,
        enforce: float | None = None,
        blocks: Any = None,
        step_window: Any = None,
        max_sequence_length: int | None = None,
    ) -> tuple[dict, dict, dict]:
        given = check_settings(**{k: v for k, v in locals().items() if k != "self"})
        if "blocks" in given:
            _check_blocks(self.model.transformer, given)
        return given, given, given

    def layout(self, settings: dict[str, Any]) -> Any:
        return panel_layout(settings, self.model.vae_scale_factor)

    # -- the stages --------------------------------------------------------------------------

    def preprocessor(self, **params: Any) -> Callable[[Any], dict[str, Any]]:
        """Per input, in DataLoader workers when ``num_workers > 0``: an input naming a ``subject_word`` is only
        checked there and segmented by :meth:`prepare_here` in this process (one segmenter, on the pipeline's
        device: a worker would load its own copy of the models, and cannot use CUDA)."""
        return functools.partial(self._read, **params)

    def _read(self, item: dict[str, Any], **given: Any) -> dict[str, Any]:
        if isinstance(item, Mapping) and item.get("subject_word") is not None and item.get("subject_mask") is None:
            self._check_item(item)
            return {**dict.fromkeys(_SAMPLE_KEYS), _TO_SEGMENT: item}
        return {**self.preprocess(item, **given), _TO_SEGMENT: None}

    def prepare_here(self, item: dict[str, Any], num_workers: int, **given: Any) -> dict[str, Any]:
        """An input marked by :meth:`_read`, its subject segmented here."""
        return self.preprocess(item, **given)

    def _segmenter(self) -> Any:
        """The segmenter given, else one built on first use (on the pipeline's device) and kept for later calls."""
        with _SEGMENTER_LOCK:
            if self.segmenter is None:
                from attnzoo.multimodal.insertion.segment import SubjectSegmenter

                self.segmenter = SubjectSegmenter(device=self.device)
            return self.segmenter

    def _check_item(self, item: dict[str, Any]) -> None:
        """An input's keys and required parts (a typed error for a missing or unknown one)."""
        unknown = sorted(set(item) - {self.primary_field, *self.input_fields})
        if unknown:
            raise InvalidInputError(
                f"unknown input keys {unknown}; an input takes {self.primary_field}, {', '.join(self.input_fields)}"
            )
        if item.get("target") is None:
            raise InvalidInputError("the target image is missing")
        if item.get("subject") is None:
            raise InvalidInputError("subject= is required: the photo of the subject to insert")
        prompt, embeds = item.get("prompt"), item.get("prompt_embeds")
        if embeds is None:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidInputError("prompt= is required: a short caption of the result, e.g. 'A barn in the snow'")
        elif item.get("pooled_prompt_embeds") is None:
            raise InvalidInputError("prompt_embeds= needs pooled_prompt_embeds= too")
        else:
            self.model.check_prompt_embeds(embeds, item["pooled_prompt_embeds"])
            for name, dims in _EMBEDDING_DIMS.items():
                _one_prompt(item[name], dims, name)

    def preprocess(self, item: dict[str, Any], **given: Any) -> dict[str, Any]:
        from attnzoo.multimodal.insertion.inputs import prepare_inputs

        settings = run_settings(given)
        self._check_item(item)
        word = item.get("subject_word")
        segmenter = self._segmenter() if word is not None and item.get("subject_mask") is None else self.segmenter
        inputs = prepare_inputs(
            item["subject"],
            item["target"],
            item.get("mask"),
            self.layout(settings),
            subject_mask=item.get("subject_mask"),
            subject_word=word,
            segmenter=segmenter,
            behaviour=settings["behaviour"],
        )
        seed = _seed(item["seed"]) if item.get("seed") is not None else given.get("seed", 0)
        return {
            "inputs": inputs,
            "prompt": item.get("prompt"),
            "seed": seed,
            "prompt_embeds": item.get("prompt_embeds"),
            "pooled": item.get("pooled_prompt_embeds"),
        }

    def _forward(self, batch: dict[str, list[Any]], **given: Any) -> dict[str, Any]:
        from attnzoo.multimodal.insertion.flux import run_fill

        settings = run_settings(given)
        attention = attention_settings(given)
        _check_window_edits(given.get("step_window"), settings["steps"])
        canvases = []
        for inputs, prompt, seed, embeds, pooled in zip(
            batch["inputs"], batch["prompt"], batch["seed"], batch["prompt_embeds"], batch["pooled"]
        ):
            if embeds is None:
                embeds, pooled = self.model.encode_prompt(prompt, settings["max_sequence_length"])
            embeds = _one_prompt(embeds, 3, "prompt_embeds").to(self.model.device, self.model.dtype)
            _warn_official_slicing(attention, settings["orientation"], embeds.shape[1], given.get(_SAID))
            pooled = _one_prompt(pooled, 2, "pooled_prompt_embeds").to(self.model.device, self.model.dtype)
            out = run_fill(
                self.model,
                inputs.canvas,
                inputs.canvas_mask,
                attention,
                orientation=settings["orientation"],
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                num_inference_steps=settings["steps"],
                guidance_scale=settings["guidance"],
                seed=seed,
                blend=settings["blend"],
                max_sequence_length=settings["max_sequence_length"],
            )
            canvases.append(out.image)
        return {**batch, "canvas": canvases}

    def postprocess(self, outputs: dict[str, Any], **given: Any) -> InsertionResult:
        from attnzoo.multimodal.insertion.layout import panel_of

        inputs = outputs["inputs"]
        settings = run_settings(given, inputs.layout)
        canvas = (outputs["canvas"].permute(1, 2, 0).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        target_h, target_w = inputs.target.shape[:2]
        result = Image.fromarray(np.ascontiguousarray(panel_of(canvas, inputs.layout, 1))).resize((target_w, target_h))
        return InsertionResult(
            image=result,
            canvas=Image.fromarray(canvas),
            canvas_input=Image.fromarray(inputs.canvas),
            canvas_mask=inputs.canvas_mask,
            mask=inputs.target_mask,
            subject=Image.fromarray(inputs.subject_on_white),
            target=Image.fromarray(inputs.target),
            prompt=outputs["prompt"],
            seed=int(outputs["seed"]),
            settings={"model": self.model.name, **settings},
            weights=self.weights_label,
            subject_mask=inputs.subject_mask,
        )


def _warn_official_slicing(attention: Any, orientation: str, text_len: int, said: set[str] | None) -> None:
    """In-Context Brush's official op assumes a vertical diptych and 512 text tokens: it slices a literal
    512 and two halves of the rest. On another canvas the edit boosts the wrong tokens; said once per call
    (``said``: the call's record of the warnings given; None: say it), at the user's line."""
    from attnzoo.multimodal.insertion.layout import OFFICIAL_TEXT_LEN

    if attention.behaviour != "official" or attention.method != "in-context-brush" or attention.is_identity:
        return
    if said is not None and "official-slicing" in said:
        return
    wrong = []
    if orientation != "vertical":
        wrong.append(f"on this {orientation} canvas each half of the image tokens is half subject, half target panel")
    if text_len != OFFICIAL_TEXT_LEN:
        wrong.append(
            f"the text has {text_len} tokens, so the {OFFICIAL_TEXT_LEN}-token text slice takes in image tokens"
            if text_len < OFFICIAL_TEXT_LEN
            else f"the text has {text_len} tokens, so text tokens fall into the image halves"
        )
    if wrong:
        if said is not None:
            said.add("official-slicing")
        warnings.warn(
            "behaviour='official' slices In-Context Brush's tokens as the official code does (a literal "
            f"{OFFICIAL_TEXT_LEN} text tokens, then the top and bottom halves of a vertical diptych): "
            + "; ".join(wrong)
            + ". The edit then shifts the wrong tokens; use behaviour='corrected' (slices by the real layout), "
            f"orientation='vertical' and max_sequence_length={OFFICIAL_TEXT_LEN} to match the official setting.",
            UserWarning,
            stacklevel=_outside_attnzoo(),
        )


def _outside_attnzoo() -> int:
    """The ``stacklevel`` that points a warning, given by the function calling this one, at the first frame
    outside attnzoo: the user's line that called the pipeline (2, the warner's caller, when none is)."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "attnzoo":
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def check_settings(
    method: str | None = None,
    behaviour: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    panel_size: int | tuple[int, int] | str | None = None,
    orientation: str | None = None,
    blend: bool | str | None = None,
    shift_img: float | None = None,
    shift_txt: float | None = None,
    head_gain: float | None = None,
    enforce: float | None = None,
    blocks: Any = None,
    step_window: Any = None,
    max_sequence_length: int | None = None,
) -> dict[str, Any]:
    """The settings given (None = not given), checked and normalised; refused with :class:`InvalidOptionError`."""
    from attnzoo.multimodal.insertion.layout import ORIENTATIONS, check_behaviour

    given: dict[str, Any] = {}
    if method is not None:
        given["method"] = _method(method)
    if behaviour is not None:
        try:
            given["behaviour"] = check_behaviour(str(behaviour).lower())
        except InvalidInputError as err:
            raise InvalidOptionError(str(err)) from None
    for name, count in (("steps", steps), ("max_sequence_length", max_sequence_length)):
        if count is not None:
            given[name] = _count(name, count)
    for name, value in (
        ("guidance", guidance),
        ("shift_img", shift_img),
        ("shift_txt", shift_txt),
        ("head_gain", head_gain),
        ("enforce", enforce),
    ):
        if value is not None:
            given[name] = real_number(value, name)
    if seed is not None:
        given["seed"] = _seed(seed)
    if panel_size is not None:
        given["panel_size"] = _panel_size(panel_size)
    if orientation is not None:
        if orientation not in ORIENTATIONS:
            raise InvalidOptionError(f"orientation must be 'vertical' or 'horizontal', got {orientation!r}")
        given["orientation"] = orientation
    if blend is not None:
        given["blend"] = _onoff(blend)
    if blocks is not None:
        given["blocks"] = _blocks(blocks)
    if step_window is not None:
        given["step_window"] = _step_window(step_window)
    attention_settings(given)  # refused here: at construction, or before any image is read
    return given


def run_settings(given: dict[str, Any], layout: Any = None) -> dict[str, Any]:
    """Every setting of a run, defaults filled in (what results and reports record). With the run's
    :class:`~attnzoo.multimodal.insertion.layout.PanelLayout`, ``panel_size`` is the panels it used (the
    asked size rounded to whole tokens, :func:`panel_layout`), not the one asked for."""
    method = given.get("method", "in-context-brush")
    behaviour = given.get("behaviour", "corrected")
    panel_size = (
        (layout.panel_height, layout.panel_width) if layout is not None else given.get("panel_size", (768, 768))
    )
    return {
        "method": method,
        "behaviour": behaviour,
        "steps": given.get("steps", 50),
        "guidance": given.get("guidance", 30.0),
        "panel_size": list(panel_size),
        "orientation": given.get("orientation", "horizontal" if method == "diptych" else "vertical"),
        "blend": given.get("blend", behaviour == "corrected"),
        "max_sequence_length": given.get("max_sequence_length", 512),
        "attention": attention_settings(given).to_dict(),
    }


def panel_layout(settings: dict[str, Any], vae_scale_factor: int) -> Any:
    """The panels a run of :func:`run_settings` ``settings`` uses on a model with this VAE factor: the
    asked ``panel_size`` rounded to whole tokens (with a warning when it changes)."""
    from attnzoo.multimodal.insertion.layout import PanelLayout

    height, width = settings["panel_size"]
    return PanelLayout.fit(height, width, orientation=settings["orientation"], vae_scale_factor=vae_scale_factor)


def _check_blocks(transformer: Any, given: dict[str, Any]) -> None:
    """``blocks=`` names blocks the model has (refused when the pipeline is made or called, before any image)."""
    from attnzoo.multimodal.insertion.in_context_brush import check_blocks

    try:
        check_blocks(transformer, attention_settings(given))
    except InvalidInputError as err:
        raise InvalidOptionError(str(err)) from None


def attention_settings(given: dict[str, Any]) -> Any:
    """The :class:`~attnzoo.multimodal.insertion.in_context_brush.InsertionAttention` of the settings."""
    from attnzoo.multimodal.insertion.in_context_brush import InsertionAttention

    method = given.get("method", "in-context-brush")
    common = dict(
        behaviour=given.get("behaviour", "corrected"), blocks=given.get("blocks"), steps=given.get("step_window")
    )
    icb = {k: given[k] for k in ("shift_img", "shift_txt", "head_gain") if k in given}
    try:
        if method == "none":
            if icb or "enforce" in given:
                raise InvalidOptionError("method='none' takes no shift_img, shift_txt, head_gain or enforce")
            return InsertionAttention.none(**common)
        if method == "diptych":
            if icb:
                raise InvalidOptionError(
                    "Diptych's setting is enforce= (lambda); shift_img/shift_txt/head_gain are In-Context Brush's"
                )
            return InsertionAttention.diptych(given.get("enforce", 1.3), **common)
        if "enforce" in given:
            raise InvalidOptionError(
                "enforce= is Diptych's lambda; In-Context Brush takes shift_img, shift_txt, head_gain"
            )
        return InsertionAttention.in_context_brush(**icb, **common)
    except InvalidOptionError:
        raise
    except InvalidInputError as err:
        raise InvalidOptionError(str(err)) from None


def _named_settings(fn: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(fn).parameters)


class _EmptyFloat32ListFilter(logging.Filter):
    """Drops diffusers' "There are modules in X that should be kept in float32: []" warning: ``ModelMixin.to``
    gives it on every cast to another dtype, also when the list of such modules is empty (FLUX's transformer
    and VAE keep none), so it says nothing; the warning naming modules, and every other one, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There are modules in ") and "should be kept in float32: []." in message)


@contextlib.contextmanager
def without_empty_float32_warning() -> Iterator[None]:
    """Within the block, diffusers' empty "should be kept in float32: []" warning is not shown."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _EmptyFloat32ListFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _seed(value: Any) -> int:
    """A seed for the fill, which draws from seed and seed + 1."""
    return generator_seed(value, spare=1)


def _panel_size(value: Any) -> tuple[int, int]:
    """Panel pixels: ``768``, ``"768"``, ``"768x512"`` (height x width) or ``(768, 512)``."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.lower().replace("x", ",").split(",")]
        except ValueError:
            raise InvalidOptionError(f"panel_size must be pixels (768) or HxW (768x512), got {value!r}") from None
        value = value[0] if len(value) == 1 else value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    try:
        height, width = value
    except (TypeError, ValueError):
        raise InvalidOptionError(f"panel_size must be pixels (768) or (height, width), got {value!r}") from None
    return _count("panel height", height), _count("panel width", width)


#: The dimensions of one batch of prompt embeddings: ``[B, S, D]`` and ``[B, P]`` (one prompt's: ``B`` = 1).
_EMBEDDING_DIMS = {"prompt_embeds": 3, "pooled_prompt_embeds": 2}
#: The numbers of channels an image array or tensor may have (grayscale, RGB, RGBA), as ``load_image`` reads them.
_IMAGE_CHANNELS = (1, 3, 4)


def _one_prompt(t: Any, dims: int, name: str) -> torch.Tensor:
    """One input's embeddings ``name`` with the batch dimension FLUX expects (``dims`` in all, a batch of 1)."""
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(np.asarray(t))
        except (TypeError, ValueError, RuntimeError):
            raise InvalidInputError(f"{name} must be a tensor or an array of numbers, got {type(t).__name__}") from None
    if t.dim() == dims - 1:
        t = t.unsqueeze(0)
    if t.dim() != dims or t.shape[0] != 1:
        raise InvalidInputError(
            f"{name} of one input must be {_embedding_shape(dims, '1')} (or without its batch dimension), "
            f"got shape {tuple(t.shape)}"
        )
    return t


def _embedding_shape(dims: int, batch: str) -> str:
    return f"[{batch}, seq, dim]" if dims == 3 else f"[{batch}, dim]"


def _per_target(name: str, value: Any, n: int) -> Any:
    """A call keyword's value for ``n`` targets as one per target, where this task's rule differs from the base's
    (which splits a 2-D tensor into rows); else ``value`` as given, for the base's rule.

    * ``subject``: a 2-D array or tensor (``[H, W]``, grayscale) or a 3-D one (an array ``[H, W, C]``, a tensor
      ``[C, H, W]``, as :func:`~attnzoo.datasets.images.load_image` reads them) is one image, every target's; a
      4-D one (``[N, H, W, C]`` / ``[N, C, H, W]``) holds one per target (``N`` = 1: every target's);
    * ``prompt_embeds`` ``[B, seq, dim]`` / ``pooled_prompt_embeds`` ``[B, dim]``: a batch of one (or no batch
      dimension) is every target's, a batch of ``n`` one per target; another batch is refused by name;
    * ``mask`` / ``subject_mask``: a list of VIA regions (dicts with ``shape_attributes``) is one annotation,
      every target's (a list of such lists gives one per target)."""
    if name == "subject" and isinstance(value, (np.ndarray, torch.Tensor)):
        return _subjects(value, n)
    if name in _EMBEDDING_DIMS and isinstance(value, (np.ndarray, torch.Tensor)):
        return _embeddings(name, value, n)
    if name in ("mask", "subject_mask") and _is_region_list(value):
        return [value] * n
    return value


def _subjects(value: np.ndarray | torch.Tensor, n: int) -> Any:
    kind = "tensor" if isinstance(value, torch.Tensor) else "array"
    shape = tuple(value.shape)
    if value.ndim == 2:
        return [value] * n
    if value.ndim == 3:
        channels = shape[0] if kind == "tensor" else shape[-1]
        if channels not in _IMAGE_CHANNELS and n > 1:  # (one target: load_image says what it reads)
            layout = "[C, H, W]" if kind == "tensor" else "[H, W, C]"
            stack = "[N, 1, H, W] tensor" if kind == "tensor" else "[N, H, W, 1] array"
            raise InvalidInputError(
                f"subject= is one image: a 3-D {kind} is {layout} with 1, 3 or 4 channels, got shape {shape}; for "
                f"one grayscale subject per target give a list of {n} [H, W] images or an {stack}"
            )
        return [value] * n
    if value.ndim == 4:
        if shape[0] == 1:
            return [value[0]] * n
        if shape[0] != n:
            raise InvalidInputError(
                f"subject= is a 4-D {kind} of {shape[0]} images (shape {shape}) for {n} target"
                f"{'s' if n > 1 else ''}: give one image for every target, or one per target"
            )
        return list(value)
    return value


def _embeddings(name: str, value: np.ndarray | torch.Tensor, n: int) -> Any:
    dims = _EMBEDDING_DIMS[name]
    if value.ndim == dims - 1:
        return [value] * n
    if value.ndim != dims:
        raise InvalidInputError(
            f"{name} must be {_embedding_shape(dims, 'batch')} (the batch: 1, every input's, or one per input), "
            f"got shape {tuple(value.shape)}"
        )
    batch = value.shape[0]
    if batch == 1:
        return [value] * n
    if batch != n:
        wanted = f"a batch of 1 (every input's) or of {n} (one per input)" if n > 1 else "a batch of 1"
        raise InvalidInputError(
            f"{name} has a batch of {batch} for {n} input{'s' if n > 1 else ''}: give {wanted}, shape "
            f"{_embedding_shape(dims, 'batch')}"
        )
    return [value[i : i + 1] for i in range(n)]


def _is_region_list(value: Any) -> bool:
    """Whether ``value`` is one VIA annotation given as its list of regions (not a list of annotations)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(region, Mapping) and "shape_attributes" in region for region in value)
    )
