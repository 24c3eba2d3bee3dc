"""One training step on one window: forward, the loss with its regularisers, backward, clipping, and
the optimizer step, decided on the host or left on the device. The trainer and the sizing speed
probe both take their steps here."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from charlm.config import TrainConfig
from charlm.model.lm import State, detach_state
from charlm.model.precision import Precision
from charlm.training.distributed import Dist


class Gradients(NamedTuple):
    """What the forward and backward pass of a window left, before the optimizer steps."""

    loss: torch.Tensor  # () the window's mean cross-entropy, detached, on the device
    state: State | None  # the state after the window: detached, float32 (a bad step drops it)
    grad_norm: torch.Tensor  # () the gradients' norm before clipping


def keeps_steps_on_device(device: torch.device, dist: Dist, cfg: TrainConfig) -> bool:
    """Whether a step leaves its loss, its finiteness check and the skip of a bad step on the device,
    read by the host only when it logs: on a GPU (where a read waits for the queue to drain), in one
    process, with an optimizer whose fused kernel skips its update on ``found_inf`` (AdamW, SGD), and
    without a loss scaler or a weight average (which decide on the host)."""
    return (device.type == "cuda" and not dist.enabled and cfg.precision != "fp16" and not cfg.average
            and cfg.optimizer in ("adamw", "sgd"))


def make_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's narrow range underflows small gradients: its loss is scaled (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type) if precision.name == "fp16" else None


def float32_state(state: State | None) -> State | None:
    """The carried state in float32 whatever the matmuls' precision (the kernels return bf16 under
    autocast), so a run's saved state resumes in any precision."""
    if state is None:
        return None
    return tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()  # type: ignore[return-value]


def compute_gradients(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                      state: State | None, *, config: TrainConfig, precision: Precision,
                      scaler: torch.amp.GradScaler | None = None) -> Gradients:
    """Forward the window ``x`` (B, T) from ``state``, the cross-entropy against ``y`` plus AR and TAR,
    backward (scaled under fp16, then unscaled), and the gradients clipped to ``config.clip``."""
    with precision.autocast(x.device):
        if config.activation_reg > 0 or config.temporal_reg > 0:
            logits, new_state, (raw, dropped) = net(x, state, with_outputs=True)
        else:
            logits, new_state = net(x, state)  # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        objective = loss
        if config.activation_reg > 0:  # AR: large activations cost (after dropout, as in AWD-LSTM)
            objective = objective + config.activation_reg * dropped.float().pow(2).mean()
        if config.temporal_reg > 0 and raw.size(1) > 1:  # TAR: fast-changing hidden states cost
            objective = objective + config.temporal_reg * (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        # under DDP the gradients arrive averaged over ranks
        (scaler.scale(objective) if scaler else objective).backward()
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip if config.clip > 0 else math.inf)
    return Gradients(loss.detach(), float32_state(detach_state(new_state)), grad_norm)


def step_on_host(optimizer: torch.optim.Optimizer, gradients: Gradients, loss_value: float, *,
                 scaler: torch.amp.GradScaler | None = None) -> bool:
    """The optimizer step if ``loss_value`` and the gradients are finite; whether it was taken. A
    scaler judges the gradients itself: where they overflowed at its scale it skips the step and
    lowers the scale."""
    if math.isfinite(loss_value) and (scaler or bool(torch.isfinite(gradients.grad_norm).all())):
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return True
    if scaler:  # unscale_ ran this step: update() closes it (and lowers the scale), or the
        scaler.update()  # next step's unscale_ would refuse to run
    return False


def step_on_device(optimizer: torch.optim.Optimizer, gradients: Gradients) -> tuple[torch.Tensor, State | None]:
    """The optimizer step without waiting for the device: the fused optimizer skips its update where
    the loss or the gradients are not finite (``found_inf``). Returns whether the step was good (a
    () bool tensor) and the state to carry: a bad step's is reset to zeros, as a fresh one."""
    ok = torch.isfinite(gradients.loss) & torch.isfinite(gradients.grad_norm)
    optimizer.found_inf = (~ok).float()
    optimizer.step()
    state = gradients.state
    if state is not None:
        state = tuple(torch.where(ok, s, 0.0) for s in state) if isinstance(state, tuple) \
            else torch.where(ok, state, 0.0)
    return ok, state


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               state: State | None, *, config: TrainConfig, precision: Precision,
               scaler: torch.amp.GradScaler | None = None,
               on_device: bool = False) -> tuple[torch.Tensor, State | None]:
    """One whole step on the window (``x``, ``y``) in one process, as the trainer takes it: the
    gradients, then the optimizer step decided on the host or (``on_device``) left on the device.
    Returns the loss (on the device) and the state to carry into the next window."""
    gradients = compute_gradients(net, optimizer, x, y, state, config=config, precision=precision, scaler=scaler)
    if on_device:
        return gradients.loss, step_on_device(optimizer, gradients)[1]
    good = step_on_host(optimizer, gradients, float(gradients.loss), scaler=scaler)
    return gradients.loss, gradients.state if good else None
