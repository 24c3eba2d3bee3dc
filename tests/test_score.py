"""Per-line scoring: the batched path equals a token-by-token loop, and a trained model ranks lines."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlm.config import ModelConfig
from charlm.errors import ConfigError, UsageError
from charlm.model.lm import RNNLM
from charlm.infer.score import LineScore, LineSelection, NumberedScore, line_tokens, score_lines
from charlm.data.tokenizer import ByteTokenizer, CharTokenizer, WordTokenizer

from conftest import TINY_TEXT

pytestmark = pytest.mark.usefixtures("one_thread")


LINES = ["First Citizen:", "", "Speak, speak.", "You are all resolved rather to die than to famish?",
         "Zebra unknown words ✓", "a\n", "All:"]


def reference_nats(model, context, targets):
    """One line, one token at a time, from a fresh state."""
    total, state, current = 0.0, None, context
    with torch.no_grad():
        for target in targets:
            logits, state = model(torch.tensor([[int(current)]]), state)
            total += F.cross_entropy(logits[0].double(), torch.tensor([int(target)])).item()
            current = target
    return total


def make_model(vocab_size, cell, seed=0):
    torch.manual_seed(seed)
    return RNNLM(ModelConfig(vocab_size=vocab_size, cell=cell, hidden_size=16, embed_size=8, num_layers=2))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
@pytest.mark.parametrize("kind", ["char", "word", "byte"])
@pytest.mark.parametrize("include_end", [True, False])
def test_batched_scores_equal_a_token_by_token_loop(cell, kind, include_end):
    tokenizer = {"char": CharTokenizer.fit(TINY_TEXT), "word": WordTokenizer.fit(TINY_TEXT),
                 "byte": ByteTokenizer()}[kind]
    model = make_model(tokenizer.vocab_size, cell)
    # Tiny batches and windows so padding, several batches and carried state are all exercised.
    scores = score_lines(model, tokenizer, LINES, include_end=include_end, batch_size=3, window=4)
    assert [s.index for s in scores] == list(range(len(LINES)))
    for line, score in zip(LINES, scores):
        enc = line_tokens(tokenizer, line.rstrip("\n"), include_end=include_end)
        assert score.num_tokens == len(enc.targets)
        assert score.total_nats == pytest.approx(reference_nats(model, enc.context, enc.targets), abs=1e-4)
        if score.num_tokens:
            assert score.nats_per_token == pytest.approx(score.total_nats / score.num_tokens)
            assert score.perplexity == pytest.approx(math.exp(score.nats_per_token))
            assert score.bits_per_char == pytest.approx(score.total_nats / math.log(2) / score.num_chars)
        else:
            assert score.total_nats == 0.0 and math.isnan(score.perplexity)


def test_what_each_tokenizer_reads_first_and_predicts_last():
    chars = CharTokenizer.fit("ab\nc")
    enc = line_tokens(chars, "abc")
    assert enc.context == chars.encode("\n")[0]
    assert chars.decode(enc.targets) == "abc\n" and enc.num_chars == 4
    assert chars.decode(line_tokens(chars, "abc", include_end=False).targets) == "abc"

    words = WordTokenizer.fit("the cat sat\n")
    enc = line_tokens(words, "the cat")
    assert enc.context == words.eos_id
    assert [words.itos[i] for i in enc.targets] == ["the", "cat", "<EOS>"]
    assert [words.itos[i] for i in line_tokens(words, "the cat", include_end=False).targets] == ["the", "cat"]
    assert [words.itos[i] for i in line_tokens(words, "").targets] == ["<EOS>"]

    enc = line_tokens(ByteTokenizer(), "é")
    assert enc.context == 10 and enc.targets.tolist() == [0xC3, 0xA9, 10] and enc.num_chars == 2


def test_a_char_model_without_newline_scores_from_the_second_character():
    chars = CharTokenizer.fit("abcabc")
    enc = line_tokens(chars, "cab")
    assert chars.decode([enc.context]) == "c" and chars.decode(enc.targets) == "ab" and enc.num_chars == 2
    model = make_model(chars.vocab_size, "gru")
    (score,) = score_lines(model, chars, ["cab"])
    assert score.total_nats == pytest.approx(reference_nats(model, enc.context, enc.targets), abs=1e-4)
    (single,) = score_lines(model, chars, ["c"])
    assert single.num_tokens == 0 and single.total_nats == 0.0


def test_scores_do_not_depend_on_the_batch_the_line_is_in():
    tokenizer = CharTokenizer.fit(TINY_TEXT)
    model = make_model(tokenizer.vocab_size, "lstm")
    alone = [score_lines(model, tokenizer, [line])[0].total_nats for line in LINES]
    together = [s.total_nats for s in score_lines(model, tokenizer, LINES, batch_size=64)]
    assert together == pytest.approx(alone, abs=1e-4)


def test_unknown_tokens_are_counted_and_training_mode_restored():
    tokenizer = WordTokenizer.fit(TINY_TEXT)
    model = make_model(tokenizer.vocab_size, "lstm").train()
    (score,) = score_lines(model, tokenizer, ["Zebra speak. quux"])
    assert score.num_unknown == 2 and model.training


def test_bad_batch_options_are_config_errors():
    tokenizer = ByteTokenizer()
    with pytest.raises(ConfigError):
        score_lines(make_model(256, "rnn"), tokenizer, ["x"], batch_size=0)


def test_a_trained_model_prefers_a_line_from_its_training_text():
    torch.manual_seed(0)
    tokenizer = CharTokenizer.fit(TINY_TEXT)
    model = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, cell="lstm", hidden_size=48, embed_size=16,
                              num_layers=1))
    ids = torch.from_numpy(tokenizer.encode(TINY_TEXT).astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    seq_len, batch = 32, 16
    for _ in range(150):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
        logits, _ = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seen = "Before we proceed any further, hear me speak."
    garbled = "".join(np.random.default_rng(0).permutation(list(seen)))  # the same characters, shuffled
    scores = score_lines(model, tokenizer, [garbled, seen])
    assert scores[1].nats_per_token < scores[0].nats_per_token - 1.0
    assert scores[1].perplexity < 3.0 < scores[0].perplexity


def test_a_line_selection_numbers_leaves_out_sorts_and_cuts():
    text = "first\n\n  \nsecond\nthird\n"
    assert LineSelection().numbered(text) == [(1, "first"), (4, "second"), (5, "third")]
    assert LineSelection(skip_empty=False).numbered(text) == [(1, "first"), (2, ""), (3, "  "), (4, "second"),
                                                              (5, "third")]
    assert LineSelection().numbered("") == [] and LineSelection(skip_empty=False).numbered("\n") == [(1, "")]

    def row(line, nats, tokens=1):
        return NumberedScore(line, LineScore(index=line, text=str(line), num_tokens=tokens, total_nats=nats,
                                             num_chars=tokens, num_unknown=0))

    rows = [row(1, 2.0), row(2, 0.0, tokens=0), row(3, 1.0), row(4, 3.0)]  # line 2 scored nothing: NaN
    assert [r.line for r in LineSelection().arrange(rows)] == [1, 2, 3, 4]
    assert [r.line for r in LineSelection(sort="best").arrange(rows)] == [3, 1, 4, 2]
    assert [r.line for r in LineSelection(sort="worst", top=2).arrange(rows)] == [2, 4]
    assert LineSelection(sort="best", top=10).arrange(rows) == LineSelection(sort="best").arrange(rows)
    assert row(7, 1.5).to_dict() == {"line": 7, **row(7, 1.5).score.to_dict()}


@pytest.mark.parametrize("options, message", [
    ({"sort": "sideways"}, "--sort must be input, best or worst (got 'sideways')"),
    ({"top": 0}, "--top must be a whole number ≥ 1 (got 0)"),
    ({"top": True}, "--top must be a whole number ≥ 1 (got True)"),
    ({"top": 2.0}, "--top must be a whole number ≥ 1 (got 2.0)"),
    ({"skip_empty": 1}, "skip_empty must be True or False (got int)"),
])
def test_a_line_selection_refuses_what_it_cannot_honour(options, message):
    with pytest.raises(UsageError) as refused:
        LineSelection(**options)
    assert str(refused.value) == message


def test_score_text_refuses_a_text_without_lines_before_looking_for_a_model(tmp_path):
    from charlm.api import score_text

    with pytest.raises(UsageError, match=r"^notes\.txt: has no lines to score$"):
        score_text("\n  \n", root=tmp_path / "nothing-here", name="notes.txt")
    with pytest.raises(UsageError, match="text must be a string"):
        score_text(b"bytes\n", root=tmp_path)
