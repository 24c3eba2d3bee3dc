"""Token ids of text files written straight into a ``.npy`` file: a counting pass, then an encoding
pass, so a big corpus is never one string in memory (the token store's builder)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from charlm.data.text import check_not_blank, check_split, iter_corpus_chunks, prepare_data, prepare_texts
from charlm.data.tokenizer import ENCODE_CHUNK, ByteTokenizer, CharTokenizer, codepoints, ids_dtype

CACHE_VERSION = 2  # 2: a folder entry records its files by absolute path, with a digest


def build_ids(paths: list[Path], folder: Path, *, n_train: int, kind: str, val_fraction: float, min_count: int,
           max_vocab: int | None, encoding_errors: str, separate: bool = False,
           extra: dict[str, Any] | None = None) -> None:
    """Token ids of ``paths``: the first ``n_train`` are training text, the rest validation (none:
    the last ``val_fraction`` of the characters). ``separate`` ends every file with a newline."""
    if kind == "word":  # word splitting needs whole lines; the in-memory path does it
        texts = [file_text(p, encoding_errors, separate) for p in paths]
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
                yield from file_chunks(p, encoding_errors, separate)

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


def file_chunks(path: Path, encoding_errors: str, separate: bool) -> Iterator[str]:
    """The file's text in pieces; with ``separate``, a newline after a last line that lacks one."""
    last = ""
    for chunk in iter_corpus_chunks(path, encoding_errors=encoding_errors):
        last = chunk[-1]
        yield chunk
    if separate and last != "\n":
        yield "\n"


def file_text(path: Path, encoding_errors: str, separate: bool) -> str:
    return "".join(file_chunks(path, encoding_errors, separate))


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
        for chunk in file_chunks(path, encoding_errors, separate):
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
