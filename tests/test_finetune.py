"""Fine-tuning (`charlm train NEW --init-from RUN`), end to end through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from charlm.model.checkpoint import load_checkpoint
from charlm.cli import app

from conftest import TINY_TEXT

runner = CliRunner()
SHAPE = ["--hidden-size", "32", "--embed-size", "16", "--seq-len", "16", "--batch-size", "4", "--device", "cpu",
         "--sample-length", "0", "--warmup-steps", "2", "--lr", "0.01"]
# A new style: the same alphabet, other words, shorter lines, no speaker names.
NEW_STYLE = ("we proceed further and hear the people speak\nthe chief enemy is resolved to famish\n"
             "you know all we speak is rather to die\n") * 40


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    (folder / "old.txt").write_text(TINY_TEXT, encoding="utf-8")
    result = invoke("train", folder / "old.txt", "--out", folder / "run", "--max-steps", "150", "--eval-every", "50",
                    *SHAPE)
    assert result.exit_code == 0, result.output
    return folder / "run"


def _best(out):
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return min(e["val_loss"] for e in events if e["event"] == "eval")


def test_fine_tuning_learns_a_new_style_faster_than_training_from_scratch(base, tmp_path):
    corpus = tmp_path / "new.txt"
    corpus.write_text(NEW_STYLE, encoding="utf-8")
    common = ["--max-steps", "30", "--eval-every", "10", *SHAPE]
    tuned = invoke("train", corpus, "--out", tmp_path / "tuned", "--init-from", base, *common)
    assert tuned.exit_code == 0, tuned.output
    scratch = invoke("train", corpus, "--out", tmp_path / "scratch", *common)
    assert scratch.exit_code == 0, scratch.output
    assert _best(tmp_path / "tuned") < _best(tmp_path / "scratch") - 0.2
    tuned_model = load_checkpoint(tmp_path / "tuned" / "last.safetensors")
    assert tuned_model.tokenizer.to_dict() == load_checkpoint(base / "best.safetensors").tokenizer.to_dict()
    assert tuned_model.train_state["step"] == 30  # a new run: its own step count and schedule


def test_unseen_tokens_become_unk_or_extend_the_vocabulary(base, tmp_path):
    corpus = tmp_path / "zoo.txt"
    corpus.write_text("the quick zebra jumps over the lazy ox\n" * 60, encoding="utf-8")
    plain = invoke("train", corpus, "--out", tmp_path / "plain", "--init-from", base, "--max-steps", "2", *SHAPE)
    assert plain.exit_code == 0, plain.output
    assert "training tokens are not in the vocabulary" in plain.stderr and "--extend-vocab" in plain.stderr

    old = load_checkpoint(base / "best.safetensors")
    grown = invoke("train", corpus, "--out", tmp_path / "grown", "--init-from", base, "--extend-vocab",
                   "--max-steps", "1", *SHAPE[:-2], "--lr", "1e-9")
    assert grown.exit_code == 0, grown.output
    assert "--extend-vocab added" in grown.stderr
    new = load_checkpoint(tmp_path / "grown" / "last.safetensors")
    old_size = old.tokenizer.vocab_size
    assert new.tokenizer.vocab_size > old_size
    assert new.tokenizer.to_dict()["chars"][: old_size - 1] == old.tokenizer.to_dict()["chars"]  # old ids kept
    for name in ("embedding.weight", "head.weight", "head.bias"):
        torch.testing.assert_close(new.model.state_dict()[name][:old_size], old.model.state_dict()[name],
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(new.model.rnn.weight_hh_l0, old.model.rnn.weight_hh_l0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--hidden-size", "64"], "--hidden-size 64 conflicts with the model given to --init-from"),
    (["--tokenizer", "word"], "--tokenizer word conflicts"),
    (["--min-count", "2"], "--min-count applies to the new symbols of --extend-vocab only"),
    (["--resume", "x"], "not both"),
])
def test_fine_tune_options_that_cannot_apply_are_refused(base, tmp_path, tiny_corpus, args, message):
    result = invoke("train", tiny_corpus, "--out", tmp_path / "r", "--init-from", base, "--max-steps", "2", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_extend_vocab_needs_init_from(tmp_path, tiny_corpus):
    result = invoke("train", tiny_corpus, "--out", tmp_path / "r", "--extend-vocab", "--max-steps", "2")
    assert result.exit_code == 2 and "--extend-vocab needs --init-from" in result.stderr
