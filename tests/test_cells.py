"""The peephole LSTM against a cell written straight from the equations, and residual stacks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import charlm
from charlm.model.cells import PeepholeLSTM
from charlm.model.lstm_kernel import fixed_weight_matmul, lstm_layer
from charlm.config import ModelConfig
from charlm.errors import ConfigError
from charlm.model.lm import RNNLM


def reference_layer(x, h, c, w_ih, w_hh, b_ih, b_hh, p_i, p_f, p_o):
    """Gers & Schmidhuber (2000), one step at a time, plain autograd: x (B, T, F) → out, h, c."""
    outs = []
    for t in range(x.size(1)):
        a_i, a_f, a_g, a_o = (x[:, t] @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh).chunk(4, dim=1)
        i = torch.sigmoid(a_i + p_i * c)
        f = torch.sigmoid(a_f + p_f * c)
        c = f * c + i * torch.tanh(a_g)
        o = torch.sigmoid(a_o + p_o * c)
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1), h, c


def layer_inputs(B=3, T=5, F=4, H=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()  # noqa: E731
    return [r(B, T, F), r(B, H), r(B, H), r(4 * H, F, scale=0.5), r(4 * H, H, scale=0.5), r(4 * H), r(4 * H),
            r(H), r(H), r(H)]


def test_forward_equals_the_reference():
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        args = layer_inputs(B=4, T=9, F=5, H=7, dtype=dtype)
        for mine, ref in zip(lstm_layer(*args), reference_layer(*args)):
            assert (mine - ref).abs().max().item() <= tolerance
        with torch.no_grad():  # the functional path evaluation and export use
            for mine, ref in zip(lstm_layer(*args), reference_layer(*args)):
                assert (mine - ref).abs().max().item() <= tolerance


def test_hand_written_backward_passes_gradcheck():
    assert torch.autograd.gradcheck(lstm_layer, layer_inputs())
    # The gradient of the last state alone, and of the outputs alone, each takes its own path.
    args = layer_inputs(B=2, T=4, H=3, seed=1)
    assert torch.autograd.gradcheck(lambda *a: lstm_layer(*a)[2], args)
    assert torch.autograd.gradcheck(lambda *a: lstm_layer(*a)[0], args)


def test_gradients_equal_the_reference_at_a_realistic_size():
    args = layer_inputs(B=8, T=40, F=16, H=32, dtype=torch.float32, seed=2)
    weights = torch.randn(8, 40, 32)

    def grads(fn):
        out, h, c = fn(*args)
        loss = (out * weights).sum() + h.square().sum() + c.sum()
        return torch.autograd.grad(loss, args)

    for mine, ref in zip(grads(lstm_layer), grads(reference_layer)):
        # fp32 sums in another order and tanh as 2σ(2x) − 1 (~2e-7 from tanh near 0), 40 steps deep
        assert ((mine - ref).norm() / ref.norm()).item() < 2e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.05), (torch.float64, 1e-12)])
def test_the_prepacked_step_product_equals_a_plain_matmul(dtype, tolerance):
    weight, x = torch.randn(96, 40, dtype=torch.float64), torch.randn(7, 40, dtype=torch.float64)
    product = fixed_weight_matmul(weight.to(dtype), 7)
    for scale in (1.0, -2.0):  # used many times with one packing
        got = product((x * scale).to(dtype)).double()
        want = (x * scale).to(dtype).double() @ weight.to(dtype).double().t()
        assert ((got - want).abs().max() / want.abs().max()).item() < tolerance


def test_zero_peepholes_are_a_plain_lstm_with_the_same_parameter_names():
    torch.manual_seed(0)
    peephole, plain = PeepholeLSTM(5, 8, 2), nn.LSTM(5, 8, 2, batch_first=True)
    assert all(p.abs().sum() == 0 for n, p in peephole.named_parameters() if n.startswith("peephole_"))
    shared = {n: p for n, p in peephole.state_dict().items() if not n.startswith("peephole_")}
    assert shared.keys() == plain.state_dict().keys()
    plain.load_state_dict(shared)
    x = torch.randn(3, 6, 5)
    (out, (h, c)), (ref, (ref_h, ref_c)) = peephole(x), plain(x)
    for mine, theirs in ((out, ref), (h, ref_h), (c, ref_c)):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_bf16_autocast_stays_near_fp32():
    args = [a.detach().float() for a in layer_inputs(B=4, T=30, F=16, H=32, seed=3)]
    exact = lstm_layer(*args)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lstm_layer(*args)[0]
    assert low.dtype == torch.float32  # the state and gates stay fp32; only the matmuls are bf16
    assert (low - exact).abs().max().item() < 0.05


def test_without_peepholes_the_layer_is_nn_lstm_forward_and_backward():
    """The plain layer the trainer runs wide bf16 LSTMs through (lstm_kernel.trains_faster_by_hand)."""
    args = layer_inputs(B=3, T=6, F=4, H=5, seed=4)[:7]  # no peephole vectors
    assert torch.autograd.gradcheck(lstm_layer, args)
    x, h0, c0, *weights = [a.detach().float().requires_grad_() for a in layer_inputs(B=8, T=40, F=16, H=32, seed=5)[:7]]
    plain = nn.LSTM(16, 32, batch_first=True)
    with torch.no_grad():
        for name, value in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), weights):
            getattr(plain, name).copy_(value)
    head = torch.randn(8, 40, 32)
    out, h, c = lstm_layer(x, h0, c0, *weights)
    ref, (ref_h, ref_c) = plain(x, (h0[None], c0[None]))
    for mine, theirs in ((out, ref), (h, ref_h[0]), (c, ref_c[0])):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)
    mine = torch.autograd.grad((out * head).sum() + h.square().sum() + c.sum(), [x, h0, c0, *weights])
    theirs = torch.autograd.grad((ref * head).sum() + ref_h.square().sum() + ref_c.sum(),
                                 [x, h0, c0, *plain.parameters()])
    for a, b in zip(mine, theirs):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_bf16_training_of_a_wide_lstm_runs_by_hand_near_fp32(monkeypatch, bf16_kernel):
    """Under CPU bf16 autocast, from lstm_kernel.HAND_WRITTEN_BF16_MIN_HIDDEN units, training runs the
    hand-written layer (lowered here so a small model takes it): its loss and gradients stay near
    the fp32 model's, as oneDNN's bf16 kernel's do, and evaluation keeps nn.LSTM's kernel."""
    import charlm.model.lstm_kernel as lstm_kernel
    import charlm.model.lm as model_module

    calls = []
    monkeypatch.setattr(model_module, "lstm_layer", lambda *a: calls.append(1) or lstm_kernel.lstm_layer(*a))
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=11, cell="lstm", hidden_size=48, embed_size=16, num_layers=1))
    x = torch.randint(0, 11, (6, 31))

    def loss_and_grads(bf16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, state = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 11), x[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()], state

    exact, exact_grads, _ = loss_and_grads(False)
    monkeypatch.setattr(lstm_kernel, "HAND_WRITTEN_BF16_MIN_HIDDEN", 32)
    monkeypatch.setattr(lstm_kernel, "faster_by_hand", lambda *shape: True)  # as where it measured faster
    low, low_grads, (h, c) = loss_and_grads(True)
    assert calls and h.dtype == c.dtype == torch.float32 and h.shape == (1, 6, 48)
    assert abs(low - exact) < 0.01
    for a, b in zip(low_grads, exact_grads):
        assert ((a - b).norm() / b.norm()).item() < 0.05
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert not calls
    monkeypatch.setattr(lstm_kernel, "HAND_WRITTEN_BF16_MIN_HIDDEN", 10**6)
    loss_and_grads(True)
    assert not calls


def test_a_peephole_model_trains():
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=7, cell="peephole", hidden_size=16, embed_size=8, num_layers=2,
                              dropout=0.1, weight_drop=0.2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.arange(41).remainder(7).view(1, 41).repeat(4, 1)
    losses = []
    for _ in range(60):
        logits, _ = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 7), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "peephole" in n)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
def test_residual_stack_adds_each_layers_input_to_its_output(cell):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, cell=cell, hidden_size=8, embed_size=6, num_layers=3, residual=True)
    model = RNNLM(cfg).eval()
    plain = RNNLM(cfg.replace(residual=False)).eval()
    plain.load_state_dict(model.state_dict())  # the same parameters: residual adds none
    x = torch.randint(0, 11, (2, 5))
    # Layer by layer by hand: each layer is a one-layer model of the same cell with that layer's weights.
    layers = []
    for k in range(3):
        one = RNNLM(ModelConfig(vocab_size=11, cell=cell, hidden_size=8, embed_size=6 if k == 0 else 8,
                                num_layers=1)).eval()
        one.rnn.load_state_dict({n.replace(f"_l{k}", "_l0"): p for n, p in model.rnn.state_dict().items()
                                 if n.endswith(f"_l{k}")})
        layers.append(one.rnn)
    with torch.no_grad():
        h = model.embedding(x)
        for k, layer in enumerate(layers):
            out, _ = layer(h)
            h = out + h if k > 0 else out
        expected = model.head(h)
        logits, _ = model(x)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, plain(x)[0])


def test_residual_needs_stacked_layers():
    with pytest.raises(ConfigError, match="--residual .* --num-layers ≥ 2"):
        ModelConfig(vocab_size=5, num_layers=1, residual=True)


@pytest.mark.parametrize("options", [{"cell": "peephole"}, {"cell": "lstm", "residual": True, "num_layers": 3},
                                     {"cell": "gru", "residual": True, "num_layers": 2}, {"cell": "rnn"},
                                     {"cell": "lstm"}, {"cell": "gru"}])
def test_a_checkpoint_of_each_cell_trains_resumes_samples_scores_and_exports(options, tiny_corpus, tmp_path):
    common = dict(hidden_size=16, embed_size=8, seq_len=16, batch_size=4, warmup_steps=2, eval_every=3,
                  sample_length=0, device="cpu", precision="fp32", num_layers=2, log_every=1)
    common.update(options)
    common.pop("sample_length")
    run = charlm.train(tiny_corpus, out=str(tmp_path / "run"), max_steps=4, **common)
    assert run.step == 4
    resumed = charlm.train(tiny_corpus, resume=str(tmp_path / "run"), max_steps=8)
    assert resumed.step == 8
    lm = charlm.load(tmp_path / "run")
    config = lm.checkpoint.model_config
    assert config.cell == options["cell"] and config.residual == options.get("residual", False)
    text = "".join(lm.generate(prime="First", length=30, seed=4))
    assert len(text) == 30
    assert lm.samples(length=20, seed=4, num_samples=3) == lm.samples(length=20, seed=4, num_samples=3)
    assert "".join(lm.generate(prime="First", length=30, seed=4)) == text
    assert lm.perplexity("First Citizen:\nSpeak, speak.\n").perplexity > 1
    assert len(lm.score(["All:\n", "Resolved.\n"])) == 2
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from charlm.model.export import check_onnx, export_onnx

    export_onnx(lm.model, tmp_path / "m.onnx")
    assert check_onnx(lm.model, tmp_path / "m.onnx") < 1e-4


def test_residual_without_num_layers_says_to_give_it(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"--residual connects stacked layers: give --num-layers \(≥ 2\)"):
        charlm.train(tiny_corpus, out=str(tmp_path / "run"), residual=True, max_steps=1, device="cpu")
