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
``"paper"``. Both use the code's lambda 1e-8 (the paper's appendix mentions 0.05, which would swamp
A^G with per-token attention around 1e-3; pass ``lam`` to change it). The official prompts append
"Answer the question using a single word or phrase." to every question, probes included (a
TextVQA format); ``answer_suffix=CARVE_ANSWER_SUFFIX`` does the same, the default leaves the
questions as given.

The two probes of every prompt of a batch run as one batch, with a KV cache (the official loop runs
one prompt at a time and re-runs the whole sequence for every token); each row stops after its
EOS, and a pair stops as soon as one of its probes does (v4 only fuses the steps both reached; v1-v3
read the first step only, so their probes stop there). The maps equal
:func:`~.functional.carve.carve_probe_attention`'s up to floating-point rounding. The probes need
the attention weights: a language model on SDPA or flash attention switches to eager attention for
them and back. The image tokens must form a patch grid (LLaVA-1.5, the base view of LLaVA-NeXT,
Qwen2-VL): InstructBLIP's resampled query tokens raise :class:`~.layouts.LayoutError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from PIL import Image
from torch import nn

from attnzoo.errors import InvalidInputError, InvalidOptionError

from .base import ContrastBranchProcessor, check_behaviour, eager_language_model
from .functional.carve import (
    CARVE_GENERAL_INSTRUCTION,
    CARVE_LAMBDA_CODE,
    CARVE_LAYERS,
    CARVE_VARIANTS,
    CarveResult,
    _eos_ids,
    carve_refine,
)
from .layouts import Family, LayoutError, family_of
from .method import MitigationMethod, PromptBatch, PromptImages

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
        if int(min_keep_regions) < 1 or int(probe_tokens) < 1:
            raise InvalidOptionError(
                f"CARVE's min_keep_regions and probe_tokens must be >= 1, got {min_keep_regions} and {probe_tokens}"
            )
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

    def prepare(self, model: nn.Module, processor: Any, batch: PromptBatch) -> PromptBatch:
        family = family_of(model)
        if not family.spatial:
            raise LayoutError(
                f"CARVE maps the image tokens' attention back onto the image, which needs a patch grid; "
                f"{family.name} has {family.vision_note}. Use a projector model (LLaVA, Qwen2-VL)"
            )
        if not batch.images or len(batch.images) != len(batch.questions):
            raise InvalidInputError(
                f"CARVE needs one image per question, got {len(batch.images)} image(s) and "
                f"{len(batch.questions)} question(s)"
            )
        images = [image for image in batch.images if isinstance(image, Image.Image)]
        if len(images) != len(batch.images):
            raise InvalidInputError("CARVE needs one image per question, not a list of images per question")
        asked = replace(batch, questions=[self._ask(q) for q in batch.questions])
        maps = self.probe(model, family, asked)
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
            )
            for image, (query, general, grid) in zip(images, maps, strict=True)
        ]
        refined = [result.crop.refined_image for result in self.last_results]
        if self.behaviour == "official":  # two images per prompt: the encoder takes a list per question
            pairs: list[PromptImages] = [[image, ref] for image, ref in zip(images, refined, strict=True)]
            return asked.with_images(pairs)
        return asked.with_images(refined)

    def probe(
        self, model: nn.Module, family: Family, batch: PromptBatch
    ) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """(query maps [T_q, L, N], general maps [T_g, L, N], token grid) of every prompt: the question
        and the general probes of the whole batch decode greedily as one batch."""
        n = len(batch.images)
        general = self._ask(self.general_instruction)
        inputs = batch.encode([*batch.images, *batch.images], [*batch.questions, *([general] * n)])
        positions, grids = _grid_positions(family, inputs)
        layers = self._existing_layers(family)
        steps = 1 if CARVE_VARIANTS[self.variant][0] == "first" else self.probe_tokens
        rows = _ProbeRunner(model, inputs, family, layers).run(positions, steps, pairs=n)
        self.last_layers = layers
        return [(rows[i], rows[n + i], grids[i]) for i in range(n)]

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "behaviour": self.behaviour,
            "final_images": "original+refined" if self.behaviour == "official" else "refined",
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
                "pass layers=..."
            )
        return layers


class _ProbeRunner(ContrastBranchProcessor):
    """Greedy decoding of the probe prompts on the contrast-branch machinery (own KV cache and
    stream, attention edits off, padding-aware positions, the model's per-generation state left
    alone), recording the last row's head-averaged attention in ``layers`` at every step."""

    method = "carve probe"
    edit_branch = False

    def __init__(self, model: nn.Module, inputs: Mapping[str, Any], family: Family, layers: tuple[int, ...]):
        super().__init__(model, inputs)
        self.probe_family, self.layers = family, layers
        self._rows: dict[int, torch.Tensor] = {}

    def run(self, positions: list[torch.Tensor], steps: int, pairs: int) -> list[torch.Tensor]:
        """Per prompt row, [T, len(layers), N] float32 maps at ``positions`` (row i's grid tokens);
        row i and row ``pairs + i`` form a pair that stops once either of them produced EOS."""
        ids = self.branch_inputs["input_ids"]
        batch = ids.shape[0]
        stops = torch.tensor(sorted(_eos_ids(self.model, None)), dtype=ids.dtype, device=ids.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        maps: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        decoder = _decoder_layers(self.probe_family)
        attention = [cast(nn.Module, decoder[layer].self_attn) for layer in self.layers]
        handles = [
            module.register_forward_hook(self._recorder(layer))
            for module, layer in zip(attention, self.layers, strict=True)
        ]
        try:
            with eager_language_model(self.model, self.probe_family), torch.no_grad():
                logits = self.branch_logits(ids)
                for step in range(steps):
                    rows = torch.stack([self._rows[layer] for layer in self.layers], dim=1)  # [B, L, K]
                    for row in torch.nonzero(~finished).flatten().tolist():
                        maps[row].append(rows[row][:, positions[row].to(rows.device)].cpu())
                    token = logits.argmax(dim=-1)
                    finished = finished | torch.isin(token, stops)
                    if step == steps - 1 or bool((finished[:pairs] | finished[pairs:]).all()):
                        break
                    ids = torch.cat([ids, token[:, None]], dim=-1)
                    logits = self.branch_logits(ids)
        finally:
            for handle in handles:
                handle.remove()
            self._rows = {}
            self.reset()
        return [torch.stack(row) for row in maps]

    def _recorder(self, layer: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise InvalidInputError(
                    f"CARVE reads the attention weights of language-model layer {layer}, and its attention "
                    "implementation returned none: load the model with attn_implementation='eager'"
                )
            self._rows[layer] = weights[:, :, -1].mean(dim=1).float()

        return hook

    def combine(self, input_ids, scores, branch_logits):
        raise NotImplementedError("the CARVE probe is no logits processor")


def _decoder_layers(family: Family) -> nn.ModuleList:
    return cast(nn.ModuleList, family.text_model().layers)


def _grid_positions(family: Family, inputs: Mapping[str, Any]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Sequence positions of each prompt row's grid tokens (row-major) and the grid's (rows, cols)."""
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise InvalidInputError("CARVE's probes decode a padded batch: the encoder must pad on the left")
    ids = inputs["input_ids"]
    tokens = family.image_tokens(ids, _image_info(inputs))
    tokens.require_grid("CARVE")
    runs: dict[int, list] = {}
    for run in tokens.runs:
        runs.setdefault(run.sample, []).append(run)
    counts = [len(runs.get(row, [])) for row in range(ids.shape[0])]
    if any(count != 1 for count in counts):
        raise InvalidInputError(f"CARVE probes one image per prompt; the probe rows hold {counts} image(s)")
    first = [runs[row][0] for row in range(ids.shape[0])]
    return [run.grid_positions for run in first], [run.grid for run in first]


def _image_info(inputs: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the family's layout needs to count each image's tokens, read from the model inputs."""
    if inputs.get("image_grid_thw") is not None:
        grids = [tuple(int(v) for v in g) for g in inputs["image_grid_thw"]]
        return {"num_images": len(grids), "grid_thw": grids}
    if inputs.get("image_sizes") is not None:
        sizes = [tuple(int(v) for v in s) for s in inputs["image_sizes"]]
        return {"num_images": len(sizes), "image_sizes": sizes}
    pixels = inputs.get("pixel_values")
    return None if pixels is None else {"num_images": pixels.shape[0]}


__all__ = ["CARVE", "DEFAULTS"]
