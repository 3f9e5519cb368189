"""Fuzz the scanpath readers (CapMIT1003, MIT1003 raw and pysaliency, Amazon covers, OAT shelves):
whatever a file holds, a reader returns records whose points are finite and on or near the image,
with times to match -- or raises a typed error naming the file."""

from __future__ import annotations

import json
import sqlite3
import zipfile
from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from attnzoo.datasets.capmit1003 import CapMIT1003
from attnzoo.datasets.mit1003 import MIT1003, check_fixations
from attnzoo.datasets.visual_search import AmazonCovers, OATShelf, official_split
from attnzoo.errors import DatasetFormatError
from tests.datasets.fuzzing import (
    FUZZ,
    check_points,
    check_times,
    damaged,
    deeply_nested,
    mutated_json,
    odd_numbers,
    read_or_refuse,
    scratch,
)
from tests.scanpath_helpers import (
    AMAZON_SIZE,
    SHELF_HEADER,
    amazon_cover_boxes,
    draw_mask,
    write_amazon,
    write_capmit1003,
    write_mit1003_pysaliency,
    write_mit1003_raw,
    write_oat_shelf,
    write_xlsx,
)


def check_records(records, sizes=None) -> None:
    for record in records:
        size = record.image_size if sizes is None else sizes[record.stimulus]
        check_points(record.xy, size)
        check_times(record.times, len(record))
        check_times(record.durations, len(record), non_negative=True)
        assert isinstance(record.subject, str) and isinstance(record.stimulus, str)


# ---- CapMIT1003 --------------------------------------------------------------------------------------
CELLS = {
    "clicks": ("x", "y", "click_time", "click_id", "obs_uid"),
    "captions": ("start_time", "usr_uid", "caption", "img_uid", "obs_uid"),
    "images": ("img_path", "img_uid"),
}


@FUZZ
@given(
    table=st.sampled_from(sorted(CELLS)),
    data=st.data(),
    value=st.one_of(odd_numbers(), st.binary(max_size=8), st.just("2022-13-45 99:99")),
)
def test_capmit1003_with_odd_cells(table, data, value):
    column = data.draw(st.sampled_from(CELLS[table]))
    with scratch() as root:
        db = write_capmit1003(root)["db"]
        with sqlite3.connect(db) as cnx:
            rowid = data.draw(st.integers(1, cnx.execute(f"SELECT count(*) FROM {table}").fetchone()[0]))
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                value = str(value)  # SQLite stores 64-bit integers only
            cnx.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (value, rowid))
        records = read_or_refuse(lambda: CapMIT1003(root), db, "ALLSTIMULI")
    if records is not None:
        check_records(records)


@FUZZ
@given(data=st.data())
def test_capmit1003_damaged_database(data):
    with scratch() as root:
        db = write_capmit1003(root)["db"]
        db.write_bytes(data.draw(damaged(db.read_bytes())))
        records = read_or_refuse(lambda: CapMIT1003(root), db)
    if records is not None:
        check_records(records)


@pytest.mark.parametrize("x, y", [(float("inf"), 3), (5, -1e9), (1e6, 4)])
def test_capmit1003_clicks_far_off_the_image_are_refused(tmp_path, x, y):
    db = write_capmit1003(tmp_path)["db"]
    with sqlite3.connect(db) as cnx:
        cnx.execute("UPDATE clicks SET x = ?, y = ? WHERE click_id = 2", (x, y))
    with pytest.raises(DatasetFormatError, match=r"capmit1003.db: clicks of obs_uid 'obs1'.*point 1"):
        CapMIT1003(tmp_path)


# ---- MIT1003 -----------------------------------------------------------------------------------------
traces = hnp.arrays(
    np.float64,
    st.tuples(st.integers(0, 240), st.integers(1, 3)),
    elements=st.one_of(st.floats(-50, 450), st.sampled_from([np.nan, np.inf, -np.inf, 1e300])),
)


@FUZZ
@given(trace=traces)
def test_check_fixations_on_any_trace(trace):
    fix = read_or_refuse(partial(check_fixations, trace), "eye data", "checkFixations")
    if fix is not None:
        n = len(fix["start"])
        assert fix["medianXY"].shape == (n, 2) and fix["end"].shape == fix["duration"].shape == (n,)
        assert (fix["start"] >= 1).all() and (fix["end"] <= len(trace)).all() and (fix["duration"] > 0).all()


@FUZZ
@given(trace=traces, complex_values=st.booleans(), data=st.data())
def test_mit1003_raw_with_any_trace_or_damaged_mat(trace, complex_values, data):
    from scipy.io import savemat

    images = {"i1.jpeg": (40, 30)}
    with scratch() as root:
        write_mit1003_raw(root, images, {("i1.jpeg", "ajs"): trace if trace.size else np.zeros((0, 2))})
        mat = root / "DATA" / "ajs" / "i1.mat"
        if complex_values:  # the imaginary part would be dropped by a cast to float
            savemat(mat, {"i1": {"DATA": {"eyeData": trace + 1j}}})
        elif data.draw(st.booleans()):
            mat.write_bytes(data.draw(damaged(mat.read_bytes())))
        records = read_or_refuse(lambda: MIT1003(root, source="raw"), mat)
    assert not (complex_values and records)
    if records is not None:
        check_records(records, {"i1.jpeg": images["i1.jpeg"]})
        for record in records:  # pysaliency's rule: strictly inside the image
            assert ((record.xy > 0) & (record.xy < images["i1.jpeg"])).all()


PYSALIENCY = [
    {"n": 0, "subject": 1, "xs": [1.0, 5.0], "ys": [2.0, 3.0], "ts": [0.1, 0.3], "durations": [0.2, 0.1]},
    {"n": 1, "subject": 0, "xs": [7.0], "ys": [4.0], "ts": [0.5], "durations": [0.2]},
]
FIELDS = {
    "ScanpathFixations": ("scanpaths/xs", "scanpaths/ys", "scanpaths/n", "scanpaths/length",
                          "scanpaths/scanpath_attributes/subject", "scanpaths/fixation_attributes/ts",
                          "scanpaths/fixation_attributes/durations"),
    "FixationTrains": ("train_xs", "train_ys", "train_ns", "train_lengths", "train_subjects", "train_ts",
                       "scanpath_fixation_attributes/durations"),
}  # fmt: skip
odd_arrays = hnp.arrays(
    st.sampled_from([np.float64, np.int64, np.int8, np.complex64, np.bool_, "S3"]),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)


@FUZZ
@given(kind=st.sampled_from(sorted(FIELDS)), data=st.data(), values=odd_arrays)
def test_mit1003_pysaliency_with_odd_arrays(kind, data, values):
    import h5py

    field = data.draw(st.sampled_from(FIELDS[kind]))
    images = {"i1.jpeg": (10, 8), "i2.jpeg": (12, 9)}
    with scratch() as root:
        write_mit1003_pysaliency(root, images, PYSALIENCY, kind=kind)
        with h5py.File(root / "fixations.hdf5", "a") as f:
            del f[field]
            f.create_dataset(field, data=values)
        records = read_or_refuse(lambda: MIT1003(root, source="pysaliency"), "fixations.hdf5")
    if records is not None:
        check_records(records)
        assert all(r.stimulus in images and r.image_size == images[r.stimulus] for r in records)


@FUZZ
@given(which=st.sampled_from(["stimuli.hdf5", "fixations.hdf5"]), data=st.data())
def test_mit1003_pysaliency_damaged_files(which, data):
    with scratch() as root:
        write_mit1003_pysaliency(root, {"i1.jpeg": (10, 8), "i2.jpeg": (12, 9)}, PYSALIENCY)
        (root / which).write_bytes(data.draw(damaged((root / which).read_bytes())))
        records = read_or_refuse(lambda: MIT1003(root, source="pysaliency"), which)
    if records is not None:
        check_records(records)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"subject": -1}, "'subjects' holds a negative value"),
        ({"length": 5}, "scanpath 0 claims 5 fixations, but 2 are stored"),
        ({"xs": [1.0, np.inf]}, r"scanpath 0: point 1 is \(inf, 3.0\)"),
        ({"xs": [1.0, 900.0]}, "scanpath 0: point 1 .* far outside the 10x8 image"),
    ],
)
def test_mit1003_pysaliency_bad_indices_and_points_are_refused(tmp_path, change, message):
    import h5py

    write_mit1003_pysaliency(tmp_path, {"i1.jpeg": (10, 8), "i2.jpeg": (12, 9)}, PYSALIENCY)
    with h5py.File(tmp_path / "fixations.hdf5", "a") as f:
        g = f["scanpaths"]
        for key, value in change.items():
            target = g["scanpath_attributes/subject"] if key == "subject" else g[key]
            if target.ndim == 1:
                target[0] = value
            else:
                target[0, : len(value)] = value
    with pytest.raises(DatasetFormatError, match=message):
        MIT1003(tmp_path, source="pysaliency")


# ---- Amazon covers and OAT shelves -------------------------------------------------------------------
AMAZON = {
    "1.jpg": {
        "fixations": {"1": [[5, 5], [25, 14]], "2": [[40, 20]]},
        "ground_truth": [{"xmin": 21, "xmax": 29, "ymin": 12, "ymax": 19}],
        "size": {"height": AMAZON_SIZE[1], "width": AMAZON_SIZE[0]},
        "target": "target_2.jpg",
    }
}


@FUZZ
@given(doc=mutated_json(AMAZON))
def test_amazon_json_with_any_value_anywhere(doc):
    with scratch() as root:
        path = write_amazon(root, layout="sti", entries=AMAZON)["folder"] / "Amazon.json"
        path.write_text(json.dumps(doc))
        trials = read_or_refuse(lambda: AmazonCovers(root, drop_outliers=False), path)
    if trials is not None:
        check_records(trials)
        for t in trials:
            assert t.boxes.shape == (84, 4) and np.isfinite(t.boxes).all()
            assert ((t.objects >= 0) & (t.objects < 84)).all() and -1 <= t.target < 84


@pytest.mark.parametrize(
    "text", [deeply_nested(), '{"1.jpg": {"size": {"width": "wide"}}}', b"\xff\xfe{\x00}\x00", "[NaN]"]
)
def test_amazon_json_that_crashes_parsers_names_the_file(tmp_path, text):
    path = write_amazon(tmp_path, layout="sti")["folder"] / "Amazon.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DatasetFormatError, match="Amazon.json"):
        AmazonCovers(tmp_path)


@pytest.mark.parametrize("point", [[float("nan"), 3], [1e9, 5], ["12", 4], [True, 4]])
def test_amazon_fixations_must_be_finite_numbers_near_the_image(tmp_path, point):
    entries = json.loads(json.dumps(AMAZON))
    entries["1.jpg"]["fixations"]["2"].append(point)
    write_amazon(tmp_path, layout="sti", entries=entries)
    with pytest.raises(DatasetFormatError, match=r"Amazon.json: image '1.jpg', subject '2'"):
        AmazonCovers(tmp_path)


@FUZZ
@given(data=st.data())
def test_amazon_damaged_mask(data):
    from PIL import Image

    with scratch() as root:
        folder = write_amazon(root, layout="oat", entries=AMAZON)["folder"]
        mask = folder / "binarymask" / "14x6-1.jpg"
        Image.fromarray(draw_mask(AMAZON_SIZE, amazon_cover_boxes())).save(mask, format="PNG")
        mask.write_bytes(data.draw(damaged(mask.read_bytes())))
        trials = read_or_refuse(lambda: AmazonCovers(root), mask)
    if trials is not None:
        check_records(trials)


@FUZZ
@given(key=st.sampled_from(SHELF_HEADER), row=st.integers(0, 1), value=st.one_of(odd_numbers(), st.none()))
def test_oat_shelf_with_odd_cells(key, row, value):
    rows = [[11, 4, 1, "T3_1", "Q3_21", 5, 1, 90.0, 300.0], [11, 4, 1, "T3_1", "Q3_21", 5, 2, 280.5, 310.0]]
    rows[row][SHELF_HEADER.index(key)] = value  # None: a blank cell
    with scratch() as root:
        path = write_xlsx(root / "time_Q3_mousedel_new.xlsx", SHELF_HEADER, rows)
        trials = read_or_refuse(lambda: OATShelf(root, "yogurt"), path)
    if trials is not None:
        check_records(trials)
        assert all(((t.objects >= 0) & (t.objects < 27)).all() and 0 <= t.target < 27 for t in trials)


@FUZZ
@given(fmt=st.sampled_from(["xlsx", "csv"]), data=st.data())
def test_oat_shelf_damaged_files(fmt, data):
    with scratch() as root:
        path = write_oat_shelf(root, "yogurt", fmt=fmt)["path"]
        path.write_bytes(data.draw(damaged(path.read_bytes())))
        trials = read_or_refuse(lambda: OATShelf(root, "yogurt"), path)
    if trials is not None:
        check_records(trials)


@FUZZ
@given(
    cells=st.lists(
        st.tuples(
            st.text("AZ19a-", max_size=5),
            st.sampled_from(["n", "s", "str", "b", "e", "inlineStr", "zz"]),
            st.text("0123456789.e-xa", max_size=6),
        ),
        max_size=5,
    )
)
def test_read_xlsx_with_odd_cells(cells):
    from attnzoo.datasets.visual_search import read_xlsx

    body = "".join(f'<c r="{r}" t="{t}"><v>{v}</v></c>' for r, t, v in cells)
    with scratch() as root:
        path = write_xlsx(root / "t.xlsx", ["a", "b"], [[1, "x"]])
        with zipfile.ZipFile(path) as z:
            parts = {n: z.read(n) for n in z.namelist()}
        sheet = parts["xl/worksheets/sheet1.xml"].decode()
        parts["xl/worksheets/sheet1.xml"] = sheet.replace(
            "</sheetData>", f'<row r="3">{body}</row></sheetData>'
        ).encode()
        with zipfile.ZipFile(path, "w") as z:
            for name, content in parts.items():
                z.writestr(name, content)
        rows = read_or_refuse(lambda: read_xlsx(path), path)
    assert rows is None or all(isinstance(row, dict) for row in rows)


@FUZZ
@given(data=st.data())
def test_official_split_permutation_file_damaged(data):
    from attnzoo.datasets.scanpaths import SearchTrial

    trials = [SearchTrial(stimulus=str(i), image_path=None, subject="s", xy=np.zeros((0, 2))) for i in range(5)]
    with scratch() as root:
        path = root / "splitlist_all_amazon.txt"
        path.write_bytes(data.draw(damaged(b"3\n1\n0\n4\n2\n")))
        splits = read_or_refuse(lambda: official_split(trials, path), path)
    if splits is not None:
        assert sorted(t.stimulus for part in splits.values() for t in part) == [str(i) for i in range(5)]
