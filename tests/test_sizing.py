"""One sizing rule from measured speed (sizing.py): the tuned size for the budget, moved along a
ladder by what this machine measures. Checked against the speeds of the CPU kinds it was
calibrated on and a GPU's, with injected speeds: no assertion depends on a timing. The speed probe
(speed.py) is checked to take the trainer's own step."""
from __future__ import annotations

import json

import pytest
import torch

import charlm
from charlm.config import ModelConfig, TrainConfig
from charlm.data.text import batchify, prepare_data, window
from charlm.model.checkpoint import load_checkpoint
from charlm.model.lm import RNNLM
from charlm.model.precision import FP32
from charlm.training import speed
from charlm.training.loop import train
from charlm.training.sizing import CPU_LADDER, GPU_LADDER, Shape, dropout_for, size_by_speed
from charlm.training.speed import time_train_steps

SHAKESPEARE = 1_003_854  # tiny-shakespeare's training tokens


def _sized(rates: dict[int, float], minutes: float, start: int | None, *, gpu: bool = False,
           tokens: int = SHAKESPEARE, precision: str = "fp32"):
    asked: list[str] = []

    def speed(shape: Shape) -> float:
        asked.append(shape.name)
        return rates[shape.hidden_size]

    return size_by_speed(train_tokens=tokens, minutes=minutes, cell="lstm", gpu=gpu, precision=precision,
                         speed=speed, start=start), asked


def test_a_slow_cpu_steps_down_to_a_model_that_gets_enough_passes():
    """AVX2 only, fp32, 3 minutes: the tuned 1×512 at 6.0k tokens/s gets ~1.1 epochs and 0.8
    tokens per weight (1.548 measured); 1×384 1.8 epochs (1.537, the best of three sizes tried)."""
    sized, asked = _sized({256: 16_000, 384: 10_000, 512: 6_000, 768: 3_000}, 3, start=512)
    assert sized.shape.hidden_size == 384 and asked == ["1x512", "1x384"]
    assert sized.expected_epochs == pytest.approx(180 * 10_000 / SHAKESPEARE)
    assert sized.dropout == 0.0 and not sized.shift_windows
    assert "1×512 would get 1.1 epochs" in sized.reason and "measured 10.0k tokens/s (fp32)" in sized.reason


def test_the_bf16_cpus_keep_the_sizes_they_were_tuned_to():
    # An AMD EPYC with AVX-512 BF16: 3 minutes 1×768 (~2.4 epochs) beat 1×512; 10 minutes 1×1024 (~5).
    epyc = {256: 40_000, 384: 34_000, 512: 28_000, 768: 13_500, 1024: 8_000, 1536: 3_500}
    assert _sized(epyc, 3, start=768)[0].shape.hidden_size == 768
    assert _sized(epyc, 10, start=1024)[0].shape.hidden_size == 1024
    # An Intel Xeon with AMX: 3 minutes 1×768 (~3.5 epochs, 1.417; 1×1024 reached 1.521); 10 minutes
    # 1×1024 would get ~9 epochs, so 1×1536 at ~5 with dropout 0.25 (1.3980).
    amx = {256: 60_000, 384: 45_000, 512: 35_000, 768: 19_300, 1024: 14_700, 1536: 8_400}
    three, asked = _sized(amx, 3, start=768, precision="bf16")
    assert (three.shape.hidden_size, three.dropout, asked) == (768, 0.2, ["1x768"])
    ten, asked = _sized(amx, 10, start=1024, precision="bf16")
    assert (ten.shape.hidden_size, ten.dropout, ten.input_dropout) == (1536, 0.25, 0.125)
    assert asked == ["1x1024", "1x1536"] and ten.shift_windows and "1×1024 would get 8.8 epochs" in ten.reason


def test_a_small_corpus_keeps_the_smallest_shape_and_regularises_by_epochs():
    sized, asked = _sized({256: 20_000}, 10, start=768, tokens=50_000)
    assert sized.shape == CPU_LADDER[0] and asked == ["1x256"]
    assert sized.expected_epochs == pytest.approx(240) and sized.dropout == 0.5


def test_the_data_caps_the_size_before_anything_is_timed():
    sized, asked = _sized({h: 1e9 for h in (256, 384, 512, 768, 1024, 1536)}, 10, start=1536, tokens=300_000)
    assert sized.shape.hidden_size == 768 and asked == ["1x768"]  # 1×1024 needs ~0.42M tokens


def test_a_gpu_sizes_by_the_same_rule_with_a_wide_batch():
    sized, asked = _sized({512: 900_000, 768: 700_000, 1024: 500_000, 1536: 300_000, 2048: 200_000}, 3,
                          start=1024, gpu=True)
    assert sized.shape.batch_size >= 128 and sized.shape.num_layers >= 2
    assert sized.shape == GPU_LADDER[1]  # 2×768: the largest tiny-shakespeare's 1.0M tokens feed
    assert sized.dropout == 0.5 and sized.expected_epochs > 100  # ~125 epochs: the most dropout
    # A corpus too large to pass over twice stays where the budget still trains a token per weight.
    big, _ = _sized({h: 500_000 for h in (512, 768, 1024, 1536, 2048)}, 3, start=1024, gpu=True,
                    tokens=100_000_000)
    assert big.shape == GPU_LADDER[3] and big.expected_epochs < 1


def test_a_large_corpus_on_a_cpu_grows_with_the_budget_not_the_epochs():
    rates = {256: 16_000, 384: 10_000, 512: 6_000, 768: 3_000, 1024: 2_000, 1536: 900}
    three, _ = _sized(rates, 3, start=512, tokens=50_000_000)
    sixty, _ = _sized(rates, 60, start=1024, tokens=50_000_000)
    assert three.shape.hidden_size == 384 and sixty.shape.hidden_size == 1024


def test_measuring_stops_at_its_share_of_the_budget():
    now = [0.0]

    def speed(shape: Shape) -> float:
        now[0] += 10.0  # each measurement takes 10 s of a 3-minute budget
        return 100.0  # far too slow: every rung would step down

    sized = size_by_speed(train_tokens=SHAKESPEARE, minutes=3, cell="lstm", gpu=False, precision="fp32",
                          speed=speed, start=768, clock=lambda: now[0])
    assert len(sized.measured) == 1 and sized.shape.hidden_size == 768


def test_a_shape_that_leaves_the_device_no_room_is_not_tried():
    asked = []
    sized = size_by_speed(train_tokens=100_000_000, minutes=60, cell="lstm", gpu=True, precision="bf16",
                          speed=lambda shape: asked.append(shape.name) or 1e6, start=1024,
                          fits=lambda shape: shape.hidden_size <= 768)
    assert sized.shape == GPU_LADDER[2] and "3x1024" not in asked


def test_dropout_follows_the_epochs_and_the_data_per_weight():
    assert [dropout_for(e, 1.0) for e in (1, 3, 6, 8, 20, 50)] == [0.0, 0.2, 0.25, 0.3, 0.4, 0.5]
    assert dropout_for(5, 0.1) == 0.25 and dropout_for(2, 0.1) == 0.0


def test_a_planned_run_records_what_was_measured_and_why(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.setattr(speed, "measure_train_rate", lambda config, **shape: 1234.0)
    events, notes = [], []
    charlm.train(tiny_corpus, out=tmp_path / "run", max_minutes=0.02, cache=False, on_event=events.append,
                 on_note=notes.append, device="cpu")
    start = events[0]
    assert start["sizing"]["measured_tokens_per_second"] == {"1x256": 1234.0}
    assert start["sizing"]["shape"]["hidden_size"] == start["model_config"]["hidden_size"] == 256
    line = [n for n in notes if n.startswith("sized for this machine")]
    assert len(line) == 1 and "\n" not in line[0] and "1.2k tokens/s" in line[0]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["sizing"] == start["sizing"]


@pytest.mark.parametrize("optimizer, regularised", [("adamw", False), ("sgd", True)])
def test_the_speed_probe_takes_the_trainers_own_step(tmp_path, tiny_text, optimizer, regularised):
    """From the same weights on the same window, the probe's steps (speed.time_train_steps, which
    measure_train_rate times) and the trainer's first step give the same loss and the same weights
    after it, dropout and the regularisers included: the probe cannot drift from the real step."""
    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=24, embed_size=12, num_layers=2,
                            dropout=0.2, input_dropout=0.1, weight_drop=0.2 if regularised else 0.0)
    train_cfg = TrainConfig(seq_len=16, batch_size=4, lr=3e-2, optimizer=optimizer, max_steps=1, log_every=1,
                            warmup_steps=0, device="cpu", seed=7, clip=0.5,
                            **(dict(activation_reg=1.0, temporal_reg=1.0) if regularised else {}))
    train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained_loss = [e["loss"] for e in logged if e["event"] == "step"]
    trained = load_checkpoint(tmp_path / "last.safetensors").model.state_dict()

    torch.manual_seed(train_cfg.seed)  # as the trainer seeds before it builds the model
    model = RNNLM(model_cfg).train()
    x, y = window(batchify(data.train_ids, 4), 0, 16)  # the trainer's first window
    initial = {name: p.detach().clone() for name, p in model.state_dict().items()}
    _, losses = time_train_steps(model, torch.cat([x, y[:, -1:]], dim=1), precision=FP32, steps=1, config=train_cfg)
    assert losses == trained_loss
    probed = model.state_dict()
    assert all(torch.equal(probed[name], trained[name]) for name in trained)
    assert any(not torch.equal(probed[name], initial[name]) for name in initial)  # the step moved the weights
