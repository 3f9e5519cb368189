"""Download, cache and verify checkpoint files.

Every fetch resumes from a ``.part`` file, shows a progress bar, checks sha256 before the
file is renamed into the cache, and never leaves a half-written or unverified file where
a later run would trust it.
"""

from __future__ import annotations

import contextlib
import errno
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

from attnzoo._io import write_json
from attnzoo.errors import AttnzooError, ChecksumError, OfflineError, WeightsError

#: What a write on a full disk (or over quota) fails with (downloads and conversions alike).
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))

_CHUNK = 1 << 20
_PIECE = 1 << 16  # a download's read from a response that cannot say what has arrived
_TRUTHY = {"1", "true", "yes", "on"}
#: The URL schemes a download can use (``hf-hub:`` names go through the Hub's own client, not through a URL).
_SCHEMES = ("http", "https", "file")
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
    """Fail at once, saying the ways out, where fetching ``url`` cannot work: offline mode or an unreachable host.
    A ``file://`` URL is a local copy, not a download: it is read offline too."""
    if not network_usable(url):
        raise unavailable_error(what, url, dest, how_to_fetch=how_to_fetch)


def network_usable(url: str) -> bool:
    """Whether ``url`` can be fetched now: a local ``file://`` URL always, else not in offline mode and its host
    answering (probed once per process)."""
    if _is_file_url(url):
        return True
    return hub_reachable() if url.startswith(hf_endpoint()) else not is_offline() and url_reachable(url)


def _is_file_url(url: str) -> bool:
    """Whether ``url`` names a local file: its scheme is ``file`` (``file:///abs``, ``file:/abs``,
    ``file://localhost/abs``), decided as :func:`_checked_url` decides it."""
    return _url_scheme(url) == "file"


def _url_scheme(url: str) -> str:
    """The scheme of ``url``, lower-cased ("" where it names none or cannot be parsed)."""
    try:
        return urllib.parse.urlsplit(url).scheme.lower()
    except ValueError:
        return ""


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
    """Fetch ``url`` to ``dest``: resumable, verified, atomic. Returns ``dest``.

    A file already at ``dest`` (that matches ``sha256``, when given) is returned without any write (a read-only
    cache works, offline too). With a ``sha256``, a cached download of attnzoo's own that does not match is deleted
    and fetched again, once; a file placed there by hand, and any file while the network cannot be used, is kept
    and named in the error. Everything but a verified copy is decided under the file's lock, so a parallel
    process that replaces a corrupt copy meanwhile is seen.
    """
    dest = Path(dest)
    local = _checked_url(url)
    if dest.exists() and not dest.is_file():
        raise WeightsError(
            f"cannot download {url} to {dest}: it is a {'folder' if dest.is_dir() else 'special file'}, not a file; "
            "give the path of the file to write, or remove what is there"
        )
    if _verified_copy(dest, sha256):
        return dest
    if sha256 and dest.is_file() and not os.access(dest.parent, os.W_OK | os.X_OK):
        # a read-only cache: no process can change it, so its copy is judged as it is (and an unusable one named)
        if _cached_copy_usable(url, dest, sha256):
            return dest
        raise ChecksumError(
            f"the cached download {dest} is corrupt (it does not match sha256 {sha256.lower()}) and cannot be fetched "
            f"again there: the folder {dest.parent} cannot be written{_home_hint(dest.parent)}"
        )
    if not dest.is_file():  # nothing cached: fail at once, before any write, where it cannot be fetched
        _ensure_fetchable(url, dest, local)
    with _cache_lock(dest):
        if dest.is_file():  # another process may have fetched it, or deleted a corrupt copy, meanwhile
            if _cached_copy_usable(url, dest, sha256):
                return dest
            forget_download(dest)  # a corrupt download of attnzoo's own: fetched again, once
        _ensure_fetchable(url, dest, local)
        _download(url, dest, sha256=sha256, progress=progress, retries=retries, timeout=timeout)
    return dest


def _verified_copy(dest: Path, sha256: str | None) -> bool:
    """Whether ``dest`` is a file that can be used as it is: it matches ``sha256`` (any file, without one). Read
    without the lock: anything but a match (a mismatch, a file gone or unreadable meanwhile) is False."""
    try:
        if not dest.is_file():
            return False
        return not sha256 or sha256_file(dest) == sha256.lower()
    except OSError:
        return False


def _ensure_fetchable(url: str, dest: Path, local: Path | None) -> None:
    """Fail at once where ``url`` cannot be fetched now: offline, its host unreachable, a ``file://`` URL's
    file missing."""
    ensure_can_download(dest.name, url, dest)
    if local is not None and not local.is_file():
        raise WeightsError(f"cannot fetch {url}: no such file {local}")


def _checked_url(url: str) -> Path | None:
    """Refuse a URL no request can be made of, before any network use (a scheme other than http, https and
    file, a malformed host or port, no host, spaces); returns the local file a ``file://`` URL names (None for
    the others)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is no number or out of range)
    except ValueError as err:
        raise WeightsError(f"{url!r} is not a valid URL ({err})") from None
    if re.search(r"[\x00-\x20\x7f]", url):
        raise WeightsError(f"{url!r} is not a valid URL: it holds a space or control character (write a space as %20)")
    scheme = _url_scheme(url)
    if scheme not in _SCHEMES:
        given = (
            f"its scheme {parts.scheme + ':'!r} is none of http://, https:// and file://"
            if scheme
            else "it names no scheme (http://, https:// or file://)"
        )
        raise WeightsError(
            f"{url!r} is not a URL attnzoo can download: {given}; a local file is given as its path, a Hugging Face "
            "file as hf-hub:org/repo/file"
        )
    if scheme in ("http", "https") and not parts.hostname:
        raise WeightsError(f"{url!r} is not a valid URL: it names no host")
    if scheme != "file":
        return None
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):  # a relative path: from where?
        raise WeightsError(f"{url!r} is not a valid file URL: use file:///absolute/path/to/file")
    return Path(urllib.request.url2pathname(parts.path))


def download_record(path: str | os.PathLike) -> Path:
    """Beside a file attnzoo downloaded: the URL, size and time of what it wrote (``<file>.download.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".download.json")


def is_own_download(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file attnzoo downloaded itself: its record names this very file (size and
    modification time). A file placed in the cache by hand has none, and is never deleted."""
    return own_download_state(path) is not None


def own_download_state(path: str | os.PathLike) -> os.stat_result | None:
    """The ``stat`` of ``path`` where it is a download of attnzoo's own (see :func:`is_own_download`), else None:
    what :func:`forget_own_download` compares with before it deletes."""
    path = Path(path)
    record = _download_record_of(path)
    if record is None:
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    return info if record.get("size") == info.st_size and record.get("mtime_ns") == info.st_mtime_ns else None


def has_no_record_in_cache(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies in attnzoo's download cache (``$ATTNZOO_HOME/checkpoints``, URL downloads included)
    without a download record: placed there by hand, or downloaded by an older attnzoo, which kept none."""
    path = Path(path)
    with contextlib.suppress(ValueError, OSError):
        if path.absolute().is_relative_to(checkpoints_dir().absolute()):
            return not download_record(path).exists()
    return False


def no_record_advice(path: str | os.PathLike) -> str:
    """What to do about a file of the cache that has no download record (it is never deleted automatically)."""
    return (
        "it has no download record (placed by hand, or downloaded by an older attnzoo), so attnzoo keeps it: "
        f"delete {path} and run again to download it again"
    )


def _download_record_of(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(download_record(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def forget_download(path: str | os.PathLike) -> None:
    """Delete a download of attnzoo's own and its record (the caller holds the file's lock)."""
    Path(path).unlink(missing_ok=True)
    download_record(path).unlink(missing_ok=True)


def forget_own_download(path: str | os.PathLike, seen: os.stat_result) -> bool:
    """Delete ``path`` and its record, under the file's lock, where it is still attnzoo's own download and still
    the file ``seen`` (the same inode, size and time): False where another process replaced it meanwhile (that
    copy is kept). A folder that cannot be written or a file that cannot be deleted raises."""
    path = Path(path)
    with _cache_lock(path):
        now = own_download_state(path)
        same = now is not None and (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) == (
            seen.st_ino,
            seen.st_dev,
            seen.st_size,
            seen.st_mtime_ns,
        )
        if same:
            forget_download(path)
        return same


def _cached_copy_usable(url: str, dest: Path, sha256: str | None) -> bool:
    """True: ``dest`` is the released file (or there is no sha256 to check it with). False: a corrupt download of
    attnzoo's own, to be fetched again. Anything else is an error naming the file, which is kept."""
    if not sha256:
        return True
    try:
        actual = sha256_file(dest)
    except OSError as err:
        raise WeightsError(f"cannot read the cached file {dest}: {err.strerror or err}") from None
    if actual == sha256.lower():
        return True
    found = f"sha256 {actual}, expected {sha256.lower()}"
    if not is_own_download(dest):
        if has_no_record_in_cache(dest):
            raise ChecksumError(f"the cached file {dest} is not the released one ({found}); {no_record_advice(dest)}")
        whose = (
            "it changed after attnzoo downloaded it"
            if _download_record_of(dest) is not None
            else "attnzoo did not download it (placed there by hand?)"
        )
        raise ChecksumError(
            f"the cached file {dest} is not the released one ({found}); {whose}, so it is kept: replace it with "
            f"the released file, or delete it and run again to download {url}"
        )
    if not network_usable(url):
        why = OFFLINE_REASON if is_offline() else f"{urllib.parse.urlsplit(url).hostname or url} cannot be reached"
        raise ChecksumError(
            f"the cached download {dest} is corrupt ({found}); {why}, so it is kept: run again with the network "
            f"to fetch it again, or replace it with the released file ({url})"
        )
    return False


def _home_hint(folder: Path) -> str:
    """What to do about a download folder that cannot be written: inside attnzoo's cache, move the cache."""
    with contextlib.suppress(ValueError, OSError):
        if folder.absolute().is_relative_to(checkpoints_dir().absolute()):
            return (
                f": make it writable, or set ATTNZOO_HOME to a folder you can write (attnzoo's cache is "
                f"$ATTNZOO_HOME/checkpoints, now {checkpoints_dir()})"
            )
    return ": make it writable, or download into another folder"


def _unwritable(folder: Path, err: OSError) -> WeightsError:
    return WeightsError(f"cannot write to the download folder {folder} ({err.strerror or err}){_home_hint(folder)}")


def _make_download_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) for a download, or say in a typed error why it cannot be."""
    home = attnzoo_home()
    try:
        blocked = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    except OSError as err:  # a parent folder that cannot be entered
        raise _unwritable(folder, err) from None
    if blocked is not None:
        if blocked == home:
            raise WeightsError(
                f"ATTNZOO_HOME ({home}) is a file, not a folder: point ATTNZOO_HOME at a folder (attnzoo keeps its "
                "downloads in $ATTNZOO_HOME/checkpoints)"
            )
        raise WeightsError(
            f"cannot create the download folder {folder}: {blocked} is a file, not a folder{_home_hint(folder)}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(folder, err) from None
    if not os.access(folder, os.W_OK | os.X_OK):  # a read-only mount, or a folder of another user's
        raise _unwritable(folder, PermissionError(errno.EACCES, "not writable"))


@contextlib.contextmanager
def _cache_lock(dest: Path) -> Iterator[None]:
    """The lock that keeps parallel processes from downloading ``dest`` twice (its folder made first)."""
    from filelock import FileLock

    _make_download_folder(dest.parent)
    lock = FileLock(str(dest) + ".lock")
    try:
        lock.acquire()
    except OSError as err:
        raise _unwritable(dest.parent, err) from None
    try:
        yield
    finally:
        lock.release()


def _download(url: str, dest: Path, *, sha256: str | None, progress: bool, retries: int, timeout: float) -> None:
    """Fetch ``url`` into ``dest`` (under its lock): retried where a second try can help, verified, recorded as
    attnzoo's own download, then renamed into place."""
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    try:
        for attempt in range(retries + 1):
            try:
                _fetch_into(url, part, progress=progress, timeout=timeout)
                last_error = None
                break
            except urllib.error.HTTPError as err:
                err.close()
                if err.code < 500:  # a redirect that leads nowhere, a missing file, no access: the same next time
                    raise _http_refusal(url, err) from None
                last_error = err
            except http.client.InvalidURL as err:
                raise WeightsError(f"{url!r} is not a valid URL ({err})") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                last_error = err
            if attempt < retries:
                time.sleep(min(2.0**attempt * 0.25, 4.0))
    except KeyboardInterrupt:
        raise DownloadInterrupted(f"interrupted: download of {url} stopped; {_kept_on_interrupt(part, url)}") from None
    except _WriteFailed as failed:
        raise WeightsError(_write_failure(url, part, failed.error)) from None
    if last_error is not None:
        raise WeightsError(
            f"download of {url} failed after {retries + 1} attempts ({_first_line(last_error)}); "
            f"{_what_was_kept(part, url)}"
        ) from None
    if sha256:
        actual = sha256_file(part)
        if actual != sha256.lower():
            _discard_part(part)
            raise ChecksumError(
                f"download of {url} into {dest}: the server's file differs from the released one (sha256 {actual}, "
                f"expected {sha256.lower()}), so nothing was kept. It changed upstream, or a proxy altered it: "
                "report it, or download it by hand and pass it with --weights PATH if you trust it"
            )
    try:
        info = part.stat()  # recorded first: a record that names no file is harmless, a file without one is kept
        write_json(download_record(dest), {"url": url, "size": info.st_size, "mtime_ns": info.st_mtime_ns})
        os.replace(part, dest)
    except OSError as err:
        raise WeightsError(_write_failure(url, part, err)) from None
    _resume_record(part).unlink(missing_ok=True)


def _http_refusal(url: str, err: urllib.error.HTTPError) -> WeightsError:
    """The one-line error for an HTTP answer that another try would not change (a redirect loop, a 4xx)."""
    if 300 <= err.code < 400:
        loop = str(err.msg or "").startswith(urllib.request.HTTPRedirectHandler.inf_msg)
        what = "redirects in a loop" if loop else "answers with a redirect that leads to no file"
        return WeightsError(
            f"download of {url} failed: the server {what} (HTTP {err.code}); open the URL in a browser to find "
            "the file's own address"
        )
    return WeightsError(f"download of {url} failed: HTTP {err.code} {_first_line(err.reason)}")


def _first_line(err: object) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class _WriteFailed(Exception):
    """Writing the ``.part`` failed (a full disk, a read-only folder): not the network, so not retried."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def _write_failure(url: str, part: Path, err: OSError) -> str:
    """The message for a download that could not be written: a full disk says to free space first."""
    try:
        kept = part.stat().st_size if part.exists() else 0
    except OSError:
        kept = 0
    resumable = bool(kept) and _saved_validator(part, url) is not None
    if kept and not resumable:
        with contextlib.suppress(OSError):
            _discard_part(part)  # bytes that cannot be resumed only take the space
    if err.errno in DISK_FULL:
        then = f" (it resumes from the {kept} bytes kept in {part})" if resumable else ""
        return (
            f"download of {url} stopped: no space left on the disk of {part.parent}. Free space there (or set "
            f"ATTNZOO_HOME to a folder on a disk with room), then run the same command again{then}"
        )
    return f"download of {url} failed: cannot write {part} ({err.strerror or err}){_home_hint(part.parent)}"


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


class _ShortBody(http.client.HTTPException):
    """The server closed the connection before the whole file (or range) arrived: retried, resuming."""

    def __init__(self, size: int, total: int):
        super().__init__(f"the connection closed after {size} of {total} bytes")


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """(first byte, last byte, total size) of a ``Content-Range`` header; None where it does not say."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        return None, None, None
    first, last, total = match.groups()
    return (int(first) if first else None), (int(last) if last else None), (int(total) if total != "*" else None)


def _content_length(headers: Any) -> int | None:
    """The length a response's ``Content-Length`` names: one number, also when repeated (``N, N``, or the header
    twice); None where it is missing or the values disagree."""
    values = headers.get_all("Content-Length") if hasattr(headers, "get_all") else [headers.get("Content-Length")]
    numbers = {v.strip() for value in values or () if value for v in str(value).split(",") if v.strip()}
    if len(numbers) != 1:
        return None
    (number,) = numbers
    return int(number) if number.isdigit() else None


def _refuse_web_page(url: str, headers: Any) -> None:
    """A checkpoint is never a web page: an HTML answer is a login, quota or error page served with status 200."""
    kind = str(headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if kind in ("text/html", "application/xhtml+xml"):
        raise WeightsError(
            f"download of {url} failed: the server sent a web page ({kind}), not a checkpoint (probably a login, "
            "quota or error page); open the URL in a browser, download the file by hand and pass it with --weights PATH"
        )


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
            _, _, size = _content_range(err.headers.get("Content-Range"))
            err.close()
            if size == start and record and record.get("size") in (None, start):
                return
            raise _StalePart from None
        raise
    with opened as response:
        if not _is_file_url(url):  # a local file's type is only guessed from its name
            _refuse_web_page(url, response.headers)
        status = getattr(response, "status", None) or 200
        length = _content_length(response.headers)
        if start and status == 206:
            first, last, total = _content_range(response.headers.get("Content-Range"))
            named = _validator(response.headers)  # a server that ignores If-Range still sends the version it serves
            announced = (record or {}).get("size")  # the size of the file the .part was started from
            # a size in the Content-Range ("/*" names none) must be the one first announced
            if first != start or (total is not None and announced not in (None, total)):
                raise _StalePart
            if named is not None and record and named != record["validator"]:
                raise _StalePart
            if total is None:
                # no size in the Content-Range: the size first announced, so a range that ends short of it (a
                # server that answers in pieces, "bytes S-E/*") is a cut reply, resumed and never cached; without
                # one, the end of this range (its last byte, else the body's length)
                if isinstance(announced, int):
                    total = announced
                elif last is not None:
                    total = last + 1
                elif length is not None:
                    total = start + length
        else:  # a whole file: a new version, or a server without ranges
            start, total = 0, length
            try:
                _start_record(part, url, response.headers, length)
            except OSError as err:
                raise _WriteFailed(err) from None
        try:
            fh = open(part, "ab", buffering=0)  # unbuffered: a failed write leaves nothing to flush on close
        except OSError as err:
            raise _WriteFailed(err) from None
        with (
            fh,
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
            _copy_body(response, fh, bar)
            try:
                os.fsync(fh.fileno())  # on disk before it is renamed into the cache (a power cut keeps no torn file)
            except OSError as err:
                raise _WriteFailed(err) from None
        size = part.stat().st_size
    if total is not None and size < total:
        raise _ShortBody(size, total)


def _copy_body(response: Any, fh: Any, bar: Any) -> None:
    """Write what arrives to ``fh`` as it arrives, not a full _CHUNK: on a slow link a blocking read(_CHUNK) keeps
    nothing in the .part (and moves no bar) until a whole MiB is in; each piece is written at once, so an
    interrupt keeps it. A connection that closes early ends the copy (the caller compares the size)."""
    read = getattr(response, "read1", None) or (lambda n: response.read(min(n, _PIECE)))
    while True:
        try:
            chunk = read(_CHUNK)
        except http.client.IncompleteRead as err:
            chunk, ended = err.partial, True
        else:
            ended = False
        if chunk:
            view = memoryview(chunk)
            while view:
                try:
                    written = fh.write(view)
                except OSError as err:
                    raise _WriteFailed(err) from None
                if not written:
                    raise _WriteFailed(OSError(errno.EIO, "nothing could be written"))
                view = view[written:]
            bar.update(len(chunk))
        if ended or not chunk:
            return


def hf_download(repo_id: str, filename: str, *, revision: str | None = None, sha256: str | None = None) -> Path:
    """A file from the Hugging Face Hub through its own cache, verified when a sha256 is known.
    When the Hub cannot be used (offline mode, unreachable host) only the cache is read. With a sha256 the cache is
    read first: a cached copy that matches is used without asking the Hub, one that does not is fetched again,
    once, where the Hub can be used (else it is kept and named); a first download is fetched once and hashed once."""
    cache_only = not hub_reachable()
    if not sha256:
        return _hf_fetch(repo_id, filename, revision=revision, cache_only=cache_only)
    expected = sha256.lower()
    cached = _hf_cached(repo_id, filename, revision=revision) if not cache_only else None
    path = cached or _hf_fetch(repo_id, filename, revision=revision, cache_only=cache_only)
    actual = sha256_file(path)
    if actual == expected:
        return path
    found = f"sha256 {actual}, expected {expected}"
    if cache_only:
        why = OFFLINE_REASON if is_offline() else "the Hugging Face Hub cannot be reached"
        raise ChecksumError(
            f"the cached copy of {repo_id}/{filename} at {path} is corrupt ({found}); {why}, so it is kept: run "
            "again with the network to fetch it again"
        )
    if cached is not None:  # a copy from the cache: fetched again, once
        path = _hf_fetch(repo_id, filename, revision=revision, cache_only=False, force=True)
        actual = sha256_file(path)
        if actual == expected:
            return path
    how = "also when fetched again into" if cached is not None else "as downloaded into"
    raise ChecksumError(
        f"{repo_id}/{filename} on the Hugging Face Hub differs from the released file (sha256 {actual}, expected "
        f"{expected}), {how} {path}: it changed upstream; report it, or pass a file you trust with --weights PATH"
    )


def _hf_cached(repo_id: str, filename: str, *, revision: str | None) -> Path | None:
    """The copy of a Hub file in the Hugging Face cache, without asking the Hub (None where there is none)."""
    try:
        return _hf_fetch(repo_id, filename, revision=revision, cache_only=True)
    except OfflineError:
        return None


def _hf_fetch(repo_id: str, filename: str, *, revision: str | None, cache_only: bool, force: bool = False) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    what = f"{repo_id}/{filename}"
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id, filename, revision=revision, local_files_only=cache_only, force_download=force
            )
        )
    except LocalEntryNotFoundError as err:
        if cache_only:
            how = hf_fetch_advice(repo_id, filename)
            raise unavailable_error(what, f"{hf_endpoint()}/{repo_id}", how_to_fetch=how) from None
        raise WeightsError(f"cannot fetch {what} from the Hugging Face Hub: {err}") from None
    except Exception as err:  # hub errors have many types; all mean the same to a caller
        raise WeightsError(f"cannot fetch {what} from the Hugging Face Hub: {err}") from err
