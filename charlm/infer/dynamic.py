"""Dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018, "Dynamic Evaluation of Neural
Sequence Models"): the model adapts to the text it scores, as it reads it.

One stream reads the text in windows of ``window`` tokens. Each window is scored first (its figure
is then final), and one gradient step on its mean loss moves a copy of the weights towards it,
while a decay pulls them back towards the trained weights θ₀:

    θ ← θ − η g / (√MS + ε) + λ (θ₀ − θ)

g is the window's gradient and MS the mean of g² over the windows read so far: the paper's RMS
normalisation, its statistics taken from the text already scored (the paper takes them from the
training data, which a checkpoint does not carry), so every weight moves by about η however large
its gradients are, and the same η suits char, byte and word models. η is the rate, λ the decay
(the paper's "global prior"). Only the past is read: each token is still predicted from what came
before it, so the figure is the probability of the text under a model that learns as it reads.
The caller's model is never changed (a copy adapts), nor any file.

Given a cache pointer (pointer.py), the same pass also mixes the adapting model's distribution
with the cache's, as static scoring does. ``perplexity`` reports that figure beside the adapting
model's own, not as the headline: the pointer's λ was fitted to the model as trained.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from charlm.config import CachePointer, Range, brief
from charlm.errors import ConfigError, stop_if_asked
from charlm.infer.evaluate import EvalResult
from charlm.infer.pointer import Ring, cache_probs, cache_scores, mix
from charlm.model.lm import RNNLM, detach_state
from charlm.model.precision import FP32, Precision

EPSILON = 1e-4  # ε: keeps the step of a weight whose gradients have all been ~0 small (chosen: docs/choosing.md)
# The options' ranges (the CLI's --dynamic-lr, --dynamic-decay, --dynamic-window). A rate of 0 or a
# decay of 1 is allowed and gives the static figure (the weights never move, or return at once).
LIMITS = {"dynamic_lr": Range(float, 0, 1), "dynamic_decay": Range(float, 0, 1),
          "dynamic_window": Range(int, 1, 100_000)}


@dataclass(frozen=True)
class DynamicEval:
    """How the model adapts: the rate η, the decay λ towards the trained weights, and the window
    (tokens scored between two steps)."""

    lr: float
    decay: float
    window: int

    def __post_init__(self) -> None:
        for name in ("lr", "decay", "window"):
            value, rule = getattr(self, name), LIMITS[f"dynamic_{name}"]
            if isinstance(value, bool) or not rule.allows(value):
                raise ConfigError(f"--dynamic-{name} must be {rule.describe()} (got {brief(value)})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The defaults, by tokenizer: windows of 5 words as Krause et al. read word-level text, 20 for
# char and byte models (cheaper; untuned); η and λ chosen on Grimm's validation text
# (docs/choosing.md, "Dynamic evaluation").
DEFAULTS = {"word": DynamicEval(lr=2e-3, decay=8e-3, window=5),
            "char": DynamicEval(lr=2e-3, decay=8e-3, window=20),
            "byte": DynamicEval(lr=2e-3, decay=8e-3, window=20)}


def dynamic_settings(tokenizer_kind: str, *, lr: float | None = None, decay: float | None = None,
                     window: int | None = None) -> DynamicEval:
    """The defaults for this kind of model, with whichever of ``lr``, ``decay`` and ``window`` were
    given in their place (each checked: a given 0 is a value, never replaced)."""
    base = DEFAULTS.get(tokenizer_kind, DEFAULTS["char"])
    return DynamicEval(lr=base.lr if lr is None else lr, decay=base.decay if decay is None else decay,
                       window=base.window if window is None else window)


def evaluate_dynamic(model: RNNLM, ids: np.ndarray, settings: DynamicEval, *, precision: Precision = FP32,
                     cache: CachePointer | None = None,
                     should_stop: Callable[[], bool] | None = None) -> tuple[EvalResult, EvalResult]:
    """Total nats of predicting ids[1:] in one sequential pass that adapts a copy of ``model`` to
    the text after each window (see the module's docstring): with ``cache`` mixed in, and the
    adapting model alone (the same figure twice without a cache). ``should_stop`` is asked before
    each window; True raises ``Cancelled``. ``model`` itself is left exactly as it was."""
    ids = np.asarray(ids)
    if len(ids) < 2:
        return EvalResult(0.0, 0), EvalResult(0.0, 0)
    adapted = copy.deepcopy(model).eval()  # dropout off, as in scoring; only the copy learns
    params = list(adapted.parameters())  # tied weights appear once
    for p in params:
        p.requires_grad_(True)
    trained = [p.detach().clone() for p in params]
    mean_square = [torch.zeros_like(p) for p in params]
    device = params[0].device
    tokens = torch.from_numpy(ids.astype(np.int64)).to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    mixed_total = torch.zeros((), dtype=torch.float64, device=device)
    ring = Ring(cache.window, model.cfg.hidden_size, device) if cache is not None else None
    weight = torch.tensor([cache.weight if cache else 0.5], dtype=torch.float64, device=device)
    state, steps = None, 0
    with torch.enable_grad():
        for i in range(0, len(tokens) - 1, settings.window):
            stop_if_asked(should_stop)
            y = tokens[None, i + 1:i + 1 + settings.window]
            x = tokens[None, i:i + y.size(1)]
            with precision.autocast(device):
                logits, state, (raw, _) = adapted(x, state, with_outputs=True)  # (1, T, V), (1, T, H)
            nats = F.cross_entropy(logits[0].float(), y[0], reduction="none")  # (T,)
            total += nats.detach().double().sum()
            state = detach_state(state)
            if ring is not None:
                h = raw[0].detach().float()
                scores, nexts = cache_scores(h, ring, cache.window)
                mixed = mix(-nats.detach().double(), cache_probs(scores, nexts, y[0], cache.theta), weight)
                mixed_total -= mixed.sum()
                ring.push(h, y[0])
            if settings.lr == 0:
                continue  # nothing would move: the static figure, without the backward passes
            grads = torch.autograd.grad(nats.mean(), params)
            steps += 1
            with torch.no_grad():
                for p, g, p0, ms in zip(params, grads, trained, mean_square):
                    ms.mul_((steps - 1) / steps).addcmul_(g, g, value=1 / steps)  # the mean of g² so far
                    # θ + λ(θ₀ − θ) − η g / (√MS + ε), in place (both terms from the weights before the step)
                    p.mul_(1 - settings.decay).add_(p0, alpha=settings.decay)
                    p.addcdiv_(g, ms.sqrt().add_(EPSILON), value=-settings.lr)
    alone = EvalResult(float(total), len(ids) - 1)
    return (EvalResult(float(mixed_total), len(ids) - 1) if ring is not None else alone), alone
