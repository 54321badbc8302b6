"""Benchmark: a paused target with a very large backlog (issue 5, SPEC §10 "backlog").

Writes N pending deliveries (default 1,000,000) for one target straight into a journal,
with the target paused in the `targets` table, starts the real daemon on it and reports
the time from start to `/readyz` 200 and the resident memory once ready. (The drain rate
once the target is back is measured by `python -m bench --only backlog`.)

Usage: python bench/backlog.py [--count 1000000]
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from relay.journal import SCHEMA  # noqa: E402 - after the path set-up above

BASE_MS = 1_764_000_000_000
HEADERS_JSON = '[["Content-Type", "application/json"]]'


def make_backlog(journal: Path, count: int, target: str = "svc", body: bytes = b'{"n": 1}') -> None:
    """`count` pending deliveries for `target`, and the target paused for an hour."""
    now_ms = int(time.time() * 1000)
    with contextlib.closing(sqlite3.connect(journal, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")

        def events() -> Iterator[tuple[object, ...]]:
            for i in range(count):
                yield (f"evt_{i:026d}", "app", now_ms - count + i, "POST", "/hooks/app", "",
                       "pending", "[]")  # fmt: skip

        def payloads() -> Iterator[tuple[object, ...]]:
            for i in range(count):
                yield (f"evt_{i:026d}", HEADERS_JSON, body)

        def deliveries() -> Iterator[tuple[object, ...]]:
            for i in range(count):
                at = now_ms - count + i
                yield (f"dlv_{i:026d}", f"evt_{i:026d}", "r", target, "pending", 0, at, at)

        conn.executemany(
            "INSERT INTO events (id, source, received_at_ms, method, path, query, status,"
            " routes) VALUES (?,?,?,?,?,?,?,?)",
            events(),
        )
        conn.executemany(
            "INSERT INTO payloads (event_id, headers, body) VALUES (?,?,?)", payloads()
        )
        conn.executemany(
            "INSERT INTO deliveries (id, event_id, route, target, status, attempts, next_at_ms,"
            " created_at_ms) VALUES (?,?,?,?,?,?,?,?)",
            deliveries(),
        )
        conn.execute(
            "INSERT OR REPLACE INTO targets (name, failures, pauses, paused_until_ms)"
            " VALUES (?, 0, 1, ?)",
            (target, now_ms + 3_600_000),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def config_text(journal: Path, port: int, url: str) -> str:
    return f"""
[server]
listen = "127.0.0.1:{port}"
admin = "127.0.0.1:{port + 1}"
journal = "{journal}"
[log]
format = "json"
level = "warning"
[sources.app]
[targets.svc]
url = "{url}"
retry = {{ max_age = "30d" }}
[[routes]]
name = "r"
source = "app"
targets = ["svc"]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.monotonic()
        make_backlog(folder / "relay.db", args.count)
        print(f"backlog of {args.count:,} written in {time.monotonic() - started:.1f} s")
        config = folder / "relay.toml"
        config.write_text(config_text(folder / "relay.db", 18700, "http://127.0.0.1:9/down"))
        started = time.monotonic()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "relay", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        try:
            while True:
                with contextlib.suppress(OSError):
                    urllib.request.urlopen("http://127.0.0.1:18701/readyz", timeout=1).close()
                    break
                time.sleep(0.02)
            ready_s = time.monotonic() - started
            time.sleep(2)  # let the lanes settle on their windows
            rss_mib = rss_bytes(daemon.pid) / 2**20
            print(f"ready after {ready_s:.2f} s; resident memory {rss_mib:.0f} MiB")
        finally:
            daemon.terminate()
            daemon.wait(30)


if __name__ == "__main__":
    main()
