"""Sizing a char or byte model by the speed this machine measures: one rule for every device and
number format.

The shapes of a ladder (one wide layer on a CPU, stacks on a GPU) are timed in the format the run
will use, smallest first; the run takes the largest that the data can feed (at least
``TOKENS_PER_PARAMETER`` training tokens per recurrent weight) and that the budget still trains
enough: ``MIN_EPOCHS`` passes over the data, or (a corpus too large to pass over twice)
``BUDGET_TOKENS_PER_PARAMETER`` tokens per recurrent weight. It then regularises by the passes the
budget buys. On a slow CPU that is a
smaller model that gets enough steps; on a fast one a larger model with more dropout. Where nothing
can be timed (a distributed run, a budget in steps), ``config.auto_size``'s tables decide.

The thresholds come from tiny-shakespeare runs on three CPU kinds (docs/choosing.md, whose figures
come from benchmarks/README.md): the best of the sizes tried was the largest that got 2–5 epochs (an AMD EPYC
with AVX-512 BF16, 3 minutes: 1×768 at ~2.4 epochs beat 1×512 at ~5; 10 minutes: 1×1024 at ~5 beat
1×768 at ~8; an Intel Xeon with AMX, 10 minutes: 1×1536 at ~5 beat 1×1024 at ~9; an AVX2-only EPYC,
3 minutes: 1×512 at ~1.1 epochs was 0.01 behind 1×384 and 1×256).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .config import char_input_dropout


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
MIN_EPOCHS = 2.0
BUDGET_TOKENS_PER_PARAMETER = 1.0  # an AVX2 CPU's 3 minutes of 1×512 (~0.8 per weight) was too little
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
                  speed: Callable[[Shape], float], clock: Callable[[], float] = time.monotonic,
                  fits: Callable[[Shape], bool] = lambda shape: True) -> Sized:
    """Time the ladder's shapes (``speed``: tokens/s of training one, in the run's format) smallest
    first, and take the largest the data can feed that still gets ``MIN_EPOCHS`` in ``minutes``.
    ``fits``: whether a shape's training leaves the device room (a shape that does not is not tried)."""
    ladder = GPU_LADDER if gpu else CPU_LADDER
    if not gpu and train_tokens < SMALL_CORPUS_TOKENS:
        ladder = ladder[:1]
    fed = [s for s in ladder if train_tokens >= TOKENS_PER_PARAMETER * recurrent_parameters(s, cell, gpu)
           and fits(s)] or list(ladder[:1])
    seconds = minutes * 60
    measured: dict[str, float] = {}
    chosen, started, short = fed[0], clock(), None
    for shape in fed:
        rate = speed(shape)
        measured[shape.name] = rate
        trained = seconds * rate  # the tokens the budget trains this shape on
        if shape is not fed[0] and trained < MIN_EPOCHS * train_tokens \
                and trained < BUDGET_TOKENS_PER_PARAMETER * recurrent_parameters(shape, cell, gpu):
            short = shape
            break
        chosen = shape
        if clock() - started > MEASURING_SHARE * seconds:
            break
    epochs = seconds * measured[chosen.name] / max(train_tokens, 1)
    per_weight = train_tokens / recurrent_parameters(chosen, cell, gpu)
    dropout = dropout_for(epochs, per_weight)
    why = (f"; {short.num_layers}×{short.hidden_size} would get {seconds * measured[short.name] / train_tokens:.1f}"
           f" epochs, {seconds * measured[short.name] / recurrent_parameters(short, cell, gpu):.1f} tokens per "
           f"weight" if short else
           "" if chosen is ladder[-1] else "; a larger one would not be fed by the data" if chosen is fed[-1]
           else "; measuring stopped at its share of the budget")
    reason = (f"{chosen.num_layers}×{chosen.hidden_size} {cell.upper()}, batch {chosen.batch_size}: "
              f"~{epochs:.1f} epochs of {train_tokens:,} tokens in {minutes:g} min at a measured "
              f"{measured[chosen.name] / 1000:.1f}k tokens/s ({precision}){why}; dropout {dropout:g}")
    return Sized(chosen, embed_size(chosen, gpu), dropout, char_input_dropout(dropout), epochs >= 3, epochs,
                 reason, measured)
