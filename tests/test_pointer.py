"""The cache pointer: its figures against a token-by-token loop, its search, its place in the
checkpoint, and the commands that use it."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from charlm.model import checkpoint as ckpt
from charlm.cli import app
from charlm.config import CachePointer, ModelConfig
from charlm.errors import CheckpointError, ConfigError
from charlm.infer.evaluate import evaluate
from charlm.model.lm import RNNLM
from charlm.infer.pointer import BLOCK, evaluate_with_cache, tune_cache
from charlm.model.precision import FP32
from charlm.data.tokenizer import fit_tokenizer

runner = CliRunner()


def tiny_model(vocab: int = 40, hidden: int = 16, seed: int = 0) -> RNNLM:
    torch.manual_seed(seed)
    return RNNLM(ModelConfig(vocab_size=vocab, embed_size=8, hidden_size=hidden, num_layers=1)).eval()


def reference_nats(model: RNNLM, ids: np.ndarray, cache: CachePointer) -> tuple[float, float]:
    """The definition, one token at a time: p = (1 − λ) p_model + λ Σ softmax(θ h_t·h_i) over the
    last ``window`` positions i < t whose next token is the target."""
    x = torch.as_tensor(ids, dtype=torch.int64)[None]
    with torch.no_grad():
        logits, _, (h, _) = model(x[:, :-1], None, with_outputs=True)
    probs, h, y = F.softmax(logits[0].double(), -1), h[0].double(), x[0, 1:]
    with_cache = without = 0.0
    for t in range(len(y)):
        p_model = float(probs[t, y[t]])
        past = range(max(0, t - cache.window), t)
        if past:
            scores = torch.stack([cache.theta * (h[t] @ h[i]) for i in past])
            weights = torch.softmax(scores, 0)
            p_cache = sum(float(w) for w, i in zip(weights, past) if y[i] == y[t])
            p = (1 - cache.weight) * p_model + cache.weight * p_cache
        else:
            p = p_model
        with_cache -= math.log(p)
        without -= math.log(p_model)
    return with_cache, without


def test_cached_figures_equal_a_token_by_token_loop():
    model = tiny_model()
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(0, 40, 150)] * 4)[: 2 * BLOCK + 77]  # repeats, over three blocks
    cache = CachePointer(window=200, theta=0.7, weight=0.3)  # shorter than a block: the ring matters
    got, alone = evaluate_with_cache(model, ids, cache, precision=FP32)
    want, want_alone = reference_nats(model, ids, cache)
    assert got.num_predicted == alone.num_predicted == len(ids) - 1
    assert got.total_nats == pytest.approx(want, rel=1e-5)
    assert alone.total_nats == pytest.approx(want_alone, rel=1e-5)
    assert alone.total_nats == pytest.approx(evaluate(model, ids).total_nats, rel=1e-5)  # the batched evaluator
    assert got.total_nats < alone.total_nats  # repeated text: the cache helps


def test_a_window_longer_than_a_block_reaches_back_through_the_ring():
    model = tiny_model(seed=1)
    ids = np.tile(np.arange(37), 20)[: 3 * BLOCK]
    cache = CachePointer(window=BLOCK + 50, theta=0.2, weight=0.5)
    got, _ = evaluate_with_cache(model, ids, cache, precision=FP32)
    assert got.total_nats == pytest.approx(reference_nats(model, ids, cache)[0], rel=1e-5)


def test_the_search_keeps_a_cache_where_text_repeats_and_none_where_it_cannot_help():
    model = tiny_model(vocab=50)
    rng = np.random.default_rng(1)
    repeating = np.tile(rng.integers(0, 50, 120), 12)
    found = tune_cache(model, repeating, precision=FP32)
    assert found.cache is not None and found.nats_per_token < found.nats_per_token_without - 0.05
    got, _ = evaluate_with_cache(model, repeating, found.cache, precision=FP32)
    assert got.nats_per_token == pytest.approx(found.nats_per_token, rel=1e-6)  # the search scores as evaluation does

    noise = rng.integers(0, 50, 1500)  # independent tokens: the past says nothing of the next one
    found = tune_cache(model, noise, precision=FP32)
    assert found.cache is None and found.nats_per_token == found.nats_per_token_without
    assert found.tokens == len(noise) - 1


def test_the_checkpoint_stores_and_checks_the_cache(tmp_path):
    tokenizer = fit_tokenizer("char", "abcdefghij klmnop")
    model = tiny_model(vocab=tokenizer.vocab_size)
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", model=model, tokenizer=tokenizer)
    assert ckpt.load_checkpoint(path).cache is None
    cache = CachePointer(window=500, theta=1.5, weight=0.2)
    ckpt.store_cache(path, cache)
    loaded = ckpt.load_checkpoint(path)
    assert loaded.cache == cache
    torch.testing.assert_close(loaded.model.state_dict(), model.state_dict())  # the weights untouched
    ckpt.store_cache(path, None)
    assert ckpt.load_checkpoint(path).cache is None

    tensors, metadata = ckpt.load_tensors(path)
    for bad in ('{"window": 0, "theta": 1, "weight": 0.2}', '{"window": 10, "theta": 1, "weight": 1.0}',
                '{"window": 10, "theta": NaN, "weight": 0.2}', '{"window": 10, "theta": 1}',
                '{"window": 10, "theta": 1, "weight": 0.2, "code": "import os"}', '[1, 2]', 'not json',
                '{"window": true, "theta": 1, "weight": 0.2}'):
        ckpt.save_tensors(path, tensors, {**metadata, ckpt.CACHE_KEY: bad})
        with pytest.raises(CheckpointError, match="m.safetensors"):
            ckpt.load_checkpoint(path)


def test_cache_pointer_values_are_checked():
    with pytest.raises(ConfigError, match="--cache-weight"):
        CachePointer(window=10, theta=1.0, weight=0.0)
    with pytest.raises(ConfigError, match="--cache-theta"):
        CachePointer(window=10, theta=-1.0, weight=0.5)


def test_train_fits_a_cache_and_perplexity_uses_it(tmp_path, tiny_corpus):
    common = ["--hidden-size", "24", "--embed-size", "12", "--seq-len", "16", "--batch-size", "4",
              "--max-steps", "40", "--sample-length", "0", "--device", "cpu", "--json"]
    with_cache = runner.invoke(app, ["train", str(tiny_corpus), "--out", str(tmp_path / "a"), *common])
    assert with_cache.exit_code == 0, with_cache.output
    trained = json.loads(with_cache.stdout)
    # tiny.txt repeats one passage: the cache must have been kept, and said so
    assert trained["cache"]["pointer"] is not None and "cache pointer: validation" in with_cache.stderr
    assert trained["cache"]["val_loss"] <= trained["cache"]["val_loss_without"] - 0.01
    assert trained["cache"]["val_loss_without"] == pytest.approx(trained["best_val_loss"], abs=1e-4)

    plain = runner.invoke(app, ["train", str(tiny_corpus), "--out", str(tmp_path / "b"), "--no-cache", *common])
    assert plain.exit_code == 0, plain.output
    # The cache is fitted after training: the run itself is the same, to the bit.
    assert json.loads(plain.stdout)["best_val_loss"] == trained["best_val_loss"]
    assert json.loads(plain.stdout)["cache"] is None
    assert ckpt.load_checkpoint(tmp_path / "b" / "best.safetensors").cache is None

    held_out = tmp_path / "held.txt"
    held_out.write_text(tiny_corpus.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    report = json.loads(runner.invoke(app, ["perplexity", str(held_out), "--checkpoint", str(tmp_path / "a"),
                                            "--json"]).stdout)
    alone = json.loads(runner.invoke(app, ["perplexity", str(held_out), "--checkpoint", str(tmp_path / "a"),
                                           "--json", "--no-cache"]).stdout)
    assert report["cache"] == trained["cache"]["pointer"] and alone["cache"] is None
    assert report["nats_per_token"] < alone["nats_per_token"]
    assert report["nats_per_token_without_cache"] == pytest.approx(alone["nats_per_token"], abs=1e-4)
    table = runner.invoke(app, ["perplexity", str(held_out), "--checkpoint", str(tmp_path / "a")])
    assert "model alone" in table.stdout and "cache pointer" in table.stderr
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "a"), "--json"]).stdout)
    assert info["cache_pointer"] == trained["cache"]["pointer"]
    assert "cache pointer" in runner.invoke(app, ["info", str(tmp_path / "a")]).stdout
