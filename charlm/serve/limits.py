"""``ServeLimits``: what one request may ask of ``charlm serve``, each bound a command-line option."""
from __future__ import annotations

from dataclasses import dataclass

from charlm.config import brief
from charlm.errors import UsageError


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for. Every bound is a ``charlm serve`` option."""

    max_body_bytes: int = 1_000_000
    max_length: int = 5_000  # tokens generated per sample
    max_samples: int = 16
    max_tokens: int = 20_000  # in a prime, and in a text whose per-token log-probabilities are asked for
    workers: int = 2  # requests the model runs at once
    max_queue: int = 64  # requests waiting for a worker; more are refused with 503
    batch: int = 0  # 0: each generation steps on its own; N: up to N samples step together (batching.py)
    max_connections: int = 256  # open connections; more are closed at once
    client_timeout: float = 30.0  # seconds for a request's headers, for its body, and for a stalled write

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_length", "max_samples", "max_tokens", "workers", "max_queue", "batch",
                     "max_connections"):
            value, low = getattr(self, name), 0 if name in ("max_queue", "batch") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number ≥ {low} (got {brief(value)})")
        value = self.client_timeout
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
            raise UsageError(f"--client-timeout must be a number of seconds in (0, 3600] (got {brief(value)})")
