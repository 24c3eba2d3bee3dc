"""The LSTM layer the CPU trainer runs: oneDNN's fused kernel against charlm's hand-written one.

    python benchmarks/lstm_layer.py                   # the shapes below, 5 alternating rounds
    python benchmarks/lstm_layer.py --rounds 3 --shapes 1024x32 768x32

For each hidden size × batch (seq 100, input 128) and precision, one training window (forward and
backward) of ``nn.LSTM`` (oneDNN) and of ``charlm.model.lstm_kernel.lstm_layer`` without peepholes, alternated
round by round so both see the same machine load; then the trainer's tokens/s at the default 10-
and 3-minute bf16 shapes with the layer chosen either way, beside a bare bf16 ``nn.LSTM`` loop.
The results set ``lstm_kernel.HAND_WRITTEN_BF16_MIN_HIDDEN``, the width from which each machine times both
layers itself (``lstm_kernel.faster_by_hand``). Writes
benchmarks/results/lstm-layer-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from charlm import bench
from charlm.model import lstm_kernel
from charlm.model.precision import cpu_bf16_instructions
from charlm.training.memory import keep_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"


def window_seconds(hidden: int, batch: int, bf16: bool, rounds: int) -> dict[str, float]:
    """Median seconds of one forward + backward window, oneDNN's kernel and the hand-written one."""
    torch.manual_seed(0)
    lstm = nn.LSTM(128, hidden, batch_first=True)
    x = torch.randn(batch, 100, 128, requires_grad=True)
    h0, c0 = torch.zeros(batch, hidden), torch.zeros(batch, hidden)
    weights = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]

    def onednn() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, _ = lstm(x, (h0[None], c0[None]))
        out.float().sum().backward()

    def by_hand() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, _, _ = lstm_kernel.lstm_layer(x, h0, c0, *weights)
        out.float().sum().backward()

    times: dict[str, list[float]] = {"onednn": [], "hand": []}
    onednn(), by_hand()  # one-off costs: primitive creation, allocator growth
    for _ in range(rounds):
        for name, run in (("onednn", onednn), ("hand", by_hand)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def trainer_rates(hidden: int, batch: int, rounds: int) -> dict[str, float]:
    """The trainer's bf16 tokens/s with each layer, and the bare bf16 loop's, alternated."""
    cfg = bench.BenchConfig(hidden_size=hidden, num_layers=1, batch_size=batch, seq_len=100, train_steps=30)
    device, chosen = torch.device("cpu"), (lstm_kernel.HAND_WRITTEN_BF16_MIN_HIDDEN, lstm_kernel.faster_by_hand)
    rates: dict[str, list[float]] = {"trainer_onednn": [], "trainer_hand": [], "bare_onednn": []}
    lstm_kernel.faster_by_hand = lambda *shape: True  # the width decides alone here: each layer forced in turn
    try:
        for _ in range(rounds):
            lstm_kernel.HAND_WRITTEN_BF16_MIN_HIDDEN = 10 ** 9
            rates["trainer_onednn"].append(bench.train_rate(cfg, device, "bf16"))
            lstm_kernel.HAND_WRITTEN_BF16_MIN_HIDDEN = 0
            rates["trainer_hand"].append(bench.train_rate(cfg, device, "bf16"))
            rates["bare_onednn"].append(bench.bare_train_rate(cfg, device, precision="bf16"))
    finally:
        lstm_kernel.HAND_WRITTEN_BF16_MIN_HIDDEN, lstm_kernel.faster_by_hand = chosen
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["512x16", "512x32", "768x16", "768x32", "1024x16", "1024x32"],
                        help="HIDDENxBATCH")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trainer-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "lstm-layer-cpu.json")
    args = parser.parse_args()
    keep_freed_memory()  # as the trainer runs
    bf16_here = cpu_bf16_instructions() is not None
    windows = []
    for shape in args.shapes:
        hidden, batch = (int(part) for part in shape.split("x"))
        for bf16 in ((False, True) if bf16_here else (False,)):
            seconds = window_seconds(hidden, batch, bf16, args.rounds)
            row = {"hidden": hidden, "batch": batch, "precision": "bf16" if bf16 else "fp32",
                   "onednn_ms": round(seconds["onednn"] * 1e3, 1), "hand_ms": round(seconds["hand"] * 1e3, 1),
                   "onednn_over_hand": round(seconds["onednn"] / seconds["hand"], 2)}
            windows.append(row)
            print(json.dumps(row), flush=True)
    trainers = []
    if bf16_here:
        for hidden in (768, 1024):  # the 3- and 10-minute bf16 defaults (batch 32)
            rates = trainer_rates(hidden, 32, args.trainer_rounds)
            row = {"hidden": hidden, "batch": 32, **{k: round(v) for k, v in rates.items()},
                   "hand_over_onednn": round(rates["trainer_hand"] / rates["trainer_onednn"], 2),
                   "hand_over_bare": round(rates["trainer_hand"] / rates["bare_onednn"], 2)}
            trainers.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "command": f"python benchmarks/lstm_layer.py --rounds {args.rounds} --trainer-rounds {args.trainer_rounds}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"native bf16: {cpu_bf16_instructions() or 'none'}",
        "what": "one training window (seq 100, input 128, forward + backward) in ms, medians of alternating rounds; "
                "trainer tokens/s (evaluation excluded) with each layer, and a bare bf16 nn.LSTM loop",
        "hand_written_bf16_min_hidden": lstm_kernel.HAND_WRITTEN_BF16_MIN_HIDDEN,
        "windows": windows, "trainer_bf16": trainers,
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
