"""Score lines of text one by one: how surprised is the model by each line, on its own?

Every line starts from a fresh (zero) state and from the context a model has seen before a line
in training, so its first token is scored too:

* char models read a newline first (``"\\n"`` precedes every line of a training text);
* word models read ``<EOS>`` first (the token that ends every line in training);
* byte models read the newline byte first.

By default a line is scored as a *complete* line: its line break (``"\\n"``, or ``<EOS>`` for word
models) is the last token predicted, so a line that stops mid-sentence scores worse than one that
ends where lines end, and word-model perplexities count ``<EOS>`` as PTB perplexities do. Pass
``include_end=False`` to score only the line's own tokens.

Lines are scored in batches: sorted by length, right-padded, the padding masked out of the loss,
and long lines run in windows with the state carried, so memory stays bounded. A unidirectional
RNN never lets padding after a token change that token's prediction, so this equals scoring each
line alone (the tests check it against a token-by-token loop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from charlm.errors import ConfigError, UsageError, stop_if_asked
from charlm.infer.evaluate import EvalResult
from charlm.model.lm import RNNLM
from charlm.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class LineScore:
    index: int  # position in the input, so results can be re-sorted and still name their line
    text: str
    num_tokens: int  # tokens predicted (the line end included when include_end)
    total_nats: float
    num_chars: int  # characters those tokens cover (the line break counts as one)
    num_unknown: int
    logprobs: tuple | None = None  # its pieces (surprise.PieceLogprob), when asked for

    def to_dict(self) -> dict:
        """As JSON gives it (``/v1/score`` and ``charlm score --json``)."""
        return {"index": self.index, "text": self.text, "tokens": self.num_tokens, "total_nats": self.total_nats,
                "nats_per_token": self.nats_per_token, "perplexity": self.perplexity,
                "bits_per_char": self.bits_per_char, "unknown_tokens": self.num_unknown,
                **({"logprobs": [p.to_dict() for p in self.logprobs]} if self.logprobs is not None else {})}

    @property
    def _result(self) -> EvalResult:  # the evaluator's figures, from the same totals
        return EvalResult(self.total_nats, self.num_tokens)

    @property
    def nats_per_token(self) -> float:
        return self._result.nats_per_token

    @property
    def perplexity(self) -> float:
        return self._result.perplexity if self.num_tokens else float("nan")

    @property
    def bits_per_char(self) -> float:
        """Comparable across tokenizers: total bits over the characters scored."""
        return self._result.bits_per_char(self.num_chars)


def strip_line_end(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith("\n") else line


@dataclass(frozen=True)
class LineTokens:
    context: int | None  # the token read before the line; None: nothing to score
    targets: np.ndarray  # the tokens predicted, int64
    num_chars: int  # the characters the targets cover


def line_start(tokenizer: Tokenizer) -> int | None:
    """The token that stands before every line in training: ``<EOS>`` (word) or the newline; None
    for a char model that never saw a newline."""
    if tokenizer.eos_id is not None:
        return int(tokenizer.eos_id)
    newline = int(tokenizer.encode("\n")[0])
    return None if tokenizer.unk_id is not None and newline == tokenizer.unk_id else newline


def line_tokens(tokenizer: Tokenizer, line: str, *, include_end: bool = True) -> LineTokens:
    """What ``score_lines`` reads and predicts for one line (without its line break).

    A char model whose vocabulary lacks ``"\n"`` has nothing that can stand before a line: its
    first character becomes the context and is not scored, and no line end is scored either.
    """
    end = 1 if include_end else 0
    ids = tokenizer.encode(line).astype(np.int64)
    start = line_start(tokenizer)
    if start is None:
        if not len(ids):
            return LineTokens(None, ids, 0)
        return LineTokens(int(ids[0]), ids[1:], len(line) - 1)
    if tokenizer.kind == "word" and len(ids) and ids[-1] == start:
        ids = ids[:-1]  # encode() ends every line with <EOS>; add it back only if asked
    if include_end:
        ids = np.append(ids, start)  # the line end is the line-start token: <EOS> or the newline
    return LineTokens(start, ids, len(line) + end if len(ids) else 0)


@torch.inference_mode()
def score_lines(model: RNNLM, tokenizer: Tokenizer, lines: Sequence[str], *, include_end: bool = True,
                batch_size: int = 64, max_batch_tokens: int = 16384, window: int = 256,
                should_stop: Callable[[], bool] | None = None) -> list[LineScore]:
    """Total nats, tokens, nats/token and perplexity of each line, each scored from a fresh state.

    A trailing ``"\n"`` on a line (as ``readlines()`` leaves it) is dropped first; the line break
    is then scored or not according to ``include_end``. ``batch_size`` and ``max_batch_tokens``
    bound a batch (lines × longest line); ``window`` bounds the time steps run at once.
    ``should_stop`` is asked before each window; True raises ``Cancelled``.
    """
    if batch_size < 1 or max_batch_tokens < 1 or window < 1:
        raise ConfigError("batch_size, max_batch_tokens and window must be ≥ 1")
    texts = [strip_line_end(line) for line in lines]
    encoded = [line_tokens(tokenizer, text, include_end=include_end) for text in texts]
    device = model.embedding.weight.device
    totals = [0.0] * len(texts)

    was_training = model.training
    model.eval()
    try:
        # Longest first, so each batch's first line fixes its padded length.
        order = sorted((i for i, enc in enumerate(encoded) if enc.context is not None and len(enc.targets)),
                       key=lambda i: -len(encoded[i].targets))
        start = 0
        while start < len(order):
            longest = len(encoded[order[start]].targets)
            rows = max(1, min(batch_size, max_batch_tokens // longest))
            batch = order[start:start + rows]
            start += rows
            x = np.zeros((len(batch), longest), dtype=np.int64)
            y = np.zeros((len(batch), longest), dtype=np.int64)
            mask = np.zeros((len(batch), longest), dtype=bool)
            for row, i in enumerate(batch):
                enc = encoded[i]
                n = len(enc.targets)
                x[row, 0] = enc.context
                x[row, 1:n] = enc.targets[:-1]
                y[row, :n] = enc.targets
                mask[row, :n] = True
            xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            mt = torch.from_numpy(mask).to(device)
            nats = torch.zeros(len(batch), dtype=torch.float64, device=device)
            state = None
            for t0 in range(0, longest, window):
                stop_if_asked(should_stop)
                logits, state = model(xt[:, t0:t0 + window], state)  # (B, T, V)
                loss = F.cross_entropy(logits.float().transpose(1, 2), yt[:, t0:t0 + window],
                                       reduction="none")  # (B, T)
                nats += (loss.double() * mt[:, t0:t0 + window]).sum(dim=1)
            for row, i in enumerate(batch):
                totals[i] = float(nats[row].item())
    finally:
        model.train(was_training)

    return [LineScore(index=i, text=text, num_tokens=int(len(enc.targets)), total_nats=totals[i],
                      num_chars=enc.num_chars, num_unknown=tokenizer.count_unknown(enc.targets))
            for i, (text, enc) in enumerate(zip(texts, encoded))]


# ── a text's lines, chosen, scored and arranged (charlm score) ──────────────────────────────────

SORTS = ("input", "best", "worst")


@dataclass(frozen=True)
class NumberedScore:
    """A line's score with the line's number in its text (from 1)."""

    line: int
    score: LineScore

    def to_dict(self) -> dict:
        """As ``charlm score --json`` gives each line."""
        return {"line": self.line, **self.score.to_dict()}


@dataclass(frozen=True)
class LineSelection:
    """Which lines of a text are scored and shown, and in what order: empty lines left out when
    ``skip_empty``; ``sort`` input (text order), best (most likely first) or worst; the first ``top``
    after sorting (None: all). Made before the text is read, it refuses a bad option at once."""

    sort: str = "input"
    top: int | None = None
    skip_empty: bool = True

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise UsageError(f"--sort must be input, best or worst (got {self.sort!r})")
        if self.top is not None and (isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 1):
            raise UsageError(f"--top must be a whole number ≥ 1 (got {self.top!r})")
        if not isinstance(self.skip_empty, bool):
            raise UsageError(f"skip_empty must be True or False (got {type(self.skip_empty).__name__})")

    def numbered(self, text: str) -> list[tuple[int, str]]:
        """The lines of ``text`` to score, each with its number; a final line break ends the last line."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [(n, line) for n, line in enumerate(lines, 1) if line.strip() or not self.skip_empty]

    def arrange(self, rows: Sequence[NumberedScore]) -> list[NumberedScore]:
        """``rows`` in the chosen order (a line with nothing scored, NaN, counts as the worst), cut to ``top``."""
        rows = list(rows)
        if self.sort != "input":
            rows.sort(key=lambda r: (math.isnan(r.score.nats_per_token), r.score.nats_per_token),
                      reverse=self.sort == "worst")
        return rows[:self.top] if self.top else rows


@dataclass(frozen=True)
class ScoredText:
    """A text's lines scored on their own and arranged as a ``LineSelection`` asks."""

    checkpoint: Path
    tokenizer: str  # the model's tokenizer kind: char, word or byte
    include_end: bool
    lines: tuple[NumberedScore, ...]

    def to_dict(self) -> dict:
        """As ``charlm score --json`` prints it (after the file's name)."""
        return {"checkpoint": str(self.checkpoint), "tokenizer": self.tokenizer, "include_end": self.include_end,
                "lines": [row.to_dict() for row in self.lines]}
