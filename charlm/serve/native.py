"""charlm's own routes: /v1/generate (JSON or Server-Sent Events, on a worker or in the batch),
/v1/score, /v1/perplexity, /v1/model, /healthz and the playground page with its files."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from importlib import resources
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from charlm import jsonio
from charlm.api import LanguageModel
from charlm.config import SampleConfig, brief
from charlm.infer.sample import Generation
from charlm.serve.batching import Batcher, Job
from charlm.serve.http import (END, SHUTTING_DOWN, STOPPED, EventStream, Problem, answer_of, call_soon, error_answer,
                               json_answer, json_body, worker_outcome)
from charlm.serve.requests import (PERPLEXITY_FIELDS, SCORE_FIELDS, check_perplexity, check_prime,
                                   check_score, check_texts, fields, generate_options)
from charlm.serve.served import Served, served_by
from charlm.serve.workers import WorkerPool

STATIC_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
SECURITY_HEADERS = {
    # Everything the page uses comes from this server: no CDN, no inline script, no framing.
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


# ── /v1/generate ────────────────────────────────────────────────────────────────────────────────

async def generate(request: Request) -> Response:
    served = served_by(request)
    lm, limits, pool, batcher = served.lm, served.limits, served.pool, served.batcher
    cancel, checked = None, None
    try:
        options = generate_options(await json_body(request, limits.max_body_bytes, limits.client_timeout), lm, limits,
                                   read_prime=False)
        stream = options.pop("stream")
        if batcher is not None and options["num_samples"] > limits.batch:
            raise Problem(422, f"num_samples must be ≤ {limits.batch} on this server (--batch; got "
                                f"{options['num_samples']})")
        cancel = pool.admit(batched=batcher is not None)
        # The prime is read off the event loop (a large one would hold it up), on a reader thread
        # (behind a long generation on a worker, a stream would not start until that one ended).
        checked = pool.read(lambda: check_prime(options["prime"], lm, limits, cancel))
        await worker_outcome(request, checked)
    except Exception as exc:  # noqa: BLE001
        if cancel is not None:
            pool.release(cancel, checked)
        return served.failure(exc)
    items, future = _start_generation(lm, options, pool, batcher, cancel)
    if stream:
        return EventStream(_events(options, items, served.failure), on_close=lambda: pool.release(cancel, future))
    try:
        texts = await _collect(request, items, options["num_samples"])
        return json_answer({"prime": options["prime"], "seed": options["seed"], "samples": texts})
    except Exception as exc:  # noqa: BLE001
        return served.failure(exc)
    finally:
        pool.release(cancel, future)


def _start_generation(lm: LanguageModel, options: dict[str, Any], pool: WorkerPool, batcher: Batcher | None,
                      cancel: threading.Event) -> tuple[asyncio.Queue, Future | None]:
    """Start generating off the event loop; the queue receives each ``Piece``, then ``END``
    (``STOPPED`` when cancelled, or the exception that ended it). The future is the worker's
    (None in the batcher, which drops a cancelled request before its next step)."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        call_soon(loop, items.put_nowait, item)

    if batcher is not None:
        def prepare() -> None:  # the prime is read here, on a worker, not in the batch's thread
            if cancel.is_set():
                put(STOPPED)
                return
            try:
                run = Generation(lm.model, lm.tokenizer, config=SampleConfig(
                    **{k: v for k, v in options.items() if k != "prime"}), prime=options["prime"])
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which answers it
                put(exc)
                return
            batcher.submit(Job(run, put, cancel))

        return items, pool.submit(cancel, prepare)

    def produce() -> None:
        if cancel.is_set():  # its client left, or the server is stopping, while it waited
            put(STOPPED)
            return
        try:
            for piece in lm.stream(**options):
                if cancel.is_set():
                    break
                put(piece)
            put(STOPPED if cancel.is_set() else END)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which answers it
            put(exc)

    return items, pool.submit(cancel, produce)


async def _collect(request: Request, items: asyncio.Queue, num_samples: int) -> list[str]:
    """A generation's whole samples; ``Problem(499)`` as soon as the client disconnects (looked
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
                raise Problem(499, "the client went away")
        if item is None:
            continue
        if item is END:
            return texts
        if item is STOPPED:
            raise Problem(503, SHUTTING_DOWN)
        if isinstance(item, BaseException):
            raise item
        texts[item.stream] += item.text


def _event(data: Any, name: str | None = None) -> str:
    return (f"event: {name}\n" if name else "") + f"data: {jsonio.dumps(data)}\n\n"


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
            if item is END:
                yield "".join(out) + _event({"samples": texts}, "end")
                return
            if item is STOPPED:  # its client is gone (nobody reads this) or the server is stopping
                yield "".join(out) + _event({"error": SHUTTING_DOWN, "status": 503}, "error")
                return
            if isinstance(item, BaseException):
                status, message = answer_of(item)
                failure(item)  # logs a bug's traceback
                yield "".join(out) + _event({"error": message, "status": status}, "error")
                return
            texts[item.stream] += item.text
            out.append(_event({"sample": item.stream, "text": item.text, "done": item.done}))
        yield "".join(out)


# ── scoring ─────────────────────────────────────────────────────────────────────────────────────

async def _answered(request: Request, defaults: dict[str, Any],
                    check: Callable[[dict[str, Any], set[str], int], None],
                    work: Callable[[Served, dict[str, Any], threading.Event], Any]) -> Response:
    """Read and ``check`` the body here, run ``work`` on a worker (it stops when its cancel flag
    is set: the client left, or the server is stopping), answer JSON encoded there too; every
    failure a JSON error. The place is held until the worker is done."""
    served = served_by(request)
    limits, pool = served.limits, served.pool
    cancel, future = None, None
    try:
        raw = await json_body(request, limits.max_body_bytes, limits.client_timeout)
        body = fields(raw, defaults)
        check(body, set(raw), served.lm.tokenizer.vocab_size)
        cancel = pool.admit()
        future = pool.submit(cancel, lambda: jsonio.dumps(work(served, body, cancel)) + "\n")
        return Response(await worker_outcome(request, future), media_type="application/json")
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer, never a traceback
        return served.failure(exc)
    finally:
        if cancel is not None:
            pool.release(cancel, future)


def _score(served: Served, values: dict[str, Any], cancel: threading.Event) -> dict[str, Any]:
    lm = served.lm
    check_texts(values["lines"], lm, served.limits, cancel)
    results = []
    for line in lm.score(values["lines"], include_end=values["include_end"], logprobs=values["logprobs"],
                         top=values["top"], should_stop=cancel.is_set):
        results.append(line.to_dict())
    return {"lines": results}


def _perplexity(served: Served, values: dict[str, Any], cancel: threading.Event) -> dict[str, Any]:
    lm = served.lm
    check_texts([values["text"]], lm, served.limits, cancel)
    answer = lm.perplexity(values["text"], cache=values["cache"], should_stop=cancel.is_set).to_dict()
    if values["logprobs"]:
        answer["logprobs"] = [p.to_dict() for p in lm.logprobs(values["text"], top=values["top"],
                                                             from_line_start=False, should_stop=cancel.is_set)]
    return answer


async def score(request: Request) -> Response:
    return await _answered(request, SCORE_FIELDS, check_score, _score)


async def perplexity(request: Request) -> Response:
    return await _answered(request, PERPLEXITY_FIELDS, check_perplexity, _perplexity)


# ── what the server is, and the page ────────────────────────────────────────────────────────────

async def model_info(request: Request) -> Response:
    return json_answer(served_by(request).report)


async def health(request: Request) -> Response:
    served = served_by(request)
    pool, limits = served.pool, served.limits
    with pool.lock:
        busy, waiting = pool.busy + pool.batched, pool.waiting()
    return json_answer({"status": "ok", "workers": limits.workers, "batch": limits.batch, "busy": busy,
                  "waiting": waiting})


def _static(name: str, media_type: str) -> Response:
    data = resources.files("charlm").joinpath("static", name).read_bytes()
    return Response(data, media_type=media_type, headers=SECURITY_HEADERS)


async def page(request: Request) -> Response:
    return _static("index.html", "text/html")


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC_FILES:
        return error_answer(404, f"no such file: /static/{brief(name)}")
    return _static(name, STATIC_FILES[name])


ROUTES = [Route("/v1/generate", generate, methods=["POST"]),
          Route("/v1/score", score, methods=["POST"]),
          Route("/v1/perplexity", perplexity, methods=["POST"]),
          Route("/v1/model", model_info, methods=["GET"]),
          Route("/healthz", health, methods=["GET"]),
          Route("/", page, methods=["GET"]),
          Route("/static/{name}", static, methods=["GET"])]
