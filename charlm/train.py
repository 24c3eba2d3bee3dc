"""The training loop. It never prints: progress goes to an ``on_event`` callback (and metrics.jsonl).

Truncated BPTT over B contiguous streams (see ``data.py``), hidden state carried across windows
and detached, gradient-norm clipping, AdamW with linear warm-up then cosine decay, periodic
evaluation of the whole validation split, best/last checkpoints, exact resume.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import ModelConfig, TrainConfig
from .data import batchify, default_corpus, fit_batch_shape, num_windows, read_corpus, split_text
from .errors import CheckpointError, ConfigError, SaveError, TrainingError, UsageError
from .evaluate import evaluate
from .model import RNNLM, detach_state, resolve_device
from .tokenizer import Tokenizer, fit_tokenizer

Event = dict[str, Any]
BUILTIN = "builtin:pydoc"


# ── data ────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Corpus:
    name: str  # a short name for the run folder
    source: str  # a path, or BUILTIN
    text: str


def load_corpus(path: str | None, *, encoding_errors: str = "strict") -> Corpus:
    if path is None or path == BUILTIN:
        name, text = default_corpus()
        return Corpus(name, BUILTIN, text)
    text = read_corpus(path, encoding_errors=encoding_errors)
    return Corpus(Path(path).stem or "corpus", str(Path(path).resolve()), text)


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    val_text: str
    train_chars: int


def prepare_data(text: str, *, val_fraction: float, tokenizer: Tokenizer | None = None, kind: str = "char",
                 min_count: int = 1, max_vocab: int | None = None) -> PreparedData:
    """Split off the LAST ``val_fraction`` as validation, fit the tokenizer on the training part only."""
    train_text, val_text = split_text(text, val_fraction, at_line=(tokenizer.kind if tokenizer else kind) == "word")
    if not train_text.strip():
        raise UsageError("the training part of the corpus is empty; lower --val-fraction or use more text")
    tokenizer = tokenizer or fit_tokenizer(kind, train_text, min_count=min_count, max_vocab=max_vocab)
    val_ids = tokenizer.encode(val_text)
    if len(val_ids) < 2:
        raise UsageError(f"the validation part ({len(val_text)} characters) has fewer than 2 tokens; "
                         f"raise --val-fraction or use more text")
    return PreparedData(tokenizer, tokenizer.encode(train_text), val_ids, val_text, len(train_text))


# ── schedule ────────────────────────────────────────────────────────────────────────────────────

def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to ``base_lr * min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ── optimizer and resume state ──────────────────────────────────────────────────────────────────

def make_optimizer(model: RNNLM, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=device.type == "cuda")


def _state_tensors(state) -> dict[str, torch.Tensor]:
    if state is None:
        return {}
    if isinstance(state, tuple):
        return {"hidden.h": state[0], "hidden.c": state[1]}
    return {"hidden.h": state}


def _optim_tensors(optimizer: torch.optim.Optimizer, model: RNNLM, state) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).float()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors.update(_state_tensors(state))
    return tensors


def _restore_optim(optimizer: torch.optim.Optimizer, model: RNNLM, tensors: dict[str, torch.Tensor],
                   device: torch.device):
    for name, p in model.named_parameters():
        keys = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == f"optim.{name}"}
        if not keys:
            continue
        if keys.get("exp_avg") is None or keys["exp_avg"].shape != p.shape:
            raise CheckpointError(f"optimizer state for {name} does not match the model")
        optimizer.state[p] = {
            "step": keys["step"].to(torch.float32),
            "exp_avg": keys["exp_avg"].to(device),
            "exp_avg_sq": keys["exp_avg_sq"].to(device),
        }
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if "hidden.h" not in tensors:
        return None
    h = tensors["hidden.h"].to(device)
    return (h, tensors["hidden.c"].to(device)) if "hidden.c" in tensors else h


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
    if "rng.cpu" not in tensors:
        raise CheckpointError(f"{optim_path}: lacks the RNG state")
    return Resume(checkpoint, tensors, path.parent)


# ── the loop ────────────────────────────────────────────────────────────────────────────────────

@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    best_step: int
    last_val_loss: float
    stopped_by: str  # "done", "time", "early-stop", "interrupt"
    elapsed_seconds: float
    num_parameters: int
    history: list[Event] = field(default_factory=list)


def _is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def train(*, model_config: ModelConfig, train_config: TrainConfig, data: PreparedData, run_dir: str | Path,
          source: str = "", on_event: Callable[[Event], None] | None = None,
          should_stop: Callable[[], str | None] | None = None, resume: Resume | None = None) -> TrainResult:
    """Train a model and write checkpoints and metrics.jsonl into ``run_dir``.

    ``should_stop`` is polled after every step; a non-empty answer (e.g. "SIGINT") ends the run
    after saving ``last``. Returns what happened; raises ``TrainingError`` if the loss stays
    non-finite for ``max_bad_steps`` steps in a row (the last good checkpoint is kept).
    """
    cfg = train_config
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SaveError(f"cannot write {run_dir}: {exc.strerror or exc}") from None
    for stale in run_dir.glob(".*.tmp-*"):  # left by a writer that was killed mid-save
        stale.unlink(missing_ok=True)
    device = resolve_device(cfg.device)
    emit = on_event or (lambda event: None)
    metrics_path = run_dir / "metrics.jsonl"

    def record(event: Event) -> None:
        try:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event) + "\n")
        except OSError as exc:
            raise SaveError(f"cannot write {metrics_path}: {exc.strerror or exc}") from None
        emit(event)

    torch.manual_seed(cfg.seed)
    model = RNNLM(model_config).to(device)
    optimizer = make_optimizer(model, cfg, device)
    autocast = device.type == "cuda"

    shape = fit_batch_shape(len(data.train_ids), cfg.batch_size, cfg.seq_len)
    if shape.warning:
        emit({"event": "warning", "message": shape.warning})
        cfg = cfg.replace(batch_size=shape.batch_size, seq_len=shape.seq_len)
    streams = batchify(data.train_ids, cfg.batch_size).to(device)
    steps_per_epoch = num_windows(streams.shape[1], cfg.seq_len)

    planned = [s for s in (cfg.max_steps, cfg.epochs * steps_per_epoch if cfg.epochs else None) if s]
    fixed_total = min(planned) if planned else None
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    total_steps = fixed_total or 10**9
    warmup = min(cfg.warmup_steps, max(1, (fixed_total or 10**9) // 10))

    step, epoch, window, state = 0, 0, 0, None
    best_val, best_step, last_val, evals_since_best = math.inf, -1, math.inf, 0
    elapsed_before = 0.0
    tokens_seen = 0
    if resume is not None:
        model.load_state_dict(resume.checkpoint.model.state_dict())
        st = resume.checkpoint.train_state
        step, epoch, window = int(st["step"]), int(st["epoch"]), int(st["window"])
        best_val, best_step = float(st.get("best_val_loss", math.inf)), int(st.get("best_step", -1))
        evals_since_best = int(st.get("evals_since_best", 0))
        elapsed_before = float(st.get("elapsed_seconds", 0.0))
        tokens_seen = int(st.get("tokens_seen", 0))
        total_steps = int(st.get("total_steps", total_steps)) if not fixed_total else fixed_total
        warmup = int(st.get("warmup_steps", warmup))
        state = _restore_optim(optimizer, model, resume.optim_tensors, device)
        if state is not None and (state[0] if isinstance(state, tuple) else state).shape[1] != cfg.batch_size:
            raise ConfigError("the run was trained with a different --batch-size")

    num_parameters = model.num_parameters()
    start_time = time.perf_counter()
    optim_file = None

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start_time

    def train_state() -> dict[str, Any]:
        return {"step": step, "epoch": epoch, "window": window, "best_val_loss": best_val,
                "best_step": best_step, "evals_since_best": evals_since_best, "total_steps": total_steps,
                "warmup_steps": warmup, "elapsed_seconds": elapsed(), "tokens_seen": tokens_seen,
                "val_loss": last_val, "corpus": source, "optim_file": optim_file,
                "num_parameters": num_parameters}

    def check_weights() -> None:
        if not all(_is_finite(p) for p in model.parameters()):
            raise TrainingError("the weights became NaN/Inf; the last good checkpoint is kept")

    def save_last() -> None:
        nonlocal optim_file
        check_weights()
        # The optimizer file is named by step and written first, so last.safetensors always
        # names an optimizer file that exists, whatever moment a crash hits.
        new_optim = f"last.step{step:09d}.optim.safetensors"
        ckpt.save_tensors(run_dir / new_optim, _optim_tensors(optimizer, model, state),
                          {"format": ckpt.FORMAT, "step": str(step)})
        optim_file = new_optim
        ckpt.save_checkpoint(run_dir / ckpt.LAST, model=model, tokenizer=data.tokenizer,
                             train_config=cfg, train_state=train_state())
        for old in run_dir.glob("last.step*.optim.safetensors"):
            if old.name != new_optim:
                old.unlink(missing_ok=True)

    def run_eval() -> float:
        nonlocal best_val, best_step, last_val, evals_since_best
        t0 = time.perf_counter()
        result = evaluate(model, data.val_ids, autocast=autocast)
        last_val = result.nats_per_token
        improved = last_val < best_val
        if improved:
            best_val, best_step, evals_since_best = last_val, step, 0
            check_weights()
            ckpt.save_checkpoint(run_dir / ckpt.BEST, model=model, tokenizer=data.tokenizer,
                                 train_config=cfg, train_state=train_state())
        else:
            evals_since_best += 1
        save_last()
        record({"event": "eval", "step": step, "epoch": epoch, "val_loss": last_val, "best_val_loss": best_val,
                "val_bpc": result.bits_per_char(len(data.val_text)), "improved": improved,
                "eval_seconds": time.perf_counter() - t0, "elapsed": elapsed()})
        return time.perf_counter() - t0

    record({"event": "start", "step": step, "total_steps": fixed_total, "max_minutes": cfg.max_minutes,
            "steps_per_epoch": steps_per_epoch, "num_parameters": num_parameters, "device": str(device),
            "model_config": model_config.to_dict(), "train_config": cfg.to_dict(), "resumed": resume is not None,
            "train_tokens": int(len(data.train_ids)), "val_tokens": int(len(data.val_ids))})

    model.train()
    stopped_by = "done"
    bad_steps = 0
    last_eval_seconds = 0.0
    last_eval_step = step if resume is not None else -1
    last_eval_time = time.perf_counter()
    interval_tokens, interval_start, interval_loss, interval_count = 0, time.perf_counter(), 0.0, 0
    eval_period = budget / 4 if budget else None  # evaluation costs steps; ~4 + 1 final suffice
    eval_every = cfg.eval_every or (None if budget else max(1, (fixed_total or steps_per_epoch) // 10))

    while True:
        if fixed_total is not None and step >= fixed_total:
            break
        if budget is not None and elapsed() + last_eval_seconds >= budget:
            stopped_by = "time"
            break
        if window >= steps_per_epoch:
            epoch, window, state = epoch + 1, 0, None
            if cfg.epochs is not None and epoch >= cfg.epochs:
                break
        i = window * cfg.seq_len
        t = min(cfg.seq_len, streams.shape[1] - 1 - i)
        x, y = streams[:, i:i + t].long(), streams[:, i + 1:i + 1 + t].long()
        lr = lr_at(step, base_lr=cfg.lr, warmup_steps=warmup, total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            logits, new_state = model(x, state)  # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
        loss_value = float(loss.item())
        if math.isfinite(loss_value) and _is_finite(grad_norm):
            optimizer.step()
            bad_steps = 0
            state = detach_state(new_state)
            interval_loss += loss_value
            interval_count += 1
        else:
            bad_steps += 1
            state = None  # a non-finite state would poison every later window
            record({"event": "bad_step", "step": step, "loss": loss_value, "consecutive": bad_steps})
            if bad_steps >= cfg.max_bad_steps:
                raise TrainingError(f"the loss or gradients were NaN/Inf for {bad_steps} steps in a row at step "
                                    f"{step}; stopped. The last good checkpoint in {run_dir} is kept; try a "
                                    f"lower --lr or --clip")
        step += 1
        window += 1
        tokens_seen += x.numel()
        interval_tokens += x.numel()

        if budget is not None and fixed_total is None and step >= max(warmup, 20) and step % 10 == 0:
            rate = step / max(elapsed(), 1e-9)  # steps per second, evaluation included
            total_steps = max(step + 1, int(step + (budget - elapsed() - last_eval_seconds) * rate))
        if step % cfg.log_every == 0 and interval_count:
            now = time.perf_counter()
            record({"event": "step", "step": step, "epoch": epoch, "loss": interval_loss / interval_count,
                    "lr": lr, "grad_norm": float(grad_norm), "tokens_per_second": interval_tokens / (now - interval_start),
                    "elapsed": elapsed(), "total_steps": total_steps if (fixed_total or budget) else None})
            interval_tokens, interval_start, interval_loss, interval_count = 0, now, 0.0, 0
        due = (eval_every is not None and step % eval_every == 0) or \
              (eval_period is not None and time.perf_counter() - last_eval_time >= eval_period)
        if due:
            last_eval_seconds = run_eval()
            last_eval_step, last_eval_time = step, time.perf_counter()
            interval_start = time.perf_counter()
            if cfg.patience is not None and evals_since_best >= cfg.patience:
                stopped_by = "early-stop"
                break
        reason = should_stop() if should_stop else None
        if reason:
            stopped_by = "interrupt"
            save_last()
            record({"event": "interrupt", "step": step, "reason": reason})
            break

    if stopped_by != "interrupt" and last_eval_step != step:
        run_eval()
    record({"event": "end", "step": step, "stopped_by": stopped_by, "best_val_loss": best_val,
            "best_step": best_step, "elapsed": elapsed()})
    return TrainResult(run_dir, step, best_val, best_step, last_val, stopped_by, elapsed(), num_parameters)


# ── run folders and resume options ──────────────────────────────────────────────────────────────

def new_run_dir(root: str | Path, name: str) -> Path:
    """``root/name``, or ``root/name-2``, ``-3``, … so a new run never overwrites an old one."""
    root = Path(root)
    candidate, n = root / name, 1
    while candidate.exists() and any(candidate.glob("*.safetensors")):
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


# Options that define the model's shape or the data layout cannot change on resume.
_FIXED_ON_RESUME = ("cell", "hidden_size", "num_layers", "embed_size", "tie_weights", "dropout",
                    "batch_size", "seq_len", "val_fraction", "tokenizer")


def resume_configs(resume: Resume, overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """The checkpoint's configs with the allowed ``overrides`` applied (None = not given).

    A shape-defining option that disagrees with the checkpoint is an error naming it; stopping
    rules (``--max-steps``, ``--epochs``, ``--max-minutes``, ``--patience``) and ``--device`` may change.
    """
    model_cfg, train_cfg = resume.checkpoint.model_config, resume.checkpoint.train_config
    assert train_cfg is not None  # load_resume guarantees it
    current = {**model_cfg.to_dict(), **train_cfg.to_dict(), "tokenizer": resume.checkpoint.tokenizer.kind}
    for key in _FIXED_ON_RESUME:
        value = overrides.get(key)
        if value is not None and value != current[key]:
            raise ConfigError(f"--{key.replace('_', '-')} {value} conflicts with the run being resumed "
                              f"({current[key]}); leave it out to keep the run's value")
    allowed = {k: v for k, v in overrides.items()
               if v is not None and k in ("epochs", "max_steps", "max_minutes", "patience", "device",
                                          "eval_every", "max_bad_steps", "log_every")}
    return model_cfg, train_cfg.replace(**allowed)
