"""The command line through Typer's CliRunner and as a real subprocess."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from charlm import __version__
from charlm.cli import app

from conftest import run_together, subprocess_env

runner = CliRunner()
TINY_TRAIN = ["--hidden-size", "24", "--embed-size", "12", "--seq-len", "16", "--batch-size", "4",
              "--max-steps", "30", "--eval-every", "10", "--sample-length", "40", "--device", "cpu"]


def run(*args, cwd=None):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_version_and_help():
    assert run("--version").stdout.strip() == f"charlm {__version__}"
    for command in ("train", "sample", "perplexity", "info"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Example:" in result.stdout


@pytest.mark.processes
def test_help_does_not_import_torch():
    """The commands import the library (and torch) when they run, so `charlm --help` answers at once."""
    code = ("import sys\n"
            "sys.argv = ['charlm', '--help']\n"
            "from charlm.cli import main\n"
            "try:\n    main()\nexcept SystemExit as exit_:\n    assert exit_.code == 0\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Commands" in proc.stdout and proc.stdout.splitlines()[-1] == "False"


def test_train_sample_perplexity_info(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    result = run("train", tiny_corpus, "--out", out, *TINY_TRAIN)
    assert result.exit_code == 0, result.output
    assert "best val loss" in result.stdout and "sample:" in result.stdout
    assert (out / "best.safetensors").is_file() and (out / "metrics.jsonl").is_file()

    result = run("sample", "--checkpoint", out, "--seed", "3", "--length", "50", "--prime", "All")
    again = run("sample", "--checkpoint", out, "--seed", "3", "--length", "50", "--prime", "All")
    assert result.exit_code == 0 and result.stdout == again.stdout and result.stdout.startswith("All")
    many = run("sample", "--checkpoint", out, "--num-samples", "3", "--length", "20", "--seed", "1")
    assert many.stdout.count("──── sample") == 3

    held_out = tmp_path / "held.txt"
    held_out.write_text("Speak, speak! Zebra quux\n", encoding="utf-8")
    result = run("perplexity", held_out, "--checkpoint", out, "--json")
    report = json.loads(result.stdout)
    assert report["characters"] == 25 and report["unknown_tokens"] == 5  # Z, b, !, q, x are unseen
    assert report["bits_per_char"] > 0 and report["perplexity"] > 1

    result = run("info", out, "--json")
    info = json.loads(result.stdout)
    assert info["model_config"]["hidden_size"] == 24 and info["train_state"]["step"] == 30
    assert run("info", out).exit_code == 0


def test_explicit_out_that_holds_a_run_is_refused(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    assert run("train", tiny_corpus, "--out", out, *TINY_TRAIN).exit_code == 0
    result = run("train", tiny_corpus, "--out", out, *TINY_TRAIN)
    assert result.exit_code == 2 and "already holds a run" in result.stderr


@pytest.mark.parametrize("args, code, message", [
    (["train", "missing.txt"], 1, "no such file"),
    (["train", "--tokenizer", "bpe"], 2, "--tokenizer must be one of"),
    (["sample", "--temperature", "-1"], 2, "--temperature must be ≥ 0"),
    (["sample", "--top-k", "0"], 2, "--top-k"),
    (["sample", "--top-p", "1.5"], 2, "--top-p"),
    (["sample", "--length", "-5"], 2, "--length"),
    (["sample", "--checkpoint", "nowhere"], 1, "no such checkpoint"),
])
def test_bad_input_gives_one_line_and_exit_code(tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == code
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.processes
def test_real_subprocess_train_then_sample(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "charlm", "train", str(tiny_corpus), "--out", str(out), *TINY_TRAIN],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "best val loss" in proc.stdout
    charlm = [sys.executable, "-m", "charlm", "sample", "--temperature", "0", "--length", "30"]
    none, proc, greedy = run_together([charlm, [*charlm, "--checkpoint", str(out / "best.safetensors"), "--seed", "1"],
                                       [*charlm, "--checkpoint", str(out), "--seed", "2"]],
                                      env=subprocess_env(), cwd=tmp_path, timeout=120)
    assert none.returncode == 1 and none.stderr.startswith("charlm: error: no checkpoint under checkpoints/")
    assert proc.returncode == 0 and proc.stdout == greedy.stdout and len(proc.stdout) > 20


def test_prime_with_unseen_characters_is_refused(trained_run):
    result = runner.invoke(app, ["sample", "--checkpoint", str(trained_run), "--prime", "Zebra!"])
    assert result.exit_code == 2
    assert "the prime has characters this model has never seen: '!' 'Z' 'b'" in result.stderr


def test_device_cuda_without_cuda_is_a_usage_error(tiny_corpus):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["train", str(tiny_corpus), "--device", "cuda"])
    assert result.exit_code == 2 and "--device cuda: no CUDA GPU is available here" in result.stderr


def test_tiny_corpus_shrinks_the_batch_with_a_warning(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 3, encoding="utf-8")
    result = runner.invoke(app, ["train", str(corpus), "--out", str(tmp_path / "run"), "--max-steps", "3",
                                 "--hidden-size", "8", "--embed-size", "8", "--sample-length", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "warning: the training text has only" in result.stderr


def test_help_into_a_reader_that_stops_early_is_one_line_not_a_traceback():
    """`charlm train --help | head -3`: the reader goes away mid-help; charlm says so in one line."""
    reader = subprocess.Popen(["head", "-c", "10"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    proc = subprocess.run([sys.executable, "-m", "charlm", "train", "--help"], stdout=reader.stdin,
                          stderr=subprocess.PIPE, text=True, env={**subprocess_env(), "COLUMNS": "80"}, timeout=60)
    reader.stdin.close()
    reader.wait(timeout=10)
    assert "Traceback" not in proc.stderr
    assert proc.returncode in (0, 1)
    assert len(proc.stderr.strip().splitlines()) <= 1
