"""``RNNLM``: embedding → multi-layer LSTM/GRU/tanh-RNN/peephole LSTM → dropout → linear head.

Parameter names are PyTorch's own (``rnn.weight_ih_l0``, …), so the recurrent weights load
straight into a plain ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (a peephole LSTM adds its peephole vectors,
``cells.py``).

With ``residual``, each stacked layer after the first adds its input to its output (a skip
connection: layer k+1 reads h_k + x_k), which shortens the gradient path through a deep stack. The
carried state is each layer's own h; the skip is added on the way up only.

Regularisation in training (AWD-LSTM, Merity et al. 2017), all off in eval mode:
- variational ("locked") dropout: one mask per stream for the whole window, on the embedding
  output (``input_dropout``), between layers and on the last layer's output (``dropout``);
- embedding dropout (``embed_dropout``): whole tokens, every use of a dropped token in the batch;
- weight drop (``weight_drop``): DropConnect on each hidden-to-hidden matrix, one mask per window.
  The dropped copy is passed to the same fused kernel (oneDNN / cuDNN) that ``nn.LSTM`` calls, one
  layer at a time; the stored weights never change.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import _VF, nn
from torch.backends.cudnn import rnn as cudnn_rnn

from charlm.model.cells import GATE_NAMES, PeepholeLSTM
from charlm.model.lstm_kernel import lstm_layer, trains_faster_by_hand
from charlm.config import ModelConfig
from charlm.errors import DeviceError

# An LSTM state is (h, c); GRU and RNN states are a single h. Each is (num_layers, B, hidden).
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}  # and "peephole": cells.PeepholeLSTM
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "peephole": 4}  # weight blocks: the rows of weight_ih are GATES × hidden


def has_cell_state(cell: str) -> bool:
    """Whether the cell carries (h, c) rather than h alone."""
    return cell in ("lstm", "peephole")


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``RNNLM(cfg).state_dict()`` by name, worked out without allocating anything
    (a checkpoint's claims are checked against these before a model is built)."""
    H, rows = cfg.hidden_size, GATES[cfg.cell] * cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (cfg.vocab_size, cfg.embed_size)}
    for k in range(cfg.num_layers):
        shapes[f"rnn.weight_ih_l{k}"] = (rows, cfg.embed_size if k == 0 else H)
        shapes[f"rnn.weight_hh_l{k}"] = (rows, H)
        shapes[f"rnn.bias_ih_l{k}"] = (rows,)
        shapes[f"rnn.bias_hh_l{k}"] = (rows,)
        if cfg.cell == "peephole":
            for gate in GATE_NAMES:
                shapes[f"rnn.peephole_{gate}_l{k}"] = (H,)
    shapes["head.weight"] = (cfg.vocab_size, H)
    shapes["head.bias"] = (cfg.vocab_size,)
    return shapes


def count_parameters(cfg: ModelConfig) -> int:
    """``RNNLM(cfg).num_parameters()`` without building the model (tied weights counted once)."""
    total = 0
    for name, shape in parameter_shapes(cfg).items():
        if not (cfg.tie_weights and name == "head.weight"):
            total += math.prod(shape)
    return total


class RNNLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_size)
        if cfg.cell == "peephole":
            self.rnn = PeepholeLSTM(cfg.embed_size, cfg.hidden_size, cfg.num_layers)
        else:
            extra = {"nonlinearity": "tanh"} if cfg.cell == "rnn" else {}
            # The dropout between layers is ours (variational), so the module's own is 0.
            self.rnn = _CELLS[cfg.cell](cfg.embed_size, cfg.hidden_size, cfg.num_layers, batch_first=True, **extra)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_weights:
            self.head.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding.weight, std=0.1 if not self.cfg.tie_weights else 0.05)
        if not self.cfg.tie_weights:
            nn.init.normal_(self.head.weight, std=self.cfg.hidden_size ** -0.5)
        nn.init.zeros_(self.head.bias)
        if has_cell_state(self.cfg.cell):
            # Forget-gate bias 1: remember by default, a standard LSTM trick that speeds early training.
            h = self.cfg.hidden_size
            for name, param in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    with torch.no_grad():
                        param[h:2 * h].fill_(1.0)
                        param[:h].zero_()
                        param[2 * h:].zero_()
                elif name.startswith("bias_hh"):
                    nn.init.zeros_(param)

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> State:
        shape = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)
        device = device if device is not None else self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        h = torch.zeros(shape, device=device, dtype=dtype)
        return (h, torch.zeros_like(h)) if has_cell_state(self.cfg.cell) else h

    def forward(self, x: torch.Tensor, state: State | None = None, *,
                with_outputs: bool = False) -> tuple[torch.Tensor, State] | tuple[torch.Tensor, State, tuple]:
        """Logits (B, T, V) and the new state; ``with_outputs`` adds the last layer's outputs
        before and after dropout (for activation regularisation)."""
        cfg, training = self.cfg, self.training
        emb = self.embedding(x)  # (B, T, E)
        if training and cfg.embed_dropout > 0:
            emb = emb * keep_mask((cfg.vocab_size,), cfg.embed_dropout, emb)[x].unsqueeze(-1)
        emb = locked_dropout(emb, cfg.dropout if cfg.input_dropout is None else cfg.input_dropout, training)
        region, emb = recurrence_region(emb)
        state = contiguous_state(state)  # cuDNN refuses a strided state (a slice of some streams)
        with region:
            if self._goes_layer_by_layer(emb):
                raw, state = self._layer_by_layer(emb, state)
            else:
                raw, state = self.rnn(emb, state)  # (B, T, H): all layers in one call (one fused kernel for nn.*)
        out = locked_dropout(raw, cfg.dropout, training)
        logits = self.head(out)
        return (logits, state, (raw, out)) if with_outputs else (logits, state)

    def _goes_layer_by_layer(self, x: torch.Tensor) -> bool:
        """Whether the recurrence runs a layer at a time: for dropout between layers, weight drop,
        skip connections and the hand-written bf16 CPU layer; and always for a stack on CUDA, whose
        layers each keep their weights in a buffer of their own there (``_cudnn_layers``)."""
        cfg, training = self.cfg, self.training
        return (cfg.residual or (training and (cfg.weight_drop > 0 or (cfg.dropout > 0 and cfg.num_layers > 1)))
                or (cfg.cell == "lstm" and trains_faster_by_hand(x, cfg.hidden_size))
                or (x.device.type == "cuda" and cfg.num_layers > 1 and cfg.cell != "peephole"))

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - nn.Module's signature
        """After a move (``.to``, ``.cuda``), lay each layer's weights out for cuDNN on its own."""
        moved = super()._apply(fn, *args, **kwargs)
        self._cudnn_layers()
        return moved

    def _layer_weights(self, k: int) -> list[torch.Tensor]:
        return [getattr(self.rnn, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def _cudnn_layers(self) -> None:
        """On CUDA, give each layer's four tensors a flat buffer of its own in cuDNN's layout, so a
        call per layer finds its weights in one chunk instead of copying them (and warning) each
        time. ``nn.LSTM`` flattens all layers into one buffer, which only its one-call path can use.
        A no-op on other devices, and where the layout is already so."""
        rnn = self.rnn
        if not isinstance(rnn, nn.RNNBase):
            return
        first = rnn.weight_ih_l0
        if not (first.is_cuda and torch.backends.cudnn.is_acceptable(first)
                and torch._use_cudnn_rnn_flatten_weight()) or self._cudnn_layers_ready():
            return
        mode = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN_TANH"}[self.cfg.cell]
        with torch.cuda.device_of(first), torch.no_grad():
            for k in range(self.cfg.num_layers):
                weights = self._layer_weights(k)
                torch._cudnn_rnn_flatten_weight(weights, 4, weights[0].size(1), cudnn_rnn.get_cudnn_mode(mode),
                                                self.cfg.hidden_size, 0, 1, True, False)

    def _cudnn_layers_ready(self) -> bool:
        """Whether every layer's weights lie one after another from the start of a buffer of their own."""
        for k in range(self.cfg.num_layers):
            weights = self._layer_weights(k)
            at = weights[0].untyped_storage().data_ptr()
            for w in weights:
                if w.data_ptr() != at or w.untyped_storage().data_ptr() != weights[0].untyped_storage().data_ptr():
                    return False
                at += w.numel() * w.element_size()
        return True

    def _layer_by_layer(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """The recurrence a layer at a time: variational dropout between layers, each
        hidden-to-hidden matrix through DropConnect into the kernel ``nn.LSTM`` itself calls, and
        the skip connections of ``residual``. Dropout and DropConnect apply in training only."""
        cfg, training = self.cfg, self.training
        if state is None:
            state = self.init_state(x.size(0), device=x.device, dtype=x.dtype)
        finals = []
        for k in range(cfg.num_layers):
            skip = x if cfg.residual and k > 0 else None
            if k > 0:
                x = locked_dropout(x, cfg.dropout, training)
            w_hh = getattr(self.rnn, f"weight_hh_l{k}")
            if training and cfg.weight_drop > 0:
                w_hh = w_hh * keep_mask(w_hh.shape, cfg.weight_drop, w_hh)
            weights = [getattr(self.rnn, f"weight_ih_l{k}"), w_hh, getattr(self.rnn, f"bias_ih_l{k}"),
                       getattr(self.rnn, f"bias_hh_l{k}")]
            if x.is_cuda and cfg.cell != "peephole":
                weights = _one_chunk(weights, fresh=training and cfg.weight_drop > 0)
            if cfg.cell == "peephole" or (cfg.cell == "lstm" and trains_faster_by_hand(x, cfg.hidden_size)):
                h, c = state  # type: ignore[misc]
                peepholes = self.rnn.peepholes(k) if cfg.cell == "peephole" else ()
                x, h_k, c_k = lstm_layer(x, h[k], c[k], *weights, *peepholes)
                finals.append((h_k[None], c_k[None]))
            elif cfg.cell == "lstm":
                h, c = state  # type: ignore[misc]
                x, h_k, c_k = _VF.lstm(x, (h[k:k + 1], c[k:k + 1]), weights, True, 1, 0.0, True, False, True)
                finals.append((h_k, c_k))
            else:
                run = _VF.gru if cfg.cell == "gru" else _VF.rnn_tanh
                x, h_k = run(x, state[k:k + 1], weights, True, 1, 0.0, True, False, True)  # type: ignore[index]
                finals.append(h_k)
            if skip is not None:
                x = x + skip.to(x.dtype)  # the undropped input: the identity path stays clean
        if has_cell_state(cfg.cell):
            return x, (torch.cat([h for h, _ in finals]), torch.cat([c for _, c in finals]))
        return x, torch.cat(finals)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once


# Where autocast would run the fused recurrent kernels in a format other than the one asked for:
# on CUDA, PyTorch's autocast wrapper for cuDNN RNNs (aten's AutocastRNN.cpp) casts input, state and
# weights to fp16 whatever the autocast dtype, and a bf16 run has no gradient scaler to keep fp16
# gradients from underflowing. There a bf16 run keeps the recurrence in fp32 (cuDNN uses TF32
# tensor cores for it) and runs the embedding and the head in bf16; fp16 runs, which have a
# scaler, keep cuDNN's fp16. tests/test_cuda.py checks the kernel's dtype on a GPU.
FP32_RECURRENCE_UNDER_BF16 = frozenset({"cuda"})


def recurrence_region(x: torch.Tensor) -> tuple[contextlib.AbstractContextManager, torch.Tensor]:
    """The autocast region the recurrence runs in, and its input: unchanged, except under bf16
    autocast on a device in ``FP32_RECURRENCE_UNDER_BF16`` (autocast off, the input in fp32)."""
    kind = x.device.type
    if kind in FP32_RECURRENCE_UNDER_BF16 and torch.is_autocast_enabled(kind) \
            and torch.get_autocast_dtype(kind) == torch.bfloat16:
        return torch.autocast(device_type=kind, enabled=False), x.float()
    return contextlib.nullcontext(), x


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per stream for the whole window (x is (B, T, F)): the same units are
    dropped at every time step, as variational dropout needs."""
    if not training or p <= 0:
        return x
    return x * keep_mask((x.size(0), 1, x.size(2)), p, x)


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, like: torch.Tensor) -> torch.Tensor:
    """A dropout mask of ``shape``: each entry 1/(1 - p) with probability 1 - p, else 0, in the
    dtype and on the device of ``like``.

    On a CPU, ``bernoulli_`` draws one generator call per entry: for a weight-drop mask (1600 × 400)
    that took ~6 ms of a ~50 ms word-model step. Here each 64-bit draw gives four 16-bit uniforms
    (random bits, so every lane is uniform), compared with p's 1/65536 quantile: ~5× faster. The
    probability of a drop is p to within 2⁻¹⁷. Other devices keep ``bernoulli_`` (fast there)."""
    if like.device.type != "cpu":
        return torch.empty(shape, device=like.device, dtype=like.dtype).bernoulli_(1 - p).div_(1 - p)
    n = math.prod(shape)
    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
    threshold = min(round(p * 65536) - 32768, 32767)  # P(bits < threshold) = p
    return (bits >= threshold).view(shape).to(like.dtype).mul_(1 / (1 - p))


def _one_chunk(weights: list[torch.Tensor], *, fresh: bool) -> list[torch.Tensor]:
    """A layer's weights as cuDNN takes them without a copy: views of one buffer, in order. The
    stored weights already are (``RNNLM._cudnn_layers``); a dropped-out copy of one of them
    (``fresh``) is laid out with the others in a new buffer, one copy a window, through autograd."""
    if not fresh:
        return weights
    flat = torch.cat([w.reshape(-1) for w in weights])
    views, at = [], 0
    for w in weights:
        views.append(flat[at:at + w.numel()].view(w.shape))
        at += w.numel()
    return views


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """``fn`` applied to each part of a state: (h, c) or h."""
    if isinstance(state, tuple):
        return tuple(fn(s) for s in state)  # type: ignore[return-value]
    return fn(state)


def contiguous_state(state: State | None) -> State | None:
    """The state with every part contiguous (a no-op where it is): cuDNN refuses strided ones."""
    return None if state is None else map_state(torch.Tensor.contiguous, state)


def detach_state(state: State | None) -> State | None:
    """Cut the graph at a window boundary: keep the values, drop the history."""
    return None if state is None else map_state(torch.Tensor.detach, state)


def select_state(state: State, index: int | slice) -> State:
    """The state of some streams only (dimension 1 is the stream), contiguous."""
    return map_state(lambda s: s[:, index].contiguous(), state)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; asking for a missing device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise DeviceError("--device mps: Apple MPS is not available here (use --device cpu or auto)")
    if name not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device must be auto, cpu, cuda or mps (got {name!r})")
    return torch.device(name)
