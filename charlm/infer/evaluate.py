"""Loss, bits per character and perplexity of a token stream: batched, stateful, token-weighted.

The ids are cut into B contiguous streams (as in training) that each carry their hidden state
from window to window; the tokens that do not fill the last row continue the last stream, so
every token after the first is predicted exactly once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from charlm.errors import stop_if_asked
from charlm.model.lm import RNNLM, select_state
from charlm.model.precision import FP32, Precision

LN2 = math.log(2.0)
WINDOW_FLOATS = 8_000_000  # floats of activations per evaluation window (32 MB)


@dataclass(frozen=True)
class EvalResult:
    total_nats: float
    num_predicted: int

    @property
    def nats_per_token(self) -> float:
        return self.total_nats / self.num_predicted if self.num_predicted else float("nan")

    @property
    def perplexity(self) -> float:
        # exp overflows a float past ~709.78 nats: that perplexity is infinite, not a 300-digit number.
        return math.exp(self.nats_per_token) if self.nats_per_token < 709.0 else math.inf

    def bits_per_char(self, num_chars: int) -> float:
        return self.total_nats / LN2 / num_chars if num_chars else float("nan")


class Ranks(Protocol):
    """What evaluation asks of a distributed run (``training.distributed.Dist`` is one): this
    process's rank, how many ranks there are, and a sum over them."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class _OneProcess:
    """A world of one: every stream is this process's, and the sum over ranks is the value itself."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def eval_streams(num_tokens: int) -> int:
    """How many parallel streams to evaluate with: ~1k tokens each, at most 64 (more streams gain
    little speed on a CPU); the context each stream reads first removes the cold-start error."""
    return int(min(64, max(1, num_tokens // 1024)))


def _window_nats(model: RNNLM, x: torch.Tensor, y: torch.Tensor, state, precision: Precision):
    with precision.autocast(x.device):
        logits, state = model(x, state)  # (B, T, V)
    nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
    return nats, state


@torch.inference_mode()
def evaluate(model: RNNLM, ids: np.ndarray, *, num_streams: int | None = None, seq_len: int = 256,
             context: int = 128, precision: Precision = FP32, dist: Ranks | None = None,
             should_stop: Callable[[], bool] | None = None) -> EvalResult:
    """Total nats of predicting ids[1:] from what comes before, in one pass.

    Each stream after the first first reads the ``context`` tokens before its start without
    scoring them, so it does not begin cold: the figure is then close to one sequential pass over
    the whole text (which is what ``num_streams=1`` computes), at a small extra cost.

    With ``dist`` the streams are shared out among the ranks (stream b to rank b mod world size)
    and the totals summed, so every rank gets the same figure as a world of one would.
    ``precision`` is the matmuls' (the losses are summed in float32/float64 whatever it is).
    ``should_stop`` is asked before each window; True raises ``Cancelled``.
    """
    was_training = model.training
    try:
        return _evaluate(model, ids, num_streams=num_streams, seq_len=seq_len, context=context,
                         precision=precision, dist=dist, should_stop=should_stop)
    finally:
        model.train(was_training)


def _evaluate(model: RNNLM, ids: np.ndarray, *, num_streams: int | None, seq_len: int, context: int,
              precision: Precision, dist: Ranks | None, should_stop: Callable[[], bool] | None) -> EvalResult:
    dist = dist or _OneProcess()
    n = len(ids)
    if n < 2:
        return EvalResult(0.0, 0)
    model.eval()
    device = model.embedding.weight.device
    # int32 on the device; each window is widened to int64 when it is gathered.
    tokens = torch.from_numpy(np.asarray(ids).astype(np.int32)).to(device)
    num_streams = num_streams or eval_streams(n)
    # Bound what a window holds (B × T × (V logits + 4H gates + H outputs) floats), so a big
    # vocabulary or a wide model does not need gigabytes for one window.
    per_token = model.cfg.vocab_size + 5 * model.cfg.hidden_size
    seq_len = max(8, min(seq_len, WINDOW_FLOATS // (num_streams * per_token)))
    # Each stream predicts `length` tokens; stream b reads tokens [b*length, (b+1)*length].
    length = (n - 1) // num_streams
    mine = torch.arange(num_streams, device=device)[dist.rank::dist.world_size]
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    if length > 0 and len(mine):
        index = mine[:, None] * length
        warm = min(context, length)
        if warm > 0 and num_streams > 1:
            cols = torch.arange(-warm, 0, device=device)[None, :]
            with precision.autocast(device):
                _, state = model(tokens[(index + cols).clamp_(min=0)].long(), None)
            first = (mine == 0).nonzero().flatten()  # stream 0 has nothing before it: it starts cold
            for part in (state if isinstance(state, tuple) else (state,)):
                part[:, first] = 0
        for i in range(0, length, seq_len):
            stop_if_asked(should_stop)
            t = min(seq_len, length - i)
            cols = torch.arange(i, i + t, device=device)[None, :]
            x, y = tokens[index + cols].long(), tokens[index + cols + 1].long()
            nats, state = _window_nats(model, x, y, state, precision)
            total += nats.double()
        state = select_state(state, slice(len(mine) - 1, len(mine)))
    # The remainder continues the last stream, on the rank that owns it.
    if (num_streams - 1) % dist.world_size == dist.rank:
        for i in range(num_streams * length, n - 1, seq_len):
            stop_if_asked(should_stop)
            t = min(seq_len, n - 1 - i)
            x, y = tokens[None, i:i + t].long(), tokens[None, i + 1:i + 1 + t].long()
            nats, state = _window_nats(model, x, y, state, precision)
            total += nats.double()
    dist.all_reduce_sum(total)
    return EvalResult(float(total.item()), n - 1)
