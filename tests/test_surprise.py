"""Per-piece log-probabilities (the playground's surprise view): a token-by-token reference, the
pieces a reader sees, and agreement with the evaluator and the line scorer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from charlm.api import LanguageModel
from charlm.config import ModelConfig
from charlm.errors import UsageError
from charlm.model.lm import RNNLM
from charlm.infer.evaluate import evaluate
from charlm.infer.score import score_lines
from charlm.infer.surprise import line_logprobs, line_start, text_logprobs, token_label
from charlm.data.tokenizer import ByteTokenizer, CharTokenizer, WordTokenizer

from conftest import TINY_TEXT

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "First Citizen:\nSpeak, speak.\nZebra ✓ unknown\n"


def tokenizer_of(kind):
    if kind == "char":
        return CharTokenizer.fit(TINY_TEXT)
    if kind == "word":
        return WordTokenizer.fit(TINY_TEXT)
    return ByteTokenizer()


def make_model(vocab_size, cell="lstm", seed=0):
    torch.manual_seed(seed)
    model = RNNLM(ModelConfig(vocab_size=vocab_size, cell=cell, hidden_size=16, embed_size=8, num_layers=2))
    return model.eval()


def reference(model, sequence):
    """log p(sequence[t] | sequence[:t]) for t ≥ 1, and the log-softmax at each step, one token at a time."""
    logprobs, dists, state = [], [], None
    with torch.no_grad():
        for current, target in zip(sequence[:-1], sequence[1:]):
            logits, state = model(torch.tensor([[int(current)]]), state)
            dist = torch.log_softmax(logits[0, 0].double(), dim=-1)
            logprobs.append(float(dist[int(target)]))
            dists.append(dist)
    return logprobs, dists


@pytest.mark.parametrize("kind", ["char", "byte", "word"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "peephole"])
def test_pieces_equal_a_token_by_token_loop(kind, cell):
    tokenizer = tokenizer_of(kind)
    model = make_model(tokenizer.vocab_size, cell)
    ids = tokenizer.encode(TEXT).astype(np.int64)
    sequence = np.concatenate([[line_start(tokenizer)], ids])
    expected, dists = reference(model, sequence)
    pieces = text_logprobs(model, tokenizer, TEXT, top=3, window=7)  # windows carry the state
    assert "".join(p.text for p in pieces) == TEXT  # word pieces keep the words, <UNK> or not
    position = 0
    for piece in pieces:
        span = len(piece.text.encode("utf-8")) if kind == "byte" else 1
        assert piece.logprob == pytest.approx(sum(expected[position:position + span]), abs=1e-5)
        best = torch.topk(dists[position], 3)
        assert [label for label, _ in piece.top] == [token_label(tokenizer, int(i)) for i in best.indices]
        assert [lp for _, lp in piece.top] == pytest.approx(best.values.tolist(), abs=1e-5)
        position += span
    assert position == len(ids)
    unknown = {p.text.strip() for p in pieces if p.unknown}
    assert unknown == set(tokenizer.unknown_symbols(TEXT)) and (kind == "byte" or "✓" in unknown)
    if kind == "word":
        assert [p.text for p in pieces[:3]] == ["First", " Citizen:", "\n"]


@pytest.mark.parametrize("kind", ["char", "byte", "word"])
@pytest.mark.parametrize("text", [TEXT, "✓é " + TEXT], ids=["ascii", "multibyte-first"])
def test_without_a_line_start_the_sum_is_the_evaluators_total(kind, text):
    tokenizer = tokenizer_of(kind)
    model = make_model(tokenizer.vocab_size)
    pieces = text_logprobs(model, tokenizer, text, top=0, from_line_start=False)
    # The first token is only read: a one-token first piece has no log-probability; a byte
    # model's "✓" (3 bytes) counts its last two.
    assert (pieces[0].logprob is None) == (kind != "byte" or text[0] != "✓")
    assert all(p.top == () for p in pieces)
    result = evaluate(model, tokenizer.encode(text))
    assert sum(p.logprob for p in pieces if p.logprob is not None) == pytest.approx(-result.total_nats, rel=1e-5)


def test_a_long_computation_stops_when_asked():
    from charlm.errors import Cancelled

    tokenizer = tokenizer_of("char")
    model = make_model(tokenizer.vocab_size)
    calls = []

    def stop_on_third() -> bool:
        calls.append(1)
        return len(calls) >= 3

    long_text = TINY_TEXT * 20
    for run in (lambda: text_logprobs(model, tokenizer, long_text, window=64, should_stop=stop_on_third),
                lambda: evaluate(model, tokenizer.encode(long_text), seq_len=64, should_stop=stop_on_third),
                lambda: score_lines(model, tokenizer, [long_text], window=64, should_stop=stop_on_third)):
        calls.clear()
        with pytest.raises(Cancelled):
            run()
        assert len(calls) == 3
    assert not model.training


@pytest.mark.parametrize("kind", ["char", "byte", "word", "char without newline"])
@pytest.mark.parametrize("include_end", [True, False])
def test_a_lines_pieces_add_up_to_its_score(kind, include_end):
    tokenizer = (CharTokenizer(sorted(set(TINY_TEXT) - {"\n"})) if kind == "char without newline"
                 else tokenizer_of(kind))
    model = make_model(tokenizer.vocab_size)
    lines = ["Speak, speak.", "", "a", "Zebra ✓ unknown\n"]
    for line, scored in zip(lines, score_lines(model, tokenizer, lines, include_end=include_end), strict=True):
        pieces = line_logprobs(model, tokenizer, line, include_end=include_end)
        predicted = [p.logprob for p in pieces if p.logprob is not None]
        if kind != "byte":  # a byte model's pieces are characters, its tokens bytes
            assert len(predicted) == scored.num_tokens, (line, pieces)
        assert sum(predicted) == pytest.approx(-scored.total_nats, rel=1e-5, abs=1e-6)
        ends = include_end and kind != "char without newline"
        assert (bool(pieces) and pieces[-1].text == "\n") == ends


def test_a_byte_model_labels_bytes_and_reads_lone_surrogates():
    tokenizer = ByteTokenizer()
    model = make_model(256)
    pieces = text_logprobs(model, tokenizer, "é\ud800x", top=256)
    assert [p.text for p in pieces] == ["é", "\ud800", "x"]
    labels = {label for label, _ in pieces[0].top}
    assert "a" in labels and "\\xc3" in labels and len(labels) == 256
    assert all(math.isfinite(p.logprob) for p in pieces)


def test_empty_text_and_bad_arguments(trained_run):
    tokenizer = tokenizer_of("char")
    model = make_model(tokenizer.vocab_size)
    assert text_logprobs(model, tokenizer, "") == []
    assert text_logprobs(model, tokenizer, "", from_line_start=False) == []
    for top in (-1, tokenizer.vocab_size + 1, 1.5, True):
        with pytest.raises(UsageError, match="top must be"):
            text_logprobs(model, tokenizer, "abc", top=top)
    with pytest.raises(UsageError, match="at most 5"):
        text_logprobs(model, tokenizer, "abcdef", max_tokens=5)
    from charlm.model.checkpoint import load_checkpoint, resolve_checkpoint

    lm = LanguageModel(load_checkpoint(resolve_checkpoint(trained_run)))
    with pytest.raises(UsageError, match="text must be a string"):
        lm.logprobs(b"abc")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="from_line_start"):
        lm.logprobs("abc", from_line_start="yes")  # type: ignore[arg-type]
    assert [p.text for p in lm.logprobs("ab")] == ["a", "b"]
    for option in ("include_end", "logprobs"):
        with pytest.raises(UsageError, match=f"{option} must be True or False"):
            lm.score(["ab"], **{option: 1})
    (line,) = lm.score(["ab"], logprobs=True, top=2)
    assert [p.text for p in line.logprobs] == ["a", "b", "\n"] and len(line.logprobs[0].top) == 2
    assert lm.score(["ab"])[0].logprobs is None

