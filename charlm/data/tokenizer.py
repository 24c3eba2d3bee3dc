"""Tokenizers: text ⇄ token ids, vectorised with numpy.

* ``CharTokenizer``: every character of the training text, plus ``<UNK>`` (id 0) for the rest.
* ``WordTokenizer``: whitespace-separated words above a frequency cut-off, ``<UNK>`` for the rest,
  ``<EOS>`` at each line end; decoding joins words with spaces and ``<EOS>`` with newlines.
* ``ByteTokenizer``: the 256 UTF-8 byte values; nothing is ever unknown.

A tokenizer is fully described by ``to_dict()``, which the checkpoint stores, so a model never
depends on a vocabulary kept elsewhere.
"""
from __future__ import annotations

import codecs
import re
from array import array
from collections import Counter
from itertools import repeat
from typing import Any, Iterable

import numpy as np

from charlm.errors import ConfigError, TokenizerError

UNK = "<UNK>"
EOS = "<EOS>"
# Decoding <UNK> in char models gives the Unicode replacement character.
UNK_CHAR = "\ufffd"


# Encoding works through text this many characters at a time to bound its temporaries.
ENCODE_CHUNK = 1 << 20


def codepoints(text: str) -> np.ndarray:
    """The codepoints of ``text``: uint8 when it is ASCII (the fast, common case), else uint32."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


class Tokenizer:
    kind: str = ""
    unk_id: int | None = None
    eos_id: int | None = None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decoder(self) -> "StreamDecoder":
        """A stateful decoder for streaming one id at a time (bytes may split a character)."""
        return StreamDecoder(self)

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def count_unknown(self, ids: np.ndarray) -> int:
        return 0 if self.unk_id is None else int(np.count_nonzero(ids == self.unk_id))

    def emitted_chars(self) -> frozenset[str] | None:
        """Every character the decoder can ever write (None: any character, as bytes can)."""
        return None

    def unwritable(self, text: str) -> list[str]:
        """The characters of ``text`` this model can never write, sorted: a stop string holding one
        can never be reached."""
        chars = self.emitted_chars()
        return [] if chars is None else sorted(set(text) - chars)


class StreamDecoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def feed(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])


class CharTokenizer(Tokenizer):
    kind = "char"
    unk_id = 0

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("a char vocabulary must be distinct single characters")
        self.itos: list[str] = [UNK] + chars
        # A dense codepoint → id table (one past the largest codepoint maps to <UNK>), so encoding
        # is one gather per character; ~1 MB even for the highest codepoints.
        size = max([ord(c) for c in chars] + [255]) + 2
        self._lut = np.zeros(size, dtype=ids_dtype(self.vocab_size))
        self._lut[[ord(c) for c in chars]] = np.arange(1, len(chars) + 1)
        self._decode_table = np.array([UNK_CHAR] + chars, dtype=object)

    @classmethod
    def fit(cls, text: str, *, min_count: int = 1, max_vocab: int | None = None) -> "CharTokenizer":
        """Every character of ``text``, or with ``min_count``/``max_vocab`` only the frequent ones
        (a big corpus can hold thousands of characters seen once or twice; they become <UNK>)."""
        if not text:
            raise TokenizerError("cannot build a vocabulary from empty text")
        counts = np.zeros(0x110000, dtype=np.int64)
        for start in range(0, len(text), ENCODE_CHUNK):
            cps = codepoints(text[start:start + ENCODE_CHUNK])
            counts[: 256 if cps.dtype == np.uint8 else 0x110000] += np.bincount(
                cps, minlength=256 if cps.dtype == np.uint8 else 0x110000)
        return cls.from_counts({chr(c): int(counts[c]) for c in np.flatnonzero(counts)},
                               min_count=min_count, max_vocab=max_vocab)

    @classmethod
    def from_counts(cls, counts: dict[str, int], *, min_count: int = 1,
                    max_vocab: int | None = None) -> "CharTokenizer":
        """The characters seen at least ``min_count`` times, at most ``max_vocab - 1`` of them (the
        most frequent; <UNK> takes the last place), in codepoint order."""
        if min_count < 1:
            raise ConfigError("--min-count must be ≥ 1")
        if max_vocab is not None and max_vocab < 2:
            raise ConfigError("--max-vocab must be ≥ 2 for a char model (it includes <UNK>)")
        ranked = sorted((ch for ch, n in counts.items() if n >= min_count), key=lambda ch: (-counts[ch], ord(ch)))
        if max_vocab is not None:
            ranked = ranked[: max_vocab - 1]
        return cls(sorted(ranked, key=ord))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> np.ndarray:
        out = np.empty(len(text), dtype=self._lut.dtype)
        for start in range(0, len(text), ENCODE_CHUNK):
            self.encode_into(text[start:start + ENCODE_CHUNK], out[start:start + ENCODE_CHUNK])
        return out

    def encode_into(self, text: str, out: np.ndarray) -> None:
        """Encode ``text`` into ``out[:len(text)]`` (e.g. a slice of a memmap), without temporaries
        bigger than the text."""
        cps = codepoints(text)
        if cps.dtype != np.uint8:  # the table covers every byte value; beyond it, <UNK>
            cps = np.minimum(cps, np.uint32(len(self._lut) - 1))
        np.take(self._lut, cps, out=out[: len(text)])

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise TokenizerError(f"token id out of range for a vocabulary of {self.vocab_size}")
        return "".join(self._decode_table[ids].tolist())

    def decoder(self) -> StreamDecoder:
        return _CharStreamDecoder(self)

    def unknown_symbols(self, text: str) -> list[str]:
        known = set(self.itos[1:])
        return sorted(set(text) - known)

    def emitted_chars(self) -> frozenset[str]:
        return frozenset(self.itos[1:]) | {UNK_CHAR}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.itos[1:]}


class _CharStreamDecoder(StreamDecoder):
    """One id → one character by a list lookup: the sampler calls this once per generated token."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self._table = [UNK_CHAR] + tokenizer.itos[1:]

    def feed(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._table):
            raise TokenizerError(f"token id {token_id} out of range for a vocabulary of {len(self._table)}")
        return self._table[token_id]


class ByteTokenizer(Tokenizer):
    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise TokenizerError("byte token ids must be in 0..255")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def decoder(self) -> StreamDecoder:
        return _ByteStreamDecoder()

    def unknown_symbols(self, text: str) -> list[str]:
        return []

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


class _ByteStreamDecoder(StreamDecoder):
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(bytes([token_id]))


_WHITESPACE = re.compile(r"[^\S\n]+")


class WordTokenizer(Tokenizer):
    kind = "word"
    unk_id = 0
    eos_id = 1

    def __init__(self, words: Iterable[str]) -> None:
        words = list(words)
        if UNK in words or EOS in words or len(set(words)) != len(words):
            raise TokenizerError("a word vocabulary must be distinct and must not contain <UNK>/<EOS>")
        if any(not w or any(ch.isspace() for ch in w) for w in words):
            raise TokenizerError("vocabulary words must be non-empty and contain no whitespace")
        self.itos: list[str] = [UNK, EOS] + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def split_lines(text: str) -> list[str]:
        """Lines without their ends; text ending in a newline has no extra empty line."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return lines

    @staticmethod
    def split(text: str) -> list[str]:
        """Words in order, with ``<EOS>`` at the end of every line (including an unterminated last one)."""
        tokens: list[str] = []
        for line in WordTokenizer.split_lines(text):
            tokens.extend(line.split())
            tokens.append(EOS)
        return tokens

    @classmethod
    def fit(cls, text: str, *, min_count: int = 1, max_vocab: int | None = None) -> "WordTokenizer":
        if min_count < 1:
            raise ConfigError("--min-count must be ≥ 1")
        if max_vocab is not None and max_vocab < 3:
            raise ConfigError("--max-vocab must be ≥ 3 for a word model (it includes <UNK> and <EOS>)")
        counts = Counter(w for w in cls.split(text) if w not in (EOS, UNK))
        if not counts:
            raise TokenizerError("cannot build a word vocabulary: the text has no words")
        # Most frequent first; ties in order of first appearance (Counter keeps insertion order).
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        words = [w for w, c in ranked if c >= min_count]
        if max_vocab is not None:
            words = words[: max_vocab - 2]
        return cls(words)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text``, ``<EOS>`` after every line. Memory is linear in the text: one dict lookup
        per word into a 4-byte array, a line at a time (never an array as wide as the longest word)."""
        get, unk = self.stoi.get, self.unk_id
        ids = array("i")
        for line in self.split_lines(text):
            words = line.split()
            ids.extend(map(get, words, repeat(unk, len(words))))
            ids.append(self.eos_id)
        return np.frombuffer(ids, dtype=np.int32).astype(ids_dtype(self.vocab_size)) if ids else \
            np.zeros(0, dtype=ids_dtype(self.vocab_size))

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        line: list[str] = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).tolist():
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} out of range for a vocabulary of {self.vocab_size}")
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.itos[i])
        if line:
            out.append(" ".join(line))
        return "".join(out)

    def decoder(self) -> StreamDecoder:
        return _WordStreamDecoder(self)

    def unknown_symbols(self, text: str) -> list[str]:
        return sorted({w for w in self.split(text) if w not in self.stoi})

    def emitted_chars(self) -> frozenset[str]:
        return frozenset("".join(self.itos)) | {" ", "\n"}  # <UNK> is written as itself

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "words": self.itos[2:]}


class _WordStreamDecoder(StreamDecoder):
    def __init__(self, tokenizer: WordTokenizer) -> None:
        self._tokenizer = tokenizer
        self._at_line_start = True

    def feed(self, token_id: int) -> str:
        if token_id == self._tokenizer.eos_id:
            self._at_line_start = True
            return "\n"
        word = self._tokenizer.itos[token_id]
        piece = word if self._at_line_start else " " + word
        self._at_line_start = False
        return piece


def normalize_words(text: str) -> str:
    """What a word model's decode(encode(text)) gives back for known words: one space between words."""
    return "".join(" ".join(line.split()) + "\n" for line in WordTokenizer.split_lines(text))


def extend_tokenizer(base: Tokenizer, seen: Tokenizer) -> Tokenizer:
    """``base`` with the symbols of ``seen`` (a tokenizer fitted on new text) that it lacks appended,
    so every old token keeps its id (fine-tuning with ``--extend-vocab``)."""
    if base.kind != seen.kind:
        raise TokenizerError(f"cannot extend a {base.kind} vocabulary with {seen.kind} tokens")
    if isinstance(base, CharTokenizer) and isinstance(seen, CharTokenizer):
        known = set(base.itos[1:])
        return CharTokenizer(base.itos[1:] + [c for c in seen.itos[1:] if c not in known])
    if isinstance(base, WordTokenizer) and isinstance(seen, WordTokenizer):
        return WordTokenizer(base.itos[2:] + [w for w in seen.itos[2:] if w not in base.stoi])
    return base  # bytes: nothing is ever unknown


def fit_tokenizer(kind: str, text: str, *, min_count: int = 1, max_vocab: int | None = None) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.fit(text, min_count=min_count, max_vocab=max_vocab)
    if kind == "word":
        return WordTokenizer.fit(text, min_count=min_count, max_vocab=max_vocab)
    if kind == "byte":
        return ByteTokenizer()
    raise TokenizerError(f"unknown tokenizer {kind!r}; choose char, word or byte")


def _has_surrogate(symbols: list[str]) -> bool:
    """Lone UTF-16 surrogates: valid in JSON, but no UTF-8 text holds them and no terminal prints them."""
    return any(0xD800 <= ord(ch) <= 0xDFFF for symbol in symbols for ch in symbol)


def tokenizer_from_dict(data: Any) -> Tokenizer:
    if not isinstance(data, dict) or "kind" not in data:
        raise TokenizerError("tokenizer description must be an object with a 'kind'")
    for key in ("chars", "words"):
        symbols = data.get(key)
        if isinstance(symbols, list) and all(isinstance(s, str) for s in symbols) and _has_surrogate(symbols):
            raise TokenizerError(f"the {key} vocabulary holds a lone surrogate code point (U+D800–U+DFFF), "
                                 f"which is not text")
    kind = data["kind"]
    try:
        if kind == "char":
            chars = data["chars"]
            if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
                raise TokenizerError("char vocabulary must be a list of strings")
            return CharTokenizer(chars)
        if kind == "word":
            words = data["words"]
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise TokenizerError("word vocabulary must be a list of strings")
            return WordTokenizer(words)
        if kind == "byte":
            return ByteTokenizer()
    except KeyError as exc:
        raise TokenizerError(f"{kind} tokenizer description lacks {exc.args[0]!r}") from None
    raise TokenizerError(f"unknown tokenizer kind {kind!r}")
