"""Frozen configuration dataclasses: the single source of truth for every knob.

Each dataclass checks its values in ``__post_init__`` (raising ``ConfigError`` with the option's
command-line name) and round-trips through plain dicts for the checkpoint metadata.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, fields
from typing import Any

from charlm.errors import ConfigError

CELLS = ("lstm", "gru", "rnn", "peephole")
TOKENIZERS = ("char", "word", "byte")
DEVICES = ("auto", "cpu", "cuda", "mps")
OPTIMIZERS = ("adamw", "sgd", "adagrad", "rmsprop")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # precision.py resolves auto by device
ENCODING_ERRORS = ("strict", "replace", "ignore")  # what to do with invalid UTF-8 in a corpus


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class _DictMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} has unknown fields: {brief(unknown)}")
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING  # type: ignore[arg-type]
                    and f.name not in data]
        if required:
            raise ConfigError(f"{cls.__name__} lacks {', '.join(required)}")
        return cls(**data)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class Range:
    """The values an option may take: whole numbers or finite reals between ``low`` and ``high``."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    note: str = ""  # e.g. "0 = off"

    def allows(self, value: Any) -> bool:
        if self.kind is int:
            if not _is_int(value):
                return False
        elif not _finite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        def num(x: float) -> str:
            return f"{int(x):,}" if self.kind is int else f"{x:g}"

        high = None if self.high is not None and self.high >= _INT_MAX else self.high
        if self.low is not None and high is not None:
            bounds = (f"{'(' if self.low_open else '['}{num(self.low)}, {num(high)}"
                      f"{')' if self.high_open else ']'}")
            text = f"a whole number in {bounds}" if self.kind is int else f"in {bounds}"
        elif self.low is not None:
            text = f"{'a whole number ' if self.kind is int else ''}{'>' if self.low_open else '≥'} {num(self.low)}"
        else:
            text = "a whole number" if self.kind is int else "a finite number"
        return f"{text} ({self.note})" if self.note else text


_INT_MAX = 2**63 - 1  # beyond this no counter, seed or size fits the int64 that torch and numpy use
_POSITIVE = Range(int, 1, _INT_MAX)
# Every numeric option, by field name: the configs check their fields with these and the CLI checks
# what the user gave before any work starts. A size's bound is far above what any machine can train
# (a memory check refuses what does not fit); it exists so no arithmetic on it overflows.
LIMITS: dict[str, Range] = {
    "vocab_size": Range(int, 1, 2**24),
    "embed_size": Range(int, 1, 2**20),
    "hidden_size": Range(int, 1, 2**20),
    "num_layers": Range(int, 1, 1024),
    "dropout": Range(float, 0, 1, high_open=True),
    "input_dropout": Range(float, 0, 1, high_open=True),
    "embed_dropout": Range(float, 0, 1, high_open=True),
    "weight_drop": Range(float, 0, 1, high_open=True),
    "activation_reg": Range(float, 0, 1000),
    "temporal_reg": Range(float, 0, 1000),
    "seq_len": Range(int, 1, 2**24),
    "batch_size": Range(int, 1, 2**24),
    "lr": Range(float, 0, 1000, low_open=True),
    "min_lr_ratio": Range(float, 0, 1),
    "average_power": Range(float, 0, 20),
    "warmup_steps": Range(int, 0, _INT_MAX),
    "weight_decay": Range(float, 0, None),
    "clip": Range(float, 0, None, note="0 = off"),
    "epochs": _POSITIVE,
    "max_steps": _POSITIVE,
    "max_minutes": Range(float, 0, None, low_open=True),
    "val_fraction": Range(float, 0, 1, low_open=True, high_open=True),
    "eval_every": _POSITIVE,
    "patience": _POSITIVE,
    "seed": Range(int, 0, 2**63 - 1),
    "max_bad_steps": _POSITIVE,
    "log_every": _POSITIVE,
    "temperature": Range(float, 0, None, note="0 = always the most likely token"),
    "top_k": Range(int, 1, 2**24),
    "top_p": Range(float, 0, 1, low_open=True),
    "length": Range(int, 0, 10**8),
    "num_samples": Range(int, 1, 10_000),
    "sample_length": Range(int, 0, 10**8, note="0 = none"),
    "min_count": _POSITIVE,
    "max_vocab": Range(int, 2, 2**24),
    "cache_window": Range(int, 1, 10**6),
    "cache_theta": Range(float, 0, 1000),
    "cache_weight": Range(float, 0, 1, low_open=True, high_open=True),
}


def check_option(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ``ConfigError`` naming ``--name`` and its range unless ``value`` is allowed.

    ``optional``: ``None`` means "not given" (never 0: zero is a value, checked like any other).
    """
    if value is None and optional:
        return
    rule = LIMITS[name]
    _check(rule.allows(value), f"--{name.replace('_', '-')} must be {rule.describe()} (got {brief(value)})")


def check_precision(value: Any) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``PRECISIONS`` (which one a device can run
    is precision.resolve_precision's question)."""
    _check(isinstance(value, str) and value in PRECISIONS,
           f"--precision must be one of {', '.join(PRECISIONS)} (got {brief(value)})")


def check_decay(*, lr: float, weight_decay: float) -> None:
    """AdamW multiplies every weight by 1 − lr × weight decay each step: at 1 or more it zeroes or
    flips them, which no training wants."""
    _check(lr * weight_decay < 1, f"--weight-decay × --lr must be < 1: AdamW multiplies the weights by "
                                  f"1 − lr × weight decay each step (got {weight_decay:g} × {lr:g})")


def brief(value: Any) -> str:
    """A short, safe rendering of a value from anywhere (a hostile file's metadata included)."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 40, 40, 4, 4, 2


@dataclass(frozen=True)
class ModelConfig(_DictMixin):
    """Shape of an ``RNNLM``: embedding → ``num_layers`` × ``cell`` → linear head."""

    vocab_size: int
    cell: str = "lstm"
    embed_size: int = 128
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0  # variational: between layers and on the last layer's output (and see input_dropout)
    tie_weights: bool = False
    input_dropout: float | None = None  # variational, on the embedding output; None: the same as dropout
    embed_dropout: float = 0.0  # whole tokens: every use of a dropped token's embedding in a batch
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden weights
    residual: bool = False  # skip connections between stacked layers (layer k+1 reads h_k + x_k)

    def __post_init__(self) -> None:
        _check(isinstance(self.cell, str) and self.cell in CELLS,
               f"--cell must be one of {', '.join(CELLS)} (got {brief(self.cell)})")
        for name in ("vocab_size", "embed_size", "hidden_size", "num_layers", "dropout", "embed_dropout",
                     "weight_drop"):
            check_option(name, getattr(self, name))
        check_option("input_dropout", self.input_dropout, optional=True)
        _check(isinstance(self.tie_weights, bool), "--tie-weights must be true or false")
        _check(isinstance(self.residual, bool), "--residual must be true or false")
        _check(not self.residual or self.num_layers >= 2,
               f"--residual connects stacked layers: it needs --num-layers ≥ 2 (got {self.num_layers})")
        _check(not self.tie_weights or self.embed_size == self.hidden_size,
               f"--tie-weights needs --embed-size equal to --hidden-size "
               f"(got {self.embed_size} and {self.hidden_size})")


@dataclass(frozen=True)
class TrainConfig(_DictMixin):
    """How to train. ``None`` for a stopping rule means "not used"."""

    seq_len: int = 100
    batch_size: int = 16
    lr: float = 4e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    epochs: int | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    val_fraction: float = 0.1
    eval_every: int | None = None
    patience: int | None = None
    seed: int = 1337
    device: str = "auto"
    max_bad_steps: int = 25
    log_every: int = 10
    activation_reg: float = 0.0  # AR: + this × mean square of the last layer's (dropped-out) outputs
    temporal_reg: float = 0.0  # TAR: + this × mean square of their step-to-step change (before dropout)
    optimizer: str = "adamw"
    precision: str = "fp32"  # the matmuls' number format (precision.py); plan_run resolves the CLI's auto
    # On CUDA, float32 matmuls and cuDNN's recurrences may use TF32 tensor cores (precision.tf32_region)
    tf32: bool = True
    # Evaluate and save the average of the run's weights, step t weighing t^average_power (averaging.py)
    average: bool = False
    average_power: float = 2.0
    # Start each epoch's BPTT windows at an offset drawn from (seed, epoch) (text.epoch_offset)
    shift_windows: bool = False
    # When the run ends, fit a cache pointer on the validation split and keep it where it helps (pointer.py)
    cache: bool = False

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "log_every", "max_bad_steps", "warmup_steps", "seed", "lr",
                     "min_lr_ratio", "weight_decay", "clip", "val_fraction", "activation_reg", "temporal_reg",
                     "average_power"):
            check_option(name, getattr(self, name))
        _check(isinstance(self.average, bool), "--average must be true or false")
        _check(isinstance(self.tf32, bool), "--tf32 must be true or false")
        _check(isinstance(self.shift_windows, bool), "--shift-windows must be true or false")
        _check(isinstance(self.cache, bool), "--cache must be true or false")
        for name in ("epochs", "max_steps", "eval_every", "patience", "max_minutes"):
            check_option(name, getattr(self, name), optional=True)
        _check(isinstance(self.optimizer, str) and self.optimizer in OPTIMIZERS,
               f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {brief(self.optimizer)})")
        check_precision(self.precision)
        _check(isinstance(self.device, str) and self.device in DEVICES,
               f"--device must be one of {', '.join(DEVICES)} (got {brief(self.device)})")
        check_decay(lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class CachePointer(_DictMixin):
    """A continuous cache pointer (pointer.py): how many past tokens it reads, how sharply it
    matches hidden states (θ), and its share of the mixture (λ)."""

    window: int
    theta: float
    weight: float

    def __post_init__(self) -> None:
        for name in ("window", "theta", "weight"):
            check_option(f"cache_{name}", getattr(self, name))


@dataclass(frozen=True)
class SampleConfig(_DictMixin):
    """How to draw text from a model."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    length: int = 500
    num_samples: int = 1
    seed: int | None = None
    stop: str | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "length", "num_samples"):
            check_option(name, getattr(self, name))
        for name in ("top_k", "top_p", "seed"):
            check_option(name, getattr(self, name), optional=True)
        _check(self.stop is None or (isinstance(self.stop, str) and self.stop != ""),
               "--stop must be a non-empty string")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows any number of digits)
        return False
