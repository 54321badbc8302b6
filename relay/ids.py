"""Identifiers: `evt_`/`dlv_` + a 26-character ULID (48-bit millisecond time, 80 random bits).

ULIDs sort by creation time, so ids are also the journal's natural order. Within one
millisecond the random part is incremented, so ids made by this process never go backwards.
The random bits come from a generator seeded once from the OS: ids must be unique, not
secret, and a system call per id costs the event loop a GIL hand-off on the hot path.
"""

from __future__ import annotations

import os
import random
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_random = random.Random(os.urandom(32))
_last_ms = 0
_last_random = 0


_time_part: tuple[int, str] = (-1, "")


def _encode(value: int, length: int) -> str:
    """`value` as `length` Crockford base32 characters."""
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _encode_time(ms: int) -> str:
    global _time_part
    if _time_part[0] != ms:  # many ids share a millisecond: encode it once
        _time_part = (ms, _encode(ms, 10))
    return _time_part[1]


_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # 10 bits -> two characters


def _encode_random(value: int) -> str:
    """80 bits as 16 characters, two at a time (spelt out: this runs twice per webhook)."""
    p = _PAIRS
    return (
        p[value >> 70 & 1023] + p[value >> 60 & 1023] + p[value >> 50 & 1023]
        + p[value >> 40 & 1023] + p[value >> 30 & 1023] + p[value >> 20 & 1023]
        + p[value >> 10 & 1023] + p[value & 1023]
    )  # fmt: skip


def ulid(now_ms: int | None = None) -> str:
    """A new ULID string; monotonic within this process."""
    global _last_ms, _last_random
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    with _lock:
        if ms <= _last_ms and _last_random < (1 << 80) - 1:
            ms = _last_ms
            _last_random += 1
        elif ms <= _last_ms:  # the random part is exhausted: move on to the next millisecond
            ms = _last_ms = _last_ms + 1
            _last_random = _random.getrandbits(79)
        else:
            _last_ms = ms
            _last_random = _random.getrandbits(80)
        random_part = _last_random
        time_part = _encode_time(ms)
    return time_part + _encode_random(random_part)


def event_id(now_ms: int | None = None) -> str:
    return "evt_" + ulid(now_ms)


def delivery_id(now_ms: int | None = None) -> str:
    return "dlv_" + ulid(now_ms)


def ulid_floor(ms: int) -> str:
    """The smallest ULID of millisecond `ms`: every id made at or after `ms` sorts above it."""
    return _encode(ms, 10) + "0" * 16
