"""FLUX.1-Fill as the model of subject insertion: loading through diffusers' own ``from_pretrained`` (its
cache; offline mode honoured; dtype, device, CPU offload), a tiny random configuration for tests and the
demo, and one inpainting run of a diptych canvas with the attention edit installed.

The run is diffusers' ``FluxFillPipeline.__call__`` itself: the edit enters through the attention
processors, the step counter of the timestep window and the latent blending through
``callback_on_step_end``. The blending (``blend=True``, the corrected behaviour) is what the official
code means to do and does not (its blending is an exact no-op): after each step the unmasked latents
are replaced by the canvas's own latents noised to the next noise level, so everything outside the
mask (the subject's panel and the target's background) stays the input's.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnzoo._placement import resolve_dtype
from attnzoo.errors import InvalidInputError, MissingDependencyError
from attnzoo.multimodal.insertion.in_context_brush import (
    InsertionAttention,
    InsertionState,
    check_flux_transformer,
    insertion_processors,
)
from attnzoo.multimodal.insertion.layout import PanelLayout, pack_latents

__all__ = [
    "FLUX_FILL_ID",
    "FillOutput",
    "FluxFillModel",
    "StandInTextEncoder",
    "load_flux_fill",
    "run_fill",
    "tiny_flux_fill",
]

FLUX_FILL_ID = "black-forest-labs/FLUX.1-Fill-dev"

#: The tiny configuration of the notes (§3.1): latent channels 2, VAE factor 1, 2+2 blocks, 2 heads x 16.
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=20,
    out_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
    guidance_embeds=True,
)
TINY_VAE = dict(
    block_out_channels=(4,),
    layers_per_block=1,
    latent_channels=2,
    norm_num_groups=1,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.5035,
    shift_factor=0.0609,
)


class StandInTextEncoder(torch.nn.Module):
    """Prompt embeddings for a FLUX model without its text encoders (the tiny random model of tests and the
    demo): the prompt's UTF-8 bytes through a random table (``length`` tokens, padded), mean-pooled and
    projected for the pooled embedding. Deterministic for a seed; not a language model."""

    def __init__(self, dim: int, pooled_dim: int, length: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.length = length
        self.table = torch.nn.Parameter(torch.randn(257, dim, generator=g) * 0.5, requires_grad=False)
        self.pool = torch.nn.Parameter(torch.randn(dim, pooled_dim, generator=g) / dim**0.5, requires_grad=False)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(prompts), self.length), 256, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            data = list(prompt.encode("utf-8"))[: self.length]
            ids[i, : len(data)] = torch.tensor(data, dtype=torch.long)
        embeds = self.table[ids.to(self.table.device)]
        return embeds, embeds.mean(1) @ self.pool


class FluxFillModel:
    """A diffusers ``FluxFillPipeline`` as attnzoo's model of the subject-insertion task.

    ``to(device, dtype)`` and ``eval()`` behave as a module's (an offloaded pipeline stays where its hooks
    put it, and keeps the dtype it was offloaded in: cast it before offloading); ``name`` is what reports call it. ``prompt_encoder`` stands in for the text encoders of a
    pipeline built without them (the tiny model)."""

    def __init__(
        self,
        pipe: Any,
        *,
        name: str | None = None,
        prompt_encoder: StandInTextEncoder | None = None,
        offloaded: bool = False,
    ):
        from diffusers import FluxFillPipeline

        if not issubclass(type(pipe), FluxFillPipeline):  # (no narrowing: diffusers types its pipelines loosely)
            raise InvalidInputError(
                f"subject insertion needs a diffusers FluxFillPipeline (FLUX.1-Fill), got {type(pipe).__name__}"
            )
        self.pipe: Any = pipe
        check_flux_transformer(self.pipe.transformer)
        self.prompt_encoder, self.offloaded = prompt_encoder, offloaded
        self.name = name or getattr(self.pipe.config, "_name_or_path", None) or "FluxFillPipeline"

    def __repr__(self) -> str:
        return f"FluxFillModel({self.name!r}, offloaded={self.offloaded})"

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> FluxFillModel:
        if self.offloaded:  # the offload hooks place each model on the execution device when it runs
            if dtype is not None and dtype != self.dtype:
                raise InvalidInputError(
                    f"this model is already offloaded in {self.dtype}: choose the dtype before offloading "
                    "(dtype=... with cpu_offload=True when loading, or give the pipeline an un-offloaded model "
                    "with dtype=... and cpu_offload=True)"
                )
            return self
        kwargs: dict[str, Any] = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            self.pipe.to(**kwargs)
            if self.prompt_encoder is not None:
                self.prompt_encoder.to(**kwargs)
        return self

    def eval(self) -> FluxFillModel:
        return self

    @property
    def transformer(self) -> Any:
        return self.pipe.transformer

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        return torch.device(self.pipe._execution_device)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def has_text_encoders(self) -> bool:
        return all(
            getattr(self.pipe, n, None) is not None
            for n in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        )

    def layout(self, height: int, width: int, orientation: str) -> PanelLayout:
        """The token layout of a ``height x width`` diptych at this model's VAE factor."""
        if orientation == "vertical":
            return PanelLayout(height // 2, width, orientation, self.vae_scale_factor)
        return PanelLayout(height, width // 2, orientation, self.vae_scale_factor)

    def check_prompt_embeds(self, prompt_embeds: Any, pooled_prompt_embeds: Any) -> None:
        """Given embeddings have the widths the transformer projects from (else a shape error deep inside it)."""
        config = self.transformer.config
        for name, given, setting in (
            ("prompt_embeds", prompt_embeds, "joint_attention_dim"),
            ("pooled_prompt_embeds", pooled_prompt_embeds, "pooled_projection_dim"),
        ):
            width = getattr(config, setting)
            shape = tuple(getattr(given, "shape", np.shape(given)))
            if not shape or shape[-1] != width:
                raise InvalidInputError(
                    f"{name} must be {width} wide (the transformer's {setting}) for {self.name}, got shape {shape}"
                )
            if isinstance(given, torch.Tensor) and given.is_floating_point() and not torch.isfinite(given).all():
                raise InvalidInputError(f"{name} holds NaN or infinite values")

    def encode_prompt(self, prompt: str, max_sequence_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [1, T, D], pooled_prompt_embeds [1, P])`` for one prompt."""
        if self.has_text_encoders:
            with torch.inference_mode():
                embeds, pooled, _ = self.pipe.encode_prompt(
                    prompt=[prompt], prompt_2=None, device=self.device, max_sequence_length=max_sequence_length
                )
            return embeds, pooled
        if self.prompt_encoder is not None:
            with torch.inference_mode():
                return self.prompt_encoder([prompt])
        raise InvalidInputError(
            f"{self.name} has no text encoders: pass prompt_embeds= and pooled_prompt_embeds= instead of a prompt"
        )


# -- building and loading ------------------------------------------------------------------------


def tiny_flux_fill(seed: int = 0, *, text_length: int = 16) -> FluxFillModel:
    """A random FLUX.1-Fill of the notes' tiny configuration (VAE factor 1, latent channels 2), with a
    :class:`StandInTextEncoder`: runs end to end on a CPU in milliseconds; its images are noise."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
        vae = AutoencoderKL(**TINY_VAE)
    pipe: Any = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        transformer=transformer,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    dims: dict[str, Any] = TINY_TRANSFORMER
    encoder = StandInTextEncoder(dims["joint_attention_dim"], dims["pooled_projection_dim"], text_length, seed)
    return FluxFillModel(pipe, name=f"flux_fill_tiny (random, seed {seed})", prompt_encoder=encoder)


def load_flux_fill(
    name_or_path: str = FLUX_FILL_ID,
    *,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device: str | torch.device | None = None,
    cpu_offload: bool = False,
    revision: str | None = None,
    progress: bool = True,
    **from_pretrained: Any,
) -> FluxFillModel:
    """``FluxFillPipeline.from_pretrained`` (a Hub id or a local folder) into its cache; offline mode
    (``ATTNZOO_OFFLINE`` / ``HF_HUB_OFFLINE``) or an unreachable Hub reads the cache only.
    ``dtype``: a floating dtype or its name, as every ``dtype=`` of attnzoo (``"bf16"``, ``"float16"``,
    ``torch.float32``, ...; others, e.g. ``"int8"``, are refused); None (or ``"auto"``) is bfloat16, the
    dtype FLUX.1-Fill-dev is stored in and the official code loads it in (diffusers' own default would
    widen it to float32). ``cpu_offload`` keeps each model on the CPU until it runs (needs accelerate and
    a GPU)."""
    from diffusers import FluxFillPipeline

    from attnzoo.weights import hub

    torch_dtype = resolve_dtype(dtype) or torch.bfloat16  # checked before anything loads
    with hub.pretrained_loading(
        f"the diffusers pipeline {name_or_path} (FluxFillPipeline)", name_or_path
    ) as cache_only:
        pipe: Any = FluxFillPipeline.from_pretrained(
            name_or_path,
            **{_dtype_keyword(): torch_dtype},
            revision=revision,
            local_files_only=cache_only or from_pretrained.pop("local_files_only", False),
            **from_pretrained,
        )
    pipe.set_progress_bar_config(disable=not progress)
    model = FluxFillModel(pipe, name=str(name_or_path))
    if cpu_offload:
        _offload(model, device)
    elif device is not None:
        model.to(device)
    return model


def _dtype_keyword() -> str:
    """What this diffusers' ``from_pretrained`` calls the dtype: ``dtype`` from 0.40 (``torch_dtype`` then warns),
    ``torch_dtype`` before, where ``dtype=`` was silently ignored and the model loaded in float32."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


def _offload(model: FluxFillModel, device: Any) -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise MissingDependencyError("cpu_offload needs accelerate: pip install accelerate") from None
    target = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if target.type == "cpu":
        warnings.warn("cpu_offload needs an accelerator; running on the CPU without offloading", stacklevel=3)
        return
    model.pipe.enable_model_cpu_offload(device=target)
    model.offloaded = True


# -- one run -------------------------------------------------------------------------------------


@dataclass
class FillOutput:
    image: torch.Tensor
    """The generated canvas ``[3, H, W]`` in [0, 1] (float32, CPU)."""
    trace: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """With ``trace=True``: per step ``noise_pred``, ``latents_step`` (the scheduler's) and ``latents``
    (after the blending); plus ``hidden_states`` (the first transformer input) and ``records`` of the heads."""


class LatentBlend:
    """After step ``i`` the latents sit at noise level ``sigma[i+1]``: keep them where the mask is set and
    put the canvas's clean latents noised to that level (one fixed noise draw) everywhere else."""

    def __init__(self, source: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor):
        self.source, self.keep, self.noise = source, keep, noise

    def __call__(self, pipe: Any, step: int, latents: torch.Tensor) -> torch.Tensor:
        sigma = pipe.scheduler.sigmas[step + 1].to(latents.device, torch.float32)
        noised = sigma * self.noise + (1.0 - sigma) * self.source
        return (self.keep * latents.float() + (1.0 - self.keep) * noised).to(latents.dtype)


def _blend_for(
    model: FluxFillModel, image: Image.Image, mask: Image.Image, height: int, width: int, seed: int
) -> LatentBlend:
    pipe = model.pipe
    device, dtype = model.device, model.dtype
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(device, dtype)
    fill = pipe.mask_processor.preprocess(mask, height=height, width=width).to(device, torch.float32)
    with torch.inference_mode():
        latent = pipe.vae.encode(pixels).latent_dist.mode()
    latent = ((latent - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor).float()
    factor = model.vae_scale_factor
    keep = (
        torch.nn.functional.max_pool2d(fill, factor) if factor > 1 else fill
    )  # a latent with any fill pixel is filled
    keep = keep.expand(-1, latent.shape[1], -1, -1).contiguous()
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    return LatentBlend(pack_latents(latent), pack_latents(keep), pack_latents(noise))


def run_fill(
    model: FluxFillModel,
    image: np.ndarray | Image.Image,
    mask: np.ndarray | Image.Image,
    settings: InsertionAttention,
    *,
    orientation: str,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 30.0,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    blend: bool = False,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    max_sequence_length: int = 512,
    trace: bool = False,
) -> FillOutput:
    """Inpaint the diptych ``image`` where ``mask`` is white with the edit ``settings`` installed.

    ``height``/``width`` default to the canvas's (the pipeline resizes it otherwise). The noise comes from a
    CPU generator seeded with ``seed`` (the same on any device), unless ``generator``/``latents`` are given;
    the blending's noise (``blend=True``) from one seeded with ``seed + 1``, so ``seed`` is an integer in
    [0, 2**64 - 1) (in [0, 2**64) without blending), as the pipeline's.
    """
    from attnzoo._values import generator_seed

    seed = generator_seed(seed, spare=1 if blend else 0)  # a typed error where torch overflows or wraps
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if not isinstance(mask, Image.Image):
        mask = Image.fromarray(
            np.repeat(np.asarray(mask)[..., None], 3, axis=-1) if np.asarray(mask).ndim == 2 else mask
        )
    height = image.height if height is None else height
    width = image.width if width is None else width
    model.check_prompt_embeds(prompt_embeds, pooled_prompt_embeds)
    layout = model.layout(height, width, orientation)
    pipe = model.pipe
    blender = _blend_for(model, image, mask, height, width, seed) if blend else None
    state = InsertionState(record=trace).reset(num_inference_steps, layout)
    traced: dict[str, list[torch.Tensor]] = {"noise_pred": [], "latents_step": [], "latents": [], "hidden_states": []}

    def on_step_end(pipe_: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        current = kwargs["latents"]
        if trace:
            traced["latents_step"].append(current.detach().float().cpu().clone())
        if blender is not None:
            current = blender(pipe_, step, current)
        if trace:
            traced["latents"].append(current.detach().float().cpu().clone())
        state.callback_on_step_end(pipe_, step, timestep, kwargs)
        return {"latents": current}

    with insertion_processors(pipe.transformer, settings, state), _traced_transformer(pipe.transformer, traced, trace):
        out = pipe(
            image=image,
            mask_image=mask,
            height=height,
            width=width,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            max_sequence_length=max_sequence_length,
            generator=generator if generator is not None else torch.Generator().manual_seed(seed),
            latents=latents,
            output_type="pt",
            callback_on_step_end=on_step_end,
        )
    if trace:
        traced["records"] = state.records  # type: ignore[assignment]
    return FillOutput(out.images[0].float().cpu(), traced if trace else {})


@contextlib.contextmanager
def _traced_transformer(transformer: Any, traced: dict[str, list[torch.Tensor]], enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return

    def after(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not traced["hidden_states"]:
            traced["hidden_states"].append(kwargs["hidden_states"].detach().float().cpu().clone())
        traced["noise_pred"].append(output[0].detach().float().cpu().clone())

    handle = transformer.register_forward_hook(after, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
