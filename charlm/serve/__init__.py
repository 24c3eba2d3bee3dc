"""``charlm serve``: one model behind a local HTTP API, and the playground page.

    POST /v1/generate    {prime, length, temperature, top_k, top_p, seed, stop, num_samples, stream}
    POST /v1/score       {lines, include_end, logprobs, top}
    POST /v1/perplexity  {text, logprobs, top}
    GET  /v1/model       what `charlm info --json` prints (paths shown relative to the run folder)
    POST /v1/completions, GET /v1/models   OpenAI's legacy completions API (openai.py)
    GET  /healthz        {"status": "ok", workers, busy, waiting}
    GET  /               the playground (static files from charlm/static, no build step, no CDN)

Built on Starlette and uvicorn (the ``serve`` extra). The model runs in a pool of worker threads,
never on the event loop, so a long request does not hold up the others; each request gets its own
sampler state (``FastStep``), so concurrent requests share weights and nothing else. Safe by
default (security.py): requests for a Host name this server was not told to answer, from another
web site, without JSON's content type or without the ``--api-key`` are refused before any route
runs; slow or stuck clients lose their connection; bodies, lengths, sample counts and the tokens
read are bounded (``ServeLimits``); bad input is a 400/413/422 with a one-line message; and a client
that goes away stops its work at the next token or window and frees its place.

Generation with the same seed gives the same text as ``charlm sample`` and ``LanguageModel.stream``:
it *is* that call. A request without a seed gets a random one, reported in the answer so the text
can be made again. ``--batch N`` trades that exactness for throughput (``_Batcher``).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import secrets
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable

import torch

from charlm import jsonio
from charlm.api import LanguageModel
from charlm.model.checkpoint import checkpoint_report
from charlm.config import LIMITS, SampleConfig, brief
from charlm.errors import Cancelled, CharlmError, MissingDependencyError, UsageError
from charlm.infer.step import FastStep
from charlm.model.lm import has_cell_state
from charlm.infer.sample import Generation, prime_ids
from charlm.serve.http import (SHUTTING_DOWN, _END, _STOPPED, _answer_of, _body, _call_soon, _error, _EventStream,  # noqa: F401
                   _json, _outcome, _Problem)
from charlm.serve.security import (OPENAI_PATHS, Guard, HostPolicy, guarded_protocol, quiet_accept_errors)
from charlm.serve.security import allowed_hosts_for, host_name, is_loopback_name  # noqa: F401 - re-exported

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError:  # the serve extra is not installed; make_app says so
    Starlette = ClientDisconnect = None  # type: ignore[assignment,misc]

NEEDS_EXTRA = 'charlm serve needs Starlette and uvicorn: pip install "charlm[serve]"'
STATIC_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
SECURITY_HEADERS = {
    # Everything the page uses comes from this server: no CDN, no inline script, no framing.
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for. Every bound is a ``charlm serve`` option."""

    max_body_bytes: int = 1_000_000
    max_length: int = 5_000  # tokens generated per sample
    max_samples: int = 16
    max_tokens: int = 20_000  # in a prime, and in a text whose per-token log-probabilities are asked for
    workers: int = 2  # requests the model runs at once
    max_queue: int = 64  # requests waiting for a worker; more are refused with 503
    batch: int = 0  # 0: each generation steps on its own; N: up to N samples step together (_Batcher)
    max_connections: int = 256  # open connections; more are closed at once
    client_timeout: float = 30.0  # seconds for a request's headers, for its body, and for a stalled write

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_length", "max_samples", "max_tokens", "workers", "max_queue", "batch",
                     "max_connections"):
            value, low = getattr(self, name), 0 if name in ("max_queue", "batch") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number ≥ {low} (got {brief(value)})")
        value = self.client_timeout
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
            raise UsageError(f"--client-timeout must be a number of seconds in (0, 3600] (got {brief(value)})")


def _fields(body: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``body`` over ``defaults``; a field this endpoint does not know is refused, not ignored."""
    unknown = [key for key in body if key not in defaults]
    if unknown:
        raise _Problem(422, f"unknown field {brief(unknown[0])}; the fields are {', '.join(defaults)}")
    return {**defaults, **body}


def _number(values: dict[str, Any], name: str, *, optional: bool = False, rule: str | None = None) -> None:
    value = values[name]
    if value is None and optional:
        return
    limit = LIMITS[rule or name]
    if not limit.allows(value):
        raise _Problem(422, f"{name} must be {limit.describe()}{' or null' if optional else ''} (got {brief(value)})")


def _flag(values: dict[str, Any], name: str) -> None:
    if not isinstance(values[name], bool):
        raise _Problem(422, f"{name} must be true or false (got {brief(values[name])})")


def _string(values: dict[str, Any], name: str, *, optional: bool = False, nonempty: bool = False) -> None:
    value = values[name]
    if value is None and optional:
        return
    if not isinstance(value, str) or (nonempty and not value):
        raise _Problem(422, f"{name} must be a {'non-empty ' if nonempty else ''}string"
                            f"{' or null' if optional else ''} (got {brief(value)})")


def _at_most(values: dict[str, Any], name: str, bound: int, option: str) -> None:
    if values[name] > bound:
        raise _Problem(422, f"{name} must be ≤ {bound:,} on this server ({option}; got {values[name]:,})")


def _top(values: dict[str, Any], vocab_size: int, given: bool) -> None:
    if given and not values["logprobs"]:
        raise _Problem(422, "top is the number of alternatives shown with logprobs; give \"logprobs\": true too")
    top = values["top"]
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= min(20, vocab_size):
        raise _Problem(422, f"top must be a whole number in [0, {min(20, vocab_size)}] (got {brief(top)})")


GENERATE_FIELDS: dict[str, Any] = {"prime": "", "length": 500, "temperature": 0.8, "top_k": None, "top_p": None,
                                   "seed": None, "stop": None, "num_samples": 1, "stream": False}
SCORE_FIELDS: dict[str, Any] = {"lines": None, "include_end": True, "logprobs": False, "top": 5}
PERPLEXITY_FIELDS: dict[str, Any] = {"text": None, "logprobs": False, "top": 5, "cache": True}


def generate_options(body: dict[str, Any], lm: LanguageModel, limits: ServeLimits, *,
                     read_prime: bool = True) -> dict[str, Any]:
    """The checked keyword arguments of ``LanguageModel.stream``, and ``stream``. ``read_prime``:
    check the prime here too (else the caller runs ``check_prime`` on a worker)."""
    values = _fields(body, GENERATE_FIELDS)
    _string(values, "prime")
    _string(values, "stop", optional=True, nonempty=True)
    for name in ("length", "temperature", "num_samples"):
        _number(values, name)
    for name in ("top_k", "top_p", "seed"):
        _number(values, name, optional=True)
    _flag(values, "stream")
    _at_most(values, "length", limits.max_length, "--max-length")
    _at_most(values, "num_samples", limits.max_samples, "--max-samples")
    if read_prime:
        check_prime(values["prime"], lm, limits)
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(2**63)
    return values


def check_prime(prime: str, lm: LanguageModel, limits: ServeLimits, cancel: threading.Event | None = None) -> None:
    """A prime the model cannot read, or longer than --max-tokens, is a 422 before any stream
    starts. Counted a piece at a time, so a large one stops when ``cancel`` is set."""
    bound = f"this server takes at most {limits.max_tokens:,} (--max-tokens)"
    total = 0
    for piece in _pieces_of(prime):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the request was cancelled")
        total += len(lm.tokenizer.encode(piece))
        if total > limits.max_tokens + 1:  # + 1: a word model's prime mid-line does not read its <EOS>
            raise _Problem(422, f"the prime is over {limits.max_tokens:,} tokens; {bound}")
    tokens = len(prime_ids(lm.tokenizer, prime))
    if tokens > limits.max_tokens:
        raise _Problem(422, f"the prime is {tokens:,} tokens; {bound}")


# ── running the model off the event loop ────────────────────────────────────────────────────────

@dataclass
class _Pool:
    """Worker threads for the model, with a bounded queue in front of them."""

    limits: ServeLimits
    executor: ThreadPoolExecutor = field(init=False)
    admitted: int = 0  # requests for the workers, running or waiting (event-loop side)
    admitted_batched: int = 0  # generations for the batcher (--batch), running or waiting
    busy: int = 0  # running (worker side, under the lock)
    batched: int = 0  # generations running in the batcher (its side, under the lock)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancels: dict[threading.Event, bool] = field(default_factory=dict)  # → whether batched

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="charlm-model")

    def admit(self, *, batched: bool = False) -> threading.Event:
        """A place for one request (its cancel flag), or 503 when every place is taken: the
        workers and --max-queue waiting for them, or (--batch) N generations in the batch and
        --max-queue waiting for it."""
        running = self.limits.batch if batched else self.limits.workers
        taken = self.admitted_batched if batched else self.admitted
        if taken >= running + self.limits.max_queue:
            what = "generations in the batch" if batched else "running"
            raise _Problem(503, f"the server is busy ({running} {what}, {self.limits.max_queue} waiting); "
                                f"try again shortly")
        if batched:
            self.admitted_batched += 1
        else:
            self.admitted += 1
        cancel = threading.Event()
        self.cancels[cancel] = batched
        return cancel

    def release(self, cancel: threading.Event, future: Future | None = None) -> None:
        """The request is over: its work stops at its next check, and its place is free once the
        worker running it (if any) has finished, so no more requests run than were admitted. Work
        that has not started is dropped at once."""
        cancel.set()
        if future is not None and not future.done() and not future.cancel():
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda _: _call_soon(loop, self.release, cancel))
            return
        batched = self.cancels.pop(cancel, None)
        if batched is True:
            self.admitted_batched -= 1
        elif batched is False:
            self.admitted -= 1

    def waiting(self) -> int:
        return max(0, self.admitted + self.admitted_batched - self.busy - self.batched)

    def submit(self, cancel: threading.Event, work: Callable[[], Any]) -> Future:
        """Run ``work`` on a worker; it runs even when cancelled while it waited, to say so
        (a stream's producer ends its stream; the others stop at their first check)."""
        def run() -> Any:
            with self.lock:
                self.busy += 1
            try:
                return work()
            finally:
                with self.lock:
                    self.busy -= 1

        return self.executor.submit(run)

    def stop_all(self) -> None:
        """End every generation at its next token (the server is shutting down)."""
        for cancel in list(self.cancels):
            cancel.set()

    def close(self) -> None:
        self.stop_all()  # what is queued still runs, and ends at once
        self.executor.shutdown(wait=False)


def _pieces_of(text: str, size: int = 1 << 16) -> list[str]:
    """``text`` cut after line ends into pieces of about ``size`` characters (a tokenizer reads
    each the same as within the whole; a line longer than ``size`` is one piece)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _event(data: Any, name: str | None = None) -> str:
    return (f"event: {name}\n" if name else "") + f"data: {jsonio.dumps(data)}\n\n"




# ── the endpoints ───────────────────────────────────────────────────────────────────────────────

def make_app(lm: LanguageModel, limits: ServeLimits | None = None, *,
             allowed_hosts: HostPolicy | tuple[str, ...] | None = None, api_key: str | None = None,
             log: Callable[[str], None] | None = None) -> "Starlette":
    """The ASGI app serving ``lm``. ``allowed_hosts``: the Host names answered besides loopback
    ones (``allowed_hosts_for``; a tuple: those names; None: any). ``api_key``: the key every
    ``/v1`` request must bring as ``Authorization: Bearer KEY`` (None: none)."""
    if Starlette is None:
        raise MissingDependencyError(NEEDS_EXTRA)
    from charlm.serve import openai

    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip() or api_key != api_key.strip()):
        raise UsageError("--api-key must be a non-empty string without spaces around it")
    if isinstance(allowed_hosts, tuple):
        allowed_hosts = HostPolicy(allowed_hosts, ip_literals=False)
    limits = limits or ServeLimits()
    # Scoring and evaluation put the model in eval mode and restore what they found; from threads
    # at once that is only safe when what they find is eval mode already.
    lm.model.eval()
    pool = _Pool(limits)
    batcher = _Batcher(lm, limits.batch, pool) if limits.batch else None
    report = without_paths(checkpoint_report(lm.checkpoint), lm.path)
    say = log or logging.getLogger(__name__).error

    def failure(exc: BaseException) -> Response:
        status, message = _answer_of(exc)
        if status == 500 and not isinstance(exc, CharlmError):
            say("charlm: error while serving a request:\n" + "".join(traceback.format_exception(exc)).rstrip())
        return _error(status, message)

    def openai_failure(exc: BaseException) -> Response:
        failure(exc)  # logs a bug's traceback
        status, message = _answer_of(exc)
        if status == 422:  # OpenAI's clients expect a bad value to be a 400 (BadRequestError)
            status = 400
        param, code = getattr(exc, "param", None), getattr(exc, "code", None)
        return _json(openai.error_body(status, message, param=param, code=code), status)

    def error_for(path: str, status: int, message: str, code: str | None = None) -> Response:
        if path.startswith(OPENAI_PATHS):
            return _json(openai.error_body(status, message, code=code), status)
        return _error(status, message)

    async def answered(request: Request, defaults: dict[str, Any],
                       check: Callable[[dict[str, Any], set[str]], None],
                       work: Callable[[dict[str, Any], threading.Event], Any]) -> Response:
        """Read and ``check`` the body here, run ``work`` on a worker (it stops when its cancel
        flag is set: the client left, or the server is stopping), answer JSON encoded there
        too; every failure a JSON error. The place is held until the worker is done."""
        cancel, future = None, None
        try:
            raw = await _body(request, limits.max_body_bytes, limits.client_timeout)
            body = _fields(raw, defaults)
            check(body, set(raw))
            cancel = pool.admit()
            future = pool.submit(cancel, lambda: jsonio.dumps(work(body, cancel)) + "\n")
            return Response(await _outcome(request, future), media_type="application/json")
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer, never a traceback
            return failure(exc)
        finally:
            if cancel is not None:
                pool.release(cancel, future)

    async def generate(request: Request) -> Response:
        cancel, checked = None, None
        try:
            options = generate_options(await _body(request, limits.max_body_bytes, limits.client_timeout), lm, limits,
                                       read_prime=False)
            stream = options.pop("stream")
            if batcher is not None and options["num_samples"] > limits.batch:
                raise _Problem(422, f"num_samples must be ≤ {limits.batch} on this server (--batch; got "
                                    f"{options['num_samples']})")
            cancel = pool.admit(batched=batcher is not None)
            # The prime is read on a worker (a large one would hold up every request on the event loop).
            checked = pool.submit(cancel, lambda: check_prime(options["prime"], lm, limits, cancel))
            await _outcome(request, checked)
        except Exception as exc:  # noqa: BLE001
            if cancel is not None:
                pool.release(cancel, checked)
            return failure(exc)
        items, future = _start_generation(lm, options, pool, batcher, cancel)
        if stream:
            return _EventStream(_events(options, items, failure), on_close=lambda: pool.release(cancel, future))
        try:
            texts = await _collect(request, items, options["num_samples"])
            return _json({"prime": options["prime"], "seed": options["seed"], "samples": texts})
        except Exception as exc:  # noqa: BLE001
            return failure(exc)
        finally:
            pool.release(cancel, future)

    def bounded(texts: list[str], cancel: threading.Event) -> None:
        """Refuse texts of more than --max-tokens tokens in all, as generation's primes are; counted
        on the worker a piece at a time, so a large body's tokenizing stops when its client leaves."""
        total = 0
        for text in texts:
            for piece in _pieces_of(text):
                if cancel.is_set():
                    raise Cancelled("the request was cancelled")
                total += len(lm.tokenizer.encode(piece))
                if total > limits.max_tokens:
                    raise _Problem(422, f"the text is over {limits.max_tokens:,} tokens; this server reads at most "
                                        f"{limits.max_tokens:,} per request (--max-tokens)")

    def check_score(values: dict[str, Any], given: set[str]) -> None:
        lines = values["lines"]
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise _Problem(422, f"lines must be a list of strings (got {brief(lines)})")
        _flag(values, "include_end")
        _flag(values, "logprobs")
        _top(values, lm.tokenizer.vocab_size, "top" in given)

    def score(values: dict[str, Any], cancel: threading.Event) -> dict[str, Any]:
        bounded(values["lines"], cancel)
        results = []
        for line in lm.score(values["lines"], include_end=values["include_end"], logprobs=values["logprobs"],
                             top=values["top"], should_stop=cancel.is_set):
            results.append(line.to_dict())
        return {"lines": results}

    def check_perplexity(values: dict[str, Any], given: set[str]) -> None:
        _string(values, "text")
        _flag(values, "logprobs")
        _flag(values, "cache")
        _top(values, lm.tokenizer.vocab_size, "top" in given)

    def perplexity(values: dict[str, Any], cancel: threading.Event) -> dict[str, Any]:
        bounded([values["text"]], cancel)
        answer = lm.perplexity(values["text"], cache=values["cache"], should_stop=cancel.is_set).to_dict()
        if values["logprobs"]:
            answer["logprobs"] = [p.to_dict() for p in lm.logprobs(values["text"], top=values["top"],
                                                                 from_line_start=False, should_stop=cancel.is_set)]
        return answer

    async def score_endpoint(request: Request) -> Response:
        return await answered(request, SCORE_FIELDS, check_score, score)

    async def perplexity_endpoint(request: Request) -> Response:
        return await answered(request, PERPLEXITY_FIELDS, check_perplexity, perplexity)

    async def model_info(request: Request) -> Response:
        return _json(report)

    async def health(request: Request) -> Response:
        with pool.lock:
            busy, waiting = pool.busy + pool.batched, pool.waiting()
        return _json({"status": "ok", "workers": limits.workers, "batch": limits.batch, "busy": busy,
                      "waiting": waiting})

    async def page(request: Request) -> Response:
        return _static("index.html", "text/html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return _error(404, f"no such file: /static/{brief(name)}")
        return _static(name, STATIC_FILES[name])

    async def http_problem(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = {404: f"no such endpoint: {request.method} {request.url.path}",
                  405: f"{request.url.path} does not take {request.method}"}.get(status, getattr(exc, "detail", ""))
        return error_for(request.url.path, status, str(detail))

    async def unexpected(request: Request, exc: Exception) -> Response:
        return openai_failure(exc) if request.url.path.startswith(OPENAI_PATHS) else failure(exc)

    created = int(lm.path.stat().st_mtime) if lm.path.exists() else 0

    app = Starlette(
        routes=[Route("/v1/generate", generate, methods=["POST"]),
                Route("/v1/score", score_endpoint, methods=["POST"]),
                Route("/v1/perplexity", perplexity_endpoint, methods=["POST"]),
                Route("/v1/model", model_info, methods=["GET"]),
                Route("/healthz", health, methods=["GET"]),
                Route("/", page, methods=["GET"]),
                Route("/static/{name}", static, methods=["GET"]),
                *openai.routes(lm, limits, pool, model_id=openai.model_id_of(lm), created=created,
                               failure=openai_failure)],
        exception_handlers={HTTPException: http_problem, Exception: unexpected},
        lifespan=_closing(pool, batcher),
    )
    app.state.pool = pool
    app.state.limits = limits
    return Guard(app, allowed_hosts, api_key,
                 lambda path, status, message, code: error_for(path, status, message, code))


def without_paths(value: Any, checkpoint: Any) -> Any:
    """``value`` with every absolute path of this machine made relative: the checkpoint as
    ``run/best.safetensors``, any other (a corpus) as its file name. A client learns nothing of
    the machine's folders."""
    import os

    if isinstance(value, dict):
        return {key: without_paths(item, checkpoint) for key, item in value.items()}
    if isinstance(value, list):
        return [without_paths(item, checkpoint) for item in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        path = os.path.normpath(value)
        if path == os.path.normpath(str(checkpoint)):
            return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
        return os.path.basename(path)
    return value


def _closing(pool: _Pool, batcher: "_Batcher | None") -> Callable[[Any], Any]:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:  # stop every generation, so shutting down never waits for one
            pool.close()
            if batcher is not None:
                batcher.close()

    return lifespan


def _static(name: str, media_type: str) -> Response:
    data = resources.files("charlm").joinpath("static", name).read_bytes()
    return Response(data, media_type=media_type, headers=SECURITY_HEADERS)


def _start_generation(lm: LanguageModel, options: dict[str, Any], pool: _Pool, batcher: "_Batcher | None",
                      cancel: threading.Event) -> tuple[asyncio.Queue, Future | None]:
    """Start generating off the event loop; the queue receives each ``Piece``, then ``_END``
    (``_STOPPED`` when cancelled, or the exception that ended it). The future is the worker's
    (None in the batcher, which drops a cancelled request before its next step)."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        _call_soon(loop, items.put_nowait, item)

    if batcher is not None:
        def prepare() -> None:  # the prime is read here, on a worker, not in the batch's thread
            if cancel.is_set():
                put(_STOPPED)
                return
            try:
                run = Generation(lm.model, lm.tokenizer, config=SampleConfig(
                    **{k: v for k, v in options.items() if k != "prime"}), prime=options["prime"])
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which answers it
                put(exc)
                return
            batcher.submit(_Job(run, put, cancel))

        return items, pool.submit(cancel, prepare)

    def produce() -> None:
        if cancel.is_set():  # its client left, or the server is stopping, while it waited
            put(_STOPPED)
            return
        try:
            for piece in lm.stream(**options):
                if cancel.is_set():
                    break
                put(piece)
            put(_STOPPED if cancel.is_set() else _END)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which answers it
            put(exc)

    return items, pool.submit(cancel, produce)


async def _collect(request: Request, items: asyncio.Queue, num_samples: int) -> list[str]:
    """A generation's whole samples; ``_Problem(499)`` as soon as the client disconnects (looked
    at every quarter second, however fast the pieces come)."""
    texts = [""] * num_samples
    loop = asyncio.get_running_loop()
    checked = loop.time()
    while True:
        try:
            item = await asyncio.wait_for(items.get(), timeout=0.25)
        except asyncio.TimeoutError:
            item = None
        if loop.time() - checked >= 0.25:
            checked = loop.time()
            if await request.is_disconnected():
                raise _Problem(499, "the client went away")
        if item is None:
            continue
        if item is _END:
            return texts
        if item is _STOPPED:
            raise _Problem(503, SHUTTING_DOWN)
        if isinstance(item, BaseException):
            raise item
        texts[item.stream] += item.text


async def _events(options: dict[str, Any], items: asyncio.Queue,
                  failure: Callable[[BaseException], Response]) -> AsyncIterator[str]:
    """Each piece as an event ``{"sample", "text", "done"}`` as it is generated, then ``event: end``
    with the whole samples (or ``event: error`` with a message)."""
    texts = [""] * options["num_samples"]
    yield _event({"prime": options["prime"], "seed": options["seed"], "num_samples": options["num_samples"]}, "start")
    while True:
        # Every piece already waiting goes out in one write: one send per batch, not per token.
        ready = [await items.get()]
        while not items.empty() and len(ready) < 256:
            ready.append(items.get_nowait())
        out = []
        for item in ready:
            if item is _END:
                yield "".join(out) + _event({"samples": texts}, "end")
                return
            if item is _STOPPED:  # its client is gone (nobody reads this) or the server is stopping
                yield "".join(out) + _event({"error": SHUTTING_DOWN, "status": 503}, "error")
                return
            if isinstance(item, BaseException):
                status, message = _answer_of(item)
                failure(item)  # logs a bug's traceback
                yield "".join(out) + _event({"error": message, "status": status}, "error")
                return
            texts[item.stream] += item.text
            out.append(_event({"sample": item.stream, "text": item.text, "done": item.done}))
        yield "".join(out)


class _Job:
    """One request's generation inside the batcher."""

    def __init__(self, run: Generation, put: Callable[[Any], None], cancel: threading.Event) -> None:
        self.run, self.put, self.cancel = run, put, cancel
        self.rows = run.num_samples
        self.offset = -1  # its first row in the batcher's current batch; -1: not in it yet


class _Batcher:
    """``--batch N``: one thread steps every running generation together, up to N sample rows in
    one ``FastStep`` batch, so 32 clients cost little more than one. Each request keeps its own
    RNG, stop string and decoders (``sample.Generation``) and draws from its own rows, but its rows
    are computed beside others', and a matmul's rounding depends on the batch's size (≤ 4e-7 in
    the logits, measured): a rare draw can differ from ``charlm sample`` with the same seed. Off
    by default; requests join and leave the batch between steps."""

    def __init__(self, lm: LanguageModel, max_rows: int, pool: _Pool) -> None:
        self.lm, self.max_rows, self.pool = lm, max_rows, pool
        self.fast = FastStep(lm.model)
        self.incoming: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.waiting: collections.deque[_Job] = collections.deque()
        self.running: list[_Job] = []
        self.changed = False  # running requests came or went since the batch was laid out
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="charlm-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self.incoming.put(job)

    def close(self) -> None:
        self.closed = True
        self.incoming.put(None)

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self.closed:
                try:
                    self._admit()
                    if not self.running:
                        continue
                    if self.changed:
                        self._rebatch()
                        self.changed = False
                    self._step()
                except BaseException as exc:  # noqa: BLE001 - every running request is told, the batcher goes on
                    for job in self.running:
                        job.put(exc)
                    self._set_running([])
        for job in [*self.running, *self.waiting]:
            job.put(_STOPPED)

    def _admit(self) -> None:
        """Take new requests (waiting for one when idle), drop cancelled ones, start what fits."""
        block = not self.running and not self.waiting
        while True:
            try:
                job = self.incoming.get(timeout=0.5) if block else self.incoming.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return
            self.waiting.append(job)
            block = False
        for job in [j for j in self.running if j.cancel.is_set()]:
            job.put(_STOPPED)
            self._set_running([j for j in self.running if j is not job])
        for job in [j for j in self.waiting if j.cancel.is_set()]:  # gone while waiting: no longer in line
            job.put(_STOPPED)
            self.waiting.remove(job)
        used = sum(job.rows for job in self.running)
        while self.waiting and used + self.waiting[0].rows <= self.max_rows:
            job = self.waiting.popleft()
            for piece in job.run.start():
                job.put(piece)
            if job.run.finished:  # length 0
                job.put(_END)
                continue
            self._set_running([*self.running, job])
            used += job.rows

    def _set_running(self, jobs: list[_Job]) -> None:
        self.running = jobs
        self.changed = True
        with self.pool.lock:
            self.pool.batched = len(jobs)

    def _rebatch(self) -> None:
        """One batch of the running requests' rows: the states carried from the last batch, a new
        request's from its prime."""
        cfg = self.lm.model.cfg
        current = self.fast.state() if self.fast.batch_size else None
        parts: list[Any] = []
        offset = 0
        for job in self.running:
            if job.offset >= 0 and current is not None:
                rows = slice(job.offset, job.offset + job.rows)
                parts.append(tuple(s[:, rows] for s in current) if isinstance(current, tuple) else current[:, rows])
            elif job.run.state is not None:
                parts.append(job.run.state)
            else:
                zeros = torch.zeros(cfg.num_layers, job.rows, cfg.hidden_size, device=self.fast.device)
                parts.append((zeros, zeros.clone()) if has_cell_state(cfg.cell) else zeros)
            job.offset = offset
            offset += job.rows
        if isinstance(parts[0], tuple):
            state: Any = tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(len(parts[0])))
        else:
            state = torch.cat(parts, dim=1)
        self.fast.reset(offset, state)

    def _step(self) -> None:
        tokens = torch.cat([job.run.token for job in self.running])
        logits = self.fast.step(tokens)
        finished = []
        for job in self.running:
            try:
                pieces = job.run.advance(logits[job.offset:job.offset + job.rows])
            except Exception as exc:  # noqa: BLE001 - e.g. NaN scores: that request fails, the others go on
                job.put(exc)
                finished.append(job)
                continue
            for piece in pieces:
                job.put(piece)
            if job.run.finished:
                job.put(_END)
                finished.append(job)
        if finished:
            self._set_running([job for job in self.running if job not in finished])


def run(app: Any, sock: Any, *, on_started: Callable[[], None] | None = None,
        log: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` on the bound socket ``sock`` until Ctrl-C (uvicorn; its own log quiet), with
    the deadlines and the connection cap of its ``ServeLimits`` (security.py)."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError(NEEDS_EXTRA) from None

    pool: _Pool = app.state.pool
    limits: ServeLimits = getattr(app.state, "limits", None) or ServeLimits()
    say = log or logging.getLogger(__name__).warning

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            pool.stop_all()  # open streams end now, so shutting down waits for none of them
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                            lifespan="on", http=guarded_protocol(limits.client_timeout, limits.max_connections),
                            timeout_keep_alive=max(1, min(5, int(limits.client_timeout))))
    server = Server(config)
    original = server.startup

    async def startup(sockets: Any = None) -> None:
        asyncio.get_running_loop().set_exception_handler(quiet_accept_errors(say))
        await original(sockets=sockets)
        if server.started and on_started is not None:
            on_started()

    server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
