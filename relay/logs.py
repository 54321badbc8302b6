"""Logging: structlog set up to write one line per unit of work to stdout.

This module owns the log format (SPEC §8): JSON lines (rendered by orjson)
when stdout is not a terminal or `format = "json"`, readable key=value lines
on a terminal; every line has `event`, `level` and `ts`. When stdout is
journald's stream (`JOURNAL_STREAM` names its device and inode) each JSON line
starts with the syslog priority prefix (`<3>` for errors) so `journalctl -p err`
works. It
also owns `mask_headers`, the one place that decides which header values are
too sensitive to log.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, BinaryIO, TextIO

import orjson
import structlog

from relay.text import storable_value

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_SENSITIVE_PARTS = ("auth", "token", "secret", "signature", "hmac", "cookie", "password", "key")


def is_sensitive_header(name: str) -> bool:
    """Headers whose values are credentials or signatures (never logged)."""
    lowered = name.lower()
    return any(part in lowered for part in _SENSITIVE_PARTS)


def mask_headers(
    pairs: Iterable[tuple[str, str]], also: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Headers as a dict for a log line, with sensitive values replaced by "***".

    `also`: lower-case names that are credentials here whatever they are called (the
    source's verify header, the target's signature header).
    """
    return {
        str(name): "***" if is_sensitive_header(name) or name.lower() in also else value
        for name, value in pairs
    }


def is_journal_stream(stream: TextIO) -> bool:
    """Whether `stream` is journald's: `JOURNAL_STREAM` is its "device:inode", as
    systemd.exec(5) says to check (the variable is inherited by processes whose stdout
    was since redirected, `relay run | cat` under a unit, say)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation), or closed
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


def _journald_prefix(
    _logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    event_dict["_priority"] = _SYSLOG_PRIORITY.get(method_name, 6)
    return event_dict


_second: tuple[int, str] = (-1, "")


def _timestamp(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """`ts` as structlog's TimeStamper(fmt="iso", utc=True) writes it (2026-11-28T19:00:00.
    123456Z), with the date and time formatted once per second rather than once per line."""
    global _second
    now_us = time.time_ns() // 1000
    second = now_us // 1_000_000
    cached = _second  # read once: another thread may replace it meanwhile
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    event_dict["ts"] = f"{cached[1]}.{now_us % 1_000_000:06d}Z"
    return event_dict


class _PrefixedJSON:
    """Render JSON; with `_priority` set, prefix the line with `<N>` for journald."""

    def __call__(self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> bytes:
        priority = event_dict.pop("_priority", None)
        try:
            line = orjson.dumps(event_dict, default=str)
        except TypeError:  # a string with lone surrogates (bytes a sender sent, not UTF-8)
            line = orjson.dumps(storable_value(dict(event_dict)), default=str)
        return line if priority is None else b"<%d>" % priority + line


class LineWriter:
    """Where rendered JSON lines go: one write per event-loop turn, not one per line.

    A line logged on a thread running an event loop is queued, and the lines of a turn
    are written together by a callback at the end of it. A write is a system call that
    releases the GIL, which the journal's writer thread then keeps for up to a switch
    interval: once per turn instead of once per line (measured: ingest at `info` +9%).
    Lines from other threads, or with no loop running, are written at once; `flush`
    (also run at exit) writes whatever is queued.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._queued: list[bytes] = []
        self._lock = threading.Lock()
        self._broken = False  # the stream failed once: lines are dropped, not retried

    def msg(self, message: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write([message])
            return
        with self._lock:
            first = not self._queued
            self._queued.append(message)
        if first:
            loop.call_soon(self.flush)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg

    def flush(self) -> None:
        with self._lock:
            lines, self._queued = self._queued, []
        if lines:
            self._write(lines)

    def _write(self, lines: list[bytes]) -> None:
        with self._lock:
            if self._broken:
                return
            try:
                self._stream.write(b"\n".join(lines) + b"\n")
                self._stream.flush()
            except (OSError, ValueError) as error:  # reader gone, or stream closed: once
                self._broken = True
                with contextlib.suppress(OSError):
                    sys.stderr.write(f"relay: log output failed, lines dropped from now: {error}\n")


_writer: LineWriter | None = None


def flush() -> None:
    """Write every queued log line now (before an immediate exit)."""
    if _writer is not None:
        _writer.flush()


atexit.register(flush)


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for the process; call once at start (and on reload of [log])."""
    out = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[Any] = [
        structlog.processors.add_log_level,
        _timestamp,
        structlog.processors.format_exc_info,
    ]
    if as_json:
        if is_journal_stream(out):
            processors.append(_journald_prefix)
        processors.append(_PrefixedJSON())
        global _writer
        flush()
        writer = _writer = LineWriter(out.buffer)
        factory: Any = lambda *_args: writer  # noqa: E731 - one writer: lines stay in order
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,  # one bind per module, not per line (hot path)
    )
    rebind_loggers()


def rebind_loggers() -> None:
    """Point every module logger at structlog's current configuration."""
    for logger in list(_loggers):
        logger.rebind()


_loggers: weakref.WeakSet[Logger] = weakref.WeakSet()


class Logger:
    """A module's logger. Its level methods are those of a structlog logger bound at
    `configure` (or at first use): a line at a disabled level is one call to a no-op.
    Through structlog's lazy proxy every call first looked the method up and bound
    again (~1.4 us in isolation; removing the one call on the accept path, at a
    disabled level, gained ~7% of ingest in the daemon). `info_enabled` lets the
    per-event lines skip building their fields when info is off (~3% of ingest)."""

    def __init__(self) -> None:
        _loggers.add(self)

    info_enabled = True  # whether info lines are written: hot paths skip building them

    def rebind(self) -> None:
        bound = structlog.get_logger().bind()
        self.__dict__.clear()
        self.__dict__["_bound"] = bound
        is_enabled_for = getattr(bound, "is_enabled_for", None)
        self.__dict__["info_enabled"] = is_enabled_for is None or is_enabled_for(logging.INFO)
        for name in ("debug", "info", "warning", "error", "exception", "critical"):
            self.__dict__[name] = getattr(bound, name)

    def __getattr__(self, name: str) -> Any:  # first use before configure(), or bind(), ...
        if "_bound" not in self.__dict__:
            self.rebind()
        return getattr(self.__dict__["_bound"], name)


def get_logger() -> Any:
    return Logger()
