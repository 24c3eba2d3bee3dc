"""What keeps ``charlm serve`` safe to leave running: who may ask (Host, Origin, API key, content
type), and how long a client may hold a connection (headers, bodies, stalled writes, a cap on
connections), checked before any route runs.

- **Host** (DNS rebinding: a web page whose name is made to resolve to this machine sends its own
  name): loopback names and the names given (``--host``, ``--allow-host``) are answered; on a
  non-loopback address, IP literals too (a rebinding page cannot send one of those). 421 otherwise.
- **Cross-origin** requests a web page can send without a CORS preflight (a form post, a
  ``no-cors`` fetch with a text/plain body, an ``<img>`` or ``<script>`` GET) never reach a route:
  a foreign ``Origin`` or a ``Sec-Fetch-Site`` of cross-site or same-site is a 403, and a POST must
  say ``Content-Type: application/json`` (415), which a page can only send after a preflight this
  server never grants. The page itself (``/``, ``/static/…``) may be opened from a link.
- **API key** (``--api-key``): every ``/v1`` route needs ``Authorization: Bearer KEY`` (401).
- **Slow and stuck clients** (``GuardedProtocol``): request headers must arrive within
  ``client_timeout`` seconds, a stalled write (a client that stops reading) is cut after as long,
  and connections beyond ``max_connections`` are closed at once; bodies get the same time in
  ``read_body``. Running out of file descriptors is one log line a minute, not a traceback per try.
"""
from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from charlm.config import brief
from charlm.errors import UsageError

OPENAI_PATHS = ("/v1/completions", "/v1/models")


def host_name(header: str) -> str:
    """The name in a Host header: lower case, without port, brackets or a trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1:header.find("]")] if "]" in header else header[1:]
    else:
        name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def is_loopback_name(name: str) -> bool:
    """localhost, or an address in 127.0.0.0/8 or ::1 (an IPv4-mapped one included)."""
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """The Host names a server answers: loopback names, ``names``, and (off loopback) any IP literal."""

    def __init__(self, names: tuple[str, ...], *, ip_literals: bool) -> None:
        self.names = tuple(sorted({host_name(name) for name in names if name}))
        self.ip_literals = ip_literals

    def allows(self, name: str) -> bool:
        return (not name or is_loopback_name(name) or name in self.names
                or (self.ip_literals and is_ip_literal(name)))

    def describe(self) -> str:
        shown = ["localhost", "loopback addresses", *[n for n in self.names if not is_loopback_name(n)]]
        if self.ip_literals:
            shown.append("any IP address")
        return ", ".join(shown)


def allowed_hosts_for(host: str, address: str | None = None, extra: tuple[str, ...] = ()) -> HostPolicy:
    """The Host names to answer when listening on ``host`` (which resolved to ``address``):
    loopback names, ``host`` itself and the ``extra`` names (``--allow-host``); off loopback, IP
    literals too. A wildcard (0.0.0.0, ::) is no name anyone sends."""
    name = host_name(host)
    loopback = is_loopback_name(name) or (address is not None and is_loopback_name(host_name(address)))
    wildcard = name in ("0.0.0.0", "::", "")
    return HostPolicy(tuple(extra) + (() if wildcard else (name,)), ip_literals=not loopback)


def _same_origin(origin: str, host_header: str) -> bool:
    """Whether ``Origin`` names this server as the client reached it (scheme http, the Host header's
    name and port)."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme != "http" or not parts.hostname:
        return False
    here = host_header.strip().lower()
    there = parts.hostname.lower()
    there = f"[{there}]" if ":" in there else there
    return f"{there}:{port or 80}" == (here if here.rsplit("]", 1)[-1].count(":") else f"{here}:80")


def _header(scope: Any, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key == name:
            return value.decode("latin-1")
    return None


class Guard:
    """ASGI middleware: the Host, cross-origin, content-type and API key checks above, each
    refusal a one-line JSON error in the shape of the route asked for (OpenAI's on its routes)."""

    def __init__(self, app: Any, hosts: HostPolicy | None, api_key: str | None,
                 error: Callable[[str, int, str, str | None], Any]) -> None:
        self.app, self.hosts, self.api_key, self.error = app, hosts, api_key, error
        self.state = app.state

    def refusal(self, scope: Any) -> tuple[int, str, str | None] | None:
        path, method = scope.get("path", ""), scope.get("method", "GET")
        host = _header(scope, b"host") or ""
        if self.hosts is not None and not self.hosts.allows(host_name(host)):
            return (421, f"this server answers requests addressed to {self.hosts.describe()} only (got Host "
                         f"{brief(host)}); start it with --allow-host NAME to answer NAME", None)
        api = path.startswith("/v1/") or path == "/healthz"
        if not api:
            return None  # the page and its files: no work, nothing private
        origin = _header(scope, b"origin")
        site = (_header(scope, b"sec-fetch-site") or "").lower()
        if (origin is not None and not _same_origin(origin, host)) or site in ("cross-site", "same-site"):
            return (403, f"requests from another web site are refused (Origin {brief(origin or site)}); "
                         f"call this API from a program or from this server's own page", None)
        if self.api_key is not None and path.startswith("/v1/"):
            given = _header(scope, b"authorization") or ""
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                what = "no API key was given" if not given else "the API key is not this server's"
                return (401, f"{what}; send the header 'Authorization: Bearer KEY' with the server's --api-key",
                        "invalid_api_key")
        if method == "POST":
            media = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return (415, f"the body must be sent as Content-Type: application/json (got {brief(media or None)}); "
                             f"with curl, add -H 'Content-Type: application/json'", None)
        return None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refused = self.refusal(scope)
            if refused is not None:
                status, message, code = refused
                await self.error(scope.get("path", ""), status, message, code)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(receive_chunks: Any, limit: int, timeout: float) -> bytearray:
    """Every chunk of a request body, at most ``limit`` bytes and ``timeout`` seconds in all (a
    body sent a byte at a time gives its place back). Raises ``OverflowError`` past the limit and
    ``TimeoutError`` past the time."""
    data = bytearray()

    async def read() -> None:
        async for chunk in receive_chunks:
            data.extend(chunk)
            if len(data) > limit:
                raise OverflowError

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError from None
    return data


def guarded_protocol(client_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP/1.1 protocol with the deadlines of the module's docstring."""
    class GuardedProtocol(H11Protocol):
        headers_timer: asyncio.TimerHandle | None = None
        write_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.abort()  # over the cap: closed before it costs anything more
                return
            self._await_headers()

        def _await_headers(self) -> None:
            if self.headers_timer is None:
                self.headers_timer = self.loop.call_later(client_timeout, self._headers_late)

        def _headers_late(self) -> None:
            self.headers_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.abort()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._await_headers()  # part of a request line or headers: they have client_timeout
            elif self.headers_timer is not None:
                self.headers_timer.cancel()
                self.headers_timer = None

        def pause_writing(self) -> None:
            super().pause_writing()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(client_timeout, self._write_stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None

        def _write_stalled(self) -> None:
            self.write_timer = None
            self.transport.abort()  # connection_lost: the response sees a disconnect, its work stops

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self.headers_timer, self.write_timer):
                if timer is not None:
                    timer.cancel()
            self.headers_timer = self.write_timer = None
            super().connection_lost(exc)

    return GuardedProtocol


def quiet_accept_errors(say: Callable[[str], None], *, every: float = 60.0) -> Callable[[Any, dict], None]:
    """An event-loop exception handler: running out of file descriptors (or memory for sockets)
    while accepting is one line every ``every`` seconds (asyncio retries the accept each second and
    would log a traceback each time); anything else goes to asyncio's default handler."""
    last = [-float("inf")]

    def handle(loop: Any, context: dict) -> None:
        if "out of system resource" in str(context.get("message", "")):
            now = time.monotonic()
            if now - last[0] >= every:
                last[0] = now
                exc = context.get("exception")
                say(f"charlm: warning: cannot accept connections: {getattr(exc, 'strerror', None) or exc}; "
                    f"new clients wait until some close (raise the open-files limit, ulimit -n, or lower "
                    f"--max-connections)")
            return
        loop.default_exception_handler(context)

    return handle


def check_exposure(host: str, allowed: HostPolicy, api_key: str | None, unauthenticated: bool) -> None:
    """Refuse to listen beyond loopback (``allowed`` answers IP literals) without an API key, unless
    asked to (``--unauthenticated``): anyone who could reach the port could use the model."""
    if allowed.ip_literals and api_key is None and not unauthenticated:
        raise UsageError(f"--host {host} lets other machines use the model: give --api-key KEY (or CHARLM_API_KEY), "
                         f"or --unauthenticated to serve them without one")
