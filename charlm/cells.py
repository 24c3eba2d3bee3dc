"""Recurrent layers that PyTorch has no kernel for: the peephole LSTM (Gers & Schmidhuber 2000).

The gates also look at the cell state through one diagonal (elementwise) weight vector per gate:

    i = σ(Wᵢx + Uᵢh + bᵢ + pᵢ ⊙ c₋₁)        f = σ(W_f x + U_f h + b_f + p_f ⊙ c₋₁)
    g = tanh(W_g x + U_g h + b_g)            c = f ⊙ c₋₁ + i ⊙ g
    o = σ(W_o x + U_o h + b_o + p_o ⊙ c)     h = o ⊙ tanh(c)

Gate order and parameter names are ``nn.LSTM``'s (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
``bias_hh_l0``: rows i, f, g, o) plus ``peephole_i_l0``, ``peephole_f_l0``, ``peephole_o_l0``.

Neither cuDNN nor oneDNN has a peephole kernel, and autograd over a Python loop of a dozen small ops
per step records hundreds of graph nodes per window. So a layer is computed as
- the input projection of the whole window in ONE matmul (autograd handles it);
- the recurrence in ``_PeepholeRecurrence``, a custom autograd Function: per step one matmul and the
  gate arithmetic written in place into preallocated (T, B, ·) buffers; its hand-written backward
  runs the steps in reverse (one matmul each) and forms the weight gradients in one matmul at the end.
The step products go through ``fixed_weight_matmul`` (oneDNN with the weight reordered once per
window). Evaluation runs the same in-place loop and keeps nothing for backward; an ONNX export
traces a plain functional loop that does the same sums. Sampling has its own step (``infer.py``).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

GATE_NAMES = ("i", "f", "o")  # the gates with a peephole


def fixed_weight_matmul(weight: torch.Tensor, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ x @ weightᵀ`` for many ``x`` of ``batch_size`` rows and one ``weight`` (N, K), as a
    recurrence needs at every step.

    On a CPU it multiplies through oneDNN's linear with the weight reordered once into oneDNN's
    blocked layout, which is what its own fused LSTM does: for the skinny products of a step
    (64 × 512 by 512 × 2048) it measured about twice the rate of ``torch.mm`` alone, and took a
    peephole layer's forward + backward from 0.64× to 0.73× ``nn.LSTM``'s time share. Those ops
    (``torch.ops.mkldnn``) are the ones PyTorch's compiler uses, not public API, so they are tried
    once per dtype on a small product and ``torch.mm`` serves wherever they are absent or disagree.
    """
    if weight.device.type == "cpu" and _onednn_linear_works(weight.dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    transposed = weight.t().contiguous()
    return lambda x: x @ transposed


@functools.cache
def _onednn_linear_works(dtype: torch.dtype) -> bool:
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator).to(dtype)
        x = torch.randn(4, 16, generator=generator).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 4)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        expected = x.float() @ weight.float().t()
        return got.shape == expected.shape and bool(torch.allclose(got.float(), expected, atol=0.1, rtol=0.02))
    except Exception:  # any failure (op missing, unsupported dtype or CPU) means: use torch.mm
        return False


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
        """Layer ``k``'s tensors in ``peephole_lstm_layer``'s argument order."""
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
            x, h_k, c_k = peephole_lstm_layer(x, h[k], c[k], *self.layer_weights(k))
            hs.append(h_k)
            cs.append(c_k)
        return x, (torch.stack(hs), torch.stack(cs))


def peephole_lstm_layer(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor,
                        w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor, p_i: torch.Tensor,
                        p_f: torch.Tensor, p_o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One peephole LSTM layer over a window: x (B, T, F), h0 and c0 (B, H) → out (B, T, H), h, c.

    The state and the gate arithmetic are float32 (float64 if the state is); under autocast the
    matmuls run in the autocast dtype, as ``nn.LSTM``'s do."""
    dtype = h0.dtype
    device_type = x.device.type
    matmul_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype
    xp = F.linear(x.transpose(0, 1), w_ih, b_ih + b_hh).to(dtype).contiguous()  # (T, B, 4H)
    c0 = c0.to(dtype)
    # A tracer (ONNX export) must see the functional loop: the Function's in-place buffers are opaque to it.
    if torch.jit.is_tracing():
        out, h, c = _recurrence(xp, h0, c0, w_hh, p_i, p_f, p_o, matmul_dtype)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (xp, h0, c0, w_hh, p_i, p_f, p_o)):
        out, h, c = _PeepholeRecurrence.apply(xp, h0, c0, w_hh, p_i, p_f, p_o, matmul_dtype)
    else:  # evaluation: the training loop's buffers, nothing kept
        _, cs, hs, _ = _run(xp, h0, c0, w_hh.detach(), p_i.detach(), p_f.detach(), p_o.detach(), matmul_dtype)
        out, h, c = hs[1:], hs[-1], cs[-1]
    return out.transpose(0, 1), h, c


def _recurrence(xp: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor, p_i: torch.Tensor,
                p_f: torch.Tensor, p_o: torch.Tensor, matmul_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recurrence written functionally, for a tracer (ONNX export): xp (T, B, 4H) → out
    (T, B, H), h, c."""
    w_t = w_hh.t().to(matmul_dtype)
    outs = []
    for t in range(xp.size(0)):
        g = xp[t] + (h.to(matmul_dtype) @ w_t).to(xp.dtype)
        a_i, a_f, a_g, a_o = g.chunk(4, dim=1)
        i = torch.sigmoid(a_i + p_i * c)
        f = torch.sigmoid(a_f + p_f * c)
        c = f * c + i * torch.tanh(a_g)
        h = torch.sigmoid(a_o + p_o * c) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def _run(xp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor, p_i: torch.Tensor,
         p_f: torch.Tensor, p_o: torch.Tensor, matmul_dtype: torch.dtype
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recurrence in place into (T, B, ·) buffers: the gates after their nonlinearities
    (i, f, g, o), c and h with the initial ones first (T + 1 each), and tanh(c)."""
    T, B, G = xp.shape
    H = G // 4
    with torch.autocast(xp.device.type, enabled=False):
        recurrent = fixed_weight_matmul(w_hh.to(matmul_dtype), B)  # h ↦ h @ W_hhᵀ
        gates = torch.empty_like(xp)
        cs = xp.new_empty(T + 1, B, H)
        hs = xp.new_empty(T + 1, B, H)
        tanh_cs = xp.new_empty(T, B, H)
        cs[0], hs[0] = c0, h0
        for t in range(T):
            g, c, c_new = gates[t], cs[t], cs[t + 1]
            torch.add(xp[t], recurrent(hs[t].to(matmul_dtype)), out=g)
            g[:, :H].addcmul_(c, p_i)
            g[:, H:2 * H].addcmul_(c, p_f)
            torch.sigmoid_(g[:, :2 * H])
            torch.tanh_(g[:, 2 * H:3 * H])
            torch.mul(g[:, H:2 * H], c, out=c_new)
            c_new.addcmul_(g[:, :H], g[:, 2 * H:3 * H])
            o = g[:, 3 * H:]
            o.addcmul_(c_new, p_o)
            torch.sigmoid_(o)
            torch.tanh(c_new, out=tanh_cs[t])
            torch.mul(o, tanh_cs[t], out=hs[t + 1])
    return gates, cs, hs, tanh_cs


class _PeepholeRecurrence(torch.autograd.Function):
    """The recurrence for training: in-place forward into (T, B, ·) buffers, hand-written backward."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, p_i, p_f, p_o, matmul_dtype):  # type: ignore[override]
        T = xp.size(0)
        gates, cs, hs, tanh_cs = _run(xp, h0, c0, w_hh.detach(), p_i.detach(), p_f.detach(), p_o.detach(),
                                      matmul_dtype)
        ctx.save_for_backward(gates, cs, hs, tanh_cs, w_hh, p_i, p_f, p_o)
        ctx.matmul_dtype = matmul_dtype
        return hs[1:], hs[T].clone(), cs[T].clone()

    @staticmethod
    def backward(ctx, d_out, d_h, d_c):  # type: ignore[override]
        gates, cs, hs, tanh_cs, w_hh, p_i, p_f, p_o = ctx.saved_tensors
        T, B, G = gates.shape
        H = G // 4
        matmul_dtype = ctx.matmul_dtype
        i, f, g, o = gates[..., :H], gates[..., H:2 * H], gates[..., 2 * H:3 * H], gates[..., 3 * H:]
        c_prev = cs[:-1]
        # Per-step factors, computed for the whole window at once:
        #   da_o = dh ⊙ tanh(c) ⊙ σ'(o)          dc  = dc_next + dh ⊙ o ⊙ tanh'(c) + da_o ⊙ p_o
        #   da_i = dc ⊙ g ⊙ σ'(i)    da_f = dc ⊙ c₋₁ ⊙ σ'(f)    da_g = dc ⊙ i ⊙ tanh'(g)
        #   dc₋₁ = dc ⊙ f + da_i ⊙ p_i + da_f ⊙ p_f             dh₋₁ = da @ W_hh
        to_o = tanh_cs * o * (1 - o)  # (T, B, H)
        to_c = o * (1 - tanh_cs * tanh_cs)
        ifg = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], dim=2)  # (T, B, 3, H)
        d_gates = torch.empty_like(gates)
        d3 = d_gates.view(T, B, 4, H)
        back = fixed_weight_matmul(w_hh.t().to(matmul_dtype), B)  # da ↦ da @ W_hh
        dh = torch.zeros_like(hs[0]) if d_h is None else d_h.clone()
        dc = torch.zeros_like(cs[0]) if d_c is None else d_c.clone()
        dct = torch.empty_like(dc)
        for t in reversed(range(T)):
            if d_out is not None:
                dh.add_(d_out[t])
            da = d_gates[t]
            torch.mul(dh, to_o[t], out=da[:, 3 * H:])
            torch.mul(dh, to_c[t], out=dct)
            dct.add_(dc).addcmul_(da[:, 3 * H:], p_o)
            torch.mul(ifg[t], dct.unsqueeze(1), out=d3[t, :, :3])
            torch.mul(dct, f[t], out=dc)
            dc.addcmul_(da[:, :H], p_i).addcmul_(da[:, H:2 * H], p_f)
            dh = back(da.to(matmul_dtype)).to(da.dtype)
        flat = d_gates.view(T * B, G)
        d_w_hh = (flat.t() @ hs[:-1].reshape(T * B, H)).to(w_hh.dtype)
        d_p_i = (d_gates[..., :H] * c_prev).sum((0, 1))
        d_p_f = (d_gates[..., H:2 * H] * c_prev).sum((0, 1))
        d_p_o = (d_gates[..., 3 * H:] * cs[1:]).sum((0, 1))
        return d_gates, dh, dc, d_w_hh, d_p_i, d_p_f, d_p_o, None
