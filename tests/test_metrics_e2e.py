"""End-to-end /metrics: the Prometheus series of SPEC §8, scraped from the real daemon."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon, Receiver, eventually, server_toml

DaemonFactory = Callable[..., Awaitable[Daemon]]
ReceiverFactory = Callable[[], Awaitable[Receiver]]


async def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.admin_url("/metrics")) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_follow_what_happens(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Requests, events, deliveries, queue depth, pause state, commits and reloads are counted."""
    up, down = await receivers(), await receivers()
    down.default = (503, {}, b"")
    text = (
        server_toml(tmp_path)
        + f"""
[sources.app]
[targets.up]
url = "{up.url}"
[targets.down]
url = "{down.url}"
pause_after = 1
retry = {{ first = "1h", max = "1h" }}
[[routes]]
name = "r"
source = "app"
targets = ["up", "down"]
"""
    )
    daemon = await daemons(text)
    for n in range(3):
        assert (await daemon.post("/hooks/app", {"n": n}))[0] == 202
    assert (await daemon.post("/hooks/app", b"{broken"))[0] == 400
    assert (await daemon.post("/hooks/nowhere", b"{}"))[0] == 404
    await eventually(lambda: len(up.requests) == 3)
    await daemon.wait_log("target.paused", target="down")
    daemon.config_path.write_text(text)
    daemon.signal(signal.SIGHUP)
    await daemon.wait_log("config.reloaded")

    async def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        values = await scrape(daemon)
        done = values.get(("relay_deliveries_total", (("outcome", "delivered"), ("target", "up"))))
        return values if done == 3 else None

    values = await eventually(settled)
    assert values[("relay_requests_total", (("code", "202"), ("source", "app")))] == 3
    assert values[("relay_requests_total", (("code", "400"), ("source", "app")))] == 1
    assert values[("relay_requests_total", (("code", "404"), ("source", "")))] == 1
    assert values[("relay_events_total", (("outcome", "accepted"), ("source", "app")))] == 3
    assert values[("relay_events_total", (("outcome", "rejected"), ("source", "app")))] == 1
    assert values[("relay_queue_depth", (("target", "down"),))] == 3
    assert values[("relay_queue_depth", (("target", "up"),))] == 0
    assert values[("relay_target_paused", (("target", "down"),))] == 1
    assert values[("relay_target_paused", (("target", "up"),))] == 0
    assert values[("relay_in_flight", (("target", "up"),))] == 0
    assert values[("relay_attempt_seconds_count", (("target", "up"),))] == 3
    assert values[("relay_delivery_latency_seconds_count", (("target", "up"),))] == 3
    assert values[("relay_journal_commit_seconds_count", ())] >= 2
    assert values[("relay_journal_bytes", ())] > 0
    assert values[("relay_config_reloads_total", (("result", "ok"),))] == 1
    assert values[("relay_config_reloads_total", (("result", "failed"),))] == 0  # shown at 0
    assert not [name for name, _ in values if name.endswith("_created")]
