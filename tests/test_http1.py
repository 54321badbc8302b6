"""relay's outbound HTTP/1.1 client against real servers on 127.0.0.1.

Well-behaved targets are the conftest receiver (aiohttp); misbehaving ones are raw
asyncio servers that answer with exactly the bytes a test gives them, so framing,
garbage, early closes and silence are what a real socket delivers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable

import pytest
import trustme
from aiohttp.abc import AbstractResolver, ResolveResult

from relay import http1
from relay.http1 import Client, RequestError, Response
from relay.netpolicy import NetworkPolicy

from conftest import eventually

Answer = Callable[[bytes], bytes | None]  # request bytes so far -> reply (None: wait for more)


class RawServer:
    """Answers each request with `answer(request bytes)`; counts connections; `close_after`
    closes a connection once it has answered."""

    def __init__(self, answer: Answer, *, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.received: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        buffer = b""
        try:
            while chunk := await reader.read(65536):
                buffer += chunk
                reply = self.answer(buffer)
                if reply is None:
                    continue
                self.received.append(buffer)
                buffer = b""
                writer.write(reply)
                await writer.drain()
                if self.close_after:
                    break
        finally:
            writer.close()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def whole_request(reply: bytes) -> Answer:
    """Reply once the request's head and its Content-Length of body have arrived."""

    def answer(data: bytes) -> bytes | None:
        head, found, body = data.partition(b"\r\n\r\n")
        if not found:
            return None
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return reply if len(body) >= length else None

    return answer


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    client = Client(NetworkPolicy.of())
    yield client
    await client.close()


async def post(
    client: Client, url: str, body: bytes = b"{}", limit: int = 65536, timeout_s: float = 10
) -> Response:
    return await client.request(
        "POST", url, [("Content-Type", "application/json")], body,
        max_body_bytes=limit, timeout_s=timeout_s,
    )  # fmt: skip


async def test_requests_reuse_one_kept_alive_connection(client: Client) -> None:
    """Requests one after another to a keep-alive target share one connection."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(whole_request(reply)) as server:
        for _ in range(5):
            response = await post(client, server.url)
            assert response == await post(client, server.url)
    assert server.connections == 1
    assert len(server.received) == 10


async def test_request_carries_method_path_host_length_and_headers_exactly(
    client: Client,
) -> None:
    """The target gets the method, path and query, Host, the given headers in their order
    (repeats kept), Content-Length and the body byte for byte; nothing else is added."""
    async with RawServer(
        whole_request(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    ) as server:
        headers = [("X-One", "1"), ("x-two", "zwei"), ("X-One", "again")]
        response = await client.request(
            "PUT",
            f"{server.url}?a=1&b=%20",
            headers,
            b"\x00body\xff",
            max_body_bytes=10,
            timeout_s=10,
        )
    assert (response.status, response.body) == (200, b"ok")
    assert server.received == [
        b"PUT /hook?a=1&b=%20 HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"X-One: 1\r\nx-two: zwei\r\nX-One: again\r\nContent-Length: 6\r\n\r\n\x00body\xff"
    ]


async def test_body_beyond_the_limit_is_cut_and_the_connection_dropped(client: Client) -> None:
    """At most max_body_bytes of a long answer are kept; the rest is not waited for."""
    reply = b"HTTP/1.1 500 Oops\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000
    async with RawServer(whole_request(reply)) as server:
        response = await post(client, server.url, limit=1000)
        assert (response.status, response.body) == (500, b"x" * 1000)
        await post(client, server.url, limit=1000)
    assert server.connections == 2


async def test_a_large_body_read_with_the_head_is_not_taken_for_a_large_head(
    client: Client,
) -> None:
    """200 KB of body arriving in the same read as the head is a body to cut at the limit,
    not a response head over its 64 KiB bound."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200_000
    async with RawServer(whole_request(reply)) as server:
        response = await post(client, server.url, limit=65536)
    assert (response.status, len(response.body)) == (200, 65536)


async def test_chunked_and_close_delimited_bodies_are_read_whole(client: Client) -> None:
    """A chunked body is reassembled; a body without length ends where the connection does."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with RawServer(whole_request(chunked)) as server:
        assert (await post(client, server.url)).body == b"abcde"
    until_close = b"HTTP/1.1 202 Accepted\r\nConnection: close\r\n\r\nall of it"
    async with RawServer(whole_request(until_close), close_after=True) as server:
        response = await post(client, server.url)
    assert (response.status, response.body) == (202, b"all of it")


async def test_interim_response_is_skipped_and_retry_after_is_read(client: Client) -> None:
    """A 100 Continue before the answer is passed over; Retry-After comes back as sent."""
    reply = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 503 Busy\r\nRetry-After: 120\r\nContent-Length: 4\r\n\r\nbusy"
    )
    async with RawServer(whole_request(reply)) as server:
        response = await post(client, server.url)
    assert (response.status, response.retry_after, response.body) == (503, "120", b"busy")


async def test_redirect_is_returned_not_followed(client: Client) -> None:
    """A 302 is the answer: its Location is not visited."""
    reply = b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/x\r\nContent-Length: 0\r\n\r\n"
    async with RawServer(whole_request(reply)) as server:
        response = await post(client, server.url)
    assert response.status == 302
    assert len(server.received) == 1


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"SMTP ready\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "connection closed before"),
        (b"", "connection closed before"),
    ],
)
async def test_garbage_or_truncated_answers_are_errors(
    client: Client, reply: bytes, reason: str
) -> None:
    """Garbage, a body shorter than its length, or a close without an answer: a one-line error."""
    async with RawServer(whole_request(reply), close_after=True) as server:
        with pytest.raises(RequestError) as caught:
            await post(client, server.url)
    assert str(caught.value).startswith(reason)
    assert "\n" not in str(caught.value)


async def test_a_silent_target_is_bounded_by_the_timeout(client: Client) -> None:
    """A target that never answers holds a request only for its timeout, and the
    connection is not reused afterwards."""
    async with RawServer(lambda _data: None) as server:
        for _ in range(2):
            started = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await post(client, server.url, timeout_s=0.2)
            assert asyncio.get_running_loop().time() - started < 5
    assert server.connections == 2


async def test_connecting_counts_against_the_timeout() -> None:
    """A connection that cannot be made within the timeout (a lookup that hangs) ends in
    TimeoutError too."""

    class Hanging(AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[ResolveResult]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def close(self) -> None:
            pass

    client = Client(NetworkPolicy.of(), resolver=Hanging())
    with pytest.raises(TimeoutError):
        await post(client, "http://never.internal/hook", timeout_s=0.2)
    await client.close()


async def test_connection_closed_by_the_target_is_not_reused(client: Client) -> None:
    """After `Connection: close` the next request opens a new connection and succeeds."""
    reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    async with RawServer(whole_request(reply), close_after=True) as server:
        for _ in range(3):
            assert (await post(client, server.url)).status == 200
    assert server.connections == 3


async def test_header_with_a_line_break_is_refused_unsent(client: Client) -> None:
    """A header value with CR/LF would smuggle a header or request: it is refused, unsent."""
    async with RawServer(whole_request(b"HTTP/1.1 200 OK\r\n\r\n")) as server:
        with pytest.raises(RequestError, match="line break"):
            await client.request(
                "POST",
                server.url,
                [("X-Evil", "a\r\nX-Injected: 1")],
                b"",
                max_body_bytes=10,
                timeout_s=10,
            )
    assert server.connections == 0


async def test_credentials_in_the_url_become_basic_authorization(client: Client) -> None:
    """http://user:secret@host/ sends `Authorization: Basic` and not the credentials in Host."""
    reply = b"HTTP/1.1 204 No Content\r\n\r\n"
    async with RawServer(whole_request(reply)) as server:
        url = f"http://ops:s%40cret@127.0.0.1:{server.port}/hook"
        assert (await post(client, url)).status == 204
    token = base64.b64encode(b"ops:s@cret").decode()
    assert f"Authorization: Basic {token}\r\n".encode() in server.received[0]
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in server.received[0]


@pytest.fixture
async def tls_target() -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    """An https target on 127.0.0.1 with a certificate for localhost from a test authority,
    and a client-side context that trusts that authority."""
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    trusting_context = ssl.create_default_context()
    authority.configure_trust(trusting_context)
    yield f"https://localhost:{server.sockets[0].getsockname()[1]}/hook", trusting_context
    server.close()


class FixedResolver(AbstractResolver):
    """Answers every name with the given addresses, in order."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=address, port=port, family=socket.AF_INET, proto=0, flags=0
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_https_target_is_verified_against_the_trusted_authorities(
    tls_target: tuple[str, ssl.SSLContext],
) -> None:
    """An https target is reached over TLS when its certificate is trusted, and refused with
    the verification failure when it is not."""
    url, trusting_context = tls_target
    trusting = Client(NetworkPolicy.of(), ssl_context=trusting_context)
    untrusting = Client(NetworkPolicy.of())
    try:
        assert (await post(trusting, url)).body == b"secure"
        with pytest.raises(RequestError, match="TLS certificate of localhost"):
            await post(untrusting, url)
    finally:
        await trusting.close()
        await untrusting.close()


async def test_connection_refused_names_the_address(client: Client) -> None:
    """Nothing listening: the error says where it could not connect."""
    async with RawServer(whole_request(b"")) as server:
        url = server.url
    with pytest.raises(RequestError) as caught:
        await post(client, url)
    assert str(caught.value).startswith(f"cannot connect to 127.0.0.1:{server.port}: ")


# --- found by review: each test reproduces a confirmed failure of the first version ---


async def test_operator_host_header_replaces_the_urls_host(client: Client) -> None:
    """A Host set in config (virtual hosting) is the one Host sent, first, as aiohttp did."""
    async with RawServer(whole_request(b"HTTP/1.1 204 No Content\r\n\r\n")) as server:
        await client.request(
            "POST", server.url, [("Host", "api.internal"), ("X-A", "1")], b"",
            max_body_bytes=10, timeout_s=10,
        )  # fmt: skip
    head = server.received[0].split(b"\r\n")
    assert head[1] == b"Host: api.internal"
    assert sum(line.lower().startswith(b"host:") for line in head) == 1


async def test_a_target_that_closes_on_accept_fails_at_once(client: Client) -> None:
    """A target that accepts and closes at once is an error straight away, not a wait for
    the whole timeout and not an internal error."""

    async def slam(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    loop = asyncio.get_running_loop()
    try:
        for _ in range(20):
            started = loop.time()
            with pytest.raises(RequestError, match="connection closed before"):
                await post(client, url, timeout_s=30)
            assert loop.time() - started < 10
    finally:
        server.close()


async def test_an_endless_response_head_is_cut_off(client: Client) -> None:
    """A target that streams one header forever fails fast with a bounded head."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(10_000):
                writer.write(b"a" * 4096)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    try:
        with pytest.raises(RequestError, match="response head larger than 65536 bytes"):
            await post(client, url, body=b"", timeout_s=30)
    finally:
        server.close()


async def test_an_address_that_drops_connects_is_passed_over(client: Client) -> None:
    """Of two addresses, one whose accept queue is full (connects hang) does not cost the
    request: the next address is tried after a short delay."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    async with RawServer(whole_request(reply)) as server:
        blackhole = socket.socket()
        blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blackhole.bind(("127.0.0.2", server.port))
        blackhole.listen(0)
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.2", server.port))
        two = FixedResolver(["127.0.0.2", "127.0.0.1"])
        both = Client(NetworkPolicy.of(), resolver=two)
        try:
            response = await post(both, f"http://two.internal:{server.port}/hook", timeout_s=3)
        finally:
            await both.close()
            blackhole.close()
            for filler in fillers:
                filler.close()
    assert response.status == 200


async def test_idle_connections_are_closed_after_the_idle_timeout(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept-alive connection nobody uses is closed by the client once idle long enough."""
    monkeypatch.setattr(http1, "IDLE_TIMEOUT_S", 0.1)
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await reader.read()  # b"" once the client closes
        closed.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        await post(client, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook")
        await asyncio.wait_for(closed.wait(), 10)
    finally:
        server.close()


async def test_an_early_answer_to_an_unread_body_releases_the_connection(client: Client) -> None:
    """A target that answers 413 without reading a large body (and without closing) gets its
    connection dropped: the request returns the 413 and no descriptor stays open waiting
    to flush the rest of the body."""
    held: list[asyncio.StreamWriter] = []

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        held.append(writer)

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    server = await asyncio.start_server(early, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    before = descriptors()
    try:
        response = await post(client, url, body=b"x" * (16 << 20), timeout_s=10)
        assert response.status == 413
        await eventually(lambda: descriptors() <= before + len(held))  # the target's end only
    finally:
        for writer in held:
            writer.transport.abort()
        server.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nConnection: close\r\n\r\nfine",
        b"HTTP/1.1 200 OK\nContent-Length: 4\n\nfine",
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 4\r\n\r\nfine",
    ],
    ids=["identity-until-close", "bare-LF", "folded-header"],
)
async def test_lax_but_readable_answers_are_read(client: Client, reply: bytes) -> None:
    """Answers aiohttp's client read (identity coding to close, bare LF, folded headers) are
    read too: a delivered event is not retried because of its target's HTTP style."""
    async with RawServer(whole_request(reply), close_after=True) as server:
        response = await post(client, server.url)
    assert (response.status, response.body) == (200, b"fine")


async def test_bytes_after_an_answer_keep_the_connection_out_of_the_pool(client: Client) -> None:
    """A complete answer followed by stray bytes: the answer counts, the connection is
    not reused (the next request opens a new one and succeeds)."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200"
    async with RawServer(whole_request(reply)) as server:
        assert (await post(client, server.url)).status == 200
        assert (await post(client, server.url)).status == 200
    assert server.connections == 2


async def test_a_kept_alive_connection_closed_while_idle_is_replaced(client: Client) -> None:
    """A target that closes its end after answering (without saying so) does not fail the
    next request: it goes out again on a new connection."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    async with RawServer(whole_request(reply), close_after=True) as server:
        for _ in range(3):
            assert (await post(client, server.url)).status == 200
    assert len(server.received) == 3


async def test_trailing_dot_hostname_verifies_tls(tls_target: tuple[str, ssl.SSLContext]) -> None:
    """https://localhost./ is verified as localhost (the dot is not part of the name)."""
    url, trusting_context = tls_target
    client = Client(
        NetworkPolicy.of(), resolver=FixedResolver(["127.0.0.1"]), ssl_context=trusting_context
    )
    try:
        assert (await post(client, url.replace("localhost", "localhost."))).body == b"secure"
    finally:
        await client.close()


async def test_a_malformed_hostname_is_a_resolve_error(client: Client) -> None:
    """A name the system resolver cannot even encode is a one-line error, not a crash."""
    with pytest.raises(RequestError, match=r"cannot resolve a\.\.b"):
        await post(client, "http://a..b/hook", timeout_s=5)


async def test_an_upgrade_answer_is_an_error_that_says_so(client: Client) -> None:
    """101 Switching Protocols is not a webhook answer: the error says why."""
    reply = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n"
    async with RawServer(whole_request(reply)) as server:
        with pytest.raises(RequestError, match="protocol upgrade"):
            await post(client, server.url)
