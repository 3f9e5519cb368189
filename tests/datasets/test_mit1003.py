"""MIT1003: the checkFixations port on gaze traces whose segmentation is derived by hand, pysaliency's
filtering, the raw release (.mat structs) and pysaliency's HDF5 cache."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.io import savemat

from attnzoo.datasets.mit1003 import (
    MIT1003,
    MIT1003_SUBJECTS,
    check_fixations,
    fixations_from_gaze,
    natural_sort_key,
)
from attnzoo.errors import DatasetFormatError, InvalidInputError
from tests.scanpath_helpers import (
    step_trace,
    write_mit1003_pysaliency,
    write_mit1003_raw,
)

# Hand derivation for a step of D px between 0-based samples K-1 and K (1-based sample K+1 is the
# first new one), far from other steps: posChange = D at K+1; the 4-tap average is D/4 on K+1..K+4;
# accel(k) = 60 * (SM(k+5) - SM(k)) is +15 D on K-4..K-1 and -15 D on K+1..K+4. With 15 D > 204 the
# saccade starts at K-4 (marker 3); its end marker is K-1 and the first sample after it where
# accel < -204 is followed by one that is not is K+4. So samples K-4..K+4 are saccade and the
# fixations around it end at K-5 and start at K+5 (1-based).


def test_single_step_gives_two_fixations():
    n, k = 200, 80
    fix = check_fixations(step_trace(n, {k: (400, 250)}, (100, 200)))
    np.testing.assert_array_equal(fix["start"], [1, k + 5])
    np.testing.assert_array_equal(fix["end"], [k - 5, n])
    np.testing.assert_allclose(fix["duration"], [1000 * (k - 5) / 240, 1000 * (n - k - 4) / 240])
    np.testing.assert_array_equal(fix["medianXY"], [[100, 200], [400, 250]])


def test_two_steps_and_the_50ms_merge_rule():
    n, k1 = 200, 80
    fix = check_fixations(step_trace(n, {k1: (400, 250), 150: (700, 300)}, (100, 200)))
    np.testing.assert_array_equal(fix["start"], [1, 85, 155])
    np.testing.assert_array_equal(fix["end"], [75, 145, 200])
    np.testing.assert_array_equal(fix["medianXY"], [[100, 200], [400, 250], [700, 300]])
    # second step 15 samples later: the fixation between (start of saccade 2 at 91) - (end of
    # saccade 1 at 84) = 7 <= 12 samples (50 ms) is merged into one long saccade 76..99
    fix = check_fixations(step_trace(n, {k1: (400, 250), 95: (700, 300)}, (100, 200)))
    np.testing.assert_array_equal(fix["start"], [1, 100])
    np.testing.assert_array_equal(fix["end"], [75, 200])
    np.testing.assert_array_equal(fix["medianXY"], [[100, 200], [700, 300]])


def test_short_final_fixation_is_absorbed_and_flat_trace_is_one_fixation():
    k = 80
    fix = check_fixations(step_trace(k + 14, {k: (400, 250)}, (100, 200)))  # 10 samples after the saccade end <= 12
    np.testing.assert_array_equal(fix["start"], [1])
    np.testing.assert_array_equal(fix["end"], [k - 5])
    flat = np.full((50, 2), 3.0)
    flat[7] = np.nan
    fix = check_fixations(flat)
    np.testing.assert_array_equal(fix["start"], [1])
    np.testing.assert_allclose(fix["duration"], [1000 * 50 / 240])
    np.testing.assert_array_equal(fix["medianXY"], [[3.0, 3.0]])


def test_medians_ignore_nan_and_jitter():
    n, k = 200, 80
    trace = step_trace(n, {k: (400, 250)}, (100, 200))
    trace[10:20, 0] = [
        101,
        99,
        102,
        98,
        100,
        103,
        97,
        100,
        101,
        99,
    ]  # sub-threshold jitter
    trace[30, :] = np.nan  # a blink sample
    fix = check_fixations(trace)
    np.testing.assert_array_equal(fix["start"], [1, 85])
    expected_x = np.median(np.r_[np.full(65 - 1, 100.0), [101, 99, 102, 98, 100, 103, 97, 100, 101, 99]])
    assert fix["medianXY"][0, 0] == expected_x and fix["medianXY"][0, 1] == 200


def test_check_fixations_rejects_bad_shapes():
    with pytest.raises(InvalidInputError):
        check_fixations(np.zeros(10))


def test_pysaliency_filtering_and_initial_fixation():
    trace = step_trace(200, {80: (300, 60), 150: (-20, 70)}, (100, 50))  # last fixation off the image
    xy, t, d = fixations_from_gaze(trace, 400, 300)
    np.testing.assert_array_equal(xy, [[300, 60]])
    np.testing.assert_allclose(t, [85 / 240])
    np.testing.assert_allclose(d, [61 / 240])
    xy, t, d = fixations_from_gaze(trace, 400, 300, initial_fixation=True)
    np.testing.assert_array_equal(xy, [[100, 50], [300, 60]])
    np.testing.assert_allclose(t, [1 / 240, 85 / 240])
    # an invalid first fixation: pysaliency puts a centre fixation in its place, then drops that one
    trace = step_trace(200, {80: (300, 60), 150: (200, 100)}, (-5, 50))
    xy, _, _ = fixations_from_gaze(trace, 400, 300)
    np.testing.assert_array_equal(xy, [[300, 60], [200, 100]])
    xy, _, _ = fixations_from_gaze(trace, 400, 300, initial_fixation=True)
    np.testing.assert_array_equal(xy, [[300, 60], [200, 100]])
    # the borders are invalid: 0 < x < width
    xy, _, _ = fixations_from_gaze(step_trace(200, {80: (400, 60)}, (100, 50)), 400, 300, initial_fixation=True)
    np.testing.assert_array_equal(xy, [[100, 50]])


LONG = "i" + "x" * 70 + ".jpeg"  # stem longer than MATLAB's 63-character variable names
IMAGES = {"i10.jpeg": (400, 300), "i9.jpeg": (300, 400), LONG: (400, 300)}
TRACES = {
    ("i9.jpeg", "ajs"): step_trace(200, {80: (150, 200), 150: (250, 100)}, (150, 150)),
    ("i9.jpeg", "CNG"): step_trace(200, {80: (10, 20)}, (150, 150)),
    ("i10.jpeg", "ajs"): step_trace(200, {80: (300, 60), 150: (-20, 70)}, (100, 50)),
    ("i10.jpeg", "CNG"): np.full((100, 2), 200.0),
    (LONG, "ajs"): step_trace(200, {80: (30, 40)}, (200, 150)),
    (LONG, "CNG"): step_trace(200, {80: (30, 40)}, (200, 150)),
}
# by hand from the derivation above: (xy, start samples, durations in samples), first fixation dropped
EXPECTED = {
    ("i9.jpeg", "CNG"): ([[10, 20]], [85], [116]),
    ("i9.jpeg", "ajs"): ([[150, 200], [250, 100]], [85, 155], [61, 46]),
    ("i10.jpeg", "CNG"): (np.zeros((0, 2)), [], []),
    ("i10.jpeg", "ajs"): ([[300, 60]], [85], [61]),
    (LONG, "CNG"): ([[30, 40]], [85], [116]),
    (LONG, "ajs"): ([[30, 40]], [85], [116]),
}
ORDER = [
    ("i9.jpeg", "CNG"),
    ("i9.jpeg", "ajs"),
    ("i10.jpeg", "CNG"),
    ("i10.jpeg", "ajs"),
    (LONG, "CNG"),
    (LONG, "ajs"),
]


def check_records(ds, root_images=None):
    assert [(r.stimulus, r.subject) for r in ds] == ORDER  # natural order of images, sorted subjects
    for r in ds:
        xy, starts, durs = EXPECTED[(r.stimulus, r.subject)]
        np.testing.assert_array_equal(r.xy, np.asarray(xy, dtype=float).reshape(-1, 2))
        np.testing.assert_allclose(r.times, np.asarray(starts, dtype=float) / 240)
        np.testing.assert_allclose(r.durations, np.asarray(durs, dtype=float) / 240)
        assert r.image_size == IMAGES[r.stimulus] and r.image_path.name == r.stimulus
        assert r.caption is None


def test_raw_release(tmp_path):
    write_mit1003_raw(tmp_path, IMAGES, TRACES)
    ds = MIT1003(tmp_path, source="raw")
    assert ds.source == "raw" and len(ds) == 6
    check_records(ds)
    assert ds.stimuli() == ["i9.jpeg", "i10.jpeg", LONG] and ds.subjects() == [
        "CNG",
        "ajs",
    ]
    assert [r.subject for r in ds.by_stimulus()["i10.jpeg"]] == ["CNG", "ajs"]
    assert len(ds.filter(subjects=["ajs"])) == 3
    with_initial = MIT1003(tmp_path, source="raw", initial_fixation=True)
    np.testing.assert_array_equal(with_initial[3].xy, [[100, 50], [300, 60]])


def test_raw_release_variable_named_otherwise(tmp_path):
    images = {"i-odd.jpeg": (400, 300)}  # '-' is no valid MATLAB identifier character
    write_mit1003_raw(
        tmp_path,
        images,
        {("i-odd.jpeg", "ajs"): TRACES[("i9.jpeg", "CNG")]},
        variable_names={"i-odd.jpeg": "i_odd"},
    )
    np.testing.assert_array_equal(MIT1003(tmp_path)[0].xy, [[10, 20]])


def test_raw_release_errors_name_the_file(tmp_path):
    write_mit1003_raw(tmp_path, IMAGES, TRACES)
    (tmp_path / "DATA" / "ajs" / "i10.mat").unlink()
    with pytest.raises(DatasetFormatError, match=r"ajs/i10\.mat"):
        MIT1003(tmp_path, source="raw")
    savemat(tmp_path / "DATA" / "ajs" / "i10.mat", {"i10": {"notDATA": 1}, "other": 2})
    with pytest.raises(DatasetFormatError, match=r"i10\.mat.*DATA"):
        MIT1003(tmp_path, source="raw")
    (tmp_path / "DATA" / "ajs" / "i10.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match=r"i10\.mat"):
        MIT1003(tmp_path, source="raw")
    with pytest.raises(DatasetFormatError, match="no MIT1003 layout"):
        MIT1003(tmp_path / "DATA")


def pysaliency_scanpaths():
    names = list(IMAGES)  # pysaliency's image index n follows its stimuli.hdf5 order
    out = []
    for stim, subj in ORDER:
        xy, starts, durs = EXPECTED[(stim, subj)]
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        out.append(
            {
                "n": names.index(stim),
                "subject": sorted(["CNG", "ajs"]).index(subj),
                "xs": xy[:, 0],
                "ys": xy[:, 1],
                "ts": np.asarray(starts, float) / 240,
                "durations": np.asarray(durs, float) / 240,
            }
        )
    return out


@pytest.mark.parametrize("kind", ["ScanpathFixations", "FixationTrains"])
def test_pysaliency_cache(tmp_path, kind):
    write_mit1003_pysaliency(tmp_path / "MIT1003", IMAGES, pysaliency_scanpaths(), kind=kind)
    (tmp_path / "DATA" / "CNG").mkdir(parents=True)  # subject names come from DATA/ when it is there
    (tmp_path / "DATA" / "ajs").mkdir()
    ds = MIT1003(tmp_path)
    assert ds.source == "pysaliency"
    check_records(ds)
    assert ds[0].image_path == tmp_path / "MIT1003" / "stimuli" / "i9.jpeg" and ds[0].image_path.is_file()


def test_pysaliency_subject_indices_map_to_mit1003_initials(tmp_path):
    scan = [
        {
            "n": 0,
            "subject": 14,
            "xs": [1.0],
            "ys": [2.0],
            "ts": [0.5],
            "durations": [0.2],
        }
    ]
    write_mit1003_pysaliency(tmp_path, {"i1.jpeg": (10, 10)}, scan)
    ds = MIT1003(tmp_path, source="pysaliency")
    assert ds[0].subject == MIT1003_SUBJECTS[14] == "zb" and sorted(MIT1003_SUBJECTS) == list(MIT1003_SUBJECTS)


def test_pysaliency_wrong_type_is_an_error(tmp_path):
    write_mit1003_pysaliency(
        tmp_path,
        {"i1.jpeg": (10, 10)},
        [
            {
                "n": 0,
                "subject": 0,
                "xs": [1.0],
                "ys": [2.0],
                "ts": [0.5],
                "durations": [0.2],
            }
        ],
    )
    import h5py

    with h5py.File(tmp_path / "fixations.hdf5", "a") as f:
        f.attrs["type"] = np.bytes_("Fixations")
    with pytest.raises(DatasetFormatError, match="fixations.hdf5"):
        MIT1003(tmp_path, source="pysaliency")
    with pytest.raises(InvalidInputError):
        MIT1003(tmp_path, source="matlab")


def test_natural_sort_key():
    assert sorted(["i10.jpeg", "i9.jpeg", "i100.jpeg", "a.jpeg"], key=natural_sort_key) == [
        "a.jpeg",
        "i9.jpeg",
        "i10.jpeg",
        "i100.jpeg",
    ]


def test_detection_looks_where_the_reader_looks(tmp_path):
    from attnzoo.datasets.scanpaths import detect_scanpath_dataset

    scan = [{"n": 0, "subject": 0, "xs": [1.0], "ys": [2.0], "ts": [0.5], "durations": [0.2]}]
    write_mit1003_pysaliency(tmp_path / "deep" / "er" / "MIT1003", {"i1.jpeg": (10, 10)}, scan)
    with pytest.raises(
        DatasetFormatError, match="cannot tell"
    ):  # three levels down is no layout: the tree isn't walked
        detect_scanpath_dataset(tmp_path)
    assert detect_scanpath_dataset(tmp_path / "deep" / "er") == "mit1003"
    assert MIT1003(tmp_path / "deep" / "er").source == "pysaliency"


# ---- pysaliency's three caches: never one read in place of another -------------------------------
ONE_IMAGE = {"i1.jpeg": (400, 300)}
ONE_SCAN = [
    {"n": 0, "subject": 0, "xs": [200.0, 10.0], "ys": [150.0, 20.0], "ts": [1 / 240, 0.3], "durations": [0.2, 0.1]}
]


@pytest.mark.parametrize(
    ("found", "asked", "needed"),
    [("MIT1003_initial_fix", False, True), ("MIT1003", True, False)],
)
def test_a_cache_of_the_other_setting_is_refused(tmp_path, found, asked, needed):
    write_mit1003_pysaliency(tmp_path / found, ONE_IMAGE, ONE_SCAN)
    for root in (tmp_path, tmp_path / found):  # the folder holding the cache, or the cache folder itself
        for source in ("auto", "pysaliency"):
            with pytest.raises(DatasetFormatError) as err:
                MIT1003(root, source=source, initial_fixation=asked)
            message = str(err.value)
            assert f"{found}/" in message and f"initial_fixation={asked}" in message
            flag = f"--{'' if needed else 'no-'}initial-fixation"
            assert f"Pass initial_fixation={needed} (`attnzoo eval scanpath`: {flag}) to read {found}/" in message
        ds = MIT1003(root, initial_fixation=needed)  # the matching setting reads it as stored
        assert ds[0].meta["initial_fixation"] is needed and ds[0].meta["cache"] == found
        np.testing.assert_array_equal(ds[0].xy, [[200, 150], [10, 20]])
    # with the raw release beside it, auto reads the raw release; an explicit source is obeyed
    write_mit1003_raw(tmp_path, ONE_IMAGE, {("i1.jpeg", "CNG"): step_trace(200, {80: (10, 20)}, (200, 150))})
    assert MIT1003(tmp_path, initial_fixation=asked).source == "raw"
    with pytest.raises(DatasetFormatError, match=f"Pass initial_fixation={needed}"):
        MIT1003(tmp_path, source="pysaliency", initial_fixation=asked)


def test_scanpath_evaluation_passes_initial_fixation_on_and_records_it(tmp_path):
    """``attnzoo eval scanpath --initial-fixation`` reads MIT1003_initial_fix/ (refused without it), and
    the setting is part of the run's recorded settings; other datasets have no such choice."""
    from attnzoo.errors import InvalidInputError
    from attnzoo.evaluation.scanpath import ScanpathEvaluator

    write_mit1003_pysaliency(tmp_path / "MIT1003_initial_fix", ONE_IMAGE, ONE_SCAN)
    with pytest.raises(DatasetFormatError, match="--initial-fixation"):
        ScanpathEvaluator(tmp_path, dataset="mit1003")
    plan = ScanpathEvaluator.plan(
        tmp_path, None, limit=None, model="nevaclip", weights=None, dataset="mit1003", initial_fixation=True
    )
    evaluator = plan.runs[0][1]
    assert evaluator.records[0].meta["initial_fixation"] is True and len(evaluator.records[0].xy) == 2
    assert plan.settings["initial_fixation"] is True
    with pytest.raises(InvalidInputError, match="initial-fixation"):
        ScanpathEvaluator(tmp_path, dataset="capmit1003", initial_fixation=False)
    # --no-initial-fixation and no flag both drop it: the same settings (a run started with one resumes with
    # the other), with no key, as an older attnzoo's run.json holds them
    write_mit1003_pysaliency(tmp_path / "MIT1003", ONE_IMAGE, ONE_SCAN)
    dropped = [
        ScanpathEvaluator.plan(
            tmp_path, None, limit=None, model="nevaclip", weights=None, dataset="mit1003", initial_fixation=flag
        )
        for flag in (False, None)
    ]
    assert [p.runs[0][1].records[0].meta["cache"] for p in dropped] == ["MIT1003", "MIT1003"]
    assert dropped[0].settings == dropped[1].settings and "initial_fixation" not in dropped[0].settings


def consistent_cache_scanpath(trace, width, height, n, subject):
    """What pysaliency's get_mit1003_with_initial_fixation(replace_initial_invalid_fixations=True) stores:
    the fixations on the image, behind a central one at ts 0 where the recorded first one is off the image."""
    fix = check_fixations(trace)
    xs, ys = fix["medianXY"][:, 0], fix["medianXY"][:, 1]
    ts, durations = fix["start"] / 240, fix["duration"] / 1000
    valid = (xs > 0) & (xs < width) & (ys > 0) & (ys < height)
    scan = {"xs": xs[valid], "ys": ys[valid], "ts": ts[valid], "durations": durations[valid]}
    if not valid[0]:
        stand_in = {"xs": width / 2, "ys": height / 2, "ts": 0.0, "durations": durations[0]}
        scan = {key: np.r_[stand_in[key], values] for key, values in scan.items()}
    return {"n": n, "subject": subject, **scan}


@pytest.mark.parametrize("initial_fixation", [False, True])
def test_the_consistent_cache_is_converted_exactly_to_either_setting(tmp_path, initial_fixation):
    traces = {
        ("i1.jpeg", "CNG"): step_trace(200, {80: (300, 60), 150: (200, 100)}, (-5, 50)),  # first fixation off
        ("i1.jpeg", "ajs"): step_trace(200, {80: (300, 60), 150: (-20, 70)}, (100, 50)),
    }
    write_mit1003_raw(tmp_path, ONE_IMAGE, traces)
    scans = [consistent_cache_scanpath(trace, 400, 300, 0, i) for i, trace in enumerate(traces.values())]
    write_mit1003_pysaliency(tmp_path / "MIT1003_initial_fix_consistent", ONE_IMAGE, scans)
    raw = MIT1003(tmp_path, source="raw", initial_fixation=initial_fixation)
    cached = MIT1003(tmp_path, source="pysaliency", initial_fixation=initial_fixation)
    assert MIT1003(tmp_path, initial_fixation=initial_fixation).source == "pysaliency"
    for r, c in zip(raw, cached, strict=True):
        assert (r.stimulus, r.subject) == (c.stimulus, c.subject)
        np.testing.assert_allclose(c.xy, r.xy)
        np.testing.assert_allclose(c.times, r.times)
        np.testing.assert_allclose(c.durations, r.durations)
        assert c.meta["initial_fixation"] is initial_fixation
        assert c.meta["cache"] == "MIT1003_initial_fix_consistent"
    assert len(cached[1]) == (2 if initial_fixation else 1)


def test_a_consistent_cache_that_cannot_be_converted_is_refused(tmp_path):
    folder = tmp_path / "MIT1003_initial_fix_consistent"
    write_mit1003_pysaliency(folder, ONE_IMAGE, [{**ONE_SCAN[0], "xs": [], "ys": [], "ts": [], "durations": []}])
    with pytest.raises(DatasetFormatError, match="scanpath 0 is empty"):
        MIT1003(tmp_path)
    write_mit1003_pysaliency(folder, ONE_IMAGE, ONE_SCAN)
    import h5py

    with h5py.File(folder / "fixations.hdf5", "a") as f:
        del f["scanpaths/fixation_attributes/ts"]
    with pytest.raises(DatasetFormatError, match="stores no fixation times"):
        MIT1003(tmp_path, initial_fixation=True)
    assert len(MIT1003(tmp_path)[0]) == 1  # dropping the first fixation needs no times


def test_stimuli_with_exif_rotation_reach_the_model_in_the_frame_of_the_fixations(tmp_path):
    """MATLAB's imread does not rotate: sizes, fixations and the evaluation's input use the stored pixels."""
    from attnzoo.datasets.images import load_image
    from attnzoo.evaluation.scanpath import ScanpathEvaluator
    from tests.datasets.test_images import sideways_jpeg

    write_mit1003_raw(tmp_path, ONE_IMAGE, {("i1.jpeg", "CNG"): step_trace(200, {80: (350, 60)}, (200, 150))})
    sideways_jpeg(tmp_path / "ALLSTIMULI" / "i1.jpeg", ONE_IMAGE["i1.jpeg"])
    record = MIT1003(tmp_path)[0]
    assert record.image_size == (400, 300)
    np.testing.assert_array_equal(record.xy, [[350, 60]])  # x = 350 lies on the stored 400 px width
    (sample,) = ScanpathEvaluator(tmp_path, "test", dataset="mit1003").samples()
    assert load_image(sample.input["image"]).size == record.image_size
