"""The training loop. It never prints: progress goes to an ``on_event`` callback (and metrics.jsonl).

Truncated BPTT over B contiguous streams (see ``data.py``), hidden state carried across windows
and detached, gradient-norm clipping, AdamW with linear warm-up then cosine decay, periodic
evaluation of the whole validation split, best/last checkpoints, exact resume.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
import platform
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from charlm.model import checkpoint as ckpt
from charlm import fsutil
from charlm import jsonio
from charlm.training.averaging import WeightAverage
from charlm.config import ModelConfig, TrainConfig, brief
from charlm.data.text import PreparedData, batchify, epoch_offset, fit_batch_shape, num_windows, shifted_windows, window
from charlm.training.distributed import Dist, device_for
from charlm.errors import Cancelled, CheckpointError, ConfigError, RunInUseError, SaveError, TrainingError, out_of_memory_as
from charlm.infer.evaluate import EvalResult, eval_streams, evaluate
from charlm.model.lm import (GATES, RNNLM, State, count_parameters, detach_state, has_cell_state, resolve_device,
                    select_state)
from charlm.machine import alternated, milliseconds, remembered
from charlm.model.precision import FP32, resolve_precision, tf32_region

Event = dict[str, Any]


# ── schedule ────────────────────────────────────────────────────────────────────────────────────

def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to ``base_lr * min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# This rank's training streams are copied to the GPU once, up to this size, so a step copies no
# ids from the host (int32 there: a 250M-token corpus per process). Larger ones go window by window.
DEVICE_STREAMS_BYTES = 1 << 30

# The cache pointer fit at the end of a run takes at most this share of the time budget (kept
# inside it), or of the time training took where steps or epochs limit the run, and no less than
# CACHE_MIN_SECONDS then (a fit of a tiny model takes well under a second).
CACHE_SHARE = 0.1
CACHE_MIN_SECONDS = 2.0
# A time-budgeted run times one evaluation window of this many tokens per stream at its start, so
# the final evaluation is kept inside the budget even where no evaluation happens before it (a
# large validation split); evaluate() reads EVAL_CONTEXT tokens before each stream's first window.
EVAL_PROBE = 256
EVAL_CONTEXT = 128


def streams_on_device(streams: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """``streams`` (B, N) as an int32 tensor on ``device``, or None where windows are better cut on
    the host: on a CPU (where the streams already are) or when they would take more than
    ``DEVICE_STREAMS_BYTES``."""
    if device.type == "cpu" or streams.size * 4 > DEVICE_STREAMS_BYTES:
        return None
    return torch.from_numpy(np.ascontiguousarray(streams, dtype=np.int32)).to(device)


# glibc's malloc options (mallopt): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a CPU training step frees for the next step (Linux only; a
    no-op elsewhere). By default each block over 128 KiB-32 MiB is mapped from the kernel when
    allocated and unmapped when freed, so every window pays page faults on fresh zeroed pages for
    its activations and gradients; kept in the heap (blocks up to 32 MiB, the most glibc allows,
    and 1 GiB of freed heap before trimming) they are reused. Measured on 2 cores, 1×1024 LSTM
    batch 32, bf16: the trainer +9–20% tokens/s. The process then holds its peak memory until it
    exits. Returns whether the options took."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in (
            (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))
    except (OSError, AttributeError):  # another C library (musl), or none found
        return False


def keeps_steps_on_device(device: torch.device, dist: Dist, cfg: TrainConfig) -> bool:
    """Whether a step leaves its loss, its finiteness check and the skip of a bad step on the device,
    read by the host only when it logs: on a GPU (where a read waits for the queue to drain), in one
    process, with an optimizer whose fused kernel skips its update on ``found_inf`` (AdamW, SGD), and
    without a loss scaler or a weight average (which decide on the host)."""
    return (device.type == "cuda" and not dist.enabled and cfg.precision != "fp16" and not cfg.average
            and cfg.optimizer in ("adamw", "sgd"))


def _float32_state(state: State | None) -> State | None:
    """The carried state in float32 whatever the matmuls' precision (the kernels return bf16 under
    autocast), so a run's saved state resumes in any precision."""
    if state is None:
        return None
    return tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()  # type: ignore[return-value]


# ── optimizer and resume state ──────────────────────────────────────────────────────────────────

def make_optimizer(model: RNNLM, cfg: TrainConfig, device: torch.device, *,
                   fused: bool | None = None) -> torch.optim.Optimizer:
    """``cfg.optimizer``: AdamW (decoupled weight decay), plain SGD (the PyTorch word-LM example's),
    Adagrad (min-char-rnn's) or RMSprop with decay 0.95 (char-rnn's); the others' weight decay is
    the L2 kind. Biases and other vectors are never decayed; the trainer sets the rate each step.
    AdamW and SGD use their fused kernels (one pass over each tensor) on a GPU, and on a CPU where
    this machine measured them faster than PyTorch's default multi-tensor form (``fused_is_faster``),
    or where ``fused`` says."""
    if fused is None:
        fused = device.type == "cuda" or (device.type == "cpu" and cfg.optimizer in ("adamw", "sgd")
                                          and fused_is_faster(cfg.optimizer))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, fused=fused)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=0.95)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=fused)


def fused_is_faster(kind: str) -> bool:
    """Whether this CPU steps ``kind`` (adamw or sgd) faster with its fused kernel than in PyTorch's
    multi-tensor form, timed once per machine on 2.4M parameters (~50 ms), the answer kept."""
    answer = remembered("fused optimizer", kind, lambda: time_optimizers(kind),
                        valid=lambda kept: isinstance(kept, dict) and kept.get("chosen") in ("fused", "foreach"))
    return answer["chosen"] == "fused"


def time_optimizers(kind: str, *, rounds: int = 5) -> dict:
    """Milliseconds per step of the fused and the multi-tensor ``kind``: medians of alternating steps."""
    made = {}
    for name in ("fused", "foreach"):
        params = [torch.zeros(2048, 1024, requires_grad=True), torch.zeros(2048, 128, requires_grad=True),
                  torch.zeros(2048, requires_grad=True)]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        options = {"fused": True} if name == "fused" else {"foreach": True}
        made[name] = (torch.optim.SGD(params, lr=1e-3, momentum=0.0, **options) if kind == "sgd"
                      else torch.optim.AdamW(params, lr=1e-3, **options))
    for optimizer in made.values():
        optimizer.step()  # the first step builds the optimizer's state
    fused, foreach = alternated(rounds, milliseconds(made["fused"].step), milliseconds(made["foreach"].step))
    return {"fused_ms": fused, "foreach_ms": foreach, "chosen": "fused" if fused < foreach else "foreach"}


def _state_tensors(state) -> dict[str, torch.Tensor]:
    if state is None:
        return {}
    if isinstance(state, tuple):
        return {"hidden.h": state[0], "hidden.c": state[1]}
    return {"hidden.h": state}


def _optim_tensors(optimizer: torch.optim.Optimizer, model: RNNLM, state, rng_states: torch.Tensor,
                   averaged: bool = False, cuda_rng_states: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What ``--resume`` needs besides the weights. ``rng_states`` is every rank's CPU RNG state
    (one row per rank), and ``cuda_rng_states`` every rank's CUDA one on a GPU run, so each rank of a
    resumed distributed run draws its own dropout masks again.
    ``averaged``: the checkpoint holds the run's average weights, so the weights training goes on
    from are kept here (``raw.<name>``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    if averaged:
        tensors.update({f"raw.{name}": p.detach().float().clone() for name, p in model.named_parameters()})
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).float()
    tensors["rng.cpu"] = rng_states[0].clone()  # safetensors stores no two views of one buffer
    if len(rng_states) > 1:
        tensors["rng.cpu.ranks"] = rng_states
    if cuda_rng_states is not None:
        tensors["rng.cuda"] = cuda_rng_states[0].clone()
        if len(cuda_rng_states) > 1:
            tensors["rng.cuda.ranks"] = cuda_rng_states
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors.update(_state_tensors(state))
    return tensors


# Each optimizer's per-parameter state besides ``step``, and which of it can never be negative.
_MOMENTS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": (), "adagrad": ("sum",), "rmsprop": ("square_avg",)}
_NON_NEGATIVE = ("exp_avg_sq", "sum", "square_avg")


def check_optim_tensors(path: Path, tensors: dict[str, torch.Tensor], model_config: ModelConfig,
                        batch_size: int, steps_taken: int | None = None, optimizer: str = "adamw",
                        averaged: bool = False) -> None:
    """Check a resume file against the model before anything is restored: every parameter has a
    step and the optimizer's moments, of its own shape (or no parameter has any: no step was taken;
    plain SGD keeps none), the RNG state has the generator's size, and the hidden state is
    (layers, batch, hidden) for the cell. An ``averaged`` run's file holds every parameter's
    training weights (``raw.<name>``), finite and of its shape."""
    moments = _MOMENTS[optimizer]
    from charlm.model.lm import parameter_shapes

    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{path}: {message}; the file is damaged (resume from a copy, or start a new run)")

    shapes = parameter_shapes(model_config)
    if model_config.tie_weights:
        del shapes["head.weight"]
    found: dict[str, dict[str, torch.Tensor]] = {}
    raw = {key[len("raw."):]: value for key, value in tensors.items() if key.startswith("raw.")}
    if set(raw) != (set(shapes) if averaged else set()):
        raise bad("the training weights of a run with --average are missing or incomplete" if averaged
                  else f"unexpected entry {brief('raw.' + sorted(raw)[0])}")
    for name, value in raw.items():
        if tuple(value.shape) != shapes[name] or not value.is_floating_point() or not _is_finite(value):
            raise bad(f"the training weights raw.{name} are not {shapes[name]} finite numbers")
    for key, value in tensors.items():
        if key.startswith("raw."):
            continue
        if not key.startswith("optim."):
            if key not in ("rng.cpu", "rng.cpu.ranks", "rng.cuda", "rng.cuda.ranks", "hidden.h", "hidden.c"):
                raise bad(f"unexpected entry {brief(key)}")
            continue
        name, _, part = key[len("optim."):].rpartition(".")
        if name not in shapes or part not in ("step", *moments) or not moments:
            raise bad(f"unexpected optimizer entry {brief(key)}")
        found.setdefault(name, {})[part] = value
    if not found and steps_taken and moments:
        raise bad(f"the optimizer state is missing although the run has taken {steps_taken:,} steps")
    if found:
        for name, shape in shapes.items():
            parts = found.get(name, {})
            for part in ("step", *moments):
                if part not in parts:
                    raise bad(f"the optimizer state lacks {name}.{part}")
            step = parts["step"]
            if step.numel() != 1 or not bool(torch.isfinite(step.double()).all()) or float(step.double()) < 0 \
                    or (steps_taken is not None and float(step.double()) > steps_taken):
                raise bad(f"the optimizer step of {name} is not a count of the run's steps")
            for part in moments:
                moment = parts[part]
                if tuple(moment.shape) != shape:
                    raise bad(f"the optimizer state {name}.{part} has shape {tuple(moment.shape)}, "
                              f"the parameter has {shape}")
                if moment.dtype == torch.bool or not bool(torch.isfinite(moment.double()).all()):
                    raise bad(f"the optimizer state {name}.{part} holds NaN, Inf or non-numbers")
                if part in _NON_NEGATIVE and bool((moment < 0).any()):
                    raise bad(f"the optimizer state {name}.{part} is negative")
    rng_size = torch.get_rng_state().numel()
    rng = tensors.get("rng.cpu")
    if rng is None or rng.dtype != torch.uint8 or tuple(rng.shape) != (rng_size,):
        raise bad("the RNG state is missing or malformed")
    ranks = tensors.get("rng.cpu.ranks")
    if ranks is not None and (ranks.dtype != torch.uint8 or ranks.dim() != 2 or ranks.shape[1] != rng_size):
        raise bad("the per-process RNG states are malformed")
    for row in [rng, *(ranks if ranks is not None else [])]:
        try:  # the generator checks its own state (mt19937's position and seeded flag)
            torch.Generator().set_state(row.clone())
        except RuntimeError:
            raise bad("the RNG state is not a valid generator state") from None
    cuda = tensors.get("rng.cuda")
    if cuda is not None and (cuda.dtype != torch.uint8 or cuda.dim() != 1):
        raise bad("the CUDA RNG state is malformed")
    cuda_ranks = tensors.get("rng.cuda.ranks")
    if cuda_ranks is not None and (cuda is None or cuda_ranks.dtype != torch.uint8 or cuda_ranks.dim() != 2
                                   or cuda_ranks.shape[1] != cuda.numel()):
        raise bad("the CUDA RNG states of the ranks are malformed")
    expected = (model_config.num_layers, batch_size, model_config.hidden_size)
    parts = [k for k in ("hidden.h", "hidden.c") if k in tensors]
    if parts:
        wanted = ["hidden.h", "hidden.c"] if has_cell_state(model_config.cell) else ["hidden.h"]
        if parts != wanted:
            raise bad(f"the carried hidden state has {' and '.join(parts)}; a {model_config.cell.upper()} "
                      f"carries {' and '.join(wanted)}")
        for key in parts:
            value = tensors[key]
            if tuple(value.shape) != expected or not value.is_floating_point() \
                    or not bool(torch.isfinite(value).all()):
                raise bad(f"the carried hidden state {key} is not {expected} finite numbers")


def _restore_optim(optimizer: torch.optim.Optimizer, model: RNNLM, tensors: dict[str, torch.Tensor],
                   device: torch.device, dist: Dist, kind: str):
    """Restore what ``check_optim_tensors`` accepted: moments through the optimizer's own
    ``load_state_dict`` (which puts each on its parameter's device, and ``step`` where a fused
    optimizer needs it), this rank's RNG state, and the carried hidden state (all B streams)."""
    order = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for index, p in enumerate(order):
        key = f"optim.{names[id(p)]}"
        if f"{key}.step" in tensors:
            state[index] = {"step": tensors[f"{key}.step"].reshape(()).to(torch.float32),
                            **{part: tensors[f"{key}.{part}"].float() for part in _MOMENTS[kind]}}
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)
    ranks = tensors.get("rng.cpu.ranks")
    # A fresh copy, never a view: set_rng_state reads the storage from its start, ignoring a
    # view's offset (a row of the ranks table would restore the wrong bytes, or crash).
    own = ranks[dist.rank] if ranks is not None and len(ranks) == dist.world_size else tensors["rng.cpu"]
    torch.set_rng_state(own.clone())
    if "rng.cuda" in tensors and device.type == "cuda":
        cuda_ranks = tensors.get("rng.cuda.ranks")
        own = (cuda_ranks[dist.rank] if cuda_ranks is not None and len(cuda_ranks) == dist.world_size
               else tensors["rng.cuda"])
        torch.cuda.set_rng_state(own.clone())
    if "hidden.h" not in tensors:
        return None
    h = tensors["hidden.h"].float().to(device)
    return (h, tensors["hidden.c"].float().to(device)) if "hidden.c" in tensors else h


@dataclass
class Resume:
    """What ``--resume`` restores: weights, configs, tokenizer, and the optimizer/RNG/hidden state."""

    checkpoint: ckpt.Checkpoint
    optim_tensors: dict[str, torch.Tensor]
    run_dir: Path


def load_resume(run: str | Path) -> Resume:
    run = Path(run)
    path = ckpt.resolve_checkpoint(run, prefer=ckpt.LAST)
    if path.name != ckpt.LAST:
        raise CheckpointError(f"{run}: no {ckpt.LAST} to resume from")
    checkpoint = ckpt.load_checkpoint(path)
    optim_name = checkpoint.train_state.get("optim_file")
    if not optim_name or checkpoint.train_config is None:
        raise CheckpointError(f"{path}: holds no training state to resume from")
    optim_path = path.parent / Path(str(optim_name)).name
    tensors, _ = ckpt.load_tensors(optim_path)
    check_optim_tensors(optim_path, tensors, checkpoint.model_config, checkpoint.train_config.batch_size,
                        checkpoint.train_state.get("step"), checkpoint.train_config.optimizer,
                        checkpoint.train_config.average)
    for key in ("step", "epoch", "window"):
        if key not in checkpoint.train_state:
            raise CheckpointError(f"{path}: train_state lacks {key!r}, so the run cannot be resumed")
    if checkpoint.train_config.average and "average_total" not in checkpoint.train_state:  # its value: checked on load
        raise CheckpointError(f"{path}: train_state lacks the weight average's total (average_total), so the run "
                              f"cannot be resumed")
    return Resume(checkpoint, tensors, path.parent)


# ── the loop ────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class TrainResult:
    """What a run ended with. Losses are nats/token on the validation split; the best is the
    run's own, from before a resume too."""

    run_dir: Path
    step: int
    best_val_loss: float
    best_step: int
    last_val_loss: float
    stopped_by: str  # "done", "time", "early-stop", "interrupt"
    elapsed_seconds: float
    num_parameters: int
    best_val_bpc: float = float("nan")  # bits per character of the validation text
    eval_seconds: float = 0.0  # of this session's time, spent evaluating (and saving checkpoints)
    cache: Any = None  # pointer.CacheSearch: the cache pointer fitted at the end (None if not fitted)
    cache_seconds: float = 0.0  # of elapsed_seconds, spent fitting it (loading and storing included)

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / ckpt.BEST


def _is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def train(*, model_config: ModelConfig, train_config: TrainConfig, data: PreparedData, run_dir: str | Path,
          source: str = "", on_event: Callable[[Event], None] | None = None,
          should_stop: Callable[[], str | None] | None = None, resume: Resume | None = None,
          dist: Dist | None = None, val_source: str | None = None,
          init_weights: dict[str, torch.Tensor] | None = None,
          corpus_options: dict[str, Any] | None = None, precision_reason: str | None = None,
          sizing: dict[str, Any] | None = None) -> TrainResult:
    """Train a model and write checkpoints and metrics.jsonl into ``run_dir``.

    ``should_stop`` is polled after every step; a non-empty answer (e.g. "SIGINT") ends the run
    after saving ``last``. Returns what happened; raises ``TrainingError`` if the loss stays
    non-finite for ``max_bad_steps`` steps in a row (the last good checkpoint is kept).

    With ``dist`` (a torchrun world) each rank trains its own slice of the B streams under DDP;
    rank 0 alone writes files and reports events, and every stop decision is taken from values
    reduced across ranks, so all ranks stop at the same step.

    ``corpus_options`` (how the corpus was read: ``encoding_errors``, a folder corpus's
    ``include``/``exclude`` patterns and the digest of its split) are kept in the checkpoint for
    ``--resume``. ``init_weights`` (fine-tuning) starts from another model's tensors instead of a random
    initialisation; a vocabulary that grew keeps the old rows and initialises only the new ones.
    ``precision_reason`` says why ``train_config.precision`` (the start event reports it), and
    ``sizing`` what was measured to size the model (``sizing.Sized.to_dict``; the start event too).
    """
    if train_config.max_steps is None and train_config.epochs is None and train_config.max_minutes is None:
        raise ConfigError("give a stopping rule (max_steps, epochs or max_minutes): without one training never "
                          "ends (charlm.train and the CLI default to 3 minutes)")
    dist = dist or Dist()
    run_dir = Path(run_dir)
    with claim_run_dir(run_dir, dist), tf32_region(resolve_device(train_config.device), train_config.tf32):
        return _Run(model_config=model_config, train_config=train_config, data=data, run_dir=run_dir,
                    source=source, on_event=on_event, should_stop=should_stop, resume=resume, dist=dist,
                    val_source=val_source, init_weights=init_weights,
                    corpus_options=corpus_options or {}, precision_reason=precision_reason,
                    sizing=sizing).run()


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


class _Run:
    """One training session: ``__init__`` sets up, ``run`` is the loop, and each phase of a step
    (``train_step``, ``evaluate_and_save``, ``stop_before_step``) reads on its own."""

    def __init__(self, *, model_config: ModelConfig, train_config: TrainConfig, data: PreparedData, run_dir: Path,
                 source: str, on_event: Callable[[Event], None] | None, should_stop: Callable[[], str | None] | None,
                 resume: Resume | None, dist: Dist, val_source: str | None,
                 init_weights: dict[str, torch.Tensor] | None, corpus_options: dict[str, Any],
                 precision_reason: str | None = None, sizing: dict[str, Any] | None = None) -> None:
        cfg = train_config
        self.sizing = sizing
        self.dist, self.data, self.run_dir, self.resume = dist, data, run_dir, resume
        self.source, self.val_source, self.corpus_options = source, val_source, corpus_options
        self.should_stop = should_stop
        self.device = device_for(dist, resolve_device(cfg.device))
        self.emit = (on_event or (lambda event: None)) if dist.is_main else (lambda event: None)
        self.metrics_path = run_dir / "metrics.jsonl"

        shape = fit_batch_shape(len(data.train_ids), cfg.batch_size, cfg.seq_len)
        if shape.warning and resume is not None:
            raise ConfigError(f"the training text is too short for the resumed run's --batch-size {cfg.batch_size} "
                              f"and --seq-len {cfg.seq_len} ({len(data.train_ids):,} tokens); resume on the run's "
                              f"corpus")
        if shape.warning:
            self.emit({"event": "warning", "message": shape.warning})
            cfg = cfg.replace(batch_size=shape.batch_size, seq_len=shape.seq_len)
        self.precision = resolve_precision(cfg.precision, self.device, cell=model_config.cell)
        if precision_reason:
            self.precision = dataclasses.replace(self.precision, reason=precision_reason)
        self.cfg = cfg = cfg.replace(precision=self.precision.name)  # the checkpoint says what ran
        # fp16's narrow range underflows small gradients: scale the loss (bf16 has fp32's range).
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.name == "fp16" else None
        self.device_side = keeps_steps_on_device(self.device, dist, cfg)
        check_memory(model_config, cfg, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(cfg.seed)
        with out_of_memory_as(f"building a model of {count_parameters(model_config):,} parameters",
                              "make --hidden-size, --num-layers or --embed-size smaller"):
            self.model = RNNLM(model_config)
            if init_weights is not None:
                load_initial_weights(self.model, init_weights)
            self.model.to(self.device)
            fused = True if self.device_side else None
            if fused is None and dist.enabled and self.device.type == "cpu":
                # Every rank steps the same way (rank 0 measured which is faster), so their weights stay equal.
                fused = dist.broadcast_object(cfg.optimizer in ("adamw", "sgd") and fused_is_faster(cfg.optimizer)
                                              if dist.is_main else None)
            self.optimizer = make_optimizer(self.model, cfg, self.device, fused=fused)
        if dist.enabled:
            # Different dropout masks on different streams. Seeded before a resume restores each
            # rank's own RNG state, so a resumed run draws the masks an uninterrupted one would.
            torch.manual_seed(cfg.seed + dist.rank)

        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes "
                              f"({dist.world_size}): each process carries the same number of streams")
        self.streams = batchify(data.train_ids, cfg.batch_size)  # (B, N // B), all ranks see the same layout
        per_rank = cfg.batch_size // dist.world_size
        self.rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)  # this rank's streams
        self.device_streams = streams_on_device(self.streams[self.rows], self.device)
        if cfg.shift_windows:  # each epoch's windows start at their own offset (epoch_offset)
            self.steps_per_epoch, self.largest_offset = shifted_windows(self.streams.shape[1], cfg.seq_len)
        else:
            self.steps_per_epoch, self.largest_offset = num_windows(self.streams.shape[1], cfg.seq_len), 0
        planned = [s for s in (cfg.max_steps, cfg.epochs * self.steps_per_epoch if cfg.epochs else None) if s]
        self.fixed_total = min(planned) if planned else None
        self.budget = cfg.max_minutes * 60 if cfg.max_minutes else None

        self.progress = Progress(total_steps=self.fixed_total or 10**9,
                                 warmup_steps=min(cfg.warmup_steps, max(1, (self.fixed_total or 10**9) // 10)))
        self.state = None  # the hidden state carried from window to window (this rank's streams)
        self.average: WeightAverage | None = None  # --average's: what the run evaluates and saves
        if resume is not None:
            self._restore(resume)
        elif cfg.average:
            self.average = WeightAverage(self.model.parameters(), cfg.average_power)
        if dist.enabled:
            # DDP averages gradients over ranks: each rank's mean loss over B/W streams, averaged,
            # is the mean over all B streams, so the step equals a one-process step with batch B.
            self.net: torch.nn.Module = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.net = self.model
        self.num_parameters = self.model.num_parameters()
        self.elapsed_before = self.progress.elapsed_seconds
        self.start_time = time.perf_counter()
        self.clock = self.local_elapsed()  # the run's clock: the ranks' mean, so every rank reads the same time

    def _restore(self, resume: Resume) -> None:
        st = resume.checkpoint.train_state
        self.model.load_state_dict(resume.checkpoint.model.state_dict())
        if self.cfg.average:  # the checkpoint holds the average; training goes on from raw.*
            self.average = WeightAverage(self.model.parameters(), self.cfg.average_power,
                                         total=float(resume.checkpoint.train_state["average_total"]))
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.copy_(resume.optim_tensors[f"raw.{name}"])
        self.progress = Progress.from_state(st, warmup_steps=self.progress.warmup_steps,
                                            total_steps=self.progress.total_steps)
        self.progress.stopped_by, self.progress.optim_file = None, None
        if self.fixed_total:
            self.progress.total_steps = self.fixed_total
        self.state = _restore_optim(self.optimizer, self.model, resume.optim_tensors, self.device, self.dist,
                                    self.cfg.optimizer)
        if self.state is not None:
            self.state = select_state(self.state, self.rows)  # the saved state covers all B streams
        p = self.progress
        if (reached := _limit_reached(self.cfg, resume.checkpoint.train_config, st, step=p.step, epoch=p.epoch,
                                      elapsed=p.elapsed_seconds, fixed_total=self.fixed_total)) is not None:
            raise ConfigError(f"the run in {self.run_dir} has already reached {reached}; give a larger limit to "
                              f"train it further (limits count the whole run, what is done included)")

    # ── bookkeeping ──

    def local_elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def record(self, event: Event) -> None:
        """Append an event to metrics.jsonl (rank 0) and hand it to ``on_event``."""
        with self.dist.main_outcome():
            if not self.dist.is_main:
                return
            fsutil.append_text(self.metrics_path, jsonio.dumps(event) + "\n")  # never through a planted link
            self.emit(event)

    def train_state(self) -> dict[str, Any]:
        p = self.progress
        return {"step": p.step, "epoch": p.epoch, "window": p.window, "best_val_loss": p.best_val_loss,
                "best_step": p.best_step, "evals_since_best": p.evals_since_best, "total_steps": p.total_steps,
                "warmup_steps": p.warmup_steps, "elapsed_seconds": self.clock, "tokens_seen": p.tokens_seen,
                "val_loss": p.val_loss, "corpus": self.source, "val_corpus": self.val_source,
                "optim_file": p.optim_file, "num_parameters": self.num_parameters,
                "world_size": self.dist.world_size, "stopped_by": p.stopped_by,
                **({"average_total": self.average.total} if self.average is not None else {}),
                **{key: list(value) if isinstance(value, (list, tuple)) else value
                   for key, value in self.corpus_options.items() if value}}

    def averaged(self):
        """A block in which the model holds the weights the run reports: their average with
        ``--average``, else the weights themselves."""
        return self.average.swapped_in() if self.average is not None else nullcontext()

    def check_weights(self) -> None:
        if not all(_is_finite(p) for p in self.model.parameters()):
            raise TrainingError("the weights became NaN/Inf; the last good checkpoint is kept")

    def save_last(self) -> None:
        """last.safetensors and its optimizer file (every rank takes part: the saved hidden state
        is all B streams and every rank's RNG state, gathered in rank order)."""
        dist, state = self.dist, self.state
        full_state = None
        if state is not None:
            parts = state if isinstance(state, tuple) else (state,)
            gathered = tuple(dist.all_gather_cat(p, dim=1) for p in parts)
            full_state = gathered if isinstance(state, tuple) else gathered[0]
        # Through the run's device, which NCCL needs; a world of one gets its own state back.
        rng_states = dist.all_gather_cat(torch.get_rng_state()[None].to(self.device), dim=0).cpu()
        cuda_rng_states = None
        if self.device.type == "cuda":  # each GPU's own generator draws its own masks
            cuda_rng_states = dist.all_gather_cat(torch.cuda.get_rng_state(self.device)[None].to(self.device),
                                                  dim=0).cpu()
        with dist.main_outcome():
            if dist.is_main:
                self._write_last(full_state, rng_states, cuda_rng_states)

    def _write_last(self, full_state: State | None, rng_states: torch.Tensor,
                    cuda_rng_states: torch.Tensor | None = None) -> None:
        self.check_weights()
        # The optimizer file is named by step and written first, so last.safetensors always
        # names an optimizer file that exists, whatever moment a crash hits.
        new_optim = f"last.step{self.progress.step:09d}.optim.safetensors"
        ckpt.save_tensors(self.run_dir / new_optim, _optim_tensors(self.optimizer, self.model, full_state, rng_states,
                                                                   averaged=self.average is not None,
                                                                   cuda_rng_states=cuda_rng_states),
                          {"format": ckpt.FORMAT, "step": str(self.progress.step)})
        self.progress.optim_file = new_optim
        with self.averaged():
            ckpt.save_checkpoint(self.run_dir / ckpt.LAST, model=self.model, tokenizer=self.data.tokenizer,
                                 train_config=self.cfg, train_state=self.train_state())
        for old in self.run_dir.glob("last.step*.optim.safetensors"):
            if old.name != new_optim:
                old.unlink(missing_ok=True)

    # ── the phases of a step ──

    def stop_before_step(self) -> str | None:
        """Whether the run is over before the next step: "done", "time", or None (go on). A new
        epoch starts here (and resets the carried state)."""
        p = self.progress
        if self.fixed_total is not None and p.step >= self.fixed_total:
            return "done"
        if self.budget is not None and self.clock + self.end_reserve() >= self.budget:
            return "time"
        if p.window >= self.steps_per_epoch:
            p.epoch, p.window, self.state = p.epoch + 1, 0, None
            if self.cfg.epochs is not None and p.epoch >= self.cfg.epochs:
                return "done"
        return None

    def train_step(self) -> tuple[float, float, str | None]:
        """One window forward and backward, then the optimizer step if everything was finite.
        Returns (the loss, averaged over ranks, or NaN where it stays on the device; the learning
        rate; a stop request)."""
        cfg, dist, p = self.cfg, self.dist, self.progress
        offset = epoch_offset(cfg.seed, p.epoch, self.largest_offset)
        if self.device_streams is not None:
            x, y = window(self.device_streams, p.window, cfg.seq_len, offset=offset)
        else:
            x, y = window(self.streams, p.window, cfg.seq_len, self.rows, offset=offset)
            x, y = x.to(self.device), y.to(self.device)
        lr = lr_at(p.step, base_lr=cfg.lr, warmup_steps=p.warmup_steps, total_steps=p.total_steps,
                   min_lr_ratio=cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with out_of_memory_as(f"in training step {p.step + 1:,}", self.step_hint), dist.guard(), \
                self.precision.autocast(self.device):
            if cfg.activation_reg > 0 or cfg.temporal_reg > 0:
                logits, new_state, (raw, dropped) = self.net(x, self.state, with_outputs=True)
            else:
                logits, new_state = self.net(x, self.state)  # (B / world size, T, V)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            objective = loss
            if cfg.activation_reg > 0:  # AR: large activations cost (after dropout, as in AWD-LSTM)
                objective = objective + cfg.activation_reg * dropped.float().pow(2).mean()
            if cfg.temporal_reg > 0 and raw.size(1) > 1:  # TAR: fast-changing hidden states cost
                objective = objective + cfg.temporal_reg * (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean()
            self.optimizer.zero_grad(set_to_none=True)
            # under DDP the gradients arrive averaged over ranks
            (self.scaler.scale(objective) if self.scaler else objective).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                        cfg.clip if cfg.clip > 0 else math.inf)
        reason = self.should_stop() if self.should_stop else None
        if self.device_side:
            loss_value, self.clock = math.nan, self.local_elapsed()
            self._step_on_device(loss.detach(), new_state)
        else:
            if dist.enabled:  # one small collective a step: the mean loss, the clock and stop requests
                shared = dist.all_reduce_sum(torch.tensor(
                    [float(loss.detach()), self.local_elapsed(), 1.0 if reason else 0.0], dtype=torch.float64))
                loss_value, self.clock = float(shared[0]) / dist.world_size, float(shared[1]) / dist.world_size
                reason = reason or ("stopped by another process" if shared[2] > 0 else None)
            else:
                loss_value, self.clock = float(loss.item()), self.local_elapsed()
            self._step_on_host(loss_value, new_state)
        p.step += 1
        p.window += 1
        p.tokens_seen += x.numel() * dist.world_size
        self.interval_tokens += x.numel() * dist.world_size
        return loss_value, lr, reason

    def _step_on_host(self, loss_value: float, new_state: State) -> None:
        """The rest of a step, decided on the host: the optimizer step if the loss and the gradients
        are finite, else a bad step (skipped, the carried state dropped)."""
        if math.isfinite(loss_value) and (self.scaler or _is_finite(self.grad_norm)):
            if self.scaler:  # gradients that overflowed at this loss scale: it skips the step and lowers it
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.average is not None:
                self.average.update(self.progress.step + 1)
            self.bad_steps = 0
            self.state = _float32_state(detach_state(new_state))
            self.interval_loss += loss_value
            self.interval_count += 1
        else:
            if self.scaler:  # unscale_ ran this step: update() closes it (and lowers the scale), or the
                self.scaler.update()  # next step's unscale_ would refuse to run
            self.bad_steps += 1
            self.state = None  # a non-finite state would poison every later window
            self.record({"event": "bad_step", "step": self.progress.step, "loss": loss_value,
                         "consecutive": self.bad_steps})
            if self.bad_steps >= self.cfg.max_bad_steps:
                raise self.too_many_bad_steps()

    def _step_on_device(self, loss: torch.Tensor, new_state: State) -> None:
        """The rest of a step without waiting for the device: the fused optimizer skips its update
        where the loss or the gradients are not finite (``found_inf``), a bad step's state is reset
        (zeros, as a fresh one), and the loss sum, the count of good steps and the run of bad steps
        stay on the device until ``log_step`` reads them."""
        ok = torch.isfinite(loss) & torch.isfinite(self.grad_norm)
        self.optimizer.found_inf = (~ok).float()
        self.optimizer.step()
        state = detach_state(new_state)
        kept = tuple(torch.where(ok, s, 0.0) for s in state) if isinstance(state, tuple) else torch.where(ok, state, 0.0)
        self.state = _float32_state(kept)
        sums, good = self.device_sums, ok.double()
        sums[0] += torch.where(ok, loss.double(), 0.0)
        sums[1] += good
        sums[2] = (sums[2] + 1) * (1 - good)  # the run of bad steps: one longer, or back to 0

    def _read_device_steps(self) -> None:
        """What the steps since the last read left on the device (one wait): their losses into the
        log interval, and a run of bad steps, recorded and stopped as on the host path."""
        loss_sum, good, bad = self.device_sums.tolist()
        self.device_sums[:2] = 0
        self.interval_loss += loss_sum
        self.interval_count += int(good)
        self.bad_steps = int(bad)
        if self.bad_steps:
            self.record({"event": "bad_step", "step": self.progress.step, "loss": None,
                         "consecutive": self.bad_steps})
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise self.too_many_bad_steps()

    def too_many_bad_steps(self) -> TrainingError:
        return TrainingError(f"the loss or gradients were NaN/Inf for {self.bad_steps} steps in a row at step "
                             f"{self.progress.step}; stopped. The last good checkpoint in {self.run_dir} is kept; "
                             f"try a lower --lr or --clip")

    def evaluate_and_save(self) -> float:
        """Evaluate the whole validation split, keep best (if better) and last; the seconds it took."""
        p, dist, data = self.progress, self.dist, self.data
        t0 = time.perf_counter()
        with out_of_memory_as(f"evaluating at step {p.step:,}", "make --hidden-size or --num-layers smaller"):
            # fp32 whatever the training precision: the figure a run reports is the one `charlm
            # perplexity` reproduces and runs on other machines are compared by (bf16 would be
            # within 2e-3 nats/token: tests/test_precision.py).
            with self.averaged():
                result = evaluate(self.model, data.val_ids, precision=FP32, dist=dist)
                p.val_loss = result.nats_per_token
                improved = p.val_loss < p.best_val_loss
                if improved:
                    p.best_val_loss, p.best_step, p.evals_since_best = p.val_loss, p.step, 0
                    with dist.main_outcome():
                        if dist.is_main:
                            self.check_weights()
                            ckpt.save_checkpoint(self.run_dir / ckpt.BEST, model=self.model,
                                                 tokenizer=data.tokenizer, train_config=self.cfg,
                                                 train_state=self.train_state())
        if not improved:
            p.evals_since_best += 1
        self.save_last()
        seconds = float(dist.all_reduce_sum(torch.tensor([time.perf_counter() - t0], dtype=torch.float64))[0])
        seconds /= dist.world_size
        # The run's best so far (an earlier session's, when resumed) on the same split, in bits/char too.
        best = EvalResult(p.best_val_loss * result.num_predicted, result.num_predicted)
        self.record({"event": "eval", "step": p.step, "epoch": p.epoch, "val_loss": p.val_loss,
                     "best_val_loss": p.best_val_loss, "val_bpc": result.bits_per_char(data.val_chars),
                     "improved": improved, "best_step": p.best_step,
                     "best_val_bpc": best.bits_per_char(data.val_chars), "eval_seconds": seconds,
                     "elapsed": self.clock})
        return seconds

    def plan_cache_fit(self):
        """At the start of a time-budgeted run: what a cache pointer fit costs here (measured on
        rank 0 with this model's shape, shared with the others) and the seconds kept for it at the
        end, its predicted cost on the tokens it would read, at most ``CACHE_SHARE`` of the budget."""
        from charlm.infer.pointer import TUNE_TOKENS, TUNE_WORK, measure_fit_cost

        cost = measure_fit_cost(self.model, self.data.val_ids, precision=FP32) if self.dist.is_main else None
        cost = self.dist.broadcast_object(cost)
        tokens = min(TUNE_TOKENS, TUNE_WORK // self.model.cfg.hidden_size, max(len(self.data.val_ids) - 1, 0))
        return cost, min(self.budget * CACHE_SHARE, cost.seconds(tokens))

    def cache_allowance(self) -> float:
        """The seconds the cache pointer fit may take: what is left of a time budget, at most
        ``CACHE_SHARE`` of it; without one, ``CACHE_SHARE`` of the time training took, at least
        ``CACHE_MIN_SECONDS``."""
        if self.budget is not None:
            return max(0.0, min(self.budget * CACHE_SHARE, self.budget - self.clock))
        return max(CACHE_MIN_SECONDS, self.clock * CACHE_SHARE)

    def end_with_cache_fit(self) -> None:
        """Fit the cache pointer (rank 0), record what came of it, and add its time to the run's clock."""
        allowance = self.cache_allowance()
        with self.dist.main_outcome():
            found, seconds = self.fit_cache(allowance) if self.dist.is_main else (None, 0.0)
        self.cache_seconds = float(self.dist.broadcast_object(seconds))
        self.clock += self.cache_seconds
        self.cache_search = found if found is not None and found.skipped is None else None
        if found is None:  # rank 0's; record() writes and reports on rank 0 only
            self.record({"event": "warning", "message": "stopped while fitting the cache pointer: the best "
                                                        "checkpoint is left as it was"})
        elif found.skipped is not None:
            self.record({"event": "warning", "message": f"no cache pointer fitted: {found.skipped}; the best "
                                                        f"checkpoint is left as it was"})
        else:
            self.record({"event": "cache", "cache": found.cache.to_dict() if found.cache else None,
                         "val_loss": found.nats_per_token, "val_loss_without": found.nats_per_token_without,
                         "tokens": found.tokens, "seconds": found.seconds, "cut_short": found.cut_short,
                         "allowance": allowance})

    def fit_cache(self, allowance: float):
        """Fit a cache pointer to the best checkpoint on the validation split within ``allowance``
        seconds (loading and storing included) and store it there (or store that none helps).
        Progress goes to ``on_event`` (not to metrics.jsonl). Rank 0 only. Returns the
        ``pointer.CacheSearch`` (its ``seconds`` the whole fit's) or None if a stop request cut it
        short, and the seconds it took."""
        from charlm.infer.pointer import tune_cache

        t0 = time.perf_counter()
        self.emit({"event": "cache_start", "seconds": allowance, "elapsed": self.clock})

        def progress(phase: str, done: int, total: int) -> None:
            self.emit({"event": "cache_progress", "phase": phase, "done": done, "total": total,
                       "elapsed": self.clock + time.perf_counter() - t0})

        path = self.run_dir / ckpt.BEST
        best = ckpt.load_checkpoint(path, device=str(self.device))
        try:
            found = tune_cache(best.model, self.data.val_ids, precision=FP32,
                               should_stop=lambda: bool(self.should_stop and self.should_stop()),
                               max_seconds=max(0.0, allowance - (time.perf_counter() - t0)),
                               cost=self.fit_cost, on_progress=progress)
        except Cancelled:
            return None, time.perf_counter() - t0
        if found.skipped is None:
            ckpt.store_cache(path, found.cache)
        seconds = time.perf_counter() - t0
        return dataclasses.replace(found, seconds=seconds), seconds

    def log_step(self, lr: float) -> None:
        """Every ``log_every`` steps: the mean training loss since the last record, and the speed."""
        p = self.progress
        if p.step % self.cfg.log_every:
            return
        if self.device_side:
            self._read_device_steps()
        if self.interval_count:
            self.record({"event": "step", "step": p.step, "epoch": p.epoch,
                         "loss": self.interval_loss / self.interval_count, "lr": lr,
                         "grad_norm": float(self.grad_norm),
                         "tokens_per_second": self.interval_tokens / max(self.clock - self.interval_start, 1e-9),
                         "elapsed": self.clock,
                         "total_steps": p.total_steps if (self.fixed_total or self.budget) else None})
            self.interval_tokens, self.interval_start, self.interval_loss, self.interval_count = 0, self.clock, 0.0, 0

    def eval_period(self, steps_since: int, since: float) -> float:
        """Seconds between evaluations under a time budget: a twentieth of it, or 30 × the cost
        of an evaluation if that is more (its cost measured, or estimated from the training speed
        as a third of a training step per token, until the first evaluation)."""
        cost = self.last_eval_seconds or self.estimated_eval_seconds(steps_since, since)
        return max(self.budget / 20, 30 * cost)

    def probe_eval_seconds(self) -> float:
        """At the start of a time-budgeted run: an evaluation's cost, from timing its first window
        (each of the streams it reads the split with, one window of ``EVAL_PROBE`` tokens after its
        context), scaled to the whole split; 0 where the split is too short for that to save much."""
        n = len(self.data.val_ids)
        streams = eval_streams(n)
        length = (n - 1) // streams
        if length < 4 * EVAL_PROBE:
            return 0.0
        t0 = time.perf_counter()
        evaluate(self.model, self.data.val_ids[:streams * EVAL_PROBE + 1], num_streams=streams, precision=FP32,
                 dist=self.dist)
        seconds = float(self.dist.all_reduce_sum(torch.tensor([time.perf_counter() - t0], dtype=torch.float64))[0])
        context = min(EVAL_CONTEXT, EVAL_PROBE)  # each stream reads this much before its first window
        return seconds / self.dist.world_size * (length + context) / (EVAL_PROBE + context)

    def estimated_eval_seconds(self, steps: int, since: float) -> float:
        """An evaluation's cost before one is timed: the probe's (``probe_eval_seconds``), or else a
        third of a training step per token, at the speed of the ``steps`` taken since ``since`` on
        the run's clock (0 before any)."""
        if self.eval_probe:
            return self.eval_probe
        if steps <= 0:
            return 0.0
        seconds_per_token = (self.clock - since) / (steps * self.cfg.batch_size * self.cfg.seq_len)
        return len(self.data.val_ids) * seconds_per_token / 3

    def end_reserve(self) -> float:
        """What a time-budgeted run keeps for its end, so the budget covers it: the final evaluation
        (the last one's measured cost, or an estimate before the first) and the cache pointer fit
        (its cost measured at the start, at most ``CACHE_SHARE`` of the budget)."""
        evaluation = self.last_eval_seconds or self.estimated_eval_seconds(
            self.progress.step - self.session_start[0], self.session_start[1])
        return evaluation + self.fit_reserve

    # ── the loop ──

    def run(self) -> TrainResult:
        cfg, p = self.cfg, self.progress
        self.record({"event": "start", "step": p.step, "total_steps": self.fixed_total,
                     "max_minutes": cfg.max_minutes, "steps_per_epoch": self.steps_per_epoch,
                     "num_parameters": self.num_parameters, "device": str(self.device),
                     "world_size": self.dist.world_size, "model_config": self.model.cfg.to_dict(),
                     "train_config": cfg.to_dict(), "resumed": self.resume is not None,
                     "train_tokens": int(len(self.data.train_ids)), "val_tokens": int(len(self.data.val_ids)),
                     "tokenizer": self.data.tokenizer.kind, "precision": self.precision.name,
                     "precision_reason": self.precision.reason,
                     **({"sizing": self.sizing} if self.sizing else {})})
        self.step_hint = (f"make --batch-size ({cfg.batch_size}) or --seq-len ({cfg.seq_len}) smaller, "
                          f"or the model (--hidden-size, --num-layers)")
        self.net.train()
        self.bad_steps, self.last_eval_seconds = 0, 0.0
        self.cache_search, self.cache_seconds = None, 0.0
        self.fit_cost, self.fit_reserve = self.plan_cache_fit() if self.budget is not None and cfg.cache else (None, 0.0)
        self.eval_probe = self.probe_eval_seconds() if self.budget is not None else 0.0
        self.session_start = (p.step, self.clock)
        self.device_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, good steps, bad run
        self.interval_tokens, self.interval_start, self.interval_loss, self.interval_count = 0, self.clock, 0.0, 0
        last_eval_step = p.step if self.resume is not None else -1
        last_eval_at = self.clock
        # Under a time budget, evaluate every twentieth of it, but never spend more than about 3%
        # of the time evaluating: at most once per 30 × what an evaluation costs (estimated from the
        # training speed until the first one is timed). A run that overfits keeps its best point;
        # a large validation split is evaluated seldom.
        eval_every = cfg.eval_every or (None if self.budget else max(1, (self.fixed_total or self.steps_per_epoch) // 10))
        self.eval_seconds_total = 0.0

        stopped_by = "done"
        while (ended := self.stop_before_step()) is None:
            _, lr, reason = self.train_step()
            if self.budget is not None and self.fixed_total is None and p.step >= max(p.warmup_steps, 20) \
                    and p.step % 10 == 0:
                rate = p.step / max(self.clock, 1e-9)  # steps per second, evaluation included
                p.total_steps = max(p.step + 1, int(p.step + (self.budget - self.clock - self.end_reserve()) * rate))
            self.log_step(lr)
            timed_eval = cfg.eval_every is None and self.budget is not None and \
                self.clock - last_eval_at >= self.eval_period(p.step - max(last_eval_step, 0), last_eval_at)
            if (eval_every is not None and p.step % eval_every == 0) or timed_eval:
                self.last_eval_seconds = self.evaluate_and_save()
                self.eval_seconds_total += self.last_eval_seconds
                last_eval_step = p.step
                self.clock = last_eval_at = self.interval_start = self.clock + self.last_eval_seconds
                if cfg.patience is not None and p.evals_since_best >= cfg.patience:
                    stopped_by = "early-stop"
                    break
            if reason:
                stopped_by = "interrupt"
                self.save_last()
                self.record({"event": "interrupt", "step": p.step, "reason": reason})
                break
        else:
            stopped_by = ended

        if stopped_by != "interrupt":
            p.stopped_by = stopped_by  # saved with the last checkpoint: a resume can tell what ended the run
            if last_eval_step != p.step:
                seconds = self.evaluate_and_save()
                self.clock += seconds
                self.eval_seconds_total += seconds
            else:
                self.save_last()
        if stopped_by != "interrupt" and cfg.cache and math.isfinite(p.best_val_loss):
            self.end_with_cache_fit()
        self.record({"event": "end", "step": p.step, "stopped_by": stopped_by, "best_val_loss": p.best_val_loss,
                     "best_step": p.best_step, "elapsed": self.clock, "eval_seconds": self.eval_seconds_total,
                     "cache_seconds": self.cache_seconds})
        predicted = max(len(self.data.val_ids) - 1, 0)
        best_bpc = EvalResult(p.best_val_loss * predicted, predicted).bits_per_char(self.data.val_chars)
        return TrainResult(self.run_dir, p.step, p.best_val_loss, p.best_step, p.val_loss, stopped_by, self.clock,
                           self.num_parameters, best_bpc, self.eval_seconds_total, self.cache_search,
                           self.cache_seconds)


def load_initial_weights(model: RNNLM, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into ``model``. Where the model's vocabulary is larger (a fine-tune with
    ``--extend-vocab``), the embedding and output rows of the old tokens are copied and the new
    rows keep their fresh initialisation; every other tensor must match exactly."""
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if name not in weights:
                if name == "head.weight" and model.cfg.tie_weights:
                    continue
                raise CheckpointError(f"the model to start from has no tensor {name}")
            source = weights[name]
            grows = name in ("embedding.weight", "head.weight", "head.bias") and source.shape[1:] == target.shape[1:] \
                and source.shape[0] <= target.shape[0]
            if source.shape != target.shape and not grows:
                raise CheckpointError(f"tensor {name} of the model to start from has shape {tuple(source.shape)}, "
                                      f"this run's model needs {tuple(target.shape)}")
            target[: source.shape[0]].copy_(source)


# ── limits: memory, and a resumed run's stopping rules ──────────────────────────────────────────

def training_memory_bytes(model_config: ModelConfig, batch_size: int, seq_len: int) -> int:
    """A lower estimate of what training needs: fp32 weights, gradients and AdamW's two moments,
    plus the activations one window keeps for backward (gates and states of every layer, the
    embeddings, and logits with their softmax and gradient)."""
    cfg = model_config
    weights = 16 * count_parameters(cfg)
    per_token = cfg.num_layers * (GATES[cfg.cell] + 2) * cfg.hidden_size + cfg.embed_size + 3 * cfg.vocab_size
    return weights + 4 * batch_size * seq_len * per_token


def device_memory_bytes(device: torch.device) -> int | None:
    """All the memory of the device (None where it cannot be told)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass
    return None


def check_memory(model_config: ModelConfig, cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, before allocating anything, a model and batch that cannot fit in the whole device."""
    need = training_memory_bytes(model_config, cfg.batch_size, cfg.seq_len)
    have = device_memory_bytes(device)
    if have is None or need <= have:
        return
    m = model_config
    raise ConfigError(
        f"a {m.num_layers}×{m.hidden_size} {m.cell.upper()} ({count_parameters(m):,} parameters) with "
        f"--batch-size {cfg.batch_size} and --seq-len {cfg.seq_len} needs at least {need / 2**30:,.1f} GiB to "
        f"train, and this {device.type.upper()} device has {have / 2**30:,.1f} GiB; make --hidden-size, "
        f"--num-layers, --embed-size, --batch-size or --seq-len smaller")


def _limit_reached(cfg: TrainConfig, before: TrainConfig | None, state: dict[str, Any], *, step: int, epoch: int,
                   elapsed: float, fixed_total: int | None) -> str | None:
    """Which stopping rule a resumed run has already met, in words (None if it can go on).

    ``before`` is the configuration the run ended with and ``state["stopped_by"]`` what ended it:
    a run that ran out of time (or patience) is finished unless the limit was raised.
    """
    stopped_by = state.get("stopped_by")
    if cfg.max_steps is not None and step >= cfg.max_steps:
        return f"--max-steps {cfg.max_steps:,} (it is at step {step:,})"
    if cfg.epochs is not None and (epoch >= cfg.epochs or (fixed_total is not None and step >= fixed_total)):
        return f"--epochs {cfg.epochs:,} (it is at step {step:,}, epoch {epoch:,})"
    if cfg.max_minutes is not None and (
            elapsed >= cfg.max_minutes * 60 or (stopped_by == "time" and before is not None
                                                and before.max_minutes is not None
                                                and cfg.max_minutes <= before.max_minutes)):
        return f"--max-minutes {cfg.max_minutes:g} (it has trained for {elapsed / 60:.2f} minutes)"
    if (stopped_by == "early-stop" and cfg.patience is not None and before is not None
            and before.patience is not None and cfg.patience <= before.patience):
        return f"--patience {cfg.patience} (it stopped early: no better validation loss in {cfg.patience} evaluations)"
    return None


# ── run folders and resume options ──────────────────────────────────────────────────────────────

@contextmanager
def claim_run_dir(run_dir: Path, dist: Dist | None = None) -> Iterator[None]:
    """Create ``run_dir`` and hold it for the block: one charlm process trains in a folder at a time.

    The lock is ``flock`` on the folder itself (no lock file to leave behind; the system drops it
    when the process dies). A second process gets ``RunInUseError`` before it writes anything.
    Under torchrun rank 0 holds it and tells the others whether it got it.
    """
    dist = dist or Dist()
    fd, problem = None, None
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = _lock_folder(run_dir)
        except OSError as exc:
            problem = f"save:cannot write {run_dir}: {exc.strerror or exc}"
        except RunInUseError as exc:
            problem = f"busy:{exc}"
        except fsutil.UnsafeFolderError as exc:
            problem = f"unsafe:{exc}"
    problem = dist.broadcast_object(problem)
    if problem is not None:
        kind, _, message = problem.partition(":")
        if kind == "busy":
            raise RunInUseError(message)
        if kind == "unsafe":
            raise fsutil.UnsafeFolderError(message)
        raise SaveError(message)
    try:
        if dist.is_main:
            for stale in run_dir.glob(".*.tmp-*"):  # left by a writer that was killed mid-save
                stale.unlink(missing_ok=True)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def _lock_folder(folder: Path) -> int | None:
    """An exclusive, non-blocking lock on ``folder``: its descriptor, or ``RunInUseError`` (fsutil.lock_folder)."""
    return fsutil.lock_folder(folder)


def run_dir_in_use(folder: Path) -> bool:
    """Whether another process holds ``folder`` right now."""
    if not folder.is_dir():
        return False
    try:
        fd = _lock_folder(folder)
    except RunInUseError:
        return True
    if fd is not None:
        os.close(fd)
    return False


def new_run_dir(root: str | Path, name: str) -> Path:
    """``root/name``, or ``root/name-2``, ``-3``, … so a new run never overwrites an old one (nor
    joins one that another process has just started there)."""
    root = Path(root)
    candidate, n = root / name, 1
    while candidate.exists() and (any(candidate.glob("*.safetensors")) or run_dir_in_use(candidate)):
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


# What a resumed run may and may not change. The shape of the model and of the data layout, the
# vocabulary, the seed and the warm-up are the run's own; the stopping rules, the device and
# the optimizer's step sizes may change from here on.
FIXED_ON_RESUME = ("cell", "residual", "hidden_size", "num_layers", "embed_size", "tie_weights", "dropout", "input_dropout",
                   "embed_dropout", "weight_drop", "activation_reg", "temporal_reg", "optimizer", "batch_size",
                   "seq_len", "val_fraction", "tokenizer", "seed", "warmup_steps", "average", "average_power",
                   "shift_windows")
ADJUSTABLE_ON_RESUME = ("epochs", "max_steps", "max_minutes", "patience", "device", "eval_every",
                        "max_bad_steps", "log_every", "lr", "clip", "weight_decay", "min_lr_ratio", "precision",
                        "cache", "tf32")
NOT_ON_RESUME = {"min_count": "the vocabulary is the checkpoint's", "max_vocab": "the vocabulary is the checkpoint's"}


def _as_typed(value: Any) -> str:
    """An option value as a user would type it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value if isinstance(value, str) and len(value) <= 40 else brief(value)


def resume_configs(resume: Resume, given: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """The checkpoint's configs with the options the user gave (``given``: only those, by field
    name) honoured or refused, never ignored.

    An option in ``FIXED_ON_RESUME`` must equal the run's value; one in ``ADJUSTABLE_ON_RESUME``
    replaces it for the rest of the run; one in ``NOT_ON_RESUME`` is refused whatever its value.
    Other keys are not this function's (the corpus, the validation file, output options), and a
    ``None`` value means "not given" (no option a user types is ever None).
    """
    given = {key: value for key, value in given.items() if value is not None}
    model_cfg, train_cfg = resume.checkpoint.model_config, resume.checkpoint.train_config
    assert train_cfg is not None  # load_resume guarantees it
    current = {**model_cfg.to_dict(), **train_cfg.to_dict(), "tokenizer": resume.checkpoint.tokenizer.kind}
    for key, value in given.items():
        option = f"--{key.replace('_', '-')}"
        if key in NOT_ON_RESUME:
            raise ConfigError(f"{option} cannot be given with --resume: {NOT_ON_RESUME[key]}")
        if key in FIXED_ON_RESUME and value != current[key]:
            raise ConfigError(f"{option} {_as_typed(value)} conflicts with the run being resumed, which has "
                              f"{option} {_as_typed(current[key])}; it cannot change on resume (leave it out)")
    return model_cfg, train_cfg.replace(**{k: v for k, v in given.items() if k in ADJUSTABLE_ON_RESUME})
