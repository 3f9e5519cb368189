"""Subject-fidelity and text-alignment scores of subject insertion (DreamBench's metrics, on the inserted region).

* **CLIP-I**: cosine between the CLIP image embeddings of the inserted region (the result cropped to the
  fill mask's bounding box) and of the subject (its photo cropped to the subject mask's box, on white);
* **DINO**: the same with the [CLS] embedding of a self-supervised DINO ViT-S/16 (DreamBooth's fidelity
  metric, less forgiving than CLIP-I to changes of identity);
* **CLIP-T**: cosine between the CLIP embeddings of the whole result and of the prompt.

DreamBench (Ruiz et al., CVPR 2023) scores whole generated images against the reference photos with
ViT-S/16 DINO and CLIP ViT-B/32; insertion papers crop to the mask. Embedders are given as objects (any
open_clip CLIP and any timm ViT) or loaded by name from their libraries' caches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnzoo.errors import InvalidInputError

__all__ = [
    "CLIP_DEFAULT",
    "DINO_DEFAULT",
    "ClipEmbedder",
    "DinoEmbedder",
    "cosine",
    "crop_to_mask",
    "insertion_scores",
    "mask_box",
]

CLIP_DEFAULT = "ViT-B-32:openai"
DINO_DEFAULT = "vit_small_patch16_224.dino"


def cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[N, D]`` (or ``[D]``) embeddings."""
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a, dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b, dtype=torch.float64)
    return torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1).numpy()


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` (right/bottom exclusive) of the set pixels of a 2-D mask."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2 or not mask.any():
        raise InvalidInputError("the mask selects no pixel: nothing to crop")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_to_mask(image: Image.Image, mask: np.ndarray, *, white_outside: bool = False) -> Image.Image:
    """``image`` cropped to the bounding box of ``mask`` (same size as the image); with ``white_outside`` the
    pixels outside the mask are white (the subject as it was pasted)."""
    mask = np.asarray(mask).astype(bool)
    if mask.shape != (image.height, image.width):
        raise InvalidInputError(f"the mask is {mask.shape[::-1]} (w x h) but the image is {image.size}")
    pixels = np.asarray(image.convert("RGB"))
    if white_outside:
        pixels = np.where(mask[..., None], pixels, np.uint8(255))
    left, top, right, bottom = mask_box(mask)
    return Image.fromarray(np.ascontiguousarray(pixels[top:bottom, left:right]))


def _split_name(name: str, default_tag: str | None) -> tuple[str, str | None]:
    model, _, tag = name.partition(":")
    return model, tag or default_tag


def _load(what: str, fn: Callable[[], Any], option: str) -> Any:
    """A model through its library's cache; offline (or with the Hub unreachable) the cache only. ``option``
    names the setting that picks it (--weights does not: it loads the model under evaluation)."""
    from attnzoo.weights import hub

    ways_out = (
        f"name a model your cache holds with {option} (--{option.replace('_', '-')} on the command line), "
        "or run once with the network to cache it; set ATTNZOO_OFFLINE=1 to work from the cache only"
    )
    with hub.pretrained_loading(what, errors=(OSError, RuntimeError, ValueError), ways_out=ways_out):
        return fn()


class ClipEmbedder:
    """L2-normalised CLIP embeddings of images and texts (an open_clip model, its preprocessing and tokenizer)."""

    def __init__(
        self, model: Any, preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Any, device: Any = "cpu"
    ):
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.device = torch.device(device)
        self.model.to(self.device)
        self.name = getattr(model, "name", type(model).__name__)

    @classmethod
    def from_name(cls, name: str = CLIP_DEFAULT, device: Any = "cpu") -> ClipEmbedder:
        """``"ViT-B-32:openai"``: an open_clip model and pretrained tag."""
        import open_clip

        model_name, tag = _split_name(name, "openai")
        model, _, preprocess = _load(
            f"the CLIP model {name}",
            lambda: open_clip.create_model_and_transforms(model_name, pretrained=tag),
            "clip_model",
        )
        embedder = cls(model, preprocess, open_clip.get_tokenizer(model_name), device)
        embedder.name = name
        return embedder

    @torch.inference_mode()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(batch).float(), dim=-1).cpu()

    @torch.inference_mode()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


class DinoEmbedder:
    """L2-normalised [CLS] embeddings of a DINO ViT (a timm model without its head) and its eval transform."""

    def __init__(self, model: Any, transform: Callable[[Image.Image], torch.Tensor] | None = None, device: Any = "cpu"):
        import timm.data

        self.model = model.eval()
        if transform is None:
            cfg = timm.data.resolve_data_config({}, model=model)
            transform = timm.data.create_transform(**cfg)
        self.transform = transform
        self.device = torch.device(device)
        self.model.to(self.device)
        self.name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)

    @classmethod
    def from_name(cls, name: str = DINO_DEFAULT, device: Any = "cpu") -> DinoEmbedder:
        import timm

        model = _load(
            f"the DINO model {name}", lambda: timm.create_model(name, pretrained=True, num_classes=0), "dino_model"
        )
        embedder = cls(model, None, device)
        embedder.name = name
        return embedder

    @torch.inference_mode()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.transform(im.convert("RGB")) for im in images]).to(self.device)
        features = self.model.forward_features(batch)
        cls_token = features[:, 0] if features.dim() == 3 else features
        return torch.nn.functional.normalize(cls_token.float(), dim=-1).cpu()


def insertion_scores(
    clip: ClipEmbedder,
    dino: DinoEmbedder,
    result: Image.Image,
    fill_mask: np.ndarray,
    subject: Image.Image,
    subject_mask: np.ndarray | None,
    prompt: str,
) -> dict[str, float]:
    """CLIP-I, DINO (inserted region vs subject) and CLIP-T (whole result vs prompt) of one insertion."""
    region = crop_to_mask(result, fill_mask)
    reference = subject if subject_mask is None else crop_to_mask(subject, subject_mask, white_outside=True)
    clip_images = clip.images([region, reference, result])
    dino_images = dino.images([region, reference])
    text = clip.texts([prompt])
    return {
        "clip_i": float(cosine(clip_images[0], clip_images[1])[0]),
        "dino": float(cosine(dino_images[0], dino_images[1])[0]),
        "clip_t": float(cosine(clip_images[2], text[0])[0]),
    }
