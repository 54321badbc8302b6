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
import sys
from collections.abc import Sequence
from pathlib import Path

from relay import __version__
from relay.config import ConfigError, effective_toml, load, starter_toml
from relay.model import Config

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
    init = commands.add_parser("init", help="write a starter config with fresh secrets")
    init.add_argument("file", type=Path, nargs="?", default=Path("relay.toml"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "validate": cmd_validate, "config": cmd_config, "init": cmd_init}
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
