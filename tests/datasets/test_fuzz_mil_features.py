"""Fuzz the MIL feature readers and split files: any dtype, shape or value in a feature file, damaged
HDF5/.pt/CSV/JSON files -- a bag of finite float32 features (int64 coords, an integer label), or a
typed error naming the file."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from attnzoo.datasets.mil_features import (
    FeatureBags,
    read_bracs_csv,
    read_camelyon16_labels,
    read_camelyon16_split,
    read_feature_bags,
)
from attnzoo.errors import DatasetFormatError, InvalidInputError
from tests.datasets.fuzzing import FUZZ, damaged, deeply_nested, mutated_json, odd_numbers, read_or_refuse, scratch

ODD_DTYPES = st.sampled_from(
    [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, "S4"]
)
odd_arrays = hnp.arrays(ODD_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))


def check_bag(bag) -> None:
    assert bag.features.dtype == torch.float32 and bag.features.ndim == 2 and min(bag.features.shape) >= 1
    assert bool(bag.features.isfinite().all())
    if bag.coords is not None:
        assert bag.coords.dtype == torch.int64 and bag.coords.shape == (len(bag), 2)
    assert bag.label is None or isinstance(bag.label, int)


def _read_all(path):
    bags = read_feature_bags(path)
    return [bags[k] for k in bags]


@FUZZ
@given(features=odd_arrays, coords=st.one_of(st.none(), odd_arrays), label=st.one_of(st.none(), odd_numbers()))
def test_h5_bags_of_any_dtype_and_shape(features, coords, label):
    with scratch() as folder:
        path = folder / "slide.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=features)
            if coords is not None:
                f.create_dataset("coords", data=coords)
            if label is not None:
                if isinstance(label, int) and abs(label) >= 2**63:
                    label = str(label)  # HDF5 stores 64-bit integers only
                f.attrs["label"] = label.replace("\x00", "") if isinstance(label, str) else label
        bags = read_or_refuse(lambda: _read_all(path), path)
    for bag in bags or []:
        check_bag(bag)


@FUZZ
@given(features=odd_arrays, coords=st.one_of(st.none(), odd_arrays), label=st.one_of(st.none(), odd_numbers()))
def test_pt_bags_of_any_dtype_and_shape(features, coords, label):
    def tensor(array):
        return torch.from_numpy(array) if array.dtype.kind != "S" else array.tolist()

    with scratch() as folder:
        path = folder / "slide.pt"
        torch.save(
            {"features": tensor(features), "coords": None if coords is None else tensor(coords), "label": label}, path
        )
        bags = read_or_refuse(lambda: _read_all(path), path)
    for bag in bags or []:
        check_bag(bag)


def test_complex_features_are_refused_not_truncated(tmp_path):
    path = tmp_path / "complex.pt"
    torch.save(torch.ones(3, 4, dtype=torch.complex64) * (1 + 2j), path)
    with pytest.raises(DatasetFormatError, match=r"complex.pt: features have dtype complex64"):
        _read_all(path)
    with h5py.File(tmp_path / "coords.h5", "w") as f:
        f.create_dataset("features", data=np.ones((2, 3), np.float32))
        f.create_dataset("coords", data=np.ones((2, 2), np.complex64))
    with pytest.raises(DatasetFormatError, match=r"coords.h5: coords have dtype complex64"):
        _read_all(tmp_path / "coords.h5")


def _valid_files(folder):
    features = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with h5py.File(folder / "bag.h5", "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("coords", data=np.arange(6).reshape(3, 2))
        f.attrs["label"] = 1
    with h5py.File(folder / "acmil.h5", "w") as f:
        g = f.create_group("slide_a")
        g.create_dataset("feat", data=features.astype(np.float16))
        g.create_dataset("coords", data=np.arange(6).reshape(3, 2))
        g.attrs["label"] = 0
    buf = io.BytesIO()
    torch.save(torch.from_numpy(features), buf)
    (folder / "bag.pt").write_bytes(buf.getvalue())


@FUZZ
@given(name=st.sampled_from(["bag.h5", "acmil.h5", "bag.pt"]), data=st.data())
def test_damaged_feature_files(name, data):
    with scratch() as folder:
        _valid_files(folder)
        path = folder / name
        path.write_bytes(data.draw(damaged(path.read_bytes())))
        bags = read_or_refuse(lambda: _read_all(path), path)
    for bag in bags or []:
        check_bag(bag)


@pytest.mark.parametrize(
    "content", [b"hello world, not a tensor", b"\xef\xbb\xbf<html><body>404</body></html>", b"", b"\x80\x02K"]
)
def test_text_and_html_given_as_features_say_so(tmp_path, content):
    path = tmp_path / "bag.pt"
    path.write_bytes(content)
    with pytest.raises(DatasetFormatError, match=r"bag.pt: not a readable PyTorch") as info:
        _read_all(path)
    assert "code execution" not in str(info.value)


BRACS = ",case_id,slide_id,split_info,full_path,label\n0,c1,s1,train,x,0\n1,c2,s2,val,y,5\n2,c3,s3,test,z,6\n"
CAMELYON = "case_id,slide_id,label\nc1,normal_001,normal\nc2,tumor_001,1\n"


@FUZZ
@given(which=st.sampled_from(["bracs", "camelyon"]), data=st.data())
def test_damaged_csv_files(which, data):
    content = data.draw(st.one_of(damaged((BRACS if which == "bracs" else CAMELYON).encode()), st.binary(max_size=64)))
    with scratch() as folder:
        path = folder / f"{which}.csv"
        path.write_bytes(content)
        read = read_bracs_csv if which == "bracs" else read_camelyon16_labels
        result = read_or_refuse(lambda: read(path), path)
    if which == "bracs" and result is not None:
        assert all(0 <= label < 3 for label in result.labels.values())
    if which == "camelyon" and result is not None:
        assert set(result.values()) <= {0, 1}


@pytest.mark.parametrize("label", ["inf", "nan", "1e400", "1.5", "-0.0e0"])
def test_labels_that_are_not_integers(tmp_path, label):
    path = tmp_path / "labels.csv"
    path.write_text(f"case_id,slide_id,label\nc1,s1,{label}\n")
    result = read_or_refuse(lambda: read_camelyon16_labels(path), "labels.csv line 2")
    assert result is None or result == {"s1": 0}


SPLIT = {"train_names": ["a", "b"], "val_names": ["c"], "test_names": ["d"]}


@FUZZ
@given(doc=mutated_json(SPLIT), raw=st.booleans(), data=st.data())
def test_split_json_with_any_value_anywhere(doc, raw, data):
    with scratch() as folder:
        path = folder / "split_0.json"
        path.write_bytes(data.draw(damaged(json.dumps(SPLIT).encode())) if raw else json.dumps(doc).encode())
        split = read_or_refuse(lambda: read_camelyon16_split(path), path)
    if split is not None:
        assert all(isinstance(s, str) and s for s in split.all) and len(set(split.all)) == len(split.all)


def test_deeply_nested_split_json_names_the_file(tmp_path):
    path = tmp_path / "split_0.json"
    path.write_text(deeply_nested())
    with pytest.raises(DatasetFormatError, match="split_0.json"):
        read_camelyon16_split(path)


@FUZZ
@given(labels=st.dictionaries(st.text(max_size=4), odd_numbers(), max_size=3))
def test_label_overrides_passed_by_callers(labels):
    bags = read_or_refuse(lambda: FeatureBags({}, layout="h5_dir", source=".", labels=labels), "labels[")
    if bags is not None:
        assert all(isinstance(v, int) for v in bags.labels.values())


def test_a_label_that_is_not_an_integer_is_an_input_error():
    with pytest.raises(InvalidInputError, match=r"labels\['s'\]"):
        FeatureBags({}, layout="h5_dir", source=".", labels={"s": 1.5})
