"""Delivery policy: what an attempt's result means, when to try again, and how fast to go.

This module owns the pure decisions of SPEC §3 and §4: classifying an attempt's
result (delivered, retry, dead); the retry schedule (exponential backoff with
full jitter from `first` doubling up to `max`, bounded by `attempts` and
`max_age`, honouring a `Retry-After` on 429/503 — parsed here — capped at
`max`); a source's inbound rate limit (`TokenBucket`: a burst of one second's
worth unless `burst` overrides it); a target's outbound rate limit
(`StartSpacer`: request starts evenly spaced, no burst); and the target pause,
relay's circuit breaker (`TargetPause`: `pause_after` consecutive failed
attempts pause the target, a cooldown growing like the retry schedule, then
one probe whose success resumes it). Everything takes plain values — the
clock (`now_s`) and the jitter draw (`jitter`, in [0, 1)) are arguments, and
the stateful pieces are small state machines that never read a clock — so it
is unit tested without a loop, a clock or randomness.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal

from relay.model import RetryConfig

RETRYABLE_STATUSES = frozenset({408, 425, 429})


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


def classify(status: int | None, retry_on: frozenset[int] = frozenset()) -> Outcome:
    """An attempt's outcome from its HTTP status; None means no response (error, timeout)."""
    if status is None:
        return Outcome.RETRY
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status == 410:
        return Outcome.DEAD
    if status in RETRYABLE_STATUSES or status >= 500 or status in retry_on:
        return Outcome.RETRY
    return Outcome.DEAD


def backoff_s(attempt: int, retry: RetryConfig, jitter: float) -> float:
    """Delay after failed attempt `attempt` (1-based): full jitter under min(max, first·2^(n-1))."""
    ceiling_s = min(retry.max_s, retry.first_s * 2.0 ** min(attempt - 1, 62))
    return jitter * ceiling_s


@dataclass(slots=True)
class Step:
    """After an attempt: the outcome; when to retry (`next_at_s`); why it is dead (`reason`)."""

    outcome: Outcome
    next_at_s: float | None = None
    reason: str | None = None


# How long before `max_age` runs out the last try is due, at most (see `next_step`).
LAST_TRY_LEAD_S = 1.0


def next_step(
    *,
    outcome: Outcome,
    attempt: int,
    retry: RetryConfig,
    received_at_s: float,
    now_s: float,
    jitter: float,
    failure: str,
    retry_after_s: float | None = None,
) -> Step:
    """The step after attempt `attempt` whose classification is `outcome`.

    `failure` describes the attempt (a status line or an error) for the dead reason.
    `retry_after_s` is the target's `Retry-After`, in seconds: it is honoured only on
    429 and 503, so the caller passes it only for those statuses (`retry_after_for`
    does exactly that). It can lengthen the wait, never shorten it below the backoff,
    and is capped at `retry.max_s`; `max_age` and `attempts` still win over it.

    A retry the backoff would put past `max_age` is moved to one last try a lead before
    the deadline (`LAST_TRY_LEAD_S`, or a tenth of a shorter `max_age`), so that a
    wake-up a little late still finds the delivery young enough to try, or to the time
    the target's Retry-After asks for if that is later but still within `max_age`. The
    delivery is dead only when less than the lead is left before `max_age` (an attempt
    that ended after it, say), or when the Retry-After asks for a time past it.
    """
    if outcome is Outcome.DELIVERED:
        return Step(Outcome.DELIVERED)
    if outcome is Outcome.DEAD:
        return Step(Outcome.DEAD, reason=failure)
    if attempt >= retry.attempts:
        return Step(Outcome.DEAD, reason=f"gave up after {_attempts(attempt)}: {failure}")
    wait_s = None if retry_after_s is None else min(retry_after_s, retry.max_s)
    next_at_s = now_s + max(backoff_s(attempt, retry, jitter), wait_s or 0.0)
    deadline_s = received_at_s + retry.max_age_s
    lead_s = min(LAST_TRY_LEAD_S, retry.max_age_s / 10)
    if next_at_s <= deadline_s - lead_s:
        return Step(Outcome.RETRY, next_at_s=next_at_s)
    if now_s + lead_s > deadline_s:  # no time left for another try
        return Step(Outcome.DEAD, reason=f"max_age exceeded after {_attempts(attempt)}: {failure}")
    if wait_s is not None and now_s + wait_s > deadline_s:
        reason = f"Retry-After {wait_s:g}s goes past max_age after {_attempts(attempt)}"
        return Step(Outcome.DEAD, reason=f"{reason}: {failure}")
    # The backoff would pass max_age: one last try, not before the target's Retry-After.
    return Step(Outcome.RETRY, next_at_s=max(deadline_s - lead_s, now_s + (wait_s or 0.0)))


def _attempts(count: int) -> str:
    return "1 attempt" if count == 1 else f"{count} attempts"


def expired(*, received_at_s: float, now_s: float, retry: RetryConfig) -> bool:
    """True when a delivery is older than `max_age` and must not be attempted again."""
    return now_s > received_at_s + retry.max_age_s


# --- Retry-After (SPEC §4) ---------------------------------------------------

RETRY_AFTER_STATUSES = frozenset({429, 503})

# A Retry-After further away than this is not a wish to honour but a bug (a Unix
# timestamp sent as delay-seconds, a year-9999 date): it is ignored like garbage.
# Anything shorter is honoured, and `next_step` caps it at the target's `max`.
MAX_RETRY_AFTER_S = 365 * 86400.0

_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a `Retry-After` value: delay-seconds ("120") or an HTTP-date.

    `now_s` is Unix wall time (`time.time()`), used only for a date; a date in the
    past means 0. Returns None when the header is absent, empty, unparseable,
    negative or absurd (further than `MAX_RETRY_AFTER_S`): the retry schedule alone
    then applies. Fractional seconds ("1.5") are accepted although RFC 9110 has none.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        delay_s = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (ValueError, TypeError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000" or asctime: HTTP dates are always GMT
            when = when.replace(tzinfo=UTC)
        delay_s = max(0.0, when.timestamp() - now_s)
    if not math.isfinite(delay_s) or delay_s > MAX_RETRY_AFTER_S:
        return None
    return delay_s


def retry_after_for(status: int | None, value: str | None, now_s: float) -> float | None:
    """The `retry_after_s` to give `next_step`: the parsed `Retry-After` on 429/503, else None.

    `now_s` is Unix wall time (see `parse_retry_after`).
    """
    if status not in RETRY_AFTER_STATUSES:
        return None
    return parse_retry_after(value, now_s)


def retry_after_header(wait_s: float) -> str:
    """A `Retry-After` header value for a wait: whole seconds, rounded up, at least 1."""
    if not wait_s > 1.0:  # also NaN
        return "1"
    return str(math.ceil(min(wait_s, MAX_RETRY_AFTER_S)))


# --- Rate limits (SPEC §3 source `rate_limit`/`burst`, §4 target `rate_limit`) ---

# Float slack when comparing token counts, so that refilling exactly one token's
# worth of time (e.g. 0.1 s at 10/s) never leaves a wait of 1e-17 s.
_TOKEN_EPSILON = 1e-9
# Likewise a start due within a nanosecond of its slot (e.g. 1.1 + 0.1 > 1.2) is on
# time, instead of waiting 2e-16 s.
_SLOT_EPSILON_S = 1e-9


def _check_rate(rate_per_s: float) -> float:
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate must be a positive number per second, got {rate_per_s!r}")
    return float(rate_per_s)


class TokenBucket:
    """A source's inbound rate limit: a token bucket refilling at `rate_per_s`, holding `burst`.

    `burst` defaults to one second's worth (at least 1), because providers send in
    bursts; the source's `burst = N` overrides it. The bucket starts full. Time
    only ever adds tokens: a clock that goes backwards counts as no time passing,
    and a long idle period fills the bucket to `burst`, never beyond.
    """

    __slots__ = ("_last_s", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: float | None = None) -> None:
        self.rate_per_s = _check_rate(rate_per_s)
        capacity = max(1.0, self.rate_per_s) if burst is None else float(burst)
        if not (capacity >= 1.0 and math.isfinite(capacity)):
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.burst = capacity
        self._tokens = capacity
        self._last_s: float | None = None

    def take(self, now_s: float) -> float:
        """0.0 and one token spent if a request may pass now; else the wait until one may.

        A refused request spends nothing; the wait is what `retry_after_header` turns
        into the 429's `Retry-After`.
        """
        if self._last_s is not None and now_s > self._last_s:
            self._tokens = min(self.burst, self._tokens + (now_s - self._last_s) * self.rate_per_s)
        self._last_s = now_s
        if self._tokens >= 1.0 - _TOKEN_EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s


class StartSpacer:
    """A target's outbound rate limit: request starts evenly spaced, at most one per 1/rate s.

    No burst, because its purpose is to protect the target: `reserve` hands out
    start slots one interval apart, so callers arriving together are spread out
    (0, 1/r, 2/r, …). Idle time is not banked: after a pause the next start is
    immediate and the one after it is 1/r later. A clock that goes backwards
    counts as no time passing (reserved slots move back with it).
    """

    __slots__ = ("_last_now_s", "_next_s", "interval_s", "rate_per_s")

    def __init__(self, rate_per_s: float) -> None:
        self.rate_per_s = _check_rate(rate_per_s)
        self.interval_s = 1.0 / self.rate_per_s
        self._next_s: float | None = None  # the earliest free start slot
        self._last_now_s: float | None = None

    def reserve(self, now_s: float) -> float:
        """Seconds to wait before this start; the slot is taken, so call it once per start.

        Reserve right before sending (after any concurrency slot is held) and sleep
        the returned time; a reserved slot that ends up unused is simply skipped.
        """
        next_s = self._next_s
        if next_s is not None and self._last_now_s is not None and now_s < self._last_now_s:
            next_s -= self._last_now_s - now_s
        self._last_now_s = now_s
        start_s = now_s if next_s is None or next_s <= now_s + _SLOT_EPSILON_S else next_s
        self._next_s = start_s + self.interval_s
        return start_s - now_s


# --- Target pause, the circuit breaker (SPEC §4) ------------------------------

PauseState = Literal["open", "paused", "probing"]


def is_target_failure(outcome: Outcome) -> bool:
    """Whether an attempt's outcome counts against its target for the pause (`record`).

    Only retryable outcomes do (no response, timeouts, 408/425/429/5xx, `retry_on`
    statuses). A 2xx, and also a dead answer such as a 404 or 410, shows the target
    is up and answering: it is a success for the pause, even though that delivery
    failed.
    """
    return outcome is Outcome.RETRY


@dataclass(frozen=True, slots=True)
class PauseChange:
    """What `TargetPause.record` changed, for the `target.paused`/`target.resumed` log lines.

    `paused`: `for_s` is the cooldown before the probe. `resumed`: `for_s` is how
    long the target was paused (since the first of its consecutive pauses).
    """

    kind: Literal["paused", "resumed"]
    for_s: float


class TargetPause:
    """One target's pause state: open → paused → probing → open (or paused again).

    Use per attempt: `may_start(now_s)` right before sending (after the concurrency
    slot and the `StartSpacer` wait); when it is False the delivery waits without
    spending an attempt (`wait_s` says how long). Every start it allowed must end
    in exactly one `record(success, now_s, started_s=…)` — or `abandon` if the
    request was never sent. `success` is `not is_target_failure(outcome)`: only
    retryable outcomes are failures; a dead 4xx answer means the target is up.

    - open: every start is allowed. `pause_after` consecutive failures (any success
      resets the count) pause the target for cooldown n = min(max_s, first_s·2^(n-1))
      for its n-th consecutive pause. No jitter: it is one timer per target.
    - paused: nothing starts until `paused_until_s`; then exactly one `may_start`
      returns True and that start is the probe (state "probing").
    - probing: nothing else starts. The probe's success resumes the target (the
      backlog drains; the pause count resets); its failure pauses it again with the
      next, doubled, cooldown.

    Concurrency. Attempts that were in flight when the target paused (stragglers)
    finish later, in any order relative to the probe. Decisions:
    - A straggler's failure never counts: not while paused (it cannot re-extend
      the cooldown), not while probing (it is not the probe's failure, so it cannot
      re-pause the target and let a second probe out while the first is in flight),
      and not after a resume (old failures do not count toward the next pause).
    - Any success, a straggler's included, resumes a paused or probing target: the
      target just answered, which is all a probe would show. A probe still in
      flight then is an ordinary attempt.
    - Telling the probe from a straggler: pass `started_s`, the clock reading when
      the attempt was allowed (the `now_s` given to its `may_start`, or any reading
      after it); stragglers started before the pause, the probe after it. Without
      `started_s` the machine falls back to counting starts and records: a failure
      while probing re-pauses only once nothing allowed earlier is still in flight
      (so the one-probe rule still holds), and failures after a resume count.

    `now_s` may be monotonic or wall time, as long as one clock is used throughout;
    to persist across restarts (`snapshot`/`restore`) use wall time or convert.
    """

    __slots__ = (
        "_failures",
        "_in_flight",
        "_opened_s",
        "_paused_since_s",
        "_paused_until_s",
        "_pauses",
        "_probe_started_s",
        "first_s",
        "max_s",
        "pause_after",
    )

    def __init__(self, pause_after: int, first_s: float, max_s: float) -> None:
        self.configure(pause_after, first_s, max_s)
        self._failures = 0  # consecutive counted failures; reset by a success
        self._pauses = 0  # consecutive pauses; reset by a resume
        self._paused_until_s: float | None = None  # None exactly when open
        self._paused_since_s: float | None = None  # start of the first consecutive pause
        self._probe_started_s: float | None = None  # set exactly when probing
        self._opened_s = -math.inf  # when the last pause ended
        self._in_flight = 0  # allowed starts not yet recorded (the fallback without started_s)

    def configure(self, pause_after: int, first_s: float, max_s: float) -> None:
        """Set (or change, on a reload) the thresholds; the state stays as it is: a probe
        in flight is still the one probe, and a cooldown under way is capped by the new
        `max_s` when it is next looked at (`wait_s`, `may_start`)."""
        if pause_after < 1:
            raise ValueError(f"pause_after must be at least 1, got {pause_after!r}")
        if not (first_s > 0 and math.isfinite(first_s)):
            raise ValueError(f"first_s must be a positive number, got {first_s!r}")
        if not (max_s > 0 and math.isfinite(max_s)):
            raise ValueError(f"max_s must be a positive number, got {max_s!r}")
        self.pause_after = pause_after
        self.first_s = float(first_s)
        self.max_s = float(max_s)

    # -- reading ---------------------------------------------------------------

    @property
    def state(self) -> PauseState:
        """The state: "open" (sending), "paused" (waiting out the cooldown) or "probing"."""
        if self._paused_until_s is None:
            return "open"
        return "paused" if self._probe_started_s is None else "probing"

    @property
    def paused_until_s(self) -> float | None:
        """When the cooldown ends and the probe may go out — not when the target resumes.

        None when open. While probing it is the cooldown end that has passed.
        """
        return self._paused_until_s

    @property
    def pauses(self) -> int:
        """Consecutive pauses so far, 0 when open; the next one lasts `cooldown_s(pauses + 1)`."""
        return self._pauses

    @property
    def failures(self) -> int:
        """Consecutive failed attempts counted since the last success."""
        return self._failures

    @property
    def in_flight(self) -> int:
        """Starts allowed by `may_start` that have not been recorded or abandoned yet."""
        return self._in_flight

    def cooldown_s(self, pause: int) -> float:
        """The cooldown of the `pause`-th consecutive pause: min(max_s, first_s·2^(pause-1))."""
        return min(self.max_s, self.first_s * 2.0 ** min(max(pause, 1) - 1, 62))

    def wait_s(self, now_s: float) -> float | None:
        """How long until `may_start` can allow a start: 0 when open, None while probing.

        While probing nothing starts until the probe is recorded, so there is no
        time to wait for; wake up on the probe's `record` instead.
        """
        if self._paused_until_s is None:
            return 0.0
        if self._probe_started_s is not None:
            return None
        remaining_s = self._paused_until_s - now_s
        return max(0.0, min(remaining_s, self.cooldown_s(self._pauses)))

    # -- changing --------------------------------------------------------------

    def probe_now(self, now_s: float) -> None:
        """The operator changed what the target is sent (its URL, say): a paused target
        may send its probe at once instead of waiting out the cooldown. The pause count
        stays: a failed probe pauses it again, for the next cooldown. (A probe already in
        flight to an endpoint a reload replaced: its caller `abandon`s it rather than
        record it.)"""
        if self._paused_until_s is not None and self._probe_started_s is None:
            self._paused_until_s = min(self._paused_until_s, now_s)

    def may_start(self, now_s: float) -> bool:
        """Whether an attempt may be sent now; a True while paused makes it the probe."""
        if self._paused_until_s is None:
            self._in_flight += 1
            return True
        if self._probe_started_s is not None:
            return False
        # A clock that went backwards never makes a pause longer than its cooldown.
        self._paused_until_s = min(self._paused_until_s, now_s + self.cooldown_s(self._pauses))
        if now_s < self._paused_until_s:
            return False
        self._probe_started_s = now_s
        self._in_flight += 1
        return True

    def record(
        self, success: bool, now_s: float, *, started_s: float | None = None
    ) -> PauseChange | None:
        """Feed a finished attempt's outcome; returns what changed, if anything.

        `success` is `not is_target_failure(outcome)`. Returns PauseChange("paused")
        when this failure pauses the target (the `pause_after`-th consecutive failure,
        or the probe's), PauseChange("resumed") when this success ends a pause, else
        None. `started_s` (see the class docstring) keeps stragglers' failures from
        counting.
        """
        self._in_flight = max(0, self._in_flight - 1)
        if success:
            self._failures = 0
            if self._paused_until_s is None:
                return None
            return self._resume(now_s)
        if self._paused_until_s is None:  # open
            if started_s is not None and started_s < self._opened_s:
                return None  # started before the last resume: old news
            self._failures += 1
            if self._failures >= self.pause_after:
                return self._pause(now_s)
            return None
        if self._probe_started_s is None:
            return None  # paused: the probe has not gone out, so this is a straggler
        if started_s is not None:
            if started_s < self._probe_started_s:
                return None  # a straggler, not the probe
        elif self._in_flight > 0:
            return None  # cannot tell; the probe surely failed once nothing is in flight
        self._failures += 1
        return self._pause(now_s)

    def abandon(self, *, started_s: float | None = None) -> None:
        """Release a start that `may_start` allowed but that was never sent.

        An abandoned probe returns the target to "paused" with its cooldown already
        over, so the next `may_start` sends a new probe. Without `started_s` an
        abandon while probing is taken to be the probe's.
        """
        self._in_flight = max(0, self._in_flight - 1)
        probe_s = self._probe_started_s
        if probe_s is not None and (started_s is None or started_s >= probe_s):
            self._probe_started_s = None

    def _pause(self, now_s: float) -> PauseChange:
        self._pauses += 1
        cooldown_s = self.cooldown_s(self._pauses)
        if self._paused_since_s is None:
            self._paused_since_s = now_s
        self._paused_until_s = now_s + cooldown_s
        self._probe_started_s = None
        return PauseChange("paused", cooldown_s)

    def _resume(self, now_s: float) -> PauseChange:
        since_s = now_s if self._paused_since_s is None else self._paused_since_s
        self._pauses = 0
        self._paused_until_s = None
        self._paused_since_s = None
        self._probe_started_s = None
        self._opened_s = now_s
        return PauseChange("resumed", max(0.0, now_s - since_s))

    # -- persistence -----------------------------------------------------------

    def snapshot(self) -> tuple[int, int, float | None]:
        """(consecutive failures, consecutive pauses, paused_until_s) to keep in the journal.

        A snapshot taken while probing restores as paused with the cooldown over:
        the probe in flight is lost with the process, so a new one goes out.
        """
        return (self._failures, self._pauses, self._paused_until_s)

    @classmethod
    def restore(
        cls,
        pause_after: int,
        first_s: float,
        max_s: float,
        snapshot: tuple[int, int, float | None],
        now_s: float,
    ) -> TargetPause:
        """A machine with (possibly new) settings resuming from `snapshot` at `now_s`.

        A target paused before a restart stays paused until its cooldown ends, then
        probes; it never resumes without a probe. `now_s` must be on the clock the
        snapshot was taken with (wall time across restarts). The remaining cooldown
        is capped at the cooldown of its pause count from `now_s`, so a clock change
        or a bad value cannot pause a target for longer than that; a non-finite
        `paused_until_s` probes at once.
        """
        failures, pauses, paused_until_s = snapshot
        machine = cls(pause_after, first_s, max_s)
        machine._failures = max(0, int(failures))
        if paused_until_s is None:
            return machine
        machine._pauses = max(1, int(pauses))
        cooldown_s = machine.cooldown_s(machine._pauses)
        until_s = paused_until_s if math.isfinite(paused_until_s) else now_s
        until_s = min(until_s, now_s + cooldown_s)
        machine._paused_until_s = until_s
        machine._paused_since_s = min(now_s, until_s - cooldown_s)
        return machine
