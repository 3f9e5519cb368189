"""The subject's mask from a word: zero-shot detection (Grounding DINO, through transformers) gives a box,
SAM segments inside it, as In-Context Brush's ``infer.py`` does (caption ``"<word> ."``, box threshold 0.35,
text threshold 0.25, one mask from one box). The box kept is the best-scoring one; the official code takes the
first box Grounding DINO returns (``obj_boxes[0]``), which is not sorted by score, so the two can pick different
objects when several are found. The official code uses the original Grounding-DINO
SwinT-OGC and SAM ViT-H packages; here the transformers ports (defaults: ``grounding-dino-tiny`` and
``sam-vit-base``, the ones Diptych Prompting uses), so masks can differ slightly from the official ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnzoo._distributed import ProcessLocalLock
from attnzoo.errors import InvalidInputError

__all__ = ["DETECTOR_ID", "SAM_ID", "SubjectSegmenter"]

DETECTOR_ID = "IDEA-Research/grounding-dino-tiny"
SAM_ID = "facebook/sam-vit-base"

Box = tuple[float, float, float, float]


class SubjectSegmenter:
    """``segmenter(image, "barn")`` -> bool mask ``[H, W]`` of the best-scoring detection (the official
    ``infer.py`` takes the first one returned instead, which is not sorted by score).

    ``detector`` / ``sam`` are Hub ids or local folders (loaded on first use, from the cache when offline),
    or callables: ``detector(image, word) -> [(score, (x0, y0, x1, y1)), ...]`` and
    ``sam(image, box) -> bool [H, W]`` (to plug in other models, or stubs in tests)."""

    def __init__(
        self,
        detector: str | Callable[[Image.Image, str], list[tuple[float, Box]]] = DETECTOR_ID,
        sam: str | Callable[[Image.Image, Box], np.ndarray] = SAM_ID,
        *,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        device: str | torch.device | None = None,
    ):
        self.detector_spec, self.sam_spec = detector, sam
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._detector: Callable[..., Any] | None = detector if callable(detector) else None
        self._sam: Callable[..., Any] | None = sam if callable(sam) else None
        # threads sharing the segmenter load each model once (a copy, pickled, gets a lock of its own)
        self._loading = ProcessLocalLock()

    def __call__(self, image: Image.Image, word: str) -> np.ndarray:
        if not isinstance(word, str) or not word.strip():
            raise InvalidInputError("subject_word must be a non-empty word naming the subject, e.g. 'barn'")
        found = self.detect(image, word)
        if not found:
            raise InvalidInputError(
                f"no {word!r} found in the subject image (box threshold {self.box_threshold}); give subject_mask= "
                "or another word"
            )
        score, box = max(found, key=lambda f: f[0])
        mask = np.asarray(self.segment(image, box), dtype=bool)
        if mask.shape != (image.height, image.width) or not mask.any():
            raise InvalidInputError(f"SAM found no {word!r} inside its box {tuple(round(b) for b in box)}")
        return mask

    def detect(self, image: Image.Image, word: str) -> list[tuple[float, Box]]:
        if self._detector is None:
            with self._loading:
                if self._detector is None:
                    self._detector = self._load_detector()
        return list(self._detector(image, word))

    def segment(self, image: Image.Image, box: Box) -> np.ndarray:
        if self._sam is None:
            with self._loading:
                if self._sam is None:
                    self._sam = self._load_sam()
        return self._sam(image, box)

    def _load_detector(self) -> Callable[[Image.Image, str], list[tuple[float, Box]]]:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        processor, model = _from_pretrained(
            (AutoProcessor, AutoModelForZeroShotObjectDetection), str(self.detector_spec)
        )
        model = model.to(self.device).eval()

        def detect(image: Image.Image, word: str) -> list[tuple[float, Box]]:
            caption = f"{word.strip().lower()} ."  # Grounding DINO's caption format, as the official code builds it
            inputs = processor(images=image, text=caption, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                outputs = model(**inputs)
            found = processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=[(image.height, image.width)],
            )[0]
            return [(float(s), _box(b)) for s, b in zip(found["scores"], found["boxes"])]

        return detect

    def _load_sam(self) -> Callable[[Image.Image, Box], np.ndarray]:
        from transformers import SamModel, SamProcessor

        processor, model = _from_pretrained((SamProcessor, SamModel), str(self.sam_spec))
        model = model.to(self.device).eval()
        return sam_segmenter(model, processor, self.device)


def _box(values: Any) -> Box:
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1


def sam_segmenter(model: Any, processor: Any, device: torch.device) -> Callable[[Image.Image, Box], np.ndarray]:
    """SAM with one box prompt and one mask out (``multimask_output=False``, as the official call)."""

    def segment(image: Image.Image, box: Box) -> np.ndarray:
        inputs = processor(images=image, input_boxes=[[list(box)]], return_tensors="pt").to(device)
        with torch.inference_mode():
            outputs = model(**inputs, multimask_output=False)
        masks = processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]
        return masks[0, 0].numpy().astype(bool)

    return segment


def _from_pretrained(classes: tuple[Any, Any], name: str) -> tuple[Any, Any]:
    """Processor and model through transformers' own cache; offline or with the Hub unreachable, the cache only."""
    from attnzoo.weights import hub

    ways_out = (
        "give the subject's mask instead (subject_mask=, --subject-mask), or run once with the network to cache "
        "the segmentation models; set ATTNZOO_OFFLINE=1 to work from the cache only"
    )
    with hub.pretrained_loading(f"{name} (subject segmentation)", name, ways_out=ways_out) as cache_only:
        return classes[0].from_pretrained(name, local_files_only=cache_only), classes[1].from_pretrained(
            name, local_files_only=cache_only
        )
