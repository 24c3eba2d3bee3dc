"""OpenAI's legacy completions API, so the clients that already speak it (the ``openai`` package,
LangChain, curl scripts, lm-evaluation-harness's ``local-completions``) use charlm unchanged.

    POST /v1/completions      {model, prompt, max_tokens, temperature, top_p, n, stop, seed, stream,
                               stream_options, logprobs, echo, user}
    GET  /v1/models           the one model served, under its run folder's name
    GET  /v1/models/{id}

Every field OpenAI defines is honoured or refused (400, OpenAI's error shape): ``suffix``,
``best_of`` > 1, a ``logit_bias`` and penalties other than 0 cannot be honoured by a model that
reads left to right without them, so they are refused, never ignored. A completion with a seed is
the text ``charlm sample --seed`` and ``lm.samples(prompt, seed=…)`` give (each prompt of a list
starts from the same seed; its ``n`` choices are one batch). Log-probabilities are the model's own
(before temperature and top_p), in nats; tokens are the pieces a person reads (a character; a word
for word models), and ``echo`` scores the prompt exactly as ``lm.logprobs(prompt,
from_line_start=False)`` (the first token's is null), which is what ``charlm score`` and
``charlm perplexity`` add up.
"""
from __future__ import annotations

import math
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from charlm import jsonio
from charlm.api import LanguageModel
from charlm.config import LIMITS, SampleConfig, brief
from charlm.errors import Cancelled, UsageError
from charlm.infer.step import FastStep
from charlm.infer.sample import Generation, prime_ids, sampling_precision
from charlm.infer.surprise import token_label

MAX_STOPS = 4
MAX_LOGPROBS = 5
DEFAULTS: dict[str, Any] = {
    "model": None, "prompt": "", "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "n": 1, "stop": None,
    "seed": None, "stream": False, "stream_options": None, "logprobs": None, "echo": False, "user": None,
    # OpenAI's, which charlm refuses unless they are their no-op values:
    "suffix": None, "best_of": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
}


def model_id_of(lm: LanguageModel) -> str:
    """The stable name a client asks for: the run folder's (a loose file's own name without .safetensors)."""
    path = lm.path
    if path.name in ("best.safetensors", "last.safetensors") or path.parent.name:
        name = path.parent.name if path.name in ("best.safetensors", "last.safetensors") else path.stem
    else:
        name = path.stem
    return name or "charlm"


@dataclass(frozen=True)
class Completion:
    """A checked request."""

    prompts: tuple[str, ...]
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stops: tuple[str, ...]
    seed: int
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


def _bad(problem: Any, message: str, param: str | None) -> Exception:
    return problem(400, message, param=param)


def check_completion(body: dict[str, Any], *, model_id: str, max_length: int, max_samples: int,
                     vocab_size: int, problem: Any) -> Completion:
    """The request's fields checked against OpenAI's definitions and this server's bounds."""
    unknown = [key for key in body if key not in DEFAULTS]
    if unknown:
        raise _bad(problem, f"Unrecognized request argument supplied: {brief(unknown[0])}", unknown[0])
    values = {**DEFAULTS, **{k: v for k, v in body.items() if v is not None or k in ("model",)}}

    model = values["model"]
    if not isinstance(model, str) or not model:
        raise _bad(problem, f"model must be the served model's name, {model_id!r} (got {brief(model)})", "model")
    if model != model_id:
        raise problem(404, f"The model {brief(model)} does not exist; this server serves {model_id!r} "
                           f"(GET /v1/models)", param="model", code="model_not_found")

    prompt = values["prompt"]
    if isinstance(prompt, str):
        prompts = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) and not isinstance(p, bool)
                                                     for p in prompt):
        raise _bad(problem, "prompt as token ids is not supported: charlm's tokens are not OpenAI's; send the text",
                   "prompt")
    else:
        raise _bad(problem, f"prompt must be a string or a non-empty list of strings (got {brief(prompt)})", "prompt")
    if len(prompts) > max_samples:
        raise _bad(problem, f"prompt may hold at most {max_samples} texts on this server (--max-samples; got "
                            f"{len(prompts)})", "prompt")

    def whole(name: str, low: int, high: int, option: str = "") -> int:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            bound = f"[{low}, {high:,}]" + (f" on this server ({option})" if option else "")
            raise _bad(problem, f"{name} must be a whole number in {bound} (got {brief(value)})", name)
        return value

    def number(name: str, low: float, high: float, *, low_open: bool = False) -> float:
        value = values[name]
        ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)))
        if not ok or not (low < value if low_open else low <= value) or value > high:
            raise _bad(problem, f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}] "
                                f"(got {brief(value)})", name)
        return float(value)

    max_tokens = whole("max_tokens", 0, max_length, "--max-length")
    n = whole("n", 1, max_samples, "--max-samples")
    temperature = number("temperature", 0, 2)
    top_p = number("top_p", 0, 1, low_open=True)
    seed = values["seed"]
    if seed is not None and not LIMITS["seed"].allows(seed):
        raise _bad(problem, f"seed must be {LIMITS['seed'].describe()} or null (got {brief(seed)})", "seed")
    logprobs = values["logprobs"]
    if logprobs is not None:
        logprobs = whole("logprobs", 0, min(MAX_LOGPROBS, vocab_size))

    stop = values["stop"]
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else None
    if stop is not None and (stops is None or not 1 <= len(stops) <= MAX_STOPS
                             or not all(isinstance(s, str) and s for s in stops)):
        raise _bad(problem, f"stop must be a non-empty string or a list of 1 to {MAX_STOPS} of them "
                            f"(got {brief(stop)})", "stop")

    for name in ("stream", "echo"):
        if not isinstance(values[name], bool):
            raise _bad(problem, f"{name} must be true or false (got {brief(values[name])})", name)
    options = values["stream_options"]
    include_usage = False
    if options is not None:
        if not values["stream"]:
            raise _bad(problem, "stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} \
                or not isinstance(options.get("include_usage", False), bool):
            raise _bad(problem, f"stream_options may hold include_usage (true or false) only (got {brief(options)})",
                       "stream_options")
        include_usage = options.get("include_usage", False)
    if values["user"] is not None and not isinstance(values["user"], str):
        raise _bad(problem, f"user must be a string (got {brief(values['user'])})", "user")

    _refuse_unsupported(values, problem)
    return Completion(prompts=prompts, max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n,
                      stops=stops or (), seed=secrets.randbelow(2**63) if seed is None else seed,
                      stream=values["stream"], include_usage=include_usage, logprobs=logprobs, echo=values["echo"])


def _refuse_unsupported(values: dict[str, Any], problem: Any) -> None:
    """What a left-to-right model without them cannot honour: refused, never ignored."""
    if values["suffix"] not in (None, ""):
        raise _bad(problem, "suffix is not supported: charlm's models continue a text, they do not fill in "
                            "before a suffix", "suffix")
    best_of = values["best_of"]
    if best_of is not None and (isinstance(best_of, bool) or not isinstance(best_of, int) or best_of != 1):
        raise _bad(problem, f"best_of is not supported (got {brief(values['best_of'])}); ask for n choices "
                            f"and pick among them", "best_of")
    if values["logit_bias"] not in (None, {}):
        raise _bad(problem, "logit_bias is not supported: OpenAI's token ids are not charlm's", "logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != 0:
            raise _bad(problem, f"{name} is not supported; only 0 is accepted (got {brief(value)})", name)


# ── one choice's text, stop strings and log-probabilities ───────────────────────────────────────

@dataclass
class Choice:
    """One choice as it is generated: text released so far, text held back because it may be the
    start of a stop string, and the tokens behind it (released with their text)."""

    index: int
    stops: tuple[str, ...]
    offset: int  # text_offset of the first generated character
    held: str = ""
    tokens: list[list[Any]] = field(default_factory=list)  # [text, logprob, top] not yet released
    released: int = 0  # characters released
    steps: int = 0  # tokens generated (what usage counts)
    finish: str | None = None

    def push(self, text: str, logprob: float | None, top: dict[str, float] | None) -> tuple[str, list[list[Any]]]:
        """One generated token; the text and tokens it releases."""
        self.steps += 1
        self.tokens.append([text, logprob, top])
        self.held += text
        found = [at for at in (self.held.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.finish = "stop"
            return self._release(min(found), stop=True)
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.held)), keep, -1):
                if self.held.endswith(stop[:k]):
                    keep = k
                    break
        return self._release(len(self.held) - keep)

    def end(self) -> tuple[str, list[list[Any]]]:
        """max_tokens reached: everything held is released."""
        self.finish = "length"
        return self._release(len(self.held), end=True)

    def _release(self, count: int, *, stop: bool = False, end: bool = False) -> tuple[str, list[list[Any]]]:
        """Release ``count`` held characters (fewer, to a token's end, unless the choice is over) and
        the tokens that produced them, each with its text_offset; at a stop, the token the stop
        begins in is cut there and the rest dropped."""
        tokens, used = [], 0
        while self.tokens:
            text = self.tokens[0][0]
            if not (end or (stop and used < count) or (not stop and used + len(text) <= count)):
                break
            token = self.tokens.pop(0)
            if stop:
                token[0] = text[:count - used]
            tokens.append([*token, self.offset + self.released + used])
            used += len(token[0])
        if stop or end:
            out, self.held, self.tokens = self.held[:count], "", []
        else:
            out, self.held = self.held[:used], self.held[used:]
        self.released += len(out)
        return out, tokens


def logprobs_object(tokens: list[list[Any]]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of a choice from [text, logprob, top, offset] rows."""
    return {"tokens": [t[0] for t in tokens], "token_logprobs": [t[1] for t in tokens],
            "top_logprobs": [t[2] for t in tokens], "text_offset": [t[3] for t in tokens]}


# ── the work, on a worker thread ────────────────────────────────────────────────────────────────

@dataclass
class Prepared:
    prompt: str
    prompt_tokens: int
    echo: list[list[Any]] | None  # the prompt's [text, logprob, top, offset] rows (echo with logprobs)


def prepare(lm: LanguageModel, request: Completion, *, max_tokens: int, cancel: threading.Event,
            problem: Any) -> list[Prepared]:
    """Each prompt counted (bounded by ``--max-tokens`` in all), checked as a prime when something
    is to be generated from it, and scored when ``echo`` asks for its log-probabilities."""
    prepared, total = [], 0
    for prompt in request.prompts:
        if cancel.is_set():
            raise Cancelled("the request was cancelled")
        count = len(lm.tokenizer.encode(prompt)) if prompt else 0
        total += count
        if total > max_tokens:
            raise problem(400, f"the prompt is over {max_tokens:,} tokens; this server reads at most {max_tokens:,} "
                               f"(--max-tokens)", param="prompt")
        if request.max_tokens:
            try:
                prime_ids(lm.tokenizer, prompt)
            except UsageError as exc:  # a char model's unseen characters: a bad request, not a failure
                raise problem(400, str(exc).replace("the prime", "the prompt"), param="prompt") from None
        echo = None
        if request.echo and request.logprobs is not None:
            echo, offset = [], 0
            pieces = lm.logprobs(prompt, top=request.logprobs, from_line_start=False,
                                 should_stop=cancel.is_set) if count else []
            for piece in pieces:
                top = None if piece.logprob is None else dict(piece.top[:request.logprobs])
                echo.append([piece.text, piece.logprob, top, offset])
                offset += len(piece.text)
        prepared.append(Prepared(prompt, count, echo))
    return prepared


@torch.inference_mode()
def produce(lm: LanguageModel, request: Completion, prepared: list[Prepared], cancel: threading.Event,
            put: Callable[[tuple], None]) -> None:
    """Generate every choice, putting ``("text", index, text, tokens)`` as text is released and
    ``("finish", index, reason, completion_tokens)`` as each choice ends."""
    model, tokenizer = lm.model, lm.tokenizer
    want = request.logprobs
    for p, item in enumerate(prepared):
        base = p * request.n
        offset = len(item.prompt) if request.echo else 0
        if request.echo:
            for j in range(request.n):
                put(("text", base + j, item.prompt, [list(row) for row in item.echo] if item.echo is not None else []))
        choices = [Choice(base + j, request.stops, offset) for j in range(request.n)]
        if request.max_tokens == 0:
            for choice in choices:
                put(("finish", choice.index, "length", 0))
            continue
        run = Generation(model, tokenizer, config=SampleConfig(
            temperature=request.temperature, top_p=request.top_p if request.top_p < 1 else None,
            length=request.max_tokens, num_samples=request.n, seed=request.seed), prime=item.prompt)
        # The same steps as sample.generate, so a seed gives charlm sample's text.
        fast = FastStep(model, dtype=sampling_precision("auto", model.embedding.weight.device).dtype)
        fast.reset(request.n, run.state)
        while not all(choice.finish for choice in choices):
            if cancel.is_set():
                raise Cancelled("the request was cancelled")
            logits = fast.step(run.token)
            pieces = run.advance(logits)
            texts = [""] * request.n
            for piece in pieces:
                texts[piece.stream] += piece.text
            if want is not None:
                logp = torch.log_softmax(logits.float(), dim=-1)
                chosen = logp.gather(1, run.token[:, None].long())[:, 0].tolist()
                best = torch.topk(logp, want, dim=-1) if want else None
            for j, choice in enumerate(choices):
                if choice.finish:
                    continue
                logprob, top = None, None
                if want is not None:
                    logprob = chosen[j]
                    top = ({token_label(tokenizer, int(t)): float(v)
                            for v, t in zip(best.values[j].tolist(), best.indices[j].tolist())} if best is not None
                           else {})
                text, tokens = choice.push(texts[j], logprob, top)
                if not choice.finish and run.finished:
                    more, rest = choice.end()
                    text, tokens = text + more, tokens + rest
                if text or tokens:
                    put(("text", choice.index, text, tokens))
                if choice.finish:
                    put(("finish", choice.index, choice.finish, choice.steps))


# ── the answers ─────────────────────────────────────────────────────────────────────────────────

def usage(prepared: list[Prepared], completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(item.prompt_tokens for item in prepared)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def gather(request: Completion, prepared: list[Prepared], items: list[tuple], *, model_id: str,
           ident: str, created: int) -> dict[str, Any]:
    """The whole (not streamed) answer from the produced items."""
    count = len(prepared) * request.n
    texts, rows, finish, steps = [""] * count, [[] for _ in range(count)], [None] * count, 0
    for kind, index, value, extra in items:
        if kind == "text":
            texts[index] += value
            rows[index] += extra
        else:
            finish[index] = value
            steps += extra
    choices = [{"text": texts[i], "index": i,
                "logprobs": logprobs_object(rows[i]) if request.logprobs is not None else None,
                "finish_reason": finish[i]} for i in range(count)]
    return {"id": ident, "object": "text_completion", "created": created, "model": model_id,
            "choices": choices, "usage": usage(prepared, steps)}


def chunk(ident: str, created: int, model_id: str, choices: list[dict[str, Any]],
          include_usage: bool, usage_value: dict[str, int] | None = None) -> str:
    data: dict[str, Any] = {"id": ident, "object": "text_completion", "created": created, "model": model_id,
                            "choices": choices}
    if include_usage:
        data["usage"] = usage_value
    return f"data: {jsonio.dumps(data)}\n\n"


def stream_item(request: Completion, item: tuple) -> dict[str, Any]:
    kind, index, value, extra = item
    if kind == "text":
        return {"text": value, "index": index,
                "logprobs": logprobs_object(extra) if request.logprobs is not None else None, "finish_reason": None}
    return {"text": "", "index": index, "logprobs": None, "finish_reason": value}


def error_event(body: dict[str, Any]) -> str:
    return f"data: {jsonio.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"


# ── errors ──────────────────────────────────────────────────────────────────────────────────────

OPENAI_TYPES = {401: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
