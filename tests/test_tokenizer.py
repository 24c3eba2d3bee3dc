import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.errors import TokenizerError
from charlm.data.tokenizer import (EOS, UNK, ByteTokenizer, CharTokenizer, WordTokenizer, fit_tokenizer,
                              normalize_words, tokenizer_from_dict)


def test_char_round_trip_and_unknown():
    tok = CharTokenizer.fit("hello world\n")
    ids = tok.encode("hello")
    assert ids.dtype == np.uint8 and tok.decode(ids) == "hello"
    assert tok.vocab_size == len(set("hello world\n")) + 1
    ids = tok.encode("hex!")
    assert tok.count_unknown(ids) == 2 and tok.unknown_symbols("hex!") == ["!", "x"]
    assert tok.decode(ids) == "he\ufffd\ufffd"


def test_char_encode_matches_a_python_loop():
    text = "The quick brown fox — jumps over the lazy dog. Ünïcödé 🙂\n" * 3
    tok = CharTokenizer.fit(text)
    expected = [tok.itos.index(c) for c in text]
    assert tok.encode(text).tolist() == expected


def test_word_tokenizer_eos_unk_and_frequency_cutoff():
    text = "the cat sat\nthe dog sat\nthe end\n"
    tok = WordTokenizer.fit(text, min_count=2)
    assert tok.itos[:2] == [UNK, EOS] and tok.itos[2] == "the"
    assert set(tok.itos[2:]) == {"the", "sat"}
    ids = tok.encode("the cat sat\n")
    assert tok.decode(ids) == "the <UNK> sat\n"
    assert tok.count_unknown(ids) == 1
    assert tok.encode("a b").tolist()[-1] == tok.eos_id  # an unterminated last line still ends in <EOS>
    capped = WordTokenizer.fit(text, max_vocab=3)
    assert capped.itos == [UNK, EOS, "the"]


def test_byte_tokenizer_never_unknown():
    tok = ByteTokenizer()
    text = "naïve café 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text
    decoder = tok.decoder()
    assert "".join(decoder.feed(int(i)) for i in ids) == text  # streaming across split characters


@pytest.mark.parametrize("kind", ["char", "word", "byte"])
def test_to_dict_round_trip(kind):
    text = "alpha beta\ngamma alpha\n"
    tok = fit_tokenizer(kind, text)
    again = tokenizer_from_dict(tok.to_dict())
    assert again.vocab_size == tok.vocab_size
    assert again.encode(text).tolist() == tok.encode(text).tolist()


def test_invalid_descriptions_raise():
    for bad in [None, {}, {"kind": "bpe"}, {"kind": "char"}, {"kind": "char", "chars": ["ab"]},
                {"kind": "word", "words": ["a b"]}, {"kind": "word", "words": [UNK]}]:
        with pytest.raises(TokenizerError):
            tokenizer_from_dict(bad)


VOCAB_TEXT = "abcXYZ \n\t.,;éß日本語🙂\u0301"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=VOCAB_TEXT))
def test_char_round_trip_property(text):
    tok = CharTokenizer.fit(VOCAB_TEXT)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_property(text):
    tok = ByteTokenizer()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates are not text a file can hold
        return
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["the", "cat", "sat", "on", "mat", "réseau", "日本"]), max_size=6),
                max_size=6), st.sampled_from([" ", "  ", "\t", " \t "]))
def test_word_round_trip_property(lines, separator):
    vocab = WordTokenizer(["the", "cat", "sat", "on", "mat", "réseau", "日本"])
    text = "".join(separator + separator.join(words) + separator + "\n" for words in lines)
    assert vocab.decode(vocab.encode(text)) == normalize_words(text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_encoding_never_crashes(text):
    char = CharTokenizer.fit("abc\n")
    word = WordTokenizer.fit("a b c\n")
    for tok in (char, word):
        ids = tok.encode(text)
        assert ids.min(initial=0) >= 0 and ids.max(initial=0) < tok.vocab_size
    ByteTokenizer().encode(text)


def test_char_stream_decoder_matches_decode():
    from charlm.errors import TokenizerError

    tok = CharTokenizer.fit("héllo wörld\n")
    ids = tok.encode("wöh?\n")  # '?' is unknown
    decoder = tok.decoder()
    assert "".join(decoder.feed(int(i)) for i in ids) == tok.decode(ids)
    with pytest.raises(TokenizerError):
        decoder.feed(tok.vocab_size)
