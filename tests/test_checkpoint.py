import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from charlm.model.checkpoint import (FORMAT, load_checkpoint, read_header, resolve_checkpoint,
                               save_checkpoint)
from charlm.config import ModelConfig
from charlm.errors import CheckpointError, SaveError
from charlm.fsutil import atomic_write
from charlm.model.lm import RNNLM
from charlm.data.tokenizer import CharTokenizer


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    tok = CharTokenizer.fit("abcdef\n")
    model = RNNLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=8, embed_size=8, tie_weights=True))
    path = save_checkpoint(tmp_path / "m.safetensors", model=model, tokenizer=tok, train_state={"step": 3})
    return path, model, tok


def test_round_trip_and_plain_safetensors(saved):
    path, model, tok = saved
    tensors = load_file(str(path))
    assert "rnn.weight_ih_l0" in tensors and "head.weight" not in tensors  # tied weights stored once
    loaded = load_checkpoint(path)
    assert loaded.train_state == {"step": 3} and loaded.tokenizer.vocab_size == tok.vocab_size
    assert loaded.model.head.weight is loaded.model.embedding.weight
    x = torch.randint(0, tok.vocab_size, (2, 5))
    torch.testing.assert_close(loaded.model(x)[0], model.eval()(x)[0])
    plain = torch.nn.LSTM(8, 8, 2, batch_first=True)
    plain.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("rnn.")})


def _rewrite(path, mutate_metadata=None, tensors_override=None):
    tensors = tensors_override or load_file(str(path))
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    metadata = json.loads(path.read_bytes()[8:8 + header_len])["__metadata__"]
    if mutate_metadata:
        mutate_metadata(metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(format="other/2"), "format tag"),
    (lambda m: m.pop("format"), "no 'format'"),
    (lambda m: m.update(model_config="{not json"), "not valid JSON"),
    (lambda m: m.update(model_config=json.dumps({"vocab_size": 8, "hidden_size": 16, "embed_size": 16,
                                                 "tie_weights": True})), "shape"),
    (lambda m: m.update(tokenizer=json.dumps({"kind": "byte"})), "tokenizer has 256 tokens"),
    (lambda m: m.update(train_state="[]"), "train_state"),
])
def test_bad_metadata_is_a_checkpoint_error(saved, mutate, message):
    path = saved[0]
    _rewrite(path, mutate)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_hostile_and_foreign_files(tmp_path, saved):
    path = saved[0]
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "tiny": b"abc",
        "huge_header": struct.pack("<Q", 2**62) + b"{}",
        "header_beyond_file": struct.pack("<Q", 10_000) + b"{}",
        "not_json": struct.pack("<Q", 4) + b"\xff\xfe{[",
        "pickle": b"\x80\x04\x95" + b"\x00" * 64,
        "bad_dtype": _raw({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "bad_offsets": _raw({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 400]}}, b"\0" * 16),
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError):
            load_checkpoint(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a charlm checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def _raw(header, payload):
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + payload


def test_wrong_dtype_tensor_is_rejected(saved):
    path = saved[0]
    tensors = {k: (v.to(torch.int32) if k == "head.bias" else v) for k, v in load_file(str(path)).items()}
    _rewrite(path, tensors_override=tensors)
    with pytest.raises(CheckpointError, match="dtype"):
        load_checkpoint(path)


def test_read_header_accepts_a_real_file(saved):
    assert read_header(saved[0])["__metadata__"]["format"] == FORMAT


def test_resolve_checkpoint(tmp_path, saved):
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        resolve_checkpoint(None, root=tmp_path / "none")
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="run folder has no checkpoint"):
        resolve_checkpoint(run)
    (run / "last.safetensors").write_bytes(saved[0].read_bytes())
    assert resolve_checkpoint(run).name == "last.safetensors"
    (run / "best.safetensors").write_bytes(saved[0].read_bytes())
    assert resolve_checkpoint(None, root=tmp_path / "runs") == run / "best.safetensors"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    atomic_write(target, b"old")

    def no_space(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("charlm.model.checkpoint.os.write", no_space)
    with pytest.raises(SaveError, match="No space left on device"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temporary file left behind
