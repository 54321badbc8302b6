"""A lane inside one process, with a real journal, HTTP client and receiver: how the
deliveries handed over from memory and those read back from the journal interleave."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay import delivery as delivery_module
from relay import ids
from relay.config import load
from relay.delivery import Deliverer, open_deliverer
from relay.journal import (
    DueDelivery,
    Journal,
    JournalError,
    NewDelivery,
    NewEvent,
    Replay,
    SavedPause,
    open_journal,
)
from relay.metrics import Metrics
from relay.model import Config
from relay.netpolicy import NetworkPolicy
from relay.tail import Tail

from conftest import Receiver, eventually, server_toml


def new_event(n: int, order_key: str | None = None) -> NewEvent:
    """An accepted event with one delivery to `svc`, as ingress builds it."""
    return NewEvent(
        id=ids.event_id(),
        source="app",
        received_at_ms=time.time_ns() // 1_000_000,
        method="POST",
        path="/hooks/app",
        query="",
        headers=[("Content-Type", "application/json")],
        body=b'{"n": %d}' % n,
        routes=[{"name": "r", "matched": True, "error": None}],
        deliveries=[NewDelivery(ids.delivery_id(), "r", "svc", order_key)],
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    target = await Receiver().start()
    yield target
    await target.stop()


@contextlib.asynccontextmanager
async def delivering(
    tmp_path: Path, url: str, journal: Journal, *, concurrency: int = 1, settings: str = ""
) -> AsyncIterator[Deliverer]:
    """The deliverer of a config with one route from `app` to `svc` at `url`."""
    config_path = tmp_path / "relay.toml"
    config_path.write_text(
        server_toml(tmp_path)
        + f'[sources.app]\n[targets.svc]\nurl = "{url}"\nconcurrency = {concurrency}\n'
        + f"{settings}\n"
        + '[[routes]]\nname = "r"\nsource = "app"\ntargets = ["svc"]\n'
    )
    async with open_deliverer(journal, NetworkPolicy(), Tail(), Metrics()) as deliverer:
        deliverer.start(load(config_path))
        try:
            yield deliverer
        finally:
            await deliverer.stop(1.0)


async def test_a_delivery_handed_over_while_the_journal_is_read_is_sent_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    """An event committed and handed to the lane while the lane's read of the journal is
    under way (so that the read sees it too) is sent once, not once from each."""
    reading, release = asyncio.Event(), asyncio.Event()
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        real_due = journal.due

        async def held_read(*args: Any, **kwargs: Any) -> list[DueDelivery]:
            reading.set()
            await release.wait()  # the query runs after the event below is committed
            return await real_due(*args, **kwargs)

        journal.due = held_read  # type: ignore[method-assign]
        async with delivering(tmp_path, receiver.url, journal) as deliverer:
            await reading.wait()  # the lane's first read is under way
            event = new_event(1)
            assert await journal.append(event) is None
            deliverer.accepted(event)  # as ingress does once the commit is done
            release.set()

            async def delivered() -> bool:
                return await journal.fetch("SELECT status FROM deliveries") == [("delivered",)]

            await eventually(delivered)
            assert [r.headers["webhook-id"] for r in receiver.requests] == [event.deliveries[0].id]
            assert await journal.fetch("SELECT count(*) FROM attempts") == [(1,)]


async def test_deliveries_handed_over_while_keeping_up_are_sent_from_memory(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Once the lane has read the journal and found it empty, new events handed to it are
    sent without another read of the journal, each once."""
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        reads: list[float] = []
        real_due = journal.due

        async def counted_read(*args: Any, **kwargs: Any) -> list[DueDelivery]:
            reads.append(time.monotonic())
            return await real_due(*args, **kwargs)

        journal.due = counted_read  # type: ignore[method-assign]
        async with delivering(tmp_path, receiver.url, journal) as deliverer:
            await eventually(lambda: len(reads) == 1)  # the first read: nothing due
            events = [new_event(n) for n in range(5)]
            for event in events:
                assert await journal.append(event) is None
                deliverer.accepted(event)
            await eventually(lambda: len(receiver.requests) == 5)
            sent = [r.headers["webhook-id"] for r in receiver.requests]
            assert sorted(sent) == sorted(e.deliveries[0].id for e in events)
            assert len(reads) == 1


async def test_rows_taken_by_another_worker_during_a_read_do_not_stop_the_lane(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker reading the journal finds B; before its read is over, another worker
    (free again) takes B. The reader then finds nothing to take and looks again, instead
    of failing and holding the lane off (found by review)."""
    errors: list[str] = []
    monkeypatch.setattr(delivery_module.log, "exception", lambda event, **_: errors.append(event))
    answer_a = asyncio.Event()

    async def held_answer() -> tuple[int, dict[str, str], bytes]:
        await answer_a.wait()
        return (200, {}, b"ok")

    receiver.script.append(held_answer)
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        real_next_due = journal.next_due_ms
        hold_next_due = asyncio.Event()
        in_next_due = asyncio.Event()
        hold_next_due.set()

        async def next_due(*args: Any, **kwargs: Any) -> int | None:
            in_next_due.set()
            await hold_next_due.wait()
            return await real_next_due(*args, **kwargs)

        journal.next_due_ms = next_due  # type: ignore[method-assign]
        async with delivering(tmp_path, receiver.url, journal, concurrency=2) as deliverer:
            first, second, third = new_event(1), new_event(2), new_event(3)
            await journal.append(first)
            deliverer.notify(["svc"])  # read from the journal, not handed over
            await eventually(lambda: len(receiver.requests) == 1)  # A held open
            hold_next_due.clear()
            in_next_due.clear()
            await journal.append(second)
            deliverer.notify(["svc"])
            await in_next_due.wait()  # B is read; the reader waits in its second query
            answer_a.set()  # A's worker is free and takes B
            await eventually(lambda: len(receiver.requests) == 2)
            hold_next_due.set()
            await journal.append(third)
            deliverer.accepted(third)
            await eventually(lambda: len(receiver.requests) == 3)
    assert errors == []


async def test_a_delivery_handed_over_during_a_read_that_found_nothing_is_sent(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The lane's read finds nothing; an event committed after the read looked, and handed
    over before the read is over, is sent at once (found by review: it waited for the
    next wake-up, which on a quiet target might never come)."""
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        real_due = journal.due
        looked, release = asyncio.Event(), asyncio.Event()
        release.set()

        async def due(*args: Any, **kwargs: Any) -> list[DueDelivery]:
            rows = await real_due(*args, **kwargs)
            looked.set()
            await release.wait()  # the read is over only after the event below
            return rows

        journal.due = due  # type: ignore[method-assign]
        async with delivering(tmp_path, receiver.url, journal) as deliverer:
            await looked.wait()  # the first read: nothing due
            looked.clear()
            release.clear()
            deliverer.notify(["svc"])  # the lane reads again
            await looked.wait()
            event = new_event(1)
            assert await journal.append(event) is None
            deliverer.accepted(event)
            release.set()
            await eventually(lambda: len(receiver.requests) == 1, timeout_s=5)


async def test_a_delivery_routed_before_a_reload_ordered_its_target_is_sent(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A request routed with the old config commits its delivery without an order key
    after a reload made the target ordered (and its queue was re-keyed): it is still sent,
    not left for the next restart (found by review)."""
    async with (
        open_journal(tmp_path / "relay.db", "normal") as journal,
        delivering(tmp_path, receiver.url, journal) as deliverer,
    ):
        config_path = tmp_path / "relay.toml"
        config_path.write_text(config_path.read_text().replace("concurrency = 1", "ordered = true"))
        await deliverer.reconfigure(load(config_path), 1.0)
        ordered = new_event(1)
        ordered.deliveries[0].order_key = ""  # as ingress keys it under the new config
        assert await journal.append(ordered) is None
        deliverer.accepted(ordered)
        await eventually(lambda: len(receiver.requests) == 1)  # the queue was re-keyed
        stale = new_event(2)  # order_key None: routed under the old config
        assert await journal.append(stale) is None
        deliverer.accepted(stale)
        await eventually(lambda: len(receiver.requests) == 2, timeout_s=5)


@pytest.mark.parametrize(
    ("died_with_key", "settings", "key_now"),
    [("", "", None), (None, "ordered = true", ""), ("", 'order_key = "body.n"', "0")],
    ids=["ordered-then-unordered", "unordered-then-ordered", "ordered-then-keyed"],
)
async def test_replayed_deliveries_keyed_under_another_ordering_are_sent(
    tmp_path: Path,
    receiver: Receiver,
    died_with_key: str | None,
    settings: str,
    key_now: str | None,
) -> None:
    """Deliveries that died while the target had another ordering keep the order key of
    their day; replayed after the target's ordering changed, they are re-keyed and sent
    (found by review: an ordered lane never saw them, an unordered one hid one behind
    another)."""
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        dead = [new_event(n, died_with_key) for n in (1, 2)]
        for event in dead:
            assert await journal.append(event) is None
            first = event.deliveries[0]
            assert await journal.expire(first.id, event.id, "HTTP 400", event.received_at_ms)
        async with delivering(
            tmp_path, receiver.url, journal, concurrency=2, settings=settings
        ) as deliverer:
            fresh = new_event(0, key_now)  # the lane is running and has read its queue
            assert await journal.append(fresh) is None
            deliverer.accepted(fresh)
            await eventually(lambda: len(receiver.requests) == 1)
            replayed = await journal.requeue(Replay(), {"svc"}, time.time_ns() // 1_000_000)
            assert replayed is not None
            assert replayed.requeued == 2
            deliverer.notify(replayed.targets)  # as the admin API does after a replay
            await eventually(lambda: len(receiver.requests) == 3)
            sent = {r.headers["webhook-id"] for r in receiver.requests[1:]}
            assert sent == {event.deliveries[0].id for event in dead}


async def test_a_delivery_keyed_for_another_ordering_is_sent(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A delivery routed while the target had `order_key` (key "1") and committed after a
    reload made it `ordered = true` is re-keyed into the one queue and sent (found by
    review: the ordered lane only reads deliveries keyed for it)."""
    async with (
        open_journal(tmp_path / "relay.db", "normal") as journal,
        delivering(tmp_path, receiver.url, journal, settings="ordered = true") as deliverer,
    ):
        keyed = new_event(1, "")
        assert await journal.append(keyed) is None
        deliverer.accepted(keyed)
        await eventually(lambda: len(receiver.requests) == 1)  # the lane has read
        stale = new_event(2, "1")
        assert await journal.append(stale) is None
        deliverer.accepted(stale)
        await eventually(lambda: len(receiver.requests) == 2, timeout_s=5)


async def test_a_retry_of_a_removed_target_does_not_revive_its_dead_delivery(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A reload removes the target while an attempt is in flight, and its pending
    deliveries end dead ("target removed"). When the attempt then fails, its retry is
    recorded as an attempt but does not make the delivery pending again: no lane would
    ever send it (found by review)."""
    answer = asyncio.Event()

    async def failure() -> tuple[int, dict[str, str], bytes]:
        await answer.wait()
        return (500, {}, b"down")

    receiver.script.append(failure)
    async with (
        open_journal(tmp_path / "relay.db", "normal") as journal,
        delivering(tmp_path, receiver.url, journal) as deliverer,
    ):
        event = new_event(1)
        assert await journal.append(event) is None
        deliverer.accepted(event)
        await eventually(lambda: receiver.current == 1)  # the attempt is in flight
        config_path = tmp_path / "relay.toml"
        config_path.write_text(
            server_toml(tmp_path) + '[sources.app]\n[targets.other]\nurl = "log:"\n'
        )
        assert await deliverer.reconfigure(load(config_path), 5.0) == ["svc"]
        killed = [b async for b in journal.kill_pending(target="svc", reason="target removed")]
        assert [len(batch) for batch in killed] == [1]
        answer.set()

        async def attempt_recorded() -> bool:
            return await journal.fetch("SELECT status FROM attempts") == [(500,)]

        await eventually(attempt_recorded)
        assert await journal.fetch("SELECT status, last_error FROM deliveries") == [
            ("dead", "target removed")
        ]


async def test_a_large_body_whose_event_was_pruned_meanwhile_is_skipped_quietly(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery read in a window without its large body (read when its attempt starts)
    whose event is deleted before then (it ended, and retention pruned it) is skipped and
    the lane goes straight on to the next one: no error, no hold-off."""
    monkeypatch.setattr(delivery_module, "LANE_BACKOFF_S", 3600.0)  # a hold-off would hang
    path = tmp_path / "relay.db"
    async with open_journal(path, "normal") as journal:
        big, small = new_event(1), new_event(2)
        big = dataclasses.replace(big, body=b'{"pad": "' + b"x" * 100_000 + b'"}')
        for event in (big, small):
            assert await journal.append(event) is None
        real_due = journal.due

        async def due_then_pruned(*args: Any, **kwargs: Any) -> list[DueDelivery]:
            rows = await real_due(*args, **kwargs)
            if any(row.event_id == big.id for row in rows):
                assert [row.body for row in rows if row.event_id == big.id] == [None]
                with contextlib.closing(sqlite3.connect(path)) as conn, conn:
                    conn.execute("DELETE FROM payloads WHERE event_id = ?", (big.id,))
            return rows

        journal.due = due_then_pruned  # type: ignore[method-assign]
        async with delivering(tmp_path, receiver.url, journal):
            await eventually(lambda: receiver.event_ids() == [small.id])


def slow_replies(receiver: Receiver, count: int, seconds: float) -> None:
    """`receiver` takes `seconds` over each of its next `count` requests (a slow target:
    requests that overlap show in `max_concurrent`)."""

    async def slow() -> tuple[int, dict[str, str], bytes]:
        await asyncio.sleep(seconds)
        return 200, {}, b"ok"

    receiver.script.extend([slow] * count)


def made_ordered(tmp_path: Path) -> Config:
    path = tmp_path / "relay.toml"
    path.write_text(path.read_text().replace("concurrency = 4", "concurrency = 4\nordered = true"))
    return load(path)


async def test_a_read_under_way_when_the_target_is_made_ordered_is_read_again_in_order(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Rows of a read that began before a reload made the target ordered are not sent as
    they were read (four at once): the lane reads again, in order, one at a time."""
    reading, release = asyncio.Event(), asyncio.Event()
    slow_replies(receiver, 8, 0.05)
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        for n in range(8):
            assert await journal.append(new_event(n)) is None
        real_due = journal.due

        async def held_unordered_read(*args: Any, **kwargs: Any) -> list[DueDelivery]:
            rows = await real_due(*args, **kwargs)
            if not reading.is_set() and kwargs.get("ordering") == "":
                reading.set()
                await release.wait()
            return rows

        journal.due = held_unordered_read  # type: ignore[method-assign]
        async with delivering(tmp_path, receiver.url, journal, concurrency=4) as deliverer:
            await reading.wait()
            await deliverer.reconfigure(made_ordered(tmp_path), 1.0)
            release.set()
            await eventually(lambda: len(receiver.requests) == 8 and receiver.current == 0)
    assert receiver.max_concurrent == 1


async def test_deliveries_waiting_for_their_rate_slot_when_made_ordered_go_one_at_a_time(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Deliveries already taken and waiting for their `rate_limit` slot when a reload
    makes the target ordered are let go and read again: one request at a time after it."""
    slow_replies(receiver, 8, 0.3)  # longer than the 0.125 s between starts
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        for n in range(8):
            assert await journal.append(new_event(n)) is None
        async with delivering(
            tmp_path, receiver.url, journal, concurrency=4, settings='rate_limit = "8/s"'
        ) as deliverer:
            await eventually(lambda: receiver.current == 1)  # the others wait for their slots
            await deliverer.reconfigure(made_ordered(tmp_path), 1.0)
            await eventually(lambda: len(receiver.requests) == 8 and receiver.current == 0)
    assert receiver.max_concurrent == 1


def rewritten(tmp_path: Path, old: str, new: str) -> Config:
    """The lane's config file with `old` replaced by `new`, loaded (a reload's config)."""
    path = tmp_path / "relay.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return load(path)


async def test_a_delivery_put_back_by_a_worker_a_reload_retired_is_still_sent(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A reload lowers `concurrency` while a worker waits for its rate-limit slot with a
    delivery: the worker ends and puts it back, and the remaining worker sends it (it
    was waiting for a wake-up that never came, until the next event)."""
    async with (
        open_journal(tmp_path / "relay.db", "normal") as journal,
        delivering(
            tmp_path, receiver.url, journal, concurrency=2, settings='rate_limit = "1/s"'
        ) as deliverer,
    ):
        for event in (new_event(0), new_event(1)):
            assert await journal.append(event) is None
            deliverer.accepted(event)
        await eventually(lambda: len(receiver.requests) == 1)  # the other waits ~1 s
        await deliverer.reconfigure(rewritten(tmp_path, "concurrency = 2", "concurrency = 1"), 1.0)
        await eventually(lambda: len(receiver.requests) == 2)


async def test_a_requeue_while_the_queue_is_being_keyed_keys_it_again(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A delivery routed under the config from before the target was made ordered, handed
    over while the lane is keying its queue for the new order, is keyed too and sent (it
    stayed unkeyed, invisible to the ordered lane)."""
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        real_key_ordering = journal.key_ordering
        keying, keyed = asyncio.Event(), asyncio.Event()

        async def held_keying(target: str, ordering: Any) -> int:
            count = await real_key_ordering(target, ordering)
            if ordering == "fifo" and not keying.is_set():
                keying.set()
                await keyed.wait()
            return count

        journal.key_ordering = held_keying  # type: ignore[method-assign]
        async with delivering(tmp_path, receiver.url, journal) as deliverer:
            await deliverer.reconfigure(
                rewritten(tmp_path, "concurrency = 1", "concurrency = 1\nordered = true"), 1.0
            )
            await keying.wait()
            stale = new_event(1)  # no order key: routed under the old config
            assert await journal.append(stale) is None
            deliverer.accepted(stale)
            keyed.set()
            await eventually(lambda: receiver.event_ids() == [stale.id])


async def test_a_success_of_the_old_endpoint_does_not_resume_a_pause_of_the_new_one(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The target moved to a URL that fails and paused it; an attempt still in flight to
    the old URL then succeeds: that says nothing of the new URL, which stays paused (no
    resume, no drain of its backlog into it)."""
    new = await Receiver(default=(503, {}, b"down")).start()
    answer = asyncio.Event()

    async def held_ok() -> tuple[int, dict[str, str], bytes]:
        await answer.wait()
        return 200, {}, b"ok"

    receiver.script.append(held_ok)
    settings = 'pause_after = 1\nretry = { attempts = 12, first = "60s" }'
    try:
        async with (
            open_journal(tmp_path / "relay.db", "normal") as journal,
            delivering(
                tmp_path, receiver.url, journal, concurrency=2, settings=settings
            ) as deliverer,
        ):
            first, second = new_event(1), new_event(2)
            assert await journal.append(first) is None
            deliverer.accepted(first)
            await eventually(lambda: receiver.current == 1)  # in flight to the old URL
            await deliverer.reconfigure(rewritten(tmp_path, receiver.url, new.url), 1.0)
            assert await journal.append(second) is None
            deliverer.accepted(second)
            lane = deliverer.lanes["svc"]
            await eventually(lambda: lane.pause.state == "paused")  # the new URL failed
            answer.set()  # the old URL answers 200: recorded, and the pause is decided
            delivered = "SELECT status FROM deliveries WHERE id = ?"

            async def first_delivered() -> bool:
                rows = await journal.fetch(delivered, (first.deliveries[0].id,))
                return rows == [("delivered",)]

            await eventually(first_delivered)
            assert lane.pause.state == "paused"
            assert len(new.requests) == 1
    finally:
        await new.stop()


async def test_stop_ends_the_attempts_of_a_target_a_reload_removed(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A reload removed the target while its attempt hangs (30 s to finish); relay then
    stops with 0.3 s of grace: the attempt is cut and counted when stop returns, not left
    running past the stop (its outcome could never be recorded)."""
    answer = asyncio.Event()

    async def held() -> tuple[int, dict[str, str], bytes]:
        await answer.wait()
        return 200, {}, b"ok"

    receiver.script.append(held)
    journal_path, config_path = tmp_path / "relay.db", tmp_path / "relay.toml"
    async with (
        open_journal(journal_path, "normal") as journal,
        delivering(tmp_path, receiver.url, journal) as deliverer,
    ):
        event = new_event(1)
        assert await journal.append(event) is None
        deliverer.accepted(event)
        await eventually(lambda: receiver.current == 1)
        removed = deliverer.lanes["svc"]
        config_path.write_text(
            server_toml(tmp_path) + '[sources.app]\n[targets.other]\nurl = "log:"\n'
        )
        assert await deliverer.reconfigure(load(config_path), 30.0) == ["svc"]
        assert removed.in_flight == 1
        assert await deliverer.stop(0.3) == 1
        assert removed.in_flight == 0
    answer.set()


async def test_a_failed_read_of_a_saved_pause_is_tried_again(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target was paused before the restart; the first read of its saved pause fails
    (a passing journal error): the lane reads it again and stays paused, instead of
    starting open and sending its backlog into the paused target."""
    monkeypatch.setattr(delivery_module, "LANE_BACKOFF_S", 0.1)
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        until_ms = int(time.time() * 1000) + 3_600_000
        await journal.save_target("svc", SavedPause(3, 1, until_ms, "HTTP 503"))
        assert await journal.append(new_event(1)) is None
        real_load, reads = journal.load_target, []

        async def flaky_load(name: str) -> SavedPause | None:
            reads.append(name)
            if len(reads) == 1:
                raise JournalError("database is locked")
            return await real_load(name)

        journal.load_target = flaky_load  # type: ignore[method-assign]
        settings = 'pause_after = 1\nretry = { first = "60s", max = "1h" }'
        async with delivering(tmp_path, receiver.url, journal, settings=settings) as deliverer:
            await eventually(lambda: len(reads) == 2)
            lane = deliverer.lanes["svc"]
            await eventually(lambda: lane.pause.state == "paused")
            assert receiver.requests == []


async def test_a_url_changed_while_the_saved_pause_is_read_is_probed_at_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Paused before the restart with an hour left; a reload moves the target to a new URL
    while the lane is still reading its saved pause: the new URL is probed at once, as for
    a running paused target."""
    new = await Receiver().start()
    try:
        async with open_journal(tmp_path / "relay.db", "normal") as journal:
            until_ms = int(time.time() * 1000) + 3_600_000
            await journal.save_target("svc", SavedPause(3, 1, until_ms, "HTTP 503"))
            assert await journal.append(new_event(1)) is None
            real_load = journal.load_target
            loading, release = asyncio.Event(), asyncio.Event()

            async def held_load(name: str) -> SavedPause | None:
                loading.set()
                await release.wait()
                return await real_load(name)

            journal.load_target = held_load  # type: ignore[method-assign]
            settings = 'pause_after = 1\nretry = { first = "60s", max = "1h" }'
            async with delivering(tmp_path, receiver.url, journal, settings=settings) as deliverer:
                await loading.wait()
                await deliverer.reconfigure(rewritten(tmp_path, receiver.url, new.url), 1.0)
                release.set()
                await eventually(lambda: len(new.requests) == 1)
    finally:
        await new.stop()


async def test_a_replay_into_an_ordered_queue_goes_before_a_head_waiting_for_its_slot(
    tmp_path: Path, receiver: Receiver
) -> None:
    """An ordered target sends in arrival order: a replayed delivery older than the head
    that is waiting for its rate-limit slot goes first (the lane reads its queue again),
    not after it."""
    async with open_journal(tmp_path / "relay.db", "normal") as journal:
        settings = 'ordered = true\nrate_limit = "1/s"'
        async with delivering(tmp_path, receiver.url, journal, settings=settings) as deliverer:
            oldest, head, last = new_event(0, ""), new_event(1, ""), new_event(2, "")
            for event in (oldest, head, last):
                assert await journal.append(event) is None
                deliverer.accepted(event)
            await eventually(lambda: len(receiver.requests) == 2)  # oldest, then head...
            lane = deliverer.lanes["svc"]
            waiting = last.deliveries[0].id
            await eventually(lambda: waiting in lane._held)  # ...and `last` awaits its slot
            now_ms = time.time_ns() // 1_000_000
            again = Replay(statuses=("delivered",), event_id=oldest.id)
            replayed = await journal.requeue(again, {"svc"}, now_ms)
            assert replayed is not None
            deliverer.notify(replayed.targets)
            await eventually(lambda: len(receiver.requests) == 4)
            assert receiver.event_ids() == [oldest.id, head.id, oldest.id, last.id]
