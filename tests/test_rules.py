"""Rules (SPEC §2.2): the event document, JMESPath compilation and route matching."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from relay import rules
from relay.model import RouteConfig
from relay.rules import (
    BodyError,
    RuleError,
    compile_expression,
    decide_routes,
    event_document,
    header_key,
    is_truthy,
    normalize_headers,
    parse_body,
)
from relay.text import json_bytes

from conftest import CORPUS


def route(name: str, filter_text: str | None) -> RouteConfig:
    return RouteConfig(
        name=name,
        source="github",
        filter=None if filter_text is None else compile_expression(filter_text),
        transform=None,
        set_headers={},
        drop_headers=(),
        targets=("ci",),
    )


def github_document(event: str, payload_file: str) -> dict[str, Any]:
    raw = (CORPUS / payload_file).read_bytes()
    headers = normalize_headers(
        [
            ("Content-Type", "application/json"),
            ("X-GitHub-Event", event),
            ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ("User-Agent", "GitHub-Hookshot/044aadd"),
        ]
    )
    return event_document(
        event_id="evt_01JDTX0000000000000000000A",
        source="github",
        method="POST",
        path="/hooks/github",
        query={},
        headers=headers,
        body=parse_body(headers["content_type"], raw),
        received_at="2026-11-28T19:00:00.123Z",
    )


# --- compile_expression ------------------------------------------------------


def test_valid_expression_compiles_and_keeps_its_text() -> None:
    """A valid filter compiles once and evaluates against a document."""
    expression = compile_expression("headers.x_github_event == 'push'")
    assert expression.text == "headers.x_github_event == 'push'"
    assert expression.search({"headers": {"x_github_event": "push"}}) is True
    assert expression.search({"headers": {"x_github_event": "ping"}}) is False


@pytest.mark.parametrize(
    ("text", "caret_column"),
    [
        ("headers.x_github_event = 'push'", 23),  # single '=' is not an operator
        ("foo bar", 4),
        ("a.[", 3),
        ("headers.x ==", 12),  # incomplete: caret just past the end
    ],
)
def test_compile_error_shows_expression_with_caret_under_fault(
    text: str, caret_column: int
) -> None:
    """A bad expression fails at load with a message, the expression, and a caret under the
    fault."""
    with pytest.raises(RuleError) as raised:
        compile_expression(text)
    lines = str(raised.value).split("\n")
    assert len(lines) == 3
    assert lines[0].startswith("invalid expression: ")
    assert len(lines[0]) > len("invalid expression: ")
    assert lines[1] == "  " + text
    assert lines[2] == "  " + " " * caret_column + "^"


def test_compile_error_for_unexpected_token_names_the_token() -> None:
    """The message line says what was wrong, e.g. the unexpected token."""
    with pytest.raises(RuleError, match=r"^invalid expression: Unexpected token: bar\n"):
        compile_expression("foo bar")


def test_empty_expression_is_a_rule_error() -> None:
    """An empty expression is rejected at load, not at the first event."""
    with pytest.raises(RuleError) as raised:
        compile_expression("")
    assert str(raised.value).splitlines()[0].startswith("invalid expression: ")
    assert str(raised.value).endswith("\n  \n  ^")


def test_rule_error_is_a_value_error() -> None:
    """Config loading can treat a RuleError like any other invalid value."""
    with pytest.raises(ValueError, match="invalid expression"):
        compile_expression("a.[")


# --- is_truthy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "truthy"),
    [
        (None, False),
        (False, False),
        ("", False),
        ([], False),
        ({}, False),
        (True, True),
        (0, True),  # JMESPath, unlike Python: zero is true
        (0.0, True),
        ("false", True),
        (" ", True),
        ([None], True),
        ([False], True),
        ({"a": None}, True),
        (1, True),
        ("push", True),
    ],
)
def test_truthiness_follows_jmespath(value: Any, truthy: bool) -> None:
    """A filter matches unless its result is false, null, or an empty string/list/object."""
    assert is_truthy(value) is truthy


# --- decide_routes -----------------------------------------------------------


def test_push_payload_matches_push_filter_and_not_others() -> None:
    """A real GitHub push reaches the route filtering on x_github_event == 'push' only."""
    document = github_document("push", "push.json")
    routes = [
        route("pushes", "headers.x_github_event == 'push'"),
        route("pull-requests", "headers.x_github_event == 'pull_request'"),
    ]
    decisions = decide_routes(routes, document)
    assert [(d.name, d.matched, d.error) for d in decisions] == [
        ("pushes", True, None),
        ("pull-requests", False, None),
    ]


def test_filter_can_read_the_real_payload_body() -> None:
    """Filters see the parsed body: the corpus push deletes a tag, pushed by Codertocat."""
    document = github_document("push", "push.json")
    routes = [
        route("tags", "starts_with(body.ref, 'refs/tags/')"),
        route("main", "body.ref == 'refs/heads/main'"),
        route(
            "deleted", "body.deleted && body.after == '0000000000000000000000000000000000000000'"
        ),
        route("by-sender", "body.sender.login == 'Codertocat'"),
        route("repo", "body.repository.full_name == 'Codertocat/Hello-World'"),
    ]
    matched = {d.name: d.matched for d in decide_routes(routes, document)}
    assert matched == {
        "tags": True,
        "main": False,
        "deleted": True,
        "by-sender": True,
        "repo": True,
    }


def test_filter_on_event_and_action_of_a_real_pull_request() -> None:
    """Routing on event and `.action` works on a real pull_request.closed payload."""
    document = github_document("pull_request", "pull_request.closed.json")
    routes = [
        route("closed", "headers.x_github_event == 'pull_request' && body.action == 'closed'"),
        route("merged", "body.pull_request.merged"),
        route("opened", "body.action == 'opened'"),
    ]
    matched = {d.name: d.matched for d in decide_routes(routes, document)}
    assert matched == {"closed": True, "merged": False, "opened": False}


def test_route_without_filter_matches_every_event() -> None:
    """A route with no filter fires for every event of its source."""
    document = github_document("ping", "ping.json")
    decisions = decide_routes([route("everything", None)], document)
    assert [(d.name, d.matched, d.error) for d in decisions] == [("everything", True, None)]


def test_every_matching_route_fires() -> None:
    """Fan out: all matching routes match, in config order, non-matching ones do not."""
    document = github_document("push", "push.json")
    routes = [
        route("a", "headers.x_github_event == 'push'"),
        route("b", None),
        route("c", "body.deleted"),
        route("d", "body.created"),
    ]
    decisions = decide_routes(routes, document)
    assert [(d.name, d.matched) for d in decisions] == [
        ("a", True),
        ("b", True),
        ("c", True),
        ("d", False),
    ]


def test_filter_on_missing_field_is_no_match_not_an_error() -> None:
    """A filter reading a field the payload lacks is simply no match (null), with no error."""
    document = github_document("push", "push.json")
    (decision,) = decide_routes([route("labels", "body.label.name")], document)
    assert (decision.matched, decision.error) == (False, None)


def test_filter_returning_zero_matches() -> None:
    """A filter whose result is 0 matches: JMESPath truthiness, not Python's."""
    document = github_document("push", "push.json")
    assert document["body"]["commits"] == []
    (decision,) = decide_routes([route("count", "length(body.commits)")], document)
    assert (decision.matched, decision.error) == (True, None)


def test_filter_that_raises_counts_as_no_match_and_records_why() -> None:
    """A type error in a filter function is no match for that route; the error is recorded
    and other routes are still decided."""
    document = github_document("push", "push.json")
    routes = [
        route("broken", "length(body.forced) > `0`"),  # length() of a boolean
        route("pushes", "headers.x_github_event == 'push'"),
    ]
    broken, pushes = decide_routes(routes, document)
    assert broken.name == "broken"
    assert broken.matched is False
    assert broken.error is not None
    assert broken.error.startswith("JMESPathTypeError: ")
    assert "length()" in broken.error
    assert (pushes.name, pushes.matched, pushes.error) == ("pushes", True, None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "lowr(headers.x_github_event) == 'push'",
            'unknown function lowr() (did you mean "lower"?)',
        ),
        ("matches(body.a)", "matches() takes 2 arguments, got 1"),
        ("length(body.a, body.b)", "length() takes 1 arguments, got 2"),
        ("body.a == 'x' && matches(body.a, '(')", "matches(): bad pattern '(': missing ), "),
        ("matches(body.s, body.p)", "matches(): the pattern must be a literal string, like 'ab+c'"),
        ("{t: not_null(body.a, format())}", "format() takes at least 1 arguments, got 0"),
    ],
)
def test_calls_that_could_never_run_are_compile_errors(text: str, problem: str) -> None:
    """An unknown function, a wrong number of arguments or a regex that does not compile is
    refused when the config loads (jmespath finds them only when an event runs them, so
    every event was "no match" and every transformed delivery dead); so is a `matches`
    pattern taken from the event, which a sender could make backtrack for ever."""
    with pytest.raises(RuleError) as raised:
        compile_expression(text)
    assert str(raised.value).startswith(f"invalid expression: {problem}")


@pytest.mark.parametrize(
    ("text", "caret_under"),
    [
        ("foo(body)", "foo(body)"),
        ("body.x == 'a' || fooo(body)", "fooo(body)"),
        ("x && matches(body.ref, '[unclosed')", "'[unclosed')"),
        ("matches(body.s, body.p)", "body.p)"),
        ("a[?lower(b) == 'x'].upperr(c)", "upperr(c)"),
        ("format('{}', [a, b], lower(x, y))", "lower(x, y))"),
        ("sort_by(@, &foo(x))", "foo(x))"),
        ("{t: not_null(body.a, format())}", "format())"),
    ],
)
def test_a_call_that_could_never_run_has_its_caret_under_the_fault(
    text: str, caret_under: str
) -> None:
    """The caret line of a bad call points at the function's name in the expression, or
    at the `matches` pattern that is at fault, not at the start of the expression."""
    with pytest.raises(RuleError) as raised:
        compile_expression(text)
    _, shown, caret = str(raised.value).split("\n")
    assert shown == "  " + text
    assert caret == "  " + " " * text.index(caret_under) + "^"


def test_format_with_no_arguments_is_its_template() -> None:
    """`format(template, args...)` takes zero arguments too; a non-string template is an error."""
    assert compile_expression("format('hello')").search({}) == "hello"
    assert compile_expression("format('{} and {}', a, b)").search({"a": 1, "b": "x"}) == "1 and x"
    with pytest.raises(ValueError, match="the template must be a string"):
        compile_expression("format(`1`)").search({})


@pytest.mark.parametrize(
    ("filter_text", "document"),
    [
        ("lower(headers.x_github_event) == 'push'", {"headers": {"x_github_event": "PUSH"}}),
        ("upper(body.type) == 'PING'", {"body": {"type": "ping"}}),
        ("matches(body.ref, '^refs/heads/release-')", {"body": {"ref": "refs/heads/release-1"}}),
        (
            "format('{}/{}', source, body.type) == 'stripe/x'",
            {"source": "stripe", "body": {"type": "x"}},
        ),
    ],
)
def test_relay_functions_are_available_in_filters(
    filter_text: str, document: dict[str, Any]
) -> None:
    """The four functions relay adds (lower, upper, matches, format) work in a filter."""
    (decision,) = decide_routes([route("custom", filter_text)], document)
    assert (decision.matched, decision.error) == (True, None)


# --- headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("X-GitHub-Event", "x_github_event"),
        ("Content-Type", "content_type"),
        ("X-Hub-Signature-256", "x_hub_signature_256"),
        ("webhook-id", "webhook_id"),
        ("HOST", "host"),
    ],
)
def test_header_key_is_lower_case_with_underscores(name: str, key: str) -> None:
    """Header names become filter-friendly keys: lower-case, `-` as `_`."""
    assert header_key(name) == key


def test_repeated_headers_are_joined_with_comma_space() -> None:
    """Repeated headers (in any case) become one value joined by ", ", in arrival order."""
    headers = normalize_headers(
        [
            ("Accept", "application/json"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("accept", "text/plain"),
            ("x-forwarded-for", "10.0.0.1"),
            ("X-FORWARDED-FOR", "10.0.0.2"),
        ]
    )
    assert headers == {
        "accept": "application/json, text/plain",
        "x_forwarded_for": "203.0.113.7, 10.0.0.1, 10.0.0.2",
    }


def test_names_that_differ_only_by_dash_or_underscore_are_joined() -> None:
    """`X-Team` and `X_Team` make the same key: their values are joined, neither is lost."""
    headers = normalize_headers([("X-Team", "a"), ("Host", "h"), ("X_Team", "b")])
    assert headers == {"x_team": "a, b", "host": "h"}


def test_many_distinct_header_names_do_not_grow_memory_for_good() -> None:
    """The names' keys are remembered between requests, up to a bound in count and size: a
    sender inventing new (or very long) header names cannot make relay keep them all."""
    for batch in range(3 * rules.MAX_HEADER_KEYS // 50):
        pairs = [(f"X-Invented-{batch}-{i}", "v") for i in range(50)]
        pairs.append((f"X-Long-{batch}-" + "a" * 4000, "v"))  # a long name is never kept
        headers = normalize_headers(pairs)
        assert headers[f"x_invented_{batch}_0"] == "v"
        assert headers[f"x_long_{batch}_" + "a" * 4000] == "v"
    assert len(rules._header_keys) <= rules.MAX_HEADER_KEYS
    kept_chars = sum(len(name) + len(key) for name, key in rules._header_keys.items())
    assert kept_chars <= 2 * rules.MAX_HEADER_KEYS * rules.MAX_CACHED_NAME_CHARS


def test_header_values_are_kept_verbatim() -> None:
    """Only names are normalised; values keep their case and characters."""
    headers = normalize_headers([("X-Custom", "Mixed-Case Value; q=1"), ("X-Empty", "")])
    assert headers == {"x_custom": "Mixed-Case Value; q=1", "x_empty": ""}


# --- parse_body --------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/vnd.github+json",
        "application/cloudevents+json; charset=utf-8",
    ],
)
def test_json_content_types_are_parsed_as_json(content_type: str) -> None:
    """JSON bodies (application/json or */*+json, any charset parameter) are parsed."""
    assert parse_body(content_type, b'{"type": "invoice.paid", "n": [1, 2]}') == {
        "type": "invoice.paid",
        "n": [1, 2],
    }


def test_real_github_payload_parses_to_the_same_object_as_json_module() -> None:
    """A real 7 KB push payload parses exactly as the standard JSON reader does."""
    raw = (CORPUS / "push.json").read_bytes()
    assert parse_body("application/json", raw) == json.loads(raw)


def test_json_scalars_and_arrays_are_bodies_too() -> None:
    """A JSON array or null body is kept as such, not rejected."""
    assert parse_body("application/json", b"[1, 2]") == [1, 2]
    assert parse_body("application/json", b"null") is None


def test_empty_json_body_is_null_and_a_bom_is_ignored() -> None:
    """An empty body declared as JSON is a null body, and a UTF-8 byte order mark is skipped."""
    assert parse_body("application/json", b"") is None
    assert parse_body("application/json", b"  \r\n") is None
    assert parse_body("application/json", b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


@pytest.mark.parametrize("raw", [b"{", b'{"a": 1,}', b"not json", b'"\xff"'])
def test_invalid_json_raises_body_error_with_one_line(raw: bytes) -> None:
    """A body declared JSON that does not parse is rejected with a one-line reason."""
    with pytest.raises(BodyError) as raised:
        parse_body("application/json", raw)
    message = str(raised.value)
    assert message.startswith("body is not valid JSON: ")
    assert "\n" not in message


def test_integers_beyond_64_bits_stay_exact_for_filters_and_transforms() -> None:
    """An id of 20+ digits is the same integer to a filter and in a transform's output
    (orjson alone would make it a float: 18446744073709551617 -> 1.8446744073709552e+19)."""
    raw = b'{"id": 18446744073709551617, "low": -9223372036854775809}'
    body = parse_body("application/json", raw)
    assert body == {"id": 18446744073709551617, "low": -9223372036854775809}
    assert compile_expression("id == `18446744073709551617`").search(body) is True
    assert json_bytes(compile_expression("{id: id}").search(body)) == b'{"id":18446744073709551617}'
    digits_in_text = b'{"s": "12345678901234567890", "f": 1.5}'
    assert parse_body("application/json", digits_in_text) == {"s": "12345678901234567890", "f": 1.5}
    deep = b"[" * 1010 + b'"1234567890123456789012"' + b"]" * 1010  # orjson goes to 1024
    value = parse_body("application/json", deep)
    for _ in range(1010):
        (value,) = value
    assert value == "1234567890123456789012"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("headers.x_github_event == 'push'", False),
        ("source == 'gh' && contains(headers.user_agent, 'GitHub')", False),
        ("body.action == 'opened'", True),
        ("length(body.commits[*].id) > `1`", True),
        ("values(@)", True),
        ("*.action", True),
        ("headers.*", True),  # a projection's current node: counted as reading, to be safe
    ],
)
def test_reads_body_tells_which_rules_may_see_the_body(text: str, expected: bool) -> None:
    """Only rules that may see the body make ingress parse its numbers exactly; one that
    reads headers alone leaves the body merely validated (its integers never seen)."""
    assert rules.reads_body(compile_expression(text)) is expected


def test_without_exact_numbers_a_body_is_only_validated() -> None:
    """`exact_numbers=False` (no rule reads the body) keeps orjson's value as is, and
    still refuses what is not JSON."""
    assert parse_body("application/json", b'{"id": 18446744073709551617}', False) == {
        "id": 1.8446744073709552e19
    }
    with pytest.raises(BodyError, match="NaN"):
        parse_body("application/json", b'{"a": NaN}', False)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"a": NaN}', "NaN is not JSON"),
        (b'{"a": Infinity}', "Infinity is not JSON"),
        (b"[-Infinity]", "-Infinity is not JSON"),
        (b'{"a": 1e400}', "number 1e400 is out of range"),
    ],
)
def test_non_json_numbers_are_refused(raw: bytes, reason: str) -> None:
    """NaN and Infinity are not JSON, and a number beyond a double's range would silently
    become null in a transform: each is a 400 naming it, not an accepted event."""
    with pytest.raises(BodyError, match=f"^body is not valid JSON: {reason}$"):
        parse_body("application/json", raw)


def test_form_body_becomes_an_object_with_repeats_as_lists() -> None:
    """Form posts become an object; a repeated key becomes a list of its values in order."""
    raw = b"payload=%7B%22a%22%3A1%7D&tag=a&tag=b&tag=c&empty=&text=hello+world%21"
    assert parse_body("application/x-www-form-urlencoded", raw) == {
        "payload": '{"a":1}',
        "tag": ["a", "b", "c"],
        "empty": "",
        "text": "hello world!",
    }


def test_form_body_with_charset_parameter_and_unicode() -> None:
    """A form content type with a charset parameter is still parsed; UTF-8 escapes decode."""
    body = parse_body("application/x-www-form-urlencoded; charset=utf-8", b"name=J%C3%BCrgen")
    assert body == {"name": "Jürgen"}


def test_repeated_blank_form_values_are_kept_as_a_list() -> None:
    """A key repeated with blank values still becomes a list, not a single value."""
    assert parse_body("application/x-www-form-urlencoded", b"a=&a=&a=x") == {"a": ["", "", "x"]}


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", ""])
def test_other_bodies_are_text(content_type: str) -> None:
    """Anything that is not JSON or a form is the body text."""
    assert parse_body(content_type, b"<ok>caf\xc3\xa9</ok>") == "<ok>café</ok>"


def test_invalid_utf8_in_text_body_is_replaced_not_rejected() -> None:
    """A text body with invalid UTF-8 is accepted; the bad bytes become U+FFFD."""
    assert parse_body("text/plain", b"ok \xff\xfe end") == "ok \ufffd\ufffd end"


# --- event_document ----------------------------------------------------------


def test_event_document_has_exactly_the_documented_fields() -> None:
    """Rules see source, method, path, query, headers, body, received_at and id."""
    document = event_document(
        event_id="evt_01JDTX0000000000000000000A",
        source="stripe",
        method="POST",
        path="/hooks/stripe",
        query={"k": "v"},
        headers={"content_type": "application/json"},
        body={"type": "invoice.paid"},
        received_at="2026-11-28T19:00:00.123Z",
    )
    assert document == {
        "source": "stripe",
        "method": "POST",
        "path": "/hooks/stripe",
        "query": {"k": "v"},
        "headers": {"content_type": "application/json"},
        "body": {"type": "invoice.paid"},
        "received_at": "2026-11-28T19:00:00.123Z",
        "id": "evt_01JDTX0000000000000000000A",
    }


def test_event_document_fields_are_reachable_from_filters() -> None:
    """Filters can use the query string, path, method and id, not just headers and body."""
    document = event_document(
        event_id="evt_01JDTX0000000000000000000A",
        source="generic",
        method="PUT",
        path="/hooks/generic",
        query={"env": "prod"},
        headers={},
        body="plain text",
        received_at="2026-11-28T19:00:00.123Z",
    )
    expression = compile_expression(
        "query.env == 'prod' && method == 'PUT' && path == '/hooks/generic'"
        " && starts_with(id, 'evt_') && body == 'plain text'"
    )
    assert expression.search(document) is True


def test_event_document_does_not_share_query_and_headers_with_the_caller() -> None:
    """Later changes to the request's mappings do not change an event's document."""
    query = {"k": "v"}
    headers = {"x_github_event": "push"}
    document = event_document(
        event_id="evt_01JDTX0000000000000000000A",
        source="github",
        method="POST",
        path="/hooks/github",
        query=query,
        headers=headers,
        body=None,
        received_at="2026-11-28T19:00:00.123Z",
    )
    query["k"] = "changed"
    headers["x_github_event"] = "ping"
    assert document["query"] == {"k": "v"}
    assert document["headers"] == {"x_github_event": "push"}


def test_received_at_is_rfc3339_utc_with_milliseconds_in_any_order() -> None:
    """`received_at` is the arrival time in UTC to the millisecond, whatever order times
    come in (repeats, later, earlier, across seconds): each formatted as the clock says."""
    base_ms = 1_764_374_399_998  # 2025-11-28T23:59:59.998Z
    for ms in [base_ms, base_ms, base_ms + 1, base_ms + 2, base_ms + 2, base_ms - 5, base_ms]:
        expected = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        assert rules.rfc3339_ms(ms) == expected.replace("+00:00", "Z")
    year_one_ms = -62_135_596_800_000  # the earliest `since` a replay takes
    assert rules.rfc3339_ms(year_one_ms + 5) == "0001-01-01T00:00:00.005Z"  # four digits
