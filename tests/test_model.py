import pytest
import torch
from torch import nn

from charlm.config import ModelConfig
from charlm.model.lm import RNNLM, detach_state


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
def test_forward_shapes_and_state_carry(cell):
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=11, cell=cell, hidden_size=8, embed_size=6, num_layers=2)).eval()
    x = torch.randint(0, 11, (3, 7))
    logits, state = model(x)
    assert logits.shape == (3, 7, 11)
    # Feeding the sequence in two windows with the carried state gives the same logits.
    first, state_a = model(x[:, :4])
    second, _ = model(x[:, 4:], detach_state(state_a))
    torch.testing.assert_close(torch.cat([first, second], 1), logits)


@pytest.mark.parametrize("cell, cls", [("lstm", nn.LSTM), ("gru", nn.GRU), ("rnn", nn.RNN)])
def test_recurrent_weights_load_into_plain_pytorch(cell, cls):
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=11, cell=cell, hidden_size=8, embed_size=6, num_layers=2)).eval()
    plain = cls(6, 8, 2, batch_first=True).eval()
    plain.load_state_dict({k[len("rnn."):]: v for k, v in model.state_dict().items() if k.startswith("rnn.")})
    x = torch.randint(0, 11, (2, 5))
    out, _ = plain(model.embedding(x))
    logits, _ = model(x)
    torch.testing.assert_close(model.head(out), logits)


def test_tied_weights_share_storage_and_count_once():
    tied = RNNLM(ModelConfig(vocab_size=20, hidden_size=8, embed_size=8, tie_weights=True))
    untied = RNNLM(ModelConfig(vocab_size=20, hidden_size=8, embed_size=8))
    assert tied.head.weight is tied.embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == 20 * 8
