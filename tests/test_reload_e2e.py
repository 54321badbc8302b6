"""End-to-end config reload (SIGHUP): swapped atomically, refused when invalid, nothing dropped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest

from conftest import Daemon, Receiver, eventually, free_port, server_toml

DaemonFactory = Callable[..., Awaitable[Daemon]]
ReceiverFactory = Callable[[], Awaitable[Receiver]]


def config(tmp_path: Path, port: int, a: Receiver, b: Receiver, extra_route: bool) -> str:
    text = (
        server_toml(tmp_path, listen_port=port)
        + f"""
[sources.app]
[targets.a]
url = "{a.url}"
[targets.b]
url = "{b.url}"
[[routes]]
name = "to-a"
source = "app"
targets = ["a"]
"""
    )
    if extra_route:
        text += """
[[routes]]
name = "to-b"
source = "app"
filter = "body.copy == `true`"
targets = ["b"]
"""
    return text


async def reload_and_wait(daemon: Daemon, event: str) -> dict[str, object]:
    count = len(daemon.lines)
    daemon.signal(signal.SIGHUP)
    return await daemon.wait_log(event, after=count)


async def replay_dead(daemon: Daemon, target: str) -> tuple[int, object]:
    """`POST /api/replay` of `target`'s dead deliveries: the status and the answer."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            daemon.admin_url("/api/replay"), json={"status": "dead", "target": target}
        ) as response,
    ):
        return response.status, await response.json()


async def test_a_route_added_while_traffic_flows(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """No request fails across a reload, and events after it follow the new route too."""
    a, b = await receivers(), await receivers()
    port = free_port()
    daemon = await daemons(config(tmp_path, port, a, b, extra_route=False))
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        async with aiohttp.ClientSession() as session:
            for n in range(2000):  # bounded; stops as soon as the test is done
                if stop.is_set():
                    return
                async with session.post(
                    f"http://127.0.0.1:{port}/hooks/app", data=orjson.dumps({"copy": True, "n": n}),
                    headers={"Content-Type": "application/json"},
                ) as response:  # fmt: skip
                    statuses.append(response.status)

    sender = asyncio.create_task(traffic())
    await eventually(lambda: len(statuses) > 20)
    daemon.config_path.write_text(config(tmp_path, port, a, b, extra_route=True))
    reloaded = await reload_and_wait(daemon, "config.reloaded")
    assert reloaded["routes_added"] == ["to-b"]
    await eventually(lambda: len(b.requests) > 10)
    stop.set()
    await sender
    assert set(statuses) == {202}
    await eventually(lambda: len(a.requests) == len(statuses))


async def test_an_invalid_config_is_refused_and_the_old_one_keeps_running(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A broken file is logged with every error; traffic keeps flowing on the old routes."""
    a, b = await receivers(), await receivers()
    port = free_port()
    daemon = await daemons(config(tmp_path, port, a, b, extra_route=False))
    broken = config(tmp_path, port, a, b, extra_route=True).replace(
        'targets = ["b"]', 'targets = ["c"]'
    )
    daemon.config_path.write_text(broken.replace("[sources.app]", "[sources.app]\nmax_bdy = 1"))
    failed = await reload_and_wait(daemon, "config.reload_failed")
    errors = failed["errors"]
    assert isinstance(errors, list)
    assert len(errors) == 2
    assert any('sources.app.max_bdy: unknown key (did you mean "max_body"?)' in e for e in errors)
    assert any('routes[1].targets[0]: unknown target "c"' in e for e in errors)
    status, reply, _ = await daemon.post("/hooks/app", {"still": "served"})
    assert (status, reply["deliveries"]) == (202, 1)
    await eventually(lambda: a.event_ids() == [reply["id"]])
    assert await daemon.ready() == 200


async def test_listen_changes_need_a_restart(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Changing the listen address is refused with a message that a restart is needed."""
    a, b = await receivers(), await receivers()
    port = free_port()
    daemon = await daemons(config(tmp_path, port, a, b, extra_route=False))
    daemon.config_path.write_text(config(tmp_path, free_port(), a, b, extra_route=True))
    failed = await reload_and_wait(daemon, "config.reload_failed")
    assert failed["errors"] == [
        f"{daemon.config_path}: server.listen changed: a restart is needed to apply it"
    ]
    _, reply, _ = await daemon.post("/hooks/app", {"copy": True})
    assert reply["deliveries"] == 1  # the new route was not applied either


async def test_a_removed_target_leaves_its_deliveries_dead_and_others_untouched(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Removing a target: its waiting deliveries end dead ("target removed"); in-flight
    requests of unchanged targets finish normally."""
    a, b = await receivers(), await receivers()
    a.gate = asyncio.Event()  # a's request stays in flight across the reload
    b.default = (503, {}, b"down")  # b's deliveries wait for a retry
    port = free_port()
    text = config(tmp_path, port, a, b, extra_route=True).replace(
        'url = "' + b.url + '"', 'url = "' + b.url + '"\nretry = { first = "1h", max = "1h" }'
    )
    daemon = await daemons(text)
    _, reply, _ = await daemon.post("/hooks/app", {"copy": True})
    await eventually(lambda: a.current == 1 and len(b.requests) == 1)
    without_b = config(tmp_path, port, a, b, extra_route=False).replace(
        f'[targets.b]\nurl = "{b.url}"\n', ""
    )
    daemon.config_path.write_text(without_b)
    reloaded = await reload_and_wait(daemon, "config.reloaded")
    assert reloaded["targets_removed"] == ["b"]
    assert reloaded["routes_removed"] == ["to-b"]
    dead = await daemon.wait_log("delivery.dead", event_id=reply["id"], target="b")
    assert dead["reason"] == "target removed"
    a.gate.set()
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"], target="a")
    rows = daemon.query("SELECT target, status, last_error FROM deliveries ORDER BY target")
    assert rows == [("a", "delivered", None), ("b", "dead", "target removed")]


async def test_a_removed_route_leaves_its_waiting_deliveries_dead_at_once(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Removing a route whose target stays: its delivery waiting an hour for a retry ends
    dead ("target removed") at the reload, with a full `delivery.dead` line and counted in
    `relay_deliveries_total{outcome="dead"}`, instead of waiting for its retry to fall due."""
    a, b = await receivers(), await receivers()
    b.default = (503, {}, b"down")
    port = free_port()
    slow_retry = 'url = "' + b.url + '"\nretry = { first = "1h", max = "1h" }'
    text = config(tmp_path, port, a, b, extra_route=True).replace(f'url = "{b.url}"', slow_retry)
    daemon = await daemons(text)
    _, reply, _ = await daemon.post("/hooks/app", {"copy": True})
    await daemon.wait_log("delivery.failed", event_id=reply["id"], target="b")
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"], target="a")
    without_route = config(tmp_path, port, a, b, extra_route=False)
    daemon.config_path.write_text(without_route.replace(f'url = "{b.url}"', slow_retry))
    reloaded = await reload_and_wait(daemon, "config.reloaded")
    assert (reloaded["routes_removed"], reloaded.get("targets_removed", [])) == (["to-b"], [])
    dead = await daemon.wait_log("delivery.dead", event_id=reply["id"], target="b")
    assert {k: dead[k] for k in ("reason", "route", "attempt", "status", "ms")} == {
        "reason": "target removed", "route": "to-b", "attempt": 1, "status": None, "ms": 0,
    }  # fmt: skip
    rows = daemon.query("SELECT target, status, last_error FROM deliveries ORDER BY target")
    assert rows == [("a", "delivered", None), ("b", "dead", "target removed")]
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.admin_url("/metrics")) as response,
    ):
        page = await response.text()
    assert 'relay_deliveries_total{outcome="dead",target="b"} 1.0' in page


async def test_a_target_removed_and_re_added_during_an_attempt_is_sent_once(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A target removed while an attempt to it hangs, then added back: the delivery in
    flight ends dead ("target removed", replayable) and the new lane does not send it a
    second time beside the first; later events to the target are delivered."""
    a, b = await receivers(), await receivers()
    b.gate = asyncio.Event()
    port = free_port()
    with_b = config(tmp_path, port, a, b, extra_route=True)
    daemon = await daemons(with_b)
    _, first, _ = await daemon.post("/hooks/app", {"copy": True})
    await eventually(lambda: b.current == 1)
    daemon.config_path.write_text(
        config(tmp_path, port, a, b, extra_route=False).replace(
            f'[targets.b]\nurl = "{b.url}"\n', ""
        )
    )
    await reload_and_wait(daemon, "config.reloaded")
    daemon.config_path.write_text(with_b)
    await reload_and_wait(daemon, "config.reloaded")
    b.gate.set()
    _, second, _ = await daemon.post("/hooks/app", {"copy": True})
    await daemon.wait_log("delivery.succeeded", event_id=second["id"], target="b")
    assert b.event_ids().count(first["id"]) == 1
    rows = daemon.query(
        "SELECT status FROM deliveries WHERE event_id = ? AND target = 'b'", (first["id"],)
    )
    assert rows == [("dead",)]  # its end was told at the removal; the late 200 is history
    assert len([line for line in daemon.events("delivery.dead") if line["target"] == "b"]) == 1
    assert not daemon.find("delivery.succeeded", event_id=first["id"], target="b")


async def test_a_replay_while_a_removed_lane_still_attempts_does_not_send_twice(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A target removed while an attempt to it hangs, re-added, and its dead delivery
    replayed at once: the new lane leaves it to the attempt still under way (whose 200
    then delivers it) instead of sending it a second time beside it."""
    a, b = await receivers(), await receivers()
    b.gate = asyncio.Event()
    port = free_port()
    with_b = config(tmp_path, port, a, b, extra_route=True).replace(
        f'url = "{b.url}"', f'url = "{b.url}"\nconcurrency = 1'
    )
    daemon = await daemons(with_b)
    _, first, _ = await daemon.post("/hooks/app", {"copy": True})
    await eventually(lambda: b.current == 1)
    without_b = config(tmp_path, port, a, b, extra_route=False)
    daemon.config_path.write_text(without_b.replace(f'[targets.b]\nurl = "{b.url}"\n', ""))
    await reload_and_wait(daemon, "config.reloaded")
    await daemon.wait_log("delivery.dead", event_id=first["id"], target="b")
    daemon.config_path.write_text(with_b)
    await reload_and_wait(daemon, "config.reloaded")
    assert await replay_dead(daemon, "b") == (200, {"requeued": 1, "skipped": 0})
    _, second, _ = await daemon.post("/hooks/app", {"copy": True})
    # The re-added lane (one at a time) takes the next event, not the replayed one in flight.
    await eventually(lambda: b.current == 2)
    assert b.event_ids() == [first["id"], second["id"]]
    b.gate.set()
    await daemon.wait_log("delivery.succeeded", event_id=first["id"], target="b")
    await daemon.wait_log("delivery.succeeded", event_id=second["id"], target="b")
    assert b.event_ids().count(first["id"]) == 1
    rows = daemon.query("SELECT status FROM events WHERE id = ?", (first["id"],))
    assert rows == [("delivered",)]


async def test_a_route_removed_during_an_attempt_ends_it_once(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A delivery whose route is removed while its attempt is in flight ends dead ("target
    removed") at the reload, reported then; when the target then fails, the attempt is
    added to its history and reported nowhere else: one `delivery.dead` line, one count,
    no `delivery.failed` promising a retry that will not come."""
    a, b = await receivers(), await receivers()
    b.gate = asyncio.Event()
    b.default = (503, {}, b"down")
    port = free_port()
    daemon = await daemons(config(tmp_path, port, a, b, extra_route=True))
    _, reply, _ = await daemon.post("/hooks/app", {"copy": True})
    await eventually(lambda: b.current == 1)
    daemon.config_path.write_text(config(tmp_path, port, a, b, extra_route=False))
    await reload_and_wait(daemon, "config.reloaded")
    b.gate.set()
    dead = await daemon.wait_log("delivery.dead", event_id=reply["id"], target="b")
    assert (dead["reason"], dead["route"], dead["status"]) == ("target removed", "to-b", None)

    def counted() -> bool:
        return daemon.query("SELECT attempts FROM deliveries WHERE target = 'b'") == [(1,)]

    await eventually(counted)  # the attempt's 503 is recorded...
    rows = daemon.query("SELECT status, last_error FROM deliveries WHERE target = 'b'")
    assert rows == [("dead", "target removed")]  # ...and the delivery stays dead
    assert not [line for line in daemon.events("delivery.failed") if line["target"] == "b"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.admin_url("/metrics")) as response,
    ):
        page = await response.text()
    assert 'relay_deliveries_total{outcome="dead",target="b"} 1.0' in page
    assert len([line for line in daemon.events("delivery.dead") if line["target"] == "b"]) == 1


async def test_a_removed_target_can_be_re_added_and_its_dead_deliveries_replayed(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Remove a target, re-add it, replay its dead deliveries: they arrive."""
    a, b = await receivers(), await receivers()
    b.default = (503, {}, b"down")
    port = free_port()
    with_b = config(tmp_path, port, a, b, extra_route=True).replace(
        'url = "' + b.url + '"', 'url = "' + b.url + '"\nretry = { first = "1h", max = "1h" }'
    )
    daemon = await daemons(with_b)
    _, reply, _ = await daemon.post("/hooks/app", {"copy": True})
    await eventually(lambda: len(b.requests) == 1)
    daemon.config_path.write_text(
        config(tmp_path, port, a, b, extra_route=False).replace(
            f'[targets.b]\nurl = "{b.url}"\n', ""
        )
    )
    await reload_and_wait(daemon, "config.reloaded")
    await daemon.wait_log("delivery.dead", event_id=reply["id"], target="b")
    b.default = (200, {}, b"ok")
    daemon.config_path.write_text(with_b)
    readded = await reload_and_wait(daemon, "config.reloaded")
    assert readded["targets_added"] == ["b"]
    assert await replay_dead(daemon, "b") == (200, {"requeued": 1, "skipped": 0})
    await eventually(lambda: len(b.requests) == 2)
    assert b.requests[-1].headers["X-Relay-Event-Id"] == reply["id"]
    await eventually(
        lambda: (
            daemon.query("SELECT status FROM events WHERE id = ?", (reply["id"],))
            == [("delivered",)]
        )
    )


def one_lane(tmp_path: Path, port: int, url: str, target_settings: str) -> str:
    return (
        server_toml(tmp_path, listen_port=port)
        + f"""
[sources.app]
[targets.svc]
url = "{url}"
{target_settings}
[[routes]]
name = "r"
source = "app"
targets = ["svc"]
"""
    )


@pytest.mark.parametrize(("before", "after"), [(4, 1), (1, 3)])
async def test_a_changed_concurrency_holds_for_the_next_starts(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory, before: int, after: int
) -> None:
    """After a reload changes an idle lane's concurrency, new deliveries go `after` at a
    time, no more and no fewer (found by review: when it was lowered, workers already
    waiting for work each started one more)."""
    svc = await receivers()
    svc.gate = asyncio.Event()
    port = free_port()
    daemon = await daemons(one_lane(tmp_path, port, svc.url, f"concurrency = {before}"))
    daemon.config_path.write_text(one_lane(tmp_path, port, svc.url, f"concurrency = {after}"))
    await reload_and_wait(daemon, "config.reloaded")
    for n in range(6):
        assert (await daemon.post("/hooks/app", {"n": n}))[0] == 202
    await eventually(lambda: svc.current == after)
    svc.gate.set()
    await eventually(lambda: len(svc.requests) == 6)
    assert svc.max_concurrent == after


async def test_a_slower_rate_limit_spaces_starts_from_the_reload_on(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A reload from rate_limit 8/s to 2/s: every start after it is 1/2 s after the one
    before, none at the old rate (found by review: workers already waiting on the old
    spacing each started at it)."""
    svc = await receivers()
    port = free_port()
    fast = one_lane(tmp_path, port, svc.url, 'concurrency = 4\nrate_limit = "8/s"')
    daemon = await daemons(fast)
    for n in range(12):
        assert (await daemon.post("/hooks/app", {"n": n}))[0] == 202
    await eventually(lambda: len(svc.requests) >= 3)
    daemon.config_path.write_text(fast.replace('"8/s"', '"2/s"'))
    await reload_and_wait(daemon, "config.reloaded")
    reloaded_at = time.monotonic()  # the receiver's clock
    await eventually(lambda: len(svc.requests) == 12, timeout_s=30)
    # the first start after the reload may still be one the old spacing allowed
    after = [r.at for r in svc.requests if r.at > reloaded_at][1:]
    gaps_s = [later - earlier for earlier, later in itertools.pairwise(after)]
    assert gaps_s
    assert min(gaps_s) >= 0.5 - 0.02, gaps_s


async def test_a_paused_target_whose_url_is_fixed_is_tried_at_once(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A target paused for an hour by a wrong URL: once a reload fixes the URL, the probe
    goes at once, the target resumes and its backlog is delivered."""
    svc = await receivers()
    port = free_port()
    settings = 'pause_after = 1\nretry = { first = "1h", max = "2h" }'
    daemon = await daemons(one_lane(tmp_path, port, f"http://127.0.0.1:{free_port()}/x", settings))
    accepted = [(await daemon.post("/hooks/app", {"n": n}))[1]["id"] for n in range(3)]
    await daemon.wait_log("target.paused")
    daemon.config_path.write_text(one_lane(tmp_path, port, svc.url, settings))
    await reload_and_wait(daemon, "config.reloaded")
    resumed = await daemon.wait_log("target.resumed")
    assert resumed["target"] == "svc"
    await eventually(lambda: sorted(svc.event_ids()) == sorted(accepted))


async def test_a_url_fixed_while_the_probe_of_the_old_one_is_in_flight_is_tried_at_once(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A paused target's probe is in flight when a reload fixes its URL: when that probe
    fails, the new URL is probed at once, not after the next (here hour-long) cooldown."""
    old, new = await receivers(), await receivers()
    probe_answered = asyncio.Event()

    async def hanging_failure() -> tuple[int, dict[str, str], bytes]:
        await probe_answered.wait()
        return 503, {}, b"still down"

    old.default = (503, {}, b"down")
    old.script.extend([(503, {}, b"down"), hanging_failure])
    port = free_port()
    settings = 'pause_after = 1\nretry = { first = "1h", max = "1h" }'
    daemon = await daemons(one_lane(tmp_path, port, old.url, settings))
    _, reply, _ = await daemon.post("/hooks/app", {"n": 1})
    await daemon.wait_log("target.paused")
    await daemon.stop()
    soon_ms = int(time.time() * 1000) + 500  # the cooldown ends in half a second
    with contextlib.closing(sqlite3.connect(daemon.journal)) as conn, conn:
        conn.execute("UPDATE targets SET paused_until_ms = ?", (soon_ms,))
        conn.execute("UPDATE deliveries SET next_at_ms = ?", (soon_ms,))  # its retry too
    await daemon.start()
    await eventually(lambda: old.current == 1)  # the probe, to the old URL, hangs
    daemon.config_path.write_text(one_lane(tmp_path, port, new.url, settings))
    await reload_and_wait(daemon, "config.reloaded")
    probe_answered.set()  # the old URL's probe fails
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"])
    assert new.event_ids() == [reply["id"]]


async def test_a_reload_asked_for_while_relay_stops_is_refused(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """`relay reload` (the admin API) after SIGTERM is refused with a reason and counted as
    a failed reload; the stop goes on and ends with exit 0 (found by review: a lane added
    then broke the stop)."""
    a, b = await receivers(), await receivers()
    a.gate = asyncio.Event()
    port = free_port()
    daemon = await daemons(config(tmp_path, port, a, b, extra_route=False))
    await daemon.post("/hooks/app", {"n": 1})
    await eventually(lambda: a.current == 1)
    daemon.signal(signal.SIGTERM)
    await daemon.wait_log("relay.stopping")
    daemon.config_path.write_text(config(tmp_path, port, a, b, extra_route=True))
    async with (
        aiohttp.ClientSession() as session,
        session.post(daemon.admin_url("/api/reload")) as response,
    ):
        answer = await response.json()
    assert answer == {"ok": False, "errors": ["relay is stopping: the reload is not applied"]}
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.admin_url("/metrics")) as response,
    ):
        assert 'relay_config_reloads_total{result="failed"} 1.0' in await response.text()
    a.gate.set()
    assert await daemon.wait() == 0
    assert await daemon.wait_log("relay.stopped") is not None


async def test_a_re_added_target_sends_what_the_removed_lane_only_had_in_its_window(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Removed while one attempt hangs and two more deliveries wait in its window, re-added
    and replayed: the new lane sends the two at once (the old lane will never send them);
    only the one in flight is left to the old lane."""
    hanging, fixed = await receivers(), await receivers()
    hanging.gate = asyncio.Event()
    port = free_port()
    daemon = await daemons(one_lane(tmp_path, port, hanging.url, "concurrency = 1"))
    ids = [(await daemon.post("/hooks/app", {"n": n}))[1]["id"] for n in range(3)]
    await eventually(lambda: hanging.current == 1)
    without = server_toml(tmp_path, listen_port=port) + "[sources.app]\n"
    daemon.config_path.write_text(without)
    await reload_and_wait(daemon, "config.reloaded")
    daemon.config_path.write_text(one_lane(tmp_path, port, fixed.url, "concurrency = 1"))
    await reload_and_wait(daemon, "config.reloaded")
    async with (
        aiohttp.ClientSession() as session,
        session.post(daemon.admin_url("/api/replay"), json={"target": "svc"}) as response,
    ):
        assert (await response.json())["requeued"] == 3
    await eventually(lambda: sorted(fixed.event_ids()) == sorted(ids[1:]))
    hanging.gate.set()


async def test_a_target_made_ordered_sends_its_waiting_deliveries_one_at_a_time(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Two at a time until a reload sets `ordered = true`: from then on one at a time,
    the deliveries the lane had already read included."""
    svc = await receivers()
    release = asyncio.Event()
    spans: list[list[float]] = []

    async def timed() -> tuple[int, dict[str, str], bytes]:
        span = [time.monotonic(), math.inf]
        spans.append(span)
        await release.wait()
        await asyncio.sleep(0.05)  # a target that takes its time: overlaps would show
        span[1] = time.monotonic()
        return 200, {}, b"ok"

    svc.script.extend([timed] * 8)
    port = free_port()
    daemon = await daemons(one_lane(tmp_path, port, svc.url, "concurrency = 2"))
    for n in range(8):
        await daemon.post("/hooks/app", {"n": n})
    await eventually(lambda: svc.current == 2)
    daemon.config_path.write_text(
        one_lane(tmp_path, port, svc.url, "concurrency = 2\nordered = true")
    )
    await reload_and_wait(daemon, "config.reloaded")
    release.set()
    await eventually(lambda: len(svc.requests) == 8 and svc.current == 0)
    for n in range(2, 8):  # each starts once every earlier one has ended
        assert spans[n][0] >= max(end for _, end in spans[:n])


async def test_a_retry_scheduled_against_the_old_url_goes_at_once_to_the_new_one(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A delivery that failed against a wrong URL waits an hour for its retry; once a
    reload fixes the URL it is due at once, as a resumed target's deliveries are."""
    svc = await receivers()
    port = free_port()
    settings = 'pause_after = 100\nretry = { first = "1h", max = "1h" }'
    daemon = await daemons(one_lane(tmp_path, port, f"http://127.0.0.1:{free_port()}/x", settings))
    _, reply, _ = await daemon.post("/hooks/app", {"n": 1})
    failed = await daemon.wait_log("delivery.failed", event_id=reply["id"])
    assert failed["retry_in_s"] > 60  # jittered, but far off
    daemon.config_path.write_text(one_lane(tmp_path, port, svc.url, settings))
    await reload_and_wait(daemon, "config.reloaded")
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"])
    assert svc.event_ids() == [reply["id"]]


async def test_failures_of_the_old_url_do_not_pause_the_fixed_target(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Attempts still hanging at the old URL when a reload fixes it fail afterwards: their
    failures say nothing of the new URL, so they neither pause the target nor wait out a
    backoff; each is sent to the new URL at once."""
    old, new = await receivers(), await receivers()
    old.gate = asyncio.Event()
    old.default = (503, {}, b"down")
    port = free_port()
    settings = 'concurrency = 4\npause_after = 3\nretry = { first = "1h", max = "1h" }'
    daemon = await daemons(one_lane(tmp_path, port, old.url, settings))
    ids = [(await daemon.post("/hooks/app", {"n": n}))[1]["id"] for n in range(4)]
    await eventually(lambda: old.current == 4)
    daemon.config_path.write_text(one_lane(tmp_path, port, new.url, settings))
    await reload_and_wait(daemon, "config.reloaded")
    old.gate.set()  # the four attempts of the old URL fail
    await eventually(lambda: sorted(new.event_ids()) == sorted(ids))
    assert not daemon.events("target.paused")


async def test_a_reload_that_changes_only_the_timeout_keeps_a_retry_after(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A target that answered 429 with `Retry-After: 600` is not tried again early because
    a reload changed its timeout: the same endpoint asked for the wait (only a new URL or
    method makes waiting retries due at once)."""
    svc = await receivers()
    svc.script.append((429, {"Retry-After": "600"}, b"slow down"))
    port = free_port()
    settings = 'pause_after = 100\nretry = { first = "1s", max = "1h" }\ntimeout = "10s"'
    daemon = await daemons(one_lane(tmp_path, port, svc.url, settings))
    _, reply, _ = await daemon.post("/hooks/app", {"n": 1})
    await daemon.wait_log("delivery.failed", event_id=reply["id"])
    daemon.config_path.write_text(one_lane(tmp_path, port, svc.url, settings.replace("10s", "11s")))
    await reload_and_wait(daemon, "config.reloaded")  # logged once the lanes are reconfigured
    [(next_at_ms,)] = daemon.query("SELECT next_at_ms FROM deliveries")
    assert next_at_ms > time.time() * 1000 + 500_000
