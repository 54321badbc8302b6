"""End-to-end log output: the real daemon's stdout is JSON lines with SPEC §8 names and fields."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

import orjson

from relay import __version__

from conftest import Daemon, Receiver, eventually, free_port, server_toml

DaemonFactory = Callable[..., Awaitable[Daemon]]
ReceiverFactory = Callable[[], Awaitable[Receiver]]

TOKEN = "tok-very-secret-123"
SIGNATURE = "sha256=" + "deadbeef" * 8
LEVELS = {"debug", "info", "warning", "error", "critical"}


def relay_config(tmp_path: Path, url: str) -> str:
    return (
        server_toml(tmp_path)
        + f"""
[sources.app]
[targets.svc]
url = "{url}"
headers = {{ Authorization = "Bearer ${{RELAY_TEST_TOKEN}}" }}
[targets.audit]
url = "log:"
headers = {{ Authorization = "Bearer ${{RELAY_TEST_TOKEN}}" }}
[[routes]]
name = "app-out"
source = "app"
targets = ["svc", "audit"]
"""
    )


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


async def test_log_lines_are_json_with_spec_fields_and_no_secrets(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """One webhook's life in the log: named JSON lines with their fields, and no secret values."""
    receiver = await receivers()
    daemon = await daemons(relay_config(tmp_path, receiver.url), env={"RELAY_TEST_TOKEN": TOKEN})
    body = orjson.dumps({"action": "opened", "number": 7})
    status, reply, _ = await daemon.post(
        "/hooks/app",
        body,
        headers={"X-Hub-Signature-256": SIGNATURE, "X-GitHub-Event": "pull_request"},
    )
    assert status == 202
    event_id = reply["id"]
    await daemon.wait_log("delivery.succeeded", event_id=event_id, target="svc")
    await daemon.wait_log("delivery.succeeded", event_id=event_id, target="audit")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait() == 0

    # the secrets did reach the target: they were there to leak
    (request,) = receiver.requests
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["X-Hub-Signature-256"] == SIGNATURE

    # every line is JSON with event, level and an ISO 8601 UTC timestamp
    assert [line for line in daemon.lines if line["event"] == "<not json>"] == []
    for line in daemon.lines:
        assert isinstance(line["event"], str), line
        assert line["level"] in LEVELS, line
        ts = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
        assert ts.utcoffset() == timedelta(0), line

    started = await daemon.wait_log("relay.started")
    assert started is not None
    assert started["version"] == __version__
    assert started["listen"] == daemon.listen
    assert started["admin"] == daemon.admin
    assert started["journal"] == str(tmp_path / "relay.db")
    assert (started["sync"], started["synchronous"]) == ("full", "full")
    assert (started["sources"], started["routes"], started["targets"]) == (1, 1, 2)
    assert started["pending"] == 0

    accepted = await daemon.wait_log("event.accepted")
    assert accepted is not None
    assert accepted["event_id"] == event_id
    assert accepted["source"] == "app"
    assert accepted["routes"] == ["app-out"]
    assert accepted["deliveries"] == 2
    assert accepted["bytes"] == len(body)
    assert is_number(accepted["ms"])

    succeeded = await daemon.wait_log("delivery.succeeded", target="svc")
    assert succeeded is not None
    assert succeeded["delivery_id"] == request.headers["webhook-id"]
    assert succeeded["event_id"] == event_id
    assert succeeded["route"] == "app-out"
    assert succeeded["attempt"] == 1
    assert succeeded["status"] == 200
    assert is_number(succeeded["ms"])
    logged_ok = await daemon.wait_log("delivery.succeeded", target="audit")
    assert logged_ok is not None
    assert {"delivery_id", "event_id", "route", "attempt", "status", "ms"} <= logged_ok.keys()
    assert logged_ok["delivery_id"] != succeeded["delivery_id"]

    # a `log:` target shows the headers it would send, sensitive values masked
    logged = await daemon.wait_log("delivery.logged")
    assert logged is not None
    headers = {name.lower(): value for name, value in logged["headers"].items()}
    assert headers["authorization"] == "***"
    assert headers["x-hub-signature-256"] == "***"
    assert headers["x-github-event"] == "pull_request"

    for name in ("relay.stopping", "relay.stopped"):
        stop_line = await daemon.wait_log(name)
        assert stop_line is not None, name
        assert (stop_line["pending"], stop_line["in_flight"]) == (0, 0), stop_line

    captured = orjson.dumps(daemon.lines).decode() + "".join(daemon.stderr)
    assert TOKEN not in captured
    assert SIGNATURE not in captured
    assert "deadbeef" not in captured


async def test_journald_gets_the_syslog_priority_of_each_line(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """Under journald (JOURNAL_STREAM names stdout's device and inode) error lines start
    with <3>: `journalctl -p err` works."""
    svc = await receivers()
    svc.default = (400, {}, b"no")
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = relay_config(tmp_path, svc.url)
    config = config.replace('listen = "127.0.0.1:0"', f'listen = "{listen}"')
    config = config.replace('admin = "127.0.0.1:0"', f'admin = "{admin}"')
    stdout = (tmp_path / "stdout").open("wb")  # the daemon's stdout, standing for journald's
    status = os.fstat(stdout.fileno())
    env = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}", "RELAY_TEST_TOKEN": "t"}
    daemon = await daemons(
        config,
        env=env,
        listen=listen,
        admin=admin,
        quiet=True,
        preexec=lambda: os.dup2(stdout.fileno(), 1),
    )
    stdout.close()
    _, reply, _ = await daemon.post("/hooks/app", {"x": 1})

    def written() -> dict[str, bytes] | None:
        raw_lines = (tmp_path / "stdout").read_bytes().splitlines()
        by_event = {orjson.loads(raw[3:])["event"]: raw for raw in raw_lines}
        dead = by_event.get("delivery.dead", b"")
        return by_event if reply["id"].encode() in dead else None

    by_event = await eventually(written)
    assert by_event["relay.started"].startswith(b"<6>{")
    assert by_event["delivery.dead"].startswith(b"<3>{")


async def test_journal_stream_that_is_not_stdout_gets_plain_json(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """With JOURNAL_STREAM inherited but stdout elsewhere (`relay run | jq` in a unit's
    shell), every line is plain JSON, without a `<N>` priority prefix."""
    env = {"JOURNAL_STREAM": "8:99999", "RELAY_TEST_TOKEN": "t"}
    daemon = await daemons(relay_config(tmp_path, "http://127.0.0.1:9/"), env=env)
    _, reply, _ = await daemon.post("/hooks/app", {"x": 1})
    await daemon.wait_log("event.accepted", event_id=reply["id"])
    assert daemon.raw_lines
    assert all(orjson.loads(raw)["event"] for raw in daemon.raw_lines)


async def test_credential_headers_are_masked_whatever_their_name(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A source's verify header, a target's signature header, and headers the config fills
    from ${...} (a target's `headers`, a route's `set_headers`) never reach the log in clear."""
    daemon = await daemons(
        server_toml(tmp_path)
        + """
[sources.app]
verify = { scheme = "token", header = "X-Shared-Pass", secret = "open-sesame-1234" }
[targets.audit]
url = "log:"
sign = { scheme = "hmac", secret = "k", header = "X-Out-Sig" }
headers = { "X-Ci" = "${CI_TOKEN}", "X-Plain" = "shown" }
[[routes]]
name = "r"
source = "app"
targets = ["audit"]
set_headers = { "X-Route" = "Bearer-ish ${ROUTE_TOKEN}" }
""",
        env={"CI_TOKEN": "citoken-5678", "ROUTE_TOKEN": "routetoken-9012"},
    )
    _, reply, _ = await daemon.post("/hooks/app", {"x": 1}, {"X-Shared-Pass": "open-sesame-1234"})
    logged = await daemon.wait_log("delivery.logged", event_id=reply["id"])
    headers = logged["headers"]
    assert headers["X-Shared-Pass"] == headers["X-Out-Sig"] == "***"
    assert headers["X-Ci"] == headers["X-Route"] == "***"
    assert headers["X-Plain"] == "shown"
    for secret in ("open-sesame-1234", "citoken-5678", "routetoken-9012"):
        assert not any(secret in str(line) for line in daemon.lines)


async def test_at_level_warning_only_failures_are_logged(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """With `level = "warning"` an accepted event and a delivered attempt write no line; a
    failed attempt still writes its `delivery.failed` warning with the usual fields."""
    receiver = await receivers()
    receiver.script.append((503, {}, b"busy"))
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = relay_config(tmp_path, receiver.url).replace('level = "debug"', 'level = "warning"')
    config = config.replace('listen = "127.0.0.1:0"', f'listen = "{listen}"')
    config = config.replace('admin = "127.0.0.1:0"', f'admin = "{admin}"')
    config = config.replace("[targets.svc]", '[targets.svc]\nretry = { first = "50ms" }')
    env = {"RELAY_TEST_TOKEN": TOKEN}
    daemon = await daemons(config, env=env, listen=listen, admin=admin, quiet=True)
    status, reply, _ = await daemon.post("/hooks/app", {"n": 1})
    assert status == 202
    failed = await daemon.wait_log("delivery.failed", event_id=reply["id"])
    assert (failed["level"], failed["status"], failed["attempt"]) == ("warning", 503, 1)
    await eventually(lambda: len(receiver.requests) == 2)  # the retry was delivered
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait() == 0
    names = {line["event"] for line in daemon.lines}
    assert "delivery.failed" in names
    assert names.isdisjoint({"event.accepted", "delivery.succeeded", "delivery.logged"})
    assert {line["level"] for line in daemon.lines} <= {"warning", "error", "critical"}
