"""End-to-end runs on real text (marked slow: they take tens of seconds each)."""
import json
import math

import pytest
from typer.testing import CliRunner

from charlm.cli import app
from charlm.data.text import split_text

runner = CliRunner()
pytestmark = pytest.mark.slow


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_char_model_on_real_text_learns_and_perplexity_reproduces_val(tmp_path, shakespeare):
    corpus = tmp_path / "shakespeare_head.txt"
    corpus.write_text(shakespeare[:200_000], encoding="utf-8")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(corpus), "--out", str(out), "--hidden-size", "96", "--embed-size", "32",
                                 "--max-steps", "250", "--eval-every", "50", "--device", "cpu", "--sample-length", "0"])
    assert result.exit_code == 0, result.output
    events = _events(out)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    vals = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert losses[-1] < losses[0] - 1.0 and vals[-1] < 2.6
    best = min(vals)
    # Perplexity on exactly the validation text reproduces the trainer's best val loss.
    _, val_text = split_text(corpus.read_text(encoding="utf-8"), 0.1)
    held = tmp_path / "val.txt"
    held.write_text(val_text, encoding="utf-8")
    report = json.loads(runner.invoke(app, ["perplexity", str(held), "--checkpoint", str(out), "--json",
                                            "--no-cache"]).stdout)
    assert abs(report["nats_per_token"] - best) < 0.01
    # With the cache pointer the run fitted (Shakespeare repeats its speakers' names): lower, and the
    # model alone's figure of the same sequential pass still reproduces the trainer's.
    cached = json.loads(runner.invoke(app, ["perplexity", str(held), "--checkpoint", str(out), "--json"]).stdout)
    assert cached["cache"] is not None and cached["nats_per_token"] < best - 0.01
    assert abs(cached["nats_per_token_without_cache"] - best) < 0.01


def test_word_model_end_to_end_with_unknown_words(tmp_path, shakespeare):
    corpus = tmp_path / "words.txt"
    corpus.write_text(shakespeare[:150_000], encoding="utf-8")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(corpus), "--tokenizer", "word", "--min-count", "2", "--out", str(out),
                                 "--hidden-size", "64", "--max-steps", "120", "--eval-every", "10",
                                 "--device", "cpu", "--sample-length", "20"])
    assert result.exit_code == 0, result.output
    vals = [e["val_loss"] for e in _events(out) if e["event"] == "eval"]
    vocab_size = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)["vocab_size"]
    assert vals[0] < math.log(vocab_size)  # better than guessing after 10 steps
    assert min(vals) < vals[0] - 0.3  # and the loss keeps falling
    held = tmp_path / "held.txt"
    held.write_text("the king is dead\nlong live the xylophonist of zanzibar\n", encoding="utf-8")
    report = json.loads(runner.invoke(app, ["perplexity", str(held), "--checkpoint", str(out), "--json"]).stdout)
    assert report["tokens"] == 12 and report["unknown_tokens"] >= 2
    text = runner.invoke(app, ["perplexity", str(held), "--checkpoint", str(out)])
    assert "<UNK> tokens" in text.stdout and "xylophonist" in text.stderr
    sample = runner.invoke(app, ["sample", "--checkpoint", str(out), "--prime", "the king", "--length", "30",
                                 "--stop", "<EOS>", "--seed", "1"])
    assert sample.exit_code == 0 and sample.stdout.startswith("the king") and sample.stdout.count("\n") == 1


def test_byte_model_trains(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(tiny_corpus), "--tokenizer", "byte", "--out", str(out),
                                 "--hidden-size", "32", "--max-steps", "40", "--device", "cpu", "--sample-length", "30"])
    assert result.exit_code == 0, result.output
    assert json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)["vocab_size"] == 256
