"""Sizing a char or byte model by the speed this machine measures: one rule for every device and
number format.

A run starts at the size tuned for its budget (``autosize.auto_size``: the prior) and moves along a
ladder of shapes (one wide layer on a CPU, stacks on a GPU) by the speed this machine measures in
the run's own number format: a rung down while the budget would train fewer than ``DOWN_EPOCHS``
passes over the data (and under ``BUDGET_TOKENS_PER_PARAMETER`` tokens per recurrent weight), a rung
up while it would train ``UP_EPOCHS`` or more and the data feeds the next (at least
``TOKENS_PER_PARAMETER`` training tokens per recurrent weight). It then regularises by the passes
the budget buys. On a slow CPU that is a smaller model that gets enough steps; on a fast one a
larger model with more dropout. Where nothing can be timed (a distributed run, a budget in steps),
``autosize.auto_size``'s tables decide.

The thresholds come from tiny-shakespeare runs on three kinds of CPU, where the tuned sizes won at
2–5 epochs; docs/choosing.md gives the figures. ``speed.measure_train_rate`` times a shape with the
trainer's own step.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from charlm.training.autosize import char_input_dropout


@dataclass(frozen=True)
class Shape:
    """One rung of a ladder: the model and batch shape, and its AdamW peak rate."""

    num_layers: int
    hidden_size: int
    batch_size: int
    seq_len: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.num_layers}x{self.hidden_size}"


# One wide layer per CPU-second beats stacked narrow ones (tiny-shakespeare, 3 minutes: 1×512 1.493
# against 2×256 1.546); small batches with a high peak rate learn fastest below 768 units.
CPU_LADDER = (Shape(1, 256, 16, 100, 2e-2), Shape(1, 384, 16, 100, 1.5e-2), Shape(1, 512, 16, 100, 1.2e-2),
              Shape(1, 768, 32, 100, 1.2e-2), Shape(1, 1024, 32, 100, 8e-3), Shape(1, 1536, 32, 100, 6e-3))
# A GPU runs a stack at once and wants a wide batch to be busy (not yet measured on one: the GPU
# suite's quality part reports what this picks).
GPU_LADDER = (Shape(2, 512, 128, 256, 2e-3), Shape(2, 768, 128, 256, 2e-3), Shape(3, 768, 128, 256, 2e-3),
              Shape(3, 1024, 128, 256, 2e-3), Shape(3, 1536, 128, 256, 1.5e-3), Shape(3, 2048, 128, 256, 1e-3))
DOWN_EPOCHS = 1.5  # an AVX2 CPU's 3 minutes of 1×512 (~1.1 epochs) lost to 1×384 (~1.8)
BUDGET_TOKENS_PER_PARAMETER = 1.0  # ... and ~0.8 tokens per weight: a large corpus keeps a size that gets 1
UP_EPOCHS = 8.0  # an AMX Xeon's 10 minutes of 1×1024 (~9 epochs) lost to 1×1536 (~5)
TOKENS_PER_PARAMETER = 0.09  # 1×1536 on tiny-shakespeare's 1.0M training tokens: fed
SMALL_CORPUS_TOKENS = 200_000  # below this a CPU run keeps the smallest rung
MEASURING_SHARE = 0.05  # stop timing larger shapes once this share of the budget is spent on it
GATES = {"lstm": 4, "peephole": 4, "gru": 3, "rnn": 1}


def embed_size(shape: Shape, gpu: bool) -> int:
    return min(shape.hidden_size, 256 if gpu else 128)


def recurrent_parameters(shape: Shape, cell: str, gpu: bool) -> int:
    """The recurrent layers' weights: what the data has to feed."""
    g, h, e = GATES[cell], shape.hidden_size, embed_size(shape, gpu)
    return g * h * (e + h) + (shape.num_layers - 1) * g * h * 2 * h


def dropout_for(epochs: float, tokens_per_parameter: float) -> float:
    """Output dropout by the passes over the data the budget buys; a model with little data per
    weight gets at least 0.25 once it sees the data three times (1×1536 on 1.0M tokens: 0.25)."""
    dropout = (0.0 if epochs < 3 else 0.2 if epochs < 6 else 0.25 if epochs < 8 else 0.3 if epochs < 20
               else 0.4 if epochs < 50 else 0.5)
    if epochs >= 3 and tokens_per_parameter < 0.2:
        dropout = max(dropout, 0.25)
    return dropout


@dataclass(frozen=True)
class Sized:
    """The chosen shape and regularisation, what was measured and why (the run's metrics keep it)."""

    shape: Shape
    embed_size: int
    dropout: float
    input_dropout: float
    shift_windows: bool
    expected_epochs: float
    reason: str
    measured: dict[str, float] = field(default_factory=dict)  # tokens/s by shape name

    def to_dict(self) -> dict:
        return {"shape": asdict(self.shape), "embed_size": self.embed_size, "dropout": self.dropout,
                "expected_epochs": self.expected_epochs, "reason": self.reason,
                "measured_tokens_per_second": self.measured}


def size_by_speed(*, train_tokens: int, minutes: float, cell: str, gpu: bool, precision: str,
                  speed: Callable[[Shape], float], start: int | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  fits: Callable[[Shape], bool] = lambda shape: True) -> Sized:
    """Start at the rung of ``start`` hidden units (the size tuned for this budget, ``autosize.auto_size``;
    the smallest where None) and move along the ladder by what this machine measures (``speed``:
    tokens/s of training a shape in the run's format): down while the budget trains fewer than
    ``DOWN_EPOCHS`` passes and under ``BUDGET_TOKENS_PER_PARAMETER`` tokens per weight (a slow
    machine), up while it trains ``UP_EPOCHS`` or more and the data feeds the next (a fast one).
    ``fits``: whether a shape's training leaves the device room (a shape that does not is not tried)."""
    ladder = GPU_LADDER if gpu else CPU_LADDER
    if not gpu and train_tokens < SMALL_CORPUS_TOKENS:
        ladder = ladder[:1]
    fed = [s for s in ladder if train_tokens >= TOKENS_PER_PARAMETER * recurrent_parameters(s, cell, gpu)
           and fits(s)] or list(ladder[:1])
    seconds = minutes * 60
    measured: dict[str, float] = {}
    started = clock()

    def epochs_of(shape: Shape) -> float:
        if shape.name not in measured:
            measured[shape.name] = speed(shape)
        return seconds * measured[shape.name] / max(train_tokens, 1)

    def too_little(shape: Shape) -> bool:
        return epochs_of(shape) < DOWN_EPOCHS and \
            seconds * measured[shape.name] < BUDGET_TOKENS_PER_PARAMETER * recurrent_parameters(shape, cell, gpu)

    def out_of_time() -> bool:
        return clock() - started > MEASURING_SHARE * seconds

    # The rung to start from: the tuned size, or the largest the data feeds below it.
    at = max([k for k, shape in enumerate(fed) if start is None or shape.hidden_size <= start] or [0])
    if start is None:
        at = 0
    moves = []
    if too_little(fed[at]):
        while at > 0 and too_little(fed[at]) and not out_of_time():
            moves.append(f"{fed[at].num_layers}×{fed[at].hidden_size} would get {epochs_of(fed[at]):.1f} epochs")
            at -= 1
    else:
        while at + 1 < len(fed) and epochs_of(fed[at]) >= UP_EPOCHS and not out_of_time():
            moves.append(f"{fed[at].num_layers}×{fed[at].hidden_size} would get {epochs_of(fed[at]):.1f} epochs")
            at += 1
    chosen = fed[at]
    epochs = epochs_of(chosen)
    per_weight = train_tokens / recurrent_parameters(chosen, cell, gpu)
    dropout = dropout_for(epochs, per_weight)
    why = f"; {', '.join(moves)}" if moves else ""
    reason = (f"{chosen.num_layers}×{chosen.hidden_size} {cell.upper()}, batch {chosen.batch_size}: "
              f"~{epochs:.1f} epochs of {train_tokens:,} tokens in {minutes:g} min at a measured "
              f"{measured[chosen.name] / 1000:.1f}k tokens/s ({precision}){why}; dropout {dropout:g}")
    return Sized(chosen, embed_size(chosen, gpu), dropout, char_input_dropout(dropout), epochs >= 3, epochs,
                 reason, measured)
