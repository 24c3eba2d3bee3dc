"""Where a run stands: the counters a checkpoint's ``train_state`` keeps and ``--resume`` restores."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class Progress:
    """Where a run stands; saved in ``train_state`` and restored by ``--resume``."""

    step: int = 0
    epoch: int = 0
    window: int = 0  # the next window of the current epoch
    best_val_loss: float = math.inf
    best_step: int = -1
    val_loss: float = math.inf
    evals_since_best: int = 0
    tokens_seen: int = 0
    total_steps: int = 10**9  # the schedule's length (re-estimated from the clock under a time budget)
    warmup_steps: int = 0
    elapsed_seconds: float = 0.0  # the run's clock, evaluation included, across sessions
    stopped_by: str | None = None  # what ended the run, once it has ended
    optim_file: str | None = None

    @classmethod
    def from_state(cls, state: dict[str, Any], **defaults: Any) -> "Progress":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**defaults, **{k: v for k, v in state.items() if k in known and v is not None}})
