"""``make_app``: the ASGI app that serves one model, its native and OpenAI routes behind the
security checks (security.py), with its worker pool and (``--batch``) batcher closed on shutdown."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from charlm.api import LanguageModel
from charlm.errors import UsageError
from charlm.model.checkpoint import checkpoint_report
from charlm.serve.batching import Batcher
from charlm.serve.limits import ServeLimits
from charlm.serve.native import ROUTES as NATIVE_ROUTES
from charlm.serve.openai import model_id_of
from charlm.serve.openai_routes import ROUTES as OPENAI_ROUTES
from charlm.serve.security import OPENAI_PATHS, Guard, HostPolicy
from charlm.serve.served import Served, served_by, without_paths
from charlm.serve.workers import WorkerPool


def make_app(lm: LanguageModel, limits: ServeLimits | None = None, *,
             allowed_hosts: HostPolicy | tuple[str, ...] | None = None, api_key: str | None = None,
             log: Callable[[str], None] | None = None) -> Guard:
    """The ASGI app serving ``lm``. ``allowed_hosts``: the Host names answered besides loopback
    ones (``allowed_hosts_for``; a tuple: those names; None: any). ``api_key``: the key every
    ``/v1`` request must bring as ``Authorization: Bearer KEY`` (None: none). ``log`` receives a
    bug's traceback (default: this module's logger)."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip() or api_key != api_key.strip()):
        raise UsageError("--api-key must be a non-empty string without spaces around it")
    if isinstance(allowed_hosts, tuple):
        allowed_hosts = HostPolicy(allowed_hosts, ip_literals=False)
    limits = limits or ServeLimits()
    # Scoring and evaluation put the model in eval mode and restore what they found; from threads
    # at once that is only safe when what they find is eval mode already.
    lm.model.eval()
    pool = WorkerPool(limits)
    served = Served(lm=lm, limits=limits, pool=pool, batcher=Batcher(lm, limits.batch, pool) if limits.batch else None,
                    report=without_paths(checkpoint_report(lm.checkpoint), lm.path), model_id=model_id_of(lm),
                    created=int(lm.path.stat().st_mtime) if lm.path.exists() else 0,
                    say=log or logging.getLogger(__name__).error)
    app = Starlette(routes=[*NATIVE_ROUTES, *OPENAI_ROUTES],
                    exception_handlers={HTTPException: _http_problem, Exception: _unexpected},
                    lifespan=_closing(served))
    app.state.served = served
    return Guard(app, allowed_hosts, api_key, served.error_for)


async def _http_problem(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method a route does not take) as one-line errors."""
    status = getattr(exc, "status_code", 500)
    detail = {404: f"no such endpoint: {request.method} {request.url.path}",
              405: f"{request.url.path} does not take {request.method}"}.get(status, getattr(exc, "detail", ""))
    return served_by(request).error_for(request.url.path, status, str(detail))


async def _unexpected(request: Request, exc: Exception) -> Response:
    served = served_by(request)
    return served.openai_failure(exc) if request.url.path.startswith(OPENAI_PATHS) else served.failure(exc)


def _closing(served: Served) -> Callable[[Any], Any]:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:  # stop every generation, so shutting down never waits for one
            served.pool.close()
            if served.batcher is not None:
                served.batcher.close()

    return lifespan
