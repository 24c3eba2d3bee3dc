"""--average: the run evaluates and saves Σ t^P θ_t / Σ t^P of its weights, and resumes exactly."""
import json

import pytest
import torch

from charlm.training.averaging import WeightAverage
from charlm.model.checkpoint import load_checkpoint, load_tensors, save_tensors
from charlm.config import ModelConfig, TrainConfig
from charlm.training.autosize import auto_size
from charlm.data.text import prepare_data
from charlm.errors import CheckpointError, ConfigError
from charlm.infer.evaluate import evaluate
from charlm.training.plan import TrainOptions, plan_run
from charlm.training.loop import train
from charlm.training.resume_state import load_resume


@pytest.mark.parametrize("power", [0.0, 2.0, 7.5])
def test_the_average_is_the_power_weighted_mean_of_the_steps(power):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    average = WeightAverage(params, power)
    seen = []
    for step in range(1, 8):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        seen.append([p.detach().clone() for p in params])
        average.update(step)
    weights = torch.tensor([float(t) ** power for t in range(1, 8)], dtype=torch.float64)
    for i in range(len(params)):
        expected = sum(w * s[i].double() for w, s in zip(weights, seen)) / weights.sum()
        torch.testing.assert_close(average.tensors[i].double(), expected, rtol=1e-6, atol=1e-6)
    assert average.total == pytest.approx(float(weights.sum()))


def test_swapped_in_holds_the_average_and_gives_the_weights_back():
    params = [torch.nn.Parameter(torch.zeros(4))]
    average = WeightAverage(params, 1.0)
    with torch.no_grad():
        params[0].fill_(2.0)
    average.update(1)
    with torch.no_grad():
        params[0].fill_(5.0)
    average.update(2)  # (1 × 2 + 2 × 5) / 3 = 4
    with average.swapped_in():
        assert torch.equal(params[0].detach(), torch.full((4,), 4.0))
    assert torch.equal(params[0].detach(), torch.full((4,), 5.0))
    with pytest.raises(RuntimeError), average.swapped_in():
        raise RuntimeError("an evaluation that fails")
    assert torch.equal(params[0].detach(), torch.full((4,), 5.0))


def _configs(data, **train_kwargs):
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=24, embed_size=12, num_layers=1,
                            dropout=0.1)
    # A constant rate (no warm-up, no decay), so a run of k steps ends at the k-th weights of a longer one.
    kwargs = dict(seq_len=16, batch_size=4, lr=0.5, optimizer="sgd", warmup_steps=0, min_lr_ratio=1.0,
                  device="cpu", log_every=1)
    kwargs.update(train_kwargs)
    return model_cfg, TrainConfig(**kwargs)


def test_a_run_evaluates_and_saves_the_average_and_keeps_its_own_weights_to_go_on(tmp_path, tiny_text):
    data = prepare_data(tiny_text, val_fraction=0.1)
    steps = []
    for k in range(1, 5):  # the weights after each step, from plain runs of 1, 2, 3 and 4 steps
        model_cfg, train_cfg = _configs(data, max_steps=k)
        train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path / f"plain{k}")
        steps.append(load_checkpoint(tmp_path / f"plain{k}" / "last.safetensors").model.state_dict())

    model_cfg, train_cfg = _configs(data, max_steps=4, average=True, average_power=1.5)
    result = train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path / "avg")
    last = load_checkpoint(tmp_path / "avg" / "last.safetensors")
    weights = [t ** 1.5 for t in range(1, 5)]
    for name, value in last.model.state_dict().items():
        expected = sum(w * s[name] for w, s in zip(weights, steps)) / sum(weights)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    optim, _ = load_tensors(tmp_path / "avg" / last.train_state["optim_file"])
    for name, value in steps[-1].items():
        assert torch.equal(optim[f"raw.{name}"], value)  # the weights training goes on from
    # Every evaluation was of the average: the last one's loss is the saved weights' loss.
    events = [json.loads(line) for line in (tmp_path / "avg" / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in events if e["event"] == "eval"][-1]
    assert final["val_loss"] == pytest.approx(evaluate(last.model, data.val_ids).nats_per_token, abs=1e-6)
    assert result.best_val_loss == min(e["val_loss"] for e in events if e["event"] == "eval")
    assert last.train_config.average and last.train_state["average_total"] == pytest.approx(sum(weights))


def _averaged_run(tmp_path, tiny_text):
    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg, train_cfg = _configs(data, max_steps=3, average=True)
    train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path)
    return load_checkpoint(tmp_path / "last.safetensors")


def test_a_resume_file_without_the_training_weights_or_the_total_is_refused(tmp_path, tiny_text):
    last = _averaged_run(tmp_path, tiny_text)
    optim_path = tmp_path / last.train_state["optim_file"]
    tensors, metadata = load_tensors(optim_path)
    load_resume(tmp_path)  # intact: accepted
    damaged = {k: v for k, v in tensors.items() if k != "raw.embedding.weight"}
    save_tensors(optim_path, damaged, metadata)
    with pytest.raises(CheckpointError, match="training weights of a run with --average"):
        load_resume(tmp_path)
    save_tensors(optim_path, {**tensors, "raw.embedding.weight": tensors["raw.embedding.weight"] * float("nan")},
                 metadata)
    with pytest.raises(CheckpointError, match="raw.embedding.weight are not"):
        load_resume(tmp_path)


def test_resume_without_the_average_total_is_refused(tmp_path, tiny_text, monkeypatch):
    _averaged_run(tmp_path, tiny_text)
    real = load_checkpoint

    def without_total(path):
        loaded = real(path)
        loaded.train_state.pop("average_total")
        return loaded

    monkeypatch.setattr("charlm.training.resume_state.ckpt.load_checkpoint", without_total)
    with pytest.raises(CheckpointError, match="average_total"):
        load_resume(tmp_path)


def test_word_models_average_by_default_and_the_options_are_honoured_or_refused(tmp_path):
    corpus = tmp_path / "words.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log\n" * 200, encoding="utf-8")
    plan = lambda **kw: plan_run(TrainOptions(corpus=str(corpus), out=str(tmp_path / "run"), max_minutes=1,
                                              device="cpu", **kw), given=set(kw))
    word = plan(tokenizer="word").train_config
    assert word.average and word.min_lr_ratio == 1.0 and word.shift_windows
    char = plan().train_config  # a tiny corpus: hundreds of epochs in the minute
    assert not char.average and char.min_lr_ratio == 0.0 and char.shift_windows
    assert not plan(tokenizer="word", shift_windows=False).train_config.shift_windows
    assert not plan(shift_windows=False).train_config.shift_windows
    # Char models shift their windows from 3 expected epochs (tiny-shakespeare: 3 minutes ~2, 10 ~5).
    few, more = (auto_size(tokenizer="char", train_tokens=1_003_854, max_minutes=minutes, gpu=False, bf16=True)
                 for minutes in (3, 10))
    assert not few.shift_windows and more.shift_windows
    assert plan(shift_windows=True).train_config.shift_windows
    on = plan(average_power=4.0).train_config
    assert on.average and on.average_power == 4.0 and on.min_lr_ratio == 0.0  # char models keep their schedule
    off = plan(tokenizer="word", average=False).train_config
    assert not off.average and off.min_lr_ratio == 0.0
    assert plan(tokenizer="word", min_lr_ratio=0.0).train_config.min_lr_ratio == 0.0
    with pytest.raises(ConfigError, match="--average-power .* --no-average"):
        plan(average=False, average_power=1.0)
    with pytest.raises(ConfigError, match="--average-power must be"):
        plan(average_power=21.0)
