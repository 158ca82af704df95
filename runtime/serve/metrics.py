"""Prometheus metrics of one server, in a registry of its own (several apps in one process, as in
tests, never collide). Output tokens/s is `rate(blockrt_generated_tokens_total[1m])`."""

from __future__ import annotations

import prometheus_client as prom

# seconds; TTFT of a small model on CPU is milliseconds, a long completion on a big one minutes
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.queue_depth = prom.Gauge("blockrt_queue_depth", "Accepted requests waiting for a batch row.", registry=r)
        self.running = prom.Gauge("blockrt_running_requests", "Sequences in the running batch.", registry=r)
        self.generated_tokens = prom.Counter("blockrt_generated_tokens", "Tokens generated (all requests).", registry=r)
        self.prompt_tokens = prom.Counter("blockrt_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.ttft = prom.Histogram("blockrt_time_to_first_token_seconds", "From acceptance to the first generated token.",
                                   buckets=_TTFT_BUCKETS, registry=r)
        self.latency = prom.Histogram("blockrt_request_latency_seconds", "From acceptance to the last token.",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = prom.Counter("blockrt_requests", "Finished requests by HTTP status and finish reason.",
                                     ["status", "finish_reason"], registry=r)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
