"""CapMIT1003 reader on a tiny capmit1003.db with NevaClip's schema and MIT1003 stimuli."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from attnzoo.datasets.capmit1003 import CapMIT1003, parse_timestamp
from attnzoo.datasets.scanpaths import ScanpathRecord
from attnzoo.errors import DatasetFormatError, InvalidInputError
from tests.scanpath_helpers import CAPMIT_CAPTIONS, CAPMIT_IMAGES, write_capmit1003


@pytest.mark.parametrize("time_format", ["iso", "epoch_ms", "epoch_s"])
def test_records_match_the_database(tmp_path, time_format):
    written = write_capmit1003(tmp_path, time_format=time_format)
    ds = CapMIT1003(tmp_path)
    assert len(ds) == len(CAPMIT_CAPTIONS) == len(list(ds))
    for record, (obs, usr, _, caption, img_uid, clicks) in zip(ds, written["captions"]):
        assert isinstance(record, ScanpathRecord)
        name = CAPMIT_IMAGES[img_uid][0]
        assert record.stimulus == name and record.image_path == tmp_path / "ALLSTIMULI" / name
        assert record.subject == usr and record.caption == caption
        assert record.meta["obs_uid"] == obs and record.meta["img_uid"] == img_uid
        ordered = sorted(clicks)  # by click_id, whatever the insertion order
        assert record.xy.shape == (len(clicks), 2) and record.xy.dtype == np.float64
        np.testing.assert_array_equal(record.xy, np.array([[x, y] for _, x, y, _ in ordered]).reshape(-1, 2))
        np.testing.assert_allclose(record.times, np.array([dt for *_, dt in ordered], dtype=float), atol=1e-3)
        assert record.durations is None


def test_sequence_protocol_grouping_and_filter(tmp_path):
    write_capmit1003(tmp_path)
    ds = CapMIT1003(tmp_path)
    a, b = CAPMIT_IMAGES["img_a"][0], CAPMIT_IMAGES["img_b"][0]
    assert ds.stimuli() == [a, b]
    groups = ds.by_stimulus()
    assert [r.meta["obs_uid"] for r in groups[a]] == ["obs1", "obs2"]
    assert [r.meta["obs_uid"] for r in groups[b]] == ["obs3", "obs4"]
    only_b = ds.filter(stimuli=[b])
    assert isinstance(only_b, CapMIT1003) and [r.meta["obs_uid"] for r in only_b] == [
        "obs3",
        "obs4",
    ]
    assert [r.meta["obs_uid"] for r in ds[1:3]] == ["obs2", "obs3"]
    assert ds[-1].meta["obs_uid"] == "obs4"
    with pytest.raises(InvalidInputError, match="unknown stimuli"):
        ds.filter(stimuli=["nope.jpeg"])


def test_misleading_and_other_subject_captions(tmp_path):
    write_capmit1003(tmp_path)
    ds = CapMIT1003(tmp_path)
    by_image = {
        CAPMIT_IMAGES["img_a"][0]: {"a street with cars", "people walking on a road"},
        CAPMIT_IMAGES["img_b"][0]: {"a red door", "a building"},
    }
    mis = ds.misleading_captions(seed=3)
    assert mis == ds.misleading_captions(seed=3)  # deterministic
    for record, caption in zip(ds, mis):
        other_image = next(s for s in by_image if s != record.stimulus)
        assert caption in by_image[other_image]
    seen = {tuple(ds.misleading_captions(seed=s)) for s in range(20)}
    assert len(seen) > 1  # the seed matters
    other = ds.other_subject_captions(seed=0)
    assert other == [
        "people walking on a road",
        "a street with cars",
        "a building",
        "a red door",
    ]


def test_missing_stimuli_are_listed_or_skipped(tmp_path):
    write_capmit1003(tmp_path)
    missing = tmp_path / "ALLSTIMULI" / CAPMIT_IMAGES["img_b"][0]
    missing.unlink()
    with pytest.raises(DatasetFormatError, match=CAPMIT_IMAGES["img_b"][0]):
        CapMIT1003(tmp_path)
    ds = CapMIT1003(tmp_path, skip_missing=True)
    assert [r.meta["obs_uid"] for r in ds] == ["obs1", "obs2"] and ds.skipped == [
        "obs3",
        "obs4",
    ]


def test_stimuli_dir_and_db_path_arguments(tmp_path):
    write_capmit1003(tmp_path / "db", stimuli=False)
    write_capmit1003(tmp_path / "elsewhere")
    ds = CapMIT1003(
        tmp_path / "db" / "capmit1003.db",
        stimuli_dir=tmp_path / "elsewhere" / "ALLSTIMULI",
    )
    assert ds[0].image_path.parent == tmp_path / "elsewhere" / "ALLSTIMULI"
    with pytest.raises(DatasetFormatError, match="ALLSTIMULI"):
        CapMIT1003(tmp_path / "db")


@pytest.mark.parametrize(
    "drop, named",
    [
        ("clicks", "clicks"),
        ("images", "images"),
        ("clicks.click_id", "click_id"),
        ("captions.caption", "caption"),
    ],
)
def test_schema_errors_name_the_file_and_what_is_missing(tmp_path, drop, named):
    write_capmit1003(tmp_path, drop=(drop,))
    with pytest.raises(DatasetFormatError, match=named) as err:
        CapMIT1003(tmp_path)
    assert "capmit1003.db" in str(err.value)


def test_missing_or_corrupt_db(tmp_path):
    with pytest.raises(DatasetFormatError, match="capmit1003.db"):
        CapMIT1003(tmp_path)
    (tmp_path / "ALLSTIMULI").mkdir()
    (tmp_path / "capmit1003.db").write_bytes(b"not sqlite at all" * 10)
    with pytest.raises(DatasetFormatError, match="capmit1003.db"):
        CapMIT1003(tmp_path)


def test_caption_with_unknown_image_is_an_error(tmp_path):
    write_capmit1003(tmp_path)
    cnx = sqlite3.connect(tmp_path / "capmit1003.db")
    cnx.execute("INSERT INTO captions VALUES ('obs9', 'u9', '2022-05-04 09:30:00', 'x', 'img_zzz')")
    cnx.commit()
    cnx.close()
    with pytest.raises(DatasetFormatError, match="obs9"):
        CapMIT1003(tmp_path)


def test_parse_timestamp_units():
    assert parse_timestamp(None) is None
    assert parse_timestamp("1970-01-01 00:00:10.5") == pytest.approx(10.5)
    assert parse_timestamp("1970-01-01T00:01:00Z") == pytest.approx(60.0)
    assert parse_timestamp(1_651_572_900) == pytest.approx(1_651_572_900.0)  # seconds
    assert parse_timestamp(1_651_572_900_250) == pytest.approx(1_651_572_900.25)  # milliseconds
    assert parse_timestamp("1651572900250") == pytest.approx(1_651_572_900.25)
    with pytest.raises(InvalidInputError):
        parse_timestamp("yesterday")


def test_scanpath_readers_are_exported_lazily():
    import attnzoo.datasets as datasets
    from attnzoo.datasets.capmit1003 import CapMIT1003
    from attnzoo.datasets.visual_search import AmazonCovers

    assert datasets.CapMIT1003 is CapMIT1003 and datasets.AmazonCovers is AmazonCovers
    with pytest.raises(AttributeError):
        datasets.NotADataset  # noqa: B018


def test_stimuli_with_exif_rotation_reach_the_model_in_the_frame_of_the_clicks(tmp_path):
    """Clicks were recorded on the stored pixels: the evaluation's input decodes to those, not upright."""
    from attnzoo.evaluation.scanpath import ScanpathEvaluator
    from attnzoo.multimodal.nevaclip import preprocess_images
    from tests.datasets.test_images import sideways_jpeg

    write_capmit1003(tmp_path)
    for seed, (name, size) in enumerate(CAPMIT_IMAGES.values()):
        sideways_jpeg(tmp_path / "ALLSTIMULI" / name, size, seed)
    records = CapMIT1003(tmp_path)
    assert {r.stimulus: r.image_size for r in records} == dict(CAPMIT_IMAGES.values())  # as stored
    samples = ScanpathEvaluator(tmp_path, "test", dataset="capmit1003").samples()
    _, sizes = preprocess_images([s.input["image"] for s in samples], input_size=16)
    assert sizes == [records[s.target[1]].image_size for s in samples]
