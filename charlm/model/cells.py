"""The peephole LSTM (Gers & Schmidhuber 2000), a recurrent layer PyTorch has no kernel for,
with ``nn.LSTM``'s interface; its layers run through the hand-written layer of ``lstm_kernel.py``.

The gates also look at the cell state through one diagonal (elementwise) weight vector per gate:

    i = σ(Wᵢx + Uᵢh + bᵢ + pᵢ ⊙ c₋₁)        f = σ(W_f x + U_f h + b_f + p_f ⊙ c₋₁)
    g = tanh(W_g x + U_g h + b_g)            c = f ⊙ c₋₁ + i ⊙ g
    o = σ(W_o x + U_o h + b_o + p_o ⊙ c)     h = o ⊙ tanh(c)

Gate order and parameter names are ``nn.LSTM``'s (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
``bias_hh_l0``: rows i, f, g, o) plus ``peephole_i_l0``, ``peephole_f_l0``, ``peephole_o_l0``.
"""
from __future__ import annotations

import torch
from torch import nn

from charlm.model.lstm_kernel import lstm_layer

GATE_NAMES = ("i", "f", "o")  # the gates with a peephole


class PeepholeLSTM(nn.Module):
    """A multi-layer peephole LSTM with ``nn.LSTM``'s interface (batch first, no dropout, no
    bidirection): ``forward(x (B, T, F), (h, c) each (L, B, H)) → (out (B, T, H), (h, c))``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        H = hidden_size
        for k in range(num_layers):
            fan_in = input_size if k == 0 else H
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * H, fan_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * H, H)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * H)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * H)))
            for gate in GATE_NAMES:
                self.register_parameter(f"peephole_{gate}_l{k}", nn.Parameter(torch.empty(H)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.LSTM's initialisation for the shared weights; peepholes start at 0 (a plain LSTM).
        bound = self.hidden_size ** -0.5
        for name, param in self.named_parameters():
            if name.startswith("peephole_"):
                nn.init.zeros_(param)
            else:
                nn.init.uniform_(param, -bound, bound)

    def peepholes(self, k: int) -> list[torch.Tensor]:
        """Layer ``k``'s peephole vectors, in ``GATE_NAMES`` order (i, f, o)."""
        return [getattr(self, f"peephole_{gate}_l{k}") for gate in GATE_NAMES]

    def layer_weights(self, k: int) -> list[torch.Tensor]:
        """Layer ``k``'s tensors in ``lstm_layer``'s argument order."""
        shared = [getattr(self, f"{kind}_l{k}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return shared + self.peepholes(k)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if state is None:
            zeros = x.new_zeros(self.num_layers, x.size(0), self.hidden_size,
                                dtype=torch.promote_types(x.dtype, torch.float32))  # fp32 state under autocast
            state = (zeros, zeros)
        h, c = state
        hs, cs = [], []
        for k in range(self.num_layers):
            x, h_k, c_k = lstm_layer(x, h[k], c[k], *self.layer_weights(k))
            hs.append(h_k)
            cs.append(c_k)
        return x, (torch.stack(hs), torch.stack(cs))
