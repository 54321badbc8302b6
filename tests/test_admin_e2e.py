"""End-to-end admin API and its commands: the real daemon, real receivers, the real `relay` CLI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import re
import select
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog

from relay import ingress, logs

from conftest import DEADLINE_S, REPO, Daemon, Receiver, eventually, free_port, server_toml

DaemonFactory = Callable[..., Awaitable[Daemon]]
ReceiverFactory = Callable[[], Awaitable[Receiver]]

FAST_RETRY = 'retry = { attempts = 5, first = "50ms", max = "200ms" }'


def one_target(tmp_path: Path, url: str, target_settings: str = FAST_RETRY, **server: str) -> str:
    """Source `app` (and `other`, unrouted) to one target `svc`; admin on a fixed port."""
    return (
        server_toml(tmp_path, admin_port=free_port(), **server)
        + f"""
[sources.app]
[sources.other]
[targets.svc]
url = "{url}"
{target_settings}
[[routes]]
name = "app-to-svc"
source = "app"
targets = ["svc"]
"""
    )


async def api(
    daemon: Daemon,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One admin API request: (status, JSON answer, headers)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = orjson.dumps(body) if body is not None else None
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, daemon.admin_url(path), data=data, headers=headers) as response,
    ):
        return response.status, orjson.loads(await response.read()), dict(response.headers)


async def get(daemon: Daemon, path: str) -> dict[str, Any]:
    status, answer, _ = await api(daemon, "GET", path)
    assert status == 200, answer
    return answer


async def event_status(daemon: Daemon, event_id: str) -> str:
    return str((await get(daemon, f"/api/events/{event_id}"))["status"])


async def relay_cli(*args: str) -> tuple[int, str, str]:
    """Run `relay ARGS...` to the end: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(REPO),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), DEADLINE_S)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def start_tail(daemon: Daemon, *args: str) -> asyncio.subprocess.Process:
    """`relay tail` running, and known to be subscribed (it printed a record of a webhook)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "tail", "-c", str(daemon.config_path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(REPO),
    )  # fmt: skip
    assert process.stdout is not None
    stdout = process.stdout

    async def subscribed() -> bool:
        await daemon.post("/hooks/app", {"probe": True})
        try:
            return bool(await asyncio.wait_for(stdout.readline(), 0.5))
        except TimeoutError:
            return False

    await eventually(subscribed, interval_s=0)
    return process


async def test_status_counts_requests_per_source_and_shows_each_target(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """/api/status: per-source counts by outcome, the routes, and per target queue and pause."""
    receiver = await receivers()
    down_port = free_port()
    down = f"http://127.0.0.1:{down_port}/hook"
    daemon = await daemons(
        server_toml(tmp_path)
        + f"""
[sources.app]
verify = {{ scheme = "token", header = "X-Token", secret = "s3cret", id_header = "X-Id" }}
dedupe = "1h"
[targets.svc]
url = "{receiver.url}"
[targets.down]
url = "{down}"
pause_after = 1
retry = {{ attempts = 5, first = "1h", max = "1h" }}
[[routes]]
name = "app-to-both"
source = "app"
targets = ["svc", "down"]
"""
    )
    for n, delivery_id in enumerate(["a", "b", "a"]):
        status, _, _ = await daemon.post(
            "/hooks/app", {"n": n}, {"X-Token": "s3cret", "X-Id": delivery_id}
        )
        assert status == (200 if n == 2 else 202)
    status, _, _ = await daemon.post("/hooks/app", {"n": 3}, {"X-Token": "wrong"})
    assert status == 401
    await daemon.wait_log("target.paused", target="down")

    async def settled() -> dict[str, Any] | None:
        answer = await get(daemon, "/api/status")
        done = answer["targets"]["svc"]["queue_depth"] == 0
        return answer if done and answer["targets"]["down"]["queue_depth"] == 2 else None

    answer = await eventually(settled)
    assert answer["sources"] == {
        "app": {"received": 4, "accepted": 2, "duplicate": 1, "rejected": 1, "handshake": 0}
    }
    assert answer["routes"] == ["app-to-both"]
    assert answer["targets"]["svc"] == {
        "queue_depth": 0, "in_flight": 0, "paused": False, "state": "open",
        "paused_until": None, "last_error": None,
    }  # fmt: skip
    paused = answer["targets"]["down"]
    assert paused["paused"] is True
    assert paused["state"] == "paused"
    assert paused["paused_until"].endswith("Z")
    assert paused["last_error"] == (
        f"cannot connect to 127.0.0.1:{down_port}:"
        f" [Errno 111] Connect call failed ('127.0.0.1', {down_port})"
    )
    assert answer["ready"] is True
    assert len(receiver.requests) == 2


async def test_events_are_listed_newest_first_and_paged_with_a_cursor(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """/api/events: newest first, filtered by source and status, `next` pages to the end."""
    daemon = await daemons(one_target(tmp_path, "log:"))
    app_ids = [(await daemon.post("/hooks/app", {"n": n}))[1]["id"] for n in range(5)]
    _, other, _ = await daemon.post("/hooks/other", {"n": "unrouted"})
    everything = await get(daemon, "/api/events")
    assert [e["id"] for e in everything["events"]] == [other["id"], *reversed(app_ids)]
    assert everything["next"] is None
    newest = everything["events"][0]
    assert newest == {
        "id": other["id"], "source": "other", "received_at": newest["received_at"],
        "status": "unrouted", "deliveries": 0,
    }  # fmt: skip
    assert newest["received_at"].endswith("Z")

    seen: list[str] = []
    pages = 0
    cursor = ""
    while True:
        page = await get(daemon, f"/api/events?source=app&limit=2{cursor}")
        pages += 1
        seen += [e["id"] for e in page["events"]]
        if page["next"] is None:
            break
        assert page["next"] == page["events"][-1]["id"]
        cursor = f"&before={page['next']}"
    assert (seen, pages) == (list(reversed(app_ids)), 3)
    assert [e["id"] for e in (await get(daemon, "/api/events?status=unrouted"))["events"]] == [
        other["id"]
    ]

    async def all_delivered() -> bool:
        page = await get(daemon, "/api/events?source=app&status=delivered")
        return len(page["events"]) == 5 and all(e["deliveries"] == 1 for e in page["events"])

    await eventually(all_delivered)
    for bad in ("limit=0", "limit=501", "limit=x", "status=bogus", "before=nope", "stauts=dead"):
        status, answer, _ = await api(daemon, "GET", f"/api/events?{bad}")
        assert status == 400, bad
        assert set(answer) == {"error"}
        assert "\n" not in answer["error"]


async def test_event_detail_shows_the_request_route_decisions_and_every_attempt(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """/api/events/{id}: method, path, headers, body, routes, and a 500-then-200 attempt log."""
    receiver = await receivers()
    receiver.script.append((500, {}, b"try again"))
    daemon = await daemons(one_target(tmp_path, receiver.url))
    body = b'{"hello": "world"}'
    _, accepted, _ = await daemon.post("/hooks/app?x=1", body, {"X-Custom": "yes"})
    event_id = accepted["id"]
    await eventually(lambda: len(receiver.requests) == 2)

    async def delivered() -> dict[str, Any] | None:
        event = await get(daemon, f"/api/events/{event_id}")
        return event if event["status"] == "delivered" else None

    event = await eventually(delivered)
    assert (event["id"], event["source"], event["method"]) == (event_id, "app", "POST")
    assert (event["path"], event["query"]) == ("/hooks/app", "x=1")
    assert ["X-Custom", "yes"] in event["headers"]
    assert (event["body"], event["body_encoding"]) == (body.decode(), "utf-8")
    assert event["received_at"].endswith("Z")
    assert event["finished_at"].endswith("Z")
    assert event["routes"] == [{"name": "app-to-svc", "matched": True, "error": None}]
    [delivery] = event["deliveries"]
    assert delivery["id"] == receiver.requests[0].headers["webhook-id"]
    assert (delivery["route"], delivery["target"]) == ("app-to-svc", "svc")
    assert (delivery["status"], delivery["attempts"], delivery["next_at"]) == ("delivered", 2, None)
    assert delivery["reason"] is None
    log = delivery["attempt_log"]
    assert [(a["n"], a["status"], a["error"]) for a in log] == [(1, 500, None), (2, 200, None)]
    assert log[0]["response"] == "try again"
    assert all(a["at"].endswith("Z") and a["ms"] >= 0 for a in log)

    binary = b"\xff\xfe\x00 not text"
    _, accepted, _ = await daemon.post(
        "/hooks/other", binary, {"Content-Type": "application/octet-stream"}
    )
    other = await get(daemon, f"/api/events/{accepted['id']}")
    assert other["body_encoding"] == "base64"
    assert base64.b64decode(other["body"]) == binary
    assert (other["status"], other["routes"], other["deliveries"]) == ("unrouted", [], [])
    for unknown in ("evt_" + "0" * 26, "nonsense"):
        status, answer, _ = await api(daemon, "GET", f"/api/events/{unknown}")
        assert (status, answer) == (404, {"error": f"no event {unknown}"})


async def test_replay_by_id_restarts_the_retry_budget_and_resends_delivered_ones(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A replayed dead delivery gets its whole retry budget again; attempt numbers keep counting."""
    receiver = await receivers()
    receiver.default = (500, {}, b"down")
    retry = 'retry = { attempts = 2, first = "50ms", max = "100ms" }\npause_after = 100'
    daemon = await daemons(one_target(tmp_path, receiver.url, retry))
    _, accepted, _ = await daemon.post("/hooks/app", {"n": 1})
    event_id = accepted["id"]

    async def dead_after(count: int) -> bool:
        return len(receiver.requests) == count and await event_status(daemon, event_id) == "dead"

    await eventually(lambda: dead_after(2))
    status, answer, _ = await api(daemon, "POST", f"/api/events/{event_id}/replay")
    assert (status, answer) == (200, {"requeued": 1, "skipped": 0})
    await eventually(lambda: dead_after(4))  # two more attempts: the budget of 2 restarted
    assert [r.headers["X-Relay-Attempt"] for r in receiver.requests] == ["1", "2", "3", "4"]
    [delivery] = (await get(daemon, f"/api/events/{event_id}"))["deliveries"]
    assert [a["n"] for a in delivery["attempt_log"]] == [1, 2, 3, 4]
    assert delivery["replay_base"] == 2
    assert "2 attempts" in delivery["reason"]

    receiver.default = (200, {}, b"ok")
    assert (await api(daemon, "POST", f"/api/events/{event_id}/replay"))[1]["requeued"] == 1

    async def delivered_after(count: int) -> bool:
        done = await event_status(daemon, event_id) == "delivered"
        return done and len(receiver.requests) == count

    await eventually(lambda: delivered_after(5))
    # A delivered event replayed by id is sent again (the receiver lost it, say).
    assert (await api(daemon, "POST", f"/api/events/{event_id}/replay"))[1]["requeued"] == 1
    await eventually(lambda: delivered_after(6))
    assert receiver.requests[-1].headers["X-Relay-Attempt"] == "6"
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1

    unknown = "evt_" + "0" * 26
    assert (await api(daemon, "POST", f"/api/events/{unknown}/replay"))[0] == 404
    status, answer, _ = await api(daemon, "GET", f"/api/events/{event_id}/replay")
    assert status == 405
    assert "POST" in answer["error"]


async def test_replay_dead_by_target_route_and_since_from_the_command_line(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """`relay replay --dead --target T` re-queues that target's dead deliveries once it is fixed."""
    flaky, fine = await receivers(), await receivers()
    flaky.default = (400, {}, b"bad request")
    daemon = await daemons(
        server_toml(tmp_path, admin_port=free_port())
        + f"""
[sources.app]
[targets.flaky]
url = "{flaky.url}"
retry = {{ attempts = 1 }}
[targets.fine]
url = "{fine.url}"
[[routes]]
name = "app-to-both"
source = "app"
targets = ["flaky", "fine"]
"""
    )
    config = str(daemon.config_path)
    ids = [(await daemon.post("/hooks/app", {"n": n}))[1]["id"] for n in range(3)]

    async def all_dead() -> bool:
        return [await event_status(daemon, i) for i in ids] == ["dead"] * 3

    await eventually(all_dead)
    # One dead delivery whose target has since left the config: skipped, and said so.
    with contextlib.closing(sqlite3.connect(daemon.journal)) as conn, conn:
        conn.execute(
            "UPDATE deliveries SET target = 'gone' WHERE event_id = ? AND target = 'flaky'",
            (ids[0],),
        )

    assert await relay_cli("replay", "-c", config, "--dead", "--target", "fine") == (
        0, "requeued 0 deliveries\n", "",
    )  # fmt: skip
    code, out, _ = await relay_cli("replay", "-c", config, "--dead", "--since", "2999-01-01T00:00Z")
    assert (code, out) == (0, "requeued 0 deliveries\n")
    flaky.default = (200, {}, b"ok")
    code, out, err = await relay_cli(
        "replay", "-c", config, "--dead", "--target", "flaky", "--route", "app-to-both",
        "--since", "1h", "--json",
    )  # fmt: skip
    assert (code, orjson.loads(out), err) == (0, {"requeued": 2, "skipped": 0}, "")

    async def redelivered() -> bool:
        return [await event_status(daemon, i) for i in ids] == ["dead", "delivered", "delivered"]

    await eventually(redelivered)
    assert [r.headers["X-Relay-Attempt"] for r in flaky.requests] == ["1", "1", "1", "2", "2"]
    code, out, _ = await relay_cli("replay", "-c", config, "--dead")
    assert (code, out) == (
        0, "requeued 0 deliveries; skipped 1 whose target is not in the daemon's config\n"
    )  # fmt: skip
    code, _, err = await relay_cli("replay", "-c", config, "--dead", "--since", "yesterday")
    assert code == 2
    assert err.splitlines()[-1].startswith(
        'relay replay: error: argument --since: "yesterday" is neither'
    )
    assert (await relay_cli("replay", "-c", config))[0] == 2
    assert (await relay_cli("replay", "-c", config, ids[0], "--dead"))[0] == 2
    status, answer, _ = await api(daemon, "POST", "/api/replay", {"status": "pending"})
    assert status == 400
    assert "cannot be replayed" in answer["error"]


async def test_replay_of_a_target_or_route_not_in_the_config_is_refused(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """`relay replay --dead --target nosuch` says the name is unknown (exit 2) instead of
    "requeued 0"; the API answers 400 the same way, also when only the daemon's running
    config lacks the name (a target added to the file but not reloaded yet)."""
    daemon = await daemons(one_target(tmp_path, "log:"))
    config = str(daemon.config_path)
    for option, line in (
        ("--target", 'target: "nosuch" is not in {} (known: svc)'),
        ("--route", 'route: "nosuch" is not in {} (known: app-to-svc)'),
    ):
        assert await relay_cli("replay", "-c", config, "--dead", option, "nosuch") == (
            2, "", f"relay: {line.format(config)}\n"
        )  # fmt: skip
        key = option.removeprefix("--")
        status, answer, _ = await api(daemon, "POST", "/api/replay", {key: "nosuch"})
        assert (status, answer) == (400, {"error": line.format("the daemon's config")})
    daemon.config_path.write_text(
        daemon.config_path.read_text() + '[targets.later]\nurl = "log:"\n'
    )
    assert await relay_cli("replay", "-c", config, "--dead", "--target", "later") == (
        1, "", 'relay: target: "later" is not in the daemon\'s config (known: svc)\n'
    )  # fmt: skip
    assert (await relay_cli("replay", "-c", config, "--dead", "--target", "svc"))[0] == 0


async def test_admin_token_guards_the_api_but_not_health(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """With admin_token set, /api/* needs the bearer token (401 otherwise); /healthz stays open."""
    daemon = await daemons(one_target(tmp_path, "log:", admin_token='"tok-123"'))
    for token in (None, "wrong", "tok-1234"):
        for method, path in (("GET", "/api/status"), ("GET", "/api/tail"), ("POST", "/api/reload")):
            status, answer, headers = await api(daemon, method, path, token=token)
            assert status == 401, (token, path)
            assert set(answer) == {"error"}
            assert headers["WWW-Authenticate"].startswith("Bearer")
    assert (await api(daemon, "GET", "/api/nothing-here"))[0] == 401  # no hint of what exists
    assert (await api(daemon, "GET", "/api/status", token="tok-123"))[0] == 200
    assert (await api(daemon, "GET", "/api/nothing-here", token="tok-123"))[0] == 404
    assert (await api(daemon, "GET", "/healthz"))[0] == 200
    assert await daemon.ready() == 200
    code, out, _ = await relay_cli("status", "-c", str(daemon.config_path))
    assert code == 0
    assert "svc" in out


async def test_a_path_with_an_extra_slash_is_no_endpoint(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """The admin API takes paths as given: `/api/events/` (an empty event id) or
    `/api//events` is a 404, not the list of events; `/api/tail/` is no stream."""
    daemon = await daemons(one_target(tmp_path, "log:"))
    assert (await api(daemon, "GET", "/api/events"))[0] == 200
    for method, path in (
        ("GET", "/api/events/"), ("GET", "/api//events"), ("GET", "/api/status/"),
        ("POST", "/api/events//replay"), ("POST", "/api/replay/"),
    ):  # fmt: skip
        status, answer, _ = await api(daemon, method, path)
        assert (status, answer) == (404, {"error": f"no such endpoint {path}"})
    status, answer, _ = await api(daemon, "GET", "/api/tail/")
    assert (status, answer) == (404, {"error": "no such endpoint /api/tail/"})


async def test_a_limit_with_a_sign_space_or_underscore_is_a_400(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """`GET /api/events?limit=` takes plain digits: `5_0` and ` +5` are refused, not read
    as 50 and 5; a limit given twice is refused too, not read as the first."""
    daemon = await daemons(one_target(tmp_path, "log:"))
    assert (await api(daemon, "GET", "/api/events?limit=050"))[0] == 200
    for raw, shown in (("5_0", "5_0"), ("%20%2B5", " +5")):
        status, answer, _ = await api(daemon, "GET", f"/api/events?limit={raw}")
        assert (status, answer) == (
            400, {"error": f'limit: "{shown}" is not a whole number from 1 to 500'}
        )  # fmt: skip
    status, answer, _ = await api(daemon, "GET", "/api/events?limit=1&limit=600")
    assert (status, answer) == (400, {"error": 'query parameter "limit" is given more than once'})


@pytest.mark.parametrize("level", ["debug", "warning"])
async def test_tail_streams_accepted_events_and_attempts_as_server_sent_events(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory, level: str
) -> None:
    """GET /api/tail?source=app: an event.accepted and a delivery.attempt record per webhook,
    whatever the log level (at `warning` the log leaves those lines out; the tail does not)."""
    receiver = await receivers()
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = re.sub(r'admin = "[^"]*"', f'admin = "{admin}"', one_target(tmp_path, receiver.url))
    config = config.replace('listen = "127.0.0.1:0"', f'listen = "{listen}"')
    config = config.replace('level = "debug"', f'level = "{level}"')
    daemon = await daemons(config, listen=listen, admin=admin, quiet=True)
    records: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.admin_url("/api/tail?source=app")) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert await response.content.readline() == b": relay tail\n"  # subscribed
        await daemon.post("/hooks/other", {"not": "this source"})
        _, accepted, _ = await daemon.post("/hooks/app", {"n": 1})
        async with asyncio.timeout(DEADLINE_S):
            while len(records) < 2:
                line = await response.content.readline()
                if line.startswith(b"data: "):
                    records.append(orjson.loads(line[6:]))
                else:
                    assert line in (b"\n", b": keep-alive\n"), line
    event, attempt = records
    assert event["kind"] == "event.accepted"
    assert (event["event_id"], event["source"]) == (accepted["id"], "app")
    assert (event["routes"], event["deliveries"]) == (["app-to-svc"], 1)
    assert attempt["kind"] == "delivery.attempt"
    assert (attempt["event_id"], attempt["target"], attempt["attempt"]) == (
        accepted["id"],
        "svc",
        1,
    )
    assert (attempt["status"], attempt["outcome"]) == (200, "delivered")
    assert attempt["delivery_id"] == receiver.requests[-1].headers["webhook-id"]
    assert all(r["at"].endswith("Z") for r in records)
    status, answer, _ = await api(daemon, "GET", "/api/tail?sauce=app")
    assert (status, "sauce" in answer["error"]) == (400, True)


async def test_status_events_and_event_commands_print_tables_or_json(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """`relay status`, `relay events` and `relay event` read the running daemon; --json is raw."""
    receiver = await receivers()
    daemon = await daemons(one_target(tmp_path, receiver.url))
    config = str(daemon.config_path)
    _, accepted, _ = await daemon.post("/hooks/app", {"hello": "cli"}, {"X-Api-Key": "secret"})
    event_id = accepted["id"]
    await eventually(lambda: daemon.query("SELECT status FROM events") == [("delivered",)])

    code, out, err = await relay_cli("status", "-c", config)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["TARGET", "QUEUE", "IN", "FLIGHT", "STATE", "LAST", "ERROR"]
    assert lines[1].split() == ["svc", "0", "0", "open", "-"]
    assert ["app", "1", "1", "0", "0"] in [line.split() for line in lines]
    assert "routes: app-to-svc" in lines
    code, out, _ = await relay_cli("status", "-c", config, "--json")
    assert orjson.loads(out)["sources"]["app"]["accepted"] == 1

    code, out, _ = await relay_cli("events", "-c", config, "--source", "app", "--limit", "5")
    assert code == 0
    assert out.splitlines()[1].split()[::2] == [event_id, "app", "1"]
    assert "delivered" in out.splitlines()[1]
    code, out, _ = await relay_cli("events", "-c", config, "--status", "dead", "--json")
    assert (code, orjson.loads(out)) == (0, {"events": [], "next": None})
    code, _, err = await relay_cli("events", "-c", config, "--limit", "1000")
    assert (code, err.splitlines()[-1]) == (
        2, 'relay events: error: argument --limit: "1000" is not a whole number from 1 to 500'
    )  # fmt: skip

    code, out, _ = await relay_cli("event", event_id, "-c", config)
    assert code == 0
    assert out.startswith(f"{event_id}  delivered\n")
    assert "X-Api-Key: ***" in out
    assert '{"hello":"cli"}' in out
    assert "match     app-to-svc" in out
    assert "app-to-svc -> svc  delivered after 1 attempt" in out
    assert "HTTP 200" in out
    code, out, _ = await relay_cli("event", event_id, "-c", config, "--show-secrets")
    assert "X-Api-Key: secret" in out
    code, out, _ = await relay_cli("event", event_id, "-c", config, "--json")
    assert orjson.loads(out)["deliveries"][0]["attempt_log"][0]["status"] == 200
    unknown = "evt_" + "0" * 26
    assert await relay_cli("event", unknown, "-c", config) == (
        1,
        "",
        f"relay: no event {unknown}\n",
    )


async def test_tail_command_prints_a_line_per_record_until_ctrl_c_or_the_daemon_stops(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """`relay tail` prints accepted and delivered lines; Ctrl-C exits 0, a stopping daemon 69."""
    receiver = await receivers()
    daemon = await daemons(one_target(tmp_path, receiver.url))
    tail = await start_tail(daemon, "--source", "app")
    assert tail.stdout is not None
    _, accepted, _ = await daemon.post("/hooks/app", {"n": "seen"})
    lines: list[str] = []

    async def both_lines() -> bool:
        assert tail.stdout is not None
        lines.append((await asyncio.wait_for(tail.stdout.readline(), DEADLINE_S)).decode())
        mine = [line for line in lines if accepted["id"] in line]
        return len(mine) == 2

    await eventually(both_lines, interval_s=0)
    mine = [line.split() for line in lines if accepted["id"] in line]
    assert mine[0][1:4] == ["accepted", accepted["id"], "source=app"]
    assert mine[1][1] == "delivered"
    assert "-> svc attempt 1: HTTP 200" in " ".join(mine[1])
    tail.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(tail.wait(), DEADLINE_S) == 0

    tail = await start_tail(daemon, "--json")
    await daemon.stop()
    assert await asyncio.wait_for(tail.wait(), DEADLINE_S) == 69
    assert tail.stderr is not None
    assert (await tail.stderr.read()).decode().startswith("relay: the daemon closed the stream")


async def test_tail_into_a_reader_that_stops_ends_quietly(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """`relay tail | head -n 1` ends at the next record after head quits: exit 1 and no
    "lost the daemon" (the daemon is fine) nor a traceback on stderr."""
    daemon = await daemons(one_target(tmp_path, "log:"))
    read_end, write_end = os.pipe()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "tail", "-c", str(daemon.config_path),
        stdout=write_end, stderr=asyncio.subprocess.PIPE, cwd=str(REPO),
    )  # fmt: skip
    os.close(write_end)

    async def a_line_came() -> bool:
        await daemon.post("/hooks/app", {"probe": True})
        return bool(select.select([read_end], [], [], 0.2)[0])

    await eventually(a_line_came, interval_s=0)
    os.close(read_end)  # the reader is gone: the next record ends relay tail

    async def ended() -> bool:
        await daemon.post("/hooks/app", {"after": True})
        return process.returncode is not None or await _exited(process)

    await eventually(ended, interval_s=0)
    assert process.stderr is not None
    assert (process.returncode, await process.stderr.read()) == (1, b"")


async def _exited(process: asyncio.subprocess.Process) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), 0.2)
    return process.returncode is not None


async def test_commands_exit_69_when_the_daemon_is_not_running(tmp_path: Path) -> None:
    """Every admin command says the daemon is unreachable, on one stderr line, with exit 69."""
    config = tmp_path / "relay.toml"
    config.write_text(one_target(tmp_path, "log:"))
    for command in (
        ["status"], ["events"], ["event", "evt_" + "0" * 26], ["replay", "--dead"],
        ["tail"], ["reload"],
    ):  # fmt: skip
        code, out, err = await relay_cli(*command, "-c", str(config))
        assert (code, out) == (69, ""), command
        assert err.startswith("relay: daemon unreachable at http://127.0.0.1:")
        assert err.count("\n") == 1


async def test_reload_command_prints_the_daemons_answer(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """`relay reload` asks the daemon and reports its answer: 0 ok, 78 refused, 1 otherwise."""
    daemon = await daemons(one_target(tmp_path, "log:"))
    config = daemon.config_path
    text = config.read_text()
    listen_port = free_port()
    # A valid file, then one that only a restart could apply (the daemon refuses it).
    for version in (
        text,
        text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{listen_port}"'),
    ):
        config.write_text(version)
        status, answer, _ = await api(daemon, "POST", "/api/reload")
        code, out, err = await relay_cli("reload", "-c", str(config))
        if status == 200 and answer["ok"]:
            assert (code, out, err) == (0, "reloaded\n", "")
        elif status == 200:
            assert code == 78
            assert answer["errors"]
            assert all(error in err for error in answer["errors"])
        else:
            assert (code, out, err) == (1, "", f"relay: {answer['error']}\n")
        code, out, _ = await relay_cli("reload", "-c", str(config), "--json")
        assert orjson.loads(out) == answer
    assert (await api(daemon, "GET", "/api/reload"))[0] == 405


async def test_an_admin_body_over_its_limit_is_a_413(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """The admin API reads at most 64 KiB of a request body: beyond, a 413 with a reason."""
    daemon = await daemons(one_target(tmp_path, "log:"))
    status, answer, _ = await api(daemon, "POST", "/api/replay", {"ids": ["x" * 70_000]})
    assert status == 413
    assert answer == {"error": "body exceeds max_body 65536 bytes"}
    assert await daemon.ready() == 200


async def test_a_malformed_request_to_the_admin_listener_is_one_log_line(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """A request the admin listener cannot parse (length and chunked together, an oversized
    header) gets a 400 and one `admin.rejected` line with its reason and without the bytes
    it quoted, not a multi-line traceback on stderr."""
    svc = await receivers()
    daemon = await daemons(one_target(tmp_path, svc.url))
    host, port = daemon.admin_url("/").split("//")[1].split("/")[0].rsplit(":", 1)
    for head in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
        b"GET /api/events?token=" + b"s" * 9000 + b" HTTP/1.1\r\nHost: x",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), DEADLINE_S)
        writer.close()
        assert answer.startswith(b"HTTP/1.0 400 Bad Request")
    await eventually(lambda: len(daemon.events("admin.rejected")) == 2)
    reasons = [line["reason"] for line in daemon.events("admin.rejected")]
    assert reasons[0] == "Transfer-Encoding can't be present with Content-Length:"
    assert reasons[1] == "Got more than 8190 bytes when reading"
    assert not [line for line in daemon.lines if line.get("event") == "<not json>"]
    assert "Traceback" not in "".join(daemon.stderr)


def test_an_error_behind_a_500_on_the_admin_listener_is_logged_as_a_bug() -> None:
    """aiohttp's report of an exception that is not a parse error (a bug behind a 500) is
    an `admin.internal_error` line at error level with its traceback, not a rejection."""
    saved = structlog.get_config()
    out = io.BytesIO()
    stream = io.TextIOWrapper(out, write_through=True)  # kept: closing it closes `out`
    logs.configure("json", "warning", stream)
    try:
        try:
            raise KeyError("relay_queue_depth")
        except KeyError:
            record = logging.LogRecord(
                "relay.admin.http", logging.ERROR, __file__, 1, "Error handling request from %s",
                ("127.0.0.1",), sys.exc_info(),
            )  # fmt: skip
        ingress._ADMIN_ERRORS.handle(record)
        logs.flush()
        written = out.getvalue()
    finally:
        structlog.configure(**saved)
        logs.rebind_loggers()
    (line,) = [orjson.loads(raw) for raw in written.splitlines()]
    assert (line["event"], line["level"], line["remote"]) == (
        "admin.internal_error", "error", "127.0.0.1",
    )  # fmt: skip
    assert "KeyError: 'relay_queue_depth'" in line["exception"]
