"""The admin API without HTTP: its parsing, its answers, the journal queries behind it, and
`relay reload`'s exit codes against a scripted admin endpoint."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import MultiDict

from relay import ids
from relay.admin import AdminApi, BadRequest, SourceCounters, replay_filter, since_ms
from relay.config import load
from relay.journal import AttemptRecord, Journal, NewDelivery, NewEvent, Replay, open_journal
from relay.model import Config
from relay.tail import Tail

from conftest import REPO, free_port

NOW_MS = 1_800_000_000_000


def write_config(tmp_path: Path, admin_port: int = 0, token: str = "") -> Config:
    path = tmp_path / "relay.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
admin = "127.0.0.1:{admin_port}"
admin_token = "{token}"
journal = "relay.db"
[sources.app]
[targets.svc]
url = "log:"
[[routes]]
name = "r"
source = "app"
targets = ["svc"]
"""
    )
    return load(path)


@dataclass
class FakeDeliverer:
    lanes: dict[str, Any] = field(default_factory=dict)
    woken: list[str] = field(default_factory=list)

    def notify(self, targets: Any) -> None:
        self.woken += sorted(targets)


@dataclass
class FakeHealth:
    ready: bool = True
    stopping: bool = False


def fixed_id(prefix: str, ms: int, n: int = 0) -> str:
    """An id of millisecond `ms` (ids.event_id never goes back in time within a process)."""
    return prefix + ids.ulid_floor(ms)[:-4] + f"{n:04d}"


def new_event(received_at_ms: int, targets: tuple[str, ...] = ("svc",)) -> NewEvent:
    return NewEvent(
        id=fixed_id("evt_", received_at_ms),
        source="app",
        received_at_ms=received_at_ms,
        method="POST",
        path="/hooks/app",
        query="",
        headers=[("Content-Type", "application/json")],
        body=b"{}",
        routes=[{"name": "r", "matched": True, "error": None}],
        deliveries=[
            NewDelivery(fixed_id("dlv_", received_at_ms, n), "r", target)
            for n, target in enumerate(targets)
        ],
    )


async def finish(journal: Journal, event: NewEvent, outcome: str, n: int = 1) -> None:
    for delivery in event.deliveries:
        await journal.record(
            AttemptRecord(
                delivery_id=delivery.id, event_id=event.id, n=n, started_at_ms=event.received_at_ms,
                ms=1.0, status=200 if outcome == "delivered" else 500, error=None, response=b"",
                outcome=outcome,  # type: ignore[arg-type]
                next_at_ms=0, reason="gave up" if outcome == "dead" else None,
            )
        )  # fmt: skip


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with open_journal(tmp_path / "j.db", "normal") as opened:
        yield opened


def make_api(journal: Journal, config: Config, **kwargs: Any) -> tuple[AdminApi, FakeDeliverer]:
    deliverer = FakeDeliverer()
    api = AdminApi(journal, deliverer, Tail(), FakeHealth(), lambda: config, **kwargs)  # type: ignore[arg-type]
    return api, deliverer


# ---------------------------------------------------------------- parsing


def test_since_is_a_duration_back_from_now_or_an_rfc3339_time() -> None:
    """`since` takes "24h" (back from now) or an RFC 3339 time with a zone; nothing else."""
    assert since_ms("24h", NOW_MS) == NOW_MS - 86_400_000
    assert since_ms("1h30m", NOW_MS) == NOW_MS - 5_400_000
    assert since_ms("2026-11-28T19:00:00Z", NOW_MS) == 1_795_892_400_000
    assert since_ms("2026-11-28T20:00:00+01:00", NOW_MS) == 1_795_892_400_000
    for bad in ("yesterday", "2026-11-28T19:00:00", "-1h", ""):
        with pytest.raises(BadRequest) as caught:
            since_ms(bad, NOW_MS)
        assert caught.value.status == 400


def test_since_beyond_the_years_1_to_9999_is_a_400_not_a_500() -> None:
    """A `since` too far back or ahead to be written as a time (a huge duration, a time
    before year 1 in UTC) is a 400 that says it is out of range; the ends still work, and
    a duration longer than the config's 100 years is fine (it only reaches back)."""
    assert since_ms("0001-01-01T00:00:00Z", NOW_MS) == -62_135_596_800_000
    assert since_ms("9999-12-31T23:59:59.999Z", NOW_MS) == 253_402_300_799_999
    for bad in ("9999999999999d", "9" * 400 + "d", "0001-01-01T00:00:00+14:00"):
        with pytest.raises(BadRequest) as caught:
            since_ms(bad, NOW_MS)
        assert caught.value.status == 400
        assert caught.value.message.endswith("is out of range (years 1 to 9999)")
    assert since_ms("40000d", NOW_MS) == NOW_MS - 40000 * 86_400_000  # over the config's cap


def test_replay_body_is_checked_key_by_key() -> None:
    """POST /api/replay: dead by default, only known string keys, only finished statuses."""
    assert replay_filter(b"", NOW_MS) == Replay()
    assert replay_filter(b'{"target": "ci", "route": "r", "since": "1h"}', NOW_MS) == Replay(
        statuses=("dead",), target="ci", route="r", since_ms=NOW_MS - 3_600_000
    )
    assert replay_filter(b'{"status": "delivered"}', NOW_MS).statuses == ("delivered",)
    for bad, message in (
        (b"[1]", "body must be a JSON object"),
        (b"{", "body is not JSON"),
        (b'{"taget": "ci"}', 'unknown key "taget"'),
        (b'{"target": 1}', "target: expected a string"),
        (b'{"status": "pending"}', 'status: "pending" cannot be replayed'),
    ):
        with pytest.raises(BadRequest) as caught:
            replay_filter(bad, NOW_MS)
        assert caught.value.message.startswith(message)


def test_received_counts_every_outcome() -> None:
    """A source's `received` is the sum of its outcomes; unknown sources read as zeros."""
    counters = SourceCounters()
    for outcome in ("accepted", "accepted", "rejected", "duplicate", "handshake"):
        counters.count("app", outcome)  # type: ignore[arg-type]
    assert counters.of("app") == {
        "received": 5, "accepted": 2, "duplicate": 1, "rejected": 1, "handshake": 1,
    }  # fmt: skip
    assert counters.of("none")["received"] == 0


# ---------------------------------------------------------------- the journal's admin queries


async def test_requeue_restarts_budget_and_age_and_skips_unknown_targets(
    journal: Journal,
) -> None:
    """A re-queued delivery is pending, due now, replay_base = attempts; unknown targets skipped."""
    dead = new_event(NOW_MS - 10_000, ("svc", "gone"))
    delivered = new_event(NOW_MS - 5_000)
    await journal.append(dead)
    await journal.append(delivered)
    await finish(journal, dead, "dead", n=3)
    await finish(journal, delivered, "delivered")
    result = await journal.requeue(Replay(), {"svc"}, NOW_MS)
    assert result is not None
    assert (result.requeued, result.skipped, result.targets) == (1, 1, frozenset({"svc"}))
    rows = await journal.fetch(
        "SELECT target, status, attempts, replay_base, next_at_ms, created_at_ms, last_error"
        " FROM deliveries WHERE event_id = ? ORDER BY target",
        (dead.id,),
    )
    assert rows == [
        ("gone", "dead", 3, 0, 0, NOW_MS - 10_000, "gave up"),
        ("svc", "pending", 3, 3, NOW_MS, NOW_MS, None),
    ]
    assert await journal.fetch(
        "SELECT status, finished_at_ms FROM events WHERE id = ?", (dead.id,)
    ) == [("pending", None)]
    assert await journal.queue_depths() == {"svc": 1}
    by_id = await journal.requeue(Replay(("dead", "delivered"), event_id=delivered.id), {"svc"}, 1)
    assert by_id is not None
    assert by_id.requeued == 1
    missing = Replay(event_id=ids.event_id(NOW_MS))
    assert await journal.requeue(missing, {"svc"}, NOW_MS) is None


async def test_requeue_since_counts_from_the_events_arrival(journal: Journal) -> None:
    """`since` chooses deliveries of events that arrived at or after it."""
    old, new = new_event(NOW_MS - 7_200_000), new_event(NOW_MS - 60_000)
    for event in (old, new):
        await journal.append(event)
        await finish(journal, event, "dead")
    result = await journal.requeue(Replay(since_ms=NOW_MS - 3_600_000), {"svc"}, NOW_MS)
    assert result is not None
    assert result.requeued == 1
    assert [e.id for e in await journal.list_events(status="pending")] == [new.id]


async def test_list_events_pages_newest_first_and_queue_depth_uses_the_pending_index(
    journal: Journal,
) -> None:
    """Events come newest first below `before`; queue depth is one pass over the partial index."""
    events = [new_event(NOW_MS + n, ("svc", "other")) for n in range(5)]
    for event in events:
        await journal.append(event)
    page = await journal.list_events(limit=2)
    assert [e.id for e in page] == [events[4].id, events[3].id]
    assert page[0].deliveries == 2
    below = await journal.list_events(before=page[-1].id, limit=10)
    assert [e.id for e in below] == [e.id for e in reversed(events[:3])]
    assert await journal.list_events(source="nobody") == []
    assert await journal.queue_depths() == {"svc": 5, "other": 5}
    plan = await journal.fetch(
        "EXPLAIN QUERY PLAN SELECT target, count(*) FROM deliveries"
        " WHERE status = 'pending' GROUP BY target"
    )
    assert "INDEX deliveries_due" in " ".join(str(row[-1]) for row in plan)  # no table reads


async def test_get_event_has_deliveries_and_attempts(journal: Journal) -> None:
    """get_event returns the stored request, and each delivery with its attempts in order."""
    event = new_event(NOW_MS)
    await journal.append(event)
    await finish(journal, event, "pending", n=1)
    await finish(journal, event, "delivered", n=2)
    detail = await journal.get_event(event.id)
    assert detail is not None
    assert (detail.method, detail.headers, detail.body) == (
        "POST", [("Content-Type", "application/json")], b"{}",
    )  # fmt: skip
    [delivery] = detail.deliveries
    assert [a.n for a in delivery.attempt_log] == [1, 2]
    assert await journal.get_event(ids.event_id(NOW_MS)) is None


# ---------------------------------------------------------------- AdminApi


async def test_admin_token_is_a_bearer_token(tmp_path: Path, journal: Journal) -> None:
    """With admin_token set: a missing, wrong or non-Bearer Authorization gets 401."""
    api, _ = make_api(journal, write_config(tmp_path, token="t0k"))
    for header in (None, "", "Bearer nope", "Basic dDBr", "t0k", "Bearer t0k2"):
        status, answer = await api.handle("GET", "/api/status", {}, b"", header)
        assert status == 401, header
        assert set(answer) == {"error"}
    for header in ("Bearer t0k", "bearer t0k", "  Bearer   t0k "):
        assert (await api.handle("GET", "/api/status", {}, b"", header))[0] == 200, header
    open_api, _ = make_api(journal, write_config(tmp_path))
    assert (await open_api.handle("GET", "/api/status", {}, b"", None))[0] == 200


async def test_reload_answers(tmp_path: Path, journal: Journal) -> None:
    """POST /api/reload: 501 without a reload function; else the daemon's (ok, errors)."""
    config = write_config(tmp_path)
    api, _ = make_api(journal, config)
    missing = "reload is not available"
    assert await api.handle("POST", "/api/reload", {}, b"", None) == (
        501, {"ok": False, "errors": [missing], "error": missing},
    )  # fmt: skip

    async def refused() -> tuple[bool, list[str]]:
        return False, ["relay.toml: server.listn: unknown key"]

    async def accepted() -> tuple[bool, list[str]]:
        return True, []

    api.reload = refused
    assert await api.handle("POST", "/api/reload", {}, b"", None) == (
        200, {"ok": False, "errors": ["relay.toml: server.listn: unknown key"]},
    )  # fmt: skip
    api.reload = accepted
    assert await api.handle("POST", "/api/reload", {}, b"", None) == (200, {"ok": True})
    assert (await api.handle("GET", "/api/reload", {}, b"", None))[0] == 405


async def test_routing_errors_are_one_line_4xx(tmp_path: Path, journal: Journal) -> None:
    """Unknown endpoints 404, wrong methods 405, unknown query parameters 400."""
    api, _ = make_api(journal, write_config(tmp_path))
    cases = [
        ("GET", "/api/nope", {}, 404),
        ("GET", "/api/", {}, 404),
        ("DELETE", "/api/events", {}, 405),
        ("POST", "/api/status", {}, 405),
        ("GET", "/api/status", {"verbose": "1"}, 400),
        ("GET", "/api/tail", {}, 406),
    ]
    for method, path, query, expected in cases:
        status, answer = await api.handle(method, path, query, b"", None)
        assert (status, set(answer)) == (expected, {"error"}), (method, path)


async def test_limit_is_plain_digits_and_a_parameter_is_given_once(
    tmp_path: Path, journal: Journal
) -> None:
    """`limit` takes plain digits only ("5_0" or " +5" are not 50 or 5, they are a 400),
    and a query parameter given twice (`?limit=1&limit=600`) is a 400 that names it."""
    api, _ = make_api(journal, write_config(tmp_path))
    for good in ("50", "050", "1", "500"):
        assert (await api.handle("GET", "/api/events", {"limit": good}, b"", None))[0] == 200
    for bad in ("5_0", " +5", "+5", "5 ", "0", "501", "\u0665", "9" * 5000):
        status, answer = await api.handle("GET", "/api/events", {"limit": bad}, b"", None)
        assert (status, answer["error"]) == (
            400, f'limit: "{bad}" is not a whole number from 1 to 500'
        ), bad  # fmt: skip
    twice = MultiDict([("limit", "1"), ("limit", "600")])  # as aiohttp hands the query over
    assert await api.handle("GET", "/api/events", twice, b"", None) == (
        400, {"error": 'query parameter "limit" is given more than once'}
    )  # fmt: skip
    repeated_source = MultiDict([("source", "app"), ("source", "app")])
    assert (await api.handle("GET", "/api/events", repeated_source, b"", None))[0] == 400


async def test_replay_wakes_the_lanes_it_touched(tmp_path: Path, journal: Journal) -> None:
    """After a replay the targets that got deliveries back are woken, and the count returned."""
    api, deliverer = make_api(journal, write_config(tmp_path))
    event = new_event(NOW_MS)
    await journal.append(event)
    await finish(journal, event, "dead")
    body = orjson.dumps({"target": "svc"})
    assert await api.handle("POST", "/api/replay", {}, body, None) == (
        200, {"requeued": 1, "skipped": 0},
    )  # fmt: skip
    assert deliverer.woken == ["svc"]


async def test_a_replay_that_fails_fails_before_it_requeues(
    tmp_path: Path, journal: Journal
) -> None:
    """A replay either answers 200 or fails with nothing re-queued: its log line cannot fail
    after the write (an operator told "failed" would replay again and send twice)."""
    api, deliverer = make_api(journal, write_config(tmp_path))
    event = new_event(NOW_MS)
    await journal.append(event)
    await finish(journal, event, "dead")
    status, answer = await api.handle(
        "POST", "/api/replay", {}, orjson.dumps({"since": "9999999999999d"}), None
    )
    assert (status, answer["error"]) == (
        400,
        'since: "9999999999999d" is out of range (years 1 to 9999)',
    )
    with pytest.raises(OSError, match="too large"):  # a selection no request can make now
        await api._replay(Replay(since_ms=10**20))
    assert await journal.queue_depths() == {}
    assert deliverer.woken == []


async def test_tail_frames_keep_alive_report_drops_and_end_on_stop(
    tmp_path: Path, journal: Journal
) -> None:
    """The SSE stream: a data frame per record, keep-alive comments, drop notices, end on stop."""
    health = FakeHealth()
    tail = Tail()
    api = AdminApi(journal, FakeDeliverer(), tail, health, lambda: write_config(tmp_path))  # type: ignore[arg-type]
    async with tail.subscribe("app") as subscription:
        frames = api.tail_frames(subscription, keepalive_s=0.0, poll_s=0.01)
        assert await anext(frames) == b": relay tail\n\n"
        assert await anext(frames) == b": keep-alive\n\n"
        tail.publish("event.accepted", source="other", event_id="x")
        tail.publish("event.accepted", source="app", event_id="y")
        subscription.dropped = 3
        dropped = orjson.loads((await anext(frames)).removeprefix(b"data: "))
        assert (dropped["kind"], dropped["dropped"]) == ("tail.dropped", 3)
        frame = await anext(frames)
        assert frame.startswith(b"data: ")
        assert frame.endswith(b"\n\n")
        record = orjson.loads(frame[6:])
        assert (record["event_id"], record["at"][-1]) == ("y", "Z")
        health.stopping = True
        with pytest.raises(StopAsyncIteration):
            await anext(frames)


# ---------------------------------------------------------------- relay reload's exit codes


async def test_reload_command_exit_codes_follow_the_daemons_answer(tmp_path: Path) -> None:
    """`relay reload`: ok → 0; refused → 78 with each error on stderr; anything else → 1."""
    answers: list[tuple[int, dict[str, Any]]] = []
    seen: list[str | None] = []

    async def reload(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        status, body = answers.pop(0)
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/api/reload", reload)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    write_config(tmp_path, admin_port=port, token="s3")
    try:
        errors = ["relay.toml: server.listn: unknown key", "relay.toml: routes[0]: bad"]
        answers += [
            (200, {"ok": True}),
            (200, {"ok": False, "errors": errors}),
            (501, {"ok": False, "errors": ["x"], "error": "reload is not available"}),
        ]
        results = [await run_cli("reload", "-c", str(tmp_path / "relay.toml")) for _ in range(3)]
    finally:
        await runner.cleanup()
    assert results[0] == (0, "reloaded\n", "")
    assert results[1][:2] == (78, "")
    assert results[1][2].splitlines() == [
        *errors,
        "relay: reload refused; the daemon keeps its running config",
    ]
    assert results[2] == (1, "", "relay: reload is not available\n")
    assert seen == ["Bearer s3"] * 3


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(REPO),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
