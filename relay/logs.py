"""Logging: structlog set up to write one line per unit of work to stdout.

This module owns the log format (SPEC §8): JSON lines (rendered by orjson)
when stdout is not a terminal or `format = "json"`, readable key=value lines
on a terminal; every line has `event`, `level` and `ts`. When stdout is
journald's stream (`JOURNAL_STREAM` set) each JSON line starts with the
syslog priority prefix (`<3>` for errors) so `journalctl -p err` works. It
also owns `mask_headers`, the one place that decides which header values are
too sensitive to log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

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
    if _second[0] != second:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    event_dict["ts"] = f"{_second[1]}.{now_us % 1_000_000:06d}Z"
    return event_dict


class _PrefixedJSON:
    """Render JSON; with `_priority` set, prefix the line with `<N>` for journald."""

    def __call__(self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> bytes:
        priority = event_dict.pop("_priority", None)
        line = orjson.dumps(event_dict, default=str)
        return line if priority is None else b"<%d>" % priority + line


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
        if os.environ.get("JOURNAL_STREAM"):
            processors.append(_journald_prefix)
        processors.append(_PrefixedJSON())
        factory: Any = structlog.BytesLoggerFactory(out.buffer)
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,  # one bind per module, not per line (hot path)
    )


def get_logger() -> Any:
    return structlog.get_logger()
