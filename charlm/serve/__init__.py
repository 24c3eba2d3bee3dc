"""``charlm serve``: one model behind a local HTTP API, and the playground page.

    POST /v1/generate    {prime, length, temperature, top_k, top_p, seed, stop, num_samples, stream}
    POST /v1/score       {lines, include_end, logprobs, top}
    POST /v1/perplexity  {text, logprobs, top}
    GET  /v1/model       what `charlm info --json` prints (paths shown relative to the run folder)
    POST /v1/completions, GET /v1/models   OpenAI's legacy completions API (openai.py)
    GET  /healthz        {"status": "ok", workers, busy, waiting}
    GET  /               the playground (static files from charlm/static, no build step, no CDN)

Built on Starlette and uvicorn (the ``serve`` extra; importing this package without them is a
``MissingDependencyError`` saying what to install). The model runs in a pool of worker threads
(workers.py), never on the event loop, so a long request does not hold up the others; each request
gets its own sampler state, so concurrent requests share weights and nothing else. Safe by default
(security.py): requests for a Host name this server was not told to answer, from another web
site, without JSON's content type or without the ``--api-key`` are refused before any route runs;
slow or stuck clients lose their connection; bodies, lengths, sample counts and the tokens read are
bounded (``ServeLimits``); bad input is a 400/413/422 with a one-line message; and a client that
goes away stops its work at the next token or window and frees its place.

Generation with the same seed gives the same text as ``charlm sample`` and ``LanguageModel.stream``:
it *is* that call. A request without a seed gets a random one, reported in the answer so the text
can be made again. ``--batch N`` trades that exactness for throughput (batching.py).

    lm = charlm.load("checkpoints/tinyshakespeare")
    resolved = resolve("127.0.0.1", 8000)
    app = make_app(lm, ServeLimits(), allowed_hosts=allowed_hosts_for("127.0.0.1", resolved[1][0]))
    run(app, listen("127.0.0.1", 8000, resolved))
"""
from __future__ import annotations

from charlm.errors import MissingDependencyError

NEEDS_EXTRA = 'charlm serve needs Starlette and uvicorn: pip install "charlm[serve]"'

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:
    raise MissingDependencyError(NEEDS_EXTRA) from None

from charlm.serve.app import make_app  # noqa: E402
from charlm.serve.limits import ServeLimits  # noqa: E402
from charlm.serve.security import allowed_hosts_for, check_exposure  # noqa: E402
from charlm.serve.server import listen, resolve, run  # noqa: E402

__all__ = ["NEEDS_EXTRA", "ServeLimits", "allowed_hosts_for", "check_exposure", "listen", "make_app", "resolve",
           "run"]
