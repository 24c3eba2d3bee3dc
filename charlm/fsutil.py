"""Writing into folders: the one atomic write (with fsync), the one append, the one folder lock and
lock file, and where charlm keeps its cache.

A run folder (``--out``, perhaps under a shared temporary place) or the token cache may have been
made, or touched, by someone else, who can plant a symbolic link where charlm will write
(``metrics.jsonl``, ``best.safetensors``, a temporary file). Nothing here follows a link when it
writes: a new file is created with ``O_EXCL`` under a fresh name and renamed into place, an append
opens with ``O_NOFOLLOW``, the lock opens the folder with ``O_NOFOLLOW``, and a link (or a FIFO,
or a device) where a file belongs is refused with a ``SaveError`` naming it, never written through.
"""
from __future__ import annotations

import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from charlm.errors import RunInUseError, SaveError, UsageError

try:
    import fcntl
except ImportError:  # no flock (Windows): folders and lock files go unlocked
    fcntl = None  # type: ignore[assignment]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class UnsafeFolderError(UsageError):
    """A folder to write in is a symbolic link, or belongs to another user."""


def _refuse_link(path: Path, intact: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError:
        return  # the write itself says what is wrong
    if stat.S_ISLNK(info.st_mode):
        raise SaveError(f"cannot write {path}: it is a symbolic link, and charlm does not write through links "
                        f"(someone else may have put it there); {intact}")


def atomic_write(path: str | os.PathLike[str], data: bytes, *,
                 intact: str = "the previous checkpoint is intact") -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves the old file or the new one,
    and nothing else anywhere (``atomic_write_chunks``). A symbolic link at ``path`` is refused."""
    atomic_write_chunks(path, iter((data,)), intact=intact)


def atomic_write_chunks(path: str | os.PathLike[str], chunks: Iterator[bytes], *,
                        intact: str = "the previous file is intact") -> None:
    """``atomic_write`` of data that arrives in chunks (a download): a temporary file created under a
    fresh name (``O_EXCL``, which never follows a link) in the same folder → fsync → rename over the
    target (which replaces a name, never writes through it) → fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _refuse_link(path, intact)
        fd = create_exclusive(tmp, 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SaveError(f"cannot write {path}: {exc.strerror or exc}; {intact}") from None
    except BaseException:  # an interrupted download leaves no temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def create_exclusive(path: str | os.PathLike[str], mode: int) -> int:
    """A descriptor of the new file ``path``, open for writing: created with ``O_EXCL``, so an
    existing file, or a link planted there, is an ``OSError`` rather than written through."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Append ``text`` (UTF-8) to the regular file ``path``, creating it; a symbolic link, a FIFO
    or a device there is refused, never written through (nor waited on)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _CLOEXEC, 0o644)
    except OSError as exc:
        if _is_link(path):
            raise SaveError(f"cannot write {path}: it is a symbolic link, and charlm does not write through "
                            f"links (someone else may have put it there)") from None
        raise SaveError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SaveError(f"cannot write {path}: it is not a regular file")
        with os.fdopen(fd, "a", encoding="utf-8") as fh:  # closes fd
            fh.write(text)
    except OSError as exc:
        raise SaveError(f"cannot write {path}: {exc.strerror or exc}") from None


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_folder(folder: str | os.PathLike[str]) -> int:
    """A descriptor of ``folder`` itself, refused (``UnsafeFolderError``) where ``folder`` is a
    symbolic link or belongs to another user (who could swap its files under a run)."""
    folder = Path(folder)
    try:
        fd = os.open(folder, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        if _is_link(folder):
            raise UnsafeFolderError(f"{folder} is a symbolic link; charlm writes runs only into real folders "
                                    f"(give the folder it points to, or another --out)") from None
        raise
    owner, me = os.fstat(fd).st_uid, getattr(os, "geteuid", lambda: None)()
    if me not in (None, 0) and owner not in (me, 0):
        os.close(fd)
        raise UnsafeFolderError(f"{folder} belongs to another user (uid {owner}), who could change its files "
                                f"under the run; choose a folder of your own with --out")
    return fd


def lock_folder(folder: str | os.PathLike[str]) -> int | None:
    """An exclusive, non-blocking ``flock`` on ``folder`` itself: its descriptor (closing it
    releases the lock, as the system does when the process dies), ``RunInUseError`` if another
    process holds it, ``UnsafeFolderError`` as ``open_folder``. None where there is no flock."""
    if fcntl is None:  # no flock (Windows): run unlocked
        return None
    fd = open_folder(folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunInUseError(f"{folder} is in use by another charlm process training there; wait for it to "
                            f"finish (or stop it), or choose another --out") from None
    return fd


def open_lock_file(path: str | os.PathLike[str]) -> int:
    """A descriptor of the lock file ``path`` (created if missing), for ``flock``; a link there is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _CLOEXEC, 0o644)
    except OSError as exc:
        if _is_link(path):
            raise SaveError(f"cannot use the lock {path}: it is a symbolic link (someone else may have put it "
                            f"there); remove it") from None
        raise SaveError(f"cannot use the lock {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SaveError(f"cannot use the lock {path}: it is not a regular file")
    return fd


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` for the block (POSIX ``flock``: the system releases it if
    the process dies; where there is no ``fcntl``, the block runs unlocked)."""
    fd = open_lock_file(lock_path)  # a planted link there is refused, not followed
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_regular(path: str | os.PathLike[str], *, append: bool) -> BinaryIO:
    """``path`` opened for writing (emptied) or appending, as a regular file only: a symbolic link
    there (``SaveError``, the one line says so) is never followed, and a FIFO or device is refused
    rather than waited on (a download's resumable ``.part`` file, in a folder someone else made)."""
    path = Path(path)
    _refuse_link(path, "nothing was written")
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise SaveError(f"cannot write {path}: it is not a regular file")
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise SaveError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SaveError(f"cannot write {path}: it is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab" if append else "wb")


def cache_root() -> Path:
    """The folder charlm caches in (the token store, the machine's measured answers):
    ``$CHARLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/charlm``, else ``~/.cache/charlm``."""
    if os.environ.get("CHARLM_CACHE_DIR"):
        return Path(os.environ["CHARLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "charlm"
