"""Dynamic evaluation's settings on held-out text that is not the test text: where its defaults came from.

    python benchmarks/dynamic_sweep.py RUN/best.safetensors ../shared/corpora/grimm/valid.txt --tokens 4000
    python benchmarks/dynamic_sweep.py RUN/best.safetensors valid.txt --points 0.002,0.008,5 0.002,0.008,5,1e-4

Scores the first ``--tokens`` tokens of TEXT with the checkpoint as trained, with its cache pointer
(if it has one), and with dynamic evaluation at each point ``η,λ,window[,ε]`` (ε defaults to
charlm's). Quality only, no timing figures (the seconds are recorded for scale). Writes
``benchmarks/results/dynamic-sweep-<text's folder>-<tokens>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
POINTS = ("0.0001,0.002,5", "0.0003,0.002,5", "0.001,0.002,5", "0.003,0.002,5", "0.001,0,5", "0.001,0.0005,5",
          "0.001,0.01,5", "0.0015,0.004,5", "0.002,0.004,5", "0.002,0.008,5", "0.002,0.008,10", "0.002,0.015,5",
          "0.002,0.008,5,1e-7", "0.002,0.008,5,1e-5", "0.002,0.008,5,1e-4", "0.002,0.008,5,1e-3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", type=Path, help="held-out text (a validation split, never the test text)")
    parser.add_argument("--tokens", type=int, default=4000, help="score the first N tokens")
    parser.add_argument("--points", nargs="+", default=list(POINTS), help="η,λ,window[,ε] each")
    parser.add_argument("--out", type=Path, help="the results file (default under benchmarks/results/)")
    args = parser.parse_args()

    import numpy as np
    import torch

    import charlm
    from charlm.infer import dynamic
    from charlm.data.text import read_corpus
    from charlm.infer.evaluate import evaluate
    from charlm.infer.pointer import evaluate_with_cache
    from charlm.model.precision import FP32

    lm = charlm.load(args.checkpoint)
    ids = np.asarray(lm.tokenizer.encode(read_corpus(args.text)))[:args.tokens]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "torch_threads": torch.get_num_threads(), "checkpoint": str(args.checkpoint), "text": str(args.text),
              "tokens": int(len(ids)), "static_perplexity": evaluate(lm.model, ids).perplexity,
              "cache": lm.checkpoint.cache.to_dict() if lm.checkpoint.cache else None, "points": []}
    if lm.checkpoint.cache is not None:
        result["cache_perplexity"] = evaluate_with_cache(lm.model, ids, lm.checkpoint.cache, precision=FP32)[0].perplexity
    print(json.dumps({k: v for k, v in result.items() if k != "points"}), flush=True)
    out = args.out or RESULTS / f"dynamic-sweep-{args.text.resolve().parent.name}-{len(ids)}.json"
    out.parent.mkdir(exist_ok=True)
    default_epsilon = dynamic.EPSILON
    for point in args.points:
        lr, decay, window, *epsilon = point.split(",")
        dynamic.EPSILON = float(epsilon[0]) if epsilon else default_epsilon
        started = time.perf_counter()
        figure = dynamic.evaluate_dynamic(lm.model, ids, dynamic.DynamicEval(float(lr), float(decay), int(window)),
                                          precision=FP32)[1]
        row = {"lr": float(lr), "decay": float(decay), "window": int(window), "epsilon": dynamic.EPSILON,
               "perplexity": figure.perplexity, "seconds": time.perf_counter() - started}
        result["points"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after each point: a long sweep cut short keeps its rows
    dynamic.EPSILON = default_epsilon


if __name__ == "__main__":
    main()
