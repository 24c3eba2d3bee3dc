"""Loss, bits per character and perplexity of a token stream: batched, stateful, token-weighted.

The ids are cut into B contiguous streams (as in training) that each carry their hidden state
from window to window; the tokens that do not fill the last row continue the last stream, so
every token after the first is predicted exactly once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model import RNNLM, select_state

LN2 = math.log(2.0)


@dataclass(frozen=True)
class EvalResult:
    total_nats: float
    num_predicted: int

    @property
    def nats_per_token(self) -> float:
        return self.total_nats / self.num_predicted if self.num_predicted else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nats_per_token, 700.0))

    def bits_per_char(self, num_chars: int) -> float:
        return self.total_nats / LN2 / num_chars if num_chars else float("nan")


def eval_streams(num_tokens: int) -> int:
    """How many parallel streams to evaluate with: long streams keep the cold-start cost small."""
    return int(min(64, max(1, num_tokens // 4096)))


def _window_nats(model: RNNLM, x: torch.Tensor, y: torch.Tensor, state, autocast: bool):
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits, state = model(x, state)  # (B, T, V)
    nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
    return nats, state


@torch.inference_mode()
def evaluate(model: RNNLM, ids: np.ndarray, *, num_streams: int | None = None, seq_len: int = 256,
             autocast: bool = False) -> EvalResult:
    """Total nats of predicting ids[1:] from what comes before, in one pass."""
    n = len(ids)
    if n < 2:
        return EvalResult(0.0, 0)
    was_training = model.training
    model.eval()
    device = model.embedding.weight.device
    tokens = torch.from_numpy(np.asarray(ids).astype(np.int64)).to(device)
    num_streams = num_streams or eval_streams(n)
    # Each stream predicts `length` tokens; stream b reads tokens [b*length, (b+1)*length].
    length = (n - 1) // num_streams
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    if length > 0:
        index = torch.arange(num_streams, device=device)[:, None] * length
        for i in range(0, length, seq_len):
            t = min(seq_len, length - i)
            cols = torch.arange(i, i + t, device=device)[None, :]
            x, y = tokens[index + cols], tokens[index + cols + 1]
            nats, state = _window_nats(model, x, y, state, autocast)
            total += nats.double()
        state = select_state(state, slice(num_streams - 1, num_streams))
    # The remainder continues the last stream.
    start = num_streams * length
    for i in range(start, n - 1, seq_len):
        t = min(seq_len, n - 1 - i)
        x, y = tokens[None, i:i + t], tokens[None, i + 1:i + 1 + t]
        nats, state = _window_nats(model, x, y, state, autocast)
        total += nats.double()
    model.train(was_training)
    return EvalResult(float(total.item()), n - 1)
