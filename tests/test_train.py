import json
import math

import numpy as np
import pytest
import torch

from charlm.model.checkpoint import load_checkpoint
from charlm.config import ModelConfig, TrainConfig
from charlm.errors import ConfigError, TrainingError
from charlm.data.text import prepare_data
from charlm.training.loop import train
from charlm.training.optim import lr_at
from charlm.training.resume import resume_configs
from charlm.training.resume_state import load_resume
from charlm.training.rundir import new_run_dir


def test_lr_schedule_warms_up_then_decays():
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def _configs(data, **train_kwargs):
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=24, embed_size=12, num_layers=2,
                            dropout=0.1)
    kwargs = dict(seq_len=16, batch_size=4, lr=1e-2, warmup_steps=3, eval_every=10, device="cpu", log_every=1)
    kwargs.update(train_kwargs)
    return model_cfg, TrainConfig(**kwargs)


def _losses(run_dir):
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


def test_training_writes_checkpoints_and_metrics_and_the_loss_falls(tmp_path, tiny_text):
    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_steps=80, lr=3e-2)
    result = train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path)
    assert result.step == 80 and result.stopped_by == "done"
    assert {p.name for p in tmp_path.glob("*.safetensors")} >= {"best.safetensors", "last.safetensors"}
    losses = _losses(tmp_path)
    assert np.mean([losses[s] for s in range(76, 81)]) < losses[1] - 0.8
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert best.train_state["best_val_loss"] == pytest.approx(result.best_val_loss)


@pytest.mark.parametrize("optimizer, regularised, average, shifted", [
    ("adamw", False, False, False), ("adamw", True, False, False), ("sgd", True, False, False),
    ("adagrad", False, False, False), ("rmsprop", False, False, False), ("adamw", False, True, False),
    ("sgd", True, True, True)])
def test_resume_is_exact_on_cpu(tmp_path, tiny_text, optimizer, regularised, average, shifted):
    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_steps=30, optimizer=optimizer,
                                    lr={"sgd": 1.0, "adagrad": 0.1}.get(optimizer, 1e-2), average=average,
                                    shift_windows=shifted,
                                    **(dict(activation_reg=1.0, temporal_reg=1.0) if regularised else {}))
    if regularised:  # every random mask (embedding, variational, DropConnect) must come back on resume
        model_cfg = model_cfg.replace(input_dropout=0.3, embed_dropout=0.1, weight_drop=0.3)
    full = tmp_path / "full"
    train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=full)

    part = tmp_path / "part"
    calls = {"n": 0}

    def stop_after_13():
        calls["n"] += 1
        return "SIGINT" if calls["n"] == 13 else None

    first = train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=part, should_stop=stop_after_13)
    assert first.stopped_by == "interrupt" and first.step == 13
    res = load_resume(part)
    m2, t2 = resume_configs(res, {"max_steps": None})
    train(model_config=m2, train_config=t2, data=data, run_dir=part, resume=res)
    full_losses, part_losses = _losses(full), _losses(part)
    assert all(full_losses[s] == part_losses[s] for s in range(14, 31))  # exact equality, every later step
    for name in ("last.safetensors", "best.safetensors"):  # the average too, with --average
        a = load_checkpoint(full / name).model.state_dict()
        b = load_checkpoint(part / name).model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(part.glob("*.optim.safetensors"))) == 1


@pytest.mark.parametrize("shifted", [False, True])
def test_shift_windows_starts_each_epoch_at_its_own_offset(tmp_path, tiny_text, monkeypatch, shifted):
    from charlm.training import streams as streams_module
    from charlm.data.text import batchify, epoch_offset, num_windows, shifted_windows

    data = prepare_data(tiny_text[:2000], val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, epochs=3, seq_len=16, shift_windows=shifted, eval_every=1000)
    seen = []
    real_window = streams_module.window

    def recording_window(streams, index, seq_len, rows=slice(None), offset=0):
        x, y = real_window(streams, index, seq_len, rows, offset=offset)
        seen.append((index, offset, x.shape[1]))
        return x, y

    monkeypatch.setattr(streams_module, "window", recording_window)
    result = train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path)
    length = batchify(data.train_ids, 4).shape[1]
    count, largest = shifted_windows(length, 16) if shifted else (num_windows(length, 16), 0)
    assert result.step == 3 * count and len(seen) == 3 * count
    offsets = [epoch_offset(train_cfg.seed, epoch, largest) for epoch in range(3)]
    assert [offset for _, offset, _ in seen] == [o for o in offsets for _ in range(count)]
    assert [index for index, _, _ in seen] == list(range(count)) * 3
    if shifted:
        assert all(t == 16 for _, _, t in seen) and len(set(offsets)) > 1  # full windows, moving boundaries
    else:
        assert offsets == [0, 0, 0]


def test_streams_held_on_the_device_train_exactly_as_host_windows(tmp_path, tiny_text, monkeypatch):
    """On a GPU the streams are copied there once and windows are cut from them; shown on the CPU
    by making it take that path: the same losses, step for step, with shifted windows too."""
    from charlm.training import memory, streams

    data = prepare_data(tiny_text[:3000], val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, epochs=2, shift_windows=True, eval_every=1000)
    host = train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path / "host")
    held, real = [], memory.streams_on_device

    def on_device(streams, device):
        held.append(torch.from_numpy(np.ascontiguousarray(streams, dtype=np.int32)))
        return held[-1]

    monkeypatch.setattr(streams, "streams_on_device", on_device)
    dev = train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path / "device")
    assert len(held) == 1 and held[0].shape == (4, len(data.train_ids) // 4)
    assert dev.step == host.step and _losses(tmp_path / "device") == _losses(tmp_path / "host")
    assert real(np.zeros((4, 10), np.uint16), torch.device("cpu")) is None  # already there
    monkeypatch.setattr(memory, "DEVICE_STREAMS_BYTES", 400)  # 100 ids in int32
    assert real(np.zeros((4, 26), np.uint16), torch.device("meta")) is None  # too big
    assert real(np.zeros((4, 25), np.uint16), torch.device("meta")).dtype == torch.int32


def test_resume_rejects_a_conflicting_shape(tmp_path, tiny_text):
    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_steps=5)
    train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path)
    res = load_resume(tmp_path)
    with pytest.raises(ConfigError, match="--hidden-size 64 conflicts"):
        resume_configs(res, {"hidden_size": 64})
    _, cfg = resume_configs(res, {"max_steps": 50, "hidden_size": 24})
    assert cfg.max_steps == 50


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_non_finite_steps_are_skipped_then_stop(tmp_path, tiny_text, monkeypatch, on_device):
    """A step whose loss or gradients are NaN/Inf is skipped, the run stops after --max-bad-steps
    in a row, and the last good checkpoint stays intact. On a GPU the skip happens in the fused
    optimizer (found_inf) and the run of bad steps is read when the run logs (every step here):
    shown on the CPU by making it take that path."""
    from charlm.training import loop as trainer_module

    if on_device:
        monkeypatch.setattr(trainer_module, "keeps_steps_on_device", lambda device, dist, cfg: True)
    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_steps=30, max_bad_steps=3, eval_every=5)
    real_ce = torch.nn.functional.cross_entropy
    calls = []

    def poisoned(*args, **kwargs):
        out = real_ce(*args, **kwargs)
        if kwargs.get("reduction") != "sum":  # training loss only
            calls.append(1)
            if len(calls) == 3 or len(calls) >= 12:
                return out * float("nan")
        return out

    monkeypatch.setattr("charlm.training.step.F.cross_entropy", poisoned)
    with pytest.raises(TrainingError, match="NaN/Inf for 3 steps"):
        train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["consecutive"] for e in events if e["event"] == "bad_step"] == [1, 1, 2, 3]
    assert all(math.isfinite(e["loss"]) for e in events if e["event"] == "step")
    last = load_checkpoint(tmp_path / "last.safetensors")
    assert last.train_state["step"] == 10
    assert all(torch.isfinite(p).all() for p in last.model.parameters())


@pytest.mark.parametrize("log_every", [1, 4])
def test_steps_kept_on_the_device_log_what_host_steps_log(tmp_path, tiny_text, monkeypatch, log_every):
    """On a GPU a step leaves its loss and the skip of a bad step on the device, read when the run
    logs (no wait per step). Shown on the CPU by making it take that path: the logged losses are
    the host path's (fused AdamW against the plain one: rounding apart)."""
    from charlm.training import loop as trainer_module

    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_steps=24, log_every=log_every)
    train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path / "host")
    monkeypatch.setattr(trainer_module, "keeps_steps_on_device", lambda device, dist, cfg: True)
    train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path / "device")
    host, device = _losses(tmp_path / "host"), _losses(tmp_path / "device")
    assert host.keys() == device.keys() == set(range(log_every, 25, log_every))
    assert np.allclose([device[k] for k in host], [host[k] for k in host], atol=1e-4, rtol=0)


def test_early_stopping_on_patience(tmp_path, tiny_text):
    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_steps=400, lr=0.5, eval_every=2, patience=2, clip=0)
    result = train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path)
    assert result.stopped_by == "early-stop" and result.step < 400


def test_time_budget_stops(tmp_path, tiny_text):
    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_minutes=0.05, eval_every=None)
    result = train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path)
    assert result.stopped_by == "time" and result.elapsed_seconds < 3 + 5
    assert math.isfinite(result.best_val_loss)


def test_new_run_dir_never_reuses_a_run(tmp_path):
    assert new_run_dir(tmp_path, "x") == tmp_path / "x"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "best.safetensors").write_bytes(b"")
    assert new_run_dir(tmp_path, "x") == tmp_path / "x-2"


def test_an_optimizer_file_of_another_optimizer_is_refused(tmp_path, tiny_text):
    from charlm.errors import CheckpointError
    from charlm.training.resume_state import check_optim_tensors

    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_steps=3)
    train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path / "r")
    res = load_resume(tmp_path / "r")
    for other in ("sgd", "adagrad", "rmsprop"):
        with pytest.raises(CheckpointError, match="damaged"):
            check_optim_tensors(tmp_path / "x", res.optim_tensors, model_cfg, 4, 3, other)


def test_evaluation_under_a_budget_is_frequent_but_bounded(tmp_path, tiny_text):
    data = prepare_data(tiny_text * 3, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_minutes=0.15, eval_every=None, log_every=10)
    result = train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path / "r")
    events = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    end = [e for e in events if e["event"] == "end"][-1]
    assert len(evals) >= 5  # a twentieth of 9 s when evaluating is cheap: several, not 3
    assert end["eval_seconds"] == pytest.approx(sum(e["eval_seconds"] for e in evals))
    assert result.eval_seconds == pytest.approx(end["eval_seconds"])
    assert end["eval_seconds"] <= 0.25 * end["elapsed"]  # bounded (loosely: a loaded machine is noisy)


def test_cpu_training_keeps_freed_memory_in_the_heap(monkeypatch):
    """memory.keep_freed_memory: glibc takes the mallopt options (Linux); elsewhere it is a no-op."""
    import platform

    from charlm.training import memory

    memory.keep_freed_memory.cache_clear()
    try:
        assert memory.keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
        monkeypatch.setattr(memory.platform, "system", lambda: "Darwin")
        memory.keep_freed_memory.cache_clear()
        assert memory.keep_freed_memory() is False
    finally:
        memory.keep_freed_memory.cache_clear()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_fused_cpu_optimizer_steps_as_the_multi_tensor_one(optimizer):
    """The fused kernels make_optimizer takes on a CPU where they measured faster: ten steps of them
    equal PyTorch's default multi-tensor form (with weight decay on the matrices, none on the
    vectors) to float32 rounding."""
    from charlm.model.lm import RNNLM
    from charlm.training.optim import make_optimizer

    cfg = TrainConfig(optimizer=optimizer, lr=1e-2 if optimizer == "adamw" else 1.0, weight_decay=0.1)
    trained = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = RNNLM(ModelConfig(vocab_size=11, hidden_size=16, embed_size=8))
        initial = [p.detach().clone() for p in model.parameters()]
        opt = make_optimizer(model, cfg, torch.device("cpu"), fused=fused)
        assert bool(opt.defaults["fused"]) is fused
        grads = torch.Generator().manual_seed(1)
        for _ in range(10):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        assert all((p - q).abs().max() > 1e-3 for p, q in zip(model.parameters(), initial))
        trained.append(list(model.parameters()))
    for fused, reference in zip(*trained):
        assert torch.allclose(fused, reference, atol=1e-6, rtol=1e-5)
