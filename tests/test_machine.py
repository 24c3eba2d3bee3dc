"""Choices for speed made by measurement on the machine charlm runs on (machine.py): each answer is
measured once, kept per machine, and followed; none is taken from a CPU's name."""
from __future__ import annotations

import json

import pytest
import torch

from charlm import machine
from charlm.model import lstm_kernel
from charlm.infer import step as infer
from charlm.training import optim
from charlm.config import ModelConfig, TrainConfig
from charlm.infer.step import FastStep
from charlm.model.lm import RNNLM


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CHARLM_SIMULATE_NO_BF16", raising=False)
    machine.forget()
    yield tmp_path / "kernels.json"
    machine.forget()


def test_an_answer_is_measured_once_per_machine_and_kept(store):
    calls = []
    measure = lambda: calls.append(1) or {"a_ms": 1.0, "chosen": "a"}  # noqa: E731
    assert machine.remembered("s", "k", measure) == {"a_ms": 1.0, "chosen": "a"}
    machine.forget()  # a new process reads it back
    assert machine.remembered("s", "k", measure)["chosen"] == "a" and calls == [1]
    assert json.loads(store.read_text())[machine.machine_key()]["s"]["k"]["chosen"] == "a"
    machine.forget()  # a kept answer the caller cannot use is measured again
    assert machine.remembered("s", "k", lambda: {"chosen": "b"}, valid=lambda kept: kept["chosen"] == "b")["chosen"] == "b"
    assert machine.answers()["s"]["k"] == {"chosen": "b"}


def test_a_played_cpu_keeps_nothing_on_disk(store, monkeypatch):
    monkeypatch.setenv("CHARLM_SIMULATE_NO_BF16", "1")
    assert machine.remembered("s", "k", lambda: 3) == 3
    assert not store.exists()


def test_the_sampler_times_both_products_and_steps_with_the_faster(store, monkeypatch):
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=20, hidden_size=32, embed_size=8, num_layers=2)).eval()
    timed = infer.time_products(model, torch.float32, 2, rounds=1, steps=3)
    assert timed["prepacked_ms"] > 0 and timed["plain_ms"] > 0
    assert timed["chosen"] == ("prepacked" if timed["prepacked_ms"] < timed["plain_ms"] else "plain")
    for answer in (True, False):
        monkeypatch.setattr(infer, "faster_products", lambda *a, answer=answer: answer)
        fast = FastStep(model)
        fast.reset(2)
        assert bool(fast._products) is answer  # oneDNN's reordered weights only where they were faster
    monkeypatch.undo()
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(store.parent))
    monkeypatch.delenv("CHARLM_SIMULATE_NO_BF16", raising=False)  # a played CPU keeps nothing on disk
    chosen = infer.faster_products(model, torch.float32, 3)
    kept = machine.answers()["sampler products"]
    assert list(kept) == ["lstm 2x32 vocab 20 float32 batch 2-8"] and (kept[list(kept)[0]]["chosen"] == "prepacked") is chosen
    # Either way a step is the same arithmetic.
    a, b = FastStep(model, prepacked=True), FastStep(model, prepacked=False)
    a.reset(2)
    b.reset(2)
    tokens = torch.tensor([3, 4])
    torch.testing.assert_close(a.step(tokens), b.step(tokens), atol=1e-5, rtol=1e-5)


def test_the_bf16_layer_is_chosen_by_its_measured_time(store, monkeypatch, bf16_kernel):
    timed = lstm_kernel.time_bf16_layers(4, 8, 16, steps=5, rounds=1)
    assert timed["onednn_ms"] > 0 and timed["by_hand_ms"] > 0 and timed["chosen"] in ("by hand", "onednn")
    x = torch.zeros(4, 5, 8)
    monkeypatch.setattr(lstm_kernel, "HAND_WRITTEN_BF16_MIN_HIDDEN", 16)
    for answer in (True, False):
        monkeypatch.setattr(lstm_kernel, "faster_by_hand", lambda *a, answer=answer: answer)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lstm_kernel.trains_faster_by_hand(x, 16) is answer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lstm_kernel.trains_faster_by_hand(x, 8)  # below the width it was ever faster at: not timed


def test_the_optimizer_steps_fused_where_that_was_faster(store, monkeypatch):
    timed = optim.time_optimizers("adamw", rounds=1)
    assert timed["fused_ms"] > 0 and timed["foreach_ms"] > 0
    model = RNNLM(ModelConfig(vocab_size=5, hidden_size=4, embed_size=4))
    for answer in (True, False):
        monkeypatch.setattr(optim, "fused_is_faster", lambda kind, answer=answer: answer)
        for kind in ("adamw", "sgd"):
            optimizer = optim.make_optimizer(model, TrainConfig(optimizer=kind, lr=1e-2), torch.device("cpu"))
            assert bool(optimizer.defaults.get("fused")) is answer, kind


def test_bench_shows_each_choice_with_both_timings(store):
    from typer.testing import CliRunner

    from charlm.bench import BenchConfig, run_bench
    from charlm.cli import app

    tiny = dict(hidden_size=16, num_layers=1, embed_size=8, batch_size=2, seq_len=8, train_steps=20,
                sample_length=40, sample_streams=2, repeats=1, device="cpu", bf16=False)
    result = run_bench(BenchConfig(**tiny))
    assert result.bare_sample_chars_per_second_1 > 0
    assert {"sampler products", "fused optimizer"} <= set(result.choices)
    shown = CliRunner().invoke(app, ["bench", "--hidden-size", "16", "--num-layers", "1", "--embed-size", "8",
                                     "--batch-size", "2", "--seq-len", "8", "--steps", "20", "--repeats", "1",
                                     "--sample-streams", "2", "--no-bf16", "--device", "cpu"])
    assert shown.exit_code == 0, shown.output
    assert "chosen by measurement on this machine" in shown.output and "sampler products" in shown.output
    assert "bare nn.LSTM one-token loop" in shown.output


def test_bench_alternates_the_loops_it_compares():
    """A ratio of charlm to a bare loop is measured side by side: the two take turns each round."""
    calls = []
    a, b = machine.alternated(3, lambda: calls.append("a") or len(calls), lambda: calls.append("b") or 10.0)
    assert calls == ["a", "b"] * 3 and (a, b) == (3, 10.0)
