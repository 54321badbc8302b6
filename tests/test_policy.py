"""Delivery policy (SPEC §4): outcome of an attempt, retry schedule, give-up rules.

Everything here is pure: the clock (`now_s`) and the jitter draw are passed in.
"""

from __future__ import annotations

import pytest

from relay.model import RetryConfig
from relay.policy import (
    LAST_TRY_LEAD_S,
    Outcome,
    Step,
    backoff_s,
    classify,
    expired,
    next_step,
)

# The documented defaults: attempts = 12, first = "5s", max = "1h", max_age = "3d".
DEFAULT_RETRY = RetryConfig(attempts=12, first_s=5.0, max_s=3600.0, max_age_s=3 * 86400.0)


# --- classify ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Outcome.DELIVERED),
        (201, Outcome.DELIVERED),
        (202, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (None, Outcome.RETRY),
        (408, Outcome.RETRY),
        (425, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (599, Outcome.RETRY),
        (410, Outcome.DEAD),
        (400, Outcome.DEAD),
        (401, Outcome.DEAD),
        (403, Outcome.DEAD),
        (404, Outcome.DEAD),
        (409, Outcome.DEAD),
        (422, Outcome.DEAD),
        (301, Outcome.DEAD),
        (302, Outcome.DEAD),
        (304, Outcome.DEAD),
        (307, Outcome.DEAD),
        (308, Outcome.DEAD),
    ],
)
def test_classify_follows_the_spec_table(status: int | None, expected: Outcome) -> None:
    """Each status gets the SPEC §4 outcome: 2xx delivered; no response/408/425/429/5xx retried;
    410, other 4xx and 3xx dead."""
    assert classify(status, frozenset()) is expected


def test_classify_without_retry_on_argument_uses_the_plain_table() -> None:
    """A target with no `retry_on` gets the plain table: a 409 is dead, a 503 is retried."""
    assert classify(409) is Outcome.DEAD
    assert classify(503) is Outcome.RETRY


@pytest.mark.parametrize("status", [400, 404, 409, 422, 302, 307])
def test_retry_on_turns_a_dead_status_into_a_retry(status: int) -> None:
    """A status listed in the target's `retry_on` is retried instead of ending the delivery."""
    assert classify(status, frozenset({status})) is Outcome.RETRY


def test_retry_on_affects_only_the_listed_statuses() -> None:
    """`retry_on = [409]` retries a 409 but a 404 is still dead at once."""
    retry_on = frozenset({409})
    assert classify(409, retry_on) is Outcome.RETRY
    assert classify(404, retry_on) is Outcome.DEAD


def test_gone_is_dead_even_when_listed_in_retry_on() -> None:
    """A 410 Gone ends the delivery at once: the target says the hook is gone for good."""
    assert classify(410, frozenset({410})) is Outcome.DEAD


# --- backoff_s ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling_s"),
    [
        (1, 5.0),
        (2, 10.0),
        (3, 20.0),
        (4, 40.0),
        (5, 80.0),
        (8, 640.0),
        (10, 2560.0),
        (11, 3600.0),  # 5 * 2**10 = 5120 is over max
        (12, 3600.0),
        (50, 3600.0),
    ],
)
def test_backoff_ceiling_doubles_from_first_and_is_capped_at_max(
    attempt: int, ceiling_s: float
) -> None:
    """The wait ceiling after attempt n is first·2^(n-1), never more than `max`."""
    assert backoff_s(attempt, DEFAULT_RETRY, 1.0) == ceiling_s
    assert backoff_s(attempt, DEFAULT_RETRY, 0.5) == ceiling_s / 2


@pytest.mark.parametrize("attempt", [1, 4, 11, 30])
def test_backoff_with_zero_jitter_is_immediate(attempt: int) -> None:
    """Full jitter: a draw of 0 retries at once, whatever the attempt number."""
    assert backoff_s(attempt, DEFAULT_RETRY, 0.0) == 0.0


def test_backoff_with_jitter_near_one_is_just_under_the_ceiling() -> None:
    """Full jitter: a draw just under 1 waits just under the ceiling, never over it."""
    jitter = 0.999999
    delay_s = backoff_s(3, DEFAULT_RETRY, jitter)
    assert delay_s < 20.0
    assert delay_s == pytest.approx(20.0, abs=1e-4)
    assert backoff_s(20, DEFAULT_RETRY, jitter) == pytest.approx(3600.0, abs=1e-2)
    assert backoff_s(20, DEFAULT_RETRY, jitter) < 3600.0


def test_backoff_survives_huge_attempt_numbers() -> None:
    """A very large attempt number (e.g. a long-paused target) still yields `max`, not an error."""
    assert backoff_s(10_000, DEFAULT_RETRY, 1.0) == 3600.0


def test_backoff_uses_the_targets_own_retry_settings() -> None:
    """A target with first = 250ms and max = 2s backs off 0.25, 0.5, 1, 2, 2 seconds."""
    retry = RetryConfig(attempts=10, first_s=0.25, max_s=2.0, max_age_s=60.0)
    ceilings = [backoff_s(n, retry, 1.0) for n in range(1, 6)]
    assert ceilings == [0.25, 0.5, 1.0, 2.0, 2.0]


# --- next_step ---------------------------------------------------------------


def test_delivered_attempt_ends_the_delivery_without_a_reason() -> None:
    """A 2xx ends the delivery as delivered: no retry time, no reason."""
    step = next_step(
        outcome=Outcome.DELIVERED,
        attempt=3,
        retry=DEFAULT_RETRY,
        received_at_s=1000.0,
        now_s=1100.0,
        jitter=0.5,
        failure="",
    )
    assert step == Step(Outcome.DELIVERED, next_at_s=None, reason=None)


def test_delivered_on_the_last_allowed_attempt_is_still_delivered() -> None:
    """Success on the final attempt counts as delivered, not as giving up."""
    step = next_step(
        outcome=Outcome.DELIVERED,
        attempt=12,
        retry=DEFAULT_RETRY,
        received_at_s=0.0,
        now_s=100.0,
        jitter=0.5,
        failure="",
    )
    assert step.outcome is Outcome.DELIVERED


def test_dead_attempt_ends_at_once_with_the_failure_as_reason() -> None:
    """A non-retryable failure (e.g. 404) ends the delivery on the first attempt, saying why."""
    step = next_step(
        outcome=Outcome.DEAD,
        attempt=1,
        retry=DEFAULT_RETRY,
        received_at_s=1000.0,
        now_s=1000.5,
        jitter=0.5,
        failure="HTTP 404 Not Found",
    )
    assert step == Step(Outcome.DEAD, next_at_s=None, reason="HTTP 404 Not Found")


def test_retry_is_scheduled_at_now_plus_the_jittered_backoff() -> None:
    """After a failed 3rd attempt with jitter 0.5, the next try is 10 s (half of 20 s) from now."""
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=3,
        retry=DEFAULT_RETRY,
        received_at_s=1000.0,
        now_s=1050.0,
        jitter=0.5,
        failure="HTTP 503 Service Unavailable",
    )
    assert step == Step(Outcome.RETRY, next_at_s=1060.0, reason=None)


def test_retry_with_zero_jitter_is_due_immediately() -> None:
    """A jitter draw of 0 schedules the retry for right now."""
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=5,
        retry=DEFAULT_RETRY,
        received_at_s=1000.0,
        now_s=1234.5,
        jitter=0.0,
        failure="connection refused",
    )
    assert step == Step(Outcome.RETRY, next_at_s=1234.5)


def test_gives_up_after_the_configured_number_of_attempts() -> None:
    """After `attempts` failed attempts the delivery is dead; the reason names the count and
    the last failure."""
    retry = RetryConfig(attempts=8, first_s=5.0, max_s=3600.0, max_age_s=3 * 86400.0)
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=8,
        retry=retry,
        received_at_s=0.0,
        now_s=600.0,
        jitter=0.5,
        failure="HTTP 502 Bad Gateway",
    )
    assert step == Step(
        Outcome.DEAD, next_at_s=None, reason="gave up after 8 attempts: HTTP 502 Bad Gateway"
    )


def test_one_attempt_short_of_the_limit_still_retries() -> None:
    """Attempt `attempts - 1` failing is retried; only the last allowed attempt gives up."""
    retry = RetryConfig(attempts=8, first_s=5.0, max_s=3600.0, max_age_s=3 * 86400.0)
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=7,
        retry=retry,
        received_at_s=0.0,
        now_s=600.0,
        jitter=0.5,
        failure="timeout after 10s",
    )
    assert step == Step(Outcome.RETRY, next_at_s=600.0 + 160.0)


def test_a_retry_beyond_max_age_becomes_one_last_try_before_it() -> None:
    """If the backoff would put the next retry after `max_age`, the delivery is not given up
    early with time left: it gets one last try a second before the deadline."""
    retry = RetryConfig(attempts=100, first_s=60.0, max_s=600.0, max_age_s=3600.0)
    # attempt 4 ceiling: 60·8 = 480 s; jitter 0.5 → 240 s; 3500 + 240 > 3600.
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=4,
        retry=retry,
        received_at_s=0.0,
        now_s=3500.0,
        jitter=0.5,
        failure="HTTP 500 Internal Server Error",
    )
    assert step == Step(Outcome.RETRY, next_at_s=3600.0 - LAST_TRY_LEAD_S)


def test_a_backoff_longer_than_max_age_still_leaves_a_last_try() -> None:
    """With `first` longer than `max_age` (first = max = 60 s, max_age = 20 s), a failed
    first attempt is tried once more near the deadline instead of dying at once."""
    retry = RetryConfig(attempts=10, first_s=60.0, max_s=60.0, max_age_s=20.0)
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=1,
        retry=retry,
        received_at_s=100.0,
        now_s=100.003,
        jitter=0.7,
        failure="HTTP 503 Service Unavailable",
    )
    assert step == Step(Outcome.RETRY, next_at_s=119.0)


def test_a_short_max_age_still_gets_its_retries() -> None:
    """With `max_age` under a second the lead shrinks to a tenth of it: a 900 ms window
    with a 100 ms first backoff still retries (a fixed one-second lead gave none)."""
    retry = RetryConfig(attempts=10, first_s=0.1, max_s=0.1, max_age_s=0.9)
    now_s, attempts = 0.0, 1
    while True:
        step = next_step(
            outcome=Outcome.RETRY, attempt=attempts, retry=retry, received_at_s=0.0,
            now_s=now_s, jitter=1.0, failure="HTTP 503",
        )  # fmt: skip
        if step.outcome is Outcome.DEAD:
            break
        assert step.next_at_s is not None
        assert step.next_at_s <= 0.9
        now_s, attempts = step.next_at_s, attempts + 1
    assert attempts >= 5


def test_a_retry_after_within_max_age_but_past_the_lead_is_honoured() -> None:
    """A Retry-After of 2 s at 27.5 s into a 30 s `max_age` is retried at 29.5 s: within
    max_age, and not before the target asked (later than the usual last-try time)."""
    retry = RetryConfig(attempts=12, first_s=5.0, max_s=3600.0, max_age_s=30.0)
    step = next_step(
        outcome=Outcome.RETRY, attempt=2, retry=retry, received_at_s=0.0, now_s=27.5,
        jitter=0.0, failure="HTTP 503 Service Unavailable", retry_after_s=2.0,
    )  # fmt: skip
    assert step == Step(Outcome.RETRY, next_at_s=29.5)


@pytest.mark.parametrize("now_s", [3599.5, 3600.0, 3650.0])
def test_dead_when_max_age_is_about_to_pass_or_past(now_s: float) -> None:
    """With less than the lead left before `max_age` (or an attempt that ended after it,
    a slow target's timeout say) the delivery ends dead, saying max_age, the attempt
    count and the last failure; with no Retry-After, never a Retry-After reason."""
    retry = RetryConfig(attempts=100, first_s=60.0, max_s=600.0, max_age_s=3600.0)
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=5,
        retry=retry,
        received_at_s=0.0,
        now_s=now_s,
        jitter=0.5,
        failure="HTTP 500 Internal Server Error",
    )
    assert step == Step(
        Outcome.DEAD,
        next_at_s=None,
        reason="max_age exceeded after 5 attempts: HTTP 500 Internal Server Error",
    )
    with_wait = next_step(
        outcome=Outcome.RETRY, attempt=5, retry=retry, received_at_s=0.0, now_s=now_s,
        jitter=0.5, failure="HTTP 503", retry_after_s=0.0,
    )  # fmt: skip
    assert with_wait.reason == "max_age exceeded after 5 attempts: HTTP 503"


def test_a_last_try_shortly_before_max_age_is_still_made() -> None:
    """1.5 s before `max_age` (more than the lead) the last try is due at the lead."""
    retry = RetryConfig(attempts=100, first_s=60.0, max_s=600.0, max_age_s=3600.0)
    step = next_step(
        outcome=Outcome.RETRY, attempt=5, retry=retry, received_at_s=0.0, now_s=3598.5,
        jitter=0.5, failure="HTTP 500",
    )  # fmt: skip
    assert step == Step(Outcome.RETRY, next_at_s=3599.0)


def test_retry_due_before_the_last_try_time_is_kept() -> None:
    """A retry the backoff puts at or before the last try's time is scheduled unchanged."""
    retry = RetryConfig(attempts=100, first_s=60.0, max_s=600.0, max_age_s=3600.0)
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=4,
        retry=retry,
        received_at_s=100.0,
        now_s=3459.0,
        jitter=0.5,  # 240 s → 3699 = 100 + 3600 - 1
        failure="HTTP 500 Internal Server Error",
    )
    assert step == Step(Outcome.RETRY, next_at_s=3699.0)


def test_retry_after_beyond_max_age_makes_the_delivery_dead() -> None:
    """A Retry-After that would push the next attempt past `max_age` ends the delivery dead."""
    retry = RetryConfig(attempts=12, first_s=5.0, max_s=3600.0, max_age_s=1800.0)
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=2,
        retry=retry,
        received_at_s=0.0,
        now_s=1000.0,
        jitter=0.0,
        failure="HTTP 503 Service Unavailable",
        retry_after_s=900.0,
    )
    assert step.outcome is Outcome.DEAD
    assert step.reason == (
        "Retry-After 900s goes past max_age after 2 attempts: HTTP 503 Service Unavailable"
    )


def test_attempt_limit_wins_over_retry_after() -> None:
    """On the last allowed attempt a Retry-After does not buy another try."""
    step = next_step(
        outcome=Outcome.RETRY,
        attempt=12,
        retry=DEFAULT_RETRY,
        received_at_s=0.0,
        now_s=100.0,
        jitter=0.5,
        failure="HTTP 429 Too Many Requests",
        retry_after_s=10.0,
    )
    assert step == Step(
        Outcome.DEAD, reason="gave up after 12 attempts: HTTP 429 Too Many Requests"
    )


# --- expired -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("now_s", "is_expired"),
    [
        (1000.0, False),  # just arrived
        (1000.0 + 3599.0, False),
        (1000.0 + 3600.0, False),  # exactly max_age old: still allowed
        (1000.0 + 3600.001, True),
        (1000.0 + 86400.0, True),
    ],
)
def test_expired_only_past_max_age(now_s: float, is_expired: bool) -> None:
    """A delivery may be attempted until it is `max_age` old, and not after."""
    retry = RetryConfig(attempts=12, first_s=5.0, max_s=600.0, max_age_s=3600.0)
    assert expired(received_at_s=1000.0, now_s=now_s, retry=retry) is is_expired
