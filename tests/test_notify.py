"""The notify protocol client on its own: what it sends, and that it never blocks."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from relay.notify import Notifier


def test_watchdog_interval_is_half_of_watchdog_usec_and_off_at_zero() -> None:
    """WATCHDOG_USEC=2000000 pings every second; 0 or garbage means no watchdog at all."""
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog_interval_s == 1.0
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "-5"}).watchdog_interval_s is None
    assert Notifier({}).watchdog_interval_s is None


def test_messages_arrive_as_one_datagram_of_lines(tmp_path: Path) -> None:
    """READY=1 and STATUS= go out together, as systemd expects."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        Notifier({"NOTIFY_SOCKET": path}).send("READY=1", "STATUS=serving")
        assert server.recv(4096) == b"READY=1\nSTATUS=serving"


def test_a_service_manager_that_stops_reading_does_not_block_the_daemon(tmp_path: Path) -> None:
    """With the socket's queue full, sends are dropped instead of freezing the event loop."""
    path = str(tmp_path / "stalled.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)  # bound, never read
        notifier = Notifier({"NOTIFY_SOCKET": path})
        sender = threading.Thread(target=lambda: [notifier.send("WATCHDOG=1") for _ in range(500)])
        sender.start()
        sender.join(timeout=10)
        assert not sender.is_alive()
