"""benchmarks/gpu_suite.py --smoke: every part of the GPU suite runs here on the CPU at tiny sizes, so
the one command a GPU session has time for cannot rot between sessions."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charlm.model.precision import cpu_bf16_kernel_runs
from conftest import subprocess_env

pytestmark = pytest.mark.processes  # the fast tier (-m 'not slow') leaves these out: conftest.py

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
RESULTS = ROOT / "benchmarks" / "results"


def _results_listing() -> dict[str, float]:
    return {str(p.relative_to(RESULTS)): p.stat().st_mtime for p in RESULTS.rglob("*")} if RESULTS.is_dir() else {}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path_factory.mktemp("gpu-suite")
    before = _results_listing()
    env = {k: v for k, v in subprocess_env().items() if k != "CHARLM_TEST_CUDA_AS"}
    done = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert _results_listing() == before, "the smoke run wrote into benchmarks/results/"
    files = sorted(out.glob("gpu-*.json"))
    assert done.returncode == 0 and len(files) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(files[0].read_text(encoding="utf-8")), files[0]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_part_ran_and_recorded_the_machine(smoke):
    done, result, path = smoke
    assert result["complete"] and result["smoke"]
    assert list(result["parts"]) == ["canary", "tests", "speed", "sampling", "quality", "bench"]
    for name, entry in result["parts"].items():
        assert entry["status"] == "ok", (name, entry.get("error"))
        assert _positive(entry["part_seconds"])
    for key in ("torch", "date", "command", "device_name", "tf32", "git_commit"):
        assert result[key], key
    assert "--smoke" in result["command"]
    log = path.with_suffix(".log").read_text(encoding="utf-8")
    assert "== speed" in log and "charlm bench" in log and "best val loss" in log  # the subprocesses' output too


def test_the_speed_rows_have_real_numbers(smoke):
    speed = smoke[1]["parts"]["speed"]
    assert _positive(speed["matmul_gflops"]["fp32"])
    rows = speed["rows"]
    assert len(rows) == 6 and {row["precision"] for row in rows} == {"fp32", "bf16", "fp16"}
    for row in rows:
        if row["precision"] == "fp16" or (row["precision"] == "bf16" and cpu_bf16_kernel_runs("lstm")):
            # fp16 is CUDA only, and bf16 needs a CPU whose kernels run it: recorded as such, not faked
            assert row["charlm"]["status"].startswith("not supported") and row["charlm_over_bare"] is None
            assert row["bare"]["status"].startswith("not supported"), row
            continue
        assert row["charlm"]["status"] == row["bare"]["status"] == "ok", row
        assert _positive(row["charlm"]["tokens_per_second"]) and _positive(row["bare"]["tokens_per_second"])
        assert _positive(row["charlm_over_bare"]) and _positive(row["flops_per_token"])
        if speed["matmul_gflops"][row["precision"]]:
            assert _positive(row["mfu_charlm"]) and _positive(row["mfu_bare"])


def test_sampling_quality_tests_and_bench_have_real_numbers(smoke):
    parts = smoke[1]["parts"]
    rates, ratios = parts["sampling"]["chars_per_second"], parts["sampling"]["ratios"]
    for name in ("charlm_1_stream", "charlm_n_streams", "charlm_n_streams_bf16", "bare_1_stream"):
        assert _positive(rates[name]), name
    assert all(_positive(value) for value in ratios.values()), ratios
    quality = parts["quality"]
    assert _positive(quality["best_val_loss"]) and quality["steps"] == 5
    assert quality["metrics"]["steps"] == 5 and quality["metrics"]["best_val_loss"] == quality["best_val_loss"]
    tests = parts["tests"]
    assert tests["rc"] == 0 and tests["failed"] == tests["errors"] == 0
    assert tests["passed"] + tests["skipped"] > 0 and tests["summary"]
    assert parts["bench"]["rc"] == 0 and "train" in parts["bench"]["output"].lower()


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SUITE.parent))
    sys.modules["gpu_suite"] = suite  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(suite)
    finally:
        sys.path.remove(str(SUITE.parent))
        del sys.modules["gpu_suite"]
    return suite


def test_the_suite_refuses_to_smoke_into_the_results_folder():
    suite = _load_suite()
    with pytest.raises(SystemExit) as exit_info:
        suite.parse_args(["--smoke", "--out", str(RESULTS / "smoke.json")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        suite.parse_args(["--smoke", "--parts", "speed,nonsense"])
    args = suite.parse_args(["--smoke", "--skip-quality"])
    assert args.device == "cpu" and "quality" not in args.parts


def test_the_canary_runs_the_forwards_a_first_gpu_run_makes(smoke):
    canary = smoke[1]["parts"]["canary"]
    assert canary["versions"]["torch"] == torch.__version__
    assert len(canary["cases"]) == 8 and not canary["failed"] and not canary["warned"], canary
    for name, case in canary["cases"].items():
        if "lstm bf16" in name and cpu_bf16_kernel_runs("lstm"):  # a CPU without the kernel: said so
            assert case["status"].startswith("not supported"), case
            continue
        # On a CPU, autocast lowers the LSTM to bf16; the GRU stays fp32.
        assert case["recurrence_dtype"] == ("bfloat16" if "lstm bf16" in name else "float32"), (name, case)


def test_each_loop_is_labelled_by_the_format_its_recurrence_ran_in(smoke):
    speed = smoke[1]["parts"]["speed"]
    fp32 = [row for row in speed["rows"] if row["precision"] == "fp32"]
    assert all(row["charlm_recurrence"] == row["bare_recurrence"] == "float32" for row in fp32)
    pairs = {(p["charlm_precision"], p["bare_precision"]) for p in speed["like_for_like"]}
    assert ("fp32", "fp32") in pairs
    assert all(p["recurrence"] for p in speed["like_for_like"])


def test_parts_run_in_the_order_given():
    suite = _load_suite()
    args = suite.parse_args(["--smoke", "--parts", "bench,canary,bench"])
    assert args.parts == ["bench", "canary"]


@pytest.mark.slow
def test_a_sigint_at_the_time_limit_still_writes_the_json(tmp_path):
    """The device call runs the suite under `timeout -s INT`: the part it interrupts is recorded as
    such and the JSON written, so the minutes spent come back as figures."""
    import signal
    import time

    env = {k: v for k, v in subprocess_env().items() if k != "CHARLM_TEST_CUDA_AS"}
    proc = subprocess.Popen([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--parts",
                             "canary,speed,sampling"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    seen = ""
    while "== speed" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    result = json.loads(next(tmp_path.glob("gpu-*.json")).read_text(encoding="utf-8"))
    assert result["parts"]["canary"]["status"] == "ok"
    assert result["parts"]["speed"]["status"] == "interrupted" and result["interrupted"] == "speed"
    assert not result["complete"] and "sampling" not in result["parts"]
