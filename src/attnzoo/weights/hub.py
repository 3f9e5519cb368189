"""Download, cache and verify checkpoint files.

Every fetch resumes from a ``.part`` file, shows a progress bar, checks sha256 before the
file is renamed into the cache, and never leaves a half-written or unverified file where
a later run would trust it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from attnzoo.errors import ChecksumError, OfflineError, WeightsError

_CHUNK = 1 << 20
_TRUTHY = {"1", "true", "yes", "on"}


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


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """A quick probe, so that callers with a fallback don't wait through the hub's retries."""
    if is_offline():
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_error(what: str, source: str, dest: Path) -> OfflineError:
    return OfflineError(
        f"offline mode (ATTNZOO_OFFLINE/HF_HUB_OFFLINE) and {what} is not cached: "
        f"download {source} and place it at {dest}, or pass the local file path instead"
    )


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
        if is_offline():
            raise _offline_error(dest.name, url, dest)
        part = dest.with_name(dest.name + ".part")
        last_error: Exception | None = None
        for attempt in range(retries + 1):
            try:
                _fetch_into(url, part, progress=progress, timeout=timeout)
                last_error = None
                break
            except urllib.error.HTTPError as err:
                if err.code == 416 and part.exists():  # nothing left to fetch
                    last_error = None
                    break
                if 400 <= err.code < 500:
                    raise WeightsError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
                last_error = err
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                last_error = err
            if attempt < retries:
                time.sleep(min(2.0**attempt * 0.25, 4.0))
        if last_error is not None:
            raise WeightsError(
                f"download of {url} failed after {retries + 1} attempts ({last_error}); "
                f"run the same command again to resume from {part}"
            ) from last_error
        if sha256:
            try:
                verify_file(part, sha256)
            except ChecksumError as err:
                part.unlink(missing_ok=True)
                raise ChecksumError(f"download of {url}: {err}") from None
        os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    from tqdm.auto import tqdm

    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "attnzoo"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        status = getattr(response, "status", None) or 200
        if start and status != 206:  # the server ignored the range: start over
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with (
            open(part, "ab" if start else "wb") as fh,
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
            while chunk := response.read(_CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
        size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)


def hf_download(repo_id: str, filename: str, *, revision: str | None = None, sha256: str | None = None) -> Path:
    """A file from the Hugging Face Hub through its own cache, verified when a sha256 is known."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = is_offline()
    try:
        path = Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline))
    except LocalEntryNotFoundError as err:
        if offline:
            cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
            raise _offline_error(f"{repo_id}/{filename}", f"https://huggingface.co/{repo_id}", cache) from None
        raise WeightsError(f"cannot fetch {repo_id}/{filename} from the Hugging Face Hub: {err}") from None
    except Exception as err:  # hub errors have many types; all mean the same to a caller
        raise WeightsError(f"cannot fetch {repo_id}/{filename} from the Hugging Face Hub: {err}") from err
    if sha256:
        verify_file(path, sha256)
    return path
