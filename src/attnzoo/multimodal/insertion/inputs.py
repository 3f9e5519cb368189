"""Reading what a user gives subject insertion (images in any mode, masks in any form) into the diptych
canvas, with typed errors for what cannot work: an empty mask, a mask outside the target or of another
size, a subject mask that selects nothing, an image that cannot be read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from attnzoo.errors import InvalidInputError
from attnzoo.multimodal.insertion.layout import (
    PanelLayout,
    _read_mask_rule,
    build_canvas,
    is_via,
    subject_on_white,
)

__all__ = ["InsertionInputs", "prepare_inputs"]


@dataclass
class InsertionInputs:
    """One insertion's inputs, read and checked, and the canvas built from them."""

    subject: np.ndarray
    """The subject photo, RGB uint8 ``[h, w, 3]``."""
    subject_mask: np.ndarray | None
    """Bool ``[h, w]``: the subject's pixels (None: the whole photo is the subject)."""
    subject_on_white: np.ndarray
    target: np.ndarray
    """The target photo, RGB uint8 ``[H, W, 3]``."""
    user_mask: np.ndarray
    """The fill mask as drawn (uint8 0/255): ``[H, W]``, or ``[W, H]`` for a VIA annotation under the
    official behaviour (its transposed canvas)."""
    canvas: np.ndarray
    """The diptych, RGB uint8 in the layout's pixels."""
    canvas_mask: np.ndarray
    """uint8 ``[H_c, W_c]``: 0 over the subject's panel, the (resized) fill mask over the target's."""
    layout: PanelLayout

    @property
    def target_mask(self) -> np.ndarray:
        """The fill mask the model gets, on the target's own pixels (bool ``[H, W]``)."""
        from attnzoo.multimodal.insertion.layout import panel_of

        panel = Image.fromarray(panel_of(self.canvas_mask, self.layout, 1))
        return np.asarray(panel.resize((self.target.shape[1], self.target.shape[0]))) >= 128


def _rgb(source: Any, name: str, *, keep_alpha: bool = False) -> Image.Image:
    from attnzoo.datasets.images import load_image

    try:
        return load_image(source, keep_alpha=keep_alpha)
    except InvalidInputError as err:
        raise InvalidInputError(f"{name}: {err}") from None


def prepare_inputs(
    subject: Any,
    target: Any,
    mask: Any,
    layout: PanelLayout,
    *,
    subject_mask: Any = None,
    subject_word: str | None = None,
    segmenter: Any = None,
    behaviour: str = "corrected",
) -> InsertionInputs:
    """The subject pasted on white (its mask: ``subject_mask``, else the word through ``segmenter``, else the
    photo's alpha channel, else the whole photo) and the target with its fill ``mask`` on one canvas.

    Images may be paths, PIL images (RGB, RGBA, grayscale...), arrays or tensors; ``mask`` an array, an image
    (white = fill) or a VIA annotation (ellipses/polygons)."""
    subject_image = _rgb(subject, "subject", keep_alpha=True)
    alpha = np.asarray(subject_image.getchannel("A")) >= 128 if subject_image.mode == "RGBA" else None
    if alpha is not None:  # transparent pixels are white, as a pasted subject's background
        background = Image.new("RGBA", subject_image.size, (255, 255, 255, 255))
        subject_image = Image.alpha_composite(background, subject_image)
    subject_rgb = np.asarray(subject_image.convert("RGB"))
    target_rgb = np.asarray(_rgb(target, "target"))
    h, w = subject_rgb.shape[:2]
    if subject_mask is not None and subject_word is not None:
        raise InvalidInputError("give subject_mask= or subject_word= (to segment the subject), not both")
    chosen: np.ndarray | None
    subject_rule = ""
    if subject_mask is not None:
        read, subject_rule = _read_mask_rule(subject_mask, (h, w), name="subject_mask")
        chosen = read > 0
    elif subject_word is not None:
        if segmenter is None:
            from attnzoo.multimodal.insertion.segment import SubjectSegmenter

            segmenter = SubjectSegmenter()
        chosen = np.asarray(segmenter(Image.fromarray(subject_rgb), subject_word), dtype=bool)
    else:
        chosen = alpha
    if chosen is not None and not chosen.any():
        raise InvalidInputError(
            "subject_mask selects no pixel of the subject image"
            + (f" (read as {subject_rule})" if subject_rule else "")
        )
    pasted = subject_rgb.copy() if chosen is None else subject_on_white(subject_rgb, chosen.astype(np.uint8))
    if mask is None:
        raise InvalidInputError("mask= is required: where in the target to insert the subject (white = fill)")
    size = target_rgb.shape[:2]
    if is_via(mask):
        _check_via_inside(mask, size, behaviour)
    user_mask, rule = _read_mask_rule(mask, size, name="mask", behaviour=behaviour)
    if not user_mask.any():
        raise InvalidInputError(
            f"the mask is empty: nothing to fill (read as {rule})"
            + (
                " (behaviour='official' draws VIA regions transposed, as the official code does; on this "
                "non-square target they fall outside it)"
                if behaviour == "official" and is_via(mask) and size[0] != size[1]
                else ""
            )
        )
    canvas, canvas_mask = build_canvas(pasted, target_rgb, user_mask, layout)
    inputs = InsertionInputs(subject_rgb, chosen, pasted, target_rgb, user_mask, canvas, canvas_mask, layout)
    if not inputs.target_mask.any():
        raise InvalidInputError(
            f"the mask is too small to survive the resize to the {layout.panel_width}x{layout.panel_height} panel"
        )
    return inputs


def _check_via_inside(mask: Any, size: tuple[int, int], behaviour: str) -> None:
    """A VIA region that lies wholly outside the canvas it is drawn on is a mistake (wrong file, wrong image),
    not a no-op. That canvas is the target's, or under ``behaviour="official"`` the transposed one the
    official code draws on (:func:`~attnzoo.multimodal.insertion.layout.rasterize_via`)."""
    from attnzoo.multimodal.insertion.layout import _via_regions

    official = behaviour == "official" and size[0] != size[1]
    height, width = size[::-1] if official else size
    for i, shape in enumerate(_via_regions(mask)):
        try:
            if shape.get("name") == "ellipse":
                xs = [float(shape["cx"]) - float(shape["rx"]), float(shape["cx"]) + float(shape["rx"])]
                ys = [float(shape["cy"]) - float(shape["ry"]), float(shape["cy"]) + float(shape["ry"])]
            elif shape.get("name") == "rect":
                xs = [float(shape["x"]), float(shape["x"]) + float(shape["width"])]
                ys = [float(shape["y"]), float(shape["y"]) + float(shape["height"])]
            else:
                xs, ys = [float(x) for x in shape["all_points_x"]], [float(y) for y in shape["all_points_y"]]
        except (KeyError, TypeError, ValueError):
            continue  # malformed: rasterize_via says what is wrong
        if max(xs) < 0 or max(ys) < 0 or min(xs) >= width or min(ys) >= height:
            where = (
                f"the {width}x{height} canvas behaviour='official' draws VIA regions transposed on, as the official "
                f"code does (the target is {height}x{width}; behaviour='corrected' draws them upright)"
                if official
                else f"the {width}x{height} target image"
            )
            raise InvalidInputError(f"VIA region {i} ({shape.get('name')}) lies outside {where}")
