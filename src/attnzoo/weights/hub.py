"""Download, cache and verify checkpoint files.

Every fetch resumes from a ``.part`` file, shows a progress bar, checks sha256 before the
file is renamed into the cache, and never leaves a half-written or unverified file where
a later run would trust it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnzoo.errors import AttnzooError, ChecksumError, OfflineError, WeightsError

_CHUNK = 1 << 20
_PIECE = 1 << 16  # a download's read from a response that cannot say what has arrived
_TRUTHY = {"1", "true", "yes", "on"}
#: Seconds one probe may take (name lookup and TCP connect together) before a host counts as unreachable.
CONNECT_TIMEOUT = 3.0
#: (host, port) -> reachable: a process probes each host once, so a missing network costs one timeout, not one per file.
_VERDICTS: dict[tuple[str, int], bool] = {}
#: What a user can do when weights cannot be fetched; every network error says it.
WAYS_OUT = (
    "Use random weights with --weights none (weights='none' in Python), or a file you have with --weights PATH; "
    "set ATTNZOO_OFFLINE=1 to work from the cache only, without trying the network"
)


def attnzoo_home() -> Path:
    return Path(os.environ.get("ATTNZOO_HOME") or Path.home() / ".cache" / "attnzoo").expanduser()


def checkpoints_dir() -> Path:
    return attnzoo_home() / "checkpoints"


def is_offline() -> bool:
    """``ATTNZOO_OFFLINE=1`` or Hugging Face's own ``HF_HUB_OFFLINE=1``."""
    return any(os.environ.get(v, "").strip().lower() in _TRUTHY for v in ("ATTNZOO_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, sha256: str) -> None:
    actual = sha256_file(path)
    if actual.lower() != sha256.lower():
        raise ChecksumError(
            f"{path}: sha256 is {actual}, expected {sha256.lower()}; the file is corrupt or not the one released"
        )


def hf_endpoint() -> str:
    """The Hugging Face Hub's address (``HF_ENDPOINT`` when set)."""
    import huggingface_hub.constants

    return str(huggingface_hub.constants.ENDPOINT)


def _probe_target(url: str) -> tuple[str, int] | None:
    """The (host, port) a request for ``url`` connects to first: its proxy's when one applies."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if not parts.hostname:
            return None
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a malformed port: let the request itself report the URL
        return None


def _connects(host: str, port: int, timeout: float) -> bool:
    """One TCP connect, name lookup included, bounded by ``timeout`` (a lookup alone can hang for long)."""
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=attempt, name=f"attnzoo-probe-{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


def url_reachable(url: str) -> bool:
    """Whether the host of ``url`` (or its proxy) accepts a connection, probed once per process.

    A fetch whose host is down would otherwise spend its retries and timeouts (about a minute for
    the Hub) before failing; non-HTTP URLs (``file://``) count as reachable.
    """
    target = _probe_target(url)
    if target is None:
        return True
    if target not in _VERDICTS:
        _VERDICTS[target] = _connects(*target, CONNECT_TIMEOUT)
    return _VERDICTS[target]


def hub_reachable() -> bool:
    """The Hugging Face Hub can be used: not in offline mode and its host answers (probed once per process)."""
    return not is_offline() and url_reachable(hf_endpoint())


#: How an error says that the user switched the network off (the demo rewords it when it did so itself).
OFFLINE_REASON = "offline mode (ATTNZOO_OFFLINE/HF_HUB_OFFLINE)"


def unavailable_error(
    what: str, url: str, dest: Path | None = None, ways_out: str | None = None, *, how_to_fetch: str | None = None
) -> OfflineError:
    """The error for ``what`` (not cached) when ``url`` cannot be used now: offline mode, or its host
    unreachable. ``how_to_fetch`` says how to get the file where it will be found (default: download
    ``url`` and place it at ``dest``); ``ways_out`` replaces the advice about ``--weights`` where that
    option does not load ``what``."""
    if is_offline():
        place = how_to_fetch or (f"download {url} and place it at {dest}" if dest else None)
        advice = ways_out or (
            f"{place + ', or pass' if place else 'pass'} the local file with --weights PATH; "
            "or use random weights with --weights none (weights='none' in Python)"
        )
        return OfflineError(f"{OFFLINE_REASON} and no cached copy of {what}: {advice}")
    host = urllib.parse.urlsplit(url).hostname or url
    fetch = f" Where {host} can be reached, {how_to_fetch}." if how_to_fetch else ""
    return OfflineError(
        f"cannot reach {host} (no network, or a firewall or proxy in the way) to fetch {what}, and there is no "
        f"cached copy.{fetch} {ways_out or WAYS_OUT}."
    )


def hf_fetch_advice(repo_id: str, filename: str | None = None) -> str:
    """How to put a Hub file where attnzoo and timm find it, offline too: the Hugging Face cache, filled by
    its own client (a file copied into that folder by hand is never found: the cache is keyed by commit)."""
    import huggingface_hub.constants

    target = f"{repo_id} {filename}" if filename else repo_id
    return (
        f"fetch it into the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) with "
        f"`hf download {target}` (`huggingface-cli download` before huggingface_hub 0.34), which is read offline too"
    )


def ensure_can_download(what: str, url: str, dest: Path | None = None, *, how_to_fetch: str | None = None) -> None:
    """Fail at once, saying the ways out, where fetching ``url`` cannot work: offline mode or an unreachable host."""
    reachable = hub_reachable() if url.startswith(hf_endpoint()) else not is_offline() and url_reachable(url)
    if not reachable:
        raise unavailable_error(what, url, dest, how_to_fetch=how_to_fetch)


@contextlib.contextmanager
def hf_cache_only(enabled: bool = True) -> Iterator[None]:
    """While ``enabled``, third-party Hugging Face downloads (open_clip's) read the cache only, so a Hub
    that cannot be used fails at once instead of through its retries."""
    if not enabled:
        yield
        return
    import huggingface_hub.constants as hf_constants

    saved = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def pretrained_loading(
    what: str,
    name_or_path: str | os.PathLike | None = None,
    *,
    errors: tuple[type[BaseException], ...] = (OSError, ValueError),
    ways_out: str | None = None,
) -> Iterator[bool]:
    """Around a library's ``from_pretrained(name_or_path, local_files_only=<yielded>)`` (Hugging Face's
    cache): offline or with the Hub unreachable (one short probe) it reads the cache only, so a missing
    copy fails at once instead of after the Hub client's retries; a local folder is read as it is, and a
    path to none fails at once. What the loader raises (``errors``) becomes an :class:`OfflineError`
    (cache only, with ``ways_out`` as its advice) or a :class:`WeightsError`, naming ``what``."""
    name = None if name_or_path is None else os.fspath(name_or_path)
    if name is not None and not os.path.exists(name) and not _is_repo_id(name):
        raise WeightsError(f"cannot load {what}: no such folder {name}")
    cache_only = not (name is not None and os.path.isdir(name)) and not hub_reachable()
    try:
        with hf_cache_only(cache_only):
            yield cache_only
    except AttnzooError:
        raise
    except errors as err:
        if cache_only:
            url = f"{hf_endpoint()}/{name}" if name else hf_endpoint()
            raise unavailable_error(what, url, ways_out=ways_out) from err
        raise WeightsError(f"cannot load {what}: {err}") from err


def _is_repo_id(name: str) -> bool:
    """Whether ``name`` can be a Hub repository id ("org/model", "gpt2"); a path (two slashes, "./x",
    "~/x", a drive or backslashes) cannot."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download_url(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 30.0,
) -> Path:
    """Fetch ``url`` to ``dest``: resumable, verified, atomic. Returns ``dest``."""
    from filelock import FileLock

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.exists():
            if sha256:
                verify_file(dest, sha256)
            return dest
        ensure_can_download(dest.name, url, dest)
        part = dest.with_name(dest.name + ".part")
        last_error: Exception | None = None
        try:
            for attempt in range(retries + 1):
                try:
                    _fetch_into(url, part, progress=progress, timeout=timeout)
                    last_error = None
                    break
                except urllib.error.HTTPError as err:
                    if 400 <= err.code < 500:
                        raise WeightsError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
                    last_error = err
                except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                    last_error = err
                if attempt < retries:
                    time.sleep(min(2.0**attempt * 0.25, 4.0))
        except KeyboardInterrupt:
            raise DownloadInterrupted(
                f"interrupted: download of {url} stopped; {_kept_on_interrupt(part, url)}"
            ) from None
        if last_error is not None:
            raise WeightsError(
                f"download of {url} failed after {retries + 1} attempts ({last_error}); {_what_was_kept(part, url)}"
            ) from None
        if sha256:
            try:
                verify_file(part, sha256)
            except ChecksumError as err:
                _discard_part(part)
                raise ChecksumError(f"download of {url}: {err}") from None
        os.replace(part, dest)
        _resume_record(part).unlink(missing_ok=True)
    return dest


def _what_was_kept(part: Path, url: str) -> str:
    """The end of a failed download's error: what a second run will do with the bytes received."""
    kept = part.stat().st_size if part.exists() else 0
    if kept and _saved_validator(part, url):
        return f"{kept} bytes are kept in {part}: run the same command again to resume from there"
    if kept:
        _discard_part(part)
        return (
            f"{kept} bytes were received, but the server names no version of the file (ETag or Last-Modified) "
            "to resume them safely: run the same command again to start over"
        )
    return f"nothing was received. {WAYS_OUT}"


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`download_url`; its message says what was kept and how to resume."""


def _kept_on_interrupt(part: Path, url: str) -> str:
    """The end of an interrupted download's message: what a second run will do with the bytes received."""
    if part.exists() and part.stat().st_size:
        return _what_was_kept(part, url)
    return "nothing was received: run the same command again to download it"


class _StalePart(Exception):
    """The server's answer does not continue the ``.part``: another version of the file, or another range."""


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range`` header; None where it does not say."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _resume_record(part: Path) -> Path:
    """Beside a ``.part``: the URL, version (ETag or Last-Modified) and size of the file it was started from."""
    return part.with_name(part.name + ".json")


def _saved_validator(part: Path, url: str) -> dict[str, Any] | None:
    """The record of ``part`` when it was started from ``url`` with a version to resume against, else None."""
    try:
        record = json.loads(_resume_record(part).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("url") != url or not isinstance(record.get("validator"), str):
        return None
    return record


def _start_record(part: Path, url: str, headers: Any, size: int | None) -> None:
    """Empty ``part`` first, then name the version it now holds (a strong ETag, else Last-Modified): a
    ``.part`` is resumed only against the version it was started from."""
    part.write_bytes(b"")
    validator = _validator(headers)
    if validator:
        _resume_record(part).write_text(json.dumps({"url": url, "validator": validator, "size": size}))
    else:
        _resume_record(part).unlink(missing_ok=True)


def _validator(headers: Any) -> str | None:
    """The version a response names: its strong ETag, else its Last-Modified (None: it names none)."""
    etag = headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")


def _discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _resume_record(part).unlink(missing_ok=True)


def _fetch_into(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    """Fetch ``url`` into ``part``, continuing a ``.part`` only where the server confirms it holds the same
    version (If-Range) and sends the bytes that follow it; otherwise from the start."""
    try:
        _fetch_part(url, part, progress=progress, timeout=timeout)
    except _StalePart:
        _discard_part(part)
        _fetch_part(url, part, progress=progress, timeout=timeout)


def _fetch_part(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    from tqdm.auto import tqdm

    record = _saved_validator(part, url) if part.exists() else None
    start = part.stat().st_size if record else 0
    headers = {"User-Agent": "attnzoo"}
    if record and start:
        headers.update({"Range": f"bytes={start}-", "If-Range": record["validator"]})
    request = urllib.request.Request(url, headers=headers)
    try:
        opened = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if start and err.code == 416:  # nothing after the .part: complete only if the file is exactly that long
            _, total = _content_range(err.headers.get("Content-Range"))
            err.close()
            if total == start and record and record.get("size") in (None, start):
                return
            raise _StalePart from None
        raise
    with opened as response:
        status = getattr(response, "status", None) or 200
        length = response.headers.get("Content-Length")
        if start and status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            named = _validator(response.headers)  # a server that ignores If-Range still sends the version it serves
            if first != start or (record and record.get("size") not in (None, total)):
                raise _StalePart
            if named is not None and record and named != record["validator"]:
                raise _StalePart
        else:  # a whole file: a new version, or a server without ranges
            start = 0
            _start_record(part, url, response.headers, int(length) if length is not None else None)
        total = start + int(length) if length is not None else None
        with (
            open(part, "ab") as fh,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            # what has arrived, not a full _CHUNK: on a slow link a blocking read(_CHUNK) keeps nothing in the
            # .part (and moves no bar) until a whole MiB is in; each piece is flushed, so an interrupt keeps it
            read = getattr(response, "read1", None) or (lambda n: response.read(min(n, _PIECE)))
            while chunk := read(_CHUNK):
                fh.write(chunk)
                fh.flush()
                bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())  # on disk before it is renamed into the cache (a power cut keeps no torn file)
        size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)


def hf_download(repo_id: str, filename: str, *, revision: str | None = None, sha256: str | None = None) -> Path:
    """A file from the Hugging Face Hub through its own cache, verified when a sha256 is known.
    When the Hub cannot be used (offline mode, unreachable host) only the cache is read."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_only = not hub_reachable()
    what = f"{repo_id}/{filename}"
    try:
        path = Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=cache_only))
    except LocalEntryNotFoundError as err:
        if cache_only:
            how = hf_fetch_advice(repo_id, filename)
            raise unavailable_error(what, f"{hf_endpoint()}/{repo_id}", how_to_fetch=how) from None
        raise WeightsError(f"cannot fetch {what} from the Hugging Face Hub: {err}") from None
    except Exception as err:  # hub errors have many types; all mean the same to a caller
        raise WeightsError(f"cannot fetch {what} from the Hugging Face Hub: {err}") from err
    if sha256:
        verify_file(path, sha256)
    return path
