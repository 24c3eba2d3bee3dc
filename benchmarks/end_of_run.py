"""What the end of a run costs, and whether budgets hold: the final evaluation and the cache pointer
fit inside --max-minutes, and the fit's cost in a step-limited run.

    python benchmarks/end_of_run.py ../shared/corpora/tinyshakespeare.txt
    python benchmarks/end_of_run.py ../shared/corpora/tinyshakespeare.txt --minutes 0.1 --bytes 20000 --hidden-size 32   # smoke

1. ``charlm train CORPUS --max-minutes M --json``: the elapsed time it reports (the cache fit
   included) against the budget (goal: at most M × 60 + 5 s), with the fit's and the evaluations' seconds
   and the process's wall time;
2. the first ``--bytes`` of CORPUS, ``--num-layers 2 --hidden-size H --max-steps 3``, with the
   cache pointer and with ``--no-cache`` (goal: within 5 s of each other).

Writes ``benchmarks/results/end-of-run-<corpus>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def charlm_train(*args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "charlm", "train", *args, "--sample-length", "0", "--json"],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--bytes", type=int, default=300_000, help="the step-limited runs' corpus: its first N bytes")
    parser.add_argument("--hidden-size", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="charlm-end-of-run-"))
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                    "corpus": str(args.corpus), "minutes": args.minutes}

    timed, wall = charlm_train(str(args.corpus), "--max-minutes", str(args.minutes), "--out", str(work / "timed"))
    result["budgeted"] = {"budget_seconds": args.minutes * 60, "elapsed_seconds": timed["elapsed_seconds"],
                          "cache_seconds": timed["cache_seconds"], "eval_seconds": timed["eval_seconds"],
                          "wall_seconds": wall, "steps": timed["steps"], "cache": timed["cache"],
                          "within_5_s": timed["elapsed_seconds"] <= args.minutes * 60 + 5}
    print(json.dumps({"budgeted": result["budgeted"]}), flush=True)

    head = work / "head.txt"
    head.write_bytes(args.corpus.read_bytes()[:args.bytes])
    shape = ["--num-layers", "2", "--hidden-size", str(args.hidden_size), "--max-steps", "3"]
    runs = {}
    for name, extra in (("cache", []), ("no_cache", ["--no-cache"])):
        report, wall = charlm_train(str(head), *shape, *extra, "--out", str(work / name))
        runs[name] = {"wall_seconds": wall, "elapsed_seconds": report["elapsed_seconds"],
                      "cache_seconds": report["cache_seconds"], "cache": report["cache"]}
    runs["difference_seconds"] = runs["cache"]["wall_seconds"] - runs["no_cache"]["wall_seconds"]
    runs["within_5_s"] = runs["difference_seconds"] <= 5
    result["step_limited"] = {"bytes": args.bytes, "options": " ".join(shape), **runs}
    print(json.dumps({"step_limited": result["step_limited"]}), flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"end-of-run-{args.corpus.stem}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
