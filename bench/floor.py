"""Benchmark: the floor of a durable webhook server in Python, against the peer and relay.

The "floor" is the least any server in this stack must do to answer an ingest request
the way relay does: parse HTTP/1.1 with httptools on uvloop, check the GitHub signature,
parse the JSON body, match `X-GitHub-Event`, and commit the event and one delivery to
SQLite (WAL) in a writer thread with group commit before answering 202 — nothing else:
no config, no routing table, no metrics, no logs, no limits. Its writer runs under
`SCHED_BATCH` as relay's does, so batches fill (all 64 connections per commit).

One run interleaves, in rounds: the peer (adnanh/webhook, stores nothing), then the floor
and relay's ingest scenario each with `synchronous = FULL` (as the ingest scenario: an
fdatasync per commit, survives power loss) and `NORMAL` (WAL mode: no fdatasync at commit,
survives a crash of the process), all pinned as `python -m bench` pins them, and prints
the medians as ratios to the peer. It answers one question: is the peer goal (ingest at least
1.0 times the peer) within reach of any durable server in Python on this machine?

Usage: python bench/floor.py [--runs 3] [--seconds 5]
       python bench/floor.py serve PORT JOURNAL full|normal   (the floor server itself)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httptools
import orjson
import uvloop

# Run as a script (python bench/floor.py): the repository root is the import root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, source TEXT, received_at REAL,"
    " headers TEXT, body BLOB)",
    "CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY, event_id TEXT, target TEXT,"
    " status TEXT, due REAL)",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (target, status, due)",
)


class _Writer:
    """Group commit: whatever arrived while the last commit ran goes into the next one."""

    def __init__(self, journal: str, sync: str, loop: asyncio.AbstractEventLoop) -> None:
        self._db = sqlite3.connect(journal, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(f"PRAGMA synchronous = {sync.upper()}")
        for statement in _SCHEMA:
            self._db.execute(statement)
        self._loop = loop
        self._pending: list[tuple[tuple[object, ...], tuple[object, ...], asyncio.Future[None]]]
        self._pending = []
        self._wake = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def append(
        self, event: tuple[object, ...], delivery: tuple[object, ...]
    ) -> asyncio.Future[None]:
        committed = self._loop.create_future()
        with self._wake:
            self._pending.append((event, delivery, committed))
            self._wake.notify()
        return committed

    def _run(self) -> None:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                batch, self._pending = self._pending, []
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", [b[0] for b in batch])
            self._db.executemany(
                "INSERT INTO deliveries VALUES (?, ?, ?, ?, ?)", [b[1] for b in batch]
            )
            self._db.execute("COMMIT")
            self._loop.call_soon_threadsafe(_settle, [b[2] for b in batch])


def _settle(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        future.set_result(None)


class _Floor(asyncio.Protocol):
    """One connection: keep-alive HTTP/1.1, each request verified, parsed and journaled."""

    writer: _Writer
    key = harness.SECRET.encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        body, headers = b"".join(self.body), self.headers
        self.body, self.headers = [], {}
        if self.parser.get_method() == b"GET":  # the harness's readiness probe
            self._reply(b"200 OK", b"")
            return
        expected = b"sha256=" + hmac.new(self.key, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(expected, headers.get(b"x-hub-signature-256", b"")):
            self._reply(b"401 Unauthorized", b"")
            return
        orjson.loads(body)
        names = {name.decode(): value.decode() for name, value in headers.items()}
        if names.get("x-github-event") != "push":
            self._reply(b"202 Accepted", b'{"deliveries":0}')
            return
        event_id, now = os.urandom(16).hex(), time.time()
        event = (event_id, "github", now, orjson.dumps(names), body)
        committed = self.writer.append(
            event, (event_id + "-sink", event_id, "sink", "pending", now)
        )
        reply = orjson.dumps({"id": event_id, "deliveries": 1})
        committed.add_done_callback(lambda _: self._reply(b"202 Accepted", reply))

    def _reply(self, status: bytes, body: bytes) -> None:
        head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        self.transport.write(head % (status, len(body)) + body)


async def _serve(port: int, journal: str, sync: str) -> None:
    loop = asyncio.get_running_loop()
    _Floor.writer = _Writer(journal, sync, loop)
    await loop.create_server(_Floor, "127.0.0.1", port)
    await asyncio.Event().wait()


def floor_scenario(seconds: int, sync: str) -> harness.Result:
    port = harness.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        command = [*harness.pinned(0), sys.executable, __file__, "serve", str(port),
                   str(Path(tmp) / "floor.db"), sync]  # fmt: skip
        with harness.process(command, f"http://127.0.0.1:{port}/"):
            script = harness.lua_script(Path(tmp), [(harness.ONE_KIB_BODY, "push")])
            return harness.run_wrk(f"http://127.0.0.1:{port}/hooks/github", script, seconds)


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        port, journal, sync = sys.argv[2:5]
        uvloop.run(_serve(int(port), journal, sync))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    print(harness.machine_description())
    scenarios: dict[str, Callable[[], harness.Result]] = {
        "peer": lambda: harness.peer_scenario(args.seconds),
        "floor, sync full": lambda: floor_scenario(args.seconds, "full"),
        "floor, sync normal": lambda: floor_scenario(args.seconds, "normal"),
        "relay, sync full": lambda: harness.ingest_scenario(args.seconds, mix=False),
        "relay, sync normal": lambda: harness.ingest_scenario(
            args.seconds, mix=False, sync="normal"
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in scenarios}
    for round_number in range(1, args.runs + 1):
        for name, run in scenarios.items():
            result = run()
            print(f"round {round_number}  {name:18} {result.summary()}", flush=True)
            if result.skipped:
                return
            rates[name].append(result.rate)
    peer = statistics.median(rates["peer"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:18} median {median:8.0f}/s  {median / peer:.2f}x the peer")


if __name__ == "__main__":
    main()
