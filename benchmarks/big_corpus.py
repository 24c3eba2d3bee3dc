"""A 100 MB corpus: peak memory of a training run, and how fast a second run starts from the token cache.

    python benchmarks/big_corpus.py                   # builds /tmp/charlm-big/stdlib.txt (~100 MB) first
    python benchmarks/big_corpus.py --megabytes 200

The corpus is the Python standard library's source, concatenated (repeated if the library is
smaller than asked). Each run is ``charlm train stdlib.txt --max-minutes 1 --max-vocab 256 --val-fraction 0.002`` in a
fresh process (default model for the budget), with
a fresh token cache for the first run only; the process's peak RSS comes from getrusage.
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
    return {"wall_seconds": wall, "peak_rss_mb": peak_kib / 1024, "training_started_after_seconds": wall - events[-1]["elapsed"],
            "first_step_logged_at_seconds": first_step}


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
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "corpus": f"Python {platform.python_version()} standard library source, concatenated",
        "corpus_mb": size_mb, "command": f"charlm train {corpus.name} --max-minutes {args.minutes:g} --max-vocab 256 "
                                         f"--val-fraction 0.002",
        "first_run": first, "second_run": second,
        "peak_rss_over_file_size": max(first["peak_rss_mb"], second["peak_rss_mb"]) / size_mb,
        "cache_mb": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"big-corpus-{args.megabytes:g}mb.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
