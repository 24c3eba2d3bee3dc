"""Throughput of charlm's own code paths on this device, for ``charlm bench`` and ``benchmarks/``.

Every figure times the real code a user runs (the trainer, the evaluator, the sampler, the
tokenizer), on synthetic data of the requested shape, repeated and reported as a median.
"""
from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from charlm.config import ModelConfig, SampleConfig, TrainConfig
from charlm import machine
from charlm.infer.evaluate import evaluate
from charlm.model.lm import RNNLM, resolve_device
from charlm.model.precision import FP32, Precision, cpu_bf16_kernel_runs, resolve_precision
from charlm.infer.sample import generate
from charlm.data.tokenizer import CharTokenizer
from charlm.data.text import PreparedData
from charlm.training.loop import train


@dataclass(frozen=True)
class BenchConfig:
    cell: str = "lstm"
    hidden_size: int = 512
    num_layers: int = 2
    embed_size: int = 128
    vocab_size: int = 65
    batch_size: int = 64
    seq_len: int = 128
    train_steps: int = 40
    sample_length: int = 400
    sample_streams: int = 64
    repeats: int = 3
    device: str = "auto"
    bf16: bool | None = None  # also measure bf16 (training, evaluation, sampling); None: where it is fast


@dataclass(frozen=True)
class BenchResult:
    device: str
    config: dict
    train_tokens_per_second: float
    eval_tokens_per_second: float
    sample_chars_per_second_1: float
    sample_chars_per_second_n: float
    tokenize_mb_per_second: float
    matmul_gflops: float
    peak_memory_mb: float
    bare_train_tokens_per_second: float = 0.0  # a bare nn.LSTM loop of the same shape
    # The same figures with bf16 matmuls (train, bare train, eval, sample_n, matmul_gflops), or None;
    # a figure is None, and ``unavailable`` says why, where this CPU has no bf16 kernel for it.
    bf16: dict | None = None
    bare_sample_chars_per_second_1: float = 0.0  # a bare nn.LSTM one-token loop, each token read back
    # What charlm chose for speed on this machine, each with both timings (machine.answers()).
    choices: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def synthetic_ids(vocab_size: int, n: int, seed: int = 0) -> np.ndarray:
    """Ids with some structure (a noisy walk), so the model's numbers are not degenerate."""
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.integers(-2, 3, size=n)) % (vocab_size - 1) + 1).astype(np.uint8)


def tokenizer_for(vocab_size: int) -> CharTokenizer:
    return CharTokenizer([chr(0x21 + i) for i in range(vocab_size - 1)])


def train_rate(cfg: BenchConfig, device: torch.device, precision: str = "fp32") -> float:
    """The trainer's tokens/s with evaluation excluded: the median of its logged intervals."""
    tokenizer = tokenizer_for(cfg.vocab_size)
    ids = synthetic_ids(cfg.vocab_size, cfg.batch_size * (cfg.seq_len * (cfg.train_steps + 2) + 1))
    data = PreparedData(tokenizer, ids, ids[: cfg.seq_len * 4], cfg.seq_len * 4, len(ids))
    model_cfg = ModelConfig(vocab_size=cfg.vocab_size, cell=cfg.cell, hidden_size=cfg.hidden_size,
                            num_layers=cfg.num_layers, embed_size=cfg.embed_size)
    train_cfg = TrainConfig(seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_steps=cfg.train_steps,
                            eval_every=10**9, log_every=5, warmup_steps=2, device=str(device), precision=precision)
    rates: list[float] = []

    def collect(event: dict) -> None:
        # The first steps pay one-off costs (oneDNN primitive creation, allocator growth).
        if event["event"] == "step" and event["step"] > max(10, cfg.train_steps // 3):
            rates.append(event["tokens_per_second"])

    with tempfile.TemporaryDirectory(prefix="charlm-bench-") as folder:
        train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=folder, on_event=collect)
    return statistics.median(rates)


def bare_train_rate(cfg: BenchConfig, device: torch.device, *, precision: str = "fp32") -> float:
    """The reference: the plainest correct training loop of the same shape (embedding → nn.LSTM →
    linear, AdamW); in bf16 or fp16 its forward under autocast and the loss in fp32, fp16 with a
    ``GradScaler``."""
    torch.manual_seed(0)
    emb = nn.Embedding(cfg.vocab_size, cfg.embed_size).to(device)
    lstm = nn.LSTM(cfg.embed_size, cfg.hidden_size, cfg.num_layers, batch_first=True).to(device)
    head = nn.Linear(cfg.hidden_size, cfg.vocab_size).to(device)
    opt = torch.optim.AdamW([*emb.parameters(), *lstm.parameters(), *head.parameters()], lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    ids = torch.from_numpy(synthetic_ids(cfg.vocab_size, cfg.batch_size * (cfg.seq_len + 1)).astype(np.int64))
    data = ids.view(cfg.batch_size, cfg.seq_len + 1).to(device)
    x, y = data[:, :-1], data[:, 1:]
    steps = cfg.train_steps
    warm = max(10, steps // 3)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for i in range(steps):
        if i == warm:
            _sync_device(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out, _ = lstm(emb(x))
            logits = head(out)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), y.reshape(-1))
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    _sync_device(device)
    return (steps - warm) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)


@torch.no_grad()
def recurrence_dtypes(cfg: BenchConfig, device: torch.device, precision: str) -> dict[str, str]:
    """The number format the recurrent kernel ran in under ``precision``, read from its output, for
    charlm's model and for the bare loop's ``nn.LSTM``: a loop is compared by what its kernels did,
    not by its autocast dtype (on CUDA, autocast runs cuDNN's RNNs in fp16 whatever it is asked for;
    charlm keeps them fp32 under bf16: ``lm.FP32_RECURRENCE_UNDER_BF16``)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(0)
    lstm = nn.LSTM(cfg.embed_size, cfg.hidden_size, cfg.num_layers, batch_first=True).to(device)
    model = model_for(cfg, device)
    x = torch.zeros(2, 4, dtype=torch.long, device=device)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        bare = lstm(model.embedding(x))[0].dtype
        raw = model(x, with_outputs=True)[2][0].dtype
    return {"charlm": str(raw).removeprefix("torch."), "bare": str(bare).removeprefix("torch.")}


def model_for(cfg: BenchConfig, device: torch.device) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(ModelConfig(vocab_size=cfg.vocab_size, cell=cfg.cell, hidden_size=cfg.hidden_size,
                             num_layers=cfg.num_layers, embed_size=cfg.embed_size)).to(device).eval()


def eval_rate(model: RNNLM, ids: np.ndarray, *, precision: Precision = FP32) -> float:
    start = time.perf_counter()
    evaluate(model, ids, precision=precision)
    _sync_device(model.embedding.weight.device)
    return (len(ids) - 1) / (time.perf_counter() - start)


def sample_rate(model: RNNLM, tokenizer: CharTokenizer, *, streams: int, length: int, precision: str = "fp32") -> float:
    config = SampleConfig(length=length, num_samples=streams, seed=0, temperature=1.0)
    start = time.perf_counter()
    chars = sum(len(piece.text) for piece in generate(model, tokenizer, config=config, precision=precision))
    return chars / (time.perf_counter() - start)


@torch.inference_mode()
def bare_sample_rate(cfg: BenchConfig, device: torch.device, length: int) -> float:
    """The plainest one-token sampler: ``nn.LSTM`` called on each token, each token read on the host
    (as any streaming sampler does)."""
    torch.manual_seed(0)
    emb = nn.Embedding(cfg.vocab_size, cfg.embed_size).to(device)
    lstm = nn.LSTM(cfg.embed_size, cfg.hidden_size, cfg.num_layers).to(device)
    head = nn.Linear(cfg.hidden_size, cfg.vocab_size).to(device)
    token, state = torch.zeros(1, 1, dtype=torch.long, device=device), None
    for _ in range(5):  # kernel and allocator set-up, outside the timing
        out, state = lstm(emb(token), state)
    _sync_device(device)
    start = time.perf_counter()
    for _ in range(length):
        out, state = lstm(emb(token), state)
        token = torch.multinomial(head(out[-1]).softmax(-1), 1)
        token.item()
    return length / (time.perf_counter() - start)


def tokenize_rate(text: str) -> float:
    tokenizer = CharTokenizer.fit(text)
    start = time.perf_counter()
    tokenizer.encode(text)
    return len(text.encode("utf-8")) / 1e6 / (time.perf_counter() - start)


def matmul_gflops(device: torch.device, shape: tuple[int, int, int] = (1024, 1024, 1024),
                  dtype: torch.dtype = torch.float32, reps: int | None = None) -> float:
    """The measured rate of (rows × inner) @ (inner × cols) matmuls: by default a dense 1024³ one,
    the ceiling the recurrent matmuls run against."""
    rows, inner, cols = shape
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, cols, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync_device(device)
    reps = reps or (10 if device.type == "cpu" else 200)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync_device(device)
    return 2 * rows * inner * cols * reps / (time.perf_counter() - start) / 1e9


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(cfg: BenchConfig, *, on_progress: Callable[[str], None] | None = None) -> BenchResult:
    device = resolve_device(cfg.device)
    say = on_progress or (lambda message: None)
    say("training")
    train_tps, bare_tps = machine.alternated(cfg.repeats, lambda: train_rate(cfg, device),
                                             lambda: bare_train_rate(cfg, device))
    model = model_for(cfg, device)
    tokenizer = tokenizer_for(cfg.vocab_size)
    val = synthetic_ids(cfg.vocab_size, 200_000, seed=1)
    say("evaluation")
    eval_tps = median_of(cfg.repeats, lambda: eval_rate(model, val))
    say("sampling")
    sample_rate(model, tokenizer, streams=1, length=10)  # the sampler's kernel choice, measured outside the timing
    sample_rate(model, tokenizer, streams=cfg.sample_streams, length=10)
    one, bare_one = machine.alternated(
        cfg.repeats, lambda: sample_rate(model, tokenizer, streams=1, length=cfg.sample_length),
        lambda: bare_sample_rate(cfg, device, cfg.sample_length))
    many = median_of(cfg.repeats, lambda: sample_rate(model, tokenizer, streams=cfg.sample_streams,
                                                      length=max(50, cfg.sample_length // 4)))
    say("tokenization")
    text = "".join(tokenizer.itos[1:]) * (20_000_000 // (cfg.vocab_size - 1))
    tok = median_of(cfg.repeats, lambda: tokenize_rate(text))
    say("matmul")
    gflops = median_of(cfg.repeats, lambda: matmul_gflops(device))
    low = None
    auto = resolve_precision("auto", device)
    if cfg.bf16 or (cfg.bf16 is None and auto.name == "bf16"):
        bf16 = resolve_precision("bf16", device)
        # Where this CPU's kernels cannot run a recurrence in bf16, its rows say so (sampling steps
        # and the matmul need no recurrent kernel, and are measured).
        missing = cpu_bf16_kernel_runs(cfg.cell) if device.type == "cpu" else None
        bare_missing = cpu_bf16_kernel_runs("lstm") if device.type == "cpu" else None

        def unless(why: str | None, measure: Callable[[], float]) -> float | None:
            return None if why is not None else median_of(cfg.repeats, measure)

        say("bf16 training, evaluation and sampling")
        trained = (machine.alternated(cfg.repeats, lambda: train_rate(cfg, device, "bf16"),
                                      lambda: bare_train_rate(cfg, device, precision="bf16"))
                   if missing is None and bare_missing is None else
                   [unless(missing, lambda: train_rate(cfg, device, "bf16")),
                    unless(bare_missing, lambda: bare_train_rate(cfg, device, precision="bf16"))])
        low = {"train_tokens_per_second": trained[0], "bare_train_tokens_per_second": trained[1],
               "eval_tokens_per_second": unless(missing, lambda: eval_rate(model, val, precision=bf16)),
               "unavailable": missing or bare_missing,
               "recurrence": None if missing or bare_missing else recurrence_dtypes(cfg, device, "bf16"),
               "sample_chars_per_second_n": median_of(cfg.repeats, lambda: sample_rate(
                   model, tokenizer, streams=cfg.sample_streams, length=max(50, cfg.sample_length // 4),
                   precision="bf16")),
               "matmul_gflops": median_of(cfg.repeats, lambda: matmul_gflops(device, dtype=torch.bfloat16)),
               "default": auto.name == "bf16", "why": auto.reason}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return BenchResult(name, asdict(cfg), train_tps, eval_tps, one, many, tok, gflops, peak_memory_mb(device),
                       bare_tps, low, bare_one, machine.answers())
