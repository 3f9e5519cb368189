"""AGLA, Assembly of Global and Local Attention (arXiv 2406.12718, CVPR 2025; official code Lackel/AGLA).

An augmented view of each image keeps only what the question is about: a GradCAM of BLIP's
image-text matching (transformers' ``BlipForImageTextRetrieval``; the official run uses
BLIP-ITM-large, ``Salesforce/blip-itm-large-coco``) decides which pixels survive, and a better
image-text match masks more (:func:`~.functional.agla.agla_augment`). The augmented image goes
through the LVLM's own processor, a contrast branch of the same model sees it, and every step
assembles the two next-token logits: z = l_o + alpha l_a (additive, unlike VCD), then tokens with
l_o < log beta + max l_o are dropped. Official POPE settings: alpha 2, beta 0.5.

Code vs paper (``behaviour``):

- ``"official"``: what the released sampling loop does (it produced the published numbers; the
  ``agla_logits`` fixture follows it). It re-copies the original branch's model kwargs inside the
  loop, so from the second generated token on the augmented forward continues the ORIGINAL image's
  KV cache with the same token: l_a(t >= 1) = l_o(t), and the rule becomes (1 + alpha) l_o with the
  cutoff. Only the first token sees the augmented image (enough for POPE's one-word answers). Here
  the branch runs once, at the first token; later steps reuse the main logits as l_a, which is the
  same value without the second forward.
- ``"paper"``: the augmented branch keeps its own KV cache, so every token assembles both views.

``batched`` (the paper behaviour): by default the augmented prompts run as B more rows of the main
``generate`` (:class:`~.base.PairedContrast`: one batched forward per token, one KV cache); with
``batched=False`` the branch is a second forward per token with its own cache. The scores agree up
to float32 batching noise. The official behaviour always runs its one branch forward on its own
(pairing would carry the branch rows through every later step for nothing): ``batched`` is None
there and records False.

The GradCAM needs gradients: they are switched on inside the augmenter even under
``torch.inference_mode``; the BLIP model itself gets no ``.grad``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from PIL import Image
from torch import nn
from transformers import LogitsProcessor

from attnzoo.errors import InvalidInputError, InvalidOptionError, WeightsError

from .base import ContrastBranchProcessor, PairedContrast, check_batched, check_behaviour, check_cutoff
from .functional.agla import AGLA_GRADCAM_LAYER, agla_augment
from .functional.contrastive import assembly_logits
from .layouts import family_of
from .method import MitigationMethod, PromptBatch
from .models import pretrained_source

#: The official POPE settings and the BLIP-ITM checkpoint matching the official LAVIS model.
DEFAULTS: dict[str, Any] = {"alpha": 2.0, "beta": 0.5, "blip_model": "Salesforce/blip-itm-large-coco"}
#: Why the official behaviour's branch neither pairs with the main rows nor batches with them.
OFFICIAL_BRANCH_ALONE = "AGLA's official behaviour runs the augmented branch for the first token only, on its own"


class AGLALogitsProcessor(ContrastBranchProcessor):
    """AGLA's assembly against a branch of the same model on ``augmented_inputs`` (the prompt batch
    re-encoded with the augmented images); ``behaviour`` as in the module docstring."""

    method = "agla"

    def __init__(
        self,
        model: nn.Module,
        augmented_inputs: Mapping[str, Any],
        alpha: float = DEFAULTS["alpha"],
        beta: float = DEFAULTS["beta"],
        *,
        behaviour: str = "official",
    ):
        self.alpha, self.beta = check_cutoff("AGLA", alpha, beta)
        self.behaviour = check_behaviour(behaviour)
        super().__init__(model, augmented_inputs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "behaviour": self.behaviour, "alpha": self.alpha, "beta": self.beta}

    def pairing_refusal(self) -> str | None:
        if self.behaviour == "official":
            return f"{OFFICIAL_BRANCH_ALONE}; pairing applies to behaviour='paper'"
        return super().pairing_refusal()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.behaviour == "official" and self._continues(input_ids):
            self._last_ids = input_ids
            return self.combine(input_ids, scores, scores)  # the augmented forward on the original cache
        output = super().__call__(input_ids, scores)
        if self.behaviour == "official":
            self._cache = None  # the branch does not run again for this prompt
        return output

    def _continues(self, input_ids: torch.Tensor) -> bool:
        last = self._last_ids
        return (
            last is not None
            and input_ids.shape[0] == last.shape[0]
            and input_ids.shape[1] == last.shape[1] + 1
            and torch.equal(input_ids[:, :-1], last)
        )

    def combine(self, input_ids, scores, branch_logits):
        return assembly_logits(scores, branch_logits.to(scores.dtype), self.alpha, self.beta)


class AGLA(MitigationMethod):
    """AGLA as a pipeline method: each batch's images are augmented for their questions with the
    BLIP-ITM GradCAM, re-encoded with the pipeline's encoder, and an :class:`AGLALogitsProcessor`
    runs the augmented branch.

    ``blip_model`` is a loaded ``BlipForImageTextRetrieval`` or a hub id (or a local folder) loaded on
    first use with ``from_pretrained`` (float32, on the LVLM's device; transformers' cache; offline, or
    with the Hub unreachable, the cache only, failing at once with an :class:`~attnzoo.errors.OfflineError`);
    :meth:`check_model` resolves that source before any prompt is answered, without loading the weights.
    ``blip_processor`` its ``BlipProcessor`` (default: loaded from the same id or the model's
    ``name_or_path``). ``gradcam_layer`` is the BLIP text layer whose cross-attention the GradCAM reads.
    ``batched`` (default: True for the paper behaviour, False for the official one): the augmented
    branch as rows of the main ``generate`` (:meth:`paired_contrast`) or as its own forward.
    """

    name = "agla"

    def __init__(
        self,
        *,
        alpha: float = DEFAULTS["alpha"],
        beta: float = DEFAULTS["beta"],
        blip_model: str | nn.Module = DEFAULTS["blip_model"],
        blip_processor: Any = None,
        gradcam_layer: int = AGLA_GRADCAM_LAYER,
        behaviour: str = "official",
        batched: bool | None = None,
    ):
        self.alpha, self.beta = check_cutoff("AGLA", alpha, beta)
        self.behaviour = check_behaviour(behaviour)
        if batched is None:
            batched = self.behaviour == "paper"
        elif check_batched("AGLA", batched) and self.behaviour == "official":
            raise InvalidOptionError(f"{OFFICIAL_BRANCH_ALONE}: batched=True applies to behaviour='paper'")
        self.batched = batched
        if isinstance(blip_model, str):  # a Hub id or a folder (an empty name or a file refused here)
            blip_model = pretrained_source(blip_model, "AGLA's blip_model (--blip-model)", "BlipForImageTextRetrieval")
        else:
            _check_blip(blip_model)
        self.blip_model = blip_model
        self.blip_processor = blip_processor
        if int(gradcam_layer) != gradcam_layer or gradcam_layer < 0:
            raise InvalidOptionError(f"AGLA's gradcam_layer must be a non-negative integer, got {gradcam_layer}")
        self.gradcam_layer = int(gradcam_layer)
        #: The augmented images of the last batch (what the contrast branch saw).
        self.last_augmented: list[Image.Image] = []
        self._shared: dict[Any, Any] | None = None

    def share_loaded(self, store: dict[Any, Any]) -> None:
        """Take the BLIP model and processor loaded by name from ``store`` (a pipeline's), and put them there
        when this AGLA loads them: the AGLAs of one pipeline that differ in other settings (an ``alpha``
        sweep) then hold one BLIP per (name, device, dtype), not a copy each (1.8 GB for BLIP-ITM-large)."""
        self._shared = store

    def check_model(self, model: nn.Module) -> None:
        """The BLIP source resolved before any prompt is answered (a comparison "none,agla" would otherwise
        answer every question without AGLA first): its config read and a weights file found where nothing
        can be downloaded (:func:`check_blip_source`; the weights themselves load on first use), and the
        processor, a few small files, loaded."""
        super().check_model(model)
        if isinstance(self.blip_model, str):
            check_blip_source(self.blip_model)
        if self.blip_processor is None:
            self.blip_processor = self._load_processor(self._processor_source())

    def blip(self, device: torch.device | str | None = None) -> tuple[nn.Module, Any]:
        """(BLIP-ITM model, its processor), loading them on first use (or taking those its pipeline loaded,
        :meth:`share_loaded`)."""
        if isinstance(self.blip_model, str):
            name = self.blip_model
            key = ("model", name, None if device is None else str(torch.device(device)), torch.float32)
            loaded = self._shared.get(key) if self._shared is not None else None
            if loaded is None:
                loaded = _load_blip_model(name, device)
                if self._shared is not None:
                    self._shared[key] = loaded
            self.blip_model = loaded
            if self.blip_processor is None:
                self.blip_processor = self._load_processor(name)
        if self.blip_processor is None:
            self.blip_processor = self._load_processor(self._processor_source())
        return cast(nn.Module, self.blip_model), self.blip_processor

    def _load_processor(self, name: str) -> Any:
        """The BLIP processor of ``name``, loaded once per pipeline (:meth:`share_loaded`)."""
        key = ("processor", name)
        loaded = self._shared.get(key) if self._shared is not None else None
        if loaded is None:
            loaded = _load_blip_processor(name)
            if self._shared is not None:
                self._shared[key] = loaded
        return loaded

    def _processor_source(self) -> str:
        """Where a processor not given loads from: the BLIP id or folder, or a loaded model's ``name_or_path``."""
        if isinstance(self.blip_model, str):
            return self.blip_model
        name = getattr(self.blip_model, "name_or_path", "") or ""
        if not name:
            raise InvalidOptionError(
                "AGLA was given a BLIP model without a processor and the model has no name_or_path to load one "
                "from: pass blip_processor=BlipProcessor(...)"
            )
        return name

    def augment(
        self, images: Sequence[Image.Image], questions: Sequence[str], device: torch.device | str | None = None
    ) -> list[Image.Image]:
        """The augmented view of every image for its question."""
        blip_model, blip_processor = self.blip(device)
        augmented = agla_augment(list(images), list(questions), blip_model, blip_processor, layer=self.gradcam_layer)
        return augmented if isinstance(augmented, list) else [augmented]

    def processor(self, model: nn.Module, batch: PromptBatch) -> AGLALogitsProcessor:
        """The assembly processor of ``batch``, its branch on the augmented images."""
        family_of(model)  # an unknown model type raises here, naming it
        images = [image for image in batch.images if isinstance(image, Image.Image)]
        if len(images) != len(batch.images):
            raise InvalidInputError(
                "AGLA augments one image per prompt; this batch has prompts with several images (e.g. CARVE's "
                "official final pass on [original, refined]): AGLA does not compose with it"
            )
        device = next(model.parameters()).device
        self.last_augmented = self.augment(images, batch.questions, device)
        augmented = batch.with_images(self.last_augmented)
        return AGLALogitsProcessor(model, augmented.inputs, self.alpha, self.beta, behaviour=self.behaviour)

    def logits_processors(self, model: nn.Module, processor: Any, batch: PromptBatch) -> list[LogitsProcessor]:
        return [self.processor(model, batch)]

    def paired_contrast(self, model: nn.Module, processor: Any, batch: PromptBatch) -> PairedContrast | None:
        return PairedContrast(self.processor(model, batch)) if self.batched else None

    def describe(self) -> dict[str, Any]:
        blip = self.blip_model if isinstance(self.blip_model, str) else getattr(self.blip_model, "name_or_path", "")
        return {
            "method": self.name,
            "behaviour": self.behaviour,
            "alpha": self.alpha,
            "beta": self.beta,
            "blip_model": blip or type(self.blip_model).__name__,
            "gradcam_layer": self.gradcam_layer,
            "batched": self.batched,
        }


def _check_blip(model: Any) -> None:
    from transformers import BlipForImageTextRetrieval

    if not isinstance(model, BlipForImageTextRetrieval):
        raise InvalidOptionError(
            "AGLA's blip_model must be a hub id or a transformers BlipForImageTextRetrieval "
            f"(the image-text matching model), got {type(model).__name__}"
        )


#: What to do when AGLA's BLIP cannot be fetched (``--weights`` loads the LVLM, not BLIP).
_BLIP_WAYS_OUT = (
    "pass a local BLIP-ITM folder as blip_model= (--blip-model on the command line), or a loaded model and its "
    "processor as blip_model= / blip_processor=, or use a method that needs no BLIP"
)


#: The files, one of which holds a transformers checkpoint's weights (what ``from_pretrained`` looks for).
_WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _blip_what(name: str) -> str:
    return f"AGLA's BLIP-ITM model {name} (blip_model=, --blip-model)"


def check_blip_source(name: str) -> None:
    """Raise what loading AGLA's BLIP from ``name`` (a Hub id or a folder) would raise, without loading its
    weights (about 1.8 GB for the official BLIP-ITM-large): its ``config.json`` read as ``from_pretrained``
    reads it (the folder; the cache only when offline or the Hub cannot be reached; else the Hub) and of a
    BLIP model, and a weights file present where none can be downloaded (a folder, or the cache only)."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig

    from attnzoo.weights import hub

    what = _blip_what(name)
    with hub.pretrained_loading(what, name, ways_out=_BLIP_WAYS_OUT) as cache_only:
        model_type = getattr(AutoConfig.from_pretrained(name, local_files_only=cache_only), "model_type", None)
        if model_type != "blip":
            raise WeightsError(
                f"cannot load {what}: its config.json is of a {model_type} model, not BLIP; use a BLIP "
                f"image-text-matching checkpoint such as {DEFAULTS['blip_model']}"
            )
        if os.path.isdir(name):
            if not any(os.path.isfile(os.path.join(name, file)) for file in _WEIGHTS_FILES):
                raise WeightsError(f"cannot load {what}: the folder holds no weights ({', '.join(_WEIGHTS_FILES)})")
        elif cache_only and not any(isinstance(try_to_load_from_cache(name, file), str) for file in _WEIGHTS_FILES):
            raise hub.unavailable_error(what, f"{hub.hf_endpoint()}/{name}", ways_out=_BLIP_WAYS_OUT)


def _load_blip_model(name: str, device: torch.device | str | None) -> nn.Module:
    """BLIP-ITM from ``name`` (a Hub id or a folder) in float32, in eval mode, on ``device``; one without an ITM
    head (a captioning checkpoint: AGLA's mask would come from a random head) is a :class:`WeightsError`."""
    from transformers import BlipForImageTextRetrieval

    from attnzoo.weights import hub

    with torch.inference_mode(False):  # weights loaded as inference tensors could not take part in the GradCAM
        with hub.pretrained_loading(_blip_what(name), name, ways_out=_BLIP_WAYS_OUT) as cache_only:
            model, loading = BlipForImageTextRetrieval.from_pretrained(
                name, dtype=torch.float32, local_files_only=cache_only, output_loading_info=True
            )
        head = sorted(key for key in loading.get("missing_keys", ()) if key.startswith("itm_head."))
        if head:  # e.g. a captioning checkpoint: its ITM head would be random, and so AGLA's mask
            raise WeightsError(
                f"AGLA's BLIP model {name} (blip_model=, --blip-model) is no image-text-matching checkpoint: "
                f"it has no {', '.join(head)}; use one such as {DEFAULTS['blip_model']}"
            )
        return model.eval().to(device) if device is not None else model.eval()


def _load_blip_processor(name: str):
    from transformers import BlipProcessor

    from attnzoo.weights import hub

    with hub.pretrained_loading(
        f"AGLA's BLIP processor {name} (blip_processor=)", name, ways_out=_BLIP_WAYS_OUT
    ) as cache_only:
        return BlipProcessor.from_pretrained(name, local_files_only=cache_only)


__all__ = ["AGLA", "AGLALogitsProcessor", "DEFAULTS", "check_blip_source"]
