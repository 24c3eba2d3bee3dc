"""The number format of the matmuls: which one a device gets, and the autocast region that applies it.

``fp32`` everywhere; ``bf16`` (autocast: matmuls and the fused recurrent kernels in bfloat16, losses
and softmax in float32) where the hardware makes it fast: CUDA GPUs with bf16, and CPUs with native
bf16 instructions (AVX-512 BF16 or AMX), on which a 1×512 LSTM trains ~1.5–1.8× the tokens/s of fp32
(README, "Precision"). A CPU without them would emulate bf16 and gain nothing, so ``auto`` keeps
fp32 there. ``fp16`` (CUDA only) is for users who ask for it: it trains with a gradient scaler.
"""
from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import check_precision
from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision (never ``auto``) and why it was chosen."""

    name: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The region in which matmuls run in this precision (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


FP32 = Precision("fp32", "the default")


@functools.cache
def cpu_bf16_instructions() -> str | None:
    """The native bf16 instruction set this CPU reports (``avx512_bf16`` or ``amx_bf16``), or
    None. Read from /proc/cpuinfo: oneDNN itself answers "supported" for any AVX-512 CPU, where bf16
    is emulated and slower than fp32."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    for name in ("amx_bf16", "avx512_bf16"):
        if name in flags:
            return name
    return None


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto``: bf16 on a CUDA GPU that has it and on a CPU with native bf16, fp32 elsewhere. An
    explicit choice is honoured where the device can run it and refused where it cannot."""
    check_precision(requested)
    kind = device.type
    if requested == "auto":
        if kind == "cuda" and torch.cuda.is_bf16_supported():
            return Precision("bf16", "this GPU has bf16")
        if kind == "cpu" and (flag := cpu_bf16_instructions()) is not None:
            return Precision("bf16", f"this CPU has native bf16 ({flag})")
        if kind == "cpu":
            return Precision("fp32", "this CPU has no native bf16 instructions")
        return Precision("fp32", f"mixed precision on {kind} is not measured")
    if requested == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bf16 support (use fp16 or fp32)")
    if requested == "fp16" and kind != "cuda":
        # oneDNN has no fp16 LSTM on CPUs without AVX-512 FP16, and fp16 gains nothing over bf16 there.
        raise ConfigError(f"--precision fp16 needs a CUDA GPU (on a {kind}: bf16 or fp32)")
    if requested == "bf16" and kind == "mps":
        raise ConfigError("--precision bf16 is not supported on mps (use fp32)")
    return Precision(requested, "as asked")
