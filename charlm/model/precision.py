"""The number format of the matmuls: which one a device gets, and the autocast region that applies it.

``fp32`` everywhere; ``bf16`` (autocast: matmuls and the fused recurrent kernels in bfloat16, losses
and softmax in float32) where the hardware makes it fast: CUDA GPUs with bf16, and CPUs with native
bf16 instructions (AVX-512 BF16 or AMX), on which a 1×512 LSTM trains ~1.5–1.8× the tokens/s of fp32
(docs/precision.md). A CPU without them would emulate bf16 and gain nothing, so ``auto`` keeps
fp32 there. ``fp16`` (CUDA only) is for users who ask for it: it trains with a gradient scaler.

Whether this CPU's kernels can run a cell's recurrence in bf16 at all is asked of the kernels
themselves (``cpu_bf16_kernel_runs``: a tiny step, probed once per machine and torch version), not
read from the CPU's name: oneDNN builds without a bf16 LSTM primitive on CPUs without AVX-512, and
a CPU kind nobody here has met answers the same probe. Where it cannot, ``--precision bf16`` is
refused with the reason; ``auto`` keeps fp32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from charlm.config import ModelConfig, check_precision
from charlm.errors import ConfigError
from charlm.cpu import cpu_bf16_instructions
from charlm.machine import remembered
from charlm.model.lm import RNNLM, select_state

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


def _probe_cell(cell: str) -> None:
    """One tiny bf16 training step of ``cell``'s recurrence as charlm runs it (nn.LSTM/GRU/RNN under
    autocast, two layers, some streams' state); raises what the kernel raises."""
    model = RNNLM(ModelConfig(vocab_size=5, cell=cell, hidden_size=8, embed_size=4, num_layers=2))
    x = torch.zeros(3, 2, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.init_state(3)
        logits, _ = model(x[:2], select_state(state, slice(0, 2)))
    logits.float().sum().backward()


def _probe_answer(cell: str) -> str | None:
    try:
        _probe_cell(cell)
    except RuntimeError as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    return None


def cpu_bf16_kernel_runs(cell: str) -> str | None:
    """None where this CPU runs ``cell``'s recurrence in bf16, else why not (the kernel's error).
    Probed once per machine and torch version, the answer kept in the cache folder (``machine.py``)."""
    return remembered("bf16 kernels", cell, lambda: _probe_answer(cell),
                      valid=lambda answer: answer is None or isinstance(answer, str))


def bf16_unavailable(cell: str) -> str:
    """The one line that refuses bf16 for ``cell`` on this CPU."""
    flag = cpu_bf16_instructions()
    has = f"it has {flag}" if flag else "it reports neither avx512_bf16 nor amx_bf16"
    return (f"--precision bf16: this CPU's kernels cannot run the {cell} recurrence in bf16 ({has}; "
            f"the kernel said: {cpu_bf16_kernel_runs(cell)}); use --precision fp32 or auto")


@contextlib.contextmanager
def tf32_region(device: torch.device, enabled: bool) -> Iterator[None]:
    """On CUDA, float32 matmuls (cuBLAS: the head under fp32, the peephole cell's products) and
    cuDNN's recurrences run on TF32 tensor cores where ``enabled``, exact float32 where not; the
    process's settings are restored on leaving. Elsewhere nothing changes."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def resolve_precision(requested: str, device: torch.device, *, cell: str | None = None) -> Precision:
    """``auto``: bf16 on a CUDA GPU that has it and on a CPU with native bf16, fp32 elsewhere. An
    explicit choice is honoured where the device can run it and refused where it cannot. ``cell``
    names the recurrence that will run under it (training, evaluation): on a CPU its kernel must run
    bf16 (``cpu_bf16_kernel_runs``); without one (sampling steps through matmuls) nothing is probed."""
    check_precision(requested)
    kind = device.type
    if requested == "auto":
        if kind == "cuda" and torch.cuda.is_bf16_supported():
            return Precision("bf16", "this GPU has bf16")
        if kind == "cpu" and (flag := cpu_bf16_instructions()) is not None:
            if cell is not None and (why := cpu_bf16_kernel_runs(cell)) is not None:
                return Precision("fp32", f"this CPU has {flag} but no bf16 {cell} kernel ({why})")
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
    if requested == "bf16" and kind == "cpu" and cell is not None and cpu_bf16_kernel_runs(cell) is not None:
        raise ConfigError(bf16_unavailable(cell))
    return Precision(requested, "as asked")
