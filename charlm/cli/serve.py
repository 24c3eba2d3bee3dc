"""The ``charlm serve`` command: a model behind the HTTP API, the OpenAI completions API and the playground."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from charlm.cli.output import err, handled


def serve(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A .safetensors file or a run folder. Default: the newest run.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on. The default answers this machine only; 0.0.0.0 answers anyone who can reach it (then give --api-key, or --unauthenticated).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on; 0 picks a free one (printed).")] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "cpu",
    workers: Annotated[int, typer.Option(help="Requests the model runs at once; the rest wait their turn.")] = 2,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a worker; more are answered 503.")] = 64,
    batch: Annotated[int, typer.Option(help="0: each generation steps on its own, exactly as charlm sample does. N: up to N samples of concurrent requests step together, several times the throughput, but a rare draw can differ from charlm sample's with the same seed.")] = 0,
    max_length: Annotated[int, typer.Option(help="The most tokens one sample may ask for.")] = 5_000,
    max_samples: Annotated[int, typer.Option(help="The most samples one request may ask for.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="The most tokens in a prime, and in a text whose per-token log-probabilities are asked for.")] = 20_000,
    max_body_bytes: Annotated[int, typer.Option(help="The largest request body accepted.")] = 1_000_000,
    api_key: Annotated[Optional[str], typer.Option(envvar="CHARLM_API_KEY", show_envvar=True, help="Every /v1 request must send 'Authorization: Bearer KEY'. Default: no key (loopback only, unless --unauthenticated).")] = None,
    allow_host: Annotated[Optional[list[str]], typer.Option(help="A Host name to answer besides localhost, loopback and IP addresses (repeatable); other names are refused (DNS rebinding).")] = None,
    unauthenticated: Annotated[bool, typer.Option("--unauthenticated", help="Listen beyond loopback without --api-key: anyone who can reach the port can use the model.")] = False,
    max_connections: Annotated[int, typer.Option(help="Open connections at most; more are closed at once.")] = 256,
    client_timeout: Annotated[float, typer.Option(help="Seconds a client has to send its request's headers, and its body, and that a response may wait for a client that stopped reading.")] = 30.0,
) -> None:
    """Serve a model over HTTP: a JSON API (generate, score, perplexity; streaming as Server-Sent Events), OpenAI's completions API (/v1/completions, /v1/models) and a playground page that shows how surprised the model is by each character.

    Needs the serve extra: pip install "charlm[serve]". Open the printed address in a browser.

    Example: charlm serve checkpoints/tinyshakespeare --port 8000
    """
    with handled():
        # Imported when the command runs, so that `charlm --help` loads neither torch nor the serve extra.
        from charlm.api import load
        from charlm.serve import ServeLimits, allowed_hosts_for, check_exposure, listen, make_app, resolve, run

        limits = ServeLimits(max_body_bytes=max_body_bytes, max_length=max_length, max_samples=max_samples,
                             max_tokens=max_tokens, workers=workers, max_queue=max_queue, batch=batch,
                             max_connections=max_connections, client_timeout=client_timeout)
        resolved = resolve(host, port)
        allowed = allowed_hosts_for(host, str(resolved[1][0]), tuple(allow_host or ()))
        check_exposure(host, allowed, api_key, unauthenticated)
        lm = load(checkpoint, device=device)
        say = lambda line: err.print(line, markup=False, highlight=False)  # noqa: E731
        app_ = make_app(lm, limits, allowed_hosts=allowed, api_key=api_key, log=say)
        sock = listen(host, port, resolved)
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        if allowed.ip_literals:
            who = "anyone with the API key" if api_key is not None else "anyone (there is no API key)"
            err.print(f"charlm: warning: listening on {host} port {bound}: {who} who can reach this machine can "
                      f"generate and score text with the model and read its configuration (/v1/model); Host names "
                      f"answered: {allowed.describe()}", markup=False)

        def started() -> None:
            err.print(f"charlm: serving {lm.path} at http://{shown}:{bound}/ (API under /v1; Ctrl-C stops)",
                      markup=False)

        try:
            run(app_, sock, on_started=started, log=say)
        except KeyboardInterrupt:  # uvicorn shuts down first, then passes Ctrl-C on: the way to stop
            pass
        err.print("charlm: server stopped", markup=False)
