"""End-to-end inbound: what senders get back for good and bad requests, from the real daemon."""

from __future__ import annotations

import asyncio
import re
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson

from conftest import Daemon, Receiver, eventually, server_toml

DaemonFactory = Callable[..., Awaitable[Daemon]]
ReceiverFactory = Callable[[], Awaitable[Receiver]]

STRICT_LIMITS = {"max_body": '"1KiB"', "read_timeout": '"300ms"', "idle_timeout": '"300ms"'}


def demo_config(tmp_path: Path, **server: str) -> str:
    return (
        server_toml(tmp_path, **server)
        + """
[sources.app]
[targets.console]
url = "log:"
[[routes]]
name = "app-to-console"
source = "app"
targets = ["console"]
"""
    )


async def raw_exchange(daemon: Daemon, request: bytes, timeout_s: float = 10) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it."""
    host, port = daemon.listen.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


async def test_accepted_webhook_replies_after_commit(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A 202 carries the event id, and the event is already in the journal when it arrives."""
    daemon = await daemons(demo_config(tmp_path))
    status, reply, headers = await daemon.post("/hooks/app", b'{"a": 1}')
    assert status == 202
    assert headers["Content-Type"].startswith("application/json")
    rows = daemon.query(
        "SELECT e.id, e.source, p.body, e.method, e.path"
        " FROM events e JOIN payloads p ON p.event_id = e.id"
    )
    assert rows == [(reply["id"], "app", b'{"a": 1}', "POST", "/hooks/app")]
    accepted = await daemon.wait_log("event.accepted", event_id=reply["id"])
    assert accepted is not None
    assert accepted["routes"] == ["app-to-console"]
    assert (accepted["deliveries"], accepted["bytes"]) == (1, 8)
    assert accepted["ms"] >= 0


async def test_unknown_path_and_wrong_method(tmp_path: Path, daemons: DaemonFactory) -> None:
    """An unknown path is a 404 and a GET on a POST-only source a 405, each with a reason."""
    daemon = await daemons(demo_config(tmp_path))
    status, reply, _ = await daemon.post("/hooks/nope", b"{}")
    assert (status, reply) == (404, {"error": "no source at /hooks/nope"})
    async with (
        aiohttp.ClientSession() as session,
        session.get(daemon.url("/hooks/app")) as response,
    ):
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await response.json())["error"] == "method GET not allowed at /hooks/app"
    rejected = await daemon.wait_log("event.rejected", status=405)
    assert rejected is not None
    assert rejected["source"] == "app"
    assert rejected["remote"] == "127.0.0.1"


async def test_broken_json_is_a_400(tmp_path: Path, daemons: DaemonFactory) -> None:
    """A body declared as JSON that does not parse gets a 400 naming the problem; nothing kept."""
    daemon = await daemons(demo_config(tmp_path))
    status, reply, _ = await daemon.post("/hooks/app", b'{"unterminated": ')
    assert status == 400
    assert reply["error"].startswith("body is not valid JSON")
    assert "\n" not in reply["error"]
    assert daemon.query("SELECT count(*) FROM events") == [(0,)]


async def test_non_json_bodies_are_accepted_as_sent(tmp_path: Path, daemons: DaemonFactory) -> None:
    """Form posts and plain text are accepted; the journal keeps the bytes exactly."""
    daemon = await daemons(demo_config(tmp_path))
    form = b"a=1&a=2&b=%FF"
    status, _, _ = await daemon.post(
        "/hooks/app", form, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 202
    status, _, _ = await daemon.post(
        "/hooks/app", b"\xff\xfe not utf-8", {"Content-Type": "text/plain"}
    )
    assert status == 202
    assert daemon.query("SELECT body FROM payloads ORDER BY event_id") == [
        (form,),
        (b"\xff\xfe not utf-8",),
    ]


async def test_declared_length_over_max_body_is_a_413(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A Content-Length over max_body is refused before the body is read."""
    daemon = await daemons(demo_config(tmp_path, **STRICT_LIMITS))
    status, reply, _ = await daemon.post("/hooks/app", b'{"pad": "' + b"x" * 2000 + b'"}')
    assert status == 413
    assert "exceeds max_body 1024" in reply["error"]


async def test_chunked_body_outgrowing_max_body_is_a_413(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A chunked body with no declared length is cut off with a 413 once it passes max_body."""
    daemon = await daemons(demo_config(tmp_path, **STRICT_LIMITS))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 512

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            daemon.url("/hooks/app"), data=chunks(), headers={"Content-Type": "text/plain"}
        ) as response,
    ):
        assert response.status == 413
    assert daemon.query("SELECT count(*) FROM events") == [(0,)]


async def test_stalled_body_is_a_408(tmp_path: Path, daemons: DaemonFactory) -> None:
    """A client that stops sending mid-body gets a 408 after read_timeout and is disconnected."""
    daemon = await daemons(demo_config(tmp_path, **STRICT_LIMITS))
    answer = await raw_exchange(
        daemon,
        b"POST /hooks/app HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"half": ',
    )
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"read_timeout" in answer
    assert daemon.query("SELECT count(*) FROM events") == [(0,)]


async def test_idle_and_slow_header_connections_are_closed(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """Connections that send nothing are closed at idle_timeout; one that never finishes its
    head gets a 408 naming idle_timeout (and a log line) first."""
    daemon = await daemons(demo_config(tmp_path, **STRICT_LIMITS))
    assert await raw_exchange(daemon, b"") == b""
    answer = await raw_exchange(daemon, b"POST /hooks/app HTTP/1.1\r\nHost: re")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"request head not received within idle_timeout" in answer
    assert await daemon.wait_log("event.rejected", status=408, source=None)
    assert await daemon.ready() == 200


async def test_bad_inputs_leave_the_daemon_ready(tmp_path: Path, daemons: DaemonFactory) -> None:
    """After garbage of several kinds the daemon still answers, and a good webhook still goes in."""
    daemon = await daemons(demo_config(tmp_path, **STRICT_LIMITS))
    garbage = [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"POST /hooks/app HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /hooks/app HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /hooks/app HTTP/1.1\r\n" + b"X-Pad: y\r\n" * 300 + b"\r\n",
        b"POST /hooks/app HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Type: application/json"
        b"\r\nContent-Length: 4\r\n\r\nnope",
    ]
    for request in garbage:
        answer = await raw_exchange(daemon, request)
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:80]
    status, _, _ = await daemon.post("/hooks/app", b'{"still": "fine"}')
    assert status == 202
    assert await daemon.ready() == 200


async def test_a_malformed_head_gets_a_reason_and_a_log_line(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A request the HTTP layer refuses (garbage, too many headers) gets a JSON 4xx with a
    one-line reason and an `event.rejected` line, like every other bad input."""
    daemon = await daemons(demo_config(tmp_path))
    answer = await raw_exchange(daemon, b"NOT HTTP AT ALL\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in head
    reason = orjson.loads(body)["error"]
    assert reason.startswith("malformed request")
    assert "\n" not in reason
    logged = await daemon.wait_log("event.rejected", status=400)
    assert logged is not None
    assert (logged["reason"], logged["remote"]) == (reason, "127.0.0.1")
    answer = await raw_exchange(
        daemon, b"POST /hooks/app HTTP/1.1\r\n" + b"X-Pad: y\r\n" * 300 + b"\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert await daemon.wait_log("event.rejected", status=431, reason="more than 100 headers")


async def test_odd_but_valid_requests_are_taken_whole(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A POST asking for a protocol upgrade (as `curl --http2` does) is journaled with its
    body; a path with escapes that are not UTF-8 is a plain 404 naming it, not a 500."""
    daemon = await daemons(demo_config(tmp_path))
    answer = await raw_exchange(
        daemon,
        b"POST /hooks/app HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
        b'Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{"curl":1}',
    )
    assert answer.startswith(b"HTTP/1.1 202 ")
    assert daemon.query("SELECT body FROM payloads") == [(b'{"curl":1}',)]
    status, reply, _ = await daemon.post("/hooks/de%FFmo", b"{}")
    assert (status, reply) == (404, {"error": "no source at /hooks/de%FFmo"})


async def test_the_query_string_is_journaled_raw(tmp_path: Path, daemons: DaemonFactory) -> None:
    """The journal keeps the query string as sent, `+` and escapes intact."""
    daemon = await daemons(demo_config(tmp_path))
    status, _, _ = await daemon.post("/hooks/app?a=x%26b+c&d=1", b"{}")
    assert status == 202
    assert daemon.query("SELECT query FROM events") == [("a=x%26b+c&d=1",)]


async def test_journal_failure_is_a_503_and_not_ready_until_it_recovers(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """When the disk refuses writes: 503 with Retry-After, /readyz 503, the daemon stays up."""
    daemon = await daemons(demo_config(tmp_path, max_body='"4MiB"'))
    await daemon.wait_log("journal.checkpointed")  # the WAL restarts at the next write
    big = orjson.dumps({"pad": "x" * 300_000})  # the largest write yet: it ends the WAL file
    assert (await daemon.post("/hooks/app", big))[0] == 202
    assert daemon.process is not None
    pid = daemon.process.pid
    # The kernel now refuses to grow the WAL (EFBIG), as a full disk would: every write fails.
    limit = (tmp_path / "relay.db-wal").stat().st_size
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    status, reply, headers = await daemon.post("/hooks/app", orjson.dumps({"pad": "x" * 3_000_000}))
    assert status == 503
    assert headers["Retry-After"] == "5"
    assert reply == {"error": "journal unavailable, try again later"}
    assert await daemon.ready() == 503
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    await eventually(lambda: _is_ready(daemon))
    status, reply, _ = await daemon.post("/hooks/app", orjson.dumps({"pad": "x" * 3_000_000}))
    assert status == 202
    assert daemon.query("SELECT count(*) FROM events") == [(2,)]
    assert daemon.query("PRAGMA integrity_check") == [("ok",)]


async def test_a_disk_that_takes_only_small_writes_is_not_ready(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """When a nearly full disk still takes small writes but refuses a sender's large one,
    /readyz stays 503 (its probe writes as much as the write that failed, not a few bytes,
    and small events that do commit do not count) until a write that large would fit."""
    daemon = await daemons(demo_config(tmp_path, max_body='"4MiB"'))
    assert (await daemon.post("/hooks/app", b'{"first": true}'))[0] == 202
    assert daemon.process is not None
    pid = daemon.process.pid
    room = (tmp_path / "relay.db-wal").stat().st_size + 200_000  # not enough for 3 MB
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
    large = orjson.dumps({"pad": "x" * 3_000_000})
    assert (await daemon.post("/hooks/app", large))[0] == 503
    assert await daemon.ready() == 503
    assert (await daemon.post("/hooks/app", b'{"small": true}'))[0] == 202
    assert await daemon.ready() == 503
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    await eventually(lambda: _is_ready(daemon))
    assert (await daemon.post("/hooks/app", large))[0] == 202
    assert daemon.query("SELECT count(*) FROM events") == [(3,)]
    assert daemon.query("PRAGMA integrity_check") == [("ok",)]


async def test_a_503_from_the_journal_is_one_error_line(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A webhook refused because the journal cannot be written logs one line, like any
    request: `event.rejected` with status 503, at level error, carrying the journal's
    error (`journalctl -p err` finds it), and no second `journal.write_failed` line."""
    daemon = await daemons(demo_config(tmp_path, max_body='"4MiB"'))
    _, first, _ = await daemon.post("/hooks/app", b'{"first": true}')
    await daemon.wait_log("delivery.succeeded", event_id=first["id"])
    assert daemon.process is not None
    room = (tmp_path / "relay.db-wal").stat().st_size + 200_000  # not enough for 3 MB
    resource.prlimit(daemon.process.pid, resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
    count = len(daemon.lines)
    assert (await daemon.post("/hooks/app", orjson.dumps({"pad": "x" * 3_000_000})))[0] == 503
    rejected = await daemon.wait_log("event.rejected", after=count, status=503)
    assert rejected["level"] == "error"
    assert rejected["reason"] == "journal unavailable, try again later"
    assert rejected["error"]
    assert (rejected["source"], rejected["remote"]) == ("app", "127.0.0.1")
    # The lines of a request are written in one turn: another would be here by now.
    about_events = [line for line in daemon.lines[count:] if "event_id" in line]
    assert about_events == [], about_events  # the old second line named the event's id


async def _is_ready(daemon: Daemon) -> bool:
    return await daemon.ready() == 200


async def test_undecodable_headers_and_lone_surrogates_do_not_break_the_journal(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """A Latin-1 header value, or a JSON key value with a lone surrogate, is still journaled."""
    daemon = await daemons(
        demo_config(tmp_path).replace(
            "[sources.app]", '[sources.app]\ndedupe = { key = "body.k", window = "1h" }'
        )
    )
    answer = await raw_exchange(
        daemon,
        b"POST /hooks/app HTTP/1.1\r\nHost: relay\r\nX-Name: caf\xe9\xff\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    assert answer.startswith(b"HTTP/1.1 202")
    status, _, _ = await daemon.post("/hooks/app", b'{"k": "\\ud800"}')
    assert status == 202
    status, _, _ = await daemon.post("/hooks/app", b'{"k": "after"}')
    assert status == 202
    assert daemon.query("SELECT count(*) FROM events") == [(3,)]
    assert await daemon.ready() == 200
    stored = [orjson.loads(h) for (h,) in daemon.query("SELECT headers FROM payloads")]
    assert ["X-Name", "caf\ufffd\ufffd"] in stored[0]  # one U+FFFD for each byte


async def test_text_with_lone_surrogates_is_stored_with_replacement_characters(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """Valid JSON carrying a lone surrogate reaches the journal with U+FFFD in its place
    wherever relay stores text derived from it: a filter's error (a 202, not a 503 for
    every retry) and a dedupe key computed from an object (not a 500)."""
    daemon = await daemons(
        server_toml(tmp_path)
        + """
[sources.app]
dedupe = { key = "body.id" }
[targets.console]
url = "log:"
[[routes]]
name = "big"
source = "app"
filter = "abs(body.amount) > `100`"
targets = ["console"]
"""
    )
    status, reply, _ = await daemon.post("/hooks/app", b'{"amount": "\\ud800"}')
    assert (status, reply["deliveries"]) == (202, 0)
    (routes,) = daemon.query("SELECT routes FROM events WHERE id = ?", (reply["id"],))[0]
    [decision] = orjson.loads(routes)
    assert decision["matched"] is False
    assert "\ufffd" in decision["error"]
    first = await daemon.post("/hooks/app", b'{"id": {"k": "\\ud800"}, "amount": 500}')
    again = await daemon.post("/hooks/app", b'{"id": {"k": "\\ud800"}, "amount": 500}')
    assert (first[0], again[0], again[1]["id"]) == (202, 200, first[1]["id"])
    assert daemon.query("SELECT dedupe_key FROM events WHERE id = ?", (first[1]["id"],)) == [
        ('{"k":"\ufffd"}',)
    ]


async def test_a_failing_journal_does_not_make_a_lane_resend_in_a_loop(
    tmp_path: Path, daemons: DaemonFactory, receivers: ReceiverFactory
) -> None:
    """When an attempt's outcome cannot be written, the lane holds off instead of re-sending."""
    svc = await receivers()
    svc.gate = asyncio.Event()
    daemon = await daemons(
        server_toml(tmp_path, max_body='"4MiB"')
        + f"""
[sources.app]
[targets.svc]
url = "{svc.url}"
[[routes]]
name = "r"
source = "app"
targets = ["svc"]
"""
    )
    await daemon.wait_log("journal.checkpointed")
    _, reply, _ = await daemon.post("/hooks/app", orjson.dumps({"pad": "x" * 300_000}))
    await eventually(lambda: svc.current == 1)
    assert daemon.process is not None
    limit = (tmp_path / "relay.db-wal").stat().st_size
    resource.prlimit(daemon.process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    count = len(daemon.lines)
    svc.gate.set()  # the answer comes; recording it fails
    await daemon.wait_log("journal.write_failed", after=count)
    await eventually(lambda: len(svc.requests) >= 2)  # attempted again, once, after holding off
    assert svc.requests[1].at - svc.requests[0].at >= 1.5
    assert len(svc.requests) <= 3
    resource.prlimit(daemon.process.pid, resource.RLIMIT_FSIZE, (-1, -1))
    await daemon.wait_log("delivery.succeeded", event_id=reply["id"])


async def test_an_ack_status_of_204_is_answered_without_a_body(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    """With `ack_status = 204` the event is journaled and the reply is a bare 204: no body
    (HTTP allows none, so the event id is not sent) and no Content-Type claiming JSON."""
    daemon = await daemons(
        demo_config(tmp_path).replace("[sources.app]", "[sources.app]\nack_status = 204")
    )
    answer = await raw_exchange(
        daemon,
        b"POST /hooks/app HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert b"content-type" not in head.lower()
    assert body == b""
    assert daemon.query("SELECT count(*) FROM events") == [(1,)]
