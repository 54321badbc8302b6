"""The systemd notify protocol: datagrams to $NOTIFY_SOCKET, no dependency.

This module owns what relay tells its service manager (SPEC §7): READY=1 once
serving, STOPPING=1 when stopping, STATUS= lines, and WATCHDOG=1 pings at half
of $WATCHDOG_USEC. Without $NOTIFY_SOCKET (not under systemd) every call does
nothing. Abstract socket names (a leading "@") are supported.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends notify messages to the socket systemd named, if any."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        applies = not watchdog_pid or watchdog_pid == str(os.getpid())
        enabled = watchdog_usec.isdigit() and int(watchdog_usec) > 0 and applies
        self.watchdog_interval_s = int(watchdog_usec) / 2_000_000 if enabled else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *fields: str) -> None:
        """Send one datagram of `KEY=value` lines; errors are ignored (systemd may be gone)."""
        if not self._address:
            return
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                # Never block the event loop on a stalled service manager: drop the message.
                sock.send(message, socket.MSG_DONTWAIT)
        except OSError:
            pass
