"""`charlm serve` under load: requests/s and chars/s at 1, 8 and 32 concurrent clients on loopback.

    python benchmarks/serve_load.py              # a fresh 2×512 LSTM; --workers 1, 2, 4 and --batch 64
    python benchmarks/serve_load.py --checkpoint checkpoints/tinyshakespeare --settings workers=2 batch=32

Each setting starts ``charlm serve CHECKPOINT --port 0 --workers W [--batch N]`` in its own process on
127.0.0.1, then for each endpoint (``--endpoints``: the native ``POST /v1/generate`` and OpenAI's
``POST /v1/completions``, both streaming, side by side in the same run on the same server) and each
concurrency C runs C client threads, each sending requests (``--length`` characters, temperature
0.8, seeds all different) one after another
until the level has sent ``--requests-per-client`` × C requests or ``--seconds`` have passed (both
bounds hold; every request in flight is read to its end). It reports requests/s and generated
chars/s over the level's wall time, and the median and 90th-percentile request latency and time to
the first piece. Every response is checked: a 200, the events ``start`` … ``end`` (OpenAI's: chunks,
``finish_reason`` "length", ``data: [DONE]``), and ``--length`` characters of text. Completions
run on the workers (``--batch`` batches only ``/v1/generate``). The clients run in this process on the same cores as the server (2 on the
machines we measure on), so the figures are what one machine serves to itself, a lower bound.

The default model is an untrained 2×512 char LSTM over a 65-character vocabulary (one training
step on the built-in corpus): generation speed does not depend on the weights. Results go to
benchmarks/results/serve-load-<model>.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def fresh_checkpoint(folder: Path) -> Path:
    import charlm

    run = charlm.train(None, out=str(folder / "fresh"), hidden_size=512, num_layers=2, max_steps=1,
                       device="cpu")
    return Path(run.run_dir)


def start_server(checkpoint: Path, setting: dict[str, int]) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    options = [f"--{name.replace('_', '-')}={value}" for name, value in setting.items()]
    proc = subprocess.Popen([sys.executable, "-m", "charlm", "serve", str(checkpoint), "--port", "0", *options,
                             "--max-queue", "256"], stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # type: ignore[union-attr]
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore
            return proc, int(found.group(1))
        sys.stderr.write(line)
    raise SystemExit("the server did not start")


def one_request(port: int, length: int, seed: int, endpoint: str = "generate", model: str = "") -> tuple[float, float, int]:
    """(latency, time to first piece, characters) of one streaming generation."""
    if endpoint == "completions":
        return one_completion(port, length, seed, model)
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/generate", body=json.dumps({"length": length, "seed": seed, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, chars, names = None, 0, []
    for raw in response:
        line = raw.decode("utf-8")
        if line.startswith("event: "):
            names.append(line[7:].strip())
        elif line.startswith("data: ") and '"sample"' in line:
            text = json.loads(line[6:])["text"]
            if text and first is None:
                first = time.perf_counter() - start
            chars += len(text)
    conn.close()
    if names != ["start", "end"] or chars != length:
        raise RuntimeError(f"a bad stream: events {names}, {chars} characters of {length}")
    return time.perf_counter() - start, first or 0.0, chars


def one_completion(port: int, length: int, seed: int, model: str) -> tuple[float, float, int]:
    """(latency, time to first text, characters) of one streamed OpenAI completion."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": model, "prompt": "", "max_tokens": length, "seed": seed, "temperature": 0.8, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, chars, finish, done = None, 0, None, False
    for raw in response:
        line = raw.decode("utf-8")
        if line.startswith("data: [DONE]"):
            done = True
        elif line.startswith("data: "):
            for choice in json.loads(line[6:])["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter() - start
                chars += len(choice["text"])
                finish = choice["finish_reason"] or finish
    conn.close()
    if not done or finish != "length" or chars != length:
        raise RuntimeError(f"a bad stream: [DONE] {done}, finish_reason {finish}, {chars} characters of {length}")
    return time.perf_counter() - start, first or 0.0, chars


def level(port: int, clients: int, *, length: int, per_client: int, seconds: float, seed0: int,
          endpoint: str = "generate", model: str = "") -> dict:
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(k: int) -> None:
        for i in range(per_client):
            if time.perf_counter() > deadline:
                return
            try:
                outcome = one_request(port, length, seed0 + k * per_client + i, endpoint, model)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(exc))
                return
            with lock:
                results.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    firsts = sorted(r[1] for r in results)

    def p90(values: list[float]) -> float:
        return values[min(len(values) - 1, int(0.9 * len(values)))] if values else float("nan")

    return {"clients": clients, "requests": len(results), "errors": errors[:5], "error_count": len(errors),
            "seconds": wall, "requests_per_second": len(results) / wall,
            "chars_per_second": sum(r[2] for r in results) / wall,
            "latency_median_s": statistics.median(latencies) if latencies else None,
            "latency_p90_s": p90(latencies),
            "first_piece_median_s": statistics.median(firsts) if firsts else None,
            "first_piece_p90_s": p90(firsts)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a run folder or .safetensors (default: a fresh 2×512 LSTM)")
    parser.add_argument("--settings", nargs="+", default=["workers=1", "workers=2", "workers=4", "workers=2,batch=64"],
                        help="charlm serve options per server, e.g. workers=2,batch=64")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--length", type=int, default=200, help="characters per request")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60, help="stop sending new requests after this long")
    parser.add_argument("--endpoints", nargs="+", default=["generate", "completions"],
                        choices=["generate", "completions"], help="what the clients call, each in turn")
    parser.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/serve-load-<model>.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or fresh_checkpoint(Path(tmp))
        import charlm

        lm = charlm.load(checkpoint)
        cfg = lm.checkpoint.model_config
        model = f"{cfg.num_layers}x{cfg.hidden_size}-{cfg.cell}-{lm.tokenizer.kind}{lm.tokenizer.vocab_size}"
        from charlm.serve.openai import model_id_of

        model_id = model_id_of(lm)
        runs = []
        for text in args.settings:
            setting = {name: int(value) for name, value in (part.split("=") for part in text.split(","))}
            proc, port = start_server(checkpoint, setting)
            try:
                for endpoint in args.endpoints:
                    one_request(port, 20, 0, endpoint, model_id)  # warm-up
                for clients, endpoint in [(c, e) for c in args.clients for e in args.endpoints]:
                    row = {"setting": text, "endpoint": endpoint,
                           **level(port, clients, length=args.length, per_client=args.requests_per_client,
                                   seconds=args.seconds, seed0=1000 * clients, endpoint=endpoint, model=model_id)}
                    runs.append(row)
                    print(f"{text}, /v1/{endpoint}, {clients:>2} clients: {row['requests']:>3} requests, "
                          f"{row['requests_per_second']:6.2f} req/s, {row['chars_per_second']:8.0f} chars/s, "
                          f"latency median {row['latency_median_s']:.2f} s (p90 {row['latency_p90_s']:.2f}), "
                          f"first piece median {row['first_piece_median_s']:.3f} s, errors {row['error_count']}",
                          flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    report = {
        "benchmark": "serve_load", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "torch": __import__("torch").__version__, "model": model,
        "checkpoint": "fresh (one training step)" if args.checkpoint is None else str(args.checkpoint),
        "length": args.length, "requests_per_client": args.requests_per_client, "seconds_bound": args.seconds,
        "runs": runs,
    }
    out = args.out or RESULTS / f"serve-load-{model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
