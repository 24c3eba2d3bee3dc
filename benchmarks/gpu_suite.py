"""Everything charlm needs measured on a CUDA GPU, in one command that fits a short GPU session.

    python benchmarks/gpu_suite.py                                   # ~8 minutes on one GPU
    python benchmarks/gpu_suite.py --skip-quality                    # ~4 minutes
    python benchmarks/gpu_suite.py --parts speed,sampling            # only some parts (a rerun)
    python benchmarks/gpu_suite.py --smoke                           # the same code on the CPU, tiny, seconds

Writes benchmarks/results/gpu-<device>-<YYYY-MM-DD>.json (``-2``, ``-3``… rather than replace a
file of the same day) and a ``.log`` beside it with everything printed, the subprocesses' output in
full. ``--out`` names the JSON file (or a folder for it). The JSON is rewritten after every part,
so a crash keeps what was measured, and a SIGINT (``timeout -s INT``) ends the part it interrupts
as ``interrupted`` and still writes the JSON. Each part is timed and guarded: a failure is recorded in its
entry (``status``, ``error``) and the next part runs.

Parts (``--parts``, in the order given; by default this one):

* ``canary``: torch, CUDA and cuDNN versions, then the forwards a first GPU run makes: a 2-layer LSTM
  and GRU evaluated from a sliced (strided) state, trained a layer at a time with dropout and weight
  drop, each under fp32 and bf16, with any warning (cuDNN's "not part of single contiguous chunk")
  and the dtype the recurrence ran in;
* ``tests``: ``pytest -q tests/test_cuda.py`` in a subprocess (pass/fail counts, the output's tail);
* ``speed`` (each loop labelled by the dtype its recurrent kernel's output had, and each charlm row
  also compared with the bare loop whose recurrence ran in the same format): charlm's trainer
  (``charlm.bench.train_rate``; evaluation excluded) against a bare
  embedding → cuDNN ``nn.LSTM`` → linear loop with AdamW, the same shape and precision, in this
  process: 3×1024, embed 256, seq 256 (``autosize.auto_size``'s GPU default) at batch 64 and 128, in
  bf16, fp16 (the bare loop with ``torch.amp.GradScaler``; charlm's trainer has its own) and fp32;
  tokens/s, charlm / bare, and MFU: the fraction of the dense matmul rate of the same dtype that
  this run measured (``charlm.bench.matmul_gflops``; not the datasheet's peak);
* ``sampling``: charlm's sampler (``charlm.bench.sample_rate``, 3×1024) at 1 and 64 streams (and 64
  in bf16) against a bare ``nn.LSTM`` one-token loop on the same device, which, like any streaming
  sampler, brings each token to the host;
* ``quality``: ``charlm train CORPUS --max-minutes 3 --json`` with the defaults (``--quality-minutes``,
  ``--skip-quality``): best validation loss, steps and the run's metrics (``train_quality.summarize``).
  CORPUS (``--corpus``) is ../shared/corpora/tinyshakespeare.txt, or corpora/tinyshakespeare.txt
  (git-ignored) where a copy of the checkout has no ../shared beside it;
* ``bench``: ``charlm bench --device cuda`` as a user runs it (its output and exit code).

Besides: torch, CUDA and cuDNN versions, the GPU, its memory, the TF32 settings in force, the
date, the command line and the git commit. ``--smoke`` runs every part on the CPU at tiny sizes
(1×32 models, batch 4, seq 16, ``--max-steps 5`` on a small corpus it writes itself; the tests
part runs pytest, whose CUDA tests then skip), and writes to a temporary folder unless ``--out``
says where: never into benchmarks/results/. ``tests/test_gpu_suite.py`` runs it that way.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's charlm, whatever is installed
from charlm.bench import (BenchConfig, bare_sample_rate, bare_train_rate, matmul_gflops, model_for,  # noqa: E402
                          recurrence_dtypes, sample_rate, tokenizer_for, train_rate)
from charlm.errors import ConfigError  # noqa: E402
from charlm.model.lm import GATES  # noqa: E402
from charlm.model.precision import cpu_bf16_kernel_runs  # noqa: E402
from train_quality import summarize  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# ../shared beside the checkout on team machines; corpora/ (git-ignored) where the checkout travels alone.
CORPORA = (ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt", ROOT / "corpora" / "tinyshakespeare.txt")
CORPUS = next((path for path in CORPORA if path.is_file()), CORPORA[0])
PARTS = ("canary", "tests", "speed", "sampling", "quality", "bench")
PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the suite uses: the GPU's, or --smoke's tiny ones."""

    train_shapes: tuple[BenchConfig, ...]
    train_steps: int
    dense_matmul: tuple[int, int, int]
    matmul_reps: int
    sample_model: BenchConfig
    sample_length_1: int
    sample_length_n: int
    sample_streams: int
    bare_sample_length: int
    timeout_tests: float
    timeout_bench: float
    bench_options: tuple[str, ...]


def gpu_sizes(steps: int) -> Sizes:
    # autosize.auto_size(gpu=True): 3×1024, embed min(1024, 256), batch 64, seq 256; and batch 128.
    shape = BenchConfig(hidden_size=1024, num_layers=3, embed_size=256, seq_len=256, train_steps=steps, device="cuda")
    return Sizes(train_shapes=(shape, dataclasses.replace(shape, batch_size=128)), train_steps=steps,
                 dense_matmul=(4096, 4096, 4096), matmul_reps=100, sample_model=shape, sample_length_1=500,
                 sample_length_n=200, sample_streams=64, bare_sample_length=500, timeout_tests=300,
                 timeout_bench=360, bench_options=())


def smoke_sizes() -> Sizes:
    shape = BenchConfig(hidden_size=32, num_layers=1, embed_size=16, batch_size=4, seq_len=16, train_steps=15,
                        device="cpu")
    return Sizes(train_shapes=(shape, dataclasses.replace(shape, batch_size=8)), train_steps=15,
                 dense_matmul=(64, 64, 64), matmul_reps=10, sample_model=shape, sample_length_1=40,
                 sample_length_n=20, sample_streams=8, bare_sample_length=40, timeout_tests=120, timeout_bench=120,
                 bench_options=("--hidden-size", "16", "--embed-size", "8", "--batch-size", "2", "--seq-len", "8",
                                "--steps", "20", "--repeats", "1", "--sample-streams", "2", "--no-bf16"))


class Log:
    """Prints, and keeps everything printed (and every subprocess's whole output) in the .log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("w", encoding="utf-8")

    def __call__(self, message: str, *, console: bool = True, kept: bool = True) -> None:
        if console:
            print(message, flush=True)
        if kept:
            self.file.write(message + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _error(exc: BaseException) -> str:
    return _tail("".join(traceback.format_exception(exc)), 25)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _run(command: list[str], *, log: Log, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A subprocess from the repository root: its exit code, seconds and output (in full in the log)."""
    log(f"$ {shlex.join(command)}")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env or child_env(), capture_output=True, text=True,
                              timeout=timeout)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = (exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or ""))
        stderr += f"\n(timed out after {timeout:g} s)"
    seconds = time.perf_counter() - start
    log(f"--- stdout ---\n{stdout}--- stderr ---\n{stderr}--- exit {rc}, {seconds:.1f} s ---", console=False)
    log(_tail(stdout + stderr, 12), kept=False)  # the log has it all, just above
    return {"command": shlex.join(command), "rc": rc, "seconds": seconds, "stdout": stdout, "stderr": stderr}


def child_env() -> dict[str, str]:
    """This checkout first on the path; CHARLM_TEST_CUDA_AS unset, so the CUDA tests test CUDA."""
    env = {k: v for k, v in os.environ.items() if k != "CHARLM_TEST_CUDA_AS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if torch.get_num_threads() == 1:  # --smoke: the subprocesses too
        env["OMP_NUM_THREADS"] = "1"
    return env


# ---- the parts -------------------------------------------------------------------------------------


def part_tests(args: argparse.Namespace, sizes: Sizes, log: Log) -> dict[str, Any]:
    done = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], log=log,
                timeout=sizes.timeout_tests)
    output = done["stdout"] + done["stderr"]
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)",
                                                     summary[-1] if summary else "")}
    counts = {("error" if k == "errors" else k): v for k, v in counts.items()}
    result = {"command": done["command"], "rc": done["rc"], "seconds": done["seconds"],
              "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
              "errors": counts.get("error", 0), "skipped": counts.get("skipped", 0),
              "summary": summary[-1].strip("= ") if summary else None, "tail": _tail(output)}
    if not torch.cuda.is_available():
        result["note"] = "skipped: no CUDA (the module skips itself)"
    if done["rc"] not in (0, 5) and not result["failed"] and not result["errors"]:
        raise RuntimeError(f"pytest exited {done['rc']}: {_tail(output, 5)}")
    return result


def part_canary(args: argparse.Namespace, sizes: Sizes, log: Log, device: torch.device) -> dict[str, Any]:
    """What breaks a first GPU run before any figure: strided states, weights cuDNN must copy, the
    recurrence's number format. Each case guarded: its warnings, output dtype, or error."""
    import warnings

    from charlm.config import ModelConfig
    from charlm.model.lm import RNNLM, map_state

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    cases: dict[str, Any] = {}
    for cell in ("lstm", "gru"):
        for precision in ("fp32", "bf16"):
            for mode in ("eval, sliced state", "train, dropout and weight drop"):
                name = f"{cell} {precision} {mode}"
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    why = cpu_bf16_kernel_runs(cell) if device.type == "cpu" and precision == "bf16" else None
                    try:
                        if why is not None:
                            raise NotSupported(f"this CPU has no bf16 {cell} kernel ({why})")
                        torch.manual_seed(0)
                        training = mode.startswith("train")
                        model = RNNLM(ModelConfig(vocab_size=50, cell=cell, hidden_size=64, embed_size=32,
                                                  num_layers=2, dropout=0.25 if training else 0.0,
                                                  weight_drop=0.3 if training else 0.0)).to(device)
                        model.train(training)
                        x = torch.randint(0, 50, (6, 12), device=device)
                        state = model.init_state(8)
                        sliced = map_state(lambda s: s[:, 1:7], state)  # strided, as a user's slice is
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                            logits, _, (raw, _) = model(x, sliced, with_outputs=True)
                        if training:
                            logits.float().sum().backward()
                        _sync(device)
                        entry = {"status": "ok", "recurrence_dtype": str(raw.dtype).removeprefix("torch.")}
                    except NotSupported as exc:
                        entry = {"status": f"not supported: {exc}"}
                    except Exception as exc:  # noqa: BLE001 - recorded: this is what the canary is for
                        entry = {"status": "error", "error": _error(exc)}
                entry["warnings"] = sorted({str(w.message).splitlines()[0] for w in caught})
                cases[name] = entry
                log(f"canary {name}: {entry['status']}, {entry.get('recurrence_dtype', '-')}, "
                    f"warnings: {entry['warnings'] or 'none'}")
    failed = [name for name, entry in cases.items() if entry["status"] == "error"]
    warned = [name for name, entry in cases.items() if entry["warnings"]]
    return {"versions": versions, "cases": cases, "failed": failed, "warned": warned}


def forward_flops_per_token(cfg: BenchConfig) -> int:
    """Multiply-adds ×2 of one token's forward pass: every layer's input and recurrent products, the head."""
    G, H, E, L, V = GATES[cfg.cell], cfg.hidden_size, cfg.embed_size, cfg.num_layers, cfg.vocab_size
    return 2 * (G * H * (E + H) + (L - 1) * G * H * 2 * H + H * V)


def bare_rate(cfg: BenchConfig, device: torch.device, precision: str) -> float:
    if precision == "fp16" and device.type != "cuda":
        raise NotSupported("fp16 autocast training is CUDA only here")
    if precision == "bf16" and device.type == "cpu" and (why := cpu_bf16_kernel_runs("lstm")) is not None:
        raise NotSupported(f"this CPU has no bf16 LSTM kernel ({why})")
    return bare_train_rate(cfg, device, precision=precision)


class NotSupported(Exception):
    """A measurement this device or charlm cannot make: recorded as such, not as a failure."""


def _measured(measure: Callable[[], float], device: torch.device) -> dict[str, Any]:
    """One guarded measurement: its value and peak memory, or why there is none."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        value = measure()
    except NotSupported as exc:
        return {"tokens_per_second": None, "status": f"not supported: {exc}"}
    except ConfigError as exc:  # charlm refusing a precision on this device is an answer, not a crash
        return {"tokens_per_second": None, "status": f"not supported: {exc}"}
    except Exception as exc:  # noqa: BLE001 - recorded, and the next measurement runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"tokens_per_second": None, "status": "error", "error": _error(exc)}
    entry = {"tokens_per_second": value, "status": "ok", "seconds": time.perf_counter() - start}
    if device.type == "cuda":
        entry["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return entry


def part_speed(args: argparse.Namespace, sizes: Sizes, log: Log, device: torch.device) -> dict[str, Any]:
    matmul: dict[str, Any] = {}
    for precision in PRECISIONS:
        try:
            matmul[precision] = matmul_gflops(device, sizes.dense_matmul, dtype=DTYPES[precision],
                                              reps=sizes.matmul_reps)
        except Exception as exc:  # noqa: BLE001 - e.g. no fp16 matmul on this CPU: MFU stays None
            matmul[precision] = None
            log(f"matmul {precision}: {type(exc).__name__}: {exc}")
    if device.type == "cuda":  # what "fp32" products reach where TF32 is allowed (cuDNN's RNNs by default)
        previous = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("high")
            matmul["fp32_as_tf32"] = matmul_gflops(device, sizes.dense_matmul, reps=sizes.matmul_reps)
        except Exception as exc:  # noqa: BLE001 - an extra figure only
            log(f"matmul fp32 as TF32: {type(exc).__name__}: {exc}")
        finally:
            torch.set_float32_matmul_precision(previous)
    log("dense matmul GFLOP/s: " + ", ".join(f"{k} {v:,.0f}" if v else f"{k} -" for k, v in matmul.items()))
    rows = []
    formats: dict[str, dict[str, str] | None] = {}
    for precision in PRECISIONS:  # what each loop's recurrent kernel actually ran in
        try:
            formats[precision] = recurrence_dtypes(sizes.train_shapes[0], device, precision)
        except Exception as exc:  # noqa: BLE001 - e.g. no such kernel on this device: the row says so
            formats[precision] = None
            log(f"recurrence format under {precision}: {type(exc).__name__}: {exc}")
    for cfg in sizes.train_shapes:
        flops = 3 * forward_flops_per_token(cfg)  # forward + backward ≈ 3 forwards
        shape = f"{cfg.num_layers}x{cfg.hidden_size} LSTM, embed {cfg.embed_size}, batch {cfg.batch_size}, " \
                f"seq {cfg.seq_len}"
        for precision in PRECISIONS:
            rounds = []
            for _ in range(args.rounds):  # bare first, then charlm, alternating: the same conditions for both
                bare = _measured(lambda: bare_rate(cfg, device, precision), device)
                ours = _measured(lambda: train_rate(cfg, device, precision), device)
                rounds.append((bare, ours))
            bare, ours = _median_entry([b for b, _ in rounds]), _median_entry([o for _, o in rounds])
            ratios = [o["tokens_per_second"] / b["tokens_per_second"] for b, o in rounds
                      if o["tokens_per_second"] and b["tokens_per_second"]]
            peak = matmul.get(precision)
            row = {"shape": shape, "precision": precision, "charlm": ours, "bare": bare,
                   "charlm_recurrence": (formats.get(precision) or {}).get("charlm"),
                   "bare_recurrence": (formats.get(precision) or {}).get("bare"),
                   "charlm_over_bare": sorted(ratios)[len(ratios) // 2] if ratios else None,
                   "per_round_ratios": ratios, "flops_per_token": flops,
                   "mfu_charlm": ours["tokens_per_second"] * flops / (peak * 1e9)
                   if peak and ours["tokens_per_second"] else None,
                   "mfu_bare": bare["tokens_per_second"] * flops / (peak * 1e9)
                   if peak and bare["tokens_per_second"] else None}
            if precision == "fp32" and matmul.get("fp32_as_tf32") and ours["tokens_per_second"]:
                row["mfu_charlm_against_tf32"] = ours["tokens_per_second"] * flops / (matmul["fp32_as_tf32"] * 1e9)
            rows.append(row)
            log(f"train {shape}, {precision}: charlm {_rate(ours)}, bare {_rate(bare)}, "
                f"ratio {_fmt(row['charlm_over_bare'], '.3f')}, MFU {_fmt(row['mfu_charlm'], '.1%')}")
    like = like_for_like(rows)
    for entry in like:
        log(f"like for like, {entry['shape']}: charlm {entry['charlm_precision']} (recurrence "
            f"{entry['recurrence']}) / bare {entry['bare_precision']} loop: {_fmt(entry['ratio'], '.3f')}")
    return {"matmul_gflops": matmul, "dense_matmul_shape": list(sizes.dense_matmul), "steps": sizes.train_steps,
            "rounds": args.rounds, "rows": rows, "like_for_like": like}


def like_for_like(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each charlm row against every bare loop of the same shape whose recurrence ran in the same
    number format (a "bf16" bare loop on CUDA runs its LSTM in fp16: it is paired by that)."""
    pairs = []
    for ours in rows:
        for bare in rows:
            if bare["shape"] != ours["shape"] or not ours["charlm_recurrence"] \
                    or bare["bare_recurrence"] != ours["charlm_recurrence"]:
                continue
            a, b = ours["charlm"]["tokens_per_second"], bare["bare"]["tokens_per_second"]
            pairs.append({"shape": ours["shape"], "charlm_precision": ours["precision"],
                          "bare_precision": bare["precision"], "recurrence": ours["charlm_recurrence"],
                          "ratio": a / b if a and b else None})
    return pairs


def _median_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The first measured round's entry with the median tokens/s of the rounds (or the first round's failure)."""
    measured = [e for e in entries if e["tokens_per_second"]]
    if not measured:
        return entries[0]
    rates = sorted(e["tokens_per_second"] for e in measured)
    return {**measured[0], "tokens_per_second": rates[len(rates) // 2],
            "per_round": [e["tokens_per_second"] for e in entries]}


def _rate(entry: dict[str, Any]) -> str:
    if entry["tokens_per_second"] is not None:
        return f"{entry['tokens_per_second']:,.0f} tok/s"
    return entry["status"] if entry["status"] != "error" else "error: " + entry["error"].splitlines()[-1]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def part_sampling(args: argparse.Namespace, sizes: Sizes, log: Log, device: torch.device) -> dict[str, Any]:
    cfg = dataclasses.replace(sizes.sample_model, device=device.type)
    model, tokenizer = model_for(cfg, device), tokenizer_for(cfg.vocab_size)
    sample_rate(model, tokenizer, streams=1, length=10)  # one-off set-up, outside the timing
    rates: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    measures = {
        "charlm_1_stream": lambda: sample_rate(model, tokenizer, streams=1, length=sizes.sample_length_1),
        "charlm_n_streams": lambda: sample_rate(model, tokenizer, streams=sizes.sample_streams,
                                                length=sizes.sample_length_n),
        "charlm_n_streams_bf16": lambda: sample_rate(model, tokenizer, streams=sizes.sample_streams,
                                                     length=sizes.sample_length_n, precision="bf16"),
        "bare_1_stream": lambda: bare_sample_rate(cfg, device, sizes.bare_sample_length),
    }
    for name, measure in measures.items():
        try:
            rates[name] = measure()
        except Exception as exc:  # noqa: BLE001 - recorded, and the next rate is measured
            rates[name] = None
            errors[name] = _error(exc)
        log(f"sampling {name}: {_fmt(rates[name], ',.0f')} chars/s")

    def ratio(a: str, b: str) -> float | None:
        return rates[a] / rates[b] if rates.get(a) and rates.get(b) else None

    return {"model": f"{cfg.num_layers}x{cfg.hidden_size} LSTM, embed {cfg.embed_size}, vocab {cfg.vocab_size}",
            "streams": sizes.sample_streams, "chars_per_second": rates, "errors": errors,
            "ratios": {"one_stream_charlm_over_bare": ratio("charlm_1_stream", "bare_1_stream"),
                       "n_streams_over_one_stream": ratio("charlm_n_streams", "charlm_1_stream"),
                       "n_streams_bf16_over_fp32": ratio("charlm_n_streams_bf16", "charlm_n_streams")}}


def part_quality(args: argparse.Namespace, sizes: Sizes, log: Log, device: torch.device) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="charlm-gpu-quality-"))
    run_dir = folder / "run"
    if args.smoke:
        corpus = folder / "tiny.txt"
        corpus.write_text(SMOKE_TEXT, encoding="utf-8")
        budget = ["--max-steps", "5", "--hidden-size", "32", "--embed-size", "16", "--batch-size", "4",
                  "--seq-len", "16"]
        timeout = 180.0
    else:
        corpus = args.corpus
        if not corpus.is_file():  # a part's failure, not the suite's: the GPU time goes to the other parts
            raise FileNotFoundError(f"--corpus {corpus} is not a file (looked for {', '.join(map(str, CORPORA))})")
        budget = ["--max-minutes", f"{args.quality_minutes:g}"]
        timeout = args.quality_minutes * 60 + 240
    done = _run([sys.executable, "-m", "charlm", "train", str(corpus), *budget, "--json", "--out", str(run_dir),
                 "--sample-length", "0", "--device", device.type], log=log, timeout=timeout,
                env={**child_env(), "CHARLM_CACHE_DIR": str(folder / "token-cache")})  # ~/.cache untouched
    if done["rc"] != 0:
        raise RuntimeError(f"charlm train exited {done['rc']}: {_tail(done['stderr'], 8)}")
    report = json.loads(done["stdout"].strip().splitlines()[-1])
    result = {"command": done["command"], "seconds": done["seconds"], "best_val_loss": report["best_val_loss"],
              "steps": report["steps"], "report": report, "metrics": summarize(run_dir)}
    log(f"quality: best val loss {report['best_val_loss']:.4f} after {report['steps']:,} steps")
    return result


def part_bench(args: argparse.Namespace, sizes: Sizes, log: Log, device: torch.device) -> dict[str, Any]:
    done = _run([sys.executable, "-m", "charlm", "bench", "--device", device.type, *sizes.bench_options], log=log,
                timeout=sizes.timeout_bench)
    if done["rc"] != 0:
        raise RuntimeError(f"charlm bench exited {done['rc']}: {_tail(done['stderr'], 8)}")
    return {"command": done["command"], "rc": done["rc"], "seconds": done["seconds"], "output": done["stdout"],
            "stderr": _tail(done["stderr"])}


SMOKE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
              "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 60


# ---- the run ---------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": _git("rev-parse", "HEAD"), "git_changes": _git("status", "--porcelain", "--untracked-files=no"),
        "tf32": _tf32_settings(), "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    compute_capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count(),
                    bf16_supported=torch.cuda.is_bf16_supported(), nvidia_smi=_nvidia_smi())
    else:
        info.update(device_name=f"cpu ({torch.get_num_threads()} threads)")
    return info


def _tf32_settings() -> dict[str, Any]:
    """Whether "fp32" products may run as TF32: cuDNN's recurrent kernels do by default."""
    settings: dict[str, Any] = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                                "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        settings["cudnn_rnn_fp32_precision"] = rnn.fp32_precision
    return settings


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def output_path(args: argparse.Namespace, device: torch.device) -> Path:
    if args.out is not None and args.out.suffix == ".json":
        return args.out
    if args.out is not None:
        folder = args.out
    elif args.smoke:
        folder = Path(tempfile.mkdtemp(prefix="charlm-gpu-suite-smoke-"))
    else:
        folder = RESULTS
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    stem = f"gpu-{_slug(name)}-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    path, n = folder / f"{stem}.json", 1
    while path.exists() or path.with_suffix(".log").exists():  # a GPU session's results are never replaced
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the quality run's corpus (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda (default), or cpu (the default with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="every part on tiny sizes, in seconds (CPU by default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON file (.json) or its folder; default benchmarks/results/, a temp folder "
                             "with --smoke")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from: %(default)s")
    parser.add_argument("--quality-minutes", type=float, default=3.0, help="the quality run's --max-minutes")
    parser.add_argument("--skip-quality", action="store_true", help="leave out the 3-minute training run")
    parser.add_argument("--steps", type=int, default=30, help="training steps per speed measurement (> 10)")
    parser.add_argument("--rounds", type=int, default=1, help="speed measurements per row (their median)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    args.parts = [p for p in dict.fromkeys(parts) if not (p == "quality" and args.skip_quality)]  # as given
    if args.steps <= 10 or args.rounds < 1 or args.quality_minutes <= 0:
        parser.error("--steps must be over 10 (the first 10 are warm-up), --rounds and --quality-minutes positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (--smoke runs the suite on the CPU)")
    if args.smoke and args.out is not None and RESULTS in [args.out.resolve(), *args.out.resolve().parents]:
        parser.error("--smoke never writes into benchmarks/results/")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if "quality" in args.parts and not args.smoke and not args.corpus.is_file():
        print(f"gpu_suite: warning: {args.corpus} is missing, so the quality part will fail (--corpus)", flush=True)
    sizes = smoke_sizes() if args.smoke else gpu_sizes(args.steps)
    if args.smoke:
        # Tiny models gain nothing from intra-op threads, and spinning ones stall for seconds on a busy CPU.
        torch.set_num_threads(1)
    out = output_path(args, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Log(out.with_suffix(".log"))
    result: dict[str, Any] = {"suite": "gpu", "smoke": args.smoke, "complete": False, **environment(device),
                              "parts": {}}
    log(f"charlm GPU suite on {result['device_name']}: {', '.join(args.parts)}; writing {out}")
    start = time.perf_counter()

    def save() -> None:
        result["elapsed_seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(result, indent=1, allow_nan=False, default=_json_safe) + "\n", encoding="utf-8")

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "canary": lambda: part_canary(args, sizes, log, device),
        "tests": lambda: part_tests(args, sizes, log),
        "speed": lambda: part_speed(args, sizes, log, device),
        "sampling": lambda: part_sampling(args, sizes, log, device),
        "quality": lambda: part_quality(args, sizes, log, device),
        "bench": lambda: part_bench(args, sizes, log, device),
    }
    try:
        for name in args.parts:
            began = time.perf_counter()
            interrupted = False
            try:
                log(f"== {name} (at {began - start:.0f} s)")
                entry = {"status": "ok", **runners[name]()}
            except KeyboardInterrupt:  # SIGINT: the time is up; what was measured is written below
                entry, interrupted = {"status": "interrupted"}, True
                log(f"{name} interrupted (SIGINT); writing what was measured")
            except Exception as exc:  # noqa: BLE001 - one failure must not cost the other parts
                entry = {"status": "error", "error": _error(exc)}
                log(f"{name} failed:\n{entry['error']}")
            entry["part_seconds"] = time.perf_counter() - began
            result["parts"][name] = _finite(entry)
            if interrupted:
                result["interrupted"] = name
                break
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the subprocess parts get the memory
            save()
        else:
            result["complete"] = True
    finally:
        save()
        failed = [name for name, entry in result["parts"].items() if entry["status"] != "ok"]
        log(f"done in {time.perf_counter() - start:.0f} s; failed parts: {', '.join(failed) or 'none'}; wrote {out}")
        log.close()
    return 1 if failed else 0


def _finite(value: Any) -> Any:
    """JSON without NaN or Infinity (``jsonio``'s rule): those become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_safe(value: Any) -> Any:
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
