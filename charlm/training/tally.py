"""The training losses of a log interval and the run of bad steps: summed on the host, or, where
steps stay on the device, summed there and read when the run logs (one wait per record)."""
from __future__ import annotations

import torch


class StepTally:
    """Since the last record: the tokens trained, the good steps' loss sum and count; and how many
    bad steps (NaN/Inf loss or gradients) have come in a row."""

    def __init__(self, device: torch.device, clock: float) -> None:
        self.tokens, self.start, self.loss_sum, self.count = 0, clock, 0.0, 0
        self.bad_steps = 0
        self.device_sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, good steps, bad run

    def restart(self, clock: float) -> None:
        """A new interval from ``clock`` on the run's clock."""
        self.tokens, self.start, self.loss_sum, self.count = 0, clock, 0.0, 0

    def good(self, loss_value: float) -> None:
        self.bad_steps = 0
        self.loss_sum += loss_value
        self.count += 1

    def bad(self) -> None:
        self.bad_steps += 1

    def on_device(self, ok: torch.Tensor, loss: torch.Tensor) -> None:
        """A step whose outcome (``ok``, a () bool tensor) and loss stay on the device."""
        sums, good = self.device_sums, ok.double()
        sums[0] += torch.where(ok, loss.double(), 0.0)
        sums[1] += good
        sums[2] = (sums[2] + 1) * (1 - good)  # the run of bad steps: one longer, or back to 0

    def read_device(self) -> None:
        """What the steps since the last read left on the device (one wait), into the interval and
        the run of bad steps."""
        loss_sum, good, bad = self.device_sums.tolist()
        self.device_sums[:2] = 0
        self.loss_sum += loss_sum
        self.count += int(good)
        self.bad_steps = int(bad)

    def tokens_per_second(self, clock: float) -> float:
        return self.tokens / max(clock - self.start, 1e-9)
