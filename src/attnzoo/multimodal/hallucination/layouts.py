"""Where an LVLM puts its image tokens, one class per model family.

Every method here edits attention to the image tokens of the language model, so each needs to
know, for a batch of prompts, which positions hold image tokens, how many tokens each image
must have, and (for methods that read the vision tower patch by patch) which tokens form the
patch grid. The families and their layouts (transformers 5):

| family | model types | tokens per image | grid |
|---|---|---|---|
| LLaVA-1.5 | ``llava`` | (image_size / patch)², +1 with the ``full`` feature strategy | the whole run |
| LLaVA-NeXT | ``llava_next`` | base view + unpadded anyres crops with one newline per row | the base view (first g² tokens) |
| Qwen2-VL / Qwen2.5-VL | ``qwen2_vl``, ``qwen2_5_vl`` | t·h·w / merge² between ``<|vision_start|>`` and ``<|vision_end|>`` | (h / merge, w / merge) |
| InstructBLIP | ``instructblip`` | ``num_query_tokens`` Q-Former queries | none: a resampler |

Any other model raises :class:`~attnzoo.errors.UnknownNameError`; a count of image tokens that
the images cannot have produced raises :class:`LayoutError`. A plain causal LM (parity fixtures,
text-only experiments) works with a :class:`FixedImageSpan` instead of a family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from attnzoo.errors import InvalidInputError, InvalidOptionError, UnknownNameError


class LayoutError(InvalidInputError):
    """The image tokens of a prompt do not fit the model family's layout, or a method needs a
    layout property (a patch grid, a CLS token in the vision tower) that the family lacks."""


class UnknownFamilyError(UnknownNameError):
    """A model of no supported LVLM family; the message lists the supported model types."""

    def __init__(self, model_type: str, known: Sequence[str]):
        super().__init__("LVLM family (config.model_type)", model_type, known)
        self.args = (f"{self.args[0]} Supported: {', '.join(known)}.",)


@dataclass(frozen=True)
class ImageRun:
    """One image's tokens in the language model's sequence: ``length`` tokens from ``start`` in row
    ``sample``; ``grid`` (rows, cols) covers the tokens from ``start + grid_offset`` that map one to
    one onto the vision tower's patches (None for a resampler); ``image`` is the image's index in the
    order the vision tower saw the images (beam search repeats a prompt's rows, not its images)."""

    sample: int
    start: int
    length: int
    grid: tuple[int, int] | None = None
    grid_offset: int = 0
    image: int = 0

    @property
    def grid_positions(self) -> torch.Tensor:
        """Sequence positions of the grid tokens, row-major."""
        if self.grid is None:
            raise LayoutError("this image has no patch grid (a resampler model)")
        begin = self.start + self.grid_offset
        return torch.arange(begin, begin + self.grid[0] * self.grid[1])


@dataclass(frozen=True)
class ImageTokens:
    """The image tokens of one batch of prompts: ``mask`` bool [B, S] and the images in the order
    the vision tower saw them (row-major over samples, then positions)."""

    mask: torch.Tensor
    runs: tuple[ImageRun, ...]
    family: str
    spatial: bool = True

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def num_images(self) -> int:
        """The images the vision tower saw (fewer than the runs when beam search repeated the rows)."""
        return len({run.image for run in self.runs})

    def image_end(self) -> torch.Tensor:
        """One past the last image token of each row ([B] long; 0 for a row without images)."""
        positions = torch.arange(1, self.mask.shape[1] + 1, device=self.mask.device)
        return (self.mask * positions).amax(dim=1)

    def require_grid(self, method: str) -> None:
        """Raise :class:`LayoutError` unless every image maps one to one onto vision-tower patches."""
        if not self.spatial or any(run.grid is None for run in self.runs):
            raise LayoutError(
                f"{method} needs the image tokens to form a patch grid, but {self.family} feeds the language "
                "model resampled query tokens (no spatial grid); use a projector model (LLaVA, Qwen2-VL)"
            )


def token_runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D bool tensor, as (start, length)."""
    index = torch.nonzero(row).flatten().tolist()
    runs: list[tuple[int, int]] = []
    for i in index:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


class Family:
    """A model family: where its language model lives and how its prompts lay out image tokens."""

    name: ClassVar[str] = "?"
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Whether the image tokens map onto vision-tower patches (False for resamplers).
    spatial: ClassVar[bool] = True
    #: Whether counting image tokens needs what the vision tower saw (image sizes, grids).
    counts_need_image_info: ClassVar[bool] = False
    #: The sub-config of the language model (``set_attn_implementation``'s dict key); "" for a plain LM.
    text_config_key: ClassVar[str] = "text_config"
    #: Whether ``generate`` can continue a prompt whose first columns (an image among them) are in a
    #: given KV cache, with only the later images passed (positions from the attention mask, image
    #: features scattered into the uncached tokens): checked for LLaVA-1.5 and LLaVA-NeXT.
    continues_cached_prompts: ClassVar[bool] = False
    #: Whether every image takes the same number of tokens whatever its size (LLaVA-1.5 resizes to its
    #: tower's square; a Q-Former has its queries): a prompt's length is then known from its text and
    #: its number of images, before the images are chosen.
    fixed_image_tokens: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- modules -----------------------------------------------------------------------------
    def text_model(self) -> nn.Module:
        """The decoder stack (has ``.layers`` and ``.embed_tokens``)."""
        return self.model.model.language_model

    def text_config(self):
        return getattr(self.config, self.text_config_key) if self.text_config_key else self.config

    def context_length(self) -> int | None:
        """The language model's context in tokens (prompt, image tokens included, plus answer), or None where
        its config sets none: :func:`language_model_limits`."""
        return _context_length(self.text_config())

    def check_room(self, prompt_tokens: int, new_tokens: int, setting: str) -> None:
        """Refuse ``new_tokens`` generated after a prompt of ``prompt_tokens`` (image tokens included) where
        they pass the context: positions past it were never trained (or, with a rotary table, do not exist),
        and a huge count would run out of memory or for hours. No known context: nothing refused."""
        limit = self.context_length()
        if limit is not None and prompt_tokens + new_tokens > limit:
            room = f"at most {limit - prompt_tokens} fit" if prompt_tokens < limit else "the prompt alone fills it"
            raise InvalidOptionError(
                f"{setting}={new_tokens} after a prompt of {prompt_tokens} tokens (image tokens included) passes "
                f"the language model's context of {limit} tokens (max_position_embeddings): {room}"
            )

    def generation_module(self) -> nn.Module:
        """The module whose forward ``generate`` calls (and a contrast branch calls in its place)."""
        return self.model

    def image_info_module(self) -> nn.Module | None:
        """The module whose forward receives the image inputs at prefill (read by :meth:`read_image_info`):
        the vision tower, since ``generate`` encodes the images before its first forward."""
        return self.model.model.vision_tower

    def read_image_info(self, args: tuple, kwargs: Mapping[str, Any]) -> dict | None:
        pixels = args[0] if args else kwargs.get("pixel_values")
        return None if pixels is None else {"num_images": pixels.shape[0]}

    def inputs_image_info(self, inputs: Mapping[str, Any]) -> dict | None:
        """What :meth:`image_tokens` needs to count each image's tokens, read from a processor's model
        inputs (``pixel_values`` with ``image_sizes`` or ``image_grid_thw`` where the family has them)."""
        seen = {
            "pixel_values": inputs.get("pixel_values"),
            "image_sizes": inputs.get("image_sizes"),
            "grid_thw": inputs.get("image_grid_thw"),
        }
        return self.read_image_info((), {k: v for k, v in seen.items() if v is not None})

    def image_refusal(self, image_processor: Any, width: int, height: int) -> str | None:
        """Why the family's image processor would refuse a ``width`` x ``height`` image (None: it takes
        any non-empty size), asked before the batch is encoded so that the refusal is that image's."""
        return None

    def stateful_attributes(self) -> list[tuple[nn.Module, str]]:
        """Per-generation state a model keeps on its modules (a contrast branch must not clobber it)."""
        return []

    # -- prompt text -------------------------------------------------------------------------
    def prompt_placeholder(self, processor: Any) -> str:
        """The text that stands for one image in a prompt written by hand (the processor expands it to
        the image's tokens): the processor's image token."""
        return _image_token_text(processor)

    def image_markers(self, processor: Any) -> tuple[str, ...]:
        """Texts a question must not hold: the processor would take them for an image's (or video's)
        tokens or their markers."""
        return (_image_token_text(processor),)

    #: Why the family has no CLIP tower whose CLS attention maps onto the image tokens (if it has none).
    vision_note: ClassVar[str] = "no such vision tower"

    def vision_attention(self, layer: int, method: str, setting: str = "layer") -> nn.Module:
        """The self-attention module of vision-tower layer ``layer`` (methods reading CLS attention);
        a layer the tower lacks is an :class:`InvalidOptionError` naming the method's ``setting``."""
        raise LayoutError(
            f"{method} reads the CLS attention of a CLIP vision tower whose patches are the image tokens; "
            f"{self.name} has {self.vision_note}"
        )

    # -- layout ------------------------------------------------------------------------------
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def image_tokens(self, input_ids: torch.Tensor, image_info: Mapping[str, Any] | None = None) -> ImageTokens:
        """Locate and check the image tokens of ``input_ids`` [B, S]; ``image_info`` is what
        :meth:`read_image_info` saw at the same prefill (None when the images were not seen)."""
        try:
            return self._image_tokens(input_ids, image_info)
        except LayoutError:
            repeated = self._beam_rows(input_ids, image_info)
            if repeated is None:
                raise
            return repeated

    def _beam_rows(self, input_ids: torch.Tensor, image_info: Mapping[str, Any] | None) -> ImageTokens | None:
        """Beam search: ``generate`` encodes the prompts' images once, then repeats every prompt's row
        ``num_beams`` times (consecutive copies). The runs of the first copies, repeated onto the
        others (same images); None when the rows are not such copies of prompts that fit the images."""
        rows = input_ids.shape[0]
        if not image_info or not image_info.get("num_images"):
            return None
        for copies in range(2, rows + 1):
            if rows % copies:
                continue
            groups = input_ids.reshape(rows // copies, copies, -1)
            if not bool((groups == groups[:, :1]).all()):
                continue
            try:
                prompts = self._image_tokens(input_ids[::copies], image_info)
            except LayoutError:
                continue
            runs = tuple(
                replace(run, sample=run.sample * copies + copy)
                for prompt in range(rows // copies)
                for copy in range(copies)
                for run in prompts.runs
                if run.sample == prompt
            )
            mask = input_ids == self.image_token_id()
            return ImageTokens(mask=mask, runs=runs, family=self.name, spatial=self.spatial)
        return None

    def _image_tokens(self, input_ids: torch.Tensor, image_info: Mapping[str, Any] | None) -> ImageTokens:
        mask = input_ids == self.image_token_id()
        if not bool(mask.any()):
            return ImageTokens(mask=mask, runs=(), family=self.name, spatial=self.spatial)
        sizes = self.tokens_per_image(image_info)
        runs: list[ImageRun] = []
        for sample in range(mask.shape[0]):
            for start, length in token_runs(mask[sample]):
                runs.extend(self._split_run(sample, start, length, sizes, len(runs), image_info))
        if image_info and "num_images" in image_info and len(runs) != image_info["num_images"]:
            raise LayoutError(
                f"input_ids hold {int(mask.sum())} image tokens (id {self.image_token_id()}), which is "
                f"{len(runs)} image(s) in the {self.name} layout, but {image_info['num_images']} image(s) were given"
            )
        return ImageTokens(mask=mask, runs=tuple(runs), family=self.name, spatial=self.spatial)

    def tokens_per_image(self, image_info: Mapping[str, Any] | None) -> list[int] | int:
        """Tokens of every image in order (a list), or one count that every image has (an int)."""
        raise NotImplementedError

    def grid_for(self, index: int, image_info: Mapping[str, Any] | None) -> tuple[tuple[int, int] | None, int]:
        """(grid, offset of the grid in the run's tokens) of image ``index``."""
        return None, 0

    def _split_run(self, sample, start, length, sizes, first_index, image_info) -> list[ImageRun]:
        runs = []
        offset = 0
        while offset < length:
            index = first_index + len(runs)
            size = sizes if isinstance(sizes, int) else (sizes[index] if index < len(sizes) else None)
            if size is None or offset + size > length:
                expected = f"{sizes} per image" if isinstance(sizes, int) else f"{sizes} for the images given"
                raise LayoutError(
                    f"input_ids row {sample} has a run of {length} image tokens (id {self.image_token_id()}) at "
                    f"position {start}; the {self.name} layout needs {expected}. Build the prompt with the model's "
                    "own processor (it writes one placeholder per image feature)"
                )
            grid, grid_offset = self.grid_for(index, image_info)
            runs.append(ImageRun(sample, start + offset, size, grid, grid_offset, image=index))
            offset += size
        return runs

    def text_only(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` with every image token (and image marker) removed, left-padded
        again: the text-only prompt of a classifier-free-guidance branch."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        keep = (mask.bool()) & ~self._image_or_marker(ids)
        rows = [ids[i][keep[i]] for i in range(ids.shape[0])]
        width = max(len(r) for r in rows)
        pad = int(getattr(self.text_config(), "pad_token_id", None) or 0)
        out_ids = torch.full((len(rows), width), pad, dtype=ids.dtype, device=ids.device)
        out_mask = torch.zeros((len(rows), width), dtype=mask.dtype, device=ids.device)
        for i, row in enumerate(rows):
            out_ids[i, width - len(row) :] = row
            out_mask[i, width - len(row) :] = 1
        return {"input_ids": out_ids, "attention_mask": out_mask}

    def _image_or_marker(self, ids: torch.Tensor) -> torch.Tensor:
        return ids == self.image_token_id()

    def prefill_positions(self, inputs: Mapping[str, Any], text_positions: torch.Tensor) -> torch.Tensor | None:
        """The position ids of a prompt forward (None: the model derives them), given the
        padding-aware text positions, as ``generate`` computes them."""
        return text_positions

    def step_positions(self, text_positions: torch.Tensor) -> torch.Tensor:
        """The position ids of one decoded token at ``text_positions`` [B, 1]."""
        return text_positions

    def split_prefill_positions(self, inputs: Mapping[str, Any], text_positions: torch.Tensor) -> torch.Tensor:
        """The position ids of a whole prompt computed up front, for a prefill split into several
        forwards (the later ones see no image, so the model cannot derive them); the model's
        per-generation state is set as its own prefill would set it."""
        return text_positions

    def prefill(self, inputs: Mapping[str, Any], **kwargs) -> Any:
        """One forward of the generation module on a full prompt (a contrast branch's prefill)."""
        return self.generation_module()(**inputs, **kwargs)


class LlavaFamily(Family):
    name = "LLaVA-1.5"
    model_types = ("llava",)
    continues_cached_prompts = True
    fixed_image_tokens = True

    def _vision_side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def _extra(self) -> int:
        return 1 if self.config.vision_feature_select_strategy == "full" else 0

    def tokens_per_image(self, image_info):
        return self._vision_side() ** 2 + self._extra()

    def grid_for(self, index, image_info):
        side = self._vision_side()
        return (side, side), self._extra()

    def vision_attention(self, layer, method, setting="layer"):
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        depth = len(layers)
        if not -depth <= layer < depth:
            raise InvalidOptionError(
                f"{method}'s {setting} {layer} is not a layer of the {depth}-layer vision tower "
                f"(use -{depth}..{depth - 1})"
            )
        return layers[layer].self_attn


class LlavaNextFamily(LlavaFamily):
    name = "LLaVA-NeXT"
    model_types = ("llava_next",)
    fixed_image_tokens = False  # anyres: the tiles and their unpadded rows follow the image's size

    def image_info_module(self):
        return self.model

    def read_image_info(self, args, kwargs):
        sizes = kwargs.get("image_sizes")
        if kwargs.get("pixel_values") is None or sizes is None:
            return None
        return {"num_images": len(sizes), "image_sizes": [tuple(int(v) for v in s) for s in sizes]}

    def tokens_per_image(self, image_info):
        if not image_info:  # generate encodes the images first and keeps their sizes: one image per run
            return []
        return [llava_next_image_token_count(self.config, size) for size in image_info["image_sizes"]]

    def _split_run(self, sample, start, length, sizes, first_index, image_info):
        if not sizes:
            base = self._vision_side() ** 2 + self._extra()
            if length < base:
                raise LayoutError(
                    f"input_ids row {sample} has a run of {length} image tokens at position {start}, fewer than "
                    f"LLaVA-NeXT's base view of {base}"
                )
            return [ImageRun(sample, start, length, *self.grid_for(first_index, image_info), image=first_index)]
        return super()._split_run(sample, start, length, sizes, first_index, image_info)

    vision_note = "several anyres crops per image (unsupported)"

    def vision_attention(self, layer, method, setting="layer"):
        return Family.vision_attention(self, layer, method, setting)


def llava_next_tile_count(config, image_size: Sequence[int]) -> int:
    """Tiles the model encodes for one LLaVA-NeXT image of ``(height, width)`` (base view and anyres
    crops): the rest of its row of a batch's ``[images, max_tiles, 3, H, W]`` pixels is padding."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(
        image_size_to_num_patches(
            tuple(int(v) for v in image_size), config.image_grid_pinpoints, config.vision_config.image_size
        )
    )


def llava_next_image_token_count(config, image_size: Sequence[int]) -> int:
    """Placeholder tokens of one LLaVA-NeXT image of ``(height, width)``: the base view, then the
    anyres crops unpadded to the image's aspect ratio with one newline token per row (the same
    arithmetic as the model's ``pack_image_features``)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    extra = 1 if config.vision_feature_select_strategy == "full" else 0
    rows, cols = get_anyres_image_grid_shape(tuple(image_size), config.image_grid_pinpoints, vision.image_size)
    unpadded = unpad_image(torch.empty(1, rows * side, cols * side), torch.tensor(image_size))
    height, width = unpadded.shape[-2:]
    return side * side + extra + height * (width + 1)


class Qwen2VLFamily(Family):
    name = "Qwen2-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    counts_need_image_info = True
    vision_note = "a ViT without a CLS token that merges 2x2 patches per image token"

    def image_info_module(self):
        return self.model.model.visual

    def read_image_info(self, args, kwargs):
        thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        return None if thw is None else {"num_images": len(thw), "grid_thw": [tuple(int(v) for v in g) for g in thw]}

    def _merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def image_refusal(self, image_processor, width, height):
        """Qwen2-VL's processor resizes to a multiple of its patch size within its pixel budget, and refuses
        an aspect ratio over 200 (or a side it cannot fit): the same rule, without processing pixels."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        size = getattr(image_processor, "size", None) or {}
        bounds = {
            "min_pixels": getattr(image_processor, "min_pixels", None) or size.get("shortest_edge"),
            "max_pixels": getattr(image_processor, "max_pixels", None) or size.get("longest_edge"),
        }
        factor = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
        if None in factor:
            return None  # another processor: its own rules apply when the batch is encoded
        try:
            smart_resize(height, width, factor=factor[0] * factor[1], **{k: v for k, v in bounds.items() if v})
        except ValueError as err:
            return str(err).strip().splitlines()[0]
        return None

    def tokens_per_image(self, image_info):
        if not image_info:
            raise LayoutError("Qwen2-VL's image token count depends on image_grid_thw: pass pixel_values with it")
        return [t * h * w for t, h, w in self._merged_grids(image_info)]

    def _merged_grids(self, image_info) -> list[tuple[int, int, int]]:
        merge = self._merge()
        return [(t, h // merge, w // merge) for t, h, w in image_info["grid_thw"]]

    def grid_for(self, index, image_info):
        t, h, w = self._merged_grids(image_info)[index]
        return ((h, w) if t == 1 else None), 0

    def _image_or_marker(self, ids):
        markers = (self.config.vision_start_token_id, self.config.vision_end_token_id, self.image_token_id())
        return torch.isin(ids, torch.tensor(markers, device=ids.device))

    def stateful_attributes(self):
        return [(self.model.model, "rope_deltas")]

    def _config_token_text(self, processor: Any, key: str) -> str | None:
        token_id = getattr(self.config, key, None)
        tokenizer = getattr(processor, "tokenizer", None)
        if token_id is None or tokenizer is None:
            return None
        return _token_text(tokenizer.convert_ids_to_tokens(int(token_id)))

    def prompt_placeholder(self, processor):
        """The image token between the vision markers, as the processor's chat template writes it."""
        start, end = (
            self._config_token_text(processor, key) or "" for key in ("vision_start_token_id", "vision_end_token_id")
        )
        return f"{start}{super().prompt_placeholder(processor)}{end}"

    def image_markers(self, processor):
        keys = ("video_token_id", "vision_start_token_id", "vision_end_token_id")
        extra = (self._config_token_text(processor, key) for key in keys)
        return (*super().image_markers(processor), *(marker for marker in extra if marker))

    def prefill_positions(self, inputs, text_positions):
        # With images, the model's get_rope_index builds the 3-D ids (and its rope deltas).
        return None if inputs.get("image_grid_thw") is not None else text_positions

    def split_prefill_positions(self, inputs, text_positions):
        if inputs.get("image_grid_thw") is None:
            return text_positions
        positions, deltas = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs.get("attention_mask"),
        )
        self.model.model.rope_deltas = deltas
        return positions

    def step_positions(self, text_positions):
        deltas = self.model.model.rope_deltas
        positions = text_positions if deltas is None else text_positions + deltas.to(text_positions.device)
        return positions[None].expand(3, -1, -1)


class InstructBlipFamily(Family):
    name = "InstructBLIP"
    model_types = ("instructblip",)
    spatial = False
    fixed_image_tokens = True
    vision_note = "a Q-Former: the language model sees resampled query tokens, not patches"

    def text_model(self):
        return self.model.language_model.model

    def generation_module(self):
        return self.model.language_model

    def image_info_module(self):
        return self.model.vision_model

    def read_image_info(self, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        return None if pixels is None else {"num_images": pixels.shape[0]}

    def tokens_per_image(self, image_info):
        return int(self.config.num_query_tokens)

    def prompt_placeholder(self, processor):
        """Nothing: the processor puts the image's query tokens before the text itself."""
        return ""

    def prefill(self, inputs, **kwargs):
        """What ``InstructBlipForConditionalGeneration.generate`` does before handing the language
        model its embeddings: Q-Former queries scattered into the placeholder positions."""
        inputs = dict(inputs)
        pixels = inputs.pop("pixel_values", None)
        qformer = {k: inputs.pop(k) for k in ("qformer_input_ids", "qformer_attention_mask") if k in inputs}
        if pixels is None:
            return self.model.language_model(**inputs, **kwargs)
        features = self.model.get_image_features(pixels, **qformer, return_dict=True).pooler_output
        ids = inputs.pop("input_ids")
        embeds = self.model.get_input_embeddings()(ids)
        placeholders = self.model.get_placeholder_mask(ids, inputs_embeds=embeds)
        embeds = embeds.masked_scatter(placeholders, features.to(embeds.device, embeds.dtype))
        return self.model.language_model(inputs_embeds=embeds, **inputs, **kwargs)


FAMILIES: tuple[type[Family], ...] = (LlavaFamily, LlavaNextFamily, Qwen2VLFamily, InstructBlipFamily)


def _token_text(token: Any) -> str:
    """A token as text (processors may hold a tokenizers ``AddedToken``)."""
    return str(getattr(token, "content", token))


def _image_token_text(processor: Any) -> str:
    return _token_text(getattr(processor, "image_token", None) or "<image>")


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of a loaded transformers LVLM, from its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family(model)
    raise UnknownFamilyError(str(model_type), [t for f in FAMILIES for t in f.model_types])


def language_model_limits(config: Any) -> tuple[int | None, int | None]:
    """``(context, vocabulary)`` of the language model of an LVLM ``config`` (a model's or a checkpoint's
    ``config.json``, read before its weights load); None where the config sets none (a model type of no
    family here, a T5 language model's relative positions, dynamic RoPE scaling)."""
    family = next((f for f in FAMILIES if getattr(config, "model_type", None) in f.model_types), None)
    if family is None:
        return None, None
    text = getattr(config, family.text_config_key, None) if family.text_config_key else config
    vocab = getattr(text, "vocab_size", None)
    return _context_length(text), vocab if isinstance(vocab, int) and vocab > 0 else None


def _context_length(text_config: Any) -> int | None:
    """``max_position_embeddings`` (LLaMA, Vicuna, Mistral, Qwen2: the positions the model was built for),
    times the factor of linear RoPE scaling; None under dynamic scaling (no set end) or without one."""
    limit = getattr(text_config, "max_position_embeddings", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None)
    if isinstance(rope, Mapping):
        kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
        if kind == "dynamic":
            return None
        if kind == "linear" and isinstance(factor, (int, float)) and factor > 1:
            return int(limit * factor)
    return limit


@dataclass(frozen=True)
class FixedImageSpan:
    """A fixed image span for models without an image layout of their own (a plain causal LM fed
    ``inputs_embeds``, as in the parity fixtures): ``length`` image tokens from ``start`` in every
    row, optionally a ``grid`` of patches from ``start + grid_offset``."""

    start: int
    length: int
    grid: tuple[int, int] | None = None
    grid_offset: int = 0

    def image_tokens(self, batch: int, seq_len: int, device=None) -> ImageTokens:
        if self.start < 0 or self.start + self.length > seq_len:
            raise LayoutError(
                f"the image span [{self.start}, {self.start + self.length}) does not fit {seq_len} tokens"
            )
        mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
        mask[:, self.start : self.start + self.length] = True
        runs = tuple(ImageRun(b, self.start, self.length, self.grid, self.grid_offset, image=b) for b in range(batch))
        return ImageTokens(mask=mask, runs=runs, family="fixed span", spatial=self.grid is not None)


class CausalLMFamily(Family):
    """A plain causal LM used with a :class:`FixedImageSpan` (no image inputs of its own)."""

    name = "causal LM"
    text_config_key = ""

    def text_model(self):
        return self.model.get_decoder()

    def image_info_module(self):
        return None

    def tokens_per_image(self, image_info):
        raise LayoutError("a plain causal LM has no image tokens of its own: attach with a FixedImageSpan")


def resolve_family(model: nn.Module, *, allow_plain: bool = False) -> Family:
    """The family of ``model``; with ``allow_plain``, a causal LM of no known family gets the plain
    family (no image layout of its own: a :class:`FixedImageSpan` or none at all)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if allow_plain and not any(model_type in f.model_types for f in FAMILIES) and hasattr(model, "get_decoder"):
        return CausalLMFamily(model)
    return family_of(model)


__all__ = [
    "FAMILIES",
    "CausalLMFamily",
    "Family",
    "FixedImageSpan",
    "ImageRun",
    "ImageTokens",
    "InstructBlipFamily",
    "LayoutError",
    "LlavaFamily",
    "LlavaNextFamily",
    "Qwen2VLFamily",
    "UnknownFamilyError",
    "family_of",
    "language_model_limits",
    "llava_next_image_token_count",
    "resolve_family",
    "token_runs",
]
