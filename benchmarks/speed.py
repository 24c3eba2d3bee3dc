"""charlm against bare PyTorch loops of the same shape, measured side by side in one run.

    python benchmarks/speed.py                       # 2×512 LSTM, batch 64, seq 128 (the issue's shape)
    python benchmarks/speed.py --hidden-size 256 --batch-size 16 --seq-len 100

Rounds alternate bare and charlm measurements so both see the same machine load; each ratio is
the median of the per-round ratios. Writes benchmarks/results/speed-<device>.json.

* training: charlm's trainer (data windows, clipping, schedule, logging; evaluation excluded) vs a
  bare embedding → nn.LSTM → linear loop with AdamW, in fp32 and (unless --no-bf16) both again under
  CPU bf16 autocast;
* sampling: charlm's sampler (one stream, then N streams, N in fp32 and bf16) vs a bare one-token
  nn.LSTM loop, plus the largest difference between their next-token log-probabilities, and between
  the bf16 and fp32 steps' (over the tokens with probability ≥ 1e-3);
* the peephole LSTM (unless --no-peephole; it has no fused kernel, cells.py): charlm's trainer of the
  same shape against the bare nn.LSTM loop, and its sampler against the LSTM sampler;
* perplexity: charlm's evaluator vs charlm's training tokens/s, plus its difference from a
  token-by-token loop;
* tokenization MB/s, and ``charlm --help`` vs ``python -c "import torch"`` start-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from charlm.bench import (BenchConfig, bare_train_rate, eval_rate, matmul_gflops, model_for, sample_rate, synthetic_ids,
                          tokenize_rate, tokenizer_for, train_rate)
from charlm.infer.evaluate import evaluate
from charlm.infer.step import FastStep
from charlm.model.precision import cpu_bf16_instructions

RESULTS = Path(__file__).resolve().parent / "results"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"


@torch.inference_mode()
def bare_sample_rate(cfg: BenchConfig, length: int) -> float:
    torch.manual_seed(0)
    emb, lstm = nn.Embedding(cfg.vocab_size, cfg.embed_size), nn.LSTM(cfg.embed_size, cfg.hidden_size,
                                                                       cfg.num_layers)
    head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
    token, state = torch.zeros(1, 1, dtype=torch.long), None
    start = time.perf_counter()
    for _ in range(length):
        out, state = lstm(emb(token), state)
        token = torch.multinomial(head(out[-1]).softmax(-1), 1)
    return length / (time.perf_counter() - start)


@torch.inference_mode()
def sampler_max_logprob_diff(cfg: BenchConfig) -> float:
    model = model_for(cfg, torch.device("cpu"))
    tokens = torch.from_numpy(synthetic_ids(cfg.vocab_size, 300, seed=3).astype(np.int64))
    reference, _ = model(tokens[None])  # nn.LSTM over the whole sequence
    fast = FastStep(model)
    fast.reset(1)
    worst = 0.0
    for t in range(len(tokens)):
        got = fast.step(tokens[t:t + 1]).log_softmax(-1)
        worst = max(worst, float((got - reference[0, t].log_softmax(-1)).abs().max()))
    return worst


@torch.inference_mode()
def bf16_sampler_max_logprob_diff(cfg: BenchConfig, streams: int) -> float:
    """bf16 steps against fp32 steps on the same tokens, over the tokens either gives p ≥ 1e-3."""
    model = model_for(cfg, torch.device("cpu"))
    tokens = torch.from_numpy(synthetic_ids(cfg.vocab_size, 200 * streams, seed=5).astype(np.int64)).view(streams, -1)
    exact, low = FastStep(model), FastStep(model, dtype=torch.bfloat16)
    exact.reset(streams)
    low.reset(streams)
    worst = 0.0
    for t in range(tokens.shape[1]):
        a, b = exact.step(tokens[:, t]).log_softmax(-1), low.step(tokens[:, t]).log_softmax(-1)
        likely = (a > -6.9) | (b > -6.9)
        worst = max(worst, float((a - b).abs()[likely].max()))
    return worst


@torch.inference_mode()
def evaluator_diff(cfg: BenchConfig) -> float:
    """Batched evaluator vs feeding one token at a time through the model."""
    model = model_for(cfg, torch.device("cpu"))
    ids = synthetic_ids(cfg.vocab_size, 3000, seed=4)
    batched = evaluate(model, ids, num_streams=4, seq_len=64).total_nats
    tokens, state, total = torch.from_numpy(ids.astype(np.int64)), None, 0.0
    for t in range(len(ids) - 1):
        logits, state = model(tokens[None, t:t + 1], state)
        total -= float(logits[0, -1].log_softmax(-1)[tokens[t + 1]])
    return abs(batched - total) / (len(ids) - 1)


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def startup_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--embed-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 only")
    parser.add_argument("--no-peephole", dest="peephole", action="store_false", help="leave out the peephole rows")
    args = parser.parse_args()
    cfg = BenchConfig(hidden_size=args.hidden_size, num_layers=args.num_layers, embed_size=args.embed_size,
                      batch_size=args.batch_size, seq_len=args.seq_len, train_steps=args.steps, device="cpu")
    cpu = torch.device("cpu")
    model, tokenizer = model_for(cfg, cpu), tokenizer_for(cfg.vocab_size)
    peephole_cfg = dataclasses.replace(cfg, cell="peephole")
    peephole_model = model_for(peephole_cfg, cpu)
    val = synthetic_ids(cfg.vocab_size, 200_000, seed=1)
    text = (SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file()
            else "".join(tokenizer.itos[1:]) * 20_000) * 20
    help_cmd = [sys.executable, "-m", "charlm", "--help"]
    torch_cmd = [sys.executable, "-c", "import torch"]
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        row = {
            "bare_train": bare_train_rate(cfg, cpu),
            "charlm_train": train_rate(cfg, cpu),
            "bare_sample_1": bare_sample_rate(cfg, 300),
            "charlm_sample_1": sample_rate(model, tokenizer, streams=1, length=600),
            "charlm_sample_n": sample_rate(model, tokenizer, streams=args.streams, length=150),
            **({"bare_train_bf16": bare_train_rate(cfg, cpu, precision="bf16"),
                "charlm_train_bf16": train_rate(cfg, cpu, "bf16"),
                "charlm_sample_n_bf16": sample_rate(model, tokenizer, streams=args.streams, length=150,
                                                    precision="bf16"),
                "matmul_gflops_bf16": matmul_gflops(cpu, dtype=torch.bfloat16),
                "skinny_matmul_gflops_bf16": matmul_gflops(cpu, (args.streams, 2 * cfg.hidden_size,
                                                                 4 * cfg.hidden_size), dtype=torch.bfloat16, reps=50),
                } if args.bf16 else {}),
            **({"charlm_train_peephole": train_rate(peephole_cfg, cpu),
                "charlm_sample_1_peephole": sample_rate(peephole_model, tokenizer, streams=1, length=600),
                "charlm_sample_n_peephole": sample_rate(peephole_model, tokenizer, streams=args.streams, length=150),
                **({"charlm_train_peephole_bf16": train_rate(peephole_cfg, cpu, "bf16")} if args.bf16 else {}),
                } if args.peephole else {}),
            "charlm_eval": eval_rate(model, val),
            "tokenize_mb_s": tokenize_rate(text),
            "help_s": startup_seconds(help_cmd),
            "import_torch_s": startup_seconds(torch_cmd),
            "matmul_gflops": matmul_gflops(cpu),
            # One sampling step's largest product: N streams × (2H × 4H) stacked weights.
            "skinny_matmul_gflops": matmul_gflops(cpu, (args.streams, 2 * cfg.hidden_size, 4 * cfg.hidden_size),
                                                  reps=50),
        }
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:,.3g}" for k, v in row.items()), file=sys.stderr)

    def med(key: str) -> float:
        return statistics.median(row[key] for row in rounds)

    def ratio(a: str, b: str) -> float:
        return statistics.median(row[a] / row[b] for row in rounds)

    # FLOPs of one training token (forward + backward ≈ 3 × forward) and of one sampled token.
    H, E, L, V = cfg.hidden_size, cfg.embed_size, cfg.num_layers, cfg.vocab_size
    forward_flops = 2 * (4 * H * (E + H) + (L - 1) * 4 * H * 2 * H + H * V)
    step_flops = forward_flops - 2 * 4 * H * E  # the sampler looks the first layer's input projection up
    # The most N streams could give if every product ran at the dense rate, and at the rate that the
    # step's own skinny (N-row) product reaches alone; both as multiples of one stream.
    bound_n = med("matmul_gflops") * 1e9 / step_flops
    skinny_n = med("skinny_matmul_gflops") * 1e9 / step_flops
    bf16 = {} if not args.bf16 else {
        "train_bf16_charlm_over_bare_bf16": ratio("charlm_train_bf16", "bare_train_bf16"),
        "train_bf16_over_fp32": ratio("charlm_train_bf16", "charlm_train"),
        "bare_train_bf16_over_fp32": ratio("bare_train_bf16", "bare_train"),
        "sample_n_bf16_over_sample_1": ratio("charlm_sample_n_bf16", "charlm_sample_1"),
        "sample_n_bf16_over_sample_n_fp32": ratio("charlm_sample_n_bf16", "charlm_sample_n"),
    }
    bf16_ceiling = {} if not args.bf16 else {
        "sample_n_bf16_over_1_if_at_bf16_matmul_rate": med("matmul_gflops_bf16") * 1e9 / step_flops
                                                        / med("charlm_sample_1"),
        "sample_n_bf16_over_1_if_at_skinny_bf16_matmul_rate": med("skinny_matmul_gflops_bf16") * 1e9 / step_flops
                                                               / med("charlm_sample_1"),
    }
    peephole = {} if not args.peephole else {
        "train_peephole_over_bare_lstm": ratio("charlm_train_peephole", "bare_train"),
        "train_peephole_over_charlm_lstm": ratio("charlm_train_peephole", "charlm_train"),
        "sample_1_peephole_over_lstm": ratio("charlm_sample_1_peephole", "charlm_sample_1"),
        "sample_n_peephole_over_lstm": ratio("charlm_sample_n_peephole", "charlm_sample_n"),
        **({"train_peephole_bf16_over_bare_lstm_bf16": ratio("charlm_train_peephole_bf16", "bare_train_bf16")}
           if args.bf16 else {}),
    }
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "bf16_instructions": cpu_bf16_instructions(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "shape": f"{L}x{H} LSTM, embed {E}, vocab {V}, batch {cfg.batch_size}, seq {cfg.seq_len}",
        "rounds": args.rounds,
        "medians": {k: med(k) for k in rounds[0]},
        "ratios": {
            "train_charlm_over_bare": ratio("charlm_train", "bare_train"),
            "sample_1_charlm_over_bare": ratio("charlm_sample_1", "bare_sample_1"),
            "sample_n_over_sample_1": ratio("charlm_sample_n", "charlm_sample_1"),
            "eval_over_train": ratio("charlm_eval", "charlm_train"),
            "help_over_import_torch": ratio("help_s", "import_torch_s"),
            **bf16,
            **peephole,
        },
        "ceilings": {
            "train_fraction_of_matmul_rate": med("charlm_train") * 3 * forward_flops / (med("matmul_gflops") * 1e9),
            "sample_n_fraction_of_matmul_rate": med("charlm_sample_n") * step_flops / (med("matmul_gflops") * 1e9),
            "sample_n_fraction_of_skinny_matmul_rate": med("charlm_sample_n") * step_flops
                                                       / (med("skinny_matmul_gflops") * 1e9),
            "sample_n_over_1_if_at_matmul_rate": bound_n / med("charlm_sample_1"),
            "sample_n_over_1_if_at_skinny_matmul_rate": skinny_n / med("charlm_sample_1"),
            **bf16_ceiling,
        },
        "parity": {"sampler_max_logprob_diff": sampler_max_logprob_diff(cfg),
                   "evaluator_vs_token_loop_nats_per_token": evaluator_diff(cfg),
                   **({"bf16_sampler_max_logprob_diff_likely_tokens": bf16_sampler_max_logprob_diff(cfg, args.streams)}
                      if args.bf16 else {})},
        "per_round": rounds,
    }
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"speed-cpu-{L}x{H}-b{cfg.batch_size}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"ratios": result["ratios"], "ceilings": result["ceilings"], "parity": result["parity"]},
                     indent=1))


if __name__ == "__main__":
    main()
