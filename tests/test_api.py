"""The public Python API (``charlm.load``, ``charlm.train``), using only the public names."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import charlm
from charlm.cli import app
from charlm.errors import ConfigError

PLAY = ("ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n\n") * 60
TINY = dict(hidden_size=24, embed_size=12, seq_len=16, batch_size=4, device="cpu", eval_every=10)


@pytest.fixture(scope="module")
def play_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("api")
    corpus = folder / "play.txt"
    corpus.write_text(PLAY, encoding="utf-8")
    run = charlm.train(corpus, out=folder / "run", max_steps=40, **TINY)
    return run.run_dir


def test_train_returns_a_result_and_writes_a_run(play_run):
    lm = charlm.load(play_run)
    assert isinstance(lm, charlm.LanguageModel) and "LSTM" in repr(lm)
    assert (play_run / "best.safetensors").is_file() and (play_run / "metrics.jsonl").is_file()


def test_generate_is_seeded_and_equals_the_cli(play_run):
    lm = charlm.load(play_run)
    text = "".join(lm.generate("ROMEO:", length=60, temperature=0.8, seed=1))
    assert text == "".join(lm.generate("ROMEO:", length=60, temperature=0.8, seed=1))
    assert text != "".join(lm.generate("ROMEO:", length=60, temperature=0.8, seed=2))
    cli = CliRunner().invoke(app, ["sample", "--checkpoint", str(play_run), "--prime", "ROMEO:", "--length", "60",
                                   "--temperature", "0.8", "--seed", "1"])
    assert cli.exit_code == 0 and cli.stdout == "ROMEO:" + text + "\n"
    samples = lm.samples("ROMEO:", num_samples=3, length=20, seed=4)
    assert len(samples) == 3 and all(len(s) == 20 for s in samples)


def test_perplexity_and_score(play_run):
    lm = charlm.load(play_run)
    result = lm.perplexity("JULIET:\nO Romeo, Romeo?\n")
    assert result.unknown_tokens == 0 and result.characters == 24
    assert math.isclose(result.perplexity, math.exp(result.nats_per_token))
    assert result.bits_per_char == pytest.approx(result.total_nats / math.log(2) / 24)
    strange = lm.perplexity("Zebra 123\n")
    assert strange.unknown_tokens > 0 and "Z" in strange.unknown
    likely, unlikely = lm.score(["O Romeo, Romeo", "qqq zzz xxq"])
    assert likely.nats_per_token < unlikely.nats_per_token


def test_train_refuses_unknown_options_and_nonsense(tmp_path):
    with pytest.raises(ConfigError, match="unknown training option"):
        charlm.train(None, hidden=12)
    with pytest.raises(ConfigError, match="--hidden-size"):
        charlm.train(None, hidden_size=0, out=tmp_path / "r")


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The README's Python block, verbatim, with its budget shortened (a three-minute run adds nothing
    that the end-to-end tests do not check)."""
    code = _readme_python_block().replace("max_minutes=3", "max_minutes=0.02")
    _prepare_example_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "checkpoints" / "corpus" / "best.safetensors").is_file()


def _readme_python_block() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _prepare_example_files(folder: Path) -> None:
    (folder / "corpus.txt").write_text(PLAY, encoding="utf-8")
    (folder / "valid.txt").write_text(PLAY[:400], encoding="utf-8")
    charlm.train(folder / "corpus.txt", out=folder / "checkpoints" / "tinyshakespeare", max_steps=5, **TINY)


def test_wrong_types_are_charlm_errors_not_type_errors(play_run, tmp_path):
    from charlm.errors import CharlmError

    lm = charlm.load(play_run)
    for call in (lambda: lm.score("O Romeo"), lambda: lm.score([1, 2]), lambda: lm.perplexity(b"bytes"),
                 lambda: "".join(lm.generate(5)), lambda: charlm.load(5),
                 lambda: charlm.train(None, include=5), lambda: charlm.train(None, out=3),
                 lambda: charlm.train(None, tie_weights="yes"), lambda: charlm.train(3.5)):
        with pytest.raises(CharlmError):
            call()
    with pytest.raises(CharlmError, match="no checkpoint under .*name a checkpoint file or run folder"):
        charlm.load(root=tmp_path)


def test_a_registry_corpus_trains_with_the_tokenizer_its_results_use(tmp_path, monkeypatch):
    from charlm.data import corpora

    folder = tmp_path / "corpora" / "enwik8"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text(PLAY, encoding="utf-8")
    (folder / "valid.txt").write_text(PLAY[:2000], encoding="utf-8")
    prepared = corpora.PreparedCorpus("enwik8", folder, {"train": folder / "train.txt",
                                                         "valid": folder / "valid.txt"})
    monkeypatch.setattr(corpora, "resolve_corpus_name", lambda name, **kw: prepared if name == "enwik8" else None)
    notes = []
    run = charlm.train("enwik8", out=tmp_path / "b", max_steps=2, on_note=notes.append, **TINY)
    assert charlm.load(run.run_dir).tokenizer.kind == "byte"
    assert any("--tokenizer byte, the tokenizer enwik8's published results use" in n for n in notes)
    chosen = charlm.train("enwik8", out=tmp_path / "c", max_steps=2, tokenizer="char", **TINY)
    assert charlm.load(chosen.run_dir).tokenizer.kind == "char"  # asked for: honoured


def test_bits_per_byte_and_the_word_model_caveat(play_run, tmp_path):
    lm = charlm.load(play_run)
    text = "ROMEO: café\n"
    result = lm.perplexity(text)
    assert result.bytes == len(text.encode()) == len(text) + 1
    assert result.bits_per_byte == pytest.approx(result.total_nats / math.log(2) / result.bytes)
    assert result.caveat is None
    corpus = tmp_path / "w.txt"
    corpus.write_text("the cat sat on the mat .\n" * 100, encoding="utf-8")
    words = charlm.train(corpus, tokenizer="word", out=tmp_path / "w", max_steps=2, **TINY)
    assert "lower bounds" in charlm.load(words.run_dir).perplexity("the cat sat .\n").caveat
    cli = CliRunner().invoke(app, ["perplexity", str(corpus), "--checkpoint", str(words.run_dir)])
    assert cli.exit_code == 0 and "bits/char*" in cli.stdout and "lower bounds" in cli.stderr


def test_word_defaults_sgd_and_a_trained_unk_and_every_one_can_be_overridden(tmp_path):
    corpus = tmp_path / "w.txt"
    corpus.write_text("a rare word .\n" + "the cat sat on the mat .\nthe dog sat .\n" * 60, encoding="utf-8")
    run = charlm.train(corpus, tokenizer="word", out=tmp_path / "a", max_steps=2, device="cpu")
    ckpt = charlm.load(run.run_dir).checkpoint
    assert (ckpt.train_config.optimizer, ckpt.train_config.lr, ckpt.train_config.clip) == ("sgd", 20.0, 0.25)
    assert ckpt.train_config.weight_decay == 0.0 and ckpt.model_config.weight_drop > 0
    assert "rare" not in ckpt.tokenizer.to_dict()["words"]  # seen once: <UNK>, which is thereby trained
    mine = charlm.train(corpus, tokenizer="word", out=tmp_path / "b", max_steps=2, device="cpu", optimizer="adamw",
                        min_count=1, weight_drop=0.0, lr=1e-3)
    ckpt = charlm.load(mine.run_dir).checkpoint
    assert (ckpt.train_config.optimizer, ckpt.train_config.lr, ckpt.model_config.weight_drop) == ("adamw", 1e-3, 0.0)
    assert "rare" in ckpt.tokenizer.to_dict()["words"]


def test_results_know_their_json_and_the_cli_and_server_use_it(play_run, tmp_path):
    """One to_dict per result type: `charlm perplexity --json`, `charlm score --json` and the HTTP
    routes all give the same keys for the same figures."""
    import json as json_module

    from typer.testing import CliRunner

    from charlm.cli import app

    lm = charlm.load(play_run)
    text = "O Romeo, Romeo\nwherefore art thou\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    result = lm.perplexity(text)
    data = result.to_dict()
    assert data["nats_per_token"] == result.nats_per_token and isinstance(data["unknown"], list)
    shown = CliRunner().invoke(app, ["perplexity", str(tmp_path / "t.txt"), "--checkpoint", str(play_run), "--json"])
    assert shown.exit_code == 0, shown.output
    cli = json_module.loads(shown.stdout)
    assert {k: cli[k] for k in data} == json_module.loads(json_module.dumps(data))
    lines = lm.score(text.splitlines(), logprobs=True, top=2)
    row = lines[0].to_dict()
    assert row["tokens"] == lines[0].num_tokens and row["logprobs"][0] == lines[0].logprobs[0].to_dict()
    scored = CliRunner().invoke(app, ["score", str(tmp_path / "t.txt"), "--checkpoint", str(play_run), "--json"])
    assert scored.exit_code == 0, scored.output
    first = json_module.loads(scored.stdout)["lines"][0]
    plain = lm.score(text.splitlines())[0].to_dict()
    assert first["line"] == 1 and {k: first[k] for k in plain} == json_module.loads(json_module.dumps(plain))
