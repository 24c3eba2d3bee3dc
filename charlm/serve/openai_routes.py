"""OpenAI's routes (``/v1/completions``, ``/v1/models``): a completion's prompts read on a worker,
its choices generated on one, and the answer whole or streamed as OpenAI's chunks (openai.py holds
the request checks and the answers' shapes)."""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from charlm import jsonio
from charlm.config import brief
from charlm.errors import Cancelled
from charlm.serve.http import (END, SHUTTING_DOWN, STOPPED, EventStream, Problem, call_soon, json_answer, json_body,
                               worker_outcome)
from charlm.serve.openai import (DONE, Completion, Prepared, check_completion, chunk, error_event, gather, new_id,
                                 prepare, produce, stream_item, usage)
from charlm.serve.served import Served, served_by


async def next_items(items: asyncio.Queue, limit: int = 256) -> list[Any]:
    """Everything already waiting (at least one item): one write per batch of tokens, not per token."""
    ready = [await items.get()]
    while not items.empty() and len(ready) < limit:
        ready.append(items.get_nowait())
    return ready


def created_now() -> int:
    return int(time.time())


async def events(request: Completion, prepared: list[Prepared], items: asyncio.Queue, *, model_id: str,
                 end: object, stopped: object, failure: Callable[[BaseException], dict[str, Any]]) -> AsyncIterator[str]:
    """The streamed answer: a chunk per batch of new text, ``finish_reason`` on each choice's last,
    the usage chunk when asked for, then ``data: [DONE]``; an error midway is ``data: {"error"}``."""
    ident, created, steps = new_id(), created_now(), 0
    while True:
        out = []
        for item in await next_items(items):
            if item is end:
                if request.include_usage:
                    out.append(chunk(ident, created, model_id, [], True, usage(prepared, steps)))
                yield "".join(out) + DONE
                return
            if item is stopped or isinstance(item, BaseException):
                yield "".join(out) + error_event(failure(item))
                return
            if item[0] == "finish":
                steps += item[3]
            out.append(chunk(ident, created, model_id, [stream_item(request, item)], request.include_usage))
        yield "".join(out)



async def models(request: Request) -> Response:
    return json_answer({"object": "list", "data": [_model_card(served_by(request))]})


async def model(request: Request) -> Response:
    served = served_by(request)
    name = request.path_params["model"]
    if name != served.model_id:
        return served.openai_failure(Problem(404, f"The model {brief(name)} does not exist; this server serves "
                                                   f"{served.model_id!r}", param="model", code="model_not_found"))
    return json_answer(_model_card(served))


def _model_card(served: Served) -> dict[str, Any]:
    return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "charlm"}


def _error_of(served: Served, exc: BaseException) -> dict[str, Any]:
    """The body of OpenAI's error answer to ``exc`` (``STOPPED``: the server is stopping)."""
    return jsonio.loads(served.openai_failure(Problem(503, SHUTTING_DOWN) if exc is STOPPED else exc).body)


async def completions(request: Request) -> Response:
    served = served_by(request)
    lm, limits, pool = served.lm, served.limits, served.pool
    cancel, future, streaming = None, None, False
    try:
        body = await json_body(request, limits.max_body_bytes, limits.client_timeout)
        wanted = check_completion(body, model_id=served.model_id, max_length=limits.max_length,
                                  max_samples=limits.max_samples, vocab_size=lm.tokenizer.vocab_size,
                                  problem=Problem)
        try:
            cancel = pool.admit()
        except Problem as exc:  # busy: OpenAI's clients wait and retry a 429
            raise Problem(429, exc.message) from None
        future = pool.submit(cancel, lambda: prepare(lm, wanted, max_tokens=limits.max_tokens, cancel=cancel,
                                                     problem=Problem))
        prepared = await worker_outcome(request, future)
        items, future = _start(served, wanted, prepared, cancel)
        if wanted.stream:
            streaming = True
            held, held_future = cancel, future
            return EventStream(events(wanted, prepared, items, model_id=served.model_id, end=END, stopped=STOPPED,
                                       failure=lambda exc: _error_of(served, exc)),
                                on_close=lambda: pool.release(held, held_future))
        collected = await _gather_items(request, items, END, STOPPED, Problem)
        return json_answer(gather(wanted, prepared, collected, model_id=served.model_id, ident=new_id(),
                            created=created_now()))
    except Exception as exc:  # noqa: BLE001 - every failure becomes an answer, never a traceback
        return served.openai_failure(exc)
    finally:
        if cancel is not None and not streaming:
            pool.release(cancel, future)


def _start(served: Served, wanted: Completion, prepared: list[Prepared],
           cancel: Any) -> tuple[asyncio.Queue, Any]:
    """Generate the choices on a worker; the queue receives the produced items, then ``END``
    (``STOPPED`` when cancelled, or the exception that ended it)."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        call_soon(loop, items.put_nowait, item)

    def work() -> None:
        if cancel.is_set():
            put(STOPPED)
            return
        try:
            produce(served.lm, wanted, prepared, cancel, put)
            put(STOPPED if cancel.is_set() else END)
        except Cancelled:
            put(STOPPED)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which answers it
            put(exc)

    return items, served.pool.submit(cancel, work)


async def _gather_items(request: Any, items: asyncio.Queue, end: object, stopped: object, problem: Any) -> list[tuple]:
    """Every produced item until ``end``; ``problem(499)`` as soon as the client disconnects."""
    collected: list[tuple] = []
    loop = asyncio.get_running_loop()
    checked = loop.time()
    while True:
        try:
            ready = await asyncio.wait_for(next_items(items), timeout=0.25)
        except asyncio.TimeoutError:
            ready = []
        if loop.time() - checked >= 0.25:
            checked = loop.time()
            if await request.is_disconnected():
                raise problem(499, "the client went away")
        for item in ready:
            if item is end:
                return collected
            if item is stopped:
                raise problem(503, "the server is shutting down")
            if isinstance(item, BaseException):
                raise item
            collected.append(item)


ROUTES = [Route("/v1/completions", completions, methods=["POST"]),
          Route("/v1/models", models, methods=["GET"]),
          Route("/v1/models/{model:path}", model, methods=["GET"])]
