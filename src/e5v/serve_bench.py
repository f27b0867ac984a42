"""``e5v bench-serve``: what batching across requests buys, over loopback, in one run.

On one checkpoint and one list of texts: in-process, ``N`` single-text calls against one
call of the ``N`` texts (the gain batching can give); ``e5v serve`` in two subprocesses,
with cross-request batching and with ``--no-batching``, under 1, 8 and ``N`` concurrent
single-text clients (throughput, p50 and p99 latency); and one request of the ``N`` texts
against the in-process call, and against the seconds the server's own model took for it
(what HTTP, JSON, base64 and decoding cost). Each repeat
takes every measure once, in turn, so that a noisy moment of the machine hits them all.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e5v.bench import make_corpus
from e5v.embedder import E5VEmbedder
from e5v.errors import E5VError

__all__ = ["ServeBenchReport", "format_serve_report", "run_serve_bench"]

#: Concurrent single-text clients measured (the largest is the corpus size).
CONCURRENCY = (1, 8)
#: Seconds to wait for a server to load its model.
READY_TIMEOUT = 600.0


@dataclass
class ClientsResult:
    """``clients`` concurrent single-text clients: requests per second and latencies (ms)."""

    clients: int
    batching: bool
    requests_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass
class ServeBenchReport:
    model: str
    texts: int
    repeats: int
    in_process_single_s: float = 0.0
    in_process_batch_s: float = 0.0
    http_batch_s: float = 0.0
    http_model_s: float = 0.0
    clients: list[ClientsResult] = field(default_factory=list)

    @property
    def in_process_gain(self) -> float:
        """One call of the texts against one call per text, in process."""
        return self.in_process_single_s / self.in_process_batch_s

    def server_gain(self) -> float:
        """Cross-request batching against batching off, at the most concurrent clients."""
        most = max(result.clients for result in self.clients)
        on, off = (
            next(r for r in self.clients if r.clients == most and r.batching is batching) for batching in (True, False)
        )
        return on.requests_per_s / off.requests_per_s

    @property
    def http_ratio(self) -> float:
        """The batched request's throughput over the in-process call's."""
        return self.in_process_batch_s / self.http_batch_s

    @property
    def http_overhead(self) -> float:
        """The share of the batched request's time the server's model did not take (HTTP,
        JSON, base64, decoding), from the server's own round timings: free of the noise
        between two processes that :attr:`http_ratio` carries."""
        return 1 - self.http_model_s / self.http_batch_s

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "in_process_gain": self.in_process_gain,
            "server_gain": self.server_gain(),
            "server_gain_share": self.server_gain() / self.in_process_gain,
            "http_ratio": self.http_ratio,
            "http_overhead": self.http_overhead,
        }


def run_serve_bench(
    model: str | Path | None = None,
    *,
    random_init: str | None = None,
    texts: int = 32,
    repeats: int = 3,
    requests_per_client: int = 4,
    seed: int = 0,
) -> ServeBenchReport:
    """Measure as the module docstring says; ``random_init`` builds a preset checkpoint
    (random weights, CPU, float32) in a temporary folder that the server loads too."""
    with tempfile.TemporaryDirectory(prefix="e5v-bench-serve-") as folder:
        if random_init is not None:
            from e5v.testing import build_tiny_checkpoint

            model = build_tiny_checkpoint(Path(folder, random_init), random_init, seed=seed)
        if model is None:
            raise E5VError("give a model (hub id or path) or random_init")
        corpus = [str(text) for text in make_corpus(texts, 0, 0, seed=seed)["texts"]]
        embedder = E5VEmbedder(model, device="cpu")
        embedder.embed_texts(corpus)  # warm-up
        levels = sorted({*CONCURRENCY, len(corpus)})
        times: dict[str, list[float]] = {"single": [], "batch": [], "http": [], "model": []}
        runs: dict[tuple[int, bool], list[tuple[float, list[float]]]] = {}
        with _Server(model, True) as batched, _Server(model, False) as unbatched:
            ports = {True: batched.wait(), False: unbatched.wait()}
            for port in ports.values():
                _post(port, corpus)  # warm-up
            for _ in range(repeats):  # every measure once a repeat, so that a noisy moment hits them all
                times["single"].append(_timed(lambda: [embedder.embed_texts([text]) for text in corpus]))
                times["batch"].append(_timed(lambda: embedder.embed_texts(corpus)))
                before = _round_seconds(ports[True])
                times["http"].append(_timed(lambda: _post(ports[True], corpus)))
                times["model"].append(_round_seconds(ports[True]) - before)
                for clients in levels:
                    for batching, port in ports.items():
                        runs.setdefault((clients, batching), []).append(
                            _clients(port, corpus, clients, requests_per_client)
                        )
        report = ServeBenchReport(model=str(model), texts=len(corpus), repeats=repeats)
        report.in_process_single_s = statistics.median(times["single"])
        report.in_process_batch_s = statistics.median(times["batch"])
        report.http_batch_s = statistics.median(times["http"])
        report.http_model_s = statistics.median(times["model"])
        for (clients, batching), measured in runs.items():
            report.clients.append(_summary(clients, batching, measured))
        return report


def _timed(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _clients(port: int, corpus: list[str], clients: int, per_client: int) -> tuple[float, list[float]]:
    """``clients`` threads, each with its own connection, sending ``per_client`` single
    texts: the seconds it took and each request's latency."""

    def client(number: int) -> list[float]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        latencies = []
        for request in range(per_client):
            start = time.perf_counter()
            _post(port, [corpus[(number + request * clients) % len(corpus)]], connection)
            latencies.append(time.perf_counter() - start)
        connection.close()
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [latency for found in pool.map(client, range(clients)) for latency in found]
    return time.perf_counter() - start, latencies


def _summary(clients: int, batching: bool, measured: list[tuple[float, list[float]]]) -> ClientsResult:
    """The median run's requests per second; p50 and p99 over every request of every run."""
    rate = statistics.median(len(latencies) / elapsed for elapsed, latencies in measured)
    latencies = sorted(latency for _, found in measured for latency in found)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return ClientsResult(clients, batching, rate, 1000 * statistics.median(latencies), 1000 * p99)


def _round_seconds(port: int) -> float:
    """The seconds the server's model has taken for all its rounds so far (``/metrics``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("e5v_round_duration_seconds_sum"):
                return float(line.split()[-1])
    raise E5VError("the server's /metrics has no e5v_round_duration_seconds_sum")


def _post(port: int, texts: list[str], connection: http.client.HTTPConnection | None = None) -> np.ndarray:
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({"input": texts, "encoding_format": "base64"})
    connection.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    if own:
        connection.close()
    if response.status != 200:
        raise E5VError(f"the server answered {response.status}: {answer}")
    return np.stack([np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4") for row in answer["data"]])


class _Server:
    """``e5v serve`` in a subprocess on a free loopback port, ready on entry, stopped on exit."""

    def __init__(self, model: str | Path, batching: bool) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        command = [sys.executable, "-m", "e5v", "serve", "--model", str(model), "--port", str(self.port), "-q"]
        command += ["--device", "cpu", "--max-client-batch-size", "4096"] + ([] if batching else ["--no-batching"])
        self.command = command

    def __enter__(self) -> _Server:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def wait(self) -> int:
        """The port, once the server is ready."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise E5VError(f"the server exited with status {self.process.returncode}: {' '.join(self.command)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=1) as response:
                    if response.status == 200:
                        return self.port
            except OSError:
                time.sleep(0.2)
        raise E5VError(f"the server was not ready in {READY_TIMEOUT:.0f} s")

    def __exit__(self, *_exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def format_serve_report(report: ServeBenchReport) -> str:
    lines = [
        f"model {report.model}, {report.texts} texts, median of {report.repeats}",
        f"in process: {report.texts} single calls {report.in_process_single_s:.3f} s, one call "
        f"{report.in_process_batch_s:.3f} s: batching gains {report.in_process_gain:.2f}x",
        f"over HTTP: one request of the {report.texts} texts {report.http_batch_s:.3f} s: "
        f"{report.http_ratio:.2f}x the in-process throughput; of the request's time, the server's model took "
        f"{report.http_model_s:.3f} s: HTTP, JSON, base64 and decoding cost {report.http_overhead:.0%}",
        "",
        "clients  batching  requests/s  p50 ms  p99 ms",
    ]
    for result in report.clients:
        lines.append(
            f"{result.clients:>7}  {'on' if result.batching else 'off':>8}  {result.requests_per_s:>10.1f}  "
            f"{result.p50_ms:>6.1f}  {result.p99_ms:>6.1f}"
        )
    gain = report.server_gain()
    lines += [
        "",
        f"{max(r.clients for r in report.clients)} concurrent clients: batching across requests gains {gain:.2f}x, "
        f"{gain / report.in_process_gain:.0%} of the in-process gain",
    ]
    return "\n".join(lines)
