"""The server's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Requests by status, items and tokens embedded, round sizes, queue depth, latency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "e5v_requests", "Embedding requests answered, by HTTP status", ["status"], registry=self.registry
        )
        self.items = Counter("e5v_items_embedded", "Items embedded, by kind", ["kind"], registry=self.registry)
        self.tokens = Counter(
            "e5v_tokens_embedded", "Prompt tokens embedded (image tokens included)", registry=self.registry
        )
        self.round_items = Histogram(
            "e5v_round_items",
            "Items the scheduler embedded together in one round (from one or more requests)",
            buckets=_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.round_requests = Histogram(
            "e5v_round_requests", "Requests merged into one round", buckets=_SIZE_BUCKETS, registry=self.registry
        )
        self.round_seconds = Histogram(
            "e5v_round_duration_seconds",
            "Seconds the model took for one round (tokenising, forward passes, pooling)",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_items = Gauge("e5v_queue_items", "Items waiting in the queue", registry=self.registry)
        self.in_flight = Gauge("e5v_requests_in_flight", "Embedding requests being served", registry=self.registry)
        self.latency = Histogram(
            "e5v_request_duration_seconds",
            "Time to answer an embedding request",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
