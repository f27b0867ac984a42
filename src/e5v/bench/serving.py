"""``e5v bench-serve``: what batching across requests buys, over loopback, in one run.

On one checkpoint and one list of texts: in-process, ``N`` single-text calls against one
call of the ``N`` texts (the gain batching can give); ``e5v serve`` in two subprocesses,
with cross-request batching and with ``--no-batching``, under 1, 8 and ``N`` concurrent
single-text clients (throughput, p50 and p99 latency); and one request of the ``N`` texts
against the in-process call, and against the seconds the server's own model took for it
(what HTTP, JSON, base64 and decoding cost). Each repeat
takes every measure once, in turn, so that a noisy moment of the machine hits them all.

:func:`run_soak` (``e5v bench-serve --soak SECONDS``) holds one server under a mixed load
for a while instead: ``clients`` concurrent clients, joining one by one over the first half of
the warm-up and sharing one pooled :class:`httpx.AsyncClient`, send short and long texts, batches of texts,
photos, composed and interleaved items and mixed batches (:data:`SOAK_MIX`), every answer
checked against the same request's answer alone; it reports throughput, latencies, errors by
kind and the server's resident memory over time (psutil where installed, else ``VmRSS`` from
``/proc``), and whether the run passed: no errors, and RSS grown no more than a bound after
the warm-up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import importlib.util
import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
from PIL import Image
from pydantic import BaseModel, ValidationError

from e5v.bench.fastpath import make_corpus
from e5v.core.embedder import E5VEmbedder
from e5v.core.inputs import Composed
from e5v.errors import ConfigurationError, E5VError, MissingDependencyError

__all__ = [
    "SOAK_MIX",
    "LatencyStats",
    "RssSample",
    "ServeBenchReport",
    "ServerProcess",
    "SoakReport",
    "checkpoint",
    "format_serve_report",
    "format_soak_report",
    "percentile",
    "read_answer",
    "run_serve_bench",
    "run_soak",
]

#: Concurrent single-text clients measured (the largest is the corpus size).
CONCURRENCY = (1, 8)
#: Seconds to wait for a server to load its model.
READY_TIMEOUT = 600.0
#: Seconds a server has to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 30.0


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
    with checkpoint(model, random_init, seed=seed) as model:
        corpus = [str(text) for text in make_corpus(texts, 0, 0, seed=seed)["texts"]]
        embedder = E5VEmbedder(model, device="cpu")
        embedder.embed_texts(corpus)  # warm-up
        levels = sorted({*CONCURRENCY, len(corpus)})
        times: dict[str, list[float]] = {"single": [], "batch": [], "http": [], "model": []}
        runs: dict[tuple[int, bool], list[tuple[float, list[float]]]] = {}
        with ServerProcess(model) as batched, ServerProcess(model, "--no-batching") as unbatched:
            ports = {True: batched.wait(), False: unbatched.wait()}
            for port in ports.values():
                with _client(port) as client:
                    _post(client, corpus)  # warm-up
            for _ in range(repeats):  # every measure once a repeat, so that a noisy moment hits them all
                times["single"].append(_timed(lambda: [embedder.embed_texts([text]) for text in corpus]))
                times["batch"].append(_timed(lambda: embedder.embed_texts(corpus)))
                with _client(ports[True]) as client:
                    before = _round_seconds(client)
                    times["http"].append(_timed(lambda: _post(client, corpus)))
                    times["model"].append(_round_seconds(client) - before)
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


@contextlib.contextmanager
def checkpoint(model: str | Path | None, random_init: str | None, *, seed: int = 0) -> Iterator[str | Path]:
    """``model``, or a checkpoint of the ``random_init`` preset (random weights, float32) built
    in a temporary folder that server subprocesses load too, removed on exit."""
    if random_init is None:
        if model is None:
            raise E5VError("give a model (hub id or path) or random_init")
        yield model
        return
    from e5v.testing import build_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="e5v-bench-") as folder:
        yield build_tiny_checkpoint(Path(folder, random_init), random_init, seed=seed)


def _timed(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _client(port: int, timeout: float = 300.0) -> httpx.Client:
    """An HTTP client of the server on ``port`` (one connection, kept alive)."""
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout)


def _clients(port: int, corpus: list[str], clients: int, per_client: int) -> tuple[float, list[float]]:
    """``clients`` threads, each with its own connection, sending ``per_client`` single
    texts: the seconds it took and each request's latency."""

    def client(number: int) -> list[float]:
        latencies = []
        with _client(port) as connection:
            for request in range(per_client):
                start = time.perf_counter()
                _post(connection, [corpus[(number + request * clients) % len(corpus)]])
                latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [latency for found in pool.map(client, range(clients)) for latency in found]
    return time.perf_counter() - start, latencies


def _summary(clients: int, batching: bool, measured: list[tuple[float, list[float]]]) -> ClientsResult:
    """The median run's requests per second; p50 and p99 over every request of every run."""
    rate = statistics.median(len(latencies) / elapsed for elapsed, latencies in measured)
    latencies = sorted(latency for _, found in measured for latency in found)
    return ClientsResult(
        clients, batching, rate, 1000 * statistics.median(latencies), 1000 * percentile(latencies, 0.99)
    )


def percentile(ordered: list[float], share: float) -> float:
    """The value below which ``share`` of the sorted ``ordered`` lie (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _round_seconds(client: httpx.Client) -> float:
    """The seconds the server's model has taken for all its rounds so far (``/metrics``)."""
    for line in client.get("/metrics").raise_for_status().text.splitlines():
        if line.startswith("e5v_round_duration_seconds_sum"):
            return float(line.split()[-1])
    raise E5VError("the server's /metrics has no e5v_round_duration_seconds_sum")


class _Row(BaseModel):
    index: int
    embedding: str


class _Answer(BaseModel):
    """The part of a ``/v1/embeddings`` answer (``encoding_format: base64``) the bench reads."""

    data: list[_Row]


def _post(client: httpx.Client, texts: list[str]) -> None:
    response = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
    if response.status_code != 200:
        raise E5VError(f"the server answered {response.status_code}: {response.text[:500]}")
    if isinstance(found := read_answer(response.content, len(texts), None), str):
        raise E5VError(f"the server's answer to {len(texts)} texts: {found}")


class ServerProcess:
    """``e5v serve`` in a subprocess (a session of its own) on a free loopback port, started
    on entry, stopped on exit (SIGTERM, then after ``stop_timeout`` seconds SIGKILL to its
    whole process group, so nothing it started is left); its log goes to a temporary file,
    quoted when it exits early. ``options`` follow the model, port and device options."""

    def __init__(
        self,
        model: str | Path,
        *options: str,
        device: str = "cpu",
        ready_timeout: float = READY_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        command = [sys.executable, "-m", "e5v", "serve", "--model", str(model), "--port", str(self.port), "-q"]
        self.command = [*command, "--device", device, "--max-client-batch-size", "4096", *options]
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout

    def __enter__(self) -> ServerProcess:
        # a file, not a pipe: a full pipe would stall the server; closed on exit
        self.log: IO[bytes] = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait(self) -> int:
        """The port, once the server is ready."""
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=1).status_code == 200:
                    return self.port
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise E5VError(f"the server was not ready in {self.ready_timeout:g} s: {' '.join(self.command)}")

    def exited(self) -> str | None:
        """None while the server runs, else what it said before it exited."""
        if self.process.poll() is None:
            return None
        self.log.seek(0)
        tail = self.log.read()[-2000:].decode(errors="replace").strip()
        return f"the server exited with status {self.process.returncode}: {' '.join(self.command)}\n{tail}"

    def check(self) -> None:
        """Raise if the server has exited."""
        if (exited := self.exited()) is not None:
            raise E5VError(exited)

    def __exit__(self, *_exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


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


# -- soak -----------------------------------------------------------------------------

#: One cycle of each soak client's request types: a single text of one sentence (5-60 words), a
#: long text of SOAK_LONG sentences, batches of 2-8 texts, a photo, a composed query (a photo
#: and an edit), an interleaved item (a photo and a caption, one vector) and a mixed batch (two
#: texts, a photo, a composed query), in these proportions; each client walks the same seeded
#: shuffle of the cycle from its own offset.
SOAK_MIX = {"text": 6, "long": 2, "texts": 4, "image": 3, "composed": 2, "interleaved": 2, "mixed": 1}
#: Sentences of a long text, at least and at most (about 150 to 1,400 words).
SOAK_LONG = (5, 40)
#: Request bodies of each type the soak cycles through (photos alternate JPEG and PNG data URIs).
SOAK_POOL = 8
#: Largest difference from the same request's answer alone that is still the same answer.
SOAK_ATOL = 1e-4
#: The longest default warm-up (else a third of the soak), seconds.
SOAK_MAX_WARMUP = 120.0
#: How far from 1 a vector's norm may be.
NORM_TOLERANCE = 1e-3


@dataclass
class LatencyStats:
    """Correctly answered requests of one type (or all): how many, their items, p50 and p99 (ms)."""

    requests: int
    items: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class RssSample:
    """The server's resident memory (MiB) ``t_s`` seconds into the load, the requests
    answered by then, and the clients that had joined."""

    t_s: float
    rss_mib: float
    requests: int
    clients: int


@dataclass
class SoakReport:
    """A soak's figures: latencies of the correctly answered requests, overall and by type of
    :data:`SOAK_MIX`; errors by kind (``HTTP 429``, ``timeout``, a wrong answer, ...); the
    server's resident memory every ``sample_every_s`` seconds."""

    model: str
    seconds: float
    clients: int
    warmup_s: float
    sample_every_s: float
    request_timeout_s: float
    max_rss_growth_pct: float
    mix: dict[str, int] = field(default_factory=lambda: dict(SOAK_MIX))
    elapsed_s: float = 0.0
    latency: LatencyStats = field(default_factory=lambda: LatencyStats(0, 0, None, None))
    by_type: dict[str, LatencyStats] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    rss: list[RssSample] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.latency.requests / self.elapsed_s

    @property
    def items_per_s(self) -> float:
        return self.latency.items / self.elapsed_s

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rss_start_mib(self) -> float:
        """When the load began (the model loaded, every request answered once alone)."""
        return self.rss[0].rss_mib

    @property
    def rss_warm_mib(self) -> float:
        """At the end of the warm-up, half of it at full load: what growth counts from."""
        return next(sample.rss_mib for sample in self.rss if sample.t_s >= self.warmup_s)

    @property
    def rss_end_mib(self) -> float:
        return self.rss[-1].rss_mib

    @property
    def rss_max_mib(self) -> float:
        return max(sample.rss_mib for sample in self.rss)

    @property
    def rss_growth_mib(self) -> float:
        """From the end of the warm-up to the end."""
        return self.rss_end_mib - self.rss_warm_mib

    @property
    def rss_growth_pct(self) -> float:
        return 100 * self.rss_growth_mib / self.rss_warm_mib

    @property
    def flags(self) -> list[str]:
        """Why the run failed: errors, or resident memory that grew past the threshold after the warm-up."""
        flags = []
        if self.error_count:
            flags.append(f"{self.error_count} errors")
        if self.rss_growth_pct > self.max_rss_growth_pct:
            flags.append(
                f"the server's RSS grew {self.rss_growth_pct:.1f}% after the warm-up "
                f"(more than --max-rss-growth {self.max_rss_growth_pct:g}%)"
            )
        return flags

    @property
    def passed(self) -> bool:
        """No errors, and resident memory flat after the warm-up (:attr:`flags` is empty)."""
        return not self.flags

    def to_dict(self) -> dict[str, Any]:
        figures = ("requests_per_s", "items_per_s", "error_count", "rss_start_mib", "rss_warm_mib", "rss_end_mib")
        figures += ("rss_max_mib", "rss_growth_mib", "rss_growth_pct", "flags", "passed")
        return {**asdict(self), **{name: getattr(self, name) for name in figures}}


@dataclass(frozen=True)
class _Body:
    kind: str
    content: bytes
    rows: int


@dataclass(frozen=True)
class _Record:
    kind: str
    rows: int
    seconds: float
    error: str | None


def run_soak(
    model: str | Path | None = None,
    *,
    random_init: str | None = None,
    seconds: float,
    clients: int = 64,
    sample_every: float = 5.0,
    warmup: float | None = None,
    request_timeout: float = 60.0,
    max_rss_growth: float = 10.0,
    seed: int = 0,
) -> SoakReport:
    """Hold ``e5v serve`` (a subprocess on a free loopback port, the bench's model options)
    under the mixed load of :data:`SOAK_MIX` for ``seconds``. The ``clients`` join one by one,
    evenly over the first half of ``warmup`` (a third of ``seconds``, at most 120 s); the
    second half is at full load, and resident memory's growth is counted from its end (the
    server's allocator keeps its high-water mark, which the first rounds at full load raise).

    Each request body is first sent alone, and its answer kept; under load every answer must
    have one row an item, in order, of the same dimension, finite, of unit norm and within
    :data:`SOAK_ATOL` of that answer, or it counts as an error. A request that takes longer
    than ``request_timeout`` counts as a timeout. No request starts after the deadline.
    """
    warmup = min(SOAK_MAX_WARMUP, seconds / 3) if warmup is None else warmup
    if not 0 <= warmup < seconds:
        raise ConfigurationError(f"the warm-up ({warmup:g} s) must be shorter than the soak ({seconds:g} s)")
    if importlib.util.find_spec("psutil") is None and not Path("/proc/self/status").exists():
        raise MissingDependencyError(
            "the soak reads the server's resident memory with psutil or from /proc (Linux): pip install psutil"
        )
    with checkpoint(model, random_init, seed=seed) as model, ServerProcess(model) as server:
        bodies = _soak_bodies(seed)  # while the server loads
        port = server.wait()
        references = _references(port, bodies, server)
        schedule = [kind for kind, count in SOAK_MIX.items() for _ in range(count)]
        np.random.default_rng(seed).shuffle(schedule)
        load = _Load(port, server, bodies, references, schedule, clients, request_timeout)
        samples = sorted({*(k * sample_every for k in range(math.ceil(seconds / sample_every))), warmup})
        records, rss, elapsed = asyncio.run(load.run(seconds, warmup, samples))
    report = SoakReport(
        model=str(model),
        seconds=seconds,
        clients=clients,
        warmup_s=warmup,
        sample_every_s=sample_every,
        request_timeout_s=request_timeout,
        max_rss_growth_pct=max_rss_growth,
        elapsed_s=elapsed,
        rss=rss,
    )
    answered = [record for record in records if record.error is None]
    report.latency = _latency(answered)
    report.by_type = {kind: _latency([r for r in answered if r.kind == kind]) for kind in SOAK_MIX}
    for record in records:
        if record.error is not None:
            report.errors[record.error] = report.errors.get(record.error, 0) + 1
    return report


def _latency(records: list[_Record]) -> LatencyStats:
    ordered = sorted(1000 * record.seconds for record in records)
    if not ordered:
        return LatencyStats(0, 0, None, None)
    return LatencyStats(
        len(ordered), sum(r.rows for r in records), statistics.median(ordered), percentile(ordered, 0.99)
    )


def _soak_bodies(seed: int) -> dict[str, list[_Body]]:
    """:data:`SOAK_POOL` request bodies of each type of :data:`SOAK_MIX`, from the bench's corpus."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 9, size=SOAK_POOL)
    lengths = rng.integers(SOAK_LONG[0], SOAK_LONG[1] + 1, size=SOAK_POOL)
    corpus = make_corpus(12 * SOAK_POOL + int(lengths.sum()), 3 * SOAK_POOL, 6 * SOAK_POOL, seed=seed)
    texts = iter(corpus["texts"])
    photos = iter(enumerate(corpus["images"]))
    composed = iter(item for item in corpus["mixed"] if isinstance(item, Composed))

    def image() -> dict[str, Any]:
        number, photo = next(photos)
        return {"type": "image_url", "image_url": {"url": _data_uri(photo, number)}}

    def edit() -> dict[str, Any]:
        query = next(composed)
        return {"type": "composed", "image_url": {"url": _data_uri(query.image, 1)}, "text": query.text}

    makers: dict[str, Callable[[int], list[Any] | str]] = {
        "text": lambda _: next(texts),
        "long": lambda number: " ".join(next(texts) for _ in range(int(lengths[number]))),
        "texts": lambda number: [next(texts) for _ in range(int(sizes[number]))],
        "image": lambda _: [image()],
        "composed": lambda _: [edit()],
        "interleaved": lambda _: [[image(), {"type": "text", "text": next(texts)}]],
        "mixed": lambda _: [next(texts), {"type": "text", "text": next(texts)}, image(), edit()],
    }
    bodies: dict[str, list[_Body]] = {}
    for kind, make in makers.items():
        for number in range(SOAK_POOL):
            items = make(number)
            content = json.dumps({"input": items, "encoding_format": "base64"}).encode()
            bodies.setdefault(kind, []).append(_Body(kind, content, 1 if isinstance(items, str) else len(items)))
    return bodies


def _data_uri(photo: Image.Image, number: int) -> str:
    """The photo as a JPEG (even ``number``) or PNG (odd) data URI."""
    form = ("jpeg", "png")[number % 2]
    buffer = io.BytesIO()
    photo.save(buffer, form)
    return f"data:image/{form};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def read_answer(content: bytes, rows: int, dimension: int | None) -> np.ndarray | str:
    """The vectors of a ``/v1/embeddings`` answer (``encoding_format: base64``) of ``rows``
    items, in order, finite and of unit norm (and of ``dimension``, if given), or the kind of
    error it is."""
    try:
        answer = _Answer.model_validate_json(content)
    except ValidationError:
        return "an answer not in the API's shape"
    if len(answer.data) != rows:
        return "wrong row count"
    if [row.index for row in answer.data] != list(range(rows)):
        return "wrong indices"
    try:
        raw = [base64.b64decode(row.embedding, validate=True) for row in answer.data]
    except binascii.Error:
        return "an embedding not in base64"
    dimension = dimension or len(raw[0]) // 4
    if any(len(row) != 4 * dimension for row in raw):
        return "wrong dimension"
    vectors = np.stack([np.frombuffer(row, dtype="<f4") for row in raw])
    if not np.isfinite(vectors).all():
        return "vectors not finite"
    if np.abs(np.linalg.norm(vectors, axis=1) - 1).max() > NORM_TOLERANCE:
        return "vectors not of unit norm"
    return vectors


def _references(port: int, bodies: dict[str, list[_Body]], server: ServerProcess) -> dict[bytes, np.ndarray]:
    """Each body's answer when it is the only request (which also warms the server up)."""
    references: dict[bytes, np.ndarray] = {}
    dimension = None
    with _client(port) as client:
        for pool in bodies.values():
            for body in pool:
                response = client.post("/v1/embeddings", content=body.content, headers=_JSON)
                server.check()
                if response.status_code != 200:
                    raise E5VError(
                        f"a {body.kind} request alone: the server answered {response.status_code}: "
                        f"{response.text[:500]}"
                    )
                found = read_answer(response.content, body.rows, dimension)
                if isinstance(found, str):
                    raise E5VError(f"a {body.kind} request alone: {found}")
                references[body.content] = found
                dimension = found.shape[1]
    return references


_JSON = {"Content-Type": "application/json"}


class _Load:
    """The soak's clients on one pooled HTTP client, and the sampler of the server's memory."""

    def __init__(
        self,
        port: int,
        server: ServerProcess,
        bodies: dict[str, list[_Body]],
        references: dict[bytes, np.ndarray],
        schedule: list[str],
        clients: int,
        timeout: float,
    ) -> None:
        self.port, self.server, self.bodies, self.references = port, server, bodies, references
        self.schedule, self.clients, self.timeout = schedule, clients, timeout
        self.dimension = next(iter(references.values())).shape[1]
        self.records: list[_Record] = []
        self.joins: list[float] = []

    async def run(
        self, seconds: float, warmup: float, samples: list[float]
    ) -> tuple[list[_Record], list[RssSample], float]:
        """Load for ``seconds``, the clients joining evenly over ``warmup / 2``, memory sampled at
        each of ``samples`` (seconds in) and at the end: the records, the samples and the
        seconds until the last request was answered. Raises :class:`~e5v.errors.E5VError`
        if the server exits."""
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        rss: list[RssSample] = []
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}", limits=limits, timeout=self.timeout, headers=_JSON
        ) as client:
            start = time.monotonic()
            self.joins = [start + warmup / 2 * number / self.clients for number in range(self.clients)]
            sampler = asyncio.create_task(self._sample(start, samples, rss))
            await asyncio.gather(
                *(self._client(client, number, self.joins[number], start + seconds) for number in range(self.clients))
            )
            elapsed = time.monotonic() - start
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        if (exited := self.server.exited()) is not None:
            raise E5VError(f"{elapsed:.0f} s into the soak, {exited}")
        rss.append(self._sample_now(start))
        return self.records, rss, elapsed

    async def _client(self, client: httpx.AsyncClient, number: int, join: float, deadline: float) -> None:
        """Client ``number``: from ``join`` until ``deadline``, one request after another."""
        await asyncio.sleep(max(0.0, join - time.monotonic()))
        cycle = len(self.schedule)
        request = number * cycle // self.clients
        while time.monotonic() < deadline and self.server.exited() is None:
            kind = self.schedule[request % cycle]
            body = self.bodies[kind][(number + request // cycle) % SOAK_POOL]
            start = time.perf_counter()
            error = await self._request(client, body)
            self.records.append(_Record(kind, body.rows, time.perf_counter() - start, error))
            request += 1

    async def _request(self, client: httpx.AsyncClient, body: _Body) -> str | None:
        """None for the right vectors, else the kind of error."""
        try:
            response = await asyncio.wait_for(client.post("/v1/embeddings", content=body.content), self.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return "timeout"
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        vectors = read_answer(response.content, body.rows, self.dimension)
        if isinstance(vectors, str):
            return vectors
        if np.abs(vectors - self.references[body.content]).max() > SOAK_ATOL:
            return "vectors unlike the same request's alone"
        return None

    async def _sample(self, start: float, samples: list[float], rss: list[RssSample]) -> None:
        for at in samples:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            if self.server.exited() is not None:
                return
            rss.append(self._sample_now(start))

    def _sample_now(self, start: float) -> RssSample:
        now = time.monotonic()
        answered = sum(record.error is None for record in self.records)
        joined = sum(join <= now for join in self.joins)
        return RssSample(round(now - start, 2), _rss_mib(self.server.process.pid), answered, joined)


def _rss_mib(pid: int) -> float:
    """The resident memory of process ``pid`` in MiB: psutil's, else ``VmRSS`` of ``/proc/PID/status``."""
    try:
        import psutil
    except ImportError:  # optional: Linux has /proc
        pass
    else:
        return float(psutil.Process(pid).memory_info().rss / 2**20)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise E5VError(f"/proc/{pid}/status has no VmRSS line")


def format_soak_report(report: SoakReport) -> str:
    """The soak's report as text, ending in its verdict: PASS or FAIL and why."""
    mix = ", ".join(f"{kind} {count}" for kind, count in report.mix.items())
    lines = [
        f"soak: model {report.model}, {report.seconds:g} s at {report.clients} clients on one pooled HTTP client, "
        f"joining over the first half of the {report.warmup_s:g} s warm-up (load ended {report.elapsed_s:.1f} s in), "
        f"request timeout {report.request_timeout_s:g} s",
        f"mix, requests of a cycle of {sum(report.mix.values())}: {mix}",
        f"answered {report.latency.requests} requests ({report.requests_per_s:.2f}/s), "
        f"{report.latency.items} items ({report.items_per_s:.2f}/s); errors: "
        + (", ".join(f"{kind} {count}" for kind, count in sorted(report.errors.items())) or "none"),
        "",
        "type          requests  items  p50 ms  p99 ms",
    ]
    for kind, stats in [("all", report.latency), *report.by_type.items()]:
        p50, p99 = (f"{value:.1f}" if value is not None else "-" for value in (stats.p50_ms, stats.p99_ms))
        lines.append(f"{kind:<12}  {stats.requests:>8}  {stats.items:>5}  {p50:>6}  {p99:>6}")
    lines += ["", "the server's resident memory:", "   t s   RSS MiB  answered  clients"]
    lines += [
        f"{sample.t_s:>6.1f}  {sample.rss_mib:>8.1f}  {sample.requests:>8}  {sample.clients:>7}"
        for sample in report.rss
    ]
    lines += [
        f"RSS MiB: start {report.rss_start_mib:.1f}, after the {report.warmup_s:g} s warm-up "
        f"{report.rss_warm_mib:.1f}, end {report.rss_end_mib:.1f}, max {report.rss_max_mib:.1f}; growth after "
        f"the warm-up {report.rss_growth_mib:+.1f} MiB ({report.rss_growth_pct:+.1f}%, bound "
        f"{report.max_rss_growth_pct:g}%)",
        "FAIL: " + "; ".join(report.flags)
        if report.flags
        else f"PASS: no errors, RSS growth after the warm-up within {report.max_rss_growth_pct:g}%",
    ]
    return "\n".join(lines)
