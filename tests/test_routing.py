"""Route evaluation and the document builder, on the real GitHub corpus (pure, no loop)."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import jmespath
import pytest

from relay.model import RouteConfig
from relay.rules import (
    OPTIONS,
    BodyError,
    RouteSet,
    compile_expression,
    decide_routes,
    dispatch_key,
    is_truthy,
    request_document,
)

from conftest import CORPUS

INDEX = json.loads((CORPUS / "index.json").read_text())

# Every filter expression these tests use: dispatchable shapes and others, some that raise.
FILTERS = [
    "headers.x_github_event == 'push'",
    "'issues' == headers.x_github_event",
    "headers.x_github_event == 'pull_request' && body.action == 'closed'",
    "headers.x_github_event == 'pull_request' && body.pull_request.merged",
    "headers.x_github_event == 'issues' && body.action == 'opened' && body.issue.number > `0`",
    "body.action == 'created'",
    "body.action == 'created' || body.action == 'deleted'",
    "contains(['push', 'create'], headers.x_github_event)",
    "matches(body.ref, '^refs/tags/')",
    "lower(headers.x_github_event) == 'release'",
    "body.repository.stargazers_count > `0`",
    "headers.x_github_event == 'push' && length(body.commits) > `0`",
    "headers.x_github_event == 'label' && starts_with(body.label.name, 'bug')",
    "body.sender.login == 'Codertocat' && headers.x_github_event != 'ping'",
    "headers.missing == 'x'",
    "body.action",
    "body.zen",
    "format('{}:{}', headers.x_github_event, body.action) == 'issues:edited'",
]


def github_document(entry: dict[str, Any]) -> dict[str, Any]:
    body = (CORPUS / entry["file"]).read_bytes()
    return request_document(
        event_id="evt_01TEST", source="github", method="POST", path="/hooks/github", query="",
        headers=[("Content-Type", "application/json"), ("X-GitHub-Event", entry["event"])],
        body=body, received_at_ms=1_764_355_200_000, max_body_bytes=1 << 25,
    )  # fmt: skip


def route(name: str, filter_text: str | None) -> RouteConfig:
    return RouteConfig(
        name=name, source="github",
        filter=compile_expression(filter_text) if filter_text else None,
        transform=None, set_headers={}, drop_headers=(), targets=("t",),
    )  # fmt: skip


ROUTES = [route(f"r{n}", text) for n, text in enumerate(FILTERS)] + [route("all", None)]
DOCUMENTS = [github_document(entry) for entry in INDEX]


def test_fast_evaluation_agrees_with_plain_jmespath_on_the_whole_corpus() -> None:
    """The dispatch table decides exactly as evaluating every filter one by one would."""
    route_set = RouteSet(ROUTES)
    for document in DOCUMENTS:
        assert route_set.decide(document) == decide_routes(ROUTES, document)
        for decision, text in zip(route_set.decide(document), FILTERS, strict=False):
            try:
                expected = is_truthy(jmespath.search(text, document, options=OPTIONS))
            except jmespath.exceptions.JMESPathError:
                expected = False
            assert decision.matched is expected, (text, document["headers"])


def test_one_route_per_event_type_matches_exactly_one_route() -> None:
    """With a route per X-GitHub-Event, each corpus payload fires exactly its own route."""
    events = sorted({entry["event"] for entry in INDEX})
    routes = [route(event, f"headers.x_github_event == '{event}'") for event in events]
    route_set = RouteSet(routes)
    for entry, document in zip(INDEX, DOCUMENTS, strict=True):
        matched = [d.name for d in route_set.decide(document) if d.matched]
        assert matched == [entry["event"]]


def test_a_filter_that_raises_on_some_payloads_is_recorded_per_event() -> None:
    """A filter erroring on some payloads is no match there, with the error; others still fire."""
    flaky = route("flaky", "headers.x_github_event == 'push' && length(body.commits[0].id) > `0`")
    route_set = RouteSet([flaky, route("all", None)])
    push = next(d for d in DOCUMENTS if d["headers"]["x_github_event"] == "push")
    push_with_commit = {**push, "body": {**push["body"], "commits": [{"id": "abc"}]}}
    push_without_id = {**push, "body": {**push["body"], "commits": [{"id": 5}]}}
    assert route_set.decide(push_with_commit)[0].matched is True
    errored = route_set.decide(push_without_id)
    assert errored[0].matched is False
    assert errored[0].error is not None
    assert "length()" in errored[0].error
    assert errored[1].matched is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("headers.x == 'a'", (("headers", "x"), "a", False)),
        ("'a' == headers.x", (("headers", "x"), "a", False)),
        ("headers.x == 'a' && body.y", (("headers", "x"), "a", True)),
        ("headers.x == 'a' && body.y && body.z", (("headers", "x"), "a", True)),
        ("body.y && headers.x == 'a'", None),  # the leftmost test may raise: not reordered
        ("headers.x == `1`", None),  # only string literals (1 and true must not collide)
        ("headers.x != 'a'", None),
        ("headers.x == 'a' || body.y", None),
        ("headers[0] == 'a'", None),
    ],
)
def test_dispatch_key_takes_only_the_safe_shapes(text: str, expected: Any) -> None:
    """Only a leading `path == 'string'` is indexed; anything else is evaluated as written."""
    found = dispatch_key(jmespath.compile(text).parsed)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        assert (found[0], found[1], found[2] is not None) == expected


def _document(content_type: str, body: bytes, encoding: str = "") -> dict[str, Any]:
    headers = [("Content-Type", content_type)]
    if encoding:
        headers.append(("Content-Encoding", encoding))
    return request_document(
        event_id="evt_1", source="s", method="POST", path="/p", query="a=1&b=2&a=3",
        headers=headers, body=body, received_at_ms=1_764_355_200_123, max_body_bytes=4096,
    )  # fmt: skip


def test_document_has_every_field_of_the_spec() -> None:
    """The document carries source, method, path, query, headers, body, received_at and id."""
    document = _document("application/json", b'{"k": "v"}')
    assert document == {
        "source": "s", "method": "POST", "path": "/p", "query": {"a": "3", "b": "2"},
        "headers": {"content_type": "application/json"}, "body": {"k": "v"},
        "received_at": "2025-11-28T18:40:00.123Z", "id": "evt_1",
    }  # fmt: skip


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_are_parsed_decompressed(encoding: str) -> None:
    """A gzip or deflate body is decompressed for the rules."""
    raw = b'{"compressed": true}'
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    assert _document("application/json", packed, encoding)["body"] == {"compressed": True}


def test_compression_bomb_is_a_413_and_unknown_encoding_a_415() -> None:
    """A body that inflates past max_body is refused, as is an encoding relay cannot read."""
    bomb = gzip.compress(b"0" * 100_000)
    with pytest.raises(BodyError) as raised:
        _document("text/plain", bomb, "gzip")
    assert raised.value.status == 413
    with pytest.raises(BodyError) as raised:
        _document("text/plain", b"x", "br")
    assert raised.value.status == 415
    with pytest.raises(BodyError) as raised:
        _document("text/plain", b"not gzip", "gzip")
    assert raised.value.status == 400


def test_repeated_headers_are_joined_and_odd_bytes_replaced() -> None:
    """Repeated headers join with ', '; invalid UTF-8 in a text body becomes U+FFFD."""
    document = request_document(
        event_id="e", source="s", method="POST", path="/p", query="",
        headers=[("X-Tag", "a"), ("x-tag", "b"), ("Content-Type", "text/plain; charset=latin-1")],
        body=b"caf\xe9", received_at_ms=0, max_body_bytes=100,
    )  # fmt: skip
    assert document["headers"]["x_tag"] == "a, b"
    assert document["body"] == "caf\ufffd"


def test_route_records_are_the_decisions_as_the_journal_keeps_them() -> None:
    """`records` gives one {"name", "matched", "error"} per route, in route order, equal
    to the decisions on every corpus payload: matched, not matched and erroring alike."""
    route_set = RouteSet(ROUTES)
    for document in DOCUMENTS:
        decisions = route_set.decide(document)
        assert route_set.records(decisions) == [
            {"name": d.name, "matched": d.matched, "error": d.error} for d in decisions
        ]
