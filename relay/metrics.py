"""Metrics: the Prometheus series of SPEC §8, in one registry owned here.

This module owns every metric relay exports on the admin listener's
`/metrics`: counters and histograms that ingress, the delivery lanes and the
journal's writer feed as things happen, and gauges that are read at scrape
time (queue depth per target from the journal, in-flight requests and pause
state from the lanes, the journal's size on disk). The series fed once per
request or attempt are kept in plain dicts and lists (`CountSeries`,
`HistogramSeries`) and turned into Prometheus families at scrape time: each is
written by one thread only (the event loop, or the journal's writer for commits).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)

_CODES = {code: str(code) for code in range(100, 600)}
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


@dataclass(frozen=True, slots=True)
class TargetState:
    """What the scrape reads from a lane."""

    in_flight: int
    paused: bool


class CountSeries:
    """A labelled counter as a dict: `inc` is one dict update (prometheus-client's
    Counter takes a lock and two calls per increment, on the hot path of every request)."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation, self._labels = name, documentation, list(labels)
        self._values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, *labels: str) -> None:
        values = self._values
        values[labels] = values.get(labels, 0.0) + 1.0

    def add(self, *series: tuple[str, ...]) -> None:
        """Show these label sets from now on, at 0 until counted."""
        for labels in series:
            self._values.setdefault(labels, 0.0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for labels, value in list(self._values.items()):
            family.add_metric(list(labels), value)
        yield family


class HistogramSeries:
    """A labelled histogram as counts per bucket: `observe` is one bisect and two adds
    (prometheus-client walks the buckets in Python, a lock per step: ~3 us an observation)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._labels = name, documentation, list(labels)
        self._bounds = tuple(buckets)
        self._les = [repr(float(bound)) for bound in self._bounds] + ["+Inf"]  # 1 -> "1.0"
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def observe(self, value: float, *labels: str) -> None:
        counts = self._counts.get(labels)
        if counts is None:  # the sum first: a scrape on another thread reads counts, then sums
            self._sums[labels] = 0.0
            counts = self._counts[labels] = [0] * (len(self._bounds) + 1)
        counts[bisect_left(self._bounds, value)] += 1  # the first bucket with le >= value
        self._sums[labels] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        for labels, counts in list(self._counts.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, list(counts), strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(labels), buckets, self._sums[labels])
        yield family


class Metrics:
    """relay's metrics; one instance per daemon, with its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = CountSeries(
            "relay_requests", "Inbound requests by source and reply code", ["source", "code"], r
        )
        self.events = CountSeries(
            "relay_events", "Inbound events by source and outcome", ["source", "outcome"], r
        )
        self.deliveries = CountSeries(
            "relay_deliveries", "Delivery attempts by target and outcome", ["target", "outcome"], r
        )
        self.attempt_seconds = HistogramSeries(
            "relay_attempt_seconds", "Duration of one delivery attempt",
            ["target"], LATENCY_BUCKETS_S, r,
        )  # fmt: skip
        self.delivery_latency_seconds = HistogramSeries(
            "relay_delivery_latency_seconds", "From an event's arrival to its delivery",
            ["target"], LATENCY_BUCKETS_S, r,
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
        self.journal_commit_seconds = HistogramSeries(
            "relay_journal_commit_seconds", "Duration of one group commit", [], COMMIT_BUCKETS_S, r
        )
        self.journal_bytes = Gauge(
            "relay_journal_bytes", "Size of the journal files on disk", registry=r
        )
        self.config_reloads = CountSeries(
            "relay_config_reloads", "Config reloads by result", ["result"], r
        )
        self.config_reloads.add(("ok",), ("failed",))  # both series from the start, at 0

    def count_request(self, source: str, code: int) -> None:
        self.requests.inc(source, _CODES.get(code) or str(code))

    def count_event(self, source: str, outcome: str) -> None:
        self.events.inc(source, outcome)

    def count_attempt(self, target: str, outcome: str, seconds: float) -> None:
        """One finished attempt: its outcome and its duration."""
        self.deliveries.inc(target, outcome)
        self.attempt_seconds.observe(seconds, target)

    def count_dead(self, target: str) -> None:
        """A delivery that died without an attempt (too old, transform failed, ...)."""
        self.deliveries.inc(target, "dead")

    def observe_latency(self, target: str, seconds: float) -> None:
        self.delivery_latency_seconds.observe(seconds, target)

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
