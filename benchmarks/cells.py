"""The recurrent cells side by side: the same time budget on tiny-shakespeare, defaults otherwise.

    python benchmarks/cells.py                         # every row, 3 minutes each (about 30 minutes)
    python benchmarks/cells.py --only peephole lstm    # some rows (the others stay in the results file)
    python benchmarks/cells.py --minutes 10

Each row is one `charlm train CORPUS --max-minutes M --seed 1337 <options>` run, one after another
on the same machine. Rows: the four cells at their defaults, then the depth study: 3- and 4-layer
LSTM stacks (512 units; the default width is sized for one layer) without and with --residual.
Writes benchmarks/results/cells-<corpus>-<minutes>min.json (best validation loss, steps, tokens/s,
parameters, precision), merged by row name, and prints a Markdown table for the README.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_quality import summarize  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

RESULTS = Path(__file__).resolve().parent / "results"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"
ROWS = {
    "rnn": "--cell rnn",
    "gru": "--cell gru",
    "lstm": "--cell lstm",
    "peephole": "--cell peephole",
    "lstm-3x512": "--cell lstm --num-layers 3 --hidden-size 512",
    "lstm-3x512-residual": "--cell lstm --num-layers 3 --hidden-size 512 --residual",
    "lstm-4x512": "--cell lstm --num-layers 4 --hidden-size 512",
    "lstm-4x512-residual": "--cell lstm --num-layers 4 --hidden-size 512 --residual",
}


def table(rows: dict[str, dict]) -> str:
    lines = ["| row | model | best val (nats/char) | steps | tokens/s | parameters |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        mc = row["model_config"]
        model = f"{mc['num_layers']}×{mc['hidden_size']} {mc['cell']}" + (" residual" if mc.get("residual") else "")
        lines.append(f"| {name} | {model} | {row['best_val_loss']:.4f} | {row['steps']:,} | "
                     f"{row['median_train_tokens_per_second']:,.0f} | {row['num_parameters']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=SHAKESPEARE)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS), help="run these rows only")
    args = parser.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"cells.py: {args.corpus} not found (tiny-shakespeare lives in ../shared/corpora)")
    from charlm.model.precision import cpu_bf16_instructions

    out = RESULTS / f"cells-{args.corpus.stem}-{args.minutes:g}min.json"
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
               f"native bf16: {cpu_bf16_instructions() or 'none'}")
    result = json.loads(out.read_text()) if out.exists() else {
        "command": f"charlm train {args.corpus.name} --max-minutes {args.minutes:g} --seed 1337 <row options>",
        "rows": {}}
    for name in args.only or list(ROWS):
        run_dir = Path(tempfile.mkdtemp(prefix="charlm-cells-")) / "run"
        command = [sys.executable, "-m", "charlm", "train", str(args.corpus), "--max-minutes", f"{args.minutes:g}",
                   "--seed", "1337", "--out", str(run_dir), "--sample-length", "0", *shlex.split(ROWS[name])]
        print(f"cells.py: {name}: {shlex.join(command[2:])}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
        result["rows"][name] = {"options": ROWS[name], "machine": machine, **summarize(run_dir)}
        result["rows"] = {key: result["rows"][key] for key in ROWS if key in result["rows"]}  # the table's order
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
