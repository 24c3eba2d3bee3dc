"""The tables' sizing: a model, batch and regularisation from the corpus size and the budget.

The fallback where nothing can be timed (a distributed run, a budget in steps) and the start of
sizing.py's measured ladder; word models keep it (docs/choosing.md and benchmarks/README.md give
the runs behind each figure).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AutoSize:
    """What ``auto_size`` picked, and the reason the start line prints."""

    hidden_size: int
    num_layers: int
    embed_size: int
    dropout: float
    tie_weights: bool
    seq_len: int
    batch_size: int
    lr: float
    reason: str
    input_dropout: float | None = None
    embed_dropout: float = 0.0
    weight_drop: float = 0.0
    activation_reg: float = 0.0
    temporal_reg: float = 0.0
    optimizer: str = "adamw"  # the default optimiser; ``lr`` is AdamW's rate either way
    average: bool = False  # evaluate and save the average of the run's weights (averaging.py)
    average_power: float = 2.0
    min_lr_ratio: float = 0.0  # where the cosine decay ends when averaging (0 without)
    shift_windows: bool = False  # each epoch's windows start at their own offset


# Training rates on 2 CPU cores (tokens/s) by hidden size, only to guess the epochs a budget buys,
# which sets the regularisation.
_CPU_TOKENS_PER_SECOND = {256: 25_000, 512: 10_000, 768: 5_000, 1024: 3_000, 1536: 1_500}
_CPU_BF16_TOKENS_PER_SECOND = {256: 40_000, 512: 28_000, 768: 13_500, 1024: 8_000, 1536: 3_500}
_CPU_WORD_TOKENS_PER_SECOND = {256: 12_000, 400: 7_000, 512: 5_000, 768: 3_000}  # tied, batch 20 × 35
_WORD_BF16_SPEED_UP = 1.45
# Peak AdamW rates by hidden size (256/512 at batch 16, the rest at 32; sweeps in benchmarks/README.md).
_CPU_LR = {256: 2e-2, 512: 1.2e-2, 768: 1.2e-2, 1024: 8e-3, 1536: 6e-3}


def char_input_dropout(dropout: float) -> float:
    """A char or byte model's default dropout on the input embeddings: half its output dropout
    (the best of 0, half and equal in benchmarks/README.md's tiny-shakespeare runs)."""
    return dropout / 2


def auto_size(*, tokenizer: str, train_tokens: int, max_minutes: float | None, gpu: bool,
              bf16: bool = False) -> AutoSize:
    """A model and batch shape for a corpus and a time budget: larger budgets buy larger models
    (the next size up where ``bf16`` makes steps cheaper), the corpus caps the size it can feed,
    and the expected number of passes sets the dropout."""
    minutes = max_minutes if max_minutes is not None else 60.0
    if gpu:
        hidden, layers, batch, seq_len, lr = 1024, 3, 64, 256, 2e-3
        rate = 400_000
    else:
        # One wide layer: a single chain of larger matmuls beats stacked narrow layers per CPU-second.
        hidden = 512 if minutes <= 5 else 768 if minutes <= 20 else 1024 if minutes <= 90 else 1536
        if bf16:
            hidden = 768 if minutes <= 5 else 1024 if minutes <= 20 else 1536
        layers, seq_len = 1, 100
        # A small corpus cannot feed a large model (with bf16's dropout, twice as large per token).
        tokens_per_weight = 50 if bf16 else 100
        while hidden > 512 and train_tokens < tokens_per_weight * hidden * hidden // 64:
            hidden = {768: 512, 1024: 768, 1536: 1024}[hidden]
        if train_tokens < 200_000:
            hidden = 256
        # Small batches with a high peak rate learn fastest per CPU-second; from 768 units 32 streams
        # keep the matmuls busier.
        batch = 16 if hidden <= 512 else 32
        lr = _CPU_LR[hidden]
        rate = (_CPU_BF16_TOKENS_PER_SECOND if bf16 else _CPU_TOKENS_PER_SECOND)[hidden]
    if tokenizer == "word":
        return _auto_size_words(train_tokens=train_tokens, minutes=minutes, gpu=gpu, gpu_size=(hidden, layers, batch),
                                bf16=bf16)
    expected_epochs = minutes * 60 * rate / max(train_tokens, 1)
    dropout = 0.0 if expected_epochs < 8 else 0.1 if expected_epochs < 20 else 0.25
    if bf16 and not gpu:  # the larger bf16 models overfit sooner
        dropout = (0.0 if expected_epochs < 3 else 0.2 if expected_epochs < 6 else 0.25 if expected_epochs < 8
                   else 0.3)
    embed = min(hidden, 128 if not gpu else 256)
    return AutoSize(hidden, layers, embed, dropout, False, seq_len, batch, lr,
                    f"{train_tokens:,} training tokens, ~{expected_epochs:.0f} epochs expected in the budget",
                    input_dropout=char_input_dropout(dropout), shift_windows=expected_epochs >= 3)


def _auto_size_words(*, train_tokens: int, minutes: float, gpu: bool, gpu_size: tuple[int, int, int],
                     bf16: bool = False) -> AutoSize:
    """Word models: plain SGD at rate 20 with clipping 0.25 (the PyTorch word-LM example's, which
    beat AdamW by far on Grimm: benchmarks/results/sweep-word-grimm-3min.json), tied embeddings,
    and AWD-LSTM regularisation that grows with the epochs the budget buys."""
    if gpu:
        hidden, layers, batch = gpu_size
        rate = 400_000
    else:
        hidden = 400 if minutes <= 5 else 512 if minutes <= 20 else 768
        if train_tokens < 20_000:
            hidden = 256
        layers, batch = 1, 20
        rate = _CPU_WORD_TOKENS_PER_SECOND[hidden] * (_WORD_BF16_SPEED_UP if bf16 else 1.0)
    epochs = minutes * 60 * rate / max(train_tokens, 1)
    # (dropout, input dropout, embedding dropout, weight drop) by expected epochs, the last row
    # AWD-LSTM's own for long runs (sweep-word-grimm-3min.json, sweep-word-grimm-10min.json; the
    # boundary at 30 epochs lies between two measured points).
    reg = ((0.1, 0.1, 0.0, 0.0) if epochs < 3 else (0.2, 0.3, 0.05, 0.1) if epochs < 8
           else (0.3, 0.4, 0.05, 0.2) if epochs < 20 else (0.4, 0.5, 0.1, 0.3) if epochs < 30
           else (0.5, 0.65, 0.1, 0.5))
    ar, tar = (2.0, 1.0) if epochs >= 8 else (0.0, 0.0)  # AWD-LSTM's AR/TAR
    # Many epochs: a constant rate with the weights' average (AWD-LSTM's averaged SGD) and shifted
    # windows (word-grimm-3min.json, sweep-word-grimm-shift-windows.json); a run of few epochs is
    # still learning fast at its end, where an average lags, so it decays instead.
    average = epochs >= 8
    return AutoSize(hidden, layers, hidden, reg[0], True, 35, batch, 3e-3,
                    f"word model, ~{epochs:.0f} epochs expected", input_dropout=reg[1], embed_dropout=reg[2],
                    weight_drop=reg[3], activation_reg=ar, temporal_reg=tar, optimizer="sgd", average=average,
                    min_lr_ratio=1.0 if average else 0.0, shift_windows=epochs >= 8)
