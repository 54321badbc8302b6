"""End-to-end process behaviour: start, stop, crash and restart of the real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from relay.daemon import OpenFilesWatch

from conftest import Daemon, Receiver, eventually, free_port, server_toml

DaemonFactory = Callable[..., Awaitable[Daemon]]
ReceiverFactory = Callable[[], Awaitable[Receiver]]


def relay_config(tmp_path: Path, url: str, listen_port: int = 0, sync: str = "full") -> str:
    return (
        server_toml(tmp_path, listen_port=listen_port, sync=f'"{sync}"')
        + f"""
[sources.app]
[targets.svc]
url = "{url}"
concurrency = 8
retry = {{ attempts = 50, first = "50ms", max = "300ms" }}
[[routes]]
name = "app-to-svc"
source = "app"
targets = ["svc"]
"""
    )


async def test_started_line_reports_the_journal_settings(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """relay.started says what is running, with PRAGMA synchronous read back from SQLite."""
    receiver = await receivers()
    daemon = await daemons(relay_config(tmp_path, receiver.url, sync="normal"))
    started = await daemon.wait_log("relay.started")
    assert started is not None
    assert started["sync"] == "normal"
    assert started["synchronous"] == "normal"
    assert (started["sources"], started["routes"], started["targets"], started["pending"]) == (
        1,
        1,
        1,
        0,
    )
    assert started["level"] == "info"
    assert started["ts"].endswith("Z")
    async with aiohttp.ClientSession() as session:
        async with session.get(daemon.admin_url("/healthz")) as response:
            assert response.status == 200
        async with session.get(daemon.admin_url("/readyz")) as response:
            assert response.status == 200
    assert daemon.query("PRAGMA journal_mode") == [("wal",)]


async def test_sigterm_leaves_pending_work_for_the_next_start(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Events accepted while the target is down survive SIGTERM and are delivered after restart."""
    port = free_port()  # nothing listens here yet: the target is down
    daemon = await daemons(relay_config(tmp_path, f"http://127.0.0.1:{port}/hook"))
    accepted = []
    for n in range(10):
        status, reply, _ = await daemon.post("/hooks/app", {"n": n})
        assert status == 202
        accepted.append(reply["id"])
    await daemon.wait_log("delivery.failed")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait() == 0
    stopping = await daemon.wait_log("relay.stopping")
    assert stopping is not None
    assert stopping["pending"] == 10
    assert await daemon.wait_log("relay.stopped") is not None
    receiver = Receiver(port=port)
    await receiver.start()
    try:
        await daemon.start()
        assert await daemon.wait_log("relay.started", pending=10) is not None
        await eventually(lambda: sorted(set(receiver.event_ids())) == sorted(accepted))
    finally:
        await receiver.stop()


async def test_sigterm_lets_in_flight_requests_finish(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A request in flight at SIGTERM is allowed to finish within shutdown_grace and recorded."""
    receiver = await receivers()
    receiver.gate = asyncio.Event()
    daemon = await daemons(relay_config(tmp_path, receiver.url))
    _, reply, _ = await daemon.post("/hooks/app", {"x": 1})
    await eventually(lambda: receiver.current == 1)
    daemon.signal(signal.SIGTERM)
    await daemon.wait_log("relay.stopping")
    assert await daemon.ready() == 503
    receiver.gate.set()
    assert await daemon.wait() == 0
    assert await daemon.wait_log("delivery.succeeded", event_id=reply["id"]) is not None
    assert daemon.query("SELECT status FROM deliveries") == [("delivered",)]
    # its outcome was committed before the daemon said it stopped (found by review)
    names = [line["event"] for line in daemon.lines]
    assert names.index("delivery.succeeded") < names.index("relay.stopped")
    stopped = daemon.find("relay.stopped")
    assert stopped is not None
    assert stopped["pending"] == 0


async def test_second_sigint_exits_at_once(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A second Ctrl-C does not wait for the grace period."""
    receiver = await receivers()
    receiver.gate = asyncio.Event()  # never set: the request would hang for shutdown_grace
    daemon = await daemons(relay_config(tmp_path, receiver.url))
    await daemon.post("/hooks/app", {"x": 1})
    await eventually(lambda: receiver.current == 1)
    daemon.signal(signal.SIGINT)
    await daemon.wait_log("relay.stopping")
    daemon.signal(signal.SIGINT)
    assert await daemon.wait(timeout_s=3) == 1
    receiver.gate.set()


async def test_a_daemon_whose_log_reader_is_gone_still_stops(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """`relay run | jq` with jq gone: the broken stdout is reported once on stderr, the
    daemon keeps working, and a second Ctrl-C still stops it at once."""
    receiver = await receivers()
    receiver.gate = asyncio.Event()  # never set: the request would hang for shutdown_grace
    daemon = await daemons(relay_config(tmp_path, receiver.url))
    await daemon.post("/hooks/app", {"x": 1})
    await eventually(lambda: receiver.current == 1)
    assert daemon.process is not None
    daemon._readers[0].cancel()  # stop reading stdout, then close our end of the pipe
    stdout = daemon.process._transport.get_pipe_transport(1)  # type: ignore[attr-defined]
    stdout.close()
    daemon.signal(signal.SIGINT)  # logs relay.stopping into the closed pipe
    await eventually(lambda: "log output failed" in "".join(daemon.stderr))
    daemon.signal(signal.SIGINT)
    assert await daemon.wait(timeout_s=5) == 1
    assert "".join(daemon.stderr).count("log output failed") == 1
    receiver.gate.set()


async def test_nothing_acknowledged_is_lost_across_sigkill(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Events sent while the daemon is SIGKILLed and restarted: every 2xx is delivered."""
    receiver = await receivers()
    port = free_port()
    daemon = await daemons(relay_config(tmp_path, receiver.url, listen_port=port))
    acknowledged: set[str] = set()
    url = f"http://127.0.0.1:{port}/hooks/app"
    goal, max_requests = 300, 3000  # bounded in count; each request bounded in time

    async def sender(worker: int) -> None:
        async with aiohttp.ClientSession() as session:
            for n in range(max_requests // 4):
                if len(acknowledged) >= goal:
                    return
                try:
                    async with session.post(
                        url,
                        data=orjson.dumps({"worker": worker, "n": n}),
                        headers={"Content-Type": "application/json"},
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as response:
                        if response.status == 202:
                            acknowledged.add((await response.json())["id"])
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.02)  # the daemon is down: pace the retries

    senders = [asyncio.create_task(sender(w)) for w in range(4)]
    rng = random.Random(7)
    for _ in range(4):  # kill -9 at a random moment, four times, restarting each time
        target = len(acknowledged) + rng.randint(10, 60)
        await eventually(lambda t=target: len(acknowledged) >= t)
        await daemon.kill()
        await daemon.start()
    await asyncio.gather(*senders)
    assert len(acknowledged) >= goal
    await eventually(lambda: acknowledged <= set(receiver.event_ids()), timeout_s=60)
    await daemon.stop()
    with contextlib.closing(sqlite3.connect(tmp_path / "relay.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        journaled = {row[0] for row in conn.execute("SELECT id FROM events")}
    assert acknowledged <= journaled


async def test_retention_and_checkpoint_run_from_the_start(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """Finished events past `retention` are deleted, pending ones stay; the WAL is checkpointed."""
    config = relay_config(tmp_path, f"http://127.0.0.1:{free_port()}/down")
    daemon = await daemons(config.replace('sync = "full"', 'sync = "full"\nretention = "1h"'))
    _, pending, _ = await daemon.post("/hooks/app", {"kept": "pending"})
    await daemon.stop()
    old_ms = 1_000_000  # 1970: far past retention
    with contextlib.closing(sqlite3.connect(tmp_path / "relay.db")) as conn, conn:
        conn.execute("UPDATE events SET received_at_ms = ?", (old_ms,))
        for n in range(3):
            conn.execute(
                "INSERT INTO events (id, source, received_at_ms, method, path, query, status,"
                " routes) VALUES (?, 'app', ?, 'POST', '/hooks/app', '', ?, '[]')",
                (f"evt_OLD{n}", old_ms, ["delivered", "dead", "unrouted"][n]),
            )
            conn.execute(
                "INSERT INTO payloads (event_id, headers, body) VALUES (?, '[]', x'')",
                (f"evt_OLD{n}",),
            )
    await daemon.start()
    pruned = await daemon.wait_log("journal.pruned")
    assert pruned["events"] == 3
    await daemon.wait_log("journal.checkpointed")
    assert daemon.query("SELECT id FROM events") == [(pending["id"],)]


def removal_config(tmp_path: Path, *, old: str | None, routes_to_svc2: bool, svc2: str) -> str:
    """Source `app` fans out to `old` (20 routes, when present) and to `svc2` (route `to-svc2`)."""
    text = server_toml(tmp_path) + f'[sources.app]\n[targets.svc2]\nurl = "{svc2}"\n'
    text += 'retry = { attempts = 50, first = "50ms", max = "200ms" }\n'
    if old is not None:
        text += f'[targets.old]\nurl = "{old}"\n'
        for n in range(20):
            text += f'[[routes]]\nname = "to-old-{n}"\nsource = "app"\ntargets = ["old"]\n'
    if routes_to_svc2:
        text += '[[routes]]\nname = "to-svc2"\nsource = "app"\ntargets = ["svc2"]\n'
    return text


async def stop_with_pending(
    tmp_path: Path, daemons: DaemonFactory, events: int
) -> tuple[Daemon, list[str]]:
    """A daemon whose targets are down, stopped with `events` events waiting for both."""
    down = f"http://127.0.0.1:{free_port()}/down"
    daemon = await daemons(removal_config(tmp_path, old=down, routes_to_svc2=True, svc2=down))
    ids = []
    for n in range(events):
        status, reply, _ = await daemon.post("/hooks/app", {"n": n})
        assert (status, reply["deliveries"]) == (202, 21)
        ids.append(reply["id"])
    await daemon.wait_log("delivery.failed")
    assert await daemon.stop() == 0
    return daemon, ids


async def test_a_target_or_route_removed_while_relay_was_stopped_ends_its_deliveries(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Started on a config without a target that still has waiting deliveries, relay makes
    them dead ("target removed") at once, each with a `delivery.dead` line; those of a
    route removed while it was stopped end dead when they next fall due, never sent."""
    daemon, ids = await stop_with_pending(tmp_path, daemons, events=3)
    svc2 = await receivers()  # the target stays, now up; its route is gone
    daemon.config_path.write_text(
        removal_config(tmp_path, old=None, routes_to_svc2=False, svc2=svc2.url)
    )
    count = len(daemon.lines)
    await daemon.start()
    await eventually(lambda: len(daemon.events("delivery.dead")) == 63)
    dead = daemon.lines[count:]
    assert {(d["target"], d["reason"]) for d in dead if d["event"] == "delivery.dead"} == {
        ("old", "target removed"),
        ("svc2", "target removed"),
    }
    rows = daemon.query("SELECT target, status, COUNT(*) FROM deliveries GROUP BY target, status")
    assert rows == [("old", "dead", 60), ("svc2", "dead", 3)]
    assert svc2.requests == []
    assert sorted({d["event_id"] for d in daemon.events("delivery.dead")}) == sorted(ids)


async def test_a_failed_start_up_sweep_is_retried_until_it_succeeds(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """When the journal cannot be written at start (here: a file size limit, as a full disk
    would), the deliveries of a removed target stay pending and relay says why; once the
    disk takes writes again, maintenance repeats the sweep and they end dead, each once."""
    daemon, _ = await stop_with_pending(tmp_path, daemons, events=30)
    down = f"http://127.0.0.1:{free_port()}/down"
    daemon.config_path.write_text(
        removal_config(tmp_path, old=None, routes_to_svc2=True, svc2=down)
    )
    limit_bytes = 32768  # room for the WAL index (-shm), not for the sweep's WAL frames
    daemon.preexec = lambda: resource.setrlimit(
        resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY)
    )
    count = len(daemon.lines)
    await daemon.start()

    def since_start(event: str) -> list[dict[str, Any]]:
        return [line for line in daemon.lines[count:] if line["event"] == event]

    def sweep_failed() -> bool:  # the lane of svc2 fails to record its attempts too
        return any("delivery_id" not in line for line in since_start("journal.write_failed"))

    await eventually(sweep_failed)
    pending = "SELECT COUNT(*) FROM deliveries WHERE target = 'old' AND status = 'pending'"
    assert daemon.query(pending) == [(600,)]
    assert daemon.process is not None
    resource.prlimit(daemon.process.pid, resource.RLIMIT_FSIZE, (-1, -1))
    await eventually(lambda: len(since_start("delivery.dead")) >= 600)
    dead = since_start("delivery.dead")
    assert len(dead) == len({line["delivery_id"] for line in dead}) == 600
    assert {(line["target"], line["reason"]) for line in dead} == {("old", "target removed")}
    assert daemon.query(pending) == [(0,)]


async def test_no_attempt_starts_after_sigterm_while_a_request_is_still_arriving(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """At SIGTERM the lanes stop taking work at once, not when the last inbound request is
    done: with a sender still trickling its body, the attempt in flight finishes and the
    deliveries behind it stay pending for the next start."""
    receiver = await receivers()
    receiver.gate = asyncio.Event()
    text = relay_config(tmp_path, receiver.url).replace("concurrency = 8", "concurrency = 1")
    daemon = await daemons(text.replace('sync = "full"', 'sync = "full"\nread_timeout = "60s"'))
    for n in range(3):
        await daemon.post("/hooks/app", {"n": n})
    await eventually(lambda: receiver.current == 1)
    host, port = daemon.listen.rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /hooks/app HTTP/1.1\r\nHost: relay\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    daemon.signal(signal.SIGTERM)
    await daemon.wait_log("relay.stopping")
    receiver.gate.set()  # the attempt in flight succeeds; the lane must not take the next
    await daemon.wait_log("delivery.succeeded")
    await eventually(
        lambda: daemon.query("SELECT count(*) FROM deliveries WHERE status = 'delivered'") == [(1,)]
    )
    writer.close()  # the last inbound request goes away: the daemon can stop
    assert await daemon.wait() == 0
    assert len(receiver.requests) == 1
    stopped = await daemon.wait_log("relay.stopped")
    assert stopped["pending"] == 2


def test_open_files_are_reported_once_per_crossing_of_the_limit() -> None:
    """Near the open-file limit (90%) relay warns once, and says so again only after it
    has dropped below 80% and come back."""
    watch = OpenFilesWatch()
    assert watch.check(50, 100) is None
    assert watch.check(90, 100) == "relay.files_near_limit"
    assert watch.check(99, 100) is None
    assert watch.check(85, 100) is None
    assert watch.check(79, 100) == "relay.files_ok"
    assert watch.check(95, 100) == "relay.files_near_limit"


async def test_a_daemon_near_its_open_file_limit_says_so(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Idle connections that use up the open-file limit (past it, new connections wait
    unanswered) make the daemon log `relay.files_near_limit` with the counts."""
    receiver = await receivers()
    limit = 96
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    daemon = await daemons(
        relay_config(tmp_path, receiver.url),
        preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard)),
    )
    host, port = daemon.listen.rsplit(":", 1)
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(limit)]
    near = await daemon.wait_log("relay.files_near_limit")
    assert near["limit"] == limit
    assert near["open_files"] >= 0.9 * limit
    assert near["level"] == "warning"
    for _, writer in connections:
        writer.close()
