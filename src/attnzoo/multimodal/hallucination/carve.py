"""CARVE, Contrastive Attention Refinement for Visual Enhancement (arXiv 2509.06461; official code
YuyaoGe/CARVE).

A pre-pass before the answer: two greedy probes over each image, one with the task question and
one with a general instruction ("Write a general description of the image."), record at every
generated step the last row's head-averaged attention to the image tokens in layers 20..25. Their
ratio A^Q / (A^G + lambda) keeps what the question adds; fused over the layers and the steps
(weight t + 1 in the default variant v4) and upsampled to the image, it is thresholded at its top
20%, the strongest connected regions are kept, and the image is masked, cropped to them and
magnified. The answer is then generated on the refined prompt (the stages are the functions of
:mod:`~.functional.carve`).

Code vs paper (``behaviour``): the released code answers on **[original, refined]** (two images in
one prompt) — ``"official"``; the paper's Algorithm 1 answers on the refined image alone —
``"paper"``. The released code also reads 256, 576, 1024, 1600 and 1681 image tokens as a square grid
whatever the image's shape (a 16:9 Qwen2-VL image of 18x32 merged patches becomes 24x24, a scrambled
map); ``"paper"`` reads the image's own grid. Both use the code's lambda 1e-8 (the paper's appendix mentions 0.05, which would swamp
A^G with per-token attention around 1e-3; pass ``lam`` to change it). The official prompts append
"Answer the question using a single word or phrase." to every question, probes included (a
TextVQA format); ``answer_suffix=CARVE_ANSWER_SUFFIX`` does the same, the default leaves the
questions as given.

The probes of every prompt of a batch run as one batch, with a KV cache (the official loop runs
one prompt at a time and re-runs the whole sequence for every token). Questions about equal pictures
share one general probe, and all probes of one picture are alike up to the end of the image, so
that prefix runs once and its cache serves them all. Each row stops after its EOS; a question is
done as soon as its probe or its general probe is (v4 only fuses the steps both reached; v1-v3 read
the first step only, so their probes stop there), and decoding ends when every question is done. The
probes run on SDPA and compute only the attention row they read (the last query's, in the probe
layers), on a KV cache that writes each token in place (:mod:`.kv_cache`); the maps equal
:func:`~.functional.carve.carve_probe_attention`'s up to floating-point rounding. On LLaVA (1.5 and NeXT) the official final pass, whose prompts start with the same prefix,
continues from its cache (:class:`~.method.CachedPrefix`): only the refined image and the question
run again. The image tokens must form a patch grid (LLaVA-1.5, the base view of LLaVA-NeXT,
Qwen2-VL): InstructBLIP's resampled query tokens raise :class:`~.layouts.LayoutError`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from PIL import Image
from torch import nn

from attnzoo._values import listed, whole_number
from attnzoo.errors import InvalidInputError, InvalidOptionError

from .base import ContrastBranchProcessor, check_behaviour, language_model_attention, mask_positions
from .functional.carve import (
    CARVE_GENERAL_INSTRUCTION,
    CARVE_LAMBDA_CODE,
    CARVE_LAYERS,
    CARVE_VARIANTS,
    CarveResult,
    _eos_ids,
    carve_refine,
)
from .kv_cache import reserved_cache, select_rows
from .layouts import Family, LayoutError, family_of
from .method import CachedPrefix, MitigationMethod, PromptBatch, PromptImages
from .transformers_compat import cache_keyword

#: The official defaults (``carve.pipeline.carve``).
DEFAULTS: dict[str, Any] = {
    "variant": "v4",
    "layers": CARVE_LAYERS,
    "lam": CARVE_LAMBDA_CODE,
    "top_percent": 0.2,
    "min_keep_regions": 3,
    "outlier_percent": 0.1,
    "probe_tokens": 32,
}


class CARVE(MitigationMethod):
    """CARVE as a pipeline method: :meth:`prepare` probes, builds the refined image of every prompt
    and returns the batch re-encoded for the final pass (``[original, refined]`` per prompt with the
    official behaviour, ``refined`` with the paper's). ``last_results`` keeps each prompt's
    :class:`~.functional.carve.CarveResult` (fused map, mask, crop)."""

    name = "carve"

    def __init__(
        self,
        *,
        variant: str = DEFAULTS["variant"],
        layers: Sequence[int] = DEFAULTS["layers"],
        lam: float = DEFAULTS["lam"],
        top_percent: float = DEFAULTS["top_percent"],
        min_keep_regions: int = DEFAULTS["min_keep_regions"],
        outlier_percent: float = DEFAULTS["outlier_percent"],
        probe_tokens: int = DEFAULTS["probe_tokens"],
        general_instruction: str = CARVE_GENERAL_INSTRUCTION,
        answer_suffix: str | None = None,
        behaviour: str = "official",
    ):
        if variant not in CARVE_VARIANTS:
            raise InvalidOptionError(f"unknown CARVE variant {variant!r}; expected one of {sorted(CARVE_VARIANTS)}")
        self.variant = variant
        self.layers = tuple(int(layer) for layer in layers)
        if not self.layers:
            raise InvalidOptionError("CARVE needs at least one probe layer")
        if not float(lam) > 0.0:
            raise InvalidOptionError(f"CARVE's lam must be > 0, got {lam}")
        if not 0.0 < float(top_percent) <= 1.0:
            raise InvalidOptionError(f"CARVE's top_percent must be in (0, 1], got {top_percent}")
        min_keep_regions = whole_number(min_keep_regions, "CARVE's min_keep_regions")
        probe_tokens = whole_number(probe_tokens, "CARVE's probe_tokens")
        if not 0.0 <= float(outlier_percent) <= 100.0:
            raise InvalidOptionError(f"CARVE's outlier_percent must be in [0, 100], got {outlier_percent}")
        if not general_instruction.strip():
            raise InvalidOptionError("CARVE's general_instruction is empty")
        self.lam, self.top_percent, self.outlier_percent = float(lam), float(top_percent), float(outlier_percent)
        self.min_keep_regions, self.probe_tokens = int(min_keep_regions), int(probe_tokens)
        self.general_instruction = general_instruction
        self.answer_suffix = answer_suffix or None
        self.behaviour = check_behaviour(behaviour)
        self.last_results: list[CarveResult] = []
        #: The probe layers that exist in the last model (the official fusion skips the others).
        self.last_layers: tuple[int, ...] = ()

    @property
    def images_per_answered_prompt(self) -> int:
        return 2 if self.behaviour == "official" else 1

    def check_model(self, model: nn.Module) -> None:
        self._model_family(model)

    def _model_family(self, model: nn.Module) -> Family:
        """The model's family, refused without a patch grid or without any of the probe layers."""
        family = family_of(model)
        if not family.spatial:
            raise LayoutError(
                f"CARVE maps the image tokens' attention back onto the image, which needs a patch grid; "
                f"{family.name} has {family.vision_note}. Use a projector model (LLaVA, Qwen2-VL)"
            )
        self._existing_layers(family)
        return family

    def prepare(self, model: nn.Module, processor: Any, batch: PromptBatch) -> PromptBatch:
        family = self._model_family(model)
        if not batch.images or len(batch.images) != len(batch.questions):
            raise InvalidInputError(
                f"CARVE needs one image per question, got {len(batch.images)} image(s) and "
                f"{len(batch.questions)} question(s)"
            )
        images = [image for image in batch.images if isinstance(image, Image.Image)]
        if len(images) != len(batch.images):
            raise InvalidInputError("CARVE needs one image per question, not a list of images per question")
        asked = replace(batch, questions=[self._ask(q) for q in batch.questions])
        maps, prefix = self._probe(model, family, asked)
        self.last_results = [
            carve_refine(
                query,
                general,
                image,
                variant=self.variant,
                lam=self.lam,
                top_percent=self.top_percent,
                min_keep_regions=self.min_keep_regions,
                outlier_percent=self.outlier_percent,
                grid_shape=grid,
                known_grids=self.behaviour == "official",
            )
            for image, (query, general, grid) in zip(images, maps, strict=True)
        ]
        refined = [result.crop.refined_image for result in self.last_results]
        _check_refined(family, processor, refined)
        if self.behaviour == "official":  # two images per prompt: the encoder takes a list per question
            pairs: list[PromptImages] = [[image, ref] for image, ref in zip(images, refined, strict=True)]
            with _memory_said("final", pairs, self.behaviour):
                final = asked.with_images(pairs)
            if prefix is None or not family.continues_cached_prompts:
                return final
            return replace(final, cached=_cached_final(final.inputs, *prefix))
        with _memory_said("final", list(refined), self.behaviour):
            return asked.with_images(refined)

    def prepared_inputs(self, model: nn.Module, batch: PromptBatch) -> Mapping[str, Any] | None:
        """The final prompts' length before the probes, where the refined image takes as many tokens as
        any image (LLaVA-1.5): the prompts encoded with the original image in its place. None where its
        count follows the crop's size (LLaVA-NeXT's tiles, Qwen2-VL's patches): a bound (the most tiles,
        the processor's max_pixels) would refuse runs that fit, so those prompts are checked once built,
        before anything else runs on them."""
        if not family_of(model).fixed_image_tokens or not all(isinstance(im, Image.Image) for im in batch.images):
            return None  # a list of images per prompt: prepare refuses it
        if self.behaviour == "paper" and self.answer_suffix is None:
            return batch.inputs  # the refined image in the original's place, the same questions
        asked = replace(batch, questions=[self._ask(q) for q in batch.questions])
        images: list[PromptImages] = (
            [[image, image] for image in batch.images] if self.behaviour == "official" else batch.images
        )
        with _memory_said("measured", images, self.behaviour):
            return asked.with_images(images).inputs

    def probe(
        self, model: nn.Module, family: Family, batch: PromptBatch
    ) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """(query maps [T_q, L, N], general maps [T_g, L, N], token grid) of every prompt: the question
        probes and one general probe per distinct picture decode greedily as one batch."""
        return self._probe(model, family, batch, keep=False)[0]

    def _probe(self, model: nn.Module, family: Family, batch: PromptBatch, keep: bool = True):
        """The maps and, when the probes shared their image prefix, (probe inputs, the prefix, the
        prefix's KV cache) for the official final pass, which starts with the same prefix."""
        n = len(batch.images)
        general = self._ask(self.general_instruction)
        groups = _image_groups(cast(list[Image.Image], batch.images))
        distinct = [groups.index(group) for group in range(max(groups) + 1)]  # each group's first prompt
        images = [*batch.images, *(batch.images[i] for i in distinct)]
        with _memory_said("probes", images, self.behaviour):
            inputs = batch.encode(images, [*batch.questions, *([general] * len(distinct))])
        _grid_positions(family, inputs)
        inputs, prefix = _shared_prefix_layout(family, inputs, [*groups, *range(len(distinct))])
        positions, grids = _grid_positions(family, inputs)
        layers = self._existing_layers(family)
        steps = 1 if CARVE_VARIANTS[self.variant][0] == "first" else self.probe_tokens
        family.check_room(int(inputs["input_ids"].shape[1]), steps, "CARVE's probe_tokens")
        keep = keep and prefix is not None and self.behaviour == "official" and family.continues_cached_prompts
        runner = _ProbeRunner(model, inputs, family, layers, prefix=prefix, keep_prefix=keep)
        partners = [n + group for group in groups]
        rows = runner.run(positions, steps, partners)
        self.last_layers = layers
        maps = [(rows[i], rows[partners[i]], grids[i]) for i in range(n)]
        return maps, ((inputs, prefix, runner.prefix_cache) if keep else None)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "behaviour": self.behaviour,
            "final_images": "original+refined" if self.behaviour == "official" else "refined",
            "grid": "official table (256/576/1024/1600/1681 tokens square)"
            if self.behaviour == "official"
            else "image's",
            "variant": self.variant,
            "layers": self.last_layers or self.layers,
            "lam": self.lam,
            "top_percent": self.top_percent,
            "min_keep_regions": self.min_keep_regions,
            "outlier_percent": self.outlier_percent,
            "probe_tokens": self.probe_tokens,
            "general_instruction": self.general_instruction,
            "answer_suffix": self.answer_suffix,
        }

    def _ask(self, question: str) -> str:
        return question if self.answer_suffix is None else f"{question} {self.answer_suffix}"

    def _existing_layers(self, family: Family) -> tuple[int, ...]:
        depth = len(_decoder_layers(family))
        layers = tuple(layer for layer in self.layers if 0 <= layer < depth)
        if not layers:
            raise InvalidOptionError(
                f"none of CARVE's probe layers {list(self.layers)} exists in this {depth}-layer language model; "
                "pass layers=... (--layers on the command line)"
            )
        return layers


class _ProbeRunner(ContrastBranchProcessor):
    """Greedy decoding of the probe prompts on the contrast-branch machinery (own KV cache and
    stream, attention edits off, padding-aware positions, the model's per-generation state left
    alone), recording the last row's head-averaged attention in ``layers`` at every step."""

    method = "carve probe"
    edit_branch = False

    def __init__(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        family: Family,
        layers: tuple[int, ...],
        prefix: SharedPrefix | None = None,
        keep_prefix: bool = False,
    ):
        super().__init__(model, inputs)
        self.probe_family, self.layers, self.prefix, self.keep_prefix = family, layers, prefix, keep_prefix
        #: The shared prefixes' KV cache (one row per distinct prefix), when asked to keep it.
        self.prefix_cache: Any = None
        #: The most steps :meth:`run` decodes (the room its cache keeps for them).
        self.steps = 0
        self._rows: dict[int, torch.Tensor] = {}

    def _prefill(self, batch: int) -> torch.Tensor:
        """With shared prefixes (:func:`_shared_prefix_layout`), the first ``prefix.width`` columns (an
        image and the text before it) run once per distinct prefix, their cache is copied to every row
        that starts with it, and the rest of every row runs on top: the same attention as one forward."""
        if self.prefix is None:
            return super()._prefill(batch)
        self.reset()
        inputs, width, owners = self.branch_inputs, self.prefix.width, list(self.prefix.owners)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        text_positions = mask_positions(mask)
        positions = self.probe_family.split_prefill_positions(inputs, text_positions)
        per_token = _per_token_keys(inputs)
        head = {k: v[owners, :width] for k, v in inputs.items() if k in per_token}
        head.update(_row_images(inputs, per_token, owners))
        self._keep(
            self.family.prefill(
                {**head, "position_ids": positions[..., owners, :width]},
                use_cache=True,
                logits_to_keep=1,
                **self._new_cache(),
            )
        )
        if self.keep_prefix:
            self.prefix_cache = self._cache  # select_rows leaves it as it is
        # Each row's prefix copied once into room for the rest of its prompt and the probe's tokens.
        cache = select_rows(self._cache, self.prefix.groups, room_for=int(ids.shape[1]) - width + self.steps)
        self._mask, self._next_position = mask, text_positions[:, -1:] + 1
        return self._keep(
            self.family.generation_module()(
                input_ids=ids[:, width:],
                attention_mask=mask,
                position_ids=positions[..., width:],
                use_cache=True,
                **{cache_keyword(): cache},
                logits_to_keep=1,
            )
        )

    def _new_cache(self) -> dict[str, Any]:
        """The probes decode on a cache that writes each token in place (:mod:`.kv_cache`); the official
        final pass continues on a copy of it."""
        return {cache_keyword(): reserved_cache(self.probe_family.text_config())}

    def run(self, positions: list[torch.Tensor], steps: int, partners: Sequence[int]) -> list[torch.Tensor]:
        """Per prompt row, [T, len(layers), N] float32 maps at ``positions`` (row i's grid tokens);
        question row i and its general row ``partners[i]`` form a pair that is done once either of
        them produced EOS, and decoding stops when every pair is."""
        ids = self.branch_inputs["input_ids"]
        batch, self.steps = ids.shape[0], steps
        stops = set(_eos_ids(self.model, None))
        finished = [False] * batch
        # Every step's rows over the columns the grids span; each row's grid is picked once at the end.
        low = min(int(grid.min()) for grid in positions)
        high = max(int(grid.max()) for grid in positions) + 1
        recorded: list[tuple[torch.Tensor, list[bool]]] = []
        try:
            with language_model_attention(self.model, self.probe_family, self._attention), torch.no_grad():
                logits = self.branch_logits(ids)
                for step in range(steps):
                    # [B, L, K] on the first probe layer's device (a device map may spread the layers)
                    first = self._rows[self.layers[0]]
                    rows = torch.stack([self._rows[layer][:, low:high].to(first.device) for layer in self.layers], 1)
                    recorded.append((rows, [not done for done in finished]))  # on the device: no sync per step
                    token = logits.argmax(dim=-1)
                    finished = [was or now in stops for was, now in zip(finished, token.tolist(), strict=True)]
                    if step == steps - 1 or all(finished[q] or finished[g] for q, g in enumerate(partners)):
                        break
                    ids = torch.cat([ids, token[:, None].to(ids.device)], dim=-1)
                    logits = self.branch_logits(ids)
        finally:
            self._rows = {}
            self.reset()
        maps = []
        for row, grid in enumerate(positions):
            spans = torch.stack([rows[row] for rows, alive in recorded if alive[row]])  # [T, L, high - low]
            maps.append(spans[:, :, (grid - low).to(spans.device)].cpu())
        return maps

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """transformers' SDPA attention; in a probe layer, also the last query row's weights (all the
        probe reads: the full weights of eager attention cost a prefill far more). A decoding step's
        one row is the whole attention, so a probe layer computes it once, from those weights. The
        query heads are grouped over their key-value heads (no copy of the cache per head)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = getattr(module, "layer_idx", None)
        in_probe = layer in self.layers
        one_row = in_probe and query.shape[2] == 1 and not dropout
        one_row = one_row and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
        output = None
        if not one_row:
            output, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if not in_probe:
            return output, None
        batch, heads, _, width = query.shape
        groups = key.shape[1]
        scale = width**-0.5 if scaling is None else scaling
        last = query[:, :, -1].reshape(batch, groups, heads // groups, width)  # [B, KV, heads per KV, D]
        logits = torch.matmul(last, key.transpose(2, 3)) * scale  # [B, KV, heads per KV, K]
        if attention_mask is not None:  # the last row is causal-complete: only padding is masked
            row = attention_mask[:, :, -1:, : key.shape[-2]]
            logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row
        weights = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        self._rows[layer] = weights.mean(dim=(1, 2)).float()
        if output is None:  # [B, 1, H, D], as SDPA's
            output = torch.matmul(weights, value).reshape(batch, 1, heads, value.shape[-1])
        return output, weights.reshape(batch, heads, 1, -1)

    def combine(self, input_ids, scores, branch_logits):
        raise NotImplementedError("the CARVE probe is no logits processor")


#: What running out of memory raises: MemoryError on the CPU (a processor working on a large image), torch's
#: OutOfMemoryError on an accelerator (the encoded inputs moved to the model's device).
_OUT_OF_MEMORY: tuple[type[BaseException], ...] = (MemoryError, torch.OutOfMemoryError)


@contextlib.contextmanager
def _memory_said(stage: str, images: Sequence[PromptImages], behaviour: str) -> Iterator[None]:
    """Running out of memory while CARVE encodes the prompts of a ``stage`` (``"probes"``; ``"final"``: the final
    pass, ``[original, refined]`` per prompt with the official ``behaviour``; ``"measured"``: the final prompts
    measured before the probes, the original image in the refined one's place) is an :class:`InvalidInputError`
    naming that stage, the sizes of the images it encodes and what to do, as the pipeline says of the prompts it
    was given. Caught raw from the encoder (a MemoryError, a torch.OutOfMemoryError), or as the pipeline's encoder
    already said it (typed, from a MemoryError) naming no input and asking for a smaller image, where CARVE's own
    images (the refined crops, two images a prompt) ran it out."""
    try:
        yield
    except _OUT_OF_MEMORY:
        pass
    except InvalidInputError as err:
        if not isinstance(err.__context__, _OUT_OF_MEMORY):  # the pipeline's encoder, said of a MemoryError
            raise
    else:
        return
    sizes = [" + ".join(f"{im.width}x{im.height}" for im in _images_of(entry)) for entry in images]
    if stage == "probes":
        what = (
            f"CARVE's probes ran out of memory encoding their {len(images)} image(s) ({listed(sizes)} pixels: each "
            "prompt's image, and each distinct picture's once more for its general probe)"
        )
        advice = "pass smaller images (downscale them first) or fewer prompts per batch (batch_size)"
    elif behaviour == "official":
        what = (
            f"CARVE's final pass ran out of memory encoding the [original, refined] images of its {len(images)} "
            f"prompt(s) ({listed(sizes)} pixels)"
            if stage == "final"
            else f"CARVE ran out of memory measuring its final prompts before the probes: the [original, original] "
            f"images of {len(images)} prompt(s), the original in the refined image's place ({listed(sizes)} pixels)"
        )
        advice = (
            "pass smaller images (downscale them first), fewer prompts per batch (batch_size), or "
            "behaviour='paper' (the refined image alone)"
        )
    else:
        what = (
            f"CARVE's final pass ran out of memory encoding the refined images of its {len(images)} prompt(s) "
            f"({listed(sizes)} pixels)"
            if stage == "final"
            else f"CARVE ran out of memory measuring its final prompts before the probes: the images of "
            f"{len(images)} prompt(s), the original in the refined image's place ({listed(sizes)} pixels)"
        )
        advice = "pass smaller images (downscale them first) or fewer prompts per batch (batch_size)"
    raise InvalidInputError(f"{what}; {advice}") from None


def _images_of(entry: PromptImages) -> list[Image.Image]:
    """A prompt's images (one, or a list of them), those with a size."""
    return [im for im in (entry if isinstance(entry, (list, tuple)) else [entry]) if hasattr(im, "width")]


def _check_refined(family: Family, processor: Any, refined: Sequence[Image.Image]) -> None:
    """A refined image the processor would refuse (Qwen2-VL: a crop of one thin strip, magnified to an
    aspect ratio over 200) is said as CARVE's, with its prompt, instead of the processor's error."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return
    for index, image in enumerate(refined):
        refusal = family.image_refusal(image_processor, image.width, image.height)
        if refusal is not None:
            raise InvalidInputError(
                f"CARVE's refined image of prompt {index} of the batch is a {image.width}x{image.height} crop, which "
                f"the model's image processor refuses: {refusal}. Its mask kept a thin strip; try a larger "
                "top_percent or min_keep_regions"
            )


def _decoder_layers(family: Family) -> nn.ModuleList:
    return cast(nn.ModuleList, family.text_model().layers)


def _grid_positions(family: Family, inputs: Mapping[str, Any]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Sequence positions of each prompt row's grid tokens (row-major) and the grid's (rows, cols)."""
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise InvalidInputError("CARVE's probes decode a padded batch: the encoder must pad on the left")
    ids = inputs["input_ids"]
    tokens = family.image_tokens(ids, family.inputs_image_info(inputs))
    tokens.require_grid("CARVE")
    runs: dict[int, list] = {}
    for run in tokens.runs:
        runs.setdefault(run.sample, []).append(run)
    counts = [len(runs.get(row, [])) for row in range(ids.shape[0])]
    if any(count != 1 for count in counts):
        raise InvalidInputError(f"CARVE probes one image per prompt; the probe rows hold {counts} image(s)")
    first = [runs[row][0] for row in range(ids.shape[0])]
    return [run.grid_positions for run in first], [run.grid for run in first]


@dataclass(frozen=True)
class SharedPrefix:
    """Rows that start alike up to the end of their image hold that prefix in the first ``width``
    columns: ``groups[r]`` is row r's prefix, ``owners[g]`` the row whose prefix g is computed."""

    width: int
    groups: tuple[int, ...]
    owners: tuple[int, ...]


def _image_groups(images: Sequence[Image.Image]) -> list[int]:
    """Each image's group: equal pictures (size and RGB pixels, what the processors read) share one,
    numbered by first use."""
    seen: dict[tuple, int] = {}
    groups = []
    for image in images:
        key = (image.size, hashlib.blake2b(image.convert("RGB").tobytes(), digest_size=16).digest())
        groups.append(seen.setdefault(key, len(seen)))
    return groups


def _shared_prefix_layout(
    family: Family, inputs: Mapping[str, Any], groups: Sequence[int]
) -> tuple[dict[str, Any], SharedPrefix | None]:
    """The probe rows laid out so that the rows of one group (the questions about one image and its
    general probe), whose prompts start alike up to the end of the image, hold that prefix in the
    same columns: ``[padding][prefix][padding][rest]``, the prefixes right-aligned in the first
    ``width`` columns, the rests in the last ones. The inputs unchanged and None when a group's
    prompts differ before the image ends (a template that puts the question first)."""
    ids, mask = inputs["input_ids"], _attention_mask(inputs)
    valid = mask.bool()
    counts = valid.sum(-1).tolist()
    image_end = {
        run.sample: run.start + run.length - (ids.shape[1] - counts[run.sample])
        for run in family.image_tokens(ids, family.inputs_image_info(inputs)).runs
    }
    owners = [list(groups).index(group) for group in range(max(groups) + 1)]
    for row, group in enumerate(groups):
        owner, end = owners[group], image_end[owners[group]]
        first, second = ids[row][valid[row]], ids[owner][valid[owner]]
        if image_end[row] != end or len(first) <= end or not torch.equal(first[:end], second[:end]):
            return dict(inputs), None
    heads = [image_end[row] for row in range(len(groups))]
    return _lay_out(inputs, mask, heads), SharedPrefix(max(heads), tuple(groups), tuple(owners))


def _lay_out(inputs: Mapping[str, Any], mask: torch.Tensor, heads: Sequence[int]) -> dict[str, Any]:
    """Left-padded rows re-laid as ``[padding][first heads[r] tokens][padding][the rest]`` with the
    heads right-aligned at column max(heads) and the rests at the end (every per-token input alike)."""
    ids = inputs["input_ids"]
    valid = mask.bool()
    counts = valid.sum(-1).tolist()
    width = max(heads)
    tails = [count - head for count, head in zip(counts, heads, strict=True)]
    length = width + max(tails)
    filler = int(ids[~valid][0]) if bool((~valid).any()) else int(ids[0, 0])
    laid = {k: v for k, v in inputs.items()}
    sources = {k: inputs[k] for k in _per_token_keys(inputs)}
    sources["attention_mask"] = mask
    for key, source in sources.items():
        out = source.new_full((ids.shape[0], length), filler if key == "input_ids" else 0)
        for row, head in enumerate(heads):
            kept = source[row][valid[row]]
            out[row, width - head : width] = kept[:head]
            out[row, length - tails[row] :] = kept[head:]
        laid[key] = out
    return laid


def _cached_final(
    final: Mapping[str, Any], probe: Mapping[str, Any], prefix: SharedPrefix, cache: Any
) -> CachedPrefix | None:
    """The official final pass on the probes' prefix cache: every prompt [original, refined] starts
    with its question probe's prefix (the text before the original image, and the image), so only
    the rest runs, and only the refined images are encoded. None where that does not hold."""
    if cache is None:
        return None
    ids, mask = final["input_ids"], _attention_mask(final)
    count, width = ids.shape[0], prefix.width
    heads = []
    for row in range(count):
        head = probe["input_ids"][row, :width][probe["attention_mask"][row, :width].bool()]
        kept = ids[row][mask[row].bool()]
        if len(kept) <= len(head) or not torch.equal(kept[: len(head)], head):
            return None
        heads.append(len(head))
    laid = _lay_out(final, mask, heads)
    per_token = _per_token_keys(final)
    for key, value in final.items():  # per image: [original, refined] per prompt; the originals are cached
        if value is None or key in per_token:
            continue  # laid out above
        if not isinstance(value, torch.Tensor) or value.shape[0] != 2 * count:
            return None
        laid[key] = value[1::2]
    return CachedPrefix(laid, cache, rows=prefix.groups[:count])


def _attention_mask(inputs: Mapping[str, Any]) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"]) if mask is None else mask


def _per_token_keys(inputs: Mapping[str, Any]) -> set[str]:
    """The inputs with one entry per token ([B, S] like ``input_ids``); the rest are per image."""
    shape = inputs["input_ids"].shape
    return {k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.shape == shape}


def _row_images(inputs: Mapping[str, Any], per_token: set[str], rows: Sequence[int]) -> dict[str, Any]:
    """The image inputs of prompts ``rows`` (one image each), in that order."""
    images = {k: v for k, v in inputs.items() if k not in per_token and v is not None}
    thw = images.get("image_grid_thw")
    if thw is not None:  # Qwen2-VL: the images' patches are concatenated along dim 0
        pieces = images["pixel_values"].split([int(n) for n in thw.prod(-1)])
        return {**images, "image_grid_thw": thw[list(rows)], "pixel_values": torch.cat([pieces[row] for row in rows])}
    return {k: (v[list(rows)] if isinstance(v, torch.Tensor) else v) for k, v in images.items()}


__all__ = ["CARVE", "DEFAULTS"]
