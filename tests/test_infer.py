"""FastStep must be the model, one token at a time, for every cell and batch size."""
from __future__ import annotations

import pytest
import torch

from charlm.config import ModelConfig
from charlm.infer.step import FastStep
from charlm.model.lm import RNNLM


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
@pytest.mark.parametrize("num_layers, batch_size, tie", [(1, 1, False), (2, 1, False), (3, 5, False), (2, 3, True)])
def test_fast_step_equals_the_model(cell, num_layers, batch_size, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=23, cell=cell, hidden_size=24, embed_size=24 if tie else 8, num_layers=num_layers,
                      tie_weights=tie)
    model = RNNLM(cfg).eval()
    with torch.no_grad():  # non-trivial biases, so folding them in is checked too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, 23, (batch_size, 12))
    warm = torch.randint(0, 23, (batch_size, 4))
    with torch.inference_mode():
        _, state = model(warm)
        reference, _ = model(tokens, state)  # (B, T, V)
        fast = FastStep(model)
        fast.reset(batch_size, state)
        for t in range(tokens.shape[1]):
            logits = fast.step(tokens[:, t])
            assert torch.allclose(logits.log_softmax(-1), reference[:, t].log_softmax(-1), atol=1e-5), t
        _, full_state = model(torch.cat([warm, tokens], dim=1))
    got = fast.state()
    want = full_state
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.allclose(a, b, atol=1e-5)


def test_fast_step_starts_from_zeros():
    torch.manual_seed(1)
    model = RNNLM(ModelConfig(vocab_size=9, hidden_size=16, embed_size=8)).eval()
    fast = FastStep(model)
    fast.reset(2)
    tokens = torch.tensor([3, 4])
    with torch.inference_mode():
        reference, _ = model(tokens[:, None])
    assert torch.allclose(fast.step(tokens), reference[:, 0], atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru", "peephole"])
def test_prepacked_products_equal_plain_matmuls(cell):
    torch.manual_seed(3)
    model = RNNLM(ModelConfig(vocab_size=19, cell=cell, hidden_size=16, embed_size=8, num_layers=2,
                              residual=True)).eval()
    packed, plain = FastStep(model, prepacked=True), FastStep(model, prepacked=False)
    packed.reset(5)
    plain.reset(5)
    for token in torch.randint(0, 19, (10, 5)):
        torch.testing.assert_close(packed.step(token), plain.step(token), atol=1e-5, rtol=1e-5)
