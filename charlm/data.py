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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CorpusError

ENCODING_ERRORS = ("strict", "replace", "ignore")


def default_corpus() -> tuple[str, str]:
    """The built-in corpus: Python's own documentation topics, present wherever Python is."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[key].strip("\n") for key in sorted(topics.topics)) + "\n"
    return "pydoc", normalize_newlines(text)


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_corpus(path: str | os.PathLike[str], *, encoding_errors: str = "strict",
                allow_empty: bool = False) -> str:
    """Read a UTF-8 text file (with or without BOM), normalising CRLF/CR line ends to LF."""
    path = Path(path)
    if encoding_errors not in ENCODING_ERRORS:
        raise CorpusError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}")
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if path.is_dir():
        raise CorpusError(f"{path}: is a directory, not a text file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{path}: looks binary (NUL byte at offset {nul}); charlm reads UTF-8 text")
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    data = data[bom:]
    try:
        text = data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as exc:
        offset = exc.start + bom
        raise CorpusError(
            f"{path}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {offset}); "
            f"pass --encoding-errors replace to read it anyway") from None
    text = normalize_newlines(text)
    if not allow_empty:
        if not text:
            raise CorpusError(f"{path}: is empty")
        if not text.strip():
            raise CorpusError(f"{path}: holds only whitespace")
    return text


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


def batchify(ids: np.ndarray, batch_size: int):
    """Cut a 1-D id array into ``batch_size`` contiguous streams: a (B, N // B) tensor of ids."""
    import torch

    length = len(ids) // batch_size
    if length < 2:
        raise CorpusError(f"{len(ids)} tokens are too few for {batch_size} streams")
    ids = ids[: length * batch_size]
    if ids.dtype == np.uint16 or ids.dtype.kind == "i":
        ids = ids.astype(np.int32, copy=False)  # torch indexes int32/int64/uint8 tensors
    return torch.from_numpy(np.ascontiguousarray(ids)).view(batch_size, length)


def num_windows(stream_length: int, seq_len: int) -> int:
    return max(0, -(-(stream_length - 1) // seq_len))


def bptt_windows(streams, seq_len: int, *, start: int = 0) -> Iterator[tuple[int, object, object]]:
    """Yield (window index, x, y) with x, y of shape (B, t), t ≤ seq_len, ids as int64."""
    length = streams.shape[1]
    for index in range(start, num_windows(length, seq_len)):
        i = index * seq_len
        t = min(seq_len, length - 1 - i)
        x = streams[:, i:i + t].long()
        y = streams[:, i + 1:i + 1 + t].long()
        yield index, x, y


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
