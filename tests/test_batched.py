"""Batched generation (infer/batched.py, ``LanguageModel.generate_batch``): a batch's texts are the
texts of the same requests generated one at a time with the same seeds, generations join and leave
between steps, and bad arguments are refused with a message."""
from __future__ import annotations

import pytest
import torch

import charlm
from charlm.config import SampleConfig
from charlm.errors import CharlmError, UsageError
from charlm.infer.batched import BatchedGenerations, generate_batch
from charlm.infer.sample import Generation


@pytest.fixture(scope="module")
def lm(trained_run):
    return charlm.load(trained_run)


def test_a_batch_equals_its_prompts_generated_one_at_a_time(lm, one_thread):
    """Rows computed beside others' may round differently (~1e-7 in the logits), so a sampled draw
    may rarely differ; over these draws next to none does, and argmax text never."""
    prompts = ["First", "", "Sp", "All:\n", "F", "Resolved", "You are", "Speak"] * 2
    seeds = list(range(len(prompts)))
    for temperature in (0.0, 1.0):
        got = lm.generate_batch(prompts, length=60, temperature=temperature, seed=seeds)
        want = ["".join(lm.generate(p, length=60, temperature=temperature, seed=s)) for p, s in zip(prompts, seeds)]
        assert len(got) == len(prompts)
        if temperature == 0:
            assert got == want
        assert sum(g == w for g, w in zip(got, want)) >= len(prompts) - 1, (got, want)


def test_one_seed_serves_every_prompt_and_stop_strings_end_texts_apart(lm, one_thread):
    prompts = ["First", "Sp", "All"]
    got = lm.generate_batch(prompts, length=80, temperature=0.0, seed=3, stop="e", top_k=5)
    assert got == ["".join(lm.generate(p, length=80, temperature=0.0, seed=3, stop="e", top_k=5)) for p in prompts]
    assert all("e" not in text for text in got)
    assert lm.generate_batch(["First", "Sp"], length=0) == ["", ""]
    assert lm.generate_batch([], length=10) == []


def test_several_samples_of_a_request_are_its_rows(lm, one_thread):
    requests = [("First", SampleConfig(length=40, num_samples=3, seed=5, temperature=0.0)),
                ("Sp", SampleConfig(length=30, num_samples=2, seed=1, temperature=0.0))]
    got = generate_batch(lm.model, lm.tokenizer, requests)
    assert got == [lm.samples(prime, num_samples=c.num_samples, length=c.length, seed=c.seed, temperature=0.0)
                   for prime, c in requests]


def test_generations_join_and_leave_between_steps(lm, one_thread):
    batch = BatchedGenerations(lm.model, max_rows=3)
    config = SampleConfig(length=30, seed=2, temperature=0.0)
    first = Generation(lm.model, lm.tokenizer, config=config, prime="First")
    second = Generation(lm.model, lm.tokenizer, config=SampleConfig(length=30, num_samples=2, temperature=0.0),
                        prime="Sp")
    texts = {id(first): "", id(second): ""}
    batch.add(first)
    for _ in range(10):
        for run, pieces in batch.step():
            texts[id(run)] += "".join(p.text for p in pieces if p.stream == 0)
    assert not batch.fits(Generation(lm.model, lm.tokenizer, config=SampleConfig(length=5, num_samples=3),
                                     prime="F"))
    batch.add(second)  # joins mid-way; its rows start from its prime
    while batch.running:
        for run, pieces in batch.step():
            texts[id(run)] += "".join(p.text for p in pieces if p.stream == 0)
    assert texts[id(first)] == "".join(lm.generate("First", length=30, temperature=0.0))
    assert texts[id(second)] == "".join(lm.generate("Sp", length=30, temperature=0.0))
    lone = Generation(lm.model, lm.tokenizer, config=config, prime="First")
    batch.add(lone)
    batch.remove(lone)
    assert batch.running == [] and batch.step() == []


def test_a_generation_whose_scores_are_nan_fails_alone(lm, one_thread):
    batch = BatchedGenerations(lm.model, max_rows=2)
    good = Generation(lm.model, lm.tokenizer, config=SampleConfig(length=5, temperature=0.0), prime="F")
    bad = Generation(lm.model, lm.tokenizer, config=SampleConfig(length=5, temperature=0.0), prime="F")
    batch.add(good)
    batch.add(bad)
    original = bad.advance
    bad.advance = lambda logits: original(torch.full_like(logits, float("nan")))  # type: ignore[method-assign]
    outcomes = dict((id(run), outcome) for run, outcome in batch.step())
    assert isinstance(outcomes[id(bad)], CharlmError) and isinstance(outcomes[id(good)], list)
    assert batch.running == [good]


@pytest.mark.parametrize("call,words", [
    (lambda lm: lm.generate_batch("First"), "list of strings"),
    (lambda lm: lm.generate_batch(["First", 5]), r"prompts\[1\] must be a string"),
    (lambda lm: lm.generate_batch(["a", "b"], seed=[1]), "one seed per prompt"),
    (lambda lm: lm.generate_batch(["a"], seed="1"), "seed must be"),
    (lambda lm: lm.generate_batch(["a"], seed=[-1]), "seed"),
    (lambda lm: lm.generate_batch(["a"], length=-1), "length"),
    (lambda lm: lm.generate_batch(["a"], temperature=-1), "temperature"),
    (lambda lm: lm.generate_batch(["a"], top_k=0), "top-k"),
    (lambda lm: lm.generate_batch(["a"], stop=""), "stop"),
    (lambda lm: lm.generate_batch(["✓☃"]), "never seen"),
    (lambda lm: lm.generate_batch(["a"], precision=3), "precision must be"),
    (lambda lm: BatchedGenerations(lm.model, max_rows=0), "max_rows"),
])
def test_bad_arguments_are_refused_with_a_message(lm, call, words):
    with pytest.raises(UsageError, match=words):
        call(lm)
