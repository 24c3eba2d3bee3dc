import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlm.config import ModelConfig
from charlm.infer.evaluate import evaluate
from charlm.model.lm import RNNLM


def token_by_token(model, ids, num_streams, context=256):
    """Reference: the same stream layout, one token at a time, with a plain Python loop; each stream
    after the first reads up to ``context`` tokens before its start unscored."""
    n = len(ids)
    length = (n - 1) // num_streams
    total, state = 0.0, None
    with torch.no_grad():
        for b in range(num_streams):
            state = None
            warm = min(context, length) if num_streams > 1 and b > 0 else 0
            for i in range(b * length - warm, b * length):
                _, state = model(torch.tensor([[int(ids[i])]]), state)
            for i in range(b * length, (b + 1) * length):
                logits, state = model(torch.tensor([[int(ids[i])]]), state)
                total += F.cross_entropy(logits[0], torch.tensor([int(ids[i + 1])])).item()
        for i in range(num_streams * length, n - 1):  # the remainder continues the last stream
            logits, state = model(torch.tensor([[int(ids[i])]]), state)
            total += F.cross_entropy(logits[0], torch.tensor([int(ids[i + 1])])).item()
    return total


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
@pytest.mark.parametrize("num_streams, n", [(1, 50), (3, 101), (4, 97)])
def test_batched_equals_token_by_token(cell, num_streams, n):
    torch.manual_seed(1)
    model = RNNLM(ModelConfig(vocab_size=13, cell=cell, hidden_size=16, embed_size=8, num_layers=2)).eval()
    ids = np.random.default_rng(0).integers(0, 13, size=n).astype(np.uint8)
    result = evaluate(model, ids, num_streams=num_streams, seq_len=7, context=5)
    assert result.num_predicted == n - 1
    assert result.total_nats == pytest.approx(token_by_token(model, ids, num_streams, context=5), abs=1e-4)
    assert result.perplexity == pytest.approx(math.exp(result.nats_per_token))
    assert result.bits_per_char(n) == pytest.approx(result.total_nats / math.log(2) / n)


def test_evaluate_leaves_training_mode_alone_and_handles_tiny_input():
    model = RNNLM(ModelConfig(vocab_size=5, hidden_size=4, embed_size=4)).train()
    assert evaluate(model, np.array([1], dtype=np.uint8)).num_predicted == 0
    evaluate(model, np.array([1, 2, 3], dtype=np.uint8))
    assert model.training


def test_context_brings_many_streams_close_to_one_sequential_pass(trained_run):
    from charlm.model.checkpoint import load_checkpoint
    from conftest import TINY_TEXT

    loaded = load_checkpoint(trained_run / "best.safetensors")
    ids = loaded.tokenizer.encode(TINY_TEXT)
    sequential = evaluate(loaded.model, ids, num_streams=1).nats_per_token
    cold = evaluate(loaded.model, ids, num_streams=16, context=0).nats_per_token
    warm = evaluate(loaded.model, ids, num_streams=16, context=64).nats_per_token
    assert abs(warm - sequential) < abs(cold - sequential)
    assert abs(warm - sequential) < 2e-3


def test_a_small_logits_budget_changes_nothing(monkeypatch):
    import charlm.infer.evaluate as evaluate_module

    torch.manual_seed(2)
    model = RNNLM(ModelConfig(vocab_size=300, hidden_size=16, embed_size=8)).eval()
    ids = np.random.default_rng(1).integers(0, 300, size=5000).astype(np.uint16)
    full = evaluate(model, ids, num_streams=4)
    monkeypatch.setattr(evaluate_module, "WINDOW_FLOATS", 4 * (300 + 5 * 16) * 10)  # windows of 10 tokens
    assert evaluate(model, ids, num_streams=4).total_nats == pytest.approx(full.total_nats, rel=1e-6)
