"""Export a model to ONNX as a graph of ONE time step, with the recurrent state as inputs and outputs.

    tokens (B,) int64 ─┐                        ┌─▶ logits (B, V)
    h (L, B, H) ───────┼──▶ embed → RNN → head ─┼─▶ h_out (L, B, H)
    c (L, B, H) ───────┘  (LSTM, peephole LSTM) └─▶ c_out (L, B, H)

A step graph is what a runtime generating text needs: it samples a token from ``logits``, feeds it
back with ``h_out``/``c_out`` as the next ``h``/``c``, and starts from zeros. (Scoring a whole text
at once is what PyTorch is for.) The batch axis is dynamic unless a batch size is fixed.

We use PyTorch's TorchScript-based exporter (``dynamo=False``): the torch.export-based one wrote
LSTM graphs that did not reproduce the model (logits off by up to 0.2 with non-zero biases) and took
seconds instead of a fraction of one. ``check_onnx`` runs the exported graph next to the model so any exporter change
that breaks this shows up at once.

Needs the ``onnx`` package to export and ``onnxruntime`` to check: ``pip install "charlm[export]"``.
"""
from __future__ import annotations

import copy
import inspect
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from charlm.fsutil import atomic_write
from charlm.model.checkpoint import Checkpoint
from charlm.errors import ExportError, MissingDependencyError
from charlm.model.lm import RNNLM, has_cell_state
from charlm.data.tokenizer import Tokenizer

DEFAULT_OPSET = 17
FORMAT = "charlm-onnx/1"


class _Step(nn.Module):
    """One step of the model: (tokens, h) → (logits, h_out), or (tokens, h, c) → (logits, h_out, c_out)
    for the cells with a cell state. The model's own eval-mode forward is what gets traced."""

    def __init__(self, model: RNNLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new_state = self.model(tokens[:, None], state if len(state) == 2 else state[0])  # (B, 1, V)
        return (logits[:, 0],) + (new_state if isinstance(new_state, tuple) else (new_state,))


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    sidecar: Path | None  # the JSON description (tokenizer, config), when a tokenizer was given
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    batch_size: int | None  # None: any batch size at run time


def io_names(cell: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if has_cell_state(cell):
        return ("tokens", "h", "c"), ("logits", "h_out", "c_out")
    return ("tokens", "h"), ("logits", "h_out")


def export_onnx(model: RNNLM, path: str | os.PathLike[str], *, batch_size: int | None = None,
                opset: int = DEFAULT_OPSET, tokenizer: Tokenizer | None = None) -> OnnxExport:
    """Write the one-step ONNX graph of ``model`` to ``path`` (atomically); see the module docstring.

    ``batch_size`` None gives a dynamic batch axis; a number fixes it, for runtimes that want
    static shapes. With ``tokenizer``, a sidecar ``<path>.json`` records the vocabulary and the
    model config, so the graph can be used without charlm.
    """
    if batch_size is not None and batch_size < 1:
        raise ExportError(f"batch size must be ≥ 1 (got {batch_size})")
    if opset < 17:
        raise ExportError(f"opset must be ≥ 17 (got {opset})")
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError('exporting to ONNX needs the onnx package: pip install "charlm[export]"') from None

    # A CPU fp32 copy in eval mode: no dropout in the graph, and the caller's model is untouched.
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    cfg = cpu_model.cfg
    step = _Step(cpu_model)
    inputs, outputs = io_names(cfg.cell)
    example_batch = batch_size or 1
    state = torch.zeros(cfg.num_layers, example_batch, cfg.hidden_size)
    args = (torch.zeros(example_batch, dtype=torch.int64),) + (state,) * (len(inputs) - 1)
    dynamic_axes = None
    if batch_size is None:
        dynamic_axes = {name: {0 if name in ("tokens", "logits") else 1: "batch"} for name in inputs + outputs}

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The exporter warns that it is the legacy one and that tracing sees Python bools; the
            # parity check, not these warnings, is what tells whether the graph is right.
            warnings.simplefilter("ignore")
            # torch < 2.5 has only the TorchScript exporter and no ``dynamo`` argument.
            legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(step, args, buffer, input_names=list(inputs), output_names=list(outputs),
                              dynamic_axes=dynamic_axes, opset_version=opset, **legacy)
        graph = onnx.load_from_string(buffer.getvalue())
        onnx.checker.check_model(graph)
    except Exception as exc:  # the exporter raises many types; all mean the same thing to the user
        raise ExportError(f"torch.onnx.export failed for a {cfg.cell} model: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    path = Path(path)
    atomic_write(path, buffer.getvalue())
    sidecar = None
    if tokenizer is not None:
        sidecar = path.with_name(path.name + ".json")
        description = {
            "format": FORMAT, "opset": opset, "model_config": cfg.to_dict(), "tokenizer": tokenizer.to_dict(),
            "inputs": {name: _shape(name, cfg.num_layers, cfg.hidden_size, batch_size) for name in inputs},
            "outputs": {name: _shape(name, cfg.num_layers, cfg.hidden_size, batch_size, cfg.vocab_size)
                        for name in outputs},
            "usage": "start from zero h (and c); feed each output state back as the next input state",
        }
        atomic_write(sidecar, (json.dumps(description, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    return OnnxExport(path, sidecar, inputs, outputs, opset, batch_size)


def _shape(name: str, layers: int, hidden: int, batch: int | None, vocab: int | None = None) -> list:
    b = batch if batch is not None else "batch"
    if name == "tokens":
        return [b]
    if name == "logits":
        return [b, vocab]
    return [layers, b, hidden]


def check_onnx(model: RNNLM, path: str | os.PathLike[str], *, steps: int = 8, batch_size: int = 3,
               seed: int = 0, tolerance: float = 1e-4) -> float:
    """Run the exported graph and the model side by side on random tokens for ``steps`` steps.

    Returns the largest absolute difference seen in the logits or the states; raises
    ``ExportError`` when it exceeds ``tolerance``. A graph with a fixed batch size is run at that size.
    """
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError('checking an ONNX graph needs onnxruntime: pip install "charlm[export]"') from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # a step of a small RNN gains nothing from threads
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types are not importable portably
        raise ExportError(f"{path}: onnxruntime cannot load it: {str(exc).splitlines()[0]}") from None
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int):
        batch_size = fixed
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    cfg = cpu_model.cfg
    inputs, _ = io_names(cfg.cell)
    if [i.name for i in session.get_inputs()] != list(inputs):
        raise ExportError(f"{path}: inputs are {[i.name for i in session.get_inputs()]}, expected {list(inputs)} "
                          f"for a {cfg.cell} model")
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, steps), generator=torch.Generator().manual_seed(seed))
    state = cpu_model.init_state(batch_size)
    onnx_state = [s.numpy() for s in (state if isinstance(state, tuple) else (state,))]
    worst = 0.0
    with torch.inference_mode():
        for t in range(steps):
            logits, state = cpu_model(tokens[:, t:t + 1], state)  # (B, 1, V)
            got = session.run(None, dict(zip(inputs, [tokens[:, t].numpy()] + onnx_state)))
            expected = [logits[:, 0]] + list(state if isinstance(state, tuple) else (state,))
            for mine, theirs in zip(expected, got):
                worst = max(worst, float(np.max(np.abs(mine.numpy() - theirs))))
            onnx_state = got[1:]
    if not worst <= tolerance:
        raise ExportError(f"{path}: the ONNX graph differs from the model by {worst:.3g} "
                          f"(tolerance {tolerance:g}) over {steps} steps")
    return worst


# ── a checkpoint exported and checked (charlm export, charlm.api.export_onnx) ──────────────────

@dataclass(frozen=True)
class CheckedExport:
    """A checkpoint's export, and what running it beside the model found."""

    checkpoint: Path
    onnx: OnnxExport
    max_abs_difference: float | None  # None: not checked
    check_skipped: bool  # the check was left to the default and onnxruntime is not installed

    def to_dict(self) -> dict:
        """As ``charlm export --json`` prints it."""
        return {"checkpoint": str(self.checkpoint), "onnx": str(self.onnx.path), "description": str(self.onnx.sidecar),
                "inputs": list(self.onnx.input_names), "outputs": list(self.onnx.output_names),
                "opset": self.onnx.opset, "batch_size": self.onnx.batch_size,
                "max_abs_difference": self.max_abs_difference}


def export_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str], *, batch_size: int | None = None,
                      opset: int = DEFAULT_OPSET, check: bool | None = None) -> CheckedExport:
    """Export ``checkpoint``'s model with its tokenizer's description beside it, then check the graph
    with onnxruntime: ``check`` True requires it, False skips it, None checks where it is installed."""
    result = export_onnx(checkpoint.model, path, batch_size=batch_size, opset=opset, tokenizer=checkpoint.tokenizer)
    difference, skipped = None, False
    if check is not False:
        try:
            difference = check_onnx(checkpoint.model, result.path)
        except MissingDependencyError:
            if check:
                raise
            skipped = True
    return CheckedExport(checkpoint.path, result, difference, skipped)
