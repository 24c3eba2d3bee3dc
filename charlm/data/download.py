"""One file downloaded, resumed where an earlier try stopped (HTTP ``Range``), and verified by its
sha256 or md5; standard library only (``urllib.request``, ``hashlib``).

Bytes arrive in ``<name>.part`` and are renamed into place only once complete and verified, so a
file's presence means it is good. ``urls`` are mirrors of the same bytes, tried in order.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from charlm import __version__
from charlm import fsutil
from charlm.errors import ChecksumError, DownloadError

CHUNK_BYTES = 1 << 20
USER_AGENT = f"charlm/{__version__} (+python urllib)"

Progress = Callable[[int, "int | None"], None]
Event = dict[str, Any]


@dataclass(frozen=True)
class RemoteFile:
    """One file to download; ``urls`` are mirrors of the same bytes, tried in order."""

    name: str
    urls: tuple[str, ...]
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None  # only where a published md5 exists and no sha256 does


@dataclass(frozen=True)
class DownloadedFile:
    name: str
    path: Path
    url: str | None  # None: it was already there (a previous run, or put in place by hand)
    sha256: str
    verified_by: str | None  # "sha256", "md5", or None when no checksum is known


class _TryNextMirror(Exception):
    """This URL failed in a way another mirror (or a later run) may not."""


def fetch_file(remote: RemoteFile, download_dir: Path, *, urls: tuple[str, ...] | None = None,
               progress: Progress | None = None, on_event: Callable[[Event], None] | None = None,
               timeout: float = 60.0) -> DownloadedFile:
    """Make ``download_dir/remote.name`` hold the verified file, fetching it if it is not there.

    Bytes arrive in ``<name>.part``; an interrupted download resumes from where it stopped. The
    file is renamed into place only once complete and verified, so its presence means it is good.
    """
    emit = on_event or (lambda event: None)
    final = download_dir / remote.name
    urls = urls or remote.urls
    if final.is_file():
        sha256, verified_by = _verify(final, remote)
        return DownloadedFile(remote.name, final, None, sha256, verified_by)
    part = final.with_name(final.name + ".part")
    failures: list[str] = []
    for url in urls:
        emit({"event": "file", "file": remote.name, "url": url, "size": remote.size})
        try:
            _fetch(url, part, expected_size=remote.size, progress=progress, emit=emit, timeout=timeout)
        except _TryNextMirror as exc:
            failures.append(f"{url} ({exc})")
            emit({"event": "mirror_failed", "file": remote.name, "url": url, "reason": str(exc)})
            continue
        sha256, verified_by = _verify(part, remote)
        try:
            os.replace(part, final)
        except OSError as exc:
            raise DownloadError(f"cannot write {final}: {exc.strerror or exc}") from None
        return DownloadedFile(remote.name, final, url, sha256, verified_by)
    raise DownloadError(f"cannot download {remote.name} from {'; '.join(failures)}; check your internet "
                        f"connection, or put the file at {final} by hand and run again")


def _fetch(url: str, part: Path, *, expected_size: int | None, progress: Progress | None,
           emit: Callable[[Event], None], timeout: float, _restarted: bool = False) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return  # a previous run got every byte but stopped before verifying
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        emit({"event": "resume", "url": url, "offset": offset})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset and not _restarted:
            # Range not satisfiable: the part is complete, or longer than the file; the header says which.
            total = _content_range_total(exc.headers.get("Content-Range", ""))
            exc.close()
            if total == offset:
                return
            part.unlink()
            emit({"event": "restart", "url": url, "reason": "the partial file does not fit the server's"})
            return _fetch(url, part, expected_size=expected_size, progress=progress, emit=emit,
                          timeout=timeout, _restarted=True)
        exc.close()
        raise _TryNextMirror(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _TryNextMirror(_reason(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _TryNextMirror(_reason(exc)) from None

    with response:
        status = getattr(response, "status", None) or 200  # file:// answers have no status
        length = _int_or_none(response.headers.get("Content-Length"))
        content_range = response.headers.get("Content-Range", "")
        if status == 206 and not (offset and content_range.startswith(f"bytes {offset}-")):
            partial_mismatch = True  # a partial answer to a question we did not ask
        else:
            partial_mismatch = False
            if status == 206:
                mode, done = "ab", offset
                total = _content_range_total(content_range) or (
                    offset + length if length is not None else expected_size)
            else:
                if offset:
                    emit({"event": "restart", "url": url, "reason": "the server ignored the Range request"})
                mode, done = "wb", 0
                total = length if length is not None else expected_size
            expected_end = done + length if length is not None else None
            _stream_to(response, part, mode=mode, done=done, total=total, progress=progress)
            done = part.stat().st_size
    if partial_mismatch:
        part.unlink(missing_ok=True)
        if _restarted:
            raise _TryNextMirror("the server answered with a byte range that was not asked for")
        emit({"event": "restart", "url": url, "reason": "the server answered with another byte range"})
        return _fetch(url, part, expected_size=expected_size, progress=progress, emit=emit,
                      timeout=timeout, _restarted=True)
    if expected_end is not None and done < expected_end:
        raise _TryNextMirror(f"connection closed after {done:,} of {expected_end:,} bytes; run again to resume")
    if expected_size is not None and done < expected_size:
        raise _TryNextMirror(f"connection closed after {done:,} of {expected_size:,} bytes; run again to resume")
    if expected_size is not None and done > expected_size:
        part.unlink(missing_ok=True)
        raise _TryNextMirror(f"got {done:,} bytes, more than the {expected_size:,} expected")


def _stream_to(response: Any, part: Path, *, mode: str, done: int, total: int | None,
               progress: Progress | None) -> None:
    if progress:
        progress(done, total)
    fh = fsutil.open_regular(part, append=mode == "ab")  # never through a link planted as the .part file
    with fh:
        while True:
            try:
                chunk = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                raise _TryNextMirror(f"connection lost after {done:,} bytes: {_reason(exc)}; "
                                     f"run again to resume") from None
            if not chunk:
                return
            try:
                fh.write(chunk)
            except OSError as exc:
                raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from None
            done += len(chunk)
            if progress:
                progress(done, total)


def _verify(path: Path, remote: RemoteFile) -> tuple[str, str | None]:
    """(sha256, what verified it); a file that fails its checksum is removed."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                sha256.update(chunk)
                md5.update(chunk)
    except OSError as exc:
        raise DownloadError(f"cannot read {path}: {exc.strerror or exc}") from None
    checks = [("sha256", remote.sha256, sha256.hexdigest()), ("md5", remote.md5, md5.hexdigest())]
    verified_by = None
    for kind, expected, actual in checks:
        if expected is None:
            continue
        if actual != expected.lower():
            path.unlink(missing_ok=True)
            raise ChecksumError(f"{remote.name}: {kind} is {actual}, expected {expected}; the file was "
                                f"removed (a corrupted download or a changed mirror); run again to re-download")
        verified_by = verified_by or kind
    return sha256.hexdigest(), verified_by


def _reason(reason: object) -> str:
    if isinstance(reason, socket.gaierror):
        return "cannot resolve the host name (offline?)"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _content_range_total(value: str) -> int | None:
    match = re.search(r"/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
