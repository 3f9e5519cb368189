"""What every picture shares: the font, text wrapped to a width (never clipped) and resizing that
shows a small image's pixels rather than a blur of them."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["NOTE_COLOUR", "load_font", "resize_picture", "text_width", "wrap_text"]

#: The colour of a picture's warning line ("random weights: ... meaningless").
NOTE_COLOUR = (170, 20, 20)

_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_width(text: str, font: Any) -> float:
    return float(_MEASURE.textlength(text, font=font))


def wrap_text(text: str | None, font: Any, width: float) -> list[str]:
    """``text`` in lines no wider than ``width``, split at spaces (and at newlines); a word wider than
    the line (a long model name) is split between characters, so nothing runs off the picture."""
    lines: list[str] = []
    for paragraph in (text or "").splitlines():
        start = len(lines)
        for word in paragraph.split():
            joined = f"{lines[-1]} {word}" if len(lines) > start else word
            if len(lines) > start and text_width(joined, font) <= width:
                lines[-1] = joined
                continue
            while len(word) > 1 and text_width(word, font) > width:
                cut = len(word) - 1
                while cut > 1 and text_width(word[:cut], font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    return lines


def resize_picture(
    picture: Image.Image, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """``picture`` at ``size``: with NEAREST when both sides grow at least twofold (a 32 px image shows its
    pixels, not a smooth blur that was never there), else with ``resample``."""
    grow = min(size[0] / picture.width, size[1] / picture.height)
    return picture.resize(size, Image.Resampling.NEAREST if grow >= 2 else resample)
