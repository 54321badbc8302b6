"""Outbound requests: exactly what a delivery attempt sends, as plain values.

This module owns the shape of the request a target receives (SPEC §4, §2.2):
the method and URL, the original body or the route's transform of it, and the
headers — the original ones minus hop-by-hop, `Host` and `Content-Length`
(and minus the source's signature headers when the body was transformed),
then the target's `headers`, the route's `drop_headers` and `set_headers`,
and relay's own (`webhook-id`, `X-Relay-*`). It is pure: the delivery lanes
send what it builds, and `relay test` prints it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from multidict import CIMultiDict

from relay.model import RouteConfig, SourceConfig, TargetConfig, VerifyConfig
from relay.rules import BodyError, request_document
from relay.signing import sign
from relay.text import json_bytes, storable

# Headers that frame a request on its connection: the HTTP client writes its own, so a
# config may not set them (relay.config) and the client never takes them from a caller.
FRAMING_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "upgrade", "keep-alive", "te",
     "trailer"}
)  # fmt: skip
HOP_BY_HOP = FRAMING_HEADERS | {
    "proxy-authenticate", "proxy-authorization", "proxy-connection", "trailers", "host",
    "expect",
}  # fmt: skip

DECODE_LIMIT_BYTES = 64 * 1024 * 1024  # for a transform whose source was removed from the config
_SCHEME_HEADERS = {
    "github": ("x-hub-signature-256", "x-hub-signature"),
    "stripe": ("stripe-signature",),
    "slack": ("x-slack-signature", "x-slack-request-timestamp"),
    "shopify": ("x-shopify-hmac-sha256",),
    "standard": ("webhook-signature", "webhook-timestamp"),
    "basic": ("authorization",),
}


def signature_headers(verify: VerifyConfig | None) -> frozenset[str]:
    """The (lower-case) headers that carry the source's signature or credential."""
    if verify is None:
        return frozenset()
    if verify.scheme in ("hmac", "token"):
        return frozenset({verify.header.lower()})
    return frozenset(_SCHEME_HEADERS.get(verify.scheme, ()))


class TransformError(Exception):
    """The route's transform raised; str() is the reason the delivery is dead."""


@dataclass(slots=True)
class StoredRequest:
    """The inbound request as the journal keeps it, and the delivery it is sent for."""

    delivery_id: str
    event_id: str
    source: str
    method: str
    path: str
    query: str
    headers: Sequence[tuple[str, str]]
    body: bytes
    received_at_ms: int


@dataclass(slots=True)
class OutboundRequest:
    method: str
    url: str
    headers: CIMultiDict[str]
    body: bytes
    transformed: bool


def _without(pairs: Iterable[tuple[str, str]], drop: frozenset[str]) -> CIMultiDict[str]:
    """The pairs without `drop` and without the headers a Connection header names."""
    named = [(name.lower(), name, value) for name, value in pairs]
    gone: frozenset[str] = drop
    for lower, _, value in named:
        if lower == "connection":
            gone = gone | {token.strip().lower() for token in value.split(",")}
    return CIMultiDict([(name, value) for lower, name, value in named if lower not in gone])


def transform_body(
    route: RouteConfig, source: SourceConfig | None, request: StoredRequest
) -> bytes | None:
    """The transform's output as JSON, or None when the route has no transform."""
    if route.transform is None:
        return None
    try:
        document = request_document(
            event_id=request.event_id,
            source=request.source,
            method=request.method,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=request.body,
            received_at_ms=request.received_at_ms,
            max_body_bytes=source.max_body_bytes if source else DECODE_LIMIT_BYTES,
        )
        return json_bytes(route.transform.search(document))
    except BodyError as error:
        raise TransformError(storable(f"transform input: {error}")) from None
    except Exception as error:  # noqa: BLE001 - whatever a transform raises kills the delivery
        raise TransformError(
            storable(f"transform failed: {type(error).__name__}: {error}")
        ) from None


def build_request(
    *,
    target: TargetConfig,
    route: RouteConfig | None,
    source: SourceConfig | None,
    request: StoredRequest,
    attempt: int,
    now_s: float,
) -> OutboundRequest:
    """The request of one attempt at `now_s` (signatures carry it).

    Raises TransformError when the route's transform fails.
    """
    new_body = transform_body(route, source, request) if route is not None else None
    drop = HOP_BY_HOP
    if new_body is not None:
        verify = source.verify if source else None
        drop = drop | signature_headers(verify) | {"content-type", "content-encoding"}
    headers = _without(request.headers, drop)
    if new_body is not None:
        headers["Content-Type"] = "application/json"
    for name, value in target.headers.items():
        headers[name] = value
    if route is not None:
        for name in route.drop_headers:
            headers.popall(name, None)
        for name, value in route.set_headers.items():
            headers[name] = value
    headers["webhook-id"] = request.delivery_id
    headers["X-Relay-Event-Id"] = request.event_id
    headers["X-Relay-Source"] = request.source
    headers["X-Relay-Attempt"] = str(attempt)
    body = request.body if new_body is None else new_body
    if target.sign is not None:
        headers.update(sign(target.sign, request.delivery_id, body, now_s))
    return OutboundRequest(
        method=target.method,
        url=target.url,
        headers=headers,
        body=body,
        transformed=new_body is not None,
    )
