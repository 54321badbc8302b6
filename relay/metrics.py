"""Metrics: the Prometheus series of SPEC §8, in one registry owned here.

This module owns every metric relay exports on the admin listener's
`/metrics`: counters and histograms that ingress, the delivery lanes and the
journal's writer feed as things happen (prometheus-client is thread-safe, so
the writer thread may observe commits directly), and gauges that are read at
scrape time (queue depth per target from the journal, in-flight requests and
pause state from the lanes, the journal's size on disk).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


@dataclass(frozen=True, slots=True)
class TargetState:
    """What the scrape reads from a lane."""

    in_flight: int
    paused: bool


class Metrics:
    """relay's metrics; one instance per daemon, with its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "relay_requests_total", "Inbound requests by source and reply code",
            ["source", "code"], registry=r,
        )  # fmt: skip
        self.events = Counter(
            "relay_events_total", "Inbound events by source and outcome",
            ["source", "outcome"], registry=r,
        )  # fmt: skip
        self.deliveries = Counter(
            "relay_deliveries_total", "Delivery attempts by target and outcome",
            ["target", "outcome"], registry=r,
        )  # fmt: skip
        self.attempt_seconds = Histogram(
            "relay_attempt_seconds", "Duration of one delivery attempt",
            ["target"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.delivery_latency_seconds = Histogram(
            "relay_delivery_latency_seconds", "From an event's arrival to its delivery",
            ["target"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "relay_queue_depth", "Pending deliveries per target", ["target"], registry=r
        )
        self.in_flight = Gauge(
            "relay_in_flight", "Requests in flight per target", ["target"], registry=r
        )
        self.target_paused = Gauge(
            "relay_target_paused", "1 while a target is paused", ["target"], registry=r
        )
        self.journal_commit_seconds = Histogram(
            "relay_journal_commit_seconds", "Duration of one group commit",
            buckets=COMMIT_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.journal_bytes = Gauge(
            "relay_journal_bytes", "Size of the journal files on disk", registry=r
        )
        self.config_reloads = Counter(
            "relay_config_reloads_total", "Config reloads by result", ["result"], registry=r
        )
        self._children: dict[tuple[int | str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: labels() is too slow for once per request."""
        key: tuple[int | str, ...] = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_request(self, source: str, code: int) -> None:
        self._child(self.requests, source, str(code)).inc()

    def count_event(self, source: str, outcome: str) -> None:
        self._child(self.events, source, outcome).inc()

    def count_attempt(self, target: str, outcome: str, seconds: float) -> None:
        """One finished attempt: its outcome and its duration."""
        self._child(self.deliveries, target, outcome).inc()
        self._child(self.attempt_seconds, target).observe(seconds)

    def count_dead(self, target: str) -> None:
        """A delivery that died without an attempt (too old, transform failed, ...)."""
        self._child(self.deliveries, target, "dead").inc()

    def observe_latency(self, target: str, seconds: float) -> None:
        self._child(self.delivery_latency_seconds, target).observe(seconds)

    def observe_commit(self, seconds: float, _writes: int) -> None:
        self.journal_commit_seconds.observe(seconds)

    def render(
        self,
        queue_depths: Mapping[str, int],
        targets: Mapping[str, TargetState],
        journal: Path,
    ) -> tuple[bytes, str]:
        """The text exposition, with the scrape-time gauges filled in first."""
        for gauge in (self.queue_depth, self.in_flight, self.target_paused):
            gauge.clear()  # removed targets disappear
        for name, state in targets.items():
            self.queue_depth.labels(name).set(queue_depths.get(name, 0))
            self.in_flight.labels(name).set(state.in_flight)
            self.target_paused.labels(name).set(1 if state.paused else 0)
        self.journal_bytes.set(_journal_bytes(journal))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _journal_bytes(journal: Path) -> int:
    total = 0
    for path in (journal, journal.with_name(journal.name + "-wal")):
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total
