"""Frozen configuration dataclasses: the single source of truth for every knob.

Each dataclass checks its values in ``__post_init__`` (raising ``ConfigError`` with the option's
command-line name) and round-trips through plain dicts for the checkpoint metadata.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

CELLS = ("lstm", "gru", "rnn")
TOKENIZERS = ("char", "word", "byte")
DEVICES = ("auto", "cpu", "cuda", "mps")


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
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} has unknown fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a missing field
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class ModelConfig(_DictMixin):
    """Shape of an ``RNNLM``: embedding → ``num_layers`` × ``cell`` → linear head."""

    vocab_size: int
    cell: str = "lstm"
    embed_size: int = 128
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0
    tie_weights: bool = False

    def __post_init__(self) -> None:
        _check(self.cell in CELLS, f"--cell must be one of {', '.join(CELLS)} (got {self.cell!r})")
        for name in ("vocab_size", "embed_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   f"--{name.replace('_', '-')} must be a whole number ≥ 1 (got {value!r})")
        _check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
               f"--dropout must be in [0, 1) (got {self.dropout!r})")
        _check(isinstance(self.tie_weights, bool), "--tie-weights must be true or false")
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

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "log_every", "max_bad_steps"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1,
                   f"--{name.replace('_', '-')} must be a whole number ≥ 1 (got {value!r})")
        for name in ("epochs", "max_steps", "eval_every", "patience"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= 1),
                   f"--{name.replace('_', '-')} must be a whole number ≥ 1 (got {value!r})")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
               f"--warmup-steps must be a whole number ≥ 0 (got {self.warmup_steps!r})")
        _check(_is_int(self.seed), f"--seed must be a whole number (got {self.seed!r})")
        _check(_finite(self.lr) and self.lr > 0, f"--lr must be > 0 (got {self.lr!r})")
        _check(_finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
               f"--min-lr-ratio must be in [0, 1] (got {self.min_lr_ratio!r})")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0,
               f"--weight-decay must be ≥ 0 (got {self.weight_decay!r})")
        _check(_finite(self.clip) and self.clip >= 0, f"--clip must be ≥ 0 (0 = off) (got {self.clip!r})")
        _check(self.max_minutes is None or (_finite(self.max_minutes) and self.max_minutes > 0),
               f"--max-minutes must be > 0 (got {self.max_minutes!r})")
        _check(_finite(self.val_fraction) and 0 < self.val_fraction < 1,
               f"--val-fraction must be in (0, 1) (got {self.val_fraction!r})")
        _check(self.device in DEVICES,
               f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})")


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
        _check(_finite(self.temperature) and self.temperature >= 0,
               f"--temperature must be ≥ 0 (0 = always the most likely token) (got {self.temperature!r})")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
               f"--top-k must be a whole number ≥ 1 (got {self.top_k!r})")
        _check(self.top_p is None or (_finite(self.top_p) and 0 < self.top_p <= 1),
               f"--top-p must be in (0, 1] (got {self.top_p!r})")
        _check(_is_int(self.length) and self.length >= 0,
               f"--length must be a whole number ≥ 0 (got {self.length!r})")
        _check(_is_int(self.num_samples) and self.num_samples >= 1,
               f"--num-samples must be a whole number ≥ 1 (got {self.num_samples!r})")
        _check(self.seed is None or _is_int(self.seed), f"--seed must be a whole number (got {self.seed!r})")
        _check(self.stop is None or (isinstance(self.stop, str) and self.stop != ""),
               "--stop must be a non-empty string")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class AutoSize:
    """What ``auto_size`` picked, so the CLI can say why."""

    hidden_size: int
    num_layers: int
    embed_size: int
    dropout: float
    tie_weights: bool
    seq_len: int
    batch_size: int
    lr: float
    reason: str


# Rough CPU training rates (tokens/s on 2 cores) per hidden size, used only to guess how many
# epochs a time budget buys, which decides how much dropout the model needs.
_CPU_TOKENS_PER_SECOND = {256: 25_000, 512: 10_000, 768: 5_000, 1024: 3_000, 1536: 1_500}
# Peak rates per hidden size: 256/512 at batch 16, the rest at batch 32 (768 measured: 1.2e-2 at
# batch 32 beat 1.5e-2; 1024/1536 scaled from the batch-16 sweeps by the same ×1.2).
_CPU_LR = {256: 2e-2, 512: 1.2e-2, 768: 1.2e-2, 1024: 8e-3, 1536: 6e-3}


def auto_size(*, tokenizer: str, train_tokens: int, max_minutes: float | None, gpu: bool) -> AutoSize:
    """Pick a model and batch shape for a corpus and a time budget.

    Larger budgets buy larger models; the expected number of passes over the data decides dropout.
    Char/byte figures come from tiny-shakespeare runs on 2 CPU cores (see README, "Defaults").
    """
    minutes = max_minutes if max_minutes is not None else 60.0
    if gpu:
        hidden, layers, batch, seq_len, lr = 1024, 3, 64, 256, 2e-3
        rate = 400_000
    else:
        # One wide layer: at these sizes a single sequential chain of larger matmuls beats stacked
        # narrow layers per CPU-second (tiny-shakespeare, 3 minutes: 1×512 1.493 vs 2×256 1.546).
        hidden = 512 if minutes <= 5 else 768 if minutes <= 20 else 1024 if minutes <= 90 else 1536
        layers, seq_len = 1, 100
        # A small corpus cannot feed a large model: cap the size by the data.
        while hidden > 512 and train_tokens < 100 * hidden * hidden // 64:
            hidden = {768: 512, 1024: 768, 1536: 1024}[hidden]
        if train_tokens < 200_000:
            hidden = 256
        # Small batches with a high peak rate learn fastest per CPU-second (tiny-shakespeare sweeps);
        # from 768 units, 32 streams keep the matmuls busier (+7% tokens/s) and learned as well
        # (10 minutes: 1.4400 at batch 32 against 1.4417 at 16, with the old decay to 10%).
        batch = 16 if hidden <= 512 else 32
        lr = _CPU_LR[hidden]
        rate = _CPU_TOKENS_PER_SECOND[hidden]
    expected_epochs = minutes * 60 * rate / max(train_tokens, 1)
    if tokenizer == "word":
        seq_len, dropout = 35, 0.5 if expected_epochs > 5 else 0.3
        return AutoSize(hidden, layers, hidden, dropout, True, seq_len, 32 if not gpu else batch, min(lr, 3e-3),
                        f"word model, ~{expected_epochs:.0f} epochs expected")
    dropout = 0.0 if expected_epochs < 8 else 0.1 if expected_epochs < 20 else 0.25
    embed = min(hidden, 128 if not gpu else 256)
    return AutoSize(hidden, layers, embed, dropout, False, seq_len, batch, lr,
                    f"{train_tokens:,} training tokens, ~{expected_epochs:.0f} epochs expected in the budget")
