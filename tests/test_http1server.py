"""relay's inbound HTTP/1.1 server against raw sockets on 127.0.0.1.

Each test starts a real `http1server.Server` with a small handler and talks to it with
the exact bytes a sender could put on the wire: framing, limits, pipelining, slow and
vanishing senders, and shutdown are what a real socket delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from unittest.mock import ANY

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import http1server
from relay.http1server import (
    MAX_HEAD_BYTES,
    MAX_QUEUED,
    Refused,
    Request,
    Response,
    Server,
)

from conftest import eventually

Handler = Callable[[Request], Awaitable[Response]]


class Harness:
    """A running server; what its handler saw; what it refused."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.bodies: list[bytes] = []
        self.refused: list[Refused] = []
        self.server: Server | None = None
        self.port = 0

    async def start(self, handler: Handler | None = None, idle_timeout_s: float = 5.0) -> None:
        self.server = Server(handler or self.echo, self.on_refused, idle_timeout_s=idle_timeout_s)
        _, self.port = await self.server.start("127.0.0.1", 0)

    def on_refused(self, remote: str | None, refused: Refused) -> Response:
        self.refused.append(refused)
        return Response(refused.status, orjson.dumps({"error": refused.reason}))

    async def echo(self, request: Request) -> Response:
        """Reads the whole body and answers 202 with what it received."""
        self.seen.append(request)
        try:
            body = request.body.take() if request.body.complete else await read_all(request)
        except Refused as refused:  # the body's framing broke: answered (and logged) here
            self.refused.append(refused)
            return Response(refused.status, orjson.dumps({"error": refused.reason}))
        self.bodies.append(body)
        reply = {"path": request.path, "query": request.query_string, "bytes": len(body)}
        return Response(202, orjson.dumps(reply), (("Content-Type", "application/json"),))

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def read_all(request: Request) -> bytes:
    chunks = []
    while chunk := await request.body.read():
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    running = Harness()
    yield running
    if running.server is not None:
        await running.server.close(1.0)


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One reply: status, headers (lower-cased names), body (by Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed the connection (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(65536), 5) == b""
    except ConnectionError:
        return True


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: relay", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_keep_alive_serves_requests_one_after_another(harness: Harness) -> None:
    """Two requests on one connection are both answered, and the connection stays open."""
    await harness.start()
    reader, writer = await harness.connect()
    for n in range(2):
        writer.write(post("/hooks/a", b'{"n": %d}' % n))
        status, headers, body = await read_reply(reader)
        assert status == 202
        assert "connection" not in headers
        assert orjson.loads(body)["bytes"] == 8
        assert "date" in headers
    writer.close()


async def test_pipelined_requests_are_answered_in_order(harness: Harness) -> None:
    """Requests sent together are answered in the order sent, even when the first is slower."""
    order: list[str] = []

    async def slow_first(request: Request) -> Response:
        if request.path == "/first":
            await asyncio.sleep(0.05)  # the handler's own work, not a wait for the test
        order.append(request.path)
        return Response(200, request.path.encode())

    await harness.start(slow_first)
    reader, writer = await harness.connect()
    writer.write(post("/first", b"1") + post("/second", b"2") + post("/third", b"3"))
    bodies = [(await read_reply(reader))[2] for _ in range(3)]
    assert bodies == [b"/first", b"/second", b"/third"]
    assert order == ["/first", "/second", "/third"]
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (post("/a", b"{}", *(f"X-H{n}: v" for n in range(101))), 431, "more than 100 headers"),
        (post("/a", b"{}", "X-Big: " + "y" * 9000), 431, "a header over 8190 bytes"),
        (post("/" + "p" * 9000, b"{}"), 414, "request target over 8190 bytes"),
        (b"NOT A REQUEST\r\n\r\n", 400, "malformed request"),
        (b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, ""),
        (
            b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "",
        ),
    ],
    ids=["headers", "field", "target", "garbage", "two-lengths", "length-and-chunked"],
)
async def test_a_request_the_parser_refuses_gets_a_4xx_and_the_connection_closes(
    harness: Harness, request_bytes: bytes, status: int, reason: str
) -> None:
    """Over a limit or malformed (smuggling shapes included): a 4xx with a one-line JSON
    reason, handed to `on_refused` for the log; the handler never sees it; then closed."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(request_bytes)
    got_status, headers, body = await read_reply(reader)
    assert got_status == status
    assert headers["connection"] == "close"
    assert reason in orjson.loads(body)["error"]
    assert "\n" not in orjson.loads(body)["error"]
    assert [r.status for r in harness.refused] == [status]
    assert harness.seen == []
    assert await closed(reader)


async def test_a_head_over_the_limit_in_small_packets_is_refused(harness: Harness) -> None:
    """A head that keeps growing packet by packet is refused once past MAX_HEAD_BYTES."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(b"POST /a HTTP/1.1\r\n")
    sent = 0
    while sent <= MAX_HEAD_BYTES and not reader.at_eof():
        line = b"X-Pad-%d: %s\r\n" % (sent, b"v" * 1000)
        writer.write(line)
        await writer.drain()
        sent += len(line)
        if len(harness.refused):
            break
    await eventually(lambda: harness.refused)
    assert harness.refused[0].status in (431,)
    assert harness.seen == []
    writer.close()


async def test_a_head_that_never_completes_is_closed_after_the_idle_timeout(
    harness: Harness,
) -> None:
    """A sender that starts a head and goes silent gets a 408 naming idle_timeout (and a log
    line, through `on_refused`) and is disconnected after idle_timeout_s."""
    await harness.start(idle_timeout_s=0.2)
    reader, writer = await harness.connect()
    writer.write(b"POST /a HTTP/1.1\r\nHost: relay\r\n")
    status, headers, body = await read_reply(reader)
    assert (status, headers["connection"]) == (408, "close")
    assert orjson.loads(body)["error"] == "request head not received within idle_timeout 0.2s"
    assert await closed(reader)
    assert harness.seen == []


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    harness: Harness,
) -> None:
    """After its reply, a connection that sends nothing more is closed after idle_timeout_s."""
    await harness.start(idle_timeout_s=0.2)
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}"))
    assert (await read_reply(reader))[0] == 202
    assert await closed(reader)


async def test_a_chunked_body_reaches_the_handler_whole(harness: Harness) -> None:
    """Transfer-Encoding: chunked is decoded; the handler gets the body's bytes."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"a"\r\n3;ext=1\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n'
    )
    status, _, _ = await read_reply(reader)
    assert status == 202
    assert harness.bodies == [b'{"a": 1}']
    assert harness.seen[0].content_length is None
    writer.close()


async def test_a_body_arriving_slowly_is_read_as_it_comes(harness: Harness) -> None:
    """The handler starts with the head; the body's parts reach it as they arrive."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(b"POST /a HTTP/1.1\r\nHost: relay\r\nContent-Length: 6\r\n\r\nabc")
    await eventually(lambda: harness.seen)
    assert not harness.seen[0].body.complete
    writer.write(b"def")
    assert (await read_reply(reader))[0] == 202
    assert harness.bodies == [b"abcdef"]
    writer.close()


async def test_expect_100_continue_is_answered_before_the_body(harness: Harness) -> None:
    """A sender that waits for `100 Continue` gets it when the handler reads the body."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: relay\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"{}")
    assert (await read_reply(reader))[0] == 202
    assert harness.bodies == [b"{}"]
    writer.close()


async def test_a_reply_before_the_body_ends_closes_the_connection(harness: Harness) -> None:
    """A handler that answers without reading the body (a 404, a 413): `Connection: close`,
    the rest of the body is dropped, and the connection ends."""

    async def early(request: Request) -> Response:
        harness.seen.append(request)
        return Response(404, b'{"error": "no source"}')

    await harness.start(early)
    reader, writer = await harness.connect()
    writer.write(b"POST /nowhere HTTP/1.1\r\nHost: relay\r\nContent-Length: 100000\r\n\r\nxx")
    status, headers, _ = await read_reply(reader)
    assert status == 404
    assert headers["connection"] == "close"
    writer.write(b"y" * 100)  # the sender goes on for a while; it is read and dropped
    assert await closed(reader)


async def test_http_1_0_and_connection_close_end_the_connection(harness: Harness) -> None:
    """HTTP/1.0 without keep-alive, or `Connection: close`: answered, then closed."""
    await harness.start()
    for request in (
        b"POST /a HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
        post("/a", b"{}", "Connection: close"),
    ):
        reader, writer = await harness.connect()
        writer.write(request)
        status, headers, _ = await read_reply(reader)
        assert (status, headers["connection"]) == (202, "close")
        assert await closed(reader)
        writer.close()


async def test_head_replies_carry_no_body(harness: Harness) -> None:
    """A HEAD request's reply has its Content-Length but no body; the next reply follows."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(b"HEAD /a HTTP/1.1\r\nHost: relay\r\n\r\n" + post("/b", b"{}"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 202 ")
    assert b"Content-Length: " in head
    status, _, body = await read_reply(reader)  # the next reply starts right after the head
    assert status == 202
    assert orjson.loads(body)["path"] == "/b"
    writer.close()


async def test_target_and_headers_are_decoded_as_documented(harness: Harness) -> None:
    """The path is percent-decoded, the query kept raw, absolute-form targets reduced to
    their path, and header bytes that are not UTF-8 kept as surrogates (never an error)."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(
        b"POST http://relay.example/hooks/de%6Do?a=x%26b+c&a=2 HTTP/1.1\r\nHost: relay\r\n"
        b"X-Latin: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n"
    )
    assert (await read_reply(reader))[0] == 202
    request = harness.seen[0]
    assert request.path == "/hooks/demo"
    assert request.query_string == "a=x%26b+c&a=2"
    assert request.query.getall("a") == ["x&b c", "2"]
    assert request.headers["X-Latin"] == "caf\udce9"
    assert request.headers["x-utf8"] == "café"
    assert request.remote == "127.0.0.1"
    writer.close()


async def test_a_sender_that_vanishes_mid_body_fails_the_read(harness: Harness) -> None:
    """The handler waiting for a body whose sender hung up gets a ConnectionError."""
    errors: list[Exception] = []

    async def reader_of_body(request: Request) -> Response:
        try:
            await read_all(request)
        except ConnectionError as error:
            errors.append(error)
        return Response(400, b"")

    await harness.start(reader_of_body)
    _, writer = await harness.connect()
    writer.write(b"POST /a HTTP/1.1\r\nHost: relay\r\nContent-Length: 10\r\n\r\nabc")
    await writer.drain()
    writer.transport.abort()
    await eventually(lambda: errors)
    await eventually(lambda: not harness.server or not harness.server.connections)


async def test_a_request_in_flight_finishes_through_close(harness: Harness) -> None:
    """`close` stops accepting and closes idle connections at once, but a request under way
    is answered before its connection ends."""
    release = asyncio.Event()

    async def held(request: Request) -> Response:
        harness.seen.append(request)
        await release.wait()
        return Response(202, b"done")

    await harness.start(held)
    idle_reader, idle_writer = await harness.connect()
    busy_reader, busy_writer = await harness.connect()
    busy_writer.write(post("/a", b"{}"))
    await eventually(lambda: harness.seen)
    assert harness.server is not None
    closing = asyncio.create_task(harness.server.close(5.0))
    assert await closed(idle_reader)
    with pytest.raises(ConnectionRefusedError):
        await harness.connect()
    release.set()
    status, headers, body = await read_reply(busy_reader)
    assert (status, body, headers["connection"]) == (202, b"done", "close")
    await asyncio.wait_for(closing, 5)
    assert await closed(busy_reader)
    idle_writer.close()
    busy_writer.close()


async def test_a_handler_error_is_a_500_and_the_connection_survives(harness: Harness) -> None:
    """A bug in the handler answers 500 (through `on_refused`, for the log), not silence."""
    calls = 0

    async def buggy(request: Request) -> Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        return Response(202, b"ok")

    await harness.start(buggy)
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}") + post("/a", b"{}"))
    assert (await read_reply(reader))[0] == 500
    assert (await read_reply(reader))[0] == 202
    assert [r.status for r in harness.refused] == [500]
    writer.close()


async def test_an_upgrade_request_is_answered_as_http_1_1_with_its_body(
    harness: Harness,
) -> None:
    """`Connection: Upgrade` (curl --http2 sends it) switches nothing: the handler gets the
    whole body, as in a packet of its own, and the connection closes after the reply."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Length: 10\r\n\r\n"
        b'{"cu'
    )
    await eventually(lambda: harness.seen)
    writer.write(b'rl":1}')
    status, headers, _ = await read_reply(reader)
    assert (status, headers["connection"]) == (202, "close")
    assert harness.bodies == [b'{"curl":1}']
    assert await closed(reader)


async def test_unusual_but_valid_heads(harness: Harness) -> None:
    """Escapes that are not UTF-8 leave the path as sent; trailing blanks of a header value
    are not part of it; an HTTP/1.0 request kept alive is told so and gets no 100."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(
        b"POST /hooks/de%FFmo HTTP/1.1\r\nHost: relay\r\nX-Sig: sha256=ab \t\r\n"
        b"Content-Length: 0\r\n\r\n"
        b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    assert (await read_reply(reader))[0] == 202
    status, headers, _ = await read_reply(reader)
    assert (status, headers["connection"]) == (202, "keep-alive")
    assert harness.seen[0].path == "/hooks/de%FFmo"
    assert harness.seen[0].headers["X-Sig"] == "sha256=ab"
    writer.write(post("/b", b"{}"))  # still open
    assert (await read_reply(reader))[0] == 202
    writer.close()


async def test_an_http_1_1_request_without_host_is_a_400(harness: Harness) -> None:
    """RFC 9112 requires Host in HTTP/1.1: without it, a 400 and nothing handled."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(b"POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    status, _, body = await read_reply(reader)
    assert status == 400
    assert orjson.loads(body)["error"] == "a request needs exactly one Host (RFC 9112)"
    assert harness.seen == []


async def test_a_broken_chunk_fails_the_body_under_way_at_once(harness: Harness) -> None:
    """A chunked body whose framing breaks mid-way fails the handler's read with the
    refusal (a 400), instead of leaving it to wait for the read timeout."""
    failures: list[Refused] = []

    async def reading(request: Request) -> Response:
        try:
            await read_all(request)
        except Refused as refused:
            failures.append(refused)
            return Response(refused.status, b"")
        return Response(202, b"")

    await harness.start(reading)
    reader, writer = await harness.connect()
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
    )
    writer.write(b"zz\r\n")
    status, headers, _ = await read_reply(reader)
    assert (status, headers["connection"]) == (400, "close")
    assert [f.status for f in failures] == [400]
    assert harness.refused == []  # logged once, by the handler that answered it
    assert await closed(reader)


async def test_no_content_replies_carry_no_body(harness: Harness) -> None:
    """A 204 (a source's ack_status may be 204) has neither body nor Content-Length, so
    the sender's client reads the next reply where it starts."""

    async def no_content(request: Request) -> Response:
        return Response(204, b'{"id": "evt_x", "deliveries": 1}')

    await harness.start(no_content)
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}") + post("/a", b"{}"))
    for _ in range(2):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 204 No Content\r\n")
        assert b"Content-Length" not in head
    writer.close()


async def test_a_full_pipeline_of_early_replies_does_not_stall_the_next_body(
    harness: Harness,
) -> None:
    """More pipelined requests than are parsed ahead, answered without reading their
    bodies, then one whose body comes later: reading resumes and that body arrives."""

    async def early_or_read(request: Request) -> Response:
        if request.path == "/nope":
            return Response(404, b"")
        body = request.body.take() if request.body.complete else await read_all(request)
        return Response(202, body)

    await harness.start(early_or_read)
    reader, writer = await harness.connect()
    nope = b"GET /nope HTTP/1.1\r\nHost: relay\r\n\r\n"
    writer.write(nope * 20 + b"POST /a HTTP/1.1\r\nHost: relay\r\nContent-Length: 2\r\n\r\n")
    statuses = [(await read_reply(reader))[0] for _ in range(20)]
    assert statuses == [404] * 20
    writer.write(b"{}")
    assert await read_reply(reader) == (202, {"content-length": "2", "date": ANY}, b"{}")
    writer.close()


async def test_a_sender_that_never_reads_its_replies_is_cut_off(harness: Harness) -> None:
    """Replies piling up unread stop the reading of more requests, and the connection is
    aborted after idle_timeout_s instead of waiting for the sender for ever."""

    async def large(request: Request) -> Response:
        harness.seen.append(request)
        return Response(200, b"x" * 256 * 1024)

    await harness.start(large, idle_timeout_s=0.3)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", harness.port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(post("/a", b"{}") * 64)
    await eventually(lambda: harness.seen)
    assert harness.server is not None
    assert harness.server.connections
    await eventually(lambda: harness.server is not None and not harness.server.connections)
    writer.close()


# ---------------------------------------------------------------- review 3


async def test_a_sender_that_half_closes_after_its_request_gets_the_reply(
    harness: Harness,
) -> None:
    """A request sent whole, then a half-close (shutdown(SHUT_WR)): answered, then closed."""

    async def slow_echo(request: Request) -> Response:
        await asyncio.sleep(0.05)  # the journal write: the EOF is read meanwhile
        return await harness.echo(request)

    await harness.start(slow_echo)
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}") + post("/b", b"[]"))
    writer.write_eof()
    assert (await read_reply(reader))[0] == 202
    assert (await read_reply(reader))[0] == 202
    assert await closed(reader)
    assert harness.bodies == [b"{}", b"[]"]


async def test_trailers_are_bounded_like_a_head(harness: Harness) -> None:
    """A trailer field that never ends is refused once past MAX_HEAD_BYTES (httptools
    gathers a field whole, so it would otherwise grow until read_timeout)."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nX-T: "
    )
    for _ in range(8):
        writer.write(b"a" * 32768)
        await writer.drain()
        if harness.refused:
            break
    await eventually(lambda: harness.refused)
    assert harness.refused[0].status == 431
    with contextlib.suppress(ConnectionError):  # closed after the echo handler's reply
        await asyncio.wait_for(reader.read(), 5)
    assert reader.at_eof()


async def test_a_head_over_the_limit_in_one_read_is_refused(harness: Harness) -> None:
    """The limit on a head holds whatever way it is cut into reads."""
    await harness.start()
    reader, writer = await harness.connect()
    fields = [f"X-Pad-{n}: {'v' * 8000}" for n in range(9)]  # ~72 KB
    writer.write(post("/a", b"{}", *fields))
    assert (await read_reply(reader))[0] == 431
    assert harness.seen == []


async def test_a_pipelined_head_is_not_charged_for_the_body_before_it(
    harness: Harness,
) -> None:
    """A read holding the end of a 100 KB body and the start of the next head is no 431."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(post("/a", b"x" * 100_000) + b"POST /b HTTP/1.1\r\nHo")
    await asyncio.sleep(0.2)
    writer.write(b"st: relay\r\nContent-Length: 2\r\n\r\n{}")
    assert (await read_reply(reader))[0] == 202
    assert (await read_reply(reader))[0] == 202
    assert harness.refused == []


async def test_an_upgrade_behind_a_request_is_answered_after_it(harness: Harness) -> None:
    """A pipelined Upgrade request is answered (then the connection closes); the request
    ahead of it is answered first and kept alive."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}") + post("/b", b"[1]", "Connection: Upgrade", "Upgrade: h2c"))
    status, headers, _ = await read_reply(reader)
    assert (status, headers.get("connection")) == (202, None)
    status, headers, _ = await read_reply(reader)
    assert (status, headers.get("connection")) == (202, "close")
    assert await closed(reader)
    assert harness.bodies == [b"{}", b"[1]"]


async def test_an_upgrade_request_expecting_100_continue_gets_it(harness: Harness) -> None:
    await harness.start()
    reader, writer = await harness.connect()
    head = post("/a", b"", "Connection: Upgrade", "Upgrade: h2c", "Expect: 100-continue")
    writer.write(head.replace(b"Content-Length: 0", b"Content-Length: 2"))
    assert (
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"{}")
    assert (await read_reply(reader))[0] == 202


async def test_more_garbage_after_a_refusal_does_not_cut_the_reply_under_way(
    harness: Harness,
) -> None:
    """The request under way is answered even when more bytes follow the refused ones."""
    gate = asyncio.Event()

    async def slow(request: Request) -> Response:
        harness.seen.append(request)
        await gate.wait()  # the journal write, say
        return Response(202, b"committed")

    await harness.start(slow)
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}"))
    await eventually(lambda: harness.seen)
    writer.write(b"NOT HTTP\r\n\r\n")
    assert harness.server is not None  # the refusal is logged when it is sent, after the 202
    await eventually(lambda: any(c._refusal for c in harness.server.connections))
    writer.write(b"more\r\n")
    await writer.drain()
    gate.set()
    status, headers, body = await read_reply(reader)
    assert (status, body, "connection" in headers) == (202, b"committed", False)
    status, headers, _ = await read_reply(reader)  # then the refusal, and the end
    assert (status, headers["connection"]) == (400, "close")
    assert await closed(reader)


async def test_trailers_are_not_taken_for_headers(harness: Harness) -> None:
    """Fields after a chunked body (trailers) are read and dropped: the handler's headers
    are the head's alone, so nothing a sender appends later is journaled as one."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nX-Trailer: late\r\n\r\n"
    )
    assert (await read_reply(reader))[0] == 202
    request = harness.seen[0]
    assert [name for name, _ in request.header_pairs] == ["Host", "Transfer-Encoding"]
    assert "X-Trailer" not in request.headers
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"POST /a HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 0\r\n\r\n", "one Host"),
        (b"GET /\r\n\r\n", "HTTP version 0.9 not supported"),
    ],
    ids=["two-hosts", "http-0.9"],
)
async def test_heads_that_do_not_name_one_host_or_a_known_version_are_400s(
    harness: Harness, request_bytes: bytes, reason: str
) -> None:
    """Two Host headers (RFC 9112), or an HTTP version other than 1.0 and 1.1: a 400."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(request_bytes)
    status, _, body = await read_reply(reader)
    assert status == 400
    assert reason in orjson.loads(body)["error"]
    assert harness.seen == []
    writer.close()


async def test_a_read_of_many_tiny_requests_is_taken_only_in_part(harness: Harness) -> None:
    """Hundreds of requests pipelined in one write: the first MAX_QUEUED are answered in
    order, the rest refused (429, logged) and the connection closed, so one read cannot
    queue thousands of requests."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n" * (MAX_QUEUED * 4))
    statuses = []
    while not reader.at_eof() and len(statuses) <= MAX_QUEUED * 4:
        try:
            statuses.append((await read_reply(reader))[0])
        except asyncio.IncompleteReadError:
            break
    assert statuses == [202] * MAX_QUEUED + [429]
    assert [r.status for r in harness.refused] == [429]
    writer.close()


async def test_a_pipelined_head_after_chunk_framing_in_one_read_is_no_431(
    harness: Harness,
) -> None:
    """(review 4) A read holding ~70 KB of chunk framing and the start of the next head:
    the framing is no part of that head."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(b"POST /a HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"1\r\na\r\n" * 14_000 + b"0\r\n\r\n" + b"POST /b HTTP/1.1\r\nHost: relay\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(b"Content-Length: 2\r\n\r\n{}")
    assert (await read_reply(reader))[0] == 202
    assert (await read_reply(reader))[0] == 202
    assert harness.refused == []


async def test_a_sender_half_closing_during_the_linger_cannot_outlive_the_deadline() -> None:
    """(review 4) A closing connection whose replies are unread is aborted in the end, even
    when the sender half-closes while it lingers (asyncio then closes the transport)."""
    big = b"x" * (16 << 20)

    async def large(request: Request) -> Response:
        return Response(200, big)

    harness = Harness()
    await harness.start(large, idle_timeout_s=0.5)
    assert harness.server is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", harness.port))
        sock.send(b"GET / HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        await eventually(lambda: any(c._lingering for c in harness.server.connections))
        sock.shutdown(socket.SHUT_WR)  # and never reads
        await eventually(lambda: not harness.server.connections, timeout_s=4)
    finally:
        sock.close()
        await harness.server.close(1.0)


async def test_a_head_begun_late_in_the_idle_time_gets_its_own_idle_timeout(
    harness: Harness,
) -> None:
    """A pooled connection reused just before its idle deadline: the head's time starts
    with its first byte, so a head that takes a moment is not a 408."""
    await harness.start(idle_timeout_s=0.5)
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}"))
    assert (await read_reply(reader))[0] == 202
    await asyncio.sleep(0.4)  # pacing the sender, not waiting for the server
    request = post("/b", b"{}")
    writer.write(request[:20])
    await asyncio.sleep(0.2)
    writer.write(request[20:])
    assert (await read_reply(reader))[0] == 202
    writer.close()


async def test_bytes_after_a_request_that_closes_are_ignored(harness: Harness) -> None:
    """After `Connection: close`, what else the sender wrote is no request: no refusal is
    logged for it, and the reply goes out as usual (RFC 9112, 9.6)."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}", "Connection: close") + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await read_reply(reader)
    assert (status, headers["connection"]) == (202, "close")
    assert await closed(reader)
    assert harness.refused == []


async def test_a_refusal_behind_a_reply_that_closes_is_not_logged(harness: Harness) -> None:
    """Bad bytes pipelined behind a request whose reply closes the connection (a 413 from
    the handler) are never answered: no refusal is logged or counted for them."""

    async def too_big(request: Request) -> Response:
        return Response(413, b"{}", close=True)

    await harness.start(too_big)
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}") + b"BAD\r\n\r\n")
    status, headers, _ = await read_reply(reader)
    assert (status, headers["connection"]) == (413, "close")
    assert await closed(reader)
    assert harness.refused == []


async def test_a_content_length_with_many_leading_zeros_is_taken(harness: Harness) -> None:
    """1*DIGIT (RFC 9110): leading zeros are allowed; Python's int() refuses > 4300 digits."""
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"0" * 5000 + b"2\r\n\r\n{}")
    status, _, _ = await read_reply(reader)
    assert status == 202
    assert harness.bodies == [b"{}"]
    assert harness.seen[0].content_length == 2


async def test_a_bug_in_a_parser_callback_is_a_500_not_a_bad_request(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error inside the server's own parsing code is reported as what it is
    (a 500 naming it, through `on_refused` for the log), not blamed on the sender."""

    def broken(target: bytes) -> tuple[str, str]:
        raise RuntimeError("bug")

    monkeypatch.setattr(http1server, "_split_target", broken)
    await harness.start()
    reader, writer = await harness.connect()
    writer.write(post("/a", b"{}"))
    status, _, body = await read_reply(reader)
    assert status == 500
    assert "RuntimeError('bug')" in orjson.loads(body)["error"]
    assert [r.status for r in harness.refused] == [500]
    writer.close()


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """A few requests (Content-Length or chunked, some with trailers), as their bodies and
    as the bytes of the whole pipeline."""
    bodies: list[bytes] = []
    wire: list[bytes] = []
    for n in range(draw(st.integers(1, 5))):
        body = draw(st.binary(max_size=3000))
        head = f"POST /r{n} HTTP/1.1\r\nHost: relay\r\n"
        if draw(st.booleans()):
            wire.append(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        else:
            cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
            parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p)
            trailer = b"X-T: 1\r\n" if draw(st.booleans()) else b""
            wire.append(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks)
            wire.append(b"0\r\n" + trailer + b"\r\n")
        bodies.append(body)
    return bodies, wire


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipeline=pipelines(), cuts=st.lists(st.integers(1, 400), max_size=12))
def test_any_cut_of_a_pipeline_into_reads_gets_each_reply_in_order(
    pipeline: tuple[list[bytes], list[bytes]], cuts: list[int]
) -> None:
    """However the bytes of pipelined requests are cut into reads, each request reaches the
    handler with its exact body, and its reply comes back in order, keeping the connection."""
    bodies, wire = pipeline
    data = b"".join(wire)

    async def exchange() -> tuple[list[bytes], list[int]]:
        harness = Harness()
        await harness.start()
        reader, writer = await harness.connect()
        at = 0
        for size in cuts:
            writer.write(data[at : at + size])
            await writer.drain()
            at += size
        writer.write(data[at:])
        replies = [await read_reply(reader) for _ in bodies]
        writer.close()
        assert harness.server is not None
        await harness.server.close(1.0)
        assert not harness.refused
        assert [r.path for r in harness.seen] == [f"/r{n}" for n in range(len(bodies))]
        assert all("connection" not in headers for _, headers, _ in replies)
        return harness.bodies, [orjson.loads(body)["bytes"] for _, _, body in replies]

    received, lengths = asyncio.run(exchange())
    assert received == bodies
    assert lengths == [len(body) for body in bodies]
