"""The admin API: status, events, replay, reload and tail, without the HTTP around it.

This module owns what the admin listener's `/api/*` endpoints answer (SPEC §6):
the `admin_token` check, parsing and checking query strings and bodies, the
JSON shapes (timestamps as RFC 3339 UTC strings), re-queueing deliveries for a
replay (and waking their lanes), handing `/api/reload` to the daemon's reload,
the per-source request counters that ingress feeds, and the frames of the
`/api/tail` Server-Sent Events stream. `relay.ingress.admin_handler` is the HTTP
adapter in front of it; this module never imports `aiohttp.web` and never speaks
SQL (the journal does). Every answer is `(status, JSON object)`; an error is
`{"error": "<one line>"}` with a 4xx (or a 503 when the journal fails).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from relay import __version__, logs
from relay.config import parse_duration
from relay.journal import (
    DeliveryRow,
    DeliveryStatus,
    EventDetail,
    Journal,
    JournalError,
    Replay,
)
from relay.model import Config
from relay.rules import rfc3339_ms
from relay.tail import Subscription, Tail
from relay.text import json_bytes

if TYPE_CHECKING:
    from relay.delivery import Deliverer

log = logs.get_logger()

Answer = tuple[int, dict[str, Any]]
ReloadFn = Callable[[], Awaitable[tuple[bool, list[str]]]]
RequestOutcome = Literal["accepted", "rejected", "duplicate", "handshake"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
STOP_POLL_S = 1.0  # how soon a tail stream notices that the daemon is stopping
EVENT_STATUSES = ("pending", "delivered", "dead", "unrouted")
REPLAYABLE: tuple[DeliveryStatus, ...] = ("dead", "delivered")
EARLIEST_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
LATEST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_LIMIT = re.compile(r"0*[0-9]{1,3}")  # more digits are over MAX_LIMIT anyway
EVENT_ID = re.compile(r"evt_[0-9A-HJKMNP-TV-Z]{26}")  # what ids.event_id makes


class Readiness(Protocol):
    """What the admin API reads of `relay.ingress.Health`."""

    @property
    def ready(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...


class RequestCounter(Protocol):
    """What ingress calls once per request that reached a source."""

    def count(self, source: str, outcome: RequestOutcome) -> None: ...


class SourceCounters:
    """Per-source request counts since the daemon started (kept in memory only).

    `received` counts every request that reached a source (its path matched): the
    accepted, the duplicates, the rejected (any 4xx, and a 503) and the provider
    handshakes, so `received` = `accepted` + `duplicate` + `rejected` + `handshake`.
    """

    FIELDS = ("received", "accepted", "duplicate", "rejected", "handshake")

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}

    def count(self, source: str, outcome: RequestOutcome) -> None:
        counts = self._counts.get(source)
        if counts is None:
            counts = self._counts[source] = dict.fromkeys(self.FIELDS, 0)
        counts["received"] += 1
        counts[outcome] += 1

    def of(self, source: str) -> dict[str, int]:
        return dict(self._counts.get(source) or dict.fromkeys(self.FIELDS, 0))


class BadRequest(Exception):
    """A request the API answers with a 4xx and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminApi:
    """The JSON endpoints of SPEC §6 under `/api/`; see `handle`.

    The daemon wires it in three places: `api = AdminApi(journal, deliverer, tail, health,
    current_config=...)`, `admin_handler(health, api=api)`, and `Inbound(...,
    counters=api.counters)`; `current_config` and `reload` may be set later, once the
    daemon's live config and its reload exist.
    """

    def __init__(
        self,
        journal: Journal,
        deliverer: Deliverer,
        tail: Tail,
        health: Readiness,
        current_config: Callable[[], Config],
        reload: ReloadFn | None = None,
        counters: SourceCounters | None = None,
    ) -> None:
        self._journal = journal
        self._deliverer = deliverer
        self._tail = tail
        self._health = health
        # Public: the daemon may set these once its reload machinery exists.
        self.current_config = current_config
        self.reload = reload
        self.counters = counters if counters is not None else SourceCounters()
        self.started_at_ms = _now_ms()

    # -------------------------------------------------------------- the entry points

    async def handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: bytes,
        authorization: str | None,
    ) -> Answer:
        """Answer one `/api/*` request: (HTTP status, JSON object)."""
        if path != "/api" and not path.startswith("/api/"):
            return 404, {"error": f"no such endpoint {path}"}
        denied = self.authorize(authorization)
        if denied is not None:
            return denied
        try:
            return await self._route(method, path, query, body)
        except BadRequest as error:
            return error.status, {"error": error.message}
        except JournalError as error:
            log.error("journal.write_failed", error=str(error), endpoint=path)
            return 503, {"error": f"journal unavailable: {error}"}

    def authorize(self, authorization: str | None) -> Answer | None:
        """None when the request may go on; else the 401 answer (`server.admin_token`)."""
        token = self.current_config().server.admin_token
        if not token:
            return None
        if not authorization:
            return 401, {"error": "missing Authorization: Bearer <server.admin_token>"}
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), token.encode()
        ):
            return 401, {"error": "wrong admin token"}
        return None

    def open_tail(
        self, query: Mapping[str, str], authorization: str | None
    ) -> Answer | AbstractAsyncContextManager[Subscription]:
        """For `GET /api/tail?source=`: an error answer, or the subscription to stream."""
        denied = self.authorize(authorization)
        if denied is not None:
            return denied
        try:
            _check_params(query, ("source",))
        except BadRequest as error:
            return error.status, {"error": error.message}
        return self._tail.subscribe(query.get("source") or None)

    async def tail_frames(
        self,
        subscription: Subscription,
        *,
        keepalive_s: float = KEEPALIVE_S,
        poll_s: float = STOP_POLL_S,
    ) -> AsyncGenerator[bytes, None]:
        """The Server-Sent Events stream: `data: <json>` per record, `: keep-alive` comments.

        Starts with a comment (so the client sees the stream open at once) and ends when
        the daemon starts stopping. Records a slow client missed are announced as
        `{"kind": "tail.dropped", "dropped": <total so far>}`.
        """
        yield b": relay tail\n\n"
        last_s = time.monotonic()
        dropped = 0
        while not self._health.stopping:
            try:
                record = await asyncio.wait_for(subscription.queue.get(), poll_s)
            except TimeoutError:
                if time.monotonic() - last_s >= keepalive_s:
                    last_s = time.monotonic()
                    yield b": keep-alive\n\n"
                continue
            if subscription.dropped != dropped:
                dropped = subscription.dropped
                yield sse_frame({"kind": "tail.dropped", "dropped": dropped})
            yield sse_frame(record)
            last_s = time.monotonic()

    # -------------------------------------------------------------- routing

    async def _route(self, method: str, path: str, query: Mapping[str, str], body: bytes) -> Answer:
        # Split as given: "/api/events/" or "/api//events" name no endpoint (a 404).
        parts = path.removeprefix("/api/").split("/")
        match parts:
            case ["status"]:
                _allow(method, "GET", path)
                _check_params(query, ())
                return await self._status()
            case ["events"]:
                _allow(method, "GET", path)
                return await self._events(query)
            case ["events", event_id] if event_id:
                _allow(method, "GET", path)
                _check_params(query, ())
                return await self._event(event_id)
            case ["events", event_id, "replay"] if event_id:
                _allow(method, "POST", path)
                _check_params(query, ())
                return await self._replay(Replay(statuses=REPLAYABLE, event_id=event_id))
            case ["replay"]:
                _allow(method, "POST", path)
                _check_params(query, ())
                return await self._replay(self._selection(body))
            case ["reload"]:
                _allow(method, "POST", path)
                _check_params(query, ())
                return await self._reload_config()
            case ["tail"]:
                _allow(method, "GET", path)
                raise BadRequest(406, "/api/tail is a Server-Sent Events stream")
        raise BadRequest(404, f"no such endpoint {path}")

    # -------------------------------------------------------------- endpoints

    async def _status(self) -> Answer:
        config = self.current_config()
        depths = await self._journal.queue_depths()
        targets: dict[str, Any] = {}
        for name in config.targets:
            lane = self._deliverer.lanes.get(name)
            state = lane.pause.state if lane is not None else "open"
            until_s = lane.pause.paused_until_s if lane is not None else None
            targets[name] = {
                "queue_depth": depths.get(name, 0),
                "in_flight": lane.in_flight if lane is not None else 0,
                "paused": state != "open",
                "state": state,
                "paused_until": None if until_s is None else rfc3339_ms(int(until_s * 1000)),
                "last_error": lane.last_error if lane is not None else None,
            }
        return 200, {
            "sources": {name: self.counters.of(name) for name in config.sources},
            "routes": [route.name for route in config.routes],
            "targets": targets,
            "ready": self._health.ready,
            "version": __version__,
            "started_at": rfc3339_ms(self.started_at_ms),
        }

    async def _events(self, query: Mapping[str, str]) -> Answer:
        _check_params(query, ("source", "status", "limit", "before"))
        source = query.get("source") or None
        status = query.get("status") or None
        if status is not None and status not in EVENT_STATUSES:
            raise BadRequest(400, f'status: "{status}" is not one of {", ".join(EVENT_STATUSES)}')
        limit = parse_limit(query.get("limit") or None)
        before = query.get("before") or None
        if before is not None and not EVENT_ID.fullmatch(before):
            raise BadRequest(400, f'before: "{before}" is not an event id (evt_ + 26 characters)')
        rows = await self._journal.list_events(
            source=source, status=status, before=before, limit=limit + 1
        )
        page = rows[:limit]
        return 200, {
            "events": [
                {
                    "id": row.id,
                    "source": row.source,
                    "received_at": rfc3339_ms(row.received_at_ms),
                    "status": row.status,
                    "deliveries": row.deliveries,
                }
                for row in page
            ],
            "next": page[-1].id if len(rows) > limit else None,
        }

    async def _event(self, event_id: str) -> Answer:
        event = await self._journal.get_event(event_id)
        if event is None:
            raise BadRequest(404, f"no event {event_id}")
        return 200, event_json(event)

    def _selection(self, body: bytes) -> Replay:
        """`POST /api/replay`'s body, checked against the running config's names."""
        selection = replay_filter(body, _now_ms())
        unknown = unknown_name(selection.target, selection.route, self.current_config())
        if unknown is not None:
            raise BadRequest(400, unknown)
        return selection

    async def _replay(self, selection: Replay) -> Answer:
        config = self.current_config()
        fields = _replay_fields(selection)  # before the write: nothing may fail after it
        result = await self._journal.requeue(selection, config.targets.keys(), _now_ms())
        if result is None:
            raise BadRequest(404, f"no event {selection.event_id}")
        self._deliverer.notify(result.targets)
        log.info(
            "admin.replayed",
            requeued=result.requeued,
            skipped=result.skipped,
            targets=sorted(result.targets),
            **fields,
        )
        return 200, {"requeued": result.requeued, "skipped": result.skipped}

    async def _reload_config(self) -> Answer:
        if self.reload is None:
            message = "reload is not available"
            return 501, {"ok": False, "errors": [message], "error": message}
        ok, errors = await self.reload()
        return 200, ({"ok": True} if ok else {"ok": False, "errors": list(errors)})


# ------------------------------------------------------------------ shapes and parsing


def event_json(event: EventDetail) -> dict[str, Any]:
    """`GET /api/events/{id}`: headers as [[name, value], ...] in the order received."""
    body, encoding = _text_or_base64(event.body)
    return {
        "id": event.id,
        "source": event.source,
        "received_at": rfc3339_ms(event.received_at_ms),
        "status": event.status,
        "finished_at": _time(event.finished_at_ms),
        "method": event.method,
        "path": event.path,
        "query": event.query,
        "headers": [[name, value] for name, value in event.headers],
        "body": body,
        "body_encoding": encoding,
        "dedupe_key": event.dedupe_key,
        "routes": [
            {"name": r.get("name"), "matched": r.get("matched"), "error": r.get("error")}
            for r in event.routes
        ],
        "deliveries": [_delivery_json(d) for d in event.deliveries],
    }


def _delivery_json(delivery: DeliveryRow) -> dict[str, Any]:
    log_entries = []
    for attempt in delivery.attempt_log:
        entry: dict[str, Any] = {
            "n": attempt.n,
            "at": rfc3339_ms(attempt.started_at_ms),
            "ms": attempt.ms,
            "status": attempt.status,
            "error": attempt.error,
            "response": None,
        }
        if attempt.response is not None:
            entry["response"], entry["response_encoding"] = _text_or_base64(attempt.response)
        log_entries.append(entry)
    pending = delivery.status == "pending"
    return {
        "id": delivery.id,
        "route": delivery.route,
        "target": delivery.target,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_at": _time(delivery.next_at_ms) if pending else None,
        "reason": delivery.last_error if delivery.status == "dead" else None,
        "last_error": delivery.last_error,
        "queued_at": rfc3339_ms(delivery.created_at_ms),
        "replay_base": delivery.replay_base,
        "attempt_log": log_entries,
    }


def replay_filter(body: bytes, now_ms: int) -> Replay:
    """`POST /api/replay`'s body: {"status": "dead", "target", "route", "since"}, all optional."""
    try:
        data = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as error:
        raise BadRequest(400, f"body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "body must be a JSON object")
    known = ("status", "target", "route", "since")
    for key in data:
        if key not in known:
            raise BadRequest(400, f'unknown key "{key}" (known: {", ".join(known)})')
    for key in known:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise BadRequest(400, f"{key}: expected a string")
    status: DeliveryStatus = "dead"
    if data.get("status") == "delivered":
        status = "delivered"
    elif data.get("status") not in (None, "", "dead"):
        raise BadRequest(
            400, f'status: "{data["status"]}" cannot be replayed (use dead or delivered)'
        )
    since = data.get("since")
    return Replay(
        statuses=(status,),
        target=data.get("target") or None,
        route=data.get("route") or None,
        since_ms=since_ms(since, now_ms) if since else None,
    )


def unknown_name(
    target: str | None, route: str | None, config: Config, where: str = "the daemon's config"
) -> str | None:
    """Why a replay's target or route is refused: it is not in the config. A removed one's
    deliveries could not be sent (no lane; a removed route's end dead again), so such a
    name is a typo, or needs the target or route back first (then reload, then replay)."""
    routes = [r.name for r in config.routes]
    for kind, name, known in (("target", target, list(config.targets)), ("route", route, routes)):
        if name is not None and name not in known:
            return f'{kind}: "{name}" is not in {where} (known: {", ".join(known) or "none"})'
    return None


def since_ms(text: str, now_ms: int) -> int:
    """A replay's `since`: a duration back from now ("24h") or an RFC 3339 time, from
    year 1 to 9999 (else a 400: a time that far out cannot even be written in a log line)."""
    try:
        back_ms = parse_duration(text, capped=False) * 1000
    except ValueError:
        ms = _moment_ms(text)
    else:  # capped first: int() of an infinite duration ("1e999d") would raise
        ms = now_ms - int(min(back_ms, LATEST_MS - EARLIEST_MS + 1))
    if not EARLIEST_MS <= ms <= LATEST_MS:
        raise BadRequest(400, f'since: "{text}" is out of range (years 1 to 9999)')
    return ms


def _moment_ms(text: str) -> int:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise BadRequest(
            400,
            f'since: "{text}" is neither a duration like "24h" nor an RFC 3339 time'
            ' with a zone like "2026-11-28T19:00:00Z"',
        )
    return int(moment.timestamp() * 1000)


def _replay_fields(selection: Replay) -> dict[str, Any]:
    """What `admin.replayed` says of the selection."""
    return {
        "event_id": selection.event_id,
        "statuses": list(selection.statuses),
        "target": selection.target,
        "route": selection.route,
        "since": _time(selection.since_ms),
    }


def sse_frame(record: Mapping[str, Any]) -> bytes:
    """One Server-Sent Events record; `at` (when it was sent) is added when missing."""
    fields = dict(record)
    fields.setdefault("at", rfc3339_ms(_now_ms()))
    return b"data: " + json_bytes(fields) + b"\n\n"


def _allow(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise BadRequest(405, f"method {method} not allowed on {path} (use {allowed})")


def _check_params(query: Mapping[str, str], known: tuple[str, ...]) -> None:
    """Only `known` names, each once (the items of a multidict, as aiohttp gives the
    query, show repeats)."""
    seen: set[str] = set()
    for name, _ in query.items():
        if name not in known:
            hint = f" (known: {', '.join(known)})" if known else ""
            raise BadRequest(400, f'unknown query parameter "{name}"{hint}')
        if name in seen:
            raise BadRequest(400, f'query parameter "{name}" is given more than once')
        seen.add(name)


def parse_limit(text: str | None) -> int:
    """`limit`: plain digits (no sign, space or "_", which int() would take), 1 to MAX_LIMIT."""
    if text is None:
        return DEFAULT_LIMIT
    limit = int(text) if _LIMIT.fullmatch(text) else 0
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(400, f'limit: "{text}" is not a whole number from 1 to {MAX_LIMIT}')
    return limit


def _text_or_base64(data: bytes) -> tuple[str, str]:
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def _time(ms: int | None) -> str | None:
    return None if ms is None else rfc3339_ms(ms)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
