"""The command line: parse arguments, call the program, print, and exit.

This module owns everything a user types and reads at a terminal (SPEC §1):
argparse, the text printed to stdout and stderr, and the exit codes (0 ok,
1 runtime failure, 2 usage error, 69 daemon unreachable, 78 configuration
error). It is the only module that prints or exits; the daemon itself writes
log lines, not prints.
"""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from relay import __version__
from relay.admin import EVENT_ID, MAX_LIMIT, BadRequest, parse_limit, since_ms, unknown_name
from relay.config import ConfigError, effective_toml, load, shown_url, starter_toml
from relay.dryrun import DryRun, dry_run
from relay.logs import is_sensitive_header
from relay.model import Config, SourceConfig
from relay.outbound import signature_headers
from relay.rules import BodyError
from relay.signing import provider_headers

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78

DEFAULT_CONFIG = Path("/etc/relay/relay.toml")
ADMIN_TIMEOUT_S = 30.0
TAIL_IDLE_TIMEOUT_S = 45.0  # the daemon sends a keep-alive every 15 s
EVENT_STATUSES = ("pending", "delivered", "dead", "unrouted")
SHOWN_BODY_CHARS = 4096


def default_config_path() -> Path:
    return Path(os.environ.get("RELAY_CONFIG") or DEFAULT_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A durable webhook relay daemon.",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            default=None,
            help="config file (default: $RELAY_CONFIG, then /etc/relay/relay.toml)",
        )
        return sub

    with_config("run", "run the daemon in the foreground")
    with_config("validate", "check the config and print a summary")
    with_config("config", "print the effective config as TOML, secrets hidden")
    test = with_config("test", "dry-run the rules on a payload; sends nothing")
    test.add_argument("--source", required=True, help="the source the payload arrives at")
    payload = test.add_mutually_exclusive_group()
    payload.add_argument("--file", type=Path, help="read the body from this file")
    payload.add_argument("--data", help="the body, inline")
    test.add_argument(
        "-H", "--header", action="append", default=[], metavar="'K: V'", help="a request header"
    )
    test.add_argument("--json", action="store_true", help="print JSON for scripts")
    test.add_argument(
        "--show-secrets", action="store_true", help="print credential headers unmasked"
    )
    send = with_config("send", "send a webhook to the running daemon, signed like the provider")
    send.add_argument("source", help="the source to send to")
    body_of_send = send.add_mutually_exclusive_group()
    body_of_send.add_argument("--file", type=Path, help="read the body from this file")
    body_of_send.add_argument("--data", help="the body, inline")
    send.add_argument(
        "-H", "--header", action="append", default=[], metavar="'K: V'", help="a request header"
    )
    send.add_argument(
        "--insecure", action="store_true", help="with TLS: do not check the daemon's certificate"
    )
    init = commands.add_parser("init", help="write a starter config with fresh secrets")
    init.add_argument("file", type=Path, nargs="?", default=Path("relay.toml"))
    _admin_commands(with_config)
    return parser


def _admin_commands(with_config: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The commands that talk to the running daemon's admin API."""
    json_help = "print the daemon's JSON answer as is, for scripts"
    status = with_config("status", "per target: queue, in flight, pause; per source: counts")
    status.add_argument("--json", action="store_true", help=json_help)
    events = with_config("events", "list recent events, newest first")
    events.add_argument("--source", help="only this source's events")
    events.add_argument("--status", choices=EVENT_STATUSES, help="only events in this state")
    events.add_argument(
        "--limit", type=_limit, help=f"at most this many (default 50, at most {MAX_LIMIT})"
    )
    events.add_argument(
        "--before", type=_event_id, metavar="ID", help="only events older than this one (paging)"
    )
    events.add_argument("--json", action="store_true", help=json_help)
    event = with_config("event", "one event: request, route decisions, deliveries, attempts")
    event.add_argument("id", type=_event_id, help="the event id (evt_...)")
    event.add_argument("--json", action="store_true", help=json_help)
    event.add_argument(
        "--show-secrets", action="store_true", help="print credential headers unmasked"
    )
    replay = with_config(
        "replay", "re-queue deliveries: an event's, or every dead one that matches"
    )
    replay.add_argument(
        "ids", nargs="*", type=_event_id, metavar="ID", help="events whose deliveries to re-queue"
    )
    replay.add_argument("--dead", action="store_true", help="re-queue dead deliveries")
    replay.add_argument("--target", help="with --dead: only deliveries to this target")
    replay.add_argument("--route", help="with --dead: only deliveries of this route")
    replay.add_argument(
        "--since",
        metavar="DUR",
        type=_since,
        help='with --dead: events that arrived within "24h", or since a time',
    )
    replay.add_argument("--json", action="store_true", help=json_help)
    tail = with_config("tail", "stream events live as they are accepted and delivered")
    tail.add_argument("--source", help="only this source's events")
    tail.add_argument("--json", action="store_true", help="print each record as a JSON line")
    reload = with_config("reload", "ask the running daemon to reload its config (like SIGHUP)")
    reload.add_argument("--json", action="store_true", help=json_help)


def _event_id(text: str) -> str:
    """An argument that must be an event id: a usage error (exit 2) otherwise."""
    if not EVENT_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f'"{text}" is not an event id (evt_ + 26 characters)')
    return text


def _limit(text: str) -> str:
    """`relay events --limit`: what the admin API would accept (digits, 1 to MAX_LIMIT)."""
    try:
        parse_limit(text)
    except BadRequest as error:
        raise argparse.ArgumentTypeError(error.message.removeprefix("limit: ")) from None
    return text


def _since(text: str) -> str:
    """`relay replay --since`: what the admin API would accept (it reads it again)."""
    try:
        since_ms(text, time.time_ns() // 1_000_000)
    except BadRequest as error:
        raise argparse.ArgumentTypeError(error.message.removeprefix("since: ")) from None
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "validate": cmd_validate,
        "config": cmd_config,
        "init": cmd_init,
        "test": cmd_test,
        "send": cmd_send,
        "status": cmd_status,
        "events": cmd_events,
        "event": cmd_event,
        "replay": cmd_replay,
        "tail": cmd_tail,
        "reload": cmd_reload,
    }
    try:
        code = handler[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:  # the reader went away (`relay events | head`)
        return _stdout_gone()
    return code


def _stdout_gone() -> int:
    """Exit quietly when stdout's reader is gone: stdout goes to /dev/null, so that Python's
    own flush at exit has nowhere to fail (as the `signal` module's docs recommend). Exit 1:
    not all of the output was written, which a script should not take for success."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_FAILURE


def _fail(message: str, code: int) -> int:
    print(f"relay: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace, *, check_tls: bool = False) -> Config | int:
    """The config named by -c (or the default), or an exit code after printing its errors.
    Only `run` and `validate` load the TLS key (`check_tls`): the other commands need
    no more than the addresses, and may run as a user who cannot read it."""
    path = args.config or default_config_path()
    try:
        return load(path, check_tls=check_tls)
    except ConfigError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        return EXIT_CONFIG


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from relay import daemon, logs
    from relay.journal import JournalError

    config = _load(args, check_tls=True)
    if isinstance(config, int):
        return config
    logs.configure(config.log.format, config.log.level)
    try:
        return uvloop.run(daemon.serve(config))
    except OSError as error:
        return _fail(f"cannot start: {error}", EXIT_FAILURE)
    except JournalError as error:
        return _fail(f"journal: {error}", EXIT_FAILURE)


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args, check_tls=True)
    if isinstance(config, int):
        return config
    for warning in config.warnings:
        print(f"{config.path}: warning: {warning}", file=sys.stderr)
    server = config.server
    print(f"{config.path}: ok")
    print(
        f"  listen {server.listen}  admin {server.admin}  journal {server.journal} ({server.sync})"
    )
    print(f"  sources ({len(config.sources)}):")
    for source in config.sources.values():
        scheme = source.verify.scheme if source.verify else "none"
        print(f"    {source.name:<20} {' '.join(source.methods)} {source.path}  verify={scheme}")
    print(f"  targets ({len(config.targets)}):")
    for target in config.targets.values():
        print(
            f"    {target.name:<20} {target.method} {shown_url(config, target)}"
            f"  concurrency={target.concurrency}"
        )
    print(f"  routes ({len(config.routes)}):")
    for route in config.routes:
        rule = f"  filter: {route.filter.text}" if route.filter else ""
        print(f"    {route.name:<20} {route.source} -> {', '.join(route.targets)}{rule}")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    config = _load(args)
    if isinstance(config, int):
        return config
    sys.stdout.write(effective_toml(config))
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        # O_EXCL: never overwrite; 0o600 from the first byte, since the file holds secrets.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(starter_toml())
    except FileExistsError:
        return _fail(f"{path} already exists; not overwriting it", EXIT_FAILURE)
    except OSError as error:
        return _fail(f"cannot write {path}: {error}", EXIT_FAILURE)
    print(f"wrote {path} (mode 600: it holds secrets); check it with: relay validate -c {path}")
    return EXIT_OK


def _parse_headers(raw: Sequence[str]) -> list[tuple[str, str]] | None:
    headers = []
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            return None
        headers.append((name.strip(), value.strip()))
    return headers


def _payload(
    args: argparse.Namespace,
) -> tuple[Config, SourceConfig, bytes, list[tuple[str, str]]] | int:
    """What `relay test`/`relay send` work on: config, source, body and headers; or an exit code."""
    config = _load(args)
    if isinstance(config, int):
        return config
    source = config.sources.get(args.source)
    if source is None:
        known = ", ".join(config.sources) or "none"
        return _fail(f'unknown source "{args.source}" (known: {known})', EXIT_USAGE)
    parts = _request_parts(args)
    if isinstance(parts, int):
        return parts
    return config, source, *parts


def cmd_test(args: argparse.Namespace) -> int:
    payload = _payload(args)
    if isinstance(payload, int):
        return payload
    config, _source, body, headers = payload
    try:
        result = dry_run(config, args.source, body, headers, time.time_ns() // 1_000_000)
    except BodyError as error:
        return _fail(f"the daemon would answer {error.status}: {error}", EXIT_FAILURE)
    hidden = _hidden_headers(config, args.show_secrets)
    urls = _shown_urls(config, args.show_secrets)
    if args.json:
        sys.stdout.write(orjson.dumps(_dry_run_json(result, hidden, urls)).decode() + "\n")
    else:
        _print_dry_run(result, hidden, urls)
    return EXIT_OK


def _shown_urls(config: Config, show_secrets: bool) -> dict[str, str]:
    """Each target's URL as `relay test` prints it: as `relay validate` does (no password;
    "***" when it comes from `${...}`), unless `--show-secrets`."""
    if show_secrets:
        return {name: target.url for name, target in config.targets.items()}
    return {name: shown_url(config, target) for name, target in config.targets.items()}


def _hidden_headers(config: Config, show_secrets: bool) -> frozenset[str] | None:
    """Header names to mask in what the CLI prints (None: `--show-secrets`): those that look
    like credentials, any the config uses for a signature or a token, whatever its name,
    and any whose value the config takes from `${...}`."""
    if show_secrets:
        return None
    names: set[str] = set(config.secret_headers)
    for source in config.sources.values():  # their timestamps help debug a tolerance
        names |= {name for name in signature_headers(source.verify) if "timestamp" not in name}
    for target in config.targets.values():
        if target.sign is not None and target.sign.header:
            names.add(target.sign.header.lower())
    return frozenset(names)


def _shown_headers(
    headers: list[tuple[str, str]], hidden: frozenset[str] | None
) -> list[tuple[str, str]]:
    if hidden is None:
        return headers
    return [(k, "***" if is_sensitive_header(k) or k.lower() in hidden else v) for k, v in headers]


def _dry_run_json(
    result: DryRun, hidden: frozenset[str] | None, urls: dict[str, str]
) -> dict[str, Any]:
    return {
        "source": result.source,
        "event_id": result.event_id,
        "handshake": result.handshake,
        "routes": [
            {"name": d.name, "matched": d.matched, "error": d.error} for d in result.decisions
        ],
        "requests": [
            {
                "route": r.route,
                "target": r.target,
                "method": r.method,
                "url": urls[r.target],
                "headers": _shown_headers(r.headers, hidden),
                "body": r.body.decode("utf-8", errors="replace"),
                "error": r.error,
            }
            for r in result.requests
        ],
    }


def _print_dry_run(result: DryRun, hidden: frozenset[str] | None, urls: dict[str, str]) -> None:
    if result.handshake is not None:
        print(
            f"source {result.source}: a {result.handshake} handshake: the daemon answers it"
            " with its challenge and journals nothing"
        )
        return
    matched = sum(d.matched for d in result.decisions)
    print(f"source {result.source}: {matched} of {len(result.decisions)} routes match")
    for d in result.decisions:
        verdict = "match" if d.matched else ("error" if d.error else "no match")
        print(f"  {verdict:<9} {d.name}" + (f": {d.error}" if d.error else ""))
    for r in result.requests:
        print(f"\n{r.route} -> {r.target}")
        if r.error:
            print(f"  dead: {r.error}")
            continue
        print(f"  {r.method} {urls[r.target]}")
        for name, value in _shown_headers(r.headers, hidden):
            print(f"  {name}: {value}")
        print()
        print("  " + r.body.decode("utf-8", errors="replace").replace("\n", "\n  "))


def _request_parts(args: argparse.Namespace) -> tuple[bytes, list[tuple[str, str]]] | int:
    """The body and headers of `relay test`/`relay send`, or an exit code after a message."""
    headers = _parse_headers(args.header)
    if headers is None:
        return _fail("a header must look like 'Name: value'", EXIT_USAGE)
    if not any(name.lower() == "content-type" for name, _ in headers):
        headers.append(("Content-Type", "application/json"))
    try:
        body = args.file.read_bytes() if args.file else (args.data or "").encode()
    except OSError as error:
        return _fail(f"cannot read {args.file}: {error}", EXIT_FAILURE)
    return body, headers


def _listener_url(config: Config, path: str) -> str:
    address = config.server.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)  # noqa: S104 - mapping, not binding
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if config.server.tls_cert else "http"
    return f"{scheme}://{host}:{address.port}{path}"


def cmd_send(args: argparse.Namespace) -> int:
    payload = _payload(args)
    if isinstance(payload, int):
        return payload
    config, source, body, headers = payload
    if source.verify is not None:
        signed = provider_headers(source.verify, body, time.time(), f"relay-send-{uuid.uuid4()}")
        headers += list(signed.items())
    request = urllib.request.Request(  # noqa: S310 - the URL is the daemon's own listener
        _listener_url(config, source.path), data=body, headers=dict(headers),
        method=source.methods[0],
    )  # fmt: skip
    context = ssl._create_unverified_context() if args.insecure else None  # noqa: S323 - asked for
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:  # noqa: S310
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return _send_failed(request.full_url, error)
    print(f"{status} {text}")
    return EXIT_OK if 200 <= status < 300 else EXIT_FAILURE


def _send_failed(url: str, error: OSError) -> int:
    """`relay send` reached no answer: a certificate it does not trust (exit 1; the daemon
    is there), or no daemon at all (exit 69)."""
    reason = getattr(error, "reason", error)
    if isinstance(reason, ssl.SSLCertVerificationError):
        why = reason.verify_message or reason.reason or "certificate verify failed"
        return _fail(
            f"the daemon's certificate at {url} is not trusted ({why}); --insecure skips the check",
            EXIT_FAILURE,
        )
    return _fail(f"daemon unreachable at {url}: {reason}", EXIT_UNAVAILABLE)


# ---------------------------------------------------------------- the admin API's commands


def _admin_url(config: Config, path: str) -> str:
    address = config.server.admin
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)  # noqa: S104 - mapping, not binding
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{address.port}{path}"


def _admin_request(
    config: Config, method: str, path: str, body: bytes | None = None, accept: str | None = None
) -> urllib.request.Request:
    headers = {"Accept": accept or "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if config.server.admin_token:
        headers["Authorization"] = f"Bearer {config.server.admin_token}"
    return urllib.request.Request(  # noqa: S310 - the URL is the daemon's own admin listener
        _admin_url(config, path), data=body, headers=headers, method=method
    )


def _call(
    config: Config, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes] | int:
    """(status, body) of one admin API request; exit 69 (after a message) when unreachable."""
    request = _admin_request(config, method, path, body)
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_S) as response:  # noqa: S310
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        return _fail(f"daemon unreachable at {request.full_url}: {reason}", EXIT_UNAVAILABLE)


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _api(
    config: Config, method: str, path: str, body: bytes | None = None
) -> tuple[dict[str, Any], bytes] | int:
    """The JSON answer (and its bytes) of a successful call; else an exit code after a message."""
    answer = _call(config, method, path, body)
    if isinstance(answer, int):
        return answer
    status, raw = answer
    data = _decode(raw)
    if data is None:
        return _fail(
            f"unexpected answer from {_admin_url(config, path)}: HTTP {status}", EXIT_FAILURE
        )
    if status >= 300:
        return _fail(str(data.get("error") or f"HTTP {status}"), EXIT_FAILURE)
    return data, raw


def _print_raw(raw: bytes) -> None:
    sys.stdout.write(raw.decode("utf-8", errors="replace").rstrip("\n") + "\n")


def _table(rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> None:
    """Columns two spaces apart; `numeric` columns right-aligned; the last one unpadded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        cells[-1] = row[-1] if len(row) - 1 not in numeric else cells[-1]
        print("  ".join(cells).rstrip())


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    if isinstance(config, int):
        return config
    answer = _api(config, "GET", "/api/status")
    if isinstance(answer, int):
        return answer
    data, raw = answer
    if args.json:
        _print_raw(raw)
        return EXIT_OK
    targets: dict[str, dict[str, Any]] = data.get("targets") or {}
    rows = [["TARGET", "QUEUE", "IN FLIGHT", "STATE", "LAST ERROR"]]
    for name, target in targets.items():
        state = str(target.get("state") or ("paused" if target.get("paused") else "open"))
        if target.get("paused") and target.get("paused_until"):
            state += f" until {target['paused_until']}"
        rows.append(
            [name, str(target.get("queue_depth", 0)), str(target.get("in_flight", 0)), state,
             str(target.get("last_error") or "-")]
        )  # fmt: skip
    _table(rows, numeric=(1, 2))
    print()
    sources: dict[str, dict[str, Any]] = data.get("sources") or {}
    fields = ("received", "accepted", "duplicate", "rejected")
    rows = [["SOURCE", *(field.upper() for field in fields)]]
    rows += [[name, *(str(counts.get(f, 0)) for f in fields)] for name, counts in sources.items()]
    _table(rows, numeric=(1, 2, 3, 4))
    print()
    print("routes: " + (", ".join(data.get("routes") or []) or "none"))
    since = f" since {data['started_at']}" if data.get("started_at") else ""
    ready = "ready" if data.get("ready", True) else "NOT READY"
    print(f"daemon: {ready}{since} (source counts are since then)")
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    config = _load(args)
    if isinstance(config, int):
        return config
    query = {
        name: value
        for name, value in (
            ("source", args.source),
            ("status", args.status),
            ("limit", args.limit),
            ("before", args.before),
        )
        if value is not None
    }
    path = "/api/events" + ("?" + urllib.parse.urlencode(query) if query else "")
    answer = _api(config, "GET", path)
    if isinstance(answer, int):
        return answer
    data, raw = answer
    if args.json:
        _print_raw(raw)
        return EXIT_OK
    events: list[dict[str, Any]] = data.get("events") or []
    if not events:
        print("no events")
        return EXIT_OK
    rows = [["ID", "RECEIVED", "SOURCE", "STATUS", "DELIVERIES"]]
    rows += [
        [e["id"], e["received_at"], e["source"], e["status"], str(e.get("deliveries", 0))]
        for e in events
    ]
    _table(rows, numeric=(4,))
    if data.get("next"):
        print(f"more: relay events --before {data['next']}")
    return EXIT_OK


def cmd_event(args: argparse.Namespace) -> int:
    config = _load(args)
    if isinstance(config, int):
        return config
    answer = _api(config, "GET", "/api/events/" + urllib.parse.quote(args.id, safe=""))
    if isinstance(answer, int):
        return answer
    data, raw = answer
    if args.json:
        _print_raw(raw)
        return EXIT_OK
    _print_event(data, _hidden_headers(config, args.show_secrets))
    return EXIT_OK


def _print_event(event: dict[str, Any], hidden: frozenset[str] | None) -> None:
    query = f"?{event['query']}" if event.get("query") else ""
    print(f"{event['id']}  {event['status']}")
    print(f"  {event['method']} {event['path']}{query}  source {event['source']}")
    print(f"  received {event['received_at']}")
    if event.get("finished_at"):
        print(f"  finished {event['finished_at']}")
    print("\nheaders")
    headers = [(str(k), str(v)) for k, v in event.get("headers") or []]
    for name, value in _shown_headers(headers, hidden):
        print(f"  {name}: {value}")
    body = str(event.get("body") or "")
    print(f"\nbody ({'base64' if event.get('body_encoding') == 'base64' else 'text'})")
    if body:
        shown = body[:SHOWN_BODY_CHARS]
        print("  " + shown.replace("\n", "\n  "))
        if len(body) > SHOWN_BODY_CHARS:
            print(f"  ... {len(body) - SHOWN_BODY_CHARS} more characters (--json shows all)")
    print("\nroutes")
    for route in event.get("routes") or []:
        verdict = (
            "match" if route.get("matched") else ("error" if route.get("error") else "no match")
        )
        error = f": {route['error']}" if route.get("error") else ""
        print(f"  {verdict:<9} {route.get('name')}{error}")
    if not event.get("routes"):
        print("  none")
    print("\ndeliveries")
    for delivery in event.get("deliveries") or []:
        attempts = delivery.get("attempts", 0)
        line = (
            f"  {delivery['id']}  {delivery['route']} -> {delivery['target']}  {delivery['status']}"
        )
        line += f" after {attempts} attempt{'s' if attempts != 1 else ''}"
        if delivery.get("status") == "pending" and delivery.get("next_at"):
            line += f", next at {delivery['next_at']}"
        print(line)
        if delivery.get("reason"):
            print(f"    reason: {delivery['reason']}")
        elif delivery.get("last_error"):
            print(f"    last error: {delivery['last_error']}")
        for attempt in delivery.get("attempt_log") or []:
            outcome = f"HTTP {attempt['status']}" if attempt.get("status") is not None else ""
            if attempt.get("error"):
                outcome = f"{outcome} {attempt['error']}".strip()
            ms = f"{attempt['ms']:.1f} ms"
            print(f"    #{attempt['n']}  {attempt['at']}  {ms:>10}  {outcome or 'ok'}")
    if not event.get("deliveries"):
        print("  none")


def cmd_replay(args: argparse.Namespace) -> int:
    if args.ids and args.dead:
        return _fail("replay: give event ids or --dead, not both", EXIT_USAGE)
    if not args.ids and not args.dead:
        return _fail(
            "replay: give event ids, or --dead [--target T] [--route R] [--since DUR]", EXIT_USAGE
        )
    if args.ids and (args.target or args.route or args.since):
        return _fail("replay: --target, --route and --since go with --dead", EXIT_USAGE)
    config = _load(args)
    if isinstance(config, int):
        return config
    unknown = unknown_name(args.target, args.route, config, str(config.path))  # as the daemon
    if unknown is not None:
        return _fail(unknown, EXIT_USAGE)
    requests: list[tuple[str, bytes]]
    if args.dead:
        chosen = {"target": args.target, "route": args.route, "since": args.since}
        body = {"status": "dead", **{k: v for k, v in chosen.items() if v is not None}}
        requests = [("/api/replay", orjson.dumps(body))]
    else:
        requests = [
            (f"/api/events/{urllib.parse.quote(event_id, safe='')}/replay", b"")
            for event_id in args.ids
        ]
    requeued = skipped = answered = 0
    code = EXIT_OK
    for path, body_bytes in requests:
        answer = _api(config, "POST", path, body_bytes)
        if isinstance(answer, int):
            if answer == EXIT_UNAVAILABLE:
                return answer
            code = answer  # the error is printed; the other events are still replayed
            continue
        answered += 1
        requeued += int(answer[0].get("requeued", 0))
        skipped += int(answer[0].get("skipped", 0))
    if not answered:
        return code
    if args.json:
        sys.stdout.write(orjson.dumps({"requeued": requeued, "skipped": skipped}).decode() + "\n")
        return code
    line = f"requeued {requeued} deliver{'y' if requeued == 1 else 'ies'}"
    if skipped:
        line += f"; skipped {skipped} whose target is not in the daemon's config"
    print(line)
    return code


def cmd_tail(args: argparse.Namespace) -> int:
    config = _load(args)
    if isinstance(config, int):
        return config
    query = "?" + urllib.parse.urlencode({"source": args.source}) if args.source else ""
    request = _admin_request(config, "GET", "/api/tail" + query, accept="text/event-stream")
    try:
        return _follow(request, args.json)
    except KeyboardInterrupt:  # Ctrl-C is how a tail ends
        return EXIT_OK


def _follow(request: urllib.request.Request, as_json: bool) -> int:
    """Print the SSE records of `request` until the stream ends (exit 69) or Ctrl-C."""
    try:
        response = urllib.request.urlopen(request, timeout=TAIL_IDLE_TIMEOUT_S)  # noqa: S310
    except urllib.error.HTTPError as error:
        data = _decode(error.read()) or {}
        return _fail(str(data.get("error") or f"HTTP {error.code}"), EXIT_FAILURE)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        return _fail(f"daemon unreachable at {request.full_url}: {reason}", EXIT_UNAVAILABLE)
    data_lines: list[str] = []
    try:
        with response:
            for raw in response:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line.startswith("data:"):
                    data_lines.append(line[5:].removeprefix(" "))
                elif not line and data_lines:  # a blank line ends one record
                    text = "\n".join(data_lines)
                    data_lines = []
                    print(text if as_json else _tail_line(text), flush=True)
    except BrokenPipeError:  # our reader went away, not the daemon: main's to handle
        raise
    except (OSError, http.client.HTTPException) as error:
        return _fail(f"lost the daemon: {error}", EXIT_UNAVAILABLE)
    return _fail("the daemon closed the stream (stopping?)", EXIT_UNAVAILABLE)


def _tail_line(text: str) -> str:
    """One readable line per tail record."""
    record = _decode(text.encode()) or {}
    at = str(record.get("at", ""))
    kind = record.get("kind")
    if kind == "event.accepted":
        routes = ",".join(record.get("routes") or []) or "-"
        return (
            f"{at}  accepted   {record.get('event_id')}  source={record.get('source')}"
            f" routes={routes} deliveries={record.get('deliveries')}"
        )
    if kind == "delivery.attempt":
        outcome = str(record.get("outcome"))
        result = f"HTTP {record['status']}" if record.get("status") is not None else ""
        if record.get("error"):
            result = f"{result} {record['error']}".strip()
        line = (
            f"{at}  {outcome:<9}  {record.get('delivery_id')}  {record.get('event_id')}"
            f" -> {record.get('target')} attempt {record.get('attempt')}:"
            f" {result or 'ok'} in {record.get('ms')} ms"
        )
        reason, error = str(record.get("reason") or ""), str(record.get("error") or "")
        if outcome == "dead" and reason and not (error and error in reason):
            line += f" ({reason})"
        return line
    if kind == "tail.dropped":
        return f"{at}  ({record.get('dropped')} records dropped so far: the reader was too slow)"
    return text


def cmd_reload(args: argparse.Namespace) -> int:
    config = _load(args)
    if isinstance(config, int):
        return config
    answer = _call(config, "POST", "/api/reload", b"")
    if isinstance(answer, int):
        return answer
    status, raw = answer
    data = _decode(raw)
    if data is None:
        return _fail(f"unexpected answer to reload: HTTP {status}", EXIT_FAILURE)
    if args.json:
        _print_raw(raw)
    if status == 200 and data.get("ok") is True:
        if not args.json:
            print("reloaded")
        return EXIT_OK
    if status == 200 and data.get("ok") is False:
        if not args.json:
            for line in data.get("errors") or []:
                print(line, file=sys.stderr)
            print("relay: reload refused; the daemon keeps its running config", file=sys.stderr)
        return EXIT_CONFIG
    return _fail(str(data.get("error") or f"HTTP {status}"), EXIT_FAILURE)
