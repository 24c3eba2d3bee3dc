"""ONNX export of one step: the graph run by onnxruntime reproduces the model, step after step."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from charlm.config import ModelConfig
from charlm.errors import ExportError, MissingDependencyError
from charlm.model.checkpoint import load_checkpoint, save_checkpoint
from charlm.model.export import check_onnx, export_checkpoint, export_onnx
from charlm.model.lm import RNNLM
from charlm.data.tokenizer import CharTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(cell, *, num_layers=2, tie_weights=False, vocab_size=17):
    torch.manual_seed(0)
    hidden = 12
    model = RNNLM(ModelConfig(vocab_size=vocab_size, cell=cell, hidden_size=hidden, num_layers=num_layers,
                              embed_size=hidden if tie_weights else 6, tie_weights=tie_weights, dropout=0.2))
    # Random biases: a gate-order mistake in an exporter stays hidden while biases are 0 or 1.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name:
                param.normal_(std=0.5)
    return model


def needs_onnx():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def run_session(path, names, tokens, state):
    ort = needs_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = []
    for t in range(tokens.shape[1]):
        got = session.run(None, dict(zip(names, [tokens[:, t].numpy()] + state)))
        outputs.append(got)
        state = got[1:]
    return outputs


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_step_matches_the_model_over_several_steps(cell, batch, tmp_path):
    needs_onnx()
    model = make_model(cell).train()  # training mode on purpose: the export must still drop dropout
    result = export_onnx(model, tmp_path / "model.onnx")
    assert model.training  # the caller's model is left as it was
    expected_inputs = ("tokens", "h", "c") if cell in ("lstm", "peephole") else ("tokens", "h")
    assert result.input_names == expected_inputs and result.output_names[0] == "logits"
    assert result.batch_size is None and result.opset >= 17 and result.sidecar is None

    tokens = torch.randint(0, 17, (batch, 6), generator=torch.Generator().manual_seed(1))
    zeros = np.zeros((2, batch, 12), dtype=np.float32)
    outputs = run_session(result.path, expected_inputs, tokens, [zeros] * (len(expected_inputs) - 1))
    model.eval()
    state = None
    with torch.no_grad():
        for t, got in enumerate(outputs):
            logits, state = model(tokens[:, t:t + 1], state)
            assert got[0].shape == (batch, 17)
            np.testing.assert_allclose(got[0], logits[:, 0].numpy(), atol=1e-4, rtol=0)
            states = state if isinstance(state, tuple) else (state,)
            assert len(got) - 1 == len(states)
            for mine, theirs in zip(states, got[1:]):
                np.testing.assert_allclose(theirs, mine.numpy(), atol=1e-4, rtol=0)


def test_check_onnx_agrees_and_catches_a_wrong_graph(tmp_path):
    needs_onnx()
    model = make_model("lstm", num_layers=1, tie_weights=True)
    export_onnx(model, tmp_path / "tied.onnx")
    assert check_onnx(model, tmp_path / "tied.onnx", steps=5) < 1e-4
    other = make_model("lstm", num_layers=1, tie_weights=True)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(ExportError, match="differs from the model"):
        check_onnx(other, tmp_path / "tied.onnx", steps=2)
    gru = make_model("gru", num_layers=1)
    with pytest.raises(ExportError, match="inputs are"):
        check_onnx(gru, tmp_path / "tied.onnx")


def test_fixed_batch_size_and_sidecar(tmp_path):
    needs_onnx()
    import onnx
    tokenizer = CharTokenizer.fit("hello world\n")
    model = make_model("gru", num_layers=1, vocab_size=tokenizer.vocab_size)
    result = export_onnx(model, tmp_path / "fixed.onnx", batch_size=2, tokenizer=tokenizer)
    graph = onnx.load(str(result.path))
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [2]
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert check_onnx(model, result.path, steps=3) < 1e-4  # run at the graph's own batch size
    description = json.loads(result.sidecar.read_text())
    assert result.sidecar == tmp_path / "fixed.onnx.json"
    assert description["tokenizer"] == tokenizer.to_dict() and description["model_config"]["cell"] == "gru"
    assert description["inputs"] == {"tokens": [2], "h": [1, 2, 12]}
    assert description["outputs"]["logits"] == [2, tokenizer.vocab_size]
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_options_and_missing_packages(tmp_path, monkeypatch):
    model = make_model("rnn", num_layers=1)
    with pytest.raises(ExportError, match="batch size"):
        export_onnx(model, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "charlm\[export\]"'):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        check_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_exported_is_checked_where_onnxruntime_is_installed(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    tokenizer = CharTokenizer.fit("hello world\n")
    model = make_model("lstm", num_layers=1, vocab_size=tokenizer.vocab_size)
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "best.safetensors", model=model, tokenizer=tokenizer))
    out = tmp_path / "model.onnx"
    if importlib.util.find_spec("onnxruntime") is not None:
        checked = export_checkpoint(checkpoint, out, batch_size=2)
        assert checked.max_abs_difference < 1e-4 and not checked.check_skipped
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    unchecked = export_checkpoint(checkpoint, out)
    assert unchecked.max_abs_difference is None and unchecked.check_skipped
    assert export_checkpoint(checkpoint, out, check=False).check_skipped is False
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        export_checkpoint(checkpoint, out, check=True)
    assert unchecked.to_dict() == {
        "checkpoint": str(tmp_path / "best.safetensors"), "onnx": str(out),
        "description": str(tmp_path / "model.onnx.json"),
        "inputs": ["tokens", "h", "c"], "outputs": ["logits", "h_out", "c_out"], "opset": 17, "batch_size": None,
        "max_abs_difference": None}
