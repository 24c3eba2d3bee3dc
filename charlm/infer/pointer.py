"""The continuous cache pointer (Grave, Joulin & Usunier 2017, as used with AWD-LSTM): a model's
next-token distribution mixed with one over the tokens that followed similar moments of the recent
past, so a name or a word the text has just used is likely again.

    p(w | past) = (1 − λ) p_model(w) + λ Σ_{i : x[i+1] = w, t − window ≤ i < t} softmax_i(θ h_t · h_i)

h_t is the last layer's output after reading token t. Only the past of the text being scored is
read, so the figure is still the probability of the text, one token at a time; the model's weights
never change. θ, λ and the window belong to a trained model: the trainer picks them on its
validation split when the run ends (never on the text later scored) and stores them in the
best checkpoint; ``charlm perplexity`` uses them unless told not to.

The past is kept as a ring of the last ``window`` (h, next token) pairs, so a text of any length
is scored in one sequential pass with bounded memory.

A fit costs the model's pass over its tokens plus, for each trial of the search, every token
against its window: tokens × window. Given seconds (the trainer gives a tenth of the budget at
most), ``tune_cache`` reads only the tokens its measured costs (``measure_fit_cost``) say fit, and
a search still going when they are spent keeps the best point tried.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from charlm.config import CachePointer
from charlm.errors import stop_if_asked
from charlm.infer.evaluate import EvalResult
from charlm.model.lm import RNNLM
from charlm.model.precision import Precision

BLOCK = 256  # tokens a window of the sequential pass predicts
# Validation tokens the search reads at most: 20,000 up to 512 units, fewer for wider models (its
# cost grows with tokens × hidden size).
TUNE_TOKENS = 20_000
TUNE_WORK = TUNE_TOKENS * 512
WINDOWS = (250, 500, 1000, 2000, 4000)
THETAS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.5)
WEIGHTS = tuple(round(0.05 * k, 2) for k in range(1, 13))  # λ from 0.05 to 0.6
# A cache is kept only where it lowers the validation loss by at least this many nats/token (1%
# of perplexity): below that the gain is within what the choice of θ, λ and window fits to the split.
MIN_GAIN = 0.01


@dataclass(frozen=True)
class CacheSearch:
    """What ``tune_cache`` found: the cache (None if it did not help enough) and the figures."""

    cache: CachePointer | None
    nats_per_token: float  # the validation tokens searched, with the cache chosen
    nats_per_token_without: float  # the same tokens, the model alone
    tokens: int
    seconds: float
    cut_short: bool = False  # its time ran out during the search: the best point tried so far
    skipped: str | None = None  # why nothing was fitted (no time for even MIN_TOKENS), else None

    def to_dict(self) -> dict[str, Any]:
        """The fit's figures, as ``charlm train --json`` and the run's metrics give them."""
        return {"pointer": self.cache.to_dict() if self.cache else None, "val_loss": self.nats_per_token,
                "val_loss_without": self.nats_per_token_without, "tokens": self.tokens, "seconds": self.seconds,
                "cut_short": self.cut_short}


# A fit reads fewer tokens than this only if the text has no more: below it the choice of θ, λ
# and the window fits the tokens rather than the model.
MIN_TOKENS = 500
REFINE_TRIALS = 3  # trials the last step of the search makes, as planned (it walks θ to a neighbour)


@dataclass(frozen=True)
class FitCost:
    """What a fit costs on this machine, measured (``measure_fit_cost``): seconds per token of the
    model's one-stream pass, and per (token, past position) pair that one trial of the search
    compares (its cost grows with tokens × window)."""

    seconds_per_token: float
    seconds_per_pair: float

    def seconds(self, tokens: int) -> float:
        """The predicted cost of a fit on ``tokens`` tokens: the pass, then the search's trials."""
        return tokens * (self.seconds_per_token + self.seconds_per_pair * search_pairs(tokens))

    def affordable_tokens(self, seconds: float, most: int) -> int:
        """The most tokens (≤ ``most``) a fit can read in ``seconds``: 0 if not even ``MIN_TOKENS``
        (or ``most``, when the text is shorter)."""
        if self.seconds(min(most, MIN_TOKENS)) > seconds:
            return 0
        low, high = min(most, MIN_TOKENS), most  # the cost grows with the tokens: bisect
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.seconds(middle) <= seconds else (low, middle - 1)
        return low


def _windows(tokens: int) -> list[int]:
    return [w for w in WINDOWS if w < tokens] or [max(1, tokens - 1)]


def search_pairs(tokens: int) -> int:
    """(token, past position) pairs per token that the search compares, as planned: every θ at the
    middle window, every other window, then ``REFINE_TRIALS`` at the largest window."""
    windows = _windows(tokens)
    middle = windows[min(2, len(windows) - 1)]
    return (len(THETAS) * (middle + BLOCK) + sum(w + BLOCK for w in windows if w != middle)
            + REFINE_TRIALS * (max(windows) + BLOCK))


def measure_fit_cost(model: RNNLM, ids: np.ndarray, *, precision: Precision,
                     clock: Callable[[], float] = time.perf_counter) -> FitCost:
    """Time the two parts of a fit here: the model's pass over one block of ``ids`` (after a short
    one that warms it up) and one trial of the search on a block against a ring of 1,000 states.
    Takes about as long as reading two blocks; leaves the model in the mode it was in."""
    was_training = model.training
    try:
        ids = np.asarray(ids)[:BLOCK + 1]
        if len(ids) < 2:
            ids = np.zeros(BLOCK + 1, dtype=np.int64)
        for part in (ids[:17], ids):
            start = clock()
            blocks = list(sequential_states(model, part, precision=precision))
            float(sum(float(lp.sum()) for _, _, lp in blocks))  # waits for the device
            pass_seconds = clock() - start
        per_token = pass_seconds / max(len(ids) - 1, 1)
        device = model.embedding.weight.device
        generator = torch.Generator().manual_seed(0)
        h = torch.randn(BLOCK, model.cfg.hidden_size, generator=generator).to(device) * 0.1
        ring = Ring(1000, model.cfg.hidden_size, device)
        ring.push(torch.randn(1000, model.cfg.hidden_size, generator=generator).to(device) * 0.1,
                  torch.randint(0, model.cfg.vocab_size, (1000,), generator=generator).to(device))
        y = torch.randint(0, model.cfg.vocab_size, (BLOCK,), generator=generator).to(device)
        weights = torch.tensor(WEIGHTS, dtype=torch.float64, device=device)
        for _ in range(2):  # the first warms up
            start = clock()
            scores, nexts = cache_scores(h, ring, 1000)
            float(mix(y.double() * 0 - 1, cache_probs(scores, nexts, y, 1.0), weights).sum())
            trial_seconds = clock() - start
        return FitCost(per_token, trial_seconds / (BLOCK * (1000 + BLOCK)))
    finally:
        model.train(was_training)


class _OutOfTime(Exception):
    """The fit's time ran out (internal: the search keeps the best point tried)."""


@torch.inference_mode()
def sequential_states(model: RNNLM, ids: np.ndarray, *, precision: Precision,
                      should_stop: Callable[[], bool] | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """One stream over ``ids``, ``BLOCK`` tokens at a time: for each block the last layer's outputs
    (T, H) in float32, the tokens they predict (T,) and the model's log-probability of each (T,)."""
    model.eval()
    device = model.embedding.weight.device
    tokens = torch.from_numpy(np.asarray(ids).astype(np.int64)).to(device)
    state = None
    for i in range(0, len(tokens) - 1, BLOCK):
        stop_if_asked(should_stop)
        x, y = tokens[None, i:i + BLOCK], tokens[None, i + 1:i + 1 + BLOCK]
        x = x[:, :y.size(1)]
        with precision.autocast(device):
            logits, state, (raw, _) = model(x, state, with_outputs=True)
        log_probs = F.log_softmax(logits[0].float(), -1).gather(1, y[0, :, None])[:, 0]
        yield raw[0].float(), y[0], log_probs.double()


class Ring:
    """The last ``size`` (hidden state, next token) pairs of a stream."""

    def __init__(self, size: int, hidden_size: int, device: torch.device) -> None:
        self.size = size
        self.h = torch.empty(0, hidden_size, device=device)
        self.y = torch.empty(0, dtype=torch.int64, device=device)

    def push(self, h: torch.Tensor, y: torch.Tensor) -> None:
        self.h, self.y = torch.cat([self.h, h])[-self.size:], torch.cat([self.y, y])[-self.size:]


def cache_scores(h: torch.Tensor, ring: Ring, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t · h_i for each t of the block against every i of the ring and of the block before t,
    -inf outside the window; and the tokens those i were followed by."""
    keys, nexts = torch.cat([ring.h, h]), ring.y
    past, t = len(ring.h), len(h)
    scores = h @ keys.T  # (T, past + T)
    distance = torch.arange(t, device=h.device)[:, None] + past - torch.arange(past + t, device=h.device)[None, :]
    return scores.masked_fill_((distance < 1) | (distance > window), -math.inf), nexts


def cache_probs(scores: torch.Tensor, nexts: torch.Tensor, y: torch.Tensor, theta: float) -> torch.Tensor:
    """The cache's probability of each target y_t: the softmax weight (θ × score) of the past
    positions followed by y_t; NaN where there is no past (the text's first token)."""
    weights = torch.softmax(scores * theta, 1)
    hits = torch.cat([nexts, y])[None, :] == y[:, None]  # (T, past + T): position i was followed by y_t
    return (weights * hits).sum(1).double()


def mix(log_probs: torch.Tensor, cache_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log((1 − λ) p_model + λ p_cache) for each token (rows) and each λ in ``weights`` (columns),
    in float64; the model alone where the cache has nothing yet (a p_cache of 0 is fine)."""
    mixed = torch.logaddexp(log_probs[:, None] + torch.log1p(-weights)[None, :],
                            cache_probs.log()[:, None] + weights.log()[None, :])
    return torch.where(cache_probs.isnan()[:, None], log_probs[:, None], mixed)


def _mixed_blocks(blocks: Iterable[tuple[torch.Tensor, ...]], window: int, theta: float,
                  weights: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each block of ``sequential_states``: the model's log-probabilities (T,) and the mixed
    ones (T, one column per λ in ``weights``), each block's cache holding the ``window`` before it."""
    ring = None
    for h, y, log_probs in blocks:
        ring = ring or Ring(window, h.size(1), h.device)
        scores, nexts = cache_scores(h, ring, window)
        yield log_probs, mix(log_probs, cache_probs(scores, nexts, y, theta), weights)
        ring.push(h, y)


def evaluate_with_cache(model: RNNLM, ids: np.ndarray, cache: CachePointer, *, precision: Precision,
                        should_stop: Callable[[], bool] | None = None) -> tuple[EvalResult, EvalResult]:
    """Total nats of predicting ids[1:] in one sequential pass, with the cache and without it."""
    if len(ids) < 2:
        return EvalResult(0.0, 0), EvalResult(0.0, 0)
    weight = torch.tensor([cache.weight], dtype=torch.float64, device=model.embedding.weight.device)
    with_cache = without = 0.0
    for log_probs, mixed in _mixed_blocks(sequential_states(model, ids, precision=precision, should_stop=should_stop),
                                          cache.window, cache.theta, weight):
        with_cache -= float(mixed.sum())
        without -= float(log_probs.sum())
    return EvalResult(with_cache, len(ids) - 1), EvalResult(without, len(ids) - 1)


def tune_cache(model: RNNLM, ids: np.ndarray, *, precision: Precision,
               should_stop: Callable[[], bool] | None = None, max_seconds: float | None = None,
               cost: FitCost | None = None, clock: Callable[[], float] = time.perf_counter,
               on_progress: Callable[[str, int, int], None] | None = None) -> CacheSearch:
    """Find the cache that predicts ``ids`` (validation tokens; the first ``TUNE_TOKENS``, fewer
    for models over 512 units) best.

    One pass of the model keeps every hidden state; then θ is searched at a middle window, the
    window at that θ, and θ again at that window from there to a better neighbour, each point with
    every λ (a vector operation).

    ``max_seconds`` bounds the whole fit: it reads only the tokens that ``cost`` (measured here
    when not given) says fit in it, and a search still going when the time is up keeps the best
    point tried (``cut_short``). Where not even ``MIN_TOKENS`` fit, nothing is fitted
    (``skipped`` says why). ``on_progress(phase, done, total)`` hears of each block read
    ("reading") and each trial ("searching", of those planned)."""
    t0 = clock()
    ids = np.asarray(ids)
    limit = min(TUNE_TOKENS, TUNE_WORK // model.cfg.hidden_size, max(len(ids) - 1, 0))
    deadline = math.inf
    if max_seconds is not None:
        deadline = t0 + max_seconds
        cost = cost or measure_fit_cost(model, ids, precision=precision, clock=clock)
        affordable = cost.affordable_tokens(deadline - clock(), limit)
        if affordable == 0:
            return CacheSearch(None, math.nan, math.nan, 0, clock() - t0, skipped=(
                f"{max_seconds:.1f} s would not fit even {min(limit, MIN_TOKENS):,} tokens "
                f"(~{cost.seconds(min(limit, MIN_TOKENS)):.1f} s here)"))
        limit = affordable
    ids = ids[:limit + 1]
    total_blocks = math.ceil(max(len(ids) - 1, 0) / BLOCK)
    blocks = []
    for block in sequential_states(model, ids, precision=precision, should_stop=should_stop):
        blocks.append(block)
        if on_progress is not None:
            on_progress("reading", len(blocks), total_blocks)
        if clock() > deadline:
            return CacheSearch(None, math.nan, math.nan, 0, clock() - t0, skipped=(
                f"its {max_seconds:.1f} s ran out while reading the validation text"))
    n = sum(len(y) for _, y, _ in blocks)
    if n < 2:
        return CacheSearch(None, math.nan, math.nan, n, clock() - t0)
    without = -float(sum(float(lp.sum()) for _, _, lp in blocks)) / n
    weights = torch.tensor(WEIGHTS, dtype=torch.float64, device=blocks[0][0].device)
    tried: dict[tuple[int, float], tuple[float, float]] = {}
    windows = _windows(n)
    planned = len(THETAS) + len(windows) - 1 + REFINE_TRIALS

    def trial(window: int, theta: float) -> tuple[float, float]:
        """(nats/token, λ) of the best λ for this window and θ."""
        if (window, theta) not in tried:
            stop_if_asked(should_stop)
            total = torch.zeros(len(WEIGHTS), dtype=torch.float64)
            for _, mixed in _mixed_blocks(blocks, window, theta, weights):
                if clock() > deadline:
                    raise _OutOfTime
                total -= mixed.sum(0).cpu()
            k = int(torch.argmin(total))
            tried[(window, theta)] = (float(total[k]) / n, WEIGHTS[k])
            if on_progress is not None:
                on_progress("searching", min(len(tried), planned), planned)
        return tried[(window, theta)]

    cut_short = False
    try:
        window = windows[min(2, len(windows) - 1)]
        theta = min(THETAS, key=lambda th: trial(window, th)[0])
        window = min(windows, key=lambda w: trial(w, theta)[0])
        theta = _walk(THETAS.index(theta), lambda k: trial(window, THETAS[k])[0])
    except _OutOfTime:
        cut_short = True
        if not tried:
            return CacheSearch(None, math.nan, math.nan, n, clock() - t0, skipped=(
                f"its {max_seconds:.1f} s ran out before the first trial of the search"))
    window, theta = min(tried, key=lambda point: tried[point][0])
    best, weight = tried[(window, theta)]
    keep = without - best >= MIN_GAIN
    return CacheSearch(CachePointer(window=window, theta=theta, weight=weight) if keep else None,
                       best if keep else without, without, n, clock() - t0, cut_short=cut_short)


def _walk(start: int, loss: Callable[[int], float]) -> float:
    """θ from ``THETAS[start]``, moved to a neighbour while that is better (the best θ moves little
    when the window changes; a full scan would cost every θ again at the new window)."""
    k = start
    for step in (-1, 1):
        while 0 <= k + step < len(THETAS) and loss(k + step) < loss(k):
            k += step
    return THETAS[k]
