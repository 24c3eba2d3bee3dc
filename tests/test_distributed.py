"""DDP on CPU with gloo: two processes must train exactly like one process with the same global batch."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from charlm.training.distributed import Dist
from charlm.infer.evaluate import evaluate
from charlm.model.lm import RNNLM
from charlm.cli import app
from charlm.config import ModelConfig
from conftest import subprocess_env

pytestmark = pytest.mark.distributed  # the fast tier (-m 'not slow') leaves these out: conftest.py

OPTIONS = ["--max-steps", "8", "--batch-size", "4", "--seq-len", "16", "--hidden-size", "32", "--embed-size", "16",
           "--dropout", "0", "--log-every", "1", "--eval-every", "4", "--warmup-steps", "2", "--sample-length", "0",
           "--device", "cpu", "--precision", "fp32"]  # DDP equals one process exactly in fp32


def _charlm(*args: str, nproc: int = 1, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "charlm", *args], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def _rank_lines(stdout: str) -> list[str]:
    """The workers' "rank N: …" reports, sorted. The two processes share one pipe, so one report
    can arrive glued to the other before its newline (seen once in CI): split on the prefix."""
    return sorted(part.strip() for part in re.split(r"(?=rank \d+: )", stdout) if part.startswith("rank "))


def _losses(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "step"]


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert np.allclose(wa[name].numpy(), wb[name].numpy(), atol=atol, rtol=0), name


@pytest.mark.parametrize("model", [[], pytest.param(["--cell", "peephole", "--num-layers", "2", "--residual"],
                                                  marks=pytest.mark.slow)], ids=["lstm", "peephole-residual"])
def test_two_processes_equal_one_process(model, tiny_corpus, tmp_path, monkeypatch):
    two = _charlm("train", str(tiny_corpus), "--out", "two", *OPTIONS, *model, nproc=2, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    monkeypatch.chdir(tmp_path)  # the one-process run and the sample in this process, through the same CLI
    one = CliRunner().invoke(app, ["train", str(tiny_corpus), "--out", "one", *OPTIONS, *model])
    assert one.exit_code == 0, one.output[-2000:]
    losses_one, losses_two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(losses_one) == len(losses_two) == 8
    assert np.allclose(losses_one, losses_two, atol=1e-5, rtol=0)
    # The peephole backward sums each weight gradient over the local batch in one matmul, so two
    # half batches round differently from one whole (measured: 1.1e-5 after 8 AdamW steps).
    _assert_same_weights(tmp_path / "one" / "last.safetensors", tmp_path / "two" / "last.safetensors",
                         atol=5e-5 if model else 1e-5)
    # Only rank 0 wrote: one run folder, one set of files, progress printed once.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "best.safetensors", "last.safetensors", "last.step000000008.optim.safetensors", "metrics.jsonl"]
    assert two.stdout.count("best val loss") == 1
    sample = CliRunner().invoke(app, ["sample", "--checkpoint", "two", "--length", "40", "--seed", "1"])
    assert sample.exit_code == 0 and len(sample.stdout.strip()) > 0, sample.output


@pytest.mark.slow
def test_a_resumed_two_process_run_with_dropout_is_exact(tiny_corpus, tmp_path):
    """Each rank saves and restores its own RNG state (after its per-rank seeding, not before), so
    the dropout masks after a resume are the ones an uninterrupted run draws. Two layers, and every
    state a recurrent kernel receives is checked to be contiguous (cuDNN refuses a strided one)."""
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
              str(tiny_corpus)]
    env = {**subprocess_env(), "CHARLM_TEST_CONTIGUOUS": "1"}
    for args in (["straight"], ["run", "--stop-at", "4"]):
        done = subprocess.run([*launch, *args, "--dropout", "0.3", "--num-layers", "2"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
    more = _charlm("train", "--resume", "run", nproc=2, cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    assert len(_losses(tmp_path / "run")) == 8
    assert np.allclose(_losses(tmp_path / "run"), _losses(tmp_path / "straight"), atol=1e-6, rtol=0)
    _assert_same_weights(tmp_path / "run" / "last.safetensors", tmp_path / "straight" / "last.safetensors")


@pytest.mark.slow
def test_resume_a_two_process_run_with_one_process(tiny_corpus, tmp_path, monkeypatch):
    """Interrupted after 4 of 8 steps under 2 processes, finished by 1: the same as 8 steps straight."""
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker]
    env = subprocess_env()
    first = subprocess.run([*launch, str(tiny_corpus), "run", "--stop-at", "4"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    monkeypatch.chdir(tmp_path)  # the one process that finishes it: this one, through the CLI
    more = CliRunner().invoke(app, ["train", "--resume", "run"])
    assert more.exit_code == 0, more.output[-2000:]
    straight = subprocess.run([sys.executable, worker, str(tiny_corpus), "straight"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert len(_losses(tmp_path / "run")) == 8
    assert np.allclose(_losses(tmp_path / "run"), _losses(tmp_path / "straight"), atol=1e-5, rtol=0)
    _assert_same_weights(tmp_path / "run" / "last.safetensors", tmp_path / "straight" / "last.safetensors")


class _ShardOf(Dist):
    """One rank's view of an evaluation, with the cross-rank sum left to the test."""

    def all_reduce_sum(self, tensor):
        return tensor


def test_sharded_evaluation_sums_to_the_whole():
    model = RNNLM(ModelConfig(vocab_size=11, hidden_size=16, embed_size=8))
    ids = np.random.default_rng(0).integers(0, 11, size=20_011).astype(np.uint8)
    whole = evaluate(model, ids, num_streams=5, seq_len=64)
    for world in (2, 3, 7):  # 7 > 5 streams: some ranks hold none
        parts = [evaluate(model, ids, num_streams=5, seq_len=64, dist=_ShardOf(rank, world)) for rank in range(world)]
        assert abs(sum(p.total_nats for p in parts) - whole.total_nats) < 1e-6 * whole.total_nats
        assert all(p.num_predicted == whole.num_predicted for p in parts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_killed_rank_stops_the_others_and_keeps_the_checkpoint(tiny_corpus, tmp_path):
    env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "CHARLM_DIST_TIMEOUT": "60"}
    args = [sys.executable, "-m", "charlm", "train", str(tiny_corpus), "--out", "run", "--max-steps", "100000",
            "--batch-size", "4", "--seq-len", "16", "--hidden-size", "32", "--eval-every", "5", "--device", "cpu",
            "--sample-length", "0"]
    ranks = [subprocess.Popen(args, cwd=tmp_path, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "run" / "last.safetensors").exists():
            assert time.monotonic() < deadline, "no checkpoint was written"
            assert all(p.poll() is None for p in ranks), ranks[0].stderr.read()
            time.sleep(0.2)
        time.sleep(0.5)
        ranks[1].send_signal(signal.SIGKILL)
        started = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=90)
        assert time.monotonic() - started < 90
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert ranks[0].returncode not in (0, None)
    assert "charlm: error: another process of the distributed run failed" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    check = subprocess.run([sys.executable, "-m", "charlm", "info", "run/last.safetensors"], cwd=tmp_path,
                           env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_the_process_group_reduces_cpu_tensors_with_gloo_even_on_cuda(monkeypatch):
    """The per-step loss and clock are CPU tensors, which NCCL cannot reduce: on CUDA the group
    pairs NCCL (GPU tensors) with gloo (CPU ones)."""
    from charlm.training import distributed

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.torch_dist, "init_process_group", lambda backend, timeout: joined.append(backend))
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda index: None)
    assert distributed.from_env("cuda") == Dist(1, 2, 1)
    assert distributed.from_env("cpu") == Dist(1, 2, 1)
    assert joined == ["cpu:gloo,cuda:nccl", "gloo"]


_OUTCOME_WORKER = """
import sys
from charlm.training.distributed import from_env, shutdown
from charlm.errors import SaveError
dist = from_env("cpu")
try:
    with dist.main_outcome():
        if dist.is_main and sys.argv[1] == "fail":
            raise SaveError("cannot write run/best.safetensors: No space left on device")
    with dist.main_outcome():  # a block that ends well on every rank
        pass
    print(f"rank {dist.rank}: ok")
except Exception as exc:
    print(f"rank {dist.rank}: {type(exc).__name__}: {exc}")
finally:
    shutdown(dist)
"""


@pytest.mark.parametrize("outcome", ["fail", "ok"])
def test_an_error_in_rank_0_alone_stops_every_rank_with_its_message(tmp_path, outcome):
    """Rank 0 writes the files; when that fails, the others must not wait in their next collective
    (NCCL would hold them there until its watchdog fires): they stop at once, saying why."""
    worker = tmp_path / "worker.py"
    worker.write_text(_OUTCOME_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), outcome], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = _rank_lines(done.stdout)
    if outcome == "ok":
        assert lines == ["rank 0: ok", "rank 1: ok"]
    else:
        assert lines == ["rank 0: SaveError: cannot write run/best.safetensors: No space left on device",
                         "rank 1: DistributedError: the main process of the distributed run stopped: cannot write "
                         "run/best.safetensors: No space left on device"]


_FAILING_SAVE_WORKER = """
import sys
from charlm.model import checkpoint
from charlm.data.tokenstore import prepare_corpus
from charlm.config import ModelConfig, TrainConfig
from charlm.training.distributed import from_env, shutdown
from charlm.errors import SaveError
from charlm.training.loop import train

dist = from_env("cpu")
saves = 0
real_save = checkpoint.save_checkpoint

def save_checkpoint(path, **kwargs):  # the disk fills up at the second checkpoint
    global saves
    saves += 1
    if saves == 2:
        raise SaveError(f"cannot write {path.name}: No space left on device")
    return real_save(path, **kwargs)

checkpoint.save_checkpoint = save_checkpoint
try:
    _, data = prepare_corpus(sys.argv[1], val_fraction=0.1)
    train(model_config=ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=16, embed_size=8),
          train_config=TrainConfig(seq_len=8, batch_size=4, lr=1e-2, max_steps=6, eval_every=2, warmup_steps=1,
                                   device="cpu"),
          data=data, run_dir="run", source=sys.argv[1], dist=dist)
    print(f"rank {dist.rank}: ok")
except Exception as exc:
    print(f"rank {dist.rank}: {type(exc).__name__}: {exc}")
finally:
    shutdown(dist)
"""


def test_a_checkpoint_rank_0_cannot_write_stops_the_training_ranks_together(tiny_corpus, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(_FAILING_SAVE_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tiny_corpus)], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = _rank_lines(done.stdout)
    assert len(lines) == 2 and lines[0].startswith("rank 0: SaveError: cannot write "), lines
    assert lines[1].startswith("rank 1: DistributedError: the main process of the distributed run stopped: "
                               "cannot write "), lines
    assert (tmp_path / "run" / "best.safetensors").exists()  # the earlier checkpoint is intact
