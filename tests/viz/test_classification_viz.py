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


# -- labels, sizes, scores and the note (the picture hunt's findings) ------------------------------------

PANEL = 420  # the panel right of the image: bars 12 px in from both its sides
RED = np.array([170, 20, 20])


def ink(picture: Image.Image) -> np.ndarray:
    """Where anything other than white is drawn."""
    return (np.asarray(picture).astype(int) < 250).any(-1)


def panel_of(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture).astype(int)[:, picture.width - PANEL :]


def test_a_label_is_cut_by_drawn_width_before_its_score_and_kept_on_one_line():
    image = Image.new("RGB", (400, 300), "white")
    bare = plot_classification(image, [{"label": "", "score": 0.5}])
    score_ink = ink(bare)[:, bare.width - PANEL :]
    bar_rows = np.flatnonzero((np.abs(panel_of(bare) - BAR).sum(-1) < 10).any(1))
    text_rows = slice(0, bar_rows.min())  # the label's and the score's line, above the bar
    score_left = np.flatnonzero(score_ink[text_rows].any(0)).min()
    for label in ("W" * 48, "M" * 200, "supercalifragilisticexpialidocious " * 4, "line one\nline two"):
        picture = plot_classification(image, [{"label": label, "score": 0.5}])
        assert picture.size == bare.size
        label_ink = (panel_of(picture) != panel_of(bare)).any(-1)  # what the label added
        columns = np.flatnonzero(label_ink.any(0))
        assert columns.max() < score_left - 3  # stops short of its "50.0%" (and so of the picture's edge)
        assert not label_ink[bar_rows.min() :].any()  # nothing drawn over the bar or below it
    one_line = plot_classification(image, [{"label": "line one line two", "score": 0.5}])
    two_lines = plot_classification(image, [{"label": "line one\nline two", "score": 0.5}])
    assert np.array_equal(np.asarray(one_line), np.asarray(two_lines))  # a newline is shown as a space


def test_the_image_fits_a_bounded_box_with_its_aspect_kept():
    preds = [{"label": f"class {i}", "score": 0.1} for i in range(5)]
    for w, h in ((2000, 200), (20000, 100), (200, 2000), (100, 20000), (8, 8), (400, 300), (300, 400)):
        picture = plot_classification(Image.new("RGB", (w, h), (200, 30, 30)), preds)
        red = np.argwhere(np.abs(np.asarray(picture).astype(int) - [200, 30, 30]).sum(-1) < 10)
        (top, left), (bottom, right) = red.min(0), red.max(0)
        shown_w, shown_h = right - left + 1, bottom - top + 1
        assert shown_w <= 640 and shown_h <= 480 and picture.width <= 640 + PANEL and picture.height <= 480
        if w >= h:  # the aspect kept: the short side is the long side's share, to a pixel
            assert abs(shown_h - shown_w * h / w) <= 1
        else:
            assert abs(shown_w - shown_h * w / h) <= 1
        assert max(shown_w, shown_h) >= min(640, 320 * max(w, h) / min(w, h), 480)  # as large as the box allows


def test_a_thousand_classes_show_twenty_bars_and_say_how_many_more():
    from attnzoo.viz.drawing import load_font, text_width

    image = Image.new("RGB", (400, 300), "white")
    widths = {}
    for k in (21, 1000):
        preds = [{"label": f"class {i}", "score": 1 / (i + 2)} for i in range(k)]
        picture = plot_classification(image, preds, title="m")
        assert bars(picture) == 20 and picture.height < 1000
        panel = ink(picture)[:, picture.width - PANEL :]
        last_bar = np.flatnonzero((np.abs(panel_of(picture) - BAR).sum(-1) < 10).any(1)).max()
        below = panel[last_bar + 1 :]
        assert below.any()  # a line under the bars
        columns = np.flatnonzero(below.any(0))
        widths[k] = columns.max() - columns.min() + 1
    small = load_font(13)
    for k, drawn in widths.items():
        assert abs(drawn - text_width(f"+{k - 20} more", small)) <= 3


def test_odd_scores_are_drawn_within_the_panel():
    image = Image.new("RGB", (400, 300), "white")
    preds = [{"label": "big", "score": 3.0}, {"label": "nan", "score": float("nan")}, {"label": "neg", "score": -0.5}]
    picture = plot_classification(image, preds)  # no ValueError for the NaN
    assert not ink(picture)[:, -11:].any()  # the right margin stays white
    blue = np.abs(panel_of(picture) - BAR).sum(-1) < 10
    rows = np.flatnonzero(blue.any(1))
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    assert len(runs) == 2  # "big" and "neg": NaN has no bar
    full = plot_classification(image, [{"label": "one", "score": 1.0}])
    full_right = np.flatnonzero((np.abs(panel_of(full) - BAR).sum(-1) < 10).any(0)).max()
    assert np.flatnonzero(blue[runs[0]].any(0)).max() == full_right  # 3.0 is clamped to a full bar
    assert len(np.flatnonzero(blue[runs[1]].any(0))) <= 3  # below zero: the least bar


def test_the_note_is_a_red_line_and_random_weights_are_noted_there():
    from attnzoo.pipelines.image_classification import Classification, ClassPrediction

    image = Image.new("RGB", (400, 300), "white")

    def red(picture):
        return int((np.abs(panel_of(picture) - RED).sum(-1) < 90).sum())

    assert red(plot_classification(image, [{"label": "a", "score": 0.5}], title="m")) == 0
    assert red(plot_classification(image, [{"label": "a", "score": 0.5}], title="m", note="random weights")) > 20
    result = Classification([ClassPrediction("tabby", 0.5, 281)], image, "resnet18", "random (seed 0)")
    assert red(result.plot()) > 20 and red(result.plot(title="my own title")) > 20  # a title keeps the note
    plain = plot_classification(image, result, title="resnet18")
    plain_title = ink(plain)[:30, plain.width - PANEL :]
    assert np.array_equal(ink(result.plot())[:30, plain.width - PANEL :], plain_title)  # the title says no more
    known = Classification([ClassPrediction("tabby", 0.5, 281)], image, "resnet18", "resnet18.a1_in1k")
    assert red(known.plot()) == 0 and red(result.plot(note="")) == 0
