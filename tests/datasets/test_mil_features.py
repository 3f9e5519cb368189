"""Readers of published MIL feature layouts (ACMIL, CLAM, TRIDENT, attnzoo) and of the split files,
each tested on tiny files written here in the exact on-disk format."""

import json
import pickle

import h5py
import numpy as np
import pytest
import torch

from attnzoo.datasets.mil_features import (
    BRACS_LABEL_MAPS,
    FeatureBag,
    FeatureBags,
    read_acmil_h5,
    read_bracs_csv,
    read_camelyon16_labels,
    read_camelyon16_split,
    read_clam_features,
    read_feature_bags,
    read_trident_features,
)
from attnzoo.errors import DatasetFormatError, InvalidInputError
from tests.datasets.special_files import fifo, needs_fifo

RNG = np.random.default_rng(0)
SLIDES = {"normal_001": (5, 0), "tumor_001": (7, 1), "test_001": (3, 1)}  # slide -> (patches, label)


def feats(n, d=16):
    return RNG.standard_normal((n, d)).astype(np.float32)


def coords(n):
    return (np.arange(n * 2).reshape(n, 2) * 512).astype(np.int64)


def write_acmil(path, slides=SLIDES, d=16):
    """ACMIL Step2's file: one group per slide id, float16 'feat', 'coords', attrs['label']."""
    data = {}
    with h5py.File(path, "w") as f:
        for sid, (n, label) in slides.items():
            g = f.create_group(sid)
            data[sid] = feats(n, d).astype(np.float16)
            g.create_dataset("feat", data=data[sid])
            g.create_dataset("coords", data=coords(n))
            g.attrs["label"] = label
    return data


def write_bag_h5(path, features, xy=None, **attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        if xy is not None:
            f.create_dataset("coords", data=xy)
        for k, v in attrs.items():
            f.attrs[k] = v


# --------------------------------------------------------------------------------------------- ACMIL


def test_acmil_h5(tmp_path):
    path = tmp_path / "patch_feats_pretrain_natural_supervised.h5"
    data = write_acmil(path)
    bags = read_acmil_h5(path)
    assert bags.layout == "acmil" and sorted(bags) == sorted(SLIDES) and len(bags) == 3
    bag = bags["tumor_001"]
    assert (
        isinstance(bag, FeatureBag)
        and bag.slide_id == "tumor_001"
        and bag.label == 1
        and len(bag) == 7
        and bag.dim == 16
    )
    assert bag.features.dtype == torch.float32 and torch.equal(
        bag.features, torch.from_numpy(data["tumor_001"].astype(np.float32))
    )
    assert bag.coords.dtype == torch.int64 and torch.equal(bag.coords, torch.from_numpy(coords(7)))
    assert read_acmil_h5(path, labels={"tumor_001": 0})["tumor_001"].label == 0
    auto = read_feature_bags(path)
    assert auto.layout == "acmil" and torch.equal(auto["normal_001"].features, bags["normal_001"].features)
    assert read_feature_bags(tmp_path).layout == "acmil"  # a folder holding the one ACMIL file
    loaded = pickle.loads(pickle.dumps(bags)).preload()
    assert torch.equal(loaded["test_001"].features, bags["test_001"].features)


def test_bracs_through_acmil_labels(tmp_path):
    """ACMIL's BRACS file stores the raw 7-class label; the CSV's mapping makes it 3-class."""
    path = tmp_path / "bracs.h5"
    write_acmil(path, {"BRACS_1": (2, 6), "BRACS_2": (2, 3), "BRACS_3": (2, 1)})
    csv = tmp_path / "bracs.csv"
    csv.write_text(
        ",case_id,slide_id,split_info,full_path,label\n"
        "0,patient_0,BRACS_1,train,/x/BRACS_1.svs,6\n"
        "1,patient_1,BRACS_2,val,/x/BRACS_2.svs,3\n"
        "2,patient_2,BRACS_3,test,/x/BRACS_3.svs,1\n"
    )
    parts = read_feature_bags(path).split(read_bracs_csv(csv, n_classes=3))
    assert [list(parts[s]) for s in ("train", "val", "test")] == [["BRACS_1"], ["BRACS_2"], ["BRACS_3"]]
    assert (parts["train"]["BRACS_1"].label, parts["val"]["BRACS_2"].label, parts["test"]["BRACS_3"].label) == (2, 1, 0)
    assert read_feature_bags(path)["BRACS_1"].label == 6
    from attnzoo.datasets.mil_features import read_split_file

    by_kind = read_split_file(csv)  # dispatched on the file's kind: the same split and labels
    assert (by_kind.train, by_kind.val, by_kind.test, by_kind.labels) == (
        ["BRACS_1"],
        ["BRACS_2"],
        ["BRACS_3"],
        {"BRACS_1": 2, "BRACS_2": 1, "BRACS_3": 0},
    )


# ---------------------------------------------------------------------------------------- CLAM + TRIDENT


def test_clam_h5_and_pt(tmp_path):
    (tmp_path / "h5_files").mkdir()
    (tmp_path / "pt_files").mkdir()
    a, b = feats(4, 1024), feats(6, 1024)
    write_bag_h5(tmp_path / "h5_files" / "slide_a.h5", a, coords(4))
    torch.save(torch.from_numpy(a), tmp_path / "pt_files" / "slide_a.pt")
    torch.save(torch.from_numpy(b), tmp_path / "pt_files" / "slide_b.pt")  # only as .pt: no coords
    bags = read_clam_features(tmp_path, labels={"slide_a": 1})
    assert bags.layout == "clam" and list(bags) == ["slide_a", "slide_b"]
    assert bags["slide_a"].label == 1 and bags["slide_b"].label is None
    assert torch.equal(bags["slide_a"].coords, torch.from_numpy(coords(4)))
    assert bags["slide_b"].coords is None and torch.equal(bags["slide_b"].features, torch.from_numpy(b))
    assert list(read_feature_bags(tmp_path)) == ["slide_a", "slide_b"]
    assert list(read_clam_features(tmp_path / "pt_files")) == ["slide_a", "slide_b"]
    assert read_feature_bags(tmp_path / "pt_files" / "slide_b.pt")["slide_b"].dim == 1024


def test_clam_pt_needing_code_execution_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"features": Evil()}, fh, protocol=2)
    with pytest.raises(DatasetFormatError, match="evil.pt.*code execution"):
        read_feature_bags(tmp_path / "evil.pt")["evil"]


def test_trident_layout(tmp_path):
    job = tmp_path / "job" / "20x_256px_0px_overlap"
    for encoder in ("uni_v1", "conch_v15"):
        (job / f"features_{encoder}").mkdir(parents=True)
        write_bag_h5(
            job / f"features_{encoder}" / "TCGA-1.h5", feats(3, 1024 if encoder == "uni_v1" else 768), coords(3)
        )
    with pytest.raises(DatasetFormatError, match="encoder="):
        read_trident_features(tmp_path / "job")
    bags = read_trident_features(tmp_path / "job", encoder="uni_v1")
    assert bags.layout == "trident" and bags["TCGA-1"].dim == 1024
    assert read_feature_bags(job, encoder="conch_v15")["TCGA-1"].dim == 768
    assert read_feature_bags(job / "features_conch_v15").layout == "trident"
    with pytest.raises(DatasetFormatError, match="uni_v1, conch_v15|conch_v15, uni_v1"):
        read_trident_features(job, encoder="virchow")


# ------------------------------------------------------------------------------------------- errors


def test_empty_and_nan_bags_name_file_and_slide(tmp_path):
    write_bag_h5(tmp_path / "empty.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64))
    with pytest.raises(DatasetFormatError, match="empty.h5.*empty bag"):
        read_feature_bags(tmp_path / "empty.h5")["empty"]
    bad = feats(4, 8)
    bad[2, 3] = np.nan
    write_bag_h5(tmp_path / "nan.h5", bad, coords(4))
    with pytest.raises(DatasetFormatError, match="nan.h5.*NaN"):
        read_feature_bags(tmp_path / "nan.h5")["nan"]
    write_bag_h5(tmp_path / "mismatch.h5", feats(4, 8), coords(3))
    with pytest.raises(DatasetFormatError, match="mismatch.h5.*coords"):
        read_feature_bags(tmp_path / "mismatch.h5")["mismatch"]
    with h5py.File(tmp_path / "acmil.h5", "w") as f:
        f.create_group("slide_x").create_dataset("feat", data=np.full((2, 4), np.nan, np.float16))
    with pytest.raises(DatasetFormatError, match=r"acmil.h5 \[slide_x\].*NaN"):
        read_acmil_h5(tmp_path / "acmil.h5").preload()


def test_unknown_layouts(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(DatasetFormatError, match="unknown feature layout"):
        read_feature_bags(tmp_path / "notes")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((2, 2)))
    with pytest.raises(DatasetFormatError, match="other.h5.*images"):
        read_feature_bags(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DatasetFormatError, match="junk.h5"):
        read_feature_bags(tmp_path / "junk.h5")
    with pytest.raises(DatasetFormatError, match="missing.h5"):
        read_feature_bags(tmp_path / "missing.h5")
    with pytest.raises(DatasetFormatError, match="h5_files"):
        read_clam_features(tmp_path / "notes")


# ------------------------------------------------------------------------------------------- splits


def test_camelyon16_split_and_labels(tmp_path):
    split = tmp_path / "split_4.json"
    split.write_text(
        json.dumps({"train_names": ["normal_001", "tumor_001"], "val_names": [], "test_names": ["test_001"]})
    )
    csv = tmp_path / "camelyon16.csv"
    csv.write_text(
        "case_id,slide_id,label\npatient_0,normal_001,0\npatient_1,tumor_001,1\npatient_2,test_001,1\n"
        "patient_3,normal_086,0\n"
    )
    assert read_camelyon16_labels(csv) == {"normal_001": 0, "tumor_001": 1, "test_001": 1, "normal_086": 0}
    s = read_camelyon16_split(split, csv)
    assert (s.train, s.val, s.test) == (["normal_001", "tumor_001"], [], ["test_001"]) and s["test"] == ["test_001"]
    assert s.labels == {"normal_001": 0, "tumor_001": 1, "test_001": 1}
    assert read_camelyon16_split(split).labels == {}
    words = tmp_path / "clam.csv"
    words.write_text("case_id,slide_id,label\nc0,normal_001,normal_tissue\nc1,tumor_001,tumor_tissue\n")
    assert read_camelyon16_labels(words) == {"normal_001": 0, "tumor_001": 1}

    write_acmil(tmp_path / "feats.h5", {"normal_001": (2, 0), "tumor_001": (2, 1)})
    bags = read_acmil_h5(tmp_path / "feats.h5")
    with pytest.raises(DatasetFormatError, match="test_001"):
        bags.split(s)
    with pytest.warns(UserWarning, match="test_001"):
        parts = bags.split(s, strict=False)
    assert list(parts["train"]) == ["normal_001", "tumor_001"] and len(parts["test"]) == 0


def test_split_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_names": ["a"], "val_names": ["b"]}))
    with pytest.raises(DatasetFormatError, match="test_names"):
        read_camelyon16_split(bad)
    bad.write_text(json.dumps({"train_names": ["a"], "val_names": ["a"], "test_names": []}))
    with pytest.raises(DatasetFormatError, match="both train and val"):
        read_camelyon16_split(bad)
    bad.write_text("{not json")
    with pytest.raises(DatasetFormatError, match="bad.json"):
        read_camelyon16_split(bad)
    good = tmp_path / "split.json"
    good.write_text(json.dumps({"train_names": ["a"], "val_names": [], "test_names": ["b"]}))
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id,label\np,a,0\n")
    with pytest.raises(DatasetFormatError, match="no label.*b"):
        read_camelyon16_split(good, labels)
    labels.write_text("case_id,slide_id,label\np,a,2\n")
    with pytest.raises(DatasetFormatError, match="line 2"):
        read_camelyon16_labels(labels)
    labels.write_text("case_id,slide\np,a\n")
    with pytest.raises(DatasetFormatError, match="missing column"):
        read_camelyon16_labels(labels)


def test_bracs_csv_mappings(tmp_path):
    csv = tmp_path / "bracs.csv"
    rows = [",case_id,slide_id,split_info,full_path,label"]
    for raw in range(7):
        split = ("train", "val", "test")[raw % 3]
        rows.append(f"{raw},patient_{raw},BRACS_{raw},{split},/mnt/bracs/BRACS_{raw}.svs,{raw}")
    csv.write_text("\n".join(rows) + "\n")
    three = read_bracs_csv(csv)
    assert [three.labels[f"BRACS_{r}"] for r in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert (
        three.train == ["BRACS_0", "BRACS_3", "BRACS_6"]
        and three.val == ["BRACS_1", "BRACS_4"]
        and three.test == ["BRACS_2", "BRACS_5"]
    )
    assert [read_bracs_csv(csv, n_classes=2).labels[f"BRACS_{r}"] for r in range(7)] == [0, 0, 0, 1, 1, 1, 1]
    assert [read_bracs_csv(csv, n_classes=7).labels[f"BRACS_{r}"] for r in range(7)] == list(range(7))
    assert BRACS_LABEL_MAPS[3] == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}
    with pytest.raises(InvalidInputError, match="n_classes"):
        read_bracs_csv(csv, n_classes=4)
    csv.write_text(",case_id,slide_id,split_info,full_path,label\n0,p,BRACS_9,holdout,/x.svs,1\n")
    with pytest.raises(DatasetFormatError, match="holdout"):
        read_bracs_csv(csv)
    csv.write_text(",case_id,slide_id,split_info,full_path,label\n0,p,BRACS_9,train,/x.svs,9\n")
    with pytest.raises(DatasetFormatError, match="0..6"):
        read_bracs_csv(csv)


def test_feature_bags_in_a_dataloader(tmp_path):
    path = tmp_path / "f.h5"
    write_acmil(path)
    bags = read_acmil_h5(path)

    class Bags(torch.utils.data.Dataset):
        def __init__(self, bags):
            self.bags, self.ids = bags, list(bags)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            bag = self.bags[self.ids[i]]
            return bag.features, bag.label

    loader = torch.utils.data.DataLoader(Bags(bags), batch_size=None, num_workers=1)
    assert [int(x.shape[0]) for x, _ in loader] == [SLIDES[s][0] for s in bags]
    assert isinstance(bags, FeatureBags)


def test_read_slide_labels(tmp_path):
    from attnzoo.datasets.mil_features import read_slide_labels

    path = tmp_path / "labels.csv"
    path.write_text("case_id,slide_id,label\nc1,a,2\nc2,b,tumor\nc3,c,0\nc3,c,0\n")
    assert read_slide_labels(path) == {"a": 2, "b": 1, "c": 0}
    with pytest.raises(DatasetFormatError, match="line 2: label must be 0 \\(normal\\) or 1"):
        read_slide_labels(path, n_classes=2)
    path.write_text("slide_id,label\na,1\na,0\n")
    with pytest.raises(DatasetFormatError, match="line 3: slide a listed twice"):
        read_slide_labels(path)


# ------------------------------------------------------------------------------ sizes claimed, not stored


def _spy_reads(monkeypatch):
    """Record every read of a whole HDF5 dataset (``dset[()]``): a refusal must come before any."""
    reads = []
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        reads.append(self.name)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    return reads


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "gzip"])
def test_h5_declaring_far_more_than_it_stores_is_refused_before_reading(tmp_path, monkeypatch, layout):
    """A file of a few KB declaring (20000, 1024) float32 (82 MB) with nothing written: HDF5 would fill all of it
    in memory (a hunt's 1.4 KB file declaring 2 GB ended in a raw MemoryError); refused from the declared and
    stored sizes, before any read."""
    options = {
        "contiguous": {},
        "chunked": {"chunks": (1024, 1024)},
        "gzip": {"chunks": (1024, 1024), "compression": "gzip"},
    }
    path = tmp_path / "claims.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", shape=(20000, 1024), dtype=np.float32, **options[layout])
        f.create_dataset("coords", data=coords(3))
    assert path.stat().st_size < 100_000
    reads = _spy_reads(monkeypatch)
    bags = read_feature_bags(path)
    with pytest.raises(DatasetFormatError, match=r"claims\.h5: dataset '/features' declares shape \(20000, 1024\)"):
        bags["claims"]
    assert "/features" not in reads
    # ACMIL's groups alike, named with the slide
    acmil = tmp_path / "acmil.h5"
    with h5py.File(acmil, "w") as f:
        f.create_dataset("slide_1/feat", shape=(40000, 1024), dtype=np.float16, **options[layout])
    with pytest.raises(DatasetFormatError, match=r"acmil\.h5 \[slide_1\]: dataset '/slide_1/feat' declares"):
        read_acmil_h5(acmil)["slide_1"]
    assert "/slide_1/feat" not in reads


def test_written_h5_bags_load_whatever_their_storage(tmp_path, monkeypatch):
    """Files as h5py, CLAM (resizable chunks, appended) and TRIDENT-style tools write them, compressed or not,
    load as written, however small the size read without a check (so every check applies here)."""
    import attnzoo.datasets.mil_features as mil

    monkeypatch.setattr(mil, "_FREE_READ_BYTES", 0)
    a = feats(300, 64)
    layouts = {
        "plain": {},
        "chunked": {"chunks": True},
        "gzip": {"chunks": True, "compression": "gzip", "compression_opts": 9},
        "lzf_shuffle": {"chunks": True, "compression": "lzf", "shuffle": True},
    }
    for name, options in layouts.items():
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.create_dataset("features", data=a, **options)
            f.create_dataset("coords", data=coords(300), **options)
            assert f["features"].compression == options.get("compression")
        bag = read_feature_bags(tmp_path / f"{name}.h5")[name]
        assert torch.equal(bag.features, torch.from_numpy(a)) and torch.equal(bag.coords, torch.from_numpy(coords(300)))
    with h5py.File(tmp_path / "appended.h5", "w") as f:  # CLAM's save_hdf5: maxshape (None, D), grown per batch
        dset = f.create_dataset("features", shape=(100, 64), maxshape=(None, 64), chunks=(100, 64), dtype=np.float32)
        dset[:] = a[:100]
        for start in (100, 200):
            dset.resize(start + 100, axis=0)
            dset[start:] = a[start : start + 100]
    assert torch.equal(read_feature_bags(tmp_path / "appended.h5")["appended"].features, torch.from_numpy(a))
    write_acmil(tmp_path / "acmil.h5")
    assert len(read_acmil_h5(tmp_path / "acmil.h5").preload()) == len(SLIDES)


def test_running_out_of_memory_on_a_bag_is_a_typed_error(tmp_path, monkeypatch):
    """A bag that fits on disk but not in memory once converted or checked (the NaN check's mask): a typed error
    naming the file and the slide, never a raw MemoryError."""
    write_bag_h5(tmp_path / "big.h5", feats(4), coords(4))

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(np, "isfinite", out_of_memory)
    with pytest.raises(DatasetFormatError, match=r"big\.h5: the bag of slide big needs more memory than there is"):
        read_feature_bags(tmp_path / "big.h5")["big"]


def _rezipped(source, target, compress_type):
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename), compress_type=compress_type)


def test_pt_with_compressed_entries_is_refused_before_loading(tmp_path, monkeypatch):
    """torch.save stores its zip entries as they are; a .pt with deflated entries (a hunt's 400 KB file loaded a
    410 MB tensor) is refused before torch.load inflates anything."""
    import zipfile

    torch.save({"features": torch.zeros(64, 16)}, tmp_path / "plain.pt")
    _rezipped(tmp_path / "plain.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {"features": torch.ones(2, 2)})
    with pytest.raises(
        DatasetFormatError, match=r"deflated\.pt: not a torch\.save file: its zip entries are compressed"
    ):
        read_feature_bags(tmp_path / "deflated.pt")["deflated"]
    assert not loads


def test_pt_whose_entries_claim_more_than_the_file_is_refused(tmp_path):
    import struct

    torch.save(torch.from_numpy(feats(4)), tmp_path / "slide.pt")
    data = bytearray((tmp_path / "slide.pt").read_bytes())
    central = data.index(b"PK\x01\x02")  # the first entry's central-directory record: uncompressed size at +24
    data[central + 24 : central + 28] = struct.pack("<I", 2**32 - 1)
    (tmp_path / "lying.pt").write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError, match=r"lying\.pt: its zip entries claim [\d,]+ bytes in a file of"):
        read_feature_bags(tmp_path / "lying.pt")["lying"]


def test_pt_files_torch_save_writes_still_load(tmp_path):
    """Either of torch.save's formats (zip, the legacy pickle), and a stored zip re-written by hand."""
    import zipfile

    a = feats(5, 8)
    torch.save({"features": torch.from_numpy(a), "coords": torch.from_numpy(coords(5))}, tmp_path / "zip.pt")
    torch.save(torch.from_numpy(a), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _rezipped(tmp_path / "zip.pt", tmp_path / "stored.pt", zipfile.ZIP_STORED)
    for name in ("zip", "legacy", "stored"):
        assert torch.equal(read_feature_bags(tmp_path / f"{name}.pt")[name].features, torch.from_numpy(a))


@needs_fifo
def test_a_fifo_named_as_a_pt_bag_is_refused_not_opened(tmp_path):
    """A FIFO with no writer would make the archive check wait forever (the .h5 listing skips what is not a
    file; the .pt listing did not): refused from a stat, typed, naming it."""
    torch.save(torch.from_numpy(feats(4)), tmp_path / "good.pt")
    fifo(tmp_path / "slide.pt")
    bags = read_clam_features(tmp_path)
    assert bags["good"].features.shape[0] == 4
    with pytest.raises(DatasetFormatError, match=r"slide\.pt: is a FIFO \(named pipe\), not a regular file"):
        bags["slide"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_pt_bags_in_dtypes_numpy_lacks_load_as_their_float32_values(tmp_path, dtype):
    """A bfloat16 (or float8) .pt bag raised a bare ``TypeError: Got unsupported ScalarType BFloat16`` (an internal
    error in ``attnzoo run``, which lost the other inputs' results too); its values are float32 ones, read as such."""
    a = torch.from_numpy(feats(5, 8)).to(dtype)
    torch.save(a, tmp_path / "plain.pt")
    grid = torch.arange(10).reshape(5, 2) * 32
    xy = grid.float().to(dtype)  # multiples of 32 up to 288: exact in bfloat16 and float8 alike
    torch.save({"features": a, "coords": xy, "label": torch.tensor(1.0).to(dtype)}, tmp_path / "dict.pt")
    plain = read_feature_bags(tmp_path / "plain.pt")["plain"]
    assert plain.features.dtype == torch.float32 and torch.equal(plain.features, a.float())
    bag = read_feature_bags(tmp_path / "dict.pt")["dict"]
    assert torch.equal(bag.features, a.float()) and bag.label == 1
    assert torch.equal(bag.coords, grid)


def test_a_meta_tensor_bag_is_refused_naming_the_file(tmp_path):
    torch.save(torch.empty(5, 8, device="meta"), tmp_path / "slide.pt")
    torch.save(
        {"features": torch.from_numpy(feats(3, 8)), "coords": torch.empty(3, 2, device="meta")}, tmp_path / "c.pt"
    )
    with pytest.raises(DatasetFormatError, match=r"slide\.pt.*: features is a meta tensor: it holds no data"):
        read_feature_bags(tmp_path / "slide.pt")["slide"]
    with pytest.raises(DatasetFormatError, match=r"c\.pt.*: coords is a meta tensor"):
        read_feature_bags(tmp_path / "c.pt")["c"]
