"""Rules: the event document and the JMESPath expressions evaluated on it.

This module owns what a route sees of a webhook (SPEC §2.2): it builds the
event document from the raw request parts (headers lower-cased with `-` as
`_`, the body parsed by content type), compiles JMESPath expressions once at
config load (a compile error carries the expression and a caret under the
fault), and decides which routes of a source match an event. It is pure: no
network, no SQL, no clock.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jmespath
import jmespath.exceptions
import jmespath.functions
import orjson

if TYPE_CHECKING:
    from relay.model import RouteConfig


class RuleError(ValueError):
    """An expression that does not compile; str() is the message, then the caret lines."""


class BodyError(ValueError):
    """A body declared as JSON that does not parse; str() is a one-line reason."""


class RelayFunctions(jmespath.functions.Functions):
    """relay's additions to JMESPath: lower, upper, matches (regex search) and format."""

    @jmespath.functions.signature({"types": ["string"]})
    def _func_lower(self, text: str) -> str:
        return text.lower()

    @jmespath.functions.signature({"types": ["string"]})
    def _func_upper(self, text: str) -> str:
        return text.upper()

    @jmespath.functions.signature({"types": ["string"]}, {"types": ["string"]})
    def _func_matches(self, text: str, pattern: str) -> bool:
        return _regex(pattern).search(text) is not None

    @jmespath.functions.signature({"types": ["string"]}, {"types": [], "variadic": True})
    def _func_format(self, template: str, *args: Any) -> str:
        parts = template.split("{}")
        if len(parts) - 1 != len(args):
            raise ValueError(f"format: {len(parts) - 1} placeholders but {len(args)} arguments")
        out = [parts[0]]
        for arg, part in zip(args, parts[1:], strict=True):
            out.append(arg if isinstance(arg, str) else orjson.dumps(arg).decode())
            out.append(part)
        return "".join(out)


_REGEX_CACHE: dict[str, re.Pattern[str]] = {}


def _regex(pattern: str) -> re.Pattern[str]:
    compiled = _REGEX_CACHE.get(pattern)
    if compiled is None:
        compiled = _REGEX_CACHE[pattern] = re.compile(pattern)
    return compiled


OPTIONS = jmespath.Options(custom_functions=RelayFunctions())


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled JMESPath expression and the text it came from."""

    text: str
    compiled: Any = field(compare=False, repr=False)

    def search(self, document: Mapping[str, Any]) -> Any:
        return self.compiled.search(document, options=OPTIONS)


def compile_expression(text: str) -> Expression:
    """Compile `text`, or raise RuleError showing the expression and a caret under the fault."""
    try:
        return Expression(text, jmespath.compile(text))
    except jmespath.exceptions.ParseError as error:
        position = error.lex_position if isinstance(error.lex_position, int) else 0
        reason = getattr(error, "msg", None) or str(error).splitlines()[0]
        caret = " " * max(position, 0) + "^"
        raise RuleError(f"invalid expression: {reason}\n  {text}\n  {caret}") from None
    except jmespath.exceptions.JMESPathError as error:
        raise RuleError(f"invalid expression: {error}\n  {text}\n  ^") from None


def is_truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, "" , [] and {} are false; everything else true."""
    return not (value is None or value is False or value in ("", [], {}))


@dataclass(frozen=True, slots=True)
class RouteDecision:
    name: str
    matched: bool
    error: str | None


def decide_routes(
    routes: Iterable[RouteConfig], document: Mapping[str, Any]
) -> list[RouteDecision]:
    """Evaluate each route's filter; a route without a filter matches every event."""
    decisions = []
    for route in routes:
        if route.filter is None:
            decisions.append(RouteDecision(route.name, True, None))
            continue
        try:
            matched = is_truthy(route.filter.search(document))
        except Exception as error:  # noqa: BLE001 - any failure in a filter is "no match"
            decisions.append(RouteDecision(route.name, False, f"{type(error).__name__}: {error}"))
            continue
        decisions.append(RouteDecision(route.name, matched, None))
    return decisions


def header_key(name: str) -> str:
    """`X-GitHub-Event` -> `x_github_event`."""
    return name.lower().replace("-", "_")


def normalize_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header pairs as the document's `headers`: keys via header_key, repeats joined by ", "."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = header_key(name)
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json_type(content_type: str) -> bool:
    kind = media_type(content_type)
    return kind == "application/json" or kind.endswith("+json")


def parse_body(content_type: str, body: bytes) -> Any:
    """The document's `body`: JSON, form fields as an object, else text. Raises BodyError."""
    kind = media_type(content_type)
    if is_json_type(content_type):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise BodyError(f"body is not valid JSON: {error}") from None
    text = body.decode("utf-8", errors="replace")
    if kind == "application/x-www-form-urlencoded":
        fields: dict[str, Any] = {}
        for key, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
            present = fields.get(key)
            if present is None:
                fields[key] = value
            elif isinstance(present, list):
                present.append(value)
            else:
                fields[key] = [present, value]
        return fields
    return text


def event_document(
    *,
    event_id: str,
    source: str,
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: Any,
    received_at: str,
) -> dict[str, Any]:
    """The input of every rule (SPEC §2.2)."""
    return {
        "source": source,
        "method": method,
        "path": path,
        "query": dict(query),
        "headers": dict(headers),
        "body": body,
        "received_at": received_at,
        "id": event_id,
    }
