"""Budgets mean what they say: the final evaluation and the cache pointer fit happen inside
--max-minutes, the fit is bounded by its measured cost, shows its progress and is skipped by a
stop request without harm. Time here is a fake clock and speeds are injected: no test times
anything real."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from charlm.infer import pointer
from charlm.training import budget, cachefit
from charlm.training import loop as trainer
from charlm.training.budget import TimeBudget
from charlm.config import ModelConfig, TrainConfig
from charlm.data.text import prepare_data
from charlm.model.lm import RNNLM
from charlm.infer.pointer import BLOCK, MIN_TOKENS, FitCost, search_pairs, tune_cache
from charlm.model.precision import FP32


def tiny_model(vocab: int = 40, hidden: int = 16) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(ModelConfig(vocab_size=vocab, embed_size=8, hidden_size=hidden, num_layers=1)).eval()


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ── the fit's cost and its bound ────────────────────────────────────────────────────────────────

def test_a_fit_reads_the_most_tokens_its_seconds_afford():
    cost = FitCost(seconds_per_token=1e-4, seconds_per_pair=2e-8)
    for seconds in (0.5, 2.0, 7.5):
        tokens = cost.affordable_tokens(seconds, 20_000)
        # the reference: the largest count whose predicted cost fits, by plain search
        expected = max(n for n in range(MIN_TOKENS, 20_001) if cost.seconds(n) <= seconds)
        assert tokens == expected
    assert cost.affordable_tokens(1e-6, 20_000) == 0  # not even MIN_TOKENS: nothing
    assert cost.affordable_tokens(1e9, 20_000) == 20_000
    assert cost.affordable_tokens(1e9, 300) == 300  # a short text: all of it


def test_the_predicted_cost_is_the_pass_plus_every_trials_pairs():
    # the plan at 20,000 tokens: 11 θ at the middle window (1,000), the 4 other windows, and 3
    # trials at the largest (4,000), each pair a token against its window and its block
    assert search_pairs(20_000) == 11 * (1000 + BLOCK) + (250 + 500 + 2000 + 4000 + 4 * BLOCK) + 3 * (4000 + BLOCK)
    assert FitCost(2e-3, 0.0).seconds(1000) == pytest.approx(2.0)
    assert FitCost(0.0, 1e-9).seconds(5000) == pytest.approx(5000 * search_pairs(5000) * 1e-9)


def _repeating(n: int = 3000, vocab: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.tile(rng.integers(0, vocab, 150), n // 150 + 1)[:n]


def test_tune_cache_reads_only_what_its_seconds_afford():
    model, ids = tiny_model(), _repeating()
    cost = FitCost(seconds_per_token=1e-3, seconds_per_pair=1e-9)
    found = tune_cache(model, ids, precision=FP32, max_seconds=1.2, cost=cost, clock=FakeClock())
    assert found.tokens == cost.affordable_tokens(1.2, len(ids) - 1) < len(ids) - 1
    assert found.cache is not None and not found.cut_short and found.skipped is None
    unbounded = tune_cache(model, ids, precision=FP32)
    assert unbounded.tokens == len(ids) - 1


def test_tune_cache_skips_when_even_the_least_does_not_fit():
    found = tune_cache(tiny_model(), _repeating(), precision=FP32, max_seconds=0.01,
                       cost=FitCost(1e-3, 0.0), clock=FakeClock())
    assert found.cache is None and found.tokens == 0 and "would not fit" in found.skipped


def test_a_search_whose_time_runs_out_keeps_the_best_point_tried():
    clock = FakeClock()
    phases = []

    def progress(phase: str, done: int, total: int) -> None:
        phases.append((phase, done, total))
        if phase == "searching" and done == 4:
            clock.now = 100.0  # the fifth trial finds its time gone

    found = tune_cache(tiny_model(), _repeating(), precision=FP32, max_seconds=5.0, cost=FitCost(1e-9, 1e-12),
                       clock=clock, on_progress=progress)
    assert found.cut_short and found.skipped is None and found.cache is not None
    assert found.cache.window == 1000 and found.cache.theta in pointer.THETAS[:4]  # from the four tried
    reading = [p for p in phases if p[0] == "reading"]
    assert reading[-1][1] == reading[-1][2] == math.ceil((len(_repeating()) - 1) / BLOCK)
    assert [p[1] for p in phases if p[0] == "searching"] == [1, 2, 3, 4]


def test_measured_costs_are_positive_and_leave_the_model_in_its_mode():
    model = tiny_model().train()
    cost = pointer.measure_fit_cost(model, _repeating(), precision=FP32)
    assert cost.seconds_per_token > 0 and cost.seconds_per_pair > 0 and model.training


# ── the trainer keeps the end inside the budget ─────────────────────────────────────────────────

def test_the_end_reserve_is_the_measured_or_estimated_evaluation_plus_the_fit():
    timing = TimeBudget(60.0, val_tokens=3000, tokens_per_step=4 * 16, session_start=(0, 0.0), fit_reserve=1.5)
    # before any evaluation: a third of a training step per token at 0.5 s per step of 64 tokens
    assert timing.end_reserve(10, 5.0) == pytest.approx(3000 * (5.0 / 640) / 3 + 1.5)
    timing.last_eval_seconds = 2.0  # measured
    assert timing.end_reserve(10, 5.0) == pytest.approx(3.5)
    timing.last_eval_seconds = 0.0  # no step yet: nothing to estimate from
    assert timing.end_reserve(0, 5.0) == pytest.approx(1.5)
    timing.eval_probe = 4.0  # timed at the start: used until an evaluation is measured
    assert timing.end_reserve(0, 5.0) == pytest.approx(5.5)


def _fake_time(monkeypatch, *, step_seconds: float, eval_seconds: float, fit_cost: FitCost,
               eval_per_token: float = 0.0):
    """The trainer's clock moves step_seconds per training step and eval_seconds per evaluation
    (plus eval_per_token per token it reads: scored, and each stream's context before its first);
    the fit's cost is ``fit_cost`` and a fit takes 90% of the seconds it is given."""
    clock = FakeClock()
    for module in (trainer, budget, cachefit):
        monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=clock))
    real_step, real_evaluate, real_tune = trainer._Run.train_step, trainer.evaluate, pointer.tune_cache
    calls = {"fit": []}

    def train_step(self):
        clock.now += step_seconds
        return real_step(self)

    def evaluate(model, ids, **kwargs):
        streams = kwargs.get("num_streams") or budget.eval_streams(len(ids))
        context = min(budget.EVAL_CONTEXT, (len(ids) - 1) // streams) if streams > 1 else 0
        clock.now += eval_seconds + eval_per_token * (len(ids) - 1 + streams * context)
        return real_evaluate(model, ids, **kwargs)

    def tune(*args, max_seconds=None, **kwargs):
        calls["fit"].append(max_seconds)
        clock.now += 0.9 * max_seconds
        return real_tune(*args, max_seconds=max_seconds, **kwargs)

    monkeypatch.setattr(trainer._Run, "train_step", train_step)
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    monkeypatch.setattr(budget, "evaluate", evaluate)
    monkeypatch.setattr(pointer, "tune_cache", tune)
    monkeypatch.setattr(pointer, "measure_fit_cost", lambda *a, **k: fit_cost)
    return clock, calls


def _run(tmp_path, tiny_text, val_fraction=0.1, **train_kwargs):
    data = prepare_data(tiny_text, val_fraction=val_fraction)
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=16, embed_size=8, num_layers=1)
    kwargs = dict(seq_len=16, batch_size=4, lr=1e-2, warmup_steps=3, device="cpu", log_every=5, cache=True)
    train_cfg = TrainConfig(**{**kwargs, **train_kwargs})
    events = []
    result = trainer.train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=tmp_path / "r",
                           on_event=events.append)
    return data, result, events


def test_a_budgeted_run_ends_with_its_evaluation_and_fit_inside_it(monkeypatch, tmp_path, tiny_text):
    data = prepare_data(tiny_text, val_fraction=0.1)
    # An evaluation costs what the trainer estimates before timing one (a third of a step per
    # token), and is too dear to repeat within the budget: the only one is the final one, which an
    # estimate of 0 (the old rule) would have run past the budget.
    step_seconds = 3 * 64 / len(data.val_ids)  # so that the estimate is 1 s
    estimate = len(data.val_ids) * (step_seconds / 64) / 3
    assert estimate == pytest.approx(1.0) and 30 * estimate > 20  # no evaluation during the run
    fit_cost = FitCost(seconds_per_token=1e-3, seconds_per_pair=0.0)  # a full fit: under the 2 s cap
    _, calls = _fake_time(monkeypatch, step_seconds=step_seconds, eval_seconds=0.95 * estimate, fit_cost=fit_cost)
    _, result, events = _run(tmp_path, tiny_text, max_minutes=20 / 60)
    ends = [e for e in events if e["event"] == "end"]
    evals = [e for e in events if e["event"] == "eval"]
    assert result.stopped_by == "time" and len(evals) == 1
    assert result.elapsed_seconds <= 20.0 and ends[0]["elapsed"] == result.elapsed_seconds
    assert len(calls["fit"]) == 1 and 0 < calls["fit"][0] <= 2.0  # a tenth of the budget at most
    assert result.cache_seconds > 0 and ends[0]["cache_seconds"] == result.cache_seconds
    # the fit's time is in what the run reports: the clock after the final evaluation plus the fit
    assert result.elapsed_seconds == pytest.approx(evals[0]["elapsed"] + evals[0]["eval_seconds"]
                                                   + result.cache_seconds)
    starts = [e for e in events if e["event"] == "cache_start"]
    progress = [e for e in events if e["event"] == "cache_progress"]
    assert len(starts) == 1 and starts[0]["seconds"] == calls["fit"][0] and progress
    assert {e["phase"] for e in progress} == {"reading", "searching"}
    written = [json.loads(line)["event"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "cache" in written and "cache_progress" not in written  # progress is for the display only


def test_a_large_validation_split_is_timed_at_the_start_and_its_evaluation_kept_inside(monkeypatch, tmp_path,
                                                                                       tiny_text):
    # Evaluation is dear against training here: the training speed's estimate (a third of a step
    # per token) would keep ~7 s for it and the final evaluation would take 20 s; the window timed
    # at the start predicts it.
    text = tiny_text * 3
    val_tokens = len(prepare_data(text, val_fraction=0.5).val_ids)
    per_token = 20.0 / val_tokens
    _, calls = _fake_time(monkeypatch, step_seconds=0.5, eval_seconds=0.0, fit_cost=FitCost(1e-4, 0.0),
                          eval_per_token=per_token)
    _, result, events = _run(tmp_path, text, val_fraction=0.5, max_minutes=1.0, seq_len=32, batch_size=8)
    evals = [e for e in events if e["event"] == "eval"]
    assert result.stopped_by == "time" and len(evals) == 1 and evals[0]["eval_seconds"] > 19.0
    assert result.elapsed_seconds <= 60.0


def test_a_step_limited_run_gives_the_fit_a_tenth_of_its_time(monkeypatch, tmp_path, tiny_text):
    _, calls = _fake_time(monkeypatch, step_seconds=5.0, eval_seconds=0.5, fit_cost=FitCost(1e-4, 0.0))
    _run(tmp_path, tiny_text, max_steps=12, eval_every=6)
    assert calls["fit"][0] == pytest.approx((12 * 5.0 + 2 * 0.5) / 10)  # 12 steps, evaluations at 6 and 12


def test_a_short_step_limited_run_gives_the_fit_at_least_two_seconds(monkeypatch, tmp_path, tiny_text):
    _, calls = _fake_time(monkeypatch, step_seconds=0.01, eval_seconds=0.01, fit_cost=FitCost(1e-4, 0.0))
    _run(tmp_path, tiny_text, max_steps=3)
    assert calls["fit"][0] == pytest.approx(cachefit.CACHE_MIN_SECONDS)


def test_a_stop_request_during_the_fit_skips_it_and_keeps_the_checkpoints(tmp_path, tiny_text):
    data = prepare_data(tiny_text, val_fraction=0.1)
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=16, embed_size=8, num_layers=1)
    train_cfg = TrainConfig(seq_len=16, batch_size=4, lr=1e-2, warmup_steps=3, device="cpu", max_steps=10,
                            cache=True)
    fitting = {"on": False}
    events = []

    def on_event(event):
        events.append(event)
        fitting["on"] = fitting["on"] or event["event"] == "cache_start"

    run_dir = tmp_path / "r"
    result = trainer.train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=run_dir,
                           on_event=on_event, should_stop=lambda: "SIGINT" if fitting["on"] else None)
    assert result.stopped_by == "done" and result.cache is None and result.step == 10
    assert any(e["event"] == "warning" and "cache pointer" in e["message"] for e in events)
    from charlm.model.checkpoint import load_checkpoint

    best = load_checkpoint(run_dir / "best.safetensors")
    assert best.cache is None and best.train_state["step"] == result.best_step
    assert (run_dir / "last.safetensors").exists()


def test_the_display_shows_the_fit_and_what_ctrl_c_does_then():
    from charlm.cli import train as cli

    display, stop = cli._TrainDisplay(live=False), cli._StopFlag()
    display.stop_flag = stop
    with cli.err.capture() as captured:
        display({"event": "cache_start", "seconds": 18.0, "elapsed": 160.0})
        display({"event": "cache_progress", "phase": "searching", "done": 3, "total": 19, "elapsed": 161.0})
    assert "fitting the cache pointer (at most 18 s; Ctrl-C skips it)" in captured.get()
    assert display.step_info.startswith("cache pointer: searching 3/19")
    assert "skipping the cache pointer fit" in stop.doing


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 0), ("SIGTERM", 143)])
def test_a_signal_during_the_fit_keeps_the_run_and_skips_the_fit_and_the_sample(monkeypatch, tmp_path, tiny_corpus,
                                                                                 signal_name, code):
    from typer.testing import CliRunner

    from charlm.cli import app
    from charlm.cli import train as cli
    from charlm.model.checkpoint import load_checkpoint

    shown = cli._TrainDisplay.__call__

    def display(self, event):  # the signal arrives as the fit starts
        shown(self, event)
        if event["event"] == "cache_start":
            self.stop_flag.reason = signal_name

    monkeypatch.setattr(cli._TrainDisplay, "__call__", display)
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["train", str(tiny_corpus), "--out", str(out), "--hidden-size", "16",
                                          "--embed-size", "8", "--seq-len", "16", "--batch-size", "4",
                                          "--max-steps", "6", "--device", "cpu"])
    assert result.exit_code == code, result.output
    assert "stopped while fitting the cache pointer" in result.stderr and "sample:" not in result.stdout
    assert "best val loss" in result.stdout
    assert load_checkpoint(out / "best.safetensors").cache is None and (out / "last.safetensors").exists()
