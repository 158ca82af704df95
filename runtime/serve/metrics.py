"""Prometheus metrics of one server, in a registry of its own (several apps in one process, as in
tests, never collide). Engine metrics carry an `engine` label (one per GPU with several engines).
Output tokens/s is `sum(rate(blockrt_generated_tokens_total[1m]))`.

HTTP worker processes of one server (`Workers`) share a directory named by `SHARED_DIR_ENV`
(prometheus_client's multiprocess mode): each worker's values live in files there, and /metrics in
any worker answers for all of them (counters and histograms added up, the engine gauges as last set
by any worker)."""

from __future__ import annotations

import os

import prometheus_client as prom
from prometheus_client import multiprocess

SHARED_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set in a process's environment before prometheus_client loads

# seconds; TTFT of a small model on CPU is milliseconds, a long completion on a big one minutes
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        engine = ["engine"]
        self.queue_depth = prom.Gauge("blockrt_queue_depth", "Accepted requests waiting for a batch row.", engine,
                                      registry=r, multiprocess_mode="mostrecent")
        self.running = prom.Gauge("blockrt_running_requests", "Sequences in the running batch.", engine, registry=r,
                                  multiprocess_mode="mostrecent")
        self.generated_tokens = prom.Counter("blockrt_generated_tokens", "Tokens generated (all requests).", engine,
                                             registry=r)
        self.ttft = prom.Histogram("blockrt_time_to_first_token_seconds", "From acceptance to the first generated token.",
                                   engine, buckets=_TTFT_BUCKETS, registry=r)
        self.latency = prom.Histogram("blockrt_request_latency_seconds",
                                      "From acceptance to the last token, of requests that completed (not cancelled "
                                      "or failed).", engine, buckets=_LATENCY_BUCKETS, registry=r)
        self.loop_lag = prom.Histogram("blockrt_event_loop_lag_seconds",
                                       "How late the HTTP process's event loop runs a 10 ms timer (saturation of the "
                                       "front end; with HTTP workers, all of theirs).", buckets=_LAG_BUCKETS, registry=r)
        self.prompt_tokens = prom.Counter("blockrt_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.requests = prom.Counter("blockrt_requests", "Finished requests by HTTP status and finish reason.",
                                     ["status", "finish_reason"], registry=r)

    def record_round(self, engine: str, tokens: int, ttfts: list[float], latencies: list[float], waiting: int,
                     running: int) -> None:
        """One engine round, as the front end received it."""
        if tokens:
            self.generated_tokens.labels(engine).inc(tokens)
        ttft, latency = self.ttft.labels(engine), self.latency.labels(engine)
        for t in ttfts:
            ttft.observe(t)
        for t in latencies:
            latency.observe(t)
        self.queue_depth.labels(engine).set(waiting)
        self.running.labels(engine).set(running)

    def loop_lag_sum_count(self) -> tuple[float, float]:
        """The event-loop lag histogram's (sum of seconds, samples) so far."""
        values = {s.name: s.value for metric in self.loop_lag.collect() for s in metric.samples}
        return values["blockrt_event_loop_lag_seconds_sum"], values["blockrt_event_loop_lag_seconds_count"]

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (of every process sharing `SHARED_DIR_ENV`'s
        directory when it is set)."""
        shared = os.environ.get(SHARED_DIR_ENV)
        if not shared:
            return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=shared)
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST
