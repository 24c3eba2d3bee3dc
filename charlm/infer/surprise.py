"""How surprised a model is by each piece of a text: its log-probability, and what it expected instead.

A *piece* is what a reader sees: a character for char and byte models (a character a byte model
reads as several UTF-8 bytes gets the sum of their log-probabilities), a word or a line end for
word models. Each piece carries the model's most likely tokens at the point it was predicted.

``from_line_start`` (as ``charlm score``) reads the line-start token first, so the first piece is
predicted too; without it (as ``charlm perplexity``) the first token is only read, and its piece's
log-probability is ``None`` (a byte model's multi-byte first character counts its later bytes). Either way the log-probabilities add up to minus the evaluator's
total nats for the same tokens (tests/test_surprise.py checks both against it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from charlm.config import brief
from charlm.errors import UsageError, stop_if_asked
from charlm.model.lm import RNNLM
from charlm.infer.score import line_start, strip_line_end
from charlm.data.tokenizer import EOS, Tokenizer, WordTokenizer


@dataclass(frozen=True)
class PieceLogprob:
    text: str  # as it appears in the text (a word model's pieces: " word", "word" at a line start, "\n")
    logprob: float | None  # natural log; None: nothing before it to predict it from
    top: tuple[tuple[str, float], ...]  # the likeliest tokens where the piece was predicted, best first
    unknown: bool = False  # the model's vocabulary lacks it: scored as <UNK>

    def to_dict(self) -> dict:
        """As JSON gives it (HTTP and ``--json``): ``top`` as [token, logprob] pairs, ``unknown`` only when true."""
        return {"text": self.text, "logprob": self.logprob, "top": [list(pair) for pair in self.top],
                **({"unknown": True} if self.unknown else {})}


def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as text for a person: a character, a word, ``<EOS>``, or a byte that is not a whole
    character on its own as ``\\xNN``."""
    if tokenizer.kind == "byte":
        return chr(token_id) if token_id < 0x80 else f"\\x{token_id:02x}"
    return tokenizer.itos[token_id]  # type: ignore[attr-defined]


def _pieces(tokenizer: Tokenizer, text: str, ids: np.ndarray) -> list[tuple[str, int, bool]]:
    """(piece text, tokens it spans, unknown) for each piece, covering ``ids`` in order."""
    if tokenizer.kind == "char":
        unk = tokenizer.unk_id
        return [(ch, 1, i == unk) for ch, i in zip(text, ids.tolist())]
    if tokenizer.kind == "byte":
        return [(ch, len(ch.encode("utf-8", "surrogatepass")), False) for ch in text]
    pieces, at_line_start = [], True
    for word, token_id in zip(WordTokenizer.split(text), ids.tolist()):
        if word == EOS:
            pieces.append(("\n", 1, False))
            at_line_start = True
        else:
            pieces.append((word if at_line_start else " " + word, 1, token_id == tokenizer.unk_id))
            at_line_start = False
    return pieces


@torch.inference_mode()
def text_logprobs(model: RNNLM, tokenizer: Tokenizer, text: str, *, top: int = 5, from_line_start: bool = True,
                  window: int = 512, max_tokens: int | None = None,
                  should_stop: Callable[[], bool] | None = None) -> list[PieceLogprob]:
    """Each piece of ``text`` with its log-probability under ``model`` and the ``top`` likeliest
    tokens where it was predicted. ``max_tokens`` refuses longer texts (``UsageError``);
    ``should_stop`` is asked before each window (True raises ``Cancelled``)."""
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= tokenizer.vocab_size:
        raise UsageError(f"top must be a whole number in [0, {tokenizer.vocab_size}] (got {brief(top)})")
    ids = tokenizer.encode(text).astype(np.int64)
    if max_tokens is not None and len(ids) > max_tokens:
        raise UsageError(f"the text is {len(ids):,} tokens; per-token log-probabilities are given for at most "
                         f"{max_tokens:,}")
    context = line_start(tokenizer) if from_line_start else None
    sequence = np.concatenate([[context], ids]) if context is not None else ids
    first = 1 if context is not None else 0  # sequence[first] is ids[0]
    device = model.embedding.weight.device
    token_logprob = np.full(len(ids), np.nan)
    top_ids = np.zeros((len(ids), top), dtype=np.int64)
    top_logprob = np.zeros((len(ids), top))
    was_training = model.training
    model.eval()
    try:
        state = None
        inputs = torch.from_numpy(sequence[:-1]).to(device)
        targets = torch.from_numpy(sequence[1:]).to(device)
        for start in range(0, len(inputs), window):
            stop_if_asked(should_stop)
            logits, state = model(inputs[None, start:start + window], state)
            logp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V)
            picked = logp.gather(1, targets[start:start + window, None])[:, 0]
            at = start + 1 - first  # the ids index this window's first prediction is for
            token_logprob[at:at + len(picked)] = picked.double().cpu().numpy()
            if top:
                values, indices = logp.topk(top, dim=-1)
                top_ids[at:at + len(picked)] = indices.cpu().numpy()
                top_logprob[at:at + len(picked)] = values.double().cpu().numpy()
    finally:
        model.train(was_training)
    out: list[PieceLogprob] = []
    position = 0
    for piece, span, unknown in _pieces(tokenizer, text, ids):
        lp = token_logprob[position:position + span]
        predicted = ~np.isnan(lp)
        # Without a line start the first token is only read: a byte model's first character then
        # counts the bytes after its first (the total stays the evaluator's), and is None when it
        # is one byte.
        first = position + int(np.argmax(predicted))
        alternatives = () if not predicted.any() else tuple(
            (token_label(tokenizer, int(i)), float(v)) for i, v in zip(top_ids[first], top_logprob[first]))
        out.append(PieceLogprob(piece, float(lp[predicted].sum()) if predicted.any() else None, alternatives,
                                unknown))
        position += span
    return out


def line_logprobs(model: RNNLM, tokenizer: Tokenizer, line: str, *, include_end: bool = True,
                  top: int = 5, should_stop: Callable[[], bool] | None = None) -> list[PieceLogprob]:
    """The pieces of one line as ``score_lines`` scores it: from a line start, its line break the
    last piece when ``include_end``; they add up to minus that line's ``total_nats``."""
    line = strip_line_end(line)
    pieces = text_logprobs(model, tokenizer, line + ("\n" if include_end else ""), top=top,
                           should_stop=should_stop)
    # encode() ends every word-model line with <EOS>, asked for or not; a char model that never
    # saw a newline reads "\n" as <UNK>, and its lines are scored without an end.
    if pieces and ((tokenizer.kind == "word" and not include_end) or (include_end and line_start(tokenizer) is None)):
        pieces = pieces[:-1]
    return pieces

