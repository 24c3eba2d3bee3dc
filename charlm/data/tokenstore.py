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

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from charlm.data.text import (PreparedData, check_not_blank, check_split, default_corpus, iter_corpus_chunks, open_source,
                   prepare_data, prepare_texts, read_corpus, source_kind)
from charlm.errors import CorpusError, UsageError
from charlm.data.tokenizer import (ENCODE_CHUNK, ByteTokenizer, CharTokenizer, Tokenizer, codepoints, ids_dtype,
                        tokenizer_from_dict)

CACHE_VERSION = 2  # 2: a folder entry records its files by absolute path, with a digest


def cache_root() -> Path:
    """``$CHARLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/charlm``, else ``~/.cache/charlm``."""
    if os.environ.get("CHARLM_CACHE_DIR"):
        return Path(os.environ["CHARLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "charlm"


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
    return _cached(paths, settings, lambda tmp: _build(paths, tmp, n_train=1, **options),
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
    return _cached(paths, settings, lambda tmp: _build_folder(folder, candidates, val_path, tmp, **options),
                   root=root, on_build=on_build, what=f"{len(candidates):,} files under {folder}")


def corpus_files(folder: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[Path]:
    """Files under ``folder`` whose names match any ``include`` pattern (all files if none), in a
    stable order (by path); hidden files and folders (a leading dot), symlinked folders, and files
    or folders whose names match an ``exclude`` pattern are left out."""
    import fnmatch

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


def _cached(paths: list[Path], settings: dict[str, Any], build: Callable[[Path], None], *, root: Path | None,
            on_build: Callable[[str], None] | None, what: str) -> CorpusIds:
    folder = (root or cache_root()) / "tokens" / cache_key(paths, settings)
    cached = _load(folder)
    if cached is not None:
        return cached
    try:
        with _exclusive(folder.parent.parent / "locks" / f"{folder.name}.lock"):
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


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` for the block (POSIX ``flock``: the system releases it if
    the process dies; where there is no ``fcntl``, the block runs unlocked)."""
    from charlm.fsutil import open_lock_file

    fd = open_lock_file(lock_path)  # a planted link there is refused, not followed
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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


def _build(paths: list[Path], folder: Path, *, n_train: int, kind: str, val_fraction: float, min_count: int,
           max_vocab: int | None, encoding_errors: str, separate: bool = False,
           extra: dict[str, Any] | None = None) -> None:
    """Token ids of ``paths``: the first ``n_train`` are training text, the rest validation (none:
    the last ``val_fraction`` of the characters). ``separate`` ends every file with a newline."""
    if kind == "word":  # word splitting needs whole lines; the in-memory path does it
        texts = [_file_text(p, encoding_errors, separate) for p in paths]
        options = dict(kind=kind, min_count=min_count, max_vocab=max_vocab)
        train_text = "".join(texts[:n_train])
        data = (prepare_texts(train_text, "".join(texts[n_train:]), **options) if n_train < len(texts)
                else prepare_data(train_text, val_fraction=val_fraction, **options))
        with _IdsFile(folder / "ids.npy", data.train_ids.dtype, len(data.train_ids) + len(data.val_ids)) as ids:
            ids.write_at(0, data.train_ids)
            ids.write_at(len(data.train_ids), data.val_ids)
        result = (data.tokenizer, len(data.train_ids) + len(data.val_ids), len(data.train_ids), data.train_chars,
                  data.val_chars)
    else:
        def chunks() -> Iterator[str]:
            for p in paths:
                yield from _file_chunks(p, encoding_errors, separate)

        chars_per_file, num_bytes, seen = _scan(paths, encoding_errors, separate)
        num_chars = sum(chars_per_file)
        check_not_blank(paths[0], empty=num_chars == 0, blank=seen is None)
        cut_char = (sum(chars_per_file[:n_train]) if n_train < len(paths)
                    else int(num_chars * (1.0 - val_fraction)))
        if kind == "char":
            result = _build_char(chunks, folder, num_chars=num_chars, seen=seen, cut_char=cut_char,
                                 min_count=min_count, max_vocab=max_vocab)
        else:
            result = _build_byte(chunks, folder, num_bytes=num_bytes, cut_char=cut_char, num_chars=num_chars)
    tokenizer, num_tokens, cut, train_chars, val_chars = result
    check_split(train_tokens=cut, val_tokens=num_tokens - cut, val_chars=val_chars)
    meta = {"version": CACHE_VERSION, "sources": [str(p.resolve()) for p in paths], "tokenizer": tokenizer.to_dict(),
            "num_tokens": num_tokens, "cut": cut, "train_chars": train_chars, "val_chars": val_chars, **(extra or {})}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def _file_chunks(path: Path, encoding_errors: str, separate: bool) -> Iterator[str]:
    """The file's text in pieces; with ``separate``, a newline after a last line that lacks one."""
    last = ""
    for chunk in iter_corpus_chunks(path, encoding_errors=encoding_errors):
        last = chunk[-1]
        yield chunk
    if separate and last != "\n":
        yield "\n"


def _file_text(path: Path, encoding_errors: str, separate: bool) -> str:
    return "".join(_file_chunks(path, encoding_errors, separate))


def _usable(path: Path, encoding_errors: str) -> str | None:
    """Why a file of a folder corpus is left out ("binary", "not UTF-8", "empty"), or None."""
    blank = True
    try:
        for chunk in iter_corpus_chunks(path, encoding_errors=encoding_errors):
            blank = blank and chunk.isspace()
    except CorpusError as exc:
        return "binary" if "looks binary" in str(exc) else "not UTF-8" if "UTF-8" in str(exc) else "unreadable"
    return "empty" if blank else None


def _build_folder(root: Path, candidates: list[Path], val_path: str | os.PathLike[str] | None, folder: Path,
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
    _build(train + val, folder, n_train=len(train), separate=True, extra={"files": files}, **options)


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


class _IdsFile:
    """A ``.npy`` file of ids written and re-read through plain file I/O, not a memory map: mapped
    pages that are written count towards the process's resident memory, the page cache does not."""

    def __init__(self, path: Path, dtype: np.dtype, length: int) -> None:
        self.dtype, self.length = np.dtype(dtype), length
        self.fh = open(path, "w+b")  # noqa: SIM115 - closed in __exit__
        np.lib.format.write_array_header_1_0(self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": (length,)})
        self.offset = self.fh.tell()
        self.fh.truncate(self.offset + length * self.dtype.itemsize)

    def write_at(self, start: int, values: np.ndarray) -> None:
        self.fh.seek(self.offset + start * self.dtype.itemsize)
        self.fh.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())

    def read(self, start: int, stop: int) -> np.ndarray:
        self.fh.seek(self.offset + start * self.dtype.itemsize)
        return np.fromfile(self.fh, dtype=self.dtype, count=stop - start)

    def __enter__(self) -> "_IdsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def _scan(paths: list[Path], encoding_errors: str,
          separate: bool = False) -> tuple[list[int], int, np.ndarray | None]:
    """Pass 1: characters per file, UTF-8 bytes, and which codepoints occur (None if all whitespace)."""
    chars_per_file, num_bytes = [], 0
    seen = np.zeros(0x110000, dtype=bool)
    blank = True
    for path in paths:
        chars_per_file.append(0)
        for chunk in _file_chunks(path, encoding_errors, separate):
            chars_per_file[-1] += len(chunk)
            num_bytes += len(chunk.encode("utf-8", "surrogatepass"))
            blank = blank and chunk.isspace()
            for start in range(0, len(chunk), ENCODE_CHUNK):
                seen[codepoints(chunk[start:start + ENCODE_CHUNK])] = True
    return chars_per_file, num_bytes, (seen if not blank else None)


def _build_char(chunks: Callable[[], Iterator[str]], folder: Path, *, num_chars: int, seen: np.ndarray,
                cut_char: int, min_count: int, max_vocab: int | None):
    cut = cut_char
    # Encode with every character of the text, then keep those the training part has (at least
    # ``min_count`` times, the ``max_vocab - 1`` most frequent): the others become <UNK>, as the
    # in-memory tokenizer fitted on the training text would have it.
    everything = CharTokenizer([chr(c) for c in np.flatnonzero(seen)])
    step = ENCODE_CHUNK * 8
    with _IdsFile(folder / "ids.npy", ids_dtype(everything.vocab_size), num_chars) as ids:
        pos = 0
        buffer = np.empty(ENCODE_CHUNK, dtype=ids.dtype)
        for chunk in chunks():
            for start in range(0, len(chunk), ENCODE_CHUNK):
                piece = chunk[start:start + ENCODE_CHUNK]
                everything.encode_into(piece, buffer)
                ids.write_at(pos, buffer[: len(piece)])
                pos += len(piece)
        counts = np.zeros(everything.vocab_size, dtype=np.int64)
        for start in range(0, cut, step):
            counts += np.bincount(ids.read(start, min(cut, start + step)), minlength=everything.vocab_size)
        tokenizer = CharTokenizer.from_counts({everything.itos[i]: int(c) for i, c in enumerate(counts) if i and c},
                                              min_count=min_count, max_vocab=max_vocab)
        remap = np.zeros(everything.vocab_size, dtype=ids_dtype(tokenizer.vocab_size))
        for i, ch in enumerate(everything.itos[1:], start=1):
            remap[i] = tokenizer.encode(ch)[0]
        if remap.dtype != ids.dtype:  # fewer kept characters fit a smaller dtype: rewrite the file
            with _IdsFile(folder / "ids.tmp.npy", remap.dtype, num_chars) as narrow:
                for start in range(0, num_chars, step):
                    narrow.write_at(start, remap[ids.read(start, min(num_chars, start + step))])
        elif not np.array_equal(remap, np.arange(everything.vocab_size)):
            for start in range(0, num_chars, step):
                ids.write_at(start, remap[ids.read(start, min(num_chars, start + step))])
    if (folder / "ids.tmp.npy").exists():
        os.replace(folder / "ids.tmp.npy", folder / "ids.npy")
    return tokenizer, num_chars, cut, cut, num_chars - cut


def _build_byte(chunks: Callable[[], Iterator[str]], folder: Path, *, num_bytes: int, cut_char: int,
                num_chars: int):
    pos = chars = 0
    cut = num_bytes
    with _IdsFile(folder / "ids.npy", np.dtype(np.uint8), num_bytes) as ids:
        for chunk in chunks():
            data = chunk.encode("utf-8", "surrogatepass")
            if chars <= cut_char < chars + len(chunk):  # the validation part starts in this piece
                cut = pos + len(chunk[: cut_char - chars].encode("utf-8", "surrogatepass"))
            ids.write_at(pos, np.frombuffer(data, dtype=np.uint8))
            pos += len(data)
            chars += len(chunk)
    return ByteTokenizer(), num_bytes, cut, cut_char, num_chars - cut_char


# ── a run's corpus: the built-in text or a file through the cache ──────────────────────────────

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
    from charlm.fsutil import _CLOEXEC, _NOFOLLOW

    digest, size, blank = hashlib.sha256(), 0, True
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{os.getpid()}-{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
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
            text = "".join(_file_text(Path(p), encoding_errors, True) for p in files.get("train_paths", []))
            val_text = "".join(_file_text(Path(p), encoding_errors, True) for p in files.get("val_paths", [])) \
                if files.get("val_paths") and val_path is None else None
            return corpus, in_memory(text, val_text, tokenizer=tokenizer)
        return corpus, in_memory(read_corpus(path, encoding_errors=encoding_errors), tokenizer=tokenizer)
    return corpus, PreparedData(cached.tokenizer, cached.train_ids, cached.val_ids, cached.val_chars,
                                cached.train_chars)
