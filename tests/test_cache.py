"""The token cache must give exactly what the in-memory path gives, and be reused, rebuilt or bypassed
when it should."""
from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

import charlm.data.encode_files as encode_files
import charlm.data.text as data_module
import charlm.data.tokenstore as cache
from charlm.data.text import prepare_data
from charlm.data.tokenizer import CharTokenizer
from charlm.data.tokenstore import corpus_ids, prepare_corpus
from charlm.fsutil import exclusive_lock

# Non-ASCII text, CRLF line ends, and characters that occur only in the validation part.
TEXT = ("naïve café — line one\r\nΔelta two\rthree 😀 four\n" * 40) + "tail only: ж§\n"


@pytest.fixture
def small_chunks(monkeypatch):
    """Pieces far smaller than the text, so every boundary case is crossed."""
    monkeypatch.setattr(data_module, "CHUNK_BYTES", 7)
    monkeypatch.setattr(encode_files, "ENCODE_CHUNK", 5)


@pytest.mark.parametrize("kind", ["char", "byte", "word"])
def test_cached_ids_equal_the_in_memory_path(tmp_path, small_chunks, kind):
    path = tmp_path / "c.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    cached = corpus_ids(path, kind=kind, val_fraction=0.1, root=tmp_path / "cache")
    expected = prepare_data(data_module.read_corpus(path), val_fraction=0.1, kind=kind)
    assert cached.tokenizer.to_dict() == expected.tokenizer.to_dict()
    assert np.array_equal(cached.train_ids, expected.train_ids)
    assert np.array_equal(cached.val_ids, expected.val_ids)
    assert (cached.train_chars, cached.val_chars) == (expected.train_chars, expected.val_chars)
    if kind == "char":
        assert "ж" not in cached.tokenizer.itos and cached.tokenizer.count_unknown(cached.val_ids) >= 2


def test_second_run_reuses_the_cache_and_an_edit_rebuilds_it(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    builds: list[str] = []
    first = corpus_ids(path, kind="char", val_fraction=0.1, root=tmp_path, on_build=builds.append)
    second = corpus_ids(path, kind="char", val_fraction=0.1, root=tmp_path, on_build=builds.append)
    assert len(builds) == 1 and first.folder == second.folder
    assert isinstance(second.ids, np.memmap)  # trained from disk, not loaded into memory
    corpus_ids(path, kind="char", val_fraction=0.2, root=tmp_path, on_build=builds.append)
    assert len(builds) == 2  # another setting, another entry
    path.write_text(TEXT + "more\n", encoding="utf-8")
    edited = corpus_ids(path, kind="char", val_fraction=0.1, root=tmp_path, on_build=builds.append)
    assert len(builds) == 3 and edited.folder != first.folder


def test_a_damaged_entry_is_rebuilt(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    first = corpus_ids(path, kind="char", val_fraction=0.1, root=tmp_path)
    (first.folder / "meta.json").write_text("{not json", encoding="utf-8")
    again = corpus_ids(path, kind="char", val_fraction=0.1, root=tmp_path)
    assert np.array_equal(again.ids, first.ids)
    assert not list(first.folder.parent.glob(".*.tmp-*"))  # no temporary folder left behind


def test_a_second_builder_waits_for_the_first_and_uses_its_entry(tmp_path, monkeypatch):
    """Two runs started on one new corpus: while one holds the entry's lock the other waits, then
    uses the finished entry instead of building (and deleting) its own (a race that failed a
    distributed test: the second builder removed the entry the first was reading)."""
    path = tmp_path / "c.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    root = tmp_path / "cache"
    first = corpus_ids(path, kind="char", val_fraction=0.1, root=root)  # where the entry and its lock go
    folder, built = first.folder, []
    shutil.rmtree(folder)
    real_build = cache.build_ids
    monkeypatch.setattr(cache, "build_ids", lambda *args, **kwargs: (built.append(1), real_build(*args, **kwargs)))
    got = {}
    with exclusive_lock(root / "locks" / f"{folder.name}.lock"):  # "the other process" is building
        waiter = threading.Thread(target=lambda: got.update(ids=corpus_ids(path, kind="char", val_fraction=0.1,
                                                                            root=root)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # it waits for the lock instead of building alongside
        cache._build_entry(folder, lambda tmp: cache.build_ids([path], tmp, n_train=1, kind="char", val_fraction=0.1,
                                                                  min_count=1, max_vocab=None, encoding_errors="strict"),
                           on_build=None, what=str(path))
        inode = (folder / "ids.npy").stat().st_ino
    waiter.join(30)
    assert built == [1]  # only "the other process" built
    assert got["ids"].folder == folder and (folder / "ids.npy").stat().st_ino == inode  # its entry, untouched
    assert np.array_equal(got["ids"].ids, first.ids)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary left


def test_bad_corpora_give_the_reader_errors(tmp_path):
    from charlm.errors import CorpusError, UsageError

    with pytest.raises(CorpusError, match="no such file"):
        corpus_ids(tmp_path / "missing.txt", kind="char", val_fraction=0.1, root=tmp_path)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="only whitespace"):
        corpus_ids(blank, kind="char", val_fraction=0.1, root=tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij", encoding="utf-8")
    with pytest.raises(UsageError, match="fewer than 2 tokens"):
        corpus_ids(short, kind="char", val_fraction=0.1, root=tmp_path)


def test_a_resumed_tokenizer_that_differs_from_the_cache_is_used_instead(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    other = CharTokenizer(list("abc\n"))
    _, data = prepare_corpus(str(path), val_fraction=0.1, tokenizer=other)
    assert data.tokenizer is other
    assert data.tokenizer.count_unknown(data.train_ids) > 0


@pytest.mark.parametrize("kind", ["char", "byte", "word"])
def test_a_separate_validation_file(tmp_path, small_chunks, kind):
    from charlm.data.text import prepare_texts

    train_path, val_path = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_path.write_bytes(TEXT.encode("utf-8"))
    val_path.write_bytes("Δelta again\r\nunseen ж\n".encode("utf-8"))
    cached = corpus_ids(train_path, kind=kind, val_fraction=0.1, val_path=val_path, root=tmp_path / "cache")
    expected = prepare_texts(data_module.read_corpus(train_path), data_module.read_corpus(val_path), kind=kind)
    assert cached.tokenizer.to_dict() == expected.tokenizer.to_dict()
    assert np.array_equal(cached.train_ids, expected.train_ids)
    assert np.array_equal(cached.val_ids, expected.val_ids)
    assert (cached.train_chars, cached.val_chars) == (expected.train_chars, expected.val_chars)


@pytest.mark.parametrize("min_count, max_vocab", [(2, None), (1, 8), (40, 5)])
def test_rare_characters_become_unknown_the_same_way(tmp_path, small_chunks, min_count, max_vocab):
    path = tmp_path / "c.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    cached = corpus_ids(path, kind="char", val_fraction=0.1, min_count=min_count, max_vocab=max_vocab,
                        root=tmp_path / "cache")
    expected = prepare_data(data_module.read_corpus(path), val_fraction=0.1, kind="char", min_count=min_count,
                            max_vocab=max_vocab)
    assert cached.tokenizer.to_dict() == expected.tokenizer.to_dict()
    assert max_vocab is None or cached.tokenizer.vocab_size <= max_vocab
    assert np.array_equal(cached.ids, np.concatenate([expected.train_ids, expected.val_ids]))
    assert cached.ids.dtype == np.uint8


def test_a_vocabulary_cap_narrows_the_cached_ids(tmp_path, small_chunks):
    """300 distinct characters need uint16; keeping 100 of them fits uint8, and the ids must agree."""
    every = "".join(chr(0x400 + i) for i in range(300))
    text = every + "".join(chr(0x400 + i % 60) for i in range(5000)) + every + "\n"
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    cached = corpus_ids(path, kind="char", val_fraction=0.1, max_vocab=100, root=tmp_path / "cache")
    expected = prepare_data(text, val_fraction=0.1, kind="char", max_vocab=100)
    assert cached.ids.dtype == np.uint8 and cached.tokenizer.to_dict() == expected.tokenizer.to_dict()
    assert np.array_equal(cached.ids, np.concatenate([expected.train_ids, expected.val_ids]))
