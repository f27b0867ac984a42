"""``e5v bench-serve --replicas``: what Ray Serve replicas of ``e5v serve`` buy, over loopback, in one run.

On one checkpoint and one list of single texts, four servers in turn, each an ``e5v serve``
subprocess on its own free loopback port, ready (``/ready``, within ``ready_timeout``) before
it is loaded and stopped before the next one starts:

- ``ray-1``: ``e5v serve --replicas 1 --threads 1``, one Ray Serve replica;
- ``ray-N``: ``e5v serve --replicas N --threads 1`` (``N`` is ``replicas``, 2 by default);
- ``single-N``: the single server with as many torch threads, ``e5v serve --threads N``;
- ``single-1``: the single server on one thread, the baseline for the Ray path's overhead.

Each is loaded by ``clients`` concurrent single-text clients sharing one pooled
:class:`httpx.AsyncClient`, ``requests`` requests each, after a warm-up burst (repeated for the
Ray arms until every replica has answered, so no replica is measured still loading). Every
answer must be a 200 holding one finite unit vector within :data:`ATOL` of the reference
vector of its text (the in-process embedder's, float32), or it is an error, as is a request
over ``request_timeout``. Each repeat runs the four servers once, in turn, so that a noisy
moment of the machine hits them all. It reports each server's requests per second (the median
repeat), p50 and p99 latency (over every request), errors, and for the Ray arms the requests
each replica served (the ``x-e5v-replica`` header); and the ratios ``ray-N / ray-1``
(replicas' scaling, target :data:`TARGETS`), ``ray-N / single-N`` (replicas against threads,
whichever wins) and ``ray-1`` against ``single-1`` (the Ray path's overhead, target
:data:`TARGETS`). It passes with no errors and no wrong vector; the targets are reported, not
enforced.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from e5v.bench.fastpath import make_corpus
from e5v.bench.serving import READY_TIMEOUT, STOP_TIMEOUT, ServerProcess, checkpoint, percentile, read_answer
from e5v.errors import ConfigurationError, E5VError

__all__ = ["ATOL", "TARGETS", "ArmResult", "ReplicaBenchReport", "format_replica_report", "run_replica_bench"]

#: Largest difference from the in-process reference vector of a text that is still that vector.
ATOL = 1e-4
#: The targets the report states (not enforced): ``scaling``, ``ray-N`` over ``ray-1`` with 2
#: replicas on a 2-core machine, at least; ``ray_overhead_pct``, ``ray-1`` below ``single-1`` in
#: percent, at most.
TARGETS = {"scaling": 1.6, "ray_overhead_pct": 10.0}
#: Seconds a Ray server has to drain, shut Ray Serve down and stop its cluster after SIGTERM.
RAY_STOP_TIMEOUT = 120.0
#: The answer header naming the Ray Serve replica that served a request.
REPLICA_HEADER = "x-e5v-replica"
_JSON = {"Content-Type": "application/json"}

logger = logging.getLogger(__name__)


@dataclass
class ArmResult:
    """One server's figures over every repeat: requests per second of the median repeat,
    p50 and p99 latency (ms) over every correctly answered request, errors by kind, and for a
    Ray arm the requests each replica served in each repeat (replica id: count)."""

    name: str
    command: str
    replicas: int | None
    threads: int
    requests: int = 0
    requests_per_s: float = 0.0
    repeat_requests_per_s: list[float] = field(default_factory=list)
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    served_by: list[dict[str, int]] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def replicas_served(self) -> int | None:
        """For a Ray arm, how many replicas served requests in the repeat where the fewest did."""
        return None if self.replicas is None else min((len(counts) for counts in self.served_by), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_count": self.error_count, "replicas_served": self.replicas_served}


@dataclass
class ReplicaBenchReport:
    """The four servers of the module docstring, in the order they ran each repeat."""

    model: str
    device: str
    replicas: int
    texts: int
    clients: int
    requests_per_client: int
    repeats: int
    request_timeout_s: float
    arms: list[ArmResult] = field(default_factory=list)

    def arm(self, name: str) -> ArmResult:
        return next(arm for arm in self.arms if arm.name == name)

    def _ratio(self, over: str, under: str) -> float:
        below = self.arm(under).requests_per_s
        return self.arm(over).requests_per_s / below if below else 0.0

    @property
    def scaling(self) -> float:
        """``replicas`` replicas against one: throughput ratio."""
        return self._ratio(f"ray-{self.replicas}", "ray-1")

    @property
    def versus_single(self) -> float:
        """``replicas`` one-thread replicas against one server of as many threads."""
        return self._ratio(f"ray-{self.replicas}", f"single-{self.replicas}")

    @property
    def ray_overhead_pct(self) -> float:
        """The throughput one replica loses against the single server, both on one thread, in
        percent (negative: the replica was faster)."""
        return 100 * (1 - self._ratio("ray-1", "single-1"))

    @property
    def error_count(self) -> int:
        return sum(arm.error_count for arm in self.arms)

    @property
    def flags(self) -> list[str]:
        """Why the run failed: errors or wrong vectors, by server."""
        return [
            f"{arm.name}: " + ", ".join(f"{kind} {count}" for kind, count in sorted(arm.errors.items()))
            for arm in self.arms
            if arm.errors
        ]

    @property
    def passed(self) -> bool:
        return not self.flags

    def to_dict(self) -> dict[str, Any]:
        figures = {name: getattr(self, name) for name in ("scaling", "versus_single", "ray_overhead_pct")}
        return {
            **asdict(self),
            "arms": [arm.to_dict() for arm in self.arms],
            **figures,
            "targets": dict(TARGETS),
            "atol": ATOL,
            "error_count": self.error_count,
            "flags": self.flags,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class _Arm:
    name: str
    replicas: int | None
    threads: int

    def options(self, gpus_per_replica: float | None) -> list[str]:
        options = [] if self.replicas is None else ["--replicas", str(self.replicas)]
        options += ["--threads", str(self.threads)]
        if self.replicas is not None and gpus_per_replica is not None:
            options += ["--gpus-per-replica", f"{gpus_per_replica:g}"]
        return options


@dataclass(frozen=True)
class _Record:
    seconds: float
    error: str | None
    replica: str | None


def run_replica_bench(
    model: str | Path | None = None,
    *,
    random_init: str | None = None,
    replicas: int = 2,
    texts: int = 32,
    clients: int = 32,
    requests_per_client: int = 8,
    repeats: int = 3,
    device: str = "cpu",
    gpus_per_replica: float | None = None,
    request_timeout: float = 60.0,
    ready_timeout: float = READY_TIMEOUT,
    seed: int = 0,
) -> ReplicaBenchReport:
    """Measure as the module docstring says; ``random_init`` builds a preset checkpoint in a
    temporary folder that the servers load too. ``gpus_per_replica`` goes to the Ray arms
    (``e5v serve``'s own default if None). Raises :class:`~e5v.errors.E5VError` if a server
    exits or is not ready (every replica answering) within ``ready_timeout`` seconds."""
    if replicas < 2:
        raise ConfigurationError(f"`replicas` must be at least 2 to compare with one replica, got {replicas}")
    arms = [_Arm("ray-1", 1, 1), _Arm(f"ray-{replicas}", replicas, 1)]
    arms += [_Arm(f"single-{replicas}", None, replicas), _Arm("single-1", None, 1)]
    with checkpoint(model, random_init, seed=seed) as model:
        corpus = [str(text) for text in make_corpus(texts, 0, 0, seed=seed)["texts"]]
        references = _references(model, corpus, device)
        report = ReplicaBenchReport(
            str(model), device, replicas, len(corpus), clients, requests_per_client, repeats, request_timeout
        )
        runs: dict[str, list[tuple[float, list[_Record]]]] = {arm.name: [] for arm in arms}
        for repeat in range(repeats):  # every server once a repeat, so that a noisy moment hits them all
            for arm in arms:
                started = time.monotonic()
                with ServerProcess(
                    model,
                    *arm.options(gpus_per_replica),
                    "--dtype",
                    "float32",
                    device=device,
                    ready_timeout=ready_timeout,
                    stop_timeout=STOP_TIMEOUT if arm.replicas is None else RAY_STOP_TIMEOUT,
                ) as server:
                    port = server.wait()
                    ready = time.monotonic()
                    load = _Load(server, port, corpus, references, clients, request_timeout)
                    runs[arm.name].append(asyncio.run(load.run(arm.replicas, requests_per_client, ready_timeout)))
                    loaded = time.monotonic()
                logger.info(
                    "repeat %d, %s: ready in %.1f s, warm-up and load %.1f s, stopped in %.1f s",
                    repeat + 1,
                    arm.name,
                    ready - started,
                    loaded - ready,
                    time.monotonic() - loaded,
                )
        for arm in arms:
            command = " ".join(["e5v serve", *arm.options(gpus_per_replica)])
            report.arms.append(_summary(arm, command, runs[arm.name]))
    return report


def _references(model: str | Path, corpus: list[str], device: str) -> dict[bytes, np.ndarray]:
    """Each text's request body and its vector from the in-process embedder (float32), whose
    memory is given back before the servers start."""
    from e5v.core.embedder import E5VEmbedder

    embedder = E5VEmbedder(model, device=device, dtype="float32")
    vectors = embedder.embed_texts(corpus)
    del embedder
    gc.collect()
    return {_body(text): vector for text, vector in zip(corpus, vectors, strict=True)}


def _body(text: str) -> bytes:
    return json.dumps({"input": [text], "encoding_format": "base64"}).encode()


class _Load:
    """A server's clients on one pooled HTTP client, each answer checked against its reference."""

    def __init__(
        self,
        server: ServerProcess,
        port: int,
        corpus: list[str],
        references: dict[bytes, np.ndarray],
        clients: int,
        timeout: float,
    ) -> None:
        self.server, self.port, self.references = server, port, references
        self.clients, self.timeout = clients, timeout
        self.bodies = [_body(text) for text in corpus]
        self.dimension = next(iter(references.values())).shape[0]

    async def run(self, replicas: int | None, per_client: int, ready_timeout: float) -> tuple[float, list[_Record]]:
        """Once the server has warmed up (each of a Ray server's ``replicas`` has answered, within
        ``ready_timeout`` seconds), the clients' ``per_client`` requests each: the seconds they
        took and their records."""
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}", limits=limits, timeout=self.timeout, headers=_JSON
        ) as client:
            await self._warm_up(client, replicas, time.monotonic() + ready_timeout)
            start = time.perf_counter()
            found = await asyncio.gather(*(self._client(client, number, per_client) for number in range(self.clients)))
            elapsed = time.perf_counter() - start
        self.server.check()
        return elapsed, [record for records in found for record in records]

    async def _warm_up(self, client: httpx.AsyncClient, replicas: int | None, deadline: float) -> None:
        """Bursts of one correctly answered request a client: one for the single server, as
        many as it takes for each of a Ray server's ``replicas`` to answer (until ``deadline``)."""
        seen: set[str] = set()
        command = " ".join(self.server.command)
        while True:
            bursts = [self._request(client, self.bodies[number % len(self.bodies)]) for number in range(self.clients)]
            for record in await asyncio.gather(*bursts):
                if record.error is not None:
                    raise E5VError(
                        f"the server's warm-up got {record.error} (each request may take `request_timeout="
                        f"{self.timeout:g}` s): {command}"
                    )
                if replicas is not None and record.replica is None:
                    raise E5VError(f"the Ray server's answer has no {REPLICA_HEADER} header: {command}")
                seen.add(record.replica or "")
            if replicas is None or len(seen) >= replicas:
                return
            self.server.check()
            if time.monotonic() > deadline:
                raise E5VError(f"{len(seen)} of {replicas} replicas answered within the ready timeout: {command}")

    async def _client(self, client: httpx.AsyncClient, number: int, per_client: int) -> list[_Record]:
        """Client ``number``: ``per_client`` single-text requests, one after another."""
        bodies = [self.bodies[(number + k * self.clients) % len(self.bodies)] for k in range(per_client)]
        return [await self._request(client, body) for body in bodies]

    async def _request(self, client: httpx.AsyncClient, body: bytes) -> _Record:
        start = time.perf_counter()
        error, replica = await self._answer(client, body)
        return _Record(time.perf_counter() - start, error, replica)

    async def _answer(self, client: httpx.AsyncClient, body: bytes) -> tuple[str | None, str | None]:
        """None for the right vector, else the kind of error; and the replica that answered."""
        try:
            response = await asyncio.wait_for(client.post("/v1/embeddings", content=body), self.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return "timeout", None
        except httpx.HTTPError as exc:
            return type(exc).__name__, None
        replica = response.headers.get(REPLICA_HEADER)
        if response.status_code != 200:
            return f"HTTP {response.status_code}", replica
        vectors = read_answer(response.content, 1, self.dimension)
        if isinstance(vectors, str):
            return vectors, replica
        if np.abs(vectors[0] - self.references[body]).max() > ATOL:
            return "a vector unlike its text's reference", replica
        return None, replica


def _summary(arm: _Arm, command: str, runs: list[tuple[float, list[_Record]]]) -> ArmResult:
    result = ArmResult(arm.name, command, arm.replicas, arm.threads)
    result.repeat_requests_per_s = [sum(r.error is None for r in records) / elapsed for elapsed, records in runs]
    result.requests_per_s = statistics.median(result.repeat_requests_per_s)
    records = [record for _, found in runs for record in found]
    result.requests = len(records)
    latencies = sorted(1000 * record.seconds for record in records if record.error is None)
    if latencies:
        result.p50_ms, result.p99_ms = statistics.median(latencies), percentile(latencies, 0.99)
    for record in records:
        if record.error is not None:
            result.errors[record.error] = result.errors.get(record.error, 0) + 1
    if arm.replicas is not None:
        for _, found in runs:
            counts: dict[str, int] = {}
            for record in found:
                if record.replica is not None:
                    counts[record.replica] = counts.get(record.replica, 0) + 1
            result.served_by.append(dict(sorted(counts.items(), key=lambda item: -item[1])))
    return result


def format_replica_report(report: ReplicaBenchReport) -> str:
    """The report as text, ending in its verdict: PASS, or FAIL and why."""
    n = report.replicas
    lines = [
        f"replicas: model {report.model} on {report.device}, {report.texts} texts, {report.clients} concurrent "
        f"single-text clients on one pooled HTTP client, {report.requests_per_client} requests each after a "
        f"warm-up; median of {report.repeats} repeat{'s' if report.repeats > 1 else ''}, the servers in turn",
        "",
        f"{'server':<10}  {'command':<50}  requests/s  p50 ms  p99 ms  errors  requests by replica",
    ]
    for arm in report.arms:
        p50, p99 = (f"{value:.1f}" if value is not None else "-" for value in (arm.p50_ms, arm.p99_ms))
        served = "; ".join("/".join(str(count) for count in counts.values()) for counts in arm.served_by) or "-"
        lines.append(
            f"{arm.name:<10}  {arm.command:<50}  {arm.requests_per_s:>10.1f}  {p50:>6}  {p99:>6}  "
            f"{arm.error_count:>6}  {served}"
        )
    scaling, overhead = TARGETS["scaling"], TARGETS["ray_overhead_pct"]
    lines += [
        "",
        f"ray-{n} / ray-1: {n} replicas against one: {report.scaling:.2f}x (target >= {scaling:g}x for 2 replicas "
        "on 2 cores)",
        f"ray-{n} / single-{n}: {n} one-thread replicas against one server of {n} threads: {report.versus_single:.2f}x",
        f"ray-1 against single-1: the Ray path costs {report.ray_overhead_pct:.1f}% of one thread's throughput "
        f"(target <= {overhead:g}%)",
        "FAIL: " + "; ".join(report.flags)
        if report.flags
        else f"PASS: no errors, every answer its text's reference vector within {ATOL:g}",
    ]
    return "\n".join(lines)
