"""Running the app: the listening socket (``resolve``, ``listen``) and uvicorn serving on it
(``run``) with the deadlines and the connection cap of its ``ServeLimits`` until Ctrl-C."""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Callable

import uvicorn

from charlm.errors import UsageError
from charlm.serve.security import guarded_protocol, quiet_accept_errors

Address = tuple[int, Any]  # a socket family and the address to bind in it


def resolve(host: str, port: int) -> Address:
    """The family and address to listen on at ``host``:``port`` (the first getaddrinfo gives)."""
    try:
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host!r}: {exc.strerror}") from None
    return family, address


def listen(host: str, port: int, resolved: Address | None = None) -> socket.socket:
    """A socket bound to ``host``:``port`` (``resolved``: what ``resolve`` gave for them), for
    ``run``; port 0 picks a free one (``getsockname()[1]``). A port in use is a ``UsageError``."""
    family, address = resolved or resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                         + (" (give another --port, or 0 for any free one)" if exc.errno == 98 else "")) from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server that ends every open stream when it is told to stop, so shutting down waits
    for none of them, and that says when it has started."""

    def __init__(self, config: uvicorn.Config, app: Any, on_started: Callable[[], None] | None,
                 say: Callable[[str], None]) -> None:
        super().__init__(config)
        self.served, self.on_started, self.say = app.state.served, on_started, say

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.served.pool.stop_all()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        asyncio.get_running_loop().set_exception_handler(quiet_accept_errors(self.say))
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def run(app: Any, sock: socket.socket, *, on_started: Callable[[], None] | None = None,
        log: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` (``make_app``'s) on the bound socket ``sock`` until Ctrl-C (uvicorn; its own
    log quiet), with the deadlines and the connection cap of its ``ServeLimits`` (security.py).
    ``on_started`` is called once it answers; ``log`` receives warnings (running out of file
    descriptors)."""
    limits = app.state.served.limits
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                            lifespan="on", http=guarded_protocol(limits.client_timeout, limits.max_connections),
                            timeout_keep_alive=max(1, min(5, int(limits.client_timeout))))
    _Server(config, app, on_started, log or logging.getLogger(__name__).warning).run(sockets=[sock])
