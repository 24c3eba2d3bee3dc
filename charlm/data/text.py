"""From a text file to (x, y) training windows.

    corpus text ──split_text──▶ train text | val text (the LAST val_fraction of the characters)
    token ids ──batchify──▶ B contiguous streams, one row each:

        ids:     a b c d e f g h i j k l m n o p q r s t u v w x     (B = 4)
        streams: ┌ a b c d e f ┐  row 0
                 │ g h i j k l │  row 1
                 │ m n o p q r │  row 2
                 └ s t u v w x ┘  row 3

    bptt_windows ──▶ x = streams[:, i:i+T], y = streams[:, i+1:i+1+T] for i = 0, T, 2T, …

Row b of one window continues row b of the previous one, so the hidden state the model ends a
window with is the right state to start the next (the trainer detaches it between windows).
"""
from __future__ import annotations

import codecs
import os
import select
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from pydoc_data import topics

from charlm.config import ENCODING_ERRORS
from charlm.errors import CorpusError, UsageError
from charlm.data.tokenizer import Tokenizer, fit_tokenizer


def default_corpus() -> tuple[str, str]:
    """The built-in corpus: Python's own documentation topics, present wherever Python is."""
    text = "\n\n".join(topics.topics[key].strip("\n") for key in sorted(topics.topics)) + "\n"
    return "pydoc", normalize_newlines(text)


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


CHUNK_BYTES = 8 << 20


def source_kind(path: str | os.PathLike[str]) -> str:
    """What ``path`` is as a text source, without reading a byte: "file", or "pipe" (a FIFO, a
    process substitution such as ``<(zcat corpus.gz)``, standard input piped in), both read as
    text. Anything else is refused with ``CorpusError`` at once: missing, a folder, a character
    device (a terminal, /dev/zero: they never end), a block device or a socket."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file") from None
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISDIR(mode):
        raise CorpusError(f"{path}: is a directory, not a text file")
    what = ("a character device (a terminal or a device such as /dev/zero)" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    raise CorpusError(f"{path}: is {what}, not a text file; save the text to a file, or pipe it in")


class _PipeReader:
    """Reads a pipe without ever blocking where nothing can come: opened non-blocking, so a FIFO
    that no process has opened for writing reads as ended at once (not a hang), and waiting for
    a writer's next bytes is a ``select`` that a signal interrupts."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))

    def read(self, size: int) -> bytes:
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                select.select([self.fd], [], [])  # a writer is there but has nothing yet

    def __enter__(self) -> "_PipeReader":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def open_source(path: str | os.PathLike[str]):  # noqa: ANN201 - a binary file or a _PipeReader
    """``path`` opened for reading bytes: a regular file or a pipe (``source_kind`` refuses the rest)."""
    path = Path(path)
    return open(path, "rb") if source_kind(path) == "file" else _PipeReader(path)  # noqa: SIM115


def iter_corpus_chunks(path: str | os.PathLike[str], *, encoding_errors: str = "strict",
                       chunk_bytes: int | None = None) -> Iterator[str]:
    """Decode a UTF-8 text file (with or without BOM) piece by piece, CRLF/CR normalised to LF.

    Streaming keeps a big corpus out of memory: the token cache reads it in ``chunk_bytes``
    pieces and never holds the whole text. A CR at the end of a piece is held back until the next
    one shows whether an LF follows.
    """
    path = Path(path)
    if encoding_errors not in ENCODING_ERRORS:
        raise UsageError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)} (got {encoding_errors!r})")
    source_kind(path)  # refuses what is not a file or a pipe before anything is read
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")(errors=encoding_errors)
    offset, held_cr = 0, False
    try:
        with open_source(path) as fh:
            while True:
                data = fh.read(chunk_bytes if offset else max(chunk_bytes, 3))  # a BOM is 3 bytes
                final = not data
                if offset == 0 and data.startswith(b"\xef\xbb\xbf"):
                    data, offset = data[3:], 3
                nul = data.find(b"\x00")
                if nul >= 0:
                    raise CorpusError(f"{path}: looks binary (NUL byte at offset {offset + nul}); "
                                      f"charlm reads UTF-8 text")
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(data, final=final)
                except UnicodeDecodeError as exc:
                    raise CorpusError(
                        f"{path}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {offset - pending + exc.start}); "
                        f"pass --encoding-errors replace to read it anyway") from None
                offset += len(data)
                if held_cr:
                    text = "\r" + text
                held_cr = not final and text.endswith("\r")
                if held_cr:
                    text = text[:-1]
                if text:
                    yield normalize_newlines(text)
                if final:
                    return
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_corpus(path: str | os.PathLike[str], *, encoding_errors: str = "strict",
                allow_empty: bool = False) -> str:
    """Read a UTF-8 text file (with or without BOM), normalising CRLF/CR line ends to LF."""
    text = "".join(iter_corpus_chunks(path, encoding_errors=encoding_errors))
    if not allow_empty:
        check_not_blank(path, empty=not text, blank=not text.strip())
    return text


def check_not_blank(path: str | os.PathLike[str], *, empty: bool, blank: bool) -> None:
    if empty:
        try:
            pipe = source_kind(path) == "pipe"
        except CorpusError:
            pipe = False
        raise CorpusError(f"{path}: is empty" + (" (a pipe: nothing was written to it, or no program had opened it "
                                                  "for writing)" if pipe else ""))
    if blank:
        raise CorpusError(f"{path}: holds only whitespace")


def split_text(text: str, val_fraction: float, *, at_line: bool = False) -> tuple[str, str]:
    """Train and validation text: the validation part is the LAST ``val_fraction`` of the characters.

    With ``at_line`` (word models) the cut moves forward to the next line start so no line is split.
    """
    cut = int(len(text) * (1.0 - val_fraction))
    if at_line:
        newline = text.find("\n", cut)
        if newline >= 0 and newline + 1 < len(text):
            cut = newline + 1
        else:
            previous = text.rfind("\n", 0, cut)
            cut = previous + 1 if previous >= 0 else cut
    return text[:cut], text[cut:]


def batchify(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """Cut a 1-D id array into ``batch_size`` contiguous streams: a (B, N // B) view, no copy.

    A memory-mapped corpus stays memory-mapped; windows are copied out one at a time (``window``).
    """
    length = len(ids) // batch_size
    if length < 2:
        raise CorpusError(f"{len(ids)} tokens are too few for {batch_size} streams")
    return ids[: length * batch_size].reshape(batch_size, length)


def num_windows(stream_length: int, seq_len: int) -> int:
    return max(0, -(-(stream_length - 1) // seq_len))


def window(streams: "np.ndarray | torch.Tensor", index: int, seq_len: int, rows: slice = slice(None), offset: int = 0):
    """Window ``index`` of ``streams[rows]`` (the windows starting ``offset`` tokens in): x, y int64
    tensors of shape (B, t), t ≤ seq_len."""
    i = offset + index * seq_len
    t = min(seq_len, streams.shape[1] - 1 - i)
    block = streams[rows, i:i + t + 1]  # (B, t + 1)
    # a copy either way: widened where the streams are (a tensor already on the GPU stays there)
    block = block.long() if isinstance(block, torch.Tensor) else torch.from_numpy(block.astype(np.int64))
    return block[:, :-1], block[:, 1:]


def shifted_windows(stream_length: int, seq_len: int) -> tuple[int, int]:
    """For ``--shift-windows``: (windows per epoch, the largest start offset). Every window is full
    whatever the offset in [0, largest], so each epoch sees the same number of steps; an epoch
    leaves out fewer than 2 × seq_len tokens of each stream (different ones each epoch)."""
    if stream_length - 1 < seq_len:  # one short window: nothing to shift
        return num_windows(stream_length, seq_len), 0
    count = max(1, (stream_length - seq_len) // seq_len)
    return count, min(seq_len - 1, stream_length - 1 - count * seq_len)


def epoch_offset(seed: int, epoch: int, largest: int) -> int:
    """Where epoch ``epoch``'s windows start (0..largest): drawn from (seed, epoch) alone, so a
    resumed run and every DDP rank agree without storing it, and the dropout masks' generator is
    not touched."""
    return int(np.random.default_rng([seed, epoch]).integers(largest + 1)) if largest > 0 else 0


def bptt_windows(streams: np.ndarray, seq_len: int, *, start: int = 0) -> Iterator[tuple[int, object, object]]:
    """Yield (window index, x, y) with x, y of shape (B, t), t ≤ seq_len, ids as int64."""
    for index in range(start, num_windows(streams.shape[1], seq_len)):
        yield (index, *window(streams, index, seq_len))


@dataclass(frozen=True)
class BatchShape:
    batch_size: int
    seq_len: int
    warning: str | None


def fit_batch_shape(num_tokens: int, batch_size: int, seq_len: int) -> BatchShape:
    """Shrink batch size (then seq_len) so a short corpus still gives at least one full window.

    We shrink with a warning rather than refuse: a user trying charlm on a small file should get a
    model, not an error. Fewer than 2 tokens cannot train at all and is refused.
    """
    if num_tokens < 2:
        raise CorpusError(f"the training text has {num_tokens} token(s); at least 2 are needed")
    if num_tokens // batch_size >= seq_len + 1:
        return BatchShape(batch_size, seq_len, None)
    new_batch = max(1, num_tokens // (seq_len + 1))
    new_seq = min(seq_len, num_tokens // new_batch - 1)
    return BatchShape(new_batch, new_seq,
                      f"the training text has only {num_tokens:,} tokens: using --batch-size {new_batch} "
                      f"and --seq-len {new_seq} instead of {batch_size} and {seq_len}")


# ── a text split into training and validation ids ─────────────────────────────────────────────

@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    val_chars: int  # characters of the validation text: bits/char divides by this
    train_chars: int


def prepare_data(text: str, *, val_fraction: float, tokenizer: Tokenizer | None = None, kind: str = "char",
                 min_count: int = 1, max_vocab: int | None = None) -> PreparedData:
    """Split off the LAST ``val_fraction`` as validation, fit the tokenizer on the training part only."""
    train_text, val_text = split_text(text, val_fraction, at_line=(tokenizer.kind if tokenizer else kind) == "word")
    return prepare_texts(train_text, val_text, tokenizer=tokenizer, kind=kind, min_count=min_count,
                         max_vocab=max_vocab)


def prepare_texts(train_text: str, val_text: str, *, tokenizer: Tokenizer | None = None, kind: str = "char",
                  min_count: int = 1, max_vocab: int | None = None) -> PreparedData:
    """Ids of a training and a validation text, with the tokenizer fitted on the training text."""
    if not train_text.strip():
        check_split(train_tokens=0, val_tokens=0, val_chars=len(val_text))
    tokenizer = tokenizer or fit_tokenizer(kind, train_text, min_count=min_count, max_vocab=max_vocab)
    train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    check_split(train_tokens=len(train_ids), val_tokens=len(val_ids), val_chars=len(val_text))
    return PreparedData(tokenizer, train_ids, val_ids, len(val_text), len(train_text))


def check_split(*, train_tokens: int, val_tokens: int, val_chars: int) -> None:
    if train_tokens < 1:
        raise UsageError("the training part of the corpus is empty; lower --val-fraction or use more text")
    if val_tokens < 2:
        raise UsageError(f"the validation part ({val_chars} characters) has fewer than 2 tokens; "
                         f"raise --val-fraction or use more text")
