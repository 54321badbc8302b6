"""Dry run: what relay would do with a payload, computed without sending anything.

This module owns `relay test` (SPEC §1): given a config, a source and a
request (body and headers), it builds the event document exactly as ingress
does, decides the routes with the same code, and builds every request the
deliveries would send on their first attempt with the same code as the
delivery lanes (`relay.outbound`). It is pure: no network, no journal, no
clock (the arrival time is an argument).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay import ids
from relay.model import Config
from relay.outbound import StoredRequest, TransformError, build_request
from relay.rules import RouteDecision, RouteSet, is_slack_challenge, request_document


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One delivery's first request, or the error that would make it dead."""

    route: str
    target: str
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    error: str | None


@dataclass(frozen=True, slots=True)
class DryRun:
    source: str
    event_id: str
    decisions: list[RouteDecision]
    requests: list[PlannedRequest]
    handshake: str | None = None  # the provider whose handshake the daemon would answer


def dry_run(
    config: Config,
    source_name: str,
    body: bytes,
    headers: Sequence[tuple[str, str]],
    received_at_ms: int,
) -> DryRun:
    """Route `body` as if it had arrived at `source_name`. Raises BodyError as ingress would."""
    source = config.sources[source_name]
    event_id = ids.event_id(received_at_ms)
    method = source.methods[0]
    document = request_document(
        event_id=event_id,
        source=source.name,
        method=method,
        path=source.path,
        query="",
        headers=headers,
        body=body,
        received_at_ms=received_at_ms,
        max_body_bytes=source.max_body_bytes,
    )
    if source.challenge == "slack" and is_slack_challenge(document):
        return DryRun(source.name, event_id, [], [], handshake="slack")
    route_set = RouteSet(config.routes_of(source_name))
    decisions = route_set.decide(document)
    requests = []
    for route, decision in zip(route_set.routes, decisions, strict=True):
        if not decision.matched:
            continue
        for target_name in route.targets:
            target = config.targets[target_name]
            stored = StoredRequest(
                delivery_id=ids.delivery_id(received_at_ms),
                event_id=event_id,
                source=source.name,
                method=method,
                path=source.path,
                query="",
                headers=headers,
                body=body,
                received_at_ms=received_at_ms,
            )
            try:
                built = build_request(
                    target=target,
                    route=route,
                    source=source,
                    request=stored,
                    attempt=1,
                    now_s=received_at_ms / 1000,
                )
            except TransformError as error:
                requests.append(
                    PlannedRequest(
                        route.name, target.name, target.method, target.url, [], b"", str(error)
                    )
                )
                continue
            requests.append(
                PlannedRequest(
                    route.name,
                    target.name,
                    built.method,
                    built.url,
                    list(built.headers.items()),
                    built.body,
                    None,
                )
            )
    return DryRun(source.name, event_id, decisions, requests)
