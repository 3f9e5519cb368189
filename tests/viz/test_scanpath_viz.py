"""attnzoo.viz.plot_scanpath(s): numbered fixations over the image, one colour per scanpath."""

import numpy as np
import pytest
from PIL import Image

import attnzoo.viz as viz
from attnzoo.errors import InvalidInputError
from attnzoo.viz.scanpath import SCANPATH_COLOURS


def grey(w=200, h=100):
    return Image.new("RGB", (w, h), (128, 128, 128))


def test_fixations_are_drawn_where_they_are_in_their_colour():
    path = np.array([[30.0, 40.0], [150.0, 60.0]])
    out = np.asarray(viz.plot_scanpath(grey(), path))
    assert out.shape == (100, 200, 3)
    for x, y in path.astype(int):
        # inside the circle but off its number: the scanpath's colour (blended with the dimmed photo)
        pixel = out[y + 7, x].astype(int)
        assert np.abs(pixel - np.array(SCANPATH_COLOURS[0])).sum() < 120
    far = out[5, 100].astype(int)  # away from every mark: the photo, dimmed towards white
    assert (far > 128).all() and np.ptp(far) < 3


def test_several_scanpaths_get_a_legend_and_their_own_colours():
    a, b = np.array([[20.0, 20.0], [60.0, 20.0], [60.0, 80.0]]), np.array([[180.0, 80.0]])
    out = viz.plot_scanpaths(grey(), [a, b], labels=["model", "observer"], title="t")
    assert out.size == (200, 122)  # a 22 px band above the image holds the title and legend
    pixel = np.asarray(out)[22 + 80 + 7, 180].astype(int)
    assert np.abs(pixel - np.array(SCANPATH_COLOURS[1])).sum() < 120


def test_large_images_are_scaled_with_their_fixations_and_boxes_outline_the_target():
    big = grey(1600, 800)
    out = viz.plot_scanpaths(
        big,
        [np.array([[800.0, 400.0]])],
        boxes=np.array([[0, 0, 400, 400], [400, 0, 800, 400]]),
        target=1,
        max_side=800,
    )
    assert out.width == 800 and out.height > 400  # the legend above names the target's green box
    arr = np.asarray(out).astype(int)[-400:]
    assert arr[100, 201][1] > arr[100, 201][0] + 40  # the target's box edge is green at half scale (x = 400 / 2)
    assert np.abs(arr[200 + 7, 400] - np.array(SCANPATH_COLOURS[0])).sum() < 120  # the fixation at half scale


def test_bad_shapes_are_refused():
    with pytest.raises(InvalidInputError, match=r"\[T, 2\]"):
        viz.plot_scanpath(grey(), np.zeros((3, 3)))
    with pytest.raises(InvalidInputError, match="durations"):
        viz.plot_scanpath(grey(), np.zeros((3, 2)), durations=[1.0, 2.0])


def test_fixation_numbers_are_listed_in_runs():
    from attnzoo.viz.scanpath import _number_runs

    assert _number_runs([7, 1, 2, 3]) == "1-3, 7"
    assert _number_runs([1, 2]) == "1, 2" and _number_runs([4]) == "4"
    assert _number_runs([1, 3, 4, 5, 6, 9, 10]) == "1, 3-6, 9, 10"


def white_text(region):
    """How many near-white (number) pixels a region holds."""
    return int((np.asarray(region).astype(int).min(axis=-1) > 230).sum())


def test_coinciding_fixations_share_one_label_beside_them():
    # fixations 1 and 3 on the same spot, 2 elsewhere: one circle without a number, "1, 3" beside it
    path = np.array([[50.0, 50.0], [150.0, 50.0], [50.4, 49.8]])
    out = np.asarray(viz.plot_scanpath(grey(), path))
    r = 11
    assert white_text(out[50 - 5 : 50 + 6, 50 - 5 : 50 + 6]) == 0  # no overprinted digits inside the shared circle
    assert white_text(out[50 - 5 : 50 + 6, 150 - 5 : 150 + 6]) > 3  # a lone fixation keeps its number
    label = out[50 - 7 : 50 + 8, 50 + r + 1 : 50 + r + 30]  # right of the circle, where the label goes
    colour = np.array(SCANPATH_COLOURS[0])
    assert (np.abs(label.astype(int) - colour).sum(-1) < 60).mean() > 0.4 and white_text(label) > 5


def test_scanpaths_meeting_at_one_place_list_each_in_its_colour():
    model, observer = np.array([[100.0, 50.0], [30.0, 30.0]]), np.array([[170.0, 80.0], [100.0, 50.0]])
    out = np.asarray(viz.plot_scanpaths(grey(), [model, observer]))
    label = out[35:66, 112:140].astype(int)  # right of the shared spot: one line per scanpath
    for k in (0, 1):
        assert (np.abs(label - np.array(SCANPATH_COLOURS[k])).sum(-1) < 60).sum() > 20


def test_labels_of_nearby_places_do_not_cover_each_other():
    from attnzoo.viz.scanpath import _place_label

    placed = []
    for y in (30.0, 40.0, 50.0):  # three places, each revisited, close together
        group = (89.0, y - 11, 111.0, y + 11)
        box = _place_label((40.0, 15.0), group, (0, 0, 200, 100), placed, [group])
        assert 0 <= box[0] and box[2] <= 200 and 0 <= box[1] and box[3] <= 100
        assert box[2] <= group[0] or box[0] >= group[2] or box[3] <= group[1] or box[1] >= group[3]  # beside
        for other in placed:
            assert box[2] <= other[0] or box[0] >= other[2] or box[3] <= other[1] or box[1] >= other[3]
        placed.append(box)


def test_a_shelf_search_revisiting_objects_labels_each_object_once(tmp_path):
    from attnzoo.pipelines.scanpath import Scanpath

    boxes = np.array([(10 + 45 * c, 8 + 56 * r, 48 + 45 * c, 56 + 56 * r) for r in range(2) for c in range(3)], float)
    objects = np.array([2, 0, 2, 5, 2, 0, 4])
    centres = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
    sp = Scanpath(centres[objects], (150, 120), objects=objects, target=4, boxes=boxes, found_target=True)
    out = np.asarray(sp.plot())[-120:]  # the shelf, under the legend naming the target's box
    for obj in (0, 2):  # revisited: the circle holds no number
        x, y = centres[obj].astype(int)
        assert white_text(out[y - 4 : y + 5, x - 4 : x + 5]) == 0
    for obj in (5, 4):  # looked at once: numbered in place
        x, y = centres[obj].astype(int)
        assert white_text(out[y - 5 : y + 6, x - 5 : x + 6]) > 3


def header_height(picture) -> int:
    """Rows above the (grey) image: the white band of title, legend and note."""
    grey_rows = np.flatnonzero((np.asarray(picture).astype(int)[:, :, 0] < 250).mean(1) > 0.9)
    return int(grey_rows.min())


def test_a_long_legend_wraps_inside_the_picture():
    paths = [np.array([[20.0 + 30 * k, 50.0]]) for k in range(4)]
    labels = ["model", "observer 1", "observer 2", "observer 3"]
    out = viz.plot_scanpaths(
        grey(200, 100), paths, labels=labels, title="an astronaut in a white suit holding a helmet"
    )
    assert out.width == 200
    band = np.asarray(out).astype(int)[: header_height(out)]
    assert band.shape[0] > 22 * 2  # the title and the legend need several lines
    for k in range(4):  # every scanpath's dot is in the band, not past its right edge
        assert (np.abs(band - np.array(SCANPATH_COLOURS[k])).sum(-1) < 30).sum() > 20
    assert not (band[:, -3:] < 200).any()  # no text runs into the edge


def test_a_note_is_drawn_in_red_above_the_picture():
    out = viz.plot_scanpath(grey(), np.array([[50.0, 50.0]]), note="random weights: these fixations are meaningless")
    band = np.asarray(out).astype(int)[: header_height(out)]
    assert out.height > 100 and (np.abs(band - np.array([170, 20, 20])).sum(-1) < 90).sum() > 20
    plain = viz.plot_scanpath(grey(), np.array([[50.0, 50.0]]))
    assert plain.size == (200, 100)


def test_arrays_and_tensors_are_read_as_images():
    import torch

    # (small images are shown twice their size: see test_small_images_are_enlarged_by_a_whole_factor)
    bright = viz.plot_scanpath(np.full((50, 80), 0.8), [[10.0, 10.0]])  # float grey in [0, 1]
    assert bright.size == (160, 100) and np.asarray(bright)[90, 140].min() > 200  # 0.8 * 255 dimmed to white
    chw = viz.plot_scanpath(np.zeros((3, 40, 60), np.uint8), [[10.0, 10.0]])
    assert chw.size == (120, 80)
    assert viz.plot_scanpath(torch.zeros(3, 40, 60), [[10.0, 10.0]]).size == (120, 80)


@pytest.mark.parametrize(
    ("xy", "durations", "match"),
    [
        ([[np.nan, 3.0], [10.0, 10.0]], None, "finite"),
        ([[1.0, 3.0], [np.inf, 10.0]], None, "finite"),
        ([["a", "b"]], None, r"\[T, 2\]"),
        ([[1.0, 3.0], [10.0, 10.0]], [np.nan, 0.2], "durations"),
        ([[1.0, 3.0], [10.0, 10.0]], [-0.1, 0.2], "durations"),
    ],
)
def test_fixations_and_durations_that_cannot_be_drawn_are_typed_errors(xy, durations, match):
    with pytest.raises(InvalidInputError, match=match):
        viz.plot_scanpath(grey(), xy, durations=durations)


def test_a_thumbnail_gets_its_fixations_and_boxes_scaled():
    from attnzoo.pipelines.scanpath import Scanpath

    boxes = np.array([[300.0, 150.0, 500.0, 350.0]])
    sp = Scanpath(np.array([[400.0, 250.0]]), (800, 400), boxes=boxes, target=0, objects=np.array([0]))
    out = np.asarray(sp.plot(grey(200, 100))).astype(int)  # a quarter of the size
    assert out.shape[1:] == (200, 3) and out.shape[0] > 100  # under the legend naming the target's box
    out = out[-100:]
    assert np.abs(out[62 + 7, 100] - np.array(SCANPATH_COLOURS[0])).sum() < 120  # the fixation, at (100, 62.5)
    assert out[50, 75][1] > out[50, 75][0] + 40  # the target's green edge at x = 300 / 4
    with pytest.raises(InvalidInputError, match="800x400"):
        sp.plot(grey(200, 200))  # not the image's shape


# The picture-hunt fixes: small and narrow images, fixations off the image, many scanpaths, visual search.


def near(pixels, colour, tolerance=60):
    """Which pixels are within ``tolerance`` (summed over RGB) of ``colour``."""
    return np.abs(np.asarray(pixels).astype(int) - np.array(colour)).sum(-1) < tolerance


def test_small_images_are_enlarged_by_a_whole_factor():
    from attnzoo.viz.scanpath import plot_scanpaths

    checker = np.zeros((20, 20, 3), np.uint8)
    checker[(np.arange(20)[:, None] + np.arange(20)[None]) % 2 == 1] = 255
    out = plot_scanpaths(Image.fromarray(checker), [np.array([[5.0, 5.0]])])  # min_side=160
    assert out.size == (160, 160)  # 8 x 8 screen pixels per image pixel
    arr = np.asarray(out).astype(int)
    block = arr[120:128, 136:144]  # image pixel (17, 15), far from the mark: one flat (dimmed) square
    assert np.ptp(block) == 0
    assert np.abs(arr[120, 135] - arr[120, 136]).sum() > 300  # the checker's next pixel, not a blur of it
    assert near(arr[40 + 7, 40], SCANPATH_COLOURS[0], 120)  # the fixation (5, 5), scaled 8 times
    assert plot_scanpaths(grey(100, 50), [[[5.0, 5.0]]], min_side=160).size == (100, 50)  # no whole factor fits
    assert plot_scanpaths(grey(20, 20), [[[5.0, 5.0]]], min_side=0).size == (20, 20)


def test_a_narrow_picture_gets_a_band_wide_enough_for_whole_words():
    note = "random weights: these fixations are meaningless"
    out = viz.plot_scanpath(grey(200, 2000), [[100.0, 1000.0]], title="\u201ca tall image\u201d", note=note)
    assert 150 <= out.width < 200 and out.height < 1000  # shrunk to 80 x 800, under a wider band
    rows = np.asarray(out).astype(int)[-10:]  # bottom rows: white margins either side of the centred image
    image_columns = np.flatnonzero((rows < 250).any(axis=(0, 2)))
    assert len(image_columns) == 80 and abs(image_columns.mean() - out.width / 2) < 2
    from attnzoo.viz.scanpath import HEADER_MIN_WIDTH, header_layout

    assert out.width == HEADER_MIN_WIDTH
    band, texts, _ = header_layout(80, "\u201ca tall image\u201d", [], [(note, (170, 20, 20))])
    assert band == HEADER_MIN_WIDTH
    lines = [text for _, _, text, kind, _ in texts if kind == "note"]
    assert " ".join(lines) == note and all(word in note.split() for line in lines for word in line.split())
    assert len(lines) <= 3  # not a word (or half a word) a line
    assert header_layout(96, "x", [], [])[0] == 96  # a short title needs no wider band


def test_fixations_outside_the_image_are_drawn_hollow_at_its_edge(monkeypatch):
    import attnzoo.viz.scanpath as scanpath

    notes = []
    layout = getattr(scanpath, "header_layout", None)
    monkeypatch.setattr(scanpath, "header_layout", lambda *a: notes.extend(a[3]) or layout(*a), raising=False)
    xy = np.array([[150.0, 100.0], [-60.0, 30.0], [420.0, 100.0], [150.0, 260.0], [100.0, 50.0]])
    out = viz.plot_scanpath(grey(300, 200), xy)
    arr = np.asarray(out).astype(int)[-200:]
    red, r = SCANPATH_COLOURS[0], 11
    for x, y in [(r, 30), (300 - r, 100), (150, 200 - r)]:  # at the edge, a whole mark inside the picture
        ring = [arr[round(y + 9.5 * np.sin(a)), round(x + 9.5 * np.cos(a))] for a in np.linspace(0, 2 * np.pi, 16)]
        assert near(ring, red, 90).mean() > 0.7  # outlined in the scanpath's colour
        assert arr[y - 6, x].min() > 190  # hollow: light inside, not filled with red
    assert near(arr[100 + 7, 150], red, 120) and near(arr[50 + 7, 100], red, 120)  # inside: filled as before
    assert not near(arr[40:60, :3], red, 150).any()  # no line runs to (-60, 30) across the left edge (at y = 50)
    assert (scanpath.outside_note(3, 5), (70, 70, 70)) in notes
    assert scanpath.outside_note(3, 5).startswith("3 of 5 fixations lie outside the image")
    assert scanpath.outside_note(0, 5) is None


def cielab(rgb):
    """sRGB (0-255) to CIE L*a*b* (D65)."""
    c = np.asarray(rgb, dtype=float) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    f = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(f > 0.008856, np.cbrt(f), 7.787 * f + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def test_sixteen_scanpaths_look_different_and_more_change_their_style():
    from attnzoo.viz.scanpath import scanpath_style

    colours = cielab(SCANPATH_COLOURS)
    assert len(colours) >= 16
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(len(colours)) * 1e9
    assert gaps.min() > 25  # no two alike (CIE76: about 2 is the least difference seen)
    assert min(np.linalg.norm(colours[1:] - colours[:-1], axis=-1)) > 50  # neighbours far apart
    styles = [scanpath_style(k) for k in range(3 * len(colours))]
    assert len(set(styles)) == len(styles)
    # the 17th scanpath has the first one's colour, with a square mark: its corner is coloured, a disc's is not
    n = len(SCANPATH_COLOURS)
    paths = [np.array([[20.0 + 30 * (k % 9), 20.0 + 60 * (k // 9)]]) for k in range(n + 1)]
    arr = np.asarray(viz.plot_scanpaths(grey(300, 200), paths)).astype(int)
    corner = lambda x, y: arr[int(y) + 7, int(x) + 7]  # noqa: E731  (a square fills it; a disc of r = 11 has its rim there)
    assert near(corner(*paths[n][0]), SCANPATH_COLOURS[0], 120)
    assert not near(corner(*paths[0][0]), SCANPATH_COLOURS[0], 120)


def test_a_visual_search_picture_names_the_target_and_the_outcome(monkeypatch):
    import attnzoo.viz.scanpath as scanpath
    from attnzoo.pipelines.scanpath import Scanpath

    boxes = np.array([(10 + 45 * c, 8 + 56 * r, 48 + 45 * c, 56 + 56 * r) for r in range(2) for c in range(3)], float)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    found = Scanpath(
        centres[[0, 2, 4]], (150, 120), objects=np.array([0, 2, 4]), target=4, boxes=boxes, found_target=True
    )
    lost = Scanpath(
        centres[[0, 2, 1, 3]], (150, 120), objects=np.array([0, 2, 1, 3]), target=4, boxes=boxes, found_target=False
    )
    assert found.target_label() == "target (green box): found at fixation 3"
    assert lost.target_label() == "target (green box): not found in 4 fixations"
    assert Scanpath(centres[:1], (150, 120)).target_label() is None
    entries = []
    layout = scanpath.header_layout
    monkeypatch.setattr(scanpath, "header_layout", lambda *a: entries.extend(a[2]) or layout(*a))
    out = found.plot()
    assert (found.target_label(), scanpath.TARGET_COLOUR, "box") in entries
    band = np.asarray(out)[: out.height - 120]
    assert band.shape[0] >= 18 and near(band, scanpath.TARGET_COLOUR).sum() > 10  # the green swatch in the legend
    assert out.width == 150  # the band wraps to the shelf's width
    entries.clear()
    for target in (-1, len(boxes)):  # no such box: no green box drawn, and the legend does not name one
        viz.plot_scanpaths(Image.new("RGB", (150, 120)), [centres[:2]], boxes=boxes, target=target)
        assert not any(kind == "box" for *_, kind in entries)


@pytest.mark.parametrize("shade", [250, 10])
def test_the_other_boxes_show_on_bright_and_dark_shelves(shade):
    shelf = Image.new("RGB", (200, 100), (shade,) * 3)
    boxes = np.array([[20.0, 20.0, 80.0, 80.0], [120.0, 20.0, 180.0, 80.0]])
    out = viz.plot_scanpaths(shelf, [np.array([[150.0, 50.0]])], boxes=boxes, target=1)
    arr = np.asarray(out).astype(int)[-100:]
    background = arr[50, 50]
    edge = arr[50, 18:24]  # across the left edge of the box that is not the target
    assert np.abs(edge - background).sum(-1).max() > 150
