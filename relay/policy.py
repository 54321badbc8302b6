"""Delivery policy: what an attempt's result means and when to try again.

This module owns the pure decisions of SPEC §4: classifying an attempt's
result (delivered, retry, dead), the retry schedule (exponential backoff with
full jitter from `first` doubling up to `max`, bounded by `attempts` and
`max_age`, honouring a `Retry-After` capped at `max`). Everything takes plain
values — the clock (`now_s`) and the jitter draw (`jitter`, in [0, 1)) are
arguments — so it is unit tested without a loop, a clock or randomness.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Step:
    """After an attempt: the outcome; when to retry (`next_at_s`); why it is dead (`reason`)."""

    outcome: Outcome
    next_at_s: float | None = None
    reason: str | None = None


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
    """
    if outcome is Outcome.DELIVERED:
        return Step(Outcome.DELIVERED)
    if outcome is Outcome.DEAD:
        return Step(Outcome.DEAD, reason=failure)
    if attempt >= retry.attempts:
        tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
        return Step(Outcome.DEAD, reason=f"gave up after {tries}: {failure}")
    delay_s = backoff_s(attempt, retry, jitter)
    if retry_after_s is not None:
        delay_s = max(delay_s, min(retry_after_s, retry.max_s))
    next_at_s = now_s + delay_s
    if next_at_s > received_at_s + retry.max_age_s:
        return Step(Outcome.DEAD, reason=f"max_age exceeded after {attempt} attempts: {failure}")
    return Step(Outcome.RETRY, next_at_s=next_at_s)


def expired(*, received_at_s: float, now_s: float, retry: RetryConfig) -> bool:
    """True when a delivery is older than `max_age` and must not be attempted again."""
    return now_s > received_at_s + retry.max_age_s
