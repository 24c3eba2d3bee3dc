"""Run folders: the lock that keeps one process training in a folder, fresh folder names, the metrics file."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from charlm import fsutil
from charlm import jsonio
from charlm.errors import RunInUseError, SaveError
from charlm.training.distributed import Dist

METRICS_FILE = "metrics.jsonl"


def append_metric(run_dir: Path, event: dict[str, Any]) -> None:
    """Append one event to the run's metrics file, as a line of JSON (never through a planted link)."""
    fsutil.append_text(run_dir / METRICS_FILE, jsonio.dumps(event) + "\n")


@contextmanager
def claim_run_dir(run_dir: Path, dist: Dist | None = None) -> Iterator[None]:
    """Create ``run_dir`` and hold it for the block: one charlm process trains in a folder at a time.

    The lock is ``flock`` on the folder itself (no lock file to leave behind; the system drops it
    when the process dies). A second process gets ``RunInUseError`` before it writes anything.
    Under torchrun rank 0 holds it and tells the others whether it got it.
    """
    dist = dist or Dist()
    fd, problem = None, None
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = _lock_folder(run_dir)
        except OSError as exc:
            problem = f"save:cannot write {run_dir}: {exc.strerror or exc}"
        except RunInUseError as exc:
            problem = f"busy:{exc}"
        except fsutil.UnsafeFolderError as exc:
            problem = f"unsafe:{exc}"
    problem = dist.broadcast_object(problem)
    if problem is not None:
        kind, _, message = problem.partition(":")
        if kind == "busy":
            raise RunInUseError(message)
        if kind == "unsafe":
            raise fsutil.UnsafeFolderError(message)
        raise SaveError(message)
    try:
        if dist.is_main:
            for stale in run_dir.glob(".*.tmp-*"):  # left by a writer that was killed mid-save
                stale.unlink(missing_ok=True)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def _lock_folder(folder: Path) -> int | None:
    """An exclusive, non-blocking lock on ``folder``: its descriptor, or ``RunInUseError`` (fsutil.lock_folder)."""
    return fsutil.lock_folder(folder)


def run_dir_in_use(folder: Path) -> bool:
    """Whether another process holds ``folder`` right now."""
    if not folder.is_dir():
        return False
    try:
        fd = _lock_folder(folder)
    except RunInUseError:
        return True
    if fd is not None:
        os.close(fd)
    return False


def new_run_dir(root: str | Path, name: str) -> Path:
    """``root/name``, or ``root/name-2``, ``-3``, … so a new run never overwrites an old one (nor
    joins one that another process has just started there)."""
    root = Path(root)
    candidate, n = root / name, 1
    while candidate.exists() and (any(candidate.glob("*.safetensors")) or run_dir_in_use(candidate)):
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate
