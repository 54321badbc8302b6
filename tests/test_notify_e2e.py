"""End-to-end systemd notify protocol: what the real daemon sends to $NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import Daemon, eventually, server_toml

DaemonFactory = Callable[..., Awaitable[Daemon]]


def relay_config(tmp_path: Path) -> str:
    return (
        server_toml(tmp_path)
        + """
[sources.app]
[targets.out]
url = "log:"
[[routes]]
name = "app-to-out"
source = "app"
targets = ["out"]
"""
    )


@dataclass
class NotifySocket:
    """A stand-in for systemd's notify socket: records every datagram and when it arrived."""

    sock: socket.socket
    env_value: str  # what $NOTIFY_SOCKET says
    received: list[tuple[float, list[str]]] = field(default_factory=list)

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            self.received.append((time.monotonic(), data.decode().split("\n")))

    @property
    def messages(self) -> list[list[str]]:
        return [lines for _, lines in self.received]

    def with_line(self, line: str) -> list[list[str]]:
        return [lines for lines in self.messages if line in lines]

    def times_of(self, line: str) -> list[float]:
        return [at for at, lines in self.received if line in lines]


@contextlib.asynccontextmanager
async def notify_socket(tmp_path: Path, kind: str) -> AsyncIterator[NotifySocket]:
    """Bind a datagram socket (a file in tmp_path, or an abstract name) and drain it meanwhile."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "abstract":
        name = f"relay-test-{secrets.token_hex(8)}"
        sock.bind("\0" + name)
        env_value = "@" + name
    else:
        path = tmp_path / "notify.sock"
        assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
        sock.bind(str(path))
        env_value = str(path)
    sock.setblocking(False)
    notify = NotifySocket(sock, env_value)
    # Read all along: a full datagram queue would block the daemon's sender.
    reader = asyncio.create_task(notify.read())
    try:
        yield notify
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_notify_ready_watchdog_and_stopping(
    tmp_path: Path, daemons: DaemonFactory, kind: str
) -> None:
    """Under systemd: READY=1 and a STATUS once serving, WATCHDOG=1 pings, STOPPING=1 at SIGTERM."""
    async with notify_socket(tmp_path, kind) as notify:
        daemon = await daemons(
            relay_config(tmp_path),
            env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": ""},
        )
        await eventually(lambda: notify.with_line("READY=1"))
        first = notify.messages[0]
        assert "READY=1" in first
        (status,) = [line for line in first if line.startswith("STATUS=")]
        assert daemon.listen in status
        assert await daemon.ready() == 200  # READY=1 means serving
        await eventually(lambda: len(notify.with_line("WATCHDOG=1")) >= 2)
        assert all(lines == ["WATCHDOG=1"] for lines in notify.messages[1:])
        daemon.signal(signal.SIGTERM)
        (stopping,) = await eventually(lambda: notify.with_line("STOPPING=1"))
        assert any(line.startswith("STATUS=") for line in stopping)
        assert await daemon.wait() == 0
        assert await daemon.wait_log("relay.stopped") is not None
        assert len(notify.with_line("READY=1")) == 1


async def test_watchdog_pings_at_half_of_watchdog_usec(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """With WATCHDOG_USEC=400000 the daemon pings about every 0.2 s (not 0.4 s, not flooding)."""
    async with notify_socket(tmp_path, "path") as notify:
        daemon = await daemons(
            relay_config(tmp_path),
            env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": ""},
        )
        await eventually(lambda: len(notify.times_of("WATCHDOG=1")) >= 5)
        pings = notify.times_of("WATCHDOG=1")[:5]
        mean_interval_s = (pings[-1] - pings[0]) / (len(pings) - 1)
        assert 0.16 <= mean_interval_s <= 0.3, mean_interval_s
        assert await daemon.stop() == 0


@pytest.mark.parametrize(
    "watchdog_env",
    [{"WATCHDOG_USEC": ""}, {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}],
    ids=["no-watchdog-usec", "watchdog-for-another-pid"],
)
async def test_no_watchdog_pings_unless_asked_for_this_process(
    tmp_path: Path, daemons: DaemonFactory, watchdog_env: dict[str, str]
) -> None:
    """Without WATCHDOG_USEC, or with WATCHDOG_PID naming another process, no WATCHDOG=1 is sent."""
    async with notify_socket(tmp_path, "path") as notify:
        daemon = await daemons(
            relay_config(tmp_path), env={"NOTIFY_SOCKET": notify.env_value, **watchdog_env}
        )
        await eventually(lambda: notify.with_line("READY=1"))
        daemon.signal(signal.SIGTERM)
        await eventually(lambda: notify.with_line("STOPPING=1"))
        assert await daemon.wait() == 0
        assert notify.with_line("WATCHDOG=1") == []
        assert [lines[0] for lines in notify.messages] == ["READY=1", "STOPPING=1"]


async def test_a_vanished_notify_socket_does_not_stop_the_daemon(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A NOTIFY_SOCKET that nothing listens on is ignored: the daemon serves and exits 0."""
    daemon = await daemons(
        relay_config(tmp_path),
        env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "200000"},
    )
    status, reply, _ = await daemon.post("/hooks/app", {"x": 1})
    assert status == 202
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"])
    assert await daemon.stop() == 0


async def test_reloads_are_announced_with_reloading_then_ready(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """Each SIGHUP sends RELOADING=1 with MONOTONIC_USEC, then READY=1 — a failed reload too."""
    async with notify_socket(tmp_path, "path") as notify:
        daemon = await daemons(relay_config(tmp_path), env={"NOTIFY_SOCKET": notify.env_value})
        await eventually(lambda: notify.with_line("READY=1"))
        for outcome, text in (
            ("config.reloaded", relay_config(tmp_path) + "[sources.more]\n"),
            ("config.reload_failed", relay_config(tmp_path) + "[sources.bad]\nnope = 1\n"),
        ):
            daemon.config_path.write_text(text)
            before_usec = time.monotonic_ns() // 1000
            count = len(notify.messages)
            daemon.signal(signal.SIGHUP)
            await daemon.wait_log(outcome)
            await eventually(lambda c=count: len(notify.messages) >= c + 2)
            reloading, ready = notify.messages[count : count + 2]
            assert reloading[0] == "RELOADING=1"
            (usec,) = [line for line in reloading if line.startswith("MONOTONIC_USEC=")]
            assert int(usec.split("=")[1]) >= before_usec
            assert ready[0] == "READY=1"
        assert await daemon.ready() == 200


async def test_status_says_when_a_reload_was_refused(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """After a refused reload `systemctl status` shows it: STATUS= says the reload failed,
    with how many errors, and that the previous config still runs; after the next good
    reload it says serving again."""
    async with notify_socket(tmp_path, "path") as notify:
        daemon = await daemons(relay_config(tmp_path), env={"NOTIFY_SOCKET": notify.env_value})
        await eventually(lambda: notify.with_line("READY=1"))
        serving = f"STATUS=serving on {daemon.listen}"
        for text, status in (
            (
                relay_config(tmp_path) + "[sources.bad]\nnope = 1\nnah = 2\n",
                "STATUS=reload failed (2 errors); running the previous config, "
                f"serving on {daemon.listen}",
            ),
            (relay_config(tmp_path) + "[sources.more]\n", serving),
        ):
            daemon.config_path.write_text(text)
            count = len(notify.messages)
            daemon.signal(signal.SIGHUP)
            await eventually(lambda c=count: len(notify.messages) >= c + 2)
            ready = notify.messages[count + 1]
            assert ready == ["READY=1", status]
        assert await daemon.ready() == 200
