"""What this CPU is: its instruction-set flags, its native bf16 instructions, and (for testing) a
simulated CPU without bf16 recurrent kernels."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any, Callable

import torch

# Set (to 1) to behave as a CPU whose oneDNN has no bf16 recurrent kernels and no bf16 instructions
# (an AVX2-only CPU): the fused kernels then raise on bf16 input as oneDNN does there. For testing the
# refusal on any machine: `CHARLM_SIMULATE_NO_BF16=1 pytest` runs the whole suite as that CPU.
SIMULATE_NO_BF16 = "CHARLM_SIMULATE_NO_BF16"
_NO_PRIMITIVE = "could not create a primitive descriptor for the {} forward propagation primitive"


def simulating_no_bf16() -> bool:
    """Whether this process plays a CPU without bf16 kernels (``SIMULATE_NO_BF16``)."""
    return os.environ.get(SIMULATE_NO_BF16, "") not in ("", "0")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists for this CPU (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def cpu_bf16_instructions() -> str | None:
    """The native bf16 instruction set this CPU reports (``avx512_bf16`` or ``amx_bf16``), or
    None. Read from /proc/cpuinfo: oneDNN itself answers "supported" for any AVX-512 CPU, where bf16
    is emulated and slower than fp32."""
    if platform.machine().lower() not in ("x86_64", "amd64") or simulating_no_bf16():
        return None
    for name in ("amx_bf16", "avx512_bf16"):
        if name in cpu_flags():
            return name
    return None


def _refusing_bf16(kernel: Any, name: str, autocast_lists_it: bool) -> Any:
    """``kernel`` (a ``torch._VF`` recurrence) raising, as oneDNN without bf16 RNN primitives does,
    when it would run in bf16 on the CPU: bf16 input, or (for the ops CPU autocast lowers: the LSTM)
    a bf16 autocast region, which casts below this Python-level call."""
    @functools.wraps(kernel)
    def run(*args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device.type == "cpu" and (
                first.dtype == torch.bfloat16 or (autocast_lists_it and torch.is_autocast_enabled("cpu")
                                                  and torch.get_autocast_dtype("cpu") == torch.bfloat16)):
            raise RuntimeError(_NO_PRIMITIVE.format(name))
        return kernel(*args, **kwargs)
    run.refuses_bf16 = True  # type: ignore[attr-defined]
    return run


def install_missing_bf16_kernels(assign: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make this process's fused recurrent kernels refuse bf16 on the CPU (``SIMULATE_NO_BF16``);
    ``assign`` sets each (a test passes its monkeypatch's, which undoes it)."""
    for name, label in (("lstm", "LSTM"), ("gru", "GRU"), ("rnn_tanh", "vanilla RNN"), ("rnn_relu", "vanilla RNN")):
        kernel = getattr(torch._VF, name)
        if not getattr(kernel, "refuses_bf16", False):
            assign(torch._VF, name, _refusing_bf16(kernel, label, autocast_lists_it=name == "lstm"))


if simulating_no_bf16():
    install_missing_bf16_kernels()
