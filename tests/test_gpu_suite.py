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

from charlm.precision import cpu_bf16_kernel_runs
from conftest import subprocess_env

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
    assert list(result["parts"]) == ["tests", "speed", "sampling", "quality", "bench"]
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


def test_the_suite_refuses_to_smoke_into_the_results_folder():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SUITE.parent))
    sys.modules["gpu_suite"] = suite  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(suite)
    finally:
        sys.path.remove(str(SUITE.parent))
        del sys.modules["gpu_suite"]
    with pytest.raises(SystemExit) as exit_info:
        suite.parse_args(["--smoke", "--out", str(RESULTS / "smoke.json")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        suite.parse_args(["--smoke", "--parts", "speed,nonsense"])
    args = suite.parse_args(["--smoke", "--skip-quality"])
    assert args.device == "cpu" and "quality" not in args.parts
