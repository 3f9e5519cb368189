"""Visual search: Amazon covers (STI json, OAT masks), OAT shelves (.xlsx/.csv), boxes and splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnzoo.datasets.scanpaths import SearchTrial
from attnzoo.datasets.visual_search import (
    AmazonCovers,
    OATShelf,
    boxes_from_mask,
    drop_length_outliers,
    grid_boxes,
    leakage_free_split,
    map_fixations_to_objects,
    official_split,
    read_amazon_json,
    read_xlsx,
    shelf_boxes,
    sort_boxes_reading_order,
    target_from_ground_truth,
)
from attnzoo.errors import DatasetFormatError, InvalidInputError
from tests.scanpath_helpers import (
    AMAZON_SIZE,
    amazon_cover_boxes,
    draw_mask,
    write_amazon,
    write_oat_shelf,
    write_xlsx,
)

# objects worked out by hand on the drawn covers (see amazon_cover_boxes): ties between equally
# near centres go to the lower index, as OAT's strict `<` loop does
MASK_OBJECTS = {
    ("1.jpg", "1"): [0, 16, 82],
    ("1.jpg", "2"): [17],
    ("1.jpg", "3"): [1, 1, 29, 13],
    ("2.jpg", "1"): [63],
    ("2.jpg", "2"): [0, 63],
}
MASK_TARGETS = {"1.jpg": 16, "2.jpg": 63}


def test_oat_layout_with_masks(tmp_path):
    written = write_amazon(tmp_path, layout="oat")
    ds = AmazonCovers(tmp_path)
    assert ds.boxes_from == "mask" and len(ds) == 5 and ds.n_before_filter == 5
    expected_boxes = np.array(sorted(amazon_cover_boxes(), key=lambda b: (b[1] // 10 * 10, b[0])), dtype=float)
    for t in ds:
        assert isinstance(t, SearchTrial)
        entry = written["entries"][t.stimulus]
        np.testing.assert_array_equal(t.xy, np.asarray(entry["fixations"][t.subject], dtype=float))
        np.testing.assert_array_equal(t.objects, MASK_OBJECTS[(t.stimulus, t.subject)])
        assert t.target == MASK_TARGETS[t.stimulus]
        np.testing.assert_array_equal(t.boxes, expected_boxes)
        assert t.grid == (6, 14) and t.layout == t.stimulus.split(".")[0] and t.image_size == AMAZON_SIZE
        assert t.meta["target_name"] == entry["target"] and t.meta["tgt_id"] == entry["target"][7]
        assert t.meta["pair"] == f"{t.layout}_{entry['target'][7]}"
        assert t.target_image_path == written["folder"] / "target" / entry["target"]
        assert t.times is None and t.durations is None
    # one record per subject, nothing shared
    a, b = ds[0], ds[1]
    assert a.xy is not b.xy and a.objects is not b.objects and a.boxes is not b.boxes


def test_displays_with_exif_rotation_reach_the_model_as_stored(tmp_path):
    """Fixations and boxes are on the stored pixels: the OAT evaluation decodes the display in that frame."""
    from attnzoo.datasets.images import DatasetImagePath, load_image
    from attnzoo.evaluation.scanpath import ScanpathEvaluator
    from tests.datasets.test_images import sideways_jpeg

    written = write_amazon(tmp_path, layout="oat")
    for seed, name in enumerate(written["entries"]):
        sideways_jpeg(written["folder"] / "images" / name, AMAZON_SIZE, seed)
    trials = AmazonCovers(tmp_path)
    assert all(isinstance(t.target_image_path, DatasetImagePath) for t in trials)
    evaluator = ScanpathEvaluator(tmp_path, "all", dataset="amazon", model_kind="oat")
    for sample in evaluator.samples():
        assert load_image(sample.input["image"]).size == evaluator.trials[sample.target].image_size == AMAZON_SIZE


def test_sti_layout_uses_the_grid(tmp_path):
    write_amazon(tmp_path, layout="sti")
    ds = AmazonCovers(tmp_path)
    assert ds.boxes_from == "grid"
    first = ds[0]
    np.testing.assert_array_equal(first.boxes[:2], [[0, 0, 10, 10], [10, 0, 20, 10]])
    np.testing.assert_array_equal(first.objects, [0, 16, 82])  # (5,5), (25,14), (129,55) on 10 px cells
    np.testing.assert_array_equal(ds[1].objects, [17])  # (40, 20) lies on the edges of 17, 18, 31, 32: the first wins
    assert first.target == 16
    with pytest.raises(DatasetFormatError, match="binarymask"):
        AmazonCovers(tmp_path, boxes="mask")


def test_length_outliers_use_mean_and_population_std(tmp_path):
    fix = {str(i): [[5, 5], [6, 6]] for i in range(1, 13)}
    fix["13"] = [[5, 5]] * 30  # mean 54/13 = 4.15, std 7.46: 30 > 4.15 + 3 * 7.46 = 26.5
    entries = {
        "1.jpg": {
            "fixations": fix,
            "ground_truth": [{"xmin": 1, "xmax": 9, "ymin": 1, "ymax": 8}],
            "size": {"height": 60, "width": 140},
            "target": "target_1.jpg",
        }
    }
    write_amazon(tmp_path, layout="sti", entries=entries)
    assert sorted(t.subject for t in AmazonCovers(tmp_path)) == sorted(str(i) for i in range(1, 13))
    assert len(AmazonCovers(tmp_path, drop_outliers=False)) == 13


def test_drop_length_outliers_bounds_are_inclusive():
    trials = [
        SearchTrial(stimulus="s", image_path=None, subject=str(i), xy=np.zeros((n, 2))) for i, n in enumerate([1, 3])
    ]
    assert len(drop_length_outliers(trials, k=1.0)) == 2  # mean 2, std 1: both exactly on the bounds
    assert drop_length_outliers([]) == []


def test_mask_with_wrong_object_count_names_the_file(tmp_path):
    written = write_amazon(tmp_path, layout="oat")
    from PIL import Image

    Image.fromarray(draw_mask(AMAZON_SIZE, amazon_cover_boxes()[:-1])).save(
        written["folder"] / "binarymask" / "14x6-2.jpg", format="PNG"
    )
    with pytest.raises(DatasetFormatError, match=r"14x6-2\.jpg.*83 objects"):
        AmazonCovers(tmp_path)
    (written["folder"] / "binarymask" / "14x6-2.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"14x6-2\.jpg"):
        AmazonCovers(tmp_path)


@pytest.mark.parametrize(
    "broken, named",
    [
        ("{not json", "malformed JSON"),
        (
            json.dumps(
                {
                    "1.jpg": {
                        "fixations": {},
                        "size": {"height": 1, "width": 1},
                        "target": "t",
                    }
                }
            ),
            "ground_truth",
        ),
        (
            json.dumps(
                {
                    "1.jpg": {
                        "fixations": {"1": [[1, 2, 3]]},
                        "ground_truth": [{"xmin": 0, "xmax": 1, "ymin": 0, "ymax": 1}],
                        "size": {"height": 1, "width": 1},
                        "target": "t",
                    }
                }
            ),
            "fixations",
        ),
    ],
)
def test_malformed_json_names_the_file(tmp_path, broken, named):
    (tmp_path / "Amazon.json").write_text(broken)
    with pytest.raises(DatasetFormatError, match=named) as err:
        read_amazon_json(tmp_path / "Amazon.json")
    assert "Amazon.json" in str(err.value)
    with pytest.raises(DatasetFormatError, match="Amazon.json"):
        AmazonCovers(tmp_path / "nothing_here")


def test_boxes_from_mask_equal_hand_boxes_and_opencv_contours():
    shapes = [(2, 2, 12, 9), (20, 3, 27, 10), (30, 30, 45, 41)]
    mask = draw_mask((60, 50), shapes)
    mask[31:40, 31:44] = 0  # a ring: its hole ...
    mask[34:36, 36:38] = 255  # ... holds a blob, which RETR_EXTERNAL ignores
    mask[9, 12] = 255  # touches the first box only by a corner: 8-connected, so part of it
    mask[40:44, 2:6] = 255
    expected = [[2, 2, 13, 10], [20, 3, 27, 10], [30, 30, 45, 41], [2, 40, 6, 44]]
    np.testing.assert_array_equal(boxes_from_mask(mask), expected)
    cv2 = pytest.importorskip("cv2")
    contours, _ = cv2.findContours((mask > 127).astype(np.uint8) * 255, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rects = [(x, y, x + w, y + h) for x, y, w, h in (cv2.boundingRect(c) for c in contours)]
    np.testing.assert_array_equal(boxes_from_mask(mask), sort_boxes_reading_order(np.array(rects)))


def test_colour_masks_use_opencv_grey_weights():
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[1:4, 1:4] = (0, 255, 0)  # grey 150 > 127: object
    rgb[5:8, 10:15] = (50, 50, 200)  # grey 67: background
    np.testing.assert_array_equal(boxes_from_mask(rgb), [[1, 1, 4, 4]])
    with pytest.raises(DatasetFormatError, match="expected 2"):
        boxes_from_mask(rgb, expected=2, source="m.png")


def test_reading_order_snaps_y_to_tens():
    boxes = np.array(
        [[50, 12, 60, 20], [0, 19, 10, 29], [0, 0, 10, 9], [30, 21, 40, 30]],
        dtype=float,
    )
    # y0 12 and 19 both snap to 10 (same row, by x); 21 snaps to 20 (next row)
    np.testing.assert_array_equal(sort_boxes_reading_order(boxes), boxes[[2, 1, 0, 3]])


def test_mapping_and_target_rules():
    boxes = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20]], dtype=float)
    # (10, 5) is on the shared edge: first containing box; (25, 5) nearest centre (15, 5); (-1, 16) -> (5, 15)
    np.testing.assert_array_equal(map_fixations_to_objects([[10, 5], [25, 5], [-1, 16]], boxes), [0, 1, 2])
    assert target_from_ground_truth({"xmin": 11, "xmax": 19, "ymin": 1, "ymax": 9}, boxes) == 1
    assert target_from_ground_truth({"xmin": 50, "xmax": 60, "ymin": 50, "ymax": 60}, boxes) == -1
    np.testing.assert_array_equal(
        grid_boxes((30, 20), rows=2, cols=3),
        [
            [0, 0, 10, 10],
            [10, 0, 20, 10],
            [20, 0, 30, 10],
            [0, 10, 10, 20],
            [10, 10, 20, 20],
            [20, 10, 30, 20],
        ],
    )
    with pytest.raises(InvalidInputError):
        grid_boxes((30, 20), rows=0)


@pytest.mark.parametrize("fmt", ["xlsx", "csv"])
def test_oat_yogurt_shelf(tmp_path, fmt):
    written = write_oat_shelf(tmp_path, "yogurt", fmt=fmt)
    ds = OATShelf(tmp_path, "yogurt")
    assert len(ds) == 2
    for t, s in zip(ds, written["scanpaths"]):
        assert t.stimulus == f"{s['Question']}.png" and t.layout == s["Question"] and t.subject == str(s["Sub_ID"])
        np.testing.assert_array_equal(t.objects, np.array(s["Choice"]) - 1)
        np.testing.assert_array_equal(t.xy, np.stack([s["X"], s["Y"]], axis=1))
        assert t.target == s["T_Package"] - 1 and t.grid == (3, 9) and t.image_size == (1680, 1050)
        assert (
            t.meta["task"] == "Q3"
            and t.meta["target_name"] == s["Target"]
            and t.meta["pair"] == s["Target"] + s["Question"]
        )
        assert t.image_path.is_file() and t.target_image_path.name == f"{s['Target']}.png"
    # cells of 186 x 305 px under a 1050 - 3 * 305 = 135 px header
    np.testing.assert_array_equal(ds[0].boxes[[0, 10]], [[0, 135, 186, 440], [186, 440, 372, 745]])


def test_oat_wine_shelf_and_errors(tmp_path):
    write_oat_shelf(tmp_path, "wine")
    ds = OATShelf(tmp_path, "wine")
    assert ds[0].grid == (2, 11) and len(ds[0].boxes) == 22
    np.testing.assert_array_equal(shelf_boxes("wine")[12], [152, 601, 304, 1050])  # header 1050 - 2 * 449 = 152
    with pytest.raises(DatasetFormatError, match="time_Q3_mousedel_new"):
        OATShelf(tmp_path, "yogurt")
    with pytest.raises(InvalidInputError):
        OATShelf(tmp_path, "shampoo")
    write_xlsx(tmp_path / "bad.xlsx", ["ID", "Sub_ID", "Question"], [[1, 2, "Q1_1"]])
    with pytest.raises(DatasetFormatError, match=r"bad\.xlsx.*Choice"):
        OATShelf(tmp_path, "wine", data_file=tmp_path / "bad.xlsx")
    header = ["ID", "Sub_ID", "Index", "Target", "Question", "T_Package", "Choice", "X", "Y"]
    write_xlsx(
        tmp_path / "blank.xlsx",
        header,
        [[7, 1, 1, "T1_1", "Q1_3", 2, 4, 10.0, 20.0], [7, 1, 2, "T1_1", "Q1_3", 2, None, 30.0, 40.0]],
    )
    with pytest.raises(DatasetFormatError, match=r"blank\.xlsx: scanpath ID 7 has a row with an empty 'Choice' cell"):
        OATShelf(tmp_path, "wine", data_file=tmp_path / "blank.xlsx")


def test_read_xlsx_types(tmp_path):
    write_xlsx(tmp_path / "t.xlsx", ["a", "b"], [[1, "x & y"], [2.5, "z"]])
    assert read_xlsx(tmp_path / "t.xlsx") == [
        {"a": 1, "b": "x & y"},
        {"a": 2.5, "b": "z"},
    ]
    (tmp_path / "no.xlsx").write_bytes(b"zzz")
    with pytest.raises(DatasetFormatError, match="no.xlsx"):
        read_xlsx(tmp_path / "no.xlsx")


def make_trials(n_layouts=10, per_layout=3, task="amazon"):
    return [
        SearchTrial(
            stimulus=f"{l}.jpg",
            image_path=None,
            subject=str(s),
            xy=np.zeros((2, 2)),
            layout=str(l),
            meta={"task": task, "target_name": f"target_{l % 4}.jpg"},
        )
        for l in range(n_layouts)
        for s in range(per_layout)
    ]


def test_official_split_from_permutation_file_and_seed(tmp_path):
    trials = make_trials(5, 2)  # 10 scanpaths
    perm = [3, 7, 0, 9, 1, 8, 2, 6, 5, 4]
    (tmp_path / "splitlist_all_amazon.txt").write_text("\n".join(map(str, perm)))
    split = official_split(trials, tmp_path / "splitlist_all_amazon.txt")
    assert split["train"] == [trials[i] for i in perm[:8]]
    assert split["val"] == [trials[perm[8]]] and split["test"] == [trials[perm[9]]]
    a, b = official_split(trials, 7), official_split(trials, 7)
    assert all(a[k] == b[k] for k in a) and [len(a[k]) for k in ("train", "val", "test")] == [8, 1, 1]
    assert sorted(id(t) for k in a for t in a[k]) == sorted(id(t) for t in trials)
    (tmp_path / "bad.txt").write_text("0\n1\n1")
    with pytest.raises(DatasetFormatError, match="bad.txt"):
        official_split(trials, tmp_path / "bad.txt")


def test_official_split_is_per_task():
    trials = make_trials(10, 2, task="Q3") + make_trials(5, 2, task="Q1")  # 20 + 10 scanpaths
    split = official_split(trials, 0)
    assert [len(split[k]) for k in ("train", "val", "test")] == [16 + 8, 2 + 1, 2 + 1]
    assert sum(t.meta["task"] == "Q1" for t in split["test"]) == 1


@pytest.mark.parametrize("by", ["layout", "target", "layout_target"])
def test_leakage_free_split(by):
    trials = make_trials(20, 3)
    split = leakage_free_split(trials, by=by, fractions=(0.6, 0.2, 0.2), seed=1)
    key = {
        "layout": lambda t: t.layout,
        "target": lambda t: t.meta["target_name"],
        "layout_target": lambda t: (t.layout, t.meta["target_name"]),
    }[by]
    keys = {k: {key(t) for t in v} for k, v in split.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert all(split[k] for k in split) and sum(len(v) for v in split.values()) == len(trials)
    assert split == leakage_free_split(trials, by=by, fractions=(0.6, 0.2, 0.2), seed=1)
    if by == "layout":
        assert [len(split[k]) for k in ("train", "val", "test")] == [
            36,
            12,
            12,
        ]  # 12, 4, 4 layouts of 3
    with pytest.raises(InvalidInputError):
        leakage_free_split(trials, by="colour")
    with pytest.raises(InvalidInputError):
        leakage_free_split(trials, fractions=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("seed", [-1, True, 2.0, 2**64])
def test_a_split_seed_outside_the_seed_range_is_refused(seed):
    """random.Random(-1) shuffles as random.Random(1): the split recorded as -1 would silently be seed 1's. A seed
    of 2**64 or more is refused as every other seed here is (it was taken: split seeds had no upper bound)."""
    from attnzoo.errors import InvalidOptionError

    trials = make_trials()
    with pytest.raises(InvalidOptionError, match=r"a split's seed must be an integer in \[0, 2\*\*64\), got"):
        official_split(trials, seed)
    with pytest.raises(InvalidOptionError, match=r"a split's seed must be an integer in \[0, 2\*\*64\), got"):
        leakage_free_split(trials, seed=seed)
    assert official_split(trials, np.int64(1)) == official_split(trials, 1)
    assert official_split(trials, 2**64 - 1) == official_split(trials, np.uint64(2**64 - 1))  # the top one is taken


def test_amazon_records_follow_the_json_order(tmp_path):
    """OAT's pickle follows the JSON's key order (STI's file lists "1.jpg", "10.jpg", "100.jpg", ...),
    and its permutation file indexes that pickle: no re-sorting by collage number."""
    entry = {
        "fixations": {"2": [[5, 5], [25, 14]], "1": [[40, 20]]},
        "ground_truth": [{"xmin": 21, "xmax": 29, "ymin": 12, "ymax": 19}],
        "size": {"height": AMAZON_SIZE[1], "width": AMAZON_SIZE[0]},
        "target": "target_2.jpg",
    }
    write_amazon(tmp_path, layout="sti", entries={name: entry for name in ("1.jpg", "10.jpg", "2.jpg")})
    trials = AmazonCovers(tmp_path, drop_outliers=False)
    assert [(t.stimulus, t.subject) for t in trials] == [
        (n, s) for n in ("1.jpg", "10.jpg", "2.jpg") for s in ("2", "1")
    ]
