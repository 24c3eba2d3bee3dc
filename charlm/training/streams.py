"""A rank's training streams: the B streams laid out from the training ids, this rank's rows of them
(copied to the GPU once where they fit), and the windows of each epoch."""
from __future__ import annotations

import numpy as np
import torch

from charlm.config import TrainConfig
from charlm.data.text import batchify, epoch_offset, num_windows, shifted_windows, window
from charlm.errors import ConfigError
from charlm.training.distributed import Dist
from charlm.training.memory import streams_on_device


class TrainingStreams:
    """The B contiguous streams every rank lays out alike, and this rank's rows of them. An epoch
    has ``steps_per_epoch`` windows of ``seq_len``; with ``--shift-windows`` each epoch's start at
    their own offset (``epoch_offset``), at most ``largest_offset``."""

    def __init__(self, train_ids: np.ndarray, cfg: TrainConfig, dist: Dist, device: torch.device) -> None:
        if cfg.batch_size % dist.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes "
                              f"({dist.world_size}): each process carries the same number of streams")
        self.seq_len, self.seed, self.device = cfg.seq_len, cfg.seed, device
        self.streams = batchify(train_ids, cfg.batch_size)  # (B, N // B), all ranks see the same layout
        per_rank = cfg.batch_size // dist.world_size
        self.rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)  # this rank's streams
        self.device_streams = streams_on_device(self.streams[self.rows], device)
        if cfg.shift_windows:
            self.steps_per_epoch, self.largest_offset = shifted_windows(self.streams.shape[1], cfg.seq_len)
        else:
            self.steps_per_epoch, self.largest_offset = num_windows(self.streams.shape[1], cfg.seq_len), 0

    def window(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The window (x, y), each (B / world size, seq_len), of epoch ``epoch`` at ``index``, on the device."""
        offset = epoch_offset(self.seed, epoch, self.largest_offset)
        if self.device_streams is not None:
            return window(self.device_streams, index, self.seq_len, offset=offset)
        x, y = window(self.streams, index, self.seq_len, self.rows, offset=offset)
        return x.to(self.device), y.to(self.device)
