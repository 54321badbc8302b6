"""Benchmark: the delivery side alone — CPU per delivery while a backlog drains.

Writes N pending deliveries (1 KiB bodies) for an open target into a journal, starts the
daemon pinned to core 0 and a receiver (a plain aiohttp server) on core 1, and after a
second of warm-up reports deliveries/s and the daemon's CPU time per delivery (user +
system, all threads) over a bounded window. No ingest runs meanwhile, so this is the
cost of one delivery: the lane, the HTTP request, and recording the outcome.

Usage: python bench/drain.py [--count 60000] [--seconds 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

# Run as a script (python bench/drain.py): the repository root is the import root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.backlog import config_text, make_backlog
from bench.harness import (
    ONE_KIB_BODY,
    RECEIVER_SERVER,
    REPO,
    delivered_count,
    free_port,
    pinned,
    process,
)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60_000)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    port = free_port()
    receiver_port = free_port(avoid=(port, port + 1))
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "relay.db"
        make_backlog(journal, args.count, body=ONE_KIB_BODY)
        with contextlib.closing(sqlite3.connect(journal)) as conn, conn:
            conn.execute("DELETE FROM targets")  # open: the lane drains at once
        config = Path(tmp) / "relay.toml"
        url = f"http://127.0.0.1:{receiver_port}/hook"
        config.write_text(
            config_text(journal, port, url).replace(
                "[targets.svc]", "[targets.svc]\nconcurrency = 16"
            )
        )
        with (
            process([*pinned(1), sys.executable, "-c", RECEIVER_SERVER, str(receiver_port)],
                    f"http://127.0.0.1:{receiver_port}/"),
            process([*pinned(0), sys.executable, "-m", "relay", "run", "-c", str(config)],
                    f"http://127.0.0.1:{port + 1}/readyz", cwd=REPO) as daemon,
        ):  # fmt: skip
            time.sleep(1.0)
            started, cpu0, done0 = time.monotonic(), cpu_s(daemon.pid), delivered_count(journal)
            time.sleep(args.seconds)
            elapsed = time.monotonic() - started
            cpu, done = cpu_s(daemon.pid) - cpu0, delivered_count(journal) - done0
    print(
        f"drain: {done / elapsed:.0f} deliveries/s, daemon CPU {cpu / elapsed * 100:.0f}% of a "
        f"core, {cpu / max(done, 1) * 1e6:.0f} us of CPU per delivery"
    )


if __name__ == "__main__":
    main()
