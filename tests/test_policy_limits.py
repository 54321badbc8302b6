"""Rate limits, Retry-After and the target pause (SPEC §3 `rate_limit`/`burst`, §4).

Everything here is pure: the clock is a float the test advances, nothing sleeps.
"""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime

import pytest

from relay.model import RetryConfig
from relay.policy import (
    MAX_RETRY_AFTER_S,
    Outcome,
    PauseChange,
    StartSpacer,
    Step,
    TargetPause,
    TokenBucket,
    classify,
    is_target_failure,
    next_step,
    parse_retry_after,
    retry_after_for,
    retry_after_header,
)

# --- TokenBucket (a source's rate_limit) --------------------------------------


def test_bucket_allows_a_full_burst_then_refills_at_the_rate() -> None:
    """At "10/s" ten requests pass at once, the 11th waits 0.1 s, and 0.35 s later three more."""
    bucket = TokenBucket(10.0)
    assert [bucket.take(0.0) for _ in range(10)] == [0.0] * 10
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert [bucket.take(0.35) for _ in range(3)] == [0.0] * 3
    assert bucket.take(0.35) == pytest.approx(0.05)


def test_bucket_burst_defaults_to_one_seconds_worth_and_at_least_one() -> None:
    """The burst is one second's worth ("100/s" → 100); a slow rate ("30/m") still lets one in."""
    assert TokenBucket(100.0).burst == 100.0
    assert TokenBucket(0.5).burst == 1.0
    slow = TokenBucket(0.5)
    assert slow.take(0.0) == 0.0
    assert slow.take(0.0) == pytest.approx(2.0)
    assert slow.take(1.0) == pytest.approx(1.0)
    assert slow.take(2.0) == 0.0


def test_bucket_burst_setting_overrides_the_default() -> None:
    """`burst = 3` at "10/s" lets three requests in at once, not ten."""
    bucket = TokenBucket(10.0, burst=3)
    assert [bucket.take(5.0) for _ in range(3)] == [0.0] * 3
    assert bucket.take(5.0) == pytest.approx(0.1)


def test_a_refused_request_spends_no_token() -> None:
    """Refused requests do not push the next allowed one further out."""
    bucket = TokenBucket(10.0)
    for _ in range(10):
        bucket.take(0.0)
    waits = [bucket.take(0.05) for _ in range(5)]
    assert waits == pytest.approx([0.05] * 5)
    assert bucket.take(0.1) == 0.0


def test_bucket_sustains_its_rate_after_the_burst() -> None:
    """Over 10 s of constant pressure "10/s" lets in the burst of 10 plus 10 per second."""
    bucket = TokenBucket(10.0)
    allowed = 0
    for step in range(1001):  # every 10 ms, as many requests as will pass
        while bucket.take(step / 100) == 0.0:
            allowed += 1
    assert allowed == 10 + 100


def test_bucket_never_holds_more_than_the_burst_after_idling() -> None:
    """After an hour of quiet only a burst's worth passes at once, not an hour's worth."""
    bucket = TokenBucket(10.0)
    bucket.take(0.0)
    now_s = 3600.0
    assert [bucket.take(now_s) for _ in range(10)] == [0.0] * 10
    assert bucket.take(now_s) == pytest.approx(0.1)


def test_bucket_treats_a_clock_going_backwards_as_no_time_passing() -> None:
    """A clock stepping back neither grants nor removes tokens, and refill resumes from there."""
    bucket = TokenBucket(10.0)
    for _ in range(10):
        bucket.take(100.0)
    assert bucket.take(50.0) == pytest.approx(0.1)
    assert bucket.take(50.05) == pytest.approx(0.05)
    assert bucket.take(50.1) == 0.0


@pytest.mark.parametrize("rate", [0.0, -1.0, math.inf, math.nan])
def test_bucket_refuses_a_rate_that_is_not_a_positive_number(rate: float) -> None:
    """A rate that is not a positive number is a programming error, not a silent no-limit."""
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate)


def test_bucket_refuses_a_burst_below_one() -> None:
    """A burst under one token could never let a request in."""
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(10.0, burst=0.5)


@pytest.mark.parametrize(
    ("wait_s", "header"),
    [
        (0.0, "1"),
        (0.01, "1"),
        (0.1, "1"),
        (1.0, "1"),
        (1.2, "2"),
        (2.0, "2"),
        (59.0001, "60"),
        (math.nan, "1"),
    ],
)
def test_retry_after_header_is_whole_seconds_rounded_up_and_at_least_one(
    wait_s: float, header: str
) -> None:
    """A 429's `Retry-After` never says 0 and never tells the sender to come back too early."""
    assert retry_after_header(wait_s) == header


def test_bucket_wait_becomes_the_429_retry_after() -> None:
    """The 11th request in the same instant at "10/s" is told `Retry-After: 1`."""
    bucket = TokenBucket(10.0)
    for _ in range(10):
        bucket.take(0.0)
    assert retry_after_header(bucket.take(0.0)) == "1"


# --- StartSpacer (a target's rate_limit) -----------------------------------------


def test_spacer_spreads_simultaneous_starts_one_interval_apart() -> None:
    """At "10/s" five deliveries ready at once start at 0, 0.1, 0.2, 0.3 and 0.4 s."""
    spacer = StartSpacer(10.0)
    waits = [spacer.reserve(0.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_spacer_has_no_burst() -> None:
    """At "10/s" thirty deliveries ready at once take at least 2.9 s to all start."""
    spacer = StartSpacer(10.0)
    starts = [spacer.reserve(0.0) for _ in range(30)]
    assert starts[-1] >= 2.9 - 1e-9
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert min(gaps) == pytest.approx(0.1)


def test_spacer_spaces_callers_arriving_one_after_another() -> None:
    """A caller arriving 0.03 s after the previous start waits the remaining 0.07 s."""
    spacer = StartSpacer(10.0)
    assert spacer.reserve(1.0) == 0.0
    assert spacer.reserve(1.03) == pytest.approx(0.07)
    assert spacer.reserve(1.2) == 0.0
    assert spacer.reserve(1.35) == 0.0


def test_spacer_does_not_bank_idle_time() -> None:
    """After a long quiet spell the next start is immediate and the one after it 1/rate later."""
    spacer = StartSpacer(10.0)
    assert spacer.reserve(0.0) == 0.0
    assert spacer.reserve(100.0) == 0.0
    assert spacer.reserve(100.0) == pytest.approx(0.1)
    assert spacer.reserve(100.0) == pytest.approx(0.2)


def test_spacer_slow_rate_is_one_start_per_interval() -> None:
    """At "30/m" deliveries start two seconds apart."""
    spacer = StartSpacer(0.5)
    assert [spacer.reserve(10.0) for _ in range(3)] == pytest.approx([0.0, 2.0, 4.0])


def test_spacer_survives_a_clock_going_backwards() -> None:
    """A clock stepping back does not make the next start wait for the lost time."""
    spacer = StartSpacer(10.0)
    spacer.reserve(100.0)
    spacer.reserve(100.0)
    assert spacer.reserve(50.0) == pytest.approx(0.2)


def test_spacer_refuses_a_non_positive_rate() -> None:
    """A zero rate is a programming error, not an infinite wait."""
    with pytest.raises(ValueError, match="rate"):
        StartSpacer(0.0)


# --- Retry-After --------------------------------------------------------------

NOW_S = datetime(2015, 10, 21, 7, 26, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected_s"),
    [
        ("2", 2.0),
        ("0", 0.0),
        ("120", 120.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 120.0),
        ("Wed, 21 Oct 2015 07:28:00 -0000", 120.0),  # no zone: HTTP dates are GMT
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # in the past: retry now
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
    ],
)
def test_retry_after_seconds_or_date_become_a_delay(value: str, expected_s: float) -> None:
    """`Retry-After` as seconds or as an HTTP date is the delay the target asked for."""
    assert parse_retry_after(value, NOW_S) == pytest.approx(expected_s)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "-1",
        "+5",
        "garbage",
        "1e3",
        "5s",
        "Wed, 32 Oct 2015 07:28:00 GMT",
        "Fri, 31 Dec 9999 23:59:59 GMT",  # absurdly far: a bug, not a wish
        "Wed, 21 Oct 2099 07:28:00 GMT",
        "1445412480",  # a Unix timestamp sent as seconds: 45 years
        "9" * 5000,
    ],
)
def test_retry_after_absent_or_unusable_is_ignored(value: str | None) -> None:
    """A missing, malformed, negative or absurd `Retry-After` leaves the retry schedule alone."""
    assert parse_retry_after(value, NOW_S) is None


def test_retry_after_up_to_the_sanity_bound_is_kept_for_next_step_to_cap() -> None:
    """A long but believable `Retry-After` (a day) is kept; `next_step` caps it at `max`."""
    assert parse_retry_after("86400", NOW_S) == 86400.0
    assert parse_retry_after(str(int(MAX_RETRY_AFTER_S)), NOW_S) == MAX_RETRY_AFTER_S
    assert parse_retry_after(str(int(MAX_RETRY_AFTER_S) + 1), NOW_S) is None


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured_on_429_and_503(status: int) -> None:
    """A 429 or 503 with `Retry-After: 30` asks relay to wait 30 s."""
    assert retry_after_for(status, "30", NOW_S) == 30.0
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_after_for(status, date, NOW_S) == pytest.approx(120.0)


@pytest.mark.parametrize("status", [None, 200, 301, 404, 408, 425, 500, 502, 504])
def test_retry_after_is_ignored_on_other_statuses(status: int | None) -> None:
    """Only 429 and 503 carry a `Retry-After` relay honours; elsewhere it is ignored."""
    assert retry_after_for(status, "30", NOW_S) is None


def test_retry_after_for_without_the_header_is_none() -> None:
    """A 429 without `Retry-After` just follows the retry schedule."""
    assert retry_after_for(429, None, NOW_S) is None
    assert retry_after_for(503, "soon", NOW_S) is None


def test_a_429_retry_after_sets_the_next_attempt_time() -> None:
    """A first 429 with `Retry-After: 120` is retried two minutes later, not after the backoff."""
    retry = RetryConfig(attempts=12, first_s=5.0, max_s=3600.0, max_age_s=3 * 86400.0)
    step = next_step(
        outcome=classify(429),
        attempt=1,
        retry=retry,
        received_at_s=NOW_S,
        now_s=NOW_S,
        jitter=0.5,
        failure="HTTP 429 Too Many Requests",
        retry_after_s=retry_after_for(429, "120", NOW_S),
    )
    assert step == Step(Outcome.RETRY, next_at_s=NOW_S + 120.0)


# --- What counts against a target -----------------------------------------------


@pytest.mark.parametrize(
    ("status", "failed"),
    [(None, True), (429, True), (503, True), (408, True), (200, False), (404, False), (410, False)],
)
def test_only_retryable_outcomes_count_against_the_target(status: int | None, failed: bool) -> None:
    """Errors, timeouts, 429 and 5xx push a target toward pausing; a 404 shows it is up."""
    assert is_target_failure(classify(status)) is failed


def test_a_retry_on_status_counts_against_the_target() -> None:
    """A status the target lists in `retry_on` is a retryable failure, so it counts too."""
    assert is_target_failure(classify(409, frozenset({409}))) is True


# --- TargetPause (the circuit breaker) ----------------------------------------------


def _state(pause: TargetPause) -> str:
    """The state, read afresh (so mypy does not narrow it across calls that change it)."""
    return pause.state


def _attempt(pause: TargetPause, success: bool, now_s: float) -> PauseChange | None:
    """One whole attempt at `now_s`: allowed, sent, finished at once."""
    assert pause.may_start(now_s)
    return pause.record(success, now_s, started_s=now_s)


def _paused_at(now_s: float, *, pause_after: int = 3) -> TargetPause:
    """A target with first = 5 s, max = 60 s, paused by failures ending at `now_s`."""
    pause = TargetPause(pause_after=pause_after, first_s=5.0, max_s=60.0)
    for _ in range(pause_after):
        _attempt(pause, False, now_s)
    assert _state(pause) == "paused"
    return pause


def test_a_new_target_is_open() -> None:
    """A target starts out sending, with no failures and no pauses."""
    pause = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    assert _state(pause) == "open"
    assert pause.paused_until_s is None
    assert (pause.failures, pause.pauses) == (0, 0)
    assert pause.wait_s(0.0) == 0.0
    assert pause.snapshot() == (0, 0, None)


def test_pause_after_consecutive_failures() -> None:
    """With `pause_after = 3` the third failure in a row pauses the target for `first`."""
    pause = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    assert _attempt(pause, False, 10.0) is None
    assert _attempt(pause, False, 11.0) is None
    assert _state(pause) == "open"
    assert _attempt(pause, False, 12.0) == PauseChange("paused", 5.0)
    assert _state(pause) == "paused"
    assert pause.paused_until_s == 17.0
    assert pause.pauses == 1


def test_a_success_resets_the_consecutive_failures() -> None:
    """Failures separated by a success do not add up: it takes three in a row again."""
    pause = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    for success in (False, False, True, False, False):
        assert _attempt(pause, success, 0.0) is None
    assert _state(pause) == "open"
    assert pause.failures == 2
    assert _attempt(pause, False, 0.0) == PauseChange("paused", 5.0)


def test_pause_after_one_pauses_on_the_first_failure() -> None:
    """`pause_after = 1` pauses the target on its very first failed attempt."""
    pause = TargetPause(pause_after=1, first_s=5.0, max_s=60.0)
    assert _attempt(pause, False, 0.0) == PauseChange("paused", 5.0)


def test_paused_target_sends_nothing_until_the_cooldown_then_one_probe() -> None:
    """While paused nothing starts; at the end of the cooldown exactly one probe goes out."""
    pause = _paused_at(100.0)
    assert not pause.may_start(100.0)
    assert not pause.may_start(104.999)
    assert pause.wait_s(102.0) == pytest.approx(3.0)
    assert pause.may_start(105.0)
    assert _state(pause) == "probing"
    assert not pause.may_start(105.0)
    assert not pause.may_start(200.0)
    assert pause.wait_s(200.0) is None


def test_a_changed_target_may_probe_at_once_and_a_failed_probe_pauses_again() -> None:
    """After `probe_now` (a reload changed the target's URL) the probe goes at once; if it
    fails, the next cooldown is the doubled one. A probe in flight is not touched (one at
    a time), and an open target is unchanged."""
    pause = _paused_at(100.0)
    pause.probe_now(101.0)
    assert pause.wait_s(101.0) == 0.0
    assert pause.may_start(101.0)
    assert _state(pause) == "probing"
    pause.probe_now(101.5)
    assert not pause.may_start(101.5)
    assert pause.record(False, 102.0, started_s=101.0) == PauseChange("paused", 10.0)
    opened = TargetPause(pause_after=1, first_s=5.0, max_s=60.0)
    opened.probe_now(100.0)
    assert _state(opened) == "open"


def test_new_thresholds_leave_a_probe_in_flight_the_only_one() -> None:
    """A reload that changes `pause_after` or the retry schedule while a probe is out keeps
    that probe the one probe (a rebuilt state had let a second one out); a shorter `max`
    shortens a cooldown under way."""
    pause = _paused_at(100.0)
    assert pause.may_start(105.0)
    pause.configure(pause_after=5, first_s=5.0, max_s=60.0)
    assert _state(pause) == "probing"
    assert not pause.may_start(105.5)
    assert pause.record(False, 106.0, started_s=105.0) == PauseChange("paused", 10.0)
    pause.configure(pause_after=5, first_s=1.0, max_s=2.0)
    assert pause.wait_s(106.0) == 2.0


def test_a_successful_probe_resumes_the_target() -> None:
    """The probe's success resumes the target: everything may start again and the log says
    how long it was paused."""
    pause = _paused_at(100.0)
    assert pause.may_start(105.0)
    assert pause.record(True, 105.5, started_s=105.0) == PauseChange("resumed", 5.5)
    assert _state(pause) == "open"
    assert pause.paused_until_s is None
    assert (pause.failures, pause.pauses) == (0, 0)
    assert all(pause.may_start(105.5) for _ in range(20))


def test_a_failed_probe_pauses_again_for_twice_as_long_up_to_max() -> None:
    """Each failed probe doubles the cooldown (5, 10, 20, 40 s) until it reaches `max` (60 s)."""
    pause = _paused_at(0.0)
    now_s = 0.0
    cooldowns = []
    for _ in range(6):
        now_s = pause.paused_until_s or 0.0
        change = _attempt(pause, False, now_s)
        assert change is not None
        assert change.kind == "paused"
        assert pause.paused_until_s == now_s + change.for_s
        cooldowns.append(change.for_s)
    assert cooldowns == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert pause.pauses == 7


def test_resumed_after_several_pauses_reports_the_whole_outage() -> None:
    """A target that needed two probes reports it was paused from the first pause on."""
    pause = _paused_at(1.0)
    assert _attempt(pause, False, 6.0) == PauseChange("paused", 10.0)
    assert _attempt(pause, True, 16.0) == PauseChange("resumed", 15.0)


def test_after_a_resume_the_next_pause_starts_again_at_first() -> None:
    """Once resumed, a new outage pauses for `first` again, not for the last cooldown."""
    pause = _paused_at(0.0)
    _attempt(pause, False, 5.0)  # second pause: 10 s
    _attempt(pause, True, 15.0)
    for _ in range(2):
        _attempt(pause, False, 20.0)
    assert _attempt(pause, False, 20.0) == PauseChange("paused", 5.0)


def test_cooldown_grows_like_the_retry_schedule_without_jitter() -> None:
    """Cooldowns are first·2^(n-1) capped at max, and huge pause counts stay at max."""
    pause = TargetPause(pause_after=5, first_s=5.0, max_s=3600.0)
    assert [pause.cooldown_s(n) for n in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0]
    assert pause.cooldown_s(12) == 3600.0
    assert pause.cooldown_s(10_000) == 3600.0


# --- TargetPause: attempts in flight when the target pauses -------------------------


def test_stragglers_failing_while_paused_do_not_extend_the_pause() -> None:
    """Requests already in flight when the target paused fail later without prolonging it."""
    pause = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    assert all(pause.may_start(0.0) for _ in range(5))
    for _ in range(3):
        change = pause.record(False, 1.0, started_s=0.0)
    assert change == PauseChange("paused", 5.0)
    assert pause.record(False, 4.0, started_s=0.0) is None
    assert pause.record(False, 4.5, started_s=0.0) is None
    assert pause.paused_until_s == 6.0
    assert pause.pauses == 1
    assert pause.may_start(6.0)


def test_stragglers_failing_while_probing_do_not_let_a_second_probe_out() -> None:
    """A slow probe is the only request in flight to a paused target, whatever else fails."""
    pause = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    assert all(pause.may_start(0.0) for _ in range(5))
    for _ in range(3):
        pause.record(False, 1.0, started_s=0.0)
    assert pause.may_start(6.0)  # the probe
    assert pause.record(False, 7.0, started_s=0.0) is None
    assert pause.record(False, 8.0, started_s=0.0) is None
    assert _state(pause) == "probing"
    assert not pause.may_start(8.0)
    assert not pause.may_start(100.0)
    assert pause.record(True, 100.0, started_s=6.0) == PauseChange("resumed", 99.0)


def test_a_failed_probe_repauses_even_with_stragglers_still_out() -> None:
    """The probe's own failure pauses again at once; stragglers finishing later change nothing."""
    pause = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    assert all(pause.may_start(0.0) for _ in range(5))
    for _ in range(3):
        pause.record(False, 1.0, started_s=0.0)
    assert pause.may_start(6.0)
    assert pause.record(False, 6.5, started_s=6.0) == PauseChange("paused", 10.0)
    assert pause.record(False, 9.0, started_s=0.0) is None
    assert pause.record(False, 9.5, started_s=0.0) is None
    assert (pause.pauses, pause.paused_until_s) == (2, 16.5)


def test_a_straggler_success_resumes_a_paused_target() -> None:
    """A request that succeeds while the target is paused proves it is up: sending resumes."""
    pause = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    assert all(pause.may_start(0.0) for _ in range(4))
    for _ in range(3):
        pause.record(False, 1.0, started_s=0.0)
    assert pause.record(True, 2.0, started_s=0.0) == PauseChange("resumed", 1.0)
    assert _state(pause) == "open"


def test_stragglers_failing_after_a_resume_do_not_count_toward_the_next_pause() -> None:
    """Old requests timing out after the target came back do not pause it again."""
    pause = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    assert all(pause.may_start(0.0) for _ in range(8))
    for _ in range(3):
        pause.record(False, 1.0, started_s=0.0)
    assert pause.may_start(6.0)
    assert pause.record(True, 6.5, started_s=6.0) == PauseChange("resumed", 5.5)
    for _ in range(5):
        assert pause.record(False, 10.0, started_s=0.0) is None
    assert (pause.state, pause.failures) == ("open", 0)
    assert _attempt(pause, False, 11.0) is None
    assert _attempt(pause, False, 11.0) is None
    assert _attempt(pause, False, 11.0) == PauseChange("paused", 5.0)


def test_without_start_times_a_failed_probe_waits_for_everything_in_flight() -> None:
    """A caller not passing `started_s` still never gets a second probe while one is out."""
    pause = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    assert all(pause.may_start(0.0) for _ in range(5))
    assert pause.in_flight == 5
    for _ in range(3):
        pause.record(False, 1.0)
    assert pause.may_start(6.0)  # the probe; two stragglers are still out
    assert pause.record(False, 7.0) is None
    assert pause.record(False, 8.0) is None
    assert _state(pause) == "probing"
    assert not pause.may_start(50.0)
    assert pause.record(False, 9.0) == PauseChange("paused", 10.0)
    assert pause.in_flight == 0
    assert not pause.may_start(18.9)
    assert pause.may_start(19.0)


def test_an_abandoned_probe_lets_a_new_probe_out() -> None:
    """A probe that was allowed but never sent does not leave the target stuck in probing."""
    pause = _paused_at(0.0)
    assert pause.may_start(5.0)
    pause.abandon(started_s=5.0)
    assert _state(pause) == "paused"
    assert pause.in_flight == 0
    assert pause.may_start(5.1)
    assert _state(pause) == "probing"


def test_an_abandoned_straggler_does_not_cancel_the_probe() -> None:
    """Releasing an old, never-sent request while probing keeps the one probe in flight."""
    pause = TargetPause(pause_after=1, first_s=5.0, max_s=60.0)
    assert pause.may_start(0.0)
    assert pause.may_start(0.0)
    pause.record(False, 1.0, started_s=0.0)
    assert pause.may_start(6.0)
    pause.abandon(started_s=0.0)
    assert _state(pause) == "probing"
    assert not pause.may_start(6.0)


def test_a_clock_going_backwards_never_pauses_longer_than_the_cooldown() -> None:
    """If the clock steps back, a paused target still probes within one cooldown."""
    pause = _paused_at(1000.0)
    assert not pause.may_start(500.0)
    assert pause.wait_s(500.0) == 5.0
    assert pause.may_start(505.0)


@pytest.mark.parametrize(
    ("pause_after", "first_s", "max_s"), [(0, 5.0, 60.0), (3, 0.0, 60.0), (3, 5.0, 0.0)]
)
def test_pause_refuses_nonsense_settings(pause_after: int, first_s: float, max_s: float) -> None:
    """A zero `pause_after`, `first` or `max` is a programming error (config forbids them)."""
    with pytest.raises(ValueError, match="must be"):
        TargetPause(pause_after, first_s, max_s)


# --- TargetPause: snapshot and restore ----------------------------------------------


def test_a_paused_target_stays_paused_across_a_restart() -> None:
    """A target paused before a restart stays paused until its cooldown ends, then probes."""
    before = _paused_at(1000.0)
    _attempt(before, False, 1005.0)  # second pause: until 1015
    _attempt(before, False, 1015.0)  # third pause: until 1035
    snapshot = before.snapshot()
    assert snapshot == (5, 3, 1035.0)
    after = TargetPause.restore(3, 5.0, 60.0, snapshot, now_s=1020.0)
    assert (after.state, after.pauses, after.paused_until_s) == ("paused", 3, 1035.0)
    assert not after.may_start(1020.0)
    assert not after.may_start(1034.0)
    assert after.may_start(1035.0)
    assert after.record(False, 1036.0, started_s=1035.0) == PauseChange("paused", 40.0)


def test_a_target_restored_after_its_cooldown_probes_first() -> None:
    """A target whose cooldown ran out during the restart sends one probe, not its backlog."""
    snapshot = (3, 1, 1005.0)
    after = TargetPause.restore(3, 5.0, 60.0, snapshot, now_s=2000.0)
    assert after.may_start(2000.0)
    assert _state(after) == "probing"
    assert not after.may_start(2000.0)
    assert after.record(True, 2000.2, started_s=2000.0) is not None
    assert _state(after) == "open"


def test_a_target_snapshotted_while_probing_probes_again_after_a_restart() -> None:
    """The probe lost with the old process is replaced by a new probe after the restart."""
    before = _paused_at(0.0)
    assert before.may_start(5.0)
    after = TargetPause.restore(3, 5.0, 60.0, before.snapshot(), now_s=30.0)
    assert _state(after) == "paused"
    assert after.may_start(30.0)
    assert _state(after) == "probing"


def test_an_open_target_keeps_its_failure_count_across_a_restart() -> None:
    """Two failures before a restart plus one after pause a `pause_after = 3` target."""
    before = TargetPause(pause_after=3, first_s=5.0, max_s=60.0)
    _attempt(before, False, 0.0)
    _attempt(before, False, 0.0)
    after = TargetPause.restore(3, 5.0, 60.0, before.snapshot(), now_s=50.0)
    assert _state(after) == "open"
    assert _attempt(after, False, 50.0) == PauseChange("paused", 5.0)


def test_a_restored_pause_never_outlasts_its_cooldown() -> None:
    """A stored resume time far in the future (a clock change) is cut to one cooldown from now."""
    after = TargetPause.restore(3, 5.0, 60.0, (3, 2, 1_000_000.0), now_s=100.0)
    assert after.paused_until_s == 110.0
    nonsense = TargetPause.restore(3, 5.0, 60.0, (3, 2, math.nan), now_s=100.0)
    assert nonsense.paused_until_s == 100.0
    assert nonsense.may_start(100.0)


def test_restore_takes_the_new_settings() -> None:
    """A reload restoring with a new `pause_after` and `max` uses them from then on."""
    after = TargetPause.restore(1, 5.0, 15.0, (0, 2, 110.0), now_s=100.0)
    assert after.may_start(110.0)
    assert after.record(False, 110.0, started_s=110.0) == PauseChange("paused", 15.0)
