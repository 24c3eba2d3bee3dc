"""--precision: which one a device gets, bf16 training against fp32, and what stays fp32."""
import json

import pytest
import torch
from safetensors.torch import load_file

import charlm
from charlm.model import precision as precision_module
from charlm.model.checkpoint import load_checkpoint
from charlm.config import ModelConfig, TrainConfig
from charlm.data.text import prepare_data
from charlm.errors import ConfigError
from charlm.infer.evaluate import evaluate
from charlm.infer.step import FastStep
from charlm.model.lm import RNNLM
from charlm.model.precision import resolve_precision
from charlm.infer.sample import sampling_precision
from charlm.training.loop import train

CPU = torch.device("cpu")


def test_auto_follows_the_cpus_bf16_instructions(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: "avx512_bf16")
    chosen = resolve_precision("auto", CPU)
    assert chosen.name == "bf16" and "avx512_bf16" in chosen.reason
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: None)
    chosen = resolve_precision("auto", CPU)
    assert chosen.name == "fp32" and "no native bf16" in chosen.reason


def test_an_explicit_precision_is_honoured_or_refused():
    assert resolve_precision("fp32", CPU).name == "fp32"
    assert resolve_precision("bf16", CPU).name == "bf16"  # no recurrence named: matmuls run anywhere
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="--precision must be one of"):
        resolve_precision("half", CPU)
    with pytest.raises(ConfigError, match="--precision must be one of"):
        TrainConfig(precision="bf32")


def test_cpuinfo_flags_are_read_without_failing():
    assert precision_module.cpu_bf16_instructions() in (None, "avx512_bf16", "amx_bf16")


def _run(tmp_path, text, precision, steps=200, **kwargs):
    data = prepare_data(text, val_fraction=0.1)
    model_cfg = ModelConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=32, embed_size=16, num_layers=1)
    train_cfg = TrainConfig(seq_len=32, batch_size=8, lr=1e-2, max_steps=steps, eval_every=steps, warmup_steps=10,
                            device="cpu", precision=precision, log_every=10, **kwargs)
    run_dir = tmp_path / precision
    return train(model_config=model_cfg, train_config=train_cfg, data=data, run_dir=run_dir), run_dir, data


def test_bf16_and_fp32_runs_of_one_seed_end_close(tmp_path, tiny_text, bf16_kernel):
    """Acceptance: 200 steps of the same seed in each precision end within 0.02 nats/char."""
    fp32, _, _ = _run(tmp_path, tiny_text, "fp32")
    bf16, run_dir, data = _run(tmp_path, tiny_text, "bf16")
    assert fp32.best_val_loss < 2.5  # both learned something: the comparison is not of two flat lines
    assert abs(bf16.best_val_loss - fp32.best_val_loss) < 0.02
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["precision"] == "bf16" and start["train_config"]["precision"] == "bf16"
    assert load_checkpoint(run_dir / "last.safetensors").train_config.precision == "bf16"


def test_a_bf16_runs_validation_is_fp32_and_its_state_saved_in_fp32(tmp_path, tiny_text, bf16_kernel):
    result, run_dir, data = _run(tmp_path, tiny_text, "bf16", steps=40)
    best = load_checkpoint(run_dir / "best.safetensors")
    # The reported loss is the fp32 evaluation of the saved weights (what `charlm perplexity` says).
    assert evaluate(best.model, data.val_ids).nats_per_token == pytest.approx(result.best_val_loss, abs=1e-6)
    optim = load_file(str(run_dir / load_checkpoint(run_dir / "last.safetensors").train_state["optim_file"]))
    states = [name for name in optim if name.startswith("hidden.")]
    assert states and all(optim[name].dtype == torch.float32 for name in states)


def test_bf16_evaluation_is_within_2e_3_nats_of_fp32(tmp_path, tiny_text, bf16_kernel):
    """`charlm perplexity --precision bf16` is offered because this holds (the default stays fp32)."""
    _, run_dir, data = _run(tmp_path, tiny_text, "fp32", steps=100)
    lm = charlm.load(run_dir / "best.safetensors")
    text = tiny_text[-3000:]
    exact, fast = lm.perplexity(text), lm.perplexity(text, precision="bf16")
    assert exact.precision == "fp32" and fast.precision == "bf16"
    assert lm.perplexity(text, precision="auto").nats_per_token == exact.nats_per_token
    assert exact.nats_per_token < 2.6  # a model that learned something
    assert abs(fast.nats_per_token - exact.nats_per_token) < 2e-3
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        lm.perplexity(text, precision="fp16")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
def test_bf16_sampling_steps_stay_near_fp32_and_auto_samples_in_fp32(cell):
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=30, cell=cell, hidden_size=32, embed_size=16, num_layers=2)).eval()
    exact, low = FastStep(model), FastStep(model, dtype=torch.bfloat16)
    exact.reset(4)
    low.reset(4)
    tokens = torch.randint(0, 30, (4, 40))
    with torch.inference_mode():
        for t in range(tokens.shape[1]):
            a, b = exact.step(tokens[:, t]).log_softmax(-1), low.step(tokens[:, t]).log_softmax(-1)
            assert (a - b).abs().max() < 0.1, t
    assert sampling_precision("auto", CPU).name == "fp32"
    assert sampling_precision("bf16", CPU).name == "bf16"


def test_the_same_seed_samples_the_same_text_under_auto_and_fp32(trained_run):
    lm = charlm.load(trained_run)
    options = dict(length=60, seed=3, num_samples=3)
    assert lm.samples(**options) == lm.samples(**options, precision="fp32")
    assert all(lm.samples(**options, precision="bf16"))  # runs, and yields text


TINY = dict(hidden_size=24, embed_size=12, seq_len=16, batch_size=4, device="cpu", eval_every=10)


@pytest.mark.parametrize("flag, chosen", [("avx512_bf16", "bf16"), (None, "fp32")])
def test_a_planned_run_stores_what_auto_chose_and_resume_keeps_it(tmp_path, tiny_corpus, monkeypatch, flag, chosen, bf16_kernel):
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: flag)
    events = []
    run = charlm.train(tiny_corpus, out=tmp_path / "run", max_steps=10, on_event=events.append, **TINY)
    assert events[0]["precision"] == chosen and events[0]["train_config"]["precision"] == chosen
    assert (flag or "no native bf16") in events[0]["precision_reason"]
    assert load_checkpoint(run.run_dir / "last.safetensors").train_config.precision == chosen
    # The machine changes its mind (another CPU): the run keeps its precision unless one is given.
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: None if flag else "avx512_bf16")
    resumed = []
    charlm.train(tiny_corpus, resume=run.run_dir, max_steps=15, on_event=resumed.append)
    assert resumed[0]["precision"] == chosen and resumed[0]["precision_reason"] == "the run's own"
    other = "fp32" if chosen == "bf16" else "bf16"
    again = []
    charlm.train(tiny_corpus, resume=run.run_dir, max_steps=20, on_event=again.append, precision=other)
    assert again[0]["precision"] == other
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        charlm.train(tiny_corpus, out=tmp_path / "fp16", max_steps=5, precision="fp16", **TINY)
    with pytest.raises(ConfigError, match="--precision must be one of"):
        charlm.train(tiny_corpus, out=tmp_path / "bad", max_steps=5, precision="int8", **TINY)


def test_word_models_under_auto_follow_the_cpu_and_fp32_is_honoured(tmp_path, tiny_corpus, monkeypatch, bf16_kernel):
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: "avx512_bf16")
    auto, asked = [], []
    charlm.train(tiny_corpus, tokenizer="word", out=tmp_path / "a", max_steps=3, on_event=auto.append, **TINY)
    charlm.train(tiny_corpus, tokenizer="word", out=tmp_path / "b", max_steps=3, on_event=asked.append,
                 precision="fp32", **TINY)
    assert auto[0]["precision"] == "bf16" and asked[0]["precision"] == "fp32"
    assert asked[0]["precision_reason"] == "as asked"


BENCH_TINY = dict(hidden_size=16, num_layers=1, embed_size=8, batch_size=2, seq_len=8, train_steps=20,
                  sample_length=40, sample_streams=2, repeats=1, device="cpu")


def test_bench_measures_bf16_beside_fp32_with_the_bare_loops(bf16_kernel):
    from charlm.bench import BenchConfig, run_bench

    tiny = BENCH_TINY
    both = run_bench(BenchConfig(**tiny, bf16=True))
    assert both.bare_train_tokens_per_second > 0 and both.train_tokens_per_second > 0
    assert {"train_tokens_per_second", "bare_train_tokens_per_second", "eval_tokens_per_second",
            "sample_chars_per_second_n", "matmul_gflops"} <= set(both.bf16)
    assert all(both.bf16[key] > 0 for key in ("train_tokens_per_second", "bare_train_tokens_per_second"))
    assert run_bench(BenchConfig(**tiny, bf16=False)).bf16 is None


@pytest.mark.parametrize("command", [["sample"], ["perplexity", "README.md"], ["train", "--max-steps", "1"]])
def test_a_bad_precision_is_a_usage_error_before_any_work(command, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from charlm.cli import app

    monkeypatch.chdir(tmp_path)  # no checkpoints here: the option is refused before anything is looked for
    (tmp_path / "README.md").write_text("some text\n", encoding="utf-8")
    result = CliRunner().invoke(app, [*command, "--precision", "half"])
    assert result.exit_code == 2 and "--precision must be one of auto, fp32, bf16, fp16" in result.output


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])  # one fused call, and the layer-by-layer path
def test_where_bf16_autocast_would_not_keep_bf16_the_recurrence_runs_in_fp32(monkeypatch, cell, dropout):
    """On CUDA autocast runs cuDNN's RNN in fp16 (no gradient scaler in a bf16 run): there the
    recurrence leaves autocast and runs fp32, the head stays bf16. Shown on the CPU by listing it."""
    from charlm.model import lm as model_module
    from conftest import skip_without_bf16_kernel

    skip_without_bf16_kernel(cell)

    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=13, hidden_size=16, embed_size=8, num_layers=2, cell=cell, dropout=dropout))
    x = torch.randint(0, 13, (3, 7))
    # CPU autocast runs the LSTM in bf16 (and leaves the GRU in fp32): listing the CPU makes both fp32.
    unlisted = torch.bfloat16 if cell == "lstm" else torch.float32
    for devices, recurrence in ((frozenset(), unlisted), (frozenset({"cpu"}), torch.float32)):
        monkeypatch.setattr(model_module, "FP32_RECURRENCE_UNDER_BF16", devices)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, state, (raw, _) = model(x, with_outputs=True)
        assert raw.dtype == recurrence and logits.dtype == torch.bfloat16
        logits.float().sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
    x = torch.ones(2, 2)
    assert model_module.recurrence_region(x)[1] is x  # outside autocast nothing changes


# ---- a CPU whose kernels cannot run bf16 (AVX2 only), played on any machine ------------------------


def test_the_probe_finds_what_the_kernels_do_per_cell(no_bf16_kernels):
    """The refusal comes from running the kernel, not from the CPU's name: the LSTM's oneDNN kernel
    raises; CPU autocast leaves GRU and RNN recurrences in fp32, and the peephole cell runs through
    matmuls, so those still run."""
    assert "primitive descriptor" in precision_module.cpu_bf16_kernel_runs("lstm")
    assert all(precision_module.cpu_bf16_kernel_runs(cell) is None for cell in ("gru", "rnn", "peephole"))
    assert precision_module.cpu_bf16_instructions() is None
    with pytest.raises(ConfigError, match=r"cannot run the lstm recurrence in bf16 \(it reports neither avx512_bf16 "
                                          r"nor amx_bf16; .*primitive descriptor.*use --precision fp32 or auto"):
        resolve_precision("bf16", CPU, cell="lstm")
    assert resolve_precision("bf16", CPU, cell="gru").name == "bf16"
    assert resolve_precision("auto", CPU, cell="lstm").name == "fp32"
    assert sampling_precision("bf16", CPU).name == "bf16"  # sampling steps through matmuls: no kernel needed


def test_auto_keeps_fp32_where_the_cpu_has_bf16_instructions_but_no_kernel(no_bf16_kernels, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_bf16_instructions", lambda: "avx512_bf16")
    chosen = resolve_precision("auto", CPU, cell="lstm")
    assert chosen.name == "fp32" and "has avx512_bf16 but no bf16 lstm kernel" in chosen.reason
    assert resolve_precision("auto", CPU, cell="gru").name == "bf16"


def test_bf16_training_on_such_a_cpu_is_one_line_before_the_corpus_is_read(no_bf16_kernels, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from charlm.cli import app

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to learn from\n" * 50, encoding="utf-8")
    read = []
    with monkeypatch.context() as patched:
        patched.setattr("charlm.data.tokenstore.prepare_corpus", lambda *a, **k: read.append(1))
        result = CliRunner().invoke(app, ["train", str(corpus), "--precision", "bf16", "--max-steps", "2"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error: --precision bf16: this CPU's kernels cannot run "
                                                   "the lstm recurrence in bf16"), result.output
    assert not read and not (tmp_path / "checkpoints").exists()
    # A fine-tune and evaluation say the same; the fp32 run goes ahead.
    with pytest.raises(ConfigError, match="cannot run the lstm recurrence in bf16"):
        charlm.train(corpus, out=tmp_path / "x", max_steps=2, precision="bf16", **TINY)
    run = charlm.train(corpus, out=tmp_path / "fp32", max_steps=2, **TINY)
    assert load_checkpoint(run.run_dir / "last.safetensors").train_config.precision == "fp32"
    with pytest.raises(ConfigError, match="cannot run the lstm recurrence in bf16"):
        charlm.train(corpus, init_from=run.run_dir, out=tmp_path / "ft", max_steps=2, precision="bf16")
    with pytest.raises(ConfigError, match="cannot run the lstm recurrence in bf16"):
        charlm.load(run.run_dir).perplexity("some text to learn from", precision="bf16")
    gru = charlm.train(corpus, out=tmp_path / "gru", max_steps=2, cell="gru", precision="bf16", **TINY)
    assert load_checkpoint(gru.run_dir / "last.safetensors").train_config.precision == "bf16"


def test_bench_records_bf16_rows_it_cannot_measure_as_unavailable(no_bf16_kernels):
    from charlm.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(**BENCH_TINY, bf16=True))
    low = result.bf16
    assert low["train_tokens_per_second"] is None and low["bare_train_tokens_per_second"] is None
    assert low["eval_tokens_per_second"] is None and "primitive descriptor" in low["unavailable"]
    assert low["sample_chars_per_second_n"] > 0 and low["matmul_gflops"] > 0  # matmuls need no recurrent kernel
    assert result.train_tokens_per_second > 0 and not low["default"]


@pytest.mark.slow
def test_a_real_process_on_such_a_cpu_refuses_bf16_without_a_traceback(tmp_path, tiny_corpus):
    """The simulation as a user's process sees it (the environment variable, no test fixture)."""
    import subprocess
    import sys

    from conftest import subprocess_env

    env = {**subprocess_env(), "CHARLM_SIMULATE_NO_BF16": "1"}
    done = subprocess.run([sys.executable, "-m", "charlm", "train", str(tiny_corpus), "--precision", "bf16",
                           "--max-steps", "2", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "lstm recurrence in bf16" in done.stderr
    assert not (tmp_path / "run").exists()


def test_the_probe_is_kept_per_machine_and_survives_a_damaged_file(tmp_path, monkeypatch):
    from charlm import machine

    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CHARLM_SIMULATE_NO_BF16", raising=False)
    probes = []
    real = precision_module._probe_cell
    monkeypatch.setattr(precision_module, "_probe_cell", lambda cell: probes.append(cell) or real(cell))
    machine.forget()
    try:
        first = precision_module.cpu_bf16_kernel_runs("gru")
        machine.forget()
        assert precision_module.cpu_bf16_kernel_runs("gru") == first and probes == ["gru"]  # read back, not probed
        stored = json.loads((tmp_path / "kernels.json").read_text())
        assert stored[machine.machine_key()]["bf16 kernels"] == {"gru": first}
        (tmp_path / "kernels.json").write_text("{not json", encoding="utf-8")
        machine.forget()
        assert precision_module.cpu_bf16_kernel_runs("gru") == first and probes == ["gru", "gru"]
        assert json.loads((tmp_path / "kernels.json").read_text())  # rewritten whole
    finally:
        machine.forget()
