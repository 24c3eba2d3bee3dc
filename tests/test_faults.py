"""Interruptions and faults through a real training process: SIGKILL during saves, SIGINT, SIGTERM."""
import json
import random
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from charlm.model.checkpoint import load_checkpoint
from charlm.cli import app
from charlm.training.resume_state import load_resume

from conftest import subprocess_env

pytestmark = pytest.mark.processes  # the fast tier (-m 'not slow') leaves these out: conftest.py

TRAIN = ["--hidden-size", "16", "--embed-size", "8", "--seq-len", "8", "--batch-size", "2",
         "--device", "cpu", "--sample-length", "0"]


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "charlm", "train", *map(str, args)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_save(path, previous_mtime, proc, timeout=120):
    """Until the process has written ``path`` at least once (it has started and made progress)."""
    deadline = time.monotonic() + timeout
    while not path.exists() or path.stat().st_mtime_ns == previous_mtime:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    rng = random.Random(0)
    steps = []
    # Evaluate and save after every step, so most random moments fall inside a save.
    args = [tiny_corpus, "--out", out, "--max-steps", "100000", "--eval-every", "1", *TRAIN]
    for attempt in range(6):
        previous = (out / "last.safetensors").stat().st_mtime_ns if attempt else None
        proc = _start(args if attempt == 0 else ["--resume", out, "--max-steps", "100000"])
        _wait_for_save(out / "last.safetensors", previous, proc)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for name in ("last.safetensors", "best.safetensors"):
            load_checkpoint(out / name)  # always loads: the old file or the new one, never a torn one
        resume = load_resume(out)  # and names an optimizer file that exists and loads
        steps.append(resume.checkpoint.train_state["step"])
    assert steps == sorted(steps) and steps[-1] > steps[0]
    # Each start removes what a killed writer left; only the last kill's temporary file may remain.
    assert len(list(out.glob(".*.tmp-*"))) <= 1


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_and_says_how_to_resume(tmp_path, tiny_corpus, sig, code):
    out = tmp_path / "run"
    proc = _start([tiny_corpus, "--out", out, "--max-steps", "100000", "--eval-every", "20", *TRAIN])
    _wait_for_save(out / "last.safetensors", None, proc)
    before = load_checkpoint(out / "last.safetensors").train_state["step"]
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"Resume with: charlm train --resume {out}" in stderr and "Traceback" not in stderr
    after = load_checkpoint(out / "last.safetensors").train_state["step"]
    assert after > before
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--max-steps", str(after + 5)])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "last.safetensors").train_state["step"] == after + 5


def test_a_resumed_run_that_does_not_improve_reports_the_earlier_best(tmp_path, tiny_corpus, monkeypatch):
    """The summary is the run's best, not this session's: a resumed session whose evaluations are all
    worse still ends normally (the signal test above hit this when the last few steps ran at lr ≈ 0)."""
    import charlm.training.loop as train_module
    from charlm.infer.evaluate import EvalResult

    out = tmp_path / "run"
    runner = CliRunner()
    started = runner.invoke(app, ["train", str(tiny_corpus), "--out", str(out), "--max-steps", "4", *TRAIN, "--json"])
    assert started.exit_code == 0, started.output
    first = json.loads(started.stdout)
    real_evaluate = train_module.evaluate

    def much_worse(*args, **kwargs):  # 100 nats/token over the same tokens
        predicted = real_evaluate(*args, **kwargs).num_predicted
        return EvalResult(100.0 * predicted, predicted)

    monkeypatch.setattr(train_module, "evaluate", much_worse)
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", "6", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["best_val_loss"], report["best_step"], report["steps"]) == (first["best_val_loss"], 4, 6)
    assert report["best_val_bpc"] == pytest.approx(first["best_val_bpc"], rel=1e-9)


def test_resume_with_a_conflicting_option_names_it(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(tiny_corpus), "--out", str(out), "--max-steps", "3", *TRAIN]).exit_code == 0
    result = runner.invoke(app, ["train", "--resume", str(out), "--hidden-size", "32", "--max-steps", "6"])
    assert result.exit_code == 2 and "--hidden-size 32 conflicts" in result.stderr
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no such checkpoint" in result.stderr


def test_unwritable_output_folder_is_a_clear_error(tmp_path, tiny_corpus):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["train", str(tiny_corpus), "--out", str(blocker / "run"), "--max-steps", "3",
                                      *TRAIN])
    assert result.exit_code == 1 and "cannot write" in result.stderr and "Traceback" not in result.output


def test_disk_full_during_training_keeps_the_previous_checkpoint(tmp_path, tiny_corpus, monkeypatch):
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(tiny_corpus), "--out", str(out), "--max-steps", "4", *TRAIN]).exit_code == 0
    before = (out / "last.safetensors").read_bytes()

    def no_space(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("charlm.model.checkpoint.os.write", no_space)
    result = runner.invoke(app, ["train", "--resume", str(out), "--max-steps", "8"])
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert "previous checkpoint is intact" in result.stderr
    assert (out / "last.safetensors").read_bytes() == before
    load_resume(out)
