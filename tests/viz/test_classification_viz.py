"""plot_classification: the image beside its top-k bars; every bar and the whole title are on the picture."""

import numpy as np
from PIL import Image

from attnzoo.viz import plot_classification

BAR = np.array([52, 101, 164])


def bars(picture: Image.Image) -> int:
    """How many separate score bars (runs of rows holding the bar colour) the picture shows."""
    blue = (np.abs(np.asarray(picture).astype(int) - BAR).sum(-1) < 10).any(1)
    rows = np.flatnonzero(blue)
    return 0 if not len(rows) else 1 + int((np.diff(rows) > 1).sum())


def test_every_class_gets_its_bar_however_many():
    for k in (1, 5, 8, 10, 20):
        predictions = [{"label": f"class {i}", "score": 0.5 / (i + 1)} for i in range(k)]
        picture = plot_classification(Image.new("RGB", (400, 300), "white"), predictions, title="resnet50")
        assert bars(picture) == k
        assert picture.height >= 320 and (picture.height == 320 or k >= 8)  # grows only when the rows need it


def test_a_long_title_is_wrapped_and_its_note_kept():
    title = "vit_large_patch14_clip_336.openai_ft_in12k_in1k (random weights)"
    image = Image.new("RGB", (400, 300), "white")
    picture = plot_classification(image, [{"label": "tabby", "score": 0.3}], title=title)
    ink = np.asarray(picture).astype(int).sum(-1) < 300
    panel = ink[:, 427:]  # right of the 427 px wide image
    columns = np.flatnonzero(panel[:60].any(0))
    assert columns.max() < picture.width - 427 - 8  # nothing runs to the picture's edge
    title_rows = np.flatnonzero(panel[:60].any(1))
    assert title_rows.max() - title_rows.min() > 25  # two lines: the note went onto the second
    assert bars(picture) == 1


def test_a_small_image_is_magnified_pixel_by_pixel():
    cells = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)
    picture = plot_classification(Image.fromarray(cells).convert("RGB"), [{"label": "x", "score": 1.0}])
    assert set(np.unique(np.asarray(picture)[:, :320])) == {0, 255}  # 8 px -> 320 px: blocks, no grey blur
