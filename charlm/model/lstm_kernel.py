"""The hand-written LSTM layer: the peephole LSTM's recurrence (``cells.PeepholeLSTM``), and the
plain LSTM layer the trainer runs wide bf16 LSTMs through on a CPU, where oneDNN's kernel is slow.

Neither cuDNN nor oneDNN has a peephole kernel, and autograd over a Python loop of a dozen small ops
per step records hundreds of graph nodes per window. So a layer is computed as
- the input projection of the whole window in ONE matmul (autograd handles it);
- the recurrence in ``_Recurrence``, a custom autograd Function: per step one matmul and the gate
  arithmetic written in place into preallocated buffers; its hand-written backward runs the steps in
  reverse (one matmul and a dozen elementwise ops on (B, ·) slices each) and forms the weight
  gradient in one matmul at the end.
Without the peephole terms the same code is a plain LSTM layer: oneDNN's fused LSTM kernel spends
~4× its forward time in its bf16 backward, so wide LSTMs train faster through this one under CPU bf16
autocast (``trains_faster_by_hand``; the evaluator and the sampler keep oneDNN's kernel).
The step products go through ``fixed_weight_matmul`` (oneDNN with the weight reordered once per
window). Evaluation runs the same in-place loop and keeps nothing for backward; an ONNX export
traces a plain functional loop that does the same sums. Sampling has its own step (``infer/step.py``).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import _VF

from charlm.machine import alternated, milliseconds, remembered


def fixed_weight_matmul(weight: torch.Tensor, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ x @ weightᵀ`` for many ``x`` of ``batch_size`` rows and one ``weight`` (N, K), as a
    recurrence needs at every step.

    On a CPU it multiplies through oneDNN's linear with the weight reordered once into oneDNN's
    blocked layout, which is what its own fused LSTM does, and which runs a step's skinny products
    (64 × 512 by 512 × 2048) about twice as fast as ``torch.mm`` alone. Those ops
    (``torch.ops.mkldnn``) are the ones PyTorch's compiler uses, not public API, so they are tried
    once per dtype on a small product and ``torch.mm`` serves wherever they are absent or disagree.
    """
    if weight.device.type == "cpu" and onednn_linear_works(weight.dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    transposed = weight.t().contiguous()
    return lambda x: x @ transposed


@functools.cache
def onednn_linear_works(dtype: torch.dtype) -> bool:
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


# Below this width oneDNN's fused kernel trained bf16 windows faster on every CPU measured
# (benchmarks/README.md, "The LSTM layer"); from it both are timed on the machine, once per shape,
# and the faster one trains.
HAND_WRITTEN_BF16_MIN_HIDDEN = 768


def trains_faster_by_hand(x: torch.Tensor, hidden_size: int) -> bool:
    """Whether an LSTM layer over ``x`` should run as ``lstm_layer`` rather than ``nn.LSTM``'s kernel:
    on a CPU, with gradients, under bf16 autocast, from ``HAND_WRITTEN_BF16_MIN_HIDDEN`` units, where
    this machine measured it faster (``faster_by_hand``)."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and hidden_size >= HAND_WRITTEN_BF16_MIN_HIDDEN
            and faster_by_hand(x.size(0), x.size(-1), hidden_size))


def faster_by_hand(batch_size: int, input_size: int, hidden_size: int) -> bool:
    """Whether ``lstm_layer`` trains a bf16 window of this shape faster than oneDNN's kernel on this
    CPU: both timed once per machine and shape (``time_bf16_layers``), the answer kept."""
    key = f"hidden {hidden_size} input {input_size} batch {batch_size}"
    answer = remembered("bf16 lstm layer", key, lambda: time_bf16_layers(batch_size, input_size, hidden_size),
                        valid=lambda kept: isinstance(kept, dict) and kept.get("chosen") in ("by hand", "onednn"))
    return answer["chosen"] == "by hand"


def time_bf16_layers(batch_size: int, input_size: int, hidden_size: int, *, steps: int = 50,
                     rounds: int = 2) -> dict:
    """Milliseconds of one bf16 window (forward and backward) through oneDNN's LSTM kernel and
    through ``lstm_layer``: medians of alternating rounds after a warm-up of each."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, steps, input_size, generator=generator).requires_grad_()
    h0, c0 = torch.zeros(batch_size, hidden_size), torch.zeros(batch_size, hidden_size)
    weights = [(torch.randn(4 * hidden_size, n, generator=generator) * 0.05).requires_grad_()
               for n in (input_size, hidden_size)] + [torch.zeros(4 * hidden_size, requires_grad=True) for _ in "ab"]

    def onednn() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _VF.lstm(x, (h0[None], c0[None]), weights, True, 1, 0.0, True, False, True)[0]
        out.float().sum().backward()

    def by_hand() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lstm_layer(x, h0, c0, *weights)[0]
        out.float().sum().backward()

    with torch.enable_grad():
        try:
            for run in (onednn, by_hand):
                run()
            onednn_ms, by_hand_ms = alternated(rounds, milliseconds(onednn), milliseconds(by_hand))
        except RuntimeError as exc:  # no bf16 kernel in oneDNN here: the hand-written layer is the one that runs
            return {"onednn_ms": None, "by_hand_ms": None, "chosen": "by hand", "why": str(exc).splitlines()[0]}
    return {"onednn_ms": onednn_ms, "by_hand_ms": by_hand_ms,
            "chosen": "by hand" if by_hand_ms < onednn_ms else "onednn"}


def lstm_layer(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
               b_ih: torch.Tensor, b_hh: torch.Tensor, p_i: torch.Tensor | None = None,
               p_f: torch.Tensor | None = None, p_o: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer over a window: x (B, T, F), h0 and c0 (B, H) → out (B, T, H), h, c; with
    peephole vectors ``p_i, p_f, p_o`` a peephole layer, without them (None) a plain ``nn.LSTM`` layer.

    The state and the gate arithmetic are float32 (float64 if the state is); under autocast the
    matmuls run in the autocast dtype, as ``nn.LSTM``'s do."""
    dtype = h0.dtype
    device_type = x.device.type
    matmul_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype
    peepholes = None if p_i is None else (p_i, p_f, p_o)
    # The input projection of the whole window (T, B, 4H), in the matmul format (bf16 under autocast):
    # the recurrence adds it to each step's product in float32, and its gradient comes back in that format.
    xp = F.linear(x.transpose(0, 1), w_ih, b_ih + b_hh)
    xp = (xp if xp.dtype == matmul_dtype else xp.to(dtype)).contiguous()
    c0 = c0.to(dtype)
    # A tracer (ONNX export) must see the functional loop: the Function's in-place buffers are opaque to it.
    if torch.jit.is_tracing():
        out, h, c = _recurrence(xp, h0, c0, w_hh, peepholes, matmul_dtype)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (xp, h0, c0, w_hh, *(peepholes or ()))):
        out, h, c = _Recurrence.apply(xp, h0, c0, w_hh, matmul_dtype, *(peepholes or ()))
    else:  # evaluation: the training loop's buffers, nothing kept
        detached = None if peepholes is None else tuple(p.detach() for p in peepholes)
        buffers = _run(xp, h0, c0, w_hh.detach(), detached, matmul_dtype)
        out, h, c = buffers.hs[1:], buffers.hs[-1], buffers.cs[-1]
    return out.transpose(0, 1), h, c


def _recurrence(xp: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor,
                peepholes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, matmul_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recurrence written functionally, for a tracer (ONNX export) and as the tests' reference:
    xp (T, B, 4H) → out (T, B, H), h, c."""
    w_t = w_hh.t().to(matmul_dtype)
    p_i, p_f, p_o = peepholes if peepholes is not None else (0.0, 0.0, 0.0)
    outs = []
    for t in range(xp.size(0)):
        g = xp[t].to(c.dtype) + (h.to(matmul_dtype) @ w_t).to(c.dtype)
        a_i, a_f, a_g, a_o = g.chunk(4, dim=1)
        i = torch.sigmoid(a_i + p_i * c)
        f = torch.sigmoid(a_f + p_f * c)
        c = f * c + i * torch.tanh(a_g)
        h = torch.sigmoid(a_o + p_o * c) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


class _Buffers(NamedTuple):
    """What the forward loop writes: the gates after their nonlinearities (T of (B, 4H): i, f, g, o),
    c and h with the initial ones first (T + 1 each), tanh(c), and h in the matmul format
    (``hs`` itself when that is the state's)."""

    gates: list[torch.Tensor]  # a (B, 4H) tensor a step: each small enough for the heap (memory.keep_freed_memory)
    cs: torch.Tensor
    hs: torch.Tensor
    tanh_cs: torch.Tensor
    hs_matmul: torch.Tensor


def _run(xp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
         peepholes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, matmul_dtype: torch.dtype) -> _Buffers:
    """The recurrence in place into (T, B, ·) buffers: per step one matmul and a few elementwise
    ops on (B, ·) slices that stay in cache."""
    T, B, G = xp.shape
    H = G // 4
    dtype = c0.dtype
    with torch.autocast(xp.device.type, enabled=False):
        recurrent = fixed_weight_matmul(w_hh.to(matmul_dtype), B)  # h ↦ h @ W_hhᵀ
        gates = [xp.new_empty(B, G, dtype=dtype) for _ in range(T)]
        cs = xp.new_empty(T + 1, B, H, dtype=dtype)
        hs = xp.new_empty(T + 1, B, H, dtype=dtype)
        hs_matmul = hs if matmul_dtype == dtype else xp.new_empty(T + 1, B, H, dtype=matmul_dtype)
        tanh_cs = xp.new_empty(T, B, H, dtype=dtype)
        cs[0], hs[0] = c0, h0
        if hs_matmul is not hs:
            hs_matmul[0] = h0
        for t in range(T):
            g, c, c_new = gates[t], cs[t], cs[t + 1]
            g.copy_(xp[t])
            g.add_(recurrent(hs_matmul[t]))
            # tanh(a) = 2σ(2a) − 1: PyTorch's CPU tanh takes ~3× σ's time, so the g gate joins the σ of
            # the others (a peephole's o waits for the new c) and tanh(c) is formed the same way
            g_gate = g[:, 2 * H:3 * H]
            g_gate.mul_(2)
            if peepholes is not None:
                g[:, :H].addcmul_(c, peepholes[0])
                g[:, H:2 * H].addcmul_(c, peepholes[1])
                torch.sigmoid_(g[:, :3 * H])
            else:
                torch.sigmoid_(g)
            g_gate.mul_(2).sub_(1)
            torch.mul(g[:, H:2 * H], c, out=c_new)
            c_new.addcmul_(g[:, :H], g_gate)
            o = g[:, 3 * H:]
            if peepholes is not None:
                o.addcmul_(c_new, peepholes[2])
                torch.sigmoid_(o)
            tanh_c = tanh_cs[t]
            torch.sigmoid_(torch.mul(c_new, 2, out=tanh_c)).mul_(2).sub_(1)
            torch.mul(o, tanh_c, out=hs[t + 1])
            if hs_matmul is not hs:
                hs_matmul[t + 1].copy_(hs[t + 1])
    return _Buffers(gates, cs, hs, tanh_cs, hs_matmul)


class _Recurrence(torch.autograd.Function):
    """The recurrence for training: in-place forward into (T, B, ·) buffers, hand-written backward
    (per step one matmul and a few elementwise ops; the weight gradient in one matmul at the end,
    in the matmul format, as autocast's own linear layers form theirs)."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, matmul_dtype, *peepholes):  # type: ignore[override]
        T = xp.size(0)
        buffers = _run(xp, h0, c0, w_hh.detach(), tuple(p.detach() for p in peepholes) or None, matmul_dtype)
        ctx.save_for_backward(*buffers[1:], w_hh, *peepholes)
        ctx.gates = buffers.gates  # intermediate results, not the Function's inputs or outputs
        ctx.matmul_dtype, ctx.xp_dtype = matmul_dtype, xp.dtype
        return buffers.hs[1:], buffers.hs[T].clone(), buffers.cs[T].clone()

    @staticmethod
    def backward(ctx, d_out, d_h, d_c):  # type: ignore[override]
        cs, hs, tanh_cs, hs_matmul, w_hh, *peepholes = ctx.saved_tensors
        gates = ctx.gates
        T, (B, G) = len(gates), gates[0].shape
        H = G // 4
        matmul_dtype = ctx.matmul_dtype
        # Per step, with σ' = s(1 - s) and tanh' = 1 - t²:
        #   da_o = dh ⊙ tanh(c) ⊙ σ'(o)          dc  = dc_next + dh ⊙ o ⊙ tanh'(c) [+ da_o ⊙ p_o]
        #   da_i = dc ⊙ g ⊙ σ'(i)    da_f = dc ⊙ c₋₁ ⊙ σ'(f)    da_g = dc ⊙ i ⊙ tanh'(g)
        #   dc₋₁ = dc ⊙ f [+ da_i ⊙ p_i + da_f ⊙ p_f]            dh₋₁ = da @ W_hh
        # The gates' gradients: in the matmul format for the whole window (the weight gradient's one
        # matmul needs them all), in the state's format a step at a time (a window of them for the
        # peepholes' sums, or where that is the matmul format). Formed in a step's buffer, which stays
        # in cache, and copied into the window once: products written straight into a slice of the
        # bf16 window convert through a temporary each and miss the cache.
        d_matmul = cs.new_empty(T, B, G, dtype=matmul_dtype)
        window = d_matmul if matmul_dtype == cs.dtype else cs.new_empty(T, B, G) if peepholes else None
        step_buffer = torch.empty_like(gates[0])
        back = fixed_weight_matmul(w_hh.t().to(matmul_dtype), B)  # da ↦ da @ W_hh
        dh = torch.zeros_like(hs[0]) if d_h is None else d_h.clone()
        dc = torch.zeros_like(cs[0]) if d_c is None else d_c.clone()
        if d_out is not None:
            dh.add_(d_out[T - 1])
        slope, derivative = torch.empty_like(gates[0]), torch.empty_like(dc)
        for t in reversed(range(T)):
            s, da = gates[t], step_buffer if window is None else window[t]
            i, f, g, o = s[:, :H], s[:, H:2 * H], s[:, 2 * H:3 * H], s[:, 3 * H:]
            torch.addcmul(s, s, s, value=-1, out=slope)  # σ' = s − s² of every gate (the g slot is replaced next)
            ig = slope[:, 2 * H:3 * H]
            torch.addcmul(i, i, torch.mul(g, g, out=ig), value=-1, out=ig)  # i ⊙ tanh'(g)
            tanh_c = tanh_cs[t]
            torch.addcmul(o, o, torch.mul(tanh_c, tanh_c, out=derivative), value=-1, out=derivative)  # o ⊙ tanh'(c)
            torch.mul(dh, tanh_c, out=da[:, 3 * H:]).mul_(slope[:, 3 * H:])  # da_o
            dc.addcmul_(dh, derivative)
            if peepholes:
                dc.addcmul_(da[:, 3 * H:], peepholes[2])
            torch.mul(dc, g, out=da[:, :H]).mul_(slope[:, :H])  # da_i
            torch.mul(dc, cs[t], out=da[:, H:2 * H]).mul_(slope[:, H:2 * H])  # da_f
            torch.mul(dc, ig, out=da[:, 2 * H:3 * H])  # da_g
            dc.mul_(f)
            if peepholes:
                dc.addcmul_(da[:, :H], peepholes[0]).addcmul_(da[:, H:2 * H], peepholes[1])
            if window is not d_matmul:
                d_matmul[t].copy_(da)
            if t and d_out is not None:  # dh₋₁, with the output's gradient of step t − 1
                torch.add(back(d_matmul[t]), d_out[t - 1], out=dh)
            else:
                dh.copy_(back(d_matmul[t]))
        d_w_hh = (d_matmul.view(T * B, G).t() @ hs_matmul[:-1].reshape(T * B, H)).to(w_hh.dtype)
        d_peepholes = () if not peepholes else (
            (window[..., :H] * cs[:-1]).sum((0, 1)), (window[..., H:2 * H] * cs[:-1]).sum((0, 1)),
            (window[..., 3 * H:] * cs[1:]).sum((0, 1)))
        d_xp = d_matmul if ctx.xp_dtype == matmul_dtype else d_matmul.to(ctx.xp_dtype)
        return (d_xp, dh, dc, d_w_hh, None, *d_peepholes)
