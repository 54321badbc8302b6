"""The journal: every SQL statement relay runs, behind a small async interface.

This module owns the SQLite file (SPEC §5): the schema, WAL mode and the
`synchronous` level, and the one writer thread that commits every waiting
write — new events with their deliveries, attempt outcomes, prunes — in one
transaction (group commit) and then answers all of them at once. Reads (due
deliveries, counts) go through a separate aiosqlite connection, which WAL lets
run beside the writer. Nothing else in relay speaks SQL; the interface
(`append`, `due`, `next_due_ms`, `record`, `prune`, `checkpoint`, counts) is
narrow enough that another database could sit behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import aiosqlite
import orjson

from relay.ids import ulid_floor
from relay.text import json_text, storable

SCHEMA_VERSION = 2
INLINE_BODY_BYTES = 64 * 1024  # larger bodies are read per attempt, not with the window
BUSY_TIMEOUT_MS = 5000
MAX_BATCH_OPS = 1024
JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id             TEXT PRIMARY KEY,     -- evt_<ULID>, time ordered
    source         TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,     -- Unix time in milliseconds
    method         TEXT NOT NULL,
    path           TEXT NOT NULL,
    query          TEXT NOT NULL,        -- raw query string, without '?'
    status         TEXT NOT NULL,        -- pending | delivered | dead | unrouted
    dedupe_key     TEXT,
    routes         TEXT NOT NULL,        -- JSON [{"name", "matched", "error"}, ...]
    finished_at_ms INTEGER               -- when the last delivery finished
);
-- The request's headers and body live apart from the event's row: a status change then
-- rewrites a small row, not the payload (measured: 10 us per delivery at 1 KB, 54 at 20 KB).
CREATE TABLE IF NOT EXISTS payloads (
    event_id       TEXT PRIMARY KEY REFERENCES events (id),
    headers        TEXT NOT NULL,        -- JSON [[name, value], ...] as received
    body           BLOB NOT NULL         -- raw bytes as received
);
CREATE INDEX IF NOT EXISTS events_finished
    ON events (received_at_ms) WHERE status != 'pending';
CREATE INDEX IF NOT EXISTS events_source ON events (source, id);
CREATE TABLE IF NOT EXISTS deliveries (
    id            TEXT PRIMARY KEY,      -- dlv_<ULID>; sent as webhook-id
    event_id      TEXT NOT NULL REFERENCES events (id),
    route         TEXT NOT NULL,
    target        TEXT NOT NULL,
    status        TEXT NOT NULL,         -- pending | delivered | dead
    attempts      INTEGER NOT NULL DEFAULT 0,
    replay_base   INTEGER NOT NULL DEFAULT 0, -- attempts made before the last replay
    next_at_ms    INTEGER NOT NULL,      -- when a pending delivery is due
    created_at_ms INTEGER NOT NULL,      -- the event's arrival, or the last replay (for max_age)
    last_error    TEXT,                  -- the last failure; the reason when dead
    order_key     TEXT                   -- ordered targets: FIFO per value ('' for ordered = true)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (target, next_at_ms, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE INDEX IF NOT EXISTS deliveries_order
    ON deliveries (target, order_key, id) WHERE status = 'pending' AND order_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS targets (
    name            TEXT PRIMARY KEY,    -- a target's pause state, kept across restarts
    failures        INTEGER NOT NULL,    -- consecutive failed attempts
    pauses          INTEGER NOT NULL,    -- consecutive pauses (the cooldown grows with it)
    paused_until_ms INTEGER,             -- Unix ms when the next probe may go; NULL: open
    last_error      TEXT                 -- the failure last seen (`relay status` shows it)
);
CREATE TABLE IF NOT EXISTS dedupe (
    source        TEXT NOT NULL,
    key           TEXT NOT NULL,         -- the provider's delivery id, or the dedupe.key value
    event_id      TEXT NOT NULL,         -- the first event with this key
    expires_at_ms INTEGER NOT NULL,      -- end of the dedupe window
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_expiry ON dedupe (expires_at_ms);
CREATE TABLE IF NOT EXISTS attempts (
    delivery_id   TEXT NOT NULL,
    n             INTEGER NOT NULL,      -- 1, 2, ... (X-Relay-Attempt)
    started_at_ms INTEGER NOT NULL,
    ms            REAL NOT NULL,         -- duration
    status        INTEGER,               -- HTTP status, NULL when no response
    error         TEXT,                  -- connection error, timeout, ...
    response      BLOB,                  -- first 64 KiB of the response body
    PRIMARY KEY (delivery_id, n)
);
"""

EventStatus = Literal["pending", "delivered", "dead", "unrouted"]
DeliveryStatus = Literal["pending", "delivered", "dead"]


@dataclass(frozen=True, slots=True)
class SavedPause:
    """A target's pause state as kept across restarts (the `targets` table)."""

    failures: int  # consecutive failed attempts
    pauses: int  # consecutive pauses (the cooldown grows with it)
    paused_until_ms: int | None  # Unix ms when the next probe may go; None: open
    last_error: str | None  # the failure last seen


class JournalError(Exception):
    """The journal could not take a write (disk full, I/O error, ...)."""


@dataclass(slots=True)
class NewDelivery:
    id: str
    route: str
    target: str
    order_key: str | None = None


@dataclass(slots=True)
class NewEvent:
    id: str
    source: str
    received_at_ms: int
    method: str
    path: str
    query: str
    headers: Sequence[tuple[str, str]]
    body: bytes
    routes: Sequence[dict[str, Any]]  # route decisions: {"name", "matched", "error"} each
    deliveries: Sequence[NewDelivery]
    dedupe_key: str | None = None
    dedupe_window_ms: int = 0

    @property
    def status(self) -> EventStatus:
        return "pending" if self.deliveries else "unrouted"


class DeadDelivery(NamedTuple):
    """A pending delivery a sweep made dead without an attempt (for its log line)."""

    delivery_id: str
    event_id: str
    target: str
    route: str
    attempts: int  # made before it died


@dataclass(slots=True)
class DueDelivery:
    """A pending delivery with what is needed to send it."""

    id: str
    event_id: str
    route: str
    target: str
    attempts: int  # attempts made so far (the next is attempts + 1)
    created_at_ms: int  # arrival, or the last replay: max_age counts from here
    source: str
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    # None: over INLINE_BODY_BYTES, read when its attempt starts (`Journal.body_of`), so
    # a lane's window of due deliveries holds at most that much of each body
    body: bytes | None
    replay_base: int = 0  # attempts made before the last replay (the budget restarts there)


@dataclass(slots=True)
class AttemptRecord:
    """One finished attempt and the delivery's state after it."""

    delivery_id: str
    event_id: str
    n: int
    started_at_ms: int
    ms: float
    status: int | None
    error: str | None
    response: bytes | None
    outcome: DeliveryStatus
    next_at_ms: int
    reason: str | None


WriteFn = Callable[[sqlite3.Connection], Any]


@dataclass(slots=True)
class _Write:
    fn: WriteFn
    future: asyncio.Future[Any]
    alone: bool = False  # runs outside any transaction (PRAGMA wal_checkpoint must)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Writer:
    """The one thread that writes: it commits all waiting writes in one transaction."""

    def __init__(self, path: Path, synchronous: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._conn = _connect(path, synchronous)
        self._thread = threading.Thread(target=self._run, name="relay-journal", daemon=True)
        self.healthy = True
        # After a failure: how large a write must commit before the journal is healthy
        # again (a full disk may still take small writes; senders' large ones fail).
        self.recovery_bytes = 0
        self.on_commit: Callable[[float, int], None] | None = None

    def prepare(self) -> tuple[int, str]:
        """Create the schema; read back (PRAGMA synchronous, PRAGMA journal_mode)."""
        _create_schema(self._conn)
        level = self._conn.execute("PRAGMA synchronous").fetchone()[0]
        mode = self._conn.execute("PRAGMA journal_mode").fetchone()[0]
        return int(level), str(mode)

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: WriteFn, *, alone: bool = False) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put(_Write(fn, future, alone))
        return future

    def close(self) -> None:
        """Close the connection of a writer that was never started."""
        self._conn.close()

    def stop(self) -> None:
        """Commit what is queued, then end the thread and close the connection."""
        self._queue.put(None)
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        _batch_scheduling()
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH_OPS:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            together = [write for write in batch if not write.alone]
            if together:
                self._commit(together)
            for write in batch:
                if write.alone:
                    self._run_alone(write)
            if stop:
                return

    def _run_alone(self, write: _Write) -> None:
        try:
            result = write.fn(self._conn)
        except Exception as error:  # noqa: BLE001 - the writer thread must outlive any write
            self._loop.call_soon_threadsafe(_settle, [write], None, JournalError(str(error)))
            return
        self._loop.call_soon_threadsafe(_settle, [write], [result], None)

    def _commit(self, batch: list[_Write]) -> None:
        started = time.perf_counter()
        try:
            results = self._transaction([w.fn for w in batch])
        except Exception as error:  # noqa: BLE001 - the writer thread must outlive any write
            if len(batch) > 1:  # one bad write must not fail the others: retry them alone
                for write in batch:
                    self._commit([write])
                return
            if _is_disk_trouble(error):  # a bad row (constraint, encoding) is not a bad disk
                self.healthy = False
                failed_bytes = min(_size_bytes(batch[0].fn), MAX_PROBE_BYTES)
                self.recovery_bytes = max(self.recovery_bytes, failed_bytes)
            self._loop.call_soon_threadsafe(_settle, batch, None, JournalError(str(error)))
            return
        if self.healthy or sum(_size_bytes(w.fn) for w in batch) >= self.recovery_bytes:
            self.healthy, self.recovery_bytes = True, 0
        if self.on_commit is not None:
            with contextlib.suppress(Exception):  # a metrics hiccup must not end the writer
                self.on_commit(time.perf_counter() - started, len(batch))
        self._loop.call_soon_threadsafe(_settle, batch, results, None)

    def _transaction(self, fns: list[WriteFn]) -> list[Any]:
        conn = self._conn
        appends: list[NewEvent] = []
        records: list[AttemptRecord] = []
        others = False  # writes that are not batched: each runs on its own, in order
        for fn in fns:
            if isinstance(fn, _Append) and fn.bulk:  # as `_batched` says
                appends.append(fn.event)
            elif isinstance(fn, _Record):
                records.append(fn.record)
            else:
                others = True
        conn.execute("BEGIN IMMEDIATE")
        try:
            if appends:
                _insert_events(conn, appends)
            ended = _record_attempts(conn, records) if records else frozenset()
            results = (
                [None if _batched(fn) else fn(conn) for fn in fns] if others else [None] * len(fns)
            )
            if ended:  # a record's result: had its delivery already ended (swept dead)?
                results = [
                    fn.record.delivery_id in ended if isinstance(fn, _Record) else result
                    for fn, result in zip(fns, results, strict=True)
                ]
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return results


def _batch_scheduling() -> None:
    """Run the calling thread (the writer) under SCHED_BATCH, where Linux has it.

    The writer is woken by each loop turn's writes; under the default policy it then
    preempts the event loop at once and commits the few writes that are queued. As a
    batch thread it does not preempt: it commits when the loop waits for I/O or its
    time slice ends, with all the writes queued by then. On one busy core that made
    commits 3x fewer and 3x larger and cost 10% less CPU per delivered event (from
    ~210 to ~185 us); an idle loop still lets it commit at once. Priority and fairness
    are unchanged, and no privilege is needed.
    """
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def _is_disk_trouble(error: Exception) -> bool:
    # Not a broken constraint, nor a value over SQLite's length limit (DataError: "string
    # or blob too big"): those are bad rows, which a probe could never clear.
    return isinstance(error, sqlite3.Error) and not isinstance(
        error, sqlite3.IntegrityError | sqlite3.DataError
    )


def _batched(fn: WriteFn) -> bool:
    """Writes that `_transaction` does together, with one statement per kind."""
    return isinstance(fn, _Record) or (isinstance(fn, _Append) and fn.bulk)


def _settle(batch: list[_Write], results: list[Any] | None, error: Exception | None) -> None:
    for i, write in enumerate(batch):
        if write.future.done():  # the waiter was cancelled; the write is committed anyway
            continue
        if error is not None:
            write.future.set_exception(error)
        else:
            assert results is not None
            write.future.set_result(results[i])


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
    return conn


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(targets)")}
    if "last_error" not in columns:  # a journal of an earlier relay
        conn.execute("ALTER TABLE targets ADD COLUMN last_error TEXT")
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )


# ---------------------------------------------------------------- write statements


def _first_of_key(conn: sqlite3.Connection, event: NewEvent) -> str | None:
    """Within the dedupe window, the id of the event that first had this key; else claim it."""
    row = conn.execute(
        "SELECT event_id, expires_at_ms FROM dedupe WHERE source = ? AND key = ?",
        (event.source, event.dedupe_key),
    ).fetchone()
    if row is not None and row[1] > event.received_at_ms:
        return str(row[0])
    conn.execute(
        "INSERT OR REPLACE INTO dedupe (source, key, event_id, expires_at_ms) VALUES (?,?,?,?)",
        (event.source, event.dedupe_key, event.id, event.received_at_ms + event.dedupe_window_ms),
    )
    return None


def _insert_events(conn: sqlite3.Connection, events: Sequence[NewEvent]) -> None:
    """Insert events, their payloads and deliveries: three statements, however many events."""
    conn.executemany(
        "INSERT INTO events (id, source, received_at_ms, method, path, query, status,"
        " dedupe_key, routes) VALUES (?,?,?,?,?,?,?,?,?)",
        [
            (
                e.id, e.source, e.received_at_ms, e.method, e.path, e.query, e.status,
                e.dedupe_key, json_text(e.routes),
            )
            for e in events
        ],
    )  # fmt: skip
    conn.executemany(
        "INSERT INTO payloads (event_id, headers, body) VALUES (?,?,?)",
        [(e.id, json_text(e.headers), e.body) for e in events],
    )
    conn.executemany(
        "INSERT INTO deliveries (id, event_id, route, target, status, attempts,"
        " next_at_ms, created_at_ms, order_key) VALUES (?,?,?,?,'pending',0,?,?,?)",
        [
            (d.id, e.id, d.route, d.target, e.received_at_ms, e.received_at_ms, d.order_key)
            for e in events
            for d in e.deliveries
        ],
    )


class _Append:
    """The write of one new event. Appends without a dedupe key that meet in one
    transaction are inserted together (`_Writer._transaction`); with a key, the event is
    checked against the dedupe window first and returns the original's id if it repeats."""

    __slots__ = ("event",)

    def __init__(self, event: NewEvent) -> None:
        self.event = event

    @property
    def bulk(self) -> bool:
        return self.event.dedupe_key is None

    def __call__(self, conn: sqlite3.Connection) -> str | None:
        if self.event.dedupe_key is not None:
            original = _first_of_key(conn, self.event)
            if original is not None:
                return original
        _insert_events(conn, [self.event])
        return None


_EVENT_STATUS_SQL = """
UPDATE events SET
    status = CASE
        WHEN EXISTS (SELECT 1 FROM deliveries WHERE event_id = :e AND status = 'pending')
            THEN 'pending'
        WHEN EXISTS (SELECT 1 FROM deliveries WHERE event_id = :e AND status = 'dead')
            THEN 'dead'
        ELSE 'delivered' END,
    finished_at_ms = CASE
        WHEN EXISTS (SELECT 1 FROM deliveries WHERE event_id = :e AND status = 'pending')
            THEN NULL
        ELSE :now END
WHERE id = :e
"""


def _last_error(record: AttemptRecord) -> str | None:
    if record.outcome == "dead":
        return None if record.reason is None else storable(record.reason)
    if record.error is not None:
        return storable(record.error)
    if record.status is None or record.outcome == "delivered":
        return None
    return f"HTTP {record.status}"


def _record_attempts(conn: sqlite3.Connection, records: Sequence[AttemptRecord]) -> frozenset[str]:
    """Attempts and the deliveries' new states: four statements, however many attempts.
    Returns the deliveries that had already ended (made dead by a sweep while their attempt
    was under way): their state stays as it is, only the attempt is added."""
    marks = ",".join("?" * len(records))
    ended = frozenset(
        row[0]
        for row in conn.execute(
            f"SELECT id FROM deliveries WHERE status != 'pending' AND id IN ({marks})",
            [r.delivery_id for r in records],
        )
    )
    conn.executemany(
        "INSERT OR REPLACE INTO attempts (delivery_id, n, started_at_ms, ms, status, error,"
        " response) VALUES (?,?,?,?,?,?,?)",
        [(r.delivery_id, r.n, r.started_at_ms, r.ms, r.status, r.error and storable(r.error),
          r.response)
         for r in records],
    )  # fmt: skip
    conn.executemany(
        # A delivery made dead meanwhile (its target or route removed, or max_age reached
        # while paused, during the attempt) stays dead: that end was reported when it was
        # made. Its attempt still counts, so that a replay numbers the next one after it.
        "UPDATE deliveries SET attempts = max(attempts, ?2),"
        " status = iif(status = 'pending', ?1, status),"
        " next_at_ms = iif(status = 'pending', ?3, next_at_ms),"
        " last_error = iif(status = 'pending', ?4, last_error)"
        " WHERE id = ?5",
        [(r.outcome, r.n, r.next_at_ms, _last_error(r), r.delivery_id) for r in records],
    )
    stamp = now_ms()
    finished = {r.event_id for r in records if r.outcome != "pending"}
    conn.executemany(_EVENT_STATUS_SQL, [{"e": event_id, "now": stamp} for event_id in finished])
    return ended


class _Record:
    """The write of one attempt's outcome; those that meet in one transaction go together."""

    __slots__ = ("record",)

    def __init__(self, record: AttemptRecord) -> None:
        self.record = record

    def __call__(self, conn: sqlite3.Connection) -> bool:
        return self.record.delivery_id in _record_attempts(conn, [self.record])


def _expire(delivery_id: str, event_id: str, reason: str, created_at_ms: int) -> WriteFn:
    def write(conn: sqlite3.Connection) -> bool:
        # Only the delivery as the lane saw it: a replay since then (new created_at) stays.
        current = conn.execute(
            "SELECT 1 FROM deliveries WHERE id = ? AND status = 'pending' AND created_at_ms = ?",
            (delivery_id, created_at_ms),
        ).fetchone()
        if current is None:
            return False
        _make_dead(conn, [(delivery_id, event_id, "", "", 0)], reason)
        return True

    return write


def _prune(before_ms: int, limit: int) -> WriteFn:
    def write(conn: sqlite3.Connection) -> int:
        ids = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM events WHERE status != 'pending' AND received_at_ms < ? LIMIT ?",
                (before_ms, limit),
            )
        ]
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        conn.execute(
            "DELETE FROM attempts WHERE delivery_id IN"
            f" (SELECT id FROM deliveries WHERE event_id IN ({marks}))",
            ids,
        )
        conn.execute(f"DELETE FROM deliveries WHERE event_id IN ({marks})", ids)
        conn.execute(f"DELETE FROM payloads WHERE event_id IN ({marks})", ids)
        conn.execute(f"DELETE FROM events WHERE id IN ({marks})", ids)
        return len(ids)

    return write


class _Probe:
    """A write of `size_bytes` (zeros, removed by the next write): can the journal take a
    write as large as the one that failed?"""

    __slots__ = ("size_bytes",)

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes

    def __call__(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', zeroblob(?))",
            (self.size_bytes,),
        )


def _drop_probe(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM meta WHERE key = 'probe'")


_ROW_OVERHEAD_BYTES = 1024  # an event's columns besides its body, roughly
# The largest probe: a disk that takes this much again is taken for recovered (a probe as
# large as a 900 MB body would hold the writer for seconds, and SQLite stops at 1 GB).
MAX_PROBE_BYTES = 64 * 2**20


def _size_bytes(fn: WriteFn) -> int:
    """About how many bytes a write adds to the WAL (0 for the small ones)."""
    if isinstance(fn, _Append):
        return len(fn.event.body) + _ROW_OVERHEAD_BYTES
    if isinstance(fn, _Probe):
        return fn.size_bytes
    return 0


def _forget_keys(now_ms: int, limit: int) -> WriteFn:
    def write(conn: sqlite3.Connection) -> int:
        return conn.execute(
            "DELETE FROM dedupe WHERE (source, key) IN"
            " (SELECT source, key FROM dedupe WHERE expires_at_ms <= ? LIMIT ?)",
            (now_ms, limit),
        ).rowcount

    return write


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return (int(row[0]), int(row[1]), int(row[2]))


# ---------------------------------------------------------------- the interface


# A delivery with an order_key may go only when it is the oldest pending one of its key
# (FIFO per key; ordered = true uses one key for the whole target).
_HEAD_OF_ITS_QUEUE = (
    "(d.order_key IS NULL OR d.id = (SELECT min(h.id) FROM deliveries h"
    " WHERE h.target = d.target AND h.order_key = d.order_key AND h.status = 'pending'))"
)


# The head of every order key of a target (`?` = the target), from the deliveries_order
# index alone. An ordered lane's deliveries all carry a key (see `Journal.key_ordering`).
_HEADS = {
    "key": "SELECT min(id) FROM deliveries WHERE target = ? AND status = 'pending'"
    " AND order_key IS NOT NULL GROUP BY order_key",
    # ordered = true: one queue, whose head the index gives at once, however long it is
    "fifo": "SELECT min(id) FROM deliveries WHERE target = ? AND status = 'pending'"
    " AND order_key = ''",
}
Ordering = Literal["", "fifo", "key"]


def _pending_of_target(ordering: Ordering) -> str:
    """The WHERE clause (one `?`: the target) for the deliveries a lane may send."""
    if ordering:
        return f"d.id IN ({_HEADS[ordering]})"
    return f"d.target = ? AND d.status = 'pending' AND {_HEAD_OF_ITS_QUEUE}"


def _skip_held(held: int, ordering: Ordering) -> str:
    """The condition (`held` marks: ids) that leaves out what a lane holds already: those
    deliveries, and for an ordered lane their whole queues. A queue's head may change
    while its old head is in flight (a replay of an older delivery makes that one the
    head), and one queue sends one delivery at a time."""
    if not held:
        return ""
    marks = ",".join("?" * held)
    if not ordering:
        return f" AND d.id NOT IN ({marks})"
    return (
        " AND d.order_key NOT IN (SELECT x.order_key FROM deliveries x"
        f" WHERE x.id IN ({marks}) AND x.order_key IS NOT NULL)"
    )


def _key_ordering(target: str, ordering: Ordering) -> WriteFn:
    condition = {
        "fifo": "(order_key IS NULL OR order_key != '')",  # all in the one queue
        "key": "order_key IS NULL",  # from before the target was ordered: one more queue
        "": "order_key IS NOT NULL",  # no longer ordered: nothing holds anything back
    }[ordering]
    value = "NULL" if ordering == "" else "''"

    def write(conn: sqlite3.Connection) -> int:
        return conn.execute(
            f"UPDATE deliveries SET order_key = {value} WHERE target = ?"
            f" AND status = 'pending' AND {condition}",
            (target,),
        ).rowcount

    return write


def _drain(target: str, now_ms: int, limit: int) -> WriteFn:
    def write(conn: sqlite3.Connection) -> int:
        return conn.execute(
            "UPDATE deliveries SET next_at_ms = ? WHERE id IN (SELECT id FROM deliveries"
            " WHERE target = ? AND status = 'pending' AND next_at_ms > ? LIMIT ?)",
            (now_ms, target, now_ms, limit),
        ).rowcount

    return write


_DEAD_COLUMNS = "id, event_id, target, route, attempts"  # a DeadDelivery, from deliveries


def _make_dead(
    conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], reason: str
) -> list[DeadDelivery]:
    """Pending deliveries (`_DEAD_COLUMNS`) end dead with `reason`; their events follow."""
    reason = storable(reason)  # it may quote a sender's text (a transform's error)
    conn.executemany(
        "UPDATE deliveries SET status = 'dead', last_error = ? WHERE id = ? AND status = 'pending'",
        [(reason, row[0]) for row in rows],
    )
    stamp = now_ms()
    conn.executemany(
        _EVENT_STATUS_SQL, [{"e": event_id, "now": stamp} for event_id in {row[1] for row in rows}]
    )
    return [DeadDelivery(*row) for row in rows]


def _expire_older(target: str, created_before_ms: int, reason: str, limit: int) -> WriteFn:
    # Delivery ids are ULIDs of the arrival time: the primary key finds the old ones.
    below_id = "dlv_" + ulid_floor(created_before_ms)

    def write(conn: sqlite3.Connection) -> list[DeadDelivery]:
        rows = conn.execute(
            f"SELECT {_DEAD_COLUMNS} FROM deliveries WHERE id < ? AND target = ?"
            " AND status = 'pending' AND created_at_ms < ? LIMIT ?",
            (below_id, target, created_before_ms, limit),
        ).fetchall()
        return _make_dead(conn, rows, reason)

    return write


_KillPosition = tuple[int, str]  # (next_at_ms, id) of the last delivery a batch killed


def _kill_pending(
    target: str, route: str | None, reason: str, limit: int, after: _KillPosition
) -> WriteFn:
    def write(conn: sqlite3.Connection) -> tuple[list[DeadDelivery], _KillPosition | None]:
        # Along the pending deliveries' index, from where the last batch stopped: the
        # deliveries of the target's other routes are passed over once, not every batch.
        rows = conn.execute(
            f"SELECT {_DEAD_COLUMNS}, next_at_ms FROM deliveries"
            " WHERE target = ? AND status = 'pending' AND (next_at_ms, id) > (?, ?)"
            " AND (? IS NULL OR route = ?) ORDER BY next_at_ms, id LIMIT ?",
            (target, *after, route, route, limit),
        ).fetchall()
        killed = _make_dead(conn, [row[:-1] for row in rows], reason)
        return killed, (int(rows[-1][-1]), str(rows[-1][0])) if len(rows) == limit else None

    return write


def _save_target(
    name: str, failures: int, pauses: int, paused_until_ms: int | None, last_error: str | None
) -> WriteFn:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO targets (name, failures, pauses, paused_until_ms,"
            " last_error) VALUES (?,?,?,?,?)",
            (name, failures, pauses, paused_until_ms, last_error),
        )

    return write


# ------------------------------------------------ admin queries


@dataclass(frozen=True, slots=True)
class EventSummary:
    """One row of `GET /api/events`."""

    id: str
    source: str
    received_at_ms: int
    status: EventStatus
    deliveries: int


@dataclass(frozen=True, slots=True)
class AttemptRow:
    n: int
    started_at_ms: int
    ms: float
    status: int | None
    error: str | None
    response: bytes | None


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: str
    route: str
    target: str
    status: DeliveryStatus
    attempts: int
    replay_base: int
    next_at_ms: int
    created_at_ms: int
    last_error: str | None
    attempt_log: list[AttemptRow]


@dataclass(frozen=True, slots=True)
class EventDetail:
    """One event as `GET /api/events/{id}` shows it: the request, decisions, deliveries."""

    id: str
    source: str
    received_at_ms: int
    status: EventStatus
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    routes: list[dict[str, Any]]
    dedupe_key: str | None
    finished_at_ms: int | None
    deliveries: list[DeliveryRow]


@dataclass(frozen=True, slots=True)
class Replay:
    """Which finished deliveries a replay re-queues (all conditions must hold)."""

    statuses: tuple[DeliveryStatus, ...] = ("dead",)
    event_id: str | None = None
    target: str | None = None
    route: str | None = None
    since_ms: int | None = None  # the event arrived at or after this (Unix ms)


@dataclass(frozen=True, slots=True)
class Requeued:
    requeued: int
    skipped: int  # chosen, but their target is not in the config
    targets: frozenset[str]  # the targets of the re-queued deliveries (lanes to wake)


def _list_events_sql(
    source: str | None, status: str | None, before: str | None, limit: int
) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for clause, value in (("source = ?", source), ("status = ?", status), ("id < ?", before)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = (
        "SELECT id, source, received_at_ms, status,"
        " (SELECT count(*) FROM deliveries d WHERE d.event_id = e.id) FROM events e"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY id DESC LIMIT ?"
    )
    return sql, [*params, limit]


def _requeue(selection: Replay, known_targets: frozenset[str], now_ms: int) -> WriteFn:
    """Pending again, due now, with a fresh retry budget and max_age counted from now.

    Set-based (a few statements, however many deliveries): about 0.4 s per 100,000.
    """
    marks = ",".join("?" * len(selection.statuses))
    where = [f"status IN ({marks})"]
    params: list[Any] = list(selection.statuses)
    if selection.event_id is not None:
        where.append("event_id = ?")
        params.append(selection.event_id)
    if selection.target is not None:
        where.append("target = ?")
        params.append(selection.target)
    if selection.route is not None:
        where.append("route = ?")
        params.append(selection.route)
    if selection.since_ms is not None:  # delivery ids are ULIDs of the event's arrival
        where.append("id >= ?")
        params.append("dlv_" + ulid_floor(max(0, selection.since_ms)))
    known = sorted(known_targets)
    in_known = f"target IN ({','.join('?' * len(known))})"
    matching = " AND ".join(where)
    chosen = f"{matching} AND {in_known}"
    chosen_params = [*params, *known]

    def write(conn: sqlite3.Connection) -> Requeued | None:
        if selection.event_id is not None:
            found = conn.execute("SELECT 1 FROM events WHERE id = ?", (selection.event_id,))
            if found.fetchone() is None:
                return None
        skipped = conn.execute(
            f"SELECT count(*) FROM deliveries WHERE {matching} AND NOT {in_known}", chosen_params
        ).fetchone()[0]
        distinct = f"SELECT DISTINCT target FROM deliveries WHERE {chosen}"
        touched = frozenset(str(row[0]) for row in conn.execute(distinct, chosen_params))
        # What _EVENT_STATUS_SQL would compute, without its per-event subqueries: an event
        # with a pending delivery is pending (and unfinished). Before the deliveries change.
        conn.execute(
            "UPDATE events SET status = 'pending', finished_at_ms = NULL"
            f" WHERE id IN (SELECT event_id FROM deliveries WHERE {chosen})",
            chosen_params,
        )
        requeued = conn.execute(
            "UPDATE deliveries SET status = 'pending', next_at_ms = ?, replay_base = attempts,"
            f" created_at_ms = ?, last_error = NULL WHERE {chosen}",
            [now_ms, now_ms, *chosen_params],
        ).rowcount
        return Requeued(requeued, int(skipped), touched)

    return write


class Journal:
    """The durable store; use `async with open_journal(...) as journal`."""

    def __init__(
        self, writer: _Writer, reader: aiosqlite.Connection, synchronous: str, path: Path
    ) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self.synchronous = synchronous  # as read back from SQLite: "full" or "normal"

    @property
    def healthy(self) -> bool:
        """False after a write failed, until the next write succeeds."""
        return self._writer.healthy

    def set_commit_observer(self, observer: Callable[[float, int], None]) -> None:
        """Call `observer(seconds, writes)` from the writer thread after every commit."""
        self._writer.on_commit = observer

    async def _write(self, fn: WriteFn, *, alone: bool = False) -> Any:
        # A cancelled waiter cancels only its future: the write is still committed, and
        # `_settle` skips futures that are already done (no shield needed, none paid for).
        return await self._writer.submit(fn, alone=alone)

    def append(self, event: NewEvent) -> asyncio.Future[str | None]:
        """Commit the event and its deliveries in one transaction (group-committed).

        With a `dedupe_key` seen within its window, nothing is written and the id of the
        first event with that key is the result instead. (A future, not a coroutine: this
        runs once per webhook, and a coroutine frame is a cost for nothing here.)
        """
        return self._writer.submit(_Append(event))

    def record(self, record: AttemptRecord) -> asyncio.Future[bool | None]:
        """Commit an attempt and the delivery's new state (group-committed); a future, True
        when the delivery had already ended (made dead while its attempt was under way)."""
        return self._writer.submit(_Record(record))

    async def expire(
        self, delivery_id: str, event_id: str, reason: str, created_at_ms: int
    ) -> bool:
        """Mark a delivery dead without an attempt (too old, its transform failed...).

        False when it is no longer the pending delivery the caller saw (already dead, or
        replayed since): then nothing changes.
        """
        return bool(await self._write(_expire(delivery_id, event_id, reason, created_at_ms)))

    async def prune(self, before_ms: int, limit: int = 500) -> int:
        """Delete up to `limit` finished events received before `before_ms`; how many."""
        return int(await self._write(_prune(before_ms, limit)))

    async def key_ordering(self, target: str, ordering: Ordering) -> int:
        """Make a target's pending deliveries fit its ordering now (after a config change).
        How many changed."""
        return int(await self._write(_key_ordering(target, ordering)))

    async def drain(self, target: str, now_ms: int, limit: int = 5000) -> int:
        """Make up to `limit` of `target`'s scheduled retries due now (a resumed target)."""
        return int(await self._write(_drain(target, now_ms, limit)))

    async def expire_older(
        self, target: str, created_before_ms: int, reason: str, limit: int = 500
    ) -> list[DeadDelivery]:
        """Make pending deliveries that arrived before the cutoff dead."""
        expired: list[DeadDelivery] = await self._write(
            _expire_older(target, created_before_ms, reason, limit)
        )
        return expired

    async def kill_pending(
        self, *, target: str, route: str | None = None, reason: str
    ) -> AsyncIterator[list[DeadDelivery]]:
        """Make every pending delivery of a target (of one route only, if given) dead, in
        transactions of up to 500; yields each one's deliveries once it is committed."""
        after: _KillPosition | None = (-(2**63), "")
        while after is not None:
            killed, after = await self._write(_kill_pending(target, route, reason, 500, after))
            if killed:
                yield killed

    async def pending_targets(self) -> set[str]:
        """The targets that have pending deliveries."""
        rows = await self._reader.execute_fetchall(
            "SELECT DISTINCT target FROM deliveries WHERE status = 'pending'"
        )
        return {str(row[0]) for row in rows}

    async def oldest_pending_ms(self, target: str) -> int | None:
        """When the oldest pending delivery of `target` arrived (ids are time ordered)."""
        rows = list(
            await self._reader.execute_fetchall(
                "SELECT created_at_ms FROM deliveries WHERE target = ? AND status = 'pending'"
                " ORDER BY id LIMIT 1",
                (target,),
            )
        )
        return int(rows[0][0]) if rows else None

    async def save_target(self, name: str, saved: SavedPause) -> None:
        """Keep a target's pause state so that a restart does not forget a pause."""
        await self._write(
            _save_target(
                name, saved.failures, saved.pauses, saved.paused_until_ms, saved.last_error
            )
        )

    async def load_target(self, name: str) -> SavedPause | None:
        rows = list(
            await self._reader.execute_fetchall(
                "SELECT failures, pauses, paused_until_ms, last_error FROM targets WHERE name = ?",
                (name,),
            )
        )
        if not rows:
            return None
        failures, pauses, until, last_error = rows[0]
        return SavedPause(
            int(failures), int(pauses), None if until is None else int(until), last_error
        )

    async def forget_keys(self, now_ms: int, limit: int = 500) -> int:
        """Delete up to `limit` dedupe keys whose window ended; how many."""
        return int(await self._write(_forget_keys(now_ms, limit)))

    async def probe(self) -> bool:
        """Try a write as large as the one that failed (`recovery_bytes`), so that a journal
        that failed can report itself healthy again once it would take that write."""
        with contextlib.suppress(JournalError):
            await self._write(_Probe(self._writer.recovery_bytes))
            await self._write(_drop_probe)
        return self.healthy

    async def checkpoint(self) -> tuple[int, int, int]:
        """Checkpoint the WAL (passive): (busy, wal pages, pages checkpointed)."""
        result: tuple[int, int, int] = await self._write(_checkpoint, alone=True)
        return result

    async def due(
        self,
        target: str,
        now_ms: int,
        limit: int,
        exclude: Collection[str] = (),
        *,
        ordering: Ordering = "",
    ) -> list[DueDelivery]:
        """Up to `limit` pending deliveries of `target` due by `now_ms`, oldest first.

        `ordering` ("fifo": ordered = true; "key": order_key): only the oldest pending
        delivery of each key may go; the heads come from the `deliveries_order` index, so a
        long queue behind a failing head is not scanned.
        """
        skip = _skip_held(len(exclude), ordering)
        where = _pending_of_target(ordering)
        sql = (
            "SELECT d.id, d.event_id, d.route, d.attempts, d.created_at_ms,"
            " e.source, e.method, e.path, e.query, p.headers,"
            f" iif(length(p.body) <= {INLINE_BODY_BYTES}, p.body, NULL), d.replay_base"
            " FROM deliveries d JOIN events e ON e.id = d.event_id"
            " JOIN payloads p ON p.event_id = d.event_id"
            f" WHERE {where} AND d.next_at_ms <= ?{skip} ORDER BY d.next_at_ms, d.id LIMIT ?"
        )
        rows = await self._reader.execute_fetchall(sql, (target, now_ms, *exclude, limit))
        # Positional, in DueDelivery's field order: a window of rows per refill (0.5 us a row
        # less than by keyword with a comprehension per row's headers, measured).
        return [
            DueDelivery(r[0], r[1], r[2], target, r[3], r[4], r[5], r[6], r[7], r[8],
                        list(map(tuple, orjson.loads(r[9]))),
                        None if r[10] is None else bytes(r[10]), r[11])
            for r in rows
        ]  # fmt: skip

    async def body_of(self, event_id: str) -> bytes | None:
        """The body of an event (for a delivery whose window left it out: `DueDelivery`);
        None when the event is gone (it ended, and retention pruned it)."""
        rows = list(
            await self._reader.execute_fetchall(
                "SELECT body FROM payloads WHERE event_id = ?", (event_id,)
            )
        )
        return bytes(rows[0][0]) if rows else None

    async def next_due_ms(
        self, target: str, exclude: Collection[str] = (), *, ordering: Ordering = ""
    ) -> int | None:
        """When the next pending delivery of `target` (not in `exclude`) is due."""
        skip = _skip_held(len(exclude), ordering)
        where = _pending_of_target(ordering)
        sql = f"SELECT d.next_at_ms FROM deliveries d WHERE {where}{skip} ORDER BY 1, d.id LIMIT 1"
        rows = list(await self._reader.execute_fetchall(sql, (target, *exclude)))
        return int(rows[0][0]) if rows else None

    async def pending_count(self) -> int:
        rows = list(
            await self._reader.execute_fetchall(
                "SELECT count(*) FROM deliveries WHERE status = 'pending'"
            )
        )
        return int(rows[0][0])

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query (for the admin API and tests of the journal itself)."""
        return [tuple(r) for r in await self._reader.execute_fetchall(sql, params)]

    # -------------------------------------------- admin queries (the admin API's reads)

    async def list_events(
        self,
        *,
        source: str | None = None,
        status: str | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> list[EventSummary]:
        """Up to `limit` events, newest first; `before`: only ids below this one (paging)."""
        sql, params = _list_events_sql(source, status, before, limit)
        rows = await self._reader.execute_fetchall(sql, params)
        return [EventSummary(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def get_event(self, event_id: str) -> EventDetail | None:
        """The event with its deliveries and their attempts; None when there is no such id."""
        rows = list(
            await self._reader.execute_fetchall(
                "SELECT e.id, e.source, e.received_at_ms, e.status, e.method, e.path, e.query,"
                " p.headers, p.body, e.routes, e.dedupe_key, e.finished_at_ms"
                " FROM events e JOIN payloads p ON p.event_id = e.id WHERE e.id = ?",
                (event_id,),
            )
        )
        if not rows:
            return None
        e = rows[0]
        attempts: dict[str, list[AttemptRow]] = {}
        for a in await self._reader.execute_fetchall(
            "SELECT delivery_id, n, started_at_ms, ms, status, error, response FROM attempts"
            " WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_id = ?)"
            " ORDER BY delivery_id, n",
            (event_id,),
        ):
            response = None if a[6] is None else bytes(a[6])
            attempts.setdefault(a[0], []).append(AttemptRow(a[1], a[2], a[3], a[4], a[5], response))
        deliveries = [
            DeliveryRow(
                id=d[0],
                route=d[1],
                target=d[2],
                status=d[3],
                attempts=d[4],
                replay_base=d[5],
                next_at_ms=d[6],
                created_at_ms=d[7],
                last_error=d[8],
                attempt_log=attempts.get(d[0], []),
            )
            for d in await self._reader.execute_fetchall(
                "SELECT id, route, target, status, attempts, replay_base, next_at_ms,"
                " created_at_ms, last_error FROM deliveries WHERE event_id = ? ORDER BY id",
                (event_id,),
            )
        ]
        return EventDetail(
            id=e[0],
            source=e[1],
            received_at_ms=e[2],
            status=e[3],
            method=e[4],
            path=e[5],
            query=e[6],
            headers=[(k, v) for k, v in orjson.loads(e[7])],
            body=bytes(e[8]),
            routes=orjson.loads(e[9]),
            dedupe_key=e[10],
            finished_at_ms=e[11],
            deliveries=deliveries,
        )

    async def queue_depths(self) -> dict[str, int]:
        """Pending deliveries per target (one pass over the partial index of pending ones)."""
        rows = await self._reader.execute_fetchall(
            "SELECT target, count(*) FROM deliveries WHERE status = 'pending' GROUP BY target"
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def requeue(
        self, selection: Replay, known_targets: Collection[str], now_ms: int
    ) -> Requeued | None:
        """Re-queue the chosen finished deliveries whose target is known, in one transaction.

        Each becomes pending and due at `now_ms`, its retry budget restarts (`replay_base`
        = attempts so far; attempt numbers keep counting), `max_age` counts from `now_ms`,
        and its event is pending again. None when `selection.event_id` names no event.
        """
        result: Requeued | None = await self._write(
            _requeue(selection, frozenset(known_targets), now_ms)
        )
        return result


@contextlib.asynccontextmanager
async def open_journal(path: Path, sync: str) -> AsyncIterator[Journal]:
    """Open (creating if needed) the journal at `path`; close it cleanly on exit."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = _Writer(path, sync, asyncio.get_running_loop())
    except (OSError, sqlite3.Error) as error:  # one line for the operator, not a traceback
        raise JournalError(f"{path}: cannot open it: {error}") from error
    try:
        level, mode = writer.prepare()
        if mode != "wal":
            raise JournalError(f"{path}: could not switch to WAL mode (got {mode!r})")
        reader = await aiosqlite.connect(path, isolation_level=None)
    except (OSError, sqlite3.Error) as error:
        writer.close()
        raise JournalError(f"{path}: cannot open it: {error}") from error
    except JournalError:
        writer.close()
        raise
    try:
        await reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        writer.start()
        # PRAGMA synchronous reads back 2 for FULL and 1 for NORMAL.
        yield Journal(writer, reader, {2: "full", 1: "normal"}.get(level, str(level)), path)
    finally:
        await asyncio.to_thread(writer.stop)
        await reader.close()
