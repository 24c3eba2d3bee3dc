import torch

from charlm.model.checkpoint import load_checkpoint, resolve_checkpoint
from charlm.config import SampleConfig
from charlm.infer.sample import Piece, _StopBuffer, generate, next_token


def test_temperature_zero_is_argmax_whatever_the_generator():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 4.9]])
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert next_token(logits, temperature=0, generator=g).tolist() == [1, 0]


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, temperature=1.0, top_k=2, generator=g)) for _ in range(300)}
    assert draws == {0, 1}
    draws = {int(next_token(logits, temperature=1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 ≥ 0.7: the third token is cut
    draws = {int(next_token(logits, temperature=1.0, top_p=0.4, generator=g)) for _ in range(100)}
    assert draws == {0}  # the most likely token always stays


def test_sampling_frequencies_follow_the_softmax():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.stack([next_token(logits, temperature=1.0, generator=g) for _ in range(4000)]).view(-1),
                            minlength=3).float() / 4000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_stop_buffer_never_shows_a_partial_stop():
    buf = _StopBuffer("END")
    assert buf.push("abcE") == ("abc", False)
    assert buf.push("N") == ("", False)
    assert buf.push("x") == ("ENx", False)
    assert buf.push("yyEND tail") == ("yy", True)


def _text(pieces, stream=0):
    return "".join(p.text for p in pieces if p.stream == stream)


def test_same_seed_same_sample_and_temperature_zero_ignores_seed(trained_run):
    ck = load_checkpoint(resolve_checkpoint(trained_run))
    a = _text(generate(ck.model, ck.tokenizer, config=SampleConfig(length=80, seed=7)))
    b = _text(generate(ck.model, ck.tokenizer, config=SampleConfig(length=80, seed=7)))
    c = _text(generate(ck.model, ck.tokenizer, config=SampleConfig(length=80, seed=8)))
    assert a == b and len(a) == 80 and a != c
    greedy = {_text(generate(ck.model, ck.tokenizer, config=SampleConfig(temperature=0, length=60, seed=s)))
              for s in (1, 2, 3)}
    assert len(greedy) == 1


def test_greedy_generation_matches_a_manual_argmax_loop(trained_run):
    ck = load_checkpoint(resolve_checkpoint(trained_run))
    model, tok = ck.model, ck.tokenizer
    prime = "First"
    ids = torch.tensor(tok.encode(prime).astype("int64"))[None]
    out = []
    with torch.no_grad():
        logits, state = model(ids)
        for _ in range(40):
            nxt = logits[0, -1].argmax()
            out.append(int(nxt))
            logits, state = model(nxt.view(1, 1), state)
    expected = tok.decode(out)
    got = _text(generate(model, tok, config=SampleConfig(temperature=0, length=40), prime=prime))
    assert got == expected


def test_num_samples_and_stop(trained_run):
    ck = load_checkpoint(resolve_checkpoint(trained_run))
    pieces = list(generate(ck.model, ck.tokenizer, config=SampleConfig(length=50, num_samples=3, seed=1)))
    assert {p.stream for p in pieces} == {0, 1, 2}
    assert all(sum(p.done for p in pieces if p.stream == s) == 1 for s in range(3))
    text = _text(generate(ck.model, ck.tokenizer, config=SampleConfig(temperature=0, length=300, stop="\n"),
                          prime="All:"))
    assert "\n" not in text and len(text) < 300
    assert all(isinstance(p, Piece) for p in pieces)
