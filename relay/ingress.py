"""Ingress: the HTTP listeners, and the per-request pipeline of an inbound webhook.

This module is the only one that imports `aiohttp.web` (for the admin listener). It
owns the inbound pipeline (SPEC §3; the connections and their framing are
`relay.http1server`'s): route by path and method, `allow_from`, the declared and the
actual body size, the body's `read_timeout`, parsing for the rules, route decisions,
the journal append (the reply is sent only after the commit) and the reply; and the
admin listener (SPEC §6): `/healthz`, `/readyz`, `/metrics`, and the HTTP side of the
admin API (`relay.admin` answers; `/api/tail` is streamed here as Server-Sent Events).
It never speaks SQL: it hands a `NewEvent` to the journal. Bad input of any kind gets
a 4xx with a one-line reason and an `event.rejected` log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_exceptions import HTTPException
from aiohttp.web_protocol import RequestPayloadError

from relay import http1server, ids, logs
from relay.admin import AdminApi, RequestCounter, RequestOutcome
from relay.http1server import Refused, Request, Response
from relay.journal import Journal, JournalError, NewDelivery, NewEvent
from relay.metrics import Metrics
from relay.model import Address, Config, Rate, SourceConfig
from relay.policy import TokenBucket, retry_after_header
from relay.rules import (
    BodyError,
    RouteSet,
    is_slack_challenge,
    order_key,
    reads_body,
    request_document,
)
from relay.signing import Verdict, verify
from relay.tail import Subscription, Tail
from relay.text import json_bytes, json_text, storable

log = logs.get_logger()

JSON_TYPE = "application/json; charset=utf-8"

READ_CHUNK_BYTES = 64 * 1024
JOURNAL_RETRY_AFTER_S = 5
MAX_HEADERS = 100  # the admin listener's limits (the inbound one's are http1server's)
MAX_FIELD_BYTES = 8190
LINGER_S = 1.0


@dataclass
class Health:
    """What /readyz reports: serving, not stopping, and the journal writable."""

    serving: bool = False
    stopping: bool = False
    journal: Journal | None = None

    @property
    def ready(self) -> bool:
        return (
            self.serving and not self.stopping and self.journal is not None and self.journal.healthy
        )


@dataclass(frozen=True)
class Routing:
    """The routing table of one config: path -> source, source -> routes."""

    config: Config
    by_path: Mapping[str, SourceConfig] = field(default_factory=dict)
    routes: Mapping[str, RouteSet] = field(default_factory=dict)
    # Sources whose body some rule reads at ingest (filter, dedupe key, order key): only
    # those need integers beyond 64 bits exact (`parse_body`).
    reads_body: frozenset[str] = frozenset()

    @classmethod
    def of(cls, config: Config) -> Routing:
        return cls(
            config,
            {s.path: s for s in config.sources.values()},
            {name: RouteSet(config.routes_of(name)) for name in config.sources},
            frozenset(name for name in config.sources if _rules_read_body(config, name)),
        )


def _rules_read_body(config: Config, source_name: str) -> bool:
    source = config.sources[source_name]
    routes = config.routes_of(source_name)
    expressions = [
        *(route.filter for route in routes),
        source.dedupe.key if source.dedupe else None,
        *(config.targets[name].order_key for route in routes for name in route.targets),
    ]
    body_dedupe = (
        source.dedupe is not None
        and source.dedupe.key is None
        and (source.verify is not None and source.verify.scheme in ("stripe", "slack"))
    )  # the provider's id is read from the body (`dedupe_key`)
    return body_dedupe or any(e is not None and reads_body(e) for e in expressions)


class Rejected(Exception):
    """A request answered with a 4xx (or 503).

    `reason` is the one-line explanation for the log; `public` what the sender is told
    (the reason itself unless that would help an attacker, as for a bad signature).
    `error` is relay's own failure behind the refusal (the journal's), logged as an error.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        headers: Mapping[str, str] | None = None,
        public: str | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})
        self.public = public or reason
        self.error = error


def _reply(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON reply on the inbound listener (none for a 204, which cannot carry a body)."""
    if status == 204:
        return Response(204, b"", tuple((headers or {}).items()))
    pairs = [*headers.items(), ("Content-Type", JSON_TYPE)] if headers else _JSON_HEADERS
    return Response(status, json_bytes(payload), pairs)


_JSON_HEADERS = (("Content-Type", JSON_TYPE),)


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON reply on the admin listener."""
    # The headers given whole: aiohttp's content_type= parses and rebuilds the type on
    # every call, and without a Content-Length it asks whether the body is a Payload
    # (an isinstance check against an ABC, which runs in Python).
    body = orjson.dumps(payload)
    return web.Response(
        status=status,
        body=body,
        headers={**(headers or {}), "Content-Type": JSON_TYPE, "Content-Length": str(len(body))},
    )


class Inbound:
    """The inbound webhook handler; `routing` is swapped whole on reload."""

    def __init__(
        self,
        routing: Routing,
        journal: Journal,
        on_accepted: Callable[[NewEvent], None],
        tail: Tail,
        *,
        counters: RequestCounter | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.routing = routing
        self._journal = journal
        self._on_accepted = on_accepted
        self._tail = tail
        self._counters = counters  # told the outcome of every request that reached a source
        self._metrics = metrics
        self._buckets: dict[str, tuple[Rate, int | None, TokenBucket]] = {}

    def check_rate(self, source: SourceConfig) -> None:
        """429 with Retry-After when the source is over its `rate_limit` (token bucket)."""
        if source.rate_limit is None:
            return
        held = self._buckets.get(source.name)
        if held is None or held[:2] != (source.rate_limit, source.burst):  # new or reloaded
            bucket = TokenBucket(source.rate_limit.per_second, source.burst)
            held = self._buckets[source.name] = (source.rate_limit, source.burst, bucket)
        wait_s = held[2].take(time.monotonic())
        if wait_s > 0:
            raise Rejected(
                429,
                f"over rate_limit {source.rate_limit.count}/{source.rate_limit.per_s:g}s",
                {"Retry-After": retry_after_header(wait_s)},
            )

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        routing = self.routing  # one config for the whole request, even across a reload
        source = routing.by_path.get(request.path)
        try:
            if source is None:
                raise Rejected(404, f"no source at {request.path}")
            response = await self._accept(request, routing, source, started)
        except Rejected as rejected:
            response = self._reject(request, source, rejected)
        if self._metrics is not None:
            self._metrics.count_request(source.name if source else "", response.status)
        return response

    def _reject(
        self, request: Request, source: SourceConfig | None, rejected: Rejected
    ) -> Response:
        self._count(source, "rejected")
        # One line per request: a refusal that is relay's fault (the journal failed) is
        # that line at level error, with the failure, rather than a second line of its own.
        failed = {} if rejected.error is None else {"error": rejected.error}
        (log.info if rejected.error is None else log.error)(
            "event.rejected",
            source=source.name if source else None,
            status=rejected.status,
            reason=rejected.reason,
            remote=request.remote,
            path=request.path,
            **failed,
        )
        response = _reply(rejected.status, {"error": rejected.public}, rejected.headers)
        response.close = rejected.status in (408, 413)  # the rest of the body is not worth reading
        return response

    def refused(self, remote: str | None, refused: Refused) -> Response:
        """The reply to a request the connection refused before any source saw it (a
        malformed or oversized head), logged like any rejection; or a 500 for a bug (called
        while its exception is handled: the log line carries the traceback)."""
        if refused.status >= 500:
            log.exception("ingress.internal_error", error=refused.reason, remote=remote)
        log.info(
            "event.rejected",
            source=None,
            status=refused.status,
            reason=refused.reason,
            remote=remote,
            path=None,
        )
        if self._metrics is not None:
            self._metrics.count_request("", refused.status)
        public = refused.reason if refused.status < 500 else "internal error"
        return _reply(refused.status, {"error": public})

    def _count(self, source: SourceConfig | None, outcome: RequestOutcome) -> None:
        if source is None:
            return
        if self._counters is not None:
            self._counters.count(source.name, outcome)
        if self._metrics is not None:
            self._metrics.count_event(source.name, outcome)

    async def _accept(
        self, request: Request, routing: Routing, source: SourceConfig, started: float
    ) -> Response:
        handshake = source.challenge == "meta" and request.method == "GET"
        if not handshake:
            check_method(request, source)  # SPEC §3 order: 405, 403, 429, 413, ...
        if source.allow_from:
            check_peer(request, source)
        if source.rate_limit is not None:
            self.check_rate(source)
        if handshake:
            response = meta_handshake(request, source)
            self._count(source, "handshake")
            return response
        check_length(request, source)
        read_timeout_s = routing.config.server.read_timeout_s
        body = await read_body(request.body, source.max_body_bytes, read_timeout_s)
        received_ms = time.time_ns() // 1_000_000
        verdict = check_signature(request, source, body, received_ms / 1000)
        event_id = ids.event_id(received_ms)
        headers = request.header_pairs
        if not "".join(request.headers.values()).isascii():  # one check for all of them
            headers = [(name, storable(value)) for name, value in headers]
        try:
            document = request_document(
                event_id=event_id,
                source=source.name,
                method=request.method,
                path=request.path,
                query=request.query_string,
                headers=headers,
                body=body,
                received_at_ms=received_ms,
                max_body_bytes=source.max_body_bytes,
                exact_numbers=source.name in routing.reads_body,
            )
        except BodyError as error:
            raise Rejected(error.status, str(error)) from None
        if source.challenge == "slack" and is_slack_challenge(document):
            log.info("event.handshake", source=source.name, provider="slack")
            self._count(source, "handshake")
            return _reply(200, {"challenge": document["body"]["challenge"]})
        key = dedupe_key(source, verdict, document) if source.dedupe is not None else None
        event = self._event(routing, source, request, received_ms, headers, body, document, key)
        return await self._journal_event(event, source, document["received_at"], started)

    def _event(
        self,
        routing: Routing,
        source: SourceConfig,
        request: Request,
        received_ms: int,
        headers: list[tuple[str, str]],
        body: bytes,
        document: dict[str, Any],
        key: str | None,
    ) -> NewEvent:
        """The event to journal: the request as received, its route decisions, and one
        delivery per (matched route, target)."""
        route_set = routing.routes[source.name]
        decisions = route_set.decide(document)
        targets = routing.config.targets
        deliveries = [
            NewDelivery(
                ids.delivery_id(received_ms),
                route.name,
                target,
                order_key(targets[target], document),
            )
            for route, decision in zip(route_set.routes, decisions, strict=True)
            if decision.matched
            for target in route.targets
        ]
        # Positional (field order of NewEvent): keywords cost ~0.4 us a webhook here.
        return NewEvent(
            document["id"],  # id
            source.name,  # source
            received_ms,  # received_at_ms
            request.method,  # method
            request.path,  # path
            request.query_string,  # query
            headers,
            body,
            route_set.records(decisions),  # routes
            deliveries,
            key,  # dedupe_key
            int(source.dedupe.window_s * 1000) if source.dedupe else 0,  # dedupe_window_ms
        )

    async def _journal_event(
        self, event: NewEvent, source: SourceConfig, received_at: str, started: float
    ) -> Response:
        """Commit the event, then tell the lanes, the tail, the log and the sender."""
        try:
            original = await self._journal.append(event)
        except JournalError as error:
            raise _journal_failed(error) from None
        if original is not None:
            log.info(
                "event.duplicate",
                event_id=original,
                source=source.name,
                dedupe_key=event.dedupe_key,
            )
            self._count(source, "duplicate")
            return _reply(200, {"id": original, "duplicate": True})
        deliveries = event.deliveries
        if deliveries:
            self._on_accepted(event)
        if self._tail.listened or log.info_enabled:
            self._tell_accepted(event, source, received_at, started)
        self._count(source, "accepted")
        return _reply(source.ack_status, {"id": event.id, "deliveries": len(deliveries)})

    def _tell_accepted(
        self, event: NewEvent, source: SourceConfig, received_at: str, started: float
    ) -> None:
        """The `event.accepted` line, to the tail's subscribers and the log."""
        matched = [record["name"] for record in event.routes if record["matched"]]
        count = len(event.deliveries)
        if self._tail.listened:
            self._tail.publish(
                "event.accepted", event_id=event.id, source=source.name, routes=matched,
                deliveries=count, received_at=received_at,
            )  # fmt: skip
        log.info(
            "event.accepted",
            event_id=event.id,
            source=source.name,
            routes=matched,
            deliveries=count,
            bytes=len(event.body),
            ms=round((time.perf_counter() - started) * 1000, 3),
        )


def _journal_failed(error: JournalError) -> Rejected:
    """The 503 for an event the journal could not take (the disk failed); its
    `event.rejected` line carries the journal's error."""
    return Rejected(
        503,
        "journal unavailable, try again later",
        {"Retry-After": str(JOURNAL_RETRY_AFTER_S)},
        error=str(error),
    )


def check_signature(
    request: Request, source: SourceConfig, body: bytes, now_s: float
) -> Verdict | None:
    """401 unless the request carries the source's signature (None: the source has no verify)."""
    if source.verify is None:
        return None
    verdict = verify(source.verify, request.headers, body, now_s)
    if not verdict.ok:
        raise Rejected(
            401, f"verify {source.verify.scheme}: {verdict.reason}", public="unauthorized"
        )
    return verdict


def dedupe_key(
    source: SourceConfig, verdict: Verdict | None, document: Mapping[str, Any]
) -> str | None:
    """What identifies a repeat of this event (SPEC §2 `dedupe`), or None when nothing does."""
    if source.dedupe is None:
        return None
    if source.dedupe.key is not None:
        try:
            value = source.dedupe.key.search(document)
        except Exception:  # noqa: BLE001 - a key that cannot be computed means no dedupe
            return None
    elif source.verify is not None and source.verify.scheme in ("stripe", "slack"):
        body = document.get("body")
        field_name = "id" if source.verify.scheme == "stripe" else "event_id"
        value = body.get(field_name) if isinstance(body, dict) else None
    else:
        value = verdict.delivery_id if verdict is not None else None
    if value is None or value == "":
        return None
    return storable(value) if isinstance(value, str) else json_text(value)


def meta_handshake(request: Request, source: SourceConfig) -> Response:
    """Meta's subscription GET: echo hub.challenge when hub.verify_token is the source secret."""
    query = request.query
    token = query.get("hub.verify_token", "").encode("utf-8", "surrogateescape")
    secrets = source.verify.secrets if source.verify else ()
    known = any(hmac.compare_digest(token, s.encode()) for s in secrets)
    if query.get("hub.mode") != "subscribe" or not known or "hub.challenge" not in query:
        raise Rejected(403, "meta handshake: wrong mode or verify_token", public="forbidden")
    log.info("event.handshake", source=source.name, provider="meta")
    challenge = query["hub.challenge"].encode("utf-8", "surrogateescape")
    return Response(200, challenge, (("Content-Type", "text/plain; charset=utf-8"),))


def check_peer(request: Request, source: SourceConfig) -> None:
    """403 unless the peer address is in the source's `allow_from` (when it has one)."""
    if source.allow_from and not _peer_allowed(request.remote, source):
        raise Rejected(403, "source address not allowed")


def check_method(request: Request, source: SourceConfig) -> None:
    """405 (with Allow) for a method the source does not take."""
    if request.method not in source.methods:
        raise Rejected(
            405,
            f"method {request.method} not allowed at {request.path}",
            {"Allow": ", ".join(_allowed_methods(source))},
        )


def _allowed_methods(source: SourceConfig) -> tuple[str, ...]:
    """The source's methods, with GET for Meta's subscription handshake where it has one."""
    if source.challenge == "meta" and "GET" not in source.methods:
        return ("GET", *source.methods)
    return source.methods


def check_length(request: Request, source: SourceConfig) -> None:
    """413 for a declared length over max_body, before any of the body is read."""
    declared = request.content_length
    if declared is not None and declared > source.max_body_bytes:
        raise Rejected(413, f"body of {declared} bytes exceeds max_body {source.max_body_bytes}")


def _peer_allowed(remote: str | None, source: SourceConfig) -> bool:
    try:
        peer = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    return any(peer in network for network in source.allow_from)


class BodySource(Protocol):
    """A request body as it arrives: `http1server.Body`, or `_AdminBody` over aiohttp's."""

    @property
    def complete(self) -> bool: ...

    def take(self) -> bytes: ...

    async def read(self) -> bytes: ...


async def read_body(body: BodySource, max_body_bytes: int, timeout_s: float) -> bytes:
    """The whole body within `timeout_s` (408) and `max_body_bytes` (413)."""
    if body.complete:  # the usual small webhook: it all came with the head
        data = body.take()
        if len(data) > max_body_bytes:
            raise Rejected(413, f"body exceeds max_body {max_body_bytes} bytes")
        return data
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await body.read():
                size += len(chunk)
                if size > max_body_bytes:
                    raise Rejected(413, f"body exceeds max_body {max_body_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise Rejected(408, f"body not received within read_timeout {timeout_s:g}s") from None
    except (ConnectionError, RequestPayloadError, ValueError) as error:
        raise Rejected(400, f"could not read body: {error}") from None
    except (Refused, HTTPException) as refused:  # broken framing, or aiohttp's own limits
        raise Rejected(refused.status, refused.reason or "") from None
    return b"".join(chunks)


class _AdminBody:
    """An admin request's body (aiohttp's stream) as a `BodySource`."""

    def __init__(self, request: web.BaseRequest) -> None:
        self._content = request.content

    @property
    def complete(self) -> bool:
        return self._content.is_eof()

    def take(self) -> bytes:
        return self._content.read_nowait()

    async def read(self) -> bytes:
        return await self._content.read(READ_CHUNK_BYTES)


ADMIN_BODY_BYTES = 64 * 1024
ADMIN_READ_TIMEOUT_S = 10.0
MetricsFn = Callable[[], tuple[bytes, str] | Awaitable[tuple[bytes, str]]]


def admin_handler(
    health: Health, *, api: AdminApi | None = None, metrics: MetricsFn | None = None
) -> Callable[[web.BaseRequest], Any]:
    """The admin listener (SPEC §6): /healthz, /readyz, /metrics and the API under /api/.

    /healthz, /readyz and /metrics are open. /api/* is `relay.admin.AdminApi`'s, which
    checks `server.admin_token`; this adapter only moves HTTP in and out of it, and
    serves `GET /api/tail` as Server-Sent Events. `metrics` returns (body, content type),
    directly or as an awaitable; without it /metrics is a 404, as is /api/* without `api`.
    """

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/healthz":
            return _json(200, {"ok": True})
        if request.path == "/readyz":
            if health.journal is not None and not health.journal.healthy and not health.stopping:
                await health.journal.probe()
            if health.ready:
                return _json(200, {"ready": True})
            return _json(503, {"ready": False, "reason": _not_ready_reason(health)})
        if request.path == "/metrics" and metrics is not None:
            rendered = metrics()
            body, content_type = await rendered if inspect.isawaitable(rendered) else rendered
            return web.Response(status=200, body=body, headers={"Content-Type": content_type})
        if api is not None and (request.path == "/api" or request.path.startswith("/api/")):
            return await _admin_api(api, request)
        return _json(404, {"error": f"no such endpoint {request.path}"})

    return handle


async def _admin_api(api: AdminApi, request: web.BaseRequest) -> web.StreamResponse:
    authorization = request.headers.get("Authorization")
    query = request.query  # a multidict: admin refuses a parameter given twice
    if request.method == "GET" and request.path == "/api/tail":
        opened = api.open_tail(query, authorization)
        if isinstance(opened, tuple):
            return _api_json(*opened)
        async with opened as subscription:  # subscribed before the client sees the stream
            return await _stream_tail(api, subscription, request)
    body = b""
    if request.method not in ("GET", "HEAD"):
        try:
            body = await read_body(_AdminBody(request), ADMIN_BODY_BYTES, ADMIN_READ_TIMEOUT_S)
        except Rejected as rejected:
            return _json(rejected.status, {"error": rejected.public})
    try:
        status, payload = await api.handle(request.method, request.path, query, body, authorization)
    except Exception:  # a bug must answer 500 with a log line, never stop the daemon
        log.exception("admin.internal_error", method=request.method, path=request.path)
        return _json(500, {"error": "internal error (see the daemon's log)"})
    return _api_json(status, payload)


def _api_json(status: int, payload: dict[str, Any]) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="relay"'} if status == 401 else None
    return _json(status, payload, headers)


async def _stream_tail(
    api: AdminApi, subscription: Subscription, request: web.BaseRequest
) -> web.StreamResponse:
    """`GET /api/tail` as Server-Sent Events, until the client goes or the daemon stops."""
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each record on at once
        },
    )
    await response.prepare(request)
    async with contextlib.aclosing(api.tail_frames(subscription)) as frames:
        try:
            async for frame in frames:
                await response.write(frame)
        except ConnectionError:  # the client went away
            return response
    return response


def _not_ready_reason(health: Health) -> str:
    if health.stopping:
        return "stopping"
    if not health.serving:
        return "starting"
    return "journal unavailable"


@dataclass
class InboundListener:
    """The running inbound listener, and the address it actually bound."""

    server: http1server.Server
    address: Address
    shutdown_timeout_s: float

    async def close(self) -> None:
        """Stop accepting; requests under way get `shutdown_timeout_s` to finish."""
        await self.server.close(self.shutdown_timeout_s)


async def listen_inbound(
    inbound: Inbound,
    address: Address,
    *,
    idle_timeout_s: float,
    shutdown_timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> InboundListener:
    """Start taking webhooks on `address`; `idle_timeout_s` bounds keep-alive and heads."""
    server = http1server.Server(inbound, inbound.refused, idle_timeout_s=idle_timeout_s)
    host, port = await server.start(address.host, address.port, ssl_context)
    return InboundListener(server, Address(host, port), shutdown_timeout_s)


@dataclass
class Listener:
    """A running listener (the admin one): its runner, and the address it actually bound."""

    runner: web.ServerRunner
    address: Address


async def listen(
    handler: Callable[[web.BaseRequest], Any],
    address: Address,
    *,
    idle_timeout_s: float,
    shutdown_timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Listener:
    """Start serving `handler` on `address`; `idle_timeout_s` bounds keep-alive and headers."""
    server = web.Server(
        handler,
        handler_cancellation=False,  # a client that goes away cannot abort a journal write
        keepalive_timeout=idle_timeout_s,  # also closes connections that never finish headers
        access_log=None,
        max_headers=MAX_HEADERS,
        max_field_size=MAX_FIELD_BYTES,
        auto_decompress=False,  # the journal keeps the body exactly as it was sent
        lingering_time=LINGER_S,  # after a 408/413, drain the unread body this long, then close
        logger=_ADMIN_ERRORS,
    )
    runner = web.ServerRunner(server, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(
        runner,
        address.host,
        address.port,
        ssl_context=ssl_context,
        backlog=1024,
        reuse_address=True,
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return Listener(runner, Address(host, port))


class _RefusedOnAdmin(logging.Handler):
    """aiohttp's reports on the admin listener as one line each: a request it could not
    parse (a bad head, framing or method) as `admin.rejected` with the reason (without the
    bytes it quotes), instead of its "Error handling request" traceback on stderr; any
    other error (a bug behind a 500) as `admin.internal_error` with its traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if not isinstance(error, HttpProcessingError):
            log.error("admin.internal_error", remote=remote, exc_info=record.exc_info or False)
            return
        lines = [line.strip() for line in str(error.message or error).splitlines()]
        reason = _QUOTED_BYTES.split(next((line for line in lines if line), repr(error)))[0]
        log.info("admin.rejected", remote=remote, reason=reason)


_QUOTED_BYTES = re.compile(r":? (?:bytearray\()?b['\"]")  # where aiohttp quotes the request


_ADMIN_ERRORS = logging.getLogger("relay.admin.http")
_ADMIN_ERRORS.addHandler(_RefusedOnAdmin())
_ADMIN_ERRORS.propagate = False  # never to the root logger (or Python's last-resort stderr)
_ADMIN_ERRORS.setLevel(logging.DEBUG)


def make_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
