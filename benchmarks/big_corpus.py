"""A 100 MB corpus: peak memory of a training run, and how fast a second run starts from the token cache.

    python benchmarks/big_corpus.py                   # builds /tmp/charlm-big/stdlib.txt (~100 MB) first
    python benchmarks/big_corpus.py --megabytes 200

The corpus is the Python standard library's source, concatenated (repeated if the library is
smaller than asked). Each run is ``charlm train stdlib.txt --max-minutes 1 --max-vocab 256 --val-fraction 0.002`` in a
fresh process (default model for the budget), with
a fresh token cache for the first run only; the process's peak RSS comes from getrusage.

Side by side, two floors no data pipeline can go under, each in a fresh process: ``import torch``
alone, and a bare loop (embedding → nn.LSTM → linear, AdamW, random tokens, no corpus) training the
very model and batch shape the charlm run chose, for the same number of steps as it logged first.
Writes benchmarks/results/big-corpus-<megabytes>mb.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# Runs charlm in this process and reports its peak RSS (KiB on Linux) on the last stderr line.
RUNNER = ("import resource, runpy, sys\n"
          "sys.argv = ['charlm'] + sys.argv[1:]\n"
          "try:\n    runpy.run_module('charlm', run_name='__main__')\n"
          "finally:\n    print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


# The bare floor: the run's model and batch shape trained on random tokens, nothing else.
FLOOR = ("import json, resource, sys\n"
         "import torch\n"
         "from torch import nn\n"
         "m, t, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])\n"
         "if steps:\n"
         "    torch.manual_seed(0)\n"
         "    emb = nn.Embedding(m['vocab_size'], m['embed_size'])\n"
         "    rnn = nn.LSTM(m['embed_size'], m['hidden_size'], m['num_layers'], batch_first=True)\n"
         "    head = nn.Linear(m['hidden_size'], m['vocab_size'])\n"
         "    opt = torch.optim.AdamW([*emb.parameters(), *rnn.parameters(), *head.parameters()], lr=1e-3)\n"
         "    x = torch.randint(0, m['vocab_size'], (t['batch_size'], t['seq_len'] + 1))\n"
         "    for _ in range(steps):\n"
         "        out, _ = rnn(emb(x[:, :-1]))\n"
         "        loss = nn.functional.cross_entropy(head(out).flatten(0, 1), x[:, 1:].flatten())\n"
         "        opt.zero_grad()\n"
         "        loss.backward()\n"
         "        opt.step()\n"
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")


def floor_rss_mb(model_config: dict, train_config: dict, steps: int) -> float:
    proc = subprocess.run([sys.executable, "-c", FLOOR, json.dumps(model_config), json.dumps(train_config), str(steps)],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) / 1024


def build_corpus(path: Path, megabytes: float) -> None:
    target = int(megabytes * 1e6)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "wb") as out:
        while written < target:
            for source in sources:
                try:
                    data = source.read_bytes()
                    data.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                data = data.replace(b"\x00", b"")
                out.write(data[: target - written])
                written += min(len(data), target - written)
                if written >= target:
                    break


def run(corpus: Path, out: Path, minutes: float, env: dict[str, str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, "train", str(corpus), "--out", str(out), "--max-minutes",
                           str(minutes), "--sample-length", "0", "--device", "cpu",
                           # The source holds ~8,700 distinct characters, most seen a handful of times;
                           # a 0.2% validation split (200 kB): evaluating 10 MB would dominate a short run.
                           "--max-vocab", "256", "--val-fraction", "0.002"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak_kib = int(proc.stderr.strip().splitlines()[-1].split()[-1])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_step = next(e["elapsed"] for e in events if e["event"] == "step")
    start_event = next(e for e in events if e["event"] == "start")
    return {"wall_seconds": wall, "peak_rss_mb": peak_kib / 1024, "training_started_after_seconds": wall - events[-1]["elapsed"],
            "first_step_logged_at_seconds": first_step, "steps": events[-1]["step"],
            "model_config": start_event["model_config"], "train_config": start_event["train_config"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=100)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/charlm-big"))
    args = parser.parse_args()
    corpus = args.work / f"stdlib-{args.megabytes:g}mb.txt"
    if not corpus.exists() or corpus.stat().st_size < args.megabytes * 1e6 * 0.99:
        build_corpus(corpus, args.megabytes)
    cache = args.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "CHARLM_CACHE_DIR": str(cache)}
    first = run(corpus, args.work / "run1", args.minutes, env)
    second = run(corpus, args.work / "run2", args.minutes, env)
    size_mb = corpus.stat().st_size / 2**20
    import_torch = floor_rss_mb({}, {}, 0)
    bare = floor_rss_mb(second["model_config"], second["train_config"], second["steps"])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "corpus": f"Python {platform.python_version()} standard library source, concatenated",
        "corpus_mb": size_mb, "command": f"charlm train {corpus.name} --max-minutes {args.minutes:g} --max-vocab 256 "
                                         f"--val-fraction 0.002",
        "first_run": first, "second_run": second,
        "peak_rss_over_file_size": max(first["peak_rss_mb"], second["peak_rss_mb"]) / size_mb,
        "floors": {"import_torch_peak_rss_mb": import_torch,
                   "bare_training_loop_peak_rss_mb": bare,
                   "bare_over_file_size": bare / size_mb,
                   "charlm_second_run_minus_bare_mb": second["peak_rss_mb"] - bare},
        "cache_mb": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"big-corpus-{args.megabytes:g}mb.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
