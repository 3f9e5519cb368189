"""PyTorch zip checkpoints whose entries would inflate far beyond the file (zip bombs) are refused before torch reads
them; what torch.save writes, and a re-packed (deflated) checkpoint of ordinary size, still load.

The bombs are honest deflate streams of zeros written in 1 MiB pieces: nothing here holds more than a few MiB."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
import torch

from attnzoo import _io
from attnzoo.errors import WeightsError
from attnzoo.weights import hub, load_checkpoint, load_checkpoint_file
from tests.helpers import http_server

MIB = 1 << 20


def _rezipped(source: Path, target: Path, compress_type: int = zipfile.ZIP_DEFLATED) -> None:
    """``source`` (a torch.save zip) written again with every entry compressed by ``compress_type``."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename), compress_type=compress_type)


def _add_zeros(target: Path, name: str, mib: int) -> None:
    """Append an entry of ``mib`` MiB of zeros, deflated (about a thousand times smaller), in 1 MiB pieces."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(target, "a") as zout, zout.open(info, "w") as entry:
        for _ in range(mib):
            entry.write(bytes(MIB))


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    state = {"w": torch.randn(8, 4), "b": torch.arange(4.0)}
    torch.save(state, path)
    return state


def _bomb(tmp_path: Path, name: str = "bomb.pth", mib: int = 80) -> Path:
    """A loadable-looking checkpoint (its own entries deflated) with ``mib`` MiB of deflated zeros beside them:
    over the 64 MiB that a file may inflate freely, and about a thousand times its compressed bytes."""
    _checkpoint(tmp_path / "plain.pth")
    _rezipped(tmp_path / "plain.pth", tmp_path / name)
    with zipfile.ZipFile(tmp_path / name) as archive:
        prefix = archive.namelist()[0].split("/")[0]
    _add_zeros(tmp_path / name, f"{prefix}/data/99", mib)
    return tmp_path / name


@pytest.fixture
def torch_loads(monkeypatch):
    """Every torch.load call, answered without reading the file (so the old code inflates nothing either)."""
    calls: list[object] = []

    def load(f, *args, **kwargs):
        calls.append(f)
        return {"w": torch.ones(2)}

    monkeypatch.setattr(torch, "load", load)
    return calls


def test_a_deflated_bomb_is_refused_before_torch_reads_it(tmp_path, torch_loads):
    bomb = _bomb(tmp_path)
    size = bomb.stat().st_size
    inflated = sum(i.file_size for i in zipfile.ZipFile(bomb).infolist())
    assert size < 1 * MIB and inflated > 80 * MIB  # what the check is for: a small file, a large load
    with pytest.raises(WeightsError, match=r"bomb\.pth: its compressed zip entries .* as in a zip bomb") as info:
        load_checkpoint_file(bomb)
    assert f"{inflated:,} bytes" in str(info.value)
    with pytest.raises(WeightsError, match=r"bomb\.pth: .*zip bomb"):
        load_checkpoint(str(bomb))  # the same through a path spec
    assert torch_loads == []


def test_a_bomb_downloaded_is_refused_and_kept(tmp_path, torch_loads):
    """A bomb is what the host serves: the download is refused like a local file, and not deleted to be fetched
    again (nothing would change), as for an archive."""
    payload = _bomb(tmp_path).read_bytes()
    with http_server({"/w.pth": payload}) as (base, log):
        with pytest.raises(WeightsError, match=r"w\.pth: its compressed zip entries .* as in a zip bomb"):
            load_checkpoint(f"{base}/w.pth")
    url = f"{base}/w.pth"
    cached = hub.checkpoints_dir() / "url" / hashlib.sha256(url.encode()).hexdigest()[:16] / "w.pth"
    assert cached.read_bytes() == payload and len(log) >= 1
    assert torch_loads == []


def test_entries_claiming_more_than_the_file_or_the_memory_are_refused(tmp_path, monkeypatch, torch_loads):
    import struct

    _checkpoint(tmp_path / "plain.pth")
    data = bytearray((tmp_path / "plain.pth").read_bytes())
    central = data.index(b"PK\x01\x02")  # the first entry's central-directory record: uncompressed size at +24
    data[central + 24 : central + 28] = struct.pack("<I", 2**32 - 1)
    (tmp_path / "lying.pth").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"lying\.pth: its zip entries claim [\d,]+ bytes in a file of"):
        load_checkpoint_file(tmp_path / "lying.pth")

    # a compressed checkpoint inflating to more than the machine has (its ratio and size are ordinary here)
    _rezipped(tmp_path / "plain.pth", tmp_path / "deflated.pth")
    inflated = sum(i.file_size for i in zipfile.ZipFile(tmp_path / "deflated.pth").infolist())
    monkeypatch.setattr(_io, "_physical_memory", lambda: inflated - 1)
    with pytest.raises(WeightsError, match=r"deflated\.pth: .*more than this machine's memory"):
        load_checkpoint_file(tmp_path / "deflated.pth")
    assert torch_loads == []


def test_what_torch_save_writes_and_ordinary_repacked_checkpoints_still_load(tmp_path):
    """torch.save's zip and legacy formats; the zip re-written stored or deflated (a user's or a release's re-pack:
    weights deflate little, a zero buffer a thousand times, under the 64 MiB any file may inflate to)."""
    state = _checkpoint(tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    _rezipped(tmp_path / "zip.pth", tmp_path / "stored.pth", zipfile.ZIP_STORED)
    _rezipped(tmp_path / "zip.pth", tmp_path / "deflated.pth")
    with_zeros = {**state, "mask": torch.zeros(1024, 1024)}  # 4 MiB of zeros: deflates ~1000 times
    torch.save(with_zeros, tmp_path / "zeros.pth")
    _rezipped(tmp_path / "zeros.pth", tmp_path / "zeros_deflated.pth")
    assert (tmp_path / "zeros_deflated.pth").stat().st_size < 64 * 1024
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(512, 512)}, buffer)  # 1 MiB of float noise: deflates a few percent
    (tmp_path / "noise.pth").write_bytes(buffer.getvalue())
    _rezipped(tmp_path / "noise.pth", tmp_path / "noise_deflated.pth")
    for name, expected in [
        ("zip", state),
        ("legacy", state),
        ("stored", state),
        ("deflated", state),
        ("zeros_deflated", with_zeros),
    ]:
        loaded = load_checkpoint_file(tmp_path / f"{name}.pth")
        assert loaded.keys() == expected.keys(), name
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name
    noise = torch.load(tmp_path / "noise.pth", weights_only=True)["w"]
    assert torch.equal(load_checkpoint_file(tmp_path / "noise_deflated.pth")["w"], noise)
