"""Hostile and careless inputs: checkpoints someone handed you, option values that make no sense,
running out of memory, degenerate numbers in sampling, and two runs in one folder."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from charlm import jsonio
from charlm.model.checkpoint import load_checkpoint, save_checkpoint
from charlm.cli import app
from charlm.config import LIMITS, ModelConfig, SampleConfig, TrainConfig, check_option
from charlm.errors import CheckpointError, ConfigError, OutOfMemoryError, RunInUseError, SamplingError
from charlm.model.lm import RNNLM, count_parameters, parameter_shapes
from charlm.infer.sample import generate, next_token
from charlm.data.tokenizer import CharTokenizer, WordTokenizer
from charlm.training.resume_state import load_resume
from charlm.training.rundir import claim_run_dir, new_run_dir

from conftest import subprocess_env

runner = CliRunner()
SHAPE = ["--hidden-size", "16", "--embed-size", "8", "--seq-len", "8", "--batch-size", "2", "--device", "cpu",
         "--log-every", "1"]
TINY = [*SHAPE, "--sample-length", "0"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code):
    """The command failed with ``code`` and said why in one line (after any progress notes)."""
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.output and lines and lines[-1].startswith("charlm: error: "), result.output
    assert sum("error" in line for line in lines) == 1, result.stderr
    return lines[-1]


# ── checkpoints: sizes, metadata, types ────────────────────────────────────────────────────────

@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    tok = CharTokenizer.fit("abcdef\n")
    model = RNNLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=8, embed_size=4, num_layers=2))
    path = save_checkpoint(tmp_path / "m.safetensors", model=model, tokenizer=tok,
                           train_state={"step": 3, "best_val_loss": math.inf})
    return path


def _metadata(path):
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return json.loads(path.read_bytes()[8:8 + header_len])["__metadata__"]


def _rewrite(path, **fields):
    metadata = _metadata(path)
    metadata.update(fields)
    save_file(load_file(str(path)), str(path), metadata=metadata)


def test_parameter_shapes_match_the_model_without_building_it():
    for cell in ("lstm", "gru", "rnn", "peephole"):
        for tie in (False, True):
            cfg = ModelConfig(vocab_size=11, cell=cell, hidden_size=6, embed_size=6 if tie else 5, num_layers=3,
                              tie_weights=tie)
            model = RNNLM(cfg)
            assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == parameter_shapes(cfg)
            assert count_parameters(cfg) == model.num_parameters()


@pytest.mark.parametrize("claim", [
    {"hidden_size": 1_000_000},  # within the bounds, but not what the tensors hold
    {"vocab_size": 16_000_000, "hidden_size": 8, "embed_size": 4, "num_layers": 2},
    {"num_layers": 1000, "hidden_size": 8, "embed_size": 4},
    {"hidden_size": 10**30}, {"embed_size": 2**64}, {"num_layers": -1}, {"vocab_size": 0},
])
def test_a_size_the_tensors_do_not_hold_is_refused_before_anything_is_allocated(saved, claim, monkeypatch):
    config = json.loads(_metadata(saved)["model_config"])
    config.update(claim)
    _rewrite(saved, model_config=json.dumps(config))

    def no_building(*args, **kwargs):
        raise AssertionError("a model was built from unchecked metadata")

    monkeypatch.setattr("charlm.model.lm.RNNLM.__init__", no_building)
    with pytest.raises(CheckpointError):
        load_checkpoint(saved)


def test_loading_costs_about_the_file_and_not_more(saved, tmp_path):
    """The tensors in the file become the parameters (nothing is built twice)."""
    loaded = load_checkpoint(saved)
    stored = load_file(str(saved))
    params = dict(loaded.model.named_parameters())
    assert sum(p.numel() for p in params.values()) == sum(t.numel() for t in stored.values())
    assert not any(p.is_meta for p in loaded.model.parameters())


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("field, value", [
    ("model_config", DEEP), ("tokenizer", DEEP), ("train_state", DEEP), ("train_config", DEEP),
    ("model_config", "[" * 200 + "]" * 200),  # deep, but not deep enough to overflow the parser
    ("model_config", "[]"), ("model_config", '{"vocab_size": 8}'), ("model_config", '"lstm"'),
    ("model_config", json.dumps({"vocab_size": "8", "hidden_size": 8, "embed_size": 4, "num_layers": 2})),
    ("model_config", json.dumps({"vocab_size": 8.0, "hidden_size": 8, "embed_size": 4, "num_layers": 2})),
    ("model_config", json.dumps({"vocab_size": True, "hidden_size": 8, "embed_size": 4, "num_layers": 2})),
    ("model_config", json.dumps({"vocab_size": 8, "hidden_size": 8, "embed_size": 4, "num_layers": 2,
                                 "dropout": float("nan")})),
    ("model_config", json.dumps({"vocab_size": 8, "hidden_size": 8, "embed_size": 4, "num_layers": 2,
                                 "cell": ["lstm"]})),
    ("tokenizer", "[]"), ("tokenizer", '{"kind": ["char"]}'), ("tokenizer", '{"kind": "char", "chars": "abc"}'),
    ("tokenizer", '{"kind": "char", "chars": ["ab", "c"]}'), ("tokenizer", '{"kind": "char"}'),
    ("tokenizer", json.dumps({"kind": "char", "chars": list("abcdefgh")})),  # 9 tokens, the model has 8
    ("tokenizer", json.dumps({"kind": "word", "words": [[]] * 6})),
    ("train_config", "[1]"), ("train_config", '{"lr": -1}'), ("train_config", '{"seed": 1e400}'),
    ("train_state", "[]"), ("train_state", '{"step": "?"}'), ("train_state", '{"step": -4}'),
    ("train_state", '{"elapsed_seconds": "x"}'), ("train_state", '{"best_val_loss": "low"}'),
    ("train_state", '{"corpus": {"a": 1}}'), ("train_state", '{"best_step": 1.5}'),
    ("train_state", '{"average_total": -1}'), ("train_state", '{"average_total": null}'),
    ("train_state", '{"average_total": 1e999}'),
    ("tokenizer", json.dumps({"kind": "char", "chars": ["\ud800", "b", "c", "d", "e", "f", "\n"]})),
    ("tokenizer", json.dumps({"kind": "word", "words": ["a\udfffb", "c", "d", "e", "f", "g"]})),
])
def test_malformed_metadata_is_a_checkpoint_error(saved, field, value):
    _rewrite(saved, **{field: value})
    with pytest.raises(CheckpointError):
        load_checkpoint(saved)


def test_a_deeply_nested_safetensors_header_is_a_checkpoint_error(tmp_path):
    body = ('{"__metadata__": {"format": "charlm/1"}, "x": ' + DEEP + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match="nested"):
        load_checkpoint(path)


def test_an_infinite_loss_is_written_as_standard_json_and_read_back(saved):
    assert '"best_val_loss": null' in _metadata(saved)["train_state"]
    assert load_checkpoint(saved).train_state["best_val_loss"] == math.inf
    assert jsonio.dumps({"a": [float("nan"), float("-inf"), 1.5]}) == '{"a": [null, null, 1.5]}'


def test_info_on_a_checkpoint_missing_training_fields(saved):
    _rewrite(saved, train_state=json.dumps({"corpus": "x"}))
    result = invoke("info", saved)
    assert result.exit_code == 0, result.output
    assert "step ? (epoch ?)" in result.stdout
    report = json.loads(invoke("info", saved, "--json").stdout)
    assert report["train_state"] == {"corpus": "x"}


def test_sample_on_a_hostile_checkpoint_is_one_line(saved):
    config = json.loads(_metadata(saved)["model_config"])
    config["hidden_size"] = 100_000
    _rewrite(saved, model_config=json.dumps(config))
    assert "tensor" in one_line_error(invoke("sample", "--checkpoint", saved, "--length", "5"), 1)


# ── property: a mutated checkpoint loads and runs, or is a CheckpointError ─────────────────────

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
FIELDS = ("model_config", "tokenizer", "train_config", "train_state", "format")
CONFIG_KEYS = ("vocab_size", "cell", "embed_size", "hidden_size", "num_layers", "dropout", "tie_weights")


def _loads_and_runs_or_refuses(path):
    try:
        loaded = load_checkpoint(path)
    except CheckpointError:
        return
    logits, _ = loaded.model(torch.tensor([[1, 2, 0]]))
    assert logits.shape == (1, 3, loaded.tokenizer.vocab_size)
    pieces = list(generate(loaded.model, loaded.tokenizer, config=SampleConfig(length=4, seed=0)))
    assert pieces[-1].done


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer.fit("abcdef\n")
    model = RNNLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=6, embed_size=6, num_layers=2,
                              tie_weights=True))
    path = save_checkpoint(tmp_path_factory.mktemp("valid") / "m.safetensors", model=model, tokenizer=tok,
                           train_config=TrainConfig(), train_state={"step": 1})
    return path.read_bytes()


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_mutated_bytes(valid_bytes, tmp_path, data):
    raw = bytearray(valid_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(raw if cut is None else raw[:cut]))
    _loads_and_runs_or_refuses(path)


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=json_values, as_text=st.booleans())
def test_mutated_metadata_fields(valid_bytes, tmp_path, field, value, as_text):
    path = tmp_path / "m.safetensors"
    path.write_bytes(valid_bytes)
    text = json.dumps(value) if as_text or not isinstance(value, str) else value
    _rewrite(path, **{field: text})
    _loads_and_runs_or_refuses(path)


@SETTINGS
@given(key=st.sampled_from(CONFIG_KEYS), value=json_values)
def test_mutated_model_config_values(valid_bytes, tmp_path, key, value):
    path = tmp_path / "m.safetensors"
    path.write_bytes(valid_bytes)
    config = json.loads(_metadata(path)["model_config"])
    config[key] = value
    _rewrite(path, model_config=json.dumps(config))
    _loads_and_runs_or_refuses(path)


@SETTINGS
@given(data=st.data())
def test_mutated_tensor_headers(valid_bytes, tmp_path, data):
    """Dtypes, shapes and offsets changed in the header (the bytes after it stay as they are)."""
    header_len = struct.unpack("<Q", valid_bytes[:8])[0]
    header = json.loads(valid_bytes[8:8 + header_len])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    what = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop"]))
    if what == "drop":
        del header[name]
    elif what == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I32", "U8", "BOOL", "X1"]))
    else:
        header[name][what] = data.draw(st.lists(st.integers(-3, 2**40), max_size=4))
    body = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + valid_bytes[8 + header_len:])
    _loads_and_runs_or_refuses(path)


# ── numeric options: a value that makes no sense is exit 2, never a default ────────────────────

@pytest.mark.parametrize("option, value", [
    ("--hidden-size", 0), ("--num-layers", 0), ("--embed-size", 0), ("--seq-len", 0), ("--batch-size", 0),
    ("--lr", 0), ("--log-every", 0), ("--max-steps", 0), ("--epochs", 0), ("--eval-every", 0), ("--patience", 0),
    ("--max-minutes", 0), ("--min-count", 0), ("--max-vocab", 0), ("--max-bad-steps", 0),
    ("--hidden-size", -5), ("--lr", "nan"), ("--lr", "inf"), ("--dropout", "nan"), ("--dropout", 1),
    ("--clip", -1), ("--clip", "inf"), ("--weight-decay", "nan"), ("--min-lr-ratio", 2), ("--val-fraction", 0),
    ("--max-minutes", "inf"), ("--seed", -1), ("--seed", 2**64), ("--sample-length", -1), ("--warmup-steps", -1),
    ("--hidden-size", 2**40), ("--lr", 1e-2), # with --weight-decay 1000: AdamW would flip the weights' sign
])
def test_train_refuses_nonsense_numbers_before_any_work(tmp_path, tiny_corpus, option, value):
    extra = ["--weight-decay", "1000"] if (option, value) == ("--lr", 1e-2) else []
    result = invoke("train", tiny_corpus, "--out", tmp_path / "run", "--max-steps", "2", *TINY, option, value, *extra)
    message = one_line_error(result, 2)
    assert option in message or "--weight-decay" in message
    assert not (tmp_path / "run").exists()  # refused before any work


def test_zero_means_zero_or_is_refused_never_the_default(tmp_path, tiny_corpus):
    """0 where 0 is meaningful is honoured: --clip 0 (off), --warmup-steps 0, --dropout 0, --sample-length 0."""
    out = tmp_path / "run"
    result = invoke("train", tiny_corpus, "--out", out, "--max-steps", "3", *TINY, "--clip", "0",
                    "--warmup-steps", "0", "--dropout", "0", "--weight-decay", "0", "--json")
    assert result.exit_code == 0, result.output
    cfg = load_checkpoint(out / "last.safetensors").train_config
    assert (cfg.clip, cfg.warmup_steps, cfg.weight_decay) == (0, 0, 0)
    assert json.loads(result.stdout)["sample"] is None


def test_a_model_that_cannot_fit_is_refused_with_what_to_shrink(tmp_path, tiny_corpus):
    message = one_line_error(invoke("train", tiny_corpus, "--out", tmp_path / "run", "--max-steps", "2",
                                    *TINY, "--hidden-size", "300000"), 2)
    assert "GiB" in message and "--hidden-size" in message


def test_every_limit_names_its_option_and_range():
    for name, rule in LIMITS.items():
        with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} must be"):
            check_option(name, float("nan"))
        check_option(name, None, optional=True)


def _number(kind):
    if kind is int:
        return st.integers(-2**70, 2**70) | st.integers(-2, 64)
    return st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e-320, 1e308, 0.5])


def _valid_small(name, value):
    """Values the fuzz may run for real: in range and small enough to train in a blink."""
    small = {"hidden_size": 48, "embed_size": 48, "num_layers": 3, "seq_len": 64, "batch_size": 64,
             "sample_length": 200}
    return name not in small or not LIMITS[name].allows(value) or value <= small[name]


TRAIN_OPTIONS = ("hidden_size", "num_layers", "embed_size", "dropout", "seq_len", "batch_size", "lr",
                 "weight_decay", "clip", "warmup_steps", "min_lr_ratio", "epochs", "max_steps", "max_minutes",
                 "val_fraction", "eval_every", "patience", "seed", "min_count", "max_vocab", "max_bad_steps",
                 "sample_length", "log_every")


@pytest.mark.fuzz
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_values_for_every_numeric_train_option(tmp_path_factory, tiny_corpus, data):
    name = data.draw(st.sampled_from(TRAIN_OPTIONS))
    value = data.draw(_number(LIMITS[name].kind).filter(lambda v: _valid_small(name, v)))
    out = tmp_path_factory.mktemp("fuzz") / "run"
    limits = ["--max-steps", "2"] if name != "max_steps" else ["--max-minutes", "0.005"]
    base = SHAPE if name == "sample_length" else TINY
    args = ["train", tiny_corpus, "--out", out, *limits, *base, f"--{name.replace('_', '-')}", repr(value)
            if isinstance(value, float) else value]
    result = invoke(*args)
    assert result.exit_code in (0, 2), (args, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.stderr.splitlines()[-1].startswith("charlm: error: ") or "Invalid value" in result.output


SAMPLE_OPTIONS = {"temperature": float, "top_k": int, "top_p": float, "length": int, "num_samples": int, "seed": int}


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_values_for_every_numeric_sample_option(trained_run, data):
    name = data.draw(st.sampled_from(sorted(SAMPLE_OPTIONS)))
    strategy = _number(SAMPLE_OPTIONS[name])
    if name in ("length", "num_samples"):  # in range, a big value is a long (valid) run: keep those small
        strategy = strategy.filter(lambda v: not LIMITS[name].allows(v) or v <= 64)
    value = data.draw(strategy)
    result = invoke("sample", "--checkpoint", trained_run, "--length", "8", f"--{name.replace('_', '-')}",
                    repr(value) if isinstance(value, float) else value)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output


# ── out of memory ──────────────────────────────────────────────────────────────────────────────

def _allocator_failure(*args, **kwargs):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")


def test_out_of_memory_in_a_training_step_keeps_the_checkpoints(tmp_path, tiny_corpus, monkeypatch):
    out = tmp_path / "run"
    assert invoke("train", tiny_corpus, "--out", out, "--max-steps", "4", *TINY).exit_code == 0
    before = ["best.safetensors", "last.safetensors"]
    forward = RNNLM.forward
    calls = {"n": 0}

    def fails_at_the_third_step(self, x, state=None):
        calls["n"] += self.training
        if calls["n"] == 3 and self.training:
            _allocator_failure()
        return forward(self, x, state)

    monkeypatch.setattr(RNNLM, "forward", fails_at_the_third_step)
    message = one_line_error(invoke("train", "--resume", out, "--max-steps", "50"), 1)
    assert "out of memory in training step 7" in message and "--batch-size" in message
    for name in before:
        load_checkpoint(out / name)  # whole checkpoints, from before the failed step
    assert load_resume(out).checkpoint.train_state["step"] == 5  # saved at step 5 (every 50 // 10); 7 failed


@pytest.mark.parametrize("where, command, expected", [
    ("charlm.training.loop.RNNLM.__init__", "train", "out of memory building a model"),
    ("charlm.training.loop.evaluate", "train", "out of memory evaluating"),
    ("charlm.infer.sample.FastStep.reset", "sample", "--num-samples"),
    ("charlm.model.checkpoint.load_file", "sample", "out of memory loading"),
])
def test_out_of_memory_anywhere_is_one_line_and_exit_1(tmp_path, tiny_corpus, trained_run, monkeypatch, where,
                                                      command, expected):
    monkeypatch.setattr(where, _allocator_failure)
    if command == "train":
        result = invoke("train", tiny_corpus, "--out", tmp_path / "run", "--max-steps", "2", *TINY)
    else:
        result = invoke("sample", "--checkpoint", trained_run, "--length", "5", "--num-samples", "3")
    assert expected in one_line_error(result, 1)


def test_a_cuda_style_out_of_memory_is_caught_too(tmp_path, tiny_corpus, monkeypatch):
    def cuda_oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("charlm.training.loop.evaluate", cuda_oom)
    result = invoke("train", tiny_corpus, "--out", tmp_path / "run", "--max-steps", "2", *TINY)
    assert "out of memory evaluating" in one_line_error(result, 1)


# ── sampling with degenerate numbers ───────────────────────────────────────────────────────────

def test_tiny_temperatures_are_argmax_and_never_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -5.0, -4.0], [1e38, -1e38, 0.0]])
    for temperature in (1e-30, 1e-300, 5e-324, 1e-45):
        for _ in range(5):
            assert next_token(logits, temperature=temperature, top_p=0.9).tolist() == [1, 2, 0]
    huge = torch.tensor([[3e38, 3e38, -3e38]])  # overflow at any temperature below 1
    assert next_token(huge, temperature=0.5, generator=torch.Generator().manual_seed(0)).item() in (0, 1)


def test_infinite_and_nan_scores():
    inf = float("inf")
    picks = {next_token(torch.tensor([[inf, 0.0, inf]]), temperature=1.0).item() for _ in range(40)}
    assert picks == {0, 2}
    for bad in (torch.tensor([[float("nan"), 0.0]]), torch.tensor([[-inf, -inf]])):
        with pytest.raises(SamplingError):
            next_token(bad, temperature=0.8)
    with pytest.raises(SamplingError):
        next_token(torch.tensor([[float("nan"), 0.0]]), temperature=0)


def test_a_model_whose_scores_overflow_gives_a_clear_error(tmp_path, trained_run):
    loaded = load_checkpoint(trained_run / "best.safetensors")
    with torch.no_grad():
        loaded.model.head.weight.fill_(3e38)
        loaded.model.head.bias[0] = -3e38
    path = save_checkpoint(tmp_path / "overflow.safetensors", model=loaded.model, tokenizer=loaded.tokenizer)
    result = invoke("sample", "--checkpoint", path, "--length", "10", "--seed", "1")
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        assert "nothing to sample" in one_line_error(result, 1)


# ── the word tokenizer on one enormous token ───────────────────────────────────────────────────

def test_word_encoding_memory_is_linear_in_the_text():
    text = "a b c\n" * 20_000 + "x" * 4_000_000 + "\n" + "https://example.org/" + "y" * 1_000_000 + " a\n"
    tok = WordTokenizer.fit("a b c\n")
    tracemalloc.start()
    try:
        ids = tok.encode(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(text) + 10_000_000  # a fixed-width array would need 60,002 × 4 MB × 4 bytes
    assert len(ids) == 20_000 * 4 + 2 + 3  # "a b c <EOS>" lines, "x… <EOS>", "https… a <EOS>"
    assert ids[-3] == tok.unk_id and tok.decode(ids[:4]) == "a b c\n"


# ── resume: damaged optimizer files, spent budgets, options given again ────────────────────────

@pytest.fixture
def run(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    result = invoke("train", tiny_corpus, "--out", out, "--max-steps", "6", "--eval-every", "3", *TINY)
    assert result.exit_code == 0, result.output
    return out


def _optim_file(out):
    (path,) = out.glob("last.step*.optim.safetensors")
    return path


def _damage(out, change):
    path = _optim_file(out)
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "charlm/1"})


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize("change", [
    lambda t: t.pop(_first(t, ".exp_avg_sq")),
    lambda t: t.pop(_first(t, ".step")),
    lambda t: t.update({_first(t, ".exp_avg"): torch.zeros(3)}),
    lambda t: t.update({_first(t, ".exp_avg_sq"): -torch.ones_like(t[_first(t, ".exp_avg_sq")])}),
    lambda t: t.update({_first(t, ".exp_avg"): torch.full_like(t[_first(t, ".exp_avg")], float("nan"))}),
    lambda t: t.update({_first(t, ".step"): torch.zeros(2)}),
    lambda t: [t.pop(k) for k in [k for k in t if k.startswith("optim.rnn.weight_hh_l0.")]],
    lambda t: t.update({"rng.cpu": torch.zeros(7, dtype=torch.uint8)}),
    lambda t: t.update({"rng.cpu": t["rng.cpu"].float()}),
    lambda t: t.update({"rng.cpu": torch.full_like(t["rng.cpu"], 255)}),
    lambda t: t.pop("rng.cpu"),
    lambda t: t.update({"hidden.h": torch.zeros(1, 2, 3)}),
    lambda t: t.pop("hidden.c"),
    lambda t: t.update({"optim.nothing.exp_avg": torch.zeros(1)}),
    lambda t: t.update({"surprise": torch.zeros(1)}),
    lambda t: [t.pop(k) for k in [k for k in t if k.startswith("optim.")]],  # steps were taken: state expected
    lambda t: t.update({_first(t, ".step"): torch.tensor(3e38)}),  # more optimizer steps than the run took
])
def test_a_damaged_optimizer_file_is_a_checkpoint_error(run, change):
    _damage(run, change)
    with pytest.raises(CheckpointError):
        load_resume(run)
    assert "damaged" in one_line_error(invoke("train", "--resume", run, "--max-steps", "9"), 1)


def test_resuming_a_finished_run_says_which_limit_it_reached(run, tmp_path, tiny_corpus):
    message = one_line_error(invoke("train", "--resume", run), 2)
    assert "already reached --max-steps 6" in message
    assert invoke("train", "--resume", run, "--max-steps", "8").exit_code == 0
    timed = tmp_path / "timed"
    assert invoke("train", tiny_corpus, "--out", timed, "--max-minutes", "0.002", *TINY).exit_code == 0
    assert "already reached --max-minutes" in one_line_error(invoke("train", "--resume", timed), 2)
    # A larger budget trains on (a step limit keeps it short on a loaded machine).
    steps = load_checkpoint(timed / "last.safetensors").train_state["step"]
    result = invoke("train", "--resume", timed, "--max-minutes", "10", "--max-steps", str(steps + 2))
    assert result.exit_code == 0, result.output


def test_options_given_on_resume_are_honoured_or_refused(run):
    result = invoke("train", "--resume", run, "--max-steps", "8", "--lr", "0.003", "--clip", "0.5",
                    "--weight-decay", "0")
    assert result.exit_code == 0, result.output
    cfg = load_checkpoint(run / "last.safetensors").train_config
    assert (cfg.lr, cfg.clip, cfg.weight_decay, cfg.max_steps) == (0.003, 0.5, 0, 8)
    for args, named in [(["--val-fraction", "0.2"], "--val-fraction"), (["--cell", "gru"], "--cell"),
                        (["--seed", "7"], "--seed"), (["--min-count", "2"], "--min-count"),
                        (["--tokenizer", "byte"], "--tokenizer"), (["--out", run.parent / "other"], "--out"),
                        (["--average"], "--average"), (["--average-power", "2"], "--average"),
                        (["--no-shift-windows" if cfg.shift_windows else "--shift-windows"], "--shift-windows")]:
        assert named in one_line_error(invoke("train", "--resume", run, "--max-steps", "10", *args), 2)
    # The run's own value, given explicitly, is fine (lstm is also the default: it was given, so it is checked).
    assert invoke("train", "--resume", run, "--max-steps", "9", "--cell", "lstm").exit_code == 0


def test_cell_equal_to_the_default_is_checked_against_a_gru_run(tmp_path, tiny_corpus):
    out = tmp_path / "gru"
    assert invoke("train", tiny_corpus, "--out", out, "--max-steps", "2", "--cell", "gru", *TINY).exit_code == 0
    message = one_line_error(invoke("train", "--resume", out, "--max-steps", "4", "--cell", "lstm"), 2)
    assert "--cell lstm" in message and "--cell gru" in message


# ── one run per folder ─────────────────────────────────────────────────────────────────────────

def test_a_folder_in_use_is_refused_and_left_alone(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with claim_run_dir(out):  # as another process training there would hold it
        message = one_line_error(invoke("train", tiny_corpus, "--out", out, "--max-steps", "2", *TINY), 2)
        assert "in use by another charlm process" in message
        with pytest.raises(RunInUseError):
            with claim_run_dir(out):
                pass
        assert new_run_dir(tmp_path, "run") == tmp_path / "run-2"  # an automatic name skips it
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert invoke("train", tiny_corpus, "--out", out, "--max-steps", "2", *TINY).exit_code == 0


@pytest.mark.slow
def test_two_processes_started_on_one_folder(tmp_path, tiny_corpus):
    """Two real `charlm train --out X` at once: one trains, the other refuses; the run is whole."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "charlm", "train", str(tiny_corpus), "--out", str(out), "--max-steps", "300",
            "--eval-every", "20", *TINY]
    first = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes = sorted([(p.wait(timeout=300), p.communicate()[1]) for p in (first, second)])
    assert outcomes[0][0] == 0, outcomes
    code, stderr = outcomes[1]
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "in use by another charlm process" in stderr or "already holds a run" in stderr
    assert load_checkpoint(out / "last.safetensors").train_state["step"] == 300
    assert load_resume(out).checkpoint.train_state["step"] == 300


def test_resume_on_a_corpus_too_short_for_the_run_is_refused(run, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("First Citizen\n", encoding="utf-8")
    message = one_line_error(invoke("train", short, "--resume", run, "--max-steps", "9"), 2)
    assert "too short for the resumed run's --batch-size 2" in message


def test_encoding_errors_out_of_its_choices_is_a_usage_error(tmp_path, tiny_corpus, trained_run):
    result = invoke("train", tiny_corpus, "--out", tmp_path / "r", "--encoding-errors", "bogus", *TINY)
    assert "--encoding-errors must be one of" in one_line_error(result, 2)
    result = invoke("perplexity", tiny_corpus, "--checkpoint", trained_run, "--encoding-errors", "bogus")
    assert "--encoding-errors must be one of" in one_line_error(result, 2)


def test_a_perplexity_that_overflows_is_infinite():
    from charlm.infer.evaluate import EvalResult

    assert EvalResult(float("inf"), 3).perplexity == math.inf and EvalResult(800.0, 1).perplexity == math.inf
    assert EvalResult(2.0, 1).perplexity == pytest.approx(math.exp(2.0))
