"""Prometheus metrics of one server, in a registry of its own (two servers in one process,
as in tests, do not collide). Served by prometheus-client's ASGI app at /metrics."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from retrieval_attn.server.scheduler import Sequence

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Metrics:
    def __init__(self, num_running: Callable[[], float], num_waiting: Callable[[], float],
                 kv_bytes: Callable[[], dict[str, int]]) -> None:
        self.registry = r = CollectorRegistry()
        p = "retrieval_attn"
        self.requests = Counter(f"{p}_requests", "Requests by outcome: stop, length, "
                                "cancelled (client left), error, rejected (queue full or bad "
                                "request)", ["outcome"], registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Arrival to first new "
                              "token (queueing and prefill included)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "Time between one "
                             "request's consecutive tokens", buckets=_LATENCY_BUCKETS,
                             registry=r)
        Gauge(f"{p}_num_requests_running", "Sequences being decoded",
              registry=r).set_function(num_running)
        Gauge(f"{p}_num_requests_waiting", "Requests in the queue",
              registry=r).set_function(num_waiting)
        kv = Gauge(f"{p}_kv_bytes", "Bytes the KV policy holds, by place (gpu, host)",
                   ["place"], registry=r)
        for place in ("gpu", "host"):
            kv.labels(place=place).set_function(lambda place=place: kv_bytes().get(place, 0))

    # the scheduler's Observer hooks (worker thread)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, seq: Sequence) -> None:
        self.requests.labels(outcome=seq.outcome).inc()
        self.prompt_tokens.inc(len(seq.prompt_ids))
        self.generation_tokens.inc(seq.new_tokens)

    def rejected(self) -> None:
        self.requests.labels(outcome="rejected").inc()
