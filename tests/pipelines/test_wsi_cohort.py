"""Whole-slide cohorts (attnzoo.pipelines.wsi_cohort, ``attnzoo extract wsi-features``): slide lists,
sharding by size, per-slide resumption, failures recorded, CLAM's layout, and two torchrun processes
killed and rerun against one uninterrupted process, on small pyramidal TIFFs (tests/wsi_helpers.py)."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.cli import main
from attnzoo.datasets.mil_features import read_feature_bags
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError
from attnzoo.pipelines import wsi_features
from attnzoo.pipelines.wsi_cohort import MANIFEST_COLUMNS, CohortSlide, extract_cohort, list_slides, shard_slides
from tests.wsi_helpers import COHORT_SEG, TinyEncoder, write_cohort

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"patch_size": 64, "input_size": 64, "num_workers": 0, "batch_size": 2, "segment_kwargs": COHORT_SEG}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"))


def run(slides, out, encoder=None, **kw):
    return extract_cohort(slides, encoder or TinyEncoder(), out, progress=False, **{**SETTINGS, **kw})


def read_manifest(path, drop=("seconds",)):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def tree(root):
    """Every file under ``root`` (relative path -> bytes), the manifest apart."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} | {
        "manifest.csv": b""
    }


# ------------------------------------------------------------------------------------ slide lists


def test_slides_from_files_folders_globs_and_csvs(cohort, tmp_path):
    folder = cohort[0].parent
    by_folder = list_slides([folder])
    assert [s.slide_id for s in by_folder] == ["corrupt", "s0", "s1", "s2", "s3", "s4"]
    assert all(s.size == s.path.stat().st_size and s.path.is_absolute() for s in by_folder)
    # a file named twice (a file, then a glob over it) counts once
    again = list_slides([cohort[1], str(folder / "s*.tif")])
    assert [s.slide_id for s in again] == ["s1", "s0", "s2", "s3", "s4"]
    table = tmp_path / "lists" / "cohort.csv"
    table.parent.mkdir()
    rel = os.path.relpath(cohort[2], table.parent)  # relative to the CSV's folder
    table.write_text(f"slide_path,slide_id,label\n{rel},case_a,tumor\n{cohort[3]},,0\n{tmp_path / 'gone.svs'},gone,1\n")
    rows = list_slides([table])
    assert [(s.slide_id, s.label, s.path) for s in rows] == [
        ("case_a", "tumor", cohort[2]),
        ("s3", "0", cohort[3]),
        ("gone", "1", tmp_path / "gone.svs"),  # listed, and recorded as failed when it is read
    ]
    trident = tmp_path / "trident.csv"
    trident.write_text(f"wsi\n{cohort[4]}\n")
    assert [s.slide_id for s in list_slides([trident])] == ["s4"]
    (tmp_path / "bad.csv").write_text("slide_id\ns0\n")
    (tmp_path / "other" / "s0.tif").parent.mkdir()
    (tmp_path / "other" / "s0.tif").write_bytes(b"x")
    for bad, error, match in (
        ([tmp_path / "bad.csv"], DatasetFormatError, "path column"),
        ([str(tmp_path / "nothing*.svs")], InvalidInputError, "matches no slide"),
        ([tmp_path / "missing.svs"], InvalidInputError, "no such file"),
        ([cohort[0], tmp_path / "other" / "s0.tif"], InvalidInputError, "slide id"),
        ([tmp_path / "other" / "nothing"], InvalidInputError, "no such"),
    ):
        with pytest.raises(error, match=match):
            list_slides(bad)


@pytest.mark.parametrize("bad_id", ["../escaped", "sub/dir", "a\\b", os.sep + "abs", ".", ".."])
def test_a_slide_id_that_is_not_a_file_name_is_refused(cohort, tmp_path, bad_id):
    """A CSV slide_id names the output file: a path would write outside --out or into a sub-folder of it."""
    table = tmp_path / "cohort.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_path", "slide_id"), (cohort[1], "fine"), (cohort[2], bad_id)])
    with pytest.raises(DatasetFormatError, match=re.escape(f"{table} line 3: slide_id ") + ".* is not a file name"):
        list_slides([table])
    for name in (bad_id, "", " "):  # an empty CSV cell means the file's name; a slide made here has no default
        with pytest.raises(DatasetFormatError, match="is not a file name"):
            CohortSlide(name, cohort[2])
    with pytest.raises(DatasetFormatError, match="line 3"):
        run([table], tmp_path / "out")
    assert not list(tmp_path.rglob("*.h5"))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 10**6), min_size=0, max_size=30), world=st.integers(1, 6))
def test_shares_are_disjoint_complete_largest_first_and_balanced(sizes, world):
    slides = [CohortSlide(f"s{i}", Path(f"/s{i}.svs"), size=n) for i, n in enumerate(sizes)]
    shares = shard_slides(slides, world)
    ids = [s.slide_id for share in shares for s in share]
    assert len(shares) == world and sorted(ids) == sorted(s.slide_id for s in slides) and len(set(ids)) == len(ids)
    for share in shares:
        assert [s.size for s in share] == sorted((s.size for s in share), reverse=True)
    loads = [sum(s.size for s in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes, default=0)  # greedy over sizes in decreasing order
    assert shard_slides(slides, world) == shares  # every rank computes the same shares


# -------------------------------------------------------------------------------- one process


def test_a_crash_loses_nothing_and_a_rerun_matches_an_uninterrupted_run(cohort, tmp_path):
    whole = run(cohort, tmp_path / "whole")
    assert [r.slide_id for r in whole.records] == ["s0", "s1", "s2", "s3", "s4", "corrupt"]
    failed = whole.failed
    assert [r.slide_id for r in failed] == ["corrupt"] and "corrupt.tif" in failed[0].error
    rows = read_manifest(tmp_path / "whole" / "manifest.csv", drop=())
    assert list(rows[0]) == list(MANIFEST_COLUMNS) and rows[-1]["status"] == "failed" and rows[-1]["patches"] == ""
    assert all(r["status"] == "done" and int(r["patches"]) > 0 and float(r["seconds"]) >= 0 for r in rows[:-1])
    assert len({r["fingerprint"] for r in rows}) == 1 and rows[0]["encoder"] == "TinyEncoder"
    assert "5 of 6 slides" in whole.summary() and "corrupt" in whole.summary()
    bags = read_feature_bags(tmp_path / "whole")  # the folder as training and evaluation read it
    assert bags.layout == "attnzoo" and sorted(bags) == ["s0", "s1", "s2", "s3", "s4"]

    out = tmp_path / "crashed"
    patches = {r.slide_id: r.patches for r in whole.records}
    order = [s.slide_id for s in sorted(list_slides(cohort), key=lambda s: -s.size)]  # the work order
    batches = [-(-patches[s] // SETTINGS["batch_size"]) for s in order[:2]]
    with pytest.raises(KeyboardInterrupt):  # a crash after the first batch of the third slide
        run(cohort, out, TinyEncoder(fail_after=sum(batches) + 1))
    partial = list((out / ".attnzoo-extract").glob("rank-*.csv"))
    assert len(partial) == 1 and len(read_manifest(partial[0])) >= 2 and not (out / "manifest.csv").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert len(finished) >= 2 and list(out.glob("*.h5.partial/rows_*.npy"))
    encoder = TinyEncoder()
    again = run(cohort, out, encoder)
    assert tree(out) == tree(tmp_path / "whole")  # bit for bit, the partial shards and manifests gone
    assert read_manifest(out / "manifest.csv") == read_manifest(tmp_path / "whole" / "manifest.csv")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5") if p.name in finished} == finished
    assert sum(r.reused for r in again.records) == len(finished)
    assert encoder.rows < sum(r.patches for r in again.records if r.ok and not r.reused)  # the half slide resumed
    seconds = {r["slide_id"]: r["seconds"] for r in read_manifest(out / "manifest.csv", drop=())}
    assert all(seconds[s[:-3]] for s in finished)  # the times of slides done before the crash are kept


def test_a_rerun_reads_no_slide_and_strict_stops(cohort, tmp_path, monkeypatch):
    first = run(cohort, tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("a finished slide was opened")

    monkeypatch.setattr(wsi_features, "open_slide", never)
    again = run(cohort[:-1], tmp_path)
    assert all(r.ok and r.reused for r in again.records) and again.records == first.records[:-1]
    monkeypatch.undo()
    with pytest.raises(DatasetFormatError, match="corrupt.tif"):
        run(cohort, tmp_path / "strict", strict=True)
    rows = read_manifest(next((tmp_path / "strict" / ".attnzoo-extract").glob("*.csv")))
    assert rows[-1]["slide_id"] == "corrupt" and rows[-1]["status"] == "failed"  # recorded before stopping


def test_other_settings_fail_per_slide_unless_overwrite(cohort, tmp_path):
    run(cohort[:2], tmp_path)
    other = run(cohort[:2], tmp_path, patch_size=96)
    assert all(not r.ok and "other settings" in r.error for r in other.records)
    remade = run(cohort[:2], tmp_path, patch_size=96, overwrite="stale")
    assert all(r.ok and not r.reused for r in remade.records)
    with h5py.File(tmp_path / "s0.h5") as f:
        assert f.attrs["patch_size"] == 96
    with pytest.raises(InvalidInputError, match="layout"):
        run(cohort, tmp_path, layout="trident")
    for bad, match in (  # checked once, before any slide (not a failure recorded for every slide)
        ({"read_level": "level0"}, "read_level"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "nonsense"}, "device"),
        ({"patch_sise": 64}, "patch_sise"),
        ({"slide_id": "x"}, "slide list"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            run(cohort, tmp_path / "never", **bad)
    assert not (tmp_path / "never").exists()


def test_a_refused_clam_slide_keeps_its_h5_and_the_users_pt(cohort, tmp_path):
    """A slide whose h5 was made with other settings fails without --overwrite: the .pt beside it stays."""
    h5, pt = tmp_path / "h5_files" / "s0.h5", tmp_path / "pt_files" / "s0.pt"
    run(cohort[:1], tmp_path, layout="clam", patch_size=96)
    pt.write_bytes(b"the user's own features")
    before = h5.read_bytes()
    (refused,) = run(cohort[:1], tmp_path, layout="clam").records
    assert not refused.ok and "other settings" in refused.error
    assert pt.read_bytes() == b"the user's own features" and h5.read_bytes() == before
    (remade,) = run(cohort[:1], tmp_path, layout="clam", overwrite="stale").records  # remade: the .pt follows
    with h5py.File(h5) as f:
        assert remade.ok and torch.equal(torch.load(pt, weights_only=True), torch.from_numpy(f["features"][()]))


def test_a_pt_older_than_its_h5_is_made_again(cohort, tmp_path):
    """A run killed after remaking a slide's h5 and before removing its old .pt: the next run does not take
    that .pt as done, it derives it again from the h5 (no extraction)."""
    import os

    h5, pt = tmp_path / "h5_files" / "s0.h5", tmp_path / "pt_files" / "s0.pt"
    run(cohort[:1], tmp_path, layout="clam")
    pt.write_bytes(b"stale")
    stamp = h5.stat().st_mtime_ns - 10**9
    os.utime(pt, ns=(stamp, stamp))
    (again,) = run(cohort[:1], tmp_path, layout="clam").records
    with h5py.File(h5) as f:
        assert again.ok and torch.equal(torch.load(pt, weights_only=True), torch.from_numpy(f["features"][()]))


def test_an_input_file_is_never_written_over(cohort, tmp_path):
    """The slide list as <out>/labels.csv or <out>/manifest.csv (or a slide as a feature file): refused
    before any work, the input as it was."""
    table = tmp_path / "labels.csv"
    text = f"slide_path,slide_id,label\n{cohort[0]},A,tumor\n{cohort[1]},B,normal\n"
    table.write_text(text)
    with pytest.raises(InvalidOptionError, match=re.escape(f"replace the slide list {table}") + ".*labels.csv.*--out"):
        run([table], tmp_path)
    args = ["extract", "wsi-features", str(table), "--encoder", "test_resnet", "-w", "none", "--out", str(tmp_path)]
    assert main(args) == 2
    listing = tmp_path / "manifest.csv"
    listing.write_text(f"slide_path\n{cohort[0]}\n")
    with pytest.raises(InvalidOptionError, match="manifest.csv"):
        run([listing], tmp_path)
    assert table.read_text() == text and listing.read_text() == f"slide_path\n{cohort[0]}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "manifest.csv"]
    slide = tmp_path / "slides" / "s0.h5"  # a slide file named like its own feature file
    slide.parent.mkdir()
    slide.write_bytes(cohort[0].read_bytes())
    with pytest.raises(InvalidOptionError, match="the slide .*s0.h5"):
        run([slide], slide.parent, overwrite=True)
    assert slide.read_bytes() == cohort[0].read_bytes()
    run([table], tmp_path / "elsewhere", manifest=False)  # no manifest, no labels.csv: nothing in the way
    assert (tmp_path / "elsewhere" / "A.h5").is_file()


def test_progress_bars_on_a_terminal_and_a_line_per_slide_in_a_log(cohort, tmp_path, capsys):
    extract_cohort(cohort[:2], TinyEncoder(), tmp_path / "bars", progress=True, **SETTINGS)
    err = capsys.readouterr().err
    assert "slides: 2/2" in err and "patches/s" in err and "left" in err and "s0:" in err  # the slide's own bar
    lines = []
    result = run([cohort[1], cohort[-1]], tmp_path / "log", log=lines.append)
    assert capsys.readouterr().err == ""
    assert lines[0].startswith("1/2 s1: ") and "patches in" in lines[0] and "patches/s" in lines[0]
    assert lines[1].startswith("2/2 corrupt: failed: ") and len(lines) == 2
    assert result.summary().splitlines()[0].startswith("1 of 2 slides have features (1 extracted now, 0 found")


@pytest.mark.filterwarnings("ignore:AUC is undefined")  # the one validation slide has one class
def test_clam_layout_with_labels_feeds_training_and_evaluation(cohort, tmp_path):
    """CLAM's h5_files/ + pt_files/ from a CSV with slide ids and labels; `attnzoo eval` and
    `attnzoo train wsi-classification` read the folder (512-d features, the models' default width)."""
    table = tmp_path / "cohort.csv"
    table.write_text(
        "slide_path,slide_id,label\n"
        + "".join(f"{p},case_{i},{i % 2}\n" for i, p in enumerate(cohort[:4]))
        + f"{cohort[-1]},broken,1\n"
    )
    out = tmp_path / "feats"
    args = ["extract", "wsi-features", str(table), "--encoder", "resnet18", "-w", "none", "--out", str(out)]
    args += ["--layout", "clam", "--patch-size", "64", "--input-size", "32", "--num-workers", "0"]
    args += ["--segment", "a_t=0.1", "--segment", "a_h=0.1"]
    assert main(args) == 0
    assert sorted(p.name for p in (out / "pt_files").iterdir()) == [f"case_{i}.pt" for i in range(4)]
    with h5py.File(out / "h5_files" / "case_1.h5") as f:
        assert f.attrs["slide_id"] == "case_1" and f["features"].shape[1] == 512
        assert torch.equal(
            torch.load(out / "pt_files" / "case_1.pt", weights_only=True), torch.from_numpy(f["features"][()])
        )
    assert (out / "labels.csv").read_text().splitlines()[1:3] == ["case_0,0", "case_1,1"]
    bags = read_feature_bags(out)
    assert bags.layout == "clam" and sorted(bags) == [f"case_{i}" for i in range(4)]
    assert read_manifest(out / "manifest.csv")[-1]["status"] == "failed"
    assert (
        main(
            ["eval", "wsi-classification", "--model", "abmil", "-w", "none", "--data", str(out)]
            + ["--split", "all", "--out", str(tmp_path / "eval"), "--num-workers", "0"]
        )
        == 0
    )
    assert (tmp_path / "eval" / "metrics.json").exists()
    train = ["train", "wsi-classification", "--model", "abmil", "--data", str(out), "--out", str(tmp_path / "run")]
    assert main([*train, "epochs=1", "seeds=[1]", f"labels={out / 'labels.csv'}", "val_fraction=0.25"]) == 0


def test_cli_refuses_bad_options_before_any_work(cohort, tmp_path):
    base = ["extract", "wsi-features", str(cohort[0]), "--encoder", "test_resnet", "-w", "none", "--out"]
    assert main([*base, str(tmp_path / "a"), "--segment", "a_t"]) == 2
    assert main([*base, str(tmp_path / "b"), "--layout", "tiles"]) == 1
    assert main([*base, str(tmp_path / "c"), "--segment", "nope=1"]) == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "options, said",
    [
        (["--input-size", "100000"], "at most 16x patch_size 256"),
        (["--patch-size", "1"], "at most 16x patch_size 1:"),
        (["--stride", "1"], "stride must be an integer in [16, "),
        (["--batch-size", "100000000"], "use batch_size 14266 or less (--batch-size)"),
        (["--patch-size", "100000"], "read in one piece of at most 16384x16384"),
    ],
)
def test_cli_refuses_sizes_that_cannot_be_meant(cohort, tmp_path, capsys, options, said):
    """These ran out of memory or for hours (--input-size 100000, --patch-size 1 on a real slide); now a usage
    error (exit 2) before any slide is read, saying why and what CLAM and ACMIL use."""
    base = ["extract", "wsi-features", str(cohort[0]), "--encoder", "test_resnet", "-w", "none", "--out"]
    assert main([*base, str(tmp_path / "out"), *options]) == 2
    err = capsys.readouterr().err
    assert said in err and ("usual: 256 px patches at 20x" in err or "usual: batch_size 64" in err)
    assert not any(tmp_path.iterdir())


def test_an_out_folder_under_a_file_is_refused_before_any_work(cohort, tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    args = ["extract", "wsi-features", str(cohort[0]), "--encoder", "test_resnet", "-w", "none"]
    assert main([*args, "--out", str(tmp_path / "taken" / "feats")]) == 2  # was NotADirectoryError, exit 3
    assert f"--out {tmp_path / 'taken' / 'feats'} cannot be created: {tmp_path / 'taken'} is a file" in (
        capsys.readouterr().err
    )
    with pytest.raises(InvalidInputError, match="the output folder .* cannot be created: .* is a file"):
        run([cohort[0]], tmp_path / "taken" / "a" / "b")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and (tmp_path / "taken").read_text() == "mine"


def test_the_python_api_checks_the_same_bounds_once_before_any_slide(cohort, tmp_path):
    for setting in ({"input_size": 100_000}, {"stride": 1}, {"batch_size": 10**8}):
        with pytest.raises(InvalidOptionError):
            run(cohort, tmp_path / "out", **setting)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ torchrun


@pytest.mark.slow
def test_two_torchrun_processes_killed_and_rerun_equal_one_process(cohort, tmp_path):
    """Two gloo processes share the slides; SIGKILL once a slide is done, rerun the same command:
    every file equals one uninterrupted process's, bit for bit, and so does the manifest (times apart)."""
    args = ["extract", "wsi-features", str(cohort[0].parent), "--encoder", "test_resnet", "-w", "none"]
    args += ["--patch-size", "64", "--input-size", "64", "--batch-size", "2", "--num-workers", "0"]
    args += ["--segment", "a_t=0.1", "--segment", "a_h=0.1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1): the same float sums
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "attnzoo.cli", *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=fh, stderr=fh, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not list((out / ".attnzoo-extract").glob("rank-*.csv")):  # a rank finished its first slide
                assert child.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.01)
            os.killpg(child.pid, signal.SIGKILL)  # torchrun and both ranks, at once
        finally:
            child.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert not (out / "manifest.csv").exists() and 1 <= len(finished) < 5
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(out) == tree(tmp_path / "one")
    assert read_manifest(out / "manifest.csv") == read_manifest(tmp_path / "one" / "manifest.csv")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5") if p.name in finished} == finished
    rows = read_manifest(out / "manifest.csv")
    assert [r["slide_id"] for r in rows if r["status"] == "failed"] == ["corrupt"]
    assert proc.stdout.count("5 of 6 slides have features") == 1  # one summary, from rank 0
