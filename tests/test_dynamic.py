"""Dynamic evaluation: against a token-by-token reference loop, the static figure at rate 0, the
model and its file untouched, determinism, and the command's options."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import charlm
from charlm.model import checkpoint as ckpt
from charlm.cli import app
from charlm.config import CachePointer, ModelConfig
from charlm.infer.dynamic import DEFAULTS, EPSILON, DynamicEval, dynamic_settings, evaluate_dynamic
from charlm.errors import ConfigError, UsageError
from charlm.infer.evaluate import evaluate
from charlm.model.lm import RNNLM
from charlm.data.tokenizer import fit_tokenizer

runner = CliRunner()


def tiny_model(vocab: int = 20, hidden: int = 12, cell: str = "lstm", layers: int = 1) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(ModelConfig(vocab_size=vocab, embed_size=8, hidden_size=hidden, num_layers=layers,
                             cell=cell)).eval()


def reference_nats(model: RNNLM, ids: np.ndarray, settings: DynamicEval,
                   cache: CachePointer | None = None) -> float:
    """The definition, plainly: one token at a time through the model, each window's tokens scored
    before the weights move; then θ ← θ + λ(θ₀ − θ) − η g / (√(mean of g² so far) + ε). With a
    cache: p = (1 − λc) p_model + λc Σ softmax(θc h_t·h_i) over the last ``window`` positions whose
    next token is the target, h and p_model the adapting model's at the time."""
    import copy

    model = copy.deepcopy(model)
    params = list(model.parameters())
    trained = [p.detach().clone() for p in params]
    squares = [torch.zeros_like(p) for p in params]
    total, state, steps = 0.0, None, 0
    history = []  # (h_t, p_model of the target, target) of every token predicted so far
    for start in range(0, len(ids) - 1, settings.window):
        losses = []
        for t in range(start, min(start + settings.window, len(ids) - 1)):
            logits, state, (h, _) = model(torch.tensor([[ids[t]]]), state, with_outputs=True)
            losses.append(-F.log_softmax(logits[0, 0].double(), -1)[ids[t + 1]])
            history.append((h[0, 0].detach().double(), math.exp(-float(losses[-1].detach())), int(ids[t + 1])))
        if cache is None:
            total += float(sum(losses).detach())
        else:
            for t in range(start, start + len(losses)):
                h_t, p_model, y = history[t]
                past = range(max(0, t - cache.window), t)
                if past:
                    weights = torch.softmax(torch.stack([cache.theta * (h_t @ history[i][0]) for i in past]), 0)
                    p_cache = sum(float(w) for w, i in zip(weights, past) if history[i][2] == y)
                    p_model = (1 - cache.weight) * p_model + cache.weight * p_cache
                total -= math.log(p_model)
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        model.zero_grad()
        (sum(losses) / len(losses)).backward()
        steps += 1
        with torch.no_grad():
            for p, p0, sq in zip(params, trained, squares):
                sq += p.grad ** 2
                rms = (sq / steps).sqrt()
                p.copy_(p + settings.decay * (p0 - p) - settings.lr * p.grad / (rms + EPSILON))
    return total


def _ids(n: int = 90, vocab: int = 20, period: int = 9) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.tile(rng.integers(0, vocab, period), n // period + 1)[:n]


@pytest.mark.parametrize("cell, layers", [("lstm", 1), ("gru", 2)])
def test_dynamic_evaluation_equals_a_token_by_token_reference(cell, layers):
    model, ids = tiny_model(cell=cell, layers=layers), _ids()
    settings = DynamicEval(lr=0.01, decay=0.05, window=7)  # 90 tokens: 12 windows of 7, the last of 5
    result, alone = evaluate_dynamic(model, ids, settings)
    assert result == alone and result.num_predicted == len(ids) - 1
    assert result.total_nats == pytest.approx(reference_nats(model, ids, settings), rel=1e-5)


def test_dynamic_evaluation_with_a_cache_pointer_equals_the_reference():
    model, ids = tiny_model(), _ids()
    settings, cache = DynamicEval(lr=0.01, decay=0.05, window=7), CachePointer(window=20, theta=0.7, weight=0.3)
    mixed, alone = evaluate_dynamic(model, ids, settings, cache=cache)
    assert alone.total_nats == pytest.approx(reference_nats(model, ids, settings), rel=1e-5)
    assert mixed.total_nats == pytest.approx(reference_nats(model, ids, settings, cache), rel=1e-5)
    assert mixed.total_nats < alone.total_nats  # the text repeats every 9 tokens


def test_at_rate_zero_it_is_the_static_figure_and_adapting_to_repetitive_text_lowers_the_loss():
    model, ids = tiny_model(), _ids(400)
    static = evaluate(model, ids, num_streams=1)
    still, _ = evaluate_dynamic(model, ids, DynamicEval(lr=0.0, decay=0.0, window=5))
    assert still.total_nats == pytest.approx(static.total_nats, rel=1e-5)
    adapted, _ = evaluate_dynamic(model, ids, DynamicEval(lr=0.01, decay=0.002, window=5))
    assert adapted.nats_per_token < static.nats_per_token - 0.5  # a period-9 text is soon learned


def test_the_model_is_unchanged_and_the_result_deterministic():
    model, ids = tiny_model(), _ids(200)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    settings = DynamicEval(lr=0.01, decay=0.01, window=5)
    cache = CachePointer(window=50, theta=1.0, weight=0.2)
    first, second = evaluate_dynamic(model, ids, settings, cache=cache), evaluate_dynamic(model, ids, settings, cache=cache)
    assert first == second and first[0] != first[1]  # to the bit, with the cache and without
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert [p.requires_grad for p in model.parameters()] == grads and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_settings_are_checked_and_defaults_follow_the_tokenizer():
    assert dynamic_settings("word") == DEFAULTS["word"] and dynamic_settings("char").window == DEFAULTS["char"].window
    assert dynamic_settings("word", lr=0.0, decay=0.0, window=1) == DynamicEval(0.0, 0.0, 1)  # 0 is a value
    for bad, option in ((dict(lr=2.0), "--dynamic-lr"), (dict(lr=math.nan), "--dynamic-lr"),
                        (dict(decay=-0.1), "--dynamic-decay"), (dict(window=0), "--dynamic-window"),
                        (dict(window=2.5), "--dynamic-window"), (dict(lr=True), "--dynamic-lr")):
        with pytest.raises(ConfigError, match=option):
            dynamic_settings("char", **bad)


@pytest.fixture()
def saved(tmp_path):
    text = "the king's daughter went to the well. the king's daughter sang. " * 8
    tokenizer = fit_tokenizer("char", text)
    model = tiny_model(vocab=tokenizer.vocab_size, hidden=16)
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", model=model, tokenizer=tokenizer)
    held_out = tmp_path / "held.txt"
    held_out.write_text(text, encoding="utf-8")
    return path, held_out


def test_the_api_reports_dynamic_beside_static_and_never_changes_the_file(saved):
    path, held_out = saved
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    lm = charlm.load(path)
    text = held_out.read_text(encoding="utf-8")
    result = lm.perplexity(text, dynamic=True, dynamic_lr=0.003)
    static = lm.perplexity(text, cache=False)
    assert result.dynamic == {"lr": 0.003, "decay": DEFAULTS["char"].decay, "window": DEFAULTS["char"].window}
    assert result.static_nats_per_token == pytest.approx(static.nats_per_token, abs=1e-4)
    assert result.nats_per_token < result.static_nats_per_token  # the text repeats itself
    assert result.cache is None and result.cache_nats_per_token is None  # no pointer in this checkpoint
    assert static.dynamic is None and static.static_nats_per_token is None
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    again = lm.perplexity(text, dynamic=True, dynamic_lr=0.003)
    assert again.nats_per_token == result.nats_per_token  # the loaded model did not move either
    with pytest.raises(UsageError, match="--dynamic-lr applies to dynamic evaluation"):
        lm.perplexity(text, dynamic_lr=0.1)
    with pytest.raises(UsageError, match="dynamic must be True or False"):
        lm.perplexity(text, dynamic=1)


def test_with_a_cache_pointer_all_three_figures_are_reported(saved):
    path, held_out = saved
    ckpt.store_cache(path, CachePointer(window=100, theta=1.0, weight=0.2))
    lm = charlm.load(path)
    text = held_out.read_text(encoding="utf-8")
    result = lm.perplexity(text, dynamic=True)
    cached = lm.perplexity(text)
    alone = lm.perplexity(text, dynamic=True, cache=False)
    assert result.cache == cached.cache and result.cache_nats_per_token == pytest.approx(cached.nats_per_token)
    assert result.static_nats_per_token == pytest.approx(cached.nats_per_token_without_cache)
    assert result.cache_perplexity == pytest.approx(math.exp(result.cache_nats_per_token))
    # the headline is the adapting model alone (what --no-cache gives); with the cache beside it
    assert result.nats_per_token == alone.nats_per_token and result.nats_per_token_without_cache is None
    assert alone.cache is None and alone.cache_nats_per_token is None and alone.dynamic_cache_nats_per_token is None
    assert result.dynamic_cache_nats_per_token < result.cache_nats_per_token  # the text repeats itself
    table = runner.invoke(app, ["perplexity", str(held_out), "--checkpoint", str(path), "--dynamic"])
    assert table.exit_code == 0 and "dynamic + cache pointer" in table.stdout and "static + cache pointer" in table.stdout


def test_the_command_reports_the_figures_and_refuses_bad_options(saved):
    path, held_out = saved
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = runner.invoke(app, ["perplexity", str(held_out), "--checkpoint", str(path), "--dynamic", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["dynamic"] == DEFAULTS["char"].to_dict() and report["static_perplexity"] > report["perplexity"]
    table = runner.invoke(app, ["perplexity", str(held_out), "--checkpoint", str(path), "--dynamic"])
    assert table.exit_code == 0 and "static (as trained)" in table.stdout
    assert "dynamic evaluation" in table.stderr and "checkpoint is unchanged" in table.stderr
    for args, message in ((["--dynamic", "--dynamic-lr", "2"], "--dynamic-lr must be in [0, 1]"),
                          (["--dynamic", "--dynamic-window", "0"], "--dynamic-window must be a whole number"),
                          (["--dynamic", "--dynamic-decay", "nan"], "--dynamic-decay must be in [0, 1]"),
                          (["--dynamic-decay", "0.1"], "add --dynamic")):
        bad = runner.invoke(app, ["perplexity", str(held_out), "--checkpoint", str(path), *args])
        assert bad.exit_code == 2 and message in bad.stderr and "Traceback" not in bad.output, (args, bad.output)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
