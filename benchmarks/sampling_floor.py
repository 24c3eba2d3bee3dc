"""Where one-stream sampling's time goes: the matrix-vector products of one step alone, the whole
``FastStep.step``, and drawing a token, each timed on this CPU (medians of rounds).

    python benchmarks/sampling_floor.py                  # a 2×512 LSTM, vocab 65 (charlm bench's shape)
    python benchmarks/sampling_floor.py --hidden-size 768 --num-layers 1

Writes ``benchmarks/results/sampling-floor-<L>x<H>.json``: the products' time bounds an exact float32
sampler's chars/s from above (``products_bound_chars_per_second``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from charlm.config import ModelConfig
from charlm.cpu import cpu_flags
from charlm.infer.sample import next_token
from charlm.infer.step import FastStep
from charlm.machine import alternated, milliseconds
from charlm.model.lm import RNNLM

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=65)
    args = parser.parse_args()
    H, L, V = args.hidden_size, args.num_layers, args.vocab_size
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=V, hidden_size=H, num_layers=L, embed_size=128)).eval()
    with torch.inference_mode():
        fast = FastStep(model, prepacked=False)
        fast.reset(1)
        tokens = torch.zeros(1, dtype=torch.long)
        products = {"layer 0 recurrent (H × 4H)": (torch.randn(1, H), fast.w_hh[0])}
        for k in range(1, L):
            products[f"layer {k} stacked input and recurrent (2H × 4H)"] = (torch.randn(1, 2 * H), fast.w_stack[k - 1])
        products["head (H × V)"] = (torch.randn(1, H), fast.head_w)
        logits, generator = torch.randn(1, V), torch.Generator().manual_seed(0)
        runs = [*(lambda a=a, w=w, out=torch.empty(1, w.shape[1]): torch.mm(a, w, out=out)
                  for a, w in products.values()),
                lambda: fast.step(tokens), lambda: next_token(logits, temperature=0.8, generator=generator).tolist()]
        # Each the median of 5 rounds in which they take turns (1,000 calls a round after 100 untimed).
        *products_us, step, draw = [1e3 * ms for ms in alternated(5, *(milliseconds(run, calls=1000, warm=100)
                                                                        for run in runs))]
        timed = dict(zip(products, products_us))
    weight_bytes = sum(w.numel() * w.element_size() for _, w in products.values())
    total = sum(timed.values())
    result = {
        "command": f"python benchmarks/sampling_floor.py --hidden-size {H} --num-layers {L} --vocab-size {V}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
                   f"{torch.get_num_threads()}, flags: {' '.join(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in cpu_flags())}",
        "products_us": timed, "products_total_us": total, "weights_bytes": weight_bytes,
        "bandwidth_gb_per_s": weight_bytes / total / 1e3,
        "fast_step_us": step, "draw_token_us": draw,
        "products_bound_chars_per_second": 1e6 / total,
        "step_and_draw_chars_per_second": 1e6 / (step + draw),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"sampling-floor-{L}x{H}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
