"""AWD-style regularisation: variational dropout, embedding dropout, weight drop, AR/TAR."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from charlm.config import ModelConfig
from charlm.model.lm import RNNLM, keep_mask, locked_dropout

STRONG = dict(dropout=0.4, input_dropout=0.5, embed_dropout=0.2, weight_drop=0.5)


def model(cell="lstm", layers=2, **reg):
    torch.manual_seed(0)
    return RNNLM(ModelConfig(vocab_size=13, cell=cell, hidden_size=8, embed_size=8, num_layers=layers,
                             tie_weights=True, **reg))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
def test_every_dropout_is_off_in_eval_mode(cell):
    regularised, plain = model(cell, **STRONG).eval(), model(cell).eval()
    plain.load_state_dict(regularised.state_dict())
    x = torch.randint(0, 13, (3, 6))
    first, _ = regularised(x)
    torch.testing.assert_close(first, regularised(x)[0])  # deterministic
    torch.testing.assert_close(first, plain(x)[0])  # and the same as no regularisation at all


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
def test_training_is_random_and_the_layer_by_layer_path_equals_the_fused_one(cell):
    m = model(cell, **STRONG).train()
    x = torch.randint(0, 13, (3, 6))
    assert not torch.equal(m(x)[0], m(x)[0])
    # With every rate at 0 the layer-by-layer recurrence is the fused nn.LSTM call, exactly.
    m = model(cell).train()
    emb = m.embedding(x)
    out, state = m._layer_by_layer(emb, None)
    ref_out, ref_state = m.rnn(emb)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(state if isinstance(state, tuple) else [state], ref_state if isinstance(ref_state, tuple)
                    else [ref_state]):
        torch.testing.assert_close(a, b)


def test_locked_dropout_uses_one_mask_per_stream_across_time():
    torch.manual_seed(1)
    x = torch.ones(4, 50, 16)
    y = locked_dropout(x, 0.5, True)
    assert torch.equal(y, y[:, :1].expand_as(y))  # the same units dropped at every step
    assert not torch.equal(y[0], y[1])  # but each stream has its own mask
    assert set(y.unique().tolist()) <= {0.0, 2.0}  # kept units scaled by 1/(1-p)
    assert torch.equal(locked_dropout(x, 0.5, False), x)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.65, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_mask_drops_each_entry_with_probability_p_and_scales_the_rest(p, dtype):
    torch.manual_seed(2)
    mask = keep_mask((1000, 401), p, torch.empty(0, dtype=dtype))  # an odd count: not a multiple of 4
    assert mask.shape == (1000, 401) and mask.dtype == dtype
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(1 / (1 - p), dtype=dtype).item()}
    # 401,000 entries: the drop rate within 5 standard errors of p, in each of the four 16-bit
    # lanes of a 64-bit draw as well as overall (a lane that was biased would show here).
    flat = (mask == 0).flatten().double()
    tolerance = 5 * (p * (1 - p) / flat.numel()) ** 0.5
    assert abs(flat.mean().item() - p) < tolerance
    for lane in range(4):
        assert abs(flat[lane::4].mean().item() - p) < 2 * tolerance
    assert not torch.equal(mask, keep_mask((1000, 401), p, torch.empty(0, dtype=dtype)))  # fresh draws


def test_embedding_dropout_drops_whole_tokens():
    m = model(layers=1, embed_dropout=0.5).train()
    seen = []
    m.rnn.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x = torch.tensor([[3, 3, 3, 5, 5, 5]] * 2)
    torch.manual_seed(3)
    for _ in range(20):
        m(x)
    for emb in seen:
        for token in (3, 5):
            rows = emb[x == token]  # every use of a token in the batch: all kept, or all zero
            zero = (rows == 0).all(dim=1)
            assert zero.all() or not zero.any()
    assert any((e == 0).all(dim=-1).any() for e in seen) and any(not (e == 0).all(dim=-1).any() for e in seen)


def test_weight_drop_leaves_the_stored_weights_unchanged_and_reaches_their_gradient():
    m = model(weight_drop=0.5).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 13, (3, 6))
    outputs = [m(x)[0] for _ in range(2)]
    assert not torch.equal(outputs[0], outputs[1])  # a new DropConnect mask each call
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(n.endswith("_raw") or "mask" in n for n, _ in m.named_parameters())
    outputs[0].sum().backward()
    grad = m.rnn.weight_hh_l0.grad
    assert grad is not None and (grad == 0).any() and (grad != 0).any()  # the dropped entries get none


@pytest.mark.parametrize("cell, cls", [("lstm", nn.LSTM), ("gru", nn.GRU)])
def test_a_checkpoint_trained_with_regularisation_loads_into_plain_pytorch(tmp_path, cell, cls):
    from charlm.model.checkpoint import load_checkpoint, save_checkpoint
    from charlm.data.tokenizer import CharTokenizer

    tok = CharTokenizer.fit("abcdefghijk")
    m = RNNLM(ModelConfig(vocab_size=tok.vocab_size, cell=cell, hidden_size=8, embed_size=8, num_layers=2,
                          **STRONG))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    for _ in range(3):
        opt.zero_grad()
        m(torch.randint(0, tok.vocab_size, (2, 5)))[0].sum().backward()
        opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model=m, tokenizer=tok)
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded.model_config.weight_drop == 0.5 and loaded.model_config.input_dropout == 0.5
    plain = cls(8, 8, 2, batch_first=True).eval()
    plain.load_state_dict({k[len("rnn."):]: v for k, v in loaded.model.state_dict().items() if k.startswith("rnn.")})
    x = torch.randint(0, tok.vocab_size, (2, 5))
    out, _ = plain(loaded.model.embedding(x))
    torch.testing.assert_close(loaded.model.head(out), loaded.model.eval()(x)[0])


def test_activation_regularisation_adds_to_the_objective_not_to_the_reported_loss(tmp_path):
    import charlm

    text = "the cat sat on the mat .\n" * 200
    corpus = tmp_path / "c.txt"
    corpus.write_text(text)
    common = dict(tokenizer="word", hidden_size=16, num_layers=1, seq_len=8, batch_size=4, max_steps=6,
                  device="cpu", dropout=0.0, weight_drop=0.0, embed_dropout=0.0, eval_every=6)
    plain = charlm.train(corpus, out=tmp_path / "a", activation_reg=0.0, temporal_reg=0.0, **common)
    with_ar = charlm.train(corpus, out=tmp_path / "b", activation_reg=2.0, temporal_reg=1.0, **common)
    assert plain.best_val_loss != with_ar.best_val_loss  # the penalty changed the updates
    state = charlm.load(tmp_path / "b").checkpoint.train_config
    assert state.activation_reg == 2.0 and state.temporal_reg == 1.0


def test_char_models_drop_half_as_much_of_the_input_as_of_the_output(tmp_path):
    """autosize.char_input_dropout: the default follows --dropout (auto-sized or given); a given
    --input-dropout is kept; word models keep their level's own."""
    from charlm.training.plan import TrainOptions, plan_run

    corpus = tmp_path / "text.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log\n" * 300, encoding="utf-8")

    def model(**options):
        return plan_run(TrainOptions(corpus=str(corpus), out=str(tmp_path / "run"), max_minutes=10, device="cpu",
                                     **options), given=set(options)).model_config

    auto = model()
    assert auto.dropout > 0 and auto.input_dropout == auto.dropout / 2
    assert model(dropout=0.4).input_dropout == 0.2
    assert model(dropout=0.0).input_dropout == 0.0
    assert model(dropout=0.4, input_dropout=0.3).input_dropout == 0.3
    word = model(tokenizer="word")
    assert word.input_dropout is not None and word.input_dropout > word.dropout  # the AWD level's
