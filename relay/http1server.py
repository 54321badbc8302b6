"""Inbound HTTP/1.1: the connections webhooks arrive on.

This module owns the inbound listener's sockets and their HTTP/1.1 framing (SPEC §3):
it accepts connections, parses requests with httptools (llhttp, Node.js's parser, the
one aiohttp's server uses too), enforces the limits of a request head, hands each
request to one handler as soon as its head is in (its body follows as it arrives),
writes the handler's `Response` back in order, keeps connections alive, closes those
idle for `idle_timeout_s` (a head begun and not finished in that time is a 408), ends a
connection with a lingering half-close, and on `close` stops accepting and lets requests
under way finish. Whatever it refuses (a malformed or oversized head, a broken body)
goes to `on_refused` for the reply and the log line. It knows nothing of sources or the
journal. It stands where aiohttp's `web.Server` stood for inbound webhooks: that server
path cost ~34 µs of CPU per request here against ~7 µs for this (a canned reply: 27-30k
against 145-160k requests/s on one core), and it was a third of relay's cost per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, NoReturn, cast
from urllib.parse import parse_qsl, unquote

import httptools
from multidict import CIMultiDict, MultiDict

MAX_TARGET_BYTES = 8190  # the request target (path and query)
MAX_FIELD_BYTES = 8190  # one header's name and value
MAX_HEADERS = 100
MAX_HEAD_BYTES = 64 * 1024  # a request's line and headers together
BODY_HIGH_WATER_BYTES = 256 * 1024  # unread body buffered before reading pauses
MAX_PIPELINED = 16  # requests parsed ahead of their turn before reading pauses
MAX_QUEUED = 64  # requests parsed ahead of their turn at most; beyond, the rest is refused
LINGER_S = 1.0  # after a reply sent before its body arrived: discard the rest this long

_REASONS = {status.value: status.phrase for status in HTTPStatus}


class Refused(Exception):
    """A request the connection cannot take (bad framing, a limit): answered, then closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Response:
    """A complete reply: status, headers (without framing ones) and the whole body.

    `close` ends the connection after it (the rest of an unread body is not worth reading).
    """

    __slots__ = ("body", "close", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
        *,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.close = close


class Body:
    """A request's body as it arrives. `complete` once all of it is in; `take` returns what
    is buffered; `read` waits for more (b"" at the end; ConnectionError if the sender left)."""

    __slots__ = (
        "_chunks", "_connection", "_error", "_size", "_waiter", "complete", "expects_continue",
    )  # fmt: skip

    def __init__(self, connection: _Connection) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.complete = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._connection = connection
        self.expects_continue = False  # the sender waits for `100 Continue` first

    def take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        self._connection.maybe_resume()
        return data

    async def read(self) -> bytes:
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            if self.expects_continue:
                self.expects_continue = False
                self._connection.send_continue()
            self._connection.maybe_resume()  # reading may be paused for the queue ahead
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take()

    @property
    def buffered_bytes(self) -> int:
        return self._size

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: Exception) -> None:
        if not self.complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Request:
    """One request: its head as parsed, and its `body` as it arrives.

    `path` is percent-decoded (kept as sent when the escapes are not UTF-8); `query_string`
    is raw (without '?'); header names and values
    are decoded as UTF-8, with bytes that are not UTF-8 kept as surrogates.
    """

    __slots__ = (
        "body",
        "content_length",
        "header_pairs",
        "headers",
        "http_1_0",
        "keep_alive",
        "method",
        "path",
        "query_string",
        "remote",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query_string: str,
        header_pairs: list[tuple[str, str]],
        remote: str | None,
        body: Body,
        keep_alive: bool,
        http_1_0: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.header_pairs = header_pairs  # as received, in order
        self.headers = headers = CIMultiDict(header_pairs)
        self.remote = remote
        self.body = body
        self.keep_alive = keep_alive
        self.http_1_0 = http_1_0  # kept alive, such a request is told so in the reply
        length = headers.get("Content-Length")
        # llhttp has checked the digits; leading zeros stripped (int() refuses > 4300 digits)
        self.content_length = (
            int(length.lstrip("0") or "0")
            if length is not None and length.isascii() and length.isdigit()
            else None
        )

    @property
    def query(self) -> MultiDict[str]:
        return MultiDict(parse_qsl(self.query_string, keep_blank_values=True))


Handler = Callable[[Request], Awaitable[Response]]
RefusalHandler = Callable[[str | None, Refused], Response]


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _split_target(target: bytes) -> tuple[str, str]:
    """(percent-decoded path, raw query) of a request target (origin or absolute form)."""
    if target[:1] == b"/" and b"%" not in target and b"?" not in target and b"#" not in target:
        return target.decode("latin-1"), ""  # the usual webhook path: nothing to take apart
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise Refused(400, "malformed request target") from None
    raw_path = _decode(url.path or b"/")
    if "%" in raw_path:
        with contextlib.suppress(UnicodeDecodeError):  # escapes that are not UTF-8: as sent
            raw_path = unquote(raw_path, errors="strict")
    return raw_path, _decode(url.query or b"")


_date_cache: tuple[int, bytes] = (0, b"")


def _date_line() -> bytes:
    global _date_cache
    now_s = int(time.time())
    if _date_cache[0] != now_s:  # formatted once a second
        _date_cache = (now_s, f"Date: {formatdate(now_s, usegmt=True)}\r\n".encode())
    return _date_cache[1]


_heads: dict[tuple[int, tuple[tuple[str, str], ...]], bytes] = {}
MAX_CACHED_HEADS = 64


def _head(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    """The status line and `headers`, encoded; remembered for headers given as a tuple
    (the constant ones: most replies are a 202 with only a Content-Type)."""
    if type(headers) is tuple:
        key = (status, headers)
        cached = _heads.get(key)
        if cached is not None:
            return cached
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    head = "".join(lines).encode("latin-1")
    if type(headers) is tuple and len(_heads) < MAX_CACHED_HEADS:
        _heads[key] = head
    return head


def serialize(
    response: Response, keep_alive: bool, head_only: bool = False, http_1_0: bool = False
) -> bytes:
    """The bytes of `response` on the wire."""
    status = response.status
    lines = [_head(status, response.headers), _date_line()]
    bodyless = status < 200 or status in (204, 304)  # RFC 9110: no content, no length
    if not bodyless:
        lines.append(b"Content-Length: %d\r\n" % len(response.body))
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif http_1_0:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    if not head_only and not bodyless:
        lines.append(response.body)
    return b"".join(lines)


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs them one at a time, replies in order."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._remote: str | None = None
        self._queue: deque[Request] = deque()  # parsed, not yet answered; [0] is running
        self._task: asyncio.Task[None] | None = None
        self._body: Body | None = None  # the body being parsed
        self._target = b""
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = -1  # bytes received while a head is parsed; -1 outside a head
        self._refusal: Refused | None = None
        self._closing = False  # no more requests are taken; closed after the last reply
        self.closed = False
        self._read_paused = False
        self._write_paused = False
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None  # armed by _close_now
        self._upgrade_stop = False  # llhttp stopped at an Upgrade head (see data_received)
        self._unframed_bytes = 0  # of that request's body, still to come
        self._eof = False  # the sender half-closed: answer what it sent, then close
        self._pending_refusal: Refused | None = None  # answered (and logged) after the queue
        self._lingering = False  # half-closed after the last reply; reads are dropped
        self._head_size = 0  # bytes of the head parsed so far (target and complete fields)
        self._messages = 0  # heads begun (a read that begins one does not count toward it)
        self._read_body_bytes = 0  # of this read: body bytes
        self._bodiless_bytes = 0  # reads with no body byte while a body is under way

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple) else None
        self._server.connections.add(self)
        self._become_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        for request in self._queue:
            request.body.fail(ConnectionResetError("the sender closed the connection"))
        if self._task is None:
            self._server.forget(self)
        # else: the request under way finishes (a journal write is never cut short);
        # the requests queued behind it are dropped

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # after the last reply: read, and dropped
        if self._upgrade_stop:
            self._feed_unframed(data)
            return
        if self._refusal is not None:
            return  # a reply is due before the close: read (so that the close sends no RST), drop
        in_head, in_body, messages = self._head_bytes >= 0, self._body is not None, self._messages
        self._read_body_bytes = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # No protocol switch: the request is answered as HTTP/1.1 (after those ahead of
            # it), then the connection closes. llhttp hands over at the end of the head, so
            # the body is counted here.
            self._upgrade_stop = True
            if self._task is None:  # nothing was taken (a reply already closed it)
                self._close_now()
            offset = upgrade.args[0] if upgrade.args else len(data)
            self._feed_unframed(data[offset:])
            return
        except httptools.HttpParserError as error:
            self._refuse(self._refusal or _parse_failure(error))
            return
        self._bound_unparsed(len(data), in_head, in_body and not in_head, messages)

    def _bound_unparsed(self, read_bytes: int, in_head: bool, in_body: bool, messages: int) -> None:
        """Bound what httptools gathers across reads before it calls back: a head's fields
        and a trailer's, chunk framing. `in_head`, `in_body`, `messages`: the state before
        this read."""
        if messages != self._messages:  # a head begun in this read, and not complete
            if self._head_bytes >= 0:
                # the whole read, when it holds only this head; else what is known exactly
                # (the fields complete so far): the bytes of the messages before it in this
                # read are not known, and a guess can refuse a good head (a false 431)
                alone = not in_head and not in_body and messages + 1 == self._messages
                self._head_bytes = read_bytes if alone else self._head_size
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse(Refused(431, f"request head over {MAX_HEAD_BYTES} bytes"))
            return
        if in_head and self._head_bytes >= 0:
            # a head under way before and after this read: a field httptools is still
            # gathering is bounded here (complete fields are also counted as they come)
            self._head_bytes += read_bytes
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(Refused(431, f"request head over {MAX_HEAD_BYTES} bytes"))
        elif in_body and self._body is not None and not self._read_body_bytes:
            # chunk framing and trailers only: httptools gathers a trailer field whole
            self._bodiless_bytes += read_bytes
            if self._bodiless_bytes > MAX_HEAD_BYTES:
                self._refuse(Refused(431, f"chunk framing or trailers over {MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> bool:
        """The sender finished sending (a half-close): what it sent in full is answered,
        then the connection closes; a body under way will not come."""
        self._eof = True
        if self._lingering:
            return False  # the end of a lingering close: the transport closes now
        if self._body is not None:
            self._body.fail(ConnectionResetError("the sender closed the connection"))
        if self._task is None:
            self._close_now()
        # TLS cannot stay half-open (asyncio warns if asked to): it closes as before
        return self._transport is not None and self._transport.get_extra_info("sslcontext") is None

    def pause_writing(self) -> None:
        """The sender is not reading its replies: stop reading its requests until it does."""
        self._write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.maybe_resume()

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self._idle_since is not None:  # the head's own idle_timeout starts with its first byte
            self._idle_since = self._loop.time()
        self._target = b""
        self._headers = []
        self._head_bytes = 0
        self._head_size = 0
        self._messages += 1

    def on_url(self, target: bytes) -> None:
        self._target += target
        self._head_size += len(target)
        if len(self._target) > MAX_TARGET_BYTES:
            self._fail_parse(Refused(414, f"request target over {MAX_TARGET_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_FIELD_BYTES:
            self._fail_parse(Refused(431, f"a header over {MAX_FIELD_BYTES} bytes"))
        self._head_size += len(name) + len(value) + 4
        if self._head_bytes < 0:  # a trailer, after a chunked body: bounded, and not kept
            if self._head_size > MAX_HEAD_BYTES:
                self._fail_parse(Refused(431, f"trailers over {MAX_HEAD_BYTES} bytes"))
            return
        if len(self._headers) >= MAX_HEADERS:
            self._fail_parse(Refused(431, f"more than {MAX_HEADERS} headers"))
        if self._head_size > MAX_HEAD_BYTES:
            self._fail_parse(Refused(431, f"request head over {MAX_HEAD_BYTES} bytes"))
        self._headers.append((_decode(name), _decode(value.rstrip(b" \t"))))  # OWS (RFC 9112)

    def on_headers_complete(self) -> None:
        self._head_bytes = -1
        self._head_size = 0  # from here on: the trailers' size
        try:
            path, query = _split_target(self._target)
        except Refused as refused:
            self._fail_parse(refused)
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._fail_parse(Refused(400, f"HTTP version {version} not supported"))
        http_1_0 = version == "1.0"
        body = self._body = Body(self)
        self._bodiless_bytes = 0
        request = Request(
            parser.get_method().decode("ascii"),
            path,
            query,
            self._headers,
            self._remote,
            body,
            parser.should_keep_alive(),
            http_1_0,
        )
        headers = request.headers
        hosts = len(headers.getall("Host", ()))
        if hosts > 1 or (hosts == 0 and not http_1_0):
            self._fail_parse(Refused(400, "a request needs exactly one Host (RFC 9112)"))
        if len(self._queue) >= MAX_QUEUED:  # one read of many tiny requests: not all taken
            self._fail_parse(Refused(429, f"more than {MAX_QUEUED} pipelined requests"))
        if self._closing:
            return  # after a reply that closes the connection nothing more is taken
        expect = headers.get("Expect")
        body.expects_continue = (
            expect is not None and not http_1_0 and expect.lower() == "100-continue"
        )
        if parser.should_upgrade():  # llhttp will skip the body; data_received reads it
            if "Transfer-Encoding" in headers:
                self._fail_parse(Refused(400, "a chunked body with Upgrade is not supported"))
            self._unframed_bytes = request.content_length or 0
        self._idle_since = None
        self._queue.append(request)
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        elif len(self._queue) > MAX_PIPELINED:
            self._pause()

    def on_body(self, data: bytes) -> None:
        self._read_body_bytes += len(data)
        self._bodiless_bytes = 0
        body = self._body
        if body is None or (self._closing and not self._queue):
            return  # a reply went before this body: the rest of it is dropped
        body.feed(data)
        if body.buffered_bytes > BODY_HIGH_WATER_BYTES:
            self._pause()

    def on_message_complete(self) -> None:
        if self._unframed_bytes:
            return  # an Upgrade request's body: complete when data_received has counted it
        if self._body is not None:
            self._body.finish()
            self._body = None
        if self._closing and not self._queue:
            self._close_now()

    def _feed_unframed(self, data: bytes) -> None:
        """The body of a request whose head asked for an Upgrade, by its Content-Length."""
        if not self._unframed_bytes or not data:
            return  # anything after it is ignored: the connection closes after the reply
        part = data[: self._unframed_bytes]
        self._unframed_bytes -= len(part)
        self.on_body(part)
        if not self._unframed_bytes:
            self.on_message_complete()

    def _fail_parse(self, refused: Refused) -> NoReturn:
        self._refusal = refused
        raise refused  # httptools raises HttpParserCallbackError; the refusal is kept here

    # ------------------------------------------------------------ requests and replies

    async def _serve(self) -> None:
        """Run the queued requests in order, while the connection stays open."""
        queue = self._queue
        ended = False
        while queue:
            request = queue[0]
            try:
                response = await self._server.handler(request)
            except Exception as error:  # noqa: BLE001 - one request's bug must not end the loop
                response = self._server.refusal(request.remote, Refused(500, repr(error)))
            queue.popleft()
            ended = self._reply(request, response)
            self.maybe_resume()
            if ended or self.closed:
                queue.clear()  # requests behind one that closed the connection are not taken
        refusal, self._pending_refusal = self._pending_refusal, None
        if refusal is not None and self._transport is not None and not (ended or self.closed):
            # logged only now: after a reply that closed the connection it is never sent
            response = self._server.refusal(self._remote, refusal)
            self._transport.write(serialize(response, keep_alive=False))  # after those ahead
            self._close_now()
        self._task = None
        if self.closed:
            self._server.forget(self)
        elif not self._closing:
            self.maybe_resume()
            self._become_idle()

    def _reply(self, request: Request, response: Response) -> bool:
        """Write the reply; True when it ends the connection."""
        if self.closed or self._transport is None:
            return True  # the sender left; what it sent is kept all the same
        complete = request.body.complete
        keep_alive = request.keep_alive and complete and not response.close
        keep_alive = keep_alive and not self._server.closing
        if not self._queue:  # the last reply due: after it, end what is ending
            ending = self._upgrade_stop or self._eof or self._closing
            keep_alive = keep_alive and not (ending and self._pending_refusal is None)
        head_only = request.method == "HEAD"
        self._transport.write(serialize(response, keep_alive, head_only, request.http_1_0))
        if keep_alive:
            return False
        self._close_now()  # the rest of an unread body, if any, is read and dropped a while
        return True

    def _refuse(self, refused: Refused) -> None:
        """Answer what could not be parsed or taken (unless a reply is due first); close."""
        if self._closing or self.closed:
            if self._task is None:
                self._close_now()
            return
        self._closing = True
        self._head_bytes = -1
        body = self._body
        if body is not None and not body.complete:  # its request waits for it: it will not come
            body.fail(refused)
        self._refusal = refused
        queue = self._queue
        if queue and body is queue[0].body:
            return  # the handler reading that body answers (and logs) the refusal
        if queue and body is queue[-1].body:
            queue.pop()  # a request waiting its turn whose body broke: refused below
        if queue and not queue[-1].keep_alive:
            return  # bytes after a request that closes the connection: ignored (RFC 9112 9.6)
        if queue:  # requests ahead of the refused bytes are answered first, then this
            self._pending_refusal = refused
            return
        response = self._server.refusal(self._remote, refused)  # the log line, in any case
        if self._transport is not None:
            self._transport.write(serialize(response, keep_alive=False))
            self._close_now()
        # what comes meanwhile is read and dropped (data_received)

    def send_continue(self) -> None:
        """`100 Continue` for the request under way, whose sender waits for it."""
        if not self.closed and not self._closing and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # ------------------------------------------------------------ flow and timers

    def _pause(self) -> None:
        if not self._read_paused and self._transport is not None and not self.closed:
            self._read_paused = True
            self._transport.pause_reading()

    def maybe_resume(self) -> None:
        """Read again once replies flow, the queue is short and the body is being read."""
        if not self._read_paused or self._write_paused or self.closed:
            return
        if len(self._queue) > MAX_PIPELINED:
            return
        if self._body is not None and self._body.buffered_bytes > BODY_HIGH_WATER_BYTES:
            return
        self._read_paused = False
        assert self._transport is not None
        self._transport.resume_reading()

    def _become_idle(self) -> None:
        self._idle_since = self._loop.time()
        if self._server.closing:
            self._close_now()
        elif self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self._server.idle_timeout_s, self._check_idle)

    def _check_idle(self) -> None:
        """Close a connection idle (or stuck in a head) for idle_timeout_s; else look later."""
        self._idle_timer = None
        if self._idle_since is None or self.closed:
            return
        remaining_s = self._idle_since + self._server.idle_timeout_s - self._loop.time()
        if remaining_s <= 0 and self._head_bytes >= 0:  # a head begun and never finished
            idle_s = self._server.idle_timeout_s
            self._refuse(Refused(408, f"request head not received within idle_timeout {idle_s:g}s"))
        elif remaining_s <= 0:  # an idle keep-alive connection: closed without a word
            self._close_now()
        else:
            self._idle_timer = self._loop.call_later(remaining_s, self._check_idle)

    def close_if_idle(self) -> None:
        if self._task is None:
            self._close_now()

    def _close_now(self) -> None:
        """End the connection after the replies written so far. Where the socket allows,
        half-close first and read (and drop) what the sender still sends, until it closes
        or for LINGER_S: closing with unread bytes would reset the connection, and a reset
        can destroy replies the sender has not read yet (an early 413, say)."""
        self._closing = True  # no request is taken from here on
        transport = self._transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        # whatever ends the transport from here (our close, the sender's EOF during the
        # linger, TLS's own shutdown), the connection cannot outlive this deadline
        deadline_s = LINGER_S + self._server.idle_timeout_s
        self._abort_timer = self._loop.call_later(deadline_s, self.abort)
        if self._eof or not transport.can_write_eof():  # the sender is done; or TLS
            self._close_transport()
            return
        self._lingering = True
        transport.write_eof()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        self._loop.call_later(LINGER_S, self._close_transport)

    def _close_transport(self) -> None:
        """Close (a closing transport waits for its buffer to drain, within the deadline
        `_close_now` armed)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.abort()


def _parse_failure(error: httptools.HttpParserError) -> Refused:
    """What llhttp refused (a 400); or a bug in a parser callback (a 500, with its cause,
    which `on_refused` logs with the traceback: it runs while the error is handled)."""
    cause = error.__context__
    if isinstance(error, httptools.HttpParserCallbackError) and cause is not None:
        return Refused(500, f"internal error in the HTTP layer: {cause!r}")
    return Refused(400, f"malformed request: {_error_text(error)}")


def _error_text(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


class Server:
    """The inbound listener: `start` binds, `close` stops accepting and drains."""

    def __init__(self, handler: Handler, on_refused: RefusalHandler, *, idle_timeout_s: float):
        self.handler = handler
        self.on_refused = on_refused  # the reply (and log line) for a request refused here
        self.idle_timeout_s = idle_timeout_s
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._gone = asyncio.Event()  # set whenever a connection is forgotten

    async def start(self, host: str, port: int, ssl_context: Any = None) -> tuple[str, int]:
        """Listen on (host, port); the address actually bound."""
        self._server = await self.loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=self.idle_timeout_s if ssl_context else None,
            backlog=1024,
            reuse_address=True,
        )
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    def refusal(self, remote: str | None, refused: Refused) -> Response:
        """`on_refused`'s reply; a plain one should it fail (it must never end a connection)."""
        try:
            return self.on_refused(remote, refused)
        except Exception:  # noqa: BLE001 - the answer matters more than the log line here
            return Response(refused.status, b'{"error": "request refused"}')

    def forget(self, connection: _Connection) -> None:
        """A connection closed with no request under way."""
        self.connections.discard(connection)
        self._gone.set()

    async def close(self, timeout_s: float) -> None:
        """Stop accepting; close idle connections; give requests under way `timeout_s`."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self.closing = True
        server.close()
        for connection in list(self.connections):
            connection.close_if_idle()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.connections:
                    self._gone.clear()
                    await self._gone.wait()
        for connection in list(self.connections):
            connection.abort()
