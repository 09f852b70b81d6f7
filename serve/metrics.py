"""Prometheus metrics of the gateway: requests, errors, latency and tokens per version.

Battle traffic is counted without its versions (version "-"): a per-version count read just
before and after a battle would tell which version answered on which side before the vote.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATTLE_VERSION = "-"  # the version label of all battle traffic
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("arena_requests_total", "Requests by route and version",
                                ["route", "version"], registry=self.registry)
        self.errors = Counter("arena_errors_total", "Error answers by route and status",
                              ["route", "status"], registry=self.registry)
        self.latency = Histogram("arena_request_seconds", "Request latency by route and version",
                                 ["route", "version"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.tokens = Counter("arena_completion_tokens_total",
                              "Generated tokens by route and version (battles: version '-')",
                              ["route", "version"], registry=self.registry)
        self.votes = Counter("arena_votes_total", "Accepted votes by outcome", ["winner"],
                             registry=self.registry)
        self.feedback = Gauge("arena_feedback", "Vote stream and archive figures", ["figure"],
                              registry=self.registry)
