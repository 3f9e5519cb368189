"""NevaClip: zero-shot human scanpath prediction with a frozen CLIP and a foveation model.

Zanca, Zugarini, Dietz, Altstidl, Turban Ndjeuha, Schwinn, Eskofier. "Contrastive Language-Image
Pretrained Models are Zero-Shot Human Scanpath Predictors". https://arxiv.org/abs/2305.12380
Official code: https://github.com/dario-zanca/NevaClip (``NeVA.py::NeVAWrapper``, ``utils.py``,
``main.py``), built on NeVA (Schwinn et al., https://github.com/SchwinnL/NeVA).

There is nothing to train. For each of ``fixations`` steps a fixation ``p = (row, col)`` in
``[-1, 1]^2`` of the model's input crop is searched by sign-gradient descent so that the CLIP
embedding of the *foveated* image matches a target (a caption's text embedding):

* blur: ``G * x - x`` with a 41x41 Gaussian (sigma 10; the outer product of the 1-D kernel, as
  the official code builds it) applied per channel with reflection padding on the *normalised*
  image (:func:`gaussian_blur_difference`);
* foveation mask ``g = exp(-((u - p0)^2 + (v - p1)^2) / sigma_f)`` over ``linspace(-1, 1, S)``
  'ij' grids, sigma_f = 0.2 divides the squared distance directly (:func:`foveation_mask`);
* the model sees ``x + blur * clip(1 - (M + g), 0, 1)`` (:func:`foveate`) where the memory ``M``
  becomes ``M * forgetting + g(best p)`` after each fixation (:func:`update_memory`);
* loss ``1 - cos(visual(foveated), target)``; 20 iterations of ``p <- p - lr * sign(dL/dp)``
  from ``(0, 0)``; a sample whose loss did not improve on its best restarts uniformly in
  ``[-1, 1]^2`` (or is jittered by ``U(-lr/2, lr/2)`` without restarts). Official quirk kept: the
  stored "best" position is the one *after* the sign step, not the one that produced the loss.
* an optional second target is blended in as ``l * target + (1 - l) * second`` with
  ``l = (step / fixations)^2`` (the official ``output2``).

Batching: every sample's search is independent, so many images (and captions) run as one tensor
program. Restarts draw random numbers. The official code draws them from the global RNG for the
masked subset of non-improving samples, which couples the samples of a batch; ``rng="official"``
reproduces that, while ``rng="per_sample"`` (default) gives each sample its own generator so a
sample's scanpath does not depend on what it was batched with.

Coordinates: positions are (row, col) in the input crop, ``p0 = -1`` the top row and ``p1 = -1``
the left column (:func:`fixations_to_pixels` maps them to (x, y) pixels of the original image).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnzoo._placement import parameter_dtype, resolve_device, resolve_dtype
from attnzoo._values import is_integer, real_number, refuse_meta, whole_number
from attnzoo.errors import InvalidInputError, UnknownNameError, WeightsError
from attnzoo.registry import register_model

__all__ = [
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "NevaClip",
    "NevaClipResult",
    "check_search_settings",
    "fixations_to_pixels",
    "foveate",
    "foveation_mask",
    "gaussian_blur_difference",
    "gaussian_window",
    "preprocess_images",
    "target_embeddings",
    "update_memory",
]

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

RNG_MODES = ("per_sample", "official")


# -- foveation -----------------------------------------------------------------------------


def gaussian_window(size: int = 41, sigma: float = 10.0) -> torch.Tensor:
    """The ``[size, size]`` float32 Gaussian the official code builds: a normalised 1-D kernel
    (values from Python floats, normalised in float32) times its transpose."""
    if size < 1 or size % 2 == 0:
        raise InvalidInputError(f"blur filter size must be a positive odd number, got {size}")
    if not sigma > 0:
        raise InvalidInputError(f"blur sigma must be positive, got {sigma}")
    gauss = torch.tensor(
        [math.exp(-((i - size // 2) ** 2) / float(2 * sigma**2)) for i in range(size)], dtype=torch.float32
    )
    gauss = gauss / gauss.sum()
    return gauss[:, None] * gauss[None, :]


def gaussian_blur_difference(x: torch.Tensor, size: int = 41, sigma: float = 10.0) -> torch.Tensor:
    """``G * x - x`` per channel with reflection padding: what foveation adds where it blurs."""
    if x.ndim != 4:
        raise InvalidInputError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    pad = size // 2
    if pad >= min(x.shape[-2:]):
        raise InvalidInputError(
            f"blur filter size {size} needs images larger than {pad} pixels, got {tuple(x.shape[-2:])}"
        )
    channels = x.shape[1]
    window = gaussian_window(size, sigma).to(device=x.device, dtype=x.dtype)
    window = window.expand(channels, 1, size, size).contiguous()
    blurred = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), window, groups=channels)
    return blurred - x


def foveation_mask(pos: torch.Tensor, size: int = 224, sigma: float = 0.2, amplitude: float = 1.0) -> torch.Tensor:
    """``[B, 1, size, size]`` Gaussian blob at ``pos`` ([B, 2] or [B, 2, 1, 1], (row, col) in [-1, 1]).

    The squared distance is divided by ``sigma`` itself (not ``2 sigma^2``), as in the official code.
    """
    if pos.ndim == 2:
        pos = pos[:, :, None, None]
    if pos.ndim != 4 or pos.shape[1:] != (2, 1, 1):
        raise InvalidInputError(f"expected positions [B, 2] or [B, 2, 1, 1], got shape {tuple(pos.shape)}")
    batch = pos.shape[0]
    line = torch.linspace(-1, 1, size, device=pos.device, dtype=pos.dtype)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    rows = rows.expand(batch, size, size) - pos[:, 0]
    cols = cols.expand(batch, size, size) - pos[:, 1]
    distance = rows**2 + cols**2
    return (amplitude * torch.exp(-distance / sigma)).view(batch, 1, size, size)


def foveate(x: torch.Tensor, blur: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image the model sees: sharp where memory + current fixation cover it, blurred elsewhere."""
    return x + blur * torch.clip(1 - (memory + mask), 0, 1)


def update_memory(memory: torch.Tensor, mask: torch.Tensor, forgetting: float) -> torch.Tensor:
    """``M * forgetting + g``: with forgetting 0 (NevaClip) only the last fixation stays sharp."""
    return (memory * forgetting + mask).detach()


# -- preprocessing and coordinates ---------------------------------------------------------

RESIZE_MODES = ("shortest", "squash", "longest")


def _resize_geometry(
    width: int, height: int, input_size: int, resize_mode: str = "shortest"
) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of open_clip's eval transform.

    ``shortest``: torchvision Resize(short side) + CenterCrop, the long side truncated, offsets rounded
    half-even; ``squash``: Resize to the square; ``longest``: the long side to the square, then
    centre-padded (negative offsets: the padding's width on the left / top).
    """
    if resize_mode == "squash":
        return input_size, input_size, 0, 0
    if resize_mode == "longest":
        ratio = max(height / input_size, width / input_size)
        new_w, new_h = round(width / ratio), round(height / ratio)
        return new_w, new_h, -((input_size - new_w) // 2), -((input_size - new_h) // 2)
    if resize_mode != "shortest":
        raise InvalidInputError(f"resize_mode must be one of {RESIZE_MODES} (open_clip's), got {resize_mode!r}")
    if width <= height:
        new_w, new_h = input_size, int(input_size * height / width)
    else:
        new_w, new_h = int(input_size * width / height), input_size
    return new_w, new_h, round((new_w - input_size) / 2.0), round((new_h - input_size) / 2.0)


def fixations_to_pixels(
    pos: torch.Tensor | np.ndarray, image_size: tuple[int, int], input_size: int = 224, resize_mode: str = "shortest"
) -> np.ndarray:
    """``[T, 2]`` (x, y) in original-image pixels from (row, col) positions in [-1, 1] of the crop.

    ``image_size`` is ``(width, height)`` (PIL order); ``resize_mode`` the model's open_clip
    preprocessing (``preprocess_cfg["resize_mode"]``: ``shortest`` crops, ``squash`` stretches,
    ``longest`` pads; a fixation on the padding is clipped to the image's edge). Crop index
    ``(p + 1) / 2 * (S - 1)`` (the linspace grid), plus the crop offset, is scaled by the actual
    resize factor of each axis with pixel centres aligned as PIL resamples them; the result uses the
    convention of :class:`attnzoo.datasets.scanpaths.ScanpathRecord` (origin at the top-left pixel's
    corner, so pixel ``i`` spans ``[i, i + 1)``). This differs from ``index / (S / min(W, H))`` by
    under one original pixel.
    """
    refuse_meta(pos, "fixations")
    array = pos.detach().cpu().double().numpy() if isinstance(pos, torch.Tensor) else np.asarray(pos, dtype=np.float64)
    array = array.reshape(array.shape[0], -1) if array.ndim == 4 else array
    if array.ndim != 2 or array.shape[1] != 2:
        raise InvalidInputError(f"expected fixations [T, 2] as (row, col), got shape {array.shape}")
    width, height = (int(v) for v in image_size)
    if width < 1 or height < 1:
        raise InvalidInputError(f"image_size must be (width, height) > 0, got {image_size}")
    new_w, new_h, left, top = _resize_geometry(width, height, input_size, resize_mode)
    row = (array[:, 0] + 1) / 2 * (input_size - 1)
    col = (array[:, 1] + 1) / 2 * (input_size - 1)
    x = np.clip((col + left + 0.5) * (width / new_w), 0, width)
    y = np.clip((row + top + 0.5) * (height / new_h), 0, height)
    return np.stack([x, y], axis=1)


def preprocess_images(
    images: Sequence[Any],
    input_size: int = 224,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """open_clip's eval transform on decoded RGB images: ``([B, 3, S, S], [(width, height), ...])``.

    Any path / PIL / numpy / tensor image :func:`attnzoo.datasets.load_image` reads is accepted.
    """
    from open_clip.transform import image_transform

    from attnzoo.datasets.images import load_image

    transform = image_transform(
        input_size,
        is_train=False,
        mean=tuple(mean),
        std=tuple(std),
        interpolation=interpolation,
        resize_mode=resize_mode,
    )
    tensors, sizes = [], []
    for source in images:
        picture = load_image(source)
        sizes.append(picture.size)
        tensors.append(transform(picture))
    if not tensors:
        raise InvalidInputError("no images given")
    return torch.stack(tensors), sizes


# -- the search ----------------------------------------------------------------------------


@dataclass
class NevaClipResult:
    """Scanpaths of a batch. Tensors are on the CPU."""

    positions: torch.Tensor
    """``[B, T, 2]`` best fixation per step, (row, col) in the input crop, [-1, 1] (restarts and
    sign steps can leave it by up to ``lr``)."""
    losses: torch.Tensor
    """``[B, T]`` best loss (1 - cosine) of each fixation."""
    xy: list[np.ndarray] | None = None
    """Per image ``[T, 2]`` (x, y) in original-image pixels; ``None`` for pre-processed tensor input."""
    loss_trace: torch.Tensor | None = None
    """``[T, iterations, B]`` loss at every inner iteration (``return_traces=True``)."""
    pos_trace: torch.Tensor | None = None
    """``[T, iterations, B, 2]`` position fed to the model at every inner iteration."""


class _RestartDraws:
    """Uniform [0, 1) draws for the samples that did not improve, as ``[n, 2, 1, 1]``."""

    def __init__(
        self, mode: str, seed: int | Sequence[int] | None, batch: int, device: torch.device, dtype: torch.dtype
    ):
        if mode not in RNG_MODES:
            raise InvalidInputError(f"rng must be one of {RNG_MODES}, got {mode!r}")
        self.mode, self.device, self.dtype = mode, device, dtype
        if mode == "official":
            if seed is not None and not is_integer(seed):
                raise InvalidInputError(
                    "rng='official' draws from one stream: seed must be an int (or None for torch's global RNG)"
                )
            self.generator = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
            return
        if seed is None:
            seeds = [int(s) for s in torch.randint(0, 2**62, (batch,))]
        elif is_integer(seed):
            seeds = [int(seed)] * batch
        else:
            seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray, torch.Tensor)) else []
            if len(seeds) != batch or not all(is_integer(s) for s in seeds):
                raise InvalidInputError(f"seed must be an int or a list of {batch} ints (one per sample), got {seed!r}")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, not_improved: torch.Tensor) -> torch.Tensor:
        if self.mode == "official":
            count = int(not_improved.sum())
            return torch.rand((count, 2, 1, 1), generator=self.generator, device=self.device, dtype=self.dtype)
        indices = not_improved.nonzero().flatten().tolist()
        draws = [torch.rand((1, 2, 1, 1), generator=self.generators[i], dtype=self.dtype) for i in indices]
        return torch.cat(draws).to(self.device)


#: Generous bounds on the search's counts (the paper: 10 fixations of 20 steps): every step is a CLIP forward and
#: backward pass, so a typo such as 1e9 would otherwise run for days before anything is written.
_SEARCH_LIMITS = {
    "fixations": (1000, "human scanpaths hold tens of fixations; the paper predicts 10"),
    "iterations": (10000, "gradient steps per fixation; the paper takes 20"),
}


def check_search_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The given search settings as plain Python values, refused where they cannot mean what they say
    (zero fixations, a NaN or infinite step, a memory that grows without bound)."""
    checked = dict(settings)
    for name, (high, why) in _SEARCH_LIMITS.items():
        if name in settings:
            checked[name] = whole_number(settings[name], name, high=high, why=why, error=InvalidInputError)
    if "lr" in settings:
        why = "the sign-gradient step, in units of the [-1, 1] crop"
        checked["lr"] = real_number(settings["lr"], "lr", above=0, why=why, error=InvalidInputError)
    if "forgetting" in settings:
        why = "the share of earlier fixations' memory kept at each step; 0 in the paper"
        checked["forgetting"] = real_number(
            settings["forgetting"], "forgetting", low=0, high=1, why=why, error=InvalidInputError
        )
    if "random_restarts" in settings:
        restarts = settings["random_restarts"]
        if not isinstance(restarts, (bool, np.bool_)):
            raise InvalidInputError(f"random_restarts must be True or False, got {restarts!r}")
        checked["random_restarts"] = bool(restarts)
    return checked


def target_embeddings(value: Any, name: str, dim: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, D]`` target embeddings in ``dtype`` from a tensor or array ``[D]`` / ``[N, D]`` (or a list of ``[D]``
    tensors). A target with NaN or infinite values, or a zero vector, has no direction to search for (the
    search would stay at the image centre), so it is refused, as is a complex or boolean one."""
    if isinstance(value, (list, tuple)):
        try:
            value = torch.stack([torch.as_tensor(v) for v in value])
        except (RuntimeError, TypeError, ValueError) as err:
            raise InvalidInputError(f"{name}: a list of embeddings must hold tensors of one size ({err})") from None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiu":
            raise InvalidInputError(f"{name} embedding must be real numbers, got a numpy array of {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(
            f"{name} embedding must be a tensor or an array [D] or [N, D], got {type(value).__name__}"
        )
    refuse_meta(value, f"{name} embedding")
    if value.is_complex() or value.dtype == torch.bool:
        raise InvalidInputError(f"{name} embedding must be real numbers, got {value.dtype}")
    embedding = value[None] if value.ndim == 1 else value
    if embedding.ndim != 2 or embedding.shape[0] == 0 or embedding.shape[1] == 0:
        raise InvalidInputError(f"{name} embedding must be [D] or [N, D], got shape {tuple(value.shape)}")
    if dim is not None and embedding.shape[1] != dim:
        raise InvalidInputError(
            f"{name} embedding has dimension {embedding.shape[1]} but the vision tower outputs {dim}"
        )
    embedding = embedding.detach().to(dtype)
    if not torch.isfinite(embedding).all():
        raise InvalidInputError(
            f"{name} embedding holds NaN or infinite values (in {dtype}): it gives the search no direction"
        )
    if (torch.linalg.vector_norm(embedding, dim=1) == 0).any():
        raise InvalidInputError(f"{name} embedding is a zero vector: its cosine similarity is undefined")
    return embedding


def _module_dtype(module: nn.Module | None) -> torch.dtype:
    """The dtype a given CLIP (or tower) already runs in: its floating parameters' one dtype, when that is one
    models run in here (float16, bfloat16, float32, float64); float32 for none given (a CLIP loaded by name),
    one without such parameters, or one whose parameters mix dtypes (open_clip's low-precision towers keep
    their norms in float32): casting those to the first parameter's dtype would change them."""
    if module is None:
        return torch.float32
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    own = parameter_dtype(module) if len(dtypes) == 1 else None
    return own if own in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float32


def _module_device(module: nn.Module, name: str) -> torch.device | None:
    """The device of ``module``'s first parameter (or buffer), where a given CLIP already is; None for a module
    without tensors. A module on the meta device (built without weights) is refused: it has nothing to run."""
    first = None
    for what, tensors in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for key, tensor in tensors:
            refuse_meta(tensor, f"{name}'s {what} {key}")
            first = tensor.device if first is None else first
    return first


class NevaClip:
    """NevaClip scanpath predictor around a frozen open_clip model.

    Either name an open_clip model (``model_name``, ``pretrained``; the paper's ``"RN50"`` /
    ``"openai"`` by default, loaded on first use through ``open_clip.create_model_and_transforms``),
    or pass ``model`` (an open_clip ``CLIP``: its ``visual`` tower and ``encode_text``) or just a
    ``visual`` tower (targets must then be embeddings, unless ``text_encoder`` and ``tokenizer``
    are given too). The passed model is put in eval mode with ``requires_grad_(False)``: only the
    fixation positions need gradients, and it saves the weight-gradient half of every backward pass.
    It keeps its own dtype unless ``dtype`` names another (a named CLIP runs in float32), and stays on its
    own device (its parameters') unless ``device`` names another (a named CLIP: the CPU); the search's
    positions, foveation and targets are float32 whatever the tower's dtype (:attr:`search_dtype`).
    """

    def __init__(
        self,
        model_name: str = "RN50",
        pretrained: str | None = "openai",
        *,
        model: nn.Module | None = None,
        visual: nn.Module | None = None,
        text_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        preprocess_cfg: dict[str, Any] | None = None,
        foveation_sigma: float = 0.2,
        blur_filter_size: int = 41,
        blur_sigma: float = 10.0,
        amplitude: float = 1.0,
        device: str | int | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        cache_dir: str | None = None,
        channels_last: bool = False,
    ):
        self.model_name, self.pretrained, self.cache_dir = model_name, pretrained, cache_dir
        self.foveation_sigma, self.blur_filter_size, self.blur_sigma, self.amplitude = (
            foveation_sigma,
            blur_filter_size,
            blur_sigma,
            amplitude,
        )
        # a given CLIP (or tower) stays where it is unless device= names another, as a transformers or open_clip
        # model does: moving a user's CUDA model to the CPU behind their back would change their object (and
        # its speed); a CLIP loaded by name is built on the CPU unless device= says otherwise
        given = model if model is not None else visual
        own = _module_device(given, "model" if model is not None else "visual") if given is not None else None
        self.device = resolve_device(device) if device is not None else own or torch.device("cpu")
        # a given CLIP (or tower) keeps its own dtype unless dtype= asks for another, as the pipelines keep a
        # model's: casting a user's bf16 module to float32 behind their back would change their object; a CLIP
        # loaded by name runs in float32. The search itself runs in float32 either way (search_dtype)
        self.dtype = resolve_dtype(dtype) or _module_dtype(model if model is not None else visual)
        self.channels_last = channels_last
        self._preprocess_cfg = preprocess_cfg
        self._tokenizer = tokenizer
        self._text_encoder = text_encoder
        self._visual: nn.Module | None = None
        self._module: nn.Module | None = None  # the whole CLIP (or the bare tower): what .to() moves
        # a named CLIP without weights is drawn at random when first used, which may be long after this
        # (and after other code has drawn from the global RNG): it is drawn from the RNG state of now, so
        # it is the CLIP an eager build here would give (attnzoo.pipeline seeds that state: every rerun
        # and every process gets the same model), and building it leaves the caller's RNG as it was
        self._init_rng_state: torch.Tensor | None = None
        if model is None and visual is None and self.random_init:
            self._init_rng_state = torch.random.get_rng_state()
        if model is not None:
            if not hasattr(model, "visual"):
                raise InvalidInputError(
                    "model must be an open_clip CLIP-like module with a .visual tower; pass visual= for a bare tower"
                )
            self._text_encoder = text_encoder or getattr(model, "encode_text", None)
            self._setup(model)
        elif visual is not None:
            self._setup(visual)

    # -- model ---------------------------------------------------------------------------

    def _setup(self, model: nn.Module) -> None:
        model.eval().requires_grad_(False)
        model.to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._module = model
        self._visual = getattr(model, "visual", model)

    def to(
        self,
        *args: str | int | torch.device | torch.dtype | torch.Tensor,
        device: str | int | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> NevaClip:
        """Move the whole CLIP (vision and text towers) and use ``device``/``dtype`` for the search. As
        ``nn.Module.to``, a device, a dtype, both, or a tensor (its device and dtype) may come positionally."""
        if len(args) > 2:
            raise InvalidInputError(f"NevaClip.to takes a device and a dtype, got {len(args)} positional arguments")
        for arg in args:
            if isinstance(arg, torch.Tensor):
                device, dtype = arg.device, arg.dtype
            elif isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        # both checked before either changes: a refused dtype leaves the model where it was
        new_device = resolve_device(device) if device is not None else self.device
        new_dtype = resolve_dtype(dtype) or self.dtype
        self.device, self.dtype = new_device, new_dtype
        if self._module is not None:
            self._setup(self._module)
        return self

    def eval(self) -> NevaClip:
        """The CLIP is always frozen in eval mode; here for the ``model.to(...).eval()`` every pipeline does."""
        return self

    @property
    def random_init(self) -> bool:
        """The named CLIP gets open_clip's random initialisation (no pretrained tag or checkpoint; an
        ``hf-hub:`` / ``local-dir:`` name brings its own weights)."""
        return not self.pretrained and not self.model_name.startswith(("hf-hub:", "local-dir:"))

    def _load(self) -> None:
        import open_clip

        if not (self.model_name.startswith(("hf-hub:", "local-dir:")) or self.model_name in open_clip.list_models()):
            raise UnknownNameError("open_clip model", self.model_name, open_clip.list_models())
        from attnzoo.weights import hub

        reachable = hub.hub_reachable()  # one short probe: an unreachable Hub fails now, not after its retries
        seeded = self._init_rng_state
        try:
            with hub.hf_cache_only(not reachable), torch.random.fork_rng(devices=[], enabled=seeded is not None):
                if seeded is not None:  # random weights: drawn from the RNG state at construction (see __init__)
                    torch.random.set_rng_state(seeded)
                model, _, _ = open_clip.create_model_and_transforms(
                    self.model_name, pretrained=self.pretrained, cache_dir=self.cache_dir
                )
        except Exception as err:  # noqa: BLE001  open_clip raises RuntimeError / OSError / HF errors for missing weights
            if not reachable and any(isinstance(e, OSError) for e in (err, err.__cause__, err.__context__)):
                what = f"open_clip's {self.model_name} weights {self.pretrained!r}"
                raise hub.unavailable_error(what, hub.hf_endpoint()) from None
            raise WeightsError(
                f"could not load open_clip {self.model_name!r} with weights={self.pretrained!r} ({err}); "
                "check the tag (open_clip.list_pretrained()), the network, or pass a local checkpoint path as weights="
            ) from None
        self._text_encoder = self._text_encoder or model.encode_text
        self._setup(model)
        self._init_rng_state = None

    @property
    def visual(self) -> nn.Module:
        """The frozen vision tower (loads the named model on first access)."""
        if self._visual is None:
            self._load()
        assert self._visual is not None
        return self._visual

    @property
    def input_size(self) -> int:
        size = getattr(self.visual, "image_size", None) or (self._preprocess_cfg or {}).get("size", 224)
        if isinstance(size, (tuple, list)):
            if len(set(size)) != 1:
                raise InvalidInputError(f"NevaClip foveates a square input; the tower expects {tuple(size)}")
            size = size[0]
        return int(size)

    @property
    def embed_dim(self) -> int | None:
        dim = getattr(self.visual, "output_dim", None)
        return int(dim) if isinstance(dim, int) else None

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's eval preprocessing of this model (OpenAI's bicubic / centre crop / mean-std by default)."""
        cfg = {
            "size": self.input_size,
            "mean": OPENAI_DATASET_MEAN,
            "std": OPENAI_DATASET_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }
        cfg.update(getattr(self.visual, "preprocess_cfg", None) or {})
        cfg.update(self._preprocess_cfg or {})
        return cfg

    @property
    def tokenizer(self) -> Callable[..., torch.Tensor]:
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer

    # -- inputs --------------------------------------------------------------------------

    def preprocess(self, images: Any) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Decoded, resized, centre-cropped, normalised images and their original (width, height)."""
        cfg = self.preprocess_cfg
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        return preprocess_images(
            items, self.input_size, cfg["mean"], cfg["std"], cfg["interpolation"], cfg["resize_mode"]
        )

    def tokenize(self, captions: Sequence[str], *, truncate: bool = False) -> torch.Tensor:
        """Token ids; refuses empty captions and (unless ``truncate``) captions the tokenizer would cut."""
        tokenizer = self.tokenizer
        context = int(getattr(tokenizer, "context_length", None) or 77)
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise InvalidInputError(f"caption {index} must be a string, got {type(caption).__name__}")
            if not caption.strip():
                raise InvalidInputError(
                    f"caption {index} is empty; give a non-empty caption or an embedding tensor as target"
                )
            if not truncate:
                length = self._token_count(caption)
                if length > context:
                    raise InvalidInputError(
                        f"caption {index} is {length} tokens long (with start/end tokens) but the text encoder's context "
                        f"is {context}; shorten it or pass truncate=True to cut it as open_clip would"
                    )
        return tokenizer(list(captions))

    def _token_count(self, caption: str) -> int:
        tokenizer = self.tokenizer
        if (
            hasattr(tokenizer, "encode")
            and hasattr(tokenizer, "sot_token_id")
            and getattr(tokenizer, "reduction_fn", None) is None
        ):
            return len(tokenizer.encode(caption)) + 2
        tokens = tokenizer([caption], context_length=4096)
        pad_id = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None) or 0
        return int((tokens != pad_id).sum())

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str], *, truncate: bool = False) -> torch.Tensor:
        """``[N, D]`` un-normalised text embeddings, as the official ``main.py`` uses them."""
        if self._visual is None:
            self._load()  # the named model brings its text tower
        if self._text_encoder is None:
            raise InvalidInputError(
                "this NevaClip has no text encoder: pass model= (a CLIP) or text_encoder= and tokenizer=, or give embeddings"
            )
        tokens = self.tokenize(captions, truncate=truncate).to(self.device)
        return self._text_encoder(tokens).float()

    @property
    def search_dtype(self) -> torch.dtype:
        """Positions, memory and targets are float32 (float64 for a float64 model), whatever the tower's dtype."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _targets(self, targets: Any, truncate: bool, name: str) -> torch.Tensor:
        if isinstance(targets, str):
            targets = [targets]
        if isinstance(targets, (torch.Tensor, np.ndarray)) or (
            isinstance(targets, (list, tuple)) and targets and isinstance(targets[0], (torch.Tensor, np.ndarray))
        ):
            embedding = target_embeddings(targets, name, self.embed_dim, self.search_dtype)
        elif isinstance(targets, (list, tuple)) and targets:
            embedding = target_embeddings(
                self.encode_captions(targets, truncate=truncate), name, self.embed_dim, self.search_dtype
            )
        else:
            raise InvalidInputError(
                f"{name} must be a caption, a list of captions or an embedding tensor, got {type(targets).__name__}"
            )
        return embedding.to(self.device)

    def _images(self, images: Any) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        size = self.input_size
        refuse_meta(images, "images")
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
                raise InvalidInputError(
                    f"a tensor input must be a pre-processed batch [B, 3, {size}, {size}], got shape {tuple(images.shape)}; "
                    "pass raw pictures (paths, PIL images, arrays) in a list to have them pre-processed"
                )
            return images, None
        if isinstance(images, np.ndarray) and images.ndim not in (2, 3):
            raise InvalidInputError(
                f"a numpy image must be HxW or HxWxC, got shape {images.shape}; pass a batch as a list"
            )
        return self.preprocess(images)

    # -- the search ----------------------------------------------------------------------

    def predict(
        self,
        images: Any,
        targets: Any,
        *,
        second_target: Any = None,
        fixations: int = 10,
        iterations: int = 20,
        lr: float = 0.1,
        random_restarts: bool = True,
        forgetting: float = 0.0,
        seed: int | Sequence[int] | None = 0,
        rng: str = "per_sample",
        truncate: bool = False,
        return_traces: bool = False,
        autocast: bool = True,
        progress: bool = True,
    ) -> NevaClipResult:
        """Scanpaths for a batch of images and targets (one each, or one broadcast to all).

        ``images``: a pre-processed ``[B, 3, S, S]`` float tensor, or pictures (a path, PIL image,
        array, or a list of them). ``targets`` / ``second_target``: a caption, a list of captions,
        or embeddings ``[D]`` / ``[N, D]``. ``rng="per_sample"``: sample ``i`` restarts from its
        own CPU generator seeded with ``seed`` (or ``seed[i]``), so its scanpath is the same in any
        batch, and a batch of one draws what the official code draws after
        ``torch.manual_seed(seed)``; ``rng="official"``: one stream for the batch, drawn as the
        official code does (``seed=None``: torch's global RNG). ``autocast`` (fp16) applies on
        CUDA only, as the official ``torch.cuda.amp.autocast()``. ``progress``: a bar over the fixation
        steps on a terminal (the paper's settings take minutes per image on a CPU).
        """
        settings = check_search_settings(
            {
                "fixations": fixations,
                "iterations": iterations,
                "lr": lr,
                "random_restarts": random_restarts,
                "forgetting": forgetting,
            }
        )
        x, sizes = self._images(images)
        target = self._targets(targets, truncate, "targets")
        second = None if second_target is None else self._targets(second_target, truncate, "second_target")
        batch = max(x.shape[0], target.shape[0], 1 if second is None else second.shape[0])
        for name, count in (
            ("images", x.shape[0]),
            ("targets", target.shape[0]),
            ("second_target", 0 if second is None else second.shape[0]),
        ):
            if count not in (0, 1, batch):
                raise InvalidInputError(f"got {count} {name} for a batch of {batch}: give one, or one per sample")
        x = x.to(self.device, self.search_dtype).expand(batch, -1, -1, -1).contiguous()
        target = target.expand(batch, -1).contiguous()
        second = None if second is None else second.expand(batch, -1).contiguous()
        if sizes is not None and len(sizes) == 1:
            sizes = sizes * batch
        draws = _RestartDraws(rng, seed, batch, self.device, x.dtype)
        result = self._search(x, target, second, draws, return_traces, autocast, progress, **settings)
        if sizes is not None:
            mode = self.preprocess_cfg["resize_mode"]
            result.xy = [
                fixations_to_pixels(result.positions[i], sizes[i], self.input_size, mode) for i in range(batch)
            ]
        return result

    __call__ = predict

    def _search(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        second: torch.Tensor | None,
        draws: _RestartDraws,
        traces: bool,
        autocast: bool,
        progress: bool,
        *,
        fixations: int,
        iterations: int,
        lr: float,
        random_restarts: bool,
        forgetting: float,
    ) -> NevaClipResult:
        from tqdm.auto import tqdm

        visual, size, batch = self.visual, self.input_size, x.shape[0]
        use_amp = autocast and x.device.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
        positions, losses, loss_trace, pos_trace = [], [], [], []
        bar = tqdm(
            total=fixations,
            desc=f"NevaClip search ({batch} image{'s' if batch > 1 else ''})",
            unit="fixation",
            dynamic_ncols=True,
            leave=False,
            disable=None if progress else True,  # on a terminal only
        )
        with bar, amp, torch.enable_grad():
            with torch.no_grad():
                blur = gaussian_blur_difference(x, self.blur_filter_size, self.blur_sigma)
            memory = torch.zeros((batch, 1, size, size), device=x.device, dtype=x.dtype)
            for step in range(fixations):
                if second is not None:
                    weight = (step / fixations) ** 2
                    goal = weight * target + (1 - weight) * second
                else:
                    goal = target
                pos = torch.zeros((batch, 2, 1, 1), device=x.device, dtype=x.dtype, requires_grad=True)
                best_pos = torch.zeros((batch, 2, 1, 1), device=x.device, dtype=x.dtype)
                best_loss = torch.full((batch,), float("inf"), device=x.device, dtype=x.dtype)
                for iteration in range(iterations):
                    if not bar.disable:
                        bar.set_postfix_str(f"iteration {iteration + 1}/{iterations}")
                    if traces:
                        pos_trace.append(pos.detach().reshape(batch, 2).clone())
                    mask = foveation_mask(pos, size, self.foveation_sigma, self.amplitude)
                    image = foveate(x, blur, memory, mask)
                    if image.dtype != self.dtype and not use_amp:
                        image = image.to(self.dtype)
                    if self.channels_last:
                        image = image.contiguous(memory_format=torch.channels_last)
                    output = visual(image)
                    if isinstance(output, (tuple, list)):
                        output = output[0]
                    if output.shape[-1] != goal.shape[-1]:
                        raise InvalidInputError(
                            f"target embedding has dimension {goal.shape[-1]} but the vision tower outputs {output.shape[-1]}"
                        )
                    loss = 1 - F.cosine_similarity(output.to(goal.dtype) if not use_amp else output, goal, 1)
                    # sum, not the official mean: same signs, and a sample's gradient does not depend on the batch size
                    (grad,) = torch.autograd.grad(loss.sum(), pos)
                    with torch.no_grad():
                        loss = loss.detach().to(best_loss.dtype)
                        if traces:
                            loss_trace.append(loss.clone())
                        pos -= torch.sign(grad) * lr
                        improved = loss < best_loss
                        best_loss = torch.where(improved, loss, best_loss)
                        best_pos = torch.where(improved[:, None, None, None], pos, best_pos)
                        stuck = ~improved
                        if bool(stuck.any()):
                            fresh = draws(stuck)
                            if random_restarts:
                                pos[stuck] = fresh * 2 - 1
                            else:
                                pos[stuck] = pos[stuck] + (fresh * lr - lr / 2)
                with torch.no_grad():
                    memory = update_memory(
                        memory, foveation_mask(best_pos, size, self.foveation_sigma, self.amplitude), forgetting
                    )
                positions.append(best_pos.detach().reshape(batch, 2))
                losses.append(best_loss)
                bar.update(1)
        result = NevaClipResult(positions=torch.stack(positions, 1).cpu(), losses=torch.stack(losses, 1).cpu())
        if traces:
            result.loss_trace = torch.stack(loss_trace).reshape(fixations, iterations, batch).cpu()
            result.pos_trace = torch.stack(pos_trace).reshape(fixations, iterations, batch, 2).cpu()
        return result


@register_model(family="nevaclip", tasks=("scanpath",), own_weights=True)
def nevaclip(pretrained: bool = True, weights: Any = None, **kwargs: Any) -> NevaClip:
    """NevaClip on an open_clip model (``model_name``, default the paper's ``"RN50"``).

    ``weights`` is an open_clip pretrained tag or a local checkpoint path (default ``"openai"``);
    ``pretrained=False`` (or ``weights="none"``, which the factory turns into that) gives CLIP's
    random initialisation.
    """
    if not isinstance(pretrained, bool):
        raise InvalidInputError(
            f"pretrained={pretrained!r}: pass open_clip's pretrained tag (or a checkpoint path) as "
            "weights=, e.g. weights='openai'"
        )
    if weights is not None:
        kwargs["pretrained"] = os.fspath(weights) if isinstance(weights, os.PathLike) else weights
    elif not pretrained:
        kwargs["pretrained"] = None
    return NevaClip(**kwargs)
