"""OAT's decoding: the official ``TransformerModel.test_max`` (greedy) and ``test_expect`` (sampling),
src/model/transformerLightning.py.

Step 1 may only point at objects, later steps at objects or EOS; at most ``max_len`` steps; the
predicted EOS ends the scanpath (:func:`generate`). **Test-time blanks are zeros** (the official
``new_src_img``) while training used ones: we reproduce that inconsistency (it only matters for what
follows a predicted EOS, which :func:`greedy_eval` scores as the official code does; :func:`generate`
stops there). The BOS image stays all-ones in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from attnzoo._values import whole_number
from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.vision._common import as_generator
from attnzoo.vision.oat_inputs import (
    CROP_SIZE,
    N_BLANKS,
    as_crops,
    as_object_index,
    as_sample,
    check_grid,
    position_triples,
    square_subsequent_mask,
)

if TYPE_CHECKING:  # the model calls generate(); decoding needs only its interface
    from attnzoo.vision.oat import OAT

__all__ = ["MAX_SAMPLES", "OATGreedyEval", "OATScanpath", "check_num_samples", "generate", "greedy_eval", "trial_seeds"]

#: Most sampled scanpaths per display: every trial is decoded with a generator of its own, so the
#: work and memory grow with the count; the official evaluation samples 100.
MAX_SAMPLES = 10_000


class OATScanpath(NamedTuple):
    """One decoded scanpath."""

    objects: list[int]
    """0-based fixated objects, the EOS excluded (the official truncated ``GAZE``); a model trained on
    the published data ends a terminated scanpath with the target object."""
    terminated: bool
    """Whether the model pointed at the target token (EOS) within ``max_len`` steps."""


class OATGreedyEval(NamedTuple):
    """The official ``test_max`` of one sample: greedy decode plus the per-step losses."""

    gaze: torch.Tensor  # [K] int64, objects before the first EOS
    loss: torch.Tensor  # sum of the step losses / (len(sequence) + 1)
    step_losses: torch.Tensor  # [len(sequence) + 1]: CE of each step vs the ground truth, -1 past max_len


@dataclass
class _Displays:
    """What decoding reuses at every step: encoder memory and appearance features per display."""

    memory: torch.Tensor  # [N+1, B, E]
    features: torch.Tensor  # [B, N + 4, E/2]: the N crops, then the four (zero) test-time blanks
    bos: torch.Tensor  # [B, E/2]: the all-ones BOS blank
    target: torch.Tensor  # [B]


def _prepare(model: OAT, crops: torch.Tensor, targets: torch.Tensor) -> _Displays:
    """Encode ``B`` displays once (the official decode recomputes the same thing at every step)."""
    b, n = crops.shape[:2]
    device = model.pe.device
    src_pos = torch.cat((torch.arange(n, device=device).expand(b, n), targets.view(b, 1)), dim=1).T  # [N+1, B]
    src_img = torch.cat((crops, crops[torch.arange(b, device=device), targets].unsqueeze(1)), dim=1)
    src_emb = model.embed_source(position_triples(src_pos, targets, model.grid, decoder=False), src_img)
    src_mask = torch.zeros((n + 1, n + 1), dtype=torch.bool, device=device)
    padding = torch.zeros((b, n + 1), dtype=torch.bool, device=device)
    memory = model.encode(src_emb, src_mask, padding)
    crop_features = src_emb[:n, :, : model.pe_embed].transpose(0, 1)  # [B, N, E/2]
    blanks = torch.stack(
        (
            torch.zeros(crops.shape[2:], dtype=crops.dtype, device=device),
            torch.ones(crops.shape[2:], dtype=crops.dtype, device=device),
        )
    )
    blank_features = model.cnn_embedding(blanks.unsqueeze(0))[0]  # [2, E/2]: zeros, ones
    features = torch.cat((crop_features, blank_features[0].expand(b, N_BLANKS, -1)), dim=1)
    return _Displays(memory, features, blank_features[1].expand(b, -1), targets)


def _step_logits(model: OAT, ctx: _Displays, display: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Pointer logits ``[n, N+2]`` of the last step for ``n`` prefixes ``tokens [i, n]`` (BOS first)."""
    steps, count = tokens.shape
    device = tokens.device
    target = ctx.target[display]
    feats = ctx.features[display.view(1, -1), tokens.clamp(max=ctx.features.shape[1] - 1)]  # [i, n, E/2]
    feats = torch.cat((ctx.bos[display].unsqueeze(0), feats[1:]), dim=0)
    tgt_emb = model.embed_target(position_triples(tokens, target, model.grid, decoder=True), feats)
    memory = ctx.memory[:, display]
    padding = torch.zeros((count, steps), dtype=torch.bool, device=device)
    memory_padding = torch.zeros((count, memory.shape[0]), dtype=torch.bool, device=device)
    out = model.decode(tgt_emb, memory, square_subsequent_mask(steps, device), padding, memory_padding)
    return model.pointer_logits(memory, out)[-1]


def _allowed(logits: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """Step 1 may point at objects only; later steps at objects or EOS (official slicing)."""
    return logits[:, :n] if step == 1 else logits[:, : n + 1]


def pixel_range(model: OAT) -> tuple[float, float]:
    """The pixel values ``model`` was trained on: its cfg's, else the 0-255 of the Amazon crops."""
    low, high = (getattr(model, "pretrained_cfg", None) or {}).get("pixel_range", (0, 255))
    return float(low), float(high)


def _as_displays(model: OAT, crops: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N, 150, 93, 3]`` crops and ``[B]`` targets; ``B`` may be 0 (an empty batch or list)."""
    n = model.num_objects
    if isinstance(crops, np.ndarray):
        crops = torch.from_numpy(np.ascontiguousarray(crops))
    if isinstance(crops, torch.Tensor) and crops.dim() == 4:
        crops, target = [crops], [target]
    elif isinstance(crops, torch.Tensor) and crops.dim() == 5:
        crops = list(crops)
    elif not isinstance(crops, (list, tuple)):
        raise InvalidInputError(
            "crops must be one display [N, 150, 93, 3], a batch [B, N, 150, 93, 3] or a list of displays"
        )
    if isinstance(target, torch.Tensor | np.ndarray):
        target = target.reshape(-1).tolist()
    elif not isinstance(target, (list, tuple)):
        target = [target]
    if len(target) != len(crops):
        raise InvalidInputError(f"got {len(crops)} displays but {len(target)} targets")
    dtype, device = model.readout.weight.dtype, model.pe.device
    if not crops:
        return torch.empty((0, n, *CROP_SIZE, 3), dtype=dtype, device=device), torch.empty(
            0, dtype=torch.int64, device=device
        )
    scale = pixel_range(model)
    stacked = torch.stack([as_crops(c, n, f"display {i}'s crops", scale) for i, c in enumerate(crops)])
    targets = torch.tensor(
        [as_object_index(t, n, f"display {i}'s target") for i, t in enumerate(target)], device=device
    )
    return stacked.to(device, dtype), targets


def check_max_len(max_len: Any, model: OAT) -> int:
    """At most the model's position table (a longer scanpath has no position code to add)."""
    return whole_number(
        max_len,
        "max_len",
        high=model.longest_decoding,
        why="the decoder's position table; the official value is the longest training scanpath",
        error=InvalidInputError,
    )


def check_num_samples(value: Any, name: str = "num_samples") -> int:
    """Sampled scanpaths per display, at most :data:`MAX_SAMPLES`; ``name`` is the setting as the
    caller knows it (``--samples`` on the command line)."""
    why = "sampled scanpaths per display; the official evaluation samples 100"
    return whole_number(value, name, high=MAX_SAMPLES, why=why, error=InvalidOptionError)


def trial_seeds(generator: torch.Generator | None, count: int) -> list[int]:
    """One seed per trial, drawn one after another (so the first k of n are the seeds of k)."""
    return [int(torch.randint(0, 2**62, (1,), generator=generator)) for _ in range(count)]


@torch.no_grad()
def generate(
    model: OAT,
    crops: Any,
    target: Any,
    max_len: int,
    *,
    grid: Sequence[int] | None = None,
    strategy: str = "greedy",
    num_samples: int | None = None,
    generator: torch.Generator | int | None = None,
    seeds: Sequence[int] | None = None,
) -> list[list[OATScanpath]]:
    """Decode scanpaths: ``result[display][trial]`` (one trial for greedy).

    ``crops``: one display ``[N, 150, 93, 3]`` on the model's scale (Amazon: BGR, uint8 or 0-255
    float; the shelves: :func:`~attnzoo.vision.oat_inputs.display_crops`' [0, 1] floats; crops on
    the other scale are refused), a batch ``[B, N, 150, 93, 3]`` or a list of displays (an empty
    batch or list gives ``[]``); ``target``: the 0-based target object (one per display); ``max_len``: at most this many fixations (officially the longest training sequence);
    ``grid``: optional check against the model's. ``strategy="greedy"`` is the official ``test_max``,
    ``"sample"`` the official ``test_expect`` (``num_samples`` multinomial trials per display, 100 in
    the official evaluation; at most :data:`MAX_SAMPLES`). Step 1 never ends the scanpath; a trial
    ends when it points at the target token (``terminated=True``) or after ``max_len`` fixations.

    All trials of all displays decode together; a finished trial leaves the batch. Sampling uses
    one ``torch.Generator`` per trial seeded from ``seeds`` (one int per trial, display-major) or,
    without them, from ints drawn one by one from ``generator`` (an int seed, a generator, or
    ``None`` for torch's global RNG). A trial's scanpath therefore depends only on its seed:
    decoding it alone with ``seeds=[its seed]`` gives the same result (up to float ties, since a
    batch may round the last bit differently). The official code instead samples all its trials one
    after another from the global RNG, so its random stream is not reproduced.
    """
    if grid is not None and check_grid(grid) != model.grid:
        raise InvalidInputError(f"grid {tuple(grid)} does not match the model's {model.grid}")
    max_len = check_max_len(max_len, model)
    if strategy not in ("greedy", "sample"):
        raise InvalidInputError(f"strategy must be 'greedy' or 'sample', got {strategy!r}")
    if strategy == "greedy":
        if num_samples not in (None, 1) or seeds is not None:
            raise InvalidInputError(
                "greedy decoding is deterministic: num_samples and seeds apply to strategy='sample'"
            )
        per_display = 1
    else:
        per_display = 100 if num_samples is None else check_num_samples(num_samples)
    crops_t, targets = _as_displays(model, crops, target)
    n_displays = crops_t.shape[0]
    total = n_displays * per_display
    generators: list[torch.Generator] = []
    if strategy == "sample":
        if seeds is None:
            seeds = trial_seeds(as_generator(generator), total)
        elif len(seeds) != total:
            raise InvalidInputError(
                f"seeds must hold one int per trial ({n_displays} displays x {per_display} = {total}), got {len(seeds)}"
            )
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if n_displays == 0:  # an empty batch: no scanpaths, as a batch of B gives B lists
        return []

    was_training = model.training
    model.eval()
    try:
        ctx = _prepare(model, crops_t, targets)
        device = model.pe.device
        n = model.num_objects
        display_of = torch.arange(n_displays, device=device).repeat_interleave(per_display)
        tokens = torch.full((max_len + 1, total), model.bos_idx, dtype=torch.int64, device=device)
        lengths = [max_len] * total
        terminated = [False] * total
        active = torch.arange(total, device=device)
        for step in range(1, max_len + 1):
            logits = _allowed(_step_logits(model, ctx, display_of[active], tokens[:step, active]), step, n)
            if strategy == "greedy":
                chosen = torch.max(logits, 1)[1]
            else:
                probs = F.softmax(logits.float(), dim=1).cpu()
                chosen = torch.stack(
                    [
                        torch.multinomial(probs[j], 1, replacement=True, generator=generators[int(t)])[0]
                        for j, t in enumerate(active.tolist())
                    ]
                ).to(device)
            tokens[step, active] = chosen
            done = chosen == model.eos_idx
            for t in active[done].tolist():
                terminated[t], lengths[t] = True, step - 1
            active = active[~done]
            if active.numel() == 0:
                break
    finally:
        model.train(was_training)
    paths = [OATScanpath(tokens[1 : lengths[t] + 1, t].tolist(), terminated[t]) for t in range(total)]
    return [paths[d * per_display : (d + 1) * per_display] for d in range(n_displays)]


@torch.no_grad()
def greedy_eval(model: OAT, sample: Any, max_len: int) -> OATGreedyEval:
    """The official ``test_max`` on one sample (batch 1): the greedy scanpath and its step losses.

    Step ``i`` is scored (cross-entropy over the allowed slots, as the official slicing) against
    the ground truth's ``i``-th pointer while ``i <= len(sequence) + 1``; decoding continues past a
    predicted EOS (fed with a zero blank) until that many steps are scored, which changes only the
    losses. ``loss`` = sum of the scored steps / ``(len(sequence) + 1)``.
    """
    max_len = check_max_len(max_len, model)
    crops, target, seq = as_sample(sample, model.num_objects, 0, pixel_range(model))
    n = model.num_objects
    gt = [model.bos_idx, *seq, model.eos_idx]
    length = len(gt)
    was_training = model.training
    model.eval()
    try:
        device = model.pe.device
        ctx = _prepare(
            model, crops.unsqueeze(0).to(device, model.readout.weight.dtype), torch.tensor([target], device=device)
        )
        display = torch.zeros(1, dtype=torch.int64, device=device)
        tokens = [model.bos_idx]
        dtype = model.readout.weight.dtype
        step_losses = torch.full((length - 1,), -1.0, dtype=dtype)
        loss = torch.zeros((), dtype=dtype)
        gaze: list[int] = []
        for step in range(1, max_len + 1):
            prefix = torch.tensor(tokens, dtype=torch.int64, device=device).view(-1, 1)
            logits = _allowed(_step_logits(model, ctx, display, prefix), step, n)
            predicted = int(torch.max(logits, 1)[1])
            if step < length:
                step_loss = F.cross_entropy(
                    logits, torch.tensor([gt[step]], device=device), ignore_index=model.pad_idx
                ).cpu()
                step_losses[step - 1] = step_loss
                loss = loss + step_loss
            gaze.append(predicted)
            if model.eos_idx in gaze and step >= length:
                break
            tokens.append(predicted)
    finally:
        model.train(was_training)
    if model.eos_idx in gaze:
        gaze = gaze[: gaze.index(model.eos_idx)]
    return OATGreedyEval(torch.tensor(gaze, dtype=torch.int64), loss / (length - 1), step_losses)
