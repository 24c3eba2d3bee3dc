"""Beam search (`charlm sample --beam N`, `lm.generate(beam=N)`) against brute force on a tiny model."""
from __future__ import annotations

import itertools

import pytest
import torch
from typer.testing import CliRunner

import charlm
from charlm.cli import app
from charlm.config import ModelConfig, SampleConfig
from charlm.errors import UsageError
from charlm.model.lm import RNNLM
from charlm.infer.sample import beam_search, generate, prime_ids
from charlm.data.tokenizer import CharTokenizer

runner = CliRunner()


@pytest.fixture(scope="module", params=["lstm", "gru"])
def tiny(request):
    torch.manual_seed(3)
    tokenizer = CharTokenizer.fit("abcd\n" * 3)
    model = RNNLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, embed_size=4, num_layers=2,
                              cell=request.param))
    with torch.no_grad():  # sharper distributions than an untrained model's near-uniform ones
        for p in model.parameters():
            p.mul_(4)
    return model.eval(), tokenizer


def brute_force(model, tokenizer, prime: str, length: int) -> dict[tuple[int, ...], float]:
    """Every sequence of ``length`` tokens with its log-probability, from one batched forward pass."""
    V = tokenizer.vocab_size
    context = torch.as_tensor(prime_ids(tokenizer, prime).astype("int64"))
    sequences = torch.tensor(list(itertools.product(range(V), repeat=length)))
    inputs = torch.cat([context.expand(len(sequences), -1), sequences[:, :-1]], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs, None)[0].double(), dim=-1)[:, len(context) - 1:]
    scores = logp.gather(2, sequences[:, :, None])[:, :, 0].sum(1)
    return {tuple(s): float(v) for s, v in zip(sequences.tolist(), scores)}


@pytest.mark.parametrize("prime", ["", "ab", "c\nd"])
def test_a_wide_beam_is_exhaustive_search(tiny, prime):
    model, tokenizer = tiny
    length = 4
    every = brute_force(model, tokenizer, prime, length)
    best = max(every, key=every.get)
    ids, score = beam_search(model, tokenizer, prime=prime, length=length, beam=tokenizer.vocab_size ** (length - 1))
    assert tuple(ids) == best and score == pytest.approx(every[best], abs=1e-5)
    for beam in (1, 2, 3, 7):  # narrower beams: a real sequence, scored right, never better than the best
        ids, score = beam_search(model, tokenizer, prime=prime, length=length, beam=beam)
        assert score == pytest.approx(every[tuple(ids)], abs=1e-5) and score <= every[best] + 1e-5


def test_beam_1_is_greedy_decoding(tiny):
    model, tokenizer = tiny
    greedy = [p.text for p in generate(model, tokenizer, config=SampleConfig(temperature=0, length=30), prime="a")]
    ids, _ = beam_search(model, tokenizer, prime="a", length=30, beam=1)
    assert tokenizer.decode(ids) == "".join(greedy)


def test_lm_generate_and_charlm_sample_with_a_beam(trained_run):
    lm = charlm.load(trained_run)
    assert "".join(lm.generate("First", length=40, beam=1)) == "".join(lm.generate("First", length=40, temperature=0))
    wide = "".join(lm.generate("First", length=40, beam=4))
    assert len(wide) == 40
    result = runner.invoke(app, ["sample", "--checkpoint", str(trained_run), "--prime", "First", "--length", "40",
                                 "--beam", "4"])
    assert result.exit_code == 0 and result.stdout == "First" + wide + "\n"


@pytest.mark.parametrize("args", [["--temperature", "0.8"], ["--seed", "1"], ["--top-k", "3"], ["--stop", "x"],
                                  ["--num-samples", "2"], ["--top-p", "0.5"]])
def test_sampling_options_with_a_beam_are_refused(trained_run, args):
    result = runner.invoke(app, ["sample", "--checkpoint", str(trained_run), "--beam", "2", *args])
    assert result.exit_code == 2 and "--beam" in result.output and args[0] in result.output


def test_bad_beams_are_refused(trained_run):
    lm = charlm.load(trained_run)
    for beam in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="--beam must be"):
            list(lm.generate("F", length=3, beam=beam))
    with pytest.raises(UsageError, match="temperature"):
        list(lm.generate("F", length=3, beam=2, temperature=0.5))
    with pytest.raises(UsageError, match="fp32"):
        list(lm.generate("F", length=3, beam=2, precision="bf16"))
    result = runner.invoke(app, ["sample", "--checkpoint", str(trained_run), "--beam", "0"])
    assert result.exit_code == 2 and "--beam must be" in result.output
    assert "".join(lm.generate("F", length=0, beam=3)) == ""
