"""Text that can always be stored and sent: UTF-8 without lone surrogates.

Senders put things in relay's strings that UTF-8 cannot carry: a header byte that is not
UTF-8 (kept by the HTTP parser as a surrogate escape) or a lone surrogate written as a
JSON escape (`"\\ud800"`, valid JSON, parsed as is). SQLite, orjson and the log refuse
them, and such a refusal must not turn a webhook into a 500 or a 503. This module owns
the one rule for them: each surrogate code point becomes one U+FFFD, wherever the text
is stored (the journal), shown (logs, the tail) or sent (replies, deliveries). It also
owns JSON text for values that orjson cannot encode (lone surrogates, integers beyond
64 bits). Everything here is pure.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with every surrogate code point replaced by U+FFFD (the same object when none)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def storable_value(value: Any) -> Any:
    """`value` (decoded JSON or a log event's fields) with every string made `storable`
    (and, as orjson writes them, floats that are not finite as None)."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {storable_value(key): storable_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [storable_value(item) for item in value]
    return value


def json_bytes(value: Any) -> bytes:
    """`value` as compact JSON, UTF-8: orjson, or, for what it refuses, the standard library
    on the `storable` value (integers of any size; lone surrogates become U+FFFD)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(
            storable_value(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()


def json_text(value: Any) -> str:
    """`json_bytes(value)` as a str."""
    return json_bytes(value).decode()
