"""Delivery: per-target lanes that send pending deliveries to their targets.

This module owns the delivery of each pending delivery (SPEC §4); it holds the
one outbound HTTP client (`relay.http1`, which owns the connections). Each target
has a lane: it pulls a bounded window of due deliveries from the journal (so a
backlog of any size is never in memory), keeps at most `concurrency` requests
in flight, has `relay.outbound` build each request with the config current at
that attempt (a failing transform makes the delivery dead), sends it without
following redirects, keeps at most 64 KiB of the answer, asks
`relay.policy` what the result means, and has the journal record the attempt
(group-committed with others). A `log:` target writes the request to the log
instead. The lane never speaks SQL; a delivery is in at most one lane's hands
until its outcome is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from relay import http1, logs, policy
from relay.journal import (
    INLINE_BODY_BYTES,
    AttemptRecord,
    DeadDelivery,
    DueDelivery,
    Journal,
    JournalError,
    NewDelivery,
    NewEvent,
    Ordering,
    SavedPause,
)
from relay.metrics import Metrics
from relay.model import Config, RouteConfig, TargetConfig
from relay.netpolicy import NetworkPolicy
from relay.outbound import (
    OutboundRequest,
    StoredRequest,
    TransformError,
    build_request,
    signature_headers,
)
from relay.tail import Tail

log = logs.get_logger()

MAX_RESPONSE_BYTES = 64 * 1024
LOG_BODY_BYTES = 4 * 1024


@dataclass(slots=True)
class AttemptResult:
    """What one request produced: a status (and up to 64 KiB of body), or an error."""

    status: int | None
    error: str | None
    response: bytes | None = None
    retry_after: str | None = None
    refused: bool = False  # the outbound network policy refused the address: dead at once

    @property
    def failure(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else self.error or "no response"


async def send(client: http1.Client, request: OutboundRequest, timeout_s: float) -> AttemptResult:
    """One HTTP attempt; never raises for network trouble, it returns it."""
    try:
        response = await client.request(
            request.method,
            request.url,
            request.headers.items(),
            request.body,
            max_body_bytes=MAX_RESPONSE_BYTES,
            timeout_s=timeout_s,
        )
    except TimeoutError:
        return AttemptResult(None, f"timeout after {timeout_s:g}s")
    except http1.PolicyRefusal as error:
        return AttemptResult(None, str(error), refused=True)
    except http1.RequestError as error:
        return AttemptResult(None, str(error))
    except OSError as error:
        return AttemptResult(None, f"{type(error).__name__}: {error}")
    return AttemptResult(response.status, None, response.body, response.retry_after)


def log_request(
    delivery: DueDelivery, target: str, request: OutboundRequest, secret_headers: frozenset[str]
) -> None:
    """What a `log:` target does instead of sending (credential headers masked)."""
    log.info(
        "delivery.logged",
        delivery_id=delivery.id,
        event_id=delivery.event_id,
        target=target,
        route=delivery.route,
        method=request.method,
        headers=logs.mask_headers(request.headers.items(), secret_headers),
        body=request.body[:LOG_BODY_BYTES].decode("utf-8", errors="replace"),
    )


@dataclass(slots=True)
class Finished:
    """An attempt that got an outcome, as it is logged once that outcome is committed."""

    delivery: DueDelivery
    target: TargetConfig
    attempt: int
    result: AttemptResult
    step: policy.Step
    elapsed_ms: float
    retry_in_s: float


@dataclass(frozen=True)
class Settings:
    """The config as the lanes read it at each attempt; replaced whole on reload."""

    config: Config
    routes: Mapping[str, RouteConfig]

    @classmethod
    def of(cls, config: Config) -> Settings:
        return cls(config, {route.name: route for route in config.routes})


def stored_request(delivery: DueDelivery, body: bytes) -> StoredRequest:
    return StoredRequest(
        delivery_id=delivery.id,
        event_id=delivery.event_id,
        source=delivery.source,
        method=delivery.method,
        path=delivery.path,
        query=delivery.query,
        headers=delivery.headers,
        body=body,
        received_at_ms=delivery.created_at_ms,
    )


@dataclass(frozen=True)
class LaneServices:
    """What every lane shares: the current settings, the journal, the HTTP client, ..."""

    settings: Callable[[], Settings]
    journal: Journal
    client: http1.Client
    tail: Tail
    metrics: Metrics


LANE_BACKOFF_S = 2.0  # after a journal failure, how long a lane starts nothing
FRESH_TRUST_S = 1.0  # how long a lane that keeps up takes new deliveries from memory alone
PAUSED_SWEEP_S = 60.0  # while paused with nothing waiting, how often to look again


class Lane:
    """One target's queue: a window of due deliveries, at most `concurrency` in flight,
    starts spaced by `rate_limit`, and the pause (circuit breaker) in front of them all.

    `concurrency` long-lived workers each take the next delivery and send it; whatever
    has to be waited for (a pause, an empty window, the ordering check) is waited for
    by one worker at a time, at the gate. A worker is free again once its request is
    answered: the outcome's commit finishes in a callback (`_recorded`).

    A lane that keeps up (its last read of the journal found less than a window, and
    nothing since has been committed for it that it did not see) takes deliveries just
    committed by ingress from memory (`offer`) instead of reading them back, for up to
    FRESH_TRUST_S or until its next scheduled retry is due; then it reads the journal
    again (a lane with nothing pending at all waits for the next offer or wake-up, as
    an idle lane always has). Anything it is not sure of makes it read the journal
    (`_journal_changed`).
    """

    def __init__(
        self, target: TargetConfig, services: LaneServices, predecessors: Sequence[Lane] = ()
    ) -> None:
        self.target = target
        # Removed lanes of the same target still finishing their attempts: what they hold
        # is not read from the journal here (a replay must not send it twice at once).
        self._predecessors = predecessors
        self._settings = services.settings
        self._journal = services.journal
        self._client = services.client
        self._tail = services.tail
        self._metrics = services.metrics
        self._window = max(16, 4 * target.concurrency)
        self._ready: deque[DueDelivery] = deque()
        # Counts `_forget_window`s: a read, or a delivery taken, from before one is let go.
        self._window_generation = 0
        self._held: set[str] = set()  # in the window, in flight, or outcome not yet committed
        self._wake = asyncio.Event()  # new work may be due
        self._poke = asyncio.Event()  # the lane's own state changed (pause, reload, stop)
        self._nothing_waiting = False  # paused, and nothing pending when last looked
        self._held_off_until = 0.0  # monotonic time before which nothing starts
        self._ordering_checked = False  # pending deliveries keyed to match `ordered`?
        self._fresh_until = 0.0  # monotonic time until which offers alone bring new work
        self._missed = 0  # offers not taken (and other journal changes): counted
        self._reading = False  # a read of due deliveries is under way
        self._offered_meanwhile: list[DueDelivery] = []  # offers made during that read
        self._retry_cap = math.inf  # earliest retry recorded since the last read began
        self._restored = False
        self._gate = asyncio.Lock()  # held by the one worker that waits for work
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._attempting: set[asyncio.Task[None]] = set()  # workers inside an attempt
        self._recording: set[asyncio.Future[bool | None]] = set()  # outcomes not committed yet
        self._stopping = False
        self._staffed = False  # run() restored the pause and started the workers
        self._stopped = asyncio.Event()
        self.in_flight = 0
        self.last_error: str | None = None
        self.pause = policy.TargetPause(
            target.pause_after, target.retry.first_s, target.retry.max_s
        )
        self._spacer = (
            policy.StartSpacer(target.rate_limit.per_second) if target.rate_limit else None
        )

    def offer(self, event: NewEvent, new: NewDelivery) -> None:
        """A delivery ingress has just committed: kept in memory when the lane keeps up,
        else left for the journal read (the journal, not this, is the record)."""
        if not self._keyed_as_now(new.order_key):
            # Routed with the config from before a reload that changed this target's
            # ordering: its queue is re-keyed once more and read back, or the delivery
            # would be invisible (ordered) or hidden behind another of its old key.
            self.requeued()
            return
        if not self._reading and not self._keeping_up():
            self.wake()  # also re-times the max_age sweep of a paused lane with nothing waiting
            return
        if new.id in self._held:  # already taken from the journal: never twice
            return
        body = event.body if len(event.body) <= INLINE_BODY_BYTES else None  # as `Journal.due`
        delivery = DueDelivery(new.id, event.id, new.route, new.target, 0, event.received_at_ms,
                               event.source, event.method, event.path, event.query,
                               list(event.headers), body)  # fmt: skip
        if self._reading:  # the read may or may not see it: sorted out when it ends
            self._offered_meanwhile.append(delivery)
        else:
            self._ready.append(delivery)
            self._held.add(delivery.id)
            self._wake.set()  # a worker waiting at the gate takes it

    def _keyed_as_now(self, order_key: str | None) -> bool:
        """Whether a delivery with this order key fits the lane's ordering as it is now."""
        ordering = self.ordering
        if ordering == "fifo":
            return order_key == ""
        return (order_key is not None) == (ordering == "key")

    def requeued(self) -> None:
        """Deliveries were made pending again (a replay), or committed with an order key
        of another config: they keep the key of their day, so the queue is re-keyed
        before it is read again."""
        self._ordering_checked = False
        if self.ordering:  # a replayed delivery may now head its queue: read in order again
            self._forget_window()
        self.wake()

    def _keeping_up(self) -> bool:
        """Whether new deliveries may be taken from memory (`offer`)."""
        return (
            self._fresh_until > time.monotonic()
            and len(self._ready) < self._window
            and self.pause.state == "open"
            and not self.ordering
            and not self._stopping
        )

    def _busy(self) -> set[str]:
        """The deliveries not to read: held here, or by a retiring lane of this target."""
        busy = self._held
        for lane in self._predecessors:
            if lane._held:
                busy = busy | lane._held
        return busy

    def _journal_changed(self) -> None:
        """The journal may hold due work the lane has not seen: read it at the next turn."""
        self._fresh_until = 0.0
        self._missed += 1
        self._wake.set()

    def wake(self) -> None:
        self._journal_changed()
        if self._nothing_waiting:  # paused with an empty queue: max_age needs a new timer
            self._nothing_waiting = False
            self._poke.set()

    def retarget(self, target: TargetConfig) -> bool:
        """A reload's new settings, from the next attempt on (in-flight ones finish as they
        are). A paused target whose requests change probes at once. True when the endpoint
        changed (url, method): then `drain` makes its scheduled retries due, and the result
        of an attempt to the old endpoint does not count for the pause, a failure being
        retried at once (a Retry-After of the same endpoint still holds when only headers
        change)."""
        old, self.target = self.target, target
        self._window = max(16, 4 * target.concurrency)
        if (old.ordered, old.order_key) != (target.ordered, target.order_key):
            self._ordering_checked = False
            self._forget_window()  # read again, in the new order, one per queue
        if target.concurrency > old.concurrency and self._staffed:
            self._staff()  # fewer: the extra workers end after their attempt
        if target.rate_limit != old.rate_limit:
            self._spacer = (
                policy.StartSpacer(target.rate_limit.per_second) if target.rate_limit else None
            )
        if (target.pause_after, target.retry) != (old.pause_after, old.retry):
            # in place: a probe in flight stays the one probe (found by review)
            self.pause.configure(target.pause_after, target.retry.first_s, target.retry.max_s)
        if _sending(target) != _sending(old):  # a fixed URL or token is tried at once
            self.pause.probe_now(time.time())
        self._poke.set()
        self._journal_changed()
        return _endpoint(target) != _endpoint(old)

    async def run(self) -> None:
        """Restore the pause, then keep the workers going until the lane stops."""
        while not self._restored:
            try:
                await self._restore_pause()
            except Exception:  # logged with its traceback; the lane goes on
                log.exception("lane.error", target=self.target.name, retry_in_s=LANE_BACKOFF_S)
                await asyncio.sleep(LANE_BACKOFF_S)
        self._staffed = True
        self._staff()
        await self._stopped.wait()  # the workers finish their attempts on their own (`finish`)

    def _staff(self) -> None:
        """Start the missing workers, up to `concurrency`."""
        for index in range(self.target.concurrency):
            worker = self._workers.get(index)
            if (worker is None or worker.done()) and not self._stopping:
                worker = asyncio.create_task(self._work(index), name=f"lane-{self.target.name}")
                self._workers[index] = worker
                worker.add_done_callback(functools.partial(self._worker_ended, index))

    def _worker_ended(self, index: int, worker: asyncio.Task[None]) -> None:
        if self._workers.get(index) is worker:
            del self._workers[index]

    def _hold_off(self) -> None:
        """The journal failed us: start nothing for a while (no re-send storm)."""
        self._held_off_until = time.monotonic() + LANE_BACKOFF_S
        self._journal_changed()

    @property
    def ordering(self) -> Ordering:
        """How the journal picks this lane's deliveries: "fifo", per "key", or "" (any)."""
        if self.target.ordered:
            return "fifo"
        return "key" if self.target.order_key is not None else ""

    async def _work(self, index: int) -> None:
        """One worker: the next delivery that may start, its attempt, and again; a failure
        of the journal or a bug costs a pause, never the worker."""
        worker = asyncio.current_task()  # once: it is a Python-level call in 3.11
        assert worker is not None
        while not self._stopping and index < self.target.concurrency:
            try:
                taken = await self._next(index)
                if taken is not None:
                    await self._attempt(worker, *taken)
            except Exception:  # logged with its traceback; the worker goes on
                log.exception("lane.error", target=self.target.name, retry_in_s=LANE_BACKOFF_S)
                self._hold_off()
                await asyncio.sleep(LANE_BACKOFF_S)

    async def _next(self, index: int) -> tuple[DueDelivery, float] | None:
        """A delivery that may start now, and when it started; None: look again."""
        if self._held_off_until > time.monotonic():
            await asyncio.sleep(self._held_off_until - time.monotonic())
            return None
        if not self._ready or not self._ordering_checked or self.pause.wait_s(time.time()) != 0:
            async with self._gate:
                if not await self._wait_for_work():
                    return None
        if index >= self.target.concurrency:  # a reload lowered it while this one waited
            return None
        generation = self._window_generation
        delivery = self._ready.popleft()
        spacer = self._spacer
        while spacer is not None:
            await asyncio.sleep(spacer.reserve(time.monotonic()))
            if spacer is self._spacer:
                break
            spacer = self._spacer  # a reload replaced it meanwhile: a slot of the new one
        started_s = time.time()
        if self._stopping or generation != self._window_generation:
            self._held.discard(delivery.id)  # let go of with the window while it waited
            self._journal_changed()  # pending again for a read (which it held back if ordered)
            return None
        if index >= self.target.concurrency or not self.pause.may_start(started_s):  # a start
            self._ready.appendleft(delivery)
            self._wake.set()  # a worker waiting at the gate takes it
            return None
        return delivery, started_s

    async def _wait_for_work(self) -> bool:
        """At the gate: True once the target takes attempts and a delivery is ready."""
        if self._stopping or self._held_off_until > time.monotonic():  # looked at again
            return False
        if not self._ordering_checked:
            self._ordering_checked = True  # a requeue or reload during the write undoes it
            try:
                await self._journal.key_ordering(self.target.name, self.ordering)
            except BaseException:
                self._ordering_checked = False
                raise
            if not self._ordering_checked:  # re-keyed meanwhile: again, for what is now
                return False
        if not await self._open():
            return False
        if self._ready:
            return True
        await self._refill()
        return bool(self._ready)  # other workers may have taken them during the read

    async def _open(self) -> bool:
        """True when the target takes attempts; else wait (paused: cooldown, probing: result)."""
        wait_s = self.pause.wait_s(time.time())
        if wait_s == 0:
            return True
        self._poke.clear()  # new deliveries do not matter while paused: only state changes do
        if wait_s is not None:  # paused: max_age still applies to what waits
            wait_s = min(wait_s, await self._expire_waiting())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._poke.wait(), wait_s)
        return False

    async def _refill(self) -> None:
        """Load due deliveries; when none, wait for a wake-up or the next due time. While
        the lane keeps up, offers bring new work: wait for one, no read."""
        self._wake.clear()  # before the query: a wake-up during it is not lost
        trust_s = self._fresh_until - time.monotonic()
        if trust_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), None if math.isinf(trust_s) else trust_s)
            return
        missed, generation = self._missed, self._window_generation
        self._retry_cap = math.inf
        self._reading = not self.ordering
        try:
            rows = await self._journal.due(
                self.target.name, _now_ms(), self._window, self._busy(), ordering=self.ordering
            )
        finally:
            self._reading = False
            meanwhile, self._offered_meanwhile = self._offered_meanwhile, []
        if generation != self._window_generation:  # read in an order or a lane now gone
            self._journal_changed()
            return
        self._ready.extend(rows)
        self._held.update(row.id for row in rows)
        if meanwhile and self.ordering:  # a reload made the lane ordered: the order rules
            self._journal_changed()
            meanwhile = []
        for delivery in meanwhile:  # committed before it was offered: read, or here now
            if delivery.id not in self._held:
                self._ready.append(delivery)
                self._held.add(delivery.id)
        if len(rows) >= self._window:
            return  # maybe more behind them
        next_ms = await self._journal.next_due_ms(
            self.target.name, self._busy(), ordering=self.ordering
        )
        next_s = None if next_ms is None else max(0.0, (next_ms - _now_ms()) / 1000)
        if self._missed == missed and not self.ordering:  # all due is in hand: offers do
            if next_s is None and not self._ready and not self._held:
                trust_s = math.inf  # nothing pending: only offers and wake-ups bring work
            else:
                trust_s = FRESH_TRUST_S if next_s is None else min(FRESH_TRUST_S, next_s)
            self._fresh_until = min(time.monotonic() + trust_s, self._retry_cap)
        if self._ready:  # read, or offered during the read
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), next_s)

    async def _attempt(
        self, worker: asyncio.Task[None], delivery: DueDelivery, started_s: float
    ) -> None:
        self._attempting.add(worker)
        settings = self._settings()  # the config current at this attempt
        target = settings.config.targets.get(self.target.name, self.target)
        recording = False
        try:
            try:
                body = delivery.body
                if body is None:  # a large one: read now, not held by the window
                    body = await self._journal.body_of(delivery.event_id)
                if body is None:  # its event is gone: it ended (and was pruned) meanwhile
                    self.pause.abandon(started_s=started_s)
                    return
                request_or_reason = self._prepare(delivery, body, target, settings, started_s)
            except Exception:
                self.pause.abandon(started_s=started_s)  # never sent: a probe must not stay out
                raise
            if isinstance(request_or_reason, str):
                self.pause.abandon(started_s=started_s)
                await self._give_up(delivery, target, request_or_reason)
                return
            await self._send_and_record(delivery, target, request_or_reason, started_s)
            recording = True
        finally:
            self._attempting.discard(worker)
            if not recording:
                self._release(delivery)
                self._journal_changed()  # given up, or still pending: the journal knows

    def _release(self, delivery: DueDelivery) -> None:
        """The delivery's outcome is committed (or it stays pending): out of the lane's hands."""
        self._held.discard(delivery.id)
        self._poke.set()  # a probe's result changes the pause
        if self.ordering:
            self._wake.set()  # the next delivery of its key may now go

    def _prepare(
        self,
        delivery: DueDelivery,
        body: bytes,
        target: TargetConfig,
        settings: Settings,
        now_s: float,
    ) -> OutboundRequest | str:
        """The request to send, or why the delivery is dead without an attempt."""
        if delivery.route not in settings.routes:
            return "target removed"  # its route was removed by a reload (SPEC §4 wording)
        if policy.expired(
            received_at_s=delivery.created_at_ms / 1000, now_s=now_s, retry=target.retry
        ):
            return f"max_age {target.retry.max_age_s:g}s exceeded"
        try:
            return build_request(
                target=target,
                route=settings.routes.get(delivery.route),
                source=settings.config.sources.get(delivery.source),
                request=stored_request(delivery, body),
                attempt=delivery.attempts + 1,
                now_s=now_s,
            )
        except TransformError as error:
            return str(error)

    async def _send_and_record(
        self,
        delivery: DueDelivery,
        target: TargetConfig,
        request: OutboundRequest,
        started_s: float,
    ) -> None:
        """Send, decide, and hand the outcome to the journal (`_recorded` then finishes
        the attempt when it is committed)."""
        attempt = delivery.attempts + 1
        started = time.perf_counter()
        self.in_flight += 1
        try:
            if target.is_log:
                log_request(delivery, target.name, request, self._secret_headers(target, delivery))
                result = AttemptResult(None, None)
            else:
                result = await send(self._client, request, target.timeout_s)
        except Exception as error:  # a bug here must cost one attempt, not make a hot loop
            log.exception("delivery.internal_error", delivery_id=delivery.id, target=target.name)
            result = AttemptResult(None, f"internal error: {type(error).__name__}: {error}")
        finally:
            self.in_flight -= 1
        elapsed_ms = (time.perf_counter() - started) * 1000
        decided_at_s = time.time()
        old_endpoint = _endpoint(target) != _endpoint(self.target)  # a reload moved it since
        outcome, step = _decide(delivery, target, result, decided_at_s, old_endpoint)
        record = AttemptRecord(
            delivery_id=delivery.id,
            event_id=delivery.event_id,
            n=attempt,
            started_at_ms=int(started_s * 1000),
            ms=round(elapsed_ms, 3),
            status=result.status,
            error=result.error,
            response=result.response,
            outcome="pending" if step.outcome is policy.Outcome.RETRY else step.outcome.value,
            next_at_ms=int((step.next_at_s or 0) * 1000),
            reason=step.reason,
        )
        change = self._note_target_health(outcome, result, started_s, old_endpoint)
        if change is not None:
            await self._pause_changed(change, result)
        committed = self._journal.record(record)
        self._recording.add(committed)
        retry_in_s = (step.next_at_s or decided_at_s) - decided_at_s
        finished = Finished(delivery, target, attempt, result, step, elapsed_ms, retry_in_s)
        committed.add_done_callback(functools.partial(self._recorded, finished))

    def _recorded(self, finished: Finished, committed: asyncio.Future[bool | None]) -> None:
        """The attempt's outcome is committed (or the write failed): log it, let go of it.
        Not if the delivery had already ended: a sweep made it dead (target or route
        removed, max_age while paused) during the attempt and reported that end."""
        delivery = finished.delivery
        self._recording.discard(committed)
        self._release(delivery)
        error = None if committed.cancelled() else committed.exception()
        if error is not None:
            log.error("journal.write_failed", error=str(error), delivery_id=delivery.id)
            self._hold_off()  # still pending in the journal: attempted again once it writes
            return
        if committed.result():
            return
        if finished.step.outcome is policy.Outcome.RETRY:  # due again at next_at_s
            wait_s = (finished.step.next_at_s or 0.0) - time.time()
            due_at = time.monotonic() + max(0.0, wait_s)
            self._retry_cap = min(self._retry_cap, due_at)  # a read under way may miss it
            self._fresh_until = min(self._fresh_until, due_at)
            self._wake.set()  # a waiter re-times its wait
        self._log_attempt(finished)

    def _secret_headers(self, target: TargetConfig, delivery: DueDelivery) -> frozenset[str]:
        """Header names that carry credentials for this delivery, whatever they are called."""
        config = self._settings().config
        source = config.sources.get(delivery.source)
        names = signature_headers(source.verify if source else None) | config.secret_headers
        if target.sign is not None and target.sign.header:
            names |= {target.sign.header.lower()}
        return names

    def _note_target_health(
        self, outcome: policy.Outcome, result: AttemptResult, started_s: float, old: bool
    ) -> policy.PauseChange | None:
        """Feed the pause state machine; its change, if this attempt made one. A failure
        or success of the endpoint a reload replaced (`old`) says nothing of the new one:
        not counted (a probe of it is let go, so the new endpoint is probed at once)."""
        failed = policy.is_target_failure(outcome)
        if old:  # a success of the old endpoint says nothing of the new one either
            self.pause.abandon(started_s=started_s)
            return None
        if failed:
            self.last_error = result.failure
        return self.pause.record(not failed, time.time(), started_s=started_s)

    async def _pause_changed(self, change: policy.PauseChange, result: AttemptResult) -> None:
        """Log and persist a pause or resume; a resumed target is drained at once."""
        name = self.target.name
        if change.kind == "paused":
            log.warning("target.paused", target=name, reason=result.failure, for_s=change.for_s)
        else:
            log.info(
                "target.resumed",
                target=name,
                reason="an attempt succeeded",
                for_s=round(change.for_s, 3),
            )
        await self._save_pause()
        if change.kind == "resumed":
            await self.drain()

    async def drain(self) -> None:
        """A target that comes back is drained at once, not on each delivery's own schedule."""
        try:
            while await self._journal.drain(self.target.name, _now_ms()) > 0:
                pass
        except JournalError as error:
            log.error("journal.write_failed", error=str(error), target=self.target.name)
        self._journal_changed()

    async def _save_pause(self) -> None:
        failures, pauses, until_s = self.pause.snapshot()
        until_ms = None if until_s is None else int(until_s * 1000)
        saved = SavedPause(failures, pauses, until_ms, self.last_error)
        try:
            await self._journal.save_target(self.target.name, saved)
        except JournalError as error:
            log.error("journal.write_failed", error=str(error), target=self.target.name)

    async def _restore_pause(self) -> None:
        if self._restored:
            return
        target = self.target
        saved = await self._journal.load_target(self.target.name)
        self._restored = True  # only once read: a failed read is tried again (`run`)
        if saved is None:
            return
        until_s = None if saved.paused_until_ms is None else saved.paused_until_ms / 1000
        self.pause = policy.TargetPause.restore(
            self.target.pause_after,
            self.target.retry.first_s,
            self.target.retry.max_s,
            (saved.failures, saved.pauses, until_s),
            time.time(),
        )
        if _sending(self.target) != _sending(target):  # a reload during the read
            self.pause.probe_now(time.time())
        if self.pause.state != "open":
            self.last_error = saved.last_error
            log.warning(
                "target.paused", target=self.target.name, reason="paused before the restart",
                for_s=round(self.pause.wait_s(time.time()) or 0.0, 3),
            )  # fmt: skip

    async def _expire_waiting(self) -> float:
        """While paused, deliveries older than max_age still end dead. Seconds to the next."""
        max_age_s = self.target.retry.max_age_s
        reason = f"max_age {max_age_s:g}s exceeded while the target was paused"
        try:
            cutoff_ms = _now_ms() - int(max_age_s * 1000)
            while expired := await self._journal.expire_older(self.target.name, cutoff_ms, reason):
                report_dead(self._metrics, expired, reason)
            oldest_ms = await self._journal.oldest_pending_ms(self.target.name)
        except JournalError as error:
            log.error("journal.write_failed", error=str(error), target=self.target.name)
            return PAUSED_SWEEP_S
        self._nothing_waiting = oldest_ms is None
        if oldest_ms is None:
            return PAUSED_SWEEP_S
        return max(0.05, (oldest_ms + max_age_s * 1000 - _now_ms()) / 1000)

    def _log_attempt(self, finished: Finished) -> None:
        delivery, target, result, step = (
            finished.delivery, finished.target, finished.result, finished.step
        )  # fmt: skip
        elapsed_ms = finished.elapsed_ms
        delivered = step.outcome is policy.Outcome.DELIVERED
        self._metrics.count_attempt(target.name, step.outcome.value, elapsed_ms / 1000)
        if delivered:
            latency_s = time.time() - delivery.created_at_ms / 1000
            self._metrics.observe_latency(target.name, latency_s)
        listened = self._tail.listened
        if delivered and not listened and not log.info_enabled:
            return  # nobody reads this line: do not build it
        fields = {
            "delivery_id": delivery.id,
            "event_id": delivery.event_id,
            "target": target.name,
            "route": delivery.route,
            "attempt": finished.attempt,
            "status": result.status,
            "ms": round(elapsed_ms, 3),
        }
        if listened:
            self._tail.publish(
                "delivery.attempt", source=delivery.source, outcome=step.outcome.value,
                error=result.error, reason=step.reason, **fields,
            )  # fmt: skip
        if delivered:
            log.info("delivery.succeeded", **fields)
        elif step.outcome is policy.Outcome.RETRY:
            log.warning(
                "delivery.failed",
                error=result.error,
                retry_in_s=round(finished.retry_in_s, 3),
                **fields,
            )
        else:
            log.error("delivery.dead", error=result.error, reason=step.reason, **fields)

    async def _give_up(self, delivery: DueDelivery, target: TargetConfig, reason: str) -> None:
        """Make the delivery dead without an attempt (too old, or its transform failed)."""
        try:
            changed = await self._journal.expire(
                delivery.id, delivery.event_id, reason, delivery.created_at_ms
            )
        except JournalError as error:
            log.error("journal.write_failed", error=str(error), delivery_id=delivery.id)
            self._hold_off()
            return
        if not changed:  # already dead (swept while paused), or replayed since it was read
            return
        dead = DeadDelivery(
            delivery.id, delivery.event_id, target.name, delivery.route, delivery.attempts
        )
        report_dead(self._metrics, [dead], reason)

    def _forget_window(self) -> None:
        """Let go of the deliveries read but not started (those being read or waiting for
        their start too): they stay pending in the journal."""
        self._window_generation += 1
        for delivery in self._ready:
            self._held.discard(delivery.id)
        self._ready.clear()

    def stop_taking(self) -> None:
        self._stopping = True
        self._forget_window()  # a lane of the same name, re-added, may send them
        self._stopped.set()
        self._poke.set()
        self._wake.set()

    async def finish(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for in-flight attempts and their commits; cancel the rest
        (workers not in an attempt at once). How many attempts were cut."""
        idle = [w for w in self._workers.values() if w not in self._attempting]
        for worker in idle:
            worker.cancel()
        deadline = time.monotonic() + timeout_s
        attempting = set(self._attempting)
        _done, cut = (
            await asyncio.wait(attempting, timeout=timeout_s) if attempting else (set(), set())
        )
        for task in cut:
            task.cancel()
        await asyncio.gather(*idle, *cut, return_exceptions=True)
        if self._recording:  # outcomes handed over meanwhile, during the grace included
            remaining_s = max(0.0, deadline - time.monotonic())
            await asyncio.wait(set(self._recording), timeout=remaining_s)
        return len(cut)


def _decide(
    delivery: DueDelivery,
    target: TargetConfig,
    result: AttemptResult,
    now_s: float,
    old_endpoint: bool,
) -> tuple[policy.Outcome, policy.Step]:
    """What an attempt's result means (`target` as the attempt used it), and what next."""
    if result.refused:
        outcome = policy.Outcome.DEAD
    elif target.is_log and result.error is None:
        outcome = policy.Outcome.DELIVERED
    else:
        outcome = policy.classify(result.status, target.retry_on)
    step = policy.next_step(
        outcome=outcome,
        attempt=delivery.attempts + 1 - delivery.replay_base,  # a replay restarts the budget
        retry=target.retry,
        received_at_s=delivery.created_at_ms / 1000,
        now_s=now_s,
        jitter=random.random(),
        failure=result.failure,
        retry_after_s=policy.retry_after_for(result.status, result.retry_after, now_s),
    )
    if step.outcome is policy.Outcome.RETRY and old_endpoint:
        step.next_at_s = now_s  # a reload moved the target since: the new one, at once
    return outcome, step


def _endpoint(target: TargetConfig) -> tuple[str, str]:
    """Where a target's requests go: a reload that changes it makes a new start."""
    return target.url, target.method


def _sending(target: TargetConfig) -> tuple[object, ...]:
    """What a target's requests are: a reload that changes it lets a paused target probe."""
    return target.url, target.method, target.headers, target.sign, target.timeout_s


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def report_dead(metrics: Metrics, dead: Iterable[DeadDelivery], reason: str) -> None:
    """Deliveries that died without an attempt (too old, a failed transform, their target
    or route removed): counted, and a `delivery.dead` line each with the attempt fields
    (`attempt` is the number made before; no status, no time)."""
    for delivery in dead:
        metrics.count_dead(delivery.target)
        log.error(
            "delivery.dead", delivery_id=delivery.delivery_id, event_id=delivery.event_id,
            target=delivery.target, route=delivery.route, attempt=delivery.attempts,
            status=None, ms=0, reason=reason,
        )  # fmt: skip


class Deliverer:
    """All lanes, and the HTTP client they share."""

    def __init__(
        self,
        journal: Journal,
        client: http1.Client,
        tail: Tail,
        metrics: Metrics,
    ) -> None:
        self._services = LaneServices(self._current, journal, client, tail, metrics)
        self._retiring: set[asyncio.Task[int]] = set()
        # per target name, its removed lanes that are still finishing (see `Lane`)
        self._retiring_lanes: dict[str, list[Lane]] = {}
        self.stopping = False  # `stop_taking` was called: no lane starts from here on
        self.settings: Settings | None = None
        self.lanes: dict[str, Lane] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}

    def _current(self) -> Settings:
        assert self.settings is not None, "start() sets the settings"
        return self.settings

    def start(self, config: Config) -> None:
        self.settings = Settings.of(config)
        for target in config.targets.values():
            self._start_lane(target)

    def _start_lane(self, target: TargetConfig) -> None:
        lane = Lane(target, self._services, self._retiring_lanes.setdefault(target.name, []))
        self.lanes[target.name] = lane
        if self.stopping:  # a reload that was under way when the stop began: no attempts
            lane.stop_taking()
            return
        self._runners[target.name] = asyncio.create_task(lane.run(), name=f"lane-{target.name}")

    async def reconfigure(self, config: Config, grace_s: float) -> list[str]:
        """Swap in a reloaded config; the names of the targets that were removed.

        Unchanged lanes keep their queues and in-flight requests; changed ones take the
        new settings for their next attempt; new targets get lanes; removed ones stop
        taking attempts and let theirs finish within `grace_s` in the background.
        """
        old = self._current().config
        self.settings = Settings.of(config)
        moved: list[Lane] = []  # every lane retargeted before any await: none sees a mix
        for name, target in config.targets.items():
            if name not in self.lanes:
                self._start_lane(target)
            elif target != old.targets.get(name) and self.lanes[name].retarget(target):
                moved.append(self.lanes[name])
        removed = [name for name in self.lanes if name not in config.targets]
        for name in removed:
            lane = self.lanes.pop(name)
            lane.stop_taking()
            runner = self._runners.pop(name, None)  # none: a lane added while stopping
            if runner is not None:
                runner.cancel()
            self._retiring_lanes[name].append(lane)
            retiring = asyncio.create_task(lane.finish(grace_s))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
            retiring.add_done_callback(functools.partial(self._retired, name, lane))
        for lane in moved:  # a new endpoint: its scheduled retries are due now
            await lane.drain()
        return removed

    def _retired(self, name: str, lane: Lane, _finished: asyncio.Task[int]) -> None:
        """A removed lane's attempts are over. What they left pending (a delivery replayed
        meanwhile, or retried over the "target removed" sweep) is read by a lane of the
        same name, re-added since."""
        self._retiring_lanes[name].remove(lane)
        current = self.lanes.get(name)
        if current is not None:
            current.wake()

    def accepted(self, event: NewEvent) -> None:
        """Ingress committed `event`: its deliveries are offered to their lanes."""
        for new in event.deliveries:
            lane = self.lanes.get(new.target)
            if lane is not None:
                lane.offer(event, new)

    def notify(self, targets: Iterable[str]) -> None:
        """Deliveries of these targets were made pending again (a replay): their lanes
        re-key and read the journal. (Ingress hands new events over with `accepted`.)"""
        for name in targets:
            lane = self.lanes.get(name)
            if lane is not None:
                lane.requeued()

    @property
    def in_flight(self) -> int:
        return sum(lane.in_flight for lane in self.lanes.values())

    def stop_taking(self) -> None:
        """From now on no lane starts an attempt (deliveries stay pending in the journal)."""
        self.stopping = True
        for lane in self.lanes.values():
            lane.stop_taking()

    async def stop(self, grace_s: float) -> int:
        """Stop starting attempts; let in-flight ones finish within `grace_s`. How many were cut."""
        self.stop_taking()
        for runner in self._runners.values():
            runner.cancel()
        await asyncio.gather(*self._runners.values(), return_exceptions=True)
        deadline = time.monotonic() + grace_s
        cut = 0
        for lane in list(self.lanes.values()):
            cut += await lane.finish(max(0.0, deadline - time.monotonic()))
        # Lanes of targets a reload removed: their attempts get the same grace, then are
        # cut (cancelling `finish` alone would leave them running past the stop).
        for lanes in list(self._retiring_lanes.values()):
            for lane in list(lanes):
                cut += await lane.finish(max(0.0, deadline - time.monotonic()))
        for retiring in list(self._retiring):
            retiring.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        return cut


@contextlib.asynccontextmanager
async def open_deliverer(
    journal: Journal, network: NetworkPolicy, tail: Tail, metrics: Metrics
) -> AsyncIterator[Deliverer]:
    """The deliverer and its HTTP client; the client's connections are closed on exit.

    The client resolves through the network policy and connects to the addresses it
    checked; IP-literal URLs are checked against the policy without a lookup.
    """
    client = http1.Client(network)
    try:
        yield Deliverer(journal, client, tail, metrics)
    finally:
        await client.close()
