"""`charlm serve`'s OpenAI-compatible routes (/v1/completions, /v1/models) and what keeps the server
safe to leave running (Host, Origin, content type, API key, slow clients, paths). In-process through
Starlette's TestClient where a socket adds nothing; the official `openai` client against a real
server, and the slow-client classes through real sockets, are marked `server` (slow too)."""
from __future__ import annotations

import json
import socket
import time

import pytest
from typer.testing import CliRunner

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")  # Starlette's TestClient

from starlette.testclient import TestClient  # noqa: E402

import charlm  # noqa: E402
from charlm.cli import app  # noqa: E402
from charlm.serve import ServeLimits, allowed_hosts_for, make_app  # noqa: E402
from charlm.serve.openai import Choice  # noqa: E402
from charlm.serve.requests import check_prime, pieces_of  # noqa: E402
from charlm.serve.security import quiet_accept_errors  # noqa: E402

runner = CliRunner()
BASE = "http://127.0.0.1:8000"
LIMITS = ServeLimits(max_length=400, max_samples=4, max_tokens=500, max_body_bytes=20_000)


@pytest.fixture(scope="module")
def lm(trained_run):
    return charlm.load(trained_run)


@pytest.fixture(scope="module")
def model_id(trained_run):
    return trained_run.name


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(make_app(lm, LIMITS), base_url=BASE) as running:
        yield running


def sse(text: str) -> list:
    """The data of each event; "[DONE]" as a string."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def joined(chunks: list) -> tuple[dict[int, str], dict[int, str]]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    return texts, finish


def is_openai_error(body: dict, status: int) -> bool:
    error = body.get("error")
    return (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and "\n" not in error["message"]
            and error["type"] == ("server_error" if status >= 500 else "rate_limit_error" if status == 429
                                  else "invalid_request_error"))


# ── completions against the Python API ─────────────────────────────────────────────────────────

COMPLETIONS = [
    {"prompt": "First", "max_tokens": 40, "seed": 3},
    {"prompt": "", "max_tokens": 30, "seed": 0, "temperature": 0},
    {"prompt": "Sp", "max_tokens": 25, "seed": 7, "top_p": 0.9, "temperature": 1.2, "n": 3},
    {"prompt": ["First", "Sec"], "max_tokens": 20, "seed": 5, "n": 2},
]


@pytest.mark.parametrize("options", COMPLETIONS, ids=lambda o: ",".join(o))
def test_a_completion_is_the_python_api_samples_streamed_or_not(client, lm, model_id, options):
    body = {"model": model_id, **options}
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    prompts = options["prompt"] if isinstance(options["prompt"], list) else [options["prompt"]]
    n = options.get("n", 1)
    expected = []
    for prompt in prompts:  # each prompt from the same seed, its n choices one batch
        expected += lm.samples(prompt, num_samples=n, length=options["max_tokens"], seed=options["seed"],
                               temperature=options.get("temperature", 1.0), top_p=options.get("top_p"))
    assert data["object"] == "text_completion" and data["model"] == model_id and data["id"].startswith("cmpl-")
    assert [c["text"] for c in data["choices"]] == expected
    assert [c["index"] for c in data["choices"]] == list(range(len(expected)))
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in data["choices"])
    prompt_tokens = sum(len(lm.tokenizer.encode(p)) for p in prompts)
    assert data["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": options["max_tokens"] * len(expected),
                             "total_tokens": prompt_tokens + options["max_tokens"] * len(expected)}

    streamed = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    chunks = sse(streamed.text)
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"] == data["usage"]
    texts, finish = joined(chunks[:-1])
    assert [texts[i] for i in range(len(expected))] == expected
    assert finish == {i: "length" for i in range(len(expected))}
    assert all(chunk["usage"] is None for chunk in chunks[:-2])  # include_usage: null on the others


def test_stop_strings_end_a_choice_before_them(client, lm, model_id):
    full = "".join(lm.generate("First", length=200, seed=11, temperature=1.0))
    stops = [full[30:33], full[12:14]]  # the second occurs first
    cut = min(full.find(stop) for stop in stops)
    body = {"model": model_id, "prompt": "First", "max_tokens": 200, "seed": 11, "stop": stops, "logprobs": 1}
    data = client.post("/v1/completions", json=body).json()
    choice = data["choices"][0]
    assert choice["text"] == full[:cut] and choice["finish_reason"] == "stop"
    assert "".join(choice["logprobs"]["tokens"]) == full[:cut]
    assert data["usage"]["completion_tokens"] == cut + len(full[cut:].split(stops[1])[0]) + len(stops[1])
    texts, finish = joined(sse(client.post("/v1/completions", json={**body, "stream": True}).text))
    assert texts == {0: full[:cut]} and finish == {0: "stop"}
    one = client.post("/v1/completions", json={**body, "stop": "\n", "logprobs": None}).json()["choices"][0]
    assert one["text"] == full.split("\n")[0] and one["finish_reason"] == ("stop" if "\n" in full else "length")


def test_a_stop_string_held_back_is_released_when_it_does_not_complete():
    choice = Choice(0, ("abc", "xy"), 5)
    assert choice.push("q", -1.0, {}) == ("q", [["q", -1.0, {}, 5]])
    assert choice.push("a", -2.0, {}) == ("", [])  # may be the start of "abc"
    assert choice.push("b", -3.0, {}) == ("", [])
    assert choice.push("z", -4.0, {}) == ("abz", [["a", -2.0, {}, 6], ["b", -3.0, {}, 7], ["z", -4.0, {}, 8]])
    text, tokens = choice.push("xy!", -5.0, {})  # a token the stop begins inside: cut there
    assert (text, tokens, choice.finish) == ("", [], "stop")
    choice = Choice(0, ("xy",), 0)
    assert choice.push("ax", -1.0, None) == ("", [])
    assert choice.end() == ("ax", [["ax", -1.0, None, 0]]) and choice.finish == "length"


def test_generated_logprobs_are_the_models_own(client, lm, model_id):
    body = {"model": model_id, "prompt": "First C", "max_tokens": 30, "seed": 2, "logprobs": 3, "temperature": 1.0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(30)]
    # The reference: the whole text read in one pass (nn.LSTM), each piece's log-probability.
    pieces = lm.logprobs("First C" + choice["text"], top=3, from_line_start=False)[len("First C"):]
    assert [p.text for p in pieces] == logprobs["tokens"]
    assert logprobs["token_logprobs"] == pytest.approx([p.logprob for p in pieces], abs=1e-4)
    for top, piece in zip(logprobs["top_logprobs"], pieces):
        assert list(top) == [t for t, _ in piece.top] and list(top.values()) == pytest.approx(
            [v for _, v in piece.top], abs=1e-4)
    streamed = sse(client.post("/v1/completions", json={**body, "stream": True}).text)
    tokens = [t for c in streamed[:-1] for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert tokens == logprobs["tokens"]


def test_echo_scores_the_prompt_as_lm_logprobs(client, lm, model_id):
    text = "First Citizen:\nBefore we proceed"
    body = {"model": model_id, "prompt": [text, "Sp"], "max_tokens": 0, "echo": True, "logprobs": 2}
    data = client.post("/v1/completions", json=body).json()
    for choice, prompt in zip(data["choices"], [text, "Sp"]):
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        want = lm.logprobs(prompt, top=2, from_line_start=False)
        got = choice["logprobs"]
        assert got["tokens"] == [p.text for p in want] and got["token_logprobs"][0] is None
        assert got["top_logprobs"][0] is None and got["text_offset"] == list(range(len(prompt)))
        assert got["token_logprobs"][1:] == pytest.approx([p.logprob for p in want[1:]], abs=1e-6)
    assert data["usage"]["completion_tokens"] == 0
    # echo with generation: the prompt's pieces, then the generated ones, offsets running on
    both = client.post("/v1/completions", json={**body, "prompt": "Sp", "max_tokens": 5, "seed": 1}).json()
    choice = both["choices"][0]
    assert choice["text"].startswith("Sp") and len(choice["logprobs"]["tokens"]) == 7
    assert choice["logprobs"]["text_offset"] == list(range(7))


def test_the_model_is_listed_and_checked(client, model_id):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [model_id]
    assert client.get(f"/v1/models/{model_id}").json()["id"] == model_id
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and is_openai_error(missing.json(), 404)
    wrong = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
    assert model_id in wrong.json()["error"]["message"]


REFUSED = [
    ({"suffix": "end"}, "suffix"), ({"best_of": 2}, "best_of"), ({"best_of": True}, "best_of"),
    ({"temperature": 10**400}, "temperature"), ({"top_p": -10**400}, "top_p"), ({"presence_penalty": False}, "presence_penalty"), ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": 5}, "prompt"),
    ({"prompt": ["a"] * 5}, "prompt"), ({"n": 0}, "n"), ({"n": 5}, "n"), ({"max_tokens": 401}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"), ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"), ({"temperature": 2.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"),
    ({"stop": [1]}, "stop"), ({"seed": -1}, "seed"), ({"stream": "yes"}, "stream"), ({"echo": 1}, "echo"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"user": 5}, "user"),
    ({"max_token": 5}, "max_token"), ({"model": None}, "model"), ({"prompt": "✓☃"}, "prompt"),
    ({"prompt": "a" * 501, "max_tokens": 0}, "prompt"),
]


@pytest.mark.parametrize("fields,param", REFUSED, ids=[p for _, p in REFUSED])
def test_what_cannot_be_honoured_is_refused_in_openais_shape(client, model_id, fields, param):
    answer = client.post("/v1/completions", json={"model": model_id, "prompt": "F", "max_tokens": 3, **fields})
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert is_openai_error(body, 400) and body["error"]["param"] == param, body


@pytest.mark.parametrize("fields", [{"best_of": 1}, {"logit_bias": {}}, {"presence_penalty": 0},
                                    {"frequency_penalty": 0.0}, {"user": "me"}, {"suffix": None},
                                    {"max_tokens": None}, {"logprobs": None}, {"stop": None}])
def test_no_op_values_of_those_fields_are_accepted(client, model_id, fields):
    answer = client.post("/v1/completions", json={"model": model_id, "prompt": "F", "seed": 1, **fields})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens


@pytest.mark.parametrize("raw,status", [(b"{", 400), (b"[1]", 400), (b'{"a": 1, "a": 2}', 400), (b"x" * 30000, 413)])
def test_bad_bodies_and_unknown_routes_answer_in_openais_shape(client, raw, status):
    answer = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == status and is_openai_error(answer.json(), status)
    for method, path, code in [("GET", "/v1/completions", 405), ("GET", "/v1/models/a/b/c", 404)]:
        got = client.request(method, path)
        assert got.status_code == code and is_openai_error(got.json(), code), got.text


# ── safe to leave running ───────────────────────────────────────────────────────────────────────

POSTS = [("/v1/completions", {"model": "?", "prompt": "F"}), ("/v1/generate", {"length": 2}),
         ("/v1/score", {"lines": ["a"]}), ("/v1/perplexity", {"text": "abc"})]


@pytest.mark.parametrize("path,body", POSTS, ids=[p for p, _ in POSTS])
@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_posts_a_web_page_can_send_without_a_preflight_do_not_run(client, path, body, media):
    headers = {"content-type": media} if media else {}
    answer = client.post(path, content=json.dumps(body).encode(), headers=headers)
    assert answer.status_code == 415 and "application/json" in answer.text
    assert client.get("/healthz").json()["busy"] == 0


@pytest.mark.parametrize("headers", [{"origin": "http://evil.example"}, {"origin": "null"},
                                     {"origin": "http://127.0.0.1:9999"}, {"origin": "https://127.0.0.1:8000"},
                                     {"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"}])
def test_requests_from_another_web_site_are_refused_get_or_post(client, model_id, headers):
    for method, path, body in [("POST", "/v1/generate", {"length": 2}), ("GET", "/v1/models", None),
                               ("GET", "/v1/model", None), ("GET", "/healthz", None),
                               ("POST", "/v1/completions", {"model": model_id, "prompt": "F"})]:
        answer = client.request(method, path, json=body, headers=headers)
        assert answer.status_code == 403, (path, answer.text)
    assert client.get("/", headers=headers).status_code == 200  # the page itself may be opened from a link


def test_the_servers_own_page_may_call_it(client):
    same = {"origin": BASE, "sec-fetch-site": "same-origin"}
    assert client.post("/v1/generate", json={"length": 2, "seed": 1}, headers=same).status_code == 200
    assert client.get("/v1/model", headers={"sec-fetch-site": "none"}).status_code == 200


def test_an_api_key_guards_every_v1_route(lm, model_id):
    with TestClient(make_app(lm, LIMITS, api_key="s3cret"), base_url=BASE) as keyed:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                        {"authorization": "Basic s3cret"}):
            answer = keyed.post("/v1/completions", json={"model": model_id, "prompt": "F"}, headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
            assert keyed.get("/v1/models", headers=headers).status_code == 401
            native = keyed.post("/v1/generate", json={"length": 2}, headers=headers)
            assert native.status_code == 401 and native.json()["status"] == 401
        good = {"authorization": "Bearer s3cret"}
        assert keyed.post("/v1/completions", json={"model": model_id, "prompt": "F", "max_tokens": 2},
                          headers=good).status_code == 200
        assert keyed.get("/v1/model", headers=good).status_code == 200
        assert keyed.get("/healthz").status_code == 200 and keyed.get("/").status_code == 200


def test_an_empty_api_key_is_refused(lm):
    from charlm.errors import UsageError

    with pytest.raises(UsageError, match="--api-key"):
        make_app(lm, LIMITS, api_key=" ")


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.168.1.5"])
def test_the_host_check_stays_beyond_loopback(lm, bind):
    policy = allowed_hosts_for(bind, None, ("box.lan",))
    with TestClient(make_app(lm, LIMITS, allowed_hosts=policy), base_url=BASE) as wide:
        for host, status in [("evil.example", 421), ("evil.example:8000", 421), ("box.lan:8000", 200),
                             ("192.168.1.5:8000", 200), ("[fe80::1]:8000", 200), ("localhost:8000", 200)]:
            answer = wide.get("/healthz", headers={"host": host})
            assert answer.status_code == status, (host, answer.text)
        assert "--allow-host" in wide.get("/healthz", headers={"host": "evil.example"}).json()["error"]


def test_listening_beyond_loopback_needs_a_key_or_an_explicit_flag(trained_run):
    result = runner.invoke(app, ["serve", str(trained_run), "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2 and "--api-key" in result.output and "--unauthenticated" in result.output
    assert "Traceback" not in result.output


def test_model_routes_reveal_no_path_of_the_machine(client, trained_run):
    for path in ("/v1/model", "/v1/models", f"/v1/models/{trained_run.name}"):
        text = client.get(path).text
        assert str(trained_run.parent) not in text and '"/' not in text, text
    assert client.get("/v1/model").json()["checkpoint"] == f"{trained_run.name}/best.safetensors"


def test_running_out_of_file_descriptors_is_one_line_a_minute():
    lines: list[str] = []
    handle = quiet_accept_errors(lines.append, every=60)
    context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
    for _ in range(50):
        handle(None, context)
    assert len(lines) == 1 and "Too many open files" in lines[0] and "\n" not in lines[0]


def test_scoring_is_bounded_and_its_tokenizing_stops_when_asked(client, lm):
    text = ("word " * 50 + "\n") * 2000
    pieces = pieces_of(text, size=1000)
    assert "".join(pieces) == text and len(pieces) > 50 and all(p.endswith("\n") for p in pieces)
    answer = client.post("/v1/perplexity", json={"text": "ab" * 300})
    assert answer.status_code == 422 and "--max-tokens" in answer.json()["error"]


# ── a real server, the official client ──────────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def real_server(trained_run):
    from serving import Server

    running = Server(trained_run, "--max-length", "400", "--max-samples", "4", "--max-tokens", "500")
    yield running
    assert running.stop() == 0, "".join(running.log)
    assert "Traceback" not in "".join(running.log) and "never retrieved" not in "".join(running.log), \
        "".join(running.log)


def openai_client(port: int, key: str = "unused"):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.server
def test_the_openai_client_completes_streams_and_draws_n(real_server, lm, model_id):
    client = openai_client(real_server.port)
    assert [m.id for m in client.models.list().data] == [model_id]
    done = client.completions.create(model=model_id, prompt="First", max_tokens=40, seed=3, temperature=0.8)
    assert done.choices[0].text == "".join(lm.generate("First", length=40, seed=3, temperature=0.8))
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 40
    pieces = list(client.completions.create(model=model_id, prompt="First", max_tokens=40, seed=3, temperature=0.8,
                                            stream=True, stream_options={"include_usage": True}))
    assert len(pieces) > 2 and "".join(c.text for p in pieces for c in p.choices) == done.choices[0].text
    assert pieces[-1].usage.total_tokens == done.usage.total_tokens
    several = client.completions.create(model=model_id, prompt="Sp", max_tokens=20, seed=4, n=3, stop=["\n\n", "zz"])
    assert [c.text for c in several.choices] == [text.split("\n\n")[0].split("zz")[0] for text in
                                                 lm.samples("Sp", num_samples=3, length=20, seed=4, temperature=1.0)]
    with_logprobs = client.completions.create(model=model_id, prompt="First", max_tokens=10, seed=3, logprobs=2)
    lp = with_logprobs.choices[0].logprobs
    assert "".join(lp.tokens) == with_logprobs.choices[0].text and all(len(top) == 2 for top in lp.top_logprobs)


@pytest.mark.server
def test_echo_scoring_through_the_client_equals_charlm_score(real_server, trained_run, lm, model_id, tmp_path):
    line = "First Citizen: you are all resolved rather to die"
    path = tmp_path / "line.txt"
    path.write_text(line + "\n", encoding="utf-8")
    cli = runner.invoke(app, ["score", str(path), "--checkpoint", str(trained_run), "--json"])
    assert cli.exit_code == 0, cli.output
    want = json.loads(cli.stdout)["lines"][0]
    # charlm score reads a line start, then predicts the line and its end: echo the same text.
    client = openai_client(real_server.port)
    got = client.completions.create(model=model_id, prompt="\n" + line + "\n", max_tokens=0, echo=True,
                                    logprobs=0).choices[0].logprobs
    assert got.token_logprobs[0] is None and len(got.tokens) == want["tokens"] + 1
    assert -sum(got.token_logprobs[1:]) == pytest.approx(want["total_nats"], abs=1e-5 * want["tokens"])
    pieces = lm.score([line], logprobs=True, top=1)[0].logprobs
    assert got.token_logprobs[1:] == pytest.approx([p.logprob for p in pieces], abs=1e-5)


@pytest.mark.server
def test_errors_reach_the_client_as_its_own_exceptions(real_server, trained_run, model_id):
    import openai

    client = openai_client(real_server.port)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="a")
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=model_id, prompt="a", best_of=2)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=model_id, prompt="a", suffix="b")
    from serving import Server

    keyed = Server(trained_run, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai_client(keyed.port, "wrong").completions.create(model=model_id, prompt="a", max_tokens=1)
        ok = openai_client(keyed.port, "s3cret").completions.create(model=model_id, prompt="a", max_tokens=3)
        assert len(ok.choices[0].text) == 3
    finally:
        assert keyed.stop() == 0


# ── slow and stuck clients, through real sockets ────────────────────────────────────────────────

@pytest.fixture(scope="module")
def strict_server(trained_run):
    from serving import Server

    running = Server(trained_run, "--client-timeout", "1", "--max-connections", "6", "--workers", "1",
                     "--max-length", "100000", "--max-samples", "16", "--max-queue", "0", "--max-tokens", "1000000")
    yield running
    assert running.stop() == 0, "".join(running.log)
    assert "Traceback" not in "".join(running.log), "".join(running.log)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (what it sent before is read and dropped)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True
    return False


@pytest.mark.server
def test_half_sent_headers_lose_their_connection(strict_server):
    silent = socket.create_connection(("127.0.0.1", strict_server.port))
    partial = socket.create_connection(("127.0.0.1", strict_server.port))
    partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the blank line
    assert _closed_within(silent, 5) and _closed_within(partial, 5)


@pytest.mark.server
def test_a_body_sent_a_byte_at_a_time_gives_its_place_back(strict_server):
    sock = socket.create_connection(("127.0.0.1", strict_server.port))
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n")
    started, answer = time.monotonic(), b""
    sock.settimeout(0.2)
    while time.monotonic() - started < 8 and b"\r\n\r\n" not in answer:
        try:
            sock.sendall(b" ")
            answer += sock.recv(4096)
        except (socket.timeout, TimeoutError):
            pass
        except (BrokenPipeError, ConnectionResetError):
            break
    assert answer.startswith(b"HTTP/1.1 408"), answer
    sock.close()


@pytest.mark.server
def test_a_client_that_never_reads_its_stream_gives_its_place_back(strict_server, model_id):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", strict_server.port))
    body = json.dumps({"model": model_id, "prompt": "F", "max_tokens": 100000, "n": 16, "stream": True,
                       "logprobs": 5, "seed": 1}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    strict_server.wait_busy()
    strict_server.wait_idle(seconds=120)  # its writes stalled: cut after --client-timeout, the work stopped
    sock.close()


@pytest.mark.server
def test_connections_beyond_the_cap_are_closed_at_once(strict_server):
    held = [socket.create_connection(("127.0.0.1", strict_server.port)) for _ in range(6)]
    extra = socket.create_connection(("127.0.0.1", strict_server.port))
    assert _closed_within(extra, 0.8)  # before --client-timeout would have closed it
    for sock in held:
        sock.close()
    time.sleep(0.3)
    assert strict_server.health()["status"] == "ok"


@pytest.mark.server
def test_a_client_gone_during_scoring_leaves_no_traceback(strict_server):
    text = "First Citizen: " * 30_000
    for path, body in [("/v1/perplexity", {"text": text}), ("/v1/score", {"lines": [text]})]:
        data = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", strict_server.port))
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(0.3)
        sock.close()
        strict_server.wait_idle()
    import gc

    gc.collect()
    time.sleep(0.5)  # the fixture checks the log


@pytest.mark.server
def test_running_out_of_file_descriptors_floods_nothing(trained_run):
    """A server whose open-files limit is low, more connections than it allows: one warning line,
    no traceback, and it serves again once they close."""
    import re
    import subprocess
    import sys

    from conftest import subprocess_env

    command = f"ulimit -n 64 && exec {sys.executable} -m charlm serve {trained_run} --port 0 --max-connections 1000"
    proc = subprocess.Popen(["bash", "-c", command], stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        line = proc.stderr.readline()
        while line and "at http://" not in line:
            line = proc.stderr.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))
        held = []
        for _ in range(80):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        time.sleep(3)  # asyncio retries the accept every second
        for sock in held:
            sock.close()
        time.sleep(1.5)
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        conn.close()
    finally:
        proc.send_signal(2)
        _, log = proc.communicate(timeout=30)
    assert "Traceback" not in log and log.count("cannot accept connections") == 1, log


def test_a_prime_is_read_off_the_event_loop_and_its_reading_stops_when_asked(client, lm):
    import threading

    from charlm.errors import Cancelled

    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        check_prime("First\n" * 100, lm, LIMITS, stop)
    with pytest.raises(Exception, match="over 500 tokens"):
        check_prime(("First\n" * 20_000), lm, LIMITS, threading.Event())
    check_prime("First", lm, LIMITS, threading.Event())  # within bounds: nothing to say
    answer = client.post("/v1/generate", json={"prime": "F" * 501, "length": 5})
    assert answer.status_code == 422 and "--max-tokens" in answer.json()["error"]
    assert client.get("/healthz").json()["busy"] == 0
