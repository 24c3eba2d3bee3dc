"""The sizing speed probe: tokens per second of the trainer's own step on a model shape, timed here."""
from __future__ import annotations

import statistics
import time

import torch

from charlm.config import ModelConfig, TrainConfig
from charlm.model.lm import RNNLM
from charlm.model.precision import Precision
from charlm.training.distributed import Dist
from charlm.training.optim import make_optimizer
from charlm.training.step import keeps_steps_on_device, make_scaler, train_step

# A step measured alone runs a little faster than the trainer's steps (evaluation, logging, data).
TRAINER_SHARE = 0.9


def measure_train_rate(model_config: ModelConfig, *, batch_size: int, seq_len: int, precision: Precision,
                       steps: int = 4, device: torch.device | str | None = None) -> float:
    """Tokens/s of training this shape on ``device`` (the CPU by default) in ``precision`` (forward,
    backward, clipping, the optimizer step), from the median of ``steps`` − 1 timed steps after a
    warm-up one: about a second for the default sizes. Random tokens; the caller's random state
    is left as it was."""
    device = torch.device("cpu") if device is None else torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = RNNLM(model_config).to(device).train()
        tokens = torch.randint(model_config.vocab_size, (batch_size, seq_len + 1), device=device)
        seconds, _ = time_train_steps(model, tokens, precision=precision, steps=steps)
    return TRAINER_SHARE * batch_size * seq_len / statistics.median(seconds[1:])


def time_train_steps(model: RNNLM, tokens: torch.Tensor, *, precision: Precision, steps: int,
                     config: TrainConfig | None = None) -> tuple[list[float], list[float]]:
    """``steps`` training steps of ``model`` on the window ``tokens`` (B, T + 1), the state carried
    from one to the next, each taken as the trainer takes it (``step.train_step`` with the
    trainer's optimizer, loss scaler and host-or-device choice for ``config``, the defaults if
    None) and timed: their seconds and their losses."""
    device = tokens.device
    config = config or TrainConfig(precision=precision.name)
    optimizer = make_optimizer(model, config, device)
    scaler = make_scaler(precision, device)
    on_device = keeps_steps_on_device(device, Dist(), config)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    x, y = tokens[:, :-1], tokens[:, 1:]
    seconds, losses, state = [], [], None
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        loss, state = train_step(model, optimizer, x, y, state, config=config, precision=precision, scaler=scaler,
                                 on_device=on_device)
        sync()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss)
    return seconds, [float(loss) for loss in losses]
