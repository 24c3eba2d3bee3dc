"""Quality per CPU-minute: train with default options for a time budget and record the best val loss.

    python benchmarks/train_quality.py ../shared/corpora/tinyshakespeare.txt --minutes 3
    python benchmarks/train_quality.py CORPUS --minutes 3 --from-run checkpoints/tinyshakespeare  # record a finished run
    python benchmarks/train_quality.py CORPUS --minutes 10 --options "--batch-size 32 --lr 1.2e-2"  # a sweep point

Writes benchmarks/results/quality-<corpus>-<minutes>min.json with the figures from metrics.jsonl;
with --options (anything but the defaults) the run is added to sweep-<corpus>-<minutes>min.json
instead, one entry per option string (a repeated string replaces its entry).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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
        "precision": start.get("precision", "fp32"), "precision_reason": start.get("precision_reason"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--from-run", type=Path, help="record this finished run instead of training")
    parser.add_argument("--options", default="", help="extra charlm train options: records a sweep point")
    args = parser.parse_args()
    if args.from_run:
        run_dir = args.from_run
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="charlm-quality-")) / "run"
        command = [sys.executable, "-m", "charlm", "train", args.corpus, "--max-minutes", str(args.minutes),
                   "--out", str(run_dir), "--sample-length", "0", *shlex.split(args.options)]
        subprocess.run(command, check=True)
    from charlm.model.precision import cpu_bf16_instructions

    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
               f"native bf16: {cpu_bf16_instructions() or 'none'}")
    command = f"charlm train {args.corpus} --max-minutes {args.minutes:g}"
    result = {"command": f"{command} {args.options}".strip(), "machine": machine, **summarize(run_dir)}
    RESULTS.mkdir(exist_ok=True)
    if args.options:
        out = RESULTS / f"sweep-{Path(args.corpus).stem}-{args.minutes:g}min.json"
        sweep = json.loads(out.read_text()) if out.exists() else {"command": f"{command} [options]", "runs": []}
        sweep["runs"] = [run for run in sweep["runs"] if run.get("options") != args.options]
        sweep["runs"].append({"options": args.options, "machine": machine,
                              **{k: v for k, v in result.items() if k not in ("command", "machine")}})
        out.write_text(json.dumps(sweep, indent=1) + "\n")
    else:
        out = RESULTS / f"quality-{Path(args.corpus).stem}-{args.minutes:g}min.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("best_val_loss", "steps", "elapsed_seconds")}))


if __name__ == "__main__":
    main()
