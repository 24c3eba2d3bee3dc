"""Token ids of a corpus file, built once and cached on disk for every later run to memory-map.

A 100 MB corpus never sits in memory as one string: it is decoded in pieces
(``data.iter_corpus_chunks``), encoded straight into a ``.npy`` file, and trained from a
``np.memmap`` of it. The second run with the same file and tokenizer settings finds the cache and
starts in about a second; distributed ranks share one cache instead of each re-tokenizing.

    <cache root>/tokens/<key>/ids.npy     every token id of the corpus, train part then validation
                             meta.json   tokenizer, where validation starts, character counts

The key covers the file (path, size, modification time) and every setting that changes the ids,
so an edited corpus or a different ``--val-fraction`` builds a new entry. Entries are written to a
temporary folder and renamed into place, so a killed build never leaves a half entry behind. A
lock file (``<cache root>/locks/<key>.lock``) lets one process build an entry while others that
start on the same corpus wait, then use it.

``prepare_corpus`` is a run's way in: the built-in text in memory, a file or a folder of files
(``folder_corpus.py``) through the store, a pipe copied into a file first (``spooled``). The ids
themselves are encoded by ``encode_files.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from charlm.data.encode_files import CACHE_VERSION, build_ids, file_text
from charlm.data.folder_corpus import build_folder, corpus_files
from charlm.data.text import (PreparedData, check_not_blank, default_corpus, open_source, prepare_data,
                              prepare_texts, read_corpus, source_kind)
from charlm.data.tokenizer import Tokenizer, tokenizer_from_dict
from charlm.errors import CorpusError, UsageError
from charlm.fsutil import cache_root, create_exclusive, exclusive_lock


@dataclass(frozen=True)
class CorpusIds:
    tokenizer: Tokenizer
    ids: np.ndarray  # (N,) every token id; a read-only memmap when it comes from the cache
    cut: int  # ids[:cut] is the training part, ids[cut:] validation
    train_chars: int
    val_chars: int
    folder: Path | None  # the cache entry, None when built in memory
    files: dict[str, Any] | None = None  # a folder corpus: its train/val files and what was skipped

    @property
    def train_ids(self) -> np.ndarray:
        return self.ids[: self.cut]

    @property
    def val_ids(self) -> np.ndarray:
        return self.ids[self.cut:]


def cache_key(paths: list[Path], settings: dict[str, Any]) -> str:
    files = [{"sha256": p.stem.partition("-")[0], "size": p.stat().st_size} if p.suffix == SPOOL_SUFFIX  # a pipe, by content
             else {"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]
    what = {"version": CACHE_VERSION, "files": files, **settings}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def corpus_ids(path: str | os.PathLike[str], *, kind: str, val_fraction: float, min_count: int = 1,
               max_vocab: int | None = None, encoding_errors: str = "strict", val_path: str | os.PathLike[str] | None = None,
               root: Path | None = None, on_build: Callable[[str], None] | None = None) -> CorpusIds:
    """The cached ids of ``path`` for these settings, building the cache entry if it is missing.

    With ``val_path`` all of ``path`` is training text and ``val_path`` the validation text
    (``val_fraction`` is then unused).
    """
    paths = [Path(path)] + ([Path(val_path)] if val_path is not None else [])
    settings = {"kind": kind, "val_fraction": None if val_path is not None else val_fraction,
                "min_count": min_count, "max_vocab": max_vocab, "encoding_errors": encoding_errors}
    for p in paths:
        if source_kind(p) != "file":  # raises the precise error (missing, a directory, a device, …)
            raise CorpusError(f"{p}: is a pipe; prepare_corpus reads it into a file first (spooled)")
    options = dict(kind=kind, val_fraction=val_fraction, min_count=min_count, max_vocab=max_vocab,
                   encoding_errors=encoding_errors)
    return _cached(paths, settings, lambda tmp: build_ids(paths, tmp, n_train=1, **options),
                   root=root, on_build=on_build, what=str(paths[0]))


def folder_ids(folder: str | os.PathLike[str], *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
               kind: str, val_fraction: float,
               min_count: int = 1, max_vocab: int | None = None, encoding_errors: str = "strict",
               val_path: str | os.PathLike[str] | None = None, root: Path | None = None,
               on_build: Callable[[str], None] | None = None) -> CorpusIds:
    """The cached ids of every text file under ``folder`` (names matching ``include``), as one
    corpus: files in path order, each ending in a newline. Binary files, empty ones, and (with
    ``encoding_errors="strict"``) files that are not UTF-8 are skipped and counted. Validation is
    the last files in that order that make up ``val_fraction`` of the bytes, so no file is split
    between training and validation (or ``val_path``). The key covers the whole file list, with
    sizes and modification times."""
    folder = Path(folder)
    candidates = corpus_files(folder, include, exclude)
    if val_path is not None:
        if source_kind(val_path) != "file":  # raises the precise error (missing, a directory, …)
            raise CorpusError(f"{val_path}: is a pipe; prepare_corpus reads it into a file first (spooled)")
        # A --val-file inside the folder is validation text only, never also trained on.
        val_resolved = Path(val_path).resolve()
        candidates = [p for p in candidates if p.resolve() != val_resolved]
        if not candidates:
            raise CorpusError(f"{folder}: no files left to train on (the only one is --val-file {val_path})")
    paths = candidates + ([Path(val_path)] if val_path is not None else [])
    settings = {"kind": kind, "val_fraction": None if val_path is not None else val_fraction, "folder": True,
                "include": sorted(include), "exclude": sorted(exclude), "min_count": min_count, "max_vocab": max_vocab,
                "encoding_errors": encoding_errors}
    options = dict(kind=kind, val_fraction=val_fraction, min_count=min_count, max_vocab=max_vocab,
                   encoding_errors=encoding_errors)
    return _cached(paths, settings, lambda tmp: build_folder(folder, candidates, val_path, tmp, **options),
                   root=root, on_build=on_build, what=f"{len(candidates):,} files under {folder}")


def _cached(paths: list[Path], settings: dict[str, Any], build: Callable[[Path], None], *, root: Path | None,
            on_build: Callable[[str], None] | None, what: str) -> CorpusIds:
    folder = (root or cache_root()) / "tokens" / cache_key(paths, settings)
    cached = _load(folder)
    if cached is not None:
        return cached
    try:
        with exclusive_lock(folder.parent.parent / "locks" / f"{folder.name}.lock"):
            # Two runs started on one new corpus: the second waits here, then finds the first's entry.
            cached = _load(folder)
            if cached is not None:
                return cached
            _build_entry(folder, build, on_build=on_build, what=what)
    except OSError as exc:
        raise CorpusError(f"cannot write the token cache in {folder.parent}: {exc.strerror or exc}; "
                          f"set CHARLM_CACHE_DIR to a writable folder") from None
    cached = _load(folder)
    if cached is None:
        raise CorpusError(f"the token cache entry {folder} could not be read back")
    return cached


def _build_entry(folder: Path, build: Callable[[Path], None], *, on_build: Callable[[str], None] | None,
                 what: str) -> None:
    """Build the entry in a temporary folder and rename it into place (a killed build leaves no half entry)."""
    if on_build:
        on_build(f"tokenizing {what} (cached in {folder} for later runs)")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        build(tmp)
        if folder.exists():  # a damaged entry (``_load`` refused it); the lock keeps other builders out
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # unlocked (no ``fcntl``): another process put its entry in place first
            if _load(folder) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> CorpusIds | None:
    """The entry in ``folder``, or None when it is missing or unreadable (then it is rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION:
            return None
        ids = np.load(folder / "ids.npy", mmap_mode="r")
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        if ids.ndim != 1 or len(ids) != meta["num_tokens"] or not 0 < meta["cut"] < len(ids):
            return None
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    except Exception as exc:  # a TokenizerError from a damaged vocabulary
        if type(exc).__module__.startswith("charlm"):
            return None
        raise
    return CorpusIds(tokenizer, ids, int(meta["cut"]), int(meta["train_chars"]), int(meta["val_chars"]), folder,
                     meta.get("files"))


BUILTIN = "builtin:pydoc"


@dataclass(frozen=True)
class Corpus:
    name: str  # a short name for the run folder
    source: str  # a path, or BUILTIN
    text: str | None = None  # None when the ids come from the token cache
    files: dict[str, Any] | None = None  # a folder corpus: its split (cache.folder_ids), what was skipped


def builtin_corpus() -> Corpus:
    """The text ``charlm train`` uses when given no corpus (Python's own documentation, offline)."""
    name, text = default_corpus()
    return Corpus(name, BUILTIN, text)


def _note_folder(on_note: Callable[[str], None], source: Path, files: dict[str, Any], *, val_fraction: float,
                 val_path: str | None) -> None:
    """The notes a folder corpus earns: files skipped, and a validation split far from --val-fraction."""
    if skipped := files.get("skipped"):
        on_note(f"note: skipped {', '.join(f'{n:,} {why}' for why, n in skipped.items())} file(s) under {source}"
                + (" (--encoding-errors replace reads files that are not UTF-8)" if "not UTF-8" in skipped else ""))
    actual = files.get("val_bytes_fraction")
    if val_path is None and actual is not None and not 0.5 * val_fraction <= actual <= 2 * val_fraction:
        on_note(f"note: validating on the last {files.get('val_files', 0):,} file(s) under {source}, "
                f"{actual:.1%} of the bytes (--val-fraction {val_fraction:g}; no file is split between "
                f"training and validation; --val-file chooses the validation text)")


SPOOL_SUFFIX = ".spool"


@contextmanager
def spooled(paths: "list[str | None]", *, root: Path | None = None) -> Iterator[list[str | None]]:
    """``paths`` with each pipe (``<(zcat corpus.gz)``, a FIFO) copied into a file of the cache
    root for the block, so that it can be read twice (a count, then the ids) and never has to
    fit in memory. The copy is named by its content's SHA-256, which keys the token cache
    instead of the pipe's path; it is removed when the block ends. Files pass through as they are."""
    out: list[str | None] = []
    made: list[Path] = []
    try:
        for path in paths:
            if path is None or path == BUILTIN or Path(path).is_dir() or source_kind(path) == "file":
                out.append(path)
                continue
            made.append(_spool(Path(path), (root or cache_root()) / "spool"))
            out.append(str(made[-1]))
        yield out
    finally:
        for spool in made:
            spool.unlink(missing_ok=True)


def _spool(path: Path, folder: Path) -> Path:
    digest, size, blank = hashlib.sha256(), 0, True
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{os.getpid()}-{os.urandom(4).hex()}.tmp"
        fd = create_exclusive(tmp, 0o600)
    except OSError as exc:
        raise CorpusError(f"cannot copy {path} into the token cache in {folder}: {exc.strerror or exc}; "
                          f"set CHARLM_CACHE_DIR to a writable folder") from None
    try:
        with open_source(path) as source:
            while data := source.read(1 << 20):
                digest.update(data)
                size += len(data)
                blank = blank and data.isspace()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        os.close(fd)
        fd = -1
        check_not_blank(path, empty=size == 0, blank=blank)
        spool = folder / f"{digest.hexdigest()}-{os.getpid()}{SPOOL_SUFFIX}"
        os.replace(tmp, spool)
        return spool
    except OSError as exc:
        raise CorpusError(f"cannot copy {path} into the token cache in {folder}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def prepare_corpus(path: str | None, *, val_path: str | None = None, **options: Any) -> tuple[Corpus, PreparedData]:
    """The corpus and its ids: a file or a folder of files goes through the on-disk token cache,
    the built-in text is small, a pipe (``<(zcat corpus.gz)``) is copied into the cache root
    first (``spooled``) and then read as a file.

    ``val_path`` validates on that file instead of the last ``val_fraction`` of the corpus (the
    last files of a folder). ``tokenizer`` (a resumed or fine-tuned run's) must match what the
    cache holds; if it does not, the text is encoded with it in memory instead.
    """
    with spooled([path, val_path]) as (readable, readable_val):
        note = options.get("on_note")
        if note is not None and (readable, readable_val) != (path, val_path):  # name a pipe as given
            copies = [(str(c), f"{p} (a pipe, copied)") for c, p in ((readable, path), (readable_val, val_path)) if c != p]
            options["on_note"] = lambda message: note(functools.reduce(lambda m, cp: m.replace(*cp), copies, message))
        corpus, data = _prepare_corpus(readable, val_path=readable_val, **options)
    if readable != path:  # a pipe: named as given, not as its copy
        corpus = dataclasses.replace(corpus, name="pipe", source=str(path))
    return corpus, data


def _prepare_corpus(path: str | None, *, kind: str = "char", val_fraction: float, min_count: int = 1,
                    max_vocab: int | None = None, encoding_errors: str = "strict", tokenizer: Tokenizer | None = None,
                    val_path: str | None = None, on_note: Callable[[str], None] | None = None,
                    include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> tuple[Corpus, PreparedData]:
    def in_memory(text: str, val_text: str | None = None, **options: Any) -> PreparedData:
        if val_path is not None:
            val_text = read_corpus(val_path, encoding_errors=encoding_errors)
        if val_text is not None:
            return prepare_texts(text, val_text, **options)
        return prepare_data(text, val_fraction=val_fraction, **options)

    if path is None or path == BUILTIN:
        if include or exclude:
            raise UsageError(f"--{'include' if include else 'exclude'} selects files of a folder corpus; "
                             f"no corpus was given (the built-in text is used)")
        corpus = builtin_corpus()
        return corpus, in_memory(corpus.text or "", tokenizer=tokenizer, kind=kind, min_count=min_count,
                                 max_vocab=max_vocab)
    source = Path(path)
    corpus = Corpus(source.resolve().name if source.is_dir() else source.stem or "corpus", str(source.resolve()))
    options = dict(kind=tokenizer.kind if tokenizer else kind, val_fraction=val_fraction, min_count=min_count,
                   max_vocab=max_vocab, encoding_errors=encoding_errors, val_path=val_path, on_build=on_note)
    if source.is_dir():
        cached = folder_ids(source, include=tuple(include), exclude=tuple(exclude), **options)
        files = cached.files or {}
        corpus = dataclasses.replace(corpus, files=files)
        if on_note is not None:
            _note_folder(on_note, source, files, val_fraction=val_fraction, val_path=val_path)
    else:
        if include or exclude:
            raise UsageError(f"--{'include' if include else 'exclude'} selects files of a folder corpus; the "
                             f"corpus here is one file")
        cached = corpus_ids(path, **options)
    if tokenizer is not None and tokenizer.to_dict() != cached.tokenizer.to_dict():
        if source.is_dir():
            files = cached.files or {}
            text = "".join(file_text(Path(p), encoding_errors, True) for p in files.get("train_paths", []))
            val_text = "".join(file_text(Path(p), encoding_errors, True) for p in files.get("val_paths", [])) \
                if files.get("val_paths") and val_path is None else None
            return corpus, in_memory(text, val_text, tokenizer=tokenizer)
        return corpus, in_memory(read_corpus(path, encoding_errors=encoding_errors), tokenizer=tokenizer)
    return corpus, PreparedData(cached.tokenizer, cached.train_ids, cached.val_ids, cached.val_chars,
                                cached.train_chars)
