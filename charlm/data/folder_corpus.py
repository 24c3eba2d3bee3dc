"""A folder of text files as one corpus: which files it takes (``corpus_files``), which it skips
(binary, empty, not UTF-8), and where validation starts, so that no file is split between the two."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from charlm.data.encode_files import build_ids
from charlm.data.text import iter_corpus_chunks
from charlm.errors import CorpusError


def corpus_files(folder: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[Path]:
    """Files under ``folder`` whose names match any ``include`` pattern (all files if none), in a
    stable order (by path); hidden files and folders (a leading dot), symlinked folders, and files
    or folders whose names match an ``exclude`` pattern are left out."""
    if not folder.is_dir():
        raise CorpusError(f"{folder}: not a folder")
    found = []
    for parent, folders, names in os.walk(folder):
        folders[:] = sorted(d for d in folders
                            if not d.startswith(".") and not any(fnmatch.fnmatch(d, pattern) for pattern in exclude))
        for name in names:
            if name.startswith(".") or any(fnmatch.fnmatch(name, pattern) for pattern in exclude):
                continue
            if not include or any(fnmatch.fnmatch(name, pattern) for pattern in include):
                path = Path(parent) / name
                if path.is_file():
                    found.append(path)
    if not found:
        raise CorpusError(f"{folder}: no files" + (f" matching {' or '.join(include)}" if include else ""))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _usable(path: Path, encoding_errors: str) -> str | None:
    """Why a file of a folder corpus is left out ("binary", "not UTF-8", "empty"), or None."""
    blank = True
    try:
        for chunk in iter_corpus_chunks(path, encoding_errors=encoding_errors):
            blank = blank and chunk.isspace()
    except CorpusError as exc:
        return "binary" if "looks binary" in str(exc) else "not UTF-8" if "UTF-8" in str(exc) else "unreadable"
    return "empty" if blank else None


def build_folder(root: Path, candidates: list[Path], val_path: str | os.PathLike[str] | None, folder: Path,
                  **options: Any) -> None:
    usable, skipped = [], {}
    for path in candidates:
        reason = _usable(path, options["encoding_errors"])
        if reason is None:
            usable.append(path)
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    if not usable:
        raise CorpusError(f"{root}: none of its {len(candidates):,} files is UTF-8 text "
                          f"({', '.join(f'{n} {why}' for why, n in skipped.items())})")
    if val_path is not None:
        train, val = usable, [Path(val_path)]
    elif len(usable) >= 2:
        start = _val_start([p.stat().st_size for p in usable], options["val_fraction"])
        train, val = usable[:start], usable[start:]
    else:
        train, val = usable, []  # one file: its last val_fraction, as for a single file
    sizes = {p: p.stat().st_size for p in train + val}
    files = {"train_files": len(train), "val_files": len(val), "skipped": skipped,
             "val_bytes_fraction": (sum(sizes[p] for p in val) / max(sum(sizes.values()), 1) if val else None),
             "train_paths": [str(p.resolve()) for p in train], "val_paths": [str(p.resolve()) for p in val],
             "digest": files_digest(root, train, val)}
    build_ids(train + val, folder, n_train=len(train), separate=True, extra={"files": files}, **options)


def _val_start(sizes: list[int], val_fraction: float) -> int:
    """Where validation starts: the last files (in path order) whose bytes come closest to
    ``val_fraction`` of the whole, at least one, with at least one file left for training."""
    target, total, best, best_gap = val_fraction * sum(sizes), 0, len(sizes) - 1, None
    for start in range(len(sizes) - 1, 0, -1):
        total += sizes[start]
        gap = abs(total - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = start, gap
        if total >= target:
            break
    return best


def files_digest(root: Path, train: list[Path], val: list[Path]) -> str:
    """What a folder corpus's split is made of (each file's path under ``root`` and size, and which
    side it is on), so a resumed run can tell that the folder changed under it."""
    def entry(p: Path) -> list[Any]:
        try:
            name = p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:  # a --val-file outside the folder
            name = str(p.resolve())
        return [name, p.stat().st_size]

    what = {"train": [entry(p) for p in train], "val": [entry(p) for p in val]}
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
