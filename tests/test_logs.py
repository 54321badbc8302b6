"""The log pipeline's own parts, without a daemon."""

from __future__ import annotations

import asyncio
import datetime
import io
import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog

from relay import logs


@pytest.fixture
def restored_structlog() -> Iterator[None]:
    """Put structlog's configuration back as it was after a test that configures it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    logs.rebind_loggers()  # module loggers of later tests write where they did before


@pytest.mark.parametrize(
    "now_ns",
    [
        1_764_356_400_123_456_789,  # 2025-11-28T19:00:00.123456789
        1_764_356_400_000_000_000,  # on the second: still six digits
        1_764_356_459_999_999_999,  # the last microsecond of a minute
    ],
)
def test_timestamp_is_utc_iso_with_microseconds(
    monkeypatch: pytest.MonkeyPatch, now_ns: int
) -> None:
    """`ts` is the instant in UTC, ISO 8601 with six fraction digits and a Z, as
    structlog's TimeStamper(fmt="iso", utc=True) writes it."""
    monkeypatch.setattr(logs.time, "time_ns", lambda: now_ns)
    stamp = logs._timestamp(None, "info", {})["ts"]
    instant = datetime.datetime.fromtimestamp(now_ns // 1000 / 1e6, datetime.UTC)
    assert stamp == instant.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.usefixtures("restored_structlog")
def test_each_json_line_carries_the_time_of_its_own_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lines written across a second boundary each show their own second (the cached
    date and time never leak into the next second)."""
    clock = iter([1_764_356_400_999_999_000, 1_764_356_401_000_001_000])
    monkeypatch.setattr(logs.time, "time_ns", lambda: next(clock))
    out = io.BytesIO()
    stream = io.TextIOWrapper(out, write_through=True)
    logs.configure("json", "info", stream)
    log = logs.get_logger().bind()
    log.info("first")
    log.info("second")
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["ts"] for line in lines] == [
        "2025-11-28T19:00:00.999999Z",
        "2025-11-28T19:00:01.000001Z",
    ]


class CountingStream(io.BytesIO):
    """A binary stream that counts the writes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


async def test_lines_of_one_loop_turn_are_written_together_in_order() -> None:
    """On the event loop, the lines of a turn reach the stream in one write at the end of
    the turn, in the order they were logged; nothing is left unwritten."""
    stream = CountingStream()
    writer = logs.LineWriter(stream)
    for n in range(50):
        writer.msg(b'{"n":%d}' % n)
    assert stream.writes == 0
    await asyncio.sleep(0)  # the end of the turn
    assert stream.writes == 1
    assert [orjson.loads(line)["n"] for line in stream.getvalue().splitlines()] == list(range(50))


def test_lines_without_a_loop_are_written_at_once() -> None:
    """With no event loop running (the CLI, other threads), each line is written at once."""
    stream = CountingStream()
    writer = logs.LineWriter(stream)
    writer.msg(b'{"n":1}')
    writer.msg(b'{"n":2}')
    assert (stream.writes, stream.getvalue()) == (2, b'{"n":1}\n{"n":2}\n')


class BrokenPipe(io.BytesIO):
    """A stream whose reader has gone: every write fails as a closed pipe does."""

    def write(self, data: bytes) -> int:  # type: ignore[override]
        raise BrokenPipeError(32, "Broken pipe")


def test_a_broken_stream_is_reported_once_and_logging_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """When stdout's reader is gone, logging neither raises nor repeats itself: one line
    on stderr says lines are dropped from now on."""
    writer = logs.LineWriter(BrokenPipe())
    for n in range(3):
        writer.msg(b'{"n":%d}' % n)
    assert capsys.readouterr().err.count("log output failed") == 1


@pytest.mark.usefixtures("restored_structlog")
def test_module_loggers_follow_each_configure() -> None:
    """A logger made at import time (before `configure`) writes at the level and to the
    stream of the latest `configure`: disabled levels write nothing, enabled ones a line."""
    log = logs.get_logger()  # as a module does at import
    quiet, loud = io.BytesIO(), io.BytesIO()
    streams = [io.TextIOWrapper(out, write_through=True) for out in (quiet, loud)]
    logs.configure("json", "warning", streams[0])
    log.info("dropped")
    log.warning("kept", n=1)
    logs.configure("json", "info", streams[1])
    log.info("now kept", n=2)
    logs.flush()
    assert [orjson.loads(line)["event"] for line in quiet.getvalue().splitlines()] == ["kept"]
    assert [orjson.loads(line)["n"] for line in loud.getvalue().splitlines()] == [2]


@pytest.mark.usefixtures("restored_structlog")
def test_module_loggers_still_bind() -> None:
    """`bind` and other structlog methods remain available on a module logger."""
    out = io.BytesIO()
    stream = io.TextIOWrapper(out, write_through=True)
    logs.configure("json", "info", stream)
    logs.get_logger().bind(target="svc").info("bound")
    logs.flush()
    assert orjson.loads(out.getvalue())["target"] == "svc"


def test_a_closed_stream_is_reported_once_and_logging_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A stream closed under relay (ValueError rather than a broken pipe) is treated the
    same way: one line on stderr, lines dropped, nothing raised to the caller."""
    stream = io.BytesIO()
    stream.close()
    writer = logs.LineWriter(stream)
    for n in range(3):
        writer.msg(b'{"n":%d}' % n)
    assert capsys.readouterr().err.count("log output failed") == 1


def test_a_line_with_undecodable_text_is_still_written() -> None:
    """A value carrying a sender's non-UTF-8 bytes (lone surrogates) is logged with U+FFFD
    in their place instead of failing the line (and the request that logged it)."""
    render = logs._PrefixedJSON()
    line = render(None, "info", {"event": "event.rejected", "path": "/a\udcff", "n": ["\udce9"]})
    assert orjson.loads(line) == {"event": "event.rejected", "path": "/a\ufffd", "n": ["\ufffd"]}


@pytest.mark.usefixtures("restored_structlog")
@pytest.mark.parametrize(
    ("journal_stream", "prefixes"),
    [
        ("{dev}:{ino}", [b"<3>{", b"<6>{"]),  # stdout is the stream journald gave
        ("{dev}:{other}", [b"{", b"{"]),  # inherited, but stdout was redirected since
        ("8:99999", [b"{", b"{"]),
        ("", [b"{", b"{"]),
    ],
)
def test_priority_prefix_only_when_stdout_is_journalds_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal_stream: str, prefixes: list[bytes]
) -> None:
    """JSON lines start with their syslog priority (`<3>` for an error) only when
    `JOURNAL_STREAM` names stdout's device and inode; `relay run | jq` under a unit (the
    variable inherited, stdout a pipe) gets plain JSON lines that parse."""
    path = tmp_path / "stdout"
    with path.open("w") as stream:
        status = os.fstat(stream.fileno())
        value = journal_stream.format(dev=status.st_dev, ino=status.st_ino, other=status.st_ino + 1)
        monkeypatch.setenv("JOURNAL_STREAM", value)
        logs.configure("json", "info", stream)
        log = logs.get_logger().bind()
        log.error("bad")
        log.info("fine")
    lines = path.read_bytes().splitlines()
    assert [line[: len(prefix)] for line, prefix in zip(lines, prefixes, strict=True)] == prefixes


@pytest.mark.usefixtures("restored_structlog")
def test_a_stream_without_a_file_descriptor_is_not_journalds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream with no file descriptor behind it gets plain JSON lines whatever
    `JOURNAL_STREAM` says."""
    monkeypatch.setenv("JOURNAL_STREAM", "8:4242")
    out = io.BytesIO()
    stream = io.TextIOWrapper(out, write_through=True)
    logs.configure("json", "info", stream)
    logs.get_logger().bind().error("bad")
    assert out.getvalue().startswith(b'{"event":"bad"')
