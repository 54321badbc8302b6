"""Configuration: relay's TOML file in, a validated `relay.model.Config` out.

This module owns turning TOML (SPEC §2) into the frozen `relay.model.Config`:
it interpolates `${NAME}`, `${file:PATH}` and `${cred:NAME}` in every string,
parses units (durations, sizes, rates), fills in every default, resolves
relative paths against the config file's folder, checks cross-references
(routes to sources and targets) and compiles every JMESPath expression, and
reports *all* problems at once, each as one line naming the file and the key
path (`relay.toml: routes[2].targets[0]: unknown target "cii" (known: ci, chat)`).
It also renders a config back to TOML with its secrets masked (`effective_toml`)
and writes starter configs (`starter_toml`). It reads no files besides the
config and those that `${file:..}` and `${cred:..}` name.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import difflib
import ipaddress
import json
import os
import re
import secrets
import ssl
import stat
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import tomli_w

from relay.model import (
    Address,
    Config,
    DedupeConfig,
    DefaultsConfig,
    IPNetwork,
    LogConfig,
    LogFormat,
    Rate,
    RetryConfig,
    RouteConfig,
    ServerConfig,
    SignConfig,
    SignScheme,
    SourceConfig,
    SyncMode,
    TargetConfig,
    VerifyConfig,
    VerifyScheme,
)
from relay.outbound import FRAMING_HEADERS
from relay.rules import Expression, RuleError, compile_expression
from relay.signing import new_standard_secret

T = TypeVar("T")
D = TypeVar("D")

__all__ = [
    "ConfigError",
    "effective_toml",
    "format_duration",
    "format_rate",
    "format_size",
    "load",
    "parse",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "starter_toml",
]


class ConfigError(Exception):
    """Every problem found in a config file, one complete message per entry in `errors`.

    An entry is `"<file>: <key.path>: <message>"`; for an expression that does not
    compile, the expression and a caret line follow on the next lines of the same entry.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --------------------------------------------------------------------------- units

_DURATION_UNITS: Final = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}
# The longest duration a config may hold: 100 years. Durations become Unix milliseconds
# (dedupe expiry, retention cutoff, next retry) in SQLite's 64-bit INTEGER columns.
MAX_DURATION_S: Final = 36500 * 86400
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION: Final = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_SIZE: Final = re.compile(r"(\d+(?:\.\d+)?) ?([A-Za-z]*)")
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BINARY_SIZES: Final = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_RATE: Final = re.compile(r"(\d+) ?/ ?(\S+)")
_RATE_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _kind(value: object) -> str:
    """The TOML name of a parsed value's type, for "expected X, got Y" messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime.datetime):
        return "date-time"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def parse_duration(text: str, *, capped: bool = True) -> float:
    """Seconds in a duration string: "250ms", "10s", "5m", "2h", "7d", "1h30m", or "0".

    Raises ValueError (with a one-line message) for anything else, numbers included,
    and, when `capped`, for a duration longer than `MAX_DURATION_S` (100 years: what the
    config takes; a replay's `since` has bounds of its own). Uncapped, a huge one may
    be `inf`.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected a duration like "10s", got {_kind(text)}')
    stripped = text.strip()
    if stripped == "0":
        return 0.0
    if not _DURATION.fullmatch(stripped):
        raise ValueError(
            f'invalid duration "{text}": use a number and a unit (ms, s, m, h, d), e.g. "10s"'
        )
    total = sum(
        (Decimal(m[1]) * _DURATION_UNITS[m[2]] for m in _DURATION_PART.finditer(stripped)),
        Decimal(0),
    )
    if capped and total > MAX_DURATION_S:
        raise ValueError(f'duration "{text}" is too long: at most 100 years ("36500d")')
    return float(total)


def parse_size(value: str | int) -> int:
    """Bytes in a size: "512KiB", "25MiB", "1GiB", "100B", "10KB" (1000-based) or an int.

    Raises ValueError for negative, fractional-byte or malformed sizes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f'expected a size like "1MiB" or a number of bytes, got {_kind(value)}')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    match = _SIZE.fullmatch(value.strip())
    unit = _SIZE_UNITS.get(match[2].lower()) if match else None
    if match is None or unit is None:
        raise ValueError(
            f'invalid size "{value}": use a number and a unit (B, KiB, MiB, GiB, KB, MB, GB), '
            'e.g. "1MiB"'
        )
    size = Decimal(match[1]) * unit
    if size != size.to_integral_value():
        raise ValueError(f'invalid size "{value}": not a whole number of bytes')
    return int(size)


MAX_RATE_COUNT: Final = 1_000_000_000  # per period, and a burst: beyond it a float overflows


def parse_rate(text: str) -> Rate:
    """A rate string: "50/s", "600/m", "1000/h", "10/d", or a count per duration ("5/10s")."""
    if not isinstance(text, str):
        raise ValueError(f'expected a rate like "50/s", got {_kind(text)}')
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'invalid rate "{text}": use a count per unit, e.g. "50/s" or "600/m"')
    count = int(match[1])
    per = match[2]
    if per in _RATE_UNITS:
        per_s = _RATE_UNITS[per]
    elif per == "0" or _DURATION.fullmatch(per):
        per_s = parse_duration(per)  # a period too long is refused there
    else:
        raise ValueError(f'invalid rate "{text}": the unit after "/" is s, m, h, d or a duration')
    if count < 1 or per_s <= 0:
        raise ValueError(f'invalid rate "{text}": must be more than zero')
    if count > MAX_RATE_COUNT:
        raise ValueError(f'invalid rate "{text}": the count is at most {MAX_RATE_COUNT:_}')
    return Rate(count, per_s)


def format_duration(seconds: float) -> str:
    """The shortest string that `parse_duration` reads back as `seconds`: 604800 -> "7d"."""
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {seconds}")
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        count = round(seconds / float(_DURATION_UNITS[unit]))
        if count >= 1 and count * float(_DURATION_UNITS[unit]) == seconds:
            return f"{count}{unit}"
    milliseconds = seconds * 1000
    candidates = [f"{round(milliseconds)}ms", f"{_plain(milliseconds)}ms", f"{_plain(seconds)}s"]
    for candidate in candidates:
        if _DURATION.fullmatch(candidate) and parse_duration(candidate) == seconds:
            return candidate
    return candidates[-1]


def _plain(number: float) -> str:
    """A float in positional notation (no exponent), without a trailing ".0"."""
    text = format(Decimal(repr(number)), "f")
    return text[:-2] if text.endswith(".0") else text


def format_size(size: int) -> str | int:
    """`size` in the largest binary unit that divides it exactly ("1MiB"), else the int."""
    for unit, scale in _BINARY_SIZES:
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return size


def format_rate(rate: Rate) -> str:
    """A rate as `parse_rate` reads it: Rate(600, 60.0) -> "600/m"."""
    for unit, per_s in _RATE_UNITS.items():
        if rate.per_s == per_s:
            return f"{rate.count}/{unit}"
    return f"{rate.count}/{format_duration(rate.per_s)}"


# --------------------------------------------------------------------------- key paths

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _segment(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _join(path: str, key: str) -> str:
    return f"{path}.{_segment(key)}" if path else _segment(key)


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


# --------------------------------------------------------------------------- converters


class _Failed:
    """Stands in for a string whose interpolation failed (the error is already reported)."""

    __slots__ = ()


_FAILED: Final = _Failed()
_MISSING: Final = object()


class _Reported(ValueError):
    """Raised by a converter that meets `_FAILED`: the key is bad, but nothing new to say."""


class _Invalid(ValueError):
    """A conversion error; `suffix` extends the key path (`[1]`, `.Authorization`)."""

    def __init__(self, message: str, suffix: str = "") -> None:
        super().__init__(message)
        self.suffix = suffix


def _check_failed(value: object) -> None:
    if isinstance(value, _Failed):
        raise _Reported


def _str(value: Any) -> str:
    _check_failed(value)
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_kind(value)}")
    return value


def _nonempty_str(value: Any) -> str:
    text = _str(value)
    if not text.strip():
        raise _Invalid("must not be empty")
    return text


def _bool(value: Any) -> bool:
    _check_failed(value)
    if not isinstance(value, bool):
        raise _Invalid(f"expected a boolean (true or false), got {_kind(value)}")
    return value


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        _check_failed(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_kind(value)}")
        if minimum is not None and maximum is not None and not minimum <= value <= maximum:
            raise _Invalid(f"must be from {minimum} to {maximum}, got {value}")
        if minimum is not None and value < minimum:
            raise _Invalid(f"must be at least {minimum}, got {value}")
        return value

    return convert


def _duration(*, allow_zero: bool = False) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        _check_failed(value)
        seconds = parse_duration(value)
        if seconds == 0 and not allow_zero:
            raise _Invalid("must be more than 0")
        return seconds

    return convert


def _size(value: Any) -> int:
    _check_failed(value)
    size = parse_size(value)
    if size < 1:
        raise _Invalid("must be at least 1 byte")
    return size


def _rate(value: Any) -> Rate:
    _check_failed(value)
    return parse_rate(value)


def _choice(options: Sequence[str]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _str(value)
        if text.lower() in options:
            return text.lower()
        shown = ", ".join(f'"{option}"' for option in options)
        raise _Invalid(f'invalid value "{text}" (expected one of {shown})')

    return convert


def _list(item: Callable[[Any], T], *, nonempty: bool = False) -> Callable[[Any], tuple[T, ...]]:
    def convert(value: Any) -> tuple[T, ...]:
        _check_failed(value)
        if not isinstance(value, list):
            raise _Invalid(f"expected an array, got {_kind(value)}")
        if nonempty and not value:
            raise _Invalid("must not be empty")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except _Reported:
                raise
            except _Invalid as error:
                raise _Invalid(str(error), f"[{index}]{error.suffix}") from None
            except ValueError as error:
                raise _Invalid(str(error), f"[{index}]") from None
        return tuple(out)

    return convert


_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_name(value: Any) -> str:
    name = _str(value)
    if not _TOKEN.fullmatch(name):
        raise _Invalid(f'invalid header name "{name}"')
    return name


def _method(value: Any) -> str:
    method = _str(value)
    if not _TOKEN.fullmatch(method):
        raise _Invalid(f'invalid HTTP method "{method}"')
    return method.upper()


def _headers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a table of header names to strings, got {_kind(value)}")
    headers: dict[str, str] = {}
    for name, text in value.items():
        suffix = "." + _segment(name)
        if not _TOKEN.fullmatch(name):
            raise _Invalid(f'invalid header name "{name}"', suffix)
        if name.lower() in FRAMING_HEADERS:
            raise _Invalid(f'header "{name}" is set by relay (it frames the request)', suffix)
        try:
            headers[name] = _str(text)
        except _Invalid as error:
            raise _Invalid(str(error), suffix) from None
        if any(c in headers[name] for c in "\r\n\0"):
            raise _Invalid("a header value cannot contain line breaks", suffix)
    return headers


def _network(value: Any) -> IPNetwork:
    text = _str(value)
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise _Invalid(
            f'invalid network "{text}" (expected a CIDR like "10.0.0.0/8" or an address)'
        ) from None


_HOST: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_PORT: Final = re.compile(r"[0-9]{1,5}")


def _address(value: Any) -> Address:
    text = _str(value).strip()
    bracketed = re.fullmatch(r"\[([^\]]*)\]:(.*)", text)
    if bracketed:
        host, port = bracketed[1], bracketed[2]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f'invalid IPv6 address "{host}"') from None
    else:
        host, colon, port = text.rpartition(":")
        if not colon or not host:
            raise _Invalid(
                f'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080", got "{text}"'
            )
        if ":" in host:
            raise _Invalid(f'an IPv6 address goes in brackets: "[{host}]:{port}"')
        if not _HOST.fullmatch(host):
            raise _Invalid(f'invalid host "{host}"')
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise _Invalid(f'invalid port "{port}" (0 to 65535)')
    return Address(host, int(port))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(value: Any) -> str:
    url = _str(value)
    if url == "log:":
        return url
    problem = f'expected an absolute http(s) URL or "log:", got "{_url_for_error(url)}"'
    if any(c.isspace() for c in url):
        raise _Invalid(problem)
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _Invalid(problem)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _Invalid(f'invalid port in URL "{_url_for_error(url)}"') from None
    return url


def without_password(url: str) -> str:
    """`url` with the password of its user information (`user:password@`) shown as "***"."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    user_info, _, host = parts.netloc.rpartition("@")
    user = user_info.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def _url_for_error(url: str) -> str:
    """`url` as an error shows it: as `without_password`, and also where a malformed URL
    hides a password from the parser (`https://user:pa#ss@host/`: "#" starts a fragment)."""
    shown = without_password(url)
    if shown != url:
        return shown
    _, separator, rest = url.partition("://")
    user_info, at, _ = rest.split("/", 1)[0].rpartition("@")
    if separator and at and ":" in user_info:
        return url.replace(user_info, user_info.split(":", 1)[0] + ":" + MASK, 1)
    return url


def shown_url(config: Config, target: TargetConfig) -> str:
    """A target's URL as summaries and `relay config` show it: "***" when it was
    interpolated (`${...}` may be a token in its query or its whole path, as in Slack's
    webhook URLs), else without its password."""
    if _join(_join("targets", target.name), "url") in config.secret_paths:
        return MASK
    return without_password(target.url)


def _check_tls(table: _Table, cert: Path, key: Path) -> None:
    """The certificate and key load as the listener will load them (readable, PEM, a pair)."""
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            path.open("rb").close()
        except OSError as error:
            table.fail(name, f"cannot read {path}: {error.strerror or error}")
            return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as error:
        table.fail("tls_cert", f"cannot load {cert} with {key}: {error.reason or error}")


def _source_path(value: Any) -> str:
    path = _str(value)
    if not path.startswith("/"):
        raise _Invalid(f'must start with "/", got "{path}"')
    if any(c.isspace() or c in "?#" for c in path):
        raise _Invalid(f'must be a plain path (no spaces, "?" or "#"), got "{path}"')
    return path


def _expression(value: Any) -> Expression | None:
    text = _str(value)
    if not text.strip():
        return None
    try:
        return compile_expression(text)
    except RuleError as error:
        raise _Invalid(str(error)) from None


def _secret_list(value: Any) -> tuple[str, ...]:
    _check_failed(value)
    if isinstance(value, str):
        if not value:
            raise _Invalid("must not be empty")
        return (value,)
    if isinstance(value, list):
        return _list(_nonempty_str, nonempty=True)(value)
    raise _Invalid(f"expected a string or an array of strings, got {_kind(value)}")


def _is_whsec(secret: str) -> bool:
    body = secret.removeprefix("whsec_")
    try:
        return bool(body) and bool(base64.b64decode(body, validate=True))
    except (binascii.Error, ValueError):
        return False


# --------------------------------------------------------------------------- reading


@dataclass
class _Context:
    """What one parse accumulates: errors, warnings and where secrets live."""

    file: str
    folder: Path
    env: Mapping[str, str]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    interpolated: set[str] = field(default_factory=set)
    secret_paths: set[str] = field(default_factory=set)
    literal_secrets: dict[str, None] = field(default_factory=dict)
    secret_headers: set[str] = field(default_factory=set)  # lower-cased names
    check_tls: bool = True  # load the TLS certificate and key (not for admin commands)

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{self.file}: {path}: {message}")

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder, made absolute."""
        return Path(os.path.abspath(self.folder / path))

    def note_secret(self, path: str, raw: object) -> None:
        """Mark `path` as secret, remembering whether it holds a literal (not interpolated)."""
        self.secret_paths.add(path)
        items = (
            [(f"{path}[{i}]", v) for i, v in enumerate(raw)]
            if isinstance(raw, list)
            else [(path, raw)]
        )
        for item_path, value in items:
            if isinstance(value, str) and value and item_path not in self.interpolated:
                self.literal_secrets[path] = None


_REFERENCE: Final = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")


def _interpolate(ctx: _Context, text: str, path: str) -> str | _Failed:
    if "$" not in text:
        return text
    problems: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        if match[1] is None:
            problems.append('unterminated "${" (write "$$" for a literal "$")')
            return ""
        ctx.interpolated.add(path)
        try:
            return _lookup(ctx, match[1])
        except ValueError as error:
            problems.append(str(error))
            return ""

    result = _REFERENCE.sub(substitute, text)
    for problem in problems:
        ctx.error(path, problem)
    return _FAILED if problems else result


def _lookup(ctx: _Context, reference: str) -> str:
    kind, colon, argument = reference.partition(":")
    if not colon:
        if not reference:
            raise ValueError('empty "${}" (write "$$" for a literal "$")')
        value = ctx.env.get(reference)
        if value is None:
            raise ValueError(f"environment variable {reference} is not set")
        return value
    if kind == "file":
        if not argument:
            raise ValueError('"${file:}" needs a path')
        return _read_secret_file(ctx.resolve(argument), reference)
    if kind == "cred":
        folder = ctx.env.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise ValueError(
                f"${{{reference}}} needs $CREDENTIALS_DIRECTORY (set by systemd's "
                "LoadCredential=), which is not set"
            )
        if not argument or "/" in argument or argument in (".", ".."):
            raise ValueError(f'"${{{reference}}}": a credential name is a plain file name')
        return _read_secret_file(Path(folder) / argument, reference)
    raise ValueError(f'unknown "${{{kind}:...}}" (use ${{NAME}}, ${{file:PATH}} or ${{cred:NAME}})')


def _read_secret_file(path: Path, reference: str) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ValueError(
            f"cannot read ${{{reference}}} ({path}): {error.strerror or error}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"${{{reference}}} ({path}) is not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def _interpolated_strings(ctx: _Context, path: str, value: Any) -> Iterator[str]:
    """The non-empty strings at or under `path` that came from ${...}."""
    if isinstance(value, str):
        if value and path in ctx.interpolated:
            yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _interpolated_strings(ctx, _join(path, key), item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _interpolated_strings(ctx, f"{path}[{i}]", item)


def _interpolate_tree(ctx: _Context, value: Any, path: str) -> Any:
    if isinstance(value, str):
        return _interpolate(ctx, value, path)
    if isinstance(value, dict):
        return {key: _interpolate_tree(ctx, item, _join(path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate_tree(ctx, item, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


class _Table:
    """One TOML table being read: reports unknown keys, converts values, remembers bad keys."""

    def __init__(
        self, ctx: _Context, data: Mapping[str, Any], path: str, allowed: Sequence[str]
    ) -> None:
        self.ctx = ctx
        self.data = data
        self.path = path
        self.bad: set[str] = set()
        for key in data:
            if key not in allowed:
                self.ctx.error(_join(path, key), "unknown key" + _did_you_mean(key, allowed))
                self.bad.add(key)

    def key(self, key: str) -> str:
        return _join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.data

    def ok(self, *keys: str) -> bool:
        return not self.bad.intersection(keys)

    def fail(self, key: str, message: str) -> None:
        self.bad.add(key)
        self.ctx.error(self.key(key), message)

    def get(self, key: str, convert: Callable[[Any], T], default: D) -> T | D:
        if key not in self.data:
            return default
        try:
            return convert(self.data[key])
        except _Reported:
            self.bad.add(key)
        except _Invalid as error:
            self.bad.add(key)
            self.ctx.error(self.key(key) + error.suffix, self._shown(key, str(error)))
        except ValueError as error:
            self.fail(key, self._shown(key, str(error)))
        return default

    def _shown(self, key: str, message: str) -> str:
        """`message` without the values under `key` that came from ${...} (may be secrets):
        quoted ones always, bare ones of 8 characters or more (a short one would mask
        ordinary words), each also as `without_password` shows a URL."""
        for text in _interpolated_strings(self.ctx, self.key(key), self.data[key]):
            for form in {text, without_password(text)}:
                message = message.replace(f'"{form}"', f'"{MASK}"')
                if len(form) >= 8:
                    message = message.replace(form, MASK)
        return message

    def require(self, key: str, convert: Callable[[Any], T], default: D) -> T | D:
        if key not in self.data:
            self.fail(key, "missing required key")
            return default
        return self.get(key, convert, default)

    def table(self, key: str, allowed: Sequence[str]) -> _Table | None:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {_kind(value)}")
            return None
        return _Table(self.ctx, value, self.key(key), allowed)

    def table_or_empty(self, key: str, allowed: Sequence[str]) -> _Table:
        return self.table(key, allowed) or _Table(self.ctx, {}, self.key(key), allowed)


# --------------------------------------------------------------------------- schema

_TOP_KEYS: Final = ("server", "log", "defaults", "sources", "targets", "routes")
_SERVER_KEYS: Final = (
    "listen",
    "admin",
    "admin_token",
    "journal",
    "sync",
    "retention",
    "max_body",
    "read_timeout",
    "idle_timeout",
    "shutdown_grace",
    "tls_cert",
    "tls_key",
    "deny_networks",
    "allow_networks",
)
_LOG_KEYS: Final = ("format", "level")
_DEFAULTS_KEYS: Final = ("timeout", "concurrency", "retry", "pause_after")
_RETRY_KEYS: Final = ("attempts", "first", "max", "max_age")
_SOURCE_KEYS: Final = (
    "path",
    "methods",
    "verify",
    "dedupe",
    "max_body",
    "rate_limit",
    "burst",
    "allow_from",
    "ack_status",
    "challenge",
)
_VERIFY_KEYS: Final = (
    "scheme",
    "secret",
    "tolerance",
    "header",
    "algorithm",
    "encoding",
    "prefix",
    "id_header",
    "username",
    "password",
)
_DEDUPE_KEYS: Final = ("key", "window")
_TARGET_KEYS: Final = (
    "url",
    "method",
    "timeout",
    "concurrency",
    "rate_limit",
    "headers",
    "sign",
    "retry",
    "retry_on",
    "pause_after",
    "ordered",
    "order_key",
)
_SIGN_KEYS: Final = ("scheme", "secret", "header", "algorithm", "encoding", "prefix")
_ROUTE_KEYS: Final = (
    "name",
    "source",
    "filter",
    "transform",
    "set_headers",
    "drop_headers",
    "targets",
)

_VERIFY_SCHEMES: Final = (
    "github",
    "stripe",
    "slack",
    "shopify",
    "standard",
    "hmac",
    "token",
    "basic",
)
_SIGN_SCHEMES: Final = ("standard", "hmac")
_ALGORITHMS: Final = ("sha1", "sha256", "sha512")
_ENCODINGS: Final = ("hex", "base64")
# The verify keys each scheme reads (besides `scheme`); others are ignored with a warning.
_VERIFY_USES: Final[Mapping[str, frozenset[str]]] = {
    "github": frozenset({"secret"}),
    "stripe": frozenset({"secret", "tolerance"}),
    "slack": frozenset({"secret", "tolerance"}),
    "shopify": frozenset({"secret"}),
    "standard": frozenset({"secret", "tolerance"}),
    "hmac": frozenset({"secret", "header", "algorithm", "encoding", "prefix", "id_header"}),
    "token": frozenset({"secret", "header", "id_header"}),
    "basic": frozenset({"username", "password"}),
}
_SIGN_USES: Final[Mapping[str, frozenset[str]]] = {
    "standard": frozenset({"secret"}),
    "hmac": frozenset({"secret", "header", "algorithm", "encoding", "prefix"}),
}
# Schemes whose provider sends a delivery id that `dedupe = "<window>"` can use (SPEC §2.1).
_SCHEMES_WITH_ID: Final = frozenset({"github", "stripe", "slack", "shopify", "standard"})
_SENSITIVE_HEADER: Final = re.compile(
    r"authorization|proxy-authorization|cookie|.*(token|secret|password|api-?key).*", re.I
)
_NAME: Final = re.compile(r"[A-Za-z0-9_-]+")

# A target's concurrency is its number of workers, and 4x it is a LIMIT in SQL.
MAX_CONCURRENCY: Final = 10_000
_DEFAULT_RETRY: Final = RetryConfig(attempts=12, first_s=5.0, max_s=3600.0, max_age_s=3 * 86400.0)
_DEFAULT_VERIFY: Final[Mapping[str, Any]] = {
    "secret": (),
    "tolerance": 300.0,
    "header": "",
    "algorithm": "sha256",
    "encoding": "hex",
    "prefix": "",
    "id_header": "",
    "username": "",
    "password": "",
}
_KNOWN_SHOWN: Final = 8


def _unknown_reference(kind: str, name: str, known: Sequence[str]) -> str:
    """`unknown target "cii" (known: ci, chat)`; with many names, a "did you mean" instead."""
    if not known:
        return f'unknown {kind} "{name}" (no {kind}s are defined)'
    if len(known) <= _KNOWN_SHOWN:
        return f'unknown {kind} "{name}" (known: {", ".join(known)})'
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    return f'unknown {kind} "{name}" ({hint}known: {", ".join(known[:_KNOWN_SHOWN])}, …)'


def _build_server(ctx: _Context, table: _Table) -> ServerConfig:
    listen = table.get("listen", _address, Address("127.0.0.1", 8080))
    admin = table.get("admin", _address, Address("127.0.0.1", 9090))
    admin_token = table.get("admin_token", _str, "")
    journal = table.get("journal", _nonempty_str, "relay.db")
    sync = table.get("sync", _choice(("full", "normal")), "full")
    retention = table.get("retention", _duration(), 7 * 86400.0)
    max_body = table.get("max_body", _size, 2**20)
    read_timeout = table.get("read_timeout", _duration(), 10.0)
    idle_timeout = table.get("idle_timeout", _duration(), 15.0)
    shutdown_grace = table.get("shutdown_grace", _duration(allow_zero=True), 10.0)
    tls_cert = table.get("tls_cert", _str, "")
    tls_key = table.get("tls_key", _str, "")
    deny = table.get("deny_networks", _list(_network), ())
    allow = table.get("allow_networks", _list(_network), ())

    if admin_token:
        ctx.note_secret(table.key("admin_token"), table.data["admin_token"])
    elif table.ok("admin", "admin_token") and not _is_loopback(admin.host):
        table.fail("admin_token", f"required when admin ({admin}) is not a loopback address")
    if table.ok("listen", "admin") and listen == admin and listen.port != 0:
        table.fail("admin", f"same address as listen ({listen})")
    if table.ok("tls_cert", "tls_key") and bool(tls_cert) != bool(tls_key):
        missing = "tls_key" if tls_cert else "tls_cert"
        table.fail(missing, "tls_cert and tls_key go together: set both, or neither")
    elif tls_cert and table.ok("tls_cert", "tls_key") and ctx.check_tls:
        _check_tls(table, ctx.resolve(tls_cert), ctx.resolve(tls_key))
    return ServerConfig(
        listen=listen,
        admin=admin,
        admin_token=admin_token,
        journal=ctx.resolve(journal),
        sync=cast(SyncMode, sync),
        retention_s=retention,
        max_body_bytes=max_body,
        read_timeout_s=read_timeout,
        idle_timeout_s=idle_timeout,
        shutdown_grace_s=shutdown_grace,
        tls_cert=ctx.resolve(tls_cert) if tls_cert else None,
        tls_key=ctx.resolve(tls_key) if tls_key else None,
        deny_networks=deny,
        allow_networks=allow,
    )


def _build_log(table: _Table) -> LogConfig:
    log_format = table.get("format", _choice(("auto", "json", "console")), "auto")
    level = table.get("level", _choice(("debug", "info", "warning", "error")), "info")
    return LogConfig(format=cast(LogFormat, log_format), level=level)


def _build_retry(table: _Table | None, base: RetryConfig) -> RetryConfig:
    if table is None:
        return base
    retry = RetryConfig(
        attempts=table.get("attempts", _int(1), base.attempts),
        first_s=table.get("first", _duration(), base.first_s),
        max_s=table.get("max", _duration(), base.max_s),
        max_age_s=table.get("max_age", _duration(), base.max_age_s),
    )
    if table.ok("first", "max") and retry.max_s < retry.first_s:
        table.fail(
            "max" if table.has("max") else "first",
            f"max ({format_duration(retry.max_s)}) is less than first "
            f"({format_duration(retry.first_s)})",
        )
    return retry


def _build_defaults(table: _Table) -> DefaultsConfig:
    return DefaultsConfig(
        timeout_s=table.get("timeout", _duration(), 15.0),
        concurrency=table.get("concurrency", _int(1, MAX_CONCURRENCY), 4),
        retry=_build_retry(table.table("retry", _RETRY_KEYS), _DEFAULT_RETRY),
        pause_after=table.get("pause_after", _int(1), 5),
    )


def _scheme_values(
    ctx: _Context,
    table: _Table,
    scheme: str,
    keys: Sequence[str],
    uses: Mapping[str, frozenset[str]],
) -> dict[str, Any]:
    """Read every key of a verify/sign table; keys the scheme ignores warn and keep defaults."""
    converters: dict[str, Callable[[Any], Any]] = {
        "secret": _secret_list,
        "tolerance": _duration(),
        "header": _header_name,
        "algorithm": _choice(_ALGORITHMS),
        "encoding": _choice(_ENCODINGS),
        "prefix": _str,
        "id_header": _header_name,
        "username": _str,
        "password": _str,
    }
    values = dict(_DEFAULT_VERIFY)
    for key, convert in converters.items():
        if key in keys:
            values[key] = table.get(key, convert, _DEFAULT_VERIFY[key])
    used = uses.get(scheme)
    if used is None:
        return values
    for key in table.data:
        if key in keys and key != "scheme" and key not in used:
            ctx.warn(table.key(key), f'not used by scheme "{scheme}"; ignored')
            values[key] = _DEFAULT_VERIFY[key]
    if "secret" in used:
        if not table.has("secret"):
            table.fail("secret", f'missing required key (scheme "{scheme}" needs a secret)')
        else:
            ctx.note_secret(table.key("secret"), table.data["secret"])
    if scheme == "standard" and table.ok("secret"):
        for index, secret in enumerate(values["secret"]):
            if not _is_whsec(secret):
                suffix = f"[{index}]" if isinstance(table.data["secret"], list) else ""
                ctx.error(
                    table.key("secret") + suffix,
                    'not a Standard Webhooks secret (expected "whsec_" followed by base64)',
                )
    if scheme == "hmac" and not table.has("header"):
        table.fail("header", 'missing required key (scheme "hmac" needs the signature header)')
    if scheme == "token" and not table.has("header"):
        values["header"] = "Authorization"
    return values


def _build_verify(ctx: _Context, table: _Table) -> VerifyConfig:
    scheme = table.require("scheme", _choice(_VERIFY_SCHEMES), "")
    values = _scheme_values(ctx, table, scheme, _VERIFY_KEYS, _VERIFY_USES)
    if scheme == "basic":
        for key in ("username", "password"):
            if not table.has(key):
                table.fail(key, 'missing required key (scheme "basic" needs username and password)')
            elif table.ok(key) and not values[key]:
                table.fail(key, "must not be empty")
        if table.has("password"):
            ctx.note_secret(table.key("password"), table.data["password"])
    return VerifyConfig(
        scheme=cast(VerifyScheme, scheme or "github"),
        secrets=values["secret"],
        tolerance_s=values["tolerance"],
        header=values["header"],
        algorithm=values["algorithm"],
        encoding=values["encoding"],
        prefix=values["prefix"],
        id_header=values["id_header"],
        username=values["username"],
        password=values["password"],
    )


def _build_dedupe(
    ctx: _Context, table: _Table, verify: VerifyConfig | None, verify_ok: bool
) -> DedupeConfig | None:
    raw = table.data.get("dedupe", _MISSING)
    if raw is _MISSING:
        return None
    if isinstance(raw, dict):
        sub = table.table_or_empty("dedupe", _DEDUPE_KEYS)
        dedupe = DedupeConfig(
            window_s=sub.get("window", _duration(), 86400.0),
            key=sub.get("key", _expression, None),
        )
        if not sub.ok("key"):
            verify_ok = False
    elif isinstance(raw, (str, _Failed)):
        dedupe = DedupeConfig(window_s=table.get("dedupe", _duration(), 86400.0), key=None)
    else:
        table.fail(
            "dedupe",
            f'expected a duration like "24h" or a table {{ key = "...", window = "24h" }}, '
            f"got {_kind(raw)}",
        )
        return None
    if dedupe.key is None and verify_ok and table.ok("dedupe"):
        scheme = verify.scheme if verify else None
        if verify is None or scheme == "basic":
            reason = "this source has no verify scheme that sends a delivery id"
        elif scheme in ("hmac", "token") and not verify.id_header:
            reason = f'verify scheme "{scheme}" has a delivery id only with id_header'
        else:
            reason = ""
        if reason:
            ctx.error(
                table.key("dedupe"),
                f"nothing to dedupe on: {reason}; set verify.id_header or use "
                'dedupe = { key = "<expression>", window = "24h" }',
            )
    return dedupe


def _build_source(ctx: _Context, table: _Table, name: str, server: ServerConfig) -> SourceConfig:
    path = table.get("path", _source_path, f"/hooks/{name}")
    methods = tuple(dict.fromkeys(table.get("methods", _list(_method, nonempty=True), ("POST",))))
    verify: VerifyConfig | None = None
    errors_before = len(ctx.errors)
    verify_table = table.table("verify", _VERIFY_KEYS)
    if verify_table is not None:
        verify = _build_verify(ctx, verify_table)
    verify_ok = len(ctx.errors) == errors_before and table.ok("verify")
    dedupe = _build_dedupe(ctx, table, verify, verify_ok)
    max_body = table.get("max_body", _size, server.max_body_bytes)
    rate_limit = table.get("rate_limit", _rate, None)
    burst = table.get("burst", _int(1, MAX_RATE_COUNT), None)
    allow_from = table.get("allow_from", _list(_network), ())
    ack_status = table.get("ack_status", _int(200, 299), 202)
    challenge = table.get("challenge", _choice(("", "slack", "meta")), "")

    if burst is not None and rate_limit is None and table.ok("rate_limit"):
        table.fail("burst", "burst needs rate_limit")
    if challenge == "meta" and verify_ok and (verify is None or not verify.secrets):
        table.fail(
            "challenge",
            '"meta" answers the handshake when hub.verify_token equals the source secret: '
            "set verify.secret",
        )
    if not table.has("verify"):
        ctx.warn(table.path, "no verify: anyone who can reach the listener can post events")
    return SourceConfig(
        name=name,
        path=path,
        methods=methods,
        verify=verify,
        dedupe=dedupe,
        max_body_bytes=max_body,
        rate_limit=rate_limit,
        burst=burst,
        allow_from=allow_from,
        ack_status=ack_status,
        challenge=challenge,
    )


def _build_sign(ctx: _Context, table: _Table) -> SignConfig:
    scheme = table.require("scheme", _choice(_SIGN_SCHEMES), "")
    values = _scheme_values(ctx, table, scheme, _SIGN_KEYS, _SIGN_USES)
    return SignConfig(
        scheme=cast(SignScheme, scheme or "standard"),
        secrets=values["secret"],
        header=values["header"],
        algorithm=values["algorithm"],
        encoding=values["encoding"],
        prefix=values["prefix"],
    )


def _note_sensitive_headers(ctx: _Context, table: _Table, key: str) -> dict[str, str]:
    headers = table.get(key, _headers, {})
    for name, value in headers.items():
        path = _join(table.key(key), name)
        if _SENSITIVE_HEADER.fullmatch(name):
            ctx.note_secret(path, value)
        if path in ctx.interpolated:  # "${...}" values are masked wherever they are shown
            ctx.secret_headers.add(name.lower())
    return headers


def _build_target(
    ctx: _Context, table: _Table, name: str, defaults: DefaultsConfig
) -> TargetConfig:
    url = table.require("url", _url, "log:")
    if urlsplit(url).password and table.key("url") not in ctx.interpolated:
        ctx.literal_secrets[table.key("url")] = None  # sent as Authorization: Basic
    sign_table = table.table("sign", _SIGN_KEYS)
    ordered = table.get("ordered", _bool, False)
    order_key = table.get("order_key", _expression, None)
    if ordered and order_key is not None:
        table.fail("order_key", "set either ordered = true or order_key, not both")
    return TargetConfig(
        name=name,
        url=url,
        method=table.get("method", _method, "POST"),
        timeout_s=table.get("timeout", _duration(), defaults.timeout_s),
        concurrency=table.get("concurrency", _int(1, MAX_CONCURRENCY), defaults.concurrency),
        rate_limit=table.get("rate_limit", _rate, None),
        headers=_note_sensitive_headers(ctx, table, "headers"),
        sign=_build_sign(ctx, sign_table) if sign_table is not None else None,
        retry=_build_retry(table.table("retry", _RETRY_KEYS), defaults.retry),
        retry_on=frozenset(table.get("retry_on", _list(_int(100, 599)), ())),
        pause_after=table.get("pause_after", _int(1), defaults.pause_after),
        ordered=ordered,
        order_key=order_key,
    )


def _named_tables(ctx: _Context, top: _Table, key: str, kind: str) -> dict[str, _Table]:
    """`[sources.NAME]` / `[targets.NAME]`: each entry checked to be a table with a good name."""
    value = top.data.get(key, _MISSING)
    if value is _MISSING:
        return {}
    if not isinstance(value, dict):
        top.fail(key, f"expected a table of {kind}s ([{key}.NAME]), got {_kind(value)}")
        return {}
    allowed = _SOURCE_KEYS if key == "sources" else _TARGET_KEYS
    tables = {}
    for name, data in value.items():
        path = _join(key, name)
        if not _NAME.fullmatch(name):
            ctx.error(path, f'a {kind} name may use only letters, digits, "-" and "_"')
        if not isinstance(data, dict):
            ctx.error(path, f"expected a table, got {_kind(data)}")
            continue
        tables[name] = _Table(ctx, data, path, allowed)
    return tables


def _build_routes(
    ctx: _Context, top: _Table, source_names: Sequence[str], target_names: Sequence[str]
) -> tuple[RouteConfig, ...]:
    value = top.data.get("routes", _MISSING)
    if value is _MISSING:
        return ()
    if not isinstance(value, list):
        top.fail("routes", f"expected an array of tables ([[routes]]), got {_kind(value)}")
        return ()
    routes: list[RouteConfig] = []
    first_with_name: dict[str, int] = {}
    for index, data in enumerate(value):
        path = f"routes[{index}]"
        if not isinstance(data, dict):
            ctx.error(path, f"expected a table, got {_kind(data)}")
            continue
        table = _Table(ctx, data, path, _ROUTE_KEYS)
        name = table.require("name", _nonempty_str, "")
        source = table.require("source", _nonempty_str, "")
        targets = table.require("targets", _list(_nonempty_str, nonempty=True), ())
        if name and table.ok("name"):
            if name in first_with_name:
                table.fail(
                    "name", f'duplicate route name "{name}" (also routes[{first_with_name[name]}])'
                )
            else:
                first_with_name[name] = index
        if source and table.ok("source") and source not in source_names:
            table.fail("source", _unknown_reference("source", source, source_names))
        seen: set[str] = set()
        for position, target in enumerate(targets):
            where = f"{table.key('targets')}[{position}]"
            if target not in target_names:
                ctx.error(where, _unknown_reference("target", target, target_names))
            elif target in seen:
                ctx.error(where, f'target "{target}" is listed twice')
            seen.add(target)
        routes.append(
            RouteConfig(
                name=name,
                source=source,
                filter=table.get("filter", _expression, None),
                transform=table.get("transform", _expression, None),
                set_headers=_note_sensitive_headers(ctx, table, "set_headers"),
                drop_headers=table.get("drop_headers", _list(_header_name), ()),
                targets=targets,
            )
        )
    return tuple(routes)


def _build(ctx: _Context, document: dict[str, Any], path: Path) -> Config:
    top = _Table(ctx, _interpolate_tree(ctx, document, ""), "", _TOP_KEYS)
    server = _build_server(ctx, top.table_or_empty("server", _SERVER_KEYS))
    log = _build_log(top.table_or_empty("log", _LOG_KEYS))
    defaults = _build_defaults(top.table_or_empty("defaults", _DEFAULTS_KEYS))

    sources: dict[str, SourceConfig] = {}
    owner_of_path: dict[str, str] = {}
    for name, table in _named_tables(ctx, top, "sources", "source").items():
        source = _build_source(ctx, table, name, server)
        sources[name] = source
        if not table.ok("path"):
            continue
        if source.path in owner_of_path:
            other = _join("sources", owner_of_path[source.path])
            table.fail("path", f'path "{source.path}" is also used by {other}')
        else:
            owner_of_path[source.path] = name

    targets = {
        name: _build_target(ctx, table, name, defaults)
        for name, table in _named_tables(ctx, top, "targets", "target").items()
    }
    source_names = list(top.data["sources"]) if isinstance(top.data.get("sources"), dict) else []
    target_names = list(top.data["targets"]) if isinstance(top.data.get("targets"), dict) else []
    routes = _build_routes(ctx, top, source_names, target_names)

    routed_sources = {route.source for route in routes}
    routed_targets = {target for route in routes for target in route.targets}
    for name in sources:
        if name not in routed_sources:
            ctx.warn(_join("sources", name), "no route uses this source: its events are unrouted")
    for name in targets:
        if name not in routed_targets:
            ctx.warn(_join("targets", name), "no route delivers to this target")
    for name, source in sources.items():
        if source.dedupe is not None and source.dedupe.window_s > server.retention_s:
            ctx.warn(
                _join(_join("sources", name), "dedupe"),
                f"window ({format_duration(source.dedupe.window_s)}) is longer than "
                f"server.retention ({format_duration(server.retention_s)}): a repeat after "
                "retention is answered with the id of an event already deleted",
            )

    return Config(
        path=path,
        server=server,
        log=log,
        defaults=defaults,
        sources=sources,
        targets=targets,
        routes=routes,
        secret_paths=frozenset(ctx.secret_paths | ctx.interpolated),
        secret_headers=frozenset(ctx.secret_headers),
        warnings=tuple(ctx.warnings),
    )


_TOML_POSITION: Final = re.compile(r"(.*?) \(at line (\d+), column (\d+)\)")


def _toml_error(file: str, error: tomllib.TOMLDecodeError) -> str:
    message = str(error)
    match = _TOML_POSITION.fullmatch(message)
    if match:
        return f"{file}: line {match[2]}, column {match[3]}: invalid TOML: {match[1]}"
    message = message.replace(" (at end of document)", "")
    return f"{file}: end of file: invalid TOML: {message}"


def _parse(
    text: str, path: Path, env: Mapping[str, str], check_tls: bool = True
) -> tuple[Config, list[str]]:
    ctx = _Context(file=str(path), folder=path.parent, env=env, check_tls=check_tls)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_toml_error(ctx.file, error)]) from None
    config = _build(ctx, document, path)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return config, list(ctx.literal_secrets)


def parse(text: str, *, path: Path, env: Mapping[str, str]) -> Config:
    """Validate TOML `text` read from `path`; raise ConfigError listing every problem."""
    return _parse(text, path, env)[0]


def load(path: Path, env: Mapping[str, str] | None = None, *, check_tls: bool = True) -> Config:
    """Read and validate the config file at `path` (env defaults to os.environ).

    Also warns when the file is readable by group or others and holds literal secrets.
    `check_tls=False` skips loading the TLS key: the admin commands only need addresses,
    and may run as a user who cannot read it.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read config: {error.strerror or error}"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 text (bad byte at offset {error.start})"]) from None
    config, literal_secrets = _parse(text, path, os.environ if env is None else env, check_tls)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return config
    if literal_secrets and mode & 0o044:
        warning = (
            f"the file is readable by other users (mode {mode:04o}) and holds literal secrets "
            f"({', '.join(literal_secrets)}): chmod 600 it, or use ${{NAME}}, "
            "${file:PATH} or ${cred:NAME}"
        )
        config = replace(config, warnings=(*config.warnings, warning))
    return config


# --------------------------------------------------------------------------- writing

MASK: Final = "***"


def _verify_dict(verify: VerifyConfig | SignConfig, uses: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"scheme": verify.scheme}
    if "secret" in uses:
        out["secret"] = verify.secrets[0] if len(verify.secrets) == 1 else list(verify.secrets)
    if isinstance(verify, VerifyConfig) and "tolerance" in uses:
        out["tolerance"] = format_duration(verify.tolerance_s)
    for key in ("header", "algorithm", "encoding", "prefix", "id_header", "username", "password"):
        if key in uses and (key != "id_header" or getattr(verify, key)):  # "": not set
            out[key] = getattr(verify, key)
    return out


def _source_dict(source: SourceConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"path": source.path, "methods": list(source.methods)}
    if source.verify is not None:
        out["verify"] = _verify_dict(source.verify, _VERIFY_USES[source.verify.scheme])
    if source.dedupe is not None:
        window = format_duration(source.dedupe.window_s)
        key = source.dedupe.key
        out["dedupe"] = window if key is None else {"key": key.text, "window": window}
    out["max_body"] = format_size(source.max_body_bytes)
    if source.rate_limit is not None:
        out["rate_limit"] = format_rate(source.rate_limit)
    if source.burst is not None:
        out["burst"] = source.burst
    out["allow_from"] = [str(network) for network in source.allow_from]
    out["ack_status"] = source.ack_status
    out["challenge"] = source.challenge
    return out


def _retry_dict(retry: RetryConfig) -> dict[str, Any]:
    return {
        "attempts": retry.attempts,
        "first": format_duration(retry.first_s),
        "max": format_duration(retry.max_s),
        "max_age": format_duration(retry.max_age_s),
    }


def _target_dict(target: TargetConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "url": without_password(target.url),  # an interpolated one is masked whole later
        "method": target.method,
        "timeout": format_duration(target.timeout_s),
        "concurrency": target.concurrency,
    }
    if target.rate_limit is not None:
        out["rate_limit"] = format_rate(target.rate_limit)
    out["headers"] = dict(target.headers)
    if target.sign is not None:
        out["sign"] = _verify_dict(target.sign, _SIGN_USES[target.sign.scheme])
    out["retry"] = _retry_dict(target.retry)
    out["retry_on"] = sorted(target.retry_on)
    out["pause_after"] = target.pause_after
    out["ordered"] = target.ordered
    out["order_key"] = target.order_key.text if target.order_key else ""
    return out


def _route_dict(route: RouteConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": route.name, "source": route.source}
    if route.filter is not None:
        out["filter"] = route.filter.text
    if route.transform is not None:
        out["transform"] = route.transform.text
    out["set_headers"] = dict(route.set_headers)
    out["drop_headers"] = list(route.drop_headers)
    out["targets"] = list(route.targets)
    return out


def _config_dict(config: Config) -> dict[str, Any]:
    server = config.server
    defaults = config.defaults
    return {
        "server": {
            "listen": str(server.listen),
            "admin": str(server.admin),
            "admin_token": server.admin_token,
            "journal": str(server.journal),
            "sync": server.sync,
            "retention": format_duration(server.retention_s),
            "max_body": format_size(server.max_body_bytes),
            "read_timeout": format_duration(server.read_timeout_s),
            "idle_timeout": format_duration(server.idle_timeout_s),
            "shutdown_grace": format_duration(server.shutdown_grace_s),
            "tls_cert": str(server.tls_cert) if server.tls_cert else "",
            "tls_key": str(server.tls_key) if server.tls_key else "",
            "deny_networks": [str(network) for network in server.deny_networks],
            "allow_networks": [str(network) for network in server.allow_networks],
        },
        "log": {"format": config.log.format, "level": config.log.level},
        "defaults": {
            "timeout": format_duration(defaults.timeout_s),
            "concurrency": defaults.concurrency,
            "retry": _retry_dict(defaults.retry),
            "pause_after": defaults.pause_after,
        },
        "sources": {name: _source_dict(source) for name, source in config.sources.items()},
        "targets": {name: _target_dict(target) for name, target in config.targets.items()},
        "routes": [_route_dict(route) for route in config.routes],
    }


def _escape(value: Any) -> Any:
    """Double every `$` so that parsing the output does not interpolate it again."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {key: _escape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape(item) for item in value]
    return value


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return MASK
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def _mask(value: Any, path: str, secret_paths: frozenset[str]) -> Any:
    if path in secret_paths:
        return _masked(value)
    if isinstance(value, dict):
        return {key: _mask(item, _join(path, key), secret_paths) for key, item in value.items()}
    if isinstance(value, list):
        return [_mask(item, f"{path}[{i}]", secret_paths) for i, item in enumerate(value)]
    return value


def effective_toml(config: Config) -> str:
    """The config as TOML with every default filled in and secrets shown as "***".

    Units are written back as strings ("10s", "1MiB", "50/s") and expressions as their
    text; the output parses back to an equal Config (apart from the masked values).
    """
    document = _mask(_escape(_config_dict(config)), "", config.secret_paths)
    return tomli_w.dumps(document)


_STARTER_HEADER: Final = """\
# relay configuration, written by `relay init` (reference: SPEC §2 / README).
# It holds freshly generated secrets: keep it private (chmod 600), or move them
# out of the file with "${ENV_VAR}", "${file:PATH}" or "${cred:NAME}".
# Relative paths are relative to this file's folder; under systemd, point
# journal at the state directory, e.g. journal = "/var/lib/relay/relay.db".
# Try it: `relay run -c FILE`, then `relay send demo -c FILE --data '{"hello": "world"}'`.

"""

_STARTER_FOOTER: Final = """
# A real target: HTTPS, signed per Standard Webhooks with the secret below
# (freshly generated: give it to the receiver), retried for up to a day.
# Uncomment it and add "ci" to a route's targets.
#
# [targets.ci]
# url = "https://ci.example.com/hooks/relay"
# sign = {{ scheme = "standard", secret = "{whsec}" }}
# retry = {{ attempts = 10, max_age = "1d" }}
"""


def starter_toml() -> str:
    """A starter config for `relay init`: a demo GitHub-style source, a `log:` target, a route.

    Every call generates new secrets (the admin token and the demo source's secret).
    """
    document = {
        "server": {
            "listen": "127.0.0.1:8080",
            "admin": "127.0.0.1:9090",
            "admin_token": secrets.token_urlsafe(32),
            "journal": "relay.db",
            "sync": "full",
        },
        "log": {"format": "auto", "level": "info"},
        "sources": {
            "demo": {
                "path": "/hooks/demo",
                "verify": {"scheme": "github", "secret": secrets.token_urlsafe(32)},
            }
        },
        "targets": {"console": {"url": "log:"}},
        "routes": [{"name": "demo-to-console", "source": "demo", "targets": ["console"]}],
    }
    body = tomli_w.dumps(_escape(document))
    return _STARTER_HEADER + body + _STARTER_FOOTER.format(whsec=new_standard_secret())


# --------------------------------------------------------------------------- reload

_RELOADABLE_SERVER_FIELDS: Final = frozenset(
    {"admin_token", "retention_s", "max_body_bytes", "read_timeout_s", "shutdown_grace_s"}
)
_SERVER_KEY_OF_FIELD: Final = {
    "retention_s": "retention",
    "max_body_bytes": "max_body",
    "read_timeout_s": "read_timeout",
    "idle_timeout_s": "idle_timeout",
    "shutdown_grace_s": "shutdown_grace",
}


def restart_needed(old: Config, new: Config) -> list[str]:
    """Why `new` cannot be swapped in while running (listen, admin, journal, ...), if it can't."""
    problems = []
    for name in ServerConfig.__dataclass_fields__:
        if name in _RELOADABLE_SERVER_FIELDS:
            continue
        if getattr(old.server, name) != getattr(new.server, name):
            key = _SERVER_KEY_OF_FIELD.get(name, name)
            problems.append(f"server.{key} changed: a restart is needed to apply it")
    if old.log != new.log:  # loggers are bound once, at first use
        problems.append("log changed: a restart is needed to apply it")
    return problems


def _changed(old: Mapping[str, Any], new: Mapping[str, Any], kind: str) -> dict[str, list[str]]:
    return {
        f"{kind}_added": sorted(set(new) - set(old)),
        f"{kind}_removed": sorted(set(old) - set(new)),
        f"{kind}_changed": sorted(k for k in set(old) & set(new) if old[k] != new[k]),
    }


def config_changes(old: Config, new: Config) -> dict[str, list[str]]:
    """What a reload changes, by name: sources, targets and routes added, removed, changed."""
    changes = {
        **_changed(old.sources, new.sources, "sources"),
        **_changed(old.targets, new.targets, "targets"),
        **_changed({r.name: r for r in old.routes}, {r.name: r for r in new.routes}, "routes"),
    }
    if old.server != new.server:
        changes["server_changed"] = sorted(
            _SERVER_KEY_OF_FIELD.get(name, name)
            for name in ServerConfig.__dataclass_fields__
            if getattr(old.server, name) != getattr(new.server, name)
        )
    if old.log != new.log or old.defaults != new.defaults:
        changes["other_changed"] = [
            n for n in ("log", "defaults") if getattr(old, n) != getattr(new, n)
        ]
    return {key: names for key, names in changes.items() if names}
