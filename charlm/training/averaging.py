"""Weight averaging: the model a run evaluates and saves is an average of its recent weights.

With ``power`` P the average after step T is  Σ_t t^P θ_t / Σ_t t^P  over the optimizer steps
t = 1 … T that were taken (θ_t: the weights after step t). P = 0 is the uniform (Polyak) average of
the whole run; a larger P leans on recent steps (the mean age of what is averaged is
T / (P + 2)), so the average follows a run of any length without knowing its length in advance
(the "power" EMA of Karras et al., 2024, made exact). It lets a run keep a high learning rate and
still end at the quiet point an annealed rate would reach; AWD-LSTM's averaged SGD is the same idea.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


class WeightAverage:
    """The running weighted average of ``params`` (kept in float32, whatever the weights are).

    It starts from the parameters' current values. ``update(step)`` folds in the weights after
    optimizer step ``step`` (1-based); ``total`` is the sum of the weights t^P so far, which a
    resumed run passes back (starting from the saved average) to continue exactly. t^P stays far
    inside float64's range for any run (--average-power ≤ 20: (10^9 steps)^20 = 10^180)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], power: float, *, total: float = 0.0) -> None:
        self.params = list(params)
        self.power = float(power)
        self.total = float(total)
        self.tensors = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = float(step) ** self.power
        self.total += weight
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.tensors, current, weight / self.total)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the average inside the block and their own values again after it."""
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.tensors):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, own):
                    p.copy_(value)
