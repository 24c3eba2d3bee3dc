"""Keeping a time-budgeted run inside its budget: when to evaluate, what to keep for the final
evaluation and the cache pointer fit, and the schedule's length from the speed so far."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from charlm.infer.evaluate import eval_streams, evaluate
from charlm.model.lm import RNNLM
from charlm.model.precision import FP32
from charlm.training.distributed import Dist

# A time-budgeted run times one evaluation window of this many tokens per stream at its start, so
# the final evaluation is kept inside the budget even where no evaluation happens before it (a
# large validation split); evaluate() reads EVAL_CONTEXT tokens before each stream's first window.
EVAL_PROBE = 256
EVAL_CONTEXT = 128


def probe_eval_seconds(model: RNNLM, val_ids: np.ndarray, dist: Dist) -> float:
    """At the start of a time-budgeted run: an evaluation's cost, from timing its first window
    (each of the streams it reads the split with, one window of ``EVAL_PROBE`` tokens after its
    context), scaled to the whole split; 0 where the split is too short for that to save much."""
    n = len(val_ids)
    streams = eval_streams(n)
    length = (n - 1) // streams
    if length < 4 * EVAL_PROBE:
        return 0.0
    t0 = time.perf_counter()
    evaluate(model, val_ids[:streams * EVAL_PROBE + 1], num_streams=streams, precision=FP32, dist=dist)
    seconds = float(dist.all_reduce_sum(torch.tensor([time.perf_counter() - t0], dtype=torch.float64))[0])
    context = min(EVAL_CONTEXT, EVAL_PROBE)  # each stream reads this much before its first window
    return seconds / dist.world_size * (length + context) / (EVAL_PROBE + context)


@dataclass
class TimeBudget:
    """What a run knows of what its time goes on, and the decisions taken from that. ``seconds`` is
    the budget (None where steps or epochs limit the run); ``clock`` arguments are the run's clock."""

    seconds: float | None
    val_tokens: int  # of the validation split, which every evaluation reads whole
    tokens_per_step: int  # batch size × sequence length
    session_start: tuple[int, float]  # the step and the clock this session began at
    last_eval_at: float = 0.0  # the clock when the last evaluation ended (or the session began)
    last_eval_step: int = -1  # the step of the last evaluation (-1: none yet)
    last_eval_seconds: float = 0.0  # the last evaluation's measured cost (0 before one)
    eval_probe: float = 0.0  # an evaluation's cost as timed at the start (probe_eval_seconds)
    fit_reserve: float = 0.0  # the seconds kept for the cache pointer fit (cachefit.plan_cache_fit)

    def evaluated(self, step: int, seconds: float, clock: float) -> None:
        """An evaluation at ``step`` took ``seconds``, and ended at ``clock``."""
        self.last_eval_step, self.last_eval_seconds, self.last_eval_at = step, seconds, clock

    def evaluation_due(self, step: int, clock: float) -> bool:
        """Whether ``eval_period`` has passed since the last evaluation."""
        return clock - self.last_eval_at >= self.eval_period(step - max(self.last_eval_step, 0), self.last_eval_at,
                                                             clock)

    def estimated_eval_seconds(self, steps: int, since: float, clock: float) -> float:
        """An evaluation's cost before one is timed: the probe's, or else a third of a training step
        per token, at the speed of the ``steps`` taken since ``since`` on the run's clock (0 before any)."""
        if self.eval_probe:
            return self.eval_probe
        if steps <= 0:
            return 0.0
        seconds_per_token = (clock - since) / (steps * self.tokens_per_step)
        return self.val_tokens * seconds_per_token / 3

    def eval_period(self, steps_since: int, since: float, clock: float) -> float:
        """Seconds between evaluations under a time budget: a twentieth of it, or 30 × the cost
        of an evaluation if that is more (its cost measured, or estimated from the training speed
        as a third of a training step per token, until the first evaluation). So a run that
        overfits keeps its best point, and never spends much more than 3% of its time evaluating."""
        cost = self.last_eval_seconds or self.estimated_eval_seconds(steps_since, since, clock)
        return max(self.seconds / 20, 30 * cost)

    def end_reserve(self, step: int, clock: float) -> float:
        """What a time-budgeted run keeps for its end, so the budget covers it: the final evaluation
        (the last one's measured cost, or an estimate before the first) and the cache pointer fit
        (its cost measured at the start, at most ``cachefit.CACHE_SHARE`` of the budget)."""
        evaluation = self.last_eval_seconds or self.estimated_eval_seconds(
            step - self.session_start[0], self.session_start[1], clock)
        return evaluation + self.fit_reserve

    def total_steps(self, step: int, clock: float) -> int:
        """The schedule's length that the steps per second so far (evaluation included) fit into
        the budget, with its end kept."""
        rate = step / max(clock, 1e-9)
        return max(step + 1, int(step + (self.seconds - clock - self.end_reserve(step, clock)) * rate))
