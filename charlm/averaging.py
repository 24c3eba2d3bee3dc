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

# t^P for t up to ~1e9 steps stays far inside float64's range (1e9^20 = 1e180).
MAX_POWER = 20.0


class WeightAverage:
    """The running weighted average of ``params`` (kept in float32, whatever the weights are).

    ``update(step)`` folds in the weights after optimizer step ``step`` (1-based); ``total`` is
    the sum of the weights t^P so far, which a resumed run needs (with ``tensors``) to continue
    exactly."""

    def __init__(self, params: Iterable[torch.nn.Parameter], power: float, *, total: float = 0.0,
                 tensors: list[torch.Tensor] | None = None) -> None:
        self.params = list(params)
        self.power = float(power)
        self.total = float(total)
        self.tensors = tensors if tensors is not None else [p.detach().float().clone() for p in self.params]
        if len(self.tensors) != len(self.params) or any(a.shape != p.shape for a, p in zip(self.tensors, self.params)):
            raise ValueError("the average's tensors do not match the parameters")

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
