"""Identifiers: `evt_`/`dlv_` + a 26-character Crockford base32 ULID, time ordered."""

from __future__ import annotations

import re

import pytest

from relay import ids

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ULID_PATTERN = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
T0_MS = 1_795_892_400_123  # 2026-11-28T19:00:00.123Z


def decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 32 + CROCKFORD.index(char)
    return value


@pytest.fixture(autouse=True)
def fresh_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from a generator that has issued nothing (restored afterwards)."""
    monkeypatch.setattr(ids, "_last_ms", 0)
    monkeypatch.setattr(ids, "_last_random", 0)


def test_event_id_is_evt_plus_a_ulid() -> None:
    """An event id reads `evt_` followed by 26 Crockford base32 characters."""
    event_id = ids.event_id(T0_MS)
    assert event_id.startswith("evt_")
    assert len(event_id) == 30
    assert ULID_PATTERN.fullmatch(event_id[4:])


def test_delivery_id_is_dlv_plus_a_ulid() -> None:
    """A delivery id reads `dlv_` followed by 26 Crockford base32 characters."""
    delivery_id = ids.delivery_id(T0_MS)
    assert delivery_id.startswith("dlv_")
    assert len(delivery_id) == 30
    assert ULID_PATTERN.fullmatch(delivery_id[4:])


def test_id_carries_its_creation_millisecond() -> None:
    """The first 10 characters encode the creation time in milliseconds."""
    event_id = ids.event_id(T0_MS)
    assert decode(event_id[4:14]) == T0_MS


def test_known_time_and_random_part_encode_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoding is standard ULID: 48-bit time then 80 random bits, big-endian Crockford."""
    monkeypatch.setattr(
        "relay.ids._random.getrandbits",
        lambda bits: int.from_bytes(bytes(range(1, 11)), "big") >> (80 - bits),
    )
    # time 1 ms; random bytes 01 02 .. 0A (RFC 4648 base32 "AEBAGBAFAYDQQCIK", in Crockford).
    assert ids.ulid(1) == "0000000001" + "041061050R3GG28A"


def test_default_time_comes_from_the_system_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit time, the id is stamped with the current wall-clock millisecond."""
    monkeypatch.setattr("relay.ids.time.time_ns", lambda: T0_MS * 1_000_000 + 456_789)
    assert decode(ids.event_id()[4:14]) == T0_MS
    assert decode(ids.delivery_id()[4:14]) == T0_MS


def test_random_part_uses_all_80_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 16 random characters carry 80 bits: all-ones random bytes encode as 16 Z's."""
    monkeypatch.setattr("relay.ids._random.getrandbits", lambda bits: (1 << bits) - 1)
    assert ids.event_id(T0_MS)[14:] == "Z" * 16


def test_ids_sort_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """An id made a millisecond later sorts after, whatever the random parts are."""
    monkeypatch.setattr("relay.ids._random.getrandbits", lambda bits: (1 << bits) - 1)
    earlier = ids.event_id(T0_MS)
    monkeypatch.setattr("relay.ids._random.getrandbits", lambda bits: 0)
    later = ids.event_id(T0_MS + 1)
    assert earlier < later


def test_ids_across_seconds_and_years_sort_by_time() -> None:
    """Ids made at increasing times sort in that order as plain strings."""
    times = [T0_MS, T0_MS + 999, T0_MS + 1_000, T0_MS + 86_400_000, T0_MS + 365 * 86_400_000]
    made = [ids.event_id(t) for t in times]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


def test_same_millisecond_ids_are_monotonic() -> None:
    """Two ids in the same millisecond: the second sorts after the first (random part + 1)."""
    first = ids.event_id(T0_MS)
    second = ids.event_id(T0_MS)
    assert first < second
    assert first[4:14] == second[4:14]
    assert decode(second[14:]) == decode(first[14:]) + 1


def test_many_ids_in_one_millisecond_are_unique_and_ordered() -> None:
    """A burst of a thousand ids in one millisecond never repeats and never goes backwards."""
    made = [ids.event_id(T0_MS) for _ in range(1000)]
    assert made == sorted(made)
    assert len(set(made)) == 1000


def test_event_and_delivery_ids_share_one_ordering() -> None:
    """A delivery id made right after its event id (same ms) has a later ULID part."""
    event_id = ids.event_id(T0_MS)
    delivery_id = ids.delivery_id(T0_MS)
    assert event_id[4:] < delivery_id[4:]


def test_clock_going_backwards_does_not_reorder_ids() -> None:
    """If the wall clock steps back, new ids still sort after the ones already issued."""
    before = ids.event_id(T0_MS)
    after_step_back = ids.event_id(T0_MS - 5_000)
    assert before < after_step_back
    assert decode(after_step_back[4:14]) == T0_MS


def test_new_millisecond_draws_fresh_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new millisecond starts from new random bits rather than continuing the counter."""
    draws = iter([b"\x00" * 9 + b"\x05", b"\x00" * 9 + b"\x01"])
    monkeypatch.setattr(
        "relay.ids._random.getrandbits", lambda bits: int.from_bytes(next(draws), "big")
    )
    first = ids.event_id(T0_MS)
    second = ids.event_id(T0_MS + 1)
    assert decode(first[14:]) == 5
    assert decode(second[14:]) == 1


def test_same_millisecond_stays_ordered_when_random_part_is_at_its_maximum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even if the random draw is all ones, the next id in that millisecond sorts after it."""
    monkeypatch.setattr("relay.ids._random.getrandbits", lambda bits: (1 << bits) - 1)
    first = ids.event_id(T0_MS)
    second = ids.event_id(T0_MS)
    assert first < second
