"""What the first GPU run needs, shown on the CPU: states that cuDNN accepts, a layer at a time
without weight copies, each rank's own generators on resume, fp16 loss scaling past a bad step."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import charlm
import contiguity
from charlm.config import ModelConfig, TrainConfig
from charlm.data.text import prepare_data
from charlm.infer.evaluate import evaluate
from charlm.infer.step import FastStep
from charlm.model.lm import RNNLM
from charlm.model.precision import Precision
from conftest import TINY_TEXT


@pytest.fixture
def kernels_seen(monkeypatch):
    seen: list[str] = []
    contiguity.install(monkeypatch, seen)
    return seen


@pytest.mark.parametrize("cell", ["lstm", *(pytest.param(c, marks=pytest.mark.slow) for c in ("gru", "rnn", "peephole"))])
def test_every_state_handed_to_a_recurrent_kernel_is_contiguous(cell, kernels_seen, tmp_path, tiny_corpus, one_thread):
    """Training, an evaluation whose text leaves a remainder after the streams, resume, perplexity,
    score, sampling and FastStep's prime: cuDNN refuses a strided state where the CPU kernels take it."""
    tiny = dict(cell=cell, num_layers=2, hidden_size=16, embed_size=8, seq_len=8, batch_size=3, device="cpu",
                precision="fp32", dropout=0.0, eval_every=2, cache=False)
    run = charlm.train(tiny_corpus, out=tmp_path / "run", max_steps=4, **tiny)
    charlm.train(tiny_corpus, resume=run.run_dir, max_steps=6)
    lm = charlm.load(run.run_dir)
    text = TINY_TEXT[:999]
    lm.perplexity(text, cache=False)
    lm.score(["First Citizen:", "All:"])
    lm.samples("First", num_samples=3, length=10, seed=1)
    ids = lm.tokenizer.encode(text)
    assert (len(ids) - 1) % 4 != 0  # a remainder continues the last stream
    evaluate(lm.model, ids, num_streams=4)
    fast = FastStep(lm.model)
    _, state = lm.model(torch.as_tensor(ids[:20][None], dtype=torch.long))
    fast.reset(1, tuple(s[:, :1] for s in state) if isinstance(state, tuple) else state[:, :1])
    assert kernels_seen, "no recurrent kernel was seen: the wrappers are not in the path"
    assert not [s for s in kernels_seen if "strided" in s], sorted(set(kernels_seen))


def test_a_sliced_state_reaches_the_kernel_contiguous(kernels_seen):
    """The library's own callers aside, a user's slice of some streams' state is made contiguous."""
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=9, hidden_size=8, embed_size=4, num_layers=3)).eval()
    h = torch.randn(3, 5, 8)
    sliced = (h[:, 1:3], h[:, 2:4])
    assert not sliced[0].is_contiguous()
    expected, _ = model(torch.zeros(2, 4, dtype=torch.long), tuple(s.contiguous() for s in sliced))
    got, _ = model(torch.zeros(2, 4, dtype=torch.long), sliced)
    torch.testing.assert_close(got, expected)
    assert kernels_seen and not [s for s in kernels_seen if "strided" in s]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_a_layer_at_a_time_equals_one_call_in_logits_and_gradients(cell, num_layers):
    """On CUDA a stack runs a layer at a time (each layer's weights in a cuDNN buffer of its own):
    the same logits and gradients as nn.LSTM's one call over all layers, state included."""
    torch.manual_seed(1)
    model = RNNLM(ModelConfig(vocab_size=11, cell=cell, hidden_size=12, embed_size=6, num_layers=num_layers)).eval()
    x = torch.randint(0, 11, (4, 9))
    h = torch.randn(num_layers, 4, 12)
    state = (h, torch.randn_like(h)) if cell == "lstm" else h

    def run(by_layer: bool):
        model.zero_grad()
        emb = model.embedding(x)
        out, final = model._layer_by_layer(emb, state) if by_layer else model.rnn(emb, state)
        logits = model.head(out)
        parts = final if isinstance(final, tuple) else (final,)
        (logits.square().sum() + sum(p.sum() for p in parts)).backward()
        return logits.detach(), [p.detach() for p in parts], [p.grad.clone() for p in model.parameters()]

    (a, sa, ga), (b, sb, gb) = run(True), run(False)
    torch.testing.assert_close(a, b)
    for one, other in zip(sa, sb):
        torch.testing.assert_close(one, other)
    for one, other in zip(ga, gb):
        torch.testing.assert_close(one, other, atol=1e-5, rtol=1e-4)


def test_a_dropped_out_layer_is_handed_over_as_one_chunk():
    """With weight drop, the layer's weights go to the kernel as views of one new buffer, in order
    (what cuDNN takes without its copy), and their gradients reach the stored weights."""
    from charlm.model.lm import _one_chunk

    weights = [torch.randn(8, 3, requires_grad=True), torch.randn(8, 2, requires_grad=True),
               torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)]
    dropped = [weights[0], weights[1] * 2, weights[2], weights[3]]
    chunk = _one_chunk(dropped, fresh=True)
    base = chunk[0].untyped_storage().data_ptr()
    assert chunk[0].data_ptr() == base and all(c.untyped_storage().data_ptr() == base for c in chunk)
    offsets = [c.data_ptr() - base for c in chunk]
    assert offsets == [0, 24 * 4, 40 * 4, 48 * 4]
    for c, w in zip(chunk, dropped):
        torch.testing.assert_close(c, w)
    sum(c.sum() for c in chunk).backward()
    assert torch.equal(weights[1].grad, torch.full((8, 2), 2.0))
    assert _one_chunk(weights, fresh=False) is weights


def test_on_a_cpu_the_weights_keep_nn_lstms_own_layout():
    model = RNNLM(ModelConfig(vocab_size=5, hidden_size=8, embed_size=4, num_layers=2))
    before = [p.data_ptr() for p in model.parameters()]
    model.to("cpu")
    model._cudnn_layers()
    assert [p.data_ptr() for p in model.parameters()] == before  # a no-op off CUDA


class _CpuFp16(Precision):
    """fp16 with the CPU's GradScaler: the scaler's bookkeeping, run where the CUDA one is not."""

    def autocast(self, device):
        return contextlib.nullcontext()


def test_an_fp16_run_skips_a_non_finite_loss_and_goes_on(tmp_path, monkeypatch):
    from charlm.training import loop as trainer_module

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda *a, **k: _CpuFp16("fp16", "test"))
    data = prepare_data(TINY_TEXT, val_fraction=0.1)
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=16, embed_size=8)
    train_cfg = TrainConfig(seq_len=8, batch_size=4, lr=1e-2, max_steps=8, eval_every=4, warmup_steps=1,
                            log_every=1, device="cpu", max_bad_steps=3)
    real_ce = torch.nn.functional.cross_entropy
    calls = []

    def poisoned(*args, **kwargs):
        out = real_ce(*args, **kwargs)
        if kwargs.get("reduction") != "sum":
            calls.append(1)
            if len(calls) == 3:
                return out * float("nan")
        return out

    monkeypatch.setattr("charlm.training.step.F.cross_entropy", poisoned)
    result = trainer_module.train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path)
    assert result.step == 8
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["consecutive"] for e in events if e["event"] == "bad_step"] == [1]
    assert sum(e["event"] == "step" for e in events) == 7


def test_each_ranks_cuda_generator_is_saved_and_restored(monkeypatch):
    """A distributed GPU run keeps every rank's CUDA generator, so each draws its own dropout masks
    after a resume (rank 0's alone made every GPU draw the same). Shown with a stand-in CUDA RNG."""
    from charlm.training import resume_state
    from charlm.training.distributed import Dist

    model = RNNLM(ModelConfig(vocab_size=5, hidden_size=4, embed_size=4))
    optimizer = torch.optim.AdamW(model.parameters())
    cpu = torch.get_rng_state()
    cuda = torch.stack([torch.full((16,), 10, dtype=torch.uint8), torch.full((16,), 20, dtype=torch.uint8)])
    tensors = resume_state.resume_tensors(optimizer, model, None, torch.stack([cpu, cpu]), cuda_rng_states=cuda)
    assert torch.equal(tensors["rng.cuda.ranks"], cuda) and torch.equal(tensors["rng.cuda"], cuda[0])
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, *a: restored.append(state))

    resume_state.restore_resume_tensors(optimizer, model, tensors, torch.device("cuda"), Dist(rank=1, world_size=2), "adamw")
    assert len(restored) == 1 and torch.equal(restored[0], cuda[1])
    bad = {**tensors, "rng.cuda.ranks": torch.zeros(2, 3, dtype=torch.uint8)}
    with pytest.raises(charlm.errors.CheckpointError, match="CUDA RNG states of the ranks"):
        resume_state.check_optim_tensors(Path("x"), bad, model.cfg, 4)


def test_tf32_is_on_in_a_cuda_run_unless_refused_and_the_settings_come_back():
    from charlm.model.precision import tf32_region

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with tf32_region(torch.device("cuda"), True):  # only the process's settings: no GPU is touched
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    with tf32_region(torch.device("cuda"), False):
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    with tf32_region(torch.device("cpu"), True):
        assert torch.get_float32_matmul_precision() == before[0]


def test_no_tf32_is_an_option_kept_in_the_run_and_adjustable_on_resume(tmp_path, tiny_corpus):
    from charlm.model.checkpoint import load_checkpoint

    tiny = dict(hidden_size=8, embed_size=4, seq_len=8, batch_size=2, device="cpu", cache=False)
    run = charlm.train(tiny_corpus, out=tmp_path / "run", max_steps=2, tf32=False, **tiny)
    assert load_checkpoint(run.run_dir / "last.safetensors").train_config.tf32 is False
    charlm.train(tiny_corpus, resume=run.run_dir, max_steps=3, tf32=True)
    assert load_checkpoint(run.run_dir / "last.safetensors").train_config.tf32 is True
    with pytest.raises(charlm.errors.ConfigError, match="tf32 must be True or False"):
        charlm.train(tiny_corpus, out=tmp_path / "bad", max_steps=2, tf32="yes", **tiny)


@pytest.mark.parametrize("options", [dict(temperature=0.8), dict(temperature=1.0, top_k=5),
                                     dict(temperature=0.7, top_p=0.9), dict(temperature=0.0)],
                         ids=["t0.8", "top-k", "top-p", "argmax"])
def test_tokens_drawn_ahead_on_the_device_are_the_ones_drawn_a_step_at_a_time(trained_run, monkeypatch, options):
    """On a GPU a sample no stop string reads is drawn in blocks, read back once a block: the same
    text, token for token, as reading every token (shown on the CPU by letting it take that path)."""
    from charlm.infer import sample as sample_module

    lm = charlm.load(trained_run)
    args = dict(num_samples=3, length=50, seed=5, **options)
    stepwise = lm.samples("First", **args)
    blocks = []
    real = sample_module._drawn_ahead
    monkeypatch.setattr(sample_module, "DRAW_AHEAD_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(sample_module, "DRAW_AHEAD", 7)  # 50 = 7 × 7 + 1: a short last block
    monkeypatch.setattr(sample_module, "_drawn_ahead", lambda run, fast: blocks.append(1) or real(run, fast))
    assert lm.samples("First", **args) == stepwise and blocks
    blocks.clear()
    with_stop = lm.samples("First", stop="e", **args)  # a stop string reads every token as it comes
    assert not blocks and all("e" not in text for text in with_stop)


def test_drawing_on_the_device_agrees_with_next_token_and_flags_what_it_refuses():
    from charlm.errors import SamplingError
    from charlm.infer.sample import draw_on_device, next_token

    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [float("inf"), 0.0, float("inf"), 1.0], [3e38, -3e38, 1.0, 2.0]])
    for temperature in (1.0, 0.5, 1e-30, 0.0):
        for top_k, top_p in ((None, None), (2, None), (None, 0.5)):
            a = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=torch.Generator().manual_seed(1))
            b, flags = draw_on_device(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                      generator=torch.Generator().manual_seed(1))
            assert torch.equal(a, b) and flags.tolist() == [False, False], (temperature, top_k, top_p)
    nan = torch.tensor([[0.0, float("nan")], [0.0, 1.0]])
    with pytest.raises(SamplingError):
        next_token(nan, temperature=1.0)
    assert draw_on_device(nan, temperature=1.0, top_k=None, top_p=None,
                          generator=torch.Generator())[1].tolist() == [True, False]
    none = torch.full((1, 3), float("-inf"))
    assert draw_on_device(none, temperature=0.5, top_k=None, top_p=None,
                          generator=torch.Generator())[1].tolist() == [False, True]


def test_a_nan_model_drawn_ahead_stops_with_the_same_error(trained_run, monkeypatch):
    from charlm.infer import sample as sample_module
    from charlm.errors import SamplingError

    lm = charlm.load(trained_run)
    with torch.no_grad():
        lm.model.head.bias.fill_(float("nan"))
    monkeypatch.setattr(sample_module, "DRAW_AHEAD_DEVICES", frozenset({"cpu"}))
    with pytest.raises(SamplingError, match="scores are NaN"):
        lm.samples("First", num_samples=2, length=20, seed=1)
