"""The cache pointer fit that ends a run: its cost measured up front, the seconds it may take, and
the fit to the best checkpoint on the validation split."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from charlm.errors import Cancelled
from charlm.infer import pointer
from charlm.model import checkpoint as ckpt
from charlm.model.lm import RNNLM
from charlm.model.precision import FP32
from charlm.training.distributed import Dist

# The cache pointer fit at the end of a run takes at most this share of the time budget (kept
# inside it), or of the time training took where steps or epochs limit the run, and no less than
# CACHE_MIN_SECONDS then (a fit of a tiny model takes well under a second).
CACHE_SHARE = 0.1
CACHE_MIN_SECONDS = 2.0


def plan_cache_fit(model: RNNLM, val_ids: np.ndarray, dist: Dist, budget: float) -> tuple[pointer.FitCost, float]:
    """At the start of a time-budgeted run: what a cache pointer fit costs here (measured on
    rank 0 with this model's shape, shared with the others) and the seconds kept for it at the
    end, its predicted cost on the tokens it would read, at most ``CACHE_SHARE`` of the budget."""
    cost = pointer.measure_fit_cost(model, val_ids, precision=FP32) if dist.is_main else None
    cost = dist.broadcast_object(cost)
    tokens = min(pointer.TUNE_TOKENS, pointer.TUNE_WORK // model.cfg.hidden_size, max(len(val_ids) - 1, 0))
    return cost, min(budget * CACHE_SHARE, cost.seconds(tokens))


def cache_allowance(budget: float | None, clock: float) -> float:
    """The seconds the cache pointer fit may take: what is left of a time budget, at most
    ``CACHE_SHARE`` of it; without one, ``CACHE_SHARE`` of the time training took (``clock``), at
    least ``CACHE_MIN_SECONDS``."""
    if budget is not None:
        return max(0.0, min(budget * CACHE_SHARE, budget - clock))
    return max(CACHE_MIN_SECONDS, clock * CACHE_SHARE)


def fit_cache(run_dir: Path, device: torch.device, val_ids: np.ndarray, allowance: float, *,
              should_stop: Callable[[], str | None] | None, cost: pointer.FitCost | None,
              emit: Callable[[dict[str, Any]], None], clock: float):
    """Fit a cache pointer to the best checkpoint in ``run_dir`` on the validation split within
    ``allowance`` seconds (loading and storing included) and store it there (or store that none
    helps). Progress goes to ``emit``, timed from the run's ``clock``. Returns the
    ``pointer.CacheSearch`` (its ``seconds`` the whole fit's) or None if a stop request cut it
    short, and the seconds it took."""
    t0 = time.perf_counter()
    emit({"event": "cache_start", "seconds": allowance, "elapsed": clock})

    def progress(phase: str, done: int, total: int) -> None:
        emit({"event": "cache_progress", "phase": phase, "done": done, "total": total,
              "elapsed": clock + time.perf_counter() - t0})

    path = run_dir / ckpt.BEST
    best = ckpt.load_checkpoint(path, device=str(device))
    try:
        found = pointer.tune_cache(best.model, val_ids, precision=FP32,
                                   should_stop=lambda: bool(should_stop and should_stop()),
                                   max_seconds=max(0.0, allowance - (time.perf_counter() - t0)),
                                   cost=cost, on_progress=progress)
    except Cancelled:
        return None, time.perf_counter() - t0
    if found.skipped is None:
        ckpt.store_cache(path, found.cache)
    seconds = time.perf_counter() - t0
    return dataclasses.replace(found, seconds=seconds), seconds


def cache_event(found: pointer.CacheSearch | None, allowance: float) -> dict[str, Any]:
    """What the run records of a fit: its figures, or a warning that it was stopped or skipped."""
    if found is None:
        return {"event": "warning", "message": "stopped while fitting the cache pointer: the best "
                                               "checkpoint is left as it was"}
    if found.skipped is not None:
        return {"event": "warning", "message": f"no cache pointer fitted: {found.skipped}; the best "
                                               f"checkpoint is left as it was"}
    figures = found.to_dict()
    return {"event": "cache", "cache": figures.pop("pointer"), **figures, "allowance": allowance}
