"""What every route of ``charlm serve`` shares: a failure as a status and a one-line message, JSON
answers, reading a body within its bounds, waiting on a worker, and Server-Sent Events that always
give their place back."""
from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from charlm import jsonio
from charlm.errors import Cancelled, CharlmError, OutOfMemoryError, UsageError, is_out_of_memory
from charlm.serve.security import read_body

END, STOPPED = object(), object()
SHUTTING_DOWN = "the server is shutting down"


class Problem(Exception):
    """An answer other than 200: the status and a one-line message for the client."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param  # the request field at fault, and a machine-readable code (OpenAI's error shape)
        self.code = code


def answer_of(exc: BaseException) -> tuple[int, str]:
    """The status and one-line message that answer a failure."""
    if isinstance(exc, Problem):
        return exc.status, exc.message
    if isinstance(exc, ClientDisconnect):
        return 499, "the client went away"  # nobody reads the answer
    if isinstance(exc, Cancelled):
        return 503, SHUTTING_DOWN
    if is_out_of_memory(exc) and not isinstance(exc, CharlmError):
        return 503, "out of memory; ask for fewer samples or a shorter text, or try again when the server is less busy"
    if isinstance(exc, CharlmError):
        status = 422 if isinstance(exc, UsageError) else 503 if isinstance(exc, OutOfMemoryError) else 500
        return status, " ".join(str(exc).split("\n"))
    return 500, f"internal error ({type(exc).__name__}); the server's log has the details"


def json_answer(value: Any, status: int = 200) -> Response:
    return Response(jsonio.dumps(value) + "\n", status_code=status, media_type="application/json")


def error_answer(status: int, message: str) -> Response:
    return json_answer({"error": message, "status": status}, status)


# ── reading a request ───────────────────────────────────────────────────────────────────────────

async def json_body(request: Request, limit: int, timeout: float = 30.0) -> dict[str, Any]:
    """The request's JSON object, read at most ``limit`` bytes far and ``timeout`` seconds long."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"the request body is {int(declared):,} bytes; this server takes at most {limit:,} "
                            f"(--max-body-bytes)")
    try:
        data = await read_body(request.stream(), limit, timeout)
    except OverflowError:
        raise Problem(413, f"the request body is over {limit:,} bytes (--max-body-bytes)") from None
    except TimeoutError:
        raise Problem(408, f"the request body did not arrive within {timeout:g} s (--client-timeout)") from None
    if not data:
        raise Problem(400, "the request needs a JSON object as its body")
    try:
        value = jsonio.loads(bytes(data), unique_keys=True)
    except ValueError as exc:
        raise Problem(400, f"the request body cannot be read: {exc}") from None
    if not isinstance(value, dict):
        raise Problem(400, f"the body must be a JSON object, not {type(value).__name__}")
    return value


async def worker_outcome(request: Request, future: Future) -> Any:
    """The worker's result; if the client disconnects first, ``Problem(499)`` (nobody reads it)."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            # Nobody will read what the worker ends with (often Cancelled): without this, the
            # wrapper would log "exception was never retrieved", with a traceback, when collected.
            waiting.cancel()
            raise Problem(499, "the client went away")


class EventStream(StreamingResponse):
    """Server-Sent Events whose ``on_close`` runs however the response ends (done, disconnect, error)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """``callback(*args)`` on the event loop, from any thread; nothing once the loop has closed
    (a worker finishing after shutdown has nobody left to tell)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass
