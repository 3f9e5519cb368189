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
    assert out.size == (800, 400)
    arr = np.asarray(out).astype(int)
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
    out = np.asarray(sp.plot())
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

    bright = viz.plot_scanpath(np.full((50, 80), 0.8), [[10.0, 10.0]])  # float grey in [0, 1]
    assert bright.size == (80, 50) and np.asarray(bright)[45, 70].min() > 200  # 0.8 * 255 dimmed to white, not black
    chw = viz.plot_scanpath(np.zeros((3, 40, 60), np.uint8), [[10.0, 10.0]])
    assert chw.size == (60, 40)
    assert viz.plot_scanpath(torch.zeros(3, 40, 60), [[10.0, 10.0]]).size == (60, 40)


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
    assert out.shape == (100, 200, 3)
    assert np.abs(out[62 + 7, 100] - np.array(SCANPATH_COLOURS[0])).sum() < 120  # the fixation, at (100, 62.5)
    assert out[50, 75][1] > out[50, 75][0] + 40  # the target's green edge at x = 300 / 4
    with pytest.raises(InvalidInputError, match="800x400"):
        sp.plot(grey(200, 200))  # not the image's shape
