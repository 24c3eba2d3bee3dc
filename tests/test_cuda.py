"""charlm on a CUDA GPU: the paths a CPU run never takes (cuDNN kernels, CUDA autocast and RNG,
fused AdamW, NCCL), each checked against a CPU reference.

The whole module skips where ``torch.cuda.is_available()`` is False. Its logic runs anywhere with
the device overridden, every "cuda" below becoming that device:

    CHARLM_TEST_CUDA_AS=cpu python -m pytest -q tests/test_cuda.py

Under the override the cross-device checks compare the CPU with itself and the distributed test
uses gloo: they prove that the tests run, not that CUDA is right. ``benchmarks/gpu_suite.py`` runs
this module first on a GPU machine.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import charlm
from charlm.cli import app
from charlm.config import ModelConfig
from charlm.infer.step import FastStep
from charlm.model.lm import RNNLM
from charlm.model.precision import resolve_precision
from conftest import TINY_TEXT, subprocess_env

OVERRIDE = os.environ.get("CHARLM_TEST_CUDA_AS", "")
if OVERRIDE not in ("", "cpu"):
    raise pytest.UsageError(f"CHARLM_TEST_CUDA_AS must be cpu or unset (got {OVERRIDE!r})")
DEVICE = OVERRIDE or "cuda"

pytestmark = [
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA GPU (CHARLM_TEST_CUDA_AS=cpu runs these on the CPU)"),
    pytest.mark.usefixtures("one_thread"),
]

TINY = dict(hidden_size=32, embed_size=16, seq_len=16, batch_size=4, eval_every=5, warmup_steps=2)


@contextlib.contextmanager
def exact_fp32_kernels():
    """cuDNN's recurrent kernels run fp32 as TF32 by default on Ampere and later (PyTorch's
    ``cudnn.rnn.fp32_precision`` is ``tf32``), ~1e-3 from fp32: off, for checks of FastStep's arithmetic."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        previous = rnn.fp32_precision
        rnn.fp32_precision = "ieee"
        try:
            yield
        finally:
            rnn.fp32_precision = previous
    else:
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = previous


def _noisy_model(cfg: ModelConfig, seed: int) -> RNNLM:
    """A model with non-trivial weights and biases, so every term of the arithmetic counts."""
    torch.manual_seed(seed)
    model = RNNLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _corpus(folder: Path) -> Path:
    path = folder / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def _train(folder: Path, *, device: str, name: str = "run", **options) -> charlm.TrainResult:
    settings = {**TINY, "max_steps": 12, **options}
    return charlm.train(_corpus(folder), out=folder / name, device=device, **settings)


def _losses(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "step"]


@pytest.fixture(scope="module")
def run_on_device(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("on-device"), device=DEVICE).run_dir


@pytest.fixture(scope="module")
def run_on_cpu(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("on-cpu"), device="cpu").run_dir


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_on_the_device_is_fp32_on_the_cpu_within_bf16_rounding(cell):
    model = _noisy_model(ModelConfig(vocab_size=31, cell=cell, hidden_size=64, embed_size=32), seed=0)
    tokens = torch.randint(0, 31, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference, _ = model(tokens)  # (B, T, V), fp32 on the CPU
        device = torch.device(DEVICE)
        on_device = copy.deepcopy(model).to(device)
        with resolve_precision("bf16", device).autocast(device):
            low, _ = on_device(tokens.to(device))
    assert low.dtype == torch.bfloat16  # autocast really applied
    torch.testing.assert_close(low.float().cpu().log_softmax(-1), reference.log_softmax(-1), atol=5e-2, rtol=0)


def test_under_bf16_autocast_the_recurrence_is_fp32_and_the_head_bf16():
    """PyTorch's autocast wrapper for cuDNN RNNs casts to fp16 whatever the autocast dtype, and a
    bf16 run has no loss scaler: charlm keeps the recurrence in fp32 on CUDA
    (``lm.FP32_RECURRENCE_UNDER_BF16``). The bare module shows what it avoids; should a PyTorch
    release run it in bf16, that choice is worth measuring again (benchmarks/gpu_suite.py)."""
    model = RNNLM(ModelConfig(vocab_size=13, hidden_size=16, embed_size=8)).to(DEVICE).train()
    x = torch.randint(0, 13, (2, 5), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits, _, (raw, _) = model(x, with_outputs=True)
        bare, _ = model.rnn(model.embedding(x))
    assert logits.dtype == torch.bfloat16
    if DEVICE == "cuda":
        assert raw.dtype == torch.float32
        assert bare.dtype == torch.float16, f"cuDNN under bf16 autocast now runs in {bare.dtype}"
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("where", ["device-to-cpu", "cpu-to-device"])
def test_a_checkpoint_trained_on_one_device_samples_on_the_other(where, run_on_device, run_on_cpu):
    run, sample_device = (run_on_device, "cpu") if where == "device-to-cpu" else (run_on_cpu, DEVICE)
    lm = charlm.load(run, device=sample_device)
    assert lm.model.embedding.weight.device.type == sample_device
    text = "".join(lm.generate("First", length=40, seed=1))
    assert len(text) == 40
    # The weights are the file's, bit for bit, wherever they are loaded.
    other = charlm.load(run, device="cpu")
    for (name, a), (_, b) in zip(lm.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a.cpu(), b), name


def test_resume_on_the_device_continues_where_it_stopped(tmp_path):
    """Stopped after 8 of 20 steps and resumed: the step count goes on, and the losses are an
    uninterrupted run's (dropout on, so the CUDA RNG state is restored too)."""
    options = dict(max_steps=20, dropout=0.2, precision="fp32", log_every=1)
    straight = _train(tmp_path, device=DEVICE, name="straight", **options)
    calls = 0

    def stop_after_eight() -> str | None:
        nonlocal calls
        calls += 1
        return "test" if calls >= 8 else None

    stopped = charlm.train(_corpus(tmp_path), out=tmp_path / "run", device=DEVICE, should_stop=stop_after_eight,
                           **{**TINY, **options})
    assert stopped.stopped_by == "interrupt" and stopped.step == 8
    resumed = charlm.train(resume=tmp_path / "run", device=DEVICE)
    assert resumed.step == 20 and math.isfinite(resumed.last_val_loss)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    # CUDA's embedding backward adds with atomics (order varies); the CPU is exact.
    tolerance = 1e-6 if DEVICE == "cpu" else 1e-3
    assert losses == pytest.approx(_losses(straight.run_dir), abs=tolerance)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
def test_fast_step_on_the_device_equals_the_model(cell):
    device = torch.device(DEVICE)
    model = _noisy_model(ModelConfig(vocab_size=23, cell=cell, hidden_size=32, embed_size=16, num_layers=2),
                         seed=2).to(device)
    generator = torch.Generator().manual_seed(3)
    warm, tokens = torch.randint(0, 23, (3, 4), generator=generator), torch.randint(0, 23, (3, 12), generator=generator)
    warm, tokens = warm.to(device), tokens.to(device)
    with exact_fp32_kernels(), torch.inference_mode():
        _, state = model(warm)
        reference, _ = model(tokens, state)  # nn.LSTM / nn.GRU / nn.RNN over the window (cuDNN on a GPU)
        fast = FastStep(model)
        fast.reset(3, state)
        for t in range(tokens.shape[1]):
            logits = fast.step(tokens[:, t])
            assert logits.device.type == device.type
            torch.testing.assert_close(logits.log_softmax(-1), reference[:, t].log_softmax(-1), atol=1e-5, rtol=1e-5)
        _, whole = model(torch.cat([warm, tokens], dim=1))
    got = fast.state()
    for a, b in zip(got if isinstance(got, tuple) else (got,), whole if isinstance(whole, tuple) else (whole,)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_perplexity_on_the_device_equals_the_cpu(run_on_device):
    """With the default kernels (cuDNN's TF32 included): what a user's `charlm perplexity` gives."""
    on_device = charlm.load(run_on_device, device=DEVICE).perplexity(TINY_TEXT)
    on_cpu = charlm.load(run_on_device, device="cpu").perplexity(TINY_TEXT)
    assert on_device.predicted_tokens == on_cpu.predicted_tokens
    assert abs(on_device.nats_per_token - on_cpu.nats_per_token) < 1e-3
    # --precision bf16 on the device: offered for speed because it stays this close (docs/precision.md).
    fast = charlm.load(run_on_device, device=DEVICE).perplexity(TINY_TEXT, precision="bf16")
    assert fast.precision == "bf16" and abs(fast.nats_per_token - on_cpu.nats_per_token) < 2e-3


def test_bf16_sampling_steps_on_the_device_stay_near_fp32():
    """The bf16 FastStep (cuBLAS bf16 products added to fp32 gates) against the fp32 one."""
    device = torch.device(DEVICE)
    model = _noisy_model(ModelConfig(vocab_size=23, hidden_size=64, embed_size=16, num_layers=2), seed=4).to(device)
    tokens = torch.randint(0, 23, (50, 4), generator=torch.Generator().manual_seed(5)).to(device)
    exact, low = FastStep(model), FastStep(model, dtype=torch.bfloat16)
    exact.reset(4)
    low.reset(4)
    for token in tokens:
        a, b = exact.step(token).log_softmax(-1), low.step(token).log_softmax(-1)
        assert float((a - b).abs().max()) < 0.1


def test_the_same_seed_gives_the_same_sample_on_the_device(run_on_device):
    lm = charlm.load(run_on_device, device=DEVICE)
    first = "".join(lm.generate("First", length=80, temperature=1.0, seed=7))
    assert first == "".join(lm.generate("First", length=80, temperature=1.0, seed=7))
    assert first != "".join(lm.generate("First", length=80, temperature=1.0, seed=8))
    batch = lm.samples("All:", num_samples=4, length=30, seed=3)
    assert batch == lm.samples("All:", num_samples=4, length=30, seed=3)

    def cli() -> str:
        result = CliRunner().invoke(app, ["sample", "--checkpoint", str(run_on_device), "--device", DEVICE,
                                          "--length", "60", "--seed", "5"])
        assert result.exit_code == 0, result.output
        return result.stdout

    assert cli() == cli()


def _torchrun(*args: str, nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run([*launcher, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=150)


# A world of one: joins the process group charlm would (NCCL for CUDA tensors) and reduces a tensor on
# the device. charlm itself joins no group when WORLD_SIZE is 1, so on one GPU this is the NCCL check.
_COLLECTIVE = """
import os, sys, torch, torch.distributed as dist
from charlm.training.distributed import backend_for
device = torch.device(sys.argv[1], int(os.environ["LOCAL_RANK"])) if sys.argv[1] == "cuda" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group(backend=backend_for(device.type == "cuda"))
x = torch.full((4,), 1.0 + dist.get_rank(), device=device)
dist.all_reduce(x)
print("backend", dist.get_backend(), "sum", float(x[0]), flush=True)
dist.destroy_process_group()
"""


def test_torchrun_trains_and_writes_one_checkpoint(tmp_path):
    pytest.importorskip("torch.distributed.run", reason="this torch has no torchrun")
    if not torch.distributed.is_available():
        pytest.skip("this torch was built without torch.distributed")
    (tmp_path / "collective.py").write_text(_COLLECTIVE, encoding="utf-8")
    group = _torchrun("collective.py", DEVICE, nproc=1, cwd=tmp_path)
    assert group.returncode == 0, group.stderr[-3000:]
    assert ("nccl" if DEVICE == "cuda" else "gloo") in group.stdout and "sum 1.0" in group.stdout
    # Two ranks need two GPUs (NCCL refuses two ranks on one); on one GPU a world of one trains.
    nproc = 2 if DEVICE == "cuda" and torch.cuda.device_count() >= 2 else 1
    corpus = _corpus(tmp_path)
    done = _torchrun("-m", "charlm", "train", str(corpus), "--out", "run", "--max-steps", "8", "--batch-size", "4",
                     "--seq-len", "16", "--hidden-size", "32", "--embed-size", "16", "--eval-every", "4",
                     "--log-every", "1", "--sample-length", "0", "--device", DEVICE, nproc=nproc, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]
    assert sorted(p.name for p in (tmp_path / "run").glob("*.safetensors") if ".optim." not in p.name) == [
        "best.safetensors", "last.safetensors"]
    assert done.stdout.count("best val loss") == 1
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["device"].startswith(DEVICE)
    assert len(_losses(tmp_path / "run")) == 8


def test_a_captured_step_gives_the_eager_steps_tokens(run_on_device, monkeypatch):
    """FastStep replays one captured CUDA graph a token; its samples are the eager steps', token for
    token, for the same seed (and a capture that fails falls back to eager steps)."""
    from charlm.infer import step as infer

    lm = charlm.load(run_on_device, device=DEVICE)
    options = dict(num_samples=3, length=60, temperature=0.9, seed=11)
    graphed = lm.samples("First", **options)
    fast = FastStep(lm.model)
    fast.reset(2)
    if DEVICE == "cuda":
        assert fast.graph is not None
    monkeypatch.setattr(infer.FastStep, "__init__", _eager_init(infer.FastStep.__init__))
    assert lm.samples("First", **options) == graphed
    tokens = torch.randint(0, lm.model.cfg.vocab_size, (20, 2), device=DEVICE)
    eager = FastStep(lm.model, graphed=False)
    eager.reset(2)
    fast.reset(2)
    for token in tokens:
        torch.testing.assert_close(fast.step(token).clone(), eager.step(token).clone(), atol=0, rtol=0)


def _eager_init(init):
    def eager(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "graphed": False})
    return eager


def test_layer_by_layer_on_the_device_raises_no_weight_copy_warning():
    """Each layer's weights in a cuDNN buffer of their own; a weight-dropped layer as one chunk."""
    import warnings

    device = torch.device(DEVICE)
    for cell in ("lstm", "gru"):
        model = RNNLM(ModelConfig(vocab_size=20, cell=cell, hidden_size=32, embed_size=16, num_layers=3,
                                  dropout=0.2, weight_drop=0.3)).to(device)
        x = torch.randint(0, 20, (4, 10), device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # cuDNN's "not part of single contiguous chunk" is a UserWarning
            model.train()
            logits, _ = model(x)
            logits.sum().backward()
            model.eval()
            with torch.no_grad():
                state = model.init_state(4)
                model(x[:2], tuple(s[:, :2] for s in state) if cell == "lstm" else state[:, :2])
