"""A `charlm serve` child process and an HTTP client for it, for the tests that need a real server."""
from __future__ import annotations

import http.client
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import subprocess_env


class Server:
    """`charlm serve CHECKPOINT --port 0 ARGS…` in a child process, and a client for it."""

    def __init__(self, checkpoint: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "charlm", "serve", str(checkpoint), "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=subprocess_env())
        self.log: list[str] = []
        lines: queue.Queue[str] = queue.Queue()

        def drain() -> None:  # keep reading, so the pipe never fills
            for line in self.proc.stderr:  # type: ignore[union-attr]
                self.log.append(line)
                lines.put(line)
            lines.put("")

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            found = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.port = int(found.group(1))
                break
            assert line and time.monotonic() < deadline, "the server did not start:\n" + "".join(self.log)

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.status, json.loads(payload)
        return response.status, payload

    def events(self, body, *, timeout: float = 300) -> list[tuple[str, dict]]:
        """POST /v1/generate with stream true; the Server-Sent Events, in order."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request("POST", "/v1/generate", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events, name, data = [], "message", []
        for line in response:
            line = line.decode("utf-8").rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line and data:
                events.append((name, json.loads("\n".join(data))))
                name, data = "message", []
        conn.close()
        return events

    def health(self) -> dict:
        status, body = self.request("GET", "/healthz")
        assert status == 200
        return body

    def wait_idle(self, seconds: float = 60) -> dict:
        deadline = time.monotonic() + seconds
        while (health := self.health())["busy"] or health["waiting"]:
            assert time.monotonic() < deadline, f"still busy after {seconds} s: {health}"
            time.sleep(0.1)
        return health

    def wait_busy(self, count: int = 1, seconds: float = 60) -> dict:
        """Until ``count`` requests are running (a request reaches its worker or the batch a
        moment after its response has started)."""
        deadline = time.monotonic() + seconds
        while (health := self.health())["busy"] < count:
            assert time.monotonic() < deadline, f"not busy after {seconds} s: {health}"
            time.sleep(0.05)
        return health

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class InProcess:
    """The app ``charlm serve CHECKPOINT`` would serve on 127.0.0.1, driven in this process through
    Starlette's TestClient, with ``Server``'s client methods: for what a real socket adds nothing to."""

    def __init__(self, lm, limits) -> None:
        from starlette.testclient import TestClient

        from charlm.serve import allowed_hosts_for, make_app

        self.log: list[str] = []
        app = make_app(lm, limits, allowed_hosts=allowed_hosts_for("127.0.0.1", "127.0.0.1"), log=self.log.append)
        self.client = TestClient(app, base_url="http://127.0.0.1:8000")
        self.client.__enter__()  # the app's lifespan: started here, its workers closed by stop()

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 120):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = self.client.request(method, path, content=data,
                                       headers={"Content-Type": "application/json", **(headers or {})})
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.status_code, response.json()
        return response.status_code, response.content

    def events(self, body, *, timeout: float = 300) -> list[tuple[str, dict]]:
        """POST /v1/generate with stream true; the Server-Sent Events, in order."""
        response = self.client.post("/v1/generate", content=json.dumps({**body, "stream": True}),
                                    headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.content
        assert response.headers["content-type"].startswith("text/event-stream")
        events = []
        for block in response.text.split("\n\n"):
            name, data = "message", []
            for line in block.split("\n"):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
            if data:
                events.append((name, json.loads("\n".join(data))))
        return events

    health = Server.health
    wait_idle = Server.wait_idle

    def stop(self) -> None:
        self.client.__exit__(None, None, None)
