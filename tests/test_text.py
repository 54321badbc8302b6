"""Text that can always be stored: one U+FFFD for each surrogate, JSON for anything decoded."""

from __future__ import annotations

import orjson

from relay.text import json_bytes, storable, storable_value


def test_each_surrogate_becomes_one_replacement_character() -> None:
    """A non-UTF-8 header byte (a surrogate escape) and a lone surrogate from a JSON escape
    each become one U+FFFD, also when both are in one string; valid text is left alone."""
    assert storable("caf\udce9") == "caf\ufffd"
    assert storable("\ud800 and \udce9\udcff") == "\ufffd and \ufffd\ufffd"
    valid = "café 😀"
    assert storable(valid) is valid


def test_storable_value_walks_decoded_json() -> None:
    """Keys and values at any depth are made storable; other values are kept as they are."""
    value = {"k\ud800": ["\udce9", 1, None, {"x": "\ud83d"}]}
    assert storable_value(value) == {"k\ufffd": ["\ufffd", 1, None, {"x": "\ufffd"}]}


def test_json_bytes_encodes_what_orjson_refuses() -> None:
    """Lone surrogates become U+FFFD and integers beyond 64 bits stay exact, instead of an
    error that would fail the request or the delivery; plain values are orjson's output."""
    assert orjson.loads(json_bytes({"id": "a\ud800"})) == {"id": "a\ufffd"}
    assert (
        json_bytes({"n": 2**70, "s": "\ud800"})
        == b'{"n":1180591620717411303424,"s":"\xef\xbf\xbd"}'
    )
    assert json_bytes({"n": 2**70, "f": float("inf")}) == b'{"n":1180591620717411303424,"f":null}'
    assert json_bytes({"a": [1, "b"]}) == orjson.dumps({"a": [1, "b"]})
