"""Optimisers and the learning-rate schedule: AdamW, SGD, Adagrad or RMSprop (fused where that is
faster), linear warm-up then cosine decay."""
from __future__ import annotations

import math

import torch

from charlm.config import TrainConfig
from charlm.machine import alternated, milliseconds, remembered
from charlm.model.lm import RNNLM


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to ``base_lr * min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group steps at ``lr`` from now on."""
    for group in optimizer.param_groups:
        group["lr"] = lr


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
