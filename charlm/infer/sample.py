"""Drawing text from a model: ``next_token`` picks one token, ``generate`` runs the loop and streams."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from charlm.config import LIMITS, Range, SampleConfig, brief
from charlm.errors import Cancelled, SamplingError, UsageError, out_of_memory_as
from charlm.infer.step import FastStep
from charlm.model.lm import RNNLM
from charlm.model.precision import Precision, resolve_precision
from charlm.data.tokenizer import EOS, Tokenizer


def sampling_precision(requested: str, device: torch.device) -> Precision:
    """The matmuls' precision for sampling. ``auto`` is fp32: bf16 steps move a trained model's
    log-probabilities of likely tokens by up to ~0.1 after a few hundred steps (the state drifts),
    past the 1e-2 a sampler must stay within to draw from the model's own distribution (docs/precision.md);
    bf16 is there for whoever asks."""
    if requested == "auto":
        return Precision("fp32", "sampling stays exact under auto")
    return resolve_precision(requested, device)


def next_token(logits: torch.Tensor, *, temperature: float, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None,
               checked: bool = True) -> torch.Tensor:
    """Token ids (B,) drawn from logits (B, V). Temperature 0 means argmax, whatever the seed.

    Defined for every input: a temperature so small that ``logits / temperature`` overflows is
    argmax (ties shared evenly); a token scored +inf is certain (several share); NaN scores, or
    none above -inf, raise ``SamplingError`` instead of reaching ``torch.multinomial``.
    """
    logits = logits.float()
    if temperature == 0:
        if bool(torch.isnan(logits).any()):
            raise SamplingError(_NAN_SCORES)
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if checked and not bool(torch.isfinite(scaled).all()):  # rare: one check on the common path
        scaled = _stable_scaled(logits, temperature)
    logits = scaled
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the ones before it already reach top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[..., 0] = False  # explicitly: a top_p that rounds to 0 in float32 would drop it
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_NAN_SCORES = ("the model's scores are NaN (its weights overflow in float32), so there is nothing to sample; "
               "this checkpoint cannot generate text")


_ALL_NEG_INF = "the model scores every token -inf, so there is nothing to sample"


def _stable_scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` shifted so each row's best token is 0 and nothing overflows."""
    if bool(torch.isnan(logits).any()):
        raise SamplingError(_NAN_SCORES)
    scaled, best = _stable_form(logits, temperature)
    if bool(torch.isneginf(best).any()):
        raise SamplingError(_ALL_NEG_INF)
    return scaled


def _stable_form(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``_stable_scaled`` without its checks (no host read), and each row's best score."""
    posinf = torch.isposinf(logits)
    # Rows with +inf scores: those tokens alone, equally likely.
    logits = torch.where(posinf.any(dim=-1, keepdim=True), torch.where(posinf, 0.0, float("-inf")), logits)
    best = logits.amax(dim=-1, keepdim=True)
    if temperature < torch.finfo(torch.float32).tiny:  # 0 in float32 arithmetic: the limit, argmax
        return torch.where(logits == best, 0.0, float("-inf")), best
    # Every value is now ≤ 0 and the best is exactly 0; dividing keeps the best at 0, and the
    # others that underflow to -inf simply get probability 0 (a tiny temperature is argmax).
    return (logits - best) / temperature, best


@dataclass(frozen=True)
class Piece:
    """Text generated for one stream (sample); ``done`` marks its last piece."""

    stream: int
    text: str
    done: bool = False


def prime_ids(tokenizer: Tokenizer, prime: str) -> np.ndarray:
    """Ids to condition on. An empty prime starts at a line start (newline / ``<EOS>``)."""
    if prime:
        if tokenizer.kind == "char":
            unknown = tokenizer.unknown_symbols(prime)  # type: ignore[attr-defined]
            if unknown:
                shown = " ".join(repr(c) for c in unknown[:10])
                raise UsageError(f"the prime has characters this model has never seen: {shown}")
        ids = tokenizer.encode(prime)
        if tokenizer.kind == "word" and prime and not prime.endswith("\n"):
            ids = ids[:-1]  # a prime mid-line must not end the line with <EOS>
        if len(ids):
            return ids
    if tokenizer.eos_id is not None:
        return np.array([tokenizer.eos_id])
    newline = tokenizer.encode("\n")
    if len(newline) and (tokenizer.unk_id is None or newline[0] != tokenizer.unk_id):
        return newline
    return np.array([1 if tokenizer.vocab_size > 1 else 0])  # the first real token


def check_stop(tokenizer: Tokenizer, stop: str | None) -> None:
    """Refuse a stop string the model can never write (it holds a character that no token of the
    vocabulary decodes to): the sample would otherwise run its whole length looking for it."""
    if not stop or (stop == EOS and tokenizer.eos_id is not None):
        return
    if missing := tokenizer.unwritable(stop):
        shown = " ".join(repr(c) for c in missing[:10])
        raise UsageError(f"the stop string {brief(stop)} can never be generated: this model's vocabulary has no "
                         f"{shown}" + (" (a word model ends lines with '<EOS>')" if tokenizer.kind == "word" else ""))


class _StopBuffer:
    """Holds back text that might be the start of the stop string, so output never shows a partial stop."""

    def __init__(self, stop: str | None) -> None:
        self.stop = stop
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stop:
            return text, False
        self.pending += text
        at = self.pending.find(self.stop)
        if at >= 0:
            out, self.pending = self.pending[:at], ""
            return out, True
        keep = 0
        for k in range(min(len(self.stop) - 1, len(self.pending)), 0, -1):
            if self.stop.startswith(self.pending[-k:]):
                keep = k
                break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """One request's samples between steps: its RNG, stop buffers, decoders and progress. Whoever
    holds it runs the model (``generate`` alone; a server may step several requests in one batch)
    and hands each step's logits to ``advance``. ``state``/``token`` are the rows to start from."""

    @torch.inference_mode()
    def __init__(self, model: RNNLM, tokenizer: Tokenizer, *, config: SampleConfig, prime: str = "") -> None:
        model.eval()
        device = model.embedding.weight.device
        self.config = config
        self.generator = torch.Generator(device=device)
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()
        n = self.num_samples = config.num_samples
        check_stop(tokenizer, config.stop)
        context = torch.as_tensor(prime_ids(tokenizer, prime).astype(np.int64), device=device)
        self.state = None
        with _preparing(model, n):
            if len(context) > 1:  # read once; every sample starts from its state
                _, state = model(context[None, :-1], None)
                self.state = (tuple(s.expand(-1, n, -1) for s in state) if isinstance(state, tuple)
                              else state.expand(-1, n, -1))
        self.token = context[-1:].expand(n).contiguous()  # (B,)
        self.eos_id = tokenizer.eos_id if config.stop == EOS and tokenizer.eos_id is not None else None
        self.buffers = [_StopBuffer(None if self.eos_id is not None else config.stop) for _ in range(n)]
        self.decoders = [tokenizer.decoder() for _ in range(n)]
        if tokenizer.kind == "word" and prime and not prime.endswith("\n"):
            for decoder in self.decoders:
                decoder.feed(int(context[-1]))  # continue the prime's line with a space
        self.done = [False] * n
        self.steps = 0
        self.finished = config.length == 0

    def start(self) -> list[Piece]:
        """The pieces due before any step: with length 0 every sample ends at once, empty."""
        return [Piece(b, "", True) for b in range(self.num_samples)] if self.config.length == 0 else []

    def advance(self, logits: torch.Tensor) -> list[Piece]:
        """Draw the next token of every sample from ``logits`` (B, V); the pieces that produced."""
        config = self.config
        self.token = next_token(logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                generator=self.generator)
        return self.take(self.token.tolist())

    @property
    def reads_text(self) -> bool:
        """Whether a step's token must be read as it is drawn: a stop string or <EOS> ends a sample."""
        return self.eos_id is not None or any(buffer.stop for buffer in self.buffers)

    def take(self, token_ids: list[int]) -> list[Piece]:
        """One step's drawn token ids (one per sample), decoded into the pieces they produce."""
        config = self.config
        pieces = []
        for b, token_id in enumerate(token_ids):
            if self.done[b]:
                continue
            if token_id == self.eos_id:
                self.done[b] = True
                pieces.append(Piece(b, "", True))
                continue
            text, stopped = self.buffers[b].push(self.decoders[b].feed(token_id))
            if stopped:
                self.done[b] = True
            if text or stopped:
                pieces.append(Piece(b, text, stopped))
        self.steps += 1
        if all(self.done):
            self.finished = True
        elif self.steps == config.length:
            self.finished = True
            pieces.extend(Piece(b, self.buffers[b].flush(), True) for b in range(self.num_samples) if not self.done[b])
        return pieces


def draw_on_device(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``next_token`` without reading anything back to the host: the same tokens for the same
    generator wherever ``next_token`` returns one, and flags (device bools: some row's scores are
    NaN; some row's are all -inf) instead of its errors (such a row draws uniformly, to be discarded)."""
    logits = logits.float()
    nan, none = torch.isnan(logits).any(dim=-1), ~(logits > float("-inf")).any(dim=-1)
    bad = nan | none
    flags = torch.stack([nan.any(), none.any()])
    if temperature == 0:
        return logits.argmax(dim=-1), flags
    scaled = logits / temperature
    # Rows that overflow take the stable form next_token switches to (without its checks).
    scaled = torch.where(torch.isfinite(scaled).all(dim=-1, keepdim=True), scaled,
                         _stable_form(logits, temperature)[0])
    scaled = torch.where(bad[:, None], 0.0, scaled)
    return next_token(scaled, temperature=1.0, top_k=top_k, top_p=top_p, generator=generator, checked=False), flags


# Where a sample that no stop string has to read draws blocks of tokens before reading them back:
# on a GPU each read is a wait for the device (``generate``).
DRAW_AHEAD_DEVICES = frozenset({"cuda"})
DRAW_AHEAD = 32


def _preparing(model: RNNLM, num_samples: int):  # noqa: ANN202 - a context manager
    return out_of_memory_as(f"preparing {num_samples:,} sample(s) of a {model.cfg.num_layers}×"
                            f"{model.cfg.hidden_size} model", "make --num-samples (or the --prime) smaller")


def generate(model: RNNLM, tokenizer: Tokenizer, *, config: SampleConfig, prime: str = "",
             precision: str = "auto") -> Iterator[Piece]:
    """Stream ``config.num_samples`` samples of ``config.length`` tokens, a piece per token.

    ``config.stop`` ends a sample at that string (not included); for word models ``<EOS>`` ends it
    at the end of the line. ``precision`` is the steps' matmuls' (``sampling_precision``); the
    prime is always read in fp32. The prime, the stop string and the precision are checked here,
    before the first piece is asked for.
    """
    device = model.embedding.weight.device
    chosen = sampling_precision(precision, device)
    with torch.inference_mode():
        run = Generation(model, tokenizer, config=config, prime=prime)
        with _preparing(model, config.num_samples):
            # The same arithmetic as model(token[:, None], state), without its overhead.
            fast = FastStep(model, dtype=chosen.dtype)
            fast.reset(config.num_samples, run.state)
    return _steps(run, fast)


@torch.inference_mode()
def _steps(run: Generation, fast: FastStep) -> Iterator[Piece]:
    yield from run.start()
    if run.token.device.type in DRAW_AHEAD_DEVICES and not run.reads_text:
        yield from _drawn_ahead(run, fast)
    while not run.finished:
        yield from run.advance(fast.step(run.token))


def _drawn_ahead(run: Generation, fast: FastStep) -> Iterator[Piece]:
    """The steps in blocks of ``DRAW_AHEAD`` tokens drawn on the device and read back once a block:
    the same tokens as a step at a time (``draw_on_device``), without a wait for each."""
    config = run.config
    while not run.finished:
        count = min(DRAW_AHEAD, config.length - run.steps)
        block, flags = [], torch.zeros(2, dtype=torch.bool, device=run.token.device)
        for _ in range(count):
            run.token, bad = draw_on_device(fast.step(run.token), temperature=config.temperature,
                                            top_k=config.top_k, top_p=config.top_p, generator=run.generator)
            flags |= bad
            block.append(run.token)
        nan, none = flags.tolist()
        if nan:
            raise SamplingError(_NAN_SCORES)
        if none:
            raise SamplingError(_ALL_NEG_INF)
        for token_ids in torch.stack(block).tolist():
            yield from run.take(token_ids)


BEAM = Range(int, 1, 10_000)  # hypotheses kept by beam search


@torch.inference_mode()
def beam_search(model: RNNLM, tokenizer: Tokenizer, *, prime: str = "", length: int, beam: int,
                should_stop: Callable[[], bool] | None = None) -> tuple[list[int], float]:
    """The most likely continuation of ``prime`` of ``length`` tokens that a beam of ``beam``
    hypotheses finds, and its log-probability (nats, under the model itself). ``beam`` 1 is
    greedy decoding (temperature 0); a beam as wide as every sequence of ``length - 1`` tokens is
    exhaustive search. Each step runs the model on the hypotheses as one batch (fp32)."""
    for name, limit in (("beam", BEAM), ("length", LIMITS["length"])):
        value = beam if name == "beam" else length
        if not limit.allows(value):
            raise UsageError(f"--{name} must be {limit.describe()} (got {brief(value)})")
    model.eval()
    device = model.embedding.weight.device
    context = torch.as_tensor(prime_ids(tokenizer, prime).astype(np.int64), device=device)
    with _preparing(model, beam):
        state = model(context[None, :-1], None)[1] if len(context) > 1 else None
    token = context[-1:]  # (B,): one hypothesis to start
    scores = torch.zeros(1, dtype=torch.float64, device=device)
    sequences: list[list[int]] = [[]]
    for _ in range(length):
        if should_stop is not None and should_stop():
            raise Cancelled("beam search was cancelled")
        logits, state = model(token[:, None], state)  # (B, 1, V)
        logp = torch.log_softmax(logits[:, -1].double(), dim=-1)
        if bool(torch.isnan(logp).any()):
            raise SamplingError(_NAN_SCORES)
        total = (scores[:, None] + logp).flatten()
        scores, flat = torch.topk(total, min(beam, total.numel()))
        rows, token = flat // logp.size(1), flat % logp.size(1)
        sequences = [sequences[r] + [t] for r, t in zip(rows.tolist(), token.tolist())]
        state = tuple(s[:, rows] for s in state) if isinstance(state, tuple) else state[:, rows]
    return sequences[0], float(scores[0])
