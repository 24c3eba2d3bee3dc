import numpy as np
import pytest
import torch

from charlm.data.text import (batchify, bptt_windows, default_corpus, epoch_offset, fit_batch_shape, num_windows,
                         read_corpus, shifted_windows, window,
                         split_text)
from charlm.errors import CorpusError


def test_read_corpus_normalises_bom_and_line_ends(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert read_corpus(path) == "one\ntwo\nthree\n"


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"  \n\t\n", "only whitespace"), (b"abc\x00def", "NUL byte at offset 3"),
    (b"ok \xff bad", "offset 3"),
])
def test_read_corpus_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_corpus(path)


def test_read_corpus_missing_directory_and_replace(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="is a directory"):
        read_corpus(tmp_path)
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfok \xff")
    with pytest.raises(CorpusError, match=r"0xff at offset 6.*--encoding-errors replace"):
        read_corpus(path)
    assert read_corpus(path, encoding_errors="replace") == "ok \ufffd"


def test_split_takes_the_last_fraction():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = split_text(text, 0.1)
    assert train + val == text and len(val) == 100
    lines = "line one\nline two\nline three\nline four\n"
    train, val = split_text(lines, 0.3, at_line=True)
    assert train + val == lines and train.endswith("\n") and val


def test_batchify_and_windows_cover_contiguous_streams():
    ids = np.arange(103, dtype=np.uint8)
    streams = batchify(ids, 4)
    assert streams.shape == (4, 25)
    assert streams[1, 0] == 25  # row 1 starts where row 0 ends
    windows = list(bptt_windows(streams, 10))
    assert len(windows) == num_windows(25, 10) == 3
    xs = torch.cat([x for _, x, _ in windows], dim=1)
    ys = torch.cat([y for _, _, y in windows], dim=1)
    assert torch.equal(xs[:, 1:], ys[:, :-1]) and xs.shape[1] == 24
    assert windows[0][1].dtype == torch.int64


@pytest.mark.parametrize("length, seq_len", [(2, 1), (5, 8), (9, 8), (10, 8), (16, 8), (17, 8), (18, 8), (100, 35),
                                             (4_421, 35), (4_456, 35)])
def test_shifted_windows_are_full_at_every_offset(length, seq_len):
    count, largest = shifted_windows(length, seq_len)
    if length - 1 < seq_len:  # one short window, nothing to shift
        assert (count, largest) == (num_windows(length, seq_len), 0)
        return
    assert count >= 1 and 0 <= largest <= seq_len - 1
    assert largest + count * seq_len <= length - 1  # the last window's targets exist at the largest offset
    assert count * seq_len + 2 * seq_len > length - 1  # an epoch leaves out fewer than 2 windows' worth
    streams = np.arange(3 * length).reshape(3, length)
    for offset in range(largest + 1):
        x, y = window(streams, count - 1, seq_len, offset=offset)
        assert x.shape == (3, seq_len) and torch.equal(x[:, 1:], y[:, :-1])
        assert int(x[0, 0]) == offset + (count - 1) * seq_len


def test_epoch_offsets_come_from_the_seed_and_the_epoch_alone():
    offsets = [epoch_offset(1337, epoch, 34) for epoch in range(40)]
    assert offsets == [epoch_offset(1337, epoch, 34) for epoch in range(40)]  # nothing else decides them
    assert all(0 <= o <= 34 for o in offsets) and len(set(offsets)) > 10
    assert offsets != [epoch_offset(7, epoch, 34) for epoch in range(40)]
    assert epoch_offset(1337, 3, 0) == 0


def test_fit_batch_shape_shrinks_for_short_text():
    assert fit_batch_shape(10_000, 16, 100).warning is None
    shape = fit_batch_shape(500, 16, 100)
    assert shape.batch_size == 4 and shape.seq_len == 100 and "only 500 tokens" in shape.warning
    shape = fit_batch_shape(30, 16, 100)
    assert shape.batch_size == 1 and shape.seq_len == 29
    with pytest.raises(CorpusError):
        fit_batch_shape(1, 16, 100)


def test_default_corpus_is_python_docs():
    name, text = default_corpus()
    assert name == "pydoc" and len(text) > 100_000 and "\r" not in text


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 64])
def test_streamed_reading_is_chunk_size_independent(tmp_path, chunk_bytes):
    from charlm.data.text import iter_corpus_chunks

    path = tmp_path / "c.txt"
    path.write_bytes("\ufeffa\r\nb\rc\r\r\nδx€y😀\r".encode("utf-8"))
    text = "".join(iter_corpus_chunks(path, chunk_bytes=chunk_bytes))
    assert text == "a\nb\nc\n\nδx€y😀\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes("αβγ".encode("utf-8") + b"ok\xffz")
    with pytest.raises(CorpusError, match="0xff at offset 8"):
        "".join(iter_corpus_chunks(bad, chunk_bytes=chunk_bytes))
