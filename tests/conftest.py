"""Shared parts of the end-to-end tests: the real daemon process and real HTTP receivers.

Everything here is real: `Daemon` runs `python -m relay run` as a child process on a
config written to a temporary folder and reads its JSON log lines; `Receiver` is an
aiohttp server on 127.0.0.1 (port chosen by the OS) that records what it is sent and
answers from a script. Nothing sleeps to wait: `eventually` polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
# Real GitHub payloads: ../shared/corpus/github beside the checkout, or $RELAY_CORPUS.
CORPUS = Path(os.environ.get("RELAY_CORPUS") or REPO.parent / "shared" / "corpus" / "github")
DEADLINE_S = 20.0


def pytest_configure(config: pytest.Config) -> None:
    if not (CORPUS / "index.json").exists():
        pytest.exit(f"the GitHub payload corpus is missing: {CORPUS} (set RELAY_CORPUS)", 2)


async def eventually(
    check: Callable[[], Any], timeout_s: float = DEADLINE_S, interval_s: float = 0.02
) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s: {check}")
        await asyncio.sleep(interval_s)


def free_port() -> int:
    """A loopback port the OS just handed out (for daemons that restart on the same port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- receivers


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the request arrived


Reply = tuple[int, dict[str, str], bytes]


@dataclass
class Receiver:
    """A real HTTP target on 127.0.0.1 that records requests and answers from `script`."""

    script: deque[Reply | Callable[[], Awaitable[Reply]]] = field(default_factory=deque)
    default: Reply = (200, {}, b"ok")
    requests: list[Received] = field(default_factory=list)
    current: int = 0
    max_concurrent: int = 0
    gate: asyncio.Event | None = None  # when set to an unset Event, requests wait on it
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        self.current += 1
        self.max_concurrent = max(self.max_concurrent, self.current)
        try:
            body = await request.read()
            self.requests.append(
                Received(request.method, request.path_qs, dict(request.headers), body, arrived)
            )
            if self.gate is not None:
                await self.gate.wait()
            step = self.script.popleft() if self.script else self.default
            status, headers, payload = await step() if callable(step) else step
            return web.Response(status=status, headers=headers, body=payload)
        finally:
            self.current -= 1

    async def start(self, port: int = 0) -> Receiver:
        app = web.Application(client_max_size=64 * 2**20)  # relay may send up to max_body
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def event_ids(self) -> list[str]:
        return [r.headers.get("X-Relay-Event-Id", "") for r in self.requests]


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[], Awaitable[Receiver]]]:
    """A factory of started receivers, all stopped at the end of the test."""
    started: list[Receiver] = []

    async def make() -> Receiver:
        receiver = await Receiver().start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        await receiver.stop()


# ---------------------------------------------------------------- the daemon


def server_toml(folder: Path, *, listen_port: int = 0, admin_port: int = 0, **settings: str) -> str:
    """A [server] table for tests: loopback ports, the journal in `folder`, overrides as TOML."""
    lines = [
        "[server]",
        f'listen = "127.0.0.1:{listen_port}"',
        f'admin = "127.0.0.1:{admin_port}"',
        f'journal = "{folder / "relay.db"}"',
        'shutdown_grace = "5s"',
    ]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + '\n[log]\nformat = "json"\nlevel = "debug"\n'


@dataclass
class Daemon:
    """`relay run` as a child process, with its JSON log lines collected as dicts."""

    config_path: Path
    env: dict[str, str] = field(default_factory=dict)
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw_lines: list[bytes] = field(default_factory=list)  # stdout exactly as written
    stderr: list[str] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    listen: str = ""
    admin: str = ""
    preexec: Callable[[], None] | None = None
    quiet: bool = False  # a log level above info: no relay.started; `listen`, `admin` are given
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def journal(self) -> Path:
        started = self.find("relay.started")
        return Path(started["journal"]) if started else self.config_path.parent / "relay.db"

    async def start(self) -> Daemon:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "run",
            "-c",
            str(self.config_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(REPO),
            preexec_fn=self.preexec,
        )
        count = len(self.lines)
        self._readers = [
            asyncio.create_task(self._read_stdout(self.process)),
            asyncio.create_task(self._read_stderr(self.process)),
        ]
        if self.quiet:
            await eventually(self._is_ready)
            return self
        started = await self.wait_log("relay.started", after=count)
        self.listen, self.admin = started["listen"], started["admin"]
        return self

    async def _is_ready(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            pytest.fail(f"relay exited with {self.process.returncode}: {self.stderr}")
        with contextlib.suppress(aiohttp.ClientError):
            return await self.ready() == 200
        return False

    async def _read_stdout(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            self.raw_lines.append(raw)
            line = raw.strip()
            if line.startswith(b"<"):  # a journald priority prefix
                line = line[line.index(b">") + 1 :]
            try:
                self.lines.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                self.lines.append({"event": "<not json>", "raw": raw.decode(errors="replace")})

    async def _read_stderr(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            self.stderr.append(raw.decode(errors="replace"))

    def find(self, event: str, **fields: Any) -> dict[str, Any] | None:
        for line in reversed(self.lines):
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                return line
        return None

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == event]

    async def wait_log(
        self, event: str, after: int = 0, timeout_s: float = DEADLINE_S, **fields: Any
    ) -> dict[str, Any]:
        """The first log line named `event` (with `fields`) after line number `after`."""

        def check() -> dict[str, Any] | None:
            for line in self.lines[after:]:
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            if self.process is not None and self.process.returncode is not None:
                pytest.fail(f"daemon exited {self.process.returncode}: {''.join(self.stderr)}")
            return None

        result: dict[str, Any] = await eventually(check, timeout_s)
        return result

    def url(self, path: str) -> str:
        return f"http://{self.listen}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://{self.admin}{path}"

    async def post(
        self,
        path: str,
        body: bytes | dict[str, Any] | list[Any] = b"{}",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """POST to the inbound listener: (status, JSON reply, reply headers)."""
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.url(path), data=data, headers=hdrs, timeout=aiohttp.ClientTimeout(total=30)
            ) as response,
        ):
            return response.status, orjson.loads(await response.read()), dict(response.headers)

    async def ready(self) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.admin_url("/readyz")) as response,
        ):
            return response.status

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout_s: float = DEADLINE_S) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code

    async def stop(self) -> int:
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        return await self.wait()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.wait()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the journal the way an operator would, with a plain sqlite3 connection."""
        with contextlib.closing(sqlite3.connect(self.config_path.parent / "relay.db")) as conn:
            return conn.execute(sql, params).fetchall()


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    """A factory: write the config text to tmp_path and start the daemon on it."""
    started: list[Daemon] = []

    async def make(config_text: str, **kwargs: Any) -> Daemon:
        path = tmp_path / "relay.toml"
        path.write_text(config_text)
        daemon = Daemon(path, **kwargs)
        started.append(daemon)
        return await daemon.start()

    yield make
    for daemon in started:
        await daemon.kill()
