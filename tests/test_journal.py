"""The journal on a real SQLite file: group commit, due deliveries, outcomes, retention."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from relay import ids
from relay.journal import (
    AttemptRecord,
    JournalError,
    NewDelivery,
    NewEvent,
    Replay,
    SavedPause,
    open_journal,
)


def new_event(
    received_at_ms: int, targets: tuple[str, ...] = ("svc",), body: bytes = b"{}"
) -> NewEvent:
    return NewEvent(
        id=ids.event_id(received_at_ms),
        source="app",
        received_at_ms=received_at_ms,
        method="POST",
        path="/hooks/app",
        query="",
        headers=[("Content-Type", "application/json")],
        body=body,
        routes=[{"name": "r", "matched": bool(targets), "error": None}],
        deliveries=[NewDelivery(ids.delivery_id(received_at_ms), "r", t) for t in targets],
    )


def outcome(journal_row: tuple[str, str], n: int, state: str, next_at_ms: int = 0) -> AttemptRecord:
    delivery_id, event_id = journal_row
    return AttemptRecord(
        delivery_id=delivery_id,
        event_id=event_id,
        n=n,
        started_at_ms=1,
        ms=1.0,
        status=200 if state == "delivered" else 500,
        error=None,
        response=b"",
        outcome=state,
        next_at_ms=next_at_ms,  # type: ignore[arg-type]
        reason="HTTP 500" if state == "dead" else None,
    )


async def test_concurrent_appends_share_transactions(tmp_path: Path) -> None:
    """64 webhooks arriving together are committed in far fewer than 64 transactions."""
    commits: list[int] = []
    async with open_journal(tmp_path / "j.db", "full") as journal:
        journal.set_commit_observer(lambda _s, writes: commits.append(writes))
        await asyncio.gather(*(journal.append(new_event(1000 + n)) for n in range(64)))
        assert await journal.fetch("SELECT count(*) FROM events") == [(64,)]
    assert sum(commits) == 64
    assert len(commits) < 64 / 4


async def test_cancelled_waiter_still_commits(tmp_path: Path) -> None:
    """A request whose waiting task is cancelled (client gone, shutdown) still has its event
    committed, and the writer goes on serving the next writes."""
    async with open_journal(tmp_path / "j.db", "full") as journal:
        events = [new_event(1000 + n) for n in range(20)]
        waiters = [asyncio.ensure_future(journal.append(e)) for e in events]
        await asyncio.sleep(0)  # every append is queued
        for waiter in waiters[::2]:
            waiter.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert sum(isinstance(r, asyncio.CancelledError) for r in results) == 10
        assert await journal.append(new_event(2000)) is None
        assert await journal.fetch("SELECT count(*) FROM events") == [(21,)]


async def test_a_failing_commit_observer_does_not_stop_the_writer(tmp_path: Path) -> None:
    """The commit observer (metrics) raising does not end the writer thread: writes go on."""

    def broken(_seconds: float, _writes: int) -> None:
        raise RuntimeError("metrics broke")

    async with open_journal(tmp_path / "j.db", "full") as journal:
        journal.set_commit_observer(broken)
        for n in range(3):
            assert await journal.append(new_event(1000 + n)) is None
        assert await journal.fetch("SELECT count(*) FROM events") == [(3,)]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
async def test_the_writer_thread_runs_as_a_batch_thread(tmp_path: Path) -> None:
    """The journal's writer runs under SCHED_BATCH (it commits when the event loop lets
    go of the core, not the moment a write arrives); the event loop's thread keeps the
    default policy."""
    async with open_journal(tmp_path / "j.db", "full") as journal:
        await journal.append(new_event(1000))  # the writer has started and committed
        (writer,) = [t for t in threading.enumerate() if t.name == "relay-journal"]
        assert writer.native_id is not None
        assert os.sched_getscheduler(writer.native_id) == os.SCHED_BATCH
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER


async def test_sync_level_is_read_back(tmp_path: Path) -> None:
    """The journal reports the synchronous level SQLite actually runs with."""
    async with open_journal(tmp_path / "full.db", "full") as journal:
        assert journal.synchronous == "full"
    async with open_journal(tmp_path / "normal.db", "normal") as journal:
        assert journal.synchronous == "normal"


async def test_due_is_a_bounded_window_in_arrival_order(tmp_path: Path) -> None:
    """A lane is handed at most `limit` due deliveries, oldest first, skipping those it holds."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        events = [new_event(1000 + n, ("svc", "other")) for n in range(10)]
        for event in events:
            await journal.append(event)
        first = await journal.due("svc", now_ms=5000, limit=4)
        assert [d.event_id for d in first] == [e.id for e in events[:4]]
        assert all(d.target == "svc" for d in first)
        held = {d.id for d in first}
        second = await journal.due("svc", now_ms=5000, limit=4, exclude=held)
        assert [d.event_id for d in second] == [e.id for e in events[4:8]]
        assert await journal.due("svc", now_ms=999, limit=4) == []
        assert await journal.next_due_ms("svc") == 1000


async def test_recorded_outcomes_move_the_event_status(tmp_path: Path) -> None:
    """A retry reschedules; the event is delivered only when every delivery is, dead if any died."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        event = new_event(1000, ("a", "b"))
        await journal.append(event)
        a, b = ((d.id, event.id) for d in event.deliveries)
        await journal.record(outcome(a, 1, "pending", next_at_ms=9000))
        assert await journal.due("a", now_ms=5000, limit=10) == []
        assert await journal.next_due_ms("a") == 9000
        await journal.record(outcome(a, 2, "delivered"))
        assert await journal.fetch("SELECT status FROM events") == [("pending",)]
        await journal.record(outcome(b, 1, "dead"))
        assert await journal.fetch("SELECT status FROM events") == [("dead",)]
        rows = await journal.fetch("SELECT target, status, attempts, last_error FROM deliveries")
        assert sorted(rows) == [("a", "delivered", 2, None), ("b", "dead", 1, "HTTP 500")]
        assert await journal.pending_count() == 0


async def test_an_attempt_finishing_after_its_delivery_died_still_counts(tmp_path: Path) -> None:
    """An attempt in flight while a reload killed its delivery ("target removed") and that
    then failed leaves the delivery dead but counted: a replay sends attempt 2, and the
    first attempt's row is kept beside the second's instead of being overwritten."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        event = new_event(1000)
        await journal.append(event)
        row = (event.deliveries[0].id, event.id)
        [killed] = [batch async for batch in journal.kill_pending(target="svc", reason="-")]
        assert [dead.delivery_id for dead in killed] == [row[0]]
        assert await journal.record(outcome(row, 1, "pending", next_at_ms=9000)) is True
        rows = await journal.fetch("SELECT status, attempts, last_error FROM deliveries")
        assert rows == [("dead", 1, "-")]  # dead stays dead; its attempt counts
        await journal.requeue(Replay(event_id=event.id), {"svc"}, now_ms=2000)
        [due] = await journal.due("svc", now_ms=2000, limit=10)
        assert due.attempts + 1 == 2
        assert await journal.record(outcome(row, due.attempts + 1, "delivered")) is None
        attempts = await journal.fetch("SELECT n, status FROM attempts ORDER BY n")
        assert attempts == [(1, 500), (2, 200)]


async def test_a_value_over_sqlites_length_limit_is_a_bad_row_not_a_bad_disk(
    tmp_path: Path,
) -> None:
    """A body SQLite refuses as too big fails alone and leaves the journal healthy: read as
    disk trouble, it set a probe as large as that body, which could never succeed, and the
    daemon stayed not ready until restarted."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        journal._writer._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100_000)  # for 1 GB
        with pytest.raises(JournalError, match="too big"):
            await journal.append(new_event(1000, body=b"x" * 200_000))
        assert journal.healthy
        assert await journal.probe() is True
        assert await journal.append(new_event(1001)) is None


async def test_a_2xx_after_a_sweep_leaves_the_delivery_dead(tmp_path: Path) -> None:
    """A delivery made dead while its attempt was under way stays dead even when that
    attempt then gets a 2xx (the sweep reported its end; the record says it had ended)."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        event = new_event(1000)
        await journal.append(event)
        row = (event.deliveries[0].id, event.id)
        assert [b async for b in journal.kill_pending(target="svc", route="r", reason="gone")]
        assert await journal.record(outcome(row, 1, "delivered")) is True
        rows = await journal.fetch("SELECT status, attempts, last_error FROM deliveries")
        assert rows == [("dead", 1, "gone")]
        assert await journal.fetch("SELECT status FROM events") == [("dead",)]


async def test_killing_one_routes_deliveries_passes_the_others_once(tmp_path: Path) -> None:
    """`kill_pending` by route goes along the target's pending deliveries in batches of
    500, from where the last stopped: all of one route's die, none of another's."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        for n in range(1200):
            event = new_event(1000 + n)
            event = replace(
                event, deliveries=[replace(event.deliveries[0], route=("r", "keep")[n % 2])]
            )
            await journal.append(event)
        batches = [b async for b in journal.kill_pending(target="svc", route="r", reason="gone")]
        assert [len(b) for b in batches] == [500, 100]
        counts = await journal.fetch(
            "SELECT route, status, count(*) FROM deliveries GROUP BY route, status ORDER BY route"
        )
        assert counts == [("keep", "pending", 600), ("r", "dead", 600)]


async def test_prune_deletes_only_old_finished_events(tmp_path: Path) -> None:
    """Retention removes finished events past the cutoff with their deliveries and attempts."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        old_done, old_pending, old_unrouted, new_done = (
            new_event(1000),
            new_event(1001),
            new_event(1002, ()),
            new_event(50_000),
        )
        for event in (old_done, old_pending, old_unrouted, new_done):
            await journal.append(event)
        for event in (old_done, new_done):
            await journal.record(outcome((event.deliveries[0].id, event.id), 1, "delivered"))
        assert await journal.prune(before_ms=10_000, limit=1) == 1
        assert await journal.prune(before_ms=10_000, limit=1) == 1
        assert await journal.prune(before_ms=10_000, limit=1) == 0
        remaining = {row[0] for row in await journal.fetch("SELECT id FROM events")}
        assert remaining == {old_pending.id, new_done.id}
        assert await journal.fetch("SELECT count(*) FROM attempts") == [(1,)]
        assert await journal.fetch("SELECT count(*) FROM deliveries") == [(2,)]


async def test_a_bad_write_fails_alone(tmp_path: Path) -> None:
    """A write that breaks a constraint fails with JournalError; others in its batch commit."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        event = new_event(1000)
        await journal.append(event)
        others = [new_event(2000 + n) for n in range(5)]
        results = await asyncio.gather(
            journal.append(event), *(journal.append(e) for e in others), return_exceptions=True
        )
        assert isinstance(results[0], JournalError)
        assert "UNIQUE" in str(results[0])
        assert results[1:] == [None] * 5
        assert await journal.fetch("SELECT count(*) FROM events") == [(6,)]
        assert journal.healthy is True


async def test_reopening_resumes_pending_deliveries(tmp_path: Path) -> None:
    """Pending deliveries are still due after the journal is closed and opened again."""
    path = tmp_path / "j.db"
    async with open_journal(path, "full") as journal:
        await journal.append(new_event(1000))
    async with open_journal(path, "full") as journal:
        assert len(await journal.due("svc", now_ms=2000, limit=10)) == 1
        assert await journal.pending_count() == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


async def test_checkpoint_moves_the_wal_into_the_database(tmp_path: Path) -> None:
    """A checkpoint copies every committed page into the main file, so the WAL can be reused."""
    async with open_journal(tmp_path / "j.db", "full") as journal:
        for n in range(20):
            await journal.append(new_event(1000 + n, body=b"x" * 4000))
        busy, wal_pages, done = await journal.checkpoint()
        assert busy == 0
        assert wal_pages > 0
        assert done == wal_pages
    assert (tmp_path / "j.db").stat().st_size > 20 * 4000


async def test_dedupe_keys_expire_and_are_forgotten(tmp_path: Path) -> None:
    """A key repeats within its window only; expired keys are deleted by the pruner."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:

        def keyed(at_ms: int) -> NewEvent:
            event = new_event(at_ms)
            return replace(event, dedupe_key="k1", dedupe_window_ms=1000)

        first = keyed(10_000)
        assert await journal.append(first) is None
        assert await journal.append(keyed(10_500)) == first.id
        assert await journal.forget_keys(now_ms=10_999) == 0
        assert await journal.forget_keys(now_ms=11_000) == 1
        assert await journal.append(keyed(11_001)) is None
        assert await journal.fetch("SELECT count(*) FROM events") == [(2,)]


async def test_expire_leaves_a_delivery_replayed_since_it_was_read(tmp_path: Path) -> None:
    """A lane's stale view cannot kill a delivery that was replayed (new created_at) or is dead."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        event = new_event(1000)
        await journal.append(event)
        delivery = event.deliveries[0]
        assert await journal.expire(delivery.id, event.id, "too old", created_at_ms=999) is False
        assert await journal.expire(delivery.id, event.id, "too old", created_at_ms=1000) is True
        assert await journal.expire(delivery.id, event.id, "again", created_at_ms=1000) is False
        rows = await journal.fetch("SELECT status, last_error FROM deliveries")
        assert rows == [("dead", "too old")]


async def test_ordered_queues_give_only_their_heads(tmp_path: Path) -> None:
    """Ordered delivery: only the oldest pending delivery of each key is ever due."""
    async with open_journal(tmp_path / "j.db", "normal") as journal:
        events = []
        for n, key in enumerate(["a", "a", "b", "a"]):
            event = new_event(1000 + n)
            event = replace(event, deliveries=[replace(event.deliveries[0], order_key=key)])
            events.append(event)
            await journal.append(event)
        heads = await journal.due("svc", now_ms=9000, limit=10, ordering="key")
        assert [d.event_id for d in heads] == [events[0].id, events[2].id]
        first = (events[0].deliveries[0].id, events[0].id)
        await journal.record(outcome(first, 1, "pending", next_at_ms=50_000))  # head fails
        heads = await journal.due("svc", now_ms=9000, limit=10, ordering="key")
        assert [d.event_id for d in heads] == [events[2].id]  # "a" waits behind its head
        assert await journal.key_ordering("svc", "fifo") == 4  # one queue now
        assert await journal.due("svc", now_ms=9000, limit=10, ordering="fifo") == []
        assert await journal.next_due_ms("svc", ordering="fifo") == 50_000


async def test_a_journal_from_before_last_error_was_kept_opens_and_keeps_it(
    tmp_path: Path,
) -> None:
    """A journal whose `targets` table predates the `last_error` column is upgraded when
    opened: the saved pause survives and the error that paused the target is kept from now."""
    path = tmp_path / "relay.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE targets (name TEXT PRIMARY KEY, failures INTEGER NOT NULL,"
            " pauses INTEGER NOT NULL, paused_until_ms INTEGER)"
        )
        conn.execute("INSERT INTO targets VALUES ('svc', 3, 1, 4000)")
    async with open_journal(path, "full") as journal:
        assert await journal.load_target("svc") == SavedPause(3, 1, 4000, None)
        await journal.save_target("svc", SavedPause(4, 2, 9000, "HTTP 503"))
    async with open_journal(path, "full") as journal:
        assert await journal.load_target("svc") == SavedPause(4, 2, 9000, "HTTP 503")
