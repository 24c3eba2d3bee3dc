"""What training needs and keeps in memory: the estimate checked before anything is allocated, the
device's total, the training streams held on a GPU, and the heap a CPU step reuses."""
from __future__ import annotations

import ctypes
import functools
import os
import platform

import numpy as np
import torch

from charlm.config import ModelConfig, TrainConfig
from charlm.errors import ConfigError
from charlm.model.lm import GATES, count_parameters

# This rank's training streams are copied to the GPU once, up to this size, so a step copies no
# ids from the host (int32 there: a 250M-token corpus per process). Larger ones go window by window.
DEVICE_STREAMS_BYTES = 1 << 30


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
    and 1 GiB of freed heap before trimming) they are reused, and a CPU step runs faster. The
    process then holds its peak memory until it exits. Returns whether the options took."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in (
            (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))
    except (OSError, AttributeError):  # another C library (musl), or none found
        return False



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

