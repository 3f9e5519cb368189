"""CapMIT1003 (NevaClip, Zanca et al. 2023): captions and click paths on MIT1003 images.

On disk: the single SQLite3 file ``capmit1003.db`` of the NevaClip repository plus MIT1003's
``ALLSTIMULI/`` folder. Tables (names and column meanings from NevaClip's ``capmit1003.py`` and README):

* ``captions(obs_uid TEXT, usr_uid TEXT, start_time TIMESTAMP, caption TEXT, img_uid TEXT)``: one row per
  image-caption pair (``obs_uid``); ``start_time`` is the absolute date-time the image was shown;
* ``images(img_uid TEXT, img_path TEXT)``: ``img_path`` is a file name inside ``ALLSTIMULI/``;
* ``clicks(click_id INTEGER, obs_uid TEXT, x INTEGER, y INTEGER, click_time TIMESTAMP)``: ``x, y`` in
  image pixels, ``click_id`` ascending (the order of the clicks), ``click_time`` absolute.

Differences from the official accessor, on purpose: clicks are ordered by ``click_id`` (its query has
no ``ORDER BY``, so the order was whatever SQLite returned), and click times are made relative:
``times = click_time - start_time`` in seconds (the README calls both absolute timestamps). Timestamps
are read as SQLite stores them: ISO-8601 text (``"2022-05-03 10:15:02.123"``, the form pandas and
Python's sqlite3 write), or numbers taken as Unix epoch seconds, or milliseconds when larger than
1e11 (a date after 5138 in seconds). When ``start_time`` is missing, ``times`` is ``None``.
A caption with no clicks gives an empty path (``xy`` of shape ``[0, 2]``).
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from attnzoo.datasets.scanpaths import ScanpathCollection, ScanpathRecord, checked_points, checked_times, image_size
from attnzoo.errors import DatasetFormatError, InvalidInputError

__all__ = ["CAPMIT1003_SCHEMA", "CapMIT1003", "parse_timestamp"]

CAPMIT1003_SCHEMA: dict[str, tuple[str, ...]] = {
    "captions": ("obs_uid", "usr_uid", "start_time", "caption", "img_uid"),
    "images": ("img_uid", "img_path"),
    "clicks": ("click_id", "obs_uid", "x", "y", "click_time"),
}

_EPOCH_MS_THRESHOLD = 1e11


def parse_timestamp(value) -> float | None:
    """A SQLite timestamp cell -> seconds since the Unix epoch (``None`` for NULL)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf8")
    if isinstance(value, (int, float)):
        return float(value) / 1000.0 if abs(value) > _EPOCH_MS_THRESHOLD else float(value)
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return parse_timestamp(number)
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError(
            f"unreadable timestamp {value!r} (expected ISO-8601 text or epoch seconds/ms)"
        ) from None
    if stamp.tzinfo is None:  # naive stamps are compared with each other only: any fixed zone works
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


class CapMIT1003(ScanpathCollection):
    """One :class:`ScanpathRecord` per caption: the click path (by ``click_id``), the caption, and times.

    ``root`` is the folder holding ``capmit1003.db`` (or the ``.db`` file itself). ``stimuli_dir``
    defaults to ``ALLSTIMULI/`` (or NevaClip's ``mit1003/ALLSTIMULI/``) beside the database.
    ``subject`` is ``usr_uid``; ``meta`` holds ``obs_uid``, ``img_uid`` and ``start_time`` (epoch s).
    Missing image files are an error listing them, unless ``skip_missing=True`` (then
    :attr:`skipped` lists the captions left out).
    """

    def __init__(
        self,
        root: str | Path,
        stimuli_dir: str | Path | None = None,
        skip_missing: bool = False,
    ):
        root = Path(root)
        self.db_path = root if root.is_file() or root.suffix == ".db" else root / "capmit1003.db"
        if not self.db_path.is_file():
            raise DatasetFormatError(f"missing {self.db_path} (CapMIT1003's SQLite file from the NevaClip repository)")
        base = self.db_path.parent
        if stimuli_dir is None:
            candidates = [base / "ALLSTIMULI", base / "mit1003" / "ALLSTIMULI"]
            stimuli_dir = next((c for c in candidates if c.is_dir()), candidates[0])
        self.stimuli_dir = Path(stimuli_dir)
        if not self.stimuli_dir.is_dir():
            raise DatasetFormatError(f"missing {self.stimuli_dir} (MIT1003's ALLSTIMULI folder; pass stimuli_dir=)")
        self.skipped: list[str] = []
        super().__init__(self._read(skip_missing))

    def _read(self, skip_missing: bool) -> list[ScanpathRecord]:
        try:
            cnx = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        except sqlite3.Error as err:
            raise DatasetFormatError(f"{self.db_path}: cannot open as SQLite ({err})") from None
        try:
            self._check_schema(cnx)
            captions = cnx.execute(
                "SELECT c.obs_uid, c.usr_uid, c.start_time, c.caption, c.img_uid, i.img_path "
                "FROM captions c LEFT JOIN images i USING(img_uid)"
            ).fetchall()
            clicks: dict[str, list[tuple]] = {}
            for obs, x, y, t in cnx.execute("SELECT obs_uid, x, y, click_time FROM clicks ORDER BY obs_uid, click_id"):
                clicks.setdefault(str(obs), []).append((x, y, t))
        except sqlite3.DatabaseError as err:
            raise DatasetFormatError(f"{self.db_path}: not a readable SQLite database ({err})") from None
        finally:
            cnx.close()

        captions = [(*row[:5], None if row[5] is None else str(row[5])) for row in captions]
        no_image = [str(row[0]) for row in captions if row[5] is None]
        if no_image:
            raise DatasetFormatError(
                f"{self.db_path}: {len(no_image)} caption(s) whose img_uid is not in table images, e.g. obs_uid {no_image[:3]}"
            )
        missing = sorted({row[5] for row in captions if not (self.stimuli_dir / row[5]).is_file()})
        if missing and not skip_missing:
            raise DatasetFormatError(
                f"{len(missing)} stimulus file(s) missing from {self.stimuli_dir}: {', '.join(missing[:10])}"
                f"{' ...' if len(missing) > 10 else ''} (pass skip_missing=True to leave their captions out)"
            )
        missing_set = set(missing)
        sizes = {name: image_size(self.stimuli_dir / name) for name in {row[5] for row in captions} - missing_set}
        records = []
        for obs, usr, start, caption, img_uid, img_path in captions:
            obs = str(obs)
            if img_path in missing_set:
                self.skipped.append(obs)
                continue
            path_clicks = clicks.get(obs, [])
            where = f"{self.db_path}: clicks of obs_uid {obs!r} on {img_path}"
            xy = checked_points([(x, y) for x, y, _ in path_clicks], where, sizes[img_path])
            try:
                start_s = parse_timestamp(start)
                stamps = [parse_timestamp(t) for _, _, t in path_clicks]
            except (TypeError, ValueError, OverflowError) as err:
                raise DatasetFormatError(f"{where}: malformed time ({err})") from None
            times = None
            if start_s is not None and all(s is not None for s in stamps):
                times = checked_times([s - start_s for s in stamps], where, len(xy), "click times")
            records.append(
                ScanpathRecord(
                    stimulus=str(img_path),
                    image_path=self.stimuli_dir / str(img_path),
                    subject=str(usr),
                    xy=xy,
                    times=times,
                    durations=None,
                    caption=None if caption is None else str(caption),
                    image_size=sizes[img_path],
                    meta={
                        "obs_uid": obs,
                        "img_uid": str(img_uid),
                        "start_time": start_s,
                    },
                )
            )
        return records

    def _check_schema(self, cnx: sqlite3.Connection) -> None:
        tables = {row[0] for row in cnx.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        for table, columns in CAPMIT1003_SCHEMA.items():
            if table not in tables:
                raise DatasetFormatError(
                    f"{self.db_path}: missing table {table!r} (expected tables {sorted(CAPMIT1003_SCHEMA)}, found {sorted(tables)})"
                )
            have = {row[1] for row in cnx.execute(f"PRAGMA table_info({table})")}
            lacking = [c for c in columns if c not in have]
            if lacking:
                raise DatasetFormatError(
                    f"{self.db_path}: table {table!r} lacks column(s) {lacking} (has {sorted(have)})"
                )

    # ---- controls of the NevaClip paper ------------------------------------------------------
    def misleading_captions(self, seed: int = 0) -> list[str]:
        """For each record, the caption of a record on a *different* image (uniformly, seeded)."""
        stimuli = np.array([r.stimulus for r in self])
        if len(set(stimuli.tolist())) < 2:
            raise InvalidInputError("misleading captions need captions of at least two different images")
        rng = np.random.default_rng(seed)
        out = []
        for record in self:
            others = np.flatnonzero(stimuli != record.stimulus)
            out.append(self[int(others[rng.integers(len(others))])].caption)
        return out

    def other_subject_captions(self, seed: int = 0) -> list[str | None]:
        """For each record, another subject's caption of the same image (``None`` when there is none)."""
        rng = np.random.default_rng(seed)
        groups = {}
        for i, record in enumerate(self):
            groups.setdefault(record.stimulus, []).append(i)
        out: list[str | None] = []
        for record in self:
            others = [i for i in groups[record.stimulus] if self[i].subject != record.subject]
            out.append(self[others[int(rng.integers(len(others)))]].caption if others else None)
        return out

    def __repr__(self) -> str:
        return f"CapMIT1003(db={str(self.db_path)!r}, captions={len(self)}, stimuli={len(self.stimuli())})"
