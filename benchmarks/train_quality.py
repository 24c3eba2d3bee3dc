"""Quality per CPU-minute: train with default options for a time budget and record the best val loss.

    python benchmarks/train_quality.py ../shared/corpora/tinyshakespeare.txt --minutes 3
    python benchmarks/train_quality.py CORPUS --minutes 3 --from-run checkpoints/tinyshakespeare  # record a finished run

Writes benchmarks/results/quality-<corpus>-<minutes>min.json with the figures from metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    evals = [e for e in events if e["event"] == "eval"]
    end = [e for e in events if e["event"] == "end"][-1]
    rates = sorted(e["tokens_per_second"] for e in events if e["event"] == "step")
    return {
        "best_val_loss": end["best_val_loss"], "best_step": end["best_step"], "steps": end["step"],
        "elapsed_seconds": end["elapsed"], "stopped_by": end["stopped_by"],
        "median_train_tokens_per_second": rates[len(rates) // 2] if rates else None,
        "evals": [(e["step"], round(e["val_loss"], 4)) for e in evals],
        "model_config": start["model_config"], "train_config": start["train_config"],
        "num_parameters": start["num_parameters"], "device": start["device"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--from-run", type=Path, help="record this finished run instead of training")
    args = parser.parse_args()
    if args.from_run:
        run_dir = args.from_run
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="charlm-quality-")) / "run"
        command = [sys.executable, "-m", "charlm", "train", args.corpus, "--max-minutes", str(args.minutes),
                   "--out", str(run_dir), "--sample-length", "0"]
        subprocess.run(command, check=True)
    result = {"command": f"charlm train {args.corpus} --max-minutes {args.minutes:g}",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              **summarize(run_dir)}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"quality-{Path(args.corpus).stem}-{args.minutes:g}min.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("best_val_loss", "steps", "elapsed_seconds")}))


if __name__ == "__main__":
    main()
