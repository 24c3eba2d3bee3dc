"""One-token-at-a-time inference for sampling, without nn.LSTM's per-call overhead.

Sampling runs the model one token at a time, where ``nn.LSTM`` spends most of each call on set-up
(argument checks, weight flattening, oneDNN primitive creation, output allocation) rather than on
arithmetic. ``FastStep`` does the arithmetic alone:

* the first layer's input projection is folded into a lookup table, ``embedding @ W_ih0ᵀ + biases``
  (V × gates), so a token's contribution is one row gather;
* every other weight is transposed once, and layers ≥ 1 multiply ``[input | h]`` by the stacked
  ``[W_ih; W_hh]ᵀ`` in a single matmul;
* all buffers are allocated once per batch size and written with ``out=`` (no per-step allocation);
* no autograd (``inference_mode``);
* on a CPU the products may go through oneDNN with each weight reordered once per batch size
  (``lstm_kernel.fixed_weight_matmul``): faster on some CPUs (AVX-512), slower on others (AVX2
  only), so each machine measures both once per model shape and batch size (``faster_products``,
  kept by ``machine.py``) and uses the faster.

The same code serves B parallel streams, where the matmuls amortise much better. ``step`` equals the
model's ``forward`` on one token (tested to 1e-5 against ``nn.LSTM``/``nn.GRU``/``nn.RNN``).

On CUDA a step is ~40 small kernels, each launched from Python: ``reset`` captures one step in a
CUDA graph (its buffers are already fixed per batch size) and ``step`` replays it, one launch a
token; where capture fails, steps run as before (eager).

With ``dtype=torch.bfloat16`` the recurrent and output matmuls run in bf16 (their weights stored so,
their products added to float32 gates); the state and the gate arithmetic stay float32. On CPUs with
native bf16 this is what lifts many-stream sampling past fp32's matmul ceiling.
"""
from __future__ import annotations

from typing import Callable

import torch

from charlm.model.lstm_kernel import fixed_weight_matmul, onednn_linear_works
from charlm.machine import alternated, milliseconds, remembered
from charlm.model.lm import GATES, RNNLM, State, has_cell_state


class FastStep:
    """A frozen copy of an ``RNNLM``'s weights laid out for single-token steps."""

    @torch.inference_mode()
    def __init__(self, model: RNNLM, *, dtype: torch.dtype = torch.float32, prepacked: bool | None = None,
                 graphed: bool = True) -> None:
        cfg = model.cfg
        self.model = model
        self.dtype = dtype
        self.prepacked = prepacked  # None: whichever this machine measured faster (faster_products)
        self.graphed = graphed  # on CUDA: replay a captured step (``_capture``)
        self.graph = None
        self.cell, self.num_layers, self.hidden = cfg.cell, cfg.num_layers, cfg.hidden_size
        self.residual = cfg.residual
        self.vocab_size = cfg.vocab_size
        rnn, H = model.rnn, cfg.hidden_size
        self.device = model.embedding.weight.device
        w = lambda name: getattr(rnn, name).detach().float()  # noqa: E731
        emb = model.embedding.weight.detach().float()
        # GRU keeps the hidden-side bias apart: its candidate gate multiplies it by the reset gate.
        split_hh_bias = cfg.cell == "gru"
        bias0 = w("bias_ih_l0") + (0 if split_hh_bias else w("bias_hh_l0"))
        self.table = (emb @ w("weight_ih_l0").t() + bias0).contiguous()  # (V, G·H)
        low = lambda t: t.to(dtype).contiguous()  # noqa: E731  (matmul operands only)
        self.w_hh = [low(w(f"weight_hh_l{k}").t()) for k in range(self.num_layers)]  # (H, G·H)
        self.b_hh = [w(f"bias_hh_l{k}") for k in range(self.num_layers)]
        # Layers ≥ 1: one matmul of [input | h] (B, 2H) with [W_ih; W_hh]ᵀ (2H, G·H).
        self.w_stack = [low(torch.cat([w(f"weight_ih_l{k}").t(), w(f"weight_hh_l{k}").t()]))
                        for k in range(1, self.num_layers)] if not split_hh_bias else []
        self.b_stack = [w(f"bias_ih_l{k}") + w(f"bias_hh_l{k}")
                        for k in range(1, self.num_layers)] if not split_hh_bias else []
        self.w_ih = [low(w(f"weight_ih_l{k}").t()) for k in range(1, self.num_layers)] if split_hh_bias else []
        self.b_ih = [w(f"bias_ih_l{k}") for k in range(1, self.num_layers)] if split_hh_bias else []
        self.head_w = low(model.head.weight.detach().float().t())  # (H, V)
        self.head_b = model.head.bias.detach().float()
        self.gates = GATES[cfg.cell] * H
        # A peephole LSTM's gates i and f see c₋₁, and o the new c, through these vectors (each (H,)).
        self.peepholes = [[p.detach().float() for p in rnn.peepholes(k)]
                          for k in range(self.num_layers)] if cfg.cell == "peephole" else []
        self.batch_size = 0
        self._products: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}  # by id of the weight

    def reset(self, batch_size: int, state: State | None = None) -> None:
        """Allocate the buffers for ``batch_size`` streams and load ``state`` (zeros if None)."""
        B, H, L = batch_size, self.hidden, self.num_layers
        zeros = lambda *shape: torch.zeros(*shape, device=self.device)  # noqa: E731
        self.batch_size = B
        prepacked = self.prepacked if self.prepacked is not None else faster_products(self.model, self.dtype, B)
        self._products = {}
        if prepacked:  # each weight reordered once for this batch size (lstm_kernel.fixed_weight_matmul)
            weights = [*self.w_hh, *self.w_stack, *self.w_ih, self.head_w]
            self._products = {id(w): fixed_weight_matmul(w.t().contiguous(), B) for w in weights}
        # xh[k] = [input of layer k | h of layer k]; layer k writes its h into xh[k][:, H:] and,
        # as the next layer's input, into xh[k + 1][:, :H] (the head reads xh[L][:, :H]).
        self.xh = [zeros(B, 2 * H) for _ in range(L + 1)]
        self.c = [zeros(B, H) for _ in range(L)]
        self.g = zeros(B, self.gates)
        self.gh = zeros(B, self.gates)  # GRU's hidden-side product
        self.tmp = zeros(B, H)
        self.logits = zeros(B, self.vocab_size)
        self.tokens = torch.zeros(B, dtype=torch.long, device=self.device)
        if state is not None:
            h, c = state if isinstance(state, tuple) else (state, None)
            for k in range(L):
                self.xh[k][:, H:] = h[k]
                if c is not None:
                    self.c[k].copy_(c[k])
        self.graph = self._capture() if self.graphed and self.device.type == "cuda" else None

    @torch.inference_mode()
    def _capture(self) -> "torch.cuda.CUDAGraph | None":
        """One step recorded as a CUDA graph on this batch size's buffers, the state left as it was
        (the warm-up steps it runs first are undone); None where capture fails (eager steps then)."""
        kept = [t.clone() for t in (*self.xh, *self.c)]
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # cuBLAS workspaces and the allocator's pools, outside the graph
                    self._step(self.tokens)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(self.tokens)
        except RuntimeError:
            graph = None
        for buffer, value in zip((*self.xh, *self.c), kept):
            buffer.copy_(value)
        return graph

    def state(self) -> State:
        """The current state in ``nn.LSTM``'s layout: (h, c) or h, each (L, B, H)."""
        H = self.hidden
        h = torch.stack([self.xh[k][:, H:] for k in range(self.num_layers)])
        return (h, torch.stack(self.c)) if has_cell_state(self.cell) else h

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for the next token after ``tokens`` (B,); the returned tensor is reused."""
        if self.graph is not None:
            self.tokens.copy_(tokens)
            self.graph.replay()
            return self.logits
        return self._step(tokens)

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        H = self.hidden
        for k in range(self.num_layers):
            h_prev = self.xh[k][:, H:]
            g = self.g
            if k == 0:
                torch.index_select(self.table, 0, tokens, out=g)
                if self.cell == "gru":
                    self._addmm(self.b_hh[0], h_prev, self.w_hh[0], self.gh)
                else:
                    self._addmm(g, h_prev, self.w_hh[0], g)
            elif self.cell == "gru":
                self._addmm(self.b_ih[k - 1], self.xh[k][:, :H], self.w_ih[k - 1], g)
                self._addmm(self.b_hh[k], h_prev, self.w_hh[k], self.gh)
            else:
                self._addmm(self.b_stack[k - 1], self.xh[k], self.w_stack[k - 1], g)
            h_out = self.xh[k + 1][:, :H]
            if self.cell == "lstm":
                i, f, gg, o = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
                torch.sigmoid_(g[:, :2 * H])
                torch.sigmoid_(o)
                torch.tanh_(gg)
                c = self.c[k]
                c.mul_(f).addcmul_(i, gg)  # c = f·c + i·g
                torch.tanh(c, out=self.tmp)
                torch.mul(o, self.tmp, out=h_out)
            elif self.cell == "peephole":
                i, f, gg, o = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
                p_i, p_f, p_o = self.peepholes[k]
                c = self.c[k]
                i.addcmul_(c, p_i)
                f.addcmul_(c, p_f)
                torch.sigmoid_(g[:, :2 * H])
                torch.tanh_(gg)
                c.mul_(f).addcmul_(i, gg)  # c = f·c + i·g
                o.addcmul_(c, p_o)  # the output gate looks at the new c
                torch.sigmoid_(o)
                torch.tanh(c, out=self.tmp)
                torch.mul(o, self.tmp, out=h_out)
            elif self.cell == "gru":
                gh = self.gh
                rz = g[:, :2 * H].add_(gh[:, :2 * H]).sigmoid_()
                r, z = rz[:, :H], rz[:, H:]
                n = g[:, 2 * H:].addcmul_(r, gh[:, 2 * H:]).tanh_()  # n = tanh(x_n + r·(h_n))
                # h = (1 - z)·n + z·h = n + z·(h - n)
                torch.sub(h_prev, n, out=self.tmp)
                torch.addcmul(n, z, self.tmp, out=h_out)
            else:
                torch.tanh(g, out=h_out)
            h_prev.copy_(h_out)
            if self.residual and k > 0:
                h_out.add_(self.xh[k][:, :H])  # the next layer reads h_k + x_k; the state keeps h_k
        return self._addmm(self.head_b, self.xh[self.num_layers][:, :H], self.head_w, self.logits)

    def _addmm(self, bias: torch.Tensor, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = bias + a @ w (``bias`` may be ``out`` itself), the product in the weights' dtype."""
        product = self._products.get(id(w))
        if product is not None:
            return torch.add(bias, product(a.to(w.dtype)), out=out)
        if w.dtype == torch.float32:
            if bias is out:
                return out.addmm_(a, w)
            return torch.addmm(bias, a, w, out=out)
        return torch.add(bias, torch.mm(a.to(w.dtype), w), out=out)


def batch_bucket(batch_size: int) -> str:
    """Batch sizes that share one measured choice: 1, up to 8, up to 64, more."""
    return "1" if batch_size == 1 else "2-8" if batch_size <= 8 else "9-64" if batch_size <= 64 else "65+"


def faster_products(model: RNNLM, dtype: torch.dtype, batch_size: int) -> bool:
    """Whether this CPU steps ``model`` faster with oneDNN's prepacked products than with plain
    matmuls at this batch size: both timed once per machine, model shape, dtype and batch bucket
    (alternating rounds, a few hundred milliseconds), the answer kept (``machine.remembered``)."""
    if model.embedding.weight.device.type != "cpu" or not onednn_linear_works(dtype):
        return False
    cfg = model.cfg
    key = (f"{cfg.cell} {cfg.num_layers}x{cfg.hidden_size} vocab {cfg.vocab_size} {str(dtype).removeprefix('torch.')}"
           f" batch {batch_bucket(batch_size)}")
    answer = remembered("sampler products", key, lambda: time_products(model, dtype, batch_size),
                        valid=lambda kept: isinstance(kept, dict) and kept.get("chosen") in ("prepacked", "plain"))
    return answer["chosen"] == "prepacked"


def time_products(model: RNNLM, dtype: torch.dtype, batch_size: int, *, rounds: int = 3,
                  steps: int = 20) -> dict:
    """Milliseconds per step with prepacked and with plain products, medians of alternating rounds."""
    tokens = torch.zeros(batch_size, dtype=torch.long)
    measures = []
    for flag in (True, False):
        stepper = FastStep(model, dtype=dtype, prepacked=flag, graphed=False)
        stepper.reset(batch_size)
        measures.append(milliseconds(lambda stepper=stepper: stepper.step(tokens), calls=steps, warm=3))
    prepacked, plain = alternated(rounds, *measures)
    return {"prepacked_ms": prepacked, "plain_ms": plain, "chosen": "prepacked" if prepacked < plain else "plain"}
