"""`charlm serve`: every endpoint against the Python API, every class of bad input and concurrency
in-process (Starlette's TestClient: the app the command serves); dropped connections, queued
clients that leave and Ctrl-C against a real server on 127.0.0.1 (a `python -m charlm serve` child
process, marked `server`) driven through raw sockets; the socket the command listens on."""
from __future__ import annotations

import json
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import charlm  # noqa: E402
from charlm.cli import app  # noqa: E402
from charlm.errors import UsageError  # noqa: E402
from charlm.serve import ServeLimits, allowed_hosts_for, check_exposure, listen, resolve  # noqa: E402
from charlm.serve.security import host_name, is_loopback_name  # noqa: E402

from conftest import TINY_TEXT  # noqa: E402
from serving import InProcess, Server  # noqa: E402

runner = CliRunner()


def streamed(events) -> dict[int, str]:
    texts: dict[int, str] = {}
    for name, data in events:
        if name == "message":
            texts[data["sample"]] = texts.get(data["sample"], "") + data["text"]
    return texts


LIMITS = ServeLimits(workers=2, max_length=2000, max_samples=4, max_body_bytes=20000, max_tokens=500)


@pytest.fixture(scope="module")
def lm(trained_run):
    return charlm.load(trained_run)


@pytest.fixture(scope="module")
def server(lm):
    running = InProcess(lm, LIMITS)
    yield running
    running.stop()
    assert "Traceback" not in "".join(running.log), "".join(running.log)


GENERATIONS = [
    {"prime": "First", "length": 80, "seed": 3},
    {"prime": "", "length": 50, "seed": 0, "temperature": 0},
    {"prime": "Sp", "length": 60, "seed": 7, "top_k": 5, "top_p": 0.9, "temperature": 1.2},
    {"prime": "F", "length": 200, "seed": 2, "stop": "e"},
]


@pytest.mark.parametrize("options", GENERATIONS, ids=lambda o: ",".join(o))
def test_generate_equals_the_api_streamed_or_not(server, lm, options):
    expected = "".join(lm.generate(**options))
    status, body = server.request("POST", "/v1/generate", options)
    assert status == 200, body
    assert body == {"prime": options["prime"], "seed": options["seed"], "samples": [expected]}
    events = server.events(options)
    assert events[0] == ("start", {"prime": options["prime"], "seed": options["seed"], "num_samples": 1})
    assert events[-1] == ("end", {"samples": [expected]})
    assert streamed(events) == {0: expected}
    assert [data["done"] for name, data in events if name == "message"][-1] is True


def test_generate_equals_charlm_sample(server, trained_run, lm):
    status, body = server.request("POST", "/v1/generate", {"prime": "First", "length": 80, "seed": 3})
    cli = runner.invoke(app, ["sample", "--checkpoint", str(trained_run), "--prime", "First", "--length", "80",
                              "--seed", "3"])
    assert cli.exit_code == 0, cli.output
    assert cli.stdout == "First" + body["samples"][0] + "\n"


def test_several_samples_at_once(server, lm):
    options = {"prime": "Fi", "length": 40, "seed": 5, "num_samples": 3}
    expected = lm.samples(**options)
    status, body = server.request("POST", "/v1/generate", options)
    assert status == 200 and body["samples"] == expected and len(set(expected)) == 3
    events = server.events(options)
    assert streamed(events) == dict(enumerate(expected)) and events[-1] == ("end", {"samples": expected})


def test_a_request_without_a_seed_is_told_its_seed(server):
    status, first = server.request("POST", "/v1/generate", {"prime": "F", "length": 60})
    assert status == 200 and isinstance(first["seed"], int)
    status, again = server.request("POST", "/v1/generate", {"prime": "F", "length": 60, "seed": first["seed"]})
    assert again["samples"] == first["samples"]


def test_score_equals_the_api_with_per_character_logprobs(server, lm):
    lines = ["First Citizen:", "", "Speak, speak.", "xyz"]
    status, body = server.request("POST", "/v1/score", {"lines": lines})
    assert status == 200, body
    for got, want in zip(body["lines"], lm.score(lines), strict=True):
        assert got["index"] == want.index and got["text"] == want.text and got["tokens"] == want.num_tokens
        assert got["total_nats"] == pytest.approx(want.total_nats, rel=1e-6)
        assert got["unknown_tokens"] == want.num_unknown and "logprobs" not in got
    for include_end in (True, False):
        status, body = server.request("POST", "/v1/score", {"lines": lines, "logprobs": True, "top": 3,
                                                            "include_end": include_end})
        assert status == 200, body
        for got in body["lines"]:
            pieces = got["logprobs"]
            assert "".join(p["text"] for p in pieces) == got["text"] + ("\n" if include_end else "")
            assert sum(p["logprob"] for p in pieces) == pytest.approx(-got["total_nats"], rel=1e-5, abs=1e-6)
            assert all(len(p["top"]) == 3 for p in pieces)


def test_perplexity_equals_the_api_with_per_character_logprobs(server, lm):
    text = TINY_TEXT[:300]
    want = lm.perplexity(text)
    status, body = server.request("POST", "/v1/perplexity", {"text": text})
    assert status == 200, body
    assert body["tokens"] == want.tokens and body["predicted_tokens"] == want.predicted_tokens
    assert body["total_nats"] == pytest.approx(want.total_nats, rel=1e-9)
    assert body["bits_per_char"] == pytest.approx(want.bits_per_char, rel=1e-9) and "logprobs" not in body
    status, body = server.request("POST", "/v1/perplexity", {"text": text, "logprobs": True})
    pieces = body["logprobs"]
    assert "".join(p["text"] for p in pieces) == text
    assert pieces[0]["logprob"] is None and pieces[0]["top"] == []
    assert sum(p["logprob"] for p in pieces[1:]) == pytest.approx(-want.total_nats, rel=1e-5)
    assert all(len(p["top"]) == 5 for p in pieces[1:])
    best = pieces[1]["top"][0]
    assert isinstance(best[0], str) and best[1] >= pieces[1]["logprob"]


def test_model_is_what_info_shows_and_health(server, trained_run):
    status, body = server.request("GET", "/v1/model")
    info = runner.invoke(app, ["info", str(trained_run), "--json"])
    shown = json.loads(info.stdout)  # what info prints, but for the machine's folders
    shown["checkpoint"] = f"{trained_run.name}/best.safetensors"
    assert status == 200 and body == shown
    assert server.health() == {"status": "ok", "workers": 2, "batch": 0, "busy": 0, "waiting": 0}


def test_the_page_is_served_with_everything_it_needs_from_this_server(server):
    status, page = server.request("GET", "/")
    assert status == 200 and b"charlm playground" in page
    headers = server.client.get("/").headers
    assert headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    assets = [url for url in re.findall(rb'(?:src|href)="([^"]+)"', page) if not url.startswith(b"data:")]
    assert sorted(assets) == [b"/static/playground.css", b"/static/playground.js"]
    static = Path(charlm.__file__).parent / "static"
    for path in static.iterdir():  # offline: nothing refers to another host
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", path.read_text()), path
    for asset, kind in ((b"/static/playground.js", "javascript"), (b"/static/playground.css", "css")):
        status, data = server.request("GET", asset.decode())
        assert status == 200 and data == (static / asset.decode().rsplit("/", 1)[1]).read_bytes()
    status, body = server.request("GET", "/static/serve.py")
    assert status == 404 and "no such file" in body["error"]


BAD = [
    # (path, body or raw bytes, status, words the message has)
    ("/v1/generate", b"{", 400, "not valid JSON"),
    ("/v1/generate", b"", 400, "needs a JSON object"),
    ("/v1/generate", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/generate", b"\xff\xfe{}", 400, "not valid JSON"),
    ("/v1/generate", b"[" * 200 + b"]" * 200, 400, "nested"),
    ("/v1/generate", b'{"temperature": NaN}', 422, "temperature must be"),
    ("/v1/generate", b"x" * 30000, 413, "--max-body-bytes"),
    ("/v1/generate", {"lenght": 5}, 422, "unknown field 'lenght'"),
    ("/v1/generate", b'{"length": 2, "length": 3}', 400, "appears twice"),
    ("/v1/generate", b'{"length": ' + b"9" * 5000 + b"}", 400, "cannot be read"),
    ("/v1/generate", {"temperature": 10**400}, 422, "temperature must be"),
    ("/v1/generate", {"top_p": -10**400}, 422, "top_p must be"),
    ("/v1/generate", {"length": "10"}, 422, "length must be"),
    ("/v1/generate", {"length": True}, 422, "length must be"),
    ("/v1/generate", {"length": -1}, 422, "length must be"),
    ("/v1/generate", {"length": 2001}, 422, "--max-length"),
    ("/v1/generate", {"temperature": -0.5}, 422, "temperature must be"),
    ("/v1/generate", {"top_k": 0}, 422, "top_k must be"),
    ("/v1/generate", {"top_p": 0}, 422, "top_p must be"),
    ("/v1/generate", {"top_p": 1.5}, 422, "top_p must be"),
    ("/v1/generate", {"seed": -1}, 422, "seed must be"),
    ("/v1/generate", {"seed": 1.5}, 422, "seed must be"),
    ("/v1/generate", {"seed": 2**64}, 422, "seed must be"),
    ("/v1/generate", {"num_samples": 0}, 422, "num_samples must be"),
    ("/v1/generate", {"num_samples": 5}, 422, "--max-samples"),
    ("/v1/generate", {"stop": ""}, 422, "stop must be"),
    ("/v1/generate", {"stop": 5}, 422, "stop must be"),
    ("/v1/generate", {"prime": 5}, 422, "prime must be"),
    ("/v1/generate", {"prime": "✓☃"}, 422, "never seen"),
    ("/v1/generate", {"prime": "a" * 501}, 422, "--max-tokens"),
    ("/v1/generate", {"stream": "yes"}, 422, "stream must be"),
    ("/v1/score", {"lines": "abc"}, 422, "lines must be a list"),
    ("/v1/score", {"lines": [1]}, 422, "lines must be a list"),
    ("/v1/score", {}, 422, "lines must be a list"),
    ("/v1/score", {"lines": ["a"], "top": 99, "logprobs": True}, 422, "top must be"),
    ("/v1/score", {"lines": ["a"], "include_end": 1}, 422, "include_end must be"),
    ("/v1/score", {"lines": ["a" * 600], "logprobs": True}, 422, "--max-tokens"),
    ("/v1/score", {"lines": ["a"], "top": 3}, 422, "logprobs"),
    ("/v1/perplexity", {"text": "abc", "top": 3}, 422, "logprobs"),
    ("/v1/perplexity", {"text": "F"}, 422, "at least 2 tokens"),
    ("/v1/perplexity", {"text": None}, 422, "text must be"),
    ("/v1/perplexity", {"text": "abc", "logprobs": 1}, 422, "logprobs must be"),
    ("/v1/perplexity", {"text": "abc", "cache": "no"}, 422, "cache must be"),
    ("/v1/perplexity", {"text": "abc", "lines": []}, 422, "unknown field"),
    # Scoring is bounded as generation is, logprobs or not.
    ("/v1/perplexity", {"text": "ab" * 300}, 422, "--max-tokens"),
    ("/v1/score", {"lines": ["a" * 300, "b" * 300]}, 422, "--max-tokens"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_gets_a_one_line_message(server, path, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got, answer = server.request("POST", path, None if raw is not None else body, raw=raw)
    assert got == status, answer
    assert answer["status"] == status and words in answer["error"], answer
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/generate", 405), ("DELETE", "/v1/model", 405),
                                                ("GET", "/v1/nothing", 404), ("POST", "/healthz", 405)])
def test_wrong_method_or_path(server, method, path, status):
    got, answer = server.request(method, path)
    assert got == status and answer["status"] == status and answer["error"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80",
                                  "localhost.evil.example", "10.0.0.1"])
def test_requests_for_another_host_name_are_refused(server, host):
    got, answer = server.request("GET", "/v1/model", headers={"Host": host})
    assert got == 421 and "answers requests addressed to localhost, loopback addresses only" in answer["error"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8000", "[::1]:8000", "LOCALHOST.:1", "127.0.0.5:80"])
def test_requests_for_loopback_names_are_served(server, host):
    got, _ = server.request("GET", "/healthz", headers={"Host": host})
    assert got == 200


def test_32_concurrent_streams_equal_their_single_request_output(server, lm):
    options = [{"prime": "First", "length": 150, "seed": seed, "temperature": 1.0} for seed in range(32)]
    expected = ["".join(lm.generate(**o)) for o in options]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(server.events, options))
    for events, want in zip(results, expected, strict=True):
        assert events[-1] == ("end", {"samples": [want]}) and streamed(events) == {0: want}
    assert server.wait_idle()["busy"] == 0


def _open_generation(port: int, body: dict) -> socket.socket:
    """A generate request on a raw socket, its first bytes read; the caller drops it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


@pytest.fixture(scope="module")
def one_worker(trained_run):
    """One worker, no queue, and lengths long enough that only a stopped generation ever ends."""
    running = Server(trained_run, "--workers", "1", "--max-queue", "0", "--max-length", "100000000",
                     "--max-body-bytes", "30000000", "--max-tokens", "30000000")
    yield running
    running.stop()
    assert "Traceback" not in "".join(running.log), "".join(running.log)


@pytest.mark.server
def test_a_dropped_stream_frees_its_worker(one_worker):
    sock = _open_generation(one_worker.port, {"length": 100_000_000, "stream": True, "seed": 1})
    assert b"200 OK" in sock.recv(4096)
    assert one_worker.wait_busy()["busy"] == 1
    status, answer = one_worker.request("POST", "/v1/generate", {"length": 5})
    assert status == 503 and "busy" in answer["error"]
    sock.close()
    one_worker.wait_idle()
    status, answer = one_worker.request("POST", "/v1/generate", {"length": 5, "seed": 1})
    assert status == 200 and len(answer["samples"][0]) == 5


@pytest.mark.server
def test_a_dropped_perplexity_request_stops_and_holds_its_place_until_then(one_worker):
    text = (TINY_TEXT * (20_000_000 // len(TINY_TEXT)))[:20_000_000]  # minutes of scoring on 2 cores
    data = json.dumps({"text": text}).encode()
    sock = socket.create_connection(("127.0.0.1", one_worker.port), timeout=60)
    sock.sendall(b"POST /v1/perplexity HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    deadline = time.monotonic() + 60
    while one_worker.health()["busy"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, answer = one_worker.request("POST", "/v1/generate", {"length": 5})
    assert status == 503  # its place is taken while it runs
    sock.close()
    one_worker.wait_idle(seconds=30)  # stopped at its next window, not minutes later
    assert one_worker.request("POST", "/v1/generate", {"length": 5})[0] == 200


@pytest.mark.server
def test_a_dropped_json_request_frees_its_worker(one_worker):
    sock = _open_generation(one_worker.port, {"length": 100_000_000, "seed": 1})
    deadline = time.monotonic() + 60
    while one_worker.health()["busy"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sock.close()
    one_worker.wait_idle()
    assert one_worker.request("POST", "/v1/generate", {"length": 5})[0] == 200


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.server
def test_ctrl_c_ends_running_and_queued_requests_and_exits(trained_run):
    running = Server(trained_run, "--workers", "1", "--max-length", "100000000")
    first = _open_generation(running.port, {"length": 100_000_000, "stream": True})
    assert b"200 OK" in first.recv(4096)
    running.wait_busy()
    queued = _open_generation(running.port, {"length": 100_000_000, "stream": True})
    waiting = _open_generation(running.port, {"length": 100_000_000})
    deadline = time.monotonic() + 60
    while running.health()["waiting"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    assert running.stop() == 0
    assert time.monotonic() - started < 8  # nothing waited for the graceful-shutdown timeout
    running_answer, queued_answer, waiting_answer = (_read_all(sock) for sock in (first, queued, waiting))
    for answer in (running_answer, queued_answer):  # streams end with an error event, not a cut connection
        assert b"event: error" in answer and b"shutting down" in answer, answer[-300:]
    assert b" 503 " in waiting_answer and b"shutting down" in waiting_answer
    for sock in (first, queued, waiting):
        sock.close()
    assert "Traceback" not in "".join(running.log), "".join(running.log)


@pytest.mark.server
def test_a_client_gone_before_its_body_arrived_is_no_error(one_worker_one_waiting):
    server = one_worker_one_waiting
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"length\": 3")
    time.sleep(0.3)
    sock.close()
    time.sleep(0.3)
    assert server.wait_idle()["busy"] == 0  # and the fixture checks the log has no traceback


def test_a_port_in_use_is_a_one_line_error(trained_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", str(trained_run), "--port", str(port)])
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1


def test_listening_is_refused_with_one_line(trained_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}: .*give another --port"):
            listen("127.0.0.1", port)
    with pytest.raises(UsageError, match="cannot listen on 'no such host.invalid'"):
        resolve("no such host.invalid", 8000)
    resolved = resolve("127.0.0.1", 0)
    with listen("127.0.0.1", 0, resolved) as sock:
        assert sock.getsockname()[0] == "127.0.0.1" and sock.getsockname()[1] > 0
    with pytest.raises(UsageError, match="--api-key KEY .* --unauthenticated"):
        check_exposure("0.0.0.0", allowed_hosts_for("0.0.0.0"), None, False)
    check_exposure("0.0.0.0", allowed_hosts_for("0.0.0.0"), "key", False)
    check_exposure("0.0.0.0", allowed_hosts_for("0.0.0.0"), None, True)
    check_exposure("127.0.0.1", allowed_hosts_for("127.0.0.1"), None, False)


@pytest.mark.parametrize("args,words", [(["--workers", "0"], "--workers must be"),
                                        (["--max-queue", "-1"], "--max-queue must be"),
                                        (["--max-length", "0"], "--max-length must be"),
                                        (["--port", "70000"], "65535")])
def test_bad_options_are_refused(trained_run, args, words):
    result = runner.invoke(app, ["serve", str(trained_run), *args])
    assert result.exit_code == 2 and words in result.output


def test_without_the_extra_it_says_what_to_install(trained_run, monkeypatch):
    for name in [name for name in sys.modules if name == "charlm.serve" or name.startswith("charlm.serve.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, as in a process without the extra
    monkeypatch.setitem(sys.modules, "starlette", None)
    result = runner.invoke(app, ["serve", str(trained_run), "--port", "0"])
    assert result.exit_code == 1 and 'pip install "charlm[serve]"' in result.output


def test_loopback_hosts_accept_loopback_names_only():
    for host in ("127.0.0.1", "127.0.0.5", "::1", "[::1]", "localhost", "LOCALHOST.", "::ffff:127.0.0.1",
                 "0:0:0:0:0:0:0:1"):
        policy = allowed_hosts_for(host)
        assert policy.names == (host_name(host),) and not policy.ip_literals, host
        assert not policy.allows("10.0.0.1") and not policy.allows("evil.example")
    policy = allowed_hosts_for("myname", "127.0.0.1")  # a name that resolves to loopback
    assert policy.names == ("myname",) and not policy.ip_literals
    # Beyond loopback the Host check stays (DNS rebinding): IP literals, the --host name and --allow-host names.
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        policy = allowed_hosts_for(host, None, ("box.lan",))
        assert policy.ip_literals and policy.allows("box.lan") and policy.allows("192.168.1.9")
        assert not policy.allows("evil.example") and policy.allows("localhost")
    assert allowed_hosts_for("0.0.0.0").names == () and allowed_hosts_for("example.org").names == ("example.org",)
    assert [host_name(h) for h in ("Example.org:80", "[::1]:8000", "localhost.", "127.0.0.1", "")] == \
        ["example.org", "::1", "localhost", "127.0.0.1", ""]
    assert is_loopback_name("127.9.9.9") and not is_loopback_name("127.0.0.1.evil.example")
    with pytest.raises(UsageError, match="--max-body-bytes"):
        ServeLimits(max_body_bytes=0)


@pytest.fixture(scope="module", params=["word", "byte"])
def other_run(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"serve-{request.param}")
    corpus = folder / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    run = charlm.train(corpus, tokenizer=request.param, out=str(folder / "run"), max_steps=5, hidden_size=16,
                       embed_size=8, batch_size=4, seq_len=16, device="cpu")
    return run.run_dir


def test_word_and_byte_models_generate_score_and_show_their_pieces(other_run):
    lm = charlm.load(other_run)
    running = InProcess(lm, ServeLimits())
    try:
        options = {"prime": "First Citizen", "length": 30, "seed": 4}
        status, body = running.request("POST", "/v1/generate", options)
        assert status == 200 and body["samples"] == ["".join(lm.generate(**options))]
        lines = ["First Citizen:", "", "Zebra ✓ unknown words"]
        for include_end in (True, False):
            status, body = running.request("POST", "/v1/score", {"lines": lines, "logprobs": True,
                                                                  "include_end": include_end})
            assert status == 200, body
            for got, want in zip(body["lines"], lm.score(lines, include_end=include_end), strict=True):
                assert got["total_nats"] == pytest.approx(want.total_nats, rel=1e-6)
                assert sum(p["logprob"] for p in got["logprobs"]) == pytest.approx(-want.total_nats, rel=1e-5,
                                                                                  abs=1e-6)
                pieces = got["logprobs"]
                assert (bool(pieces) and pieces[-1]["text"] == "\n") == include_end
        text = TINY_TEXT[:200] + " Zebra ✓"
        status, body = running.request("POST", "/v1/perplexity", {"text": text, "logprobs": True, "cache": False})
        assert status == 200, body
        assert sum(p["logprob"] for p in body["logprobs"][1:]) == pytest.approx(-body["total_nats"], rel=1e-5)
        if lm.tokenizer.kind == "word":
            unknown = {p["text"].strip() for p in body["logprobs"] if p.get("unknown")}
            assert unknown == set(lm.tokenizer.unknown_symbols(text)) and {"Zebra", "✓"} <= unknown
        else:
            assert body["logprobs"][-1]["text"] == "✓" and "".join(p["text"] for p in body["logprobs"]) == text
    finally:
        running.stop()
    assert "Traceback" not in "".join(running.log), "".join(running.log)


@pytest.fixture(scope="module")
def batched(lm):
    running = InProcess(lm, ServeLimits(batch=64, max_length=100_000_000, max_samples=4))
    yield running
    running.stop()
    assert "Traceback" not in "".join(running.log), "".join(running.log)


def test_batched_requests_draw_from_their_own_rows(batched, lm):
    """--batch: 32 concurrent requests of every shape step together. Their rows are computed beside
    others', so a draw may differ from the API's in the ~1e-7 rounding of a batch; over these
    ~6,000 draws that flips next to none, and argmax text never."""
    options = [{"prime": ["First", "", "Sp"][k % 3], "length": 60 + 10 * (k % 7), "seed": k,
                "temperature": [1.0, 0.0, 0.7][k % 3], "num_samples": 1 + k % 3,
                **({"stop": "e"} if k % 5 == 0 else {}), **({"top_k": 5} if k % 4 == 0 else {})} for k in range(32)]
    expected = [lm.samples(**o) for o in options]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(batched.events, options))
    equal = 0
    for events, want, o in zip(results, expected, options, strict=True):
        assert events[0][0] == "start" and events[-1][0] == "end", events[-1]
        got = events[-1][1]["samples"]
        assert streamed(events) == dict(enumerate(got)) and len(got) == o["num_samples"]
        if o["temperature"] == 0:
            assert got == want
        equal += got == want
    assert equal >= 30, equal
    health = batched.wait_idle()
    assert health["batch"] == 64 and health["busy"] == 0


@pytest.mark.server
def test_batched_json_requests_and_a_dropped_stream(small_batch, lm):
    batched = small_batch
    options = {"prime": "First", "length": 50, "seed": 1, "temperature": 0}
    status, body = batched.request("POST", "/v1/generate", options)
    assert status == 200 and body["samples"] == ["".join(lm.generate(**options))]
    status, body = batched.request("POST", "/v1/generate", {**options, "length": 0, "num_samples": 2})
    assert status == 200 and body["samples"] == ["", ""]
    sock = _open_generation(batched.port, {"length": 100_000_000, "stream": True})
    assert b"200 OK" in sock.recv(4096)
    assert batched.wait_busy()["busy"] == 1
    sock.close()
    batched.wait_idle()
    status, body = batched.request("POST", "/v1/generate", {"prime": "✓"})
    assert status == 422 and "never seen" in body["error"]


@pytest.fixture(scope="module")
def small_batch(trained_run):
    """--batch 2: one long generation leaves room for one more row; one worker, one waiting."""
    running = Server(trained_run, "--batch", "2", "--workers", "1", "--max-queue", "1", "--max-length", "100000000")
    yield running
    assert running.stop() == 0, "".join(running.log)
    assert "Traceback" not in "".join(running.log), "".join(running.log)


@pytest.mark.server
def test_a_batch_request_gone_while_waiting_leaves_the_line(small_batch):
    first = _open_generation(small_batch.port, {"length": 100_000_000, "stream": True})
    assert b"200 OK" in first.recv(4096)
    small_batch.wait_busy()
    wider = _open_generation(small_batch.port, {"length": 5, "num_samples": 2, "stream": True})
    assert b"200 OK" in wider.recv(4096)  # streams start at once; its rows wait for the long one
    deadline = time.monotonic() + 60
    while small_batch.health()["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    wider.close()
    status, body = small_batch.request("POST", "/v1/generate", {"length": 5, "seed": 2}, timeout=30)
    assert status == 200 and len(body["samples"][0]) == 5  # not stuck behind the departed request
    status, body = small_batch.request("POST", "/v1/score", {"lines": ["First"]})
    assert status == 200  # scoring has its own places: a full batch does not turn it away
    status, body = small_batch.request("POST", "/v1/generate", {"num_samples": 3})
    assert status == 422 and "--batch" in body["error"]
    first.close()
    small_batch.wait_idle()


@pytest.mark.server
def test_a_queued_request_gone_frees_its_place_at_once(one_worker_one_waiting):
    server = one_worker_one_waiting
    first = _open_generation(server.port, {"length": 100_000_000, "stream": True})
    assert b"200 OK" in first.recv(4096)
    server.wait_busy()
    queued = _open_generation(server.port, {"length": 5})
    deadline = time.monotonic() + 60
    while server.health()["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    queued.close()
    left = time.monotonic()
    while server.health()["waiting"]:  # dropped from the queue, not kept until the long one ends
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # At once: not when the unread stream ahead of it is cut by the stalled-write deadline (30 s).
    assert time.monotonic() - left < 5
    another = _open_generation(server.port, {"length": 5, "stream": True})
    another.settimeout(10)  # its stream starts while the one worker is busy: its prime is read beside it
    assert b"200 OK" in another.recv(4096)  # admitted, not 503
    assert time.monotonic() - left < 10
    another.close()
    first.close()
    server.wait_idle()


@pytest.fixture(scope="module")
def one_worker_one_waiting(trained_run):
    running = Server(trained_run, "--workers", "1", "--max-queue", "1", "--max-length", "100000000")
    yield running
    assert running.stop() == 0
    assert "Traceback" not in "".join(running.log), "".join(running.log)
