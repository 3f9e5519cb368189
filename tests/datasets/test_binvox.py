import numpy as np
import pytest
import torch

from attnzoo.datasets.binvox import encode_binvox, parse_binvox, read_binvox, write_binvox
from attnzoo.errors import DatasetFormatError, InvalidInputError
from tests.datasets.special_files import fifo, needs_fifo

# A 2x2x2 grid with one voxel at (x, y, z) = (1, 0, 1). In the file the linear index is
# x * (dz * dy) + z * dy + y = 1 * 4 + 1 * 2 + 0 = 6: runs (0 x6), (1 x1), (0 x1).
HEADER = b"#binvox 1\ndim 2 2 2\ntranslate 0.5 -1.0 2.0\nscale 0.75\ndata\n"
HAND_BUILT = HEADER + bytes([0, 6, 1, 1, 0, 1])


def test_hand_built_file(tmp_path):
    path = tmp_path / "one.binvox"
    path.write_bytes(HAND_BUILT)
    model = read_binvox(path)
    assert model.voxels.dtype == np.bool_ and model.voxels.shape == (2, 2, 2)
    assert np.argwhere(model.voxels).tolist() == [[1, 0, 1]]
    assert model.dims == (2, 2, 2) and model.translate == (0.5, -1.0, 2.0) and model.scale == 0.75
    assert model.axis_order == "xyz"
    stored = read_binvox(path, fix_coords=False)  # the file's own x, z, y order
    assert np.argwhere(stored.voxels).tolist() == [[1, 1, 0]] and stored.axis_order == "xzy"


def test_writer_matches_hand_built_bytes(tmp_path):
    grid = np.zeros((2, 2, 2), dtype=bool)
    grid[1, 0, 1] = True
    path = write_binvox(tmp_path / "out.binvox", grid, translate=(0.5, -1, 2), scale=0.75)
    assert path.read_bytes() == HAND_BUILT
    assert [p.name for p in tmp_path.iterdir()] == ["out.binvox"]  # atomic: no temporary left behind


def test_layout_of_a_3x3x3_file_decoded_by_hand():
    # Runs over the file order (y fastest, then z, then x): 5 empty, 4 full, 18 empty.
    data = b"#binvox 1\ndim 3 3 3\ntranslate 0 0 0\nscale 1\ndata\n" + bytes([0, 5, 1, 4, 0, 18])
    expected = np.zeros((3, 3, 3), dtype=bool)
    for index in range(5, 9):
        x, rest = divmod(index, 9)
        z, y = divmod(rest, 3)
        expected[x, y, z] = True
    assert np.array_equal(parse_binvox(data).voxels, expected)


@pytest.mark.parametrize("shape", [(32, 32, 32), (2, 3, 5), (64, 64, 64)])
@pytest.mark.parametrize("fix_coords", [True, False])
def test_round_trip(tmp_path, shape, fix_coords):
    rng = np.random.default_rng(sum(shape))
    grid = rng.random(shape) < 0.3
    grid[: shape[0] // 2] = True  # long runs (> 255) as well as short ones
    path = write_binvox(tmp_path / "g.binvox", grid, translate=(-0.25, 0.1, 3.0), scale=0.7, fix_coords=fix_coords)
    model = read_binvox(path, fix_coords=fix_coords)
    assert np.array_equal(model.voxels, grid)
    assert model.translate == (-0.25, 0.1, 3.0) and model.scale == 0.7


def test_dims_are_the_file_order_for_non_cubic_grids(tmp_path):
    grid = np.zeros((2, 3, 5), dtype=bool)  # x, y, z
    path = write_binvox(tmp_path / "g.binvox", grid)
    assert b"dim 2 5 3\n" in path.read_bytes()  # stored as x, z, y
    assert read_binvox(path).dims == (2, 5, 3)


def test_long_runs_split_at_255():
    data = encode_binvox(np.ones((20, 20, 20), dtype=bool))
    payload = data[data.index(b"data\n") + 5 :]
    assert payload == bytes([1, 255] * 31 + [1, 8000 - 31 * 255])


def test_reads_zero_count_pairs():
    # binvox_rw's writer emits (value, 0) after a run of exactly 255 that is followed by a change.
    data = b"#binvox 1\ndim 16 16 1\ntranslate 0 0 0\nscale 1\ndata\n" + bytes([1, 255, 1, 0, 0, 1])
    voxels = parse_binvox(data, fix_coords=False).voxels
    assert voxels.sum() == 255 and not voxels.reshape(-1)[-1]


def test_header_keywords_in_any_order_and_crlf():
    data = b"#binvox 1\r\nscale 2\r\ndim 2 2 2\r\nfoo bar\r\ndata\r\n" + bytes([1, 8])
    model = parse_binvox(data)
    assert model.voxels.all() and model.scale == 2.0 and model.translate == (0.0, 0.0, 0.0)


def test_accepts_torch_and_0_1_arrays(tmp_path):
    grid = torch.zeros(4, 4, 4)
    grid[1, 2, 3] = 1
    path = write_binvox(tmp_path / "t.binvox", grid)
    assert np.argwhere(read_binvox(path).voxels).tolist() == [[1, 2, 3]]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"PK\x03\x04 not a binvox", "not a binvox file"),
        (b"#binvox 2\ndim 2 2 2\ndata\n" + bytes([0, 8]), "unsupported binvox version"),
        (b"#binvox 1\ntranslate 0 0 0\nscale 1\ndata\n" + bytes([0, 8]), "no 'dim' line"),
        (b"#binvox 1\ndim 2 2\ndata\n" + bytes([0, 8]), "bad binvox 'dim' line"),
        (b"#binvox 1\ndim 2 2 2\nscale abc\ndata\n" + bytes([0, 8]), "bad binvox 'scale' line"),
        (b"#binvox 1\ndim 2 2 2\ntranslate 0 0", "truncated binvox header"),
        (HEADER + bytes([0, 6, 1]), "odd number"),
        (HEADER + bytes([0, 6]), "truncated binvox data: the run-length data covers 6 voxels"),
        (HEADER + bytes([0, 6, 1, 9]), "too long"),
        (HEADER + bytes([0, 6, 2, 2]), "invalid binvox run value 2"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, data, message):
    path = tmp_path / "bad.binvox"
    path.write_bytes(data)
    with pytest.raises(DatasetFormatError, match=message) as info:
        read_binvox(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such binvox file"):
        read_binvox(tmp_path / "absent.binvox")


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(InvalidInputError, match="threshold"):
        write_binvox(tmp_path / "p.binvox", np.full((2, 2, 2), 0.4))
    with pytest.raises(InvalidInputError, match="3-D"):
        write_binvox(tmp_path / "p.binvox", np.zeros((2, 2), dtype=bool))
    with pytest.raises(InvalidInputError, match="scale"):
        write_binvox(tmp_path / "p.binvox", np.zeros((2, 2, 2), dtype=bool), scale=0)
    assert not list(tmp_path.iterdir())


@needs_fifo
def test_a_fifo_or_device_is_refused_not_read(tmp_path):
    """read_bytes() of /dev/zero filled the memory (a raw MemoryError); a FIFO waited for a writer forever."""
    with pytest.raises(DatasetFormatError, match=r"model.binvox: is a FIFO \(named pipe\), not a regular file"):
        read_binvox(fifo(tmp_path / "model.binvox"))
    (tmp_path / "zero.binvox").symlink_to("/dev/null")  # /dev/zero alike, without the risk of reading it
    with pytest.raises(DatasetFormatError, match="zero.binvox: is a character device, not a regular file"):
        read_binvox(tmp_path / "zero.binvox")
