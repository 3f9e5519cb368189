"""Small file helpers shared by every layer: nothing a user saved is ever half-written, and
nothing a user hands us to read ends in a parser's raw exception."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from attnzoo.errors import AttnzooError, DatasetFormatError, InvalidInputError, InvalidOptionError

#: What parsers (json, csv, zipfile, xml, PIL, h5py, scipy.io, sqlite3, torch.load) raise on malformed
#: bytes: OSError and ValueError cover most (UnicodeDecodeError, JSONDecodeError, BadGzipFile, h5py's
#: errors); the rest are what a damaged file makes a parser trip over (deep nesting, a short read, a
#: size field that does not fit). Only ever caught around a parser call, never around our own logic.
PARSE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    EOFError,
    RecursionError,
    OverflowError,
    MemoryError,
    SyntaxError,  # xml.etree.ElementTree.ParseError, PIL's "not a ... file"
    struct.error,
    zlib.error,
    zipfile.BadZipFile,
    csv.Error,
)
#: What navigating a damaged container (HDF5 groups, .mat structs, a pickled dict) raises: a member
#: missing or of the wrong kind; h5py and torch.load raise RuntimeError for damaged internals.
STRUCTURE_ERRORS: tuple[type[BaseException], ...] = (KeyError, IndexError, TypeError, AttributeError, RuntimeError)


def _read_umask() -> int:
    umask = os.umask(0)  # the only portable way to read it; done once, at import, before any threads
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _mode_for(path: Path) -> int:
    """The replaced file's permissions, else the default for new files under the process's umask."""
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_mode & 0o7777
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that need a file name (HDF5, TIFF); it is
    fsynced and renamed onto ``path`` only when the block succeeds, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place only on success."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh
        fh.flush()


def remove_stale_temporaries_in(folder: str | os.PathLike, names: str) -> None:
    """Delete what processes killed while writing (through :func:`atomic_path`) files of ``folder`` whose
    names fully match the regular expression ``names`` left there: ``.<name>.XXXXXXXX.tmp`` files and
    ``.<name>.XXXXXXXX.partial.tmp`` folders. The exact pattern, so no other file ever matches."""
    pattern = re.compile(rf"\.(?:{names})\.[A-Za-z0-9_]{{8}}(\.partial)?\.tmp")
    with contextlib.suppress(FileNotFoundError):
        for entry in Path(folder).iterdir():
            if pattern.fullmatch(entry.name):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = True) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=allow_nan)
        fh.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def _reason(err: BaseException) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    if isinstance(err, MemoryError):
        return "it claims more memory than there is"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


@contextlib.contextmanager
def parse_errors(
    name: str | os.PathLike,
    what: str,
    *,
    error: type[AttnzooError] = DatasetFormatError,
    also: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Around a parser call: what it raises on malformed input becomes ``error`` naming the input.

    ``also`` adds the exceptions a particular parser uses for damage (``KeyError`` from a format's
    missing field, scipy's ``MatReadError``, ...). Typed attnzoo errors pass through unchanged.
    """
    name = os.fspath(name)
    try:
        yield
    except AttnzooError:
        raise
    except FileNotFoundError:
        raise error(f"{name}: no such file (expected {what})") from None
    except IsADirectoryError:
        raise error(f"{name}: is a folder, expected {what}") from None
    except (*PARSE_ERRORS, *also) as err:
        raise error(f"{name}: not a readable {what} ({_reason(err)})") from None


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is (following links) when it exists but is neither a regular file nor a folder: "a FIFO
    (named pipe)", "a character device", ...; None for a regular file, a folder, or nothing (or nothing that
    can be looked at: the open that follows says why)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a broken link, no permission, a NUL in the name
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def check_regular_file(
    path: str | os.PathLike,
    what: str = "file",
    *,
    error: type[AttnzooError] = DatasetFormatError,
    allow_pipes: bool = False,
) -> None:
    """Refuse, as ``error`` naming ``path``, a FIFO, socket or device where a file is to be read: opening a FIFO
    waits for a writer forever, and ``/dev/zero`` never ends (reading it whole fills the memory). Checked before
    the file is opened; a missing file or a folder is left to the open that follows (each reader words those).
    ``allow_pipes``: a FIFO is read (text read front to back: a shell's ``<(...)`` is a pipe with a writer)."""
    kind = special_file_kind(path)
    if kind is not None and not (allow_pipes and kind.startswith("a FIFO")):
        raise error(f"{os.fspath(path)}: is {kind}, not a regular file; expected {what}")


def read_text(
    path: str | os.PathLike, what: str = "text file", *, error: type[AttnzooError] = DatasetFormatError
) -> str:
    """A UTF-8 text file (a BOM is dropped); anything else is ``error`` naming the file."""
    check_regular_file(path, what, error=error, allow_pipes=True)
    with parse_errors(path, what, error=error):
        return Path(path).read_text(encoding="utf-8-sig")


def read_json(
    path: str | os.PathLike, what: str = "JSON file", *, error: type[AttnzooError] = DatasetFormatError
) -> Any:
    """A JSON file; bad encoding, syntax or nesting is ``error`` naming the file (with the line)."""
    text = read_text(path, what, error=error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(
            f"{os.fspath(path)}: not valid JSON (malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}); "
            f"expected {what}"
        ) from None
    except RecursionError:
        raise error(f"{os.fspath(path)}: JSON nested too deeply to be {what}") from None


def read_csv_rows(
    path: str | os.PathLike, what: str = "CSV file", *, error: type[AttnzooError] = DatasetFormatError
) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a UTF-8 CSV file (cells and names stripped; short rows padded with '')."""
    check_regular_file(path, what, error=error, allow_pipes=True)
    with parse_errors(path, what, error=error), open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [(h or "").strip() for h in (reader.fieldnames or [])]
        rows = [
            {(k or "").strip(): v.strip() if isinstance(v, str) else "" for k, v in row.items() if k is not None}
            for row in reader
        ]
    return header, rows


#: What the compressed entries of a PyTorch zip checkpoint may declare beyond the file's own size, whatever their
#: ratio: torch.save stores its entries as they are, but a re-packed archive may deflate them, and a tensor of
#: zeros (a mask, a freshly made buffer) deflates about a thousand times; up to this much it is read as it is.
ZIP_FREE_INFLATION = 64 << 20
#: Above :data:`ZIP_FREE_INFLATION`, how many times their compressed bytes the compressed entries may declare in
#: all: trained weights (float noise) deflate by a few percent, a whole checkpoint a few times at most even beside
#: large zero buffers, never a hundred; deflate's own limit is about 1,032 times (a zip bomb's ratio).
ZIP_MAX_INFLATION_RATIO = 100


def _physical_memory() -> int | None:
    """This machine's memory in bytes, or None where it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or the name is unknown
        return None


def refuse_torch_zip_bomb(
    path: str | os.PathLike, *, error: type[AttnzooError], allow_compressed: bool, advice: str = ""
) -> None:
    """Refuse, as ``error`` naming ``path``, a PyTorch zip file (torch.save's format: it begins as a zip's first
    entry, which is how ``torch.load`` tells it from the legacy pickle) that would make ``torch.load`` allocate far
    more memory than the file holds, read from its central directory before anything is inflated. ``torch.load``
    allocates each entry's declared uncompressed size and refuses an entry that inflates to any other size, so the
    declared sizes bound what loading takes. Refused:

    * entries whose compressed data overlap one another or run past the end of the file (how a zip bomb makes
      many entries of one kernel; no zip writer does it);
    * entries stored as they are (torch.save's) declaring more bytes in all than the file has;
    * with ``allow_compressed=False``, any compressed entry (torch.save never writes one: feature files);
    * with ``allow_compressed=True`` (checkpoints, which users and releases may re-pack), compressed entries that
      declare in all more than :data:`ZIP_FREE_INFLATION` beyond the file's size *and* more than
      :data:`ZIP_MAX_INFLATION_RATIO` times their compressed bytes, or more than this machine's memory.

    A file that is not such an archive, or that :mod:`zipfile` cannot read (cut short, damaged), is left to
    ``torch.load``, which names the damage. ``advice`` ends the message where compressed entries are refused."""
    from attnzoo._values import listed  # here: _values imports numpy, which most users of this module never need

    name = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                return  # the legacy (pickle) format, or no tensor file at all: torch.load says which
            size = os.fstat(fh.fileno()).st_size
            with zipfile.ZipFile(fh) as archive:
                entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):
        return
    ends = sorted((e.header_offset, e.header_offset + e.compress_size, e.filename) for e in entries)
    overlapping = [
        this[2] for this, after in zip(ends, [*ends[1:], (size, size, "")], strict=True) if this[1] > after[0]
    ]
    if overlapping:
        raise error(
            f"{name}: its zip entries overlap one another or run past the end of the file "
            f"({listed(overlapping, 3)}), as in a zip bomb; refused before loading"
        )
    stored = [e for e in entries if e.compress_type == zipfile.ZIP_STORED]
    compressed = [e for e in entries if e.compress_type != zipfile.ZIP_STORED]
    declared = sum(e.file_size for e in stored)
    if declared > size:
        raise error(
            f"{name}: its zip entries claim {declared:,} bytes in a file of {size:,} bytes (stored as they are, they "
            "cannot be larger than the file); refused before loading"
        )
    ending = f". {advice}" if advice else ""
    named = listed([e.filename for e in compressed], 3)
    if compressed and not allow_compressed:
        raise error(
            f"{name}: not a torch.save file: its zip entries are compressed ({named}), which torch.save never "
            f"writes; refused before inflating them{ending}"
        )
    inflated = sum(e.file_size for e in compressed)
    packed = max(1, sum(e.compress_size for e in compressed))
    memory = _physical_memory()
    if inflated - size > ZIP_FREE_INFLATION and inflated > ZIP_MAX_INFLATION_RATIO * packed:
        why = f"{inflated / packed:,.0f} times their {packed:,} compressed bytes, as in a zip bomb"
    elif memory is not None and inflated > memory:
        why = f"more than this machine's memory ({memory:,} bytes)"
    else:
        return
    raise error(
        f"{name}: its compressed zip entries ({named}) declare {inflated:,} bytes once inflated, {why}; refused "
        f"before inflating them{ending}"
    )


def check_output_folder(
    out: str | os.PathLike, what: str = "--out", error: type[InvalidInputError] = InvalidOptionError
) -> Path:
    """An output folder that is a file, cannot be made (a file on its path) or cannot be written to, refused
    before any work (else the first write fails after minutes of it); ``what`` names it in the message."""
    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise error(f"{what} {out} is a file; give a folder (it is created if missing)")
        existing = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    except OSError as err:  # a parent folder that cannot be entered
        raise error(f"{what} {out} cannot be reached: {err.strerror or err}") from None
    if not existing.is_dir():
        raise error(f"{what} {out} cannot be created: {existing} is a file")
    try:  # can a file be made there? (a probe folder, removed at once)
        Path(tempfile.mkdtemp(prefix=".attnzoo-probe-", dir=existing)).rmdir()
    except OSError as err:
        doing = "written to" if existing == out else f"created in {existing}"
        raise error(f"{what} {out} cannot be {doing}: {err.strerror or err}") from None
    return out


def check_out_outside(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    *,
    what: str,
    why: str,
    error: type[InvalidInputError] = InvalidOptionError,
) -> None:
    """``out`` equal to or inside one of ``inputs`` (what the run reads: ``what`` names them, ``why`` says what
    would go wrong) refused before any work: a later run over that input would read the files written there
    as its own (folders are read recursively)."""
    where = Path(out).resolve()
    for item in inputs:
        if where.is_relative_to(Path(item).resolve()):
            raise error(f"--out {out} is inside the {what} {item}: {why}; choose an --out outside it")
