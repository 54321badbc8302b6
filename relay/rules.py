"""Rules: the event document and the JMESPath expressions evaluated on it.

This module owns what a route sees of a webhook (SPEC §2.2): it builds the
event document from the raw request parts (headers lower-cased with `-` as
`_`, the body parsed by content type), compiles JMESPath expressions once at
config load (a compile error carries the expression and a caret under the
fault), and decides which routes of a source match an event. It is pure: no
network, no SQL, no clock.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import jmespath
import jmespath.exceptions
import jmespath.functions
import jmespath.lexer
import jmespath.parser
import orjson

from relay.text import json_text, storable

if TYPE_CHECKING:
    from relay.model import RouteConfig, TargetConfig


class RuleError(ValueError):
    """An expression that does not compile; str() is the message, then the caret lines."""


class BodyError(ValueError):
    """A body that cannot be read for the rules; str() is a one-line reason, `status` the 4xx."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


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

    @jmespath.functions.signature({"types": [], "variadic": True})  # template, then 0 or more
    def _func_format(self, template: Any, *args: Any) -> str:
        if not isinstance(template, str):
            raise ValueError(f"format: the template must be a string, got {json_text(template)}")
        parts = template.split("{}")
        if len(parts) - 1 != len(args):
            raise ValueError(f"format: {len(parts) - 1} placeholders but {len(args)} arguments")
        out = [parts[0]]
        for arg, part in zip(args, parts[1:], strict=True):
            out.append(arg if isinstance(arg, str) else json_text(arg))
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
    """Compile `text`, or raise RuleError showing the expression and a caret under the fault.

    Calls are checked here too (jmespath only finds them out when an event runs them):
    known functions with the right number of arguments, and a `matches` pattern that is a
    literal string that compiles (a pattern taken from the event could backtrack for
    ever, and would fill the regex cache). The caret of a bad call is under its name, or
    under the argument at fault."""
    try:
        compiled = jmespath.compile(text)
    except jmespath.exceptions.ParseError as error:
        position = error.lex_position if isinstance(error.lex_position, int) else 0
        reason = getattr(error, "msg", None) or str(error).splitlines()[0]
        raise _rule_error(reason, text, position) from None
    except jmespath.exceptions.JMESPathError as error:
        raise _rule_error(str(error), text, 0) from None
    for call in _calls(text):
        problem = _bad_call(jmespath.compile(text[call.start : call.end]).parsed)
        if problem is not None:
            reason, argument = problem
            position = call.start if argument is None else call.arguments[argument]
            raise _rule_error(reason, text, position)
    return Expression(text, compiled)


def _rule_error(reason: str, text: str, position: int) -> RuleError:
    caret = " " * max(position, 0) + "^"
    return RuleError(f"invalid expression: {reason}\n  {text}\n  {caret}")


@dataclass(frozen=True, slots=True)
class _Call:
    """Where a function call is in an expression's text: `name(` at `start`, the `)`
    just before `end`, each argument's first character at `arguments[i]`."""

    start: int
    end: int
    arguments: tuple[int, ...]


_OPENING: Final = frozenset({"lparen", "lbracket", "lbrace", "filter"})
_CLOSING: Final = frozenset({"rparen", "rbracket", "rbrace"})


def _calls(text: str) -> list[_Call]:
    """The function calls of an expression that parses, in the order of the text."""
    tokens = list(jmespath.lexer.Lexer().tokenize(text))
    return [
        _call_at(tokens, index)
        for index in range(len(tokens) - 1)
        if tokens[index]["type"] == "unquoted_identifier" and tokens[index + 1]["type"] == "lparen"
    ]


def _call_at(tokens: Sequence[Mapping[str, Any]], index: int) -> _Call:
    """The call whose name is `tokens[index]` (its `(` follows it)."""
    depth = 0
    arguments: list[int] = []
    for position in range(index + 1, len(tokens)):
        token = tokens[position]
        kind = token["type"]
        follows = tokens[position - 1]["type"]
        if depth == 1 and kind != "rparen" and follows in ("lparen", "comma"):
            arguments.append(token["start"])  # an argument begins
        depth += (kind in _OPENING) - (kind in _CLOSING)
        if depth == 0:
            break
    return _Call(tokens[index]["start"], token["end"], tuple(arguments))


def _bad_call(node: Mapping[str, Any]) -> tuple[str, int | None] | None:
    """What is wrong with a call (the root of `node`) that cannot run, and the index of
    the argument at fault (None: the call itself)."""
    name, arguments = node["value"], node["children"]
    entry = RelayFunctions.FUNCTION_TABLE.get(name)
    if entry is None:
        known = sorted(RelayFunctions.FUNCTION_TABLE)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        return f"unknown function {name}(){hint}", None
    signature = entry["signature"]
    if signature and signature[-1].get("variadic"):
        if len(arguments) < len(signature):
            return f"{name}() takes at least {len(signature)} arguments, got {len(arguments)}", None
    elif len(arguments) != len(signature):
        return f"{name}() takes {len(signature)} arguments, got {len(arguments)}", None
    if name == "matches":
        pattern = arguments[1]
        if pattern["type"] != "literal" or not isinstance(pattern["value"], str):
            return "matches(): the pattern must be a literal string, like 'ab+c'", 1
        try:
            _regex(pattern["value"])
        except re.error as error:
            return f"matches(): bad pattern {pattern['value']!r}: {error}", 1
    return None


def reads_body(expression: Expression) -> bool:
    """Whether an expression may see the event's body: it names a field `body`, or starts
    from the current node (`@`, a projection's `*`), which may be the whole document."""
    return _may_read_body(expression.compiled.parsed)


def _may_read_body(node: Mapping[str, Any]) -> bool:
    kind = node.get("type")
    if kind in ("current", "identity") or (kind == "field" and node.get("value") == "body"):
        return True
    return any(isinstance(c, Mapping) and _may_read_body(c) for c in node.get("children", ()))


def is_truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, "" , [] and {} are false; everything else true."""
    return not (value is None or value is False or value in ("", [], {}))


@dataclass(slots=True)
class RouteDecision:
    """One route's verdict on one event. RouteSet shares its constant decisions between
    events: never change one in place (not frozen: a frozen init costs ~1 us)."""

    name: str
    matched: bool
    error: str | None
    # The journal's record of a RouteSet's constant decisions, made once (see `records`).
    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)


def decide_routes(
    routes: Iterable[RouteConfig], document: Mapping[str, Any]
) -> list[RouteDecision]:
    """Evaluate each route's filter one by one (the reference for RouteSet.decide)."""
    return [
        RouteDecision(route.name, True, None)
        if route.filter is None
        else _decide_one(route, route.filter.compiled, document)
        for route in routes
    ]


def _decide_one(route: RouteConfig, filter_: Any, document: Mapping[str, Any]) -> RouteDecision:
    try:
        matched = is_truthy(filter_.search(document, options=OPTIONS))
    except Exception as error:  # noqa: BLE001 - any failure in a filter is "no match"
        return RouteDecision(route.name, False, storable(f"{type(error).__name__}: {error}"))
    return RouteDecision(route.name, matched, None)


FieldPath = tuple[str, ...]


def _field_path(node: Mapping[str, Any]) -> FieldPath | None:
    """`headers.x_github_event` as ("headers", "x_github_event"); None for anything else."""
    if node["type"] == "field":
        return (node["value"],)
    if node["type"] == "subexpression":
        parts = [_field_path(child) for child in node["children"]]
        if all(part is not None for part in parts):
            return tuple(name for part in parts if part is not None for name in part)
    return None


def dispatch_key(node: Mapping[str, Any]) -> tuple[FieldPath, str, dict[str, Any] | None] | None:
    """Split a filter AST into (field path, string literal, the rest or None) when it starts
    with `path == 'literal'`; the rest must also be truthy for a match. Only the leftmost
    comparison of an `&&` chain is taken, so short-circuit order (and errors) stay the same.
    """
    if node["type"] == "comparator" and node["value"] == "eq":
        left, right = node["children"]
        for path_node, literal in ((left, right), (right, left)):
            path = _field_path(path_node)
            if path and literal["type"] == "literal" and isinstance(literal["value"], str):
                return path, literal["value"], None
        return None
    if node["type"] == "and_expression":
        left, right = node["children"]
        found = dispatch_key(left)
        if found is not None:
            path, value, rest = found
            both = {"type": "and_expression", "children": [rest, right]}
            return path, value, right if rest is None else both
    return None


def _lookup(document: Mapping[str, Any], path: FieldPath) -> Any:
    value: Any = document
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


class RouteSet:
    """A source's routes, compiled for cheap evaluation of many filters.

    Filters of the common shape `path == 'literal' [&& rest]` go into a dispatch table
    per field path: one dict look-up finds the candidates, and only their `rest` is
    evaluated. Other filters are evaluated one by one. `decide` gives exactly what
    `decide_routes` gives (a test holds it to that on the GitHub corpus).
    """

    def __init__(self, routes: Iterable[RouteConfig]) -> None:
        self.routes = tuple(routes)
        self._no_match = [_constant(r.name, False) for r in self.routes]
        self._match = [_constant(r.name, True) for r in self.routes]
        self._tables: dict[FieldPath, dict[str, list[int]]] = {}
        self._rest: dict[int, Any] = {}
        self._plain: list[int] = []
        for index, route in enumerate(self.routes):
            split = dispatch_key(route.filter.compiled.parsed) if route.filter else None
            if split is None:
                self._plain.append(index)
                continue
            path, value, rest = split
            self._tables.setdefault(path, {}).setdefault(value, []).append(index)
            if rest is not None:
                self._rest[index] = jmespath.parser.ParsedResult("", cast(Any, rest))

    def decide(self, document: Mapping[str, Any]) -> list[RouteDecision]:
        decisions = list(self._no_match)
        for path, table in self._tables.items():
            value = _lookup(document, path)
            for index in table.get(value, ()) if isinstance(value, str) else ():
                rest = self._rest.get(index)
                decisions[index] = (
                    self._match[index]
                    if rest is None
                    else _decide_one(self.routes[index], rest, document)
                )
        for index in self._plain:
            route = self.routes[index]
            decisions[index] = (
                self._match[index]
                if route.filter is None
                else _decide_one(route, route.filter.compiled, document)
            )
        return decisions

    def records(self, decisions: Sequence[RouteDecision]) -> list[dict[str, Any]]:
        """`decide`'s answer as the journal keeps it (`{"name", "matched", "error"}` each).
        The set's constant decisions (a dispatch-table match, a route without filter, no
        match) bring their record along, so the usual event costs no new dict (orjson
        writes dicts ~10x faster than slotted dataclasses). Never changed in place."""
        return [
            decision.record
            or {"name": decision.name, "matched": decision.matched, "error": decision.error}
            for decision in decisions
        ]


def _constant(name: str, matched: bool) -> RouteDecision:
    """A decision without an error, with its record: RouteSet shares one of each per route."""
    return RouteDecision(name, matched, None, {"name": name, "matched": matched, "error": None})


def order_key(target: TargetConfig, document: Mapping[str, Any]) -> str | None:
    """The FIFO group of a delivery to `target`: "" for `ordered`, the `order_key` value
    (as JSON unless a string; null when it cannot be computed), or None when unordered."""
    if target.ordered:
        return ""
    if target.order_key is None:
        return None
    try:
        value = target.order_key.search(document)
    except Exception:  # noqa: BLE001 - a key that cannot be computed is the null group
        value = None
    return storable(value) if isinstance(value, str) else json_text(value)


def is_slack_challenge(document: Mapping[str, Any]) -> bool:
    """Slack's url_verification handshake: answered with its challenge, never journaled."""
    body = document.get("body")
    return (
        isinstance(body, dict)
        and body.get("type") == "url_verification"
        and isinstance(body.get("challenge"), str)
    )


def header_key(name: str) -> str:
    """`X-GitHub-Event` -> `x_github_event`."""
    return name.lower().replace("-", "_")


_header_keys: dict[str, str] = {}  # header_key of the names seen: they repeat every request
MAX_HEADER_KEYS = 4096  # forgotten all at once beyond this: a sender cannot grow it for good
MAX_CACHED_NAME_CHARS = 64  # longer names are keyed every time (at most ~0.5 MiB kept)


def _cached_header_key(name: str) -> str:
    key = header_key(name)
    if len(name) <= MAX_CACHED_NAME_CHARS:
        if len(_header_keys) >= MAX_HEADER_KEYS:
            _header_keys.clear()
        _header_keys[name] = key
    return key


def normalize_headers(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Header pairs as the document's `headers`: keys via header_key, repeats joined by ", "."""
    keys = _header_keys
    headers = {keys.get(name) or _cached_header_key(name): value for name, value in pairs}
    if len(headers) == len(pairs):  # the usual case: no header twice
        return headers
    headers.clear()
    for name, value in pairs:
        key = header_key(name)
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json_type(content_type: str) -> bool:
    kind = media_type(content_type)
    return kind == "application/json" or kind.endswith("+json")


# The integers orjson turns into floats: from 2**64 up (20 digits or more) and below
# -2**63 (a minus and 19 digits or more). Found by mapping every digit to "0", "-" to
# itself, the bytes a number can follow (":", ",", "[", blanks) to "|" and everything
# else to " ", then looking for "|" and such a run: one C pass, ~0.5 us per KiB (a regex
# took 8 us per KiB). A run inside a string after a blank counts too, and merely takes
# the exact parser, with the same result; one after a letter or a quote (a hex digest of
# zeros) does not.
_NUMBER_VIEW = bytes(
    0x30 if 0x30 <= byte <= 0x39 else byte if byte == 0x2D else
    0x7C if byte in b":,[ \t\r\n" else 0x20
    for byte in range(256)
)  # fmt: skip
_BIG_POSITIVE, _BIG_NEGATIVE = b"|" + b"0" * 20, b"|-" + b"0" * 19


def _may_hold_big_integers(data: bytes) -> bool:
    view = data.translate(_NUMBER_VIEW)
    return (
        _BIG_POSITIVE in view
        or _BIG_NEGATIVE in view
        or view.startswith((_BIG_POSITIVE[1:], _BIG_NEGATIVE[1:]))  # a bare number
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number {text[:40]} is out of range")
    return number


def _parse_json_exactly(data: bytes, orjson_error: str | None, parsed: Any = None) -> Any:
    """JSON with integers of any size kept exact (orjson makes those beyond 64 bits floats);
    NaN, Infinity and numbers beyond a double's range refused. Else BodyError. `parsed`
    is orjson's value when it took the body: kept if the exact parser cannot go as deep."""
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = orjson_error or str(error)
    except ValueError as error:  # NaN, Infinity, out of range
        reason = str(error)
    except RecursionError:
        if orjson_error is None:
            return parsed
        reason = orjson_error
    raise BodyError(f"body is not valid JSON: {reason}")


def parse_body(content_type: str, body: bytes, exact_numbers: bool = True) -> Any:
    """The document's `body`: JSON, form fields as an object, else text. Raises BodyError.

    With `exact_numbers` a JSON body that may hold integers orjson makes floats (beyond
    64 bits) is parsed again exactly; without (ingress, when no rule reads the body:
    `reads_body`) that look, ~0.75 us per KiB, is saved: the body is only validated."""
    kind = media_type(content_type)
    if kind == "application/json" or kind.endswith("+json"):  # is_json_type, parsed once
        data = body.removeprefix(b"\xef\xbb\xbf")
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            if not body.strip():  # looked at only now: strip() copies the body
                return None  # an empty body declared as JSON: no payload, not an error
            return _parse_json_exactly(data, str(error))
        if exact_numbers and _may_hold_big_integers(data):
            return _parse_json_exactly(data, None, value)
        return value
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


def decode_body(content_encoding: str, body: bytes, max_bytes: int) -> bytes:
    """The body as the rules see it: decompressed per Content-Encoding, within `max_bytes`."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BodyError(f"unsupported Content-Encoding {encoding}", 415)
    window = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    try:
        data = zlib.decompressobj(window).decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise BodyError(f"body is not valid {encoding}: {error}") from None
    if len(data) > max_bytes:
        raise BodyError(f"decompressed body exceeds max_body {max_bytes} bytes", 413)
    return data


_second: tuple[int, str] = (-1, "")
_millisecond: tuple[int, str] = (-1, "")


def rfc3339_ms(ms: int) -> str:
    """Unix milliseconds as `2026-11-28T19:00:00.123Z`."""
    global _second, _millisecond
    if _millisecond[0] == ms:  # under load, events arrive several to a millisecond
        return _millisecond[1]
    seconds = ms // 1000
    if _second[0] != seconds:  # many events share a second: format it once
        at = time.gmtime(seconds)  # %Y does not pad years before 1000 to four digits
        _second = (seconds, f"{at.tm_year:04d}" + time.strftime("-%m-%dT%H:%M:%S", at))
    text = f"{_second[1]}.{ms % 1000:03d}Z"
    _millisecond = (ms, text)
    return text


def request_document(
    *,
    event_id: str,
    source: str,
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    received_at_ms: int,
    max_body_bytes: int,
    exact_numbers: bool = True,
) -> dict[str, Any]:
    """The event document of a request as received (raises BodyError for unreadable bodies).
    `exact_numbers=False` when no rule reads the body (see `parse_body`)."""
    header_map = normalize_headers(headers)
    encoding = header_map.get("content_encoding")
    decoded = decode_body(encoding, body, max_body_bytes) if encoding else body
    return _document(
        source,
        method,
        path,
        dict(urllib.parse.parse_qsl(query, keep_blank_values=True)) if query else {},
        header_map,
        parse_body(header_map.get("content_type", ""), decoded, exact_numbers),
        rfc3339_ms(received_at_ms),
        event_id,
    )


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
    return _document(source, method, path, dict(query), dict(headers), body, received_at, event_id)


def _document(
    source: str,
    method: str,
    path: str,
    query: dict[str, str],
    headers: dict[str, str],
    body: Any,
    received_at: str,
    event_id: str,
) -> dict[str, Any]:
    """`event_document` of mappings that are the document's own (not copied again)."""
    return {
        "source": source,
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body": body,
        "received_at": received_at,
        "id": event_id,
    }
