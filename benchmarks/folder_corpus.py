"""A real source tree as the corpus: time to the first training step and peak memory, cold and warm.

    python benchmarks/folder_corpus.py                       # the Python standard library's own folder
    python benchmarks/folder_corpus.py --folder ~/src/linux --include '*.c' --include '*.h' --exclude ''

Each run is ``charlm train FOLDER --include '*.py' --exclude site-packages --max-steps 3 --max-vocab 256
--hidden-size 512 --val-fraction 0.01`` in a fresh process (the standard library without the
packages installed into it; a 1×512 model; validation on the last 1% of the bytes, so the one
evaluation at the end stays short), not a pre-concatenated file: the folder is walked, binary and non-UTF-8 files are skipped, and the files are streamed
through the token cache. The first run starts with an empty cache (cold), the second finds the
entry (warm). "Time to first step" is from launching the process until ``metrics.jsonl`` holds the
first step; peak RSS comes from getrusage. Writes benchmarks/results/folder-corpus-<name>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNNER = ("import resource, runpy, sys\n"
          "sys.argv = ['charlm'] + sys.argv[1:]\n"
          "try:\n    runpy.run_module('charlm', run_name='__main__')\n"
          "finally:\n    print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


TRAIN = ["--max-steps", "3", "--max-vocab", "256", "--hidden-size", "512", "--val-fraction", "0.01"]


def one_run(folder: Path, include: list[str], exclude: list[str], work: Path, cache: Path, name: str) -> dict:
    out = work / name
    args = [sys.executable, "-c", RUNNER, "train", str(folder), *sum((["--include", p] for p in include), []),
            *sum((["--exclude", p] for p in exclude), []), "--out", str(out), *TRAIN, "--log-every", "1",
            "--sample-length", "0", "--device", "cpu"]
    env = {**__import__("os").environ, "CHARLM_CACHE_DIR": str(cache),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_step = None
    while proc.poll() is None or first_step is None:
        metrics = out / "metrics.jsonl"
        if first_step is None and metrics.is_file() and '"event": "step"' in metrics.read_text():
            first_step = time.perf_counter() - start
        if proc.poll() is not None and first_step is None:
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"charlm failed:\n{stderr[-2000:]}")
    rss_kib = int(stderr.strip().splitlines()[-1].split()[-1])
    notes = [line for line in stderr.splitlines() if line.startswith("charlm: note")]
    return {"time_to_first_step_s": round(first_step, 2), "total_s": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(rss_kib / 1024, 1), "notes": notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--include", action="append", default=None, help="file name pattern (default: *.py)")
    parser.add_argument("--exclude", action="append", default=None, help="name pattern (default: site-packages)")
    args = parser.parse_args()
    include = args.include or ["*.py"]
    exclude = [p for p in (args.exclude if args.exclude is not None else ["site-packages"]) if p]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from charlm.data.folder_corpus import corpus_files

    files = corpus_files(args.folder, tuple(include), tuple(exclude))
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    with tempfile.TemporaryDirectory(prefix="charlm-folder-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        cold = one_run(args.folder, include, exclude, work, cache, "cold")
        warm = one_run(args.folder, include, exclude, work, cache, "warm")
        shutil.rmtree(cache, ignore_errors=True)
    result = {
        "command": f"charlm train {args.folder} " + " ".join(f"--include '{p}'" for p in include)
                   + "".join(f" --exclude '{p}'" for p in exclude) + " " + " ".join(TRAIN),
        "folder": str(args.folder), "files_matched": len(files), "megabytes": round(size_mb, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "cold": cold, "warm": warm,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"folder-corpus-{args.folder.name or 'root'}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
