"""The command line: parse arguments, call the program, print, and exit.

This module owns everything a user types and reads at a terminal (SPEC §1):
argparse, the text printed to stdout and stderr, and the exit codes (0 ok,
1 runtime failure, 2 usage error, 69 daemon unreachable, 78 configuration
error). It is the only module that prints or exits; the daemon itself writes
log lines, not prints.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from relay import __version__
from relay.config import ConfigError, effective_toml, load, starter_toml
from relay.dryrun import DryRun, dry_run
from relay.logs import is_sensitive_header
from relay.model import Config, SourceConfig
from relay.rules import BodyError
from relay.signing import provider_headers

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78

DEFAULT_CONFIG = Path("/etc/relay/relay.toml")


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "validate": cmd_validate,
        "config": cmd_config,
        "init": cmd_init,
        "test": cmd_test,
        "send": cmd_send,
    }
    try:
        return handler[args.command](args)
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _fail(message: str, code: int) -> int:
    print(f"relay: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace) -> Config | int:
    """The config named by -c (or the default), or an exit code after printing its errors."""
    path = args.config or default_config_path()
    try:
        return load(path)
    except ConfigError as error:
        for line in error.errors:
            print(line, file=sys.stderr)
        return EXIT_CONFIG


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from relay import daemon, logs
    from relay.journal import JournalError

    config = _load(args)
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
    config = _load(args)
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
            f"    {target.name:<20} {target.method} {target.url}  concurrency={target.concurrency}"
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
    if args.json:
        sys.stdout.write(orjson.dumps(_dry_run_json(result, args.show_secrets)).decode() + "\n")
    else:
        _print_dry_run(result, args.show_secrets)
    return EXIT_OK


def _shown_headers(headers: list[tuple[str, str]], show_secrets: bool) -> list[tuple[str, str]]:
    if show_secrets:
        return headers
    return [(k, "***" if is_sensitive_header(k) else v) for k, v in headers]


def _dry_run_json(result: DryRun, show_secrets: bool) -> dict[str, Any]:
    return {
        "source": result.source,
        "event_id": result.event_id,
        "routes": [
            {"name": d.name, "matched": d.matched, "error": d.error} for d in result.decisions
        ],
        "requests": [
            {
                "route": r.route,
                "target": r.target,
                "method": r.method,
                "url": r.url,
                "headers": _shown_headers(r.headers, show_secrets),
                "body": r.body.decode("utf-8", errors="replace"),
                "error": r.error,
            }
            for r in result.requests
        ],
    }


def _print_dry_run(result: DryRun, show_secrets: bool) -> None:
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
        print(f"  {r.method} {r.url}")
        for name, value in _shown_headers(r.headers, show_secrets):
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
        reason = getattr(error, "reason", error)
        return _fail(f"daemon unreachable at {request.full_url}: {reason}", EXIT_UNAVAILABLE)
    print(f"{status} {text}")
    return EXIT_OK if 200 <= status < 300 else EXIT_FAILURE
