"""The lean counter and histogram series behind /metrics, read back with Prometheus' parser."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import CountSeries, HistogramSeries


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histogram_series_matches_prometheus_clients_own_histogram() -> None:
    """Observations on and between bucket bounds land in the same `le` buckets, with the
    same count and sum, as prometheus-client's Histogram gives for the same values."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bounds = (0.005, 0.01, 1, 2.5, 3600)
    mine = HistogramSeries("x_seconds", "x", ["target"], bounds, ours)
    reference = Histogram("x_seconds", "x", ["target"], buckets=bounds, registry=theirs)
    for value in (0.0, 0.005, 0.0051, 0.01, 0.7, 1.0, 2.5, 2.6, 3600.0, 4000.0):
        mine.observe(value, "svc")
        reference.labels("svc").observe(value)
    expected = {k: v for k, v in samples(theirs).items() if not k[0].endswith("_created")}
    assert samples(ours) == expected
    assert expected[("x_seconds_bucket", (("le", "1.0"), ("target", "svc")))] == 6
    assert expected[("x_seconds_count", (("target", "svc"),))] == 10


def test_count_series_counts_per_label_set() -> None:
    """Each label combination is its own `_total` series, counted from 1."""
    registry = CollectorRegistry()
    requests = CountSeries("relay_requests", "r", ["source", "code"], registry)
    for _ in range(3):
        requests.inc("app", "202")
    requests.inc("", "404")
    values = samples(registry)
    assert values[("relay_requests_total", (("code", "202"), ("source", "app")))] == 3
    assert values[("relay_requests_total", (("code", "404"), ("source", "")))] == 1
    assert len(values) == 2
